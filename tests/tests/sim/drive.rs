//! Drives the product's session machines in the simulated fleet: frames from the simulated
//! network go into `AgentSession` / `CentralSession`, and their requests are carried out on the
//! real stores, as `agent/src/sync/session.rs` and `central/src/quic/session.rs` do. Nothing
//! here decides anything about a session: every rule is the machines'. What is simulated is
//! the I/O around them (network, disks, crashes) and the ERP (catalogue, ATP changes,
//! decisions, resends after a restore).

use std::time::Duration;

use outpost_agent::store as agent_store;
use outpost_central::store as central_store;
use outpost_protocol::session::agent::{
    Adopted, AgentEvent, AgentMarks, AgentRequest, AgentSession, AgentSessionConfig,
    AgentSessionError, ApplyMasterFailure, Rewound,
};
use outpost_protocol::session::central::{
    Begun, CentralEnd, CentralRequest, CentralSession, CentralSessionConfig, EndReason,
    IngestFailure, Refusal, SignRefused, StoreFailure,
};
use outpost_protocol::{
    AgentMsg, AtpRecord, CentralMsg, EventBody, FrameDecoder, FrameError, Heartbeat, LinePromise,
    MasterChange, PROTOCOL_VERSION, Pool, RefuseCode,
};
use rand::Rng;
use serde::de::DeserializeOwned;

use super::net::Conn;
use super::world::{EPOCH_MS, Sim};

/// Events in flight per session and per frame (small, so windows and batches matter).
const WINDOW: u64 = 16;
const BATCH: u64 = 4;
/// How long an order waits for central's answer to an allowance request (the product's
/// default top-up deadline).
const ASK_DEADLINE_MS: u64 = 300;
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
/// Most rounds of requests one pump carries out (a livelock fails instead of hanging).
const MAX_PUMP_ROUNDS: usize = 10_000;

fn decode<T: DeserializeOwned>(frame: &[u8]) -> Result<T, FrameError> {
    let mut d = FrameDecoder::new();
    d.push(frame);
    match d.poll_frame::<T>() {
        Ok(Some(m)) => Ok(m),
        Ok(None) => Err(FrameError::Truncated),
        Err(e) => Err(e),
    }
}

fn marks_of(m: &agent_store::Marks) -> AgentMarks {
    AgentMarks {
        last_seq: m.last_seq,
        acked_seq: m.acked_seq,
        master_rev: m.master_rev,
        retained_from_seq: m.retained_from_seq,
        central_incarnation: m.central_incarnation,
    }
}

impl Sim {
    pub(super) fn at(&self) -> std::time::Instant {
        self.base + Duration::from_millis(self.now)
    }

    pub(super) fn site_of(&self, conn: u64) -> Option<usize> {
        self.conns.get(&conn).map(|c| c.site)
    }

    // ----- agent side ---------------------------------------------------------------------

    /// A new connection and session when the agent is up, unconnected and due to try.
    pub(super) fn agent_connect(&mut self, site: usize) {
        let now = self.now;
        let a = &self.agents[site];
        if a.store.is_none() || a.conn.is_some() || now < a.next_attempt {
            return;
        }
        let Some(Ok(marks)) = a.store.as_ref().map(|s| s.marks()) else {
            return;
        };
        // The handshake needs both directions and a listening central.
        if !(a.faults.up_open(now) && a.faults.down_open(now) && self.central.store.is_some()) {
            let a = &mut self.agents[site];
            a.next_attempt = now + self.rng.random_range(200..=1_000);
            return;
        }
        let id = self.next_conn;
        self.next_conn += 1;
        self.stats.connections += 1;
        self.conns.insert(id, Conn::new(id, site, now));
        let cfg = AgentSessionConfig {
            site: self.agents[site].name.clone(),
            agent_version: "sim".into(),
            protocol_version: PROTOCOL_VERSION,
            window: WINDOW,
            max_batch: BATCH,
            welcome_timeout: Duration::from_secs(3),
            heartbeat_every: Some(HEARTBEAT_EVERY),
            renew_check_every: Duration::from_secs(3_600),
        };
        let session = AgentSession::new(cfg, marks_of(&marks), EPOCH_MS + now as i64, self.at());
        let a = &mut self.agents[site];
        a.conn = Some(id);
        a.session = Some(session);
        a.incarnation_changed = false;
    }

