//! The Helm chart, the plain manifests generated from it, the sidecar example and the
//! Dockerfile, checked with the real helm (`make deps` installs it into `.tools/`; no cluster
//! needed): `helm lint`, `helm template` with the default values and with each toggle, every
//! rendered object parsed into its k8s-openapi type (and serialized back unchanged, so a
//! misspelled field cannot hide), the RBAC against the controller's own list of API calls.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Namespace, PodSpec, Service, ServiceAccount, Volume,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

const RELEASE: &str = "provider-proxy";
pub(crate) const NAMESPACE: &str = "provider-proxy";
const CHART: &str = "charts/provider-proxy";
const MONITORING_API: &str = "monitoring.coreos.com/v1";

// ---------------------------------------------------------------------------------------
// The controller's contract: what the chart may pass it and what it may call.

/// Where an API call happens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Scope {
    /// In every watched namespace: a ClusterRole when watching all, else a Role per namespace.
    Watched,
    /// A cluster-scoped resource.
    Cluster,
    /// The controller's own namespace only.
    Own,
}

pub(crate) struct ApiCall {
    pub(crate) group: &'static str,
    pub(crate) resource: &'static str,
    pub(crate) verbs: &'static [&'static str],
    pub(crate) scope: Scope,
}

/// Every Kubernetes API call the controller makes (mirrored, for the controller crate, in
/// charts/provider-proxy/rbac-requirements.yaml). The chart's RBAC must grant exactly these;
/// `controller::the_controller_makes_exactly_the_api_calls_its_rbac_grants` runs the
/// controller against the fake API server and checks its recorded requests against this list.
pub(crate) const CONTROLLER_API_CALLS: &[ApiCall] = &[
    ApiCall {
        group: "providerproxy.dev",
        resource: "providerproxies",
        // The watcher lists and watches; reconciles read its cache, never GET one.
        verbs: &["list", "watch"],
        scope: Scope::Watched,
    },
    ApiCall {
        group: "providerproxy.dev",
        resource: "providerproxies/status",
        // Server-side apply; the status is never read back from the API.
        verbs: &["patch"],
        scope: Scope::Watched,
    },
    ApiCall {
        group: "",
        resource: "secrets",
        verbs: &["get", "list", "watch"],
        scope: Scope::Watched,
    },
    // kube's Recorder writes events.k8s.io/v1 only (patch: a repeated Event's series), never
    // core/v1 Events.
    ApiCall {
        group: "events.k8s.io",
        resource: "events",
        verbs: &["create", "patch"],
        scope: Scope::Watched,
    },
    ApiCall {
        group: "authentication.k8s.io",
        resource: "tokenreviews",
        verbs: &["create"],
        scope: Scope::Cluster,
    },
    ApiCall {
        group: "coordination.k8s.io",
        resource: "leases",
        verbs: &["get", "create", "update"],
        scope: Scope::Own,
    },
];

/// The lease name the chart defaults to; get/update on it are limited to that name.
pub(crate) const DEFAULT_LEASE: &str = "provider-proxy-controller";

/// Flags `provider-proxy controller` accepts.
const CONTROLLER_FLAGS: &[&str] = &[
    "--admin",
    "--snapshot-listen",
    "--watch-namespaces",
    "--probe-interval",
    "--probe-concurrency",
    "--leader-election",
    "--lease-name",
    "--lease-namespace",
    "--token-audience",
    "--tls-cert",
    "--tls-key",
    "--log-format",
];

/// Flags `provider-proxy sidecar` accepts in a workload.
const SIDECAR_FLAGS: &[&str] = &[
    "--controller",
    "--token-file",
    "--snapshot-cache",
    "--listen",
    "--admin",
];

// ---------------------------------------------------------------------------------------
// Running helm.

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

fn helm_bin() -> PathBuf {
    let local = repo().join(".tools/helm");
    if local.is_file() {
        return local;
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("helm");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!(
        "helm not found at {} nor on PATH: run `make deps`",
        local.display()
    );
}

/// Run helm in the repository root; Ok(stdout) or Err(stderr).
fn helm(args: &[&str]) -> Result<String, String> {
    let out = Command::new(helm_bin())
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap_or_else(|e| panic!("cannot run helm: {e} (run `make deps`)"));
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).expect("helm prints UTF-8"))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// `helm template provider-proxy charts/provider-proxy --namespace provider-proxy EXTRA...`,
/// the command `make deploy-manifests` runs (with `--include-crds`).
fn template(extra: &[&str]) -> Result<String, String> {
    let mut args = vec!["template", RELEASE, CHART, "--namespace", NAMESPACE];
    args.extend_from_slice(extra);
    helm(&args)
}

/// Rendered objects, as JSON values.
struct Rendered {
    text: String,
    objects: Vec<Value>,
}

fn parse_docs(text: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(text)
        .map(|doc| serde_yaml::Value::deserialize(doc).expect("valid YAML"))
        .filter(|v| !v.is_null())
        .map(|v| serde_json::to_value(v).expect("YAML with string keys"))
        .collect()
}

fn render(extra: &[&str]) -> Rendered {
    let text = template(extra).unwrap_or_else(|e| panic!("helm template {extra:?} failed:\n{e}"));
    let objects = parse_docs(&text);
    let rendered = Rendered { text, objects };
    for obj in &rendered.objects {
        check_object(obj);
    }
    rendered
}

/// The default render, with the CRDs: shared by the tests that only read it.
fn defaults() -> &'static Rendered {
    static DEFAULTS: OnceLock<Rendered> = OnceLock::new();
    DEFAULTS.get_or_init(|| render(&["--include-crds"]))
}

impl Rendered {
    fn all(&self, kind: &str) -> Vec<&Value> {
        self.objects.iter().filter(|o| o["kind"] == kind).collect()
    }

    fn named(&self, kind: &str, name: &str) -> Option<&Value> {
        self.objects
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
    }

    fn one<T: DeserializeOwned>(&self, kind: &str) -> T {
        let all = self.all(kind);
        assert_eq!(all.len(), 1, "expected one {kind}, got {}", all.len());
        serde_json::from_value(all[0].clone()).expect("parsed before")
    }

    fn get<T: DeserializeOwned>(&self, kind: &str, name: &str) -> T {
        let v = self
            .named(kind, name)
            .unwrap_or_else(|| panic!("no {kind} {name} rendered"));
        serde_json::from_value(v.clone()).expect("parsed before")
    }

    fn kinds(&self) -> BTreeMap<String, usize> {
        let mut kinds = BTreeMap::new();
        for o in &self.objects {
            *kinds
                .entry(o["kind"].as_str().unwrap_or("").to_owned())
                .or_default() += 1;
        }
        kinds
    }
}

// ---------------------------------------------------------------------------------------
// Typed parsing.

/// Parse `v` into `T` and serialize it back: anything k8s-openapi dropped (a misspelled or
/// misplaced field) or changed (a wrong type) shows up as a difference.
fn exact<T: DeserializeOwned + Serialize>(v: &Value, what: &str) -> T {
    let typed: T =
        serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{what} does not parse: {e}"));
    let back = serde_json::to_value(&typed).expect("serializes");
    let mut diffs = Vec::new();
    diff(v, &back, String::new(), &mut diffs);
    assert!(
        diffs.is_empty(),
        "{what}: fields lost or changed by the k8s-openapi type (typo or wrong type?):\n  {}",
        diffs.join("\n  ")
    );
    typed
}

fn diff(a: &Value, b: &Value, path: String, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for key in x.keys().chain(y.keys()).collect::<BTreeSet<_>>() {
                let p = format!("{path}.{key}");
                match (x.get(key), y.get(key)) {
                    (Some(l), Some(r)) => diff(l, r, p, out),
                    (Some(l), None) => out.push(format!("{p}: {l} was dropped")),
                    (None, Some(r)) => out.push(format!("{p}: {r} appeared")),
                    (None, None) => {}
                }
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (l, r)) in x.iter().zip(y).enumerate() {
                diff(l, r, format!("{path}[{i}]"), out);
            }
        }
        _ if a == b => {}
        _ => out.push(format!("{path}: {a} became {b}")),
    }
}

