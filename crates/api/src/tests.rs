//! Validation and resolution, tested without a cluster.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::crd::*;
use crate::*;

const PASSWORD: &str = "s3cr%t@:/pw";

fn pp(spec: ProviderProxySpec) -> ProviderProxy {
    let mut pp = ProviderProxy::new("anthropic", spec);
    pp.metadata.namespace = Some("ai".into());
    pp
}

fn spec(proxy_url: Option<&str>) -> ProviderProxySpec {
    ProviderProxySpec {
        upstream: "https://api.anthropic.com".into(),
        proxy: proxy_url.map(|u| ProxySpec {
            url: u.into(),
            ..ProxySpec::default()
        }),
        ..ProviderProxySpec::default()
    }
}

fn secret(name: &str, data: &[(&str, &str)]) -> (String, Secret) {
    let data = data
        .iter()
        .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
        .collect();
    (
        name.to_owned(),
        Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..ObjectMeta::default()
            },
            data: Some(data),
            ..Secret::default()
        },
    )
}

fn secrets(list: Vec<(String, Secret)>) -> BTreeMap<String, Secret> {
    list.into_iter().collect()
}

fn issues(pp: &ProviderProxy, s: &BTreeMap<String, Secret>) -> Vec<(String, Reason, String)> {
    match resolve(pp, s, &Timeouts::default()) {
        Ok(p) => panic!("expected errors, resolved {p:?}"),
        Err(e) => e
            .into_iter()
            .map(|i| (i.path, i.reason, i.message))
            .collect(),
    }
}

fn resolved(pp: &ProviderProxy, s: &BTreeMap<String, Secret>) -> Provider {
    match resolve(pp, s, &Timeouts::default()) {
        Ok(p) => p,
        Err(e) => panic!("expected success, got {e:?}"),
    }
}

fn with_creds_ref(mut s: ProviderProxySpec) -> ProviderProxySpec {
    if let Some(p) = s.proxy.as_mut() {
        p.credentials_secret_ref = Some(CredentialsSecretRef {
            name: "corp-proxy".into(),
            ..CredentialsSecretRef::default()
        });
    }
    s
}

#[test]
fn direct_provider_resolves_with_defaults() {
    let p = resolved(&pp(spec(None)), &BTreeMap::<String, Secret>::new());
    assert_eq!(p.name, "anthropic");
    assert_eq!(p.namespace, "ai");
    assert_eq!(p.upstream.origin(), "https://api.anthropic.com:443");
    assert!(p.proxy.is_none());
    assert_eq!(p.proxy_display(), "direct");
    assert_eq!(p.timeouts, Timeouts::default());
    assert!(p.warnings.is_empty());
}

#[test]
fn credentials_come_from_the_secret() {
    let s = secrets(vec![secret(
        "corp-proxy",
        &[("username", "alice"), ("password", PASSWORD)],
    )]);
    let p = resolved(
        &pp(with_creds_ref(spec(Some("http://proxy.corp:3128")))),
        &s,
    );
    let proxy = p.proxy.as_ref().unwrap();
    let creds = proxy.url.credentials().unwrap();
    assert_eq!(creds.username, "alice");
    assert_eq!(creds.password.as_ref().unwrap().expose(), PASSWORD);
    assert_eq!(p.proxy_display(), "http://alice:***@proxy.corp:3128");
    assert!(!format!("{p:?}").contains(PASSWORD));
}

#[test]
fn key_names_are_overridable_and_string_data_counts() {
    let mut s = Secret {
        metadata: ObjectMeta {
            name: Some("corp-proxy".into()),
            ..ObjectMeta::default()
        },
        ..Secret::default()
    };
    s.string_data = Some(BTreeMap::from([
        ("user".to_string(), "bob".to_string()),
        ("pass".to_string(), PASSWORD.to_string()),
    ]));
    let mut sp = with_creds_ref(spec(Some("socks5://proxy.corp:1080")));
    if let Some(r) = sp
        .proxy
        .as_mut()
        .and_then(|p| p.credentials_secret_ref.as_mut())
    {
        r.username_key = Some("user".into());
        r.password_key = Some("pass".into());
    }
    let p = resolved(&pp(sp), &secrets(vec![("corp-proxy".into(), s)]));
    assert_eq!(p.proxy.unwrap().url.credentials().unwrap().username, "bob");
}

