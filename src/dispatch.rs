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

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::{ControlFlow, Deref};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;

use crate::error::Error;
use crate::event::{Change, Object, Record, SourceMsg};
use crate::filter::Filter;
use crate::policy::{self, Grant, Identity};
use crate::signal::EncodedSignal;
use crate::source::{Availability, PlannedWatch, Registry, WatchHold, WatchMatcher, WatchSpec};

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
        }
    }
}

/// Why a `Lost` entry was queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossReason {
    /// The daemon dropped `count` events because the subscriber did not read them.
    QueueFull,
    /// The kernel dropped an unknown number of the source's events.
    KernelOverflow,
}

impl LossReason {
    pub fn as_str(self) -> &'static str {
        match self {
            LossReason::QueueFull => "queue-full",
            LossReason::KernelOverflow => "kernel-overflow",
        }
    }
}

/// A record as every subscription that receives it shares it.
#[derive(Debug)]
pub struct Published {
    record: Record,
    /// The record's signal, encoded by the first delivery that needs it, so that fanning
    /// a record out to many subscribers costs one encoding.
    encoded: OnceLock<Option<EncodedSignal>>,
}

impl Published {
    pub fn new(record: Record) -> Self {
        Published {
            record,
            encoded: OnceLock::new(),
        }
    }

    /// The encoding `encode` makes of the record, made once; `None` when it has none.
    pub fn encoded(
        &self,
        encode: impl FnOnce(&Record) -> Option<EncodedSignal>,
    ) -> Option<&EncodedSignal> {
        self.encoded.get_or_init(|| encode(&self.record)).as_ref()
    }
}

impl Deref for Published {
    type Target = Record;

    fn deref(&self) -> &Record {
        &self.record
    }
}

/// One signal waiting to go to a subscriber.
#[derive(Clone, Debug)]
pub enum Delivery {
    Event {
        seq: u64,
        tag: u64,
        record: Arc<Published>,
    },
    /// Covers sequence numbers `seq .. seq + count` (one number when `count` is 0).
    Lost {
        seq: u64,
        count: u64,
        source: &'static str,
        reason: LossReason,
    },
    WatchRemoved {
        seq: u64,
        tag: u64,
        reason: String,
    },
}

/// A watch as the subscription holds it.
struct Watch {
    tag: u64,
    source: usize,
    matcher: Box<dyn WatchMatcher>,
    /// What policy allowed; every event is checked against it again at publish.
    grant: Grant,
    /// Kernel state kept for this watch; released when the watch is dropped.
    _hold: Option<WatchHold>,
}

struct Outbox {
    entries: VecDeque<Delivery>,
    depth: usize,
    queued_events: usize,
    next_seq: u64,
    notify: Arc<Notify>,
}

impl Outbox {
    fn new(depth: usize) -> Self {
        Outbox {
            entries: VecDeque::new(),
            depth,
            queued_events: 0,
            next_seq: 1,
            notify: Arc::new(Notify::new()),
        }
    }

    fn take_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    fn push_event(&mut self, tag: u64, record: Arc<Published>) {
        let seq = self.take_seq();
        if self.queued_events < self.depth {
            self.queued_events += 1;
            self.entries.push_back(Delivery::Event { seq, tag, record });
        } else if let Some(Delivery::Lost {
            count,
            reason: LossReason::QueueFull,
            ..
        }) = self.entries.back_mut()
        {
            *count += 1;
        } else {
            // Meta entries do not count against the depth; there is at most one per
            // event that was queued before it, so the outbox stays bounded.
            self.entries.push_back(Delivery::Lost {
                seq,
                count: 1,
                source: record.source,
                reason: LossReason::QueueFull,
            });
        }
        self.notify.notify_one();
    }

    fn push_meta(&mut self, make: impl FnOnce(u64) -> Delivery) {
        let seq = self.take_seq();
        self.entries.push_back(make(seq));
        self.notify.notify_one();
    }

    fn pop(&mut self, max: usize, out: &mut Vec<Delivery>) {
        while out.len() < max {
            let Some(entry) = self.entries.pop_front() else {
                break;
            };
            if matches!(entry, Delivery::Event { .. }) {
                self.queued_events -= 1;
            }
            out.push(entry);
        }
    }
}

/// A subscription's watches in the order they were added, with an index by source and
/// key ([`WatchMatcher::index_key`]) that is rebuilt whenever they change (at most
/// `limits.watches_per_subscription` of them), so that an event visits only the watches
/// of its source that have no key or the event's key.
#[derive(Default)]
struct Watches {
    list: Vec<Watch>,
    /// Watches an `AddWatch` reserved and is still arming: they count against the limits.
    reserved: usize,
    /// One entry per source watched.
    by_source: Vec<SourceWatches>,
}

/// Positions in [`Watches::list`] of one source's watches, each list in ascending order.
struct SourceWatches {
    source: usize,
    keyed: HashMap<Box<str>, Vec<usize>>,
    unkeyed: Vec<usize>,
}

impl Watches {
    fn push(&mut self, watch: Watch) {
        self.list.push(watch);
        self.reindex();
    }

    fn remove(&mut self, position: usize) -> Watch {
        let watch = self.list.remove(position);
        self.reindex();
        watch
    }

    /// Removes and returns the watches `gone` selects, keeping the others in order.
    fn take_where(&mut self, gone: impl FnMut(&Watch) -> bool) -> Vec<Watch> {
        let (gone, kept) = std::mem::take(&mut self.list).into_iter().partition(gone);
        self.list = kept;
        self.reindex();
        gone
    }

