//! Generic netlink as far as quota warnings need it: splitting a datagram into netlink
//! messages, walking attributes, the controller's `CTRL_CMD_GETFAMILY` request and reply,
//! and the `VFS_DQUOT` family's `QUOTA_NL_C_WARNING` message. Pure functions over bytes,
//! so that hostile input is only ever a typed error (see `fuzz/fuzz_targets/quota.rs`).
//!
//! Layouts are the kernel's, in host byte order: `struct nlmsghdr` (16 bytes), `struct
//! genlmsghdr` (4 bytes), `struct nlattr` (4 bytes plus payload, each aligned to 4).

use thiserror::Error;

pub const NLMSG_HDRLEN: usize = 16;
pub const GENL_HDRLEN: usize = 4;
const NLA_HDRLEN: usize = 4;
/// Attribute type bits; the top two are `NLA_F_NESTED` and `NLA_F_NET_BYTEORDER`.
const NLA_TYPE_MASK: u16 = 0x3fff;

pub const NLMSG_NOOP: u16 = 1;
pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
pub const NLMSG_OVERRUN: u16 = 4;
const NLM_F_REQUEST: u16 = 1;

pub const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_NEWFAMILY: u8 = 1;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const CTRL_ATTR_MCAST_GROUPS: u16 = 7;
const CTRL_ATTR_MCAST_GRP_NAME: u16 = 1;
const CTRL_ATTR_MCAST_GRP_ID: u16 = 2;

/// `linux/quota.h`.
pub const QUOTA_FAMILY: &str = "VFS_DQUOT";
pub const QUOTA_GROUP: &str = "events";
pub const QUOTA_NL_C_WARNING: u8 = 1;
const QUOTA_NL_A_QTYPE: u16 = 1;
const QUOTA_NL_A_EXCESS_ID: u16 = 2;
const QUOTA_NL_A_WARNING: u16 = 3;
const QUOTA_NL_A_DEV_MAJOR: u16 = 4;
const QUOTA_NL_A_DEV_MINOR: u16 = 5;
const QUOTA_NL_A_CAUSED_ID: u16 = 6;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum WireError {
    #[error("netlink message header truncated: {0} bytes left")]
    ShortHeader(usize),
    #[error("netlink message length {len} invalid with {left} bytes left")]
    BadLength { len: usize, left: usize },
    #[error("attribute length {len} invalid with {left} bytes left")]
    BadAttribute { len: usize, left: usize },
    #[error("generic netlink header truncated")]
    ShortGenlHeader,
    #[error("attribute {0} is missing")]
    Missing(&'static str),
    #[error("attribute {name} has {len} bytes, expected {expected}")]
    AttributeSize {
        name: &'static str,
        len: usize,
        expected: usize,
    },
    #[error("generic netlink command {0} is not what was expected")]
    UnexpectedCommand(u8),
    #[error("the kernel answered with error {0}")]
    Kernel(i32),
    #[error("family name is not NUL-terminated UTF-8")]
    BadName,
}

/// One netlink message of a datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Message<'a> {
    pub kind: u16,
    pub flags: u16,
    pub seq: u32,
    /// The sender's port id inside the message (the kernel sets 0); the socket address
    /// is what proves origin, not this field.
    pub port: u32,
    pub payload: &'a [u8],
}

fn u16_at(buf: &[u8], at: usize) -> Option<u16> {
    buf.get(at..at + 2)
        .map(|b| u16::from_ne_bytes([b[0], b[1]]))
}

fn u32_at(buf: &[u8], at: usize) -> Option<u32> {
    buf.get(at..at + 4)
        .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

const fn align4(len: usize) -> usize {
    (len + 3) & !3
}

/// The netlink messages in one datagram, in order; stops at the first malformed one.
pub fn messages(buf: &[u8]) -> Messages<'_> {
    Messages { rest: buf }
}

