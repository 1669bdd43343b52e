//! Disk quota warnings, from the kernel's `VFS_DQUOT` generic netlink family.
//!
//! Touches: one `NETLINK_GENERIC` socket, which asks the generic netlink controller for
//! the family and its multicast group `events` (their numbers are assigned at boot, so
//! they are resolved each time the source opens) and joins that group; reads
//! `/sys/dev/block/MAJ:MIN` and `/proc/self/mountinfo` to name the device. Needs a kernel
//! with `CONFIG_QUOTA_NETLINK_INTERFACE`, and a socket in the initial network namespace
//! (the family is not network-namespace aware): under systemd, where the daemon runs with
//! `PrivateNetwork=yes`, that is the socket `watchqd.socket` passes
//! ([`crate::activation`]). No capability. Without systemd, the socket exists only while
//! some subscription watches quota.
//!
//! The kernel multicasts every warning to every member of the group, whoever they are:
//! that is why `quota_nld` tells everyone which uid hit its quota. Here each warning
//! becomes a record whose audience is the uid it concerns (the uid over its limit for
//! user quota; for group and project quota, the uid whose operation crossed the limit,
//! since that is the user whose writes fail), so policy delivers it only to that uid's
//! subscriptions and to administrators.
//!
//! Origin is checked at the edge: a message counts as the kernel's only when the sender's
//! netlink port id is 0. Root in the initial network namespace can send forged warnings
//! to the group from userspace; those carry the sender's port id and are counted, logged
//! and dropped. `ENOBUFS` means the kernel dropped warnings for us: the source yields
//! [`SourceMsg::Overflow`] so that every watcher gets `Lost(kernel-overflow)` (warnings
//! are events, not objects: there is no state to rescan).
//!
//! Warnings are passed on as the kernel sends them, once per crossing (the kernel
//! remembers which it sent). One quirk seen in the guest (6.12): a user with no inode
//! limit who frees their last inodes gets `inode-soft-below`, because the kernel compares
//! with a soft limit of 0; telling that apart would need `quotactl(Q_GETQUOTA)` per
//! warning, which is not done.

pub mod signal;
pub mod wire;

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream;
use nix::libc;
use nix::sys::socket::{
    self, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType,
};
use nix::sys::time::TimeVal;

use super::{
    Availability, EventSource, JournalIds, PlannedWatch, SourceStream, SpecReader, WatchMatcher,
    WatchSpec,
};
use crate::activation;
use crate::error::Error;
use crate::event::{Attr, Attrs, Audience, Change, Object, Record, SourceMsg};
use crate::policy::{Identity, Scope};
pub use crate::sys::netlink::Counters;
use crate::sys::netlink::{Datagram, KernelSocket, Labels, Sender};
use wire::{Family, QuotaType, Warning};

pub const NAME: &str = "quota";

/// Subtype numbers are the kernel's `QUOTA_NL_*` warning codes; 0 (`QUOTA_NL_NOWARN`,
/// never sent) stands for codes a newer kernel may add. Never reorder.
pub const SUBTYPES: &[&str] = &[
    "other",
    "inode-hard",
    "inode-soft-long",
    "inode-soft",
    "block-hard",
    "block-soft-long",
    "block-soft",
    "inode-hard-below",
    "inode-soft-below",
    "block-hard-below",
    "block-soft-below",
];

/// How the daemon's journal records (`[journal]`) write this source's events: the
/// `MESSAGE_ID` of each subtype (made once with `systemd-id128 new`; never change one,
/// log shippers match on them) and the syslog priority.
pub const JOURNAL: JournalIds = JournalIds {
    message_ids: &[
        ("other", "4c275df8c80948258e6bf85bcc1d8daa"),
        ("inode-hard", "2301a3b07a2f4bc980ab289d2d444108"),
        ("inode-soft-long", "8465a8ae40514105a73283d0cd28180c"),
        ("inode-soft", "554d24157ba94d6bb82268a73a29937c"),
        ("block-hard", "56169663ed4942188ddd12f9ff7a7eb3"),
        ("block-soft-long", "ddf8732217304d3d9ab78c6d65d6ee00"),
        ("block-soft", "5fb83c18cf1f4077a04177312ac8b803"),
        ("inode-hard-below", "dd73578ae3634438aaf20aea5ca6e22a"),
        ("inode-soft-below", "71f8b901813449f5a60e6f3e7f36489e"),
        ("block-hard-below", "c9b966f70900474ca6ef81aa7d267a32"),
        ("block-soft-below", "8a264accaa5f4d7baf532bf68f6d141e"),
    ],
    // Over a limit: a warning; back below it: a notice.
    priority: |kind| if kind.ends_with("-below") { 5 } else { 4 },
};

