//! Stage 2, claim: due deliveries, as many as the limits allow, marked `sending` in one
//! transaction, then each built into a signed request (`Job`) and handed to the HTTP runtime. A
//! delivery that cannot be sent at all (unusable secret or headers) goes straight to the
//! finished results with the reason, so stage 1 records it like any other attempt.
//!
//! ```text
//! Claimed (a row of CLAIM) --dispatch--> Job (to the runtime) | Finished (refused, to record)
//! ```

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use pgrx::datum::DatumWithOid;

use super::credentials::Credentials;
use super::error::{transaction, WorkerError};
use super::inflight::Tracked;
use super::queries as sql;
use super::record::from_epoch;
use super::replicated_by;
use super::session::Session;
use crate::http::{Finished, Job};
use crate::pg::shmem;
use crate::pg::spi::{Row, SpiError};
use crate::policy::{self, ClaimRoom, Limits};
use crate::retry::{Outcome, Schedule};
use crate::split::Split;
use crate::{request, signing, trace};

/// How long a claimed delivery stays `sending` beyond its timeout before it is due again.
const LEASE_MARGIN_MS: i64 = 60_000;
/// Most bytes of request bodies the worker holds at once (claimed and under way); a claim
/// takes at least one delivery whenever nothing is under way.
const MAX_BYTES_IN_FLIGHT: i64 = 64 * 1024 * 1024;
/// Endpoints whose last attempt did not succeed (failing, hanging, or new) may hold at most this
/// share of webhook.max_in_flight, so the rest always has room for healthy endpoints.
const SUSPECT_SHARE_PERCENT: i32 = 90;

/// What the worker's own limits need from webhook.endpoints (POLICIES), read again only when a
/// transaction that changed that table has committed (`shmem::endpoints_version`).
pub struct Policies {
    pub version: u64,
    /// Endpoints with a rate limit, and the limit.
    rate_limits: Vec<(i32, i32)>,
    /// When each enabled endpoint was last changed (an operator's change resets the breaker).
    updated_at: HashMap<i32, SystemTime>,
}

impl Policies {
    fn load(version: u64, split: Split) -> Result<Policies, WorkerError> {
        let mut p = Policies {
            version,
            rate_limits: Vec::new(),
            updated_at: HashMap::new(),
        };
        for (id, rate, at) in
            sql::POLICIES.rows(&[split.parts.into(), split.part.into()], |row| {
                Ok((
                    row.get::<i32>(1)?.unwrap_or_default(),
                    row.get::<i32>(2)?,
                    from_epoch(row.get(3)?),
                ))
            })?
        {
            if let Some(rate) = rate {
                p.rate_limits.push((id, rate));
            }
            if let Some(at) = at {
                p.updated_at.insert(id, at);
            }
        }
        Ok(p)
    }
}

/// The worker's state as CLAIM and NEXT_DUE see it.
struct ClaimArgs {
    busy_ids: Vec<i32>,
    busy_counts: Vec<i32>,
    default_max_in_flight: i32,
    limits: Limits,
    room: ClaimRoom,
    split: Split,
    floor_ids: Vec<i32>,
    floor_passes: Vec<i64>,
    floors: Vec<i64>,
}

impl ClaimArgs {
    /// CLAIM's parameters, in order, and the limits they carried (NEXT_DUE uses them again).
    fn into_claim(
        self,
        limit: i32,
        default_timeout: i32,
        budget: i64,
        first: bool,
    ) -> (Vec<DatumWithOid<'static>>, Limits) {
        let (limit_ids, limit_counts): (Vec<i32>, Vec<i32>) =
            self.limits.allowed.iter().map(|(k, v)| (*k, *v)).unzip();
        let params = vec![
            self.busy_ids.into(),
            self.busy_counts.into(),
            self.default_max_in_flight.into(),
            limit.into(),
            default_timeout.into(),
            LEASE_MARGIN_MS.into(),
            limit_ids.into(),
            limit_counts.into(),
            self.room.healthy.into(),
            self.room.suspect_room.into(),
            budget.into(),
            first.into(),
            self.split.parts.into(),
            self.split.part.into(),
            self.floor_ids.into(),
            self.floors.into(),
            self.floor_passes.into(),
        ];
        (params, self.limits)
    }