/// Every object the chart can render, parsed into its type.
fn check_object(obj: &Value) {
    let api_version = obj["apiVersion"].as_str().unwrap_or("");
    let kind = obj["kind"].as_str().unwrap_or("");
    let name = obj["metadata"]["name"].as_str().unwrap_or("");
    let what = format!("{api_version}/{kind} {name}");
    assert!(!name.is_empty(), "{what} has no name");
    match (api_version, kind) {
        ("apps/v1", "Deployment") => drop(exact::<Deployment>(obj, &what)),
        ("v1", "ServiceAccount") => drop(exact::<ServiceAccount>(obj, &what)),
        ("v1", "Service") => drop(exact::<Service>(obj, &what)),
        ("v1", "ConfigMap") => drop(exact::<ConfigMap>(obj, &what)),
        ("v1", "Namespace") => drop(exact::<Namespace>(obj, &what)),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => drop(exact::<ClusterRole>(obj, &what)),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            drop(exact::<ClusterRoleBinding>(obj, &what))
        }
        ("rbac.authorization.k8s.io/v1", "Role") => drop(exact::<Role>(obj, &what)),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => drop(exact::<RoleBinding>(obj, &what)),
        ("networking.k8s.io/v1", "NetworkPolicy") => drop(exact::<NetworkPolicy>(obj, &what)),
        ("policy/v1", "PodDisruptionBudget") => drop(exact::<PodDisruptionBudget>(obj, &what)),
        ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
            drop(exact::<CustomResourceDefinition>(obj, &what))
        }
        (MONITORING_API, "ServiceMonitor") => {
            let spec = &obj["spec"];
            assert!(
                spec["selector"]["matchLabels"].is_object(),
                "{what}: {spec}"
            );
            assert!(spec["endpoints"].as_array().is_some_and(|e| !e.is_empty()));
        }
        (MONITORING_API, "PodMonitor") => {
            let spec = &obj["spec"];
            assert!(spec["selector"].is_object(), "{what}: {spec}");
            assert!(spec["namespaceSelector"].is_object(), "{what}: {spec}");
            assert!(
                spec["podMetricsEndpoints"]
                    .as_array()
                    .is_some_and(|e| !e.is_empty())
            );
        }
        _ => panic!("the chart rendered {what}, which this test does not know: add it"),
    }
}

// ---------------------------------------------------------------------------------------
// Chart metadata.

fn chart_yaml() -> Value {
    parse_docs(&read(&format!("{CHART}/Chart.yaml"))).remove(0)
}

fn app_version() -> String {
    chart_yaml()["appVersion"]
        .as_str()
        .expect("appVersion")
        .to_owned()
}

fn default_image() -> String {
    format!("ghcr.io/provider-proxy/provider-proxy:{}", app_version())
}

#[test]
fn chart_lints_and_describes_itself() {
    let out = helm(&["lint", "--strict", CHART]).unwrap_or_else(|e| panic!("helm lint:\n{e}"));
    assert!(out.contains("0 chart(s) failed"), "{out}");

    let chart = chart_yaml();
    assert_eq!(chart["apiVersion"], "v2");
    assert_eq!(chart["name"], "provider-proxy");
    assert_eq!(
        chart["kubeVersion"], ">=1.29.0-0",
        "native sidecars need 1.29"
    );
    // The image the chart installs by default is the release of this source tree.
    assert_eq!(app_version(), env!("CARGO_PKG_VERSION"));
}

#[test]
fn chart_crd_is_the_generated_one() {
    let generated = read("crd/providerproxy.yaml");
    assert!(
        read(&format!("{CHART}/crds/providerproxy.yaml")) == generated,
        "{CHART}/crds/providerproxy.yaml differs from crd/providerproxy.yaml: run `make chart`"
    );
    let crd: CustomResourceDefinition = defaults().one("CustomResourceDefinition");
    assert_eq!(
        crd.metadata.name.as_deref(),
        Some("providerproxies.providerproxy.dev")
    );
}

#[test]
fn deploy_manifests_are_the_chart_with_default_values() {
    let file = read("deploy/provider-proxy.yaml");
    let rendered = &defaults().text;
    let Some(preamble) = file.strip_suffix(rendered.as_str()) else {
        panic!("deploy/provider-proxy.yaml is stale: run `make deploy-manifests`");
    };
    // Before the chart: only the namespace, Pod Security "restricted".
    let docs = parse_docs(preamble);
    assert_eq!(docs.len(), 1, "preamble: {preamble}");
    let ns: Namespace = exact(&docs[0], "deploy/provider-proxy.yaml Namespace");
    assert_eq!(ns.metadata.name.as_deref(), Some(NAMESPACE));
    assert_eq!(
        ns.metadata.labels.unwrap_or_default()["pod-security.kubernetes.io/enforce"],
        "restricted"
    );
}

// ---------------------------------------------------------------------------------------
// The default render.

#[test]
fn defaults_render_the_controller_and_nothing_optional() {
    let r = defaults();
    let kinds = r.kinds();
    let expected: BTreeMap<String, usize> = [
        ("CustomResourceDefinition", 1),
        ("ServiceAccount", 1),
        ("ClusterRole", 3), // the controller's, aggregated view and edit
        ("ClusterRoleBinding", 1),
        ("Role", 1), // leader election
        ("RoleBinding", 1),
        ("Service", 1),
        ("Deployment", 1),
        ("ConfigMap", 2), // the sidecar fragment, the dashboard
    ]
    .into_iter()
    .map(|(k, n)| (k.to_owned(), n))
    .collect();
    assert_eq!(kinds, expected);

    for obj in &r.objects {
        let kind = obj["kind"].as_str().unwrap_or("");
        let meta = &obj["metadata"];
        if kind == "CustomResourceDefinition" {
            continue; // crds/ is not templated
        }
        let labels = &meta["labels"];
        for key in [
            "helm.sh/chart",
            "app.kubernetes.io/name",
            "app.kubernetes.io/instance",
            "app.kubernetes.io/version",
            "app.kubernetes.io/managed-by",
            "app.kubernetes.io/part-of",
        ] {
            assert!(
                labels[key].is_string(),
                "{kind} {} lacks label {key}",
                meta["name"]
            );
        }
        let cluster_scoped = kind.starts_with("Cluster");
        assert_eq!(
            meta["namespace"].is_null(),
            cluster_scoped,
            "{kind} {}: namespace {}",
            meta["name"],
            meta["namespace"]
        );
        if !cluster_scoped {
            assert_eq!(meta["namespace"], NAMESPACE, "{kind} {}", meta["name"]);
        }
    }
}

fn controller_container(d: &Deployment) -> &Container {
    let spec = d
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("pod spec");
    assert_eq!(spec.containers.len(), 1);
    &spec.containers[0]
}

fn env_value<'a>(c: &'a Container, name: &str) -> Option<&'a str> {
    c.env
        .as_ref()?
        .iter()
        .find(|e| e.name == name)?
        .value
        .as_deref()
}

/// `--flag=value` arguments as a map (a bare `--flag` maps to "").
fn parse_flags(args: &[String], known: &[&str], what: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for arg in args {
        let (flag, value) = arg.split_once('=').unwrap_or((arg, ""));
        assert!(
            known.contains(&flag),
            "{what}: {flag} is not in the contract {known:?}"
        );
        assert!(
            out.insert(flag.to_owned(), value.to_owned()).is_none(),
            "{what}: {flag} twice"
        );
    }
    out
}