/// A warning message is ~100 bytes; room for a burst in one datagram is not needed (the
/// kernel sends one message per datagram), but a larger forged one must not be
/// mistaken for a truncated kernel message.
const RECEIVE_BUFFER: usize = 8192;
/// Socket buffer for bursts while the daemon is busy: ~2,500 warnings.
const SOCKET_BUFFER: usize = 256 * 1024;
/// How long the controller may take to describe the family.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);
const SOL_NETLINK: libc::c_int = 270;
const NETLINK_ADD_MEMBERSHIP: libc::c_int = 1;

#[derive(Default)]
pub struct Quota {
    counters: Arc<Counters>,
}

impl Quota {
    pub fn new() -> Self {
        Quota::default()
    }

    pub fn counters(&self) -> Arc<Counters> {
        Arc::clone(&self.counters)
    }
}

impl EventSource for Quota {
    fn forged_rejected(&self) -> u64 {
        self.counters.rejected_origin.load(Ordering::Relaxed)
    }

    fn name(&self) -> &'static str {
        NAME
    }

    fn system_wide(&self) -> bool {
        true
    }

    fn subtypes(&self) -> &'static [&'static str] {
        SUBTYPES
    }

    fn signal(&self) -> &'static crate::signal::SignalKind {
        &signal::KIND
    }

    fn probe(&self) -> Availability {
        match open_socket().and_then(|fd| resolve(&fd)) {
            Ok(_) => Availability::Available,
            Err(e) => Availability::Unavailable(e.to_string()),
        }
    }

    fn parse_watch(&self, spec: &WatchSpec, requester: &Identity) -> Result<PlannedWatch, Error> {
        let watch = QuotaWatch::parse(spec, requester)?;
        let scope = match watch.uid {
            Some(_) => Scope::Own,
            None => Scope::System,
        };
        Ok(PlannedWatch::ready(scope, Box::new(watch)))
    }

    /// Warnings are events, not objects: there is nothing to list.
    fn scan(&self) -> io::Result<Vec<Object>> {
        Ok(Vec::new())
    }

    fn open(&self) -> io::Result<SourceStream> {
        let fd = open_socket()?;
        let family = resolve(&fd)?;
        let group = family.group(wire::QUOTA_GROUP).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "generic netlink family {} has no multicast group '{}'",
                    wire::QUOTA_FAMILY,
                    wire::QUOTA_GROUP
                ),
            )
        })?;
        join_group(&fd, group)?;
        // A larger buffer only where allowed; the default one still works.
        if let Err(e) = activation::raise_receive_buffer(&fd, SOCKET_BUFFER) {
            tracing::debug!(source = NAME, "cannot size the socket buffer: {e}");
        }
        set_nonblocking(&fd)?;
        tracing::debug!(
            source = NAME,
            family = family.id,
            group,
            "joined the VFS_DQUOT events group"
        );
        let reader = Reader {
            socket: KernelSocket::new(fd, RECEIVE_BUFFER, Arc::clone(&self.counters), LABELS)?,
            family: family.id,
            counters: Arc::clone(&self.counters),
        };
        Ok(Box::pin(stream::unfold(reader, |mut reader| async move {
            let msg = reader.next().await?;
            Some((msg, reader))
        })))
    }
}

/// The socket systemd passed (`ListenNetlink=generic`, in the host's network namespace
/// where the family lives), or one of our own.
fn open_socket() -> io::Result<OwnedFd> {
    if let Some(fd) = activation::passed_socket(activation::NETLINK_GENERIC, 0)? {
        // systemd passes it non-blocking; resolve() waits for the controller's answer.
        set_blocking(&fd)?;
        return Ok(fd);
    }
    let fd = socket::socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkGeneric,
    )
    .map_err(|e| os_error(e, "socket(NETLINK_GENERIC)"))?;
    socket::bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))
        .map_err(|e| os_error(e, "binding the generic netlink socket"))?;
    Ok(fd)
}

fn os_error(errno: nix::errno::Errno, what: &str) -> io::Error {
    io::Error::new(io::Error::from(errno).kind(), format!("{what}: {errno}"))
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    set_flag_nonblock(fd, true)
}

fn set_blocking(fd: &OwnedFd) -> io::Result<()> {
    set_flag_nonblock(fd, false)
}

fn set_flag_nonblock(fd: &OwnedFd, on: bool) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let mut flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    flags.set(OFlag::O_NONBLOCK, on);
    fcntl(fd, FcntlArg::F_SETFL(flags))?;
    Ok(())
}

