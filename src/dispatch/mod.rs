//! Records × subscriptions × policy → per-subscription outboxes.
//!
//! The [`Hub`] is plain Rust: the bus layer calls it and drains outboxes, tests can drive
//! it directly. Every decision about one record is taken under one lock, together with the
//! update of its source's object table, so a snapshot and the sequence number it reports
//! always agree with the events that follow it.
//!
//! Outboxes carry the kernel queue's semantics: a bounded number of events, never
//! blocking the producer; when full, newer events are dropped and counted, and the count
//! is delivered in order as one `Lost` entry covering exactly the sequence numbers that
//! were dropped.
//!
//! ## What one user's watches cost everyone (the global budget)
//!
//! Every record is matched against watches under the hub's one lock, so whatever one
//! user's watches cost, every other subscriber's delivery of that record waits for it.
//! That cost is bounded per user, not per watch:
//!
//! - a uid holds at most `limits.watches_per_uid` watches (default 256) across all its
//!   connections and subscriptions (themselves at most `limits.subscriptions_per_uid`,
//!   64);
//! - a watch that names its object exactly (a device or block-error name without
//!   wildcards: [`WatchMatcher::index_key`]) is looked up by the record's key, not
//!   visited; only a subscription's watches of the record's source without a key are;
//! - a visited watch costs a bounded number of steps: one walk along the event's
//!   properties (a device watch requires at most 2 + 16) and one name match, whose pattern was
//!   compiled at `AddWatch` and costs O(t²) for a t-character name whatever the
//!   pattern's length ([`crate::glob`]).
//!
//! Measured (`cargo bench --bench matching`, 2 shared cores): 256 watches built to cost
//! the most without matching (subsystem, devtype, a wildcard name and every property of
//! the device but one matching) add about 50-65 µs of daemon CPU per uevent (~0.25 µs
//! per watch; 15-30 µs with wildcard names alone), and another subscriber's p50 latency
//! goes from ~0.17 ms to ~0.23 ms (1.4x); before these limits, 4,096 watches with
//! `"*"×4000 + "a"` names cost 22 ms per event (issue 14). Each further user with such
//! a set adds as much again: the budget is per user.
//!
//! Besides subscriptions, the daemon's own *consumers* (rules that start systemd units,
//! the journal writer) take records from the hub: each holds the sources it names open
//! for the daemon's life, sees every record of them (no policy applies: they act as the
//! system), and gets them through a bounded queue the hub never waits on.
//!
//! ## Where each job lives
//!
//! This file is the facade: the [`Hub`], its state and the subscription calls the bus
//! layer makes. Beside it, one file per job, each adding an `impl Hub` block for its
//! part: `outbox.rs` (bounded queues and their loss accounting, [`Published`]),
//! `watches.rs` (planning, limits, arming, the per-source index), `lifecycle.rs`
//! (opening a source with its first user, stopping it with its last, reopening it
//! under consumers), `feed.rs` (the daemon's own consumers), `tables.rs` (object
//! tables and snapshots), `publish.rs` (one message fanned out under the lock) and
//! `revoke.rs` (watches whose grant is from an older policy epoch, re-granted or
//! ended).

mod feed;
mod lifecycle;
mod outbox;
mod publish;
mod revoke;
mod stats;
mod tables;
mod watches;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use tokio::sync::{watch, Notify};

use crate::error::Error;
use crate::filter::Filter;
use crate::policy::Identity;
#[cfg(doc)]
use crate::source::WatchMatcher;
use crate::source::{Availability, Registry};

pub use feed::{Consumed, ConsumerFeed};
pub use outbox::{Delivery, LossReason, Published};
pub use revoke::StaleWatch;
pub use stats::{HubStats, SourceStats, StatsChanged};

use feed::ConsumerSlot;
use lifecycle::{finish_stopping, SourceSlot, REOPEN_FIRST_DELAY};
use outbox::Outbox;
use tables::apply_to_table;
use watches::Watches;