    /// Time and the outbox's growth, then whatever the session wants done.
    pub(super) async fn agent_tick(&mut self, site: usize) {
        let at = self.at();
        let a = &mut self.agents[site];
        let (Some(store), Some(s)) = (a.store.as_ref(), a.session.as_mut()) else {
            return;
        };
        if s.is_live()
            && let Ok(m) = store.marks()
        {
            s.handle_new_events(m.last_seq);
        }
        if s.poll_timeout().is_some_and(|t| t <= at) {
            s.handle_timeout(at);
        }
        self.pump_agent(site).await;
    }

    /// An allowance request from an order at `site`, if its session is live.
    pub(super) fn ask(&mut self, site: usize, sku: &str, qty: i64) {
        let at = self.at();
        if let Some(s) = self.agents[site].session.as_mut()
            && s.is_live()
            && s.handle_ask(
                at,
                Pool::atp(sku),
                qty,
                at + Duration::from_millis(ASK_DEADLINE_MS),
            )
            .is_some()
        {
            self.stats.asks += 1;
        }
    }

    pub(super) async fn agent_receive(&mut self, conn: u64, f: &[u8]) {
        let Some(site) = self.site_of(conn) else {
            return;
        };
        if self.agents[site].conn != Some(conn) {
            // An old connection's end was already closed by the agent.
            return;
        }
        let at = self.at();
        let Some(s) = self.agents[site].session.as_mut() else {
            return;
        };
        match decode::<CentralMsg>(f) {
            Ok(msg) => s.handle_message(at, msg),
            Err(e) => s.handle_read_error(e),
        }
        self.pump_agent(site).await;
    }

    /// Carries out the agent session's requests, sends its frames and ends it when it ends.
    async fn pump_agent(&mut self, site: usize) {
        for _ in 0..MAX_PUMP_ROUNDS {
            let (Some(conn), Some(mut s), Some(store)) = (
                self.agents[site].conn,
                self.agents[site].session.take(),
                self.agents[site].store.clone(),
            ) else {
                return;
            };
            while let Some(frame) = s.poll_transmit() {
                self.send_up(conn, frame);
            }
            while let Some(ev) = s.poll_event() {
                self.agent_event(site, ev);
            }
            if let Some(e) = s.poll_end() {
                self.agent_ended(site, e);
                self.close_agent_end(conn);
                return;
            }
            let Some(req) = s.poll_request() else {
                self.agents[site].session = Some(s);
                return;
            };
            self.agent_request(site, &store, &mut s, req).await;
            drop(store);
            if self.agents[site].disk.is_dead() {
                // The power went during the store call: the agent is gone with its session.
                self.stats.cuts_mid_commit += 1;
                self.crash_agent(site);
                return;
            }
            if self.agents[site].conn == Some(conn) {
                self.agents[site].session = Some(s);
            } else {
                return;
            }
        }
        self.problems.push(format!(
            "{}: the session did not settle",
            self.agents[site].name
        ));
    }

