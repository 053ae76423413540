//! An endpoint's client certificate (mutual TLS): the PEM certificate chain and private key an
//! administrator gave, checked once (parsed, and the key matching the first certificate), then
//! handed to the HTTP client. Nothing here ever puts the key, or any line of it, in a message.

use std::sync::Arc;

use rustls::pki_types::pem::{PemObject, SectionKind};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

/// Most bytes of PEM in client_cert and client_key, and most certificates in the chain: a
/// chain is sent in every handshake, and receivers refuse long ones anyway.
const MAX_CERT_PEM: usize = 64 * 1024;
const MAX_KEY_PEM: usize = 16 * 1024;
const MAX_CERTS: usize = 10;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("client_cert and client_key must be given together")]
    Half,
    #[error("{0} is too long ({1} bytes, at most {2})")]
    TooLong(&'static str, usize, usize),
    #[error("client_cert holds no PEM certificate (-----BEGIN CERTIFICATE-----)")]
    NoCertificate,
    #[error("client_cert holds {0} certificates, at most {MAX_CERTS}")]
    TooManyCertificates(usize),
    #[error("client_cert must hold certificates only, and holds a {0}")]
    NotOnlyCertificates(&'static str),
    #[error("client_cert is not valid PEM: {0}")]
    BadCertificate(String),
    #[error("client_cert's first certificate cannot be read as X.509: {0}")]
    NotX509(String),
    #[error("client_key holds no PEM private key (PKCS#8, PKCS#1 RSA or SEC1 EC; not encrypted)")]
    NoKey,
    #[error("client_key must hold one private key and nothing else, and holds {0}")]
    NotOneKey(String),
    #[error("client_key cannot be used: {0}")]
    UnusableKey(String),
    #[error("client_key is not the private key of client_cert's first certificate")]
    Mismatch,
}

/// A checked client certificate and key, and a digest that names them (the HTTP runtime keeps
/// one client per identity).
pub struct ClientIdentity {
    pub(super) fingerprint: [u8; 32],
    /// The key, then the certificates, as PEM written here from what was checked (not the
    /// given text: what is presented is exactly what was checked).
    pub(super) pem: Vec<u8>,
}

impl std::fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClientIdentity({:02x?})", &self.fingerprint[..6])
    }
}

/// The sections of a PEM text: (kind, DER). The parser's messages may quote a line of the
/// input: only its kind is kept.
fn sections(text: &str) -> Result<Vec<(SectionKind, Vec<u8>)>, String> {
    <(SectionKind, Vec<u8>)>::pem_slice_iter(text.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(&e))
}

fn kind_name(kind: SectionKind) -> &'static str {
    match kind {
        SectionKind::Certificate => "certificate",
        SectionKind::PublicKey => "public key",
        SectionKind::RsaPrivateKey | SectionKind::PrivateKey | SectionKind::EcPrivateKey => {
            "private key"
        }
        SectionKind::Crl => "certificate revocation list",
        SectionKind::Csr => "certificate request",
        _ => "section of another kind",
    }
}

/// PEM of one DER item: base64 in lines of 64.
fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

impl ClientIdentity {
    /// Checks a certificate chain (the client's certificate first, then any intermediates;
    /// certificates only) and its private key (one, and nothing else), both PEM.
    pub fn from_pem(cert: &str, key: &str) -> Result<Arc<ClientIdentity>, IdentityError> {
        if cert.len() > MAX_CERT_PEM {
            return Err(IdentityError::TooLong(
                "client_cert",
                cert.len(),
                MAX_CERT_PEM,
            ));
        }
        if key.len() > MAX_KEY_PEM {
            return Err(IdentityError::TooLong("client_key", key.len(), MAX_KEY_PEM));
        }
        let mut certs = Vec::new();
        for (kind, der) in sections(cert).map_err(IdentityError::BadCertificate)? {
            if kind != SectionKind::Certificate {
                return Err(IdentityError::NotOnlyCertificates(kind_name(kind)));
            }
            certs.push(CertificateDer::from(der));
        }
        if certs.is_empty() {
            return Err(IdentityError::NoCertificate);
        }
        if certs.len() > MAX_CERTS {
            return Err(IdentityError::TooManyCertificates(certs.len()));
        }
        let keys = sections(key).map_err(IdentityError::UnusableKey)?;
        let (label, der) = match keys.as_slice() {
            [] => return Err(IdentityError::NoKey),
            [(SectionKind::PrivateKey, der)] => {
                ("PRIVATE KEY", PrivateKeyDer::Pkcs8(der.clone().into()))
            }
            [(SectionKind::RsaPrivateKey, der)] => {
                ("RSA PRIVATE KEY", PrivateKeyDer::Pkcs1(der.clone().into()))
            }
            [(SectionKind::EcPrivateKey, der)] => {
                ("EC PRIVATE KEY", PrivateKeyDer::Sec1(der.clone().into()))
            }
            [(kind, _)] if !matches!(kind_name(*kind), "private key") => {
                return Err(IdentityError::NoKey)
            }
            more => {
                let names: Vec<&str> = more.iter().map(|(k, _)| kind_name(*k)).collect();
                return Err(IdentityError::NotOneKey(format!(
                    "{} sections ({})",
                    names.len(),
                    names.join(", ")
                )));
            }
        };
        let mut text = pem(label, der.secret_der());
        for c in &certs {
            text.push_str(&pem("CERTIFICATE", c));
        }
        let provider = rustls::crypto::ring::default_provider();
        let signing = provider
            .key_provider
            .load_private_key(der)
            .map_err(|e| IdentityError::UnusableKey(rustls_error(&e)))?;
        let certified = rustls::sign::CertifiedKey::new(certs, signing);
        match certified.keys_match() {
            Ok(()) => {}
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
                return Err(IdentityError::Mismatch)
            }
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
            Err(e) => return Err(IdentityError::NotX509(rustls_error(&e))),
        }
        let pem = text.into_bytes();
        let fingerprint = Sha256::digest(&pem).into();
        Ok(Arc::new(ClientIdentity { fingerprint, pem }))
    }
}