#[test]
fn controller_deployment_follows_the_contract() {
    let r = defaults();
    let d: Deployment = r.one("Deployment");
    let spec = d.spec.as_ref().expect("spec");
    assert_eq!(spec.replicas, Some(1));
    let pod = spec.template.spec.as_ref().expect("pod spec");
    let sa: ServiceAccount = r.one("ServiceAccount");
    assert_eq!(pod.service_account_name, sa.metadata.name);
    assert_restricted(pod, "controller Deployment");

    let c = controller_container(&d);
    assert_eq!(c.name, "controller");
    assert_eq!(c.image.as_deref(), Some(default_image().as_str()));
    let args = c.args.clone().unwrap_or_default();
    assert_eq!(args[0], "controller", "the role is the first argument");
    let flags = parse_flags(&args[1..], CONTROLLER_FLAGS, "controller");
    assert_eq!(flags["--admin"], "0.0.0.0:15091");
    assert_eq!(flags["--snapshot-listen"], "0.0.0.0:15443");
    assert_eq!(flags["--token-audience"], "provider-proxy");
    assert_eq!(flags["--probe-interval"], "300");
    assert_eq!(flags["--probe-concurrency"], "4");
    assert_eq!(flags["--lease-name"], DEFAULT_LEASE);
    assert!(!flags.contains_key("--watch-namespaces"), "all namespaces");
    assert_eq!(env_value(c, "LEADER_ELECTION"), Some("true"));
    assert_eq!(env_value(c, "LOG_FORMAT"), Some("json"));
    assert!(env_value(c, "RUST_LOG").is_some());
    let pod_ns = c
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "POD_NAMESPACE")
        .and_then(|e| e.value_from.as_ref()?.field_ref.as_ref())
        .map(|f| f.field_path.as_str());
    assert_eq!(
        pod_ns,
        Some("metadata.namespace"),
        "the lease namespace comes from the downward API"
    );

    // Ports, probes, and the Service in front of them.
    let ports: BTreeMap<_, _> = c
        .ports
        .iter()
        .flatten()
        .map(|p| (p.name.clone().unwrap_or_default(), p.container_port))
        .collect();
    assert_eq!(
        ports,
        BTreeMap::from([("snapshot".into(), 15443), ("admin".into(), 15091)])
    );
    let probe = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        let get = p
            .as_ref()
            .and_then(|p| p.http_get.clone())
            .expect("httpGet probe");
        (get.path.unwrap_or_default(), get.port)
    };
    assert_eq!(
        probe(&c.liveness_probe),
        ("/healthz".into(), IntOrString::String("admin".into()))
    );
    assert_eq!(
        probe(&c.readiness_probe),
        ("/readyz".into(), IntOrString::String("admin".into()))
    );

    let svc: Service = r.one("Service");
    assert_eq!(svc.metadata.name.as_deref(), Some(RELEASE));
    let svc_spec = svc.spec.expect("spec");
    let pod_labels = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    for (k, v) in svc_spec.selector.clone().unwrap_or_default() {
        assert_eq!(
            pod_labels.get(&k),
            Some(&v),
            "Service selector {k}={v} misses the pods"
        );
    }
    let svc_ports: BTreeMap<_, _> = svc_spec
        .ports
        .iter()
        .flatten()
        .map(|p| {
            (
                p.name.clone().unwrap_or_default(),
                (p.port, p.target_port.clone()),
            )
        })
        .collect();
    assert_eq!(
        svc_ports["snapshot"],
        (15443, Some(IntOrString::String("snapshot".into())))
    );
    assert_eq!(
        svc_ports["metrics"],
        (15091, Some(IntOrString::String("admin".into())))
    );
}

/// Pod Security Standards "restricted", plus a read-only root filesystem.
fn assert_restricted(pod: &PodSpec, what: &str) {
    let pod_sc = pod.security_context.clone().unwrap_or_default();
    assert_ne!(pod.host_network, Some(true), "{what}: hostNetwork");
    assert_ne!(pod.host_pid, Some(true), "{what}: hostPID");
    assert_ne!(pod.host_ipc, Some(true), "{what}: hostIPC");
    for v in pod.volumes.iter().flatten() {
        assert!(v.host_path.is_none(), "{what}: hostPath volume {}", v.name);
    }
    assert_ne!(pod_sc.run_as_user, Some(0), "{what}: pod runs as root");
    let containers = pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten());
    for c in containers {
        let what = format!("{what}, container {}", c.name);
        let sc = c
            .security_context
            .clone()
            .unwrap_or_else(|| panic!("{what}: no securityContext"));
        assert_eq!(
            sc.run_as_non_root.or(pod_sc.run_as_non_root),
            Some(true),
            "{what}: runAsNonRoot"
        );
        assert_ne!(sc.run_as_user, Some(0), "{what}: runAsUser 0");
        let seccomp = sc
            .seccomp_profile
            .clone()
            .or(pod_sc.seccomp_profile.clone())
            .map(|p| p.type_);
        assert!(
            matches!(seccomp.as_deref(), Some("RuntimeDefault" | "Localhost")),
            "{what}: seccompProfile {seccomp:?}"
        );
        assert_eq!(
            sc.allow_privilege_escalation,
            Some(false),
            "{what}: allowPrivilegeEscalation"
        );
        assert_ne!(sc.privileged, Some(true), "{what}: privileged");
        let caps = sc.capabilities.clone().unwrap_or_default();
        assert!(
            caps.drop.iter().flatten().any(|c| c == "ALL"),
            "{what}: capabilities.drop must hold ALL"
        );
        assert!(
            caps.add.iter().flatten().all(|c| c == "NET_BIND_SERVICE"),
            "{what}: capabilities.add {:?}",
            caps.add
        );
        assert_eq!(
            sc.read_only_root_filesystem,
            Some(true),
            "{what}: readOnlyRootFilesystem"
        );
    }
}

// ---------------------------------------------------------------------------------------
// RBAC.

/// One permission: where, group, resource, verb, resource names (empty: any).
type Grant = (String, String, String, String, Vec<String>);

const ALL_NAMESPACES: &str = "<all namespaces>";

fn expected_grants(watched: &[&str], lease: Option<&str>) -> BTreeSet<Grant> {
    let mut out = BTreeSet::new();
    for call in CONTROLLER_API_CALLS {
        let (scopes, names): (Vec<&str>, Vec<String>) = match call.scope {
            Scope::Watched if watched.is_empty() => (vec![ALL_NAMESPACES], vec![]),
            Scope::Watched => (watched.to_vec(), vec![]),
            Scope::Cluster => (vec![ALL_NAMESPACES], vec![]),
            Scope::Own => match lease {
                Some(lease) => (vec![NAMESPACE], vec![lease.to_owned()]),
                None => continue,
            },
        };
        for scope in scopes {
            for verb in call.verbs {
                // create cannot be limited to a name.
                let names = if *verb == "create" {
                    vec![]
                } else {
                    names.clone()
                };
                out.insert((
                    scope.to_owned(),
                    call.group.to_owned(),
                    call.resource.to_owned(),
                    (*verb).to_owned(),
                    names,
                ));
            }
        }
    }
    out
}

fn expand(rules: &[PolicyRule], scope: &str, what: &str, out: &mut BTreeSet<Grant>) {
    for rule in rules {
        assert!(rule.non_resource_urls.is_none(), "{what}: nonResourceURLs");
        let mut names = rule.resource_names.clone().unwrap_or_default();
        names.sort();
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    assert!(
                        group != "*" && resource != "*" && verb != "*",
                        "{what}: wildcard in {rule:?}"
                    );
                    out.insert((
                        scope.to_owned(),
                        group.clone(),
                        resource.clone(),
                        verb.clone(),
                        names.clone(),
                    ));
                }
            }
        }
    }
}

