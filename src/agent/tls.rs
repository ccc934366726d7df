//! TLS for the agent API.
//!
//! The agent serves TLS with its certificate and key; given a CA it also requires a client
//! certificate signed by it (mutual TLS). The controller verifies the agent against a CA and may
//! present a certificate of its own. The bearer token is checked on top of either: TLS keeps it
//! from crossing the node network in clear, the token keeps the API closed even to a client that
//! holds a certificate of the same CA for some other purpose.
//!
//! Agents are addressed by pod IP, and a pod's IP changes with every restart, so no certificate
//! made in advance can name it. The controller therefore checks the agent's certificate against a
//! fixed DNS name instead of the address it dialled ([`DEFAULT_SERVER_NAME`], or
//! `--agent-tls-server-name`): every agent carries the same certificate (or one with the same
//! name) signed by a CA that exists only for this purpose, which is what makes the name
//! meaningful. The Helm chart makes such a CA and one certificate with both the server and the
//! client extended key usage, used by the agents and the controller alike.
//!
//! Every file is read and checked when the process starts, so a missing, unreadable or malformed
//! one stops it with the flag and the path named, before anything listens.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// The DNS name agents' certificates carry and the controller verifies by default.
pub const DEFAULT_SERVER_NAME: &str = "strata-agent";

/// A TLS file that cannot be used, or settings that do not fit together.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{flag} {}: {source}", path.display())]
    Read {
        /// The flag that names the file.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A file was read but does not hold what the flag needs.
    #[error("{flag} {}: {message}", path.display())]
    Invalid {
        /// The flag that names the file.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The TLS flags given do not make a usable configuration.
    #[error("{0}")]
    Settings(String),
}

/// The crypto provider of the whole process (see `main.rs`): ring. Checks here use it explicitly so
/// that they behave the same in a test process that installed none.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A PEM file read whole, remembered with the flag that named it for error messages.
struct PemFile {
    flag: &'static str,
    path: PathBuf,
    pem: Vec<u8>,
}

impl PemFile {
    fn read(flag: &'static str, path: &Path) -> Result<Self, TlsError> {
        let pem = std::fs::read(path).map_err(|source| TlsError::Read {
            flag,
            path: path.to_owned(),
            source,
        })?;
        Ok(Self {
            flag,
            path: path.to_owned(),
            pem,
        })
    }

    fn invalid(&self, message: impl Into<String>) -> TlsError {
        TlsError::Invalid {
            flag: self.flag,
            path: self.path.clone(),
            message: message.into(),
        }
    }

    /// The certificates in the file: at least one, all of them well-formed PEM.
    fn certificates(&self) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        let certs = CertificateDer::pem_slice_iter(&self.pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.invalid(format!("not a PEM certificate file: {e}")))?;
        if certs.is_empty() {
            return Err(self.invalid("no PEM certificate (BEGIN CERTIFICATE) in the file"));
        }
        Ok(certs)
    }

    /// The private key in the file (PKCS#1, PKCS#8 or SEC1). The error never quotes the file.
    fn private_key(&self) -> Result<PrivateKeyDer<'static>, TlsError> {
        PrivateKeyDer::from_pem_slice(&self.pem).map_err(|e| match e {
            rustls::pki_types::pem::Error::NoItemsFound => {
                self.invalid("no PEM private key (BEGIN PRIVATE KEY, RSA or EC PRIVATE KEY) in the file")
            }
            _ => self.invalid("the private key is not well-formed PEM"),
        })
    }

    /// A trust store of the CA certificates in the file.
    fn roots(&self) -> Result<rustls::RootCertStore, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in self.certificates()? {
            roots
                .add(cert)
                .map_err(|e| self.invalid(format!("not a usable CA certificate: {e}")))?;
        }
        Ok(roots)
    }
}