#[test]
fn every_error_reason_with_its_field_path() {
    let none: BTreeMap<String, Secret> = BTreeMap::new();
    // Invalid proxy URL.
    assert_eq!(
        issues(&pp(spec(Some("ftp://proxy:21"))), &none),
        vec![(
            "spec.proxy.url".into(),
            Reason::InvalidProxyUrl,
            "unsupported scheme \"ftp\"; use http, https, socks5, socks5h, socks4 or socks4a"
                .into()
        )]
    );
    // Invalid upstream.
    let mut bad_upstream = spec(None);
    bad_upstream.upstream = "ftp://api.example".into();
    assert_eq!(
        issues(&pp(bad_upstream), &none),
        vec![(
            "spec.upstream".into(),
            Reason::InvalidUpstream,
            "\"ftp://api.example\" has scheme \"ftp\"; use https:// or http://".into()
        )]
    );
    // Missing Secret.
    assert_eq!(
        issues(&pp(with_creds_ref(spec(Some("http://p:1")))), &none),
        vec![(
            "spec.proxy.credentialsSecretRef".into(),
            Reason::SecretNotFound,
            "Secret \"corp-proxy\" not found in this namespace".into()
        )]
    );
    // Missing key.
    let only_user = secrets(vec![secret("corp-proxy", &[("username", "alice")])]);
    assert_eq!(
        issues(&pp(with_creds_ref(spec(Some("http://p:1")))), &only_user),
        vec![(
            "spec.proxy.credentialsSecretRef".into(),
            Reason::SecretKeyMissing,
            "Secret \"corp-proxy\" has no key \"password\"".into()
        )]
    );
    // Credentials in both places.
    let full = secrets(vec![secret(
        "corp-proxy",
        &[("username", "a"), ("password", "b")],
    )]);
    let both = issues(
        &pp(with_creds_ref(spec(Some(&format!(
            "http://u:{}@p:1",
            "hunter2"
        ))))),
        &full,
    );
    assert_eq!(both[0].0, "spec.proxy.url");
    assert_eq!(both[0].1, Reason::CredentialsConflict);
    assert!(!both[0].2.contains("hunter2"));
    // Bad CA PEM.
    let mut with_ca = spec(None);
    with_ca.tls = Some(UpstreamTls {
        ca_secret_ref: Some(CaSecretRef {
            name: "corp-ca".into(),
            key: None,
        }),
    });
    let bad_ca = secrets(vec![secret("corp-ca", &[("ca.crt", "not a certificate")])]);
    assert_eq!(
        issues(&pp(with_ca.clone()), &bad_ca),
        vec![(
            "spec.tls.caSecretRef".into(),
            Reason::InvalidCaBundle,
            "Secret \"corp-ca\" key \"ca.crt\" holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into()
        )]
    );
    let garbled = secrets(vec![secret(
        "corp-ca",
        &[(
            "ca.crt",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )],
    )]);
    let e = issues(&pp(with_ca), &garbled);
    assert_eq!(e[0].1, Reason::InvalidCaBundle);
    // Bad timeout.
    let mut t = spec(None);
    t.timeouts = Some(TimeoutsSpec {
        connect: Some("30 seconds".into()),
        ..TimeoutsSpec::default()
    });
    assert_eq!(
        issues(&pp(t), &none),
        vec![(
            "spec.timeouts.connect".into(),
            Reason::InvalidTimeout,
            "\"30 seconds\" is not a duration; use e.g. 500ms, 30s, 10m or 1h".into()
        )]
    );
    // Password on SOCKS4.
    let e = issues(&pp(spec(Some("socks4://u:pw@p:1080"))), &none);
    assert_eq!(e[0].1, Reason::InvalidProxyUrl);
    // Bad probe settings.
    let mut pr = spec(None);
    pr.probe = Some(ProbeSpec {
        interval: Some("10ms".into()),
        path: Some("health".into()),
    });
    let e = issues(&pp(pr), &none);
    assert_eq!(
        e.iter().map(|i| i.0.as_str()).collect::<Vec<_>>(),
        vec!["spec.probe.interval", "spec.probe.path"]
    );
}

#[test]
fn all_errors_are_reported_at_once() {
    let mut s = with_creds_ref(spec(Some("http://p:1")));
    s.upstream = "nope".into();
    s.timeouts = Some(TimeoutsSpec {
        body: Some("0s".into()),
        ..TimeoutsSpec::default()
    });
    let e = issues(&pp(s), &BTreeMap::<String, Secret>::new());
    let reasons: Vec<_> = e.iter().map(|i| i.1).collect();
    assert_eq!(
        reasons,
        vec![
            Reason::InvalidUpstream,
            Reason::SecretNotFound,
            Reason::InvalidTimeout
        ]
    );
}

