//! Filesystem errors, from fanotify's `FAN_FS_ERROR` (Linux 5.16+; ext4 reports them,
//! xfs and others since later kernels).
//!
//! Touches: one fanotify group (`FAN_CLASS_NOTIF | FAN_REPORT_FID`, needs
//! `CAP_SYS_ADMIN`) while someone watches, with one `FAN_MARK_FILESYSTEM` mark of
//! `FAN_FS_ERROR` per watched filesystem (shared by every watch of it, removed with its
//! last watch); `/proc/self/mountinfo`, polled for `POLLPRI` (a mount table change)
//! while it runs; the caller's `/proc/PID/root` and `/proc/PID/mountinfo`, kept open
//! while its filesystem is watched; `statfs(2)` and `stat(2)` of the watched paths;
//! `readlink /sys/dev/block/MAJ:MIN` to name the device. Paths are resolved as the
//! caller sees them, in its root and mount namespace (see [`crate::sys::resolve`]); the mount point
//! in events is the caller's.
//!
//! A watch names a path (`{"path": "/mnt/x"}`); it covers the whole filesystem that holds
//! the path, wherever it is mounted. The filesystem is known by its `f_fsid` (what
//! fanotify puts in each event) and named by its device `MAJ:MIN` (the watch's object).
//!
//! The kernel merges errors into one pending event per filesystem while the daemon has
//! not read it; `error_count` says how many errors an event stands for, and `errno` is
//! the first one's. The inode is reported when the filesystem gave one (ext4 encodes
//! `FILEID_INO32_GEN`), none for errors of the filesystem as a whole (handle type 255).
//!
//! Going read-only: after an error, ext4 mounted with `errors=remount-ro` refuses writes.
//! Neither fanotify nor mountinfo's `POLLPRI` says so: the kernel does not bump the mount
//! namespace's event counter (no remount happens), and since 6.15 ext4 no longer even
//! sets `SB_RDONLY` (so `statvfs` keeps saying read-write); what changes is the
//! superblock's options, which mountinfo shows as `emergency_ro` (or `ro` on older
//! kernels). So the source reads them right after each error of a filesystem that was
//! writable. ext4 notifies the error *before* it switches to read-only, so when the first
//! look still says writable, it looks once more [`RECHECK`] later: one timer, armed only
//! after an error, never while nothing fails. A plain `mount -o remount,ro` does bump
//! the counter, so the `POLLPRI` that also tells about unmounts reports it.
//!
//! Unmounting: on each mount table change the source checks that every watched device
//! still has a mount; when one has none, its watches end with `WatchRemoved`
//! (`unmounted`). The kernel drops the mark with the superblock.
//!
//! System-wide (`system.rs`): while the source runs, every block-backed filesystem of the
//! daemon's mount namespace is marked too, and each one mounted later, so that the
//! daemon's own consumers (journal, `[[units]]`, metrics) see errors with no watch.
//!
//! The source is idle when nobody watches and no consumer holds it: no fd, no timer.

pub mod signal;
mod system;

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{
    ArmedWatch, Availability, EventSource, JournalIds, PlannedWatch, SourceStream, SpecReader,
    WatchMatcher, WatchSpec,
};
use crate::error::Error;
use crate::event::{Attr, Attrs, Audience, Change, Object, Record, SourceMsg};
use crate::policy::{Identity, Scope};
use crate::sys::errno::{errno_name, filesystem_errno_name};
use crate::sys::fanotify::engine::{Engine, Handler};
use crate::sys::fanotify::{wire, Fanotify};
use crate::sys::mountinfo::MountinfoLine;
use crate::sys::resolve::{self, FsInfo, Place};

pub const NAME: &str = "filesystems";

/// Never reorder: numbers are part of the interface.
pub const SUBTYPES: &[&str] = &["error", "read-only"];

