//! Mount topology, per mount namespace: fanotify mount events described by `statmount()`.
//!
//! Touches: `fanotify_init(FAN_REPORT_MNT)` and `fanotify_mark(FAN_MARK_MNTNS)` on an
//! nsfs fd (`/proc/PID/ns/mnt`; Linux 6.15), `statmount()`/`listmount()` with a
//! namespace id (6.8, ids 6.11), the nsfs ioctl `NS_GET_MNTNS_ID`, `/proc/PID/mountinfo`
//! (read, and polled for `POLLPRI`), `pidfd_open` on the process a namespace was named
//! by. Needs `CAP_SYS_ADMIN` (marks on a namespace, and `statmount` in a namespace owned
//! by another user namespace). No address family, no write anywhere.
//!
//! One fanotify group per watched namespace, so that an event says which namespace it
//! belongs to: a record carries only the mount's 64-bit unique id, and `statmount` must
//! be told the namespace. The daemon's own namespace is always marked while the source
//! runs (it is what [`EventSource::scan`] lists); other namespaces are marked when a
//! watch arms them and unmarked when their last watch goes (counted per namespace).
//!
//! - Attach: `statmount` at once, and the description is cached, because after a detach
//!   `statmount` fails with ENOENT. A detach is described from the cache.
//! - A move is one fanotify event with both bits: one `move` record, re-described.
//! - Remounts (read-only, options, `mount_setattr`) raise no fanotify event: up to 6.18
//!   fanotify reports only `FAN_MNT_ATTACH`/`FAN_MNT_DETACH`, `statmount` has no change
//!   counter and `listmount` lists ids only, so no kernel interface names the mount that
//!   was remounted, and asking `statmount` about every mount costs more than reading
//!   mountinfo once. (libmount 2.42's fanotify monitor and systemd's pending fanotify
//!   work read attach/detach from fanotify too and leave remounts to the mountinfo
//!   path.) `/proc/PID/mountinfo` wakes pollers with `POLLPRI` on every change of the
//!   namespace, attach and detach included; its lines are diffed with the previous
//!   read, and a mount whose options changed is re-described (`remount`). That reread
//!   costs in proportion to the namespace, so it is coalesced per namespace and bounded
//!   in time: after a quiet spell it happens at once; otherwise the next waits until
//!   `max(100 ms, 50 × the last reread's time)` after the last one, and serves every
//!   `POLLPRI` until then. The reread is timed by the clock: on a loaded machine a
//!   preempted reread looks longer and the interval stretches with the load, which
//!   delays remounts (3.4 s at 10,000 mounts with a busy loop on every core) but keeps
//!   the rereads' share of a busy machine small. Timing it in the thread's CPU time
//!   was tried: 1.6 s under the same load, but under a competing load (`findmnt --poll`
//!   beside it in the bench) the more frequent rereads raised the CPU per attach and
//!   detach at 10,000 mounts to 1.2–1.8× that of the clock, failing `flat`. Rereads
//!   thus take at most 2% of the time per namespace however fast it changes, attach and
//!   detach cost one `statmount` each whatever the namespace's size, and a remount is
//!   reported within that interval plus one reread. A reread compares each line's text
//!   with the last read's and decodes nothing: at 10,000 mounts it takes about 20 ms of
//!   CPU on a 2-core test machine, 13–15 ms of it the kernel writing the text (decoding
//!   every line, as before, made it about 30 ms). So after a quiet spell a remount is
//!   reported at once (30–50 ms at 10,000 mounts), and during continuous changes within
//!   about 1 s; the README states the bound and `benches/mounts.rs` measures it after a
//!   quiet spell, idle and with a busy loop on every core, where it is missed, and
//!   holds the rereads to their 2% in a paced churn. A mount remounted and
//!   remounted back within one interval is not seen. Propagation changes wake nobody
//!   and are seen only at the next description.
//! - Each namespace's work is charged to the users watching it, and one user's
//!   namespaces together may take `[sources.mounts] user_cpu_percent` of the daemon's
//!   time; past it their events are coalesced into a resync (see `budget`).
//! - `FAN_Q_OVERFLOW`: the namespace is resynced — listed again (`listmount`) on a
//!   blocking thread while the reader serves the other namespaces (see `job`), and what
//!   changed handed to the hub ([`SourceMsg::Resync`]), which tells that namespace's
//!   watchers (only them) with `Lost`.
//! - Fairness between namespaces: a fanotify group is read a slice of 24 events per
//!   turn, and the namespace read longest ago goes first, so that one namespace's storm
//!   delays another's event by one slice at most.
//! - A namespace whose last process exited is gone: its watches end with `WatchRemoved`.
//!   The pidfd of the process it was named by tells when to look; another process in the
//!   namespace takes its place if there is one.
//!
//! Object ids are `NAMESPACE/MOUNT` (the namespace id and the mount's unique id), so
//! that a subscription's snapshot can be limited to the namespaces its watches cover
//! ([`WatchMatcher::covers`]).
//!
//! A kernel older than 6.15 rejects `FAN_REPORT_MNT` (or `FAN_MARK_MNTNS`) with EINVAL.
//! There the source runs degraded, and says so in its availability
//! ([`Availability::Degraded`]): no fanotify group; each namespace is followed by its
//! mountinfo alone. The same diff that finds remounts then reports everything: a line
//! that appeared is an attach (its mount found by `listmount`, as mountinfo shows only
//! the reusable old id), a line gone a detach, a mount with a new mount point or parent
//! a move. Events carry the same unique ids and descriptions (`statmount`) as with
//! fanotify; what is lost is a mount attached and detached again between two reads, and
//! the exact order within one read. There every `POLLPRI` is a reread at once (it is
//! the only way to see attaches and detaches): each change costs a read and diff of the
//! whole mountinfo, about 2 µs per mount in the namespace (20 ms at 10,000),
//! plus a `statmount` per mount that changed. Without `statmount`/`listmount` with
//! namespace ids (6.11) the source is unavailable.

