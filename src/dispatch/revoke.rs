//! Live watches that a reload or a policy change ends.
//!
//! Re-authorization: which live watches hold a grant from an older policy epoch
//! ([`crate::policy::Authorizer::epoch`]), and what becomes of each once policy answered
//! again — a fresh grant, or the end of the watch. A watch that ends so is taken out
//! under the hub's lock, so no event published after the decision reaches it; the events
//! of it still queued in the outbox are withheld (each becomes a `Lost` with reason
//! `policy-changed`, keeping the numbering contiguous), and `WatchRemoved(tag, reason)`
//! follows them.
//!
//! Lowered limits, when the administrator asks for them to be enforced
//! (`limits.trim_on_reload`): the watches over them end, the most recently added first;
//! their queued events were allowed and are delivered before the `WatchRemoved`.

use std::collections::HashMap;

use crate::error::Error;
use crate::policy::{Grant, Identity, Scope};

use super::{finish_stopping, Delivery, Hub};

/// A live watch whose grant is from before the current policy epoch.
#[derive(Clone, Debug)]
pub struct StaleWatch {
    pub subscription: u64,
    pub tag: u64,
    /// The subscriber, as it was identified when it subscribed.
    pub identity: Identity,
    pub source: &'static str,
    pub scope: Scope,
    /// The epoch of the grant it holds.
    pub epoch: u64,
}

impl Hub {
    /// Every live watch whose grant was decided before `epoch`, grouped by connection
    /// (so that one connection's checks can share polkit's cached answers).
    pub fn stale_watches(&self, epoch: u64) -> Vec<StaleWatch> {
        let state = self.lock();
        let mut stale: Vec<StaleWatch> = state
            .subscriptions
            .iter()
            .flat_map(|(id, sub)| {
                sub.watches
                    .iter()
                    .filter(|w| w.grant.epoch() < epoch)
                    .map(|w| StaleWatch {
                        subscription: *id,
                        tag: w.tag,
                        identity: sub.identity.clone(),
                        source: self.registry.all()[w.source].name(),
                        scope: w.grant.scope(),
                        epoch: w.grant.epoch(),
                    })
            })
            .collect();
        stale.sort_by(|a, b| a.identity.unique_name.cmp(&b.identity.unique_name));
        stale
    }

    /// Replaces the grant of `watch` with `grant`, which policy gave it again. Returns
    /// false when the watch is no longer the one that was asked about.
    pub fn regrant(&self, watch: &StaleWatch, grant: Grant) -> bool {
        let mut state = self.lock();
        let Some(w) = state
            .subscriptions
            .get_mut(&watch.subscription)
            .and_then(|sub| sub.watches.get_mut(watch.tag))
        else {
            return false;
        };
        if w.grant.epoch() != watch.epoch || w.grant.scope() != watch.scope {
            return false;
        }
        if grant.source() != watch.source || grant.caller() != watch.identity.unique_name {
            return false;
        }
        w.grant = grant;
        true
    }

    /// Ends `watch`, which policy no longer allows (see the module doc). Returns how many
    /// of its queued events were withheld, or `NotFound` when the watch is no longer the
    /// one that was asked about.
    pub async fn revoke(&self, watch: &StaleWatch, reason: &str) -> Result<u64, Error> {
        let (withheld, stopped) = {
            let mut state = self.lock();
            let Some(sub) = state.subscriptions.get_mut(&watch.subscription) else {
                return Err(Error::NotFound("the subscription is gone".into()));
            };
            let same = sub.watches.iter().any(|w| {
                w.tag == watch.tag
                    && w.grant.epoch() == watch.epoch
                    && w.grant.scope() == watch.scope
            });
            if !same {
                return Err(Error::NotFound(format!("watch {} changed", watch.tag)));
            }
            let ended = sub.watches.take_where(|w| w.tag == watch.tag);
            let withheld = sub.outbox.withhold(watch.tag);
            sub.outbox.push_meta(|seq| Delivery::WatchRemoved {
                seq,
                tag: watch.tag,
                reason: reason.to_owned(),
            });
            for w in &ended {
                state.sources[w.source].counts.lost_policy_changed += withheld;
            }
            let stopped: Vec<_> = ended
                .iter()
                .filter_map(|w| self.release_source(&mut state, w.source))
                .collect();
            (withheld, stopped)
        };
        for pump in stopped {
            finish_stopping(Some(pump)).await;
        }
        Ok(withheld)
    }

    /// Ends the watches over the current `watches_per_subscription` and `watches_per_uid`
    /// (see the module doc): in each subscription its most recently added watches over
    /// the first limit, then per user the most recently added of what is left over the
    /// second. Each ends with `WatchRemoved(tag, reason)`. Returns how many ended.
    pub async fn trim_to_limits(&self, reason: &str) -> usize {
        let limits = self.limits();
        let (ended, stopped) = {
            let mut state = self.lock();
            // (subscription, when added) of every watch to end.
            let mut over: Vec<(u64, u64)> = Vec::new();
            let mut kept_by_uid: HashMap<u32, Vec<(u64, u64)>> = HashMap::new();
            for (id, sub) in &state.subscriptions {
                // The list is in the order the watches were added.
                for (position, w) in sub.watches.iter().enumerate() {
                    if position < limits.watches_per_subscription {
                        kept_by_uid
                            .entry(sub.identity.uid)
                            .or_default()
                            .push((w.added, *id));
                    } else {
                        over.push((*id, w.added));
                    }
                }
            }
            for mut kept in kept_by_uid.into_values() {
                if kept.len() > limits.watches_per_uid {
                    kept.sort_unstable();
                    let newest = kept.split_off(limits.watches_per_uid);
                    over.extend(newest.into_iter().map(|(added, id)| (id, added)));
                }
            }
            let mut sources = Vec::new();
            for (id, added) in &over {
                let Some(sub) = state.subscriptions.get_mut(id) else {
                    continue;
                };
                for watch in sub.watches.take_where(|w| w.added == *added) {
                    sub.outbox.push_meta(|seq| Delivery::WatchRemoved {
                        seq,
                        tag: watch.tag,
                        reason: reason.to_owned(),
                    });
                    sources.push(watch.source);
                }
            }
            let stopped: Vec<_> = sources
                .iter()
                .filter_map(|&source| self.release_source(&mut state, source))
                .collect();
            (sources.len(), stopped)
        };
        for pump in stopped {
            finish_stopping(Some(pump)).await;
        }
        ended
    }
}
