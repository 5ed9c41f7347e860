//! The [`Minter`] over the apps: a full token minted with the app's
//! credentials (falling back to the standby key or a previous secret when
//! Box refuses them, with an alert), or a downscoped one exchanged from the
//! parent the cache hands it and refused unless Box restricted it as asked.

use std::{
    collections::BTreeMap,
    sync::{Arc, atomic::Ordering},
};

use futures_util::future::{BoxFuture, FutureExt as _};
use secrecy::SecretString;

use super::{App, apps::grant_of};
use crate::{
    boxapi::{
        DiagnosisKind, Downscope, IssuedToken,
        error::{Grant, diagnose, diagnose_exchange},
    },
    cache::{CachedToken, Minter, TokenKey, UpstreamError},
    clock::unix_seconds,
    keys::{self, Attempt, KeyState, Ring},
};

/// The apps by name; mints and exchanges tokens for the cache.
#[derive(Debug)]
pub(super) struct Apps {
    pub(super) by_name: BTreeMap<Arc<str>, Arc<App>>,
}

impl Apps {
    /// The app `key` names. Keys are built from resolved apps, so a miss is
    /// a bug, reported as the app's misconfiguration rather than a panic.
    fn of(&self, key: &TokenKey) -> Result<Arc<App>, UpstreamError> {
        self.by_name.get(&key.app).cloned().ok_or_else(|| {
            UpstreamError::new(
                key,
                DiagnosisKind::Misconfigured,
                format!("app {} is not configured", key.app),
            )
        })
    }
}

impl Minter for Apps {
    fn mint(&self, key: &TokenKey) -> BoxFuture<'static, Result<IssuedToken, UpstreamError>> {
        let app = self.of(key);
        let key = key.clone();
        async move { mint_full(&*app?, &key).await }.boxed()
    }

    fn exchange(
        &self,
        key: &TokenKey,
        parent: Arc<CachedToken>,
    ) -> BoxFuture<'static, Result<IssuedToken, UpstreamError>> {
        let app = self.of(key);
        let key = key.clone();
        async move {
            let app = app?;
            let Some(downscope) = &key.downscope else {
                return Err(UpstreamError::new(
                    &key,
                    DiagnosisKind::Misconfigured,
                    "a full token cannot be exchanged for itself (a bug)".to_owned(),
                ));
            };
            exchange(&app, &parent, &key, downscope).await
        }
        .boxed()
    }
}

pub(super) async fn mint_full(app: &App, key: &TokenKey) -> Result<IssuedToken, UpstreamError> {
    let ring = app.ring();
    let Some(first) = ring.primary() else {
        return Err(UpstreamError::new(
            key,
            DiagnosisKind::Misconfigured,
            format!(
                "app {} has no active signing key: activate one with the admin RPC",
                app.name
            ),
        ));
    };
    let mut used = first;
    let mut result = app.client.request_token(&used.credentials, &key.subject).await;
    if let Err(error) = &result {
        // One more try when Box refused the key or the secret: the key that is
        // active now (if a rotation raced this mint), else the standby; or the
        // previous secrets, in order.
        let (fallbacks, kind): (Vec<Attempt>, Fallback) = if keys::is_key_rejection(error) {
            let current = app.ring();
            if Arc::ptr_eq(&current, &ring) {
                (ring.standby().into_iter().collect(), Fallback::StandbyKey)
            } else {
                (current.primary().into_iter().collect(), Fallback::Rotated)
            }
        } else if keys::is_secret_rejection(error) {
            (ring.secret_fallbacks(), Fallback::PreviousSecret)
        } else {
            (Vec::new(), Fallback::Rotated)
        };
        let first_error = result.as_ref().err().map(ToString::to_string).unwrap_or_default();
        for attempt in fallbacks {
            let retried = app.client.request_token(&attempt.credentials, &key.subject).await;
            let again = retried.as_ref().is_err_and(keys::is_secret_rejection);
            used = attempt;
            result = retried;
            if result.is_ok() {
                alert_fallback(app, &ring, &used, kind, &first_error);
            }
            if !again {
                break;
            }
        }
    }
    let now = app.client.now();
    match result {
        Ok(token) => {
            if let Some(k) = &used.key {
                k.mark_used(now);
            }
            app.record(Ok(now));
            app.outcomes.mints_ok.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                app = %app.name,
                subject_type = key.subject.sub_type(),
                subject_id = %key.subject.id(),
                expires_at = unix_seconds(token.expires_at),
                box_request_id = token.request_id.as_deref().unwrap_or(""),
                "minted a Box token"
            );
            Ok(token)
        }
        Err(error) => {
            let grant = grant_of(&used.credentials);
            let diagnosis = diagnose(&error, &key.subject, &used.credentials.client_id, grant);
            // A user Box does not know (or will not tokenize) is the caller's
            // mistake, not the app failing: status shows only the latter. A
            // Client Credentials Grant's refusal of a user is ambiguous (the
            // app's access level or disabled user tokens read the same), so
            // it counts.
            if diagnosis.kind != DiagnosisKind::NotFound || grant == Grant::Ccg {
                app.record(Err((now, &diagnosis.message)));
            }
            app.outcomes.mints_failed.fetch_add(1, Ordering::Relaxed);
            // The one place an upstream failure is logged in full.
            tracing::warn!(
                app = %app.name,
                subject_type = key.subject.sub_type(),
                subject_id = %key.subject.id(),
                error = %error,
                "minting a Box token failed: {}",
                diagnosis.message
            );
            Err(UpstreamError {
                app: app.name.clone(),
                subject: key.subject.clone(),
                diagnosis,
                relayed: None,
            })
        }
    }
}

