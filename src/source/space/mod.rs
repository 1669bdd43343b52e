//! Low-space and full warnings for filesystems the subscriber names, with its own
//! thresholds.
//!
//! The kernel has no space notification, only `statfs(2)`. Polling every watched
//! filesystem on a timer would wake the daemon forever, and a per-subscriber timer once
//! per subscriber. Instead the source lets writes tell it when to look:
//!
//! - one fanotify group (`FAN_REPORT_FID`, needs `CAP_SYS_ADMIN`) with one
//!   `FAN_MARK_FILESYSTEM` mark per watched filesystem, shared by all its watches, for
//!   the events that change free space: `FAN_MODIFY` (write, truncate, fallocate),
//!   `FAN_CLOSE_WRITE` (an unlinked file's blocks are freed at its last close) and
//!   `FAN_DELETE`;
//! - the first event after a quiet spell triggers a `statfs` at once (a change is seen
//!   immediately);
//! - events within [`INTERVAL`] of the last `statfs` remove the mark's mask instead, so
//!   that a busy writer costs no further wakeups, and one deadline at the end of the
//!   interval does the `statfs` and puts the mask back. At most one `statfs` and two
//!   wakeups per filesystem per interval, however many writers and subscribers;
//! - when nothing writes, nothing wakes: no event, no deadline.
//!
//! Every subscriber's thresholds are compared against the one `statfs` result, and a
//! warning goes out only when a watch's state changes: once when a threshold is
//! crossed, once when it clears. Clearing needs [`HYSTERESIS_PERCENT`] of the size
//! above the threshold, so a filesystem hovering at the threshold does not flap.
//! A watch's initial state is evaluated [`SETTLE`] after it is set (so the watch is in
//! place to receive it): a filesystem already low is reported as crossed then.
//!
//! Levels: `low` (available space below the subscriber's `low-percent` of the size or
//! `low-bytes`) and `full` (at most [`FULL_PERCENT`] of the size available to
//! unprivileged users, i.e. what `df` shows as 99–100% used).
//! Space is what unprivileged users can use (`f_bavail`), as `df` reports it.
//!
//! Access: a watch is the caller's own business (scope own), but the caller must be
//! able to reach the path: the daemon looks it up and `statfs`es it on a thread that
//! has taken the caller's filesystem credentials (`setfsuid`, `setfsgid` and the
//! supplementary groups the bus reported, which also drops the thread's
//! `CAP_DAC_OVERRIDE`/`CAP_DAC_READ_SEARCH`), and the fd it got is the filesystem the
//! daemon then watches. A user thus learns nothing about a filesystem it could not
//! `statfs` itself. Paths are resolved as the caller sees them, from its root and in
//! its mount namespace ([`super::filesystems::resolve`]): `/tmp/x` is the caller's `/tmp`, not
//! the daemon's private one; the mount point in warnings is the caller's.
//!
//! Unmounting a watched filesystem ends its watches with `WatchRemoved`: on each
//! mountinfo `POLLPRI` of the daemon's namespace, the mount table of the namespace the
//! filesystem was found in is read (as in [`super::filesystems`]). An unmount in a
//! caller's private namespace that does not propagate to the daemon's is noticed at the
//! next mount table change of the daemon's namespace.

pub mod signal;

use std::collections::{HashMap, VecDeque};
use std::fs;
use std::io;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures_util::stream;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::Notify;

use super::filesystems::resolve::{self, Place};
use super::filesystems::{fanotify, fanotify::Fanotify, wire, FsInfo};
use super::{
    reject_unknown_keys, spec_str, ArmedWatch, Availability, EventSource, PlannedWatch,
    SourceStream, WatchMatcher, WatchSpec,
};
use crate::error::Error;
use crate::event::{Attr, Attrs, Audience, Change, Object, Record, SourceMsg};
use crate::policy::{Identity, Scope};

pub const NAME: &str = "space";

/// Never reorder: numbers are part of the interface.
pub const SUBTYPES: &[&str] = &["low", "full"];

