//! Stage 1, record: finished attempts judged (`policy::judge`: delivered, retry or failed; the
//! circuit breaker; 410 Gone and auto-disable) and written in one transaction per batch: a row
//! each in `attempts`, the deliveries' new state, endpoint health, endpoints disabled.
//!
//! ```text
//! Finished (from the runtime) --judge--> RecordRows + Health + disable --> one transaction
//! ```

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pgrx::prelude::*;

use super::error::{transaction, WorkerError};
use super::queries as sql;
use super::session::{Session, LAGGING_WRITES_EVERY};
use crate::http::Finished;
use crate::ops::{self, OpsEvent};
use crate::policy::{self, Health};

impl Session {
    /// Records the unrecorded results in batches. A batch that fails is tried again row by row,
    /// so one bad row cannot hold up the rest; results that still fail stay for the next round
    /// (after three rounds they are given up: their deliveries stay `sending` until the lease
    /// expires and are then sent again). Returns the last failure.
    pub(super) fn record_all(&mut self) -> Result<(), WorkerError> {
        let results = std::mem::take(&mut self.unrecorded);
        let batch = self.settings.batch_size.max(1) as usize;
        let mut kept: Vec<Finished> = Vec::new();
        let mut failure = None;
        for (n, chunk) in results.chunks(batch).enumerate() {
            if let Err(e) = self.record(chunk) {
                if e.about_the_extension() {
                    // This chunk and the ones after it wait for the next round, uncounted
                    // (earlier chunks are recorded).
                    kept.extend_from_slice(&results[n * batch..]);
                    self.unrecorded = kept;
                    return Err(e);
                }
                warning!(
                    "webhook_ext worker: recording {} results failed, retrying one by one: {e}",
                    chunk.len()
                );
                for (i, one) in chunk.iter().enumerate() {
                    if let Err(e) = self.record(std::slice::from_ref(one)) {
                        if e.about_the_extension() {
                            // Not this result's fault: it and the rest wait, uncounted (the
                            // ones before it are recorded or already kept).
                            kept.extend_from_slice(&results[n * batch + i..]);
                            self.unrecorded = kept;
                            return Err(e);
                        }
                        let tries = self.record_failures.entry(one.delivery_id).or_insert(0);
                        *tries += 1;
                        if *tries < 3 {
                            kept.push(one.clone());
                        } else {
                            warning!(
                                "webhook_ext worker: giving up recording delivery {}: {e}",
                                one.delivery_id
                            );
                            self.record_failures.remove(&one.delivery_id);
                            self.in_flight.forget(one.delivery_id);
                        }
                    }
                }
                failure = Some(e);
            }
        }
        self.unrecorded = kept;
        failure.map_or(Ok(()), Err)
    }

