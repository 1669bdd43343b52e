//! Keys and keyrings, from the kernel's general notification queue (`watch_queue`).
//!
//! Touches: one notification pipe (`pipe2(O_NOTIFICATION_PIPE)`) while someone watches
//! keys, sized with `IOC_WATCH_QUEUE_SET_SIZE` ([`QUEUE_NOTES`]) and filtered with
//! `IOC_WATCH_QUEUE_SET_FILTER` to the union of the changes the current watches want, so
//! the kernel drops what nobody asked for. Watches are set with `KEYCTL_WATCH_KEY` by a
//! short-lived helper (this binary re-executed, see [`helper`]) running with the
//! subscriber's uid, gid and groups, so the kernel's View check and the security module's
//! `watch_key` hook judge the subscriber, not the daemon: a user cannot watch a key it
//! could not watch itself. Needs a kernel with `CONFIG_WATCH_QUEUE` and
//! `CONFIG_KEY_NOTIFICATIONS` (5.8+), and `CAP_SETUID`/`CAP_SETGID` for the helper.
//!
//! Watches (`AddWatch("keys", tag, spec)`), at most one of (none: the caller's user
//! keyring):
//! - `keyring` (s): `user` or `persistent`, the caller's own user or persistent keyring
//!   (created if missing). With `uid` (u): that user's; another user's needs the
//!   `watch-other-keys` authorization (root, or an administrator through polkit), and the
//!   helper then runs as that user.
//! - `serial` (i): a key or keyring the caller names and may view, owned by the caller
//!   (root may name anyone's).
//!
//! and optionally `changes` (as): the change kinds this watch wants (default all).
//!
//! The session keyring belongs to a process, not to the daemon nor to a uid, so the
//! daemon cannot find it: a session client (a desktop session component) asks for its own
//! session keyring's serial (`keyctl_get_keyring_ID(KEY_SPEC_SESSION_KEYRING, 0)`, or
//! `keyctl show @s`) and watches it with `{"serial": <that serial>}`. Session keyrings
//! grant their owner View, so the helper, running as that uid in a fresh session of its
//! own, may watch it; another user may not.
//!
//! One kernel watch per key serves every subscription that watches it (the kernel allows
//! one watch per key and pipe; a second `KEYCTL_WATCH_KEY` from another subscriber fails
//! `EBUSY` only after its View and security checks passed, which is the proof the daemon
//! needs). The watch is released when the last subscription drops it, by a helper running
//! as whoever set it (removal also needs View).
//!
//! Kernel pitfalls handled: the pipe's write end stays open (once closed, `poll()`
//! reports `POLLHUP` for ever); reads go on until `EAGAIN` after every wakeup, because a
//! pending loss flag does not make the pipe readable; removal records (the key destroyed
//! by the garbage collector, some time after its last link went or it was invalidated)
//! end the watches bound to that key with `WatchRemoved`; a removal record caused by the
//! daemon's own unwatch is recognised and ignored; a loss record becomes `Lost` for every
//! key watcher.
//!
//! Visibility: a record concerns one key; it goes only to watches of that key (each of
//! which proved View on it through the kernel with its subscriber's credentials), and
//! its audience is the key's owner, so policy checks every event again. The key's type
//! and description are included when known from a subscriber's own `KEYCTL_DESCRIBE`.

pub mod helper;
mod label;
mod reader;
mod request;
pub mod signal;
pub mod wire;

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::stream;
use nix::libc;
use tokio::io::unix::AsyncFd;
use zbus::OwnedVariant;

use super::{
    ArmedWatch, Availability, EventSource, JournalIds, PlannedWatch, SourceStream, SpecReader,
    WatchMatcher, WatchSpec,
};
use crate::error::Error;
use crate::event::{Attr, Attrs, Audience, Change, Object, Record, SourceMsg};
use crate::policy::{Identity, Scope};
use crate::sys::lock;
use helper::{Creds, KeyInfo, Outcome, Target};
use reader::Reader;
pub use request::KeyWatchRequest;
use wire::{KeyChange, Note};

pub const NAME: &str = "keys";

/// The kernel's key notification subtypes, in its order: a subtype's index is its number.
pub const SUBTYPES: &[&str] = &[
    "instantiated",
    "updated",
    "linked",
    "unlinked",
    "cleared",
    "revoked",
    "invalidated",
    "setattr",
];

