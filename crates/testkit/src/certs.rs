//! A throwaway PKI for tests: one CA and one leaf certificate for
//! `localhost`, `127.0.0.1` and `::1`, generated with rcgen.
//!
//! Every [`TestPki::new`] call makes a brand-new CA, so two instances are
//! unrelated: a client that trusts one of them rejects the other's leaf with a
//! "certificate not trusted" (`UnknownIssuer`) error.
//!
//! All rustls configs are built with the ring provider passed explicitly
//! ([`crypto_provider`]); nothing relies on a process-wide default provider.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// The ring crypto provider, explicitly (never the process default).
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A CA plus a leaf certificate (signed by that CA) valid for `localhost`,
/// `127.0.0.1` and `::1`.
pub struct TestPki {
    ca_pem: String,
    ca_der: CertificateDer<'static>,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    key_pem: String,
    key_der: Vec<u8>,
}

impl std::fmt::Debug for TestPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestPki").finish_non_exhaustive()
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

impl TestPki {
    /// Generates a fresh CA (with a unique subject name, so a foreign leaf
    /// fails with `UnknownIssuer` rather than `BadSignature`) and a leaf for `localhost`, `127.0.0.1`, `::1`.
    pub fn new() -> Self {
        // CA
        let mut ca_params =
            CertificateParams::new(Vec::<String>::new()).expect("rcgen: empty SAN list");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(
            DnType::CommonName,
            format!("provider-proxy test CA {}", crate::util::unique_suffix(12)),
        );
        ca_params
            .distinguished_name
            .push(DnType::OrganizationName, "provider-proxy tests");
        ca_params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
        ];
        let ca_key = KeyPair::generate().expect("rcgen: generate CA key");
        let ca_cert = ca_params.self_signed(&ca_key).expect("rcgen: self-sign CA");
        let issuer = Issuer::new(ca_params, ca_key);

        // Leaf
        let mut leaf_params = CertificateParams::new(vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
        ])
        .expect("rcgen: leaf SANs");
        leaf_params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        leaf_params.use_authority_key_identifier_extension = true;
        leaf_params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        leaf_params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let leaf_key = KeyPair::generate().expect("rcgen: generate leaf key");
        let leaf_cert = leaf_params
            .signed_by(&leaf_key, &issuer)
            .expect("rcgen: sign leaf");

        Self {
            ca_pem: ca_cert.pem(),
            ca_der: ca_cert.der().clone(),
            cert_pem: leaf_cert.pem(),
            cert_der: leaf_cert.der().clone(),
            key_pem: leaf_key.serialize_pem(),
            key_der: leaf_key.serialize_der(),
        }
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> String {
        self.ca_pem.clone()
    }

    /// The leaf certificate, PEM (leaf only, no chain).
    pub fn cert_pem(&self) -> String {
        self.cert_pem.clone()
    }

    /// The leaf's private key, PKCS#8 PEM (ECDSA P-256).
    pub fn key_pem(&self) -> String {
        self.key_pem.clone()
    }

    /// The CA certificate, DER.
    pub fn ca_der(&self) -> CertificateDer<'static> {
        self.ca_der.clone()
    }

    /// The leaf certificate, DER.
    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.cert_der.clone()
    }

    /// The leaf's private key, DER.
    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }

    /// A root store holding only this CA.
    pub fn root_store(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots
            .add(self.ca_der())
            .expect("rustls: add test CA to root store");
        roots
    }

    /// A rustls server config presenting the leaf (plus the CA in the chain),
    /// offering the given ALPN protocols (e.g. `&[b"h2", b"http/1.1"]`).
    pub fn rustls_server_config(&self, alpn: &[&[u8]]) -> Arc<ServerConfig> {
        let mut cfg = ServerConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()
            .expect("rustls: protocol versions")
            .with_no_client_auth()
            .with_single_cert(vec![self.cert_der(), self.ca_der()], self.key_der())
            .expect("rustls: server cert/key");
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(cfg)
    }

    /// A rustls client config trusting only this CA, offering the given ALPN
    /// protocols.
    pub fn rustls_client_config(&self, alpn: &[&[u8]]) -> Arc<ClientConfig> {
        let mut cfg = ClientConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()
            .expect("rustls: protocol versions")
            .with_root_certificates(self.root_store())
            .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(cfg)
    }

    /// Writes `ca.crt`, `tls.crt` (leaf) and `tls.key` into `dir` (mode 0644,
    /// so that unprivileged daemons such as Squid's `proxy` user can read them)
    /// and returns `(ca_path, cert_path, key_path)`.
    pub fn write_to(&self, dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
        use std::os::unix::fs::PermissionsExt;
        let ca = dir.join("ca.crt");
        let cert = dir.join("tls.crt");
        let key = dir.join("tls.key");
        for (path, content) in [
            (&ca, &self.ca_pem),
            (&cert, &self.cert_pem),
            (&key, &self.key_pem),
        ] {
            fs::write(path, content).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
            fs::set_permissions(path, fs::Permissions::from_mode(0o644))
                .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
        }
        (ca, cert, key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_pkis_are_unrelated_and_leaf_verifies_only_against_own_ca() {
        let a = TestPki::new();
        let b = TestPki::new();
        assert_ne!(a.ca_pem(), b.ca_pem());
        assert!(a.ca_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(a.key_pem().contains("PRIVATE KEY"));

        let provider = crypto_provider();
        let verify = |roots: RootCertStore, leaf: CertificateDer<'static>| {
            let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                provider.clone(),
            )
            .build()
            .expect("verifier");
            let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
            verifier.verify_server_cert(&leaf, &[], &name, &[], rustls::pki_types::UnixTime::now())
        };
        use rustls::client::danger::ServerCertVerifier;
        assert!(verify(a.root_store(), a.cert_der()).is_ok());
        let err = verify(a.root_store(), b.cert_der()).expect_err("foreign CA must fail");
        assert!(
            format!("{err:?}").contains("UnknownIssuer"),
            "unexpected error: {err:?}"
        );
        // IP SAN works too.
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(a.root_store()),
            provider.clone(),
        )
        .build()
        .expect("verifier");
        let ip = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("ip");
        assert!(
            verifier
                .verify_server_cert(
                    &a.cert_der(),
                    &[],
                    &ip,
                    &[],
                    rustls::pki_types::UnixTime::now()
                )
                .is_ok()
        );
    }

    #[test]
    fn write_to_writes_three_files() {
        let pki = TestPki::new();
        let dir = tempfile::tempdir().expect("tempdir");
        let (ca, cert, key) = pki.write_to(dir.path());
        assert_eq!(fs::read_to_string(ca).expect("ca"), pki.ca_pem());
        assert_eq!(fs::read_to_string(cert).expect("cert"), pki.cert_pem());
        assert_eq!(fs::read_to_string(key).expect("key"), pki.key_pem());
        let _ = pki.rustls_server_config(&[b"h2", b"http/1.1"]);
        let _ = pki.rustls_client_config(&[b"http/1.1"]);
    }
}
