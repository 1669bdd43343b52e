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
//! A watch's initial state is evaluated once the hub holds the watch
//! ([`crate::source::ArmedWatch::installed`]), so that it is in place to receive it: a
//! filesystem already low is reported as crossed then. (It was evaluated a fixed 100 ms
//! after the watch was set, which a loaded machine outran: the report went out before
//! the hub had taken the watch, and reached no one.)
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
//! its mount namespace ([`crate::sys::resolve`]): `/tmp/x` is the caller's `/tmp`, not
//! the daemon's private one; the mount point in warnings is the caller's.
//!
//! Unmounting a watched filesystem ends its watches with `WatchRemoved`: on each
//! mountinfo `POLLPRI` of the daemon's namespace, the mount table of the namespace the
//! filesystem was found in is read (as in [`super::filesystems`]). An unmount in a
//! caller's private namespace that does not propagate to the daemon's is noticed at the
//! next mount table change of the daemon's namespace.

mod levels;
pub mod signal;
mod writes;

use std::io;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::{
    ArmedWatch, Availability, EventSource, JournalIds, PlannedWatch, SourceStream, SpecReader,
    WatchMatcher, WatchSpec,
};
use crate::error::Error;
use crate::event::{Attr, Attrs, Audience, Change, Object, Record};
use crate::policy::{Identity, Scope};
use crate::sys::fanotify::engine::Engine;
use crate::sys::fanotify::{wire, Fanotify};
use crate::sys::resolve::{self, FsInfo};
pub use levels::{evaluate, Levels, Threshold, Transition, Usage};
use writes::{unmark, WatchState, Watched, Writes};

pub const NAME: &str = "space";

/// Never reorder: numbers are part of the interface.
pub const SUBTYPES: &[&str] = &["low", "full"];

/// Reports only what a watch names, so the journal records name no `MESSAGE_ID` for it
/// (`[journal] sources` may still list it).
pub const JOURNAL: JournalIds = JournalIds::NONE;

/// At most one `statfs` per filesystem per interval while something writes.
pub const INTERVAL: Duration = Duration::from_millis(500);
/// How long the first coalescing pause of a filesystem lasts, before any `statfs`.
pub const SETTLE: Duration = Duration::from_millis(100);
/// At most this share of the size (in percent) left for unprivileged users is "full":
/// ext4 refuses writes with some space still counted available (its reserved clusters
/// and the worst-case metadata of an allocation), so nothing left at all never happens.
pub const FULL_PERCENT: u64 = 1;
/// How far above a threshold (in percent of the filesystem's size) space must rise
/// before a warning clears.
pub const HYSTERESIS_PERCENT: u64 = 1;

const MASK: u64 = wire::FAN_MODIFY | wire::FAN_CLOSE_WRITE | wire::FAN_DELETE | wire::FAN_ONDIR;

pub struct Space {
    engine: Engine<Writes>,
}

impl Space {
    pub fn new() -> Self {
        Space {
            engine: Engine::new(),
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
        let spec = SpecReader::new(spec, NAME, Self::KEYS)?;
        let path = spec.filesystem_path()?;
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
        Ok(SpaceSpec { path, threshold })
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
        let engine = self.engine.clone();
        let requester = requester.clone();
        Ok(PlannedWatch::armed_by(Scope::Own, move || {
            arm(&engine, &spec, &requester)
        }))
    }

    /// Warnings are events, not objects.
    fn scan(&self) -> io::Result<Vec<Object>> {
        Ok(Vec::new())
    }

    fn open(&self) -> io::Result<SourceStream> {
        Ok(Box::pin(self.engine.open(Writes::default())?))
    }
}

fn arm(
    engine: &Engine<Writes>,
    spec: &SpaceSpec,
    requester: &Identity,
) -> Result<ArmedWatch, Error> {
    let (fs, place) = resolve::resolve(&spec.path, &requester.caller(), requester.uid != 0)?;
    let (id, generation) = engine.with_running(|running, generation| {
        let writes = &mut running.handler;
        match writes.filesystems.get_mut(&fs.fsid) {
            Some(watched) => watched.refs += 1,
            None => {
                let at = place.open_fs(&fs.mount_point, fs.fsid).ok_or_else(|| {
                    Error::NotFound(format!(
                        "{} changed filesystem while the watch was set; try again",
                        spec.path.display()
                    ))
                })?;
                running
                    .group()
                    .mark_filesystem_of(MASK, at.as_fd())
                    .map_err(|e| {
                        Error::NotSupported(format!(
                            "cannot watch writes to {} ({} on {}): fanotify_mark: {e}",
                            fs.mount_point, fs.fs_type, fs.device
                        ))
                    })?;
                running.handler.filesystems.insert(
                    fs.fsid,
                    Watched {
                        fs: fs.clone(),
                        place,
                        refs: 1,
                        armed: true,
                        last_statfs: None,
                        due: None,
                    },
                );
            }
        }
        let writes = &mut running.handler;
        writes.next_watch += 1;
        let id = writes.next_watch;
        writes.watches.insert(
            id,
            WatchState {
                fsid: fs.fsid,
                path: spec.path.display().to_string(),
                threshold: spec.threshold,
                uid: requester.uid,
                levels: Levels::default(),
                installed: false,
            },
        );
        Ok((id, generation))
    })?;
    // Once the hub holds the watch: its initial state, at the filesystem's next
    // evaluation, now (with the filesystem's others if one is due).
    let installed_engine = engine.clone();
    let installed = move || {
        let _ = installed_engine.with_running(|running, now_running| {
            if now_running != generation {
                return Ok(());
            }
            let writes = &mut running.handler;
            let Some(watch) = writes.watches.get_mut(&id) else {
                return Ok(());
            };
            watch.installed = true;
            if let Some(watched) = writes.filesystems.get_mut(&watch.fsid) {
                let now = Instant::now();
                watched.due = Some(watched.due.map_or(now, |d| d.min(now)));
            }
            running.wake();
            Ok(())
        });
    };
    let hold = engine.hold(generation, move |running| {
        let writes = &mut running.handler;
        let Some(watch) = writes.watches.remove(&id) else {
            return;
        };
        let Some(watched) = writes.filesystems.get_mut(&watch.fsid) else {
            return;
        };
        watched.refs -= 1;
        if watched.refs > 0 {
            return;
        }
        if let Some(watched) = writes.filesystems.remove(&watch.fsid) {
            if watched.armed {
                unmark(running.group(), &watched);
            }
        }
    });
    Ok(ArmedWatch {
        matcher: Box::new(SpaceWatch {
            id: id.to_string(),
            object: fs.object(),
        }),
        hold: Some(Box::new(hold)),
        installed: Some(Box::new(installed)),
    })
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