/// Reports only what a watch names, so the journal records name no `MESSAGE_ID` for it
/// (`[journal] sources` may still list it).
pub const JOURNAL: JournalIds = JournalIds::NONE;

/// Notes the kernel queues for the daemon before it marks a loss (1–512, rounded up to 32
/// by the kernel).
pub const QUEUE_NOTES: libc::c_ulong = 256;

const O_NOTIFICATION_PIPE: libc::c_int = libc::O_EXCL;
/// `_IO('W', 0x60)` and `_IO('W', 0x61)`.
const IOC_WATCH_QUEUE_SET_SIZE: libc::c_ulong = 0x5760;
const IOC_WATCH_QUEUE_SET_FILTER: libc::c_ulong = 0x5761;
const ALL_CHANGES: u8 = 0xff;

/// What one running pipe serves: the kernel watches and who holds them.
struct Running {
    /// A duplicate of the read end, handed to helpers (the kernel takes any fd of the pipe).
    pipe: OwnedFd,
    run: u64,
    watched: HashMap<i32, KernelWatch>,
}

struct KernelWatch {
    /// Identifies this kernel watch among all the daemon ever set, so that a stale hold
    /// never releases a newer watch of the same serial.
    instance: u64,
    holders: usize,
    /// Who set it: removal runs as them (it needs View too).
    armed_by: Creds,
    /// The change kinds each holder wants, for the kernel filter.
    wants: Vec<u8>,
}

/// What the reader needs per watched key, behind its own short lock.
#[derive(Default)]
struct Table {
    info: HashMap<i32, Watched>,
    /// Removal records the daemon caused by unwatching, not yet read back.
    expected_removals: HashMap<i32, u32>,
}

#[derive(Clone)]
struct Watched {
    owner: u32,
    info: Option<KeyInfo>,
}

struct Shared {
    helper: PathBuf,
    /// Held while a helper runs, so arming and releasing never interleave.
    running: Mutex<Option<Running>>,
    table: Mutex<Table>,
    next_instance: AtomicU64,
}

pub struct Keys {
    shared: Arc<Shared>,
}

impl Keys {
    pub fn new() -> Self {
        // The running image itself, even after a package upgrade replaced the file.
        let helper = PathBuf::from("/proc/self/exe");
        Keys {
            shared: Arc::new(Shared {
                helper,
                running: Mutex::new(None),
                table: Mutex::new(Table::default()),
                next_instance: AtomicU64::new(1),
            }),
        }
    }
}

impl Default for Keys {
    fn default() -> Self {
        Keys::new()
    }
}

/// `pipe2(O_NOTIFICATION_PIPE | O_CLOEXEC | O_NONBLOCK)`: (read end, write end).
fn notification_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds: [RawFd; 2] = [-1; 2];
    // SAFETY: fds points to two writable ints, as pipe2 requires.
    let r = unsafe {
        libc::pipe2(
            fds.as_mut_ptr(),
            O_NOTIFICATION_PIPE | libc::O_CLOEXEC | libc::O_NONBLOCK,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded: both fds are fresh and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn unavailable_reason(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ENOPKG) | Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) => format!(
            "kernel built without CONFIG_WATCH_QUEUE (pipe2(O_NOTIFICATION_PIPE) failed: {e})"
        ),
        _ => format!("cannot create a notification pipe: {e}"),
    }
}

/// `struct watch_notification_filter` with one `watch_notification_type_filter`.
#[repr(C)]
struct Filter {
    nr_filters: u32,
    reserved: u32,
    kind: u32,
    info_filter: u32,
    info_mask: u32,
    subtype_filter: [u32; 8],
}

fn set_filter(pipe: &OwnedFd, changes: u8) -> io::Result<()> {
    let filter = Filter {
        nr_filters: 1,
        reserved: 0,
        kind: wire::WATCH_TYPE_KEY_NOTIFY,
        info_filter: 0,
        info_mask: 0,
        subtype_filter: [u32::from(changes), 0, 0, 0, 0, 0, 0, 0],
    };
    // SAFETY: the argument points to a filter laid out as the kernel's struct, alive for
    // the call; the kernel only reads it.
    let r = unsafe {
        libc::ioctl(
            pipe.as_raw_fd(),
            IOC_WATCH_QUEUE_SET_FILTER,
            std::ptr::from_ref(&filter),
        )
    };
    if r != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("IOC_WATCH_QUEUE_SET_FILTER: {e}"),
        ));
    }
    Ok(())
}