/// Everything the roles bound to the controller's ServiceAccount allow.
fn granted_to_controller(r: &Rendered) -> BTreeSet<Grant> {
    let sa: ServiceAccount = r.one("ServiceAccount");
    let sa_name = sa.metadata.name.expect("name");
    let is_controller = |subjects: &Option<Vec<k8s_openapi::api::rbac::v1::Subject>>| {
        subjects.iter().flatten().any(|s| {
            s.kind == "ServiceAccount"
                && s.name == sa_name
                && s.namespace.as_deref() == Some(NAMESPACE)
        })
    };
    let mut out = BTreeSet::new();
    let mut bound_roles = BTreeSet::new();
    for v in r.all("ClusterRoleBinding") {
        let b: ClusterRoleBinding = serde_json::from_value(v.clone()).expect("parsed");
        if !is_controller(&b.subjects) {
            continue;
        }
        assert_eq!(b.role_ref.kind, "ClusterRole");
        let role: ClusterRole = r.get("ClusterRole", &b.role_ref.name);
        bound_roles.insert(b.role_ref.name.clone());
        let what = format!("ClusterRole {}", b.role_ref.name);
        assert!(role.aggregation_rule.is_none(), "{what}: aggregated");
        expand(
            role.rules.as_deref().unwrap_or_default(),
            ALL_NAMESPACES,
            &what,
            &mut out,
        );
    }
    for v in r.all("RoleBinding") {
        let b: RoleBinding = serde_json::from_value(v.clone()).expect("parsed");
        if !is_controller(&b.subjects) {
            continue;
        }
        let ns = b.metadata.namespace.clone().expect("namespaced");
        assert_eq!(b.role_ref.kind, "Role", "RoleBinding {ns}: a Role");
        let role = r
            .all("Role")
            .into_iter()
            .find(|o| {
                o["metadata"]["name"] == b.role_ref.name.as_str()
                    && o["metadata"]["namespace"] == ns.as_str()
            })
            .unwrap_or_else(|| panic!("RoleBinding in {ns} refers to a missing Role"));
        let role: Role = serde_json::from_value(role.clone()).expect("parsed");
        let what = format!("Role {ns}/{}", b.role_ref.name);
        expand(
            role.rules.as_deref().unwrap_or_default(),
            &ns,
            &what,
            &mut out,
        );
    }
    // Roles nobody binds are only the ones aggregated into view/edit/admin, and those give
    // users ProviderProxies, nothing else.
    for v in r.all("ClusterRole") {
        let role: ClusterRole = serde_json::from_value(v.clone()).expect("parsed");
        let name = role.metadata.name.clone().unwrap_or_default();
        if bound_roles.contains(&name) {
            continue;
        }
        let labels = role.metadata.labels.clone().unwrap_or_default();
        assert!(
            labels
                .keys()
                .any(|k| k.starts_with("rbac.authorization.k8s.io/aggregate-to-")),
            "ClusterRole {name} is neither bound to the controller nor aggregated"
        );
        for rule in role.rules.iter().flatten() {
            assert_eq!(
                rule.api_groups.as_deref(),
                Some(&["providerproxy.dev".to_owned()][..]),
                "aggregated ClusterRole {name}: {rule:?}"
            );
        }
    }
    out
}

fn assert_grants(r: &Rendered, expected: &BTreeSet<Grant>) {
    let granted = granted_to_controller(r);
    let extra: Vec<_> = granted.difference(expected).collect();
    let missing: Vec<_> = expected.difference(&granted).collect();
    assert!(
        extra.is_empty() && missing.is_empty(),
        "the controller's RBAC must allow exactly its API calls\n\
         granted but never called: {extra:#?}\ncalled but not granted: {missing:#?}"
    );
}

#[test]
fn rbac_allows_exactly_what_the_controller_calls() {
    let r = defaults();
    assert_grants(r, &expected_grants(&[], Some(DEFAULT_LEASE)));
    // Spelled out, for the reader: no Secret writes, status only by patch.
    let granted = granted_to_controller(r);
    for (_, group, resource, verb, _) in &granted {
        if resource == "secrets" {
            assert!(
                ["get", "list", "watch"].contains(&verb.as_str()),
                "secrets {verb}"
            );
        }
        if group == "providerproxy.dev" {
            assert!(
                !["update", "create", "delete"].contains(&verb.as_str()),
                "{resource} {verb}"
            );
        }
    }
}

#[test]
fn watch_namespaces_gives_roles_per_namespace() {
    // Also: leader election off drops the Lease role.
    let r = render(&[
        "--set-json",
        r#"watchNamespaces=["team-a","team-b"]"#,
        "--set",
        "leaderElection.enabled=false",
    ]);
    assert_grants(&r, &expected_grants(&["team-a", "team-b"], None));
    let d: Deployment = r.one("Deployment");
    let c = controller_container(&d);
    let args = c.args.clone().unwrap_or_default();
    let flags = parse_flags(&args[1..], CONTROLLER_FLAGS, "controller");
    assert_eq!(flags["--watch-namespaces"], "team-a,team-b");
    assert!(!flags.contains_key("--lease-name"));
    assert_eq!(env_value(c, "LEADER_ELECTION"), Some("false"));
    // The only ClusterRole the controller holds is for TokenReviews.
    let cluster_roles: Vec<_> = r
        .all("ClusterRole")
        .into_iter()
        .filter(|o| {
            !o["metadata"]["labels"]
                .as_object()
                .is_some_and(|l| l.keys().any(|k| k.contains("aggregate-to-")))
        })
        .collect();
    assert_eq!(cluster_roles.len(), 1, "{cluster_roles:#?}");
    assert_eq!(
        cluster_roles[0]["rules"][0]["resources"],
        serde_json::json!(["tokenreviews"])
    );
}

#[test]
fn rbac_requirements_file_is_the_controllers_list() {
    let file = parse_docs(&read(&format!("{CHART}/rbac-requirements.yaml"))).remove(0);
    let calls = file["calls"].as_array().expect("calls");
    assert_eq!(calls.len(), CONTROLLER_API_CALLS.len());
    for (entry, call) in calls.iter().zip(CONTROLLER_API_CALLS) {
        let verbs: Vec<&str> = entry["verbs"]
            .as_array()
            .expect("verbs")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        let scope = match call.scope {
            Scope::Watched => "watched",
            Scope::Cluster => "cluster",
            Scope::Own => "own",
        };
        assert_eq!(
            (
                entry["group"].as_str(),
                entry["resource"].as_str(),
                verbs.as_slice(),
                entry["scope"].as_str()
            ),
            (
                Some(call.group),
                Some(call.resource),
                call.verbs,
                Some(scope)
            ),
            "rbac-requirements.yaml disagrees with CONTROLLER_API_CALLS"
        );
        if call.scope == Scope::Own {
            assert_eq!(entry["resourceNames"], serde_json::json!([DEFAULT_LEASE]));
        }
    }
}

// ---------------------------------------------------------------------------------------
// Toggles.

#[test]
fn monitors_need_the_prometheus_operator_api() {
    let r = render(&[
        "--set",
        "serviceMonitor.enabled=true,podMonitor.enabled=true",
    ]);
    let kinds = r.kinds();
    assert!(
        !kinds.contains_key("ServiceMonitor") && !kinds.contains_key("PodMonitor"),
        "rendered without {MONITORING_API}: {kinds:?}"
    );
}