    /// NEXT_DUE's parameters, in order.
    fn into_next_due(self) -> Vec<DatumWithOid<'static>> {
        let (limit_ids, limit_counts): (Vec<i32>, Vec<i32>) =
            self.limits.allowed.iter().map(|(k, v)| (*k, *v)).unzip();
        vec![
            self.busy_ids.into(),
            self.busy_counts.into(),
            self.default_max_in_flight.into(),
            limit_ids.into(),
            limit_counts.into(),
            self.room.healthy.into(),
            (self.room.suspect_room > 0).into(),
            self.split.parts.into(),
            self.split.part.into(),
            self.floor_ids.into(),
            self.floors.into(),
            self.floor_passes.into(),
        ]
    }
}

impl Session {
    /// Claims as much due work as capacity allows and starts it. Returns how long the loop may
    /// sleep: zero when more may be due right away, None when only a result or a commit can
    /// bring new work.
    pub(super) fn claim_and_send(&mut self) -> Result<Option<Duration>, WorkerError> {
        let room = self
            .settings
            .max_in_flight
            .saturating_sub(self.http().in_flight());
        if room == 0 {
            return Ok(None);
        }
        let nothing_in_flight = self.in_flight.is_empty();
        let byte_budget = if nothing_in_flight {
            MAX_BYTES_IN_FLIGHT
        } else {
            MAX_BYTES_IN_FLIGHT - self.in_flight.bytes()
        };
        if byte_budget <= 0 {
            return Ok(None);
        }
        let limit = room.min(self.settings.batch_size as usize) as i32;
        let default_timeout = self.settings.default_timeout_ms;
        // Read before the transaction's snapshot: a change committed after this is seen again.
        let version = shmem::endpoints_version();
        // Expired here too, not only before a wait (`rest()`): the claim that follows the wait
        // must read from the start.
        self.floors.lower_to(self.slot.take_floor_bound());
        self.floors.expire(Instant::now());
        // One transaction: what the worker must limit itself (endpoints re-read only after they
        // changed), then the claim.
        let claimed = transaction(|| {
            // In the claim's own transaction: replicated rows it could see were copied by a
            // subscription whose catalog rows were committed before them.
            if let Some(sub) = replicated_by()? {
                self.replicated_by = Some(sub);
                return Ok(None);
            }
            if self.policies.as_ref().is_none_or(|p| p.version != version) {
                self.policies = Some(Policies::load(version, self.split)?);
                // An endpoint made ordered (or not) since: its new deliveries change routing
                // passes, and a floor kept across that could lie above some (floors::Floors).
                self.floors.drop_all(Instant::now());
            }
            let (params, limits) = self.claim_args().into_claim(
                limit,
                default_timeout,
                byte_budget,
                nothing_in_flight,
            );
            let rows = sql::CLAIM.rows(&params, Claimed::from_row)?;
            self.credentials
                .refresh_identities(rows.iter().map(|c| (c.endpoint_id, c.identity_version)))?;
            Ok(Some((rows, limits)))
        })?;
        let Some((claimed, limits)) = claimed else {
            return Ok(None);
        };
        let full = claimed.len() as i32 >= limit;
        // A claim takes an endpoint's new deliveries in routing order: all of them up to the
        // last, but for those it picked and could not take (the floor stays below the first).
        for c in claimed.iter().filter(|c| c.attempts == 0) {
            self.floors.took(c.endpoint_id, (c.routing_pass, c.id));
        }
        for c in &claimed {
            if let Some(hole) = c.hole {
                self.floors.keep_below(c.endpoint_id, hole);
            }
        }
        let refresh = self.stats.claimed(claimed.len() as u64);
        let clock = Instant::now();
        for c in claimed {
            if let Some(bucket) = self.buckets.get_mut(&c.endpoint_id) {
                bucket.take(1, clock);
            }
            self.dispatch(c);
        }
        if refresh {
            // After the batch is on its way: its requests run while the statistics refresh.
            self.refresh_statistics();
        }
        if full {
            return Ok(Some(Duration::ZERO));
        }
        self.next_due(limits)
    }