    /// Writes one batch of results in one transaction: attempts, deliveries, endpoint health,
    /// and endpoints disabled by 410 Gone or by failing too long.
    fn record(&mut self, batch: &[Finished]) -> Result<(), WorkerError> {
        let mut rows = RecordRows::with_capacity(batch.len());
        // Changes go to copies, written back only once the transaction has committed.
        let mut health: HashMap<i32, Health> = unsaved(&self.health).into_iter().collect();
        let mut disable: Vec<(i32, String)> = Vec::new();
        let threshold = self.settings.breaker_threshold;
        let now = SystemTime::now();
        let (mut delivered, mut failed) = (0u64, 0u64);
        for f in batch {
            let Some(t) = self.in_flight.get(f.delivery_id) else {
                continue;
            };
            let jitter = fastrand::f64() * 2.0 - 1.0;
            let h = health
                .entry(t.endpoint_id)
                .or_insert_with(|| self.health.get(&t.endpoint_id).cloned().unwrap_or_default());
            let j = policy::judge(
                &f.outcome,
                f.error.as_deref(),
                f.attempt as u32,
                t.max_attempts as u32,
                &t.schedule,
                jitter,
                h,
                now,
                threshold,
                self.settings.auto_disable_after,
            );
            match j.status {
                "delivered" => delivered += 1,
                "failed" => failed += 1,
                _ => {}
            }
            if let Some(reason) = j.disable {
                disable.push((t.endpoint_id, reason));
            }
            let (status, delay, error) = (j.status, j.delay.as_millis() as i64, j.error);
            rows.push(f, t.endpoint_id, status, delay, error);
        }
        disable.sort_by_key(|(id, _)| *id);
        disable.dedup_by_key(|(id, _)| *id);
        // Operational events, sent once this batch is written: the breaker opened or closed,
        // an endpoint disabled.
        let closed = Health::default();
        let mut ops: Vec<(i32, OpsEvent)> = health
            .iter()
            .filter_map(|(id, h)| {
                let before = self.health.get(id).unwrap_or(&closed);
                if before.is_open(threshold) == h.is_open(threshold) {
                    return None;
                }
                // The endpoint's last error in this batch: looked up only for an event.
                let error = batch.iter().rev().find_map(|f| {
                    let t = self.in_flight.get(f.delivery_id)?;
                    (t.endpoint_id == *id)
                        .then_some(f.error.as_deref())
                        .flatten()
                });
                ops::breaker_change(before, h, threshold, error).map(|e| (*id, e))
            })
            .collect();
        ops.extend(disable.iter().map(|(id, reason)| {
            (
                *id,
                OpsEvent::Disabled {
                    reason: reason.clone(),
                },
            )
        }));
        ops.sort_by_key(|(id, _)| *id);
        // The breaker's state is written as it changes (a restarted worker goes on from it); the
        // counters and last-success times of a healthy endpoint at most once a second
        // (`flush_health`): under a held snapshot each write of an endpoint's row leaves a
        // version every later read walks.
        let breaker_changed = health.iter().any(|(id, h)| {
            h.dirty
                && !self
                    .health
                    .get(id)
                    .map_or(h.same_breaker(&Health::default()), |old| {
                        old.same_breaker(h)
                    })
        });
        let save = breaker_changed || self.health_saved_at.elapsed() >= LAGGING_WRITES_EVERY;
        let dirty = if save { unsaved(&health) } else { Vec::new() };
        let done_ids = rows.ids.clone();
        transaction(move || {
            rows.write()?;
            save_health(&dirty)?;
            if !disable.is_empty() {
                let (ids, reasons): (Vec<i32>, Vec<String>) = disable.into_iter().unzip();
                sql::DISABLE.run(&[ids.into(), reasons.into()])?;
            }
            Ok(())
        })?;
        if save {
            self.health_saved_at = Instant::now();
        }
        for (id, mut h) in health {
            if save {
                h.saved();
            }
            self.health.insert(id, h);
        }
        for id in done_ids {
            self.in_flight.forget(id);
            self.record_failures.remove(&id);
        }
        self.slot
            .attempts
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        self.slot.delivered.fetch_add(delivered, Ordering::Relaxed);
        self.slot.failed.fetch_add(failed, Ordering::Relaxed);
        self.ops_events(ops);
        Ok(())
    }
}

impl Session {
    /// Writes the endpoints' health that changed since it was last written (the counters and
    /// last-success times `record` leaves for later), in a transaction of its own.
    pub(super) fn flush_health(&mut self) -> Result<(), WorkerError> {
        let dirty = unsaved(&self.health);
        if !dirty.is_empty() {
            transaction(|| save_health(&dirty))?;
            for (id, _) in &dirty {
                if let Some(h) = self.health.get_mut(id) {
                    h.saved();
                }
            }
        }
        self.health_saved_at = Instant::now();
        Ok(())
    }

    /// How long until the health `record` left unwritten is due to be written; None if there is
    /// none.
    pub(super) fn health_due_in(&self) -> Option<Duration> {
        self.health
            .values()
            .any(|h| h.dirty)
            .then(|| LAGGING_WRITES_EVERY.saturating_sub(self.health_saved_at.elapsed()))
    }
}

/// The columns of one RECORD statement.
struct RecordRows {
    ids: Vec<i64>,
    attempts: Vec<i32>,
    statuses: Vec<String>,
    codes: Vec<Option<i32>>,
    errors: Vec<Option<String>>,
    bodies: Vec<Option<String>>,
    started: Vec<f64>,
    micros: Vec<i64>,
    delays: Vec<i64>,
    endpoints: Vec<i32>,
}

impl RecordRows {
    fn with_capacity(n: usize) -> RecordRows {
        RecordRows {
            ids: Vec::with_capacity(n),
            attempts: Vec::with_capacity(n),
            statuses: Vec::with_capacity(n),
            codes: Vec::with_capacity(n),
            errors: Vec::with_capacity(n),
            bodies: Vec::with_capacity(n),
            started: Vec::with_capacity(n),
            micros: Vec::with_capacity(n),
            delays: Vec::with_capacity(n),
            endpoints: Vec::with_capacity(n),
        }
    }

