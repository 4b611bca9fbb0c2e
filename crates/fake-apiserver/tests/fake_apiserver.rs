//! The fake API server against an unmodified kube 5 client and real kubectl.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// kube-derive printcolumn(...) attributes repeat `type_ = "string"`.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, ObjectMeta, Patch,
    PatchParams, PostParams,
};
use kube::core::{PartialObjectMeta, WatchEvent};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as RecorderEvent, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, WatchStreamExt, finalizer, watcher};
use kube::{Client, CustomResource, CustomResourceExt, Resource, ResourceExt};
use provider_proxy_fake_apiserver::{FakeApiServer, ResourceDef, TokenReviewAnswer};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, JsonSchema, PartialEq)]
#[kube(
    group = "test.example.com",
    version = "v1",
    kind = "Widget",
    namespaced,
    status = "WidgetStatus",
    shortname = "wd",
    printcolumn(name = "Color", type_ = "string", json_path = ".spec.color"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
pub struct WidgetSpec {
    pub color: String,
    #[serde(default)]
    pub size: i32,
}

#[derive(Deserialize, Serialize, Clone, Debug, JsonSchema, PartialEq, Default)]
pub struct WidgetStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

const TEST_TIMEOUT: Duration = Duration::from_secs(60);

async fn bounded<F: Future<Output = ()>>(f: F) {
    tokio::time::timeout(TEST_TIMEOUT, f)
        .await
        .expect("test took too long");
}

async fn setup() -> (FakeApiServer, Client) {
    let server = FakeApiServer::start().await;
    let crd_yaml = serde_yaml::to_string(&Widget::crd()).unwrap();
    let defs = server.register_crd_yaml(&crd_yaml).unwrap();
    assert_eq!(defs.len(), 1);
    let client = Client::try_from(server.kube_config()).unwrap();
    (server, client)
}

fn api_code(e: &kube::Error) -> (u16, String) {
    match e {
        kube::Error::Api(s) => (s.code, s.reason.clone()),
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn secret(name: &str, labels: &[(&str, &str)]) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..ObjectMeta::default()
        },
        string_data: Some(BTreeMap::from([("token".to_string(), format!("v-{name}"))])),
        ..Secret::default()
    }
}

fn widget(name: &str, color: &str) -> Widget {
    Widget::new(
        name,
        WidgetSpec {
            color: color.into(),
            size: 1,
        },
    )
}

fn ready_condition(status: &str) -> Condition {
    Condition {
        type_: "Ready".into(),
        status: status.into(),
        reason: "Test".into(),
        message: String::new(),
        last_transition_time: Time(
            k8s_openapi::jiff::Timestamp::from_second(1_700_000_000).unwrap(),
        ),
        observed_generation: None,
    }
}

async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    for _ in 0..400 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for: {what}");
}

async fn raw(
    client: &Client,
    method: &str,
    uri: &str,
    accept: &str,
    ct: &str,
    body: &str,
) -> Result<String, kube::Error> {
    let req = http::Request::builder()
        .method(method)
        .uri(uri)
        .header("accept", accept)
        .header("content-type", ct)
        .body(body.as_bytes().to_vec())
        .unwrap();
    client.request_text(req).await
}