    async fn agent_request(
        &mut self,
        site: usize,
        store: &agent_store::Store,
        s: &mut AgentSession,
        req: AgentRequest,
    ) {
        let at = self.at();
        let at_ms = EPOCH_MS + self.now as i64;
        match req {
            AgentRequest::AdoptIncarnation {
                incarnation,
                master_from_rev,
                hello_last_seq,
            } => {
                let outcome = store
                    .adopt_central_incarnation(incarnation, master_from_rev, hello_last_seq)
                    .await
                    .map(|c| match c {
                        agent_store::IncarnationChange::Unchanged => Adopted::Unchanged,
                        agent_store::IncarnationChange::First => Adopted::First,
                        agent_store::IncarnationChange::Changed { .. } => Adopted::Changed,
                    })
                    .map_err(|e| StoreFailure(e.to_string()));
                self.agents[site].incarnation_changed = matches!(outcome, Ok(Adopted::Changed));
                match store.marks() {
                    Ok(m) => s.handle_incarnation_adopted(at, outcome, marks_of(&m)),
                    Err(e) => {
                        let e = StoreFailure(e.to_string());
                        s.handle_incarnation_adopted(at, Err(e), AgentMarks::default())
                    }
                }
            }
            AgentRequest::Rewind { to } => {
                let outcome = match store.rewind_acked(to).await {
                    Ok(from) => Ok(Rewound::From(from)),
                    Err(agent_store::WriteError::NotRetained { retained_from, .. }) => {
                        Ok(Rewound::NotRetained { retained_from })
                    }
                    Err(e) => Err(StoreFailure(e.to_string())),
                };
                let marks = store.marks().map(|m| marks_of(&m)).unwrap_or_default();
                s.handle_rewound(at, outcome, marks);
            }
            AgentRequest::PersistAck { through } => match store.mark_acked_at(through, at_ms).await
            {
                Ok(_) => s.handle_ack_persisted(through),
                Err(e) => s.handle_ack_persist_failed(through, e.to_string()),
            },
            AgentRequest::ApplyMaster(batch) => {
                let outcome = match store.apply_master_at(batch, at_ms).await {
                    Ok(_) => Ok(()),
                    Err(agent_store::WriteError::BadMasterBatch(r)) => {
                        Err(ApplyMasterFailure::BadBatch(r))
                    }
                    Err(e) => Err(ApplyMasterFailure::Store(StoreFailure(e.to_string()))),
                };
                s.handle_master_applied(outcome);
            }
            AgentRequest::ReadOutbox(range) => {
                s.handle_outbox(
                    store
                        .outbox_range(range)
                        .map_err(|e| StoreFailure(e.to_string())),
                );
            }
            AgentRequest::SampleHeartbeat => {
                let hb = store.marks().ok().map(|m| Heartbeat {
                    agent_time_ms: at_ms,
                    agent_version: "sim".into(),
                    uptime_secs: self.now / 1000,
                    process_cpu_pct: None,
                    process_rss_bytes: None,
                    host_cpu_pct: None,
                    host_mem_used_bytes: None,
                    host_mem_total_bytes: None,
                    disk_free_bytes: None,
                    disk_total_bytes: None,
                    store_file_bytes: None,
                    outbox_events: m.outbox_depth(),
                    outbox_bytes: 0,
                    oldest_unsynced_ms: None,
                    master_rev: m.master_rev,
                    master_applied_ms: None,
                    api_requests: 0,
                    api_errors: 0,
                });
                s.handle_heartbeat(hb);
            }
            // The simulation runs no certificate renewals.
            AgentRequest::CheckRenewal => s.handle_renewal_request(None),
        }
    }

    fn agent_event(&mut self, site: usize, ev: AgentEvent) {
        match ev {
            AgentEvent::AllowanceAnswered { .. } => self.stats.asks_answered += 1,
            AgentEvent::AllowanceLate { .. } => self.stats.asks_late += 1,
            AgentEvent::Rewound { from, to } => {
                self.stats.rewinds += 1;
                // Only a restored central may be behind what it acknowledged.
                if !self.agents[site].incarnation_changed {
                    self.stats.acks_forgotten += 1;
                    self.problems.push(format!(
                        "{}: central acknowledged through seq {from} and then lost seqs {}..={from} \
                         without being restored",
                        self.agents[site].name,
                        to + 1
                    ));
                }
            }
            _ => {}
        }
    }

    fn agent_ended(&mut self, site: usize, e: AgentSessionError) {
        let name = &self.agents[site].name;
        let expected = match &e {
            AgentSessionError::Refused(r) => {
                matches!(r.code, RefuseCode::Superseded | RefuseCode::Unavailable)
            }
            // A store that lost power under the session, a lost Welcome, a dead link.
            AgentSessionError::Store(_)
            | AgentSessionError::AckPersist { .. }
            | AgentSessionError::WelcomeTimeout
            | AgentSessionError::Frame(_) => true,
            _ => false,
        };
        if !expected {
            self.problems.push(format!("{name}: session ended: {e}"));
        }
    }

    // ----- central side -------------------------------------------------------------------

    pub(super) async fn central_receive(&mut self, conn: u64, f: &[u8]) {
        let Some(site) = self.site_of(conn) else {
            return;
        };
        if self.central.store.is_none() {
            return;
        }
        let at = self.at();
        let mut s = match self.central.sessions.remove(&conn) {
            Some(s) => s,
            None => {
                let mut s = CentralSession::new(
                    CentralSessionConfig {
                        site: self.agents[site].name.clone(),
                        protocol_version: PROTOCOL_VERSION,
                        central_version: "sim".into(),
                        hello_timeout: Duration::from_secs(10),
                    },
                    at,
                );
                if self.cfg.ack_before_commit {
                    s.break_ack_before_commit();
                }
                s
            }
        };
        match decode::<AgentMsg>(f) {
            Ok(msg) => s.handle_message(msg),
            Err(e) => s.handle_read_error(e),
        }
        self.central.sessions.insert(conn, s);
        self.pump_central(conn).await;
    }

