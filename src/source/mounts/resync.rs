//! Charging a namespace's work to its watchers, throttling a user past their share, and
//! the resync that ends a throttle or a kernel queue overflow (see the `budget` module).

use super::budget::Counters;
use super::reader::Reader;
use super::*;

use std::time::Instant;

use nix::poll::PollFlags;

use super::job::{self, has_input};

impl Reader {
    /// Charges `cost` of work on namespace `id` to each of its watchers but root, and
    /// throttles whoever that puts over their share.
    pub(super) fn charge(&mut self, id: u64, cost: Duration) {
        let Some(ns) = self.namespaces.get(&id) else {
            return;
        };
        let now = Instant::now();
        let users: Vec<u32> = ns.watchers.keys().copied().filter(|&u| u != 0).collect();
        for uid in users {
            if let Some(until) = self.budget.charge(uid, cost, now) {
                self.throttle(uid, until);
            }
        }
    }

    /// Stops reading every namespace `uid` watches until `until`.
    fn throttle(&mut self, uid: u32, until: Instant) {
        let mut newly = false;
        for ns in self
            .namespaces
            .values_mut()
            .filter(|ns| ns.watchers.contains_key(&uid))
        {
            newly |= ns.throttled_until.is_none();
            ns.throttled_until = Some(ns.throttled_until.map_or(until, |t| t.max(until)));
            // The resync rereads everything.
            ns.stale |= ns.reread_due.is_some();
            ns.reread_due = None;
            ns.park();
        }
        if newly {
            Counters::add(&self.shared.counters.throttled, 1);
            tracing::debug!(
                source = NAME,
                uid,
                "a user's mount namespaces took more than their share; coalescing their \
                 events until {:?} from now",
                until.saturating_duration_since(Instant::now())
            );
        }
    }

    /// Ends the throttle of namespace `id`: resyncs it if anything happened in it
    /// meanwhile (its fanotify queue holds events, its mountinfo polls as changed, or a
    /// reread was due), else only reads it again. Without that check, a resync that
    /// itself put a user over their share would end in a throttle, and that throttle in
    /// another resync, for as long as the namespace exists.
    pub(super) fn end_throttle(&mut self, id: u64) {
        let Some(ns) = self.namespaces.get_mut(&id).filter(|ns| !ns.resyncing) else {
            return;
        };
        let queued = ns
            .group
            .as_ref()
            .map(|g| g.get_ref())
            .or(ns.parked.as_ref().and_then(|(group, _)| group.as_ref()));
        let events = queued.is_some_and(|fd| has_input(fd, PollFlags::POLLIN));
        let mountinfo = ns
            .mountinfo
            .as_ref()
            .map(|m| m.get_ref())
            .or(ns.parked.as_ref().map(|(_, m)| m));
        // mountinfo polls POLLPRI once per change since it was last polled so.
        let changed = mountinfo.is_some_and(|fd| has_input(fd, PollFlags::POLLPRI));
        if events || changed || ns.stale {
            ns.stale = false;
            self.resync(id);
            return;
        }
        ns.throttled_until = None;
        if let Err(e) = ns.unpark() {
            tracing::error!(
                source = NAME,
                namespace = id,
                "registering its fds again: {e}"
            );
        }
    }

    /// Brings namespace `id` up to date after a throttle or a kernel queue overflow:
    /// hands its fds and cache to a resync on a blocking thread ([`job`]), so that the
    /// other namespaces are read meanwhile; [`Reader::resynced`] takes the result.
    pub(super) fn resync(&mut self, id: u64) {
        let Some(ns) = self.namespaces.get_mut(&id) else {
            return;
        };
        if ns.resyncing {
            return;
        }
        ns.throttled_until = None;
        ns.reread_due = None;
        ns.stale = false;
        ns.park();
        let Some((group, mountinfo)) = ns.parked.take() else {
            return;
        };
        ns.resyncing = true;
        let resync = job::Resync {
            id,
            group,
            mountinfo,
            mounts: std::mem::take(&mut ns.mounts),
            lines: std::mem::take(&mut ns.lines),
        };
        let done = self.resynced.0.clone();
        tokio::task::spawn_blocking(move || {
            // The receiver lives as long as the reader; gone, nobody needs the result.
            let _ = done.send(resync.run());
        });
    }

    /// Takes a resync's result: the namespace's cache and fds back (read again unless a
    /// throttle came meanwhile, whose end looks again), the hub told what changed and
    /// the namespace's watchers `Lost(kernel-overflow)`, and the work charged to them.
    pub(super) fn resynced(&mut self, done: job::Resynced) {
        let job::Resync {
            id,
            group,
            mountinfo,
            mounts,
            lines,
        } = done.namespace;
        // Gone meanwhile (its last watch ended, its last process exited), perhaps
        // watched again since (a new entry, not resyncing): the fds close here.
        let Some(ns) = self.namespaces.get_mut(&id).filter(|ns| ns.resyncing) else {
            return;
        };
        ns.resyncing = false;
        ns.mounts = mounts;
        ns.lines = lines;
        ns.parked = Some((group, mountinfo));
        if ns.throttled_until.is_none() {
            if let Err(e) = ns.unpark() {
                // Unread from now on; its watchers still hear of it when it goes.
                tracing::error!(
                    source = NAME,
                    namespace = id,
                    "registering its fds again: {e}"
                );
            }
        }
        Counters::add(&self.shared.counters.coalesced, done.drained);
        Counters::add(&self.shared.counters.resyncs, 1);
        self.pending.push_back((
            SourceMsg::Resync {
                object: namespace_object(id),
                upserted: done.upserted,
                removed: done.removed,
            },
            None,
        ));
        self.charge(id, done.cost);
    }
}

/// The namespace a message of this source is about, to charge its publishing to.
pub(super) fn namespace_of(msg: &SourceMsg) -> Option<u64> {
    match msg {
        SourceMsg::Record(record) => record.attr_u64("namespace"),
        SourceMsg::Resync { object, .. } => object.strip_prefix("mntns:")?.parse().ok(),
        SourceMsg::Replace { prefix, .. } => prefix.strip_suffix('/')?.parse().ok(),
        _ => None,
    }
}
