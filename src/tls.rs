//! Optional TLS on the gRPC and webhook listeners, for deployments outside a mesh (inside one, the sidecars
//! encrypt and this stays off), and optional mutual TLS on the gRPC port to authenticate callers.
//!
//! The PEM files are read and checked once, at start-up, by [`TlsFiles::load`]: a bad file stops the process
//! with the name of its variable before any port is bound.

use std::sync::Arc;

use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};

use crate::{
    config::{ConfigError, TLS_CERT, TLS_CLIENT_CA, TLS_KEY, TlsSettings, invalid},
    secret::Secret,
};

/// The PEM files TLS is served with.
#[derive(Clone)]
pub struct TlsFiles {
    /// The server's certificate chain, leaf first.
    pub cert_chain: Vec<u8>,
    /// The server's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: Secret,
    /// When set, gRPC callers must present a certificate issued by one of these CAs (mutual TLS).
    pub client_ca: Option<Vec<u8>>,
    /// The webhook listener's TLS, built from the same files: HTTP/2 or HTTP/1.1 by ALPN, no client
    /// certificate (Sinch presents none).
    pub webhook: Arc<ServerConfig>,
}

/// Which file is wrong, and how.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("the certificate chain: {0}")]
    Certificate(String),
    #[error("the private key: {0}")]
    Key(String),
    #[error("the client CA: {0}")]
    ClientCa(String),
}

impl std::fmt::Debug for TlsFiles {
    /// Says what is configured, never the key material.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsFiles")
            .field("cert_chain_bytes", &self.cert_chain.len())
            .field("mutual", &self.client_ca.is_some())
            .finish_non_exhaustive()
    }
}

impl TlsFiles {
    /// Reads and checks the files `settings` name; `None` when TLS is off. An error names the variable of the
    /// file that is wrong.
    pub fn read(settings: &TlsSettings) -> Result<Option<TlsFiles>, ConfigError> {
        let (Some(cert), Some(key)) = (&settings.cert, &settings.key) else {
            return Ok(None);
        };
        let read = |variable: &'static str, path: &std::path::Path| {
            std::fs::read(path).map_err(|e| invalid(variable, format!("cannot read {}: {e}", path.display())))
        };
        let cert = read(TLS_CERT, cert)?;
        let key = String::from_utf8(read(TLS_KEY, key)?).map_err(|_| invalid(TLS_KEY, "not a PEM file"))?;
        let client_ca = settings
            .client_ca
            .as_deref()
            .map(|path| read(TLS_CLIENT_CA, path))
            .transpose()?;
        TlsFiles::load(cert, Secret::new(key), client_ca)
            .map(Some)
            .map_err(|e| {
                let variable = match e {
                    TlsError::Certificate(_) => TLS_CERT,
                    TlsError::Key(_) => TLS_KEY,
                    TlsError::ClientCa(_) => TLS_CLIENT_CA,
                };
                invalid(variable, e.to_string())
            })
    }

    /// Parses and checks the PEM texts: at least one certificate, a key that matches it, a usable client CA.
    pub fn load(cert_chain: Vec<u8>, key: Secret, client_ca: Option<Vec<u8>>) -> Result<TlsFiles, TlsError> {
        let webhook = webhook_config(&cert_chain, &key)?;
        if let Some(ca) = &client_ca {
            client_verifier(ca)?;
        }
        Ok(TlsFiles {
            cert_chain,
            key,
            client_ca,
            webhook,
        })
    }
}

/// The server config of `cert_chain` and `key`; fails when either is unusable or they do not match.
fn webhook_config(cert_chain: &[u8], key: &Secret) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(cert_chain)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Certificate(format!("not PEM: {e}")))?;
    if certs.is_empty() {
        return Err(TlsError::Certificate("no CERTIFICATE block found".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key.expose().as_bytes())
        .map_err(|e| TlsError::Key(format!("no usable PRIVATE KEY block: {e}")))?;
    let mut config = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Certificate(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Key(format!("does not go with the certificate: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The CA certificates of the PEM text `pem`, each checked usable as a trust anchor, at least one; an error
/// says what is wrong.
pub fn trust_anchors(pem: &[u8]) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| format!("not PEM: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("not a usable CA certificate: {e}"))?;
    }
    if roots.is_empty() {
        return Err("no CERTIFICATE block found".into());
    }
    Ok(roots)
}

/// Checks that `ca` holds at least one CA certificate a client certificate can be verified against.
fn client_verifier(ca: &[u8]) -> Result<(), TlsError> {
    let roots = trust_anchors(ca).map_err(TlsError::ClientCa)?;
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::new(rustls::crypto::ring::default_provider()))
        .build()
        .map_err(|e| TlsError::ClientCa(e.to_string()))?;
    Ok(())
}