    /// Every session learns central's revision and the time, then runs.
    pub(super) async fn central_tick(&mut self) {
        let Some(store) = self.central.store.clone() else {
            return;
        };
        let Ok(rev) = store.revision() else { return };
        let at = self.at();
        let conns: Vec<u64> = self.central.sessions.keys().copied().collect();
        for conn in conns {
            if let Some(s) = self.central.sessions.get_mut(&conn) {
                if s.is_live() {
                    s.handle_revision(rev);
                }
                if s.poll_timeout().is_some_and(|t| t <= at) {
                    s.handle_timeout(at);
                }
            }
            self.pump_central(conn).await;
            if self.central.store.is_none() {
                return;
            }
        }
    }

    /// Carries out central's session requests and sends its frames. Frames go out before each
    /// request is carried out, so an Ack the machine queued before its commit (the broken
    /// variant) really leaves before it.
    async fn pump_central(&mut self, conn: u64) {
        for _ in 0..MAX_PUMP_ROUNDS {
            let Some(store) = self.central.store.clone() else {
                return;
            };
            let Some(mut s) = self.central.sessions.remove(&conn) else {
                return;
            };
            while let Some(frame) = s.poll_transmit() {
                self.send_down(conn, frame);
            }
            while s.poll_event().is_some() {}
            if let Some(end) = s.poll_end() {
                if let CentralEnd::Refused(r) = &end
                    && !matches!(r.code, RefuseCode::Superseded | RefuseCode::Unavailable)
                {
                    let name = self.site_of(conn).map(|i| self.agents[i].name.clone());
                    self.problems.push(format!(
                        "central refused {name:?}: {:?} {}",
                        r.code, r.reason
                    ));
                }
                self.close_central_end(conn);
                return;
            }
            let Some(req) = s.poll_request() else {
                self.central.sessions.insert(conn, s);
                return;
            };
            let died = self.central_request(conn, &store, &mut s, req).await;
            drop(store);
            if died || self.central_died() {
                return;
            }
            self.central.sessions.insert(conn, s);
        }
        self.problems
            .push("central: a session did not settle".to_string());
    }

    /// Returns whether central died (a crash the simulation injected between two steps).
    async fn central_request(
        &mut self,
        conn: u64,
        store: &central_store::Store,
        s: &mut CentralSession,
        req: CentralRequest,
    ) -> bool {
        let Some(site) = self.site_of(conn) else {
            return false;
        };
        let name = self.agents[site].name.clone();
        match req {
            CentralRequest::Admit => {
                let refusal = match store.revoked_site(&name) {
                    Ok(Some(r)) => Some(Refusal::Revoked {
                        at: r.at_ms.to_string(),
                        reason: r.reason,
                    }),
                    _ => None,
                };
                if refusal.is_none()
                    && let Some(old) = self.central.live.insert(site, conn)
                    && old != conn
                {
                    // The registry: a newer connection supersedes the old one.
                    self.stats.superseded += 1;
                    if let Some(o) = self.central.sessions.get_mut(&old) {
                        o.handle_end(EndReason::Superseded);
                    }
                    Box::pin(self.pump_central(old)).await;
                    self.central.live.insert(site, conn);
                }
                s.handle_admission(refusal);
            }
            CentralRequest::Begin(hello) => {
                let start = store
                    .begin_session(&name, central_store::HelloMarks::from(&hello))
                    .await;
                let rev = store.revision();
                if self.central_died() {
                    return true;
                }
                s.handle_begun(match (start, rev) {
                    (Ok(start), Ok(central_rev)) => Ok(Begun {
                        acked_seq: start.acked_seq,
                        incarnation: start.incarnation,
                        master_from_rev: start.master_from_rev,
                        central_rev,
                    }),
                    (Err(e), _) => Err(StoreFailure(e.to_string())),
                    (_, Err(e)) => Err(StoreFailure(e.to_string())),
                });
            }
            CentralRequest::Ingest(batch) => {
                if self.cfg.ack_before_commit && self.rng.random_bool(0.05) {
                    // The broken variant's Ack is out; central dies before the commit.
                    self.stats.crashes_before_ack += 1;
                    self.crash_central();
                    return true;
                }
                let result = store.ingest(&name, batch).await;
                if self.central_died() {
                    return true;
                }
                if result.is_ok() && self.rng.random_bool(0.01) {
                    // Committed, killed before the Ack left.
                    self.stats.crashes_before_ack += 1;
                    self.crash_central();
                    return true;
                }
                s.handle_ingested(match result {
                    Ok(out) => Ok(out.new_hwm),
                    Err(central_store::IngestBatchError::Plan(e)) => Err(IngestFailure::Plan(e)),
                    Err(central_store::IngestBatchError::Unavailable(e)) => {
                        Err(IngestFailure::Unavailable(e.to_string()))
                    }
                });
            }
            CentralRequest::Allowance { pool, qty } => {
                let a = store.allowance_request(&name, pool, qty).await;
                if self.central_died() {
                    return true;
                }
                match a {
                    Ok(a) => s.handle_allowance(a.granted, a.rev, a.reason),
                    Err(e) => s.handle_allowance(0, 0, e.to_string()),
                }
            }
            CentralRequest::ReadChanges { from, max } => {
                s.handle_changes(
                    store
                        .changes_after(from, max)
                        .map_err(|e| StoreFailure(e.to_string())),
                );
            }
            CentralRequest::Sign { .. } => s.handle_signed(Err(SignRefused(
                "the simulation signs no certificates".into(),
            ))),
            CentralRequest::RecordHeartbeat { .. } => self.stats.heartbeats += 1,
            CentralRequest::Touch => {}
        }
        false
    }

