//! Charging a namespace's work to its watchers, throttling a user past their share, and
//! the resync that ends a throttle or a kernel queue overflow (see the `budget` module).

use super::budget::Counters;
use super::reader::{reread_interval, Reader};
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
        let Some(ns) = self.namespaces.get_mut(&id).filter(|ns| !ns.busy) else {
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
        // Registered right after the look: a change between the two syscalls would be
        // taken in by epoll's first poll and never reported (see `Namespace::mountinfo`),
        // a window of microseconds where a job's was its whole run.
        if let Err(e) = ns.unpark() {
            tracing::error!(
                source = NAME,
                namespace = id,
                "registering its fds again: {e}"
            );
        }
    }

    /// Brings namespace `id` up to date after a throttle or a kernel queue overflow:
    /// hands it to a resync on a blocking thread ([`job`]), so that the other
    /// namespaces are read meanwhile; [`Reader::done`] takes the result.
    pub(super) fn resync(&mut self, id: u64) {
        if let Some(ns) = self.namespaces.get_mut(&id) {
            ns.throttled_until = None;
            ns.reread_due = None;
            ns.stale = false;
        }
        self.hand_off(id, job::Work::Resync);
    }

    /// Hands namespace `id`'s group, a duplicate of its mountinfo and its cache to
    /// `work` on a blocking thread; until it is done the namespace is not read (the
    /// kernel queues what happens in it), and a `POLLPRI` on its mountinfo meanwhile
    /// schedules the reread that follows the job.
    pub(super) fn hand_off(&mut self, id: u64, work: job::Work) {
        let Some(ns) = self.namespaces.get_mut(&id) else {
            return;
        };
        if ns.busy {
            return;
        }
        // Registered before the job reads it (see `Namespace::mountinfo`): what changes
        // until then is in the job's read, what changes after wakes the reader.
        let registered = ns.unpark().and_then(|()| ns.mountinfo_for_job());
        let mountinfo = match registered {
            Ok(mountinfo) => mountinfo,
            Err(e) => {
                tracing::error!(source = NAME, namespace = id, "handing to a job: {e}");
                return;
            }
        };
        let group = ns.take_group();
        ns.busy = true;
        let held = job::Held {
            id,
            group,
            mountinfo,
            mounts: std::mem::take(&mut ns.mounts),
            lines: std::mem::take(&mut ns.lines),
        };
        self.spawn(held, work);
    }

    /// Runs `work` on a blocking thread; [`Reader::done`] takes the result.
    pub(super) fn spawn(&self, held: job::Held, work: job::Work) {
        let done = self.jobs_done.0.clone();
        tokio::task::spawn_blocking(move || {
            // The receiver lives as long as the reader; gone, nobody needs the result.
            let _ = done.send(held.run(work));
        });
    }

    /// Takes a job's result: the namespace's cache and fds back (read again unless a
    /// throttle came meanwhile, whose end looks again), what it found published (a
    /// resync's difference, with `Lost(kernel-overflow)` to the namespace's watchers;
    /// a reread's records), and the work charged to the watchers.
    pub(super) fn done(&mut self, done: job::Done) {
        let job::Held {
            id,
            group,
            mountinfo,
            mounts,
            lines,
        } = done.held;
        // Gone meanwhile (its last watch ended, its last process exited), perhaps
        // watched again since (a new entry, not busy): the fds close here.
        let Some(ns) = self.namespaces.get_mut(&id).filter(|ns| ns.busy) else {
            return;
        };
        if let job::Outcome::Listed(Err(e)) = &done.outcome {
            // Never listed: nobody watches it yet.
            for reply in std::mem::take(&mut ns.arming) {
                let _ = reply.send(Err(crate::error::Error::Unavailable(format!(
                    "listing mount namespace {id}: {e}"
                ))));
            }
            self.namespaces.remove(&id);
            return;
        }
        ns.busy = false;
        ns.mounts = mounts;
        ns.lines = lines;
        // The job's duplicate closes; the namespace's own mountinfo stayed registered,
        // or was parked by a throttle meanwhile, whose end looks again.
        drop(mountinfo);
        if let Err(e) = ns.put_group(group) {
            // Unread from now on; its watchers still hear of it when it goes.
            tracing::error!(
                source = NAME,
                namespace = id,
                "registering its fanotify group again: {e}"
            );
        }
        let counters = &self.shared.counters;
        match done.outcome {
            job::Outcome::Resynced {
                drained,
                upserted,
                removed,
            } => {
                Counters::add(&counters.coalesced, drained);
                Counters::add(&counters.resyncs, 1);
                self.pending.push_back((
                    SourceMsg::Resync {
                        object: namespace_object(id),
                        upserted,
                        removed,
                    },
                    None,
                ));
            }
            job::Outcome::Listed(listed) => {
                let arming = std::mem::take(&mut ns.arming);
                self.pending.push_back((
                    SourceMsg::Replace {
                        prefix: object_prefix(id),
                        objects: listed.unwrap_or_default(),
                    },
                    Some((arming, id)),
                ));
            }
            job::Outcome::Reread(records) => {
                let ended = Instant::now();
                ns.last_reread = Some((ended, done.took));
                // A `POLLPRI` during the job scheduled the next reread from the one before
                // it, whose interval has passed: paced from this one instead (back to back,
                // rereads took 3% of a paced churn's time in CI, against the 2% bound).
                if let Some(due) = ns.reread_due.as_mut() {
                    *due = (*due).max(ended + reread_interval(done.took));
                }
                counters.reread(done.cost);
                self.pending
                    .extend(records.into_iter().map(|r| (SourceMsg::Record(r), None)));
            }
        }
        self.charge(id, done.cost);
    }
}

/// The namespace a message of this source is about, to charge its publishing to.
pub(super) fn namespace_of(msg: &SourceMsg) -> Option<u64> {
    match msg {
        SourceMsg::Record(record) => record.attr_u64("namespace"),
        SourceMsg::Resync { object, .. } => namespace_of_object(object),
        SourceMsg::Replace { prefix, .. } => prefix.strip_suffix('/')?.parse().ok(),
        _ => None,
    }
}
