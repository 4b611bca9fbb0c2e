//! `provider-proxy`: parses flags and env, wires a role together. No logic lives here.

mod check;
mod settings;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use settings::{CheckArgs, ControllerArgs, LogArgs, SidecarArgs};

/// Per-provider outbound proxies (HTTP, HTTPS, SOCKS5, SOCKS4) for AI APIs, Kubernetes-native.
///
/// Apps call http://127.0.0.1:15080/<provider>/<path>; the sidecar forwards to that
/// provider's upstream through the provider's proxy.
#[derive(Parser)]
#[command(
    name = "provider-proxy",
    version,
    propagate_version = true,
    max_term_width = 100
)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the forwarding sidecar (standalone: --config reads manifests from disk).
    Sidecar(SidecarArgs),
    /// Run the operator: watch ProviderProxies and Secrets, write status, push snapshots.
    Controller(ControllerArgs),
    /// Test the connection to each provider through its proxy, like the controller's probe.
    Check(CheckArgs),
    /// Print the ProviderProxy CustomResourceDefinition as YAML.
    Crd,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (log_control, log_guard) = match settings::init_logging(&cli.log) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Crd => provider_proxy_api::crd_yaml()
            .map(|y| print!("{y}"))
            .map_err(|e| e.to_string()),
        // Requests run on the sidecar's own worker threads; this one runs the rest.
        Command::Sidecar(args) => {
            runtime(true).and_then(|rt| rt.block_on(settings::run_sidecar(args, log_control)))
        }
        Command::Controller(args) => {
            runtime(false).and_then(|rt| rt.block_on(settings::run_controller(args, log_control)))
        }
        Command::Check(args) => match runtime(false).and_then(|rt| rt.block_on(check::run(args))) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::FAILURE,
            Err(e) => Err(e),
        },
    };
    // The log lines still queued go out before the final word.
    drop(log_guard);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `single`: one thread (the sidecar's control side); else one worker per CPU.
fn runtime(single: bool) -> Result<tokio::runtime::Runtime, String> {
    let mut builder = if single {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    builder
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))
}