/// At most one `statfs` per filesystem per interval while something writes.
pub const INTERVAL: Duration = Duration::from_millis(500);
/// How long after a watch is set its initial state is evaluated.
pub const SETTLE: Duration = Duration::from_millis(100);
/// At most this share of the size (in percent) left for unprivileged users is "full":
/// ext4 refuses writes with some space still counted available (its reserved clusters
/// and the worst-case metadata of an allocation), so nothing left at all never happens.
pub const FULL_PERCENT: u64 = 1;
/// How far above a threshold (in percent of the filesystem's size) space must rise
/// before a warning clears.
pub const HYSTERESIS_PERCENT: u64 = 1;

const MASK: u64 = wire::FAN_MODIFY | wire::FAN_CLOSE_WRITE | wire::FAN_DELETE | wire::FAN_ONDIR;
const MOUNTINFO: &str = "/proc/self/mountinfo";

/// A subscriber's low-space threshold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Threshold {
    Percent(u32),
    Bytes(u64),
}

impl Threshold {
    /// The threshold in bytes for a filesystem of `total` bytes.
    pub fn bytes(self, total: u64) -> u64 {
        match self {
            Threshold::Percent(p) => {
                u64::try_from(u128::from(total) * u128::from(p) / 100).unwrap_or(u64::MAX)
            }
            Threshold::Bytes(b) => b,
        }
    }
}

/// What `statfs` said, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    /// Available to unprivileged users (`f_bavail`).
    pub available: u64,
    /// Free including the root reserve (`f_bfree`).
    pub free: u64,
    pub total: u64,
}

/// Where a watch stands on each level; `None` before the first evaluation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Levels {
    pub low: Option<bool>,
    pub full: Option<bool>,
}

/// One change of one level.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    /// Index into [`SUBTYPES`].
    pub level: u8,
    pub crossed: bool,
}

/// Pure: the new levels of a watch with `threshold` after `usage`, and the warnings to
/// send. A first evaluation reports only levels that are crossed.
pub fn evaluate(threshold: Threshold, levels: Levels, usage: Usage) -> (Levels, Vec<Transition>) {
    let margin = usage.total / 100 * HYSTERESIS_PERCENT;
    let limit = threshold.bytes(usage.total);
    let low = match levels.low {
        Some(true) => usage.available < limit.saturating_add(margin),
        _ => usage.available < limit,
    };
    let full_limit = usage.total / 100 * FULL_PERCENT;
    let full = match levels.full {
        Some(true) => usage.available < full_limit.saturating_add(margin).max(1),
        _ => usage.available <= full_limit,
    };
    let mut out = Vec::new();
    for (level, old, new) in [(0u8, levels.low, low), (1u8, levels.full, full)] {
        match old {
            Some(old) if old != new => out.push(Transition {
                level,
                crossed: new,
            }),
            None if new => out.push(Transition {
                level,
                crossed: true,
            }),
            _ => {}
        }
    }
    (
        Levels {
            low: Some(low),
            full: Some(full),
        },
        out,
    )
}

struct WatchState {
    fsid: u64,
    path: String,
    threshold: Threshold,
    uid: u32,
    levels: Levels,
}

struct Watched {
    fs: FsInfo,
    /// Where the filesystem was found: the first watcher's root and mount namespace.
    place: Place,
    refs: usize,
    /// Whether the mark currently has its mask (it is removed while coalescing).
    armed: bool,
    last_statfs: Option<Instant>,
    /// When to `statfs` next (and re-arm), if something is pending.
    due: Option<Instant>,
}

struct Running {
    fan: Arc<Fanotify>,
    filesystems: HashMap<u64, Watched>,
    watches: HashMap<u64, WatchState>,
    next_watch: u64,
    generation: u64,
    /// Tells the reader that a deadline changed.
    wake: Arc<Notify>,
}

#[derive(Default)]
struct State {
    running: Option<Running>,
    generation: u64,
}

type SharedState = Arc<Mutex<State>>;

fn lock(state: &SharedState) -> MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub struct Space {
    state: SharedState,
}