    fn reindex(&mut self) {
        self.by_source.clear();
        for (position, watch) in self.list.iter().enumerate() {
            let entry = match self.by_source.iter().position(|e| e.source == watch.source) {
                Some(i) => &mut self.by_source[i],
                None => {
                    self.by_source.push(SourceWatches {
                        source: watch.source,
                        keyed: HashMap::new(),
                        unkeyed: Vec::new(),
                    });
                    let last = self.by_source.len() - 1;
                    &mut self.by_source[last]
                }
            };
            match watch.matcher.index_key() {
                Some(key) => entry.keyed.entry(key.into()).or_default().push(position),
                None => entry.unkeyed.push(position),
            }
        }
    }

    /// The watches of `source` that may match a record with index key `key`, in the
    /// order they were added. Allocates nothing.
    fn candidates<'w>(
        &'w self,
        source: usize,
        key: Option<&str>,
    ) -> impl Iterator<Item = &'w Watch> + 'w {
        let entry = self.by_source.iter().find(|e| e.source == source);
        let unkeyed = entry.map_or(&[][..], |e| e.unkeyed.as_slice());
        let keyed = entry
            .zip(key)
            .and_then(|(e, key)| e.keyed.get(key))
            .map_or(&[][..], Vec::as_slice);
        let (mut unkeyed, mut keyed) = (unkeyed.iter().peekable(), keyed.iter().peekable());
        std::iter::from_fn(move || {
            let next = match (unkeyed.peek(), keyed.peek()) {
                (Some(u), Some(k)) if k < u => keyed.next(),
                (Some(_), _) => unkeyed.next(),
                (None, _) => keyed.next(),
            }?;
            Some(&self.list[*next])
        })
    }
}

impl Deref for Watches {
    type Target = [Watch];

