//! A subscription's watches: how they are planned, reserved against the limits, armed
//! and taken, the index that lets a record visit only the watches that may match it,
//! and their removal.

use std::collections::HashMap;
use std::ops::Deref;
use std::sync::Arc;

use crate::error::Error;
use crate::policy::{Grant, Identity};
use crate::source::{Availability, PlannedWatch, WatchHold, WatchMatcher, WatchSpec};

use super::{finish_stopping, Hub, WatchInfo};

/// A watch as the subscription holds it.
pub(super) struct Watch {
    pub(super) tag: u64,
    /// When it was added, among every subscription's watches (`State::next_watch`).
    pub(super) added: u64,
    pub(super) source: usize,
    pub(super) matcher: Box<dyn WatchMatcher>,
    /// What policy allowed; every event is checked against it again at publish.
    pub(super) grant: Grant,
    /// Kernel state kept for this watch; released when the watch is dropped.
    _hold: Option<WatchHold>,
}

/// A subscription's watches in the order they were added, with an index by source and
/// key ([`WatchMatcher::index_key`]) that is rebuilt whenever they change (at most
/// `limits.watches_per_subscription` of them), so that an event visits only the watches
/// of its source that have no key or the event's key.
#[derive(Default)]
pub(super) struct Watches {
    list: Vec<Watch>,
    /// Watches an `AddWatch` reserved and is still arming: they count against the limits.
    reserved: usize,
    /// One entry per source watched.
    by_source: Vec<SourceWatches>,
}

/// Positions in [`Watches::list`] of one source's watches, each list in ascending order.
struct SourceWatches {
    pub(super) source: usize,
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
    pub(super) fn take_where(&mut self, gone: impl FnMut(&Watch) -> bool) -> Vec<Watch> {
        let (gone, kept) = std::mem::take(&mut self.list).into_iter().partition(gone);
        self.list = kept;
        self.reindex();
        gone
    }