impl Space {
    pub fn new() -> Self {
        Space {
            state: Arc::default(),
        }
    }
}

impl Default for Space {
    fn default() -> Self {
        Space::new()
    }
}

/// A parsed space watch request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpaceSpec {
    pub path: PathBuf,
    pub threshold: Threshold,
}

impl SpaceSpec {
    const KEYS: &'static [&'static str] = &["path", "low-percent", "low-bytes"];

    pub fn parse(spec: &WatchSpec) -> Result<Self, Error> {
        reject_unknown_keys(spec, NAME, Self::KEYS)?;
        let path = spec_str(spec, "path")?.ok_or_else(|| {
            Error::InvalidArgument(format!(
                "a {NAME} watch needs 'path' (s): a path on the filesystem to watch"
            ))
        })?;
        if !path.starts_with('/') {
            return Err(Error::InvalidArgument(format!(
                "watch option 'path' must be absolute, got '{path}'"
            )));
        }
        let typed = |key: &str, sig: &str| {
            Error::InvalidArgument(format!(
                "watch option '{key}' must be D-Bus type '{sig}', got '{}'",
                spec.get(key)
                    .map(|v| v.value_signature().to_string())
                    .unwrap_or_default()
            ))
        };
        let percent = spec
            .get("low-percent")
            .map(|v| u32::try_from(v.clone()).map_err(|_| typed("low-percent", "u")))
            .transpose()?;
        let bytes = spec
            .get("low-bytes")
            .map(|v| u64::try_from(v.clone()).map_err(|_| typed("low-bytes", "t")))
            .transpose()?;
        let threshold = match (percent, bytes) {
            (Some(p), None) if (1..=99).contains(&p) => Threshold::Percent(p),
            (Some(p), None) => {
                return Err(Error::InvalidArgument(format!(
                    "watch option 'low-percent' must be 1 to 99, got {p}"
                )))
            }
            (None, Some(b)) if b > 0 => Threshold::Bytes(b),
            (None, Some(_)) => {
                return Err(Error::InvalidArgument(
                    "watch option 'low-bytes' must be above 0".into(),
                ))
            }
            _ => {
                return Err(Error::InvalidArgument(
                    "a space watch needs exactly one of 'low-percent' (u) and 'low-bytes' (t)"
                        .into(),
                ))
            }
        };
        Ok(SpaceSpec {
            path: PathBuf::from(path),
            threshold,
        })
    }
}

impl EventSource for Space {
    fn name(&self) -> &'static str {
        NAME
    }

    fn subtypes(&self) -> &'static [&'static str] {
        SUBTYPES
    }

    fn signal(&self) -> &'static crate::signal::SignalKind {
        &signal::KIND
    }

    fn probe(&self) -> Availability {
        match Fanotify::new() {
            Ok(_) => Availability::Available,
            Err(e) => Availability::Unavailable(e.to_string()),
        }
    }

    /// The caller's own warnings: scope own; reaching the path is checked with the
    /// caller's credentials when the watch is armed.
    fn parse_watch(&self, spec: &WatchSpec, requester: &Identity) -> Result<PlannedWatch, Error> {
        let spec = SpaceSpec::parse(spec)?;
        let state = Arc::clone(&self.state);
        let requester = requester.clone();
        Ok(PlannedWatch::armed_by(Scope::Own, move || {
            arm(&state, &spec, &requester)
        }))
    }

    /// Warnings are events, not objects.
    fn scan(&self) -> io::Result<Vec<Object>> {
        Ok(Vec::new())
    }

    fn open(&self) -> io::Result<SourceStream> {
        let fan = Arc::new(Fanotify::new()?);
        let mountinfo = fs::File::open(MOUNTINFO)
            .map_err(|e| io::Error::new(e.kind(), format!("{MOUNTINFO}: {e}")))?;
        let wake = Arc::new(Notify::new());
        let reader = Reader {
            // SAFETY: the AsyncFd owns a reference to the group, so its fd stays open
            // and the same while registered.
            fan: unsafe {
                AsyncFd::register_with_interest(
                    fanotify::Shared(Arc::clone(&fan)),
                    Interest::READABLE,
                )
            }?,
            // SAFETY: the AsyncFd owns the File, so the fd stays open while registered.
            mountinfo: unsafe { AsyncFd::register_with_interest(mountinfo, Interest::PRIORITY) }?,
            state: Arc::clone(&self.state),
            wake: Arc::clone(&wake),
            pending: VecDeque::new(),
            buf: Vec::with_capacity(fanotify::READ_SIZE),
            generation: 0,
        };
        let mut state = lock(&self.state);
        state.generation += 1;
        let mut reader = reader;
        reader.generation = state.generation;
        state.running = Some(Running {
            fan,
            filesystems: HashMap::new(),
            watches: HashMap::new(),
            next_watch: 0,
            generation: state.generation,
            wake,
        });
        drop(state);
        Ok(Box::pin(stream::unfold(reader, |mut reader| async move {
            let msg = reader.next().await?;
            Some((msg, reader))
        })))
    }
}