#[test]
fn every_toggle_on_renders_valid_objects() {
    let r = render(&[
        "--api-versions",
        MONITORING_API,
        "--set",
        "serviceMonitor.enabled=true,podMonitor.enabled=true,networkPolicy.enabled=true,\
         dashboards.enabled=false,podDisruptionBudget.enabled=true,replicaCount=2",
    ]);
    let kinds = r.kinds();
    for kind in [
        "ServiceMonitor",
        "PodMonitor",
        "NetworkPolicy",
        "PodDisruptionBudget",
    ] {
        assert_eq!(kinds.get(kind), Some(&1), "{kind}: {kinds:?}");
    }
    assert!(
        r.named("ConfigMap", "provider-proxy-dashboards").is_none(),
        "dashboards.enabled=false"
    );
    let d: Deployment = r.one("Deployment");
    assert_eq!(d.spec.as_ref().and_then(|s| s.replicas), Some(2));
    assert_eq!(
        env_value(controller_container(&d), "LEADER_ELECTION"),
        Some("true")
    );
    let svc: Service = r.one("Service");
    let svc_labels = svc.metadata.labels.clone().unwrap_or_default();
    let sidecar = sidecar_fragment(&r);

    // ServiceMonitor: the controller's Service, port `metrics`.
    let sm = r.all("ServiceMonitor")[0];
    assert_eq!(sm["metadata"]["namespace"], NAMESPACE);
    for (k, v) in sm["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("labels")
    {
        assert_eq!(svc_labels.get(k).map(String::as_str), v.as_str(), "{k}");
    }
    assert_eq!(
        sm["spec"]["namespaceSelector"]["matchNames"],
        serde_json::json!([NAMESPACE])
    );
    let endpoint = &sm["spec"]["endpoints"][0];
    assert_eq!(endpoint["port"], "metrics");
    assert_eq!(endpoint["path"], "/metrics");
    assert!(
        svc.spec
            .iter()
            .flat_map(|s| s.ports.iter().flatten())
            .any(|p| p.name.as_deref() == Some("metrics"))
    );

    // PodMonitor: pods with the sidecar label in any namespace, the sidecar's admin port.
    let pm = r.all("PodMonitor")[0];
    assert_eq!(
        pm["spec"]["namespaceSelector"],
        serde_json::json!({"any": true})
    );
    assert_eq!(
        pm["spec"]["selector"]["matchLabels"],
        serde_json::to_value(&sidecar.labels).expect("json")
    );
    let endpoint = &pm["spec"]["podMetricsEndpoints"][0];
    assert_eq!(endpoint["path"], "/metrics");
    let admin_port = endpoint["port"].as_str().expect("port name");
    assert!(
        sidecar
            .container
            .ports
            .iter()
            .flatten()
            .any(|p| p.name.as_deref() == Some(admin_port)),
        "PodMonitor port {admin_port} is not a sidecar port"
    );

    // NetworkPolicy: snapshot port from sidecar pods, metrics port from the monitoring namespace.
    let np: NetworkPolicy = r.one("NetworkPolicy");
    let spec = np.spec.expect("spec");
    assert_eq!(spec.policy_types, Some(vec!["Ingress".to_owned()]));
    let ingress = spec.ingress.expect("ingress");
    assert_eq!(ingress.len(), 2);
    let controller_ports: BTreeSet<String> = controller_container(&d)
        .ports
        .iter()
        .flatten()
        .filter_map(|p| p.name.clone())
        .collect();
    let port_of = |i: usize| match &ingress[i].ports.as_ref().expect("ports")[0].port {
        Some(IntOrString::String(name)) => name.clone(),
        other => panic!("port by name, got {other:?}"),
    };
    assert_eq!(port_of(0), "snapshot");
    assert_eq!(port_of(1), "admin");
    assert!(controller_ports.contains(&port_of(0)) && controller_ports.contains(&port_of(1)));
    let peer = &ingress[0].from.as_ref().expect("from")[0];
    assert_eq!(
        peer.pod_selector
            .as_ref()
            .and_then(|s| s.match_labels.clone()),
        Some(sidecar.labels.clone()),
        "sidecar pods reach the snapshot port"
    );
    assert_eq!(
        peer.namespace_selector
            .as_ref()
            .map(|s| s.match_labels.is_none() && s.match_expressions.is_none()),
        Some(true),
        "from every namespace by default"
    );

    let pdb: PodDisruptionBudget = r.one("PodDisruptionBudget");
    assert_eq!(
        pdb.spec.and_then(|s| s.min_available),
        Some(IntOrString::Int(1))
    );
}

#[test]
fn bad_values_are_rejected() {
    for (set, needle) in [
        ("replicaCont=2", "replicaCont"),
        ("serviceMonitor.enable=true", "enable"),
        (
            "replicaCount=2,leaderElection.enabled=false",
            "leaderElection",
        ),
        ("sidecar.logging.queueLines=0", "queueLines"),
    ] {
        let err = template(&["--set", set]).expect_err(set);
        assert!(err.contains(needle), "--set {set}: {err}");
    }
}

// ---------------------------------------------------------------------------------------
// The sidecar: the chart's fragment and the example Deployment.

struct SidecarFragment {
    labels: BTreeMap<String, String>,
    container: Container,
    volumes: Vec<Volume>,
}

fn sidecar_fragment(r: &Rendered) -> SidecarFragment {
    let cm: ConfigMap = r.get("ConfigMap", "provider-proxy-sidecar");
    let text = cm.data.unwrap_or_default()["sidecar.yaml"].clone();
    let doc = parse_docs(&text).remove(0);
    let labels: BTreeMap<String, String> =
        serde_json::from_value(doc["metadata"]["labels"].clone()).expect("labels");
    let init = doc["spec"]["initContainers"]
        .as_array()
        .expect("initContainers");
    assert_eq!(init.len(), 1);
    let container: Container = exact(&init[0], "sidecar fragment container");
    let volumes: Vec<Volume> = doc["spec"]["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .map(|v| exact(v, "sidecar fragment volume"))
        .collect();
    SidecarFragment {
        labels,
        container,
        volumes,
    }
}

#[test]
fn sidecar_example_is_the_charts_fragment_in_a_deployment() {
    let r = defaults();
    let fragment = sidecar_fragment(r);
    let docs = parse_docs(&read("deploy/examples/30-app-with-sidecar.yaml"));
    let sa: ServiceAccount = exact(&docs[0], "example ServiceAccount");
    let d: Deployment = exact(&docs[1], "example Deployment");
    assert_eq!(docs.len(), 2);
    assert_eq!(sa.metadata.namespace.as_deref(), Some("ai"));
    assert_eq!(d.metadata.namespace.as_deref(), Some("ai"));

    let spec = d.spec.as_ref().expect("spec");
    let template_labels = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    for (k, v) in spec
        .selector
        .match_labels
        .iter()
        .flatten()
        .chain(&fragment.labels)
    {
        assert_eq!(template_labels.get(k), Some(v), "pod label {k}");
    }
    let pod = spec.template.spec.as_ref().expect("pod spec");
    assert_eq!(pod.service_account_name, sa.metadata.name);
    assert_eq!(pod.automount_service_account_token, Some(false));
    assert_restricted(pod, "example Deployment");

    // The sidecar is exactly what the chart hands out.
    let init = pod.init_containers.clone().unwrap_or_default();
    assert_eq!(init.len(), 1);
    let sidecar = &init[0];
    assert!(
        *sidecar == fragment.container,
        "deploy/examples/30-app-with-sidecar.yaml's sidecar differs from the chart's \
         (kubectl get configmap provider-proxy-sidecar):\nexample: {sidecar:#?}\nchart: {:#?}",
        fragment.container
    );
    for v in &fragment.volumes {
        assert!(
            pod.volumes.iter().flatten().any(|w| w == v),
            "example lacks the chart's volume {}",
            v.name
        );
    }

    // And it is wired up as the contract says.
    assert_eq!(
        sidecar.restart_policy.as_deref(),
        Some("Always"),
        "native sidecar"
    );
    assert_eq!(sidecar.image.as_deref(), Some(default_image().as_str()));
    let args = sidecar.args.clone().unwrap_or_default();
    assert_eq!(args[0], "sidecar");
    let flags = parse_flags(&args[1..], SIDECAR_FLAGS, "sidecar");
    let svc: Service = r.one("Service");
    let snapshot_port = svc
        .spec
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some("snapshot"))
        .expect("snapshot port")
        .port;
    assert_eq!(
        flags["--controller"],
        format!(
            "http://{}.{NAMESPACE}.svc:{snapshot_port}",
            svc.metadata.name.as_deref().unwrap_or("")
        )
    );
    assert_eq!(flags["--listen"], "127.0.0.1:15080", "loopback only");
    assert_eq!(flags["--admin"], "0.0.0.0:15090");

    let mounts: BTreeMap<String, String> = sidecar
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| (m.name.clone(), m.mount_path.clone()))
        .collect();
    let volume = |name: &str| {
        pod.volumes
            .iter()
            .flatten()
            .find(|v| v.name == name)
            .unwrap_or_else(|| panic!("volume {name}"))
            .clone()
    };
    // The projected token: the controller's audience, an hour, at --token-file.
    let token_source = volume("provider-proxy-token")
        .projected
        .and_then(|p| p.sources)
        .and_then(|s| s.into_iter().find_map(|s| s.service_account_token))
        .expect("serviceAccountToken projection");
    let d_controller: Deployment = r.one("Deployment");
    let controller_flags = parse_flags(
        &controller_container(&d_controller)
            .args
            .clone()
            .unwrap_or_default()[1..],
        CONTROLLER_FLAGS,
        "controller",
    );
    assert_eq!(
        token_source.audience.as_deref(),
        Some(controller_flags["--token-audience"].as_str())
    );
    assert_eq!(token_source.expiration_seconds, Some(3600));
    assert_eq!(
        flags["--token-file"],
        format!("{}/{}", mounts["provider-proxy-token"], token_source.path)
    );
    // The snapshot cache: an emptyDir under --snapshot-cache.
    assert!(volume("provider-proxy-cache").empty_dir.is_some());
    assert!(
        flags["--snapshot-cache"].starts_with(&format!("{}/", mounts["provider-proxy-cache"])),
        "{}",
        flags["--snapshot-cache"]
    );
    // Probes on the admin port.
    let admin = sidecar
        .ports
        .iter()
        .flatten()
        .find(|p| p.container_port == 15090)
        .and_then(|p| p.name.clone())
        .expect("named admin port");
    for (probe, path) in [
        (&sidecar.startup_probe, "/readyz"),
        (&sidecar.liveness_probe, "/healthz"),
        (&sidecar.readiness_probe, "/readyz"),
    ] {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.clone())
            .expect("httpGet probe");
        assert_eq!(
            (get.path.as_deref(), get.port),
            (Some(path), IntOrString::String(admin.clone()))
        );
    }

    // The app reaches each provider through the sidecar.
    assert_eq!(pod.containers.len(), 1);
    let env: BTreeMap<String, String> = pod.containers[0]
        .env
        .iter()
        .flatten()
        .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
        .collect();
    assert_eq!(
        env["ANTHROPIC_BASE_URL"],
        "http://127.0.0.1:15080/anthropic"
    );
    assert_eq!(env["OPENAI_BASE_URL"], "http://127.0.0.1:15080/openai/v1");
    assert_eq!(
        env["GOOGLE_GEMINI_BASE_URL"],
        "http://127.0.0.1:15080/gemini"
    );
}

