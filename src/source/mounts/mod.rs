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
//! - Remounts (read-only, options) raise no fanotify event. `/proc/PID/mountinfo` wakes
//!   pollers with `POLLPRI` on every change of the namespace; its lines are diffed with
//!   the previous read, and a mount whose options changed is re-described (`remount`).
//!   Propagation changes wake nobody and are seen only at the next description.
//! - `FAN_Q_OVERFLOW`: the namespace is listed again (`listmount`) and the whole table
//!   is handed to the hub ([`SourceMsg::Overflow`]), which tells every watcher with `Lost`.
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
//! the exact order within one read. Without `statmount`/`listmount` with namespace ids
//! (6.11) the source is unavailable.

pub mod signal;
pub mod wire;

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{self, Read, Seek};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
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
    reject_unknown_keys, ArmedWatch, Availability, EventSource, PlannedWatch, SourceStream,
    WatchMatcher, WatchSpec,
};
use crate::error::Error;
use crate::event::{Attr, Attrs, Audience, Change, Object, Record, SourceMsg};
use crate::policy::{Identity, Scope};
use wire::{MountNotice, StatMount};

pub const NAME: &str = "mounts";

/// Never reorder: numbers are part of the interface.
pub const SUBTYPES: &[&str] = &["attach", "detach", "move", "remount"];
const ATTACH: u8 = 0;
const DETACH: u8 = 1;
const MOVE: u8 = 2;
const REMOUNT: u8 = 3;

const SYS_STATMOUNT: libc::c_long = 457;
const SYS_LISTMOUNT: libc::c_long = 458;
const LSMT_ROOT: u64 = u64::MAX;
const MNT_ID_REQ_SIZE_VER1: u32 = 32;
/// `_IOR(NSIO, 0x5, __u64)`: the 64-bit id of the mount namespace behind an nsfs fd.
const NS_GET_MNTNS_ID: libc::c_ulong = 0x8008_b705;
/// How long arming a namespace may take before the watch request fails.
const ARM_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes read from a fanotify group at once (an event with its mount record is 40).
const READ_BUFFER: usize = 16 * 1024;
/// The availability note of a kernel without fanotify mount events.
const MOUNTINFO_ONLY: &str = "fanotify mount events (FAN_REPORT_MNT, FAN_MARK_MNTNS) need \
     Linux 6.15; following each namespace by diffing /proc/PID/mountinfo instead: a mount \
     attached and detached again between two reads is not seen";

pub struct Mounts {
    shared: Arc<Shared>,
}

/// What the arm closures and holds share with the running reader.
#[derive(Default)]
struct Shared {
    control: Mutex<Option<mpsc::UnboundedSender<Control>>>,
}

impl Shared {
    fn send(&self, control: Control) -> Result<(), Error> {
        let sender = self
            .control
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
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
        anchor: OwnedFd,
        reply: std::sync::mpsc::SyncSender<Result<u64, String>>,
    },
    Release {
        namespace: u64,
    },
}

impl Mounts {
    pub fn new() -> Self {
        Mounts {
            shared: Arc::default(),
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

    fn subtypes(&self) -> &'static [&'static str] {
        SUBTYPES
    }

    fn signal(&self) -> &'static crate::signal::SignalKind {
        &signal::KIND
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
        reject_unknown_keys(spec, NAME, &["pid"])?;
        let own_pid = requester.pid;
        let (pid, scope) = match spec_u32(spec, "pid")? {
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
        Ok(PlannedWatch::armed_by(scope, move || arm(&shared, pid)))
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
            buf: vec![0; READ_BUFFER],
        };
        let ns = open_namespace("/proc/self/ns/mnt")?;
        let (_, seed) = reader.add_namespace(&ns, None, "/proc/self/mountinfo")?;
        reader.pending.push_back((seed, None));
        *self
            .shared
            .control
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(sender);
        Ok(Box::pin(stream::unfold(reader, |mut reader| async move {
            let msg = reader.next().await?;
            Some((msg, reader))
        })))
    }
}

