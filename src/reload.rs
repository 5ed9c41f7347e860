//! Policy hot reload: the policy file is re-read on SIGHUP and whenever its
//! contents change (polled, which also sees Kubernetes ConfigMap updates that
//! swap a symlink). A valid new policy takes effect for requests that start
//! afterwards; an invalid one is logged and the old policy stays in force.

use std::{path::PathBuf, sync::Arc, time::Duration};

use sha2::{Digest as _, Sha256};

use crate::{broker::Broker, policy::Policy};

/// How often the policy file is checked for changes.
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// What a check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// The file is as it was.
    Unchanged,
    /// A new policy is in force.
    Reloaded,
    /// The new file is invalid (or unreadable); the old policy stays. The message says why.
    Rejected(String),
}

/// Watches one policy file for one broker.
#[derive(Debug)]
pub struct PolicyWatcher {
    path: PathBuf,
    broker: Arc<Broker>,
    /// SHA-256 of the contents last looked at (valid or not).
    last: Option<[u8; 32]>,
}

impl PolicyWatcher {
    /// A watcher of `path`, whose current contents `broker` already enforces.
    pub fn new(path: PathBuf, broker: Arc<Broker>) -> Self {
        let last = std::fs::read(&path).ok().map(|bytes| Sha256::digest(bytes).into());
        Self { path, broker, last }
    }

    /// Re-reads the file; reloads when its contents changed, or always when `force`.
    pub fn check(&mut self, force: bool) -> ReloadOutcome {
        let name = self.path.display().to_string();
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) => return self.rejected(format!("{name}: cannot read: {e}")),
        };
        let hash: [u8; 32] = Sha256::digest(&bytes).into();
        if !force && self.last == Some(hash) {
            return ReloadOutcome::Unchanged;
        }
        self.last = Some(hash);
        let parsed = String::from_utf8(bytes)
            .map_err(|_| format!("{name}: not UTF-8 text"))
            .and_then(|text| Policy::parse(&text, &name).map_err(|e| e.to_string()));
        match parsed {
            Ok(policy) => {
                let rules = policy.rules.len();
                self.broker.replace_policy(policy);
                tracing::info!(file = %name, rules, "policy reloaded");
                ReloadOutcome::Reloaded
            }
            Err(problem) => self.rejected(problem),
        }
    }

    fn rejected(&self, problem: String) -> ReloadOutcome {
        tracing::error!("the new policy was rejected; the previous policy stays in force: {problem}");
        ReloadOutcome::Rejected(problem)
    }

    /// Checks every `poll` and on every SIGHUP (from `hangups`, registered
    /// at startup), forever.
    pub async fn run(mut self, poll: Duration, mut hangups: Option<tokio::signal::unix::Signal>) {
        let mut ticks = tokio::time::interval(poll);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let forced = tokio::select! {
                _ = ticks.tick() => false,
                Some(()) = async { match hangups.as_mut() { Some(s) => s.recv().await, None => std::future::pending().await } } => true,
            };
            if forced {
                tracing::info!("SIGHUP: reloading the policy");
            }
            self.check(forced);
        }
    }
}

/// Logs each SIGHUP from `hangups` when there is nothing to reload (no
/// policy file, or `dev`): the signal is handled, so it never kills the
/// broker.
pub async fn log_hangups(hangups: Option<tokio::signal::unix::Signal>) {
    let Some(mut hangups) = hangups else {
        return std::future::pending().await;
    };
    while hangups.recv().await.is_some() {
        tracing::info!("SIGHUP: nothing to reload (no [policy] file)");
    }
}