#[tokio::test]
async fn discovery_and_version() {
    bounded(async {
        let (server, client) = setup().await;
        let v = client.apiserver_version().await.unwrap();
        assert_eq!((v.major.as_str(), v.minor.as_str()), ("1", "33"));
        assert_eq!(v.git_version, "v1.33.0");

        // Aggregated discovery is asked for, legacy JSON is answered.
        let apis = raw(
            &client,
            "GET",
            "/apis",
            "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json",
            "application/json",
            "",
        )
        .await
        .unwrap();
        let apis: Value = serde_json::from_str(&apis).unwrap();
        assert_eq!(apis["kind"], "APIGroupList");
        let groups: Vec<&str> = apis["groups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["name"].as_str().unwrap())
            .collect();
        for g in [
            "test.example.com",
            "coordination.k8s.io",
            "events.k8s.io",
            "authentication.k8s.io",
            "apiextensions.k8s.io",
        ] {
            assert!(groups.contains(&g), "{g} missing from {groups:?}");
        }
        let list: Value = serde_json::from_str(
            &raw(
                &client,
                "GET",
                "/apis/test.example.com/v1",
                "application/json",
                "application/json",
                "",
            )
            .await
            .unwrap(),
        )
        .unwrap();
        assert_eq!(list["kind"], "APIResourceList");
        assert_eq!(list["resources"][0]["name"], "widgets");
        assert_eq!(list["resources"][0]["shortNames"], json!(["wd"]));
        assert_eq!(list["resources"][0]["singularName"], "widget");
        assert_eq!(list["resources"][0]["namespaced"], true);
        assert_eq!(list["resources"][1]["name"], "widgets/status");

        // kube's own discovery finds everything.
        let discovery = kube::Discovery::new(client.clone()).run().await.unwrap();
        let (ar, caps) = discovery
            .resolve_gvk(&GroupVersionKind::gvk("test.example.com", "v1", "Widget"))
            .unwrap();
        assert_eq!(ar.plural, "widgets");
        assert!(caps.subresources.iter().any(|(r, _)| r.plural == "status"));
        assert!(
            discovery
                .resolve_gvk(&GroupVersionKind::gvk("coordination.k8s.io", "v1", "Lease"))
                .is_some()
        );

        // Aggregated discovery (opt-in), as kube's run_aggregated wants it.
        server.set_aggregated_discovery(true);
        let agg = kube::Discovery::new(client.clone())
            .run_aggregated()
            .await
            .unwrap();
        let (ar, caps) = agg
            .resolve_gvk(&GroupVersionKind::gvk("test.example.com", "v1", "Widget"))
            .unwrap();
        assert_eq!(ar.plural, "widgets");
        assert!(caps.subresources.iter().any(|(r, _)| r.plural == "status"));
        assert!(
            agg.resolve_gvk(&GroupVersionKind::gvk("", "v1", "Secret"))
                .is_some()
        );
        server.set_aggregated_discovery(false);

        // Unknown paths are NotFound Status objects.
        let err = raw(
            &client,
            "GET",
            "/apis/nope.example.com/v1/things",
            "application/json",
            "application/json",
            "",
        )
        .await
        .unwrap_err();
        assert_eq!(api_code(&err), (404, "NotFound".into()));
        server.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn secrets_crud_paging_and_selectors() {
    bounded(async {
        let (server, client) = setup().await;
        let secrets: Api<Secret> = Api::namespaced(client.clone(), "default");
        let created = secrets
            .create(&PostParams::default(), &secret("s0", &[("app", "web")]))
            .await
            .unwrap();
        assert!(created.string_data.is_none());
        assert_eq!(
            created.data.as_ref().unwrap()["token"].0,
            b"v-s0".to_vec(),
            "stringData folded into base64 data"
        );
        assert_eq!(created.type_.as_deref(), Some("Opaque"));
        assert!(created.metadata.uid.is_some());
        assert!(created.metadata.creation_timestamp.is_some());
        assert_eq!(created.metadata.generation, None, "Secrets carry no generation");
        let stored = server.get_json("", "v1", "secrets", Some("default"), "s0").unwrap();
        assert_eq!(stored["data"]["token"], "di1zMA==");

        let dup = secrets
            .create(&PostParams::default(), &secret("s0", &[]))
            .await
            .unwrap_err();
        assert_eq!(api_code(&dup), (409, "AlreadyExists".into()));

        for i in 1..7 {
            let tier = if i % 2 == 0 { "even" } else { "odd" };
            secrets
                .create(&PostParams::default(), &secret(&format!("s{i}"), &[("app", "batch"), ("tier", tier)]))
                .await
                .unwrap();
        }
        // Another namespace, to check scoping.
        Api::<Secret>::namespaced(client.clone(), "other")
            .create(&PostParams::default(), &secret("elsewhere", &[("app", "web")]))
            .await
            .unwrap();

        // Paging: 7 objects, limit 3.
        let mut names = Vec::new();
        let mut pages = 0;
        let mut token: Option<String> = None;
        let mut first_rv = None;
        loop {
            let mut lp = ListParams::default().limit(3);
            if let Some(t) = &token {
                lp = lp.continue_token(t);
            }
            let page = secrets.list(&lp).await.unwrap();
            pages += 1;
            first_rv.get_or_insert(page.metadata.resource_version.clone().unwrap());
            names.extend(page.items.iter().map(|s| s.name_any()));
            token = page.metadata.continue_.filter(|c| !c.is_empty());
            if token.is_none() {
                break;
            }
            assert!(page.items.len() == 3);
        }
        assert_eq!(pages, 3);
        assert_eq!(names, ["s0", "s1", "s2", "s3", "s4", "s5", "s6"]);
        let bad = secrets
            .list(&ListParams::default().continue_token("not-a-token"))
            .await
            .unwrap_err();
        assert_eq!(api_code(&bad).0, 400);

        let count = |sel: &'static str| {
            let secrets = secrets.clone();
            async move {
                secrets
                    .list(&ListParams::default().labels(sel))
                    .await
                    .unwrap()
                    .items
                    .len()
            }
        };
        assert_eq!(count("app=web").await, 1);
        assert_eq!(count("app==batch").await, 6);
        assert_eq!(count("app!=batch").await, 1);
        assert_eq!(count("tier in (odd,even)").await, 6);
        assert_eq!(count("app=batch,tier notin (odd)").await, 3);
        assert_eq!(count("tier").await, 6);
        assert_eq!(count("!tier").await, 1);
        let by_name = secrets
            .list(&ListParams::default().fields("metadata.name=s3"))
            .await
            .unwrap();
        assert_eq!(by_name.items.len(), 1);
        let not_name = secrets
            .list(&ListParams::default().fields("metadata.name!=s3,metadata.namespace==default"))
            .await
            .unwrap();
        assert_eq!(not_name.items.len(), 6);
        let all: Api<Secret> = Api::all(client.clone());
        assert_eq!(all.list(&ListParams::default()).await.unwrap().items.len(), 8);
        assert_eq!(
            all.list(&ListParams::default().fields("type=Opaque").labels("app=web"))
                .await
                .unwrap()
                .items
                .len(),
            2
        );
        let unsupported = secrets
            .list(&ListParams::default().fields("spec.nope=1"))
            .await
            .unwrap_err();
        assert_eq!(api_code(&unsupported).0, 400);
        let bad_labels = secrets
            .list(&ListParams::default().labels("a in (b"))
            .await
            .unwrap_err();
        assert_eq!(api_code(&bad_labels).0, 400);

        // Replace with the current resourceVersion works, with a stale one conflicts.
        let mut s1 = secrets.get("s1").await.unwrap();
        let stale = s1.clone();
        s1.string_data = Some(BTreeMap::from([("extra".to_string(), "x".to_string())]));
        let replaced = secrets.replace("s1", &PostParams::default(), &s1).await.unwrap();
        assert_eq!(replaced.data.as_ref().unwrap()["extra"].0, b"x".to_vec());
        assert_ne!(replaced.resource_version(), stale.resource_version());
        let conflict = secrets
            .replace("s1", &PostParams::default(), &stale)
            .await
            .unwrap_err();
        assert_eq!(api_code(&conflict), (409, "Conflict".into()));

        // Strategic merge (what kubectl sends for Secrets) and merge patch.
        let patched = secrets
            .patch(
                "s1",
                &PatchParams::default(),
                &Patch::Strategic(json!({"stringData": {"more": "y"}, "metadata": {"labels": {"patched": "yes"}}})),
            )
            .await
            .unwrap();
        assert_eq!(patched.data.as_ref().unwrap()["more"].0, b"y".to_vec());
        assert_eq!(patched.labels()["patched"], "yes");

        // Delete returns the object; then it is gone.
        let deleted = secrets.delete("s2", &DeleteParams::default()).await.unwrap();
        assert_eq!(deleted.left().unwrap().name_any(), "s2");
        let gone = secrets.get("s2").await.unwrap_err();
        assert_eq!(api_code(&gone), (404, "NotFound".into()));
        assert!(secrets.get_opt("s2").await.unwrap().is_none());
        let gone = secrets.delete("s2", &DeleteParams::default()).await.unwrap_err();
        assert_eq!(api_code(&gone).0, 404);

        // generateName.
        let generated = secrets
            .create(
                &PostParams::default(),
                &Secret {
                    metadata: ObjectMeta {
                        generate_name: Some("gen-".into()),
                        ..ObjectMeta::default()
                    },
                    ..Secret::default()
                },
            )
            .await
            .unwrap();
        assert!(generated.name_any().starts_with("gen-") && generated.name_any().len() == 9);

        // Bad input answers Status errors, not panics.
        for (method, ct, body) in [
            ("POST", "application/json", "{not json"),
            ("POST", "application/json", "[1,2]"),
            ("POST", "application/json", r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"x"}}"#),
            ("POST", "application/json", r#"{"apiVersion":"v1","kind":"Secret","metadata":{"name":"Bad_Name"}}"#),
            ("POST", "application/json", r#"{"apiVersion":"v1","kind":"Secret","metadata":{"name":"b"},"data":{"k":"***"}}"#),
        ] {
            let err = raw(&client, method, "/api/v1/namespaces/default/secrets", "application/json", ct, body)
                .await
                .unwrap_err();
            let (code, _) = api_code(&err);
            assert!(code == 400 || code == 422, "{body}: {code}");
        }
        let err = raw(&client, "PATCH", "/api/v1/namespaces/default/secrets/s1", "application/json", "text/plain", "{}")
            .await
            .unwrap_err();
        assert_eq!(api_code(&err).0, 415);
        let err = raw(&client, "PUT", "/api/v1/namespaces/default/secrets", "application/json", "application/json", "{}")
            .await
            .unwrap_err();
        assert_eq!(api_code(&err).0, 405);
        server.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn custom_resource_status_generation_and_patches() {
    bounded(async {
        let (server, client) = setup().await;
        let widgets: Api<Widget> = Api::namespaced(client.clone(), "default");
        let mut w = widget("w1", "red");
        w.status = Some(WidgetStatus {
            message: Some("ignored on create".into()),
            ..WidgetStatus::default()
        });
        let created = widgets.create(&PostParams::default(), &w).await.unwrap();
        assert_eq!(created.metadata.generation, Some(1));
        assert!(created.status.is_none(), "status is dropped on create");

        // Status writes change only status and never bump generation.
        let st = widgets
            .patch_status(
                "w1",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"color": "ignored"}, "status": {"message": "hello"}})),
            )
            .await
            .unwrap();
        assert_eq!(st.spec.color, "red");
        assert_eq!(st.status.as_ref().unwrap().message.as_deref(), Some("hello"));
        assert_eq!(st.metadata.generation, Some(1));
        assert_ne!(st.resource_version(), created.resource_version());

        // Main-resource writes ignore status.
        let main = widgets
            .patch(
                "w1",
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"message": "nope"}, "metadata": {"labels": {"a": "b"}}})),
            )
            .await
            .unwrap();
        assert_eq!(main.status.as_ref().unwrap().message.as_deref(), Some("hello"));
        assert_eq!(main.metadata.generation, Some(1), "label change keeps generation");

        // A spec change bumps generation.
        let spec = widgets
            .patch("w1", &PatchParams::default(), &Patch::Merge(json!({"spec": {"color": "blue"}})))
            .await
            .unwrap();
        assert_eq!(spec.metadata.generation, Some(2));
        // The same patch again is a no-op: same resourceVersion.
        let again = widgets
            .patch("w1", &PatchParams::default(), &Patch::Merge(json!({"spec": {"color": "blue"}})))
            .await
            .unwrap();
        assert_eq!(again.resource_version(), spec.resource_version());

        // replace_status takes only the status.
        let mut full = widgets.get("w1").await.unwrap();
        full.spec.color = "ignored".into();
        full.status = Some(WidgetStatus {
            phase: Some("Ready".into()),
            conditions: vec![ready_condition("True")],
            ..WidgetStatus::default()
        });
        let rs = widgets.replace_status("w1", &PostParams::default(), &full).await.unwrap();
        assert_eq!(rs.spec.color, "blue");
        assert_eq!(rs.status.as_ref().unwrap().phase.as_deref(), Some("Ready"));
        assert_eq!(rs.status.as_ref().unwrap().message, None);
        assert_eq!(rs.metadata.generation, Some(2));
        let stale = widgets
            .replace_status("w1", &PostParams::default(), &full)
            .await
            .unwrap_err();
        assert_eq!(api_code(&stale), (409, "Conflict".into()));
        assert_eq!(widgets.get_status("w1").await.unwrap().spec.color, "blue");

        // Custom resources need a resourceVersion on PUT.
        let mut no_rv = widgets.get("w1").await.unwrap();
        no_rv.metadata.resource_version = None;
        let err = widgets.replace("w1", &PostParams::default(), &no_rv).await.unwrap_err();
        assert_eq!(api_code(&err), (422, "Invalid".into()));

        // resourceVersion in a merge patch body is a precondition.
        let err = widgets
            .patch(
                "w1",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"resourceVersion": "1"}, "spec": {"size": 5}})),
            )
            .await
            .unwrap_err();
        assert_eq!(api_code(&err), (409, "Conflict".into()));

        // Strategic merge patch is not for custom resources.
        let err = widgets
            .patch("w1", &PatchParams::default(), &Patch::Strategic(json!({"spec": {"size": 5}})))
            .await
            .unwrap_err();
        assert_eq!(api_code(&err).0, 415);

        // JSON patch with test: failing test is 422, passing test applies.
        let path = "/apis/test.example.com/v1/namespaces/default/widgets/w1";
        let err = raw(
            &client,
            "PATCH",
            path,
            "application/json",
            "application/json-patch+json",
            r#"[{"op":"test","path":"/spec/color","value":"red"},{"op":"replace","path":"/spec/color","value":"x"}]"#,
        )
        .await
        .unwrap_err();
        assert_eq!(api_code(&err), (422, "Invalid".into()));
        let ok = raw(
            &client,
            "PATCH",
            path,
            "application/json",
            "application/json-patch+json",
            r#"[{"op":"test","path":"/spec/color","value":"blue"},{"op":"replace","path":"/spec/color","value":"green"},{"op":"add","path":"/metadata/labels/x","value":"y"}]"#,
        )
        .await
        .unwrap();
        let ok: Widget = serde_json::from_str(&ok).unwrap();
        assert_eq!(ok.spec.color, "green");
        assert_eq!(ok.metadata.generation, Some(3));

        // Server-side apply: creates, merges, drops fields the manager stopped applying.
        let pp = PatchParams::apply("test-manager").force();
        let applied = widgets
            .patch(
                "w2",
                &pp,
                &Patch::Apply(json!({
                    "apiVersion": "test.example.com/v1", "kind": "Widget",
                    "metadata": {"name": "w2", "labels": {"one": "1", "two": "2"}},
                    "spec": {"color": "red", "size": 3}
                })),
            )
            .await
            .unwrap();
        assert_eq!(applied.metadata.generation, Some(1));
        assert_eq!(applied.spec.size, 3);
        let reapplied = widgets
            .patch(
                "w2",
                &pp,
                &Patch::Apply(json!({
                    "apiVersion": "test.example.com/v1", "kind": "Widget",
                    "metadata": {"name": "w2", "labels": {"one": "1"}},
                    "spec": {"color": "red"}
                })),
            )
            .await
            .unwrap();
        assert_eq!(reapplied.labels().len(), 1);
        assert_eq!(reapplied.spec.size, 0, "size no longer applied -> removed");
        assert_eq!(reapplied.metadata.generation, Some(2));
        // Status apply (what controllers do), on the status subresource.
        let status_apply = widgets
            .patch_status(
                "w2",
                &PatchParams::apply("test-controller").force(),
                &Patch::Apply(json!({
                    "apiVersion": "test.example.com/v1", "kind": "Widget",
                    "status": {"phase": "Ready", "conditions": [ready_condition("True")]}
                })),
            )
            .await
            .unwrap();
        assert_eq!(status_apply.status.as_ref().unwrap().phase.as_deref(), Some("Ready"));
        assert_eq!(status_apply.metadata.generation, Some(2));
        assert_eq!(status_apply.spec.color, "red");
        let err = widgets
            .patch("w3", &PatchParams::default(), &Patch::Apply(json!({"apiVersion": "test.example.com/v1", "kind": "Widget", "metadata": {"name": "w3"}, "spec": {"color": "x"}})))
            .await
            .unwrap_err();
        assert_eq!(api_code(&err).0, 400, "apply without fieldManager");
        let err = widgets
            .patch_status("missing", &pp, &Patch::Apply(json!({"apiVersion": "test.example.com/v1", "kind": "Widget", "status": {}})))
            .await
            .unwrap_err();
        assert_eq!(api_code(&err).0, 404);

        // Requests are recorded exactly.
        let reqs = server.requests();
        let apply = reqs
            .iter()
            .find(|r| r.method == "PATCH" && r.path.ends_with("/widgets/w2/status"))
            .unwrap();
        assert_eq!(apply.content_type.as_deref(), Some("application/apply-patch+yaml"));
        assert_eq!(apply.query_param("fieldManager").as_deref(), Some("test-controller"));
        assert_eq!(apply.query_param("force").as_deref(), Some("true"));
        assert_eq!(apply.body_json().unwrap()["status"]["phase"], "Ready");

        // DynamicObject access to the same resource.
        let ar = ApiResource::from_gvk(&GroupVersionKind::gvk("test.example.com", "v1", "Widget"));
        let dynamic: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &ar);
        let list = dynamic.list(&ListParams::default()).await.unwrap();
        assert_eq!(list.items.len(), 2);
        let d = dynamic.get("w2").await.unwrap();
        assert_eq!(d.data["spec"]["color"], "red");
        let d = dynamic
            .patch("w2", &PatchParams::default(), &Patch::Merge(json!({"spec": {"color": "pink"}})))
            .await
            .unwrap();
        assert_eq!(d.data["spec"]["color"], "pink");
        let mut obj = DynamicObject::new("w4", &ar).within("default");
        obj.data = json!({"spec": {"color": "teal"}});
        let d = dynamic.create(&PostParams::default(), &obj).await.unwrap();
        assert_eq!(d.metadata.generation, Some(1));
        // The CRD schema prunes unknown fields and applies defaults.
        let d = dynamic
            .patch(
                "w4",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"unknown": 1}, "extra": true})),
            )
            .await
            .unwrap();
        assert_eq!(d.data["spec"], json!({"color": "teal", "size": 0}), "size defaulted: {d:?}");
        assert!(d.data.get("extra").is_none());
        assert_eq!(d.metadata.generation, Some(1), "pruned patch is a no-op");
        server.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn finalizers_and_deletion() {
    bounded(async {
        let (server, client) = setup().await;
        let widgets: Api<Widget> = Api::namespaced(client.clone(), "default");
        widgets
            .create(&PostParams::default(), &widget("f1", "red"))
            .await
            .unwrap();
        let cleaned = Arc::new(AtomicUsize::new(0));

        // kube_runtime::finalizer adds its finalizer with a JSON patch (test + add).
        let obj = Arc::new(widgets.get("f1").await.unwrap());
        let c = cleaned.clone();
        finalizer(&widgets, "test.example.com/cleanup", obj, |ev| async move {
            if let finalizer::Event::Cleanup(_) = ev {
                c.fetch_add(1, Ordering::SeqCst);
            }
            Ok::<_, kube::Error>(Action::await_change())
        })
        .await
        .unwrap();
        let with_fin = widgets.get("f1").await.unwrap();
        assert_eq!(with_fin.finalizers(), ["test.example.com/cleanup"]);
        let json_patch = server
            .requests()
            .into_iter()
            .find(|r| r.content_type.as_deref() == Some("application/json-patch+json"))
            .unwrap();
        assert_eq!(json_patch.body_json().unwrap()[0]["op"], "test");

        // Delete: the object stays with a deletionTimestamp while finalizers remain.
        let resp = widgets
            .delete("f1", &DeleteParams::default())
            .await
            .unwrap();
        let marked = resp.left().unwrap();
        assert!(marked.metadata.deletion_timestamp.is_some());
        let still = widgets.get("f1").await.unwrap();
        assert!(still.metadata.deletion_timestamp.is_some());
        // A second delete changes nothing.
        widgets
            .delete("f1", &DeleteParams::default())
            .await
            .unwrap();
        assert_eq!(
            widgets.get("f1").await.unwrap().resource_version(),
            still.resource_version()
        );
        // No new finalizers while deleting.
        let err = widgets
            .patch(
                "f1",
                &PatchParams::default(),
                &Patch::Merge(
                    json!({"metadata": {"finalizers": ["test.example.com/cleanup", "other"]}}),
                ),
            )
            .await
            .unwrap_err();
        assert_eq!(api_code(&err).0, 422);

        // Cleanup removes the finalizer (test + remove) and the object disappears.
        let c = cleaned.clone();
        finalizer(
            &widgets,
            "test.example.com/cleanup",
            Arc::new(still),
            |ev| async move {
                if let finalizer::Event::Cleanup(_) = ev {
                    c.fetch_add(1, Ordering::SeqCst);
                }
                Ok::<_, kube::Error>(Action::await_change())
            },
        )
        .await
        .unwrap();
        assert_eq!(cleaned.load(Ordering::SeqCst), 1);
        assert!(widgets.get_opt("f1").await.unwrap().is_none());

        // Delete preconditions.
        let w = widgets
            .create(&PostParams::default(), &widget("f2", "red"))
            .await
            .unwrap();
        let err = widgets
            .delete(
                "f2",
                &DeleteParams::default().preconditions(kube::api::Preconditions {
                    resource_version: Some("1".into()),
                    uid: None,
                }),
            )
            .await
            .unwrap_err();
        assert_eq!(api_code(&err), (409, "Conflict".into()));
        widgets
            .delete(
                "f2",
                &DeleteParams::default().preconditions(kube::api::Preconditions {
                    resource_version: w.metadata.resource_version.clone(),
                    uid: w.metadata.uid.clone(),
                }),
            )
            .await
            .unwrap();
        server.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn watcher_sees_changes_and_relists_after_compaction() {
    bounded(async {
        let (server, client) = setup().await;
        let widgets: Api<Widget> = Api::namespaced(client.clone(), "default");
        widgets
            .create(&PostParams::default(), &widget("before", "red"))
            .await
            .unwrap();

        let events: Arc<Mutex<Vec<String>>> = Arc::default();
        let sink = events.clone();
        let task = tokio::spawn(async move {
            let mut stream = watcher(widgets.clone(), watcher::Config::default()).boxed();
            while let Some(ev) = stream.next().await {
                let label = match ev {
                    Ok(watcher::Event::Init) => "init".to_string(),
                    Ok(watcher::Event::InitApply(o)) => format!("initapply:{}", o.name_any()),
                    Ok(watcher::Event::InitDone) => "initdone".to_string(),
                    Ok(watcher::Event::Apply(o)) => {
                        format!("apply:{}:{}", o.name_any(), o.spec.color)
                    }
                    Ok(watcher::Event::Delete(o)) => format!("delete:{}", o.name_any()),
                    Err(e) => format!("error:{e}"),
                };
                sink.lock().unwrap().push(label);
            }
        });
        let has = |s: &'static str| {
            let events = events.clone();
            async move { events.lock().unwrap().iter().any(|e| e == s) }
        };
        eventually("initial list", || has("initdone")).await;
        eventually("watch open", || async { server.open_watches() == 1 }).await;
        assert!(
            events
                .lock()
                .unwrap()
                .contains(&"initapply:before".to_string())
        );

        let widgets: Api<Widget> = Api::namespaced(client.clone(), "default");
        let t0 = std::time::Instant::now();
        widgets
            .create(&PostParams::default(), &widget("w", "red"))
            .await
            .unwrap();
        eventually("ADDED", || has("apply:w:red")).await;
        widgets
            .patch(
                "w",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"color": "blue"}})),
            )
            .await
            .unwrap();
        eventually("MODIFIED", || has("apply:w:blue")).await;
        widgets.delete("w", &DeleteParams::default()).await.unwrap();
        eventually("DELETED", || has("delete:w")).await;
        assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());

        // The watch request looked like kube's.
        let watch_req = server
            .requests()
            .into_iter()
            .find(|r| r.is_watch())
            .unwrap();
        assert_eq!(
            watch_req.query_param("allowWatchBookmarks").as_deref(),
            Some("true")
        );
        assert!(watch_req.query_param("resourceVersion").is_some());

        // Compaction + dropped watches: the watcher resumes with an old RV, gets
        // 410 Expired and lists again.
        let lists_before = server
            .requests()
            .iter()
            .filter(|r| r.method == "GET" && !r.is_watch() && r.path.ends_with("/widgets"))
            .count();
        server.compact();
        server.drop_watches();
        eventually("410 error", || {
            let events = events.clone();
            async move {
                events
                    .lock()
                    .unwrap()
                    .iter()
                    .any(|e| e.contains("error:") && e.to_lowercase().contains("expired"))
            }
        })
        .await;
        eventually("re-list", || async {
            server
                .requests()
                .iter()
                .filter(|r| r.method == "GET" && !r.is_watch() && r.path.ends_with("/widgets"))
                .count()
                > lists_before
        })
        .await;
        eventually("watching again", || async { server.open_watches() == 1 }).await;
        widgets
            .create(&PostParams::default(), &widget("after", "green"))
            .await
            .unwrap();
        eventually("event after re-list", || has("apply:after:green")).await;
        task.abort();
        server.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn watch_streams_bookmarks_selectors_and_metadata() {
    bounded(async {
        let (server, client) = setup().await;
        let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
        // Metadata watcher: PartialObjectMetadata list + watch.
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let sink = seen.clone();
        let task = tokio::spawn(async move {
            let cms: Api<PartialObjectMeta<ConfigMap>> = Api::namespaced(cms.into_client(), "default");
            let mut s = watcher(cms, watcher::Config::default().labels("keep=yes"))
                .touched_objects()
                .boxed();
            while let Some(Ok(o)) = s.next().await {
                sink.lock().unwrap().push(format!("{}:{}", o.name_any(), o.labels().get("keep").cloned().unwrap_or_default()));
            }
        });
        eventually("metadata watch open", || async { server.open_watches() == 1 }).await;
        let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
        let mk = |name: &str, keep: &str| ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some(BTreeMap::from([("keep".to_string(), keep.to_string())])),
                ..ObjectMeta::default()
            },
            data: Some(BTreeMap::from([("k".to_string(), "v".to_string())])),
            ..ConfigMap::default()
        };
        cms.create(&PostParams::default(), &mk("a", "yes")).await.unwrap();
        cms.create(&PostParams::default(), &mk("b", "no")).await.unwrap();
        eventually("metadata event", || {
            let seen = seen.clone();
            async move { seen.lock().unwrap().contains(&"a:yes".to_string()) }
        })
        .await;
        assert!(!seen.lock().unwrap().iter().any(|s| s.starts_with("b:")));
        let meta_req = server
            .requests()
            .into_iter()
            .find(|r| r.is_watch() && r.path.ends_with("/configmaps"))
            .unwrap();
        assert!(meta_req.accept.unwrap().contains("as=PartialObjectMetadata"));
        task.abort();

        // Raw watch: bookmarks, selector transitions, timeoutSeconds.
        let rv = server.resource_version();
        let req = http::Request::builder()
            .uri(format!(
                "/api/v1/namespaces/default/configmaps?watch=1&resourceVersion={rv}&allowWatchBookmarks=true&timeoutSeconds=3&labelSelector=keep%3Dyes"
            ))
            .body(Vec::new())
            .unwrap();
        let mut lines = client.request_events::<Value>(req).await.unwrap().boxed();
        cms.patch("b", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {"keep": "yes"}}})))
            .await
            .unwrap();
        cms.patch("a", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {"keep": "no"}}})))
            .await
            .unwrap();
        let mut got = Vec::new();
        let started = std::time::Instant::now();
        while let Some(ev) = lines.next().await {
            got.push(event_label(ev.unwrap()));
        }
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_millis(2500) && elapsed < Duration::from_secs(6), "{elapsed:?}");
        assert_eq!(got[0], "ADDED:b", "label now matches -> ADDED: {got:?}");
        assert_eq!(got[1], "DELETED:a", "label no longer matches -> DELETED: {got:?}");
        assert!(got.iter().any(|g| g.starts_with("BOOKMARK")), "{got:?}");

        // A too-old resourceVersion gets one ERROR 410 event.
        server.compact();
        let req = http::Request::builder()
            .uri(format!("/api/v1/namespaces/default/configmaps?watch=true&resourceVersion={rv}"))
            .body(Vec::new())
            .unwrap();
        let evs: Vec<String> = client
            .request_events::<Value>(req)
            .await
            .unwrap()
            .map(|e| event_label(e.unwrap()))
            .collect()
            .await;
        assert_eq!(evs, ["ERROR:410:Expired"]);

        // Metadata GET and list.
        let m = cms.get_metadata("a").await.unwrap();
        assert_eq!(m.types.as_ref().unwrap().kind, "PartialObjectMetadata");
        let ml = cms.list_metadata(&ListParams::default()).await.unwrap();
        assert_eq!(ml.items.len(), 2);
        assert!(ml.items.iter().all(|m| m.metadata.labels.is_some()));

        // kube's streaming lists (sendInitialEvents + initial-events-end bookmark).
        let mut streaming = watcher(
            Api::<ConfigMap>::namespaced(client.clone(), "default"),
            watcher::Config::default().streaming_lists(),
        )
        .boxed();
        let mut init = Vec::new();
        loop {
            match streaming.next().await.unwrap().unwrap() {
                watcher::Event::Init => {}
                watcher::Event::InitApply(o) => init.push(o.name_any()),
                watcher::Event::InitDone => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        init.sort();
        assert_eq!(init, ["a", "b"]);
        cms.create(&PostParams::default(), &mk("c", "yes")).await.unwrap();
        match streaming.next().await.unwrap().unwrap() {
            watcher::Event::Apply(o) => assert_eq!(o.name_any(), "c"),
            other => panic!("unexpected {other:?}"),
        }
        let sreq = server
            .requests()
            .into_iter()
            .rfind(|r| r.is_watch() && r.query_param("sendInitialEvents").is_some())
            .unwrap();
        assert_eq!(sreq.query_param("resourceVersionMatch").as_deref(), Some("NotOlderThan"));
        drop(streaming);

        // Table output as kubectl asks for it.
        let table: Value = serde_json::from_str(
            &raw(
                &client,
                "GET",
                "/apis/test.example.com/v1/namespaces/default/widgets",
                "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json",
                "application/json",
                "",
            )
            .await
            .unwrap(),
        )
        .unwrap();
        assert_eq!(table["kind"], "Table");
        let cols: Vec<&str> = table["columnDefinitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(cols, ["Name", "Color", "Ready", "Age"]);
        server.shutdown().await;
    })
    .await;
}