// ---------------------------------------------------------------------------------------
// Dashboard.

/// Labels the Prometheus Operator puts on every series scraped through a ServiceMonitor (the
/// controller) or a PodMonitor (the sidecars). With `honorLabels: false` an exported label of
/// the same name is kept as `exported_<name>`.
const SERVICE_MONITOR_LABELS: &[&str] = &[
    "namespace",
    "service",
    "pod",
    "container",
    "endpoint",
    "job",
    "instance",
];
const POD_MONITOR_LABELS: &[&str] = &[
    "namespace",
    "pod",
    "container",
    "endpoint",
    "job",
    "instance",
];

/// One series name as Prometheus stores it after the chart's monitors scraped it.
#[derive(Debug)]
struct Series {
    /// "sidecar" or "controller".
    source: &'static str,
    /// Its family (`# TYPE` name): a histogram's `_bucket`, `_sum` and `_count` share one.
    family: String,
    /// Label names as stored: exported ones (`le` included), renamed where a target label
    /// displaced them.
    labels: BTreeSet<String>,
    /// Target labels of the monitor that scrapes it.
    target: &'static [&'static str],
    /// Target labels that displaced an exported label of the same name: on this series they
    /// mean the scraped pod's, not the metric's (which is `exported_<name>`).
    displaced: BTreeSet<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_ships_in_a_labelled_configmap_and_queries_real_metrics() {
    let file = read(&format!("{CHART}/dashboards/provider-proxy.json"));
    let dashboard: Value = serde_json::from_str(&file).expect("dashboard is JSON");

    let cm: ConfigMap = defaults().get("ConfigMap", "provider-proxy-dashboards");
    assert_eq!(
        cm.metadata.labels.unwrap_or_default()["grafana_dashboard"],
        "1"
    );
    let shipped = cm.data.unwrap_or_default()["provider-proxy.json"].clone();
    assert_eq!(
        serde_json::from_str::<Value>(&shipped).expect("JSON"),
        dashboard
    );
    assert_eq!(dashboard["uid"], "provider-proxy");
    let variables: BTreeSet<&str> = dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    for v in ["datasource", "namespace", "provider"] {
        assert!(
            variables.contains(v),
            "variable ${v} missing: {variables:?}"
        );
    }

    // What the code really exports: an in-process sidecar and controller after some
    // traffic, scraped; labelled as the chart's monitors (as rendered) store them.
    let monitors = render(&[
        "--api-versions",
        MONITORING_API,
        "--set",
        "serviceMonitor.enabled=true,podMonitor.enabled=true",
    ]);
    let honors = |kind: &str, endpoints: &str| {
        let eps = monitors.all(kind)[0]["spec"][endpoints]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert_eq!(eps.len(), 1, "{kind}: one endpoint");
        eps[0]["honorLabels"].as_bool().expect("honorLabels")
    };
    let mut exported = BTreeMap::new();
    for (source, text, honor, target) in [
        (
            "sidecar",
            scrape_sidecar().await,
            honors("PodMonitor", "podMetricsEndpoints"),
            POD_MONITOR_LABELS,
        ),
        (
            "controller",
            scrape_controller().await,
            honors("ServiceMonitor", "endpoints"),
            SERVICE_MONITOR_LABELS,
        ),
    ] {
        for (name, series) in scraped_series(source, &text, honor, target) {
            if let Some(other) = exported.insert(name.clone(), series) {
                panic!("{name} exported by both the sidecar and the controller: {other:?}");
            }
        }
    }
    for family in [
        "provider_proxy_requests_total",
        "provider_proxy_controller_leader",
    ] {
        assert!(exported.contains_key(family), "{family} not scraped");
    }

    let queries = dashboard_queries(&dashboard);
    assert!(queries.len() > 2, "{queries:?}");
    let mut used = BTreeSet::new();
    for (owner, expr, legend) in &queries {
        let selectors = metric_selectors(expr);
        let mut allowed = BTreeSet::new();
        let mut displaced = BTreeSet::new();
        for (metric, matchers) in &selectors {
            let Some(series) = exported.get(metric.as_str()) else {
                panic!(
                    "{owner} queries {metric}, which neither the sidecar nor the controller \
                     exports (or the test's traffic never made it appear); exported: {:?}",
                    exported.keys().collect::<Vec<_>>()
                );
            };
            for label in matchers {
                check_label(owner, metric, series, label);
            }
            allowed.extend(series.labels.iter().cloned());
            allowed.extend(series.target.iter().map(|l| (*l).to_owned()));
            displaced.extend(series.displaced.iter().cloned());
            used.insert(series.family.clone());
        }
        // Aggregation labels, `label_values` and legends must exist on the query's series.
        let by = by_labels(expr);
        let label_value = label_values_label(expr);
        for label in by.iter().chain(label_value.iter()) {
            assert!(
                allowed.contains(label) && !displaced.contains(label),
                "{owner}: label {label} of {expr} is not on its series {:?}{}",
                allowed,
                if displaced.contains(label) {
                    format!(" as the metric's own (use exported_{label})")
                } else {
                    String::new()
                }
            );
        }
        let result: BTreeSet<String> = if !by.is_empty() {
            by.into_iter().filter(|l| l != "le").collect()
        } else if ["sum(", "max(", "min(", "avg(", "count("]
            .iter()
            .any(|a| expr.starts_with(a))
        {
            BTreeSet::new()
        } else {
            &allowed - &displaced
        };
        let legend = legend.as_deref().unwrap_or("");
        for label in legend_labels(legend) {
            assert!(
                result.contains(&label),
                "{owner}: legend {legend:?} names {label}, which {expr} does not return \
                 (it returns {result:?})"
            );
        }
    }
    let families: BTreeSet<String> = exported.values().map(|s| s.family.clone()).collect();
    let unused: Vec<_> = families.difference(&used).collect();
    assert!(unused.is_empty(), "exported but on no panel: {unused:?}");

    // Off: no ConfigMap (checked in every_toggle_on_renders_valid_objects).
}