    fn push(
        &mut self,
        f: &Finished,
        endpoint_id: i32,
        status: &str,
        delay_ms: i64,
        error: Option<String>,
    ) {
        self.ids.push(f.delivery_id);
        self.attempts.push(f.attempt);
        self.statuses.push(status.to_string());
        self.codes.push(f.status_code().map(i32::from));
        // Text columns cannot hold NUL bytes.
        self.errors.push(error.map(|e| e.replace('\0', "")));
        self.bodies
            .push(f.response_body.as_ref().map(|b| b.replace('\0', "")));
        self.started.push(
            f.started_at
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64(),
        );
        self.micros.push(f.duration.as_micros() as i64);
        self.delays.push(delay_ms);
        self.endpoints.push(endpoint_id);
    }

    fn write(self) -> Result<(), WorkerError> {
        if self.ids.is_empty() {
            return Ok(());
        }
        sql::RECORD.run(&[
            self.ids.into(),
            self.attempts.into(),
            self.statuses.into(),
            self.codes.into(),
            self.errors.into(),
            self.bodies.into(),
            self.started.into(),
            self.micros.into(),
            self.delays.into(),
            self.endpoints.into(),
        ])?;
        Ok(())
    }
}

fn epoch(t: Option<SystemTime>) -> Option<f64> {
    t.map(|t| {
        t.duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64()
    })
}

pub(super) fn from_epoch(secs: Option<f64>) -> Option<SystemTime> {
    secs.filter(|s| s.is_finite() && *s >= 0.0)
        .map(|s| UNIX_EPOCH + Duration::from_secs_f64(s))
}

/// The endpoints whose health changed since it was last written.
fn unsaved(health: &HashMap<i32, Health>) -> Vec<(i32, Health)> {
    health
        .iter()
        .filter(|(_, h)| h.dirty)
        .map(|(id, h)| (*id, h.clone()))
        .collect()
}

fn save_health(dirty: &[(i32, Health)]) -> Result<(), WorkerError> {
    if dirty.is_empty() {
        return Ok(());
    }
    let ids: Vec<i32> = dirty.iter().map(|(id, _)| *id).collect();
    let failures: Vec<i32> = dirty
        .iter()
        .map(|(_, h)| h.consecutive_failures as i32)
        .collect();
    let since: Vec<Option<f64>> = dirty.iter().map(|(_, h)| epoch(h.failing_since)).collect();
    let ok: Vec<Option<f64>> = dirty
        .iter()
        .map(|(_, h)| epoch(h.last_success_at))
        .collect();
    let bad: Vec<Option<f64>> = dirty
        .iter()
        .map(|(_, h)| epoch(h.last_failure_at))
        .collect();
    let probe: Vec<Option<f64>> = dirty.iter().map(|(_, h)| epoch(h.next_probe_at)).collect();
    let delivered: Vec<i64> = dirty
        .iter()
        .map(|(_, h)| h.delivered_delta as i64)
        .collect();
    let failed: Vec<i64> = dirty.iter().map(|(_, h)| h.failed_delta as i64).collect();
    sql::SAVE_HEALTH.run(&[
        ids.into(),
        failures.into(),
        since.into(),
        ok.into(),
        bad.into(),
        probe.into(),
        delivered.into(),
        failed.into(),
    ])?;
    Ok(())
}

/// The circuit breaker's state of every endpoint, read when a session begins.
pub(super) fn load_health() -> Result<HashMap<i32, Health>, WorkerError> {
    let rows = sql::LOAD_HEALTH.rows(&[], |row| {
        Ok((
            row.get::<i32>(1)?.unwrap_or_default(),
            Health {
                consecutive_failures: row.get::<i32>(2)?.unwrap_or(0).max(0) as u32,
                failing_since: from_epoch(row.get(3)?),
                last_success_at: from_epoch(row.get(4)?),
                last_failure_at: from_epoch(row.get(5)?),
                next_probe_at: from_epoch(row.get(6)?),
                ..Health::default()
            },
        ))
    })?;
    Ok(rows.into_iter().collect())
}