fn event_label(ev: WatchEvent<Value>) -> String {
    let name = |o: &Value| {
        o["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    match ev {
        WatchEvent::Added(o) => format!("ADDED:{}", name(&o)),
        WatchEvent::Modified(o) => format!("MODIFIED:{}", name(&o)),
        WatchEvent::Deleted(o) => format!("DELETED:{}", name(&o)),
        WatchEvent::Bookmark(b) => {
            assert!(!b.metadata.resource_version.is_empty());
            "BOOKMARK".to_string()
        }
        WatchEvent::Error(s) => format!("ERROR:{}:{}", s.code, s.reason),
    }
}

#[derive(Debug)]
struct ReconcileError;

impl std::fmt::Display for ReconcileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("reconcile error")
    }
}

impl std::error::Error for ReconcileError {}

#[tokio::test]
async fn controller_reconciles_on_main_and_secret_changes() {
    bounded(async {
        let (server, client) = setup().await;
        let widgets: Api<Widget> = Api::namespaced(client.clone(), "default");
        let secrets: Api<Secret> = Api::namespaced(client.clone(), "default");
        let w = widgets
            .create(&PostParams::default(), &widget("c1", "red"))
            .await
            .unwrap();

        let reconciles: Arc<Mutex<Vec<String>>> = Arc::default();
        let ctx = reconciles.clone();
        // Both Secret watches are metadata-only (PartialObjectMeta).
        let secrets_meta: Api<PartialObjectMeta<Secret>> =
            Api::namespaced(client.clone(), "default");
        let controller = Controller::new(widgets.clone(), watcher::Config::default())
            .owns(secrets_meta.clone(), watcher::Config::default())
            .watches(
                secrets_meta,
                watcher::Config::default().labels("watched=yes"),
                |s: PartialObjectMeta<Secret>| {
                    s.labels()
                        .get("widget")
                        .map(|w| ObjectRef::<Widget>::new(w).within("default"))
                },
            )
            .run(
                |obj: Arc<Widget>, ctx: Arc<Mutex<Vec<String>>>| async move {
                    ctx.lock()
                        .unwrap()
                        .push(format!("{}:{}", obj.name_any(), obj.spec.color));
                    Ok::<_, ReconcileError>(Action::await_change())
                },
                |_obj, _err: &ReconcileError, _ctx| Action::requeue(Duration::from_secs(1)),
                ctx,
            )
            .for_each(|_| async {});
        let task = tokio::spawn(controller);
        let count = || reconciles.lock().unwrap().len();
        eventually("first reconcile", || async { count() >= 1 }).await;
        eventually("all watches open", || async { server.open_watches() == 3 }).await;

        // A spec change of the main resource.
        let n = count();
        widgets
            .patch(
                "c1",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"color": "blue"}})),
            )
            .await
            .unwrap();
        eventually("reconcile on spec change", || async {
            reconciles.lock().unwrap()[n..]
                .iter()
                .any(|r| r == "c1:blue")
        })
        .await;

        // An owned Secret (ownerReference) changing.
        let n = count();
        let mut owned = secret("owned", &[]);
        owned.metadata.owner_references = Some(vec![w.controller_owner_ref(&()).unwrap()]);
        secrets
            .create(&PostParams::default(), &owned)
            .await
            .unwrap();
        eventually("reconcile on owned secret", || async { count() > n }).await;

        // A watched Secret (metadata watch, no owner) changing.
        let n = count();
        secrets
            .create(
                &PostParams::default(),
                &secret("plain", &[("watched", "yes"), ("widget", "c1")]),
            )
            .await
            .unwrap();
        eventually("reconcile on watched secret", || async { count() > n }).await;
        let accepts: Vec<String> = server
            .requests()
            .into_iter()
            .filter(|r| r.path.ends_with("/secrets"))
            .filter_map(|r| r.accept)
            .collect();
        assert!(
            !accepts.is_empty()
                && accepts
                    .iter()
                    .all(|a| a.contains("as=PartialObjectMetadata")),
            "{accepts:?}"
        );
        task.abort();
        server.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn token_review_events_and_leases() {
    bounded(async {
        let (server, client) = setup().await;
        let reviews: Api<TokenReview> = Api::all(client.clone());
        let review = |token: &str| TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.into()),
                audiences: Some(vec!["provider-proxy".into()]),
            },
            ..TokenReview::default()
        };
        // Default: unauthenticated.
        let r = reviews
            .create(&PostParams::default(), &review("abc"))
            .await
            .unwrap();
        assert_ne!(r.status.unwrap().authenticated, Some(true));
        server.set_token_review(|req| {
            if req.token == "good" && req.audiences == ["provider-proxy"] {
                TokenReviewAnswer {
                    uid: "u-1".into(),
                    ..TokenReviewAnswer::authenticated(
                        "system:serviceaccount:ns:app",
                        &["system:serviceaccounts"],
                    )
                    .with_audiences(&["provider-proxy"])
                }
            } else {
                TokenReviewAnswer::unauthenticated("invalid bearer token")
            }
        });
        let r = reviews
            .create(&PostParams::default(), &review("good"))
            .await
            .unwrap();
        let st = r.status.unwrap();
        assert_eq!(st.authenticated, Some(true));
        let user = st.user.unwrap();
        assert_eq!(
            user.username.as_deref(),
            Some("system:serviceaccount:ns:app")
        );
        assert_eq!(user.uid.as_deref(), Some("u-1"));
        assert_eq!(user.groups.unwrap(), ["system:serviceaccounts"]);
        assert_eq!(st.audiences.unwrap(), ["provider-proxy"]);
        let r = reviews
            .create(&PostParams::default(), &review("bad"))
            .await
            .unwrap();
        let st = r.status.unwrap();
        assert_ne!(st.authenticated, Some(true));
        assert_eq!(st.error.as_deref(), Some("invalid bearer token"));
        assert!(
            server
                .list_json("authentication.k8s.io", "v1", "tokenreviews", None)
                .is_empty()
        );

        // Events: events.k8s.io/v1 and core v1, stored and listed.
        use k8s_openapi::api::core::v1::{Event as CoreEvent, ObjectReference};
        use k8s_openapi::api::events::v1::Event as NewEvent;
        let new_events: Api<NewEvent> = Api::namespaced(client.clone(), "default");
        new_events
            .create(
                &PostParams::default(),
                &NewEvent {
                    metadata: ObjectMeta {
                        name: Some("w1.17a2b3c4d5e6f7a8".into()),
                        ..ObjectMeta::default()
                    },
                    reason: Some("Reconciled".into()),
                    type_: Some("Normal".into()),
                    reporting_controller: Some("provider-proxy".into()),
                    reporting_instance: Some("provider-proxy-0".into()),
                    action: Some("Reconcile".into()),
                    note: Some("ok".into()),
                    regarding: Some(ObjectReference {
                        kind: Some("Widget".into()),
                        name: Some("w1".into()),
                        ..ObjectReference::default()
                    }),
                    event_time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
                        k8s_openapi::jiff::Timestamp::from_second(1_700_000_000).unwrap(),
                    )),
                    ..NewEvent::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(
            new_events
                .list(&ListParams::default())
                .await
                .unwrap()
                .items
                .len(),
            1
        );
        // kube's event Recorder: create, then a merge patch with a series.
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: "provider-proxy".into(),
                instance: Some("provider-proxy-0".into()),
            },
        );
        let widgets: Api<Widget> = Api::namespaced(client.clone(), "default");
        let w = widgets
            .create(&PostParams::default(), &widget("evented", "red"))
            .await
            .unwrap();
        let ev = RecorderEvent {
            type_: EventType::Warning,
            reason: "ProbeFailed".into(),
            note: Some("proxy refused".into()),
            action: "Probe".into(),
            secondary: None,
        };
        recorder.publish(&ev, &w.object_ref(&())).await.unwrap();
        recorder.publish(&ev, &w.object_ref(&())).await.unwrap();
        let recorded = new_events
            .list(&ListParams::default().fields("regarding.name=evented"))
            .await
            .unwrap();
        assert_eq!(recorded.items.len(), 1);
        assert_eq!(recorded.items[0].series.as_ref().unwrap().count, 2);
        assert_eq!(recorded.items[0].reason.as_deref(), Some("ProbeFailed"));
        let core_events: Api<CoreEvent> = Api::namespaced(client.clone(), "default");
        core_events
            .create(
                &PostParams::default(),
                &CoreEvent {
                    metadata: ObjectMeta {
                        generate_name: Some("w1.".into()),
                        ..ObjectMeta::default()
                    },
                    involved_object: ObjectReference {
                        kind: Some("Widget".into()),
                        name: Some("w1".into()),
                        ..ObjectReference::default()
                    },
                    reason: Some("Test".into()),
                    ..CoreEvent::default()
                },
            )
            .await
            .unwrap();
        let listed = core_events
            .list(&ListParams::default().fields("involvedObject.name=w1"))
            .await
            .unwrap();
        assert_eq!(listed.items.len(), 1);

        // Leases: create, conflicting replace, good replace.
        let leases: Api<Lease> = Api::namespaced(client.clone(), "default");
        let lease = leases
            .create(
                &PostParams::default(),
                &Lease {
                    metadata: ObjectMeta {
                        name: Some("leader".into()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some("a".into()),
                        lease_duration_seconds: Some(15),
                        ..LeaseSpec::default()
                    }),
                },
            )
            .await
            .unwrap();
        let mut mine = lease.clone();
        mine.spec.as_mut().unwrap().holder_identity = Some("b".into());
        let taken = leases
            .replace("leader", &PostParams::default(), &mine)
            .await
            .unwrap();
        assert_eq!(taken.spec.unwrap().holder_identity.as_deref(), Some("b"));
        let mut theirs = lease.clone();
        theirs.spec.as_mut().unwrap().holder_identity = Some("c".into());
        let err = leases
            .replace("leader", &PostParams::default(), &theirs)
            .await
            .unwrap_err();
        assert_eq!(api_code(&err), (409, "Conflict".into()));
        let err = leases
            .create(&PostParams::default(), &lease)
            .await
            .unwrap_err();
        assert!(matches!(api_code(&err).0, 409 | 500));

        // A resource registered by hand.
        server.register(
            ResourceDef::new("apps", "v1", "Deployment", "deployments")
                .with_status_subresource()
                .with_short_names(&["deploy"]),
        );
        let ar = ApiResource::from_gvk(&GroupVersionKind::gvk("apps", "v1", "Deployment"));
        let deployments: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &ar);
        let mut d = DynamicObject::new("web", &ar);
        d.data = json!({"spec": {"replicas": 1}});
        deployments
            .create(&PostParams::default(), &d)
            .await
            .unwrap();
        assert!(
            server
                .get_json("apps", "v1", "deployments", Some("default"), "web")
                .is_some()
        );
        server.shutdown().await;
    })
    .await;
}