    // ----- the ERP and central's operators -------------------------------------------------

    /// What the ERP does this tick: lowers an ATP figure (so reclaims and returns happen),
    /// decides orders, and central's operators take a backup and, once, lose central's machine.
    pub(super) async fn erp(&mut self, step: u64) {
        let Some(store) = self.central.store.clone() else {
            return;
        };
        if self.cfg.restore {
            if step == self.cfg.steps / 4 && self.central.backup.is_none() {
                // The product's online backup, written to a real file and kept as bytes.
                let dir = tempfile::tempdir().expect("a temp dir");
                let path = dir.path().join("backup.redb");
                match store.backup_to(&path) {
                    Ok(_) => {
                        self.central.backup =
                            Some(std::fs::read(&path).expect("the backup is read back"));
                    }
                    Err(e) => {
                        if self.central_died() {
                            return;
                        }
                        self.problems.push(format!("central: backup failed: {e}"));
                    }
                }
            }
            if step == self.cfg.steps * 3 / 4 && self.central.backup.is_some() {
                self.stats.restores += 1;
                self.central.restore_pending = true;
                self.crash_central();
                return;
            }
        }
        if !self.erp_redecide.is_empty() {
            self.redecide(&store).await;
            if self.central_died() {
                return;
            }
        }
        if self.rng.random_bool(0.01) {
            self.lower_atp(&store).await;
        }
        if self.rng.random_bool(0.03) {
            self.decide_one(&store).await;
        }
        self.central_died();
    }

    /// The ERP's figure for (sku, site) now: the last it published, less the confirmed units it
    /// accepted since (a real ERP's ATP is net of the orders it accepted).
    fn erp_figure(&self, key: &(String, String)) -> i64 {
        (self.erp_atp[key] - self.erp_accepted.get(key).copied().unwrap_or(0)).max(0)
    }

    /// The ERP publishes a lower figure for one (sku, site): at most its figure now (net of what
    /// it accepted), and never below what central already holds as confirmed for it, so every
    /// unit confirmed stays within the first figure.
    async fn lower_atp(&mut self, store: &central_store::Store) {
        let keys: Vec<(String, String)> = self.erp_atp.keys().cloned().collect();
        let (sku, site) = keys[self.rng.random_range(0..keys.len())].clone();
        let Ok(events) = store.events_after(0, 1_000_000) else {
            return;
        };
        let mut confirmed = 0;
        for e in events.iter().filter(|e| e.site == site) {
            if let Ok(EventBody::Order(o)) = e.event.decode()
                && !self.rejected.contains(&(site.clone(), o.order_id.clone()))
            {
                confirmed += o
                    .lines
                    .iter()
                    .filter(|l| l.sku == sku && matches!(l.promise, LinePromise::Confirmed))
                    .map(|l| l.qty)
                    .sum::<i64>();
            }
        }
        let key = (sku.clone(), site.clone());
        let first = self.atp[&key];
        let room = first - confirmed;
        if room < 0 {
            return;
        }
        let available = self.rng.random_range(0..=room.min(self.erp_figure(&key)));
        let change = MasterChange::Atp(AtpRecord {
            sku: sku.clone(),
            site: site.clone(),
            available,
        });
        if store.upsert_master(vec![change]).await.is_ok() {
            self.erp_atp.insert(key.clone(), available);
            self.erp_accepted.remove(&key);
            self.stats.atp_lowered += 1;
        }
    }

