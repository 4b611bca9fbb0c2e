//! `provider-proxy-bench [run]` runs the load benchmark (configure with `BENCH_*` env, see
//! the README); `provider-proxy-bench instructions` counts instructions per request under
//! callgrind; `provider-proxy-bench sse-upstream …` is the SSE upstream the load bench starts.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        None | Some("run") => provider_proxy_bench::run::main(),
        Some("sse-upstream") => provider_proxy_bench::sse::main(&args[1..]),
        Some("instructions") => provider_proxy_bench::instructions::main(),
        Some("-h" | "--help" | "help") => {
            println!(
                "provider-proxy-bench [run]        the load benchmark (make bench); env: BENCH_SECONDS, \
                 BENCH_WARMUP, BENCH_ROUNDS, BENCH_SCENARIOS, BENCH_PEERS, BENCH_SIDECAR_BIN, \
                 BENCH_SIDECAR_B_BIN, \
                 BENCH_SIDECAR_LOG, BENCH_NGINX_WORKERS, BENCH_DANTE_CRYPT, BENCH_OUT\n\
                 provider-proxy-bench instructions  user-space instructions per request under callgrind \
                 (make bench-instructions); env: BENCH_INSTR_REQUESTS, BENCH_INSTR_WARMUP, BENCH_INSTR_STREAMS, BENCH_INSTR_CONNS, BENCH_INSTR_CONN_REQUESTS, BENCH_INSTR_PROFILES (keep the callgrind profiles there), BENCH_SIDECAR_BIN, BENCH_OUT\n\
                 provider-proxy-bench sse-upstream --listen ADDR --cert PEM --key PEM"
            );
            Ok(())
        }
        Some(other) => Err(format!("unknown command {other:?}; try --help")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
