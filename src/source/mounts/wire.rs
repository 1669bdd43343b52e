//! Pure parsers for what the kernel hands the mount source: fanotify mount records and
//! `struct statmount` buffers (`/proc/PID/mountinfo` text goes through the shared
//! [`crate::sys::mountinfo`]). No I/O here, so each can be fuzzed on its own.
//!
//! The constants are defined here rather than taken from libc because Debian 12's headers
//! (Linux 6.1) predate them: fanotify mount events are 6.15, `statmount()` 6.8, its string
//! fields (`sb_source`, option arrays) 6.11–6.13. Values are those of the kernel's uapi
//! headers `linux/fanotify.h` and `linux/mount.h`.

use thiserror::Error;

/// The mountinfo parser is shared ([`crate::sys::mountinfo`]); the mounts source diffs
/// its lines.
pub use crate::sys::mountinfo::{parse as parse_mountinfo, MountinfoLine};

pub const FAN_MNT_ATTACH: u64 = 0x0100_0000;
pub const FAN_MNT_DETACH: u64 = 0x0200_0000;
pub const FAN_Q_OVERFLOW: u64 = 0x0000_4000;
pub const FANOTIFY_METADATA_VERSION: u8 = 3;
pub const FAN_EVENT_INFO_TYPE_MNT: u8 = 7;
/// `struct fanotify_event_metadata`: event_len u32, vers u8, reserved u8,
/// metadata_len u16, mask u64, fd s32, pid s32.
pub const METADATA_LEN: usize = 24;

pub const STATMOUNT_SB_BASIC: u64 = 0x0001;
pub const STATMOUNT_MNT_BASIC: u64 = 0x0002;
pub const STATMOUNT_MNT_ROOT: u64 = 0x0008;
pub const STATMOUNT_MNT_POINT: u64 = 0x0010;
pub const STATMOUNT_FS_TYPE: u64 = 0x0020;
pub const STATMOUNT_MNT_NS_ID: u64 = 0x0040;
pub const STATMOUNT_MNT_OPTS: u64 = 0x0080;
pub const STATMOUNT_FS_SUBTYPE: u64 = 0x0100;
pub const STATMOUNT_SB_SOURCE: u64 = 0x0200;
/// Everything the source describes a mount with.
pub const STATMOUNT_WANTED: u64 = STATMOUNT_SB_BASIC
    | STATMOUNT_MNT_BASIC
    | STATMOUNT_MNT_ROOT
    | STATMOUNT_MNT_POINT
    | STATMOUNT_FS_TYPE
    | STATMOUNT_MNT_NS_ID
    | STATMOUNT_MNT_OPTS
    | STATMOUNT_FS_SUBTYPE
    | STATMOUNT_SB_SOURCE;
/// Size of the fixed part of `struct statmount`; strings follow it (`str[]`).
pub const STATMOUNT_FIXED: usize = 512;

pub const MOUNT_ATTR_RDONLY: u64 = 0x0000_0001;
pub const MOUNT_ATTR_NOSUID: u64 = 0x0000_0002;
pub const MOUNT_ATTR_NODEV: u64 = 0x0000_0004;
pub const MOUNT_ATTR_NOEXEC: u64 = 0x0000_0008;
pub const MOUNT_ATTR_ATIME_MASK: u64 = 0x0000_0070;
pub const MOUNT_ATTR_NOATIME: u64 = 0x0000_0010;
pub const MOUNT_ATTR_STRICTATIME: u64 = 0x0000_0020;
pub const MOUNT_ATTR_NODIRATIME: u64 = 0x0000_0080;
pub const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
pub const MOUNT_ATTR_NOSYMFOLLOW: u64 = 0x0020_0000;

pub const MS_UNBINDABLE: u64 = 1 << 17;
pub const MS_PRIVATE: u64 = 1 << 18;
pub const MS_SLAVE: u64 = 1 << 19;
pub const MS_SHARED: u64 = 1 << 20;
/// `SB_RDONLY`: the filesystem (not just this mount) is read-only.
pub const SB_RDONLY: u32 = 1;