#[test]
fn credentials_in_url_is_a_warning() {
    let p = resolved(
        &pp(spec(Some("http://alice:hunter2@proxy.corp:3128"))),
        &BTreeMap::<String, Secret>::new(),
    );
    assert_eq!(p.warnings.len(), 1);
    assert_eq!(p.warnings[0].reason, Reason::CredentialsInUrl);
    assert_eq!(p.proxy_display(), "http://alice:***@proxy.corp:3128");
}

#[test]
fn timeouts_override_defaults_per_field() {
    let mut s = spec(None);
    s.timeouts = Some(TimeoutsSpec {
        connect: Some("500ms".into()),
        headers: Some("2m".into()),
        body: None,
    });
    let defaults = Timeouts {
        body: Duration::from_secs(7),
        ..Timeouts::default()
    };
    let none: BTreeMap<String, Secret> = BTreeMap::new();
    let p = resolve(&pp(s), &none, &defaults).unwrap();
    assert_eq!(p.timeouts.connect, Duration::from_millis(500));
    assert_eq!(p.timeouts.headers, Duration::from_secs(120));
    assert_eq!(p.timeouts.body, Duration::from_secs(7));
}

#[test]
fn upstream_urls() {
    let u = UpstreamUrl::parse("https://generativelanguage.googleapis.com/v1beta/").unwrap();
    assert_eq!(u.base_path, "/v1beta");
    assert_eq!(u.authority(), "generativelanguage.googleapis.com");
    let u = UpstreamUrl::parse("http://[::1]:8080").unwrap();
    assert_eq!(u.host, "::1");
    assert_eq!(u.authority(), "[::1]:8080");
    assert_eq!(u.origin(), "http://[::1]:8080");
    for bad in [
        "api.anthropic.com",
        "https://",
        "https://user:pw@api.example",
        "https://api.example/?x=1",
        "https://api.example:99999",
    ] {
        assert!(UpstreamUrl::parse(bad).is_err(), "{bad} should fail");
    }
    // Found by fuzzing: a newline inside the path used to be accepted, and one before a
    // final '/' came back trimmed from the wire, so the sidecar ran another URL.
    for (bad, shown) in [
        ("https://api.example/v1\n/", "'\\n'"),
        ("https://api.example/v 1", "' '"),
        ("https://api.example/v\t1", "'\\t'"),
        ("https://api.example/ü", "'ü'"),
        ("https://api.example/a<b", "'<'"),
    ] {
        let err = UpstreamUrl::parse(bad).unwrap_err();
        assert!(
            err.contains(shown) && err.contains("percent-encode"),
            "{bad}: {err}"
        );
    }
    for good in [
        "https://api.example/v1beta/models:generate",
        "https://api.example/openai/deployments/gpt-4o~1/",
        "https://api.example/a%20b/c@d!$&'()*+,;=",
    ] {
        assert!(UpstreamUrl::parse(good).is_ok(), "{good} should parse");
    }
}

/// The CRD's CEL rule for `upstream` must admit every URL the parser accepts and refuse
/// the ones it refuses for their shape (credentials, query, fragment, path characters);
/// only host and port validity is left to the controller.
#[test]
fn crd_upstream_rule_agrees_with_the_parser() {
    let re = regex::Regex::new(UPSTREAM_URL_PATTERN).unwrap();
    let agree = |url: &str| {
        assert_eq!(
            re.is_match(url),
            UpstreamUrl::parse(url).is_ok(),
            "CEL rule and parser disagree on {url:?}"
        );
    };
    for url in [
        "https://api.anthropic.com",
        "HTTPS://api.anthropic.com/",
        "http://[::1]:8080/v1",
        "  https://api.example/v1beta/models:generate  ",
        "https://api.example/openai/deployments/gpt-4o~1/",
        "https://api.example/a%20b/c@d!$&'()*+,;=",
        "https://api.example/v1\n/",
        "https://api.example/v 1",
        "https://api.example/ü",
        "https://api.example/a<b",
        "https://api.example/a\"b",
        "https://user:pw@api.example",
        "https://api.example/?x=1",
        "https://api.example#top",
        "https://",
        "ftp://api.example",
        "api.example",
    ] {
        agree(url);
    }
    // Every printable ASCII character, and a few others, in a path.
    for c in (' '..='~').chain(['\t', '\u{7f}', 'é', '\u{2028}']) {
        agree(&format!("https://api.example/v1/{c}x"));
    }
    // The rule in the CRD is this pattern, with CEL's doubled backslashes.
    let cel = format!(
        "self.matches(\"{}\")",
        UPSTREAM_URL_PATTERN.replace('\\', "\\\\")
    );
    let yaml = crd_yaml().unwrap();
    let rules: Vec<&str> = yaml
        .lines()
        .filter_map(|l| l.trim().strip_prefix("rule: "))
        .collect();
    assert!(
        rules
            .iter()
            .any(|r| serde_yaml::from_str::<String>(r).ok().as_deref() == Some(cel.as_str())),
        "no rule {cel:?} in the CRD: {rules:?}"
    );
}