    fn deref(&self) -> &[Watch] {
        &self.list
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

struct SourceSlot {
    availability: Availability,
    watches: usize,
    /// Internal consumers holding the source open (see [`Hub::consume`]).
    consumers: usize,
    /// When the running source was opened.
    opened: Option<Instant>,
    /// The wait before the next attempt to reopen it for consumers: it grows while the
    /// source keeps failing, so a source that dies at once is not reopened in a loop.
    reopen_delay: Duration,
    pump: Option<JoinHandle<()>>,
    /// Present while the source runs: every object it reported, by id.
    table: Option<BTreeMap<String, Object>>,
    /// Records published since the daemon started; the Manager's snapshot sequence.
    generation: u64,
}

#[derive(Default)]
struct State {
    next_id: u64,
    subscriptions: BTreeMap<u64, Subscription>,
    sources: Vec<SourceSlot>,
    consumers: Vec<ConsumerSlot>,
}

impl State {
    /// Tells every consumer of source `index` that some of its events were missed.
    fn tell_consumers_missed(&self, index: usize, source: &'static str, reason: &'static str) {
        for consumer in &self.consumers {
            if consumer.interests.iter().any(|(s, _)| *s == index) {
                consumer.offer(Consumed::Missed { source, reason });
            }
        }
    }
}

/// The wait before the first attempt to reopen a source that stopped under the daemon's
/// own consumers; it doubles after each failed attempt, up to [`REOPEN_MAX_DELAY`].
const REOPEN_FIRST_DELAY: Duration = Duration::from_secs(1);
const REOPEN_MAX_DELAY: Duration = Duration::from_secs(60);

/// What an internal consumer receives.
#[derive(Debug)]
pub enum Consumed {
    /// A record. `seq` is its source's sequence number (the one `Manager.Snapshot`
    /// reports), so that consumers can tell records apart and in order.
    Event { seq: u64, record: Arc<Published> },
    /// Events of `source` were missed, an unknown number: `reason` is `kernel-overflow`
    /// (the kernel dropped them; the source has resynchronised) or `source-restarted`
    /// (the source stopped unexpectedly and was opened again).
    Missed {
        source: &'static str,
        reason: &'static str,
    },
}

/// An internal consumer's end of its queue.
pub struct ConsumerFeed {
    index: usize,
    pub name: &'static str,
    pub receiver: mpsc::Receiver<Consumed>,
    dropped: Arc<AtomicU64>,
}

impl ConsumerFeed {
    /// How many entries the hub dropped because the queue was full, since the last call.
    pub fn take_dropped(&self) -> u64 {
        self.dropped.swap(0, Ordering::Relaxed)
    }
}

struct ConsumerSlot {
    sender: mpsc::Sender<Consumed>,
    dropped: Arc<AtomicU64>,
    /// The sources it consumes and which of their records it wants.
    interests: Vec<(usize, Box<dyn WatchMatcher>)>,
}

impl ConsumerSlot {
    fn offer(&self, entry: Consumed) {
        // Never wait: a consumer that falls behind loses entries, counted.
        if self.sender.try_send(entry).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
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
}

/// What a subscription's `Watches` property lists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchInfo {
    pub tag: u64,
    pub source: &'static str,
}

pub struct Hub {
    registry: Registry,
    delivery: DeliveryConfig,
    limits: Limits,
    state: Mutex<State>,
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
            })
            .collect();
        Arc::new(Hub {
            registry,
            delivery,
            limits,
            state: Mutex::new(State {
                sources,
                ..State::default()
            }),
        })
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn delivery(&self) -> &DeliveryConfig {
        &self.delivery
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
                availability: slot.availability.clone(),
                running: slot.pump.is_some(),
                subtypes: source.subtypes(),
            })
            .collect()
    }

    pub fn subscribe(&self, identity: Identity, depth: Option<usize>) -> Result<Subscribed, Error> {
        let depth = depth.unwrap_or(self.delivery.default_queue_depth);
        if depth == 0 {
            return Err(Error::InvalidArgument(
                "queue-depth must be at least 1, got 0".into(),
            ));
        }
        if depth > self.delivery.max_queue_depth {
            return Err(Error::LimitExceeded(format!(
                "queue-depth may be at most {} (delivery.max_queue_depth), got {depth}",
                self.delivery.max_queue_depth
            )));
        }
        let mut state = self.lock();
        let per_connection = state
            .subscriptions
            .values()
            .filter(|s| s.identity.unique_name == identity.unique_name)
            .count();
        if per_connection >= self.limits.subscriptions_per_connection {
            return Err(Error::LimitExceeded(format!(
                "at most {} subscriptions per connection",
                self.limits.subscriptions_per_connection
            )));
        }
        let per_uid = state
            .subscriptions
            .values()
            .filter(|s| s.identity.uid == identity.uid)
            .count();
        if per_uid >= self.limits.subscriptions_per_uid {
            return Err(Error::LimitExceeded(format!(
                "at most {} subscriptions per user (uid {})",
                self.limits.subscriptions_per_uid, identity.uid
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

    /// Checks a watch request against the source's availability and the size limit, and
    /// lets the source parse it for `requester`. Nothing is changed yet: the caller asks
    /// policy about the plan's scope, then hands the plan to [`Hub::add_watch`].
    pub fn plan_watch(
        &self,
        source_name: &str,
        spec: &WatchSpec,
        requester: &Identity,
    ) -> Result<PlannedWatch, Error> {
        let index = self.source_index(source_name)?;
        if let Availability::Unavailable(reason) = &self.lock().sources[index].availability {
            return Err(Error::NotSupported(format!(
                "{source_name} events are not available: {reason}"
            )));
        }
        let size = spec_size(spec);
        if size > self.limits.watch_spec_size {
            return Err(Error::LimitExceeded(format!(
                "a watch spec may have at most {} keys, strings and elements, this one has {size}",
                self.limits.watch_spec_size
            )));
        }
        self.registry.all()[index].parse_watch(spec, requester)
    }

    fn source_index(&self, source_name: &str) -> Result<usize, Error> {
        self.registry.index_of(source_name).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "unknown watch kind '{source_name}'; known: {}",
                self.registry.names().join(", ")
            ))
        })
    }

    /// Adds a watch that policy granted ([`crate::policy::Authorizer::watch`]); the grant
    /// names the connection and the source, and the hub takes no watch without one.
    ///
    /// The source is started first if this is its first watch, then the watch is armed
    /// outside the lock (arming may run a helper process); the source cannot stop in
    /// between because the pending watch already counts as one of its watches.
    pub async fn add_watch(
        self: &Arc<Self>,
        id: u64,
        grant: Grant,
        tag: u64,
        planned: PlannedWatch,
    ) -> Result<(), Error> {
        let caller = grant.caller().to_owned();
        let caller = caller.as_str();
        let index = self.source_index(grant.source())?;
        self.reserve_watch(id, caller, index, tag)?;
        let armed = tokio::task::spawn_blocking(move || planned.arm())
            .await
            .unwrap_or_else(|e| {
                Err(Error::Unavailable(format!(
                    "arming the {} watch failed: {e}",
                    grant.source()
                )))
            });
        let stopped = {
            let mut state = self.lock();
            if let Some(sub) = state.subscriptions.get_mut(&id) {
                sub.watches.reserved = sub.watches.reserved.saturating_sub(1);
            }
            let taken = armed.and_then(|armed| {
                let sub = Self::owned(&mut state, id, caller)?;
                if sub.watches.iter().any(|w| w.tag == tag) {
                    return Err(Error::InvalidArgument(format!(
                        "tag {tag} is already used by a watch of this subscription"
                    )));
                }
                sub.watches.push(Watch {
                    tag,
                    source: index,
                    matcher: armed.matcher,
                    grant,
                    _hold: armed.hold,
                });
                Ok(())
            });
            match taken {
                Ok(()) => return Ok(()),
                Err(e) => (e, self.release_source(&mut state, index)),
            }
        };
        let (error, pump) = stopped;
        finish_stopping(pump).await;
        Err(error)
    }

    /// Checks that the subscription can take one more watch with `tag`, starts the source
    /// if it does not run, and counts the pending watch as one of the source's.
    fn reserve_watch(
        self: &Arc<Self>,
        id: u64,
        caller: &str,
        index: usize,
        tag: u64,
    ) -> Result<(), Error> {
        let mut state = self.lock();
        let sub = Self::owned(&mut state, id, caller)?;
        if sub.watches.iter().any(|w| w.tag == tag) {
            return Err(Error::InvalidArgument(format!(
                "tag {tag} is already used by a watch of this subscription"
            )));
        }
        if sub.watches.len() + sub.watches.reserved >= self.limits.watches_per_subscription {
            return Err(Error::LimitExceeded(format!(
                "at most {} watches per subscription (limits.watches_per_subscription)",
                self.limits.watches_per_subscription
            )));
        }
        let uid = sub.identity.uid;
        let per_uid: usize = state
            .subscriptions
            .values()
            .filter(|s| s.identity.uid == uid)
            .map(|s| s.watches.len() + s.watches.reserved)
            .sum();
        if per_uid >= self.limits.watches_per_uid {
            return Err(Error::LimitExceeded(format!(
                "at most {} watches per user across all connections (limits.watches_per_uid); \
                 uid {uid} has {per_uid}: remove some or close subscriptions",
                self.limits.watches_per_uid
            )));
        }
        self.ensure_running(&mut state, index)?;
        state.sources[index].watches += 1;
        if let Some(sub) = state.subscriptions.get_mut(&id) {
            sub.watches.reserved += 1;
        }
        Ok(())
    }

    /// Starts a source that does not run: opens it, seeds its table and spawns its pump.
    fn ensure_running(self: &Arc<Self>, state: &mut State, index: usize) -> Result<(), Error> {
        let slot = &mut state.sources[index];
        if slot.pump.is_some() {
            return Ok(());
        }
        let source = &self.registry.all()[index];
        let source_name = source.name();
        let stream = source.open().map_err(|e| {
            Error::Unavailable(format!("cannot start the {source_name} source: {e}"))
        })?;
        // Seed the table after the kernel interface is open, so nothing falls between
        // the scan and the first event; events already reflected in the scan are
        // idempotent upserts and removals.
        let objects = source.scan().unwrap_or_else(|e| {
            tracing::warn!(source = source_name, "initial scan failed: {e}");
            Vec::new()
        });
        slot.table = Some(objects.into_iter().map(|o| (o.id.clone(), o)).collect());
        let hub = Arc::clone(self);
        slot.pump = Some(tokio::spawn(async move { hub.pump(index, stream).await }));
        slot.opened = Some(Instant::now());
        tracing::info!(source = source_name, "source started");
        Ok(())
    }

    /// Registers an internal consumer with a queue of `capacity` entries. It receives
    /// nothing until it names sources with [`Hub::consume`].
    pub fn add_consumer(&self, name: &'static str, capacity: usize) -> ConsumerFeed {
        let (sender, receiver) = mpsc::channel(capacity.max(1));
        let dropped = Arc::new(AtomicU64::new(0));
        let mut state = self.lock();
        state.consumers.push(ConsumerSlot {
            sender,
            dropped: Arc::clone(&dropped),
            interests: Vec::new(),
        });
        ConsumerFeed {
            index: state.consumers.len() - 1,
            name,
            receiver,
            dropped,
        }
    }

    /// Makes a consumer receive the records of `source_name` that `matcher` accepts, with
    /// no policy check, and starts the source if it does not run. The source then runs
    /// for the daemon's life, whether or not anyone subscribes. Only sources that report
    /// on their own ([`crate::source::EventSource::system_wide`]) can be consumed.
    pub fn consume(
        self: &Arc<Self>,
        feed: &ConsumerFeed,
        source_name: &str,
        matcher: Box<dyn WatchMatcher>,
    ) -> Result<(), Error> {
        let index = self.source_index(source_name)?;
        if !self.registry.all()[index].system_wide() {
            return Err(Error::NotSupported(format!(
                "the {source_name} source reports only what a subscriber's watch names"
            )));
        }
        let mut state = self.lock();
        if let Availability::Unavailable(reason) = &state.sources[index].availability {
            return Err(Error::NotSupported(format!(
                "{source_name} events are not available: {reason}"
            )));
        }
        self.ensure_running(&mut state, index)?;
        state.sources[index].consumers += 1;
        state.consumers[feed.index].interests.push((index, matcher));
        Ok(())
    }

    pub async fn remove_watch(&self, id: u64, caller: &str, tag: u64) -> Result<(), Error> {
        let stopped = {
            let mut state = self.lock();
            let sub = Self::owned(&mut state, id, caller)?;
            let position = sub
                .watches
                .iter()
                .position(|w| w.tag == tag)
                .ok_or_else(|| Error::NotFound(format!("no watch with tag {tag}")))?;
            let watch = sub.watches.remove(position);
            self.release_source(&mut state, watch.source)
        };
        finish_stopping(stopped).await;
        Ok(())
    }

    /// Drops one watch's hold on a source. When it was the last, the source's pump is
    /// aborted and returned so that the caller can wait, outside the lock, until its fds
    /// are closed.
    fn release_source(&self, state: &mut State, index: usize) -> Option<JoinHandle<()>> {
        let slot = &mut state.sources[index];
        slot.watches = slot.watches.saturating_sub(1);
        if slot.watches > 0 || slot.consumers > 0 {
            return None;
        }
        slot.table = None;
        let pump = slot.pump.take()?;
        pump.abort();
        tracing::info!(
            source = self.registry.all()[index].name(),
            "source stopped: nobody watches it"
        );
        Some(pump)
    }

    pub fn set_filter(
        &self,
        id: u64,
        caller: &str,
        spec: &[(String, Vec<String>)],
    ) -> Result<(), Error> {
        if spec.len() > self.limits.filter_entries {
            return Err(Error::LimitExceeded(format!(
                "a filter may have at most {} entries, got {}",
                self.limits.filter_entries,
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
        let filter = Filter::parse(&self.registry, spec)?;
        let mut state = self.lock();
        Self::owned(&mut state, id, caller)?.filter = filter;
        Ok(())
    }

    pub fn filter(&self, id: u64) -> Vec<(String, Vec<String>)> {
        self.lock()
            .subscriptions
            .get(&id)
            .map(|s| s.filter.describe(&self.registry))
            .unwrap_or_default()
    }

    pub fn watches(&self, id: u64) -> Vec<WatchInfo> {
        let state = self.lock();
        state
            .subscriptions
            .get(&id)
            .map(|s| {
                s.watches
                    .iter()
                    .map(|w| WatchInfo {
                        tag: w.tag,
                        source: self.registry.all()[w.source].name(),
                    })
                    .collect()
            })
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
        let sub = state.subscriptions.get_mut(&id)?;
        let mut out = Vec::new();
        sub.outbox.pop(max, &mut out);
        Some(out)
    }

    /// A consistent snapshot of a source's objects. With a subscription, the sequence is
    /// that subscription's last assigned number: apply every later event to the snapshot.
    /// Without one, it is the source's generation (records published so far).
    pub fn snapshot(
        &self,
        source_name: &str,
        subscription: Option<(u64, &str)>,
    ) -> Result<(u64, Vec<Object>), Error> {
        let index = self.registry.index_of(source_name).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "unknown source '{source_name}'; known: {}",
                self.registry.names().join(", ")
            ))
        })?;
        {
            let mut state = self.lock();
            let seq = match subscription {
                Some((id, caller)) => Self::owned(&mut state, id, caller)?.outbox.next_seq - 1,
                None => state.sources[index].generation,
            };
            let slot = &state.sources[index];
            if let Availability::Unavailable(reason) = &slot.availability {
                return Err(Error::NotSupported(format!(
                    "{source_name} is not available: {reason}"
                )));
            }
            if let Some(table) = &slot.table {
                let objects = table.values().cloned();
                let objects = match subscription {
                    Some((id, _)) => Self::covered(&state, id, index, objects),
                    None => objects.collect(),
                };
                return Ok((seq, objects));
            }
        }
        // Not running, so no event for it can be in flight: read the kernel's view
        // without holding the lock.
        let objects = self.registry.all()[index]
            .scan()
            .map_err(|e| Error::Unavailable(format!("cannot enumerate {source_name}: {e}")))?;
        let mut state = self.lock();
        let seq = match subscription {
            Some((id, caller)) => Self::owned(&mut state, id, caller)?.outbox.next_seq - 1,
            None => state.sources[index].generation,
        };
        let objects = match subscription {
            Some((id, _)) => Self::covered(&state, id, index, objects.into_iter()),
            None => objects,
        };
        Ok((seq, objects))
    }

    /// The objects a subscription's watches of a source cover ([`WatchMatcher::covers`]).
    /// A watch that does not divide the table covers all of it only if policy granted it
    /// the whole system; without a watch of the source the caller was authorized for the
    /// whole system at snapshot time (see the bus layer), and everything is returned.
    fn covered(
        state: &State,
        id: u64,
        index: usize,
        objects: impl Iterator<Item = Object>,
    ) -> Vec<Object> {
        let watches: Vec<&Watch> = state
            .subscriptions
            .get(&id)
            .map(|s| s.watches.iter().filter(|w| w.source == index).collect())
            .unwrap_or_default();
        if watches.is_empty() {
            return objects.collect();
        }
        objects
            .filter(|object| {
                watches.iter().any(|w| match w.matcher.covers(object) {
                    Some(covered) => covered,
                    None => w.grant.scope() == policy::Scope::System,
                })
            })
            .collect()
    }

    /// Whether a subscription holds a watch of the source (policy allowed it already).
    pub fn watches_source(&self, id: u64, source_name: &str) -> bool {
        let Some(index) = self.registry.index_of(source_name) else {
            return false;
        };
        self.lock()
            .subscriptions
            .get(&id)
            .is_some_and(|s| s.watches.iter().any(|w| w.source == index))
    }

    async fn pump(self: Arc<Self>, index: usize, mut stream: crate::source::SourceStream) {
        while let Some(msg) = stream.next().await {
            if self.publish(index, msg).is_break() {
                // The last watch ended with its object; the stream (and its fds) is
                // dropped on return, and the slot already shows the source stopped.
                return;
            }
        }
        if self.source_failed(index) > 0 {
            self.reopen_for_consumers(index).await;
        }
    }

    /// Ends the watches of a source whose stream ended unexpectedly, each with
    /// `WatchRemoved`, and marks it stopped. Returns how many of the daemon's own
    /// consumers held it open.
    fn source_failed(&self, index: usize) -> usize {
        let name = self.registry.all()[index].name();
        let mut state = self.lock();
        let consumers = state.sources[index].consumers;
        tracing::error!(
            source = name,
            consumers,
            "source {name} stopped unexpectedly; removing its watches (the next watch restarts it)"
        );
        for sub in state.subscriptions.values_mut() {
            for watch in sub.watches.take_where(|w| w.source == index) {
                sub.outbox.push_meta(|seq| Delivery::WatchRemoved {
                    seq,
                    tag: watch.tag,
                    reason: format!("source-failed: the {name} source stopped"),
                });
            }
        }
        let slot = &mut state.sources[index];
        slot.watches = 0;
        slot.pump = None;
        slot.table = None;
        if slot
            .opened
            .take()
            .is_some_and(|opened| opened.elapsed() >= REOPEN_MAX_DELAY)
        {
            slot.reopen_delay = REOPEN_FIRST_DELAY;
        }
        consumers
    }

    /// Reopens a source that stopped under the daemon's own consumers (unit rules,
    /// journal records), which no subscriber would restart, retrying with a growing
    /// delay for as long as it fails. The consumers learn that events were missed.
    async fn reopen_for_consumers(self: Arc<Self>, index: usize) {
        let name = self.registry.all()[index].name();
        loop {
            let delay = {
                let slot = &mut self.lock().sources[index];
                let delay = slot.reopen_delay;
                slot.reopen_delay = (delay * 2).min(REOPEN_MAX_DELAY);
                delay
            };
            tokio::time::sleep(delay).await;
            let mut state = self.lock();
            // A subscriber's watch may have reopened it meanwhile.
            let reopened = state.sources[index].pump.is_some();
            match self.ensure_running(&mut state, index) {
                Ok(()) => {
                    state.tell_consumers_missed(index, name, "source-restarted");
                    if !reopened {
                        tracing::info!(
                            source = name,
                            "source {name} reopened for the daemon's own consumers after {} s",
                            delay.as_secs()
                        );
                    }
                    return;
                }
                Err(e) => tracing::warn!(
                    source = name,
                    "{e}; the daemon's own consumers of {name} events retry in {} s",
                    state.sources[index].reopen_delay.as_secs()
                ),
            }
        }
    }

    /// Fans one source message out to every subscription that watches it and may see it.
    /// Breaks when the message ended the source's last watch, which stops the source.
    pub fn publish(&self, index: usize, msg: SourceMsg) -> ControlFlow<()> {
        let mut state = self.lock();
        let slot = &mut state.sources[index];
        slot.generation += 1;
        let generation = slot.generation;
        match msg {
            SourceMsg::Record(mut record) => {
                if let Some(table) = &mut slot.table {
                    apply_to_table(table, &mut record);
                }
                let record = Arc::new(Published::new(record));
                for consumer in &state.consumers {
                    if consumer
                        .interests
                        .iter()
                        .any(|(source, matcher)| *source == index && matcher.matches(&record))
                    {
                        consumer.offer(Consumed::Event {
                            seq: generation,
                            record: Arc::clone(&record),
                        });
                    }
                }
                // Watches that name the record's key exactly are looked up by it; only
                // the others are visited one by one.
                let key = self.registry.all()[index].index_key(&record);
                for sub in state.subscriptions.values_mut() {
                    if !sub.filter.passes(record.source, record.subtype) {
                        continue;
                    }
                    for watch in sub.watches.candidates(index, key) {
                        // Event-time visibility: for every event and every watch,
                        // whatever was decided when the watch was set.
                        if policy::may_see(
                            &sub.identity,
                            &watch.grant,
                            record.source,
                            record.audience,
                        ) && watch.matcher.matches(&record)
                        {
                            sub.outbox.push_event(watch.tag, Arc::clone(&record));
                        }
                    }
                }
            }
            SourceMsg::Overflow { objects } => {
                if let Some(table) = &mut slot.table {
                    let old = std::mem::take(table);
                    for mut object in objects {
                        if let Some(previous) = old.get(&object.id) {
                            object.changes = previous.changes
                                + u64::from(previous.attributes != object.attributes);
                        }
                        table.insert(object.id.clone(), object);
                    }
                }
                let source = self.registry.all()[index].name();
                state.tell_consumers_missed(index, source, "kernel-overflow");
                for sub in state.subscriptions.values_mut() {
                    if sub.watches.iter().any(|w| w.source == index) {
                        sub.outbox.push_meta(|seq| Delivery::Lost {
                            seq,
                            count: 0,
                            source,
                            reason: LossReason::KernelOverflow,
                        });
                    }
                }
            }
            SourceMsg::Replace { prefix, objects } => {
                if let Some(table) = &mut slot.table {
                    table.retain(|id, _| !id.starts_with(&prefix));
                    table.extend(objects.into_iter().map(|o| (o.id.clone(), o)));
                }
            }
            SourceMsg::WatchedObjectGone { object, reason } => {
                let mut ended = 0;
                for sub in state.subscriptions.values_mut() {
                    let gone = sub.watches.take_where(|w| {
                        w.source == index && w.matcher.watched_object() == Some(object.as_str())
                    });
                    for watch in gone {
                        ended += 1;
                        sub.outbox.push_meta(|seq| Delivery::WatchRemoved {
                            seq,
                            tag: watch.tag,
                            reason: reason.clone(),
                        });
                    }
                }
                let slot = &mut state.sources[index];
                slot.watches = slot.watches.saturating_sub(ended);
                if ended > 0 && slot.watches == 0 && slot.consumers == 0 {
                    slot.table = None;
                    slot.pump = None;
                    tracing::info!(
                        source = self.registry.all()[index].name(),
                        "source stopped: its last watched object is gone"
                    );
                    return ControlFlow::Break(());
                }
            }
        }
        ControlFlow::Continue(())
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

/// Waits until an aborted pump has dropped its stream, so that "nobody watches it" means
/// "no fd is open" by the time the caller answers.
async fn finish_stopping(pump: Option<JoinHandle<()>>) {
    if let Some(pump) = pump {
        // The result is Cancelled or the pump's own end; both mean it is gone.
        let _ = pump.await;
    }
}

/// How much a caller-supplied value weighs: one per key, element and scalar, plus the
/// length of every string, recursively.
fn spec_size(spec: &WatchSpec) -> usize {
    fn weight(value: &zbus::Variant<'_>) -> usize {
        match value {
            zbus::Variant::Str(s) => 1 + s.as_str().len(),
            zbus::Variant::ObjectPath(p) => 1 + p.as_str().len(),
            zbus::Variant::Variant(inner) => 1 + weight(inner),
            zbus::Variant::Array(array) => 1 + array.inner().iter().map(weight).sum::<usize>(),
            zbus::Variant::Dict(dict) => {
                1 + dict
                    .iter()
                    .map(|(k, v)| weight(k) + weight(v))
                    .sum::<usize>()
            }
            zbus::Variant::Structure(s) => 1 + s.fields().iter().map(weight).sum::<usize>(),
            _ => 1,
        }
    }
    spec.iter().map(|(k, v)| 1 + k.len() + weight(v)).sum()
}

/// Applies a record to its source's object table. A removal carries no attributes (the
/// object is gone from the kernel); it is completed with the last ones known.
fn apply_to_table(table: &mut BTreeMap<String, Object>, record: &mut Record) {
    match record.change {
        Change::Upsert => {
            let object = table
                .entry(record.object_id.clone())
                .or_insert_with(|| Object {
                    id: record.object_id.clone(),
                    changes: 0,
                    attributes: Default::default(),
                    properties: Default::default(),
                });
            object.changes += 1;
            object.attributes.clone_from(&record.attributes);
            object.properties.clone_from(&record.properties);
        }
        Change::Remove => {
            if let Some(previous) = table.remove(&record.object_id) {
                for (key, value) in previous.attributes {
                    record.attributes.entry(key).or_insert(value);
                }
            }
        }
        Change::None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Attrs, Audience};

    fn record(subtype: u8) -> Arc<Published> {
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

    fn seqs(entries: &[Delivery]) -> Vec<(u64, u64)> {
        entries
            .iter()
            .map(|d| match d {
                Delivery::Event { seq, .. } => (*seq, 1),
                Delivery::Lost { seq, count, .. } => (*seq, *count),
                Delivery::WatchRemoved { seq, .. } => (*seq, 1),
            })
            .collect()
    }

    /// A source whose first stream ends after one record, as a kernel interface that
    /// fails; later streams stay open after their record.
    #[derive(Default)]
    struct DyingSource {
        opens: AtomicU64,
    }

    impl crate::source::EventSource for DyingSource {
        fn name(&self) -> &'static str {
            "dying"
        }

        fn subtypes(&self) -> &'static [&'static str] {
            &["change"]
        }

        // Never encoded here: these tests stop at the hub.
        fn signal(&self) -> &'static crate::signal::SignalKind {
            &crate::source::devices::signal::KIND
        }

        fn system_wide(&self) -> bool {
            true
        }

        fn probe(&self) -> Availability {
            Availability::Available
        }

        fn parse_watch(&self, _: &WatchSpec, _: &Identity) -> Result<PlannedWatch, Error> {
            Err(Error::NotSupported("consumers only".into()))
        }

        fn scan(&self) -> std::io::Result<Vec<Object>> {
            Ok(Vec::new())
        }

        fn open(&self) -> std::io::Result<crate::source::SourceStream> {
            let open = self.opens.fetch_add(1, Ordering::SeqCst) + 1;
            let record = SourceMsg::Record(Record {
                source: "dying",
                subtype: 0,
                object_id: format!("opened {open} times"),
                change: Change::None,
                attributes: Attrs::new(),
                properties: Default::default(),
                audience: Audience::Everyone,
            });
            let first = futures_util::stream::iter([record]);
            Ok(if open == 1 {
                Box::pin(first)
            } else {
                Box::pin(first.chain(futures_util::stream::pending()))
            })
        }
    }

    #[derive(Debug)]
    struct All;

    impl WatchMatcher for All {
        fn matches(&self, _: &Record) -> bool {
            true
        }
    }

    #[tokio::test]
    async fn a_source_that_dies_under_consumers_is_reopened_and_they_hear_of_the_gap() {
        let source = Arc::new(DyingSource::default());
        let registry = Registry::from_sources(vec![Arc::clone(&source) as _]);
        let hub = Hub::new(registry, DeliveryConfig::default(), Limits::default());
        let mut feed = hub.add_consumer("test", 16);
        hub.consume(&feed, "dying", Box::new(All)).expect("consume");

        let mut received = Vec::new();
        while received.len() < 3 {
            let entry = tokio::time::timeout(REOPEN_FIRST_DELAY * 10, feed.receiver.recv())
                .await
                .expect("an entry in time")
                .expect("the feed stays open");
            received.push(match entry {
                Consumed::Event { record, .. } => record.object_id.clone(),
                Consumed::Missed { source, reason } => format!("{source} missed: {reason}"),
            });
        }
        assert_eq!(
            received,
            [
                "opened 1 times",
                "dying missed: source-restarted",
                "opened 2 times"
            ]
        );
        assert_eq!(source.opens.load(Ordering::SeqCst), 2);
        assert_eq!(feed.take_dropped(), 0);
    }

    /// A source whose watches name one object by key (`key`), or every object.
    struct Keyed;

    #[derive(Debug)]
    struct KeyWatch(Option<String>);

    impl WatchMatcher for KeyWatch {
        fn matches(&self, record: &Record) -> bool {
            self.0.as_deref().is_none_or(|key| key == record.object_id)
        }

        fn index_key(&self) -> Option<&str> {
            self.0.as_deref()
        }
    }

    impl crate::source::EventSource for Keyed {
        fn name(&self) -> &'static str {
            "keyed"
        }

        fn subtypes(&self) -> &'static [&'static str] {
            &["change"]
        }

        // Never encoded here: these tests stop at the hub.
        fn signal(&self) -> &'static crate::signal::SignalKind {
            &crate::source::devices::signal::KIND
        }

        fn probe(&self) -> Availability {
            Availability::Available
        }

        fn parse_watch(&self, spec: &WatchSpec, _: &Identity) -> Result<PlannedWatch, Error> {
            let key = crate::source::spec_str(spec, "key")?;
            Ok(PlannedWatch::ready(
                policy::Scope::System,
                Box::new(KeyWatch(key)),
            ))
        }

        fn scan(&self) -> std::io::Result<Vec<Object>> {
            Ok(Vec::new())
        }

        fn open(&self) -> std::io::Result<crate::source::SourceStream> {
            Ok(Box::pin(futures_util::stream::pending()))
        }

        fn index_key<'r>(&self, record: &'r Record) -> Option<&'r str> {
            Some(&record.object_id)
        }
    }

    /// polkit is never asked: the callers here are root.
    struct NoPolkit;

    impl policy::Authority for NoPolkit {
        fn check<'a>(&'a self, _: &'a str, _: &'a str) -> policy::authority::Checked<'a> {
            Box::pin(async { Err("no polkit in unit tests".to_owned()) })
        }
    }

    fn keyed_hub(limits: Limits) -> Arc<Hub> {
        Hub::new(
            Registry::from_sources(vec![Arc::new(Keyed)]),
            DeliveryConfig::default(),
            limits,
        )
    }

    /// Adds a `keyed` watch (`key` None: every object) for `caller`.
    async fn add_keyed(
        hub: &Arc<Hub>,
        id: u64,
        caller: &Identity,
        tag: u64,
        key: Option<&str>,
    ) -> Result<(), Error> {
        let spec: WatchSpec = key
            .map(|k| {
                (
                    "key".to_owned(),
                    zbus::OwnedVariant::from(zbus::Str::from(k)),
                )
            })
            .into_iter()
            .collect();
        let planned = hub.plan_watch("keyed", &spec, caller)?;
        let authorizer = policy::Authorizer::new(Default::default(), Box::new(NoPolkit));
        let grant = authorizer
            .watch(caller, "keyed", planned.scope, || true)
            .await?;
        hub.add_watch(id, grant, tag, planned).await
    }

    fn publish_keyed(hub: &Hub, key: &str) {
        let record = Record {
            source: "keyed",
            object_id: key.into(),
            ..Record::clone(&record(0))
        };
        assert!(hub.publish(0, SourceMsg::Record(record)).is_continue());
    }

    fn tags(hub: &Hub, id: u64) -> Vec<u64> {
        hub.take(id, usize::MAX)
            .expect("subscription")
            .iter()
            .map(|d| match d {
                Delivery::Event { tag, .. } => *tag,
                other => panic!("{other:?}"),
            })
            .collect()
    }

    /// Watches that name a key are looked up by it, the others visited; a record reaches
    /// exactly the watches that match it, in the order they were added, also after one
    /// is removed.
    #[tokio::test]
    async fn indexed_and_visited_watches_deliver_exactly_and_in_order() {
        let hub = keyed_hub(Limits::default());
        let root = Identity::new(":1.1".into(), 0);
        let id = hub.subscribe(root.clone(), None).expect("subscribe").id;
        for (tag, key) in [(1, Some("a")), (2, None), (3, Some("b")), (4, Some("a"))] {
            add_keyed(&hub, id, &root, tag, key).await.expect("watch");
        }
        publish_keyed(&hub, "a");
        assert_eq!(tags(&hub, id), [1, 2, 4]);
        publish_keyed(&hub, "b");
        assert_eq!(tags(&hub, id), [2, 3]);
        publish_keyed(&hub, "c");
        assert_eq!(tags(&hub, id), [2]);
        hub.remove_watch(id, ":1.1", 1).await.expect("remove");
        publish_keyed(&hub, "a");
        assert_eq!(tags(&hub, id), [2, 4]);
        hub.remove_watch(id, ":1.1", 2).await.expect("remove");
        publish_keyed(&hub, "c");
        assert_eq!(tags(&hub, id), [0u64; 0]);
    }

    /// `limits.watches_per_uid` counts every subscription of every connection of a uid,
    /// and no other uid's.
    #[tokio::test]
    async fn watches_per_uid_count_across_connections() {
        let hub = keyed_hub(Limits {
            watches_per_uid: 3,
            ..Limits::default()
        });
        let (first, second) = (
            Identity::new(":1.1".into(), 0),
            Identity::new(":1.2".into(), 0),
        );
        let a = hub.subscribe(first.clone(), None).expect("subscribe").id;
        let b = hub.subscribe(second.clone(), None).expect("subscribe").id;
        add_keyed(&hub, a, &first, 1, Some("x")).await.expect("1st");
        add_keyed(&hub, a, &first, 2, None).await.expect("2nd");
        add_keyed(&hub, b, &second, 1, Some("y"))
            .await
            .expect("3rd");
        let refused = add_keyed(&hub, b, &second, 2, None).await;
        assert!(
            matches!(&refused, Err(Error::LimitExceeded(m)) if m.contains("limits.watches_per_uid")),
            "{refused:?}"
        );
        assert_eq!(hub.watches(b).len(), 1, "the refusal changed nothing");
        // Room again once a watch of the uid goes, on any of its connections.
        hub.remove_watch(a, ":1.1", 2).await.expect("remove");
        add_keyed(&hub, b, &second, 2, None)
            .await
            .expect("room again");
    }

    #[test]
    fn full_outbox_counts_exactly_what_it_drops_in_order() {
        let mut outbox = Outbox::new(3);
        for _ in 0..10 {
            outbox.push_event(1, record(0));
        }
        let mut out = Vec::new();
        outbox.pop(usize::MAX, &mut out);
        // Three events kept, then one Lost covering seq 4..=10.
        assert_eq!(seqs(&out), vec![(1, 1), (2, 1), (3, 1), (4, 7)]);

        // Room again: later events follow the loss, no gap.
        outbox.push_event(1, record(0));
        out.clear();
        outbox.pop(usize::MAX, &mut out);
        assert_eq!(seqs(&out), vec![(11, 1)]);
    }

    #[test]
    fn losses_interleave_with_events_that_fit() {
        let mut outbox = Outbox::new(1);
        outbox.push_event(1, record(0)); // 1 queued
        outbox.push_event(1, record(0)); // 2 lost
        let mut out = Vec::new();
        outbox.pop(1, &mut out); // frees room
        outbox.push_event(1, record(0)); // 3 queued after the loss
        outbox.push_event(1, record(0)); // 4 lost
        outbox.pop(usize::MAX, &mut out);
        assert_eq!(seqs(&out), vec![(1, 1), (2, 1), (3, 1), (4, 1)]);
        assert!(matches!(out[1], Delivery::Lost { .. }));
        assert!(matches!(out[3], Delivery::Lost { .. }));
        assert!(outbox.entries.len() <= outbox.depth + 1);
    }

    #[test]
    fn removal_completes_attributes_from_the_table() {
        let mut table = BTreeMap::new();
        let mut add = Record::clone(&record(0));
        add.change = Change::Upsert;
        add.attributes.insert("size".into(), 512u64.into());
        apply_to_table(&mut table, &mut add);
        assert_eq!(table["/devices/x"].changes, 1);
        let mut remove = Record::clone(&record(1));
        remove.change = Change::Remove;
        apply_to_table(&mut table, &mut remove);
        assert!(table.is_empty());
        assert_eq!(remove.attributes["size"], 512u64.into());
    }
}