fn join_group(fd: &OwnedFd, group: u32) -> io::Result<()> {
    let len = libc::socklen_t::try_from(std::mem::size_of::<u32>()).unwrap_or(4);
    // SAFETY: the option value points to a live u32 of the size given.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            SOL_NETLINK,
            NETLINK_ADD_MEMBERSHIP,
            (&raw const group).cast(),
            len,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        let e = io::Error::last_os_error();
        Err(io::Error::new(
            e.kind(),
            format!("joining generic netlink multicast group {group} (VFS_DQUOT events): {e}"),
        ))
    }
}

/// Asks the controller (on the blocking socket `fd`) for the `VFS_DQUOT` family.
fn resolve(fd: &OwnedFd) -> io::Result<Family> {
    socket::setsockopt(
        fd,
        sockopt::ReceiveTimeout,
        &TimeVal::new(i64::try_from(RESOLVE_TIMEOUT.as_secs()).unwrap_or(2), 0),
    )?;
    let seq = 1;
    let request = wire::get_family_request(wire::QUOTA_FAMILY, seq);
    socket::sendto(
        fd.as_raw_fd(),
        &request,
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )
    .map_err(|e| os_error(e, "asking the generic netlink controller for VFS_DQUOT"))?;
    let mut buf = vec![0u8; RECEIVE_BUFFER];
    loop {
        let (len, from) = socket::recvfrom::<NetlinkAddr>(fd.as_raw_fd(), &mut buf)
            .map_err(|e| os_error(e, "waiting for the generic netlink controller's answer"))?;
        if from.map(|a| a.pid()) != Some(0) {
            continue;
        }
        for message in wire::messages(&buf[..len]) {
            let message = message.map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("malformed answer from the generic netlink controller: {e}"),
                )
            })?;
            if message.seq != seq {
                continue;
            }
            return wire::parse_family_reply(&message).map_err(|e| match e {
                wire::WireError::Kernel(errno) if errno == -libc::ENOENT => io::Error::new(
                    io::ErrorKind::NotFound,
                    "the generic netlink family VFS_DQUOT does not exist: the kernel was \
                     built without CONFIG_QUOTA_NETLINK_INTERFACE, or this network \
                     namespace is not the initial one",
                ),
                other => io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("resolving the generic netlink family VFS_DQUOT: {other}"),
                ),
            });
        }
    }
}

/// How the quota socket is read ([`crate::sys::netlink`]): the generic netlink socket
/// passes no credentials; the port id alone tells the kernel.
const LABELS: Labels = Labels {
    source: NAME,
    socket: "quota netlink socket",
    message: "quota message",
    datagram: Some("quota netlink datagram"),
    warn_truncated: true,
    check_credentials: false,
    sender: Sender::Kernel,
};

struct Reader {
    socket: KernelSocket,
    family: u16,
    counters: Arc<Counters>,
}

impl Reader {
    /// The next record, or `None` when the socket failed for good.
    async fn next(&mut self) -> Option<SourceMsg> {
        loop {
            match self.socket.next().await? {
                Datagram::Message(len) => {
                    if let Some(record) = self.decode(len) {
                        return Some(SourceMsg::Record(record));
                    }
                }
                Datagram::Rejected => return Some(SourceMsg::Counted),
                Datagram::Overflow { total } => {
                    tracing::warn!(
                        source = NAME,
                        overflows = total,
                        "kernel dropped quota warnings (ENOBUFS)"
                    );
                    return Some(SourceMsg::Overflow {
                        objects: Vec::new(),
                    });
                }
            }
        }
    }

    /// The record of the first quota warning in a kernel datagram.
    fn decode(&self, len: usize) -> Option<Record> {
        let buf = self.socket.bytes(len);
        for message in wire::messages(buf) {
            let parsed = message.and_then(|m| {
                if m.kind == self.family {
                    wire::parse_warning(m.payload).map(Some)
                } else {
                    // NLMSG_NOOP and friends; nothing else is multicast to this group.
                    Ok(None)
                }
            });
            match parsed {
                Ok(Some(warning)) => {
                    self.counters.received.fetch_add(1, Ordering::Relaxed);
                    return Some(record(&warning));
                }
                Ok(None) => {}
                Err(e) => {
                    self.counters.malformed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(source = NAME, raw = ?buf, "dropped a malformed quota message: {e}");
                    return None;
                }
            }
        }
        None
    }
}