fn arm(state: &SharedState, spec: &SpaceSpec, requester: &Identity) -> Result<ArmedWatch, Error> {
    let (fs, place) = resolve::resolve(&spec.path, requester, requester.uid != 0)?;
    let now = Instant::now();
    let mut guard = lock(state);
    let running = guard
        .running
        .as_mut()
        .ok_or_else(|| Error::Unavailable(format!("the {NAME} source is not running")))?;
    match running.filesystems.get_mut(&fs.fsid) {
        Some(watched) => {
            watched.refs += 1;
            let settle = now + SETTLE;
            watched.due = Some(watched.due.map_or(settle, |d| d.min(settle)));
        }
        None => {
            let at = place.open_fs(&fs.mount_point, fs.fsid).ok_or_else(|| {
                Error::NotFound(format!(
                    "{} changed filesystem while the watch was set; try again",
                    spec.path.display()
                ))
            })?;
            running
                .fan
                .mark_filesystem_of(MASK, at.as_fd())
                .map_err(|e| {
                    Error::NotSupported(format!(
                        "cannot watch writes to {} ({} on {}): fanotify_mark: {e}",
                        fs.mount_point, fs.fs_type, fs.device
                    ))
                })?;
            running.filesystems.insert(
                fs.fsid,
                Watched {
                    fs: fs.clone(),
                    place,
                    refs: 1,
                    armed: true,
                    last_statfs: None,
                    due: Some(now + SETTLE),
                },
            );
        }
    }
    running.next_watch += 1;
    let id = running.next_watch;
    running.watches.insert(
        id,
        WatchState {
            fsid: fs.fsid,
            path: spec.path.display().to_string(),
            threshold: spec.threshold,
            uid: requester.uid,
            levels: Levels::default(),
        },
    );
    running.wake.notify_one();
    Ok(ArmedWatch {
        matcher: Box::new(SpaceWatch {
            id: id.to_string(),
            object: fs.object(),
        }),
        hold: Some(Box::new(SpaceHold {
            state: Arc::clone(state),
            generation: running.generation,
            id,
        })),
    })
}

struct SpaceHold {
    state: SharedState,
    generation: u64,
    id: u64,
}

impl Drop for SpaceHold {
    fn drop(&mut self) {
        let mut guard = lock(&self.state);
        let Some(running) = guard.running.as_mut() else {
            return;
        };
        if running.generation != self.generation {
            return;
        }
        let Some(watch) = running.watches.remove(&self.id) else {
            return;
        };
        let Some(watched) = running.filesystems.get_mut(&watch.fsid) else {
            return;
        };
        watched.refs -= 1;
        if watched.refs > 0 {
            return;
        }
        if let Some(watched) = running.filesystems.remove(&watch.fsid) {
            if watched.armed {
                unmark(&running.fan, &watched);
            }
        }
    }
}

