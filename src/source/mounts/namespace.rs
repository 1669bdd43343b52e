//! One watched mount namespace as the reader holds it: its fds (registered with the
//! runtime, parked by a throttle, or with a job), its cache, its watchers and timers.

use super::lines::Line;
use super::reader::Acknowledge;
use super::*;

use std::time::Instant;

pub(super) struct Namespace {
    pub(super) id: u64,
    pub(super) inode: (u64, u64),
    /// `None` without fanotify mount events (mountinfo alone follows the namespace),
    /// and while parked.
    pub(super) group: Option<AsyncFd<OwnedFd>>,
    /// `None` while parked. Registered before its first read and kept registered while
    /// a job reads a duplicate of it: the kernel's `POLLPRI` on mountinfo is taken in
    /// by the poll that reports it (one event counter per open file), and epoll polls
    /// an fd once when it is added and again when it delivers, so a change made while
    /// the fd was out of the epoll set is taken in by the first poll and dropped by the
    /// second: never reported. (A remount storm that began during a reread job went
    /// unreported that way until the next change.)
    pub(super) mountinfo: Option<AsyncFd<File>>,
    /// The group and mountinfo while the namespace's watchers are throttled: taken out
    /// of the runtime's epoll set, because a registered fd wakes the daemon on every
    /// kernel event even when nobody reads it, and those wakeups (one per change of a
    /// churning namespace) are work charged to no one. Registered again when the
    /// throttle ends, which looks for changes first (see `Reader::end_throttle`).
    pub(super) parked: Option<(Option<OwnedFd>, File)>,
    /// The process this namespace was named by; `None` for the daemon's own.
    pub(super) anchor: Option<AsyncFd<OwnedFd>>,
    pub(super) mounts: HashMap<u64, StatMount>,
    pub(super) lines: HashMap<u32, Line>,
    pub(super) watches: usize,
    /// The users watching it (with how many watches each): its work is charged to them.
    pub(super) watchers: HashMap<u32, usize>,
    /// Set while a watcher is over their share: the namespace is not read until then,
    /// and is resynced then.
    pub(super) throttled_until: Option<Instant>,
    /// With fanotify: when the mountinfo reread that `POLLPRI` asked for is due
    /// (coalesced: one per namespace per [`reread_interval`]).
    pub(super) reread_due: Option<Instant>,
    /// When the last reread ended, and what it took by the clock (see the module doc).
    pub(super) last_reread: Option<(Instant, Duration)>,
    /// A throttle cancelled a due reread: its resync must relist whatever else says.
    pub(super) stale: bool,
    /// A job has its group, a duplicate of its mountinfo and its cache (see `job`): not
    /// read, no timer, until it is done; a `POLLPRI` meanwhile schedules a reread.
    pub(super) busy: bool,
    /// The reader's turn at which its group was last read: of the namespaces ready, the
    /// one read longest ago goes first.
    pub(super) served: u64,
    /// Arm requests waiting for the namespace's first listing (a job): answered once
    /// the hub holds its mounts.
    pub(super) arming: Vec<Acknowledge>,
}

impl Namespace {
    /// Takes the namespace's fds out of the runtime (see [`Namespace::parked`]); a job's
    /// group is parked when it comes back.
    pub(super) fn park(&mut self) {
        if self.parked.is_some() {
            return;
        }
        let Some(mountinfo) = self.mountinfo.take() else {
            return;
        };
        let group = self.group.take().map(AsyncFd::into_inner);
        self.parked = Some((group, mountinfo.into_inner()));
    }

    /// Takes the group out for a job (out of the runtime, or out of the parked pair).
    pub(super) fn take_group(&mut self) -> Option<OwnedFd> {
        match self.group.take() {
            Some(group) => Some(group.into_inner()),
            None => self.parked.as_mut().and_then(|(group, _)| group.take()),
        }
    }

    /// Puts back the group a job had: parked if the namespace is, else registered.
    pub(super) fn put_group(&mut self, group: Option<OwnedFd>) -> io::Result<()> {
        match &mut self.parked {
            Some((parked, _)) => *parked = group,
            None => {
                self.group = group
                    .map(|group| register(group, Interest::READABLE))
                    .transpose()?
            }
        }
        Ok(())
    }

    /// A duplicate of its mountinfo for a job to read (the same open file: reading it
    /// takes in no `POLLPRI`).
    pub(super) fn mountinfo_for_job(&self) -> io::Result<File> {
        let file = match (&self.mountinfo, &self.parked) {
            (Some(registered), _) => registered.get_ref(),
            (None, Some((_, parked))) => parked,
            (None, None) => return Err(io::Error::other("the namespace has no mountinfo")),
        };
        file.try_clone()
    }

    /// Registers the namespace's fds with the runtime again.
    pub(super) fn unpark(&mut self) -> io::Result<()> {
        let Some((group, mountinfo)) = self.parked.take() else {
            return Ok(());
        };
        self.group = group
            .map(|group| register(group, Interest::READABLE))
            .transpose()?;
        self.mountinfo = Some(register(mountinfo, Interest::PRIORITY)?);
        Ok(())
    }
}