/// `label` in a matcher on `metric`: exported or added by the scrape, and not a target label
/// standing where the metric's own label was (that one is `exported_<label>`).
#[track_caller]
fn check_label(owner: &str, metric: &str, series: &Series, label: &str) {
    assert!(
        !series.displaced.contains(label),
        "{owner}: on {metric}, `{label}` is the label of the scraped {} pod; the metric's own \
         {label} is `exported_{label}` (the chart's monitor has honorLabels: false)",
        series.source
    );
    assert!(
        series.labels.contains(label) || series.target.contains(&label),
        "{owner}: {metric} has no label {label} (it has {:?}, plus {:?} from the scrape)",
        series.labels,
        series.target
    );
}

/// Traffic through an in-process sidecar that makes every labelled family appear: a request
/// through a tunnel, a 407 with fallback and one without. Returns its `/metrics`.
async fn scrape_sidecar() -> String {
    use crate::support::{TestSidecar, pki, provider};
    use provider_proxy_testkit::{Behavior, FaultProxy, Upstream, UpstreamOptions};

    let pki = pki();
    let upstream = Upstream::start(UpstreamOptions::tls(pki.clone()));
    let tunnel = FaultProxy::start(Behavior::Connect { users: vec![] });
    let refuses = FaultProxy::start(Behavior::Status(407));
    let base = upstream.base_url();
    let via = |p: &FaultProxy| format!("http://127.0.0.1:{}", p.port());
    let yaml = provider("tunnel", &base, Some(&via(&tunnel)), "")
        + &provider(
            "fb",
            &base,
            Some(&via(&refuses)),
            "  fallbackToDirect: true\n",
        )
        + &provider("nofb", &base, Some(&via(&refuses)), "");
    // With workers, as the binary runs by default (their connection gauge is exported).
    let sc =
        TestSidecar::start_with_workers(&pki, provider_proxy_dataplane::PoolSettings::default(), 2)
            .await;
    sc.apply(&yaml, 1);
    sc.post("/tunnel/v1/messages", "{}")
        .await
        .assert_ok("proxy");
    sc.post("/fb/v1/messages", "{}").await.assert_ok("fallback");
    assert_eq!(
        sc.post("/nofb/v1/messages", "{}").await.status,
        http::StatusCode::SERVICE_UNAVAILABLE
    );
    let text = sc.metrics().await;
    sc.stop().await;
    text
}

/// An in-process controller on the fake API server with one ProviderProxy (reconciled,
/// published and probed), one refused and one accepted snapshot stream. Returns its
/// `/metrics`.
async fn scrape_controller() -> String {
    use crate::controller::{Cluster, raw_get, start_controller, wait_until};
    use http::StatusCode;
    use provider_proxy_testkit::{Upstream, UpstreamOptions};

    let pki = crate::support::pki();
    let upstream = Upstream::start(UpstreamOptions::tls(pki.clone()));
    let cluster = Cluster::start().await;
    let controller = start_controller(&cluster, &pki).await;
    cluster
        .api
        .create_json(serde_json::json!({
            "apiVersion": "providerproxy.dev/v1alpha1",
            "kind": "ProviderProxy",
            "metadata": {"name": "direct", "namespace": "ai"},
            "spec": {"upstream": upstream.base_url()},
        }))
        .expect("ProviderProxy created");
    let metrics = format!("http://{}/metrics", controller.admin_addr);
    wait_until(
        std::time::Duration::from_secs(15),
        "the controller to reconcile, publish and probe",
        || async {
            let text = raw_get(&metrics, None).await.1;
            text.contains("provider_proxy_controller_probes_total{")
                && text.contains("provider_proxy_controller_reconciles_total{")
                && text.contains("provider_proxy_controller_snapshot_version{")
        },
    )
    .await;
    // Streams once the snapshot is published (so its push latency is known): one refused,
    // one of a sidecar in namespace ai.
    let snapshots = format!("http://{}/v1/snapshots", controller.snapshot_addr);
    assert_eq!(raw_get(&snapshots, None).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(
        raw_get(&snapshots, Some("token-ai")).await.0,
        StatusCode::OK
    );
    let text = raw_get(&metrics, None).await.1;
    controller.shutdown().await;
    text
}

/// The series of a Prometheus text exposition, by name, labelled as a monitor with
/// `honor_labels` and these target labels stores them.
fn scraped_series(
    source: &'static str,
    text: &str,
    honor_labels: bool,
    target: &'static [&'static str],
) -> BTreeMap<String, Series> {
    let mut types = BTreeMap::new();
    let mut out = BTreeMap::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (family, kind) = rest.split_once(' ').expect("# TYPE name type");
            types.insert(family.to_owned(), kind.to_owned());
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let end = line.find(['{', ' ']).expect("sample with a value");
        let name = &line[..end];
        let family = if types.contains_key(name) {
            name
        } else {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|f| {
                    matches!(
                        types.get(*f).map(String::as_str),
                        Some("histogram" | "summary")
                    )
                })
                .unwrap_or_else(|| panic!("{source}: sample {name} without # TYPE"))
        };
        let mut labels = BTreeSet::new();
        let mut displaced = BTreeSet::new();
        if let Some(body) = line[end..].strip_prefix('{') {
            for label in matcher_labels(body).0 {
                if !honor_labels && target.contains(&label.as_str()) {
                    labels.insert(format!("exported_{label}"));
                    displaced.insert(label);
                } else {
                    labels.insert(label);
                }
            }
        }
        let series = out.entry(name.to_owned()).or_insert_with(|| Series {
            source,
            family: family.to_owned(),
            labels: labels.clone(),
            target,
            displaced: displaced.clone(),
        });
        assert_eq!(
            series.labels, labels,
            "{source}: {name} with differing labels"
        );
    }
    out
}

/// The label names of a `{name="value", name2=~"v"}` body (without its `{`), and what follows
/// the closing `}`. Quoted values may hold any character, escaped quotes included.
fn matcher_labels(body: &str) -> (Vec<String>, &str) {
    let mut names = Vec::new();
    let mut name = String::new();
    let mut chars = body.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '}' => return (names, &body[i + 1..]),
            '"' => {
                names.push(std::mem::take(&mut name).trim().to_owned());
                while let Some((_, c)) = chars.next() {
                    match c {
                        '\\' => {
                            chars.next();
                        }
                        '"' => break,
                        _ => {}
                    }
                }
            }
            '=' | '!' | '~' | ',' => {}
            _ => name.push(c),
        }
    }
    panic!("unclosed matcher: {{{body}");
}