/// Removes the mask from a filesystem's mark, through its mount point if that still
/// leads to it (else the mark went with the filesystem).
fn unmark(fan: &Fanotify, watched: &Watched) {
    let fs = &watched.fs;
    if let Some(at) = watched.place.open_fs(&fs.mount_point, fs.fsid) {
        if let Err(e) = fan.unmark_filesystem_of(MASK, at.as_fd()) {
            tracing::debug!(
                source = NAME,
                "removing the mark of {}: {e}",
                fs.mount_point
            );
        }
    }
}

/// One subscriber's space watch: its warnings only.
#[derive(Debug)]
pub struct SpaceWatch {
    id: String,
    object: String,
}

impl WatchMatcher for SpaceWatch {
    fn matches(&self, record: &Record) -> bool {
        record.source == NAME && record.properties.get("watch") == Some(&self.id)
    }

    fn watched_object(&self) -> Option<&str> {
        Some(&self.object)
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

struct Reader {
    fan: AsyncFd<fanotify::Shared>,
    mountinfo: AsyncFd<fs::File>,
    state: SharedState,
    wake: Arc<Notify>,
    pending: VecDeque<SourceMsg>,
    buf: Vec<u8>,
    /// The run this reader belongs to.
    generation: u64,
}

impl Drop for Reader {
    fn drop(&mut self) {
        // The group closes with the last Arc: make sure the state does not keep it. A
        // stream being dropped late must not end a newer run's state.
        let mut state = lock(&self.state);
        if state
            .running
            .as_ref()
            .is_some_and(|r| r.generation == self.generation)
        {
            state.running = None;
        }
    }
}

impl Reader {
    async fn next(&mut self) -> Option<SourceMsg> {
        loop {
            if let Some(msg) = self.pending.pop_front() {
                return Some(msg);
            }
            let deadline = {
                let guard = lock(&self.state);
                guard
                    .running
                    .as_ref()
                    .and_then(|r| r.filesystems.values().filter_map(|w| w.due).min())
            };
            let due = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                ready = self.fan.readable() => {
                    match ready {
                        Ok(mut guard) => guard.clear_ready(),
                        Err(e) => {
                            tracing::error!(source = NAME, "fanotify fd failed: {e}");
                            return None;
                        }
                    }
                    if !self.drain() {
                        return None;
                    }
                }
                ready = self.mountinfo.ready(Interest::PRIORITY) => {
                    match ready {
                        Ok(mut guard) => guard.clear_ready(),
                        Err(e) => {
                            tracing::error!(source = NAME, "polling {MOUNTINFO} failed: {e}");
                            return None;
                        }
                    }
                    self.mount_table_changed();
                }
                () = due => self.run_due(Instant::now()),
                () = self.wake.notified() => {}
            }
        }
    }

    /// Reads every queued event and notes which filesystems were written. False when
    /// the fd failed for good.
    fn drain(&mut self) -> bool {
        let mut written = Vec::new();
        let mut overflow = false;
        loop {
            let fan = Arc::clone(&self.fan.get_ref().0);
            match fan.read(&mut self.buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(source = NAME, "reading fanotify events: {e}");
                    return false;
                }
            }
            for item in wire::events(&self.buf) {
                match item {
                    Ok(event) if event.mask & wire::FAN_Q_OVERFLOW != 0 => overflow = true,
                    Ok(event) => {
                        if let Some(fid) = event.fid() {
                            written.push(fid.fsid_key());
                        }
                    }
                    Err(e) => {
                        tracing::debug!(source = NAME, "dropped the rest of a fanotify read: {e}");
                        break;
                    }
                }
            }
        }
        let now = Instant::now();
        let mut evaluate_now = Vec::new();
        {
            let mut guard = lock(&self.state);
            let Some(running) = guard.running.as_mut() else {
                return true;
            };
            if overflow {
                // Which filesystems were written is unknown: look at all of them.
                written.extend(running.filesystems.keys().copied());
            }
            written.sort_unstable();
            written.dedup();
            for fsid in written {
                let Some(watched) = running.filesystems.get_mut(&fsid) else {
                    continue;
                };
                let quiet = watched.last_statfs.is_none_or(|at| now >= at + INTERVAL);
                if quiet && watched.due.is_none() {
                    evaluate_now.push(fsid);
                } else if watched.armed {
                    // Coalesce: no more events until the interval ends.
                    unmark(&running.fan, watched);
                    watched.armed = false;
                    let end = watched.last_statfs.map_or(now + SETTLE, |at| at + INTERVAL);
                    watched.due = Some(watched.due.map_or(end, |d| d.min(end)));
                }
            }
        }
        for fsid in evaluate_now {
            self.evaluate(fsid, now);
        }
        true
    }