    /// The watch with `tag`, to replace its grant (the index does not depend on it).
    pub(super) fn get_mut(&mut self, tag: u64) -> Option<&mut Watch> {
        self.list.iter_mut().find(|w| w.tag == tag)
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
    pub(super) fn candidates<'w>(
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

impl Hub {
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
        let watch_spec_size = self.limits().watch_spec_size;
        if size > watch_spec_size {
            return Err(Error::LimitExceeded(format!(
                "a watch spec may have at most {} keys, strings and elements, this one has {size}",
                watch_spec_size
            )));
        }
        self.registry.all()[index].parse_watch(spec, requester)
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
            state.next_watch += 1;
            let added = state.next_watch;
            let mut installed = None;
            let taken = armed.and_then(|armed| {
                let sub = Self::owned(&mut state, id, caller)?;
                if sub.watches.iter().any(|w| w.tag == tag) {
                    return Err(Error::InvalidArgument(format!(
                        "tag {tag} is already used by a watch of this subscription"
                    )));
                }
                installed = armed.installed;
                sub.watches.push(Watch {
                    tag,
                    added,
                    source: index,
                    matcher: armed.matcher,
                    grant,
                    _hold: armed.hold,
                });
                Ok(())
            });
            match taken {
                Ok(()) => {
                    drop(state);
                    if let Some(installed) = installed {
                        installed();
                    }
                    return Ok(());
                }
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
        let limits = self.limits();
        let mut state = self.lock();
        let sub = Self::owned(&mut state, id, caller)?;
        if sub.watches.iter().any(|w| w.tag == tag) {
            return Err(Error::InvalidArgument(format!(
                "tag {tag} is already used by a watch of this subscription"
            )));
        }
        if sub.watches.len() + sub.watches.reserved >= limits.watches_per_subscription {
            return Err(Error::LimitExceeded(format!(
                "at most {} watches per subscription (limits.watches_per_subscription)",
                limits.watches_per_subscription
            )));
        }
        let uid = sub.identity.uid;
        let per_uid: usize = state
            .subscriptions
            .values()
            .filter(|s| s.identity.uid == uid)
            .map(|s| s.watches.len() + s.watches.reserved)
            .sum();
        if per_uid >= limits.watches_per_uid {
            return Err(Error::LimitExceeded(format!(
                "at most {} watches per user across all connections (limits.watches_per_uid); \
                 uid {uid} has {per_uid}: remove some or close subscriptions",
                limits.watches_per_uid
            )));
        }
        self.ensure_running(&mut state, index)?;
        state.sources[index].watches += 1;
        self.touch_stats();
        if let Some(sub) = state.subscriptions.get_mut(&id) {
            sub.watches.reserved += 1;
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::testing::record;
    use crate::dispatch::{Delivery, DeliveryConfig, Limits};
    use crate::event::{Object, Record, SourceMsg};
    use crate::policy::{self, Identity};
    use crate::source::Registry;

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
            let key = crate::source::spec::spec_str(spec.get("key"), "key")?;
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

    /// Revocation in the hub: a watch whose grant predates a policy change is listed as
    /// stale; ended, its queued events become one exact `Lost` (policy-changed) in place,
    /// `WatchRemoved` follows, and later events reach only the other watch, which a
    /// fresh grant takes off the stale list. Numbering stays contiguous.
    #[tokio::test]
    async fn a_revoked_watch_ends_after_its_withheld_events_and_receives_nothing_more() {
        let hub = keyed_hub(Limits::default());
        let root = Identity::new(":1.1".into(), 0);
        let id = hub.subscribe(root.clone(), None).expect("subscribe").id;
        add_keyed(&hub, id, &root, 1, Some("a"))
            .await
            .expect("watch");
        add_keyed(&hub, id, &root, 2, None).await.expect("watch");
        publish_keyed(&hub, "a");
        publish_keyed(&hub, "b");
        let authorizer = policy::Authorizer::new(Default::default(), Box::new(NoPolkit));
        let epoch = authorizer.set_config(Default::default());
        let stale = hub.stale_watches(epoch);
        assert_eq!(stale.iter().map(|w| w.tag).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(
            hub.revoke(&stale[1], "policy-changed")
                .await
                .expect("revoke"),
            2
        );
        assert!(
            hub.revoke(&stale[1], "policy-changed").await.is_err(),
            "ended twice"
        );
        // The metrics count exactly what was withheld, under its reason.
        let stats = hub.stats();
        let keyed = stats.sources.iter().find(|s| s.name == "keyed");
        assert_eq!(keyed.map(|s| s.lost_policy_changed), Some(2));
        let grant = authorizer
            .watch(&root, "keyed", policy::Scope::System, || true)
            .await
            .expect("grant");
        assert!(hub.regrant(&stale[0], grant));
        assert!(hub.stale_watches(epoch).is_empty());
        publish_keyed(&hub, "a");
        publish_keyed(&hub, "b");
        let delivered = hub.take(id, usize::MAX).expect("subscription");
        let described: Vec<String> = delivered
            .iter()
            .map(|d| match d {
                Delivery::Event { seq, tag, .. } => format!("{seq} event {tag}"),
                Delivery::Lost {
                    seq, count, reason, ..
                } => format!("{seq} lost {count} {}", reason.as_str()),
                Delivery::WatchRemoved { seq, tag, reason } => {
                    format!("{seq} removed {tag} {reason}")
                }
            })
            .collect();
        assert_eq!(
            described,
            [
                "1 event 1",
                "2 lost 2 policy-changed",
                "4 removed 2 policy-changed",
                "5 event 1",
            ]
        );
    }

    /// A limit lowered by a reload takes nothing away: the subscription over it keeps
    /// every watch (and receives through them) but cannot add one until it is under it.
    #[tokio::test]
    async fn a_lowered_limit_keeps_what_exists_and_refuses_more() {
        let hub = keyed_hub(Limits::default());
        let root = Identity::new(":1.1".into(), 0);
        let id = hub.subscribe(root.clone(), None).expect("subscribe").id;
        for tag in 1..=3 {
            add_keyed(&hub, id, &root, tag, None).await.expect("watch");
        }
        hub.set_settings(
            DeliveryConfig::default(),
            Limits {
                watches_per_subscription: 2,
                ..Limits::default()
            },
        );
        assert_eq!(hub.watches(id).len(), 3, "the reload took watches away");
        publish_keyed(&hub, "a");
        assert_eq!(tags(&hub, id), [1, 2, 3]);
        let refused = add_keyed(&hub, id, &root, 4, None).await;
        assert!(
            matches!(&refused, Err(Error::LimitExceeded(m)) if m.contains("limits.watches_per_subscription")),
            "{refused:?}"
        );
        hub.remove_watch(id, ":1.1", 1).await.expect("remove");
        hub.remove_watch(id, ":1.1", 2).await.expect("remove");
        add_keyed(&hub, id, &root, 4, None)
            .await
            .expect("under the limit again");
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
}