fn pem_error(e: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error;
    match e {
        Error::MissingSectionEnd { .. } => "a section has no END line".into(),
        Error::IllegalSectionStart { .. } => "a BEGIN line is malformed".into(),
        Error::Base64Decode(_) => "a section is not valid base64".into(),
        Error::NoItemsFound => "nothing found".into(),
        _ => "unreadable".into(),
    }
}

/// rustls's description of a key or certificate problem: names kinds, never key material.
fn rustls_error(e: &rustls::Error) -> String {
    match e {
        rustls::Error::InvalidCertificate(c) => format!("{c:?}"),
        rustls::Error::General(m) => m.clone(),
        other => format!("{other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["client".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn a_matching_certificate_and_key_are_accepted_and_named_by_their_digest() {
        let (cert, key) = pair();
        let a = ClientIdentity::from_pem(&cert, &key).unwrap();
        let b = ClientIdentity::from_pem(&cert, &key).unwrap();
        assert_eq!(a.fingerprint, b.fingerprint);
        let (cert2, key2) = pair();
        assert_ne!(
            ClientIdentity::from_pem(&cert2, &key2).unwrap().fingerprint,
            a.fingerprint
        );
        assert!(!format!("{a:?}").contains("PRIVATE"));
    }

    #[test]
    fn what_is_presented_is_written_from_what_was_checked() {
        let (cert, key) = pair();
        // Text around the sections, other line endings: the same identity.
        let noisy = format!("subject=CN=client\r\n{}", cert.replace('\n', "\r\n"));
        let a = ClientIdentity::from_pem(&noisy, &format!("# key\n{key}")).unwrap();
        let b = ClientIdentity::from_pem(&cert, &key).unwrap();
        assert_eq!(a.fingerprint, b.fingerprint);
        let text = String::from_utf8(a.pem.clone()).unwrap();
        assert!(text.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{text}");
        assert_eq!(text.matches("-----BEGIN CERTIFICATE-----").count(), 1);
        assert!(!text.contains("subject=") && !text.contains('\r'));
        // reqwest takes it.
        assert!(reqwest::Identity::from_pem(&a.pem).is_ok());
    }

    #[test]
    fn bad_certificates_and_keys_are_refused_with_reason() {
        let (cert, key) = pair();
        let (other_cert, other_key) = pair();
        assert_eq!(
            ClientIdentity::from_pem(&cert, &other_key).unwrap_err(),
            IdentityError::Mismatch
        );
        assert_eq!(
            ClientIdentity::from_pem(&other_cert, &key).unwrap_err(),
            IdentityError::Mismatch
        );
        assert_eq!(
            ClientIdentity::from_pem("not a certificate", &key).unwrap_err(),
            IdentityError::NoCertificate
        );
        assert_eq!(
            ClientIdentity::from_pem(&cert, "not a key").unwrap_err(),
            IdentityError::NoKey
        );
        // A key given where the certificate goes, and the reverse.
        assert_eq!(
            ClientIdentity::from_pem(&key, &key).unwrap_err(),
            IdentityError::NotOnlyCertificates("private key")
        );
        // A key beside the certificate, or a certificate beside the key: refused, so that what
        // is presented is exactly what was checked.
        assert_eq!(
            ClientIdentity::from_pem(&format!("{cert}{key}"), &key).unwrap_err(),
            IdentityError::NotOnlyCertificates("private key")
        );
        assert_eq!(
            ClientIdentity::from_pem(&cert, &format!("{key}{cert}")).unwrap_err(),
            IdentityError::NotOneKey("2 sections (private key, certificate)".into())
        );
        assert_eq!(
            ClientIdentity::from_pem(&cert.repeat(11), &key).unwrap_err(),
            IdentityError::TooManyCertificates(11)
        );
        let long = cert.repeat(200);
        assert_eq!(
            ClientIdentity::from_pem(&long, &key).unwrap_err(),
            IdentityError::TooLong("client_cert", long.len(), 65536)
        );
        assert_eq!(
            ClientIdentity::from_pem(&cert, &cert).unwrap_err(),
            IdentityError::NoKey
        );
        // A broken key: its message names the problem, never the key's text.
        let broken = key.replace("-----END PRIVATE KEY-----", "");
        let err = ClientIdentity::from_pem(&cert, &broken).unwrap_err();
        assert!(matches!(err, IdentityError::UnusableKey(_)), "{err:?}");
        let body: String = key.lines().nth(1).unwrap().into();
        assert!(!err.to_string().contains(&body[..20]), "{err}");
        // A certificate whose DER is not X.509.
        let junk = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let err = ClientIdentity::from_pem(junk, &key).unwrap_err();
        assert!(matches!(err, IdentityError::NotX509(_)), "{err:?}");
    }
}