    /// Runs the `statfs` of every filesystem whose deadline passed, re-arming its mark.
    fn run_due(&mut self, now: Instant) {
        let due: Vec<u64> = {
            let guard = lock(&self.state);
            let Some(running) = guard.running.as_ref() else {
                return;
            };
            running
                .filesystems
                .iter()
                .filter(|(_, w)| w.due.is_some_and(|at| at <= now))
                .map(|(fsid, _)| *fsid)
                .collect()
        };
        for fsid in due {
            {
                let mut guard = lock(&self.state);
                let Some(running) = guard.running.as_mut() else {
                    return;
                };
                let Some(watched) = running.filesystems.get_mut(&fsid) else {
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
                        .and_then(|at| running.fan.mark_filesystem_of(MASK, at.as_fd()))
                    {
                        Ok(()) => watched.armed = true,
                        Err(e) => tracing::warn!(
                            source = NAME,
                            "re-arming {}: {e}",
                            watched.fs.mount_point
                        ),
                    }
                }
            }
            self.evaluate(fsid, now);
        }
    }

    /// One `statfs` of a filesystem, compared against every watch of it.
    fn evaluate(&mut self, fsid: u64, now: Instant) {
        let mut guard = lock(&self.state);
        let Some(watched) = guard
            .running
            .as_mut()
            .and_then(|r| r.filesystems.get_mut(&fsid))
        else {
            return;
        };
        watched.last_statfs = Some(now);
        let fs = watched.fs.clone();
        let Some(usage) = statfs(&fs, &watched.place) else {
            return;
        };
        let Some(running) = guard.running.as_mut() else {
            return;
        };
        for (id, watch) in running.watches.iter_mut().filter(|(_, w)| w.fsid == fsid) {
            let (levels, transitions) = evaluate(watch.threshold, watch.levels, usage);
            watch.levels = levels;
            for transition in transitions {
                self.pending.push_back(SourceMsg::Record(record(
                    *id, watch, &fs, usage, transition,
                )));
            }
        }
    }

