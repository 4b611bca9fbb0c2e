//! `ProxyUrl::parse` on arbitrary UTF-8: never panics; an accepted URL never shows its
//! password (`Display`, `Debug`, `origin` and the credentials' `Debug` are the same
//! whatever the password is: compared against the same URL with another password, which
//! has no false positives when the password also occurs in the user or host), and its
//! credentialed form — what the snapshot wire format carries to the sidecar — parses back
//! to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use provider_proxy_api::proxy_url::MAX_PROXY_URL_LEN;
use provider_proxy_api::{Credentials, Password, ProxyUrl, ProxyUrlError, mask_url};

fuzz_target!(|input: &str| {
    // The masker must take anything, parseable or not.
    let _ = mask_url(input);
    let url = match ProxyUrl::parse(input) {
        Ok(u) => u,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    let shown = url.to_string();
    let debug = format!("{url:?}");
    let origin = url.origin();
    if let Some(c) = url.credentials() {
        // Display/Debug must not depend on the password at all: render the same URL with
        // another password and compare.
        let other = url.clone().with_credentials(Some(Credentials {
            username: c.username.clone(),
            password: c.password.as_ref().map(|_| Password::new("\u{1}other")),
        }));
        assert_eq!(shown, other.to_string(), "Display depends on the password");
        assert_eq!(debug, format!("{other:?}"), "Debug depends on the password");
        assert_eq!(origin, other.origin(), "origin depends on the password");
        assert_eq!(
            Some(format!("{c:?}")),
            other.credentials().map(|o| format!("{o:?}")),
            "Credentials Debug depends on the password"
        );
    }
    let credentialed = url.to_credentialed_string();
    match ProxyUrl::parse(&credentialed) {
        Ok(again) => assert!(
            again == url,
            "credentialed form parses to another value: {url:?} vs {again:?}"
        ),
        // Re-encoding can make the URL longer than MAX_PROXY_URL_LEN (a raw `"` becomes
        // `%22`). That limit is for what users write; the wire format carries credentials
        // apart from the URL since fuzz finding 1, so nothing re-parses this string.
        Err(ProxyUrlError::TooLong { .. }) if credentialed.len() > MAX_PROXY_URL_LEN => {}
        Err(e) => panic!("credentialed form of {url:?} does not parse: {e}"),
    }
    // The masked form is a valid URL for everything but the password.
    if let Ok(masked) = ProxyUrl::parse(&shown) {
        assert_eq!(masked.origin(), origin);
    }
});