pub struct Messages<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Messages<'a> {
    type Item = Result<Message<'a>, WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let buf = self.rest;
        let header = (|| {
            Some((
                u32_at(buf, 0)?,
                u16_at(buf, 4)?,
                u16_at(buf, 6)?,
                u32_at(buf, 8)?,
                u32_at(buf, 12)?,
            ))
        })();
        let Some((len, kind, flags, seq, port)) = header else {
            self.rest = &[];
            return Some(Err(WireError::ShortHeader(buf.len())));
        };
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len < NLMSG_HDRLEN || len > buf.len() {
            self.rest = &[];
            return Some(Err(WireError::BadLength {
                len,
                left: buf.len(),
            }));
        }
        self.rest = buf.get(align4(len)..).unwrap_or_default();
        Some(Ok(Message {
            kind,
            flags,
            seq,
            port,
            payload: &buf[NLMSG_HDRLEN..len],
        }))
    }
}

/// The attributes in `buf` as (type without flag bits, payload); stops at the first
/// malformed one.
pub fn attributes(buf: &[u8]) -> Attributes<'_> {
    Attributes { rest: buf }
}

pub struct Attributes<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Attributes<'a> {
    type Item = Result<(u16, &'a [u8]), WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        // Fewer than a header's bytes is padding.
        if self.rest.len() < NLA_HDRLEN {
            return None;
        }
        let buf = self.rest;
        let len = usize::from(u16_at(buf, 0).unwrap_or_default());
        let kind = u16_at(buf, 2).unwrap_or_default() & NLA_TYPE_MASK;
        if len < NLA_HDRLEN || len > buf.len() {
            self.rest = &[];
            return Some(Err(WireError::BadAttribute {
                len,
                left: buf.len(),
            }));
        }
        self.rest = buf.get(align4(len)..).unwrap_or_default();
        Some(Ok((kind, &buf[NLA_HDRLEN..len])))
    }
}

/// Splits a generic netlink payload into its command and its attributes.
fn genl(payload: &[u8]) -> Result<(u8, &[u8]), WireError> {
    let command = *payload.first().ok_or(WireError::ShortGenlHeader)?;
    let attributes = payload
        .get(GENL_HDRLEN..)
        .ok_or(WireError::ShortGenlHeader)?;
    Ok((command, attributes))
}

fn fixed<const N: usize>(name: &'static str, value: &[u8]) -> Result<[u8; N], WireError> {
    value.try_into().map_err(|_| WireError::AttributeSize {
        name,
        len: value.len(),
        expected: N,
    })
}

fn attr_u32(name: &'static str, value: &[u8]) -> Result<u32, WireError> {
    fixed::<4>(name, value).map(u32::from_ne_bytes)
}

fn attr_u64(name: &'static str, value: &[u8]) -> Result<u64, WireError> {
    fixed::<8>(name, value).map(u64::from_ne_bytes)
}

/// A `CTRL_CMD_GETFAMILY` request for `name`, to send to port 0.
pub fn get_family_request(name: &str, seq: u32) -> Vec<u8> {
    let attr_len = NLA_HDRLEN + name.len() + 1;
    let total = NLMSG_HDRLEN + GENL_HDRLEN + align4(attr_len);
    let mut msg = Vec::with_capacity(total);
    msg.extend_from_slice(&u32::try_from(total).unwrap_or(u32::MAX).to_ne_bytes());
    msg.extend_from_slice(&GENL_ID_CTRL.to_ne_bytes());
    msg.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&[CTRL_CMD_GETFAMILY, 1, 0, 0]);
    msg.extend_from_slice(&u16::try_from(attr_len).unwrap_or(u16::MAX).to_ne_bytes());
    msg.extend_from_slice(&CTRL_ATTR_FAMILY_NAME.to_ne_bytes());
    msg.extend_from_slice(name.as_bytes());
    msg.push(0);
    msg.resize(total, 0);
    msg
}

/// A generic netlink family as the controller describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Family {
    pub name: String,
    pub id: u16,
    /// Multicast groups: (name, group id).
    pub groups: Vec<(String, u32)>,
}