mod budget;
mod describe;
mod job;
mod lines;
mod namespace;
mod reader;
mod resync;
pub mod signal;
pub mod wire;

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{self, Read, Seek};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::{select_all, BoxFuture, FutureExt};
use futures_util::stream;
use nix::libc;
use tokio::io::unix::AsyncFd;
use tokio::io::{Interest, Ready};
use tokio::sync::mpsc;
use zbus::OwnedVariant;

use super::{
    ArmedWatch, Availability, EventSource, JournalIds, PlannedWatch, SourceStream, SourcesConfig,
    SpecReader, WatchMatcher, WatchSpec,
};
use crate::error::Error;
use crate::event::{Attr, Attrs, Audience, Change, Object, Record, SourceMsg};
use crate::policy::{Identity, Scope};
use crate::sys::{fanotify, lock};
use describe::{describe_all, object_of};
use reader::Reader;
use wire::{MountNotice, StatMount};

pub const NAME: &str = "mounts";

/// Never reorder: numbers are part of the interface.
pub const SUBTYPES: &[&str] = &["attach", "detach", "move", "remount"];

/// Reports only what a watch names, so the journal records name no `MESSAGE_ID` for it
/// (`[journal] sources` may still list it).
pub const JOURNAL: JournalIds = JournalIds::NONE;

const ATTACH: u8 = 0;
const DETACH: u8 = 1;
const MOVE: u8 = 2;
const REMOUNT: u8 = 3;

/// How long arming a namespace may take before the watch request fails.
const ARM_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes a resync drains a fanotify group by at once (an event with its mount record
/// is 40).
const READ_BUFFER: usize = 16 * 1024;
/// Bytes read from a fanotify group per turn: 24 events. Each is described
/// (`statmount`) and published before the next turn, which goes to the namespace served
/// longest ago, so another namespace's event waits behind at most this many of a
/// churning one's (whole buffers of 400 made bob wait 4 ms behind alice's in
/// `benches/mounts`).
const GROUP_SLICE: usize = 24 * 40;
/// The availability note of a kernel without fanotify mount events.
const MOUNTINFO_ONLY: &str = "fanotify mount events (FAN_REPORT_MNT, FAN_MARK_MNTNS) need \
     Linux 6.15; following each namespace by diffing /proc/PID/mountinfo instead: a mount \
     attached and detached again between two reads is not seen";

pub use budget::DEFAULT_USER_CPU_PERCENT;

/// The source's settings (`[sources.mounts]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountsConfig {
    /// The share of one CPU, in percent, that one user's watched namespaces may take
    /// (see the `budget` module).
    pub user_cpu_percent: u8,
}