/// Every PromQL expression of the dashboard, with its owner (panel or variable) and legend:
/// the panels' targets (those inside collapsed rows too) and the query variables.
fn dashboard_queries(dashboard: &Value) -> Vec<(String, String, Option<String>)> {
    fn panels(list: &Value, out: &mut Vec<(String, String, Option<String>)>) {
        for panel in list.as_array().into_iter().flatten() {
            let owner = format!("panel {:?}", panel["title"].as_str().unwrap_or(""));
            for target in panel["targets"].as_array().into_iter().flatten() {
                let expr = target["expr"].as_str().expect("expr");
                let legend = target["legendFormat"].as_str().map(str::to_owned);
                out.push((owner.clone(), expr.to_owned(), legend));
            }
            panels(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    panels(&dashboard["panels"], &mut out);
    for var in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if var["type"] != "query" {
            continue;
        }
        let owner = format!("variable ${}", var["name"].as_str().unwrap_or(""));
        let query = var["query"]["query"]
            .as_str()
            .or(var["query"].as_str())
            .expect("query");
        out.push((owner.clone(), query.to_owned(), None));
        if let Some(definition) = var["definition"].as_str() {
            out.push((owner, definition.to_owned(), None));
        }
    }
    out
}

/// Each `provider_proxy_*` metric in a PromQL expression, with the label names of its
/// `{...}` matchers.
fn metric_selectors(expr: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("provider_proxy_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let metric = tail[..end].to_owned();
        rest = &tail[end..];
        let mut labels = Vec::new();
        if let Some(body) = rest.strip_prefix('{') {
            (labels, rest) = matcher_labels(body);
        }
        out.push((metric, labels));
    }
    out
}

/// The labels of every `by (...)` clause.
fn by_labels(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("by") {
        let before = rest[..i].chars().next_back();
        let tail = rest[i + 2..].trim_start();
        rest = &rest[i + 2..];
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        let Some(list) = tail.strip_prefix('(') else {
            continue;
        };
        let end = list.find(')').expect("closed by (...)");
        out.extend(
            list[..end]
                .split(',')
                .map(|l| l.trim().to_owned())
                .filter(|l| !l.is_empty()),
        );
    }
    out
}

/// The label of a Grafana `label_values(selector, label)` variable query.
fn label_values_label(expr: &str) -> Option<String> {
    let args = expr
        .trim()
        .strip_prefix("label_values(")?
        .strip_suffix(')')?;
    Some(args.rsplit_once(',')?.1.trim().to_owned())
}

/// The `{{label}}` names of a legend format.
fn legend_labels(legend: &str) -> Vec<String> {
    legend
        .split("{{")
        .skip(1)
        .filter_map(|s| s.split_once("}}"))
        .map(|(l, _)| l.trim().to_owned())
        .collect()
}

// ---------------------------------------------------------------------------------------
// The image.

#[test]
fn dockerfile_builds_the_image_the_chart_runs() {
    let dockerfile = read("Dockerfile");
    let lines: Vec<&str> = dockerfile
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .collect();
    let froms: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.starts_with("FROM "))
        .collect();
    assert!(froms.len() >= 2, "multi-stage: {froms:?}");
    assert!(
        froms
            .last()
            .is_some_and(|f| f.contains("gcr.io/distroless/")),
        "runs on distroless: {froms:?}"
    );
    // The image ships the profile-guided build, as `make release` makes it: the script
    // that builds it is in the build context, and the builder has what its training runs.
    assert!(
        lines.iter().any(|l| l.contains("bench/pgo.sh")),
        "the builder runs bench/pgo.sh"
    );
    assert!(
        lines.contains(&"ARG PGO=on"),
        "PGO unless the builder opts out"
    );
    assert!(
        dockerfile.contains("install -D -m 0755 target/pgo/provider-proxy /out/provider-proxy")
    );
    assert!(dockerfile.contains("rustup component add llvm-tools"));
    for package in ["nginx-light", "squid", "dante-server", "apache2-utils"] {
        assert!(
            dockerfile.contains(package),
            "the PGO training needs {package} in the builder"
        );
    }
    let pgo = read("bench/pgo.sh");
    assert!(
        pgo.contains("-Cprofile-use="),
        "bench/pgo.sh builds with the profile"
    );
    assert!(pgo.contains(
        "cargo\" build --release --locked -p provider-proxy --target-dir \"$pgo/optimised\""
    ));
    assert!(lines.contains(&r#"ENTRYPOINT ["/provider-proxy"]"#));

    // A numeric user (the kubelet cannot check runAsNonRoot for a name), the chart's.
    let user = lines
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("USER");
    let uid: i64 = user
        .split(':')
        .next()
        .and_then(|u| u.parse().ok())
        .unwrap_or_else(|| panic!("USER {user} must be numeric"));
    assert_ne!(uid, 0);
    let d: Deployment = defaults().one("Deployment");
    let pod_sc = d
        .spec
        .and_then(|s| s.template.spec)
        .and_then(|p| p.security_context)
        .expect("pod securityContext");
    assert_eq!(pod_sc.run_as_user, Some(uid));
    let sidecar = sidecar_fragment(defaults()).container;
    assert_eq!(
        sidecar.security_context.and_then(|s| s.run_as_user),
        Some(uid)
    );

    let ignore = read(".dockerignore");
    for entry in ["target/", ".tools/"] {
        assert!(
            ignore.lines().any(|l| l.trim() == entry),
            ".dockerignore lacks {entry}"
        );
    }
    assert!(
        !ignore
            .lines()
            .any(|l| ["bench", "bench/", "bench/pgo.sh"].contains(&l.trim())),
        "bench/pgo.sh must be in the build context"
    );
}

// ---------------------------------------------------------------------------------------
// kubectl: the plain manifests and the examples apply to an API server.

/// `kubectl apply -f deploy/` then `-f deploy/examples/`, twice (create, then patch), against
/// the fake API server, as a user without Helm would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_applies_the_plain_manifests_and_the_examples() {
    use provider_proxy_fake_apiserver::{FakeApiServer, ResourceDef};

    let api = FakeApiServer::start().await;
    // The built-in kinds the manifests use that the fake does not serve by itself.
    for def in [
        ResourceDef::new("apps", "v1", "Deployment", "deployments").with_status_subresource(),
        ResourceDef::new("", "v1", "Service", "services").with_status_subresource(),
        ResourceDef::new(
            "rbac.authorization.k8s.io",
            "v1",
            "ClusterRole",
            "clusterroles",
        )
        .cluster_scoped(),
        ResourceDef::new(
            "rbac.authorization.k8s.io",
            "v1",
            "ClusterRoleBinding",
            "clusterrolebindings",
        )
        .cluster_scoped(),
        ResourceDef::new("rbac.authorization.k8s.io", "v1", "Role", "roles"),
        ResourceDef::new(
            "rbac.authorization.k8s.io",
            "v1",
            "RoleBinding",
            "rolebindings",
        ),
    ] {
        api.register(def);
    }
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let cache = dir.path().join("cache");
    let kubectl = move |args: &[&str]| {
        let out = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .arg("--cache-dir")
            .arg(&cache)
            .args(args)
            .current_dir(repo())
            .output()
            .expect("kubectl runs");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "kubectl {args:?} failed:\n{text}");
        text
    };
    let applied = tokio::task::spawn_blocking(move || {
        let mut outputs = Vec::new();
        for _ in 0..2 {
            outputs.push(kubectl(&["apply", "--validate=false", "-f", "deploy/"]));
            outputs.push(kubectl(&[
                "apply",
                "--validate=false",
                "-f",
                "deploy/examples/",
            ]));
        }
        outputs
    })
    .await
    .unwrap();
    assert!(
        applied[0].contains("deployment.apps/provider-proxy created"),
        "{}",
        applied[0]
    );
    assert!(
        applied[2].contains("deployment.apps/provider-proxy unchanged"),
        "re-apply: {}",
        applied[2]
    );

    let get = |group: &str, version: &str, plural: &str, ns: Option<&str>, name: &str| {
        api.get_json(group, version, plural, ns, name)
            .unwrap_or_else(|| panic!("{plural} {ns:?}/{name} was not created"))
    };
    let d = get("apps", "v1", "deployments", Some(NAMESPACE), RELEASE);
    let d: Deployment = serde_json::from_value(d).unwrap();
    assert_eq!(
        controller_container(&d).image.as_deref(),
        Some(default_image().as_str())
    );
    get("", "v1", "services", Some(NAMESPACE), RELEASE);
    get(
        "rbac.authorization.k8s.io",
        "v1",
        "clusterrolebindings",
        None,
        "provider-proxy-controller",
    );
    get(
        "apiextensions.k8s.io",
        "v1",
        "customresourcedefinitions",
        None,
        "providerproxies.providerproxy.dev",
    );
    for name in ["anthropic", "openai", "gemini"] {
        get(
            "providerproxy.dev",
            "v1alpha1",
            "providerproxies",
            Some("ai"),
            name,
        );
    }
    let app = get("apps", "v1", "deployments", Some("ai"), "ai-app");
    assert_eq!(
        app["spec"]["template"]["spec"]["initContainers"][0]["restartPolicy"],
        "Always"
    );
}