/// A certificate and its key, checked to belong together.
fn identity(cert: &Path, key: &Path) -> Result<Identity, TlsError> {
    let cert_file = PemFile::read("--agent-tls-cert", cert)?;
    let key_file = PemFile::read("--agent-tls-key", key)?;
    let chain = cert_file.certificates()?;
    let der = key_file.private_key()?;
    rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Settings(format!("TLS protocol versions: {e}")))?
        .with_no_client_auth()
        .with_single_cert(chain, der)
        .map_err(|e| {
            key_file.invalid(format!(
                "does not fit the certificate in {}: {e}",
                cert_file.path.display()
            ))
        })?;
    Ok(Identity::from_pem(cert_file.pem, key_file.pem))
}

/// The agent's TLS settings, read and checked.
#[derive(Clone)]
pub struct ServerTls {
    /// The agent's certificate and key.
    identity: Identity,
    /// When set, clients must present a certificate signed by this CA.
    client_ca: Option<Certificate>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("mutual", &self.client_ca.is_some())
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Reads the agent's certificate and key, and the CA of its clients when given (which makes
    /// client certificates required).
    pub fn load(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<Self, TlsError> {
        let identity = identity(cert, key)?;
        let client_ca = match client_ca {
            Some(path) => {
                let file = PemFile::read("--agent-tls-ca", path)?;
                rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(file.roots()?),
                    provider(),
                )
                .build()
                .map_err(|e| file.invalid(format!("cannot verify clients with it: {e}")))?;
                Some(Certificate::from_pem(file.pem))
            }
            None => None,
        };
        Ok(Self { identity, client_ca })
    }

    /// Whether clients must present a certificate.
    pub fn mutual(&self) -> bool {
        self.client_ca.is_some()
    }

    /// The configuration for tonic's server.
    pub fn config(&self) -> ServerTlsConfig {
        let config = ServerTlsConfig::new()
            .identity(self.identity.clone())
            // A client that connects and never finishes the handshake must not hold a task forever.
            .timeout(std::time::Duration::from_secs(10));
        match &self.client_ca {
            Some(ca) => config.client_ca_root(ca.clone()),
            None => config,
        }
    }
}

/// The controller's TLS settings for calling agents, read and checked.
#[derive(Clone)]
pub struct ClientTls {
    /// CA that signed the agents' certificates.
    ca: Certificate,
    /// Presented to agents that require client certificates.
    identity: Option<Identity>,
    /// The name verified in the agents' certificates (not their changing addresses).
    server_name: String,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .field("client_certificate", &self.identity.is_some())
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Reads the CA that verifies agents and, when both are given, the controller's own
    /// certificate and key; `server_name` defaults to [`DEFAULT_SERVER_NAME`].
    pub fn load(
        ca: &Path,
        cert: Option<&Path>,
        key: Option<&Path>,
        server_name: Option<&str>,
    ) -> Result<Self, TlsError> {
        let file = PemFile::read("--agent-tls-ca", ca)?;
        file.roots()?;
        let identity = match (cert, key) {
            (Some(cert), Some(key)) => Some(identity(cert, key)?),
            (None, None) => None,
            _ => {
                return Err(TlsError::Settings(
                    "--agent-tls-cert and --agent-tls-key go together".into(),
                ))
            }
        };
        let server_name = server_name.unwrap_or(DEFAULT_SERVER_NAME).to_owned();
        rustls::pki_types::ServerName::try_from(server_name.as_str()).map_err(|_| {
            TlsError::Settings(format!(
                "--agent-tls-server-name {server_name:?} is not a DNS name"
            ))
        })?;
        Ok(Self {
            ca: Certificate::from_pem(file.pem),
            identity,
            server_name,
        })
    }

    /// The configuration for tonic's channels.
    pub fn config(&self) -> ClientTlsConfig {
        let config = ClientTlsConfig::new()
            .ca_certificate(self.ca.clone())
            .domain_name(self.server_name.clone());
        match &self.identity {
            Some(id) => config.identity(id.clone()),
            None => config,
        }
    }
}