impl Default for MountsConfig {
    fn default() -> Self {
        MountsConfig {
            user_cpu_percent: DEFAULT_USER_CPU_PERCENT,
        }
    }
}

pub struct Mounts {
    shared: Arc<Shared>,
    /// The settings; a reload changes them (see [`EventSource::reconfigure`]).
    config: Mutex<MountsConfig>,
}

/// What the arm closures and holds share with the running reader.
#[derive(Default)]
struct Shared {
    control: Mutex<Option<mpsc::UnboundedSender<Control>>>,
    counters: budget::Counters,
    /// CPU time the bus spent sending each namespace's records to subscribers since the
    /// reader last took it, to be charged to the namespace's watchers.
    delivered: Mutex<HashMap<u64, Duration>>,
}

impl Shared {
    fn send(&self, control: Control) -> Result<(), Error> {
        let sender = lock(&self.control).clone();
        sender
            .and_then(|s| s.send(control).ok())
            .ok_or_else(|| Error::Unavailable("the mounts source is not running".into()))
    }
}

enum Control {
    /// Count one more watch of the namespace behind `ns`, marking it if it is new; the
    /// reply (its id) is sent once the hub has its mounts.
    Arm {
        ns: OwnedFd,
        pid: u32,
        /// The user the namespace's work is charged to.
        uid: u32,
        anchor: OwnedFd,
        reply: std::sync::mpsc::SyncSender<Result<u64, Error>>,
    },
    Release {
        namespace: u64,
        uid: u32,
    },
    /// A reload changed `user_cpu_percent`: every user's share from the next charge on.
    Share(u8),
}

impl Mounts {
    pub fn new() -> Self {
        Mounts::with_config(&MountsConfig::default())
    }

    pub fn with_config(config: &MountsConfig) -> Self {
        Mounts {
            shared: Arc::default(),
            config: Mutex::new(config.clone()),
        }
    }
}

impl Default for Mounts {
    fn default() -> Self {
        Mounts::new()
    }
}

impl EventSource for Mounts {
    fn name(&self) -> &'static str {
        NAME
    }

    /// A new `user_cpu_percent` is every user's share from the running reader's next
    /// charge on (and the share of a reader opened later).
    fn reconfigure(&self, config: &SourcesConfig) {
        let mut current = lock(&self.config);
        if *current == config.mounts {
            return;
        }
        *current = config.mounts.clone();
        // Not running is fine: the next open reads the new share.
        let _ = self
            .shared
            .send(Control::Share(config.mounts.user_cpu_percent));
    }

    fn subtypes(&self) -> &'static [&'static str] {
        SUBTYPES
    }

    fn signal(&self) -> &'static crate::signal::SignalKind {
        &signal::KIND
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        self.shared.counters.list()
    }

    /// Sending a namespace's records is work done for its watchers: counted here, and
    /// charged to them by the reader at its next message (see `budget`).
    fn charges_deliveries(&self) -> bool {
        true
    }

    fn delivered(&self, record: &Record, cost: Duration) {
        if let Some(namespace) = record.attr_u64("namespace") {
            *lock(&self.shared.delivered).entry(namespace).or_default() += cost;
        }
    }

    fn probe(&self) -> Availability {
        let probe = || -> io::Result<bool> {
            let fanotify = fanotify_mount_events()?;
            let ns = open_namespace("/proc/self/ns/mnt")?;
            let id = namespace_id(&ns)?;
            list_mounts(id).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("listmount with a namespace id (needs Linux 6.11): {e}"),
                )
            })?;
            Ok(fanotify)
        };
        match probe() {
            Ok(true) => Availability::Available,
            Ok(false) => Availability::Degraded(MOUNTINFO_ONLY.into()),
            Err(e) => Availability::Unavailable(e.to_string()),
        }
    }

    /// Without a spec, the requester's own namespace (from its pid as the bus reported
    /// it); with `pid`, that process's namespace, which is someone else's unless it is
    /// the requester's own.
    fn parse_watch(&self, spec: &WatchSpec, requester: &Identity) -> Result<PlannedWatch, Error> {
        let spec = SpecReader::new(spec, NAME, &["pid"])?;
        let own_pid = requester.pid;
        let (pid, scope) = match spec_u32(&spec, "pid")? {
            Some(pid) => {
                let own = own_pid.is_some_and(|own| same_namespace(own, pid).unwrap_or(false));
                (pid, if own { Scope::Own } else { Scope::Others })
            }
            None => {
                let pid = own_pid.ok_or_else(|| {
                    Error::Unavailable(
                        "the bus did not tell the caller's pid, so its mount namespace is \
                         unknown; name a process with the 'pid' watch option"
                            .into(),
                    )
                })?;
                (pid, Scope::Own)
            }
        };
        let shared = Arc::clone(&self.shared);
        let uid = requester.uid;
        Ok(PlannedWatch::armed_by(scope, move || {
            arm(&shared, pid, uid)
        }))
    }

    /// The daemon's own namespace.
    fn scan(&self) -> io::Result<Vec<Object>> {
        let ns = open_namespace("/proc/self/ns/mnt")?;
        let id = namespace_id(&ns)?;
        Ok(describe_all(id)?.iter().map(object_of).collect())
    }

    fn open(&self) -> io::Result<SourceStream> {
        let (sender, receiver) = mpsc::unbounded_channel();
        let mut reader = Reader {
            fanotify: fanotify_mount_events()?,
            namespaces: HashMap::new(),
            control: receiver,
            pending: VecDeque::new(),
            to_acknowledge: None,
            buf: vec![0; GROUP_SLICE],
            budget: budget::Budget::new(lock(&self.config).user_cpu_percent),
            shared: Arc::clone(&self.shared),
            last_yield: None,
            turn: 0,
            jobs_done: mpsc::unbounded_channel(),
        };
        let ns = open_namespace("/proc/self/ns/mnt")?;
        reader.add_namespace(&ns, "/proc/self/mountinfo")?;
        *lock(&self.shared.control) = Some(sender);
        Ok(Box::pin(stream::unfold(reader, |mut reader| async move {
            let msg = reader.next().await?;
            Some((msg, reader))
        })))
    }
}

