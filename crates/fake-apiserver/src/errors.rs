//! `meta.k8s.io/v1` `Status` failures.

use serde_json::{Value, json};

use crate::resources::ResourceDef;

/// A failure answered as a Kubernetes `Status` object.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ApiError {
    pub(crate) code: u16,
    pub(crate) reason: &'static str,
    pub(crate) message: String,
    pub(crate) details: Option<Value>,
}

fn details(def: &ResourceDef, name: &str, kind: &str) -> Value {
    let mut d = json!({"name": name, "kind": kind});
    if !def.group.is_empty() {
        d["group"] = json!(def.group);
    }
    d
}

impl ApiError {
    pub(crate) fn new(code: u16, reason: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    pub(crate) fn not_found(def: &ResourceDef, name: &str) -> ApiError {
        ApiError {
            details: Some(details(def, name, &def.plural)),
            ..ApiError::new(
                404,
                "NotFound",
                format!("{} \"{name}\" not found", def.qualified()),
            )
        }
    }

    pub(crate) fn resource_not_found() -> ApiError {
        ApiError {
            details: Some(json!({})),
            ..ApiError::new(
                404,
                "NotFound",
                "the server could not find the requested resource",
            )
        }
    }

    pub(crate) fn already_exists(def: &ResourceDef, name: &str) -> ApiError {
        ApiError {
            details: Some(details(def, name, &def.plural)),
            ..ApiError::new(
                409,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", def.qualified()),
            )
        }
    }

    pub(crate) fn conflict(def: &ResourceDef, name: &str) -> ApiError {
        ApiError::conflict_msg(
            def,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }

    pub(crate) fn conflict_msg(def: &ResourceDef, name: &str, why: &str) -> ApiError {
        ApiError {
            details: Some(details(def, name, &def.plural)),
            ..ApiError::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} \"{name}\": {why}",
                    def.qualified()
                ),
            )
        }
    }

    /// 422 with one field cause, like `errors.NewInvalid`.
    pub(crate) fn invalid(def: &ResourceDef, name: &str, field: &str, message: &str) -> ApiError {
        let qualified_kind = if def.group.is_empty() {
            def.kind.clone()
        } else {
            format!("{}.{}", def.kind, def.group)
        };
        let cause = if field.is_empty() {
            message.to_string()
        } else {
            format!("{field}: {message}")
        };
        let mut d = details(def, name, &def.kind);
        d["causes"] = json!([{"reason": "FieldValueInvalid", "message": message, "field": field}]);
        ApiError {
            details: Some(d),
            ..ApiError::new(
                422,
                "Invalid",
                format!("{qualified_kind} \"{name}\" is invalid: {cause}"),
            )
        }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "BadRequest", message)
    }

    pub(crate) fn method_not_allowed(message: impl Into<String>) -> ApiError {
        ApiError::new(405, "MethodNotAllowed", message)
    }

    pub(crate) fn expired(message: impl Into<String>) -> ApiError {
        ApiError::new(410, "Expired", message)
    }

    pub(crate) fn unsupported_media_type(message: impl Into<String>) -> ApiError {
        ApiError::new(415, "UnsupportedMediaType", message)
    }

    pub(crate) fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(500, "InternalError", message)
    }

    /// The `Status` object.
    pub(crate) fn to_status(&self) -> Value {
        let mut s = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(d) = &self.details {
            s["details"] = d.clone();
        }
        s
    }
}
