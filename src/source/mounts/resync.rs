//! Charging a namespace's work to its watchers, throttling a user past their share, and
//! the resync that ends a throttle or a kernel queue overflow (see the `budget` module).

use super::budget::Counters;
use super::describe::*;
use super::reader::{read_lines, Namespace, Reader};
use super::*;

use std::time::Instant;

use nix::poll::{PollFd, PollFlags, PollTimeout};

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
        let Some(ns) = self.namespaces.get_mut(&id) else {
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
    /// its fanotify queue drained unread, its mounts listed again and its mountinfo
    /// reread; the hub replaces the namespace's part of its table and tells the watchers
    /// of the namespace (only them) `Lost(kernel-overflow)`.
    pub(super) fn resync(&mut self, id: u64) {
        let Some(ns) = self.namespaces.get_mut(&id) else {
            return;
        };
        ns.throttled_until = None;
        ns.reread_due = None;
        if let Err(e) = ns.unpark() {
            // Unread from now on; its watchers still hear of it when it goes.
            tracing::error!(
                source = NAME,
                namespace = id,
                "registering its fds again: {e}"
            );
            return;
        }
        let drained = drain(ns, &mut self.buf);
        Counters::add(&self.shared.counters.coalesced, drained);
        Counters::add(&self.shared.counters.resyncs, 1);
        if let Some(mountinfo) = ns.mountinfo.as_mut() {
            if let Some(Ok(mut guard)) = mountinfo.ready(Interest::PRIORITY).now_or_never() {
                guard.clear_ready_matching(Ready::PRIORITY);
            }
        }
        match ns.mountinfo.as_mut().map(|m| read_lines(m.get_mut())) {
            None => {}
            Some(Ok(lines)) => ns.lines = lines,
            Some(Err(e)) => {
                tracing::warn!(source = NAME, namespace = id, "reading mountinfo: {e}")
            }
        }
        match describe_all(id) {
            Ok(mounts) => ns.mounts = mounts.into_iter().map(|m| (m.id, m)).collect(),
            Err(e) => tracing::error!(source = NAME, "rescanning namespace {id}: {e}"),
        }
        let objects = ns.mounts.values().map(object_of).collect();
        self.pending.push_back((
            SourceMsg::Resync {
                prefix: object_prefix(id),
                object: namespace_object(id),
                objects,
            },
            None,
        ));
    }
}

/// Reads a namespace's fanotify queue to its end without looking at what it says
/// (a resync lists the namespace instead); returns how many events that was.
fn drain(ns: &mut Namespace, buf: &mut [u8]) -> u64 {
    let Some(group) = &ns.group else {
        return 0;
    };
    let mut events = 0u64;
    loop {
        match nix::unistd::read(group.get_ref(), buf) {
            Ok(n) if n > 0 => {
                for event in wire::fanotify_events(&buf[..n]).unwrap_or_default() {
                    events += 1;
                    if event.fd >= 0 {
                        // SAFETY: the kernel installed this fd for us; closing it is ours.
                        drop(unsafe { OwnedFd::from_raw_fd(event.fd) });
                    }
                }
            }
            // Empty (EAGAIN) or failing: the next read of the group says why, if ever.
            _ => break,
        }
    }
    if let Some(Ok(mut guard)) = group.readable().now_or_never() {
        guard.clear_ready();
    }
    events
}

/// The namespace a message of this source is about, to charge its publishing to.
pub(super) fn namespace_of(msg: &SourceMsg) -> Option<u64> {
    match msg {
        SourceMsg::Record(record) => record.attr_u64("namespace"),
        SourceMsg::Resync { prefix, .. } | SourceMsg::Replace { prefix, .. } => {
            prefix.strip_suffix('/')?.parse().ok()
        }
        _ => None,
    }
}

/// Whether `fd` polls with `flags` right now (no wait).
fn has_input(fd: &impl std::os::fd::AsFd, flags: PollFlags) -> bool {
    let mut fds = [PollFd::new(fd.as_fd(), flags)];
    nix::poll::poll(&mut fds, PollTimeout::ZERO).is_ok_and(|n| n > 0)
        && fds[0].revents().is_some_and(|r| r.intersects(flags))
}