/// What a mint fell back to after Box refused its first credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fallback {
    /// The key activated while the mint was under way.
    Rotated,
    /// The standby key: Box no longer accepts the active one.
    StandbyKey,
    /// A previous client secret: Box no longer accepts the current one.
    PreviousSecret,
}

/// A mint succeeded only with a fallback: the operator must hear about it.
fn alert_fallback(app: &App, ring: &Ring, used: &Attempt, kind: Fallback, first_error: &str) {
    match kind {
        Fallback::Rotated => {}
        Fallback::StandbyKey => {
            app.standby_fallbacks.fetch_add(1, Ordering::Relaxed);
            let kid = |k: Option<&keys::KeyEntry>| k.and_then(|k| k.kid.clone()).unwrap_or_default();
            tracing::error!(
                alert = "standby_key_used",
                app = %app.name,
                active_kid = %kid(ring.key_in(KeyState::Active)),
                standby_kid = %kid(used.key.as_ref()),
                box_error = first_error,
                "ALERT: Box rejected the active signing key; the standby key minted this token. Check the app's public keys in the Box developer console, then activate a key Box accepts"
            );
        }
        Fallback::PreviousSecret => tracing::error!(
            alert = "previous_client_secret_used",
            app = %app.name,
            box_error = first_error,
            "ALERT: Box rejected the current client secret; a previous one minted this token. Check the secret in the Box developer console"
        ),
    }
}