    /// The ERP accepts or rejects one order in the feed that it has not decided yet.
    async fn decide_one(&mut self, store: &central_store::Store) {
        let Ok(events) = store.events_after(0, 1_000_000) else {
            return;
        };
        let orders: Vec<(String, outpost_protocol::Order)> = events
            .iter()
            .filter_map(|e| match e.event.decode() {
                Ok(EventBody::Order(o)) => Some((e.site.clone(), o)),
                _ => None,
            })
            .filter(|(site, o)| {
                !self
                    .erp_decided
                    .contains_key(&(site.clone(), o.order_id.clone()))
            })
            .collect();
        if orders.is_empty() {
            return;
        }
        let (site, order) = orders[self.rng.random_range(0..orders.len())].clone();
        let id = order.order_id.clone();
        let reject = self.rng.random_bool(0.3);
        let status = if reject {
            outpost_protocol::ErpStatus::Rejected
        } else {
            outpost_protocol::ErpStatus::Accepted
        };
        if store.decide_order(&id, status, None).await.is_ok() {
            self.erp_decided.insert((site.clone(), id.clone()), !reject);
            if reject {
                self.stats.erp_rejected += 1;
                self.rejected.insert((site, id));
            } else {
                self.stats.erp_accepted += 1;
                // The accepted units leave the ERP's ATP.
                for l in order
                    .lines
                    .iter()
                    .filter(|l| matches!(l.promise, LinePromise::Confirmed))
                {
                    *self
                        .erp_accepted
                        .entry((l.sku.clone(), site.clone()))
                        .or_insert(0) += l.qty;
                }
            }
        }
    }

    /// After a restore, decisions the ERP made (the restored central may predate some) are
    /// sent again once their orders are back at central; one already recorded is left alone.
    async fn redecide(&mut self, store: &central_store::Store) {
        let mut left = Vec::new();
        let mut pending = std::mem::take(&mut self.erp_redecide).into_iter();
        for (site, id) in pending.by_ref() {
            let status = if self.erp_decided[&(site.clone(), id.clone())] {
                outpost_protocol::ErpStatus::Accepted
            } else {
                outpost_protocol::ErpStatus::Rejected
            };
            match store.decide_order(&id, status, None).await {
                Ok(_) | Err(central_store::DecideError::AlreadyDecided(_)) => {}
                // Not back yet (or held as an exception, or central is busy): later.
                Err(_) => left.push((site, id)),
            }
            if self.central.disk.is_dead() {
                break;
            }
        }
        left.extend(pending);
        self.erp_redecide = left;
    }

    /// After a restore, the ERP sends again the ATP it publishes now (the backup may predate a
    /// lowered figure, and the restored central's ledger may lack what the ERP accepted since:
    /// each figure is net of that, as every figure the ERP sends), and then its decisions.
    pub(super) async fn erp_resend(&mut self) {
        let Some(store) = self.central.store.clone() else {
            return;
        };
        let figures: Vec<((String, String), i64)> = self
            .erp_atp
            .keys()
            .map(|k| (k.clone(), self.erp_figure(k)))
            .collect();
        let changes = figures
            .iter()
            .map(|((sku, site), available)| {
                MasterChange::Atp(AtpRecord {
                    sku: sku.clone(),
                    site: site.clone(),
                    available: *available,
                })
            })
            .collect();
        match store.upsert_master(changes).await {
            Ok(_) => {
                for (k, f) in figures {
                    self.erp_atp.insert(k.clone(), f);
                    self.erp_accepted.remove(&k);
                }
            }
            Err(e) => self.problems.push(format!(
                "central: the ERP's resend after the restore failed: {e}"
            )),
        }
        self.erp_redecide = self.erp_decided.keys().cloned().collect();
    }

    /// Central's store restored from the backup image with the product's restore (a new
    /// incarnation), when central's machine was lost; `None` otherwise.
    pub(super) fn restored_image(&mut self) -> Option<Vec<u8>> {
        if !self.central.restore_pending {
            return None;
        }
        let backup = self.central.backup.clone()?;
        let dir = tempfile::tempdir().expect("a temp dir");
        let from = dir.path().join("backup.redb");
        let to = dir.path().join("central.redb");
        std::fs::write(&from, &backup).expect("the backup image is written");
        match central_store::restore_store(&from, &to) {
            Ok(_) => Some(std::fs::read(&to).expect("the restored store is read")),
            Err(e) => {
                self.problems
                    .push(format!("central: the backup did not restore: {e}"));
                None
            }
        }
    }
}