#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum WireError {
    #[error("record truncated: {needed} bytes needed at offset {offset}, {available} left")]
    Truncated {
        offset: usize,
        needed: usize,
        available: usize,
    },
    #[error("fanotify metadata version {0}, expected {FANOTIFY_METADATA_VERSION}")]
    Version(u8),
    #[error("fanotify event length {event_len} is shorter than its metadata ({metadata_len})")]
    BadLength {
        event_len: usize,
        metadata_len: usize,
    },
    #[error("info record of length {0} (less than its header, or past the event)")]
    BadInfo(usize),
    #[error("statmount size {size} is outside the buffer ({buffer} bytes, fixed part {STATMOUNT_FIXED})")]
    BadSize { size: usize, buffer: usize },
    #[error("statmount string field {field} at offset {offset} is not a NUL-terminated string inside the buffer")]
    BadString { field: &'static str, offset: usize },
}

fn take<const N: usize>(buf: &[u8], offset: usize) -> Result<[u8; N], WireError> {
    buf.get(offset..offset.saturating_add(N))
        .and_then(|s| <[u8; N]>::try_from(s).ok())
        .ok_or(WireError::Truncated {
            offset,
            needed: N,
            available: buf.len().saturating_sub(offset),
        })
}

fn u16_at(buf: &[u8], offset: usize) -> Result<u16, WireError> {
    take::<2>(buf, offset).map(u16::from_ne_bytes)
}
fn u32_at(buf: &[u8], offset: usize) -> Result<u32, WireError> {
    take::<4>(buf, offset).map(u32::from_ne_bytes)
}
fn i32_at(buf: &[u8], offset: usize) -> Result<i32, WireError> {
    take::<4>(buf, offset).map(i32::from_ne_bytes)
}
fn u64_at(buf: &[u8], offset: usize) -> Result<u64, WireError> {
    take::<8>(buf, offset).map(u64::from_ne_bytes)
}

/// What one fanotify event says about mounts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MountNotice {
    Attach(u64),
    Detach(u64),
    /// Both bits in one event: the mount moved (it stays in the namespace).
    Move(u64),
    /// The group's queue overflowed: events were lost.
    Overflow,
    /// An event this source did not ask for, or one without a mount id.
    Ignored {
        mask: u64,
    },
}

/// One fanotify event as read. `fd` is what the kernel put in the metadata: `FAN_NOFD`
/// (-1) for mount events; any other value is an open fd the reader must close.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FanEvent {
    pub notice: MountNotice,
    pub fd: i32,
    pub pid: i32,
}

/// Splits a buffer from `read(2)` on a fanotify group into events. A partial event at the
/// end is an error (the kernel never splits events across reads).
pub fn fanotify_events(buf: &[u8]) -> Result<Vec<FanEvent>, WireError> {
    let mut events = Vec::new();
    let mut offset = 0;
    while offset < buf.len() {
        let event_len = usize::try_from(u32_at(buf, offset)?).unwrap_or(usize::MAX);
        let version = take::<1>(buf, offset + 4)?[0];
        if version != FANOTIFY_METADATA_VERSION {
            return Err(WireError::Version(version));
        }
        let metadata_len = usize::from(u16_at(buf, offset + 6)?);
        if metadata_len < METADATA_LEN || event_len < metadata_len {
            return Err(WireError::BadLength {
                event_len,
                metadata_len,
            });
        }
        let end = offset
            .checked_add(event_len)
            .filter(|end| *end <= buf.len());
        let Some(end) = end else {
            return Err(WireError::Truncated {
                offset,
                needed: event_len,
                available: buf.len() - offset,
            });
        };
        let event = &buf[offset..end];
        let mask = u64_at(event, 8)?;
        let fd = i32_at(event, 16)?;
        let pid = i32_at(event, 20)?;
        let mnt_id = mount_id_info(&event[metadata_len..])?;
        let notice = if mask & FAN_Q_OVERFLOW != 0 {
            MountNotice::Overflow
        } else {
            match (
                mnt_id,
                mask & FAN_MNT_ATTACH != 0,
                mask & FAN_MNT_DETACH != 0,
            ) {
                (Some(id), true, true) => MountNotice::Move(id),
                (Some(id), true, false) => MountNotice::Attach(id),
                (Some(id), false, true) => MountNotice::Detach(id),
                _ => MountNotice::Ignored { mask },
            }
        };
        events.push(FanEvent { notice, fd, pid });
        offset = end;
    }
    Ok(events)
}