/// Runs real kubectl against the fake; `None` when kubectl is not installed.
struct Kubectl {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    kubeconfig: PathBuf,
    cache: PathBuf,
}

impl Kubectl {
    fn new(server: &FakeApiServer) -> Option<Kubectl> {
        if Command::new("kubectl")
            .arg("version")
            .arg("--client")
            .output()
            .is_err()
        {
            eprintln!("kubectl not installed: skipping the kubectl checks");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        server.write_kubeconfig(&kubeconfig);
        let cache = dir.path().join("cache");
        Some(Kubectl {
            dir: dir.path().to_path_buf(),
            _dir: dir,
            kubeconfig,
            cache,
        })
    }

    fn file(&self, name: &str, contents: &str) -> PathBuf {
        let p = self.dir.join(name);
        std::fs::write(&p, contents).unwrap();
        p
    }

    async fn run(&self, args: &[&str]) -> (bool, String, String) {
        let mut cmd = Command::new("kubectl");
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(&self.cache)
            .arg("--request-timeout=10s")
            .args(args);
        let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
            .await
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    async fn ok(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.run(args).await;
        assert!(ok, "kubectl {args:?} failed:\nstdout: {out}\nstderr: {err}");
        out
    }
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[tokio::test]
async fn kubectl_apply_get_delete() {
    bounded(async {
        let (server, _client) = setup().await;
        let Some(k) = Kubectl::new(&server) else {
            return;
        };
        let w1 = k.file(
            "w1.yaml",
            "apiVersion: test.example.com/v1\nkind: Widget\nmetadata:\n  name: w1\n  namespace: default\nspec:\n  color: red\n",
        );
        let out = k.ok(&["apply", "--validate=false", "-f", p(&w1)]).await;
        assert!(out.contains("widget.test.example.com/w1 created"), "{out}");
        let stored = server.get_json("test.example.com", "v1", "widgets", Some("default"), "w1").unwrap();
        assert!(stored["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"].is_string());
        let w1 = k.file(
            "w1.yaml",
            "apiVersion: test.example.com/v1\nkind: Widget\nmetadata:\n  name: w1\n  namespace: default\nspec:\n  color: blue\n  size: 2\n",
        );
        let out = k.ok(&["apply", "--validate=false", "-f", p(&w1)]).await;
        assert!(out.contains("widget.test.example.com/w1 configured"), "{out}");
        let stored = server.get_json("test.example.com", "v1", "widgets", Some("default"), "w1").unwrap();
        assert_eq!(stored["spec"], json!({"color": "blue", "size": 2}));
        assert_eq!(stored["metadata"]["generation"], 2);
        let patch = server
            .requests()
            .into_iter()
            .rfind(|r| r.method == "PATCH" && r.path.ends_with("/widgets/w1"))
            .unwrap();
        assert_eq!(patch.content_type.as_deref(), Some("application/merge-patch+json"));
        // Unchanged re-apply.
        let out = k.ok(&["apply", "--validate=false", "-f", p(&w1)]).await;
        assert!(out.contains("unchanged"), "{out}");

        // Status for the printer columns, then `kubectl get <shortname>`.
        let status_patch = json!({"status": {"conditions": [{"type": "Ready", "status": "True", "reason": "Ok", "message": "", "lastTransitionTime": "2024-01-01T00:00:00Z"}]}});
        let client = Client::try_from(server.kube_config()).unwrap();
        Api::<Widget>::namespaced(client.clone(), "default")
            .patch_status("w1", &PatchParams::default(), &Patch::Merge(status_patch))
            .await
            .unwrap();
        let out = k.ok(&["get", "wd"]).await;
        let mut lines = out.lines();
        let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
        assert_eq!(header, ["NAME", "COLOR", "READY", "AGE"], "{out}");
        let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
        assert_eq!(&row[..3], ["w1", "blue", "True"], "{out}");
        let out = k.ok(&["get", "widgets.test.example.com", "w1", "-o", "jsonpath={.spec.color}"]).await;
        assert_eq!(out, "blue");
        let out = k.ok(&["get", "wd", "-A"]).await;
        assert!(out.starts_with("NAMESPACE"), "{out}");

        // Secret with stringData, then a change (strategic merge patch).
        let s = k.file(
            "s.yaml",
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: creds\n  namespace: default\nstringData:\n  user: alice\n",
        );
        let out = k.ok(&["apply", "--validate=false", "-f", p(&s)]).await;
        assert!(out.contains("secret/creds created"), "{out}");
        let s = k.file(
            "s.yaml",
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: creds\n  namespace: default\nstringData:\n  user: bob\n  pass: pw\n",
        );
        let out = k.ok(&["apply", "--validate=false", "-f", p(&s)]).await;
        assert!(out.contains("secret/creds configured"), "{out}");
        let patch = server
            .requests()
            .into_iter()
            .rfind(|r| r.method == "PATCH" && r.path.ends_with("/secrets/creds"))
            .unwrap();
        assert_eq!(patch.content_type.as_deref(), Some("application/strategic-merge-patch+json"));
        let out = k.ok(&["get", "secret", "creds", "-o", "json"]).await;
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["data"]["user"], "Ym9i");
        assert_eq!(v["data"]["pass"], "cHc=");
        assert!(v.get("stringData").is_none());
        let out = k.ok(&["get", "secrets"]).await;
        assert!(out.lines().next().unwrap().split_whitespace().eq(["NAME", "TYPE", "DATA", "AGE"]), "{out}");

        // kubectl create sends protobuf bodies for built-in types.
        k.ok(&["create", "namespace", "team"]).await;
        k.ok(&["-n", "team", "create", "secret", "generic", "tok", "--from-literal=token=abc"]).await;
        k.ok(&["-n", "team", "create", "configmap", "cfg", "--from-literal=k=v"]).await;
        let tok = server.get_json("", "v1", "secrets", Some("team"), "tok").unwrap();
        assert_eq!(tok["data"]["token"], "YWJj");
        assert_eq!(tok["type"], "Opaque");
        assert_eq!(
            server.get_json("", "v1", "configmaps", Some("team"), "cfg").unwrap()["data"],
            json!({"k": "v"})
        );
        let create = server
            .requests()
            .into_iter()
            .rfind(|r| r.method == "POST" && r.path.ends_with("/secrets"))
            .unwrap();
        assert_eq!(create.content_type.as_deref(), Some("application/vnd.kubernetes.protobuf"));
        k.ok(&["delete", "namespace", "team"]).await;
        assert!(server.get_json("", "v1", "secrets", Some("team"), "tok").is_none());

        // Server-side apply.
        let cm = k.file(
            "cm.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\n  namespace: default\ndata:\n  a: \"1\"\n  b: \"2\"\n",
        );
        let out = k.ok(&["apply", "--server-side", "--validate=false", "-f", p(&cm)]).await;
        assert!(out.contains("configmap/settings serverside-applied"), "{out}");
        let cm = k.file(
            "cm.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\n  namespace: default\ndata:\n  a: \"3\"\n",
        );
        k.ok(&["apply", "--server-side", "--validate=false", "-f", p(&cm)]).await;
        let stored = server.get_json("", "v1", "configmaps", Some("default"), "settings").unwrap();
        assert_eq!(stored["data"], json!({"a": "3"}));
        let ssa = server
            .requests()
            .into_iter()
            .rfind(|r| r.method == "PATCH" && r.path.ends_with("/configmaps/settings"))
            .unwrap();
        assert_eq!(ssa.content_type.as_deref(), Some("application/apply-patch+yaml"));
        assert_eq!(ssa.query_param("fieldManager").as_deref(), Some("kubectl"));

        // Delete waits until the object is gone.
        let out = k.ok(&["delete", "wd", "w1"]).await;
        assert!(out.contains("deleted"), "{out}");
        assert!(server.get_json("test.example.com", "v1", "widgets", Some("default"), "w1").is_none());
        k.ok(&["delete", "-f", p(&s)]).await;
        let (ok, _, err) = k.run(&["get", "secret", "creds"]).await;
        assert!(!ok && err.contains("NotFound"), "{err}");

        // A CRD applied with kubectl becomes servable.
        let crd = k.file(
            "crd.yaml",
            r#"apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: gadgets.test.example.com
spec:
  group: test.example.com
  scope: Cluster
  names: {kind: Gadget, plural: gadgets, singular: gadget, shortNames: [gd]}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}
"#,
        );
        k.ok(&["apply", "--validate=false", "-f", p(&crd)]).await;
        let g = k.file("g.yaml", "apiVersion: test.example.com/v1\nkind: Gadget\nmetadata:\n  name: g1\nspec:\n  x: 1\n");
        k.ok(&["apply", "--validate=false", "-f", p(&g)]).await;
        let out = k.ok(&["get", "gd"]).await;
        assert!(out.contains("g1"), "{out}");
        // The same with aggregated discovery and a cold cache.
        server.set_aggregated_discovery(true);
        let k = Kubectl {
            cache: k.dir.join("cache-aggregated"),
            ..k
        };
        server.clear_requests();
        let out = k.ok(&["get", "gd", "g1", "-o", "name"]).await;
        assert_eq!(out.trim(), "gadget.test.example.com/g1");
        let out = k.ok(&["api-resources", "--api-group=test.example.com"]).await;
        assert!(out.contains("widgets") && out.contains("wd"), "{out}");
        assert!(
            !server.requests().iter().any(|r| r.path == "/apis/test.example.com/v1"),
            "aggregated discovery should make per-group requests unnecessary"
        );
        if std::env::var("FAKE_APISERVER_DUMP").is_ok() {
            for r in server.requests() {
                eprintln!("REQ {} {}?{} ct={:?} accept={:?} body={}", r.method, r.path, r.query, r.content_type, r.accept, r.body_text().chars().take(300).collect::<String>());
            }
        }
        server.shutdown().await;
    })
    .await;
}
