//! `provider-proxy check`: the controller's connection probe, from a terminal.

use std::sync::Arc;

use provider_proxy_api::Manifests;
use provider_proxy_dataplane::config::read_sources;
use provider_proxy_dataplane::connector::NoObserver;
use provider_proxy_dataplane::probe::probe;
use provider_proxy_dataplane::{AgentPool, PoolSettings, TrustRoots};

use crate::settings::CheckArgs;

/// Probe every provider; Ok(true) when all succeeded.
pub async fn run(args: CheckArgs) -> Result<bool, String> {
    let mut manifests = Manifests::default();
    let source = match &args.file {
        Some(file) => {
            for (path, text) in read_sources(file).map_err(|e| e.to_string())? {
                manifests
                    .parse_yaml(&path.display().to_string(), &text)
                    .map_err(|e| e.to_string())?;
            }
            file.display().to_string()
        }
        None => {
            from_cluster(&args, &mut manifests).await?;
            format!("namespace {}", args.namespace)
        }
    };
    let snapshot = manifests.build_snapshot(1, &args.timeouts.timeouts()?);
    let pool = AgentPool::new(
        PoolSettings::default(),
        TrustRoots::from_env()?,
        Arc::new(NoObserver),
    );
    let mut all_ok = true;
    let mut rows = Vec::new();
    for (name, issues) in &snapshot.invalid {
        if args.name.as_ref().is_some_and(|n| n != name) {
            continue;
        }
        all_ok = false;
        let message = issues
            .iter()
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join("; ");
        rows.push(serde_json::json!({"provider": name, "success": false, "error": "invalid_config", "message": message}));
    }
    for (name, provider) in &snapshot.providers {
        if args.name.as_ref().is_some_and(|n| n != name) {
            continue;
        }
        let out = probe(&pool, provider).await;
        all_ok &= out.success;
        rows.push(serde_json::json!({
            "provider": name,
            "success": out.success,
            "httpStatus": out.http_status,
            "latencyMs": out.latency.as_millis() as u64,
            "usedProxy": out.used_proxy,
            "proxy": out.proxy.clone().unwrap_or_else(|| "direct".into()),
            "error": out.error.map(|e| e.as_str()),
            "message": out.message,
            "summary": out.summary(),
        }));
    }
    if let Some(n) = &args.name
        && rows.is_empty()
    {
        return Err(format!("no provider named {n:?} in {source}"));
    }
    if args.json {
        println!("{}", serde_json::Value::Array(rows));
    } else {
        println!(
            "{:<16} {:<8} {:<7} {:>8} {:<10} PROXY / ERROR",
            "PROVIDER", "RESULT", "STATUS", "LATENCY", "USED PROXY"
        );
        for r in &rows {
            let s = |k: &str| r[k].as_str().map(str::to_owned).unwrap_or_default();
            let ok = r["success"].as_bool().unwrap_or(false);
            let detail = if ok {
                s("proxy")
            } else {
                format!("{} {}", s("error"), s("message"))
            };
            println!(
                "{:<16} {:<8} {:<7} {:>8} {:<10} {}",
                s("provider"),
                if ok { "ok" } else { "FAILED" },
                r["httpStatus"]
                    .as_u64()
                    .map(|v| v.to_string())
                    .unwrap_or_else(|| "-".into()),
                r["latencyMs"]
                    .as_u64()
                    .map(|v| format!("{v}ms"))
                    .unwrap_or_else(|| "-".into()),
                r["usedProxy"]
                    .as_bool()
                    .map(|v| if v { "yes" } else { "no" })
                    .unwrap_or("-"),
                detail
            );
        }
    }
    Ok(all_ok)
}

/// Read the ProviderProxies of a namespace (or one of them) and the Secrets they name.
async fn from_cluster(args: &CheckArgs, manifests: &mut Manifests) -> Result<(), String> {
    use k8s_openapi::api::core::v1::Secret;
    use kube::Api;
    use provider_proxy_api::{ProviderProxy, referenced_secrets};

    let client = crate::settings::kube_client(args.kubeconfig.as_deref()).await?;
    let pps: Api<ProviderProxy> = Api::namespaced(client.clone(), &args.namespace);
    let found = match &args.name {
        Some(n) => vec![
            pps.get_opt(n)
                .await
                .map_err(|e| format!("reading ProviderProxy {n}: {e}"))?
                .ok_or_else(|| format!("no ProviderProxy {n:?} in namespace {}", args.namespace))?,
        ],
        None => {
            pps.list(&Default::default())
                .await
                .map_err(|e| format!("listing ProviderProxies: {e}"))?
                .items
        }
    };
    let secrets: Api<Secret> = Api::namespaced(client, &args.namespace);
    let mut names: Vec<String> = found.iter().flat_map(referenced_secrets).collect();
    names.sort();
    names.dedup();
    for name in names {
        if let Some(s) = secrets
            .get_opt(&name)
            .await
            .map_err(|e| format!("reading Secret {name}: {e}"))?
        {
            manifests.secrets.push(s);
        }
    }
    manifests.providers = found;
    Ok(())
}