/// How deliveries are bounded (`[delivery]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeliveryConfig {
    pub default_queue_depth: usize,
    pub max_queue_depth: usize,
    /// Signals a subscriber may have unacknowledged on the bus.
    pub in_flight: usize,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            default_queue_depth: 1024,
            max_queue_depth: 16384,
            in_flight: 64,
        }
    }
}

/// Per-caller resource limits (`[limits]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    pub subscriptions_per_connection: usize,
    pub subscriptions_per_uid: usize,
    pub watches_per_subscription: usize,
    /// Watches of one uid across all its connections and subscriptions: with the
    /// per-watch cost bounded (see the module doc), this bounds what one user's watches
    /// cost every event.
    pub watches_per_uid: usize,
    /// Entries in a subscription's filter (at most [`Filter::MAX_ENTRIES`]).
    pub filter_entries: usize,
    /// Size of one watch's spec: keys, strings and elements, counted recursively.
    pub watch_spec_size: usize,
    /// Whether a reload that lowers `watches_per_subscription` or `watches_per_uid` ends
    /// the watches over them ([`Hub::trim_to_limits`]); by default they are kept and
    /// only adding more is refused.
    pub trim_on_reload: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            subscriptions_per_connection: 16,
            subscriptions_per_uid: 64,
            watches_per_subscription: 64,
            watches_per_uid: 256,
            filter_entries: Filter::MAX_ENTRIES,
            watch_spec_size: 4096,
            trim_on_reload: false,
        }
    }
}

struct Subscription {
    identity: Identity,
    watches: Watches,
    filter: Filter,
    outbox: Outbox,
    /// Dropped with the subscription, which wakes its deliverer through
    /// [`Subscribed::closed`] whatever it is waiting for.
    _alive: watch::Sender<()>,
}

#[derive(Default)]
struct State {
    next_id: u64,
    /// Numbers watches in the order they were added, across subscriptions.
    next_watch: u64,
    subscriptions: BTreeMap<u64, Subscription>,
    sources: Vec<SourceSlot>,
    consumers: Vec<ConsumerSlot>,
    next_consumer: u64,
}

/// A new subscription's handle for whoever delivers its outbox.
pub struct Subscribed {
    pub id: u64,
    /// Woken when deliveries are queued.
    pub notify: Arc<Notify>,
    /// `changed()` fails once the subscription is gone (closed, or its owner left), so
    /// that its deliverer stops at once, even while it waits for a reader's credit.
    pub closed: watch::Receiver<()>,
}

/// What the Manager reports per source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceStatus {
    pub name: &'static str,
    pub availability: Availability,
    pub running: bool,
    pub subtypes: &'static [&'static str],
    pub counters: Vec<(&'static str, u64)>,
}

/// What a subscription's `Watches` property lists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchInfo {
    pub tag: u64,
    pub source: &'static str,
}

pub struct Hub {
    registry: Registry,
    /// Both replaced by a reload ([`Hub::set_settings`]): a lowered limit refuses new
    /// subscriptions and watches but takes nothing away; the delivery settings apply to
    /// subscriptions made afterwards.
    delivery: RwLock<DeliveryConfig>,
    limits: RwLock<Limits>,
    state: Mutex<State>,
    /// Woken when a counter may have changed ([`Hub::stats_changed`]).
    changed: Arc<stats::StatsChanged>,
}