/// The mount id from an event's info records (`struct fanotify_event_info_mnt`: a 4-byte
/// header, 4 bytes of padding, the u64 id), if it has one.
fn mount_id_info(mut info: &[u8]) -> Result<Option<u64>, WireError> {
    let mut found = None;
    while !info.is_empty() {
        let kind = take::<1>(info, 0)?[0];
        let len = usize::from(u16_at(info, 2)?);
        if len < 4 || len > info.len() {
            return Err(WireError::BadInfo(len));
        }
        if kind == FAN_EVENT_INFO_TYPE_MNT {
            found = Some(u64_at(&info[..len], 8)?);
        }
        info = &info[len..];
    }
    Ok(found)
}

/// A mount as `statmount()` described it. Fields the kernel did not fill (its mask lacks
/// the bit) are zero or empty.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatMount {
    /// The `mask` the kernel returned: which groups below are valid.
    pub mask: u64,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub sb_magic: u64,
    pub sb_flags: u32,
    pub id: u64,
    pub parent_id: u64,
    /// The ids `/proc/PID/mountinfo` shows (reused after a mount goes).
    pub old_id: u32,
    pub old_parent_id: u32,
    pub attr: u64,
    pub propagation: u64,
    pub peer_group: u64,
    pub master: u64,
    pub namespace: u64,
    pub fs_type: String,
    pub fs_subtype: String,
    pub root: String,
    pub mount_point: String,
    pub source: String,
    /// The filesystem's options (`mountinfo`'s super options without ro/rw).
    pub fs_options: String,
}

impl StatMount {
    /// `mountinfo`-style per-mount options: `ro,nosuid,nodev,noexec,relatime`.
    pub fn mount_options(&self) -> String {
        let mut options = vec![if self.attr & MOUNT_ATTR_RDONLY != 0 {
            "ro"
        } else {
            "rw"
        }];
        for (bit, name) in [
            (MOUNT_ATTR_NOSUID, "nosuid"),
            (MOUNT_ATTR_NODEV, "nodev"),
            (MOUNT_ATTR_NOEXEC, "noexec"),
        ] {
            if self.attr & bit != 0 {
                options.push(name);
            }
        }
        options.push(self.atime());
        if self.attr & MOUNT_ATTR_NODIRATIME != 0 {
            options.push("nodiratime");
        }
        if self.attr & MOUNT_ATTR_NOSYMFOLLOW != 0 {
            options.push("nosymfollow");
        }
        if self.attr & MOUNT_ATTR_IDMAP != 0 {
            options.push("idmapped");
        }
        options.join(",")
    }

    pub fn atime(&self) -> &'static str {
        match self.attr & MOUNT_ATTR_ATIME_MASK {
            MOUNT_ATTR_NOATIME => "noatime",
            MOUNT_ATTR_STRICTATIME => "strictatime",
            _ => "relatime",
        }
    }

    /// `shared`, `slave`, `shared,slave`, `unbindable` or `private`.
    pub fn propagation_name(&self) -> String {
        let mut kinds = Vec::new();
        if self.propagation & MS_SHARED != 0 {
            kinds.push("shared");
        }
        if self.propagation & MS_SLAVE != 0 {
            kinds.push("slave");
        }
        if self.propagation & MS_UNBINDABLE != 0 {
            kinds.push("unbindable");
        }
        if kinds.is_empty() {
            kinds.push("private");
        }
        kinds.join(",")
    }
}

