//! TLS client settings: which roots we trust and which protocols we offer.
//!
//! Trust is the webpki roots, plus the PEM file named by `SSL_CERT_FILE` (process-wide, the
//! usual convention), plus a provider's own CA bundle. The base store is built once; each
//! agent builds its `ClientConfig` once, so TLS session resumption works per agent.

use std::sync::Arc;

use provider_proxy_api::CaBundle;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::{ClientConfig, RootCertStore};

pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_H1: &[u8] = b"http/1.1";

#[derive(Clone)]
pub struct TrustRoots {
    base: Arc<RootCertStore>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl TrustRoots {
    /// webpki roots plus `SSL_CERT_FILE` when set. A set but unreadable file is an error:
    /// silently trusting less than the operator asked for would surface as baffling TLS
    /// failures later.
    pub fn from_env() -> Result<Self, String> {
        let extra = match std::env::var_os("SSL_CERT_FILE") {
            Some(path) => {
                let pem = std::fs::read(&path).map_err(|e| {
                    format!(
                        "SSL_CERT_FILE {}: {e}",
                        std::path::Path::new(&path).display()
                    )
                })?;
                let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
                    .collect::<Result<_, _>>()
                    .map_err(|e| format!("SSL_CERT_FILE: not valid PEM: {e}"))?;
                certs
            }
            None => Vec::new(),
        };
        Ok(Self::with_extra(extra))
    }

    /// webpki roots plus `extra`.
    pub fn with_extra(extra: Vec<CertificateDer<'static>>) -> Self {
        let mut store = RootCertStore::empty();
        store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        store.add_parsable_certificates(extra);
        Self {
            base: Arc::new(store),
            provider: Arc::new(rustls::crypto::ring::default_provider()),
        }
    }

    /// A client config trusting the base roots and `extra`, offering `h2` first when asked.
    pub fn client_config(
        &self,
        extra: Option<&CaBundle>,
        h2: bool,
    ) -> Result<Arc<ClientConfig>, String> {
        let roots = match extra {
            None => self.base.clone(),
            Some(ca) => {
                let mut store = (*self.base).clone();
                store.add_parsable_certificates(ca.certs().iter().cloned());
                Arc::new(store)
            }
        };
        let mut config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = if h2 {
            vec![ALPN_H2.to_vec(), ALPN_H1.to_vec()]
        } else {
            vec![ALPN_H1.to_vec()]
        };
        Ok(Arc::new(config))
    }
}