fn spec_u32(spec: &SpecReader<'_>, key: &str) -> Result<Option<u32>, Error> {
    spec.get(key)
        .map(|value: &OwnedVariant| {
            u32::try_from(value.clone()).map_err(|_| {
                Error::InvalidArgument(format!(
                    "watch option '{key}' must be a u32 (D-Bus type 'u'), got '{}'",
                    value.value_signature()
                ))
            })
        })
        .transpose()
}

fn namespace_inode(pid: u32) -> io::Result<(u64, u64)> {
    let meta = std::fs::metadata(format!("/proc/{pid}/ns/mnt"))?;
    Ok((meta.dev(), meta.ino()))
}

fn same_namespace(a: u32, b: u32) -> io::Result<bool> {
    Ok(namespace_inode(a)? == namespace_inode(b)?)
}

/// Runs after policy allowed the watch: names the namespace by `pid` and has the reader
/// mark it. The pidfd is opened first and checked after the namespace, so a pid reused
/// in between is noticed.
fn arm(shared: &Arc<Shared>, pid: u32, uid: u32) -> Result<ArmedWatch, Error> {
    let gone = |e: io::Error| {
        Error::NotFound(format!("cannot name the mount namespace of pid {pid}: {e}"))
    };
    let anchor = pidfd::open(pid).map_err(gone)?;
    let ns = open_namespace(&format!("/proc/{pid}/ns/mnt")).map_err(gone)?;
    if pidfd::exited(&anchor).unwrap_or(false) {
        return Err(gone(io::Error::from_raw_os_error(libc::ESRCH)));
    }
    let (reply, answer) = std::sync::mpsc::sync_channel(1);
    shared.send(Control::Arm {
        ns,
        pid,
        uid,
        anchor,
        reply,
    })?;
    let namespace = answer
        .recv_timeout(ARM_TIMEOUT)
        .map_err(|e| Error::Unavailable(format!("arming the mount namespace watch: {e}")))??;
    Ok(ArmedWatch {
        matcher: Box::new(MountWatch {
            namespace,
            object: namespace_object(namespace),
        }),
        hold: Some(Box::new(NamespaceHold {
            shared: Arc::clone(shared),
            namespace,
            uid,
        })),
        installed: None,
    })
}

fn namespace_object(namespace: u64) -> String {
    format!("{NAMESPACE_OBJECT}{namespace}")
}

/// The namespace [`namespace_object`] names.
fn namespace_of_object(object: &str) -> Option<u64> {
    object.strip_prefix(NAMESPACE_OBJECT)?.parse().ok()
}

