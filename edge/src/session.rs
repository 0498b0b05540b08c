//! Live sessions held by this edge.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use uuid::Uuid;

use cloudtap_schemas::CloseReason;

use crate::config::Backpressure;
use crate::tap::GapCounter;

/// One tunnel session: opened by `OpenTunnel`, attached on the tunnel port, ended
/// once with a reason.
#[derive(Debug)]
pub struct Session {
    pub id: Uuid,
    pub target: String,
    pub identity: String,
    pub cert_fingerprint: Option<String>,
    /// Id of the user token the session was opened with.
    pub user_token_id: String,
    pub backpressure: Backpressure,
    /// Id and expiry (unix seconds) of the current session token; renewals replace it.
    token: watch::Sender<(String, i64)>,
    close: watch::Sender<Option<(CloseReason, String)>>,
    pub attached: AtomicBool,
    /// notAfter (unix seconds) of the client certificate that attached; renewals are
    /// refused once it has passed.
    pub cert_not_after: std::sync::atomic::AtomicI64,
    pub gaps: Arc<GapCounter>,
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
    pub streams: AtomicU64,
    /// The session this one re-sends (`cloudtapctl replay`); empty otherwise.
    pub replay_of: String,
}

impl Session {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: Uuid,
        target: String,
        identity: String,
        cert_fingerprint: Option<String>,
        user_token_id: String,
        backpressure: Backpressure,
        token_id: String,
        expires_unix: i64,
    ) -> Self {
        Self {
            id,
            target,
            identity,
            cert_fingerprint,
            user_token_id,
            backpressure,
            token: watch::Sender::new((token_id, expires_unix)),
            close: watch::Sender::new(None),
            attached: AtomicBool::new(false),
            cert_not_after: std::sync::atomic::AtomicI64::new(i64::MAX),
            gaps: Arc::default(),
            bytes_up: AtomicU64::new(0),
            bytes_down: AtomicU64::new(0),
            streams: AtomicU64::new(0),
            replay_of: String::new(),
        }
    }

    pub fn renewed(&self, token_id: String, expires_unix: i64) {
        self.token.send_replace((token_id, expires_unix));
    }

    pub fn watch_token(&self) -> watch::Receiver<(String, i64)> {
        self.token.subscribe()
    }

    /// Asks the session to end; the first reason wins.
    pub fn request_close(&self, reason: CloseReason, detail: impl Into<String>) {
        let detail = detail.into();
        self.close.send_if_modified(|c| {
            if c.is_none() {
                *c = Some((reason, detail));
                true
            } else {
                false
            }
        });
    }

    pub fn watch_close(&self) -> watch::Receiver<Option<(CloseReason, String)>> {
        self.close.subscribe()
    }

    /// Does a token id name this session's user token or its current session token?
    pub fn uses_token(&self, jti: &str) -> bool {
        self.user_token_id == jti || self.token.borrow().0 == jti
    }

    pub fn add_bytes(&self, up: u64, down: u64) {
        self.bytes_up.fetch_add(up, Ordering::Relaxed);
        self.bytes_down.fetch_add(down, Ordering::Relaxed);
    }
}

/// Why a session could not be attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimError {
    /// Closed, revoked, or never attached in time.
    Gone,
    /// Already attached, or opened by another identity.
    Taken,
}

/// The registry of this edge's sessions.
#[derive(Debug, Default)]
pub struct Sessions {
    inner: Mutex<HashMap<Uuid, Arc<Session>>>,
}

impl Sessions {
    /// Adds a session unless the edge already holds `max`; the check and the insert
    /// happen under one lock, so concurrent opens cannot overshoot.
    pub fn insert_below(&self, s: Arc<Session>, max: usize) -> bool {
        let mut map = self.lock();
        if map.len() >= max {
            return false;
        }
        map.insert(s.id, s);
        true
    }

    /// Marks a pending session attached, under the registry lock, so a concurrent
    /// close or the never-attached cleanup either sees it attached (and lets its task
    /// write the closing record) or removed it first (and the attach fails).
    pub fn claim(&self, id: &Uuid, identity: &str) -> Result<Arc<Session>, ClaimError> {
        let map = self.lock();
        let s = map.get(id).ok_or(ClaimError::Gone)?;
        if s.identity != identity || s.attached.swap(true, Ordering::AcqRel) {
            return Err(ClaimError::Taken);
        }
        Ok(s.clone())
    }

    /// Forgets a session that never attached; false when it is attached (or gone).
    pub fn remove_if_unattached(&self, id: &Uuid) -> bool {
        let mut map = self.lock();
        match map.get(id) {
            Some(s) if !s.attached.load(Ordering::Acquire) => {
                map.remove(id);
                true
            }
            _ => false,
        }
    }

    pub fn get(&self, id: &Uuid) -> Option<Arc<Session>> {
        self.lock().get(id).cloned()
    }

    pub fn remove(&self, id: &Uuid) -> Option<Arc<Session>> {
        self.lock().remove(id)
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn all(&self) -> Vec<Arc<Session>> {
        self.lock().values().cloned().collect()
    }

    /// Sessions matching a session id or a target name.
    pub fn matching(&self, selector: &str) -> Vec<Arc<Session>> {
        let id = Uuid::parse_str(selector).ok();
        self.lock()
            .values()
            .filter(|s| Some(s.id) == id || s.target == selector)
            .cloned()
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Arc<Session>>> {
        self.inner.lock().expect("session registry poisoned")
    }
}