impl Hub {
    /// Probes every source once; nothing is opened until a watch asks for it.
    pub fn new(registry: Registry, delivery: DeliveryConfig, limits: Limits) -> Arc<Self> {
        let sources = registry
            .all()
            .iter()
            .map(|source| SourceSlot {
                availability: source.probe(),
                watches: 0,
                consumers: 0,
                opened: None,
                reopen_delay: REOPEN_FIRST_DELAY,
                pump: None,
                table: None,
                generation: 0,
                counts: stats::Counts::default(),
            })
            .collect();
        Arc::new(Hub {
            registry,
            delivery: RwLock::new(delivery),
            limits: RwLock::new(limits),
            state: Mutex::new(State {
                sources,
                ..State::default()
            }),
            changed: Arc::default(),
        })
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn delivery(&self) -> DeliveryConfig {
        self.delivery
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn limits(&self) -> Limits {
        self.limits
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Takes new delivery settings and limits (a reload). What exists stays: a
    /// subscription over a lowered limit keeps its watches but cannot add more.
    pub fn set_settings(&self, delivery: DeliveryConfig, limits: Limits) {
        *self
            .delivery
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = delivery;
        *self
            .limits
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = limits;
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock is a bug, but the state is still consistent
        // enough to keep serving everyone else.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn sources(&self) -> Vec<SourceStatus> {
        let state = self.lock();
        self.registry
            .all()
            .iter()
            .zip(&state.sources)
            .map(|(source, slot)| SourceStatus {
                name: source.name(),
                availability: source.availability(&slot.availability),
                running: slot.pump.is_some(),
                subtypes: source.subtypes(),
                counters: source.counters(),
            })
            .collect()
    }

    pub fn subscribe(&self, identity: Identity, depth: Option<usize>) -> Result<Subscribed, Error> {
        let delivery = self.delivery();
        let limits = self.limits();
        let depth = depth.unwrap_or(delivery.default_queue_depth);
        if depth == 0 {
            return Err(Error::InvalidArgument(
                "queue-depth must be at least 1, got 0".into(),
            ));
        }
        if depth > delivery.max_queue_depth {
            return Err(Error::LimitExceeded(format!(
                "queue-depth may be at most {} (delivery.max_queue_depth), got {depth}",
                delivery.max_queue_depth
            )));
        }
        let mut state = self.lock();
        let per_connection = state
            .subscriptions
            .values()
            .filter(|s| s.identity.unique_name == identity.unique_name)
            .count();
        if per_connection >= limits.subscriptions_per_connection {
            return Err(Error::LimitExceeded(format!(
                "at most {} subscriptions per connection",
                limits.subscriptions_per_connection
            )));
        }
        let per_uid = state
            .subscriptions
            .values()
            .filter(|s| s.identity.uid == identity.uid)
            .count();
        if per_uid >= limits.subscriptions_per_uid {
            return Err(Error::LimitExceeded(format!(
                "at most {} subscriptions per user (uid {})",
                limits.subscriptions_per_uid, identity.uid
            )));
        }
        state.next_id += 1;
        let id = state.next_id;
        let outbox = Outbox::new(depth);
        let notify = Arc::clone(&outbox.notify);
        let (alive, closed) = watch::channel(());
        state.subscriptions.insert(
            id,
            Subscription {
                identity,
                watches: Watches::default(),
                filter: Filter::default(),
                outbox,
                _alive: alive,
            },
        );
        self.touch_stats();
        Ok(Subscribed { id, notify, closed })
    }

    /// The subscription, if `caller` owns it. Someone else's subscription is reported as
    /// access denied, a missing one as not found.
    fn owned<'s>(
        state: &'s mut State,
        id: u64,
        caller: &str,
    ) -> Result<&'s mut Subscription, Error> {
        let sub = state
            .subscriptions
            .get_mut(&id)
            .ok_or_else(|| Error::NotFound(format!("subscription {id} does not exist")))?;
        if sub.identity.unique_name != caller {
            return Err(Error::AccessDenied(format!(
                "subscription {id} belongs to another connection"
            )));
        }
        Ok(sub)
    }

    /// The identity a subscription was created with, if `caller` owns it.
    pub fn identity_of(&self, id: u64, caller: &str) -> Result<Identity, Error> {
        let mut state = self.lock();
        Ok(Self::owned(&mut state, id, caller)?.identity.clone())
    }

    pub fn owner_of(&self, id: u64) -> Option<String> {
        self.lock()
            .subscriptions
            .get(&id)
            .map(|s| s.identity.unique_name.clone())
    }

    fn source_index(&self, source_name: &str) -> Result<usize, Error> {
        self.registry.index_of(source_name).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "unknown watch kind '{source_name}'; known: {}",
                self.registry.names().join(", ")
            ))
        })
    }

    pub fn set_filter(
        &self,
        id: u64,
        caller: &str,
        spec: &[(String, Vec<String>)],
    ) -> Result<(), Error> {
        let filter_entries = self.limits().filter_entries;
        if spec.len() > filter_entries {
            return Err(Error::LimitExceeded(format!(
                "a filter may have at most {} entries, got {}",
                filter_entries,
                spec.len()
            )));
        }
        // A source has at most 256 subtypes; more names than that are repetitions.
        if let Some((source, names)) = spec.iter().find(|(_, names)| names.len() > 256) {
            return Err(Error::LimitExceeded(format!(
                "a filter entry may name at most 256 subtypes, the one for '{source}' names {}",
                names.len()
            )));
        }
        let filter = Filter::parse(self.registry.catalogue(), spec)?;
        let mut state = self.lock();
        Self::owned(&mut state, id, caller)?.filter = filter;
        Ok(())
    }

    pub fn filter(&self, id: u64) -> Vec<(String, Vec<String>)> {
        self.lock()
            .subscriptions
            .get(&id)
            .map(|s| s.filter.describe(self.registry.catalogue()))
            .unwrap_or_default()
    }

    pub fn queue_depth(&self, id: u64) -> usize {
        self.lock()
            .subscriptions
            .get(&id)
            .map_or(0, |s| s.outbox.depth)
    }

    /// Removes a subscription, releasing its sources. Returns whether it existed.
    pub async fn close(&self, id: u64) -> bool {
        let stopped: Vec<_> = {
            let mut state = self.lock();
            // Dropping it wakes its deliverer ([`Subscribed::closed`]).
            let Some(sub) = state.subscriptions.remove(&id) else {
                return false;
            };
            self.touch_stats();
            sub.watches
                .iter()
                .filter_map(|watch| self.release_source(&mut state, watch.source))
                .collect()
        };
        for pump in stopped {
            finish_stopping(Some(pump)).await;
        }
        true
    }

    /// Every subscription owned by a connection, for when it leaves the bus.
    pub fn subscriptions_of(&self, unique_name: &str) -> Vec<u64> {
        self.lock()
            .subscriptions
            .iter()
            .filter(|(_, s)| s.identity.unique_name == unique_name)
            .map(|(id, _)| *id)
            .collect()
    }

    pub fn subscription_count(&self) -> usize {
        self.lock().subscriptions.len()
    }

    /// Takes up to `max` deliveries, or `None` once the subscription is gone.
    pub fn take(&self, id: u64, max: usize) -> Option<Vec<Delivery>> {
        let mut state = self.lock();
        let state = &mut *state;
        let sub = state.subscriptions.get_mut(&id)?;
        let mut out = Vec::new();
        sub.outbox.pop(max, &mut out);
        self.count_taken(&mut state.sources, &out);
        Some(out)
    }

    /// Counts, per subscription, of what is queued; for tests and the status command.
    pub fn queued(&self) -> HashMap<u64, usize> {
        self.lock()
            .subscriptions
            .iter()
            .map(|(id, s)| (*id, s.outbox.entries.len()))
            .collect()
    }
}

/// What the tests of several of the hub's files build on.
#[cfg(test)]
mod testing {
    use std::sync::Arc;

    use super::{Delivery, Published};
    use crate::event::{Attrs, Audience, Change, Record};

    pub(super) fn record(subtype: u8) -> Arc<Published> {
        Arc::new(Published::new(Record {
            source: "devices",
            subtype,
            object_id: "/devices/x".into(),
            change: Change::None,
            attributes: Attrs::new(),
            properties: Default::default(),
            audience: Audience::Everyone,
        }))
    }

    pub(super) fn seqs(entries: &[Delivery]) -> Vec<(u64, u64)> {
        entries
            .iter()
            .map(|d| match d {
                Delivery::Event { seq, .. } => (*seq, 1),
                Delivery::Lost { seq, count, .. } => (*seq, *count),
                Delivery::WatchRemoved { seq, .. } => (*seq, 1),
            })
            .collect()
    }
}
