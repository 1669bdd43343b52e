//! A namespace's whole-table work, done on a blocking thread rather than the reader's
//! task: a resync, and a mountinfo reread of a large namespace.
//!
//! A resync (after a throttle or a kernel queue overflow) drains the namespace's
//! fanotify queue, lists its mounts and reads its whole mountinfo: 20-25 ms of CPU at
//! 10,000 mounts. When it ran on the reader's task, and also described every mount and
//! handed the hub the whole list (60 ms more under the hub's lock), every other
//! namespace's events waited behind it, another user's included: in `benches/mounts`
//! bob's p99 latency during alice's storm was 150 ms, against 0.5 ms without it.
//!
//! Now the job takes the namespace's group, a duplicate of its mountinfo and its cache
//! while it runs (the namespace is not read meanwhile: the kernel queues what happens in
//! it, and a `POLLPRI` schedules a reread after the job), the reader serves the other
//! namespaces, and the job hands back the cache and the difference the hub applies, in
//! proportion to what changed. The job yields the CPU between reads (`sched_yield`):
//! on a 2-core machine where alice's own churn takes one core, bob's event otherwise
//! waited out the scheduler's slice behind it (p99 about 4 ms). Running it under
//! `SCHED_IDLE` instead was worse (p99 up to 640 ms): preempted while the kernel's
//! mount namespace lock was held for its reads, it held up every `statmount`.

use super::budget::thread_cpu;
use super::describe::*;
use super::lines::{read_lines, reread, Line};
use super::*;

use std::cell::Cell;
use std::collections::HashSet;
use std::time::Instant;

use nix::poll::{PollFd, PollFlags, PollTimeout};

/// A namespace handed to a job: its group, a duplicate of its mountinfo (the reader
/// still hears its `POLLPRI`) and what was last known of it.
pub(super) struct Held {
    pub(super) id: u64,
    pub(super) group: Option<OwnedFd>,
    pub(super) mountinfo: File,
    pub(super) mounts: HashMap<u64, StatMount>,
    pub(super) lines: HashMap<u32, Line>,
}

/// What a job does with the namespace.
pub(super) enum Work {
    /// After a throttle or a kernel queue overflow: see [`Held::resync`].
    Resync,
    /// A namespace's first listing, when a watch names it.
    List,
    /// A mountinfo reread of a large namespace (remounts; everything without fanotify):
    /// the new read diffed with the cached one ([`reread`]).
    Reread { follow_topology: bool },
}

/// What a job found.
pub(super) enum Outcome {
    Resynced {
        /// Kernel events read unparsed.
        drained: u64,
        upserted: Vec<Object>,
        removed: Vec<String>,
    },
    /// The records of what the reread found changed.
    Reread(Vec<Record>),
    /// The namespace's mounts, or why they could not be listed.
    Listed(Result<Vec<Object>, String>),
}

/// What a job hands back: the namespace's fds and cache, up to date, and what it found.
pub(super) struct Done {
    pub(super) held: Held,
    pub(super) outcome: Outcome,
    /// The job's CPU time, charged to the namespace's watchers.
    pub(super) cost: Duration,
    /// Its time by the clock, less what it gave other threads when it yielded (a
    /// reread's pacing is by the clock: see the module doc of `mounts`; counting the
    /// yields, a loaded machine stretched a 20 ms reread to seconds between rereads).
    pub(super) took: Duration,
}

impl Held {
    /// Does `work` (on a blocking thread).
    pub(super) fn run(mut self, work: Work) -> Done {
        let (started, cpu) = (Instant::now(), thread_cpu());
        // Takes in the POLLPRI of the changes so far, which the job's read sees: the
        // reader, whose epoll set holds the same open file, is woken only by later ones.
        has_input(&self.mountinfo, PollFlags::POLLPRI);
        let yielded = Cell::new(Duration::ZERO);
        let pause = || {
            let at = Instant::now();
            std::thread::yield_now();
            yielded.set(yielded.get() + at.elapsed());
        };
        let outcome = match work {
            Work::Resync => self.resync(&pause),
            Work::Reread { follow_topology } => {
                Outcome::Reread(self.reread(follow_topology, &pause))
            }
            Work::List => Outcome::Listed(self.list(&pause).map_err(|e| e.to_string())),
        };
        Done {
            cost: thread_cpu().saturating_sub(cpu),
            took: started.elapsed().saturating_sub(yielded.get()),
            held: self,
            outcome,
        }
    }