    /// How long until the next delivery that the claim would take is due, or until a limited
    /// endpoint may start more. Busy counts changed with the claim; the limits stay those the
    /// claim used.
    fn next_due(&mut self, limits: Limits) -> Result<Option<Duration>, WorkerError> {
        let wake = limits.wake;
        let args = self.claim_args_with(limits);
        // The parameters are built inside the transaction: an array's type is a catalog lookup.
        let (next_ms, none_new, top) = transaction(|| {
            let row = sql::NEXT_DUE.rows(&args.into_next_due(), |row| {
                Ok((
                    row.get::<i64>(1)?,
                    row.get::<Vec<i32>>(2)?.unwrap_or_default(),
                    row.get::<i64>(3)?,
                ))
            })?;
            Ok(row.into_iter().next().unwrap_or((None, Vec::new(), None)))
        })?;
        if let Some(top) = top {
            for endpoint_id in none_new {
                self.floors.none_new_up_to(endpoint_id, top);
            }
        }
        let due = next_ms.map(|ms| Duration::from_millis(ms.max(0) as u64 + 1));
        Ok(match (due, wake) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        })
    }

    /// The worker's state for CLAIM, with the breaker's and rate limits applied now.
    fn claim_args(&mut self) -> ClaimArgs {
        let policies = self.policies.as_ref().expect("loaded before the claim");
        let limits = policy::limits(
            &mut self.health,
            self.in_flight.busy(),
            &policies.updated_at,
            &policies.rate_limits,
            &mut self.buckets,
            self.settings.breaker_threshold,
            SystemTime::now(),
            Instant::now(),
        );
        self.claim_args_with(limits)
    }

    fn claim_args_with(&self, limits: Limits) -> ClaimArgs {
        let (busy_ids, busy_counts) = self.in_flight.busy().iter().map(|(k, v)| (*k, *v)).unzip();
        let (floor_ids, floor_passes, floors) = self.floors.arrays();
        ClaimArgs {
            floor_ids,
            floor_passes,
            floors,
            busy_ids,
            busy_counts,
            default_max_in_flight: self.settings.default_max_in_flight,
            room: policy::claim_room(
                &self.health,
                self.in_flight.busy(),
                self.settings.max_in_flight,
                SUSPECT_SHARE_PERCENT,
            ),
            limits,
            split: self.split,
        }
    }

    /// Tracks one claimed delivery and hands its request to the runtime, or its refusal to the
    /// results.
    fn dispatch(&mut self, c: Claimed) {
        let schedule = self.schedule(c.retry_schedule.as_deref());
        let max_attempts = c.max_attempts.unwrap_or(self.settings.default_max_attempts);
        self.in_flight.add(
            c.id,
            Tracked {
                endpoint_id: c.endpoint_id,
                bytes: c.size,
                max_attempts,
                schedule,
            },
        );
        let attempt = c.attempts + 1;
        let (delivery_id, endpoint_id) = (c.id, c.endpoint_id);
        match c.job(attempt, &mut self.credentials) {
            Ok(job) => self.http().submit(job),
            Err(unsendable) => self.http().push_finished(Finished {
                delivery_id,
                endpoint_id,
                attempt,
                started_at: SystemTime::now(),
                duration: Duration::ZERO,
                outcome: Outcome::Refused,
                response_body: None,
                error: Some(unsendable.to_string()),
            }),
        }
    }

    /// An endpoint's own retry schedule (parsed once), or the default.
    fn schedule(&mut self, text: Option<&str>) -> Arc<Schedule> {
        let default = &self.settings.schedule;
        match text {
            None => default.clone(),
            Some(text) => self
                .schedules
                .entry(text.to_string())
                .or_insert_with(|| {
                    Arc::new(Schedule::parse(text).unwrap_or_else(|_| (**default).clone()))
                })
                .clone(),
        }
    }
}