impl Running {
    fn union(&self, extra: u8) -> u8 {
        self.watched
            .values()
            .flat_map(|w| w.wants.iter())
            .fold(extra, |acc, w| acc | w)
    }
}

impl EventSource for Keys {
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
        match notification_pipe() {
            Ok(_) => Availability::Available,
            Err(e) => Availability::Unavailable(unavailable_reason(&e)),
        }
    }

    fn parse_watch(&self, spec: &WatchSpec, requester: &Identity) -> Result<PlannedWatch, Error> {
        let request = KeyWatchRequest::parse(spec, requester)?;
        let scope = request.scope(requester);
        let shared = Arc::clone(&self.shared);
        let requester = requester.clone();
        Ok(PlannedWatch::armed_by(scope, move || {
            arm(&shared, request, &requester)
        }))
    }

    /// Keys are not enumerated: a snapshot is empty.
    fn scan(&self) -> io::Result<Vec<Object>> {
        Ok(Vec::new())
    }

    fn open(&self) -> io::Result<SourceStream> {
        let (read, write) =
            notification_pipe().map_err(|e| io::Error::new(e.kind(), unavailable_reason(&e)))?;
        // SAFETY: an ioctl taking an integer (a number of notes) on our own pipe.
        if unsafe { libc::ioctl(read.as_raw_fd(), IOC_WATCH_QUEUE_SET_SIZE, QUEUE_NOTES) } != 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("IOC_WATCH_QUEUE_SET_SIZE {QUEUE_NOTES}: {e}"),
            ));
        }
        // Nothing is wanted until a watch says what.
        set_filter(&read, 0)?;
        let run = self.shared.next_instance.fetch_add(1, Ordering::Relaxed);
        *lock(&self.shared.running) = Some(Running {
            pipe: read.try_clone()?,
            run,
            watched: HashMap::new(),
        });
        *lock(&self.shared.table) = Table::default();
        let reader = Reader {
            // SAFETY: the AsyncFd owns the OwnedFd, so the fd stays open while registered
            // and closes only when the AsyncFd is dropped.
            fd: unsafe { AsyncFd::register(read) }?,
            _write: write,
            shared: Arc::clone(&self.shared),
            run,
            pending: std::collections::VecDeque::new(),
        };
        Ok(Box::pin(stream::unfold(reader, |mut reader| async move {
            let msg = reader.next().await?;
            Some((msg, reader))
        })))
    }
}

/// The credentials the helper runs with for `uid`: the requester's own groups from the
/// bus when it is the requester, else the user's from the user database.
fn creds_for(uid: u32, requester: Option<&Identity>) -> Creds {
    let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten();
    // A uid without a passwd entry gets no group at all: nogroup.
    let gid = user.as_ref().map_or(65534, |u| u.gid.as_raw());
    let groups = match requester {
        Some(identity) => identity.gids.clone(),
        None => user
            .as_ref()
            .and_then(|u| {
                let name = std::ffi::CString::new(u.name.clone()).ok()?;
                nix::unistd::getgrouplist(&name, u.gid).ok()
            })
            .map(|groups| groups.into_iter().map(|g| g.as_raw()).collect())
            .unwrap_or_default(),
    };
    Creds {
        uid,
        gid,
        groups,
        label: None,
    }
}