    /// Reads the mountinfo and describes every mount.
    fn list(&mut self, pause: &dyn Fn()) -> io::Result<Vec<Object>> {
        self.lines = read_lines(&mut self.mountinfo, pause)?;
        self.mounts = describe_all_with(self.id, pause)?
            .into_iter()
            .map(|m| (m.id, m))
            .collect();
        Ok(self.mounts.values().map(object_of).collect())
    }

    fn reread(&mut self, follow_topology: bool, pause: &dyn Fn()) -> Vec<Record> {
        reread(
            self.id,
            &mut self.mountinfo,
            &mut self.mounts,
            &mut self.lines,
            follow_topology,
            pause,
        )
    }

    /// Drains the namespace's fanotify queue unread, then lists its mounts and reads
    /// its mountinfo: a mount listed and not cached is new, one cached and not listed is
    /// gone, and one whose mountinfo line differs from the last read is described again
    /// (a remount, a move); every other mount is as cached. Drained first, so that what
    /// happens after the listing is read as events once the reader has the fds back.
    fn resync(&mut self, pause: &dyn Fn()) -> Outcome {
        let drained = self.group.as_ref().map_or(0, |group| drain(group, pause));
        let (mut upserted, mut removed) = (Vec::new(), Vec::new());
        match list_mounts(self.id).and_then(|listed| {
            let lines = read_lines(&mut self.mountinfo, pause)?;
            Ok((listed, lines))
        }) {
            Ok((listed, lines)) => {
                self.apply(listed, lines, &mut upserted, &mut removed);
            }
            // The cache stays as it was; the watchers still hear `Lost`.
            Err(e) => tracing::error!(source = NAME, "rescanning namespace {}: {e}", self.id),
        }
        Outcome::Resynced {
            drained,
            upserted,
            removed,
        }
    }

    fn apply(
        &mut self,
        listed: Vec<u64>,
        lines: HashMap<u32, Line>,
        upserted: &mut Vec<Object>,
        removed: &mut Vec<String>,
    ) {
        let id = self.id;
        let listed: HashSet<u64> = listed.into_iter().collect();
        self.mounts.retain(|mount, _| {
            let kept = listed.contains(mount);
            if !kept {
                removed.push(object_id(id, *mount));
            }
            kept
        });
        // A mount that exists keeps its mountinfo id, so a changed line at that id is
        // its own.
        let by_old_id: HashMap<u32, u64> = self.mounts.values().map(|m| (m.old_id, m.id)).collect();
        let mut look_at: Vec<u64> = lines
            .iter()
            .filter(|(old_id, line)| self.lines.get(old_id) != Some(line))
            .filter_map(|(old_id, _)| by_old_id.get(old_id).copied())
            .chain(
                listed
                    .iter()
                    .copied()
                    .filter(|mount| !self.mounts.contains_key(mount)),
            )
            .collect();
        self.lines = lines;
        look_at.sort_unstable();
        look_at.dedup();
        let mut buf = vec![0u64; 512];
        for mount in look_at {
            match statmount(mount, id, &mut buf) {
                Ok(now) => {
                    if self.mounts.get(&mount) != Some(&now) {
                        upserted.push(object_of(&now));
                        self.mounts.insert(mount, now);
                    }
                }
                // Gone since the listing: its detach is in the queue, read as an event.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => tracing::warn!(source = NAME, mount, "statmount: {e}"),
            }
        }
    }
}

/// Reads a fanotify queue to its end without looking at what it says (a resync lists
/// the namespace instead); returns how many events that was.
fn drain(group: &OwnedFd, pause: &dyn Fn()) -> u64 {
    let mut buf = vec![0u8; READ_BUFFER];
    let mut events = 0u64;
    loop {
        pause();
        match nix::unistd::read(group, &mut buf) {
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
    events
}

/// Whether `fd` polls with `flags` right now (no wait).
pub(super) fn has_input(fd: &impl std::os::fd::AsFd, flags: PollFlags) -> bool {
    let mut fds = [PollFd::new(fd.as_fd(), flags)];
    nix::poll::poll(&mut fds, PollTimeout::ZERO).is_ok_and(|n| n > 0)
        && fds[0].revents().is_some_and(|r| r.intersects(flags))
}
