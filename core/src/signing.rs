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
    let b64 = secret.strip_prefix(SECRET_PREFIX).unwrap_or(secret).trim();
    // Bounded before decoding (a key of MAX_KEY_BYTES takes 88 characters).
    if b64.len() > 4 * MAX_KEY_BYTES {
        return Err(SecretError::TooLong(b64.len() / 4 * 3));
    }
    let key = B64.decode(b64).map_err(|_| SecretError::NotBase64)?;
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

/// The `webhook-signature` header value with asymmetric keys too: a `v1,` signature per HMAC
/// key, then a `v1a,` signature per ed25519 key, space-separated.
pub fn signatures_header(
    keys: &[Vec<u8>],
    signing_keys: &[std::sync::Arc<SigningKey>],
    msg_id: &str,
    timestamp: i64,
    body: &[u8],
) -> String {
    keys.iter()
        .map(|k| sign(k, msg_id, timestamp, body))
        .chain(signing_keys.iter().map(|k| k.sign(msg_id, timestamp, body)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The prefix of an ed25519 signing (private) key: `whsk_<base64 of the 32-byte seed>`.
pub const SIGNING_KEY_PREFIX: &str = "whsk_";
/// The prefix of an ed25519 public key: `whpk_<base64 of the 32-byte key>`.
pub const PUBLIC_KEY_PREFIX: &str = "whpk_";

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum SigningKeyError {
    #[error("signing key must start with \"whsk_\"")]
    NoPrefix,
    #[error("signing key is not valid base64 after the \"whsk_\" prefix")]
    NotBase64,
    #[error("signing key has {0} bytes; an ed25519 key has 32 (the seed) or 64 (the seed, then its public key)")]
    WrongLength(usize),
    #[error("signing key's last 32 bytes are not the public key of its first 32")]
    Inconsistent,
}

/// An ed25519 key for Standard Webhooks' asymmetric signatures (`v1a`): the receiver checks them
/// with the public key alone, so a leaked verification key lets nobody forge a request.
pub struct SigningKey {
    pair: ring::signature::Ed25519KeyPair,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the seed: Debug output ends up in logs.
        write!(f, "SigningKey({})", self.public_key())
    }
}

impl SigningKey {
    /// Decodes `whsk_<base64>`: the 32-byte seed, or the 64 bytes of seed and public key that
    /// some libraries write (whose public half must then match).
    pub fn decode(text: &str) -> Result<SigningKey, SigningKeyError> {
        use ring::signature::KeyPair;
        let b64 = text
            .trim()
            .strip_prefix(SIGNING_KEY_PREFIX)
            .ok_or(SigningKeyError::NoPrefix)?;
        // Bounded before decoding: anyone may ask webhook.public_keys' function to decode a key.
        if b64.len() > 100 {
            return Err(SigningKeyError::WrongLength(b64.len() / 4 * 3));
        }
        let bytes = B64.decode(b64).map_err(|_| SigningKeyError::NotBase64)?;
        if bytes.len() != 32 && bytes.len() != 64 {
            return Err(SigningKeyError::WrongLength(bytes.len()));
        }
        let pair = ring::signature::Ed25519KeyPair::from_seed_unchecked(&bytes[..32])
            .map_err(|_| SigningKeyError::WrongLength(bytes.len()))?;
        if bytes.len() == 64 && pair.public_key().as_ref() != &bytes[32..] {
            return Err(SigningKeyError::Inconsistent);
        }
        Ok(SigningKey { pair })
    }

    /// A fresh key from the operating system's CSPRNG, as `whsk_<base64 seed>`.
    pub fn generate() -> Result<String, getrandom::Error> {
        let mut seed = [0u8; 32];
        getrandom::getrandom(&mut seed)?;
        Ok(format!("{SIGNING_KEY_PREFIX}{}", B64.encode(seed)))
    }

    /// `whpk_<base64 of the 32-byte public key>`, what receivers verify with.
    pub fn public_key(&self) -> String {
        use ring::signature::KeyPair;
        format!("{PUBLIC_KEY_PREFIX}{}", B64.encode(self.pair.public_key()))
    }

    /// One signature, `v1a,<base64>`, over `msg_id.timestamp.body` (the same content as `v1`).
    pub fn sign(&self, msg_id: &str, timestamp: i64, body: &[u8]) -> String {
        let mut content = Vec::with_capacity(msg_id.len() + body.len() + 24);
        content.extend_from_slice(msg_id.as_bytes());
        content.push(b'.');
        content.extend_from_slice(timestamp.to_string().as_bytes());
        content.push(b'.');
        content.extend_from_slice(body);
        format!("v1a,{}", B64.encode(self.pair.sign(&content)))
    }
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
        let header = signatures_header(
            &[new.clone(), old.clone()],
            &[],
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
    fn ed25519_keys_sign_what_their_public_key_verifies() {
        use ring::signature::{UnparsedPublicKey, ED25519};
        let text = SigningKey::generate().unwrap();
        assert!(text.starts_with("whsk_"));
        let key = SigningKey::decode(&text).unwrap();
        let public = key.public_key();
        let raw = B64.decode(public.strip_prefix("whpk_").unwrap()).unwrap();
        assert_eq!(raw.len(), 32);
        let sig = key.sign(MSG_ID, TIMESTAMP, BODY.as_bytes());
        let sig = B64.decode(sig.strip_prefix("v1a,").unwrap()).unwrap();
        let content = format!("{MSG_ID}.{TIMESTAMP}.{BODY}");
        let verifier = UnparsedPublicKey::new(&ED25519, &raw);
        assert!(verifier.verify(content.as_bytes(), &sig).is_ok());
        assert!(verifier.verify(b"other", &sig).is_err());
        // The 64-byte form (seed, then public key) is the same key.
        let seed = B64.decode(text.strip_prefix("whsk_").unwrap()).unwrap();
        let long = format!("whsk_{}", B64.encode([seed.clone(), raw.clone()].concat()));
        assert_eq!(SigningKey::decode(&long).unwrap().public_key(), public);
        // Signatures are deterministic (RFC 8032), so the header is reproducible.
        let header = signatures_header(
            &[],
            &[std::sync::Arc::new(key)],
            MSG_ID,
            TIMESTAMP,
            BODY.as_bytes(),
        );
        assert!(header.starts_with("v1a,"));
        assert!(!header.contains(' '));
    }

    #[test]
    fn rfc8032_test_vector_1() {
        // RFC 8032, section 7.1, TEST 1: the empty message.
        let seed = [
            0x9d, 0x61, 0xb1, 0x9d, 0xef, 0xfd, 0x5a, 0x60, 0xba, 0x84, 0x4a, 0xf4, 0x92, 0xec,
            0x2c, 0xc4, 0x44, 0x49, 0xc5, 0x69, 0x7b, 0x32, 0x69, 0x19, 0x70, 0x3b, 0xac, 0x03,
            0x1c, 0xae, 0x7f, 0x60,
        ];
        let key = SigningKey::decode(&format!("whsk_{}", B64.encode(seed))).unwrap();
        assert_eq!(
            key.public_key(),
            format!(
                "whpk_{}",
                B64.encode([
                    0xd7, 0x5a, 0x98, 0x01, 0x82, 0xb1, 0x0a, 0xb7, 0xd5, 0x4b, 0xfe, 0xd3, 0xc9,
                    0x64, 0x07, 0x3a, 0x0e, 0xe1, 0x72, 0xf3, 0xda, 0xa6, 0x23, 0x25, 0xaf, 0x02,
                    0x1a, 0x68, 0xf7, 0x07, 0x51, 0x1a
                ])
            )
        );
    }

    #[test]
    fn bad_signing_keys_are_refused_with_reason_and_never_echoed() {
        assert_eq!(
            SigningKey::decode("whsec_AAAA").unwrap_err(),
            SigningKeyError::NoPrefix
        );
        assert_eq!(
            SigningKey::decode("whsk_not base64!").unwrap_err(),
            SigningKeyError::NotBase64
        );
        assert_eq!(
            SigningKey::decode(&format!("whsk_{}", B64.encode([1u8; 31]))).unwrap_err(),
            SigningKeyError::WrongLength(31)
        );
        assert_eq!(
            SigningKey::decode(&format!("whsk_{}", B64.encode([1u8; 64]))).unwrap_err(),
            SigningKeyError::Inconsistent
        );
        // Refused by length before anything is decoded.
        assert_eq!(
            SigningKey::decode(&format!("whsk_{}", "A".repeat(4_000_000))).unwrap_err(),
            SigningKeyError::WrongLength(3_000_000)
        );
        let key = SigningKey::decode(&SigningKey::generate().unwrap()).unwrap();
        assert!(format!("{key:?}").contains("whpk_"));
        assert!(!format!("{key:?}").contains("whsk_"));
    }

    #[test]
    fn secret_errors_never_echo_the_secret() {
        let secret = "whsec_SECRETVALUE!!";
        let msg = decode_secret(secret).unwrap_err().to_string();
        assert!(!msg.contains("SECRETVALUE"));
    }
}