fn arm(
    shared: &Arc<Shared>,
    request: KeyWatchRequest,
    requester: &Identity,
) -> Result<ArmedWatch, Error> {
    let (mut creds, requester_uid) = match request.uid {
        Some(uid) => (creds_for(uid, None), None),
        None => (
            creds_for(requester.uid, Some(requester)),
            Some(requester.uid),
        ),
    };
    // The kernel's security hook judges the helper by its label: the requester's.
    creds.label = requester.label.clone();
    let requester = requester_uid;
    let mut running_guard = lock(&shared.running);
    let running = running_guard
        .as_mut()
        .ok_or_else(|| Error::Unavailable("the keys source is not running".into()))?;
    // Widen the kernel filter before the watch exists, so nothing wanted is dropped.
    set_filter(&running.pipe, running.union(request.changes))
        .map_err(|e| Error::Unavailable(format!("cannot filter key notifications: {e}")))?;
    let restore = |running: &Running| {
        if let Err(e) = set_filter(&running.pipe, running.union(0)) {
            tracing::warn!(source = NAME, "cannot narrow the kernel filter: {e}");
        }
    };
    let answer = match helper::run(
        &shared.helper,
        "watch",
        &creds,
        &request.target,
        &running.pipe,
    ) {
        Ok(answer) => answer,
        Err(e) => {
            restore(running);
            return Err(e);
        }
    };
    let serial = answer.serial;
    // An owner the kernel did not describe to the subscriber cannot be claimed as its own.
    let owner = answer.info.as_ref().map(|i| i.owner);
    if let Some(requester) = requester {
        if requester != 0 && owner != Some(requester) {
            if answer.outcome == Outcome::Watched {
                unwatch(shared, running, serial, &creds);
            }
            restore(running);
            return Err(Error::AccessDenied(format!(
                "key {serial} belongs to uid {}, not to you (uid {requester}); watching other \
                 users' keys takes their uid and the watch-other-keys authorization",
                owner.map_or_else(|| "?".to_owned(), |o| o.to_string())
            )));
        }
    }
    let instance = shared.next_instance.fetch_add(1, Ordering::Relaxed);
    let kernel = running
        .watched
        .entry(serial)
        .or_insert_with(|| KernelWatch {
            instance,
            holders: 0,
            armed_by: creds.clone(),
            wants: Vec::new(),
        });
    kernel.holders += 1;
    kernel.wants.push(request.changes);
    let instance = kernel.instance;
    lock(&shared.table).info.insert(
        serial,
        Watched {
            owner: owner.unwrap_or(creds.uid),
            info: answer.info,
        },
    );
    tracing::debug!(source = NAME, serial, uid = creds.uid, outcome = ?answer.outcome, "key watch armed");
    Ok(ArmedWatch {
        matcher: Box::new(KeyWatch {
            serial,
            object: serial.to_string(),
            changes: request.changes,
        }),
        hold: Some(Box::new(KeyHold {
            shared: Arc::clone(shared),
            run: running.run,
            serial,
            instance,
            changes: request.changes,
        })),
        installed: None,
    })
}

/// Removes the kernel watch of `serial` (its last holder went), expecting the removal
/// record the kernel writes for it.
fn unwatch(shared: &Shared, running: &Running, serial: i32, creds: &Creds) {
    *lock(&shared.table)
        .expected_removals
        .entry(serial)
        .or_insert(0) += 1;
    let result = helper::run(
        &shared.helper,
        "unwatch",
        creds,
        &Target::Serial(serial),
        &running.pipe,
    );
    if let Err(e) = result {
        // The key may be revoked or gone: its watch then ends with the key, or with
        // the pipe. No removal record is coming for this call.
        tracing::debug!(source = NAME, serial, "releasing the key watch: {e}");
        let mut table = lock(&shared.table);
        if let Some(count) = table.expected_removals.get_mut(&serial) {
            *count = count.saturating_sub(1);
        }
    }
}

/// One subscription's share of a kernel watch.
struct KeyHold {
    shared: Arc<Shared>,
    run: u64,
    serial: i32,
    instance: u64,
    changes: u8,
}

impl Drop for KeyHold {
    fn drop(&mut self) {
        // Dropped under the hub's lock; releasing may run a helper, so do it elsewhere.
        let shared = Arc::clone(&self.shared);
        let (run, serial, instance, changes) = (self.run, self.serial, self.instance, self.changes);
        let spawned = std::thread::Builder::new()
            .name("watchqd-key-release".into())
            .spawn(move || release(&shared, run, serial, instance, changes));
        if let Err(e) = spawned {
            tracing::warn!(source = NAME, serial, "cannot release the key watch: {e}");
        }
    }
}

fn release(shared: &Shared, run: u64, serial: i32, instance: u64, changes: u8) {
    let mut guard = lock(&shared.running);
    let Some(running) = guard.as_mut().filter(|r| r.run == run) else {
        // The pipe is closed: the kernel removed every watch with it.
        return;
    };
    let Some(kernel) = running
        .watched
        .get_mut(&serial)
        .filter(|k| k.instance == instance)
    else {
        return;
    };
    kernel.holders = kernel.holders.saturating_sub(1);
    if let Some(position) = kernel.wants.iter().position(|w| *w == changes) {
        kernel.wants.remove(position);
    }
    if kernel.holders == 0 {
        let creds = kernel.armed_by.clone();
        running.watched.remove(&serial);
        lock(&shared.table).info.remove(&serial);
        unwatch(shared, running, serial, &creds);
    }
    if let Err(e) = set_filter(&running.pipe, running.union(0)) {
        tracing::warn!(source = NAME, "cannot narrow the kernel filter: {e}");
    }
}