/// Why a claimed delivery cannot be sent at all: recorded as its attempt's error.
enum Unsendable {
    Secret(signing::SecretError),
    PreviousSecret(signing::SecretError),
    SigningKey(signing::SigningKeyError),
    PreviousSigningKey(signing::SigningKeyError),
    Identity(crate::http::IdentityError),
    Proxy(crate::http::ProxyError),
    OAuth(crate::http::OAuthError),
    Headers(request::HeaderError),
}

impl std::fmt::Display for Unsendable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unsendable::Secret(e) => write!(f, "endpoint {e}"),
            Unsendable::PreviousSecret(e) => write!(f, "endpoint previous {e}"),
            Unsendable::SigningKey(e) => write!(f, "endpoint {e}"),
            Unsendable::PreviousSigningKey(e) => write!(f, "endpoint previous {e}"),
            Unsendable::Identity(e) => write!(f, "endpoint client certificate: {e}"),
            Unsendable::Proxy(e) => write!(f, "endpoint {e}"),
            Unsendable::OAuth(e) => write!(f, "endpoint OAuth2 credentials: {e}"),
            Unsendable::Headers(e) => write!(f, "endpoint headers: {e}"),
        }
    }
}

/// One row of CLAIM.
struct Claimed {
    id: i64,
    endpoint_id: i32,
    attempts: i32,
    event_type: String,
    created_at_us: i64,
    payload: Option<String>,
    url: String,
    secret: String,
    previous_secret: Option<String>,
    headers: String,
    timeout_ms: i64,
    max_attempts: Option<i32>,
    retry_schedule: Option<String>,
    /// A row change (None for a send() event).
    change: Option<RowChange>,
    /// The body's size, as the claim counted it against its byte budget.
    size: i64,
    /// The install id in force (part of the webhook-id).
    install_id: String,
    /// The delivery's routing pass (0 but for an ordered endpoint's: `floors::Place`).
    routing_pass: i64,
    /// The W3C `traceparent` its event was written with, sent as that header.
    traceparent: Option<String>,
    /// How the endpoint signs: 'hmac', 'ed25519' or 'both'.
    signing: String,
    signing_key: Option<String>,
    /// The signing key before a rotation, while its grace period runs.
    previous_signing_key: Option<String>,
    /// The version of the endpoint's row, when it has a client certificate (`Credentials`).
    identity_version: Option<i64>,
    /// The endpoint's forward proxy: NULL (webhook.proxy), `direct`, or a proxy URL.
    proxy: Option<String>,
    /// OAuth2 client credentials: token URL, client id, client secret, scope.
    oauth: Option<(String, String, String, Option<String>)>,
    /// The endpoint's first new delivery (routing pass, id) the claim picked but did not take.
    hole: Option<(i64, i64)>,
}

struct RowChange {
    schema: String,
    table: String,
    op: String,
    new: Option<String>,
    old: Option<String>,
    txid: i64,
}