fn spec_u32(spec: &WatchSpec, key: &str) -> Result<Option<u32>, Error> {
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
fn arm(shared: &Arc<Shared>, pid: u32) -> Result<ArmedWatch, Error> {
    let gone = |e: io::Error| {
        Error::NotFound(format!("cannot name the mount namespace of pid {pid}: {e}"))
    };
    let anchor = pidfd_open(pid).map_err(gone)?;
    let ns = open_namespace(&format!("/proc/{pid}/ns/mnt")).map_err(gone)?;
    if pidfd_exited(&anchor) {
        return Err(gone(io::Error::from_raw_os_error(libc::ESRCH)));
    }
    let (reply, answer) = std::sync::mpsc::sync_channel(1);
    shared.send(Control::Arm {
        ns,
        pid,
        anchor,
        reply,
    })?;
    let namespace = answer
        .recv_timeout(ARM_TIMEOUT)
        .map_err(|e| Error::Unavailable(format!("arming the mount namespace watch: {e}")))?
        .map_err(Error::Unavailable)?;
    Ok(ArmedWatch {
        matcher: Box::new(MountWatch {
            namespace,
            object: namespace_object(namespace),
        }),
        hold: Some(Box::new(NamespaceHold {
            shared: Arc::clone(shared),
            namespace,
        })),
    })
}

fn namespace_object(namespace: u64) -> String {
    format!("mntns:{namespace}")
}

fn object_prefix(namespace: u64) -> String {
    format!("{namespace}/")
}

/// One watch's count on its namespace's mark.
struct NamespaceHold {
    shared: Arc<Shared>,
    namespace: u64,
}

impl Drop for NamespaceHold {
    fn drop(&mut self) {
        // The source may be stopping already; then the mark goes with it.
        let _ = self.shared.send(Control::Release {
            namespace: self.namespace,
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

fn cvt(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn owned_fd(ret: libc::c_long) -> io::Result<OwnedFd> {
    let fd = libc::c_int::try_from(cvt(ret)?).map_err(|_| io::Error::other("fd out of range"))?;
    // SAFETY: the kernel just returned this fd and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn fanotify_group() -> io::Result<OwnedFd> {
    // SAFETY: plain flags, no pointers.
    let fd = unsafe {
        libc::fanotify_init(
            libc::FAN_CLASS_NOTIF | libc::FAN_CLOEXEC | libc::FAN_NONBLOCK | wire::FAN_REPORT_MNT,
            libc::O_RDONLY as libc::c_uint,
        )
    };
    owned_fd(libc::c_long::from(fd))
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
        wire::FAN_MARK_ADD
    } else {
        wire::FAN_MARK_REMOVE
    };
    // SAFETY: both fds are open; a NULL path means "the object dirfd refers to".
    let ret = unsafe {
        libc::fanotify_mark(
            group.as_raw_fd(),
            action | wire::FAN_MARK_MNTNS,
            wire::FAN_MNT_ATTACH | wire::FAN_MNT_DETACH,
            ns.as_raw_fd(),
            std::ptr::null(),
        )
    };
    cvt(libc::c_long::from(ret)).map(drop)
}

fn open_namespace(path: &str) -> io::Result<OwnedFd> {
    let file = File::open(path).map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))?;
    Ok(OwnedFd::from(file))
}

fn namespace_id(ns: &OwnedFd) -> io::Result<u64> {
    let mut id = 0u64;
    // SAFETY: NS_GET_MNTNS_ID writes one u64 to the pointer, which outlives the call.
    let ret = unsafe { libc::ioctl(ns.as_raw_fd(), NS_GET_MNTNS_ID, std::ptr::from_mut(&mut id)) };
    cvt(libc::c_long::from(ret))
        .map_err(|e| io::Error::new(e.kind(), format!("ioctl(NS_GET_MNTNS_ID): {e}")))?;
    Ok(id)
}

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: plain integers.
    owned_fd(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) })
}

