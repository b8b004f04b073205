//! What the sync task tells the rest of the agent about the link to central: connected or not,
//! when central was last heard from, whether the wall clock is trusted, where the site
//! certificate stands. A leaf: written by the sync driver, read by the API, health and metrics.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU16, AtomicU64, Ordering};

/// Where the site certificate and its renewal stand, for `/v1/health`.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CertStatus {
    /// End of the current certificate's validity (s since the epoch); `None` if unreadable.
    pub not_after: Option<i64>,
    /// When the certificate in use was installed by a renewal (ms since the epoch).
    pub renewed_at_ms: Option<i64>,
    /// Renewals completed since the agent started.
    pub renewals: u64,
    /// Why the last renewal attempt failed, until one succeeds.
    pub last_error: Option<String>,
}

/// Whether the agent is connected to central and when it last heard from it. Written by the sync
/// task, read by the API.
#[derive(Debug, Default)]
pub struct LinkState {
    connected: AtomicBool,
    /// Milliseconds since the epoch when central was last heard from; 0: never.
    last_heard_ms: AtomicI64,
    /// Why the wall clock is not trusted (no connection is attempted meanwhile); `None`: it is.
    clock_untrusted: Mutex<Option<String>>,
    certificate: Mutex<CertStatus>,
    /// Protocol version of the latest session (0: none yet).
    protocol_version: AtomicU16,
    /// The central address of the current or last attempt (empty: none yet).
    central_addr: Mutex<String>,
    /// Times the agent moved to another of central's addresses.
    address_switches: AtomicU64,
}

impl LinkState {
    /// `last_heard_ms`: the best earlier knowledge (the time of the last applied master batch).
    pub fn new(last_heard_ms: Option<i64>) -> Self {
        LinkState {
            connected: AtomicBool::new(false),
            last_heard_ms: AtomicI64::new(last_heard_ms.unwrap_or(0).max(0)),
            clock_untrusted: Mutex::new(None),
            certificate: Mutex::new(CertStatus::default()),
            protocol_version: AtomicU16::new(0),
            central_addr: Mutex::new(String::new()),
            address_switches: AtomicU64::new(0),
        }
    }

    pub fn set_central_addr(&self, addr: &str) {
        let mut a = self.central_addr.lock().unwrap_or_else(|e| e.into_inner());
        if *a != addr {
            *a = addr.to_string();
        }
    }

    /// The central address of the current or last attempt, `None` before the first.
    pub fn central_addr(&self) -> Option<String> {
        let a = self.central_addr.lock().unwrap_or_else(|e| e.into_inner());
        (!a.is_empty()).then(|| a.clone())
    }

    /// The agent moved to another of central's addresses.
    pub fn address_switched(&self) {
        self.address_switches.fetch_add(1, Ordering::Relaxed);
    }

    pub fn address_switches(&self) -> u64 {
        self.address_switches.load(Ordering::Relaxed)
    }

    pub fn set_protocol_version(&self, v: u16) {
        self.protocol_version.store(v, Ordering::Relaxed);
    }

    /// Protocol version of the latest session, `None` before the first.
    pub fn protocol_version(&self) -> Option<u16> {
        let v = self.protocol_version.load(Ordering::Relaxed);
        (v > 0).then_some(v)
    }

    /// Why the clock is not trusted, or `None`.
    pub fn clock_untrusted(&self) -> Option<String> {
        self.clock_untrusted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn set_clock_untrusted(&self, why: Option<String>) {
        *self
            .clock_untrusted
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = why;
    }

    pub fn certificate(&self) -> CertStatus {
        self.certificate
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn update_certificate(&self, f: impl FnOnce(&mut CertStatus)) {
        f(&mut self.certificate.lock().unwrap_or_else(|e| e.into_inner()));
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Sets the state and returns the previous one.
    pub fn set_connected(&self, up: bool) -> bool {
        self.connected.swap(up, Ordering::Relaxed)
    }

    /// Central was heard from at `at_ms` (never moves back).
    pub fn heard(&self, at_ms: i64) {
        self.last_heard_ms.fetch_max(at_ms, Ordering::Relaxed);
    }

    pub fn last_heard_ms(&self) -> Option<i64> {
        let v = self.last_heard_ms.load(Ordering::Relaxed);
        (v > 0).then_some(v)
    }

    /// Whole seconds since central was last heard from: 0 while connected, `None` if never.
    pub fn stale_secs(&self, now_ms: i64) -> Option<u64> {
        if self.is_connected() {
            return Some(0);
        }
        let last = self.last_heard_ms()?;
        Some(u64::try_from(now_ms.saturating_sub(last) / 1000).unwrap_or(0))
    }
}