/// Who a warning concerns, as an audience: see the module documentation.
pub fn audience_of(warning: &Warning) -> Audience {
    let subject = match warning.quota_type {
        QuotaType::User => warning.excess_id,
        QuotaType::Group | QuotaType::Project => warning.caused_id,
        QuotaType::Other(_) => return Audience::Administrators,
    };
    // An id beyond 32 bits is not a uid: nobody but administrators.
    u32::try_from(subject).map_or(Audience::Administrators, Audience::Owner)
}

fn record(warning: &Warning) -> Record {
    let subtype = u8::try_from(warning.code)
        .ok()
        .filter(|&c| usize::from(c) < SUBTYPES.len())
        .unwrap_or(0);
    let (resource, kind) = wire::warning_code(warning.code)
        .map_or(("unknown", "unknown"), |(r, k)| (r.as_str(), k.as_str()));
    let (major, minor) = (warning.major, warning.minor);
    let device = crate::sys::blockdev::device_name_or_number(major, minor);
    let mut attributes = Attrs::new();
    attributes.insert("warning".into(), SUBTYPES[usize::from(subtype)].into());
    attributes.insert("kind".into(), kind.into());
    attributes.insert("resource".into(), resource.into());
    attributes.insert("code".into(), Attr::U32(warning.code));
    attributes.insert("quota-type".into(), warning.quota_type.as_str().into());
    if let QuotaType::Other(n) = warning.quota_type {
        attributes.insert("quota-type-number".into(), Attr::U32(n));
    }
    attributes.insert("excess-id".into(), warning.excess_id.into());
    attributes.insert("caused-id".into(), warning.caused_id.into());
    attributes.insert("device".into(), device.into());
    attributes.insert("major".into(), major.into());
    attributes.insert("minor".into(), minor.into());
    if let Some((mount_point, fs_type)) = fs::read_to_string("/proc/self/mountinfo")
        .ok()
        .and_then(|text| wire::mount_of(&text, major, minor))
    {
        attributes.insert("mount-point".into(), mount_point.into());
        attributes.insert("fs-type".into(), fs_type.into());
    }
    Record {
        source: NAME,
        subtype,
        object_id: format!(
            "{major}:{minor}/{}/{}",
            warning.quota_type.as_str(),
            warning.excess_id
        ),
        change: Change::None,
        attributes,
        properties: Default::default(),
        audience: audience_of(warning),
    }
}

/// Which filesystem a device is, as a watch names it: "MAJ:MIN" or the kernel name.
#[derive(Clone, Debug, PartialEq, Eq)]
enum DeviceMatch {
    Number(u32, u32),
    Name(String),
}

/// A quota watch.
///
/// Keys: `scope` (s: `own`, the default: warnings about the caller's own uid; `system`:
/// every uid's, for administrators), `type` (s: `user`, `group` or `project`), `device`
/// (s: `MAJ:MIN` or the kernel name, like `loop0`).
#[derive(Debug, PartialEq, Eq)]
pub struct QuotaWatch {
    /// `Some(uid)` for a watch of one's own quota.
    uid: Option<u32>,
    quota_type: Option<QuotaType>,
    device: Option<DeviceMatch>,
}

impl QuotaWatch {
    const KEYS: &'static [&'static str] = &["scope", "type", "device"];

    pub fn parse(spec: &WatchSpec, requester: &Identity) -> Result<Self, Error> {
        let spec = SpecReader::new(spec, NAME, Self::KEYS)?;
        let uid = match spec.str("scope")?.as_deref() {
            None | Some("own") => Some(requester.uid),
            Some("system") => None,
            Some(other) => {
                return Err(Error::InvalidArgument(format!(
                    "quota watch option 'scope' is 'own' (the caller's uid) or 'system' \
                     (every uid, administrators only), not '{other}'"
                )))
            }
        };
        let quota_type = match spec.str("type")?.as_deref() {
            None => None,
            Some("user") => Some(QuotaType::User),
            Some("group") => Some(QuotaType::Group),
            Some("project") => Some(QuotaType::Project),
            Some(other) => {
                return Err(Error::InvalidArgument(format!(
                    "quota watch option 'type' is 'user', 'group' or 'project', not '{other}'"
                )))
            }
        };
        let device = spec
            .str("device")?
            .map(|device| parse_device(&device))
            .transpose()?;
        Ok(QuotaWatch {
            uid,
            quota_type,
            device,
        })
    }
}