/// How a watched namespace is named as a watch's object.
const NAMESPACE_OBJECT: &str = "mntns:";

fn object_prefix(namespace: u64) -> String {
    format!("{namespace}/")
}

/// One watch's count on its namespace's mark.
struct NamespaceHold {
    shared: Arc<Shared>,
    namespace: u64,
    uid: u32,
}

impl Drop for NamespaceHold {
    fn drop(&mut self) {
        // The source may be stopping already; then the mark goes with it.
        let _ = self.shared.send(Control::Release {
            namespace: self.namespace,
            uid: self.uid,
        });
    }
}

#[derive(Debug)]
struct MountWatch {
    namespace: u64,
    object: String,
}

impl WatchMatcher for MountWatch {
    fn matches(&self, record: &Record) -> bool {
        record.attr_u64("namespace") == Some(self.namespace)
    }

    fn watched_object(&self) -> Option<&str> {
        Some(&self.object)
    }

    fn covers(&self, object: &Object) -> Option<bool> {
        Some(object.id.starts_with(&object_prefix(self.namespace)))
    }
}

use crate::sys::mount_api::{list_mounts, open_namespace};
use crate::sys::pidfd;

fn namespace_id(ns: &OwnedFd) -> io::Result<u64> {
    crate::sys::mount_api::namespace_id(ns.as_fd())
}

/// A non-blocking fanotify group reporting mount events.
fn fanotify_group() -> io::Result<OwnedFd> {
    fanotify::init(
        fanotify::FAN_CLASS_NOTIF
            | fanotify::FAN_CLOEXEC
            | fanotify::FAN_NONBLOCK
            | fanotify::FAN_REPORT_MNT,
    )
}

/// Whether this kernel reports mount events through fanotify: `false` when it rejects
/// `FAN_REPORT_MNT` or `FAN_MARK_MNTNS` as unknown (EINVAL, before 6.15).
fn fanotify_mount_events() -> io::Result<bool> {
    let group = match fanotify_group() {
        Ok(group) => group,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(false),
        Err(e) => {
            return Err(io::Error::new(
                e.kind(),
                format!("fanotify_init(FAN_REPORT_MNT): {e}"),
            ))
        }
    };
    let ns = open_namespace("/proc/self/ns/mnt")?;
    match mark(&group, &ns, true) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("fanotify_mark(FAN_MARK_MNTNS): {e}"),
        )),
    }
}

fn mark(group: &OwnedFd, ns: &OwnedFd, add: bool) -> io::Result<()> {
    let action = if add {
        fanotify::FAN_MARK_ADD
    } else {
        fanotify::FAN_MARK_REMOVE
    };
    fanotify::mark(
        group.as_fd(),
        action | fanotify::FAN_MARK_MNTNS,
        wire::FAN_MNT_ATTACH | wire::FAN_MNT_DETACH,
        ns.as_raw_fd(),
        None,
    )
}

/// Registers an fd this code owns with the runtime.
fn register<T: AsRawFd>(fd: T, interest: Interest) -> io::Result<AsyncFd<T>> {
    // SAFETY: the AsyncFd owns `fd`, so it stays open and the same while registered and
    // is closed only when the AsyncFd is dropped.
    unsafe { AsyncFd::register_with_interest(fd, interest) }.map_err(|e| e.into_parts().1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel interfaces this source needs, on this host (6.18): the listing agrees
    /// with mountinfo, mount for mount.
    #[test]
    fn scan_lists_what_mountinfo_shows() {
        assert_eq!(Mounts::new().probe(), Availability::Available);
        let objects = Mounts::new().scan().expect("scan");
        let text = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        let mut expected: Vec<(u64, String)> = wire::parse_mountinfo(&text)
            .expect("parse")
            .into_iter()
            .map(|l| (u64::from(l.id), l.mount_point))
            .collect();
        let mut listed: Vec<(u64, String)> = objects
            .iter()
            .map(|o| {
                let id = match o.attributes["mountinfo-id"] {
                    Attr::U32(id) => u64::from(id),
                    ref other => panic!("mountinfo-id is {other:?}"),
                };
                let point = match &o.attributes["mount-point"] {
                    Attr::Str(s) => s.clone(),
                    other => panic!("mount-point is {other:?}"),
                };
                (id, point)
            })
            .collect();
        expected.sort();
        listed.sort();
        assert_eq!(listed, expected);
    }
}