    fn mount_table_changed(&mut self) {
        let mut guard = lock(&self.state);
        let Some(running) = guard.running.as_mut() else {
            return;
        };
        let gone: Vec<u64> = running
            .filesystems
            .iter()
            .filter(|(_, w)| match w.place.mounts() {
                Ok(mounts) => !mounts
                    .iter()
                    .any(|m| m.major == w.fs.major && m.minor == w.fs.minor),
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
            if let Some(watched) = running.filesystems.remove(&fsid) {
                running.watches.retain(|_, w| w.fsid != fsid);
                self.pending.push_back(SourceMsg::WatchedObjectGone {
                    object: watched.fs.object(),
                    reason: format!(
                        "unmounted: {} ({}) has no mount left",
                        watched.fs.device, watched.fs.mount_point
                    ),
                });
            }
        }
    }
}

fn record(
    id: u64,
    watch: &WatchState,
    fs: &FsInfo,
    usage: Usage,
    transition: Transition,
) -> Record {
    let mut attributes = Attrs::new();
    attributes.insert(
        "state".into(),
        if transition.crossed {
            "crossed"
        } else {
            "cleared"
        }
        .into(),
    );
    attributes.insert("path".into(), watch.path.clone().into());
    attributes.insert("mount-point".into(), fs.mount_point.clone().into());
    attributes.insert("device".into(), fs.device.clone().into());
    attributes.insert("fs-type".into(), fs.fs_type.clone().into());
    attributes.insert("available-bytes".into(), usage.available.into());
    attributes.insert("free-bytes".into(), usage.free.into());
    attributes.insert("total-bytes".into(), usage.total.into());
    let threshold = if usize::from(transition.level) == 1 {
        usage.total / 100 * FULL_PERCENT
    } else {
        watch.threshold.bytes(usage.total)
    };
    attributes.insert("threshold-bytes".into(), threshold.into());
    if let Threshold::Percent(p) = watch.threshold {
        attributes.insert("low-percent".into(), Attr::U32(p));
    }
    Record {
        source: NAME,
        subtype: transition.level,
        object_id: fs.object(),
        change: Change::None,
        attributes,
        properties: [("watch".to_owned(), id.to_string())].into_iter().collect(),
        audience: Audience::Owner(watch.uid),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn usage(available: u64) -> Usage {
        Usage {
            available,
            free: available,
            total: 100 * MIB,
        }
    }

    #[test]
    fn a_threshold_is_reported_once_crossed_and_once_cleared_with_hysteresis() {
        let t = Threshold::Percent(20);
        let (levels, out) = evaluate(t, Levels::default(), usage(50 * MIB));
        assert!(
            out.is_empty(),
            "a first look at a healthy filesystem says nothing"
        );
        let (levels, out) = evaluate(t, levels, usage(19 * MIB));
        assert_eq!(
            out,
            vec![Transition {
                level: 0,
                crossed: true
            }]
        );
        let (levels, out) = evaluate(t, levels, usage(10 * MIB));
        assert!(out.is_empty(), "still low: nothing new");
        // Back to just above the threshold: within the hysteresis, still low.
        let (levels, out) = evaluate(t, levels, usage(20 * MIB + 1));
        assert!(out.is_empty());
        let (levels, out) = evaluate(t, levels, usage(30 * MIB));
        assert_eq!(
            out,
            vec![Transition {
                level: 0,
                crossed: false
            }]
        );
        let (_, out) = evaluate(t, levels, usage(0));
        assert_eq!(
            out,
            vec![
                Transition {
                    level: 0,
                    crossed: true
                },
                Transition {
                    level: 1,
                    crossed: true
                }
            ]
        );
    }

    #[test]
    fn a_first_look_at_a_low_filesystem_reports_it_crossed() {
        let (_, out) = evaluate(
            Threshold::Bytes(10 * MIB),
            Levels::default(),
            usage(5 * MIB),
        );
        assert_eq!(
            out,
            vec![Transition {
                level: 0,
                crossed: true
            }]
        );
        assert_eq!(Threshold::Percent(10).bytes(100 * MIB), 10 * MIB);
    }

    #[test]
    fn specs_need_a_path_and_exactly_one_threshold() {
        let v = |s: &str| zbus::OwnedVariant::from(zbus::Str::from(s));
        let spec = |entries: Vec<(&str, zbus::OwnedVariant)>| -> WatchSpec {
            entries
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect()
        };
        assert!(SpaceSpec::parse(&spec(vec![("path", v("/mnt"))])).is_err());
        assert!(SpaceSpec::parse(&spec(vec![
            ("path", v("/mnt")),
            ("low-percent", 5u32.into()),
            ("low-bytes", 5u64.into())
        ]))
        .is_err());
        assert!(SpaceSpec::parse(&spec(vec![
            ("path", v("/mnt")),
            ("low-percent", 100u32.into())
        ]))
        .is_err());
        assert!(SpaceSpec::parse(&spec(vec![
            ("path", v("/mnt")),
            ("low-percent", 5u64.into())
        ]))
        .is_err());
        assert!(
            SpaceSpec::parse(&spec(vec![("path", v("rel")), ("low-bytes", 5u64.into())])).is_err()
        );
        assert_eq!(
            SpaceSpec::parse(&spec(vec![("path", v("/mnt")), ("low-bytes", 5u64.into())])).unwrap(),
            SpaceSpec {
                path: "/mnt".into(),
                threshold: Threshold::Bytes(5)
            }
        );
    }
}