impl Claimed {
    fn from_row(row: &Row) -> Result<Claimed, SpiError> {
        Ok(Claimed {
            id: row.get(1)?.unwrap_or_default(),
            endpoint_id: row.get(2)?.unwrap_or_default(),
            attempts: row.get(3)?.unwrap_or_default(),
            event_type: row.get(4)?.unwrap_or_default(),
            created_at_us: row.get(5)?.unwrap_or_default(),
            payload: row.get(6)?,
            url: row.get(7)?.unwrap_or_default(),
            secret: row.get(8)?.unwrap_or_default(),
            previous_secret: row.get(9)?,
            headers: row.get(10)?.unwrap_or_else(|| "{}".into()),
            timeout_ms: row.get(11)?.unwrap_or(15_000),
            max_attempts: row.get(12)?,
            retry_schedule: row.get(13)?,
            change: match row.get::<String>(16)? {
                None => None,
                Some(op) => Some(RowChange {
                    schema: row.get(14)?.unwrap_or_default(),
                    table: row.get(15)?.unwrap_or_default(),
                    op,
                    new: row.get(17)?,
                    old: row.get(18)?,
                    txid: row.get(19)?.unwrap_or_default(),
                }),
            },
            size: row.get::<i32>(20)?.map_or(0, i64::from),
            install_id: row.get(21)?.unwrap_or_default(),
            routing_pass: row.get(22)?.unwrap_or_default(),
            traceparent: row.get(23)?,
            signing: row.get(24)?.unwrap_or_else(|| "hmac".into()),
            signing_key: row.get(25)?,
            previous_signing_key: row.get(26)?,
            identity_version: row.get(27)?,
            proxy: row.get(28)?,
            oauth: match (row.get(29)?, row.get(30)?, row.get(31)?) {
                (Some(url), Some(id), Some(secret)) => Some((url, id, secret, row.get(32)?)),
                _ => None,
            },
            hole: match (row.get(33)?, row.get(34)?) {
                (Some(pass), Some(id)) => Some((pass, id)),
                _ => None,
            },
        })
    }

    /// The request body, built from the stored event the same way on every attempt.
    fn body(&self) -> String {
        match &self.change {
            None => request::envelope(
                &self.event_type,
                self.created_at_us,
                self.payload.as_deref().unwrap_or("null"),
            ),
            Some(c) => {
                let data = request::row_change_data(
                    &c.schema,
                    &c.table,
                    &c.op,
                    c.new.as_deref(),
                    c.old.as_deref(),
                    c.txid,
                );
                request::envelope(&self.event_type, self.created_at_us, &data)
            }
        }
    }

    /// The signed request for this attempt, or why it cannot be sent.
    fn job(mut self, attempt: i32, credentials: &mut Credentials) -> Result<Job, Unsendable> {
        let (hmac, ed25519) = match self.signing.as_str() {
            "ed25519" => (false, true),
            "both" => (true, true),
            _ => (true, false),
        };
        let mut keys = Vec::new();
        if hmac {
            keys.push(signing::decode_secret(&self.secret).map_err(Unsendable::Secret)?);
            if let Some(prev) = &self.previous_secret {
                keys.push(signing::decode_secret(prev).map_err(Unsendable::PreviousSecret)?);
            }
        }
        let mut signing_keys = Vec::new();
        if ed25519 {
            // The table's CHECK requires a key; a missing one reads as an empty, refused key.
            let key = self.signing_key.as_deref().unwrap_or_default();
            signing_keys.push(
                credentials
                    .signing_key(key)
                    .map_err(Unsendable::SigningKey)?,
            );
            if let Some(prev) = &self.previous_signing_key {
                signing_keys.push(
                    credentials
                        .signing_key(prev)
                        .map_err(Unsendable::PreviousSigningKey)?,
                );
            }
        }
        let identity = match self.identity_version {
            None => None,
            Some(_) => credentials
                .identity(self.endpoint_id)
                .transpose()
                .map_err(Unsendable::Identity)?,
        };
        let proxy = credentials
            .proxy(self.proxy.as_deref())
            .map_err(Unsendable::Proxy)?;
        let oauth = match &self.oauth {
            None => None,
            Some(c) => Some(credentials.oauth(c).map_err(Unsendable::OAuth)?),
        };
        let mut headers = request::parse_headers(&self.headers).map_err(Unsendable::Headers)?;
        // Checked again: the column is the table's, which an administrator may write by hand.
        if let Some(tp) = self.traceparent.take().and_then(|t| trace::parse(&t).ok()) {
            request::set_traceparent(&mut headers, &tp);
        }
        Ok(Job {
            delivery_id: self.id,
            endpoint_id: self.endpoint_id,
            attempt,
            msg_id: request::message_id(&self.install_id, self.id),
            body: self.body(),
            url: self.url,
            keys,
            signing_keys,
            identity,
            proxy,
            oauth,
            headers,
            timeout: Duration::from_millis(self.timeout_ms.clamp(1, 3_600_000) as u64),
        })
    }
}
