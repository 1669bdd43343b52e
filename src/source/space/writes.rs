//! What runs while someone watches space: the fanotify engine's handler
//! ([`crate::sys::fanotify::engine`]) that turns writes into `statfs` calls, at most one
//! per filesystem per [`INTERVAL`], and those into warnings.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::AsFd;
use std::time::Instant;

use super::levels::{evaluate, Levels, Threshold, Usage};
use super::{record, INTERVAL, MASK, NAME, SETTLE};
use crate::event::SourceMsg;
use crate::sys::fanotify::engine::Handler;
use crate::sys::fanotify::{wire, Fanotify};
use crate::sys::resolve::{FsInfo, Place};

pub(super) struct WatchState {
    pub fsid: u64,
    pub path: String,
    pub threshold: Threshold,
    pub uid: u32,
    pub levels: Levels,
    /// Whether the hub holds the watch ([`crate::source::ArmedWatch::installed`]):
    /// until then its state is not evaluated, so that its first report (a filesystem
    /// already low) cannot go out before the watch can receive it.
    pub installed: bool,
}

pub(super) struct Watched {
    pub fs: FsInfo,
    /// Where the filesystem was found: the first watcher's root and mount namespace.
    pub place: Place,
    pub refs: usize,
    /// Whether the mark currently has its mask (it is removed while coalescing).
    pub armed: bool,
    pub last_statfs: Option<Instant>,
    /// When to `statfs` next (and re-arm), if something is pending.
    pub due: Option<Instant>,
}

/// The watched filesystems (by fsid) and watches (by id) of one run.
#[derive(Default)]
pub(super) struct Writes {
    pub filesystems: HashMap<u64, Watched>,
    pub watches: HashMap<u64, WatchState>,
    pub next_watch: u64,
    /// Filesystems written in the reads of this drain, and whether one overflowed.
    written: Vec<u64>,
    overflow: bool,
}

impl Handler for Writes {
    type Msg = SourceMsg;
    const SOURCE: &'static str = NAME;

    /// Notes which filesystems were written.
    fn read(
        &mut self,
        _group: &Fanotify,
        events: Vec<wire::Event>,
        _out: &mut VecDeque<SourceMsg>,
    ) {
        for event in events {
            if event.mask & wire::FAN_Q_OVERFLOW != 0 {
                self.overflow = true;
            } else if let Some(fid) = event.fid() {
                self.written.push(fid.fsid_key());
            }
        }
    }

    fn drained(&mut self, group: &Fanotify, out: &mut VecDeque<SourceMsg>) {
        let now = Instant::now();
        let mut written = std::mem::take(&mut self.written);
        if std::mem::take(&mut self.overflow) {
            // Which filesystems were written is unknown: look at all of them.
            written.extend(self.filesystems.keys().copied());
        }
        written.sort_unstable();
        written.dedup();
        let mut evaluate_now = Vec::new();
        for fsid in written {
            let Some(watched) = self.filesystems.get_mut(&fsid) else {
                continue;
            };
            let quiet = watched.last_statfs.is_none_or(|at| now >= at + INTERVAL);
            if quiet && watched.due.is_none() {
                evaluate_now.push(fsid);
            } else if watched.armed {
                // Coalesce: no more events until the interval ends.
                unmark(group, watched);
                watched.armed = false;
                let end = watched.last_statfs.map_or(now + SETTLE, |at| at + INTERVAL);
                watched.due = Some(watched.due.map_or(end, |d| d.min(end)));
            }
        }
        for fsid in evaluate_now {
            self.evaluate(fsid, now, out);
        }
    }

    fn mount_table_changed(&mut self, _group: &Fanotify, out: &mut VecDeque<SourceMsg>) {
        let gone: Vec<u64> = self
            .filesystems
            .iter()
            .filter(|(_, w)| match w.place.mounts() {
                Ok(mounts) => w.fs.mount_in(&mounts).is_none(),
                Err(e) => {
                    tracing::warn!(
                        source = NAME,
                        "cannot read the mount table of pid {}: {e}",
                        w.place.pid
                    );
                    false
                }
            })
            .map(|(fsid, _)| *fsid)
            .collect();
        for fsid in gone {
            if let Some(watched) = self.filesystems.remove(&fsid) {
                self.watches.retain(|_, w| w.fsid != fsid);
                out.push_back(SourceMsg::WatchedObjectGone {
                    object: watched.fs.object(),
                    reason: format!(
                        "unmounted: {} ({}) has no mount left",
                        watched.fs.device, watched.fs.mount_point
                    ),
                });
            }
        }
    }

    fn deadline(&self) -> Option<Instant> {
        self.filesystems.values().filter_map(|w| w.due).min()
    }

