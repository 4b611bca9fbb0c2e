//! The snapshot decoder a sidecar runs on every push and on its disk cache:
//! `WireSnapshot::from_json` then `into_snapshot` on arbitrary bytes. No panic; a snapshot
//! it accepts encodes and decodes again to the same providers (what a sidecar caches is
//! what it will load after a restart).
#![no_main]

use libfuzzer_sys::fuzz_target;
use provider_proxy_api::WireSnapshot;

fuzz_target!(|data: &[u8]| {
    let wire = match WireSnapshot::from_json(data) {
        Ok(w) => w,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    let namespace = wire.namespace.clone();
    let snapshot = match wire.into_snapshot() {
        Ok(s) => s,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    let _ = format!("{snapshot:?}");
    let first = WireSnapshot::from_snapshot(&namespace, &snapshot);
    let back = match WireSnapshot::from_json(first.to_json().as_bytes()) {
        Ok(w) => w,
        Err(e) => panic!("re-encoded snapshot does not decode: {e}"),
    };
    let back = match back.into_snapshot() {
        Ok(s) => s,
        Err(e) => panic!("re-encoded snapshot is rejected: {e}"),
    };
    let second = WireSnapshot::from_snapshot(&namespace, &back);
    assert!(
        first.providers == second.providers,
        "providers change across a second trip through the wire format"
    );
});