impl Family {
    pub fn group(&self, name: &str) -> Option<u32> {
        self.groups
            .iter()
            .find(|(n, _)| n == name)
            .map(|&(_, id)| id)
    }
}

fn nul_terminated(value: &[u8]) -> Result<String, WireError> {
    let text = value.split(|&b| b == 0).next().unwrap_or_default();
    std::str::from_utf8(text)
        .map(str::to_owned)
        .map_err(|_| WireError::BadName)
}

/// The controller's answer to [`get_family_request`]: one `NLMSG_ERROR` (the family does
/// not exist: `-ENOENT`) or a `CTRL_CMD_NEWFAMILY` message.
pub fn parse_family_reply(message: &Message<'_>) -> Result<Family, WireError> {
    if message.kind == NLMSG_ERROR {
        let errno = u32_at(message.payload, 0).ok_or(WireError::ShortGenlHeader)?;
        #[allow(clippy::cast_possible_wrap)] // the kernel writes an int
        return Err(WireError::Kernel(errno as i32));
    }
    let (command, attrs) = genl(message.payload)?;
    if command != CTRL_CMD_NEWFAMILY {
        return Err(WireError::UnexpectedCommand(command));
    }
    let (mut name, mut id, mut groups) = (None, None, Vec::new());
    for attr in attributes(attrs) {
        let (kind, value) = attr?;
        match kind {
            CTRL_ATTR_FAMILY_NAME => name = Some(nul_terminated(value)?),
            CTRL_ATTR_FAMILY_ID => {
                id = Some(fixed::<2>("CTRL_ATTR_FAMILY_ID", value).map(u16::from_ne_bytes)?);
            }
            CTRL_ATTR_MCAST_GROUPS => {
                for group in attributes(value) {
                    let (_, group) = group?;
                    let (mut group_name, mut group_id) = (None, None);
                    for field in attributes(group) {
                        match field? {
                            (CTRL_ATTR_MCAST_GRP_NAME, v) => group_name = Some(nul_terminated(v)?),
                            (CTRL_ATTR_MCAST_GRP_ID, v) => {
                                group_id = Some(attr_u32("CTRL_ATTR_MCAST_GRP_ID", v)?);
                            }
                            _ => {}
                        }
                    }
                    groups.push((
                        group_name.ok_or(WireError::Missing("CTRL_ATTR_MCAST_GRP_NAME"))?,
                        group_id.ok_or(WireError::Missing("CTRL_ATTR_MCAST_GRP_ID"))?,
                    ));
                }
            }
            _ => {}
        }
    }
    Ok(Family {
        name: name.ok_or(WireError::Missing("CTRL_ATTR_FAMILY_NAME"))?,
        id: id.ok_or(WireError::Missing("CTRL_ATTR_FAMILY_ID"))?,
        groups,
    })
}

/// Which quota a warning is about (`USRQUOTA`, `GRPQUOTA`, `PRJQUOTA`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuotaType {
    User,
    Group,
    Project,
    /// A type this daemon does not know yet.
    Other(u32),
}

impl QuotaType {
    pub fn from_kernel(value: u32) -> Self {
        match value {
            0 => QuotaType::User,
            1 => QuotaType::Group,
            2 => QuotaType::Project,
            other => QuotaType::Other(other),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            QuotaType::User => "user",
            QuotaType::Group => "group",
            QuotaType::Project => "project",
            QuotaType::Other(_) => "other",
        }
    }
}

/// What the limit counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resource {
    Blocks,
    Inodes,
}

impl Resource {
    pub fn as_str(self) -> &'static str {
        match self {
            Resource::Blocks => "blocks",
            Resource::Inodes => "inodes",
        }
    }
}

