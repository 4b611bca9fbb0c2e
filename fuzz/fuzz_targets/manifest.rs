//! The manifest loader: `Manifests::parse_yaml` then `build_snapshot` on arbitrary text.
//! No panic, no runaway allocation (libFuzzer's -rss_limit_mb / -malloc_limit_mb catch
//! that), and every provider the loader accepts survives the snapshot wire format that
//! carries it to a sidecar (encode → decode → encode gives the same providers).
#![no_main]

use libfuzzer_sys::fuzz_target;
use provider_proxy_api::{Manifests, Timeouts, WireSnapshot};

/// Manifests are files a user edits; 64 KiB is plenty to reach every code path.
const MAX_INPUT: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    if data.len() > MAX_INPUT {
        return;
    }
    let Ok(yaml) = std::str::from_utf8(data) else {
        return;
    };
    let mut manifests = Manifests::default();
    if let Err(e) = manifests.parse_yaml("fuzz.yaml", yaml) {
        let _ = e.to_string();
        return;
    }
    let snapshot = manifests.build_snapshot(1, &Timeouts::default());
    for (name, issues) in &snapshot.invalid {
        for i in issues {
            let _ = (name, i.to_string());
        }
    }
    let _ = format!("{snapshot:?}");

    let wire = WireSnapshot::from_snapshot("fuzz", &snapshot);
    let json = wire.to_json();
    let decoded = match WireSnapshot::from_json(json.as_bytes()) {
        Ok(w) => w,
        Err(e) => panic!("wire snapshot of a loaded manifest does not decode: {e}"),
    };
    let back = match decoded.into_snapshot() {
        Ok(s) => s,
        Err(e) => panic!("wire snapshot of a loaded manifest is rejected: {e}"),
    };
    let again = WireSnapshot::from_snapshot("fuzz", &back);
    assert!(
        again.providers == wire.providers,
        "providers change across the wire format"
    );
});
