//! Standard Webhooks signatures: `v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`.
//!
//! Secrets look like `whsec_<base64 key>`; the key is the base64-decoded part after the prefix.
//! A secret without the prefix is accepted as raw base64 too, as the official libraries do.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The prefix every generated secret carries.
pub const SECRET_PREFIX: &str = "whsec_";
/// Random bytes in a generated secret (Svix uses 24; 32 matches the HMAC-SHA256 block strength).
pub const GENERATED_KEY_BYTES: usize = 32;
/// Shortest key we accept from a user: below 16 bytes an HMAC key is guessable.
pub const MIN_KEY_BYTES: usize = 16;
/// Longest key we accept (the HMAC block size is 64; longer keys are hashed first, but nobody needs them).
pub const MAX_KEY_BYTES: usize = 64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretError {
    #[error("secret is not valid base64 after the \"whsec_\" prefix")]
    NotBase64,
    #[error("secret is too short: its key has {0} bytes, at least {MIN_KEY_BYTES} are required")]
    TooShort(usize),
    #[error("secret is too long: its key has {0} bytes, at most {MAX_KEY_BYTES} are allowed")]
    TooLong(usize),
}

/// Decodes a `whsec_…` secret into its HMAC key, refusing keys too short to be safe.
pub fn decode_secret(secret: &str) -> Result<Vec<u8>, SecretError> {
    let b64 = secret.strip_prefix(SECRET_PREFIX).unwrap_or(secret);
    let key = B64.decode(b64.trim()).map_err(|_| SecretError::NotBase64)?;
    if key.len() < MIN_KEY_BYTES {
        return Err(SecretError::TooShort(key.len()));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(SecretError::TooLong(key.len()));
    }
    Ok(key)
}

/// Builds a secret from random key bytes.
pub fn encode_secret(key: &[u8]) -> String {
    format!("{SECRET_PREFIX}{}", B64.encode(key))
}

/// A fresh `whsec_` secret from the operating system's CSPRNG.
pub fn generate_secret() -> Result<String, getrandom::Error> {
    let mut key = [0u8; GENERATED_KEY_BYTES];
    getrandom::getrandom(&mut key)?;
    Ok(encode_secret(&key))
}

/// One signature, `v1,<base64>`, over `msg_id.timestamp.body`.
pub fn sign(key: &[u8], msg_id: &str, timestamp: i64, body: &[u8]) -> String {
    format!("v1,{}", B64.encode(digest(key, msg_id, timestamp, body)))
}

/// HMAC-SHA256 of `msg_id.timestamp.body`, the signed content of Standard Webhooks.
fn digest(key: &[u8], msg_id: &str, timestamp: i64, body: &[u8]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(msg_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.finalize().into_bytes().into()
}

/// The `webhook-signature` header value: one `v1,` signature per key, space-separated
/// (several keys while a rotated secret's grace period runs).
pub fn signature_header(keys: &[Vec<u8>], msg_id: &str, timestamp: i64, body: &[u8]) -> String {
    keys.iter()
        .map(|k| sign(k, msg_id, timestamp, body))
        .collect::<Vec<_>>()
        .join(" ")
}

/// True when any `v1,` signature in the space-separated `header` matches, compared in constant time.
pub fn verify(key: &[u8], msg_id: &str, timestamp: i64, body: &[u8], header: &str) -> bool {
    let expected = digest(key, msg_id, timestamp, body);
    header.split_whitespace().any(|candidate| {
        candidate
            .strip_prefix("v1,")
            .and_then(|sig| B64.decode(sig).ok())
            .is_some_and(|sig| constant_time_eq(&sig, &expected))
    })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    // The test vector published by Standard Webhooks (and used by every official library).
    const SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
    const MSG_ID: &str = "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk";
    const TIMESTAMP: i64 = 1649367553;
    const BODY: &str = r#"{"email":"test@example.com","username":"test_user"}"#;
    const EXPECTED: &str = "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=";

    #[test]
    fn standard_webhooks_test_vector() {
        let key = decode_secret(SECRET).unwrap();
        assert_eq!(sign(&key, MSG_ID, TIMESTAMP, BODY.as_bytes()), EXPECTED);
        assert!(verify(&key, MSG_ID, TIMESTAMP, BODY.as_bytes(), EXPECTED));
    }

    #[test]
    fn verify_rejects_tampering() {
        let key = decode_secret(SECRET).unwrap();
        assert!(!verify(
            &key,
            MSG_ID,
            TIMESTAMP + 1,
            BODY.as_bytes(),
            EXPECTED
        ));
        assert!(!verify(
            &key,
            "msg_other",
            TIMESTAMP,
            BODY.as_bytes(),
            EXPECTED
        ));
        assert!(!verify(&key, MSG_ID, TIMESTAMP, b"{}", EXPECTED));
        assert!(!verify(&key, MSG_ID, TIMESTAMP, BODY.as_bytes(), "v1,AAAA"));
        assert!(!verify(
            &key,
            MSG_ID,
            TIMESTAMP,
            BODY.as_bytes(),
            "v2,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw="
        ));
        assert!(!verify(&key, MSG_ID, TIMESTAMP, BODY.as_bytes(), ""));
    }

    #[test]
    fn two_keys_give_two_signatures_each_verifiable() {
        let old = decode_secret(SECRET).unwrap();
        let new = decode_secret(&generate_secret().unwrap()).unwrap();
        let header = signature_header(
            &[new.clone(), old.clone()],
            MSG_ID,
            TIMESTAMP,
            BODY.as_bytes(),
        );
        assert_eq!(header.split(' ').count(), 2);
        assert!(header.ends_with(EXPECTED));
        assert!(verify(&old, MSG_ID, TIMESTAMP, BODY.as_bytes(), &header));
        assert!(verify(&new, MSG_ID, TIMESTAMP, BODY.as_bytes(), &header));
    }

    #[test]
    fn generated_secrets_are_prefixed_random_and_decodable() {
        let a = generate_secret().unwrap();
        let b = generate_secret().unwrap();
        assert!(a.starts_with("whsec_"));
        assert_ne!(a, b);
        assert_eq!(decode_secret(&a).unwrap().len(), GENERATED_KEY_BYTES);
    }

    #[test]
    fn bad_secrets_are_refused_with_reason() {
        assert_eq!(
            decode_secret("whsec_not base64!"),
            Err(SecretError::NotBase64)
        );
        assert_eq!(
            decode_secret("whsec_c2hvcnQ="),
            Err(SecretError::TooShort(5))
        );
        let long = encode_secret(&[7u8; 65]);
        assert_eq!(decode_secret(&long), Err(SecretError::TooLong(65)));
        // The prefix is optional, as in the official libraries.
        assert!(decode_secret("C2FVsBQIhrscChlQIMV+b5sSYspob7oD").is_ok());
    }

    #[test]
    fn secret_errors_never_echo_the_secret() {
        let secret = "whsec_SECRETVALUE!!";
        let msg = decode_secret(secret).unwrap_err().to_string();
        assert!(!msg.contains("SECRETVALUE"));
    }
}