/// What happened to the limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The hard limit was reached: the write failed with `EDQUOT`.
    Hard,
    /// Over the soft limit for longer than the grace time: now enforced like a hard one.
    SoftLong,
    /// The soft limit was exceeded; the grace time starts.
    Soft,
    /// Usage went back below the hard limit.
    HardBelow,
    /// Usage went back below the soft limit.
    SoftBelow,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Hard => "hard",
            Kind::SoftLong => "soft-long",
            Kind::Soft => "soft",
            Kind::HardBelow => "hard-below",
            Kind::SoftBelow => "soft-below",
        }
    }
}

/// A `QUOTA_NL_*` warning code (1–10) as (resource, kind); `None` for codes this daemon
/// does not know.
pub fn warning_code(code: u32) -> Option<(Resource, Kind)> {
    Some(match code {
        1 => (Resource::Inodes, Kind::Hard),
        2 => (Resource::Inodes, Kind::SoftLong),
        3 => (Resource::Inodes, Kind::Soft),
        4 => (Resource::Blocks, Kind::Hard),
        5 => (Resource::Blocks, Kind::SoftLong),
        6 => (Resource::Blocks, Kind::Soft),
        7 => (Resource::Inodes, Kind::HardBelow),
        8 => (Resource::Inodes, Kind::SoftBelow),
        9 => (Resource::Blocks, Kind::HardBelow),
        10 => (Resource::Blocks, Kind::SoftBelow),
        _ => return None,
    })
}

/// One `QUOTA_NL_C_WARNING`, as `quota_send_warning()` builds it. Ids are in the initial
/// user namespace (the kernel munges unmappable ones to the overflow id).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Warning {
    pub quota_type: QuotaType,
    /// The uid, gid or project id whose limit this is.
    pub excess_id: u64,
    /// The `QUOTA_NL_*` code; see [`warning_code`].
    pub code: u32,
    pub major: u32,
    pub minor: u32,
    /// The uid of the process whose operation caused the warning.
    pub caused_id: u64,
}

/// Parses the generic netlink payload (after the netlink header) of a `VFS_DQUOT`
/// message. Every attribute the kernel has always sent is required.
pub fn parse_warning(payload: &[u8]) -> Result<Warning, WireError> {
    let (command, attrs) = genl(payload)?;
    if command != QUOTA_NL_C_WARNING {
        return Err(WireError::UnexpectedCommand(command));
    }
    let (mut qtype, mut excess, mut code, mut major, mut minor, mut caused) =
        (None, None, None, None, None, None);
    for attr in attributes(attrs) {
        let (kind, value) = attr?;
        match kind {
            QUOTA_NL_A_QTYPE => qtype = Some(attr_u32("QUOTA_NL_A_QTYPE", value)?),
            QUOTA_NL_A_EXCESS_ID => excess = Some(attr_u64("QUOTA_NL_A_EXCESS_ID", value)?),
            QUOTA_NL_A_WARNING => code = Some(attr_u32("QUOTA_NL_A_WARNING", value)?),
            QUOTA_NL_A_DEV_MAJOR => major = Some(attr_u32("QUOTA_NL_A_DEV_MAJOR", value)?),
            QUOTA_NL_A_DEV_MINOR => minor = Some(attr_u32("QUOTA_NL_A_DEV_MINOR", value)?),
            QUOTA_NL_A_CAUSED_ID => caused = Some(attr_u64("QUOTA_NL_A_CAUSED_ID", value)?),
            // QUOTA_NL_A_PAD aligns the 64-bit values; newer attributes are ignored.
            _ => {}
        }
    }
    Ok(Warning {
        quota_type: QuotaType::from_kernel(qtype.ok_or(WireError::Missing("QUOTA_NL_A_QTYPE"))?),
        excess_id: excess.ok_or(WireError::Missing("QUOTA_NL_A_EXCESS_ID"))?,
        code: code.ok_or(WireError::Missing("QUOTA_NL_A_WARNING"))?,
        major: major.ok_or(WireError::Missing("QUOTA_NL_A_DEV_MAJOR"))?,
        minor: minor.ok_or(WireError::Missing("QUOTA_NL_A_DEV_MINOR"))?,
        caused_id: caused.ok_or(WireError::Missing("QUOTA_NL_A_CAUSED_ID"))?,
    })
}