pub const JOURNAL: JournalIds = JournalIds {
    message_ids: &[
        ("error", "0d73bfcd9b594ed39ccaad7941e4894a"),
        ("read-only", "a8533ff4758d40ad905de5c2b63a3ec5"),
    ],
    // A filesystem error is an error; going read-only after one is critical for
    // whatever writes there.
    priority: |kind| if kind == "read-only" { 2 } else { 3 },
};
const SUBTYPE_ERROR: u8 = 0;
const SUBTYPE_READ_ONLY: u8 = 1;

/// How long after an error the source looks again whether the filesystem went
/// read-only (see the module documentation).
pub const RECHECK: Duration = Duration::from_millis(200);

struct Marked {
    /// Watches sharing the mark.
    refs: usize,
    /// Set by the system-wide marking ([`system`]): kept when its last watch ends.
    system: bool,
    fs: FsInfo,
    /// Where the filesystem was found: the first watcher's root and mount namespace.
    place: Place,
    read_only: bool,
    /// The last error, reported again with the switch to read-only.
    last_error: Option<(i32, u32)>,
    /// Look at the read-only state at this time; `true`: and once more if still
    /// writable.
    recheck: Option<(Instant, bool)>,
}

/// What runs while someone watches: the marked filesystems, by fsid. The engine
/// ([`crate::sys::fanotify::engine`]) runs the group and calls this.
#[derive(Default)]
struct Errors {
    marks: HashMap<u64, Marked>,
}

pub struct Filesystems {
    engine: Engine<Errors>,
}

impl Filesystems {
    pub fn new() -> Self {
        Filesystems {
            engine: Engine::new(),
        }
    }
}

impl Default for Filesystems {
    fn default() -> Self {
        Filesystems::new()
    }
}

impl EventSource for Filesystems {
    fn name(&self) -> &'static str {
        NAME
    }

    fn subtypes(&self) -> &'static [&'static str] {
        SUBTYPES
    }

    fn signal(&self) -> &'static crate::signal::SignalKind {
        &signal::KIND
    }

    /// Every block-backed filesystem of the host is marked while the source runs.
    fn system_wide(&self) -> bool {
        true
    }

    fn probe(&self) -> Availability {
        let probe = || -> io::Result<()> {
            let fan = Fanotify::new()?;
            match fan.mark_filesystem(wire::FAN_FS_ERROR, Path::new("/")) {
                Ok(()) => Ok(()),
                Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => Err(io::Error::new(
                    e.kind(),
                    "fanotify rejects FAN_FS_ERROR: the kernel is older than 5.16",
                )),
                // The root filesystem may not support file handles; others may.
                Err(_) => Ok(()),
            }
        };
        match probe() {
            Ok(()) => Availability::Available,
            Err(e) => Availability::Unavailable(e.to_string()),
        }
    }

    /// Errors of a whole filesystem, whoever caused them: system scope (administrators).
    fn parse_watch(&self, spec: &WatchSpec, requester: &Identity) -> Result<PlannedWatch, Error> {
        let path = parse_path(spec)?;
        let engine = self.engine.clone();
        let requester = requester.clone();
        Ok(PlannedWatch::armed_by(Scope::System, move || {
            arm(&engine, &path, &requester)
        }))
    }

    /// Errors are events, not objects: there is nothing to list.
    fn scan(&self) -> io::Result<Vec<Object>> {
        Ok(Vec::new())
    }

    fn open(&self) -> io::Result<SourceStream> {
        Ok(Box::pin(self.engine.open(Errors::default())?))
    }
}

fn parse_path(spec: &WatchSpec) -> Result<PathBuf, Error> {
    SpecReader::new(spec, NAME, &["path"])?.filesystem_path()
}

/// Whether the filesystem is read-only now, from its superblock options in mountinfo
/// (see the module documentation for why not `statvfs`).
fn read_only_now(fs: &FsInfo, place: &Place) -> Option<bool> {
    fs.mount_in(&place.mounts().ok()?)
        .map(MountinfoLine::filesystem_read_only)
}