fn parse_device(text: &str) -> Result<DeviceMatch, Error> {
    if let Some((major, minor)) = text.split_once(':') {
        return match (major.parse(), minor.parse()) {
            (Ok(major), Ok(minor)) => Ok(DeviceMatch::Number(major, minor)),
            _ => Err(Error::InvalidArgument(format!(
                "quota watch option 'device' '{text}' is neither MAJ:MIN nor a kernel device name"
            ))),
        };
    }
    if text.is_empty() || text.contains('/') || text.len() > 255 {
        return Err(Error::InvalidArgument(format!(
            "quota watch option 'device' takes MAJ:MIN or a kernel device name like loop0, not '{text}'"
        )));
    }
    Ok(DeviceMatch::Name(text.to_owned()))
}

impl WatchMatcher for QuotaWatch {
    fn matches(&self, record: &Record) -> bool {
        if record.source != NAME {
            return false;
        }
        let own = self
            .uid
            .is_none_or(|uid| record.audience == Audience::Owner(uid));
        let typed = self
            .quota_type
            .is_none_or(|t| record.attr_str("quota-type") == Some(t.as_str()));
        let on_device = match &self.device {
            None => true,
            Some(DeviceMatch::Name(name)) => record.attr_str("device") == Some(name.as_str()),
            Some(DeviceMatch::Number(major, minor)) => {
                record.attr_u64("major") == Some(u64::from(*major))
                    && record.attr_u64("minor") == Some(u64::from(*minor))
            }
        };
        own && typed && on_device
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zbus::OwnedVariant;

    fn spec(pairs: &[(&str, &str)]) -> WatchSpec {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    (*k).to_owned(),
                    OwnedVariant::try_from(zbus::Variant::from(*v)).unwrap(),
                )
            })
            .collect()
    }

    fn warning(quota_type: QuotaType, excess_id: u64, caused_id: u64) -> Warning {
        Warning {
            quota_type,
            excess_id,
            code: 4,
            major: 7,
            minor: 2,
            caused_id,
        }
    }

    #[test]
    fn the_audience_is_the_uid_the_warning_concerns() {
        // A file chowned by root to alice: alice is over her quota, root caused it.
        assert_eq!(
            audience_of(&warning(QuotaType::User, 1000, 0)),
            Audience::Owner(1000)
        );
        // A group quota: the gid is no uid; the writer is who hits it.
        assert_eq!(
            audience_of(&warning(QuotaType::Group, 50, 1001)),
            Audience::Owner(1001)
        );
        assert_eq!(
            audience_of(&warning(QuotaType::User, 1 << 40, 0)),
            Audience::Administrators
        );
        assert_eq!(
            audience_of(&warning(QuotaType::Other(9), 1, 1)),
            Audience::Administrators
        );
    }

    #[test]
    fn own_watches_match_their_uid_and_system_watches_everyone() {
        let alice = Identity::new(":1.1".into(), 1000);
        let own = QuotaWatch::parse(&spec(&[]), &alice).unwrap();
        let system = QuotaWatch::parse(&spec(&[("scope", "system")]), &alice).unwrap();
        let on_loop =
            QuotaWatch::parse(&spec(&[("device", "7:2"), ("type", "user")]), &alice).unwrap();
        let alices = record(&warning(QuotaType::User, 1000, 1000));
        let bobs = record(&warning(QuotaType::User, 1001, 1001));
        assert!(own.matches(&alices) && !own.matches(&bobs));
        assert!(system.matches(&alices) && system.matches(&bobs));
        assert!(on_loop.matches(&alices));
        let elsewhere = record(&Warning {
            minor: 3,
            ..warning(QuotaType::User, 1000, 1000)
        });
        assert!(!on_loop.matches(&elsewhere));
        assert_eq!(SUBTYPES[usize::from(alices.subtype)], "block-hard");
        assert_eq!(alices.attr_str("kind"), Some("hard"));
        assert_eq!(alices.attr_str("resource"), Some("blocks"));
    }

    #[test]
    fn watch_options_are_checked() {
        let alice = Identity::new(":1.1".into(), 1000);
        for bad in [
            spec(&[("scope", "others")]),
            spec(&[("type", "users")]),
            spec(&[("device", "7:x")]),
            spec(&[("device", "../sda")]),
            spec(&[("uid", "0")]),
        ] {
            assert!(
                matches!(
                    QuotaWatch::parse(&bad, &alice),
                    Err(Error::InvalidArgument(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn subtype_numbers_are_the_kernel_codes() {
        for code in 1..=10u32 {
            let (resource, kind) = wire::warning_code(code).unwrap();
            let name = SUBTYPES[usize::try_from(code).unwrap()];
            let resource = match resource {
                wire::Resource::Blocks => "block",
                wire::Resource::Inodes => "inode",
            };
            assert_eq!(name, format!("{resource}-{}", kind.as_str()));
        }
    }
}
