//! What signs, authenticates and routes an endpoint's requests beyond its HMAC secret and URL,
//! kept decoded in memory: forward proxies, by their text; ed25519 signing keys (decoding one costs a scalar multiplication, too much for every
//! request), by their text; and client certificates (mutual TLS), checked once per version of
//! their endpoint's row and read again (IDENTITIES) only when a claim sees that row changed.

use std::collections::HashMap;
use std::sync::Arc;

use super::queries as sql;
use crate::http::{
    ClientIdentity, IdentityError, OAuthClient, OAuthError, ProxyChoice, ProxyError, ProxyUrl,
};
use crate::pg::spi::SpiError;
use crate::signing::{SigningKey, SigningKeyError};

/// Most decoded signing keys (and proxies) kept; past it they are all dropped and decoded again
/// as needed.
const MAX_SIGNING_KEYS: usize = 4096;

#[derive(Default)]
pub(super) struct Credentials {
    signing_keys: HashMap<String, Result<Arc<SigningKey>, SigningKeyError>>,
    /// Per endpoint: the version (xmin) of the row it was read from, and the checked certificate.
    identities: HashMap<i32, (i64, Result<Arc<ClientIdentity>, IdentityError>)>,
    /// Endpoints' own proxies, by their column's text.
    proxies: HashMap<String, Result<ProxyChoice, ProxyError>>,
    /// OAuth2 client credentials, by their columns' text (token URL, id, secret, scope).
    oauth: HashMap<OAuthColumns, Result<Arc<OAuthClient>, OAuthError>>,
}

type OAuthColumns = (String, String, String, Option<String>);

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

    /// What an endpoint's `proxy` column says (checked once per text).
    pub(super) fn proxy(&mut self, column: Option<&str>) -> Result<ProxyChoice, ProxyError> {
        let Some(text) = column else {
            return Ok(ProxyChoice::Default);
        };
        if let Some(found) = self.proxies.get(text) {
            return found.clone();
        }
        if self.proxies.len() >= MAX_SIGNING_KEYS {
            self.proxies.clear();
        }
        let choice = ProxyUrl::choice(Some(text));
        self.proxies.insert(text.to_string(), choice.clone());
        choice
    }

    /// An endpoint's OAuth2 client credentials, checked (once per value).
    pub(super) fn oauth(&mut self, columns: &OAuthColumns) -> Result<Arc<OAuthClient>, OAuthError> {
        if let Some(found) = self.oauth.get(columns) {
            return found.clone();
        }
        if self.oauth.len() >= MAX_SIGNING_KEYS {
            self.oauth.clear();
        }
        let (url, id, secret, scope) = columns;
        let checked = OAuthClient::new(url, id, secret, scope.as_deref());
        self.oauth.insert(columns.clone(), checked.clone());
        checked
    }

    /// Reads the certificates of the claimed endpoints (id, row version when it has one) whose
    /// copy in memory is missing or older, and forgets those of endpoints that have none any
    /// more; in the claim's transaction.
    pub(super) fn refresh_identities(
        &mut self,
        claimed: impl Iterator<Item = (i32, Option<i64>)>,
    ) -> Result<(), SpiError> {
        let mut stale: Vec<i32> = Vec::new();
        for (id, version) in claimed {
            match version {
                None => {
                    self.identities.remove(&id);
                }
                Some(version) => {
                    if self.identities.get(&id).is_none_or(|(v, _)| *v != version) {
                        stale.push(id);
                    }
                }
            }
        }
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