#[test]
fn debug_output_masks_embedded_passwords() {
    let p = pp(spec(Some("http://alice:hunter2@proxy:1")));
    let debug = format!("{p:?}");
    assert!(!debug.contains("hunter2"), "{debug}");
    assert!(debug.contains("alice:***@proxy"), "{debug}");
}

#[test]
fn manifests_multi_document_and_errors() {
    let yaml = r#"
apiVersion: v1
kind: Namespace
metadata: {name: ai}
---
apiVersion: v1
kind: Secret
metadata: {name: corp-proxy, namespace: ai}
stringData: {username: alice, password: "p@ss"}
---
apiVersion: providerproxy.dev/v1alpha1
kind: ProviderProxy
metadata: {name: anthropic, namespace: ai}
spec:
  upstream: https://api.anthropic.com
  proxy:
    url: http://proxy.corp:3128
    credentialsSecretRef: {name: corp-proxy}
---
apiVersion: providerproxy.dev/v1alpha1
kind: ProviderProxy
metadata: {name: broken, namespace: other}
spec:
  upstream: https://api.example
  proxy:
    url: http://proxy.corp:3128
    credentialsSecretRef: {name: corp-proxy}
"#;
    let mut m = Manifests::default();
    m.parse_yaml("ai.yaml", yaml).unwrap();
    assert_eq!(m.skipped, vec!["v1/Namespace"]);
    let snap = m.build_snapshot(7, &Timeouts::default());
    assert_eq!(snap.version, 7);
    assert!(snap.provider("anthropic").is_some());
    // Secrets are namespaced: "other" has no corp-proxy.
    assert_eq!(snap.invalid["broken"][0].reason, Reason::SecretNotFound);

    let mut m = Manifests::default();
    let e = m
        .parse_yaml(
            "bad.yaml",
            "apiVersion: v1\nkind: Secret\nmetadata: {name: x}\n---\nfoo: [",
        )
        .unwrap_err();
    assert_eq!(e.document, 2);
    assert!(e.to_string().starts_with("bad.yaml: document 2: "), "{e}");
    assert!(m.secrets.is_empty(), "a bad file adds nothing");
    let e = m
        .parse_yaml(
            "s.yaml",
            "apiVersion: v1\nkind: Secret\nmetadata: {name: x}\ndata: {password: \"hunter2!!\"}\n",
        )
        .unwrap_err();
    assert!(!e.to_string().contains("hunter2"), "{e}");
    let e = m.parse_yaml("x.yaml", "just: a map\n").unwrap_err();
    assert!(e.message.contains("apiVersion and kind"), "{e}");
}

#[test]
fn examples_parse_and_validate() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/examples");
    let mut m = Manifests::default();
    let mut files = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let text = std::fs::read_to_string(&path).unwrap();
            m.parse_yaml(&path.display().to_string(), &text).unwrap();
            files += 1;
        }
    }
    assert!(files > 0);
    let snap = m.build_snapshot(1, &Timeouts::default());
    assert!(snap.invalid.is_empty(), "{:?}", snap.invalid);
    let names: Vec<_> = snap.providers.keys().cloned().collect();
    assert_eq!(names, vec!["anthropic", "gemini", "openai"]);
    assert!(
        snap.providers["anthropic"]
            .proxy
            .as_ref()
            .unwrap()
            .url
            .has_credentials()
    );
    assert_eq!(
        snap.providers["openai"]
            .proxy
            .as_ref()
            .unwrap()
            .url
            .scheme(),
        ProxyScheme::Socks5h
    );
    assert!(snap.providers["gemini"].proxy.is_none());
}

#[test]
fn crd_file_is_current() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../crd/providerproxy.yaml");
    let on_disk = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        on_disk == crd_yaml().unwrap(),
        "crd/providerproxy.yaml is stale: run `make crd`"
    );
}

#[test]
fn crd_has_schema_validation_and_columns() {
    let yaml = crd_yaml().unwrap();
    for needle in [
        "shortNames:\n    - pp",
        "x-kubernetes-validations",
        "proxy.url must be at most 512 characters",
        "upstream must be an http:// or https:// URL without credentials",
        "jsonPath: .status.proxy",
        "subresources:\n      status: {}",
    ] {
        assert!(yaml.contains(needle), "CRD lacks {needle:?}");
    }
}