/// Builds a whole `VFS_DQUOT` warning message as the kernel lays it out (64-bit values
/// preceded by a pad attribute when needed). The daemon never sends one; tests and the
/// fuzz seeds do, as the forger a real attacker would be.
pub fn encode_warning(family: u16, seq: u32, warning: &Warning) -> Vec<u8> {
    let mut attrs = Vec::new();
    let push = |attrs: &mut Vec<u8>, kind: u16, value: &[u8]| {
        let len = NLA_HDRLEN + value.len();
        attrs.extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_ne_bytes());
        attrs.extend_from_slice(&kind.to_ne_bytes());
        attrs.extend_from_slice(value);
        attrs.resize(align4(attrs.len()), 0);
    };
    let qtype = match warning.quota_type {
        QuotaType::User => 0,
        QuotaType::Group => 1,
        QuotaType::Project => 2,
        QuotaType::Other(n) => n,
    };
    push(&mut attrs, QUOTA_NL_A_QTYPE, &qtype.to_ne_bytes());
    push(&mut attrs, 7, &[]);
    push(
        &mut attrs,
        QUOTA_NL_A_EXCESS_ID,
        &warning.excess_id.to_ne_bytes(),
    );
    push(&mut attrs, QUOTA_NL_A_WARNING, &warning.code.to_ne_bytes());
    push(
        &mut attrs,
        QUOTA_NL_A_DEV_MAJOR,
        &warning.major.to_ne_bytes(),
    );
    push(
        &mut attrs,
        QUOTA_NL_A_DEV_MINOR,
        &warning.minor.to_ne_bytes(),
    );
    push(&mut attrs, 7, &[]);
    push(
        &mut attrs,
        QUOTA_NL_A_CAUSED_ID,
        &warning.caused_id.to_ne_bytes(),
    );
    let total = NLMSG_HDRLEN + GENL_HDRLEN + attrs.len();
    let mut msg = Vec::with_capacity(total);
    msg.extend_from_slice(&u32::try_from(total).unwrap_or(u32::MAX).to_ne_bytes());
    msg.extend_from_slice(&family.to_ne_bytes());
    msg.extend_from_slice(&0u16.to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&[QUOTA_NL_C_WARNING, 1, 0, 0]);
    msg.extend_from_slice(&attrs);
    msg
}