/// Exchanges `parent` (the subject's cached full token) for a downscoped
/// one, and refuses Box's answer unless it is restricted as asked.
async fn exchange(
    app: &App,
    parent: &CachedToken,
    key: &TokenKey,
    downscope: &Downscope,
) -> Result<IssuedToken, UpstreamError> {
    let issued = match app
        .client
        .exchange(&parent.access_token, &downscope.scopes, downscope.target.as_ref())
        .await
    {
        Ok(issued) => issued,
        Err(error) => {
            let diagnosis = diagnose_exchange(&error, &key.subject, downscope.target.as_ref());
            tracing::warn!(
                app = %app.name,
                subject_type = key.subject.sub_type(),
                subject_id = %key.subject.id(),
                error = %error,
                "downscoping a Box token failed: {}",
                diagnosis.message
            );
            app.outcomes.exchanges_failed.fetch_add(1, Ordering::Relaxed);
            return Err(UpstreamError {
                app: app.name.clone(),
                subject: key.subject.clone(),
                diagnosis,
                relayed: None,
            });
        }
    };
    if let Some(problem) = restriction_problem(&issued.restricted_to, downscope) {
        // Never hand out a token broader than asked for; kill it at Box too.
        tracing::error!(app = %app.name, subject_id = %key.subject.id(), "refusing a downscoped token: {problem}");
        revoke_quietly(app, issued.access_token);
        app.outcomes.exchanges_failed.fetch_add(1, Ordering::Relaxed);
        return Err(UpstreamError::new(
            key,
            DiagnosisKind::Misconfigured,
            format!("refusing the downscoped token: {problem}"),
        ));
    }
    tracing::info!(
        app = %app.name,
        subject_type = key.subject.sub_type(),
        subject_id = %key.subject.id(),
        scopes = %downscope.scopes.join(" "),
        target = %downscope.target.as_ref().map_or_else(|| "(none)".to_owned(), ToString::to_string),
        expires_at = unix_seconds(issued.expires_at.min(parent.expires_at)),
        box_request_id = issued.request_id.as_deref().unwrap_or(""),
        "downscoped a Box token"
    );
    app.outcomes.exchanges_ok.fetch_add(1, Ordering::Relaxed);
    Ok(issued)
}

/// Why Box's `restricted_to` does not match the request, if it does not: a
/// requested target must be named, and no scope beyond those asked for may appear.
fn restriction_problem(restricted_to: &[crate::boxapi::Restriction], downscope: &Downscope) -> Option<String> {
    if let Some(extra) = restricted_to.iter().find(|r| !downscope.scopes.contains(&r.scope)) {
        return Some(format!("Box granted scope {:?}, which was not asked for", extra.scope));
    }
    let target = downscope.target.as_ref()?;
    let named = restricted_to.iter().any(|r| target.is_named_by(r));
    (!named).then(|| format!("Box's answer is not restricted to {target}"))
}

/// Revokes a token the broker will not hand out, in the background.
pub(super) fn revoke_quietly(app: &App, token: SecretString) {
    let client = app.client.clone();
    let credentials = app.credentials();
    let name = app.name.clone();
    tokio::spawn(async move {
        let Some(credentials) = credentials else {
            return;
        };
        if let Err(e) = client.revoke(&credentials, &token).await {
            tracing::warn!(app = %name, error = %e, "revoking a refused token failed");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boxapi::{BoxId, Restriction, Target};

    fn downscope(scopes: &[&str], target: Option<Target>) -> Downscope {
        Downscope {
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
            target,
        }
    }

    fn restriction(scope: &str, kind: &str, id: &str) -> Restriction {
        Restriction {
            scope: scope.to_owned(),
            object_type: kind.to_owned(),
            object_id: id.to_owned(),
        }
    }

    fn folder(id: &str) -> Option<Target> {
        BoxId::parse(id).ok().map(Target::Folder)
    }

    #[test]
    fn a_matching_restriction_is_accepted() {
        let d = downscope(&["item_preview"], folder("5"));
        assert_eq!(
            restriction_problem(&[restriction("item_preview", "folder", "5")], &d),
            None
        );
    }

    #[test]
    fn a_missing_target_restriction_is_refused() {
        let d = downscope(&["item_preview"], folder("5"));
        assert!(restriction_problem(&[], &d).is_some());
        assert!(restriction_problem(&[restriction("item_preview", "folder", "6")], &d).is_some());
        assert!(restriction_problem(&[restriction("item_preview", "file", "5")], &d).is_some());
    }

    #[test]
    fn an_unrequested_scope_is_refused() {
        let d = downscope(&["item_preview"], folder("5"));
        let r = [
            restriction("item_preview", "folder", "5"),
            restriction("item_delete", "folder", "5"),
        ];
        assert!(restriction_problem(&r, &d).is_some_and(|p| p.contains("item_delete")));
    }

    #[test]
    fn without_a_target_an_empty_restriction_is_fine() {
        assert_eq!(restriction_problem(&[], &downscope(&["root_readonly"], None)), None);
    }
}