/// How the agent API is carried, on either side.
#[derive(Debug, Clone)]
pub enum Transport<T> {
    /// TLS with these settings.
    Tls(T),
    /// Plaintext, chosen explicitly with `--agent-insecure`.
    Insecure,
}

/// The agent's side from its flags: TLS unless `insecure`, which excludes every TLS flag.
pub fn server_transport(
    cert: Option<&Path>,
    key: Option<&Path>,
    ca: Option<&Path>,
    insecure: bool,
) -> Result<Transport<ServerTls>, TlsError> {
    match (cert, key, insecure) {
        (None, None, true) if ca.is_none() => Ok(Transport::Insecure),
        (_, _, true) => Err(TlsError::Settings(
            "--agent-insecure excludes --agent-tls-cert, --agent-tls-key and --agent-tls-ca".into(),
        )),
        (Some(cert), Some(key), false) => Ok(Transport::Tls(ServerTls::load(cert, key, ca)?)),
        (None, None, false) => Err(TlsError::Settings(
            "the agent API needs TLS: --agent-tls-cert and --agent-tls-key (and --agent-tls-ca to \
             require client certificates), or --agent-insecure for plaintext"
                .into(),
        )),
        (Some(_), None, false) => Err(TlsError::Settings(
            "--agent-tls-cert needs --agent-tls-key".into(),
        )),
        (None, Some(_), false) => Err(TlsError::Settings(
            "--agent-tls-key needs --agent-tls-cert".into(),
        )),
    }
}

/// The controller's side from its flags: TLS unless `insecure`, which excludes every TLS flag.
pub fn client_transport(
    cert: Option<&Path>,
    key: Option<&Path>,
    ca: Option<&Path>,
    server_name: Option<&str>,
    insecure: bool,
) -> Result<Transport<ClientTls>, TlsError> {
    if insecure {
        if cert.is_some() || key.is_some() || ca.is_some() || server_name.is_some() {
            return Err(TlsError::Settings(
                "--agent-insecure excludes --agent-tls-cert, --agent-tls-key, --agent-tls-ca and \
                 --agent-tls-server-name"
                    .into(),
            ));
        }
        return Ok(Transport::Insecure);
    }
    let ca = ca.ok_or_else(|| {
        TlsError::Settings(
            "calls to agents need TLS: --agent-tls-ca to verify them (with --agent-tls-cert and \
             --agent-tls-key when they require client certificates), or --agent-insecure for \
             plaintext"
                .into(),
        )
    })?;
    Ok(Transport::Tls(ClientTls::load(ca, cert, key, server_name)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_must_fit_together() {
        let p = Path::new("/nonexistent/x.pem");
        assert!(matches!(
            server_transport(None, None, None, true),
            Ok(Transport::Insecure)
        ));
        let e = server_transport(None, None, None, false).unwrap_err().to_string();
        assert!(e.contains("--agent-insecure"), "{e}");
        assert!(server_transport(Some(p), None, None, false).is_err());
        assert!(server_transport(None, None, Some(p), true).is_err());
        let e = server_transport(Some(p), Some(p), None, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--agent-tls-cert /nonexistent/x.pem"), "{e}");
        assert!(client_transport(None, None, None, None, false).is_err());
        assert!(client_transport(None, None, None, Some("x"), true).is_err());
        assert!(matches!(
            client_transport(None, None, None, None, true),
            Ok(Transport::Insecure)
        ));
    }

    #[test]
    fn garbage_is_named_not_quoted() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("key.pem");
        std::fs::write(&f, "secret-material-that-is-not-pem").unwrap();
        let e = server_transport(Some(&f), Some(&f), None, false)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--agent-tls-cert "), "{e}");
        assert!(e.contains("no PEM certificate"), "{e}");
        assert!(!e.contains("secret-material"), "{e}");
    }
}