/// Parses a buffer `statmount()` filled. `buf` is the whole buffer passed to the kernel;
/// its `size` field says how much of it is used.
pub fn parse_statmount(buf: &[u8]) -> Result<StatMount, WireError> {
    let size = usize::try_from(u32_at(buf, 0)?).unwrap_or(usize::MAX);
    if size < STATMOUNT_FIXED || size > buf.len() {
        return Err(WireError::BadSize {
            size,
            buffer: buf.len(),
        });
    }
    let buf = &buf[..size];
    let strings = &buf[STATMOUNT_FIXED..];
    let mask = u64_at(buf, 8)?;
    let string = |field: &'static str, at: usize, bit: u64| -> Result<String, WireError> {
        if mask & bit == 0 {
            return Ok(String::new());
        }
        let offset = usize::try_from(u32_at(buf, at)?).unwrap_or(usize::MAX);
        let bad = WireError::BadString { field, offset };
        let tail = strings.get(offset..).ok_or(bad.clone())?;
        let len = tail.iter().position(|b| *b == 0).ok_or(bad)?;
        Ok(String::from_utf8_lossy(&tail[..len]).into_owned())
    };
    let basic = |bit: u64| mask & bit != 0;
    let mut mount = StatMount {
        mask,
        fs_type: string("fs_type", 36, STATMOUNT_FS_TYPE)?,
        root: string("mnt_root", 104, STATMOUNT_MNT_ROOT)?,
        mount_point: string("mnt_point", 108, STATMOUNT_MNT_POINT)?,
        fs_subtype: string("fs_subtype", 120, STATMOUNT_FS_SUBTYPE)?,
        source: string("sb_source", 124, STATMOUNT_SB_SOURCE)?,
        fs_options: string("mnt_opts", 4, STATMOUNT_MNT_OPTS)?,
        ..StatMount::default()
    };
    if basic(STATMOUNT_SB_BASIC) {
        mount.dev_major = u32_at(buf, 16)?;
        mount.dev_minor = u32_at(buf, 20)?;
        mount.sb_magic = u64_at(buf, 24)?;
        mount.sb_flags = u32_at(buf, 32)?;
    }
    if basic(STATMOUNT_MNT_BASIC) {
        mount.id = u64_at(buf, 40)?;
        mount.parent_id = u64_at(buf, 48)?;
        mount.old_id = u32_at(buf, 56)?;
        mount.old_parent_id = u32_at(buf, 60)?;
        mount.attr = u64_at(buf, 64)?;
        mount.propagation = u64_at(buf, 72)?;
        mount.peer_group = u64_at(buf, 80)?;
        mount.master = u64_at(buf, 88)?;
    }
    if basic(STATMOUNT_MNT_NS_ID) {
        mount.namespace = u64_at(buf, 112)?;
    }
    Ok(mount)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(mask: u64, info: &[u8]) -> Vec<u8> {
        let len = u32::try_from(METADATA_LEN + info.len()).unwrap();
        let mut out = Vec::new();
        out.extend_from_slice(&len.to_ne_bytes());
        out.push(FANOTIFY_METADATA_VERSION);
        out.push(0);
        out.extend_from_slice(&24u16.to_ne_bytes());
        out.extend_from_slice(&mask.to_ne_bytes());
        out.extend_from_slice(&(-1i32).to_ne_bytes());
        out.extend_from_slice(&42i32.to_ne_bytes());
        out.extend_from_slice(info);
        out
    }

    fn mnt_info(id: u64) -> Vec<u8> {
        let mut out = vec![FAN_EVENT_INFO_TYPE_MNT, 0];
        out.extend_from_slice(&16u16.to_ne_bytes());
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&id.to_ne_bytes());
        out
    }

    #[test]
    fn fanotify_attach_detach_move_and_overflow() {
        let mut buf = event(FAN_MNT_ATTACH, &mnt_info(0x1_0000_0001));
        buf.extend(event(FAN_MNT_DETACH, &mnt_info(7)));
        buf.extend(event(FAN_MNT_ATTACH | FAN_MNT_DETACH, &mnt_info(8)));
        buf.extend(event(FAN_Q_OVERFLOW, &[]));
        let notices: Vec<_> = fanotify_events(&buf)
            .unwrap()
            .into_iter()
            .map(|e| e.notice)
            .collect();
        assert_eq!(
            notices,
            [
                MountNotice::Attach(0x1_0000_0001),
                MountNotice::Detach(7),
                MountNotice::Move(8),
                MountNotice::Overflow
            ]
        );
    }

    #[test]
    fn fanotify_rejects_truncation_and_bad_info() {
        let buf = event(FAN_MNT_ATTACH, &mnt_info(1));
        assert!(fanotify_events(&buf[..buf.len() - 1]).is_err());
        let mut bad = mnt_info(1);
        bad[2] = 2; // info length below its header
        assert_eq!(
            fanotify_events(&event(FAN_MNT_ATTACH, &bad)),
            Err(WireError::BadInfo(2))
        );
        let mut old = event(FAN_MNT_ATTACH, &mnt_info(1));
        old[4] = 2;
        assert_eq!(fanotify_events(&old), Err(WireError::Version(2)));
    }

    fn statmount_buffer(strings: &[(usize, &str)], mask: u64) -> Vec<u8> {
        let mut buf = vec![0u8; STATMOUNT_FIXED];
        let mut tail = Vec::new();
        for (field, value) in strings {
            let offset = u32::try_from(tail.len()).unwrap();
            buf[*field..*field + 4].copy_from_slice(&offset.to_ne_bytes());
            tail.extend_from_slice(value.as_bytes());
            tail.push(0);
        }
        buf.extend(tail);
        let size = u32::try_from(buf.len()).unwrap();
        buf[0..4].copy_from_slice(&size.to_ne_bytes());
        buf[8..16].copy_from_slice(&mask.to_ne_bytes());
        buf[40..48].copy_from_slice(&99u64.to_ne_bytes());
        buf[48..56].copy_from_slice(&98u64.to_ne_bytes());
        buf[64..72].copy_from_slice(&(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID).to_ne_bytes());
        buf[72..80].copy_from_slice(&MS_SHARED.to_ne_bytes());
        buf[112..120].copy_from_slice(&5u64.to_ne_bytes());
        // Room the kernel did not use.
        buf.extend([0xff; 16]);
        buf
    }

    #[test]
    fn statmount_fields_and_strings() {
        let buf = statmount_buffer(
            &[
                (36, "tmpfs"),
                (108, "/mnt/a b"),
                (124, "none"),
                (4, "size=1024k"),
                (104, "/"),
            ],
            STATMOUNT_WANTED,
        );
        let mount = parse_statmount(&buf).unwrap();
        assert_eq!(mount.id, 99);
        assert_eq!(mount.parent_id, 98);
        assert_eq!(mount.namespace, 5);
        assert_eq!(mount.fs_type, "tmpfs");
        assert_eq!(mount.mount_point, "/mnt/a b");
        assert_eq!(mount.source, "none");
        assert_eq!(mount.fs_options, "size=1024k");
        assert_eq!(mount.mount_options(), "ro,nosuid,relatime");
        assert_eq!(mount.propagation_name(), "shared");
    }

    #[test]
    fn statmount_respects_the_mask_and_rejects_bad_offsets() {
        let buf = statmount_buffer(&[(36, "tmpfs")], STATMOUNT_MNT_BASIC);
        let mount = parse_statmount(&buf).unwrap();
        assert_eq!(mount.fs_type, "");
        assert_eq!(mount.id, 99);
        let mut bad = statmount_buffer(&[(36, "tmpfs")], STATMOUNT_FS_TYPE);
        bad[36..40].copy_from_slice(&10_000u32.to_ne_bytes());
        assert!(matches!(
            parse_statmount(&bad),
            Err(WireError::BadString { .. })
        ));
        let mut big = statmount_buffer(&[], 0);
        big[0..4].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(matches!(
            parse_statmount(&big),
            Err(WireError::BadSize { .. })
        ));
    }
}
