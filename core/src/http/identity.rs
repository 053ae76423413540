//! An endpoint's client certificate (mutual TLS): the PEM certificate chain and private key an
//! administrator gave, checked once (parsed, and the key matching the first certificate), then
//! handed to the HTTP client. Nothing here ever puts the key, or any line of it, in a message.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("client_cert and client_key must be given together")]
    Half,
    #[error("client_cert holds no PEM certificate (-----BEGIN CERTIFICATE-----)")]
    NoCertificate,
    #[error("client_cert is not valid PEM: {0}")]
    BadCertificate(String),
    #[error("client_cert's first certificate cannot be read as X.509: {0}")]
    NotX509(String),
    #[error("client_key holds no PEM private key (PKCS#8, PKCS#1 RSA or SEC1 EC)")]
    NoKey,
    #[error("client_key cannot be used: {0}")]
    UnusableKey(String),
    #[error("client_key is not the private key of client_cert's first certificate")]
    Mismatch,
}

/// A checked client certificate and key, and a digest that names them (the HTTP runtime keeps
/// one client per identity).
pub struct ClientIdentity {
    pub(super) fingerprint: [u8; 32],
    pub(super) pem: Vec<u8>,
}

impl std::fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClientIdentity({:02x?})", &self.fingerprint[..6])
    }
}

impl ClientIdentity {
    /// Checks a certificate chain (the client's certificate first, then any intermediates) and
    /// its private key, both PEM.
    pub fn from_pem(cert: &str, key: &str) -> Result<Arc<ClientIdentity>, IdentityError> {
        let certs = CertificateDer::pem_slice_iter(cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            // The parser's messages may quote a line of the input: only its kind is kept.
            .map_err(|e| IdentityError::BadCertificate(pem_error(&e)))?;
        if certs.is_empty() {
            return Err(IdentityError::NoCertificate);
        }
        let der = match PrivateKeyDer::from_pem_slice(key.as_bytes()) {
            Ok(der) => der,
            Err(rustls::pki_types::pem::Error::NoItemsFound) => return Err(IdentityError::NoKey),
            Err(e) => return Err(IdentityError::UnusableKey(pem_error(&e))),
        };
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
        let mut pem = Vec::with_capacity(cert.len() + key.len() + 1);
        pem.extend_from_slice(key.as_bytes());
        pem.push(b'\n');
        pem.extend_from_slice(cert.as_bytes());
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
            IdentityError::NoCertificate
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
