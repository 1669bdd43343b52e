//! Revocation: every live watch is authorized again when policy may have changed — a
//! reload's new `[policy]` ([`Service::set_policy`]), or polkitd's
//! `org.freedesktop.PolicyKit1.Authority.Changed` (its rules or actions changed) or a
//! new polkitd — through the same [`Service::authorize_watch`] as `AddWatch`. A watch no
//! longer allowed ends with `WatchRemoved(tag, "policy-changed")`, its queued events
//! withheld ([`crate::dispatch::Hub::revoke`]).
//!
//! Fails closed: polkitd unreachable, slow or failing is a refusal, so the watch ends
//! (the log says why). Paced: one connection's watches are checked one after another
//! (its answers are cached per action, so a connection costs polkitd at most one call
//! per action it uses), and at most [`CONCURRENT_CONNECTIONS`] connections at a time, so
//! thousands of watches never put more than that many calls in flight at polkitd.
//! Changes that arrive during a pass start a new epoch; the pass repeats until no watch
//! holds a grant from an older one.

use std::sync::Arc;

use futures_util::StreamExt;

use super::Service;
use crate::dispatch::StaleWatch;
use crate::policy::PolicyConfig;

/// Connections re-authorized at once: the bound on `CheckAuthorization` calls in flight.
pub const CONCURRENT_CONNECTIONS: usize = 8;

/// The reason a watch policy no longer allows ends with.
pub const REASON: &str = "policy-changed";

impl Service {
    /// Takes a reloaded `[policy]`: cached decisions dropped, live watches re-authorized.
    pub fn set_policy(&self, config: PolicyConfig) {
        let epoch = self.authorizer.set_config(config);
        tracing::info!(epoch, "policy reloaded: re-authorizing live watches");
        self.policy_changed.notify_one();
    }

    /// polkit may answer differently now: cached decisions dropped, live watches
    /// re-authorized.
    fn polkit_changed(&self, why: &str) {
        let epoch = self.authorizer.changed();
        tracing::info!(epoch, "{why}: re-authorizing live watches");
        self.policy_changed.notify_one();
    }

    /// Runs for the daemon's life: listens to polkitd and re-authorizes when woken.
    pub async fn reauthorize_on_changes(self: Arc<Self>) -> zbus::Result<()> {
        let polkit = zbus::Proxy::new(
            &self.conn,
            "org.freedesktop.PolicyKit1",
            "/org/freedesktop/PolicyKit1/Authority",
            "org.freedesktop.PolicyKit1.Authority",
        )
        .await?;
        // zbus delivers only signals whose sender is the name's current owner, so no
        // other connection can make the daemon drop its decisions.
        let mut changed = polkit.receive_signal("Changed").await?;
        let mut owners = polkit.receive_owner_changed().await?;
        let service = Arc::clone(&self);
        let listen = async move {
            loop {
                tokio::select! {
                    Some(_) = changed.next() => service.polkit_changed("polkit's rules or actions changed"),
                    Some(owner) = owners.next() => {
                        if owner.is_some() {
                            service.polkit_changed("polkitd started anew");
                        }
                    }
                    else => break,
                }
            }
        };
        let passes = async {
            loop {
                self.policy_changed.notified().await;
                self.reauthorize_all().await;
            }
        };
        tokio::select! {
            () = listen => Err(zbus::Error::Failure("polkit's signal streams ended".into())),
            () = passes => Ok(()),
        }
    }

    /// Re-authorizes every watch whose grant is from an older epoch, until none is.
    async fn reauthorize_all(&self) {
        loop {
            let epoch = self.authorizer.epoch();
            let stale = self.hub.stale_watches(epoch);
            if stale.is_empty() {
                return;
            }
            let mut groups: Vec<Vec<StaleWatch>> = Vec::new();
            for watch in stale {
                match groups.last_mut() {
                    Some(group) if group[0].identity.unique_name == watch.identity.unique_name => {
                        group.push(watch);
                    }
                    _ => groups.push(vec![watch]),
                }
            }
            let checked: usize = groups.iter().map(Vec::len).sum();
            let ended: usize = futures_util::stream::iter(groups)
                .map(|group| self.reauthorize_connection(group))
                .buffer_unordered(CONCURRENT_CONNECTIONS)
                .fold(0, |sum, ended| async move { sum + ended })
                .await;
            tracing::info!(
                epoch,
                checked,
                ended,
                "re-authorized {checked} watch(es): {} kept, {ended} ended",
                checked - ended
            );
        }
    }

    /// One connection's stale watches, one after another. Returns how many ended.
    async fn reauthorize_connection(&self, group: Vec<StaleWatch>) -> usize {
        let mut ended = 0;
        for watch in group {
            let decided = self
                .authorize_watch(&watch.identity, watch.source, watch.scope)
                .await;
            match decided {
                Ok(grant) => {
                    self.hub.regrant(&watch, grant);
                }
                // Removed or replaced meanwhile (NotFound): nothing of the old one is
                // left to end.
                Err(refused) => {
                    if let Ok(withheld) = self.hub.revoke(&watch, REASON).await {
                        ended += 1;
                        tracing::info!(
                            subscription = watch.subscription,
                            owner = %watch.identity.unique_name,
                            uid = watch.identity.uid,
                            tag = watch.tag,
                            withheld,
                            "watch {} ({} events) ended: {REASON}: {refused}",
                            watch.tag,
                            watch.source
                        );
                    }
                }
            }
        }
        ended
    }
}