fn arm(engine: &Engine<Errors>, path: &Path, requester: &Identity) -> Result<ArmedWatch, Error> {
    // Administrators only (system scope): looked up with the daemon's credentials.
    let (fs, place) = resolve::resolve(path, &requester.caller(), false)?;
    let read_only = read_only_now(&fs, &place).unwrap_or(false);
    let generation = engine.with_running(|running, generation| {
        if let Some(marked) = running.handler.marks.get_mut(&fs.fsid) {
            marked.refs += 1;
            return Ok(generation);
        }
        let at = place.open_fs(&fs.mount_point, fs.fsid).ok_or_else(|| {
            Error::NotFound(format!(
                "{} no longer leads to {} ({}) for pid {}",
                fs.mount_point, fs.device, fs.fs_type, place.pid
            ))
        })?;
        running
            .group()
            .mark_filesystem_of(wire::FAN_FS_ERROR, at.as_fd())
            .map_err(|e| {
                let message = format!(
                    "cannot watch errors of {} ({} on {}): fanotify_mark: {e}",
                    fs.mount_point, fs.fs_type, fs.device
                );
                match e.raw_os_error() {
                    Some(nix::libc::EOPNOTSUPP | nix::libc::EXDEV | nix::libc::ENODEV) => {
                        Error::NotSupported(message)
                    }
                    _ => Error::Unavailable(message),
                }
            })?;
        tracing::info!(
            source = NAME,
            device = fs.device,
            mount_point = fs.mount_point,
            "marked filesystem for errors"
        );
        running.handler.marks.insert(
            fs.fsid,
            Marked {
                refs: 1,
                system: false,
                fs: fs.clone(),
                place,
                read_only,
                last_error: None,
                recheck: None,
            },
        );
        Ok(generation)
    })?;
    let fsid = fs.fsid;
    // One watch's share of the filesystem's mark.
    let hold = engine.hold(generation, move |running| {
        let Some(marked) = running.handler.marks.get_mut(&fsid) else {
            return; // unmounted: the mark went with the superblock
        };
        marked.refs -= 1;
        if marked.refs > 0 || marked.system {
            return;
        }
        let Some(marked) = running.handler.marks.remove(&fsid) else {
            return;
        };
        // Only through a path that still leads to the same filesystem.
        if let Some(at) = marked.place.open_fs(&marked.fs.mount_point, fsid) {
            if let Err(e) = running
                .group()
                .unmark_filesystem_of(wire::FAN_FS_ERROR, at.as_fd())
            {
                tracing::debug!(
                    source = NAME,
                    "removing the mark of {}: {e}",
                    marked.fs.mount_point
                );
            }
        }
    });
    Ok(ArmedWatch {
        matcher: Box::new(FilesystemWatch {
            object: fs.object(),
        }),
        hold: Some(Box::new(hold)),
        installed: None,
    })
}

/// A watch of one filesystem's errors.
#[derive(Debug, PartialEq, Eq)]
pub struct FilesystemWatch {
    object: String,
}

impl WatchMatcher for FilesystemWatch {
    fn matches(&self, record: &Record) -> bool {
        record.source == NAME && record.object_id == self.object
    }

    fn watched_object(&self) -> Option<&str> {
        Some(&self.object)
    }
}

impl Handler for Errors {
    type Msg = SourceMsg;
    const SOURCE: &'static str = NAME;

    fn started(&mut self, group: &Fanotify) {
        self.mark_every_filesystem(group);
    }

    fn read(&mut self, _group: &Fanotify, events: Vec<wire::Event>, out: &mut VecDeque<SourceMsg>) {
        for event in &events {
            self.event(event, out);
        }
        // Look at once, once per read however many errors it held; a filesystem
        // still writable is looked at again RECHECK later.
        self.recheck(Instant::now(), out);
    }

    fn mount_table_changed(&mut self, group: &Fanotify, out: &mut VecDeque<SourceMsg>) {
        self.unmounted_or_remounted(out);
        self.mark_every_filesystem(group);
    }

    fn deadline(&self) -> Option<Instant> {
        self.marks
            .values()
            .filter_map(|m| m.recheck.map(|(at, _)| at))
            .min()
    }

