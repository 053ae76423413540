//! What signs, authenticates and routes an endpoint's requests beyond its HMAC secret and URL,
//! kept checked in memory: ed25519 signing keys (decoding one costs a scalar multiplication,
//! too much for every request), forward proxies and OAuth2 credentials, each by its columns'
//! text; and client certificates (mutual TLS), checked once per version of their endpoint's row
//! and read again (IDENTITIES) only when a claim sees that row changed.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;

use super::queries as sql;
use crate::http::{
    ClientIdentity, IdentityError, OAuthClient, OAuthError, ProxyChoice, ProxyError, ProxyUrl,
};
use crate::pg::spi::SpiError;
use crate::signing::{SigningKey, SigningKeyError};

/// Most values kept in each of the maps below.
const MAX_KEPT: usize = 4096;

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

/// The value kept for `key`, made by `make` the first time (every value is dropped once the map
/// holds MAX_KEPT, and made again as needed).
fn kept<Q, V>(map: &mut HashMap<Q::Owned, V>, key: &Q, make: impl FnOnce(&Q) -> V) -> V
where
    Q: ToOwned + Hash + Eq + ?Sized,
    Q::Owned: Hash + Eq + Borrow<Q>,
    V: Clone,
{
    if let Some(found) = map.get(key) {
        return found.clone();
    }
    if map.len() >= MAX_KEPT {
        map.clear();
    }
    let made = make(key);
    map.insert(key.to_owned(), made.clone());
    made
}

impl Credentials {
    /// The decoded key of a `whsk_…` text.
    pub(super) fn signing_key(&mut self, text: &str) -> Result<Arc<SigningKey>, SigningKeyError> {
        kept(&mut self.signing_keys, text, |t| {
            SigningKey::decode(t).map(Arc::new)
        })
    }

    /// What an endpoint's `proxy` column says.
    pub(super) fn proxy(&mut self, column: Option<&str>) -> Result<ProxyChoice, ProxyError> {
        match column {
            None => Ok(ProxyChoice::Default),
            Some(text) => kept(&mut self.proxies, text, |t| ProxyUrl::choice(Some(t))),
        }
    }

    /// An endpoint's OAuth2 client credentials, checked.
    pub(super) fn oauth(&mut self, columns: &OAuthColumns) -> Result<Arc<OAuthClient>, OAuthError> {
        kept(&mut self.oauth, columns, |(url, id, secret, scope)| {
            OAuthClient::new(url, id, secret, scope.as_deref())
        })
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