    /// Runs the `statfs` of every filesystem whose deadline passed, re-arming its mark.
    fn due(&mut self, group: &Fanotify, now: Instant, out: &mut VecDeque<SourceMsg>) {
        let due: Vec<u64> = self
            .filesystems
            .iter()
            .filter(|(_, w)| w.due.is_some_and(|at| at <= now))
            .map(|(fsid, _)| *fsid)
            .collect();
        for fsid in due {
            let Some(watched) = self.filesystems.get_mut(&fsid) else {
                continue;
            };
            watched.due = None;
            if !watched.armed {
                // Re-arm before the statfs, so a write in between is not missed.
                let at = watched
                    .place
                    .open_fs(&watched.fs.mount_point, watched.fs.fsid);
                match at
                    .ok_or_else(|| io::Error::other("the mount point leads elsewhere now"))
                    .and_then(|at| group.mark_filesystem_of(MASK, at.as_fd()))
                {
                    Ok(()) => watched.armed = true,
                    Err(e) => {
                        tracing::warn!(source = NAME, "re-arming {}: {e}", watched.fs.mount_point)
                    }
                }
            }
            self.evaluate(fsid, now, out);
        }
    }
}

impl Writes {
    /// One `statfs` of a filesystem, compared against every watch of it.
    fn evaluate(&mut self, fsid: u64, now: Instant, out: &mut VecDeque<SourceMsg>) {
        let Some(watched) = self.filesystems.get_mut(&fsid) else {
            return;
        };
        watched.last_statfs = Some(now);
        let fs = watched.fs.clone();
        let Some(usage) = statfs(&fs, &watched.place) else {
            return;
        };
        for (id, watch) in self
            .watches
            .iter_mut()
            .filter(|(_, w)| w.fsid == fsid && w.installed)
        {
            let (levels, transitions) = evaluate(watch.threshold, watch.levels, usage);
            watch.levels = levels;
            for transition in transitions {
                out.push_back(SourceMsg::Record(record(
                    *id, watch, &fs, usage, transition,
                )));
            }
        }
    }
}

/// Removes the mask from a filesystem's mark, through its mount point if that still
/// leads to it (else the mark went with the filesystem).
pub(super) fn unmark(group: &Fanotify, watched: &Watched) {
    let fs = &watched.fs;
    if let Some(at) = watched.place.open_fs(&fs.mount_point, fs.fsid) {
        if let Err(e) = group.unmark_filesystem_of(MASK, at.as_fd()) {
            tracing::debug!(
                source = NAME,
                "removing the mark of {}: {e}",
                fs.mount_point
            );
        }
    }
}

fn statfs(fs: &FsInfo, place: &Place) -> Option<Usage> {
    // Only if the mount point still leads to the watched filesystem.
    let at = place.open_fs(&fs.mount_point, fs.fsid)?;
    let stat = nix::sys::statfs::fstatfs(&at).ok()?;
    let unit = u64::try_from(stat.block_size()).unwrap_or(0);
    #[allow(clippy::useless_conversion)] // the field types differ between targets
    let (blocks, bfree, bavail) = (
        u64::from(stat.blocks()),
        u64::from(stat.blocks_free()),
        u64::from(stat.blocks_available()),
    );
    Some(Usage {
        available: bavail.saturating_mul(unit),
        free: bfree.saturating_mul(unit),
        total: blocks.saturating_mul(unit),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::resolve::{resolve, Caller};
    use std::path::Path;

    /// A watch the hub does not hold yet is left out of its filesystem's evaluation: a
    /// filesystem already past the watch's threshold is reported to it once the hub has
    /// it (installed), and then only once.
    #[test]
    fn a_watch_is_evaluated_only_once_the_hub_holds_it() {
        let caller = Caller {
            unique_name: ":1.0",
            uid: 0,
            gids: &[],
            pid: Some(std::process::id()),
        };
        let (fs, place) = resolve(Path::new("/"), &caller, false).expect("resolve /");
        let fsid = fs.fsid;
        let mut writes = Writes::default();
        writes.filesystems.insert(
            fsid,
            Watched {
                fs,
                place,
                refs: 1,
                armed: false,
                last_statfs: None,
                due: None,
            },
        );
        // Low below 100% of the size available: crossed on any filesystem not empty.
        writes.watches.insert(
            1,
            WatchState {
                fsid,
                path: "/".into(),
                threshold: Threshold::Percent(100),
                uid: 0,
                levels: Levels::default(),
                installed: false,
            },
        );
        let mut out = VecDeque::new();
        writes.evaluate(fsid, Instant::now(), &mut out);
        assert_eq!(out.len(), 0, "reported before the hub held the watch");
        writes.watches.get_mut(&1).expect("the watch").installed = true;
        writes.evaluate(fsid, Instant::now(), &mut out);
        assert_eq!(out.len(), 1, "the initial state once held");
        writes.evaluate(fsid, Instant::now(), &mut out);
        assert_eq!(out.len(), 1, "no change, no second report");
    }
}