/// Where the filesystem on device `major:minor` is mounted and its type, from
/// `/proc/PID/mountinfo` text: the first mount of the filesystem's root, else the first
/// mount of any of its directories.
pub fn mount_of(mountinfo: &str, major: u32, minor: u32) -> Option<(String, String)> {
    let mounts = crate::sys::mountinfo::parse_lenient(mountinfo);
    crate::sys::mountinfo::mount_of_device(&mounts, major, minor)
        .map(|m| (m.mount_point.clone(), m.fs_type.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALICE_SOFT: Warning = Warning {
        quota_type: QuotaType::User,
        excess_id: 1000,
        code: 6,
        major: 7,
        minor: 3,
        caused_id: 1000,
    };

    #[test]
    fn a_kernel_warning_round_trips() {
        let bytes = encode_warning(0x11, 5, &ALICE_SOFT);
        let all: Vec<_> = messages(&bytes).collect::<Result<_, _>>().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!((all[0].kind, all[0].seq), (0x11, 5));
        assert_eq!(parse_warning(all[0].payload), Ok(ALICE_SOFT));
        assert_eq!(warning_code(6), Some((Resource::Blocks, Kind::Soft)));
        assert_eq!(warning_code(0), None);
        assert_eq!(warning_code(11), None);
    }

    #[test]
    fn truncations_and_missing_attributes_are_errors() {
        let bytes = encode_warning(0x11, 5, &ALICE_SOFT);
        for cut in 0..bytes.len() {
            let parsed: Vec<_> = messages(&bytes[..cut]).collect();
            assert!(
                parsed.iter().all(|m| m
                    .as_ref()
                    .map_or(true, |m| parse_warning(m.payload).is_err())),
                "cut at {cut} parsed"
            );
        }
        // A wrong command.
        let mut other = bytes.clone();
        other[NLMSG_HDRLEN] = 2;
        let message = messages(&other).next().unwrap().unwrap();
        assert_eq!(
            parse_warning(message.payload),
            Err(WireError::UnexpectedCommand(2))
        );
        // A 64-bit id sent as 32 bits.
        let mut short = bytes[NLMSG_HDRLEN..].to_vec();
        let at = short
            .windows(4)
            .position(|w| w == [12, 0, 2, 0])
            .expect("excess id attribute");
        short[at] = 8;
        assert!(matches!(
            parse_warning(&short),
            Err(WireError::AttributeSize { .. } | WireError::BadAttribute { .. })
        ));
    }

    #[test]
    fn the_family_reply_of_this_kind_of_host_parses() {
        // CTRL_CMD_NEWFAMILY for VFS_DQUOT as the host kernel answered it (x86-64).
        let reply: &[u8] = &[
            0x60, 0, 0, 0, 0x10, 0, 0, 0, 1, 0, 0, 0, 0xdf, 0x3d, 0, 0, 1, 2, 0, 0, 14, 0, 2, 0,
            b'V', b'F', b'S', b'_', b'D', b'Q', b'U', b'O', b'T', 0, 0, 0, 6, 0, 1, 0, 0x11, 0, 0,
            0, 8, 0, 3, 0, 1, 0, 0, 0, 8, 0, 4, 0, 0, 0, 0, 0, 8, 0, 5, 0, 7, 0, 0, 0, 28, 0, 7,
            0x80, 24, 0, 1, 0x80, 8, 0, 2, 0, 0x11, 0, 0, 0, 11, 0, 1, 0, b'e', b'v', b'e', b'n',
            b't', b's', 0, 0,
        ];
        let message = messages(reply).next().unwrap().unwrap();
        let family = parse_family_reply(&message).unwrap();
        assert_eq!(family.name, QUOTA_FAMILY);
        assert_eq!(family.id, 0x11);
        assert_eq!(family.group(QUOTA_GROUP), Some(0x11));
        let mut error = reply[..36].to_vec();
        error[0] = 36;
        error[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        error[16..20].copy_from_slice(&(-2i32).to_ne_bytes());
        let message = messages(&error).next().unwrap().unwrap();
        assert_eq!(parse_family_reply(&message), Err(WireError::Kernel(-2)));
    }

    #[test]
    fn the_mount_of_a_device_is_found_in_mountinfo() {
        let text = "22 1 0:21 / /proc rw - proc proc rw\n\
                    40 30 7:2 /sub /srv/bind rw - ext4 /dev/loop2 rw\n\
                    41 30 7:2 / /mnt/my\\040disk rw,relatime shared:5 - ext4 /dev/loop2 rw,usrquota\n";
        assert_eq!(
            mount_of(text, 7, 2),
            Some(("/mnt/my disk".into(), "ext4".into()))
        );
        assert_eq!(mount_of(text, 7, 3), None);
        assert_eq!(mount_of("garbage\n7:2\n", 7, 2), None);
    }

    #[test]
    fn the_request_is_what_the_controller_expects() {
        let request = get_family_request(QUOTA_FAMILY, 9);
        let message = messages(&request).next().unwrap().unwrap();
        assert_eq!(
            (message.kind, message.flags, message.seq),
            (GENL_ID_CTRL, 1, 9)
        );
        let (command, attrs) = genl(message.payload).unwrap();
        assert_eq!(command, CTRL_CMD_GETFAMILY);
        let attrs: Vec<_> = attributes(attrs).collect::<Result<_, _>>().unwrap();
        assert_eq!(attrs, [(CTRL_ATTR_FAMILY_NAME, &b"VFS_DQUOT\0"[..])]);
        assert_eq!(request.len() % 4, 0);
    }
}
