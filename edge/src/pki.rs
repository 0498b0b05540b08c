//! Development PKI: the CA, server and client certificates and the token signing key
//! that the embedded default creates on first start, and the TLS configurations built
//! from PEM files (development or not).
//!
//! Layout under `<data dir>/pki/`:
//!
//! | file | what |
//! | --- | --- |
//! | `ca.pem`, `ca.key` | the development CA (trust anchor for both sides) |
//! | `server.pem`, `server.key` | the edge's certificate (SAN localhost, 127.0.0.1, ::1) |
//! | `client.pem`, `client.key` | the admin engineer's client certificate (CN `dev-admin`) |
//! | `token-signing.key` | Ed25519 seed (hex) of the token issuer key — secret |
//! | `token-signing.pub` | its public half (hex), what every edge of a fleet needs |
//!
//! Keys are written with mode 0600.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use sha2::{Digest, Sha256};

/// Identity of the development admin client certificate.
pub const DEV_ADMIN: &str = "dev-admin";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    #[error("cannot read or write {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} holds no usable {what}: {reason}")]
    Invalid {
        path: PathBuf,
        what: &'static str,
        reason: String,
    },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration failed: {0}")]
    Tls(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The replay service's identity in the embedded default.
pub const REPLAY_IDENTITY: &str = "cloudtap-replay";

/// Paths of the development PKI files.
#[derive(Debug, Clone)]
pub struct DevPki {
    pub dir: PathBuf,
}

impl DevPki {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            dir: data_dir.join("pki"),
        }
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("server.pem")
    }
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server.key")
    }
    pub fn client_cert(&self) -> PathBuf {
        self.dir.join("client.pem")
    }
    pub fn client_key(&self) -> PathBuf {
        self.dir.join("client.key")
    }
    pub fn signing_key(&self) -> PathBuf {
        self.dir.join("token-signing.key")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }
    pub fn signing_pub(&self) -> PathBuf {
        self.dir.join("token-signing.pub")
    }

    /// The development export key (bundles), apart from the token signing key.
    pub fn export_key(&self) -> PathBuf {
        self.dir.join("export-signing.key")
    }
    pub fn export_pub(&self) -> PathBuf {
        self.dir.join("export-signing.pub")
    }

    pub fn replay_cert(&self) -> PathBuf {
        self.dir.join("replay-client.pem")
    }
    pub fn replay_key(&self) -> PathBuf {
        self.dir.join("replay-client.key")
    }

    /// The replay service's client certificate (CN [`REPLAY_IDENTITY`]), issued by the
    /// development CA the first time it is asked for.
    pub fn ensure_replay_identity(&self) -> Result<(PathBuf, PathBuf), PkiError> {
        if !self.replay_cert().exists() {
            let read = |p: PathBuf| std::fs::read_to_string(&p).map_err(io_err(&p));
            let ca = Ca::from_pem(&read(self.ca_cert())?, &read(self.ca_key())?)?;
            let issued = ca.issue_client(REPLAY_IDENTITY)?;
            let _ = std::fs::remove_file(self.replay_key());
            write(&self.replay_key(), issued.key_pem.as_bytes(), true)?;
            write(&self.replay_cert(), issued.cert_pem.as_bytes(), false)?;
        }
        Ok((self.replay_cert(), self.replay_key()))
    }

    /// Creates whatever is missing; returns true when anything was created.
    pub fn ensure(&self) -> Result<bool, PkiError> {
        std::fs::create_dir_all(&self.dir).map_err(io_err(&self.dir))?;
        let mut created = false;
        if !self.ca_cert().exists() {
            let ca = generate_ca("cloudtap development CA")?;
            write(&self.ca_cert(), ca.cert_pem.as_bytes(), false)?;
            write(&self.ca_key(), ca.key_pem.as_bytes(), true)?;
            let server = ca.issue_server(&["localhost", "127.0.0.1", "::1"])?;
            write(&self.server_cert(), server.cert_pem.as_bytes(), false)?;
            write(&self.server_key(), server.key_pem.as_bytes(), true)?;
            let client = ca.issue_client(DEV_ADMIN)?;
            write(&self.client_cert(), client.cert_pem.as_bytes(), false)?;
            write(&self.client_key(), client.key_pem.as_bytes(), true)?;
            created = true;
        }
        if !self.signing_key().exists() {
            let key = crate::token::SigningKey::generate();
            write(&self.signing_key(), key.seed_hex().as_bytes(), true)?;
            write(&self.signing_pub(), key.public_hex().as_bytes(), false)?;
            created = true;
        }
        if !self.export_key().exists() {
            let key = crate::token::SigningKey::generate();
            write(&self.export_key(), key.seed_hex().as_bytes(), true)?;
            write(&self.export_pub(), key.public_hex().as_bytes(), false)?;
            created = true;
        }
        Ok(created)
    }
}

fn write(path: &Path, bytes: &[u8], secret: bool) -> Result<(), PkiError> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if secret { 0o600 } else { 0o644 });
    }
    let mut f = opts.open(path).map_err(io_err(path))?;
    f.write_all(bytes).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

