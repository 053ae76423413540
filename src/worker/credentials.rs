//! What signs and authenticates an endpoint's requests beyond its HMAC secret, kept decoded in
//! memory: ed25519 signing keys (decoding one costs a scalar multiplication, too much for every
//! request), by their text; and client certificates (mutual TLS), checked once per version of
//! their endpoint's row and read again (IDENTITIES) only when a claim sees that row changed.

use std::collections::HashMap;
use std::sync::Arc;

use super::queries as sql;
use crate::http::{ClientIdentity, IdentityError};
use crate::pg::spi::SpiError;
use crate::signing::{SigningKey, SigningKeyError};

/// Most decoded signing keys kept; past it they are all dropped and decoded again as needed.
const MAX_SIGNING_KEYS: usize = 4096;

#[derive(Default)]
pub(super) struct Credentials {
    signing_keys: HashMap<String, Result<Arc<SigningKey>, SigningKeyError>>,
    /// Per endpoint: the version (xmin) of the row it was read from, and the checked certificate.
    identities: HashMap<i32, (i64, Result<Arc<ClientIdentity>, IdentityError>)>,
}

impl Credentials {
    /// The decoded key of a `whsk_…` text.
    pub(super) fn signing_key(&mut self, text: &str) -> Result<Arc<SigningKey>, SigningKeyError> {
        if let Some(found) = self.signing_keys.get(text) {
            return found.clone();
        }
        if self.signing_keys.len() >= MAX_SIGNING_KEYS {
            self.signing_keys.clear();
        }
        let decoded = SigningKey::decode(text).map(Arc::new);
        self.signing_keys.insert(text.to_string(), decoded.clone());
        decoded
    }

    /// Reads the certificates of the endpoints (id, row version) whose copy in memory is missing
    /// or older; in the claim's transaction.
    pub(super) fn refresh_identities(
        &mut self,
        wanted: impl Iterator<Item = (i32, i64)>,
    ) -> Result<(), SpiError> {
        let mut stale: Vec<i32> = wanted
            .filter(|(id, version)| self.identities.get(id).is_none_or(|(v, _)| v != version))
            .map(|(id, _)| id)
            .collect();
        if stale.is_empty() {
            return Ok(());
        }
        stale.sort_unstable();
        stale.dedup();
        let rows = sql::IDENTITIES.rows(&[stale.clone().into()], |row| {
            Ok((
                row.get::<i32>(1)?.unwrap_or_default(),
                row.get::<i64>(2)?.unwrap_or_default(),
                row.get::<String>(3)?.unwrap_or_default(),
                row.get::<String>(4)?.unwrap_or_default(),
            ))
        })?;
        for id in stale {
            self.identities.remove(&id);
        }
        for (id, version, cert, key) in rows {
            self.identities
                .insert(id, (version, ClientIdentity::from_pem(&cert, &key)));
        }
        Ok(())
    }

    /// The endpoint's checked certificate, as last read: None when it has none (any more).
    pub(super) fn identity(
        &self,
        endpoint_id: i32,
    ) -> Option<Result<Arc<ClientIdentity>, IdentityError>> {
        self.identities
            .get(&endpoint_id)
            .map(|(_, checked)| checked.clone())
    }
}