    fn due(&mut self, _group: &Fanotify, now: Instant, out: &mut VecDeque<SourceMsg>) {
        self.recheck(now, out);
    }
}

impl Errors {
    fn event(&mut self, event: &wire::Event, out: &mut VecDeque<SourceMsg>) {
        if event.mask & wire::FAN_Q_OVERFLOW != 0 {
            tracing::warn!(source = NAME, "the kernel dropped filesystem error events");
            out.push_back(SourceMsg::Overflow {
                objects: Vec::new(),
            });
            return;
        }
        if event.mask & wire::FAN_FS_ERROR == 0 {
            return;
        }
        let (Some(fid), Some((error, count))) = (event.fid(), event.error()) else {
            tracing::debug!(
                source = NAME,
                ?event,
                "FAN_FS_ERROR without fid or error record"
            );
            return;
        };
        let now = Instant::now();
        let Some(marked) = self.marks.get_mut(&fid.fsid_key()) else {
            tracing::debug!(
                source = NAME,
                fsid = fid.fsid_key(),
                "error of an unwatched filesystem"
            );
            return;
        };
        marked.last_error = Some((error, count));
        let mut attributes = base_attributes(&marked.fs, error);
        attributes.insert("count".into(), Attr::U32(count));
        if let Some(inode) = fid.inode() {
            attributes.insert("inode".into(), inode.into());
        }
        attributes.insert(
            "handle-type".into(),
            Attr::U32(u32::from_ne_bytes(fid.handle_type.to_ne_bytes())),
        );
        if let Ok(pid) = u32::try_from(event.pid) {
            if pid != 0 {
                attributes.insert("pid".into(), pid.into());
            }
        }
        out.push_back(SourceMsg::Record(record(
            SUBTYPE_ERROR,
            &marked.fs,
            attributes,
        )));
        if !marked.read_only {
            marked.recheck = Some((now, true));
        }
    }

    /// Checks the filesystems whose read-only state is due to be looked at.
    fn recheck(&mut self, now: Instant, out: &mut VecDeque<SourceMsg>) {
        for marked in self.marks.values_mut() {
            if marked.recheck.is_none_or(|(at, _)| at > now) {
                continue;
            }
            let read_only = read_only_now(&marked.fs, &marked.place);
            let again = marked.recheck.take().is_some_and(|(_, again)| again);
            match read_only {
                Some(true) if !marked.read_only => {
                    marked.read_only = true;
                    out.push_back(read_only_record(marked, true));
                }
                Some(false) if again => marked.recheck = Some((now + RECHECK, false)),
                _ => {}
            }
        }
    }

    /// After `POLLPRI` on mountinfo: ends the watches of filesystems that have no mount
    /// left in the namespace they were found in, and reports remounts between
    /// read-write and read-only.
    fn unmounted_or_remounted(&mut self, out: &mut VecDeque<SourceMsg>) {
        let mut gone = Vec::new();
        for (fsid, marked) in &mut self.marks {
            let mounts = match marked.place.mounts() {
                Ok(mounts) => mounts,
                Err(e) => {
                    tracing::warn!(
                        source = NAME,
                        "cannot read the mount table of pid {}: {e}",
                        marked.place.pid
                    );
                    continue;
                }
            };
            match marked.fs.mount_in(&mounts) {
                None => gone.push(*fsid),
                Some(mount) => {
                    let read_only = mount.filesystem_read_only();
                    if read_only != marked.read_only {
                        marked.read_only = read_only;
                        out.push_back(read_only_record(marked, read_only));
                    }
                }
            }
        }
        for fsid in gone {
            if let Some(marked) = self.marks.remove(&fsid) {
                tracing::info!(
                    source = NAME,
                    device = marked.fs.device,
                    "watched filesystem unmounted"
                );
                out.push_back(SourceMsg::WatchedObjectGone {
                    object: marked.fs.object(),
                    reason: format!(
                        "unmounted: {} ({}) has no mount left",
                        marked.fs.device, marked.fs.mount_point
                    ),
                });
            }
        }
    }
}