/// A key watch: records about one key, of the wanted change kinds.
#[derive(Debug)]
pub struct KeyWatch {
    serial: i32,
    object: String,
    changes: u8,
}

impl WatchMatcher for KeyWatch {
    fn matches(&self, record: &Record) -> bool {
        record.source == NAME
            && record.object_id == self.object
            && record.subtype < 8
            && self.changes & (1 << record.subtype) != 0
    }

    fn watched_object(&self) -> Option<&str> {
        Some(&self.object)
    }
}

impl KeyWatch {
    pub fn serial(&self) -> i32 {
        self.serial
    }
}

#[cfg(test)]
mod tests {
    use super::reader::key_record;
    use super::*;
    use crate::source::spec::spec;

    fn alice() -> Identity {
        Identity::new(":1.5".into(), 1000)
    }

    #[test]
    fn subtypes_are_the_kernels_in_order() {
        for change in KeyChange::ALL {
            assert_eq!(SUBTYPES[usize::from(change.subtype())], change.as_str());
        }
    }

    #[test]
    fn own_keyrings_serials_and_other_users() {
        let user = KeyWatchRequest::parse(&spec(&[]), &alice()).unwrap();
        assert_eq!(user.target, Target::User);
        assert_eq!(user.scope(&alice()), Scope::Own);
        assert_eq!(user.changes, ALL_CHANGES);

        let own_uid = KeyWatchRequest::parse(
            &spec(&[("keyring", "persistent".into()), ("uid", 1000u32.into())]),
            &alice(),
        )
        .unwrap();
        assert_eq!(own_uid.scope(&alice()), Scope::Own);

        let other = KeyWatchRequest::parse(
            &spec(&[("keyring", "user".into()), ("uid", 1001u32.into())]),
            &alice(),
        )
        .unwrap();
        assert_eq!(other.scope(&alice()), Scope::Others);
        assert_eq!(other.uid, Some(1001));

        let serial = KeyWatchRequest::parse(
            &spec(&[
                ("serial", 123_456i32.into()),
                ("changes", vec!["linked", "unlinked"].into()),
            ]),
            &alice(),
        )
        .unwrap();
        assert_eq!(serial.target, Target::Serial(123_456));
        assert_eq!(serial.changes, 0b1100);
    }

    #[test]
    fn bad_specs_name_the_problem() {
        let refused =
            |pairs: &[(&str, zbus::Variant<'_>)], needle: &str| match KeyWatchRequest::parse(
                &spec(pairs),
                &alice(),
            ) {
                Err(Error::InvalidArgument(m)) => assert!(m.contains(needle), "{m}"),
                other => panic!("{pairs:?}: {other:?}"),
            };
        refused(&[("keyring", "session".into())], "session keyring");
        refused(&[("serial", (-3i32).into())], "> 0");
        refused(
            &[("keyring", "user".into()), ("serial", 5i32.into())],
            "exactly one",
        );
        refused(&[("serial", 5i32.into()), ("uid", 0u32.into())], "'uid'");
        refused(&[("serial", "5".into())], "'i'");
        refused(
            &[
                ("keyring", "user".into()),
                ("changes", vec!["moved"].into()),
            ],
            "moved",
        );
        refused(
            &[("keyring", "user".into()), ("kering", 1u32.into())],
            "kering",
        );
    }

    #[test]
    fn matcher_takes_its_key_and_wanted_changes_only() {
        let watch = KeyWatch {
            serial: 42,
            object: "42".into(),
            changes: 1 << KeyChange::Updated.subtype(),
        };
        let watched = Watched {
            owner: 1000,
            info: None,
        };
        assert!(watch.matches(&key_record(KeyChange::Updated, 42, 0, &watched)));
        assert!(!watch.matches(&key_record(KeyChange::Revoked, 42, 0, &watched)));
        assert!(!watch.matches(&key_record(KeyChange::Updated, 43, 0, &watched)));
        assert_eq!(watch.watched_object(), Some("42"));
        let record = key_record(KeyChange::Linked, 42, 7, &watched);
        assert_eq!(record.audience, Audience::Owner(1000));
        assert_eq!(record.attr_u64("aux"), Some(7));
    }
}