/// A certificate and its key, PEM-encoded.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A CA able to issue server and client certificates (used by the dev PKI and tests).
pub struct Ca {
    pub cert_pem: String,
    pub key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    /// Loads an existing CA (e.g. the development CA in `<data dir>/pki`).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(Ca {
            cert_pem: cert_pem.into(),
            key_pem: key_pem.into(),
            issuer,
        })
    }

    pub fn issue_server(&self, names: &[&str]) -> Result<IssuedCert, PkiError> {
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name.push(DnType::CommonName, names[0]);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params)
    }

    pub fn issue_client(&self, common_name: &str) -> Result<IssuedCert, PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params)
    }

    fn sign(&self, mut params: CertificateParams) -> Result<IssuedCert, PkiError> {
        let now = rcgen::date_time_ymd(1970, 1, 1) + since_epoch();
        params.not_before = now - std::time::Duration::from_secs(3600);
        params.not_after = now + std::time::Duration::from_secs(365 * 24 * 3600);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn since_epoch() -> std::time::Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
}

/// Generates a fresh CA.
pub fn generate_ca(name: &str) -> Result<Ca, PkiError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = rcgen::date_time_ymd(1970, 1, 1) + since_epoch();
    params.not_before = now - std::time::Duration::from_secs(3600);
    params.not_after = now + std::time::Duration::from_secs(10 * 365 * 24 * 3600);
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    let key_pem = key.serialize_pem();
    Ok(Ca {
        cert_pem: cert.pem(),
        key_pem,
        issuer: Issuer::new(params, key),
    })
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let pem = std::fs::read(path).map_err(io_err(path))?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| PkiError::Invalid {
            path: path.into(),
            what: "certificate",
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(PkiError::Invalid {
            path: path.into(),
            what: "certificate",
            reason: "no PEM CERTIFICATE block found".into(),
        });
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, PkiError> {
    let pem = std::fs::read(path).map_err(io_err(path))?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| PkiError::Invalid {
        path: path.into(),
        what: "private key",
        reason: e.to_string(),
    })
}

fn roots(ca: &Path) -> Result<Arc<RootCertStore>, PkiError> {
    let mut store = RootCertStore::empty();
    for c in load_certs(ca)? {
        store.add(c).map_err(|e| PkiError::Invalid {
            path: ca.into(),
            what: "CA certificate",
            reason: e.to_string(),
        })?;
    }
    Ok(Arc::new(store))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Server side of the tunnel port: TLS 1.3 only, a client certificate from `ca` required.
pub fn tunnel_server_config(
    cert: &Path,
    key: &Path,
    client_ca: &Path,
) -> Result<Arc<rustls::ServerConfig>, PkiError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(client_ca)?, provider())
        .build()
        .map_err(|e| PkiError::Tls(e.to_string()))?;
    let cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| PkiError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(cert)?, load_key(key)?)
        .map_err(|e| PkiError::Tls(e.to_string()))?;
    Ok(Arc::new(cfg))
}

/// Client side: trusts `ca` (or, with `insecure_skip_verify`, any server — development
/// only) and presents the client certificate.
pub fn client_config(
    ca: &Path,
    cert: &Path,
    key: &Path,
    insecure_skip_verify: bool,
) -> Result<Arc<rustls::ClientConfig>, PkiError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| PkiError::Tls(e.to_string()))?;
    let builder = if insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(insecure_verifier(provider()))
    } else {
        builder.with_root_certificates(roots(ca)?)
    };
    let cfg = builder
        .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
        .map_err(|e| PkiError::Tls(e.to_string()))?;
    Ok(Arc::new(cfg))
}

/// Server name to verify for an address like `localhost:7443` or `127.0.0.1:7443`.
pub fn server_name(addr: &str) -> Result<ServerName<'static>, PkiError> {
    let host = crate::config::parse_host_port(addr).map_or_else(|_| addr.to_string(), |(h, _)| h);
    ServerName::try_from(host.clone())
        .map_err(|e| PkiError::Tls(format!("bad server name {host:?}: {e}")))
}

/// Hex SHA-256 of a DER certificate: how tokens are bound to a client certificate.
pub fn cert_fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// The engineer a client certificate names: its subject CN, else a SAN e-mail or URI.
pub fn identity_of(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    if let Some(cn) = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
    {
        return Some(cn.to_string());
    }
    let san = cert.subject_alternative_name().ok().flatten()?;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::RFC822Name(s)
        | x509_parser::extensions::GeneralName::URI(s) => Some(s.to_string()),
        _ => None,
    })
}

/// A verifier that accepts any server certificate: `--insecure-skip-verify` and
/// `insecure_skip_verify = true` upstreams, for development only.
pub fn insecure_verifier(
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Arc<dyn rustls::client::danger::ServerCertVerifier> {
    Arc::new(NoVerify(provider))
}

/// The certificate's notAfter, in seconds since the Unix epoch.
pub fn not_after(der: &[u8]) -> Option<i64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(cert.validity().not_after.timestamp())
}

#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_pki_is_created_once_and_names_the_admin() {
        let dir = tempfile::tempdir().unwrap();
        let pki = DevPki::new(dir.path());
        assert!(pki.ensure().unwrap());
        assert!(!pki.ensure().unwrap());
        let der = &load_certs(&pki.client_cert()).unwrap()[0];
        assert_eq!(identity_of(der).as_deref(), Some(DEV_ADMIN));
        tunnel_server_config(&pki.server_cert(), &pki.server_key(), &pki.ca_cert()).unwrap();
        client_config(&pki.ca_cert(), &pki.client_cert(), &pki.client_key(), false).unwrap();
    }
}