fn pidfd_exited(pidfd: &OwnedFd) -> bool {
    let mut fds = [libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    // SAFETY: one valid pollfd, no wait.
    let ready = unsafe { libc::poll(fds.as_mut_ptr(), 1, 0) };
    ready > 0
}

/// Registers an fd this code owns with the runtime.
fn register<T: AsRawFd>(fd: T, interest: Interest) -> io::Result<AsyncFd<T>> {
    // SAFETY: the AsyncFd owns `fd`, so it stays open and the same while registered and
    // is closed only when the AsyncFd is dropped.
    unsafe { AsyncFd::register_with_interest(fd, interest) }.map_err(|e| e.into_parts().1)
}

/// `struct mnt_id_req`, version 1 (with the namespace id).
#[repr(C)]
struct MntIdReq {
    size: u32,
    spare: u32,
    mnt_id: u64,
    param: u64,
    mnt_ns_id: u64,
}

/// Describes one mount of namespace `namespace`.
fn statmount(id: u64, namespace: u64, buf: &mut Vec<u64>) -> io::Result<StatMount> {
    let req = MntIdReq {
        size: MNT_ID_REQ_SIZE_VER1,
        spare: 0,
        mnt_id: id,
        param: wire::STATMOUNT_WANTED,
        mnt_ns_id: namespace,
    };
    loop {
        let bytes = buf.len() * 8;
        // SAFETY: `req` is a valid mnt_id_req of the size it declares; `buf` is writable
        // for `bytes` bytes and 8-byte aligned as struct statmount needs.
        let ret = unsafe {
            libc::syscall(
                SYS_STATMOUNT,
                std::ptr::from_ref(&req),
                buf.as_mut_ptr(),
                bytes,
                0,
            )
        };
        match cvt(ret) {
            Ok(_) => break,
            Err(e) if e.raw_os_error() == Some(libc::EOVERFLOW) && bytes < 1 << 20 => {
                buf.resize(buf.len() * 2, 0);
            }
            Err(e) => return Err(e),
        }
    }
    let bytes: Vec<u8> = buf.iter().flat_map(|w| w.to_ne_bytes()).collect();
    wire::parse_statmount(&bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Every mount id of a namespace.
fn list_mounts(namespace: u64) -> io::Result<Vec<u64>> {
    let mut ids = Vec::new();
    let mut chunk = vec![0u64; 512];
    let mut last = 0;
    loop {
        let req = MntIdReq {
            size: MNT_ID_REQ_SIZE_VER1,
            spare: 0,
            mnt_id: LSMT_ROOT,
            param: last,
            mnt_ns_id: namespace,
        };
        // SAFETY: `req` is valid for its declared size; `chunk` holds `len` u64s.
        let ret = unsafe {
            libc::syscall(
                SYS_LISTMOUNT,
                std::ptr::from_ref(&req),
                chunk.as_mut_ptr(),
                chunk.len(),
                0,
            )
        };
        let got = usize::try_from(cvt(ret)?).unwrap_or(0);
        ids.extend_from_slice(&chunk[..got.min(chunk.len())]);
        match chunk[..got.min(chunk.len())].last() {
            Some(id) if got == chunk.len() => last = *id,
            _ => return Ok(ids),
        }
    }
}

/// Every mount of a namespace, described; mounts that vanish while listing are skipped.
fn describe_all(namespace: u64) -> io::Result<Vec<StatMount>> {
    let mut buf = vec![0u64; 512];
    let mut mounts = Vec::new();
    for id in list_mounts(namespace)? {
        match statmount(id, namespace, &mut buf) {
            Ok(mount) => mounts.push(mount),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(mounts)
}

fn attributes(mount: &StatMount) -> Attrs {
    let mut attrs = Attrs::new();
    let mut put = |key: &str, value: Attr| {
        attrs.insert(key.to_owned(), value);
    };
    put("namespace", mount.namespace.into());
    put("mount-id", mount.id.into());
    put("parent-id", mount.parent_id.into());
    put("mountinfo-id", mount.old_id.into());
    put("parent-mountinfo-id", mount.old_parent_id.into());
    put("mount-point", mount.mount_point.clone().into());
    put("root", mount.root.clone().into());
    put("source", mount.source.clone().into());
    let fs_type = if mount.fs_subtype.is_empty() {
        mount.fs_type.clone()
    } else {
        format!("{}.{}", mount.fs_type, mount.fs_subtype)
    };
    put("fs-type", fs_type.into());
    put("options", mount.mount_options().into());
    put("fs-options", mount.fs_options.clone().into());
    put(
        "read-only",
        (mount.attr & wire::MOUNT_ATTR_RDONLY != 0).into(),
    );
    put(
        "fs-read-only",
        (mount.sb_flags & wire::SB_RDONLY != 0).into(),
    );
    put("nosuid", (mount.attr & wire::MOUNT_ATTR_NOSUID != 0).into());
    put("nodev", (mount.attr & wire::MOUNT_ATTR_NODEV != 0).into());
    put("noexec", (mount.attr & wire::MOUNT_ATTR_NOEXEC != 0).into());
    put(
        "nosymfollow",
        (mount.attr & wire::MOUNT_ATTR_NOSYMFOLLOW != 0).into(),
    );
    put(
        "idmapped",
        (mount.attr & wire::MOUNT_ATTR_IDMAP != 0).into(),
    );
    put("atime", mount.atime().into());
    put("propagation", mount.propagation_name().into());
    put("peer-group", mount.peer_group.into());
    put("master", mount.master.into());
    put("major", mount.dev_major.into());
    put("minor", mount.dev_minor.into());
    attrs
}

fn object_id(namespace: u64, mount: u64) -> String {
    format!("{namespace}/{mount}")
}

fn object_of(mount: &StatMount) -> Object {
    Object {
        id: object_id(mount.namespace, mount.id),
        changes: 0,
        attributes: attributes(mount),
        properties: Default::default(),
    }
}

fn record(subtype: u8, change: Change, namespace: u64, id: u64, attributes: Attrs) -> Record {
    Record {
        source: NAME,
        subtype,
        object_id: object_id(namespace, id),
        change,
        attributes,
        properties: Default::default(),
        // Who may see a namespace's mounts was decided when the watch named it.
        audience: Audience::Everyone,
    }
}

/// A mountinfo line as two reads compare it (by its old id).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Line {
    parent: u32,
    mount_point: String,
    fs_type: String,
    source: String,
    options: (String, String),
}

struct Namespace {
    id: u64,
    inode: (u64, u64),
    /// `None` without fanotify mount events: mountinfo alone follows the namespace.
    group: Option<AsyncFd<OwnedFd>>,
    mountinfo: AsyncFd<File>,
    /// The process this namespace was named by; `None` for the daemon's own.
    anchor: Option<AsyncFd<OwnedFd>>,
    mounts: HashMap<u64, StatMount>,
    lines: HashMap<u32, Line>,
    watches: usize,
}

enum Wake {
    Control(Option<Control>),
    Group(u64),
    Mountinfo(u64),
    Anchor(u64),
}

type Acknowledge = std::sync::mpsc::SyncSender<Result<u64, String>>;

struct Reader {
    /// Whether fanotify reports attaches, detaches and moves (else the mountinfo diff).
    fanotify: bool,
    namespaces: HashMap<u64, Namespace>,
    control: mpsc::UnboundedReceiver<Control>,
    /// Messages to yield, each with the arm request to answer once the hub applied it.
    pending: VecDeque<(SourceMsg, Option<(Acknowledge, u64)>)>,
    to_acknowledge: Option<(Acknowledge, u64)>,
    buf: Vec<u8>,
}

impl Reader {
    /// The next message, or `None` when the source failed for good.
    async fn next(&mut self) -> Option<SourceMsg> {
        // The hub polls again only after publishing what it got: the namespace's mounts
        // are in its table now, so the watch can be taken and snapshots include them.
        if let Some((reply, namespace)) = self.to_acknowledge.take() {
            let _ = reply.send(Ok(namespace));
        }
        loop {
            if let Some((msg, ack)) = self.pending.pop_front() {
                self.to_acknowledge = ack;
                return Some(msg);
            }
            let wake = self.wait().await;
            if let Err(e) = self.handle(wake).await {
                tracing::error!(source = NAME, "{e}");
                return None;
            }
        }
    }

    async fn wait(&mut self) -> Wake {
        let mut waits: Vec<BoxFuture<'_, Wake>> = Vec::new();
        let control = &mut self.control;
        waits.push(async move { Wake::Control(control.recv().await) }.boxed());
        for ns in self.namespaces.values() {
            let id = ns.id;
            if let Some(group) = &ns.group {
                waits.push(
                    async move {
                        let _ = group.readable().await;
                        Wake::Group(id)
                    }
                    .boxed(),
                );
            }
            waits.push(
                async move {
                    let _ = ns.mountinfo.ready(Interest::PRIORITY).await;
                    Wake::Mountinfo(id)
                }
                .boxed(),
            );
            if let Some(anchor) = &ns.anchor {
                waits.push(
                    async move {
                        let _ = anchor.readable().await;
                        Wake::Anchor(id)
                    }
                    .boxed(),
                );
            }
        }
        select_all(waits).await.0
    }

    async fn handle(&mut self, wake: Wake) -> Result<(), String> {
        match wake {
            Wake::Control(None) => Err("the control channel closed".into()),
            Wake::Control(Some(control)) => {
                self.control(control);
                Ok(())
            }
            Wake::Group(id) => self.read_group(id).await,
            Wake::Mountinfo(id) => {
                self.reread_mountinfo(id).await;
                Ok(())
            }
            Wake::Anchor(id) => {
                self.anchor_exited(id);
                Ok(())
            }
        }
    }

    fn control(&mut self, control: Control) {
        match control {
            Control::Arm {
                ns,
                pid,
                anchor,
                reply,
            } => {
                let known = namespace_id(&ns)
                    .ok()
                    .filter(|id| self.namespaces.contains_key(id));
                if let Some(id) = known {
                    if let Some(entry) = self.namespaces.get_mut(&id) {
                        entry.watches += 1;
                    }
                    let _ = reply.send(Ok(id));
                    return;
                }
                let anchor = match register(anchor, Interest::READABLE) {
                    Ok(anchor) => anchor,
                    Err(e) => {
                        let _ = reply.send(Err(format!("watching pid {pid}: {e}")));
                        return;
                    }
                };
                match self.add_namespace(&ns, Some(anchor), &format!("/proc/{pid}/mountinfo")) {
                    Ok((id, seed)) => self.pending.push_back((seed, Some((reply, id)))),
                    Err(e) => {
                        let _ = reply.send(Err(format!(
                            "watching the mount namespace of pid {pid}: {e}"
                        )));
                    }
                }
            }
            Control::Release { namespace } => {
                let Some(entry) = self.namespaces.get_mut(&namespace) else {
                    return;
                };
                entry.watches = entry.watches.saturating_sub(1);
                if entry.watches == 0 && entry.anchor.is_some() {
                    self.namespaces.remove(&namespace);
                    self.pending.push_back((
                        SourceMsg::Replace {
                            prefix: object_prefix(namespace),
                            objects: Vec::new(),
                        },
                        None,
                    ));
                }
            }
        }
    }

    /// Marks a namespace, lists its mounts and reads its mountinfo; returns the message
    /// that puts its mounts in the hub's table. Marked first so nothing falls between
    /// the listing and the first event.
    fn add_namespace(
        &mut self,
        ns: &OwnedFd,
        anchor: Option<AsyncFd<OwnedFd>>,
        mountinfo_path: &str,
    ) -> io::Result<(u64, SourceMsg)> {
        let id = namespace_id(ns)?;
        let meta = File::from(ns.try_clone()?).metadata()?;
        let group = if self.fanotify {
            let group = fanotify_group()?;
            mark(&group, ns, true).map_err(|e| {
                io::Error::new(e.kind(), format!("fanotify_mark(FAN_MARK_MNTNS): {e}"))
            })?;
            Some(register(group, Interest::READABLE)?)
        } else {
            None
        };
        let mut mountinfo = File::open(mountinfo_path)
            .map_err(|e| io::Error::new(e.kind(), format!("{mountinfo_path}: {e}")))?;
        let lines = read_lines(&mut mountinfo)?;
        let mounts: HashMap<u64, StatMount> =
            describe_all(id)?.into_iter().map(|m| (m.id, m)).collect();
        let objects = mounts.values().map(object_of).collect();
        self.namespaces.insert(
            id,
            Namespace {
                id,
                inode: (meta.dev(), meta.ino()),
                group,
                mountinfo: register(mountinfo, Interest::PRIORITY)?,
                anchor,
                mounts,
                lines,
                watches: 1,
            },
        );
        let seed = SourceMsg::Replace {
            prefix: object_prefix(id),
            objects,
        };
        Ok((id, seed))
    }

    async fn read_group(&mut self, id: u64) -> Result<(), String> {
        let Some(group) = self.namespaces.get(&id).and_then(|ns| ns.group.as_ref()) else {
            return Ok(());
        };
        let mut events = Vec::new();
        loop {
            let mut guard = group
                .readable()
                .await
                .map_err(|e| format!("fanotify group of namespace {id}: {e}"))?;
            let buf = &mut self.buf;
            match guard.try_io(|fd| nix::unistd::read(fd.get_ref(), buf).map_err(io::Error::from)) {
                Ok(Ok(0)) => break,
                Ok(Ok(n)) => match wire::fanotify_events(&buf[..n]) {
                    Ok(parsed) => events.extend(parsed),
                    Err(e) => tracing::warn!(source = NAME, "malformed fanotify record: {e}"),
                },
                Ok(Err(e)) => return Err(format!("reading the fanotify group of {id}: {e}")),
                Err(_would_block) => break,
            }
        }
        for event in events {
            if event.fd >= 0 {
                // SAFETY: the kernel installed this fd for us; closing it is ours to do.
                drop(unsafe { OwnedFd::from_raw_fd(event.fd) });
            }
            self.apply(id, event.notice);
        }
        Ok(())
    }

    fn apply(&mut self, id: u64, notice: MountNotice) {
        if notice == MountNotice::Overflow {
            self.overflowed(id);
            return;
        }
        let Some(ns) = self.namespaces.get_mut(&id) else {
            return;
        };
        let mut buf = vec![0u64; 512];
        let mut describe = |mount: u64, subtype: u8| -> Record {
            match statmount(mount, id, &mut buf) {
                Ok(described) => {
                    let attrs = attributes(&described);
                    ns.mounts.insert(mount, described);
                    record(subtype, Change::Upsert, id, mount, attrs)
                }
                Err(e) => {
                    // Already gone again: its detach follows. Say what is known.
                    tracing::debug!(source = NAME, mount, "statmount: {e}");
                    let mut attrs = Attrs::new();
                    attrs.insert("namespace".into(), id.into());
                    attrs.insert("mount-id".into(), mount.into());
                    record(subtype, Change::Upsert, id, mount, attrs)
                }
            }
        };
        let msg = match notice {
            MountNotice::Attach(mount) => SourceMsg::Record(describe(mount, ATTACH)),
            MountNotice::Move(mount) => SourceMsg::Record(describe(mount, MOVE)),
            MountNotice::Detach(mount) => {
                let attrs = match ns.mounts.remove(&mount) {
                    Some(known) => attributes(&known),
                    None => {
                        let mut attrs = Attrs::new();
                        attrs.insert("namespace".into(), id.into());
                        attrs.insert("mount-id".into(), mount.into());
                        attrs
                    }
                };
                SourceMsg::Record(record(DETACH, Change::Remove, id, mount, attrs))
            }
            // Handled above.
            MountNotice::Overflow => return,
            MountNotice::Ignored { mask } => {
                tracing::debug!(source = NAME, mask, "ignored fanotify event");
                return;
            }
        };
        self.pending.push_back((msg, None));
    }

    /// The kernel dropped events of this namespace: list it again and hand the hub the
    /// whole table (every namespace's mounts), which it diffs and answers with `Lost`.
    fn overflowed(&mut self, id: u64) {
        tracing::warn!(
            source = NAME,
            namespace = id,
            "fanotify queue overflowed; rescanning"
        );
        if let Some(ns) = self.namespaces.get_mut(&id) {
            match describe_all(id) {
                Ok(mounts) => ns.mounts = mounts.into_iter().map(|m| (m.id, m)).collect(),
                Err(e) => tracing::error!(source = NAME, "rescanning namespace {id}: {e}"),
            }
        }
        let objects = self
            .namespaces
            .values()
            .flat_map(|ns| ns.mounts.values().map(object_of))
            .collect();
        self.pending
            .push_back((SourceMsg::Overflow { objects }, None));
    }

    /// Rereads a namespace's mountinfo after `POLLPRI` and diffs it with the cache.
    async fn reread_mountinfo(&mut self, id: u64) {
        let follow_topology = !self.fanotify;
        let Some(ns) = self.namespaces.get_mut(&id) else {
            return;
        };
        let lines = match ns.mountinfo.ready(Interest::PRIORITY).await {
            Ok(mut guard) => {
                guard.clear_ready_matching(Ready::PRIORITY);
                read_lines(ns.mountinfo.get_mut())
            }
            Err(e) => Err(e),
        };
        match lines {
            Ok(lines) => {
                for record in diff(ns, lines, follow_topology) {
                    self.pending.push_back((SourceMsg::Record(record), None));
                }
            }
            Err(e) => tracing::warn!(source = NAME, namespace = id, "reading mountinfo: {e}"),
        }
    }

    /// The process a namespace was named by exited: another process in it takes over, or
    /// the namespace is gone for us.
    fn anchor_exited(&mut self, id: u64) {
        let Some(ns) = self.namespaces.get_mut(&id) else {
            return;
        };
        if let Some(pid) = process_in_namespace(ns.inode) {
            if let Ok(anchor) = pidfd_open(pid).and_then(|fd| register(fd, Interest::READABLE)) {
                ns.anchor = Some(anchor);
                return;
            }
        }
        self.namespaces.remove(&id);
        self.pending.push_back((
            SourceMsg::Replace {
                prefix: object_prefix(id),
                objects: Vec::new(),
            },
            None,
        ));
        self.pending.push_back((
            SourceMsg::WatchedObjectGone {
                object: namespace_object(id),
                reason: format!("namespace-gone: no process is left in mount namespace {id}"),
            },
            None,
        ));
    }
}

/// The one diff of a namespace's mounts: the lines of a new mountinfo read that differ
/// from the previous read name the mounts to look at; `statmount` says what each is now,
/// and comparing that with the cached description says what happened to it (the cache
/// is updated). With `follow_topology` false, fanotify reports attaches, detaches and
/// moves, so only remounts are taken from here.
fn diff(ns: &mut Namespace, lines: HashMap<u32, Line>, follow_topology: bool) -> Vec<Record> {
    let id = ns.id;
    let by_old_id: HashMap<u32, u64> = ns.mounts.values().map(|m| (m.old_id, m.id)).collect();
    let mut look_at = Vec::new();
    let mut appeared = false;
    for (old_id, line) in &lines {
        if ns.lines.get(old_id) == Some(line) {
            continue;
        }
        match by_old_id.get(old_id) {
            Some(&mount) => look_at.push(mount),
            None => appeared = true,
        }
    }
    if follow_topology {
        look_at.extend(
            ns.lines
                .keys()
                .filter(|old_id| !lines.contains_key(old_id))
                .filter_map(|old_id| by_old_id.get(old_id)),
        );
    }
    ns.lines = lines;
    // Newest first, so that of a tree detached at once, children go before parents.
    look_at.sort_unstable_by(|a, b| b.cmp(a));
    look_at.dedup();

    let mut buf = vec![0u64; 512];
    let mut records = Vec::new();
    for mount in look_at {
        let Some(before) = ns.mounts.get(&mount) else {
            continue;
        };
        match statmount(mount, id, &mut buf) {
            Ok(now) => {
                let moved =
                    now.mount_point != before.mount_point || now.parent_id != before.parent_id;
                let remounted = now.attr != before.attr
                    || now.sb_flags != before.sb_flags
                    || now.fs_options != before.fs_options;
                let attrs = attributes(&now);
                ns.mounts.insert(mount, now);
                if moved && follow_topology {
                    records.push(record(MOVE, Change::Upsert, id, mount, attrs.clone()));
                }
                if remounted {
                    records.push(record(REMOUNT, Change::Upsert, id, mount, attrs));
                }
            }
            // Gone (its old id may be another mount's now): fanotify's detach follows.
            Err(e) if !follow_topology => {
                tracing::debug!(
                    source = NAME,
                    mount,
                    "statmount after a mountinfo change: {e}"
                );
            }
            Err(e) => {
                if e.raw_os_error() != Some(libc::ENOENT) {
                    tracing::warn!(source = NAME, mount, "statmount: {e}; taken as detached");
                }
                appeared = true;
                if let Some(known) = ns.mounts.remove(&mount) {
                    let attrs = attributes(&known);
                    records.push(record(DETACH, Change::Remove, id, mount, attrs));
                }
            }
        }
    }
    if follow_topology && appeared {
        match list_mounts(id) {
            Ok(mut listed) => {
                listed.retain(|mount| !ns.mounts.contains_key(mount));
                listed.sort_unstable();
                for mount in listed {
                    match statmount(mount, id, &mut buf) {
                        Ok(now) => {
                            let attrs = attributes(&now);
                            ns.mounts.insert(mount, now);
                            records.push(record(ATTACH, Change::Upsert, id, mount, attrs));
                        }
                        // Gone again before it could be described: nothing to report.
                        Err(e) => tracing::debug!(source = NAME, mount, "statmount: {e}"),
                    }
                }
            }
            Err(e) => tracing::warn!(source = NAME, namespace = id, "listmount: {e}"),
        }
    }
    records
}

fn read_lines(file: &mut File) -> io::Result<HashMap<u32, Line>> {
    file.rewind()?;
    let mut text = String::new();
    file.read_to_string(&mut text)?;
    let lines =
        wire::parse_mountinfo(&text).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok(lines
        .into_iter()
        .map(|l| {
            (
                l.id,
                Line {
                    parent: l.parent_id,
                    mount_point: l.mount_point,
                    fs_type: l.fs_type,
                    source: l.source,
                    options: (l.mount_options, l.super_options),
                },
            )
        })
        .collect())
}

/// Some live process whose mount namespace is `inode`, by walking /proc.
fn process_in_namespace(inode: (u64, u64)) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| namespace_inode(*pid).is_ok_and(|found| found == inode))
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