fn base_attributes(fs: &FsInfo, error: i32) -> Attrs {
    let mut attributes = Attrs::new();
    attributes.insert("device".into(), fs.device.clone().into());
    attributes.insert("major".into(), fs.major.into());
    attributes.insert("minor".into(), fs.minor.into());
    attributes.insert("fs-type".into(), fs.fs_type.clone().into());
    attributes.insert("mount-point".into(), fs.mount_point.clone().into());
    attributes.insert("source".into(), fs.source.clone().into());
    attributes.insert("fsid".into(), format!("{:016x}", fs.fsid).into());
    attributes.insert("errno".into(), Attr::U32(error.unsigned_abs()));
    // A switch to read-only with no error before it has no errno: an empty name.
    let errno_name = if error == 0 {
        String::new()
    } else {
        // The kernel's value, taken as sent: i32::MIN has no absolute value.
        errno_name(error.saturating_abs())
    };
    attributes.insert("errno-name".into(), errno_name.into());
    if let Some(name) = filesystem_errno_name(error.saturating_abs()) {
        attributes.insert("kernel-errno-name".into(), name.into());
    }
    attributes
}

/// A switch between read-write and read-only; with the last error when one preceded it.
fn read_only_record(marked: &Marked, read_only: bool) -> SourceMsg {
    let (error, count) = marked.last_error.unwrap_or((0, 0));
    let mut attributes = base_attributes(&marked.fs, error);
    attributes.insert("count".into(), Attr::U32(count));
    attributes.insert("read-only".into(), read_only.into());
    attributes.insert("after-error".into(), marked.last_error.is_some().into());
    SourceMsg::Record(record(SUBTYPE_READ_ONLY, &marked.fs, attributes))
}

fn record(subtype: u8, fs: &FsInfo, attributes: Attrs) -> Record {
    Record {
        source: NAME,
        subtype,
        object_id: fs.object(),
        change: Change::None,
        attributes,
        properties: Default::default(),
        audience: Audience::Administrators,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(entries: &[(&str, zbus::OwnedVariant)]) -> WatchSpec {
        entries
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.try_clone().unwrap()))
            .collect()
    }

    #[test]
    fn watch_specs_need_an_absolute_path_and_nothing_else() {
        let path = |p: &str| zbus::OwnedVariant::from(zbus::Str::from(p));
        assert!(parse_path(&spec(&[])).is_err());
        assert!(parse_path(&spec(&[("path", path("relative"))])).is_err());
        assert!(parse_path(&spec(&[("path", path("/mnt")), ("x", path("y"))])).is_err());
        assert_eq!(
            parse_path(&spec(&[("path", path("/mnt"))])).unwrap(),
            PathBuf::from("/mnt")
        );
    }

    #[test]
    fn records_carry_typed_attributes_for_administrators() {
        let fs = FsInfo {
            fsid: 1,
            major: 7,
            minor: 3,
            device: "loop3".into(),
            fs_type: "ext4".into(),
            mount_point: "/mnt".into(),
            source: "/dev/loop3".into(),
        };
        let rec = record(SUBTYPE_ERROR, &fs, base_attributes(&fs, 117));
        assert_eq!(rec.attr_str("errno-name"), Some("EUCLEAN"));
        assert_eq!(rec.attr_str("kernel-errno-name"), Some("EFSCORRUPTED"));
        assert_eq!(rec.attr_u64("errno"), Some(117));
        assert_eq!(rec.audience, Audience::Administrators);
        let watch = FilesystemWatch {
            object: "7:3".into(),
        };
        assert!(watch.matches(&rec));
        assert_eq!(watch.watched_object(), Some("7:3"));
        // Any i32 the kernel sends is described, i32::MIN included (no panic).
        let rec = record(SUBTYPE_ERROR, &fs, base_attributes(&fs, i32::MIN));
        assert_eq!(rec.attr_u64("errno"), Some(1 << 31));
        assert_eq!(rec.attr_str("kernel-errno-name"), None);
    }
}
