//! The decoder of what a fanotify group reporting file identifiers returns: event
//! buffers (metadata and the info records that follow it). Fuzzed by
//! `fuzz/fuzz_targets/filesystems.rs`.
//!
//! Pure functions over bytes and text; no input panics.
//!
//! A fanotify read (`include/uapi/linux/fanotify.h`) is a sequence of events, each:
//!
//! ```text
//! u32 event_len; u8 vers (3); u8 reserved; u16 metadata_len (24); u64 mask; i32 fd; i32 pid;
//! then, up to event_len, info records: u8 info_type; u8 pad; u16 len (covers the header)
//!   FID (1), DFID_NAME (2), DFID (3):  i32 fsid[2]; u32 handle_bytes; i32 handle_type;
//!                                      u8 f_handle[handle_bytes]; (name; padding)
//!   ERROR (5):                         i32 error; u32 error_count;
//! ```
//!
//! A `FAN_FS_ERROR` without an inode (ext4's `trigger_fs_error`, errors found in a block
//! bitmap) carries a FID record with `handle_bytes` 0 and `handle_type` 255
//! (`FILEID_INVALID`). With an inode, ext4 encodes `FILEID_INO32_GEN` (1): u32 inode,
//! u32 generation.

use std::fmt;

pub const FANOTIFY_METADATA_VERSION: u8 = 3;
pub const METADATA_LEN: usize = 24;

pub const FAN_MODIFY: u64 = 0x0000_0002;
pub const FAN_CLOSE_WRITE: u64 = 0x0000_0008;
pub const FAN_DELETE: u64 = 0x0000_0200;
pub const FAN_Q_OVERFLOW: u64 = 0x0000_4000;
pub const FAN_FS_ERROR: u64 = 0x0000_8000;
pub const FAN_ONDIR: u64 = 0x4000_0000;

pub const INFO_FID: u8 = 1;
pub const INFO_DFID_NAME: u8 = 2;
pub const INFO_DFID: u8 = 3;
pub const INFO_ERROR: u8 = 5;

/// `enum fid_type` values this decoder turns into inode numbers.
pub const FILEID_INO32_GEN: i32 = 1;
pub const FILEID_INO32_GEN_PARENT: i32 = 2;
pub const FILEID_INO64_GEN: i32 = 0x81;
pub const FILEID_INO64_GEN_PARENT: i32 = 0x82;
pub const FILEID_INVALID: i32 = 0xff;
/// Flags the kernel may OR into `handle_type` (6.13+: connectable, directory).
const FILEID_FLAGS_MASK: i32 = !0xff;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// Fewer bytes than the layout requires.
    Short { needed: usize, got: usize },
    /// An event whose metadata version this decoder does not know.
    Version(u8),
    /// `event_len` or `metadata_len` inconsistent with each other or the buffer.
    BadLength { event_len: u32, metadata_len: u16 },
    /// An info record whose length is too small for its type or runs past the event.
    BadInfo { info_type: u8, len: u16 },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Short { needed, got } => {
                write!(
                    f,
                    "fanotify buffer too short: needed {needed} bytes, got {got}"
                )
            }
            DecodeError::Version(v) => {
                write!(
                    f,
                    "fanotify metadata version {v}, expected {FANOTIFY_METADATA_VERSION}"
                )
            }
            DecodeError::BadLength {
                event_len,
                metadata_len,
            } => write!(
                f,
                "fanotify event length {event_len} inconsistent with metadata length {metadata_len}"
            ),
            DecodeError::BadInfo { info_type, len } => {
                write!(
                    f,
                    "fanotify info record type {info_type} with bad length {len}"
                )
            }
        }
    }
}

impl std::error::Error for DecodeError {}

/// A file identifier: the filesystem id and the kernel's file handle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fid {
    /// `__kernel_fsid_t` as two native-endian i32, the same bytes `statfs` returns in
    /// `f_fsid`; see [`fsid_key`].
    pub fsid: [i32; 2],
    /// The handle type with the kernel's flag bits removed.
    pub handle_type: i32,
    pub handle: Vec<u8>,
}

impl Fid {
    /// The inode number the handle encodes, for the generic inode handle types; `None`
    /// for `FILEID_INVALID` (no inode) and for filesystem-specific handles.
    pub fn inode(&self) -> Option<u64> {
        let u32_at = |at: usize| -> Option<u32> {
            let bytes = self.handle.get(at..at + 4)?;
            Some(u32::from_ne_bytes(bytes.try_into().ok()?))
        };
        match self.handle_type {
            FILEID_INO32_GEN | FILEID_INO32_GEN_PARENT => u32_at(0).map(u64::from),
            FILEID_INO64_GEN | FILEID_INO64_GEN_PARENT => {
                let bytes = self.handle.get(0..8)?;
                Some(u64::from_ne_bytes(bytes.try_into().ok()?))
            }
            _ => None,
        }
    }

    pub fn fsid_key(&self) -> u64 {
        fsid_key(self.fsid)
    }
}

/// One number for a filesystem id, so that it can key a map: the two words as the
/// kernel stores them (`val[0]` in the low half).
pub fn fsid_key(fsid: [i32; 2]) -> u64 {
    let word = |w: i32| u64::from(u32::from_ne_bytes(w.to_ne_bytes()));
    word(fsid[0]) | (word(fsid[1]) << 32)
}

/// One info record of an event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Info {
    /// `FAN_EVENT_INFO_TYPE_FID` (the object), `DFID` or `DFID_NAME` (its directory):
    /// `info_type` says which.
    Fid { info_type: u8, fid: Fid },
    /// `FAN_EVENT_INFO_TYPE_ERROR`: the first error's errno (positive) and how many
    /// errors were merged into this event while it waited to be read.
    Error { error: i32, count: u32 },
    /// A record type this decoder does not use.
    Other(u8),
}

/// One fanotify event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub mask: u64,
    /// `FAN_NOFD` (-1) for `FAN_REPORT_FID` groups.
    pub fd: i32,
    pub pid: i32,
    pub infos: Vec<Info>,
}

impl Event {
    /// The object's file identifier (the `FID` record, else a directory's).
    pub fn fid(&self) -> Option<&Fid> {
        let of = |wanted: u8| {
            self.infos.iter().find_map(|i| match i {
                Info::Fid { info_type, fid } if *info_type == wanted => Some(fid),
                _ => None,
            })
        };
        of(INFO_FID)
            .or_else(|| of(INFO_DFID))
            .or_else(|| of(INFO_DFID_NAME))
    }

    /// The error record of a `FAN_FS_ERROR` event.
    pub fn error(&self) -> Option<(i32, u32)> {
        self.infos.iter().find_map(|i| match i {
            Info::Error { error, count } => Some((*error, *count)),
            _ => None,
        })
    }
}

fn u16_at(buf: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(buf.get(at..at + 2)?.try_into().ok()?))
}
fn u32_at(buf: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(buf.get(at..at + 4)?.try_into().ok()?))
}
fn i32_at(buf: &[u8], at: usize) -> Option<i32> {
    Some(i32::from_ne_bytes(buf.get(at..at + 4)?.try_into().ok()?))
}
fn u64_at(buf: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(buf.get(at..at + 8)?.try_into().ok()?))
}

/// Decodes one event at the start of `buf`; returns it and its length.
pub fn event(buf: &[u8]) -> Result<(Event, usize), DecodeError> {
    let short = |needed: usize| DecodeError::Short {
        needed,
        got: buf.len(),
    };
    if buf.len() < METADATA_LEN {
        return Err(short(METADATA_LEN));
    }
    let event_len = u32_at(buf, 0).ok_or_else(|| short(4))?;
    let vers = buf[4];
    let metadata_len = u16_at(buf, 6).ok_or_else(|| short(8))?;
    if vers != FANOTIFY_METADATA_VERSION {
        return Err(DecodeError::Version(vers));
    }
    let len = usize::try_from(event_len).unwrap_or(usize::MAX);
    let meta = usize::from(metadata_len);
    if meta < METADATA_LEN || len < meta {
        return Err(DecodeError::BadLength {
            event_len,
            metadata_len,
        });
    }
    if buf.len() < len {
        return Err(short(len));
    }
    let mask = u64_at(buf, 8).ok_or_else(|| short(16))?;
    let fd = i32_at(buf, 16).ok_or_else(|| short(20))?;
    let pid = i32_at(buf, 20).ok_or_else(|| short(24))?;
    let mut infos = Vec::new();
    let mut at = meta;
    while at < len {
        let rest = &buf[at..len];
        let bad = |info_type: u8, len: u16| DecodeError::BadInfo { info_type, len };
        if rest.len() < 4 {
            return Err(bad(rest[0], 0));
        }
        let info_type = rest[0];
        let info_len = u16_at(rest, 2).unwrap_or(0);
        let record_len = usize::from(info_len);
        if record_len < 4 || record_len > rest.len() {
            return Err(bad(info_type, info_len));
        }
        let record = &rest[..record_len];
        let info = match info_type {
            INFO_FID | INFO_DFID | INFO_DFID_NAME => {
                // header 4, fsid 8, handle_bytes 4, handle_type 4
                let (Some(f0), Some(f1), Some(bytes), Some(kind)) = (
                    i32_at(record, 4),
                    i32_at(record, 8),
                    u32_at(record, 12),
                    i32_at(record, 16),
                ) else {
                    return Err(bad(info_type, info_len));
                };
                let bytes = usize::try_from(bytes).unwrap_or(usize::MAX);
                let handle = record
                    .get(20..20usize.saturating_add(bytes))
                    .ok_or_else(|| bad(info_type, info_len))?;
                Info::Fid {
                    info_type,
                    fid: Fid {
                        fsid: [f0, f1],
                        handle_type: kind & !FILEID_FLAGS_MASK,
                        handle: handle.to_vec(),
                    },
                }
            }
            INFO_ERROR => {
                let (Some(error), Some(count)) = (i32_at(record, 4), u32_at(record, 8)) else {
                    return Err(bad(info_type, info_len));
                };
                Info::Error { error, count }
            }
            other => Info::Other(other),
        };
        infos.push(info);
        at += record_len;
    }
    Ok((
        Event {
            mask,
            fd,
            pid,
            infos,
        },
        len,
    ))
}

/// Every event in one `read()` of a fanotify fd; stops after the first malformed one.
pub fn events(buf: &[u8]) -> impl Iterator<Item = Result<Event, DecodeError>> + '_ {
    let mut rest = buf;
    let mut failed = false;
    std::iter::from_fn(move || {
        if rest.is_empty() || failed {
            return None;
        }
        match event(rest) {
            Ok((event, len)) => {
                rest = &rest[len..];
                Some(Ok(event))
            }
            Err(e) => {
                failed = true;
                Some(Err(e))
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::errno::filesystem_errno_name;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// Read on this host (6.18, x86_64) after `echo msg > /sys/fs/ext4/loop4/trigger_fs_error`.
    const TRIGGERED: &str = "38000000030018000080000000000000ffffffff4043000001001400ab700e9e2bd9999e00000000ff00000005000c007500000001000000";
    /// After a `stat` whose inode table block could not be read (inode 12289).
    const EIO_INODE: &str = "40000000030018000080000000000000ffffffff6544000001001c007adefd75c78509130800000001000000013000000000000005000c000500000001000000";

    #[test]
    fn trigger_fs_error_has_no_inode_and_efscorrupted() {
        let buf = hex(TRIGGERED);
        let all: Vec<_> = events(&buf).collect();
        assert_eq!(all.len(), 1);
        let event = all[0].clone().unwrap();
        assert_eq!(event.mask, FAN_FS_ERROR);
        assert_eq!(event.fd, -1);
        assert_eq!(event.error(), Some((117, 1)));
        let fid = event.fid().unwrap();
        assert_eq!(fid.handle_type, FILEID_INVALID);
        assert!(fid.handle.is_empty());
        assert_eq!(fid.inode(), None);
        assert_eq!(filesystem_errno_name(117), Some("EFSCORRUPTED"));
    }

    #[test]
    fn an_io_error_names_its_inode() {
        let mut buf = hex(EIO_INODE);
        buf.extend(hex(TRIGGERED));
        let all: Vec<_> = events(&buf).map(Result::unwrap).collect();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].error(), Some((5, 1)));
        let fid = all[0].fid().unwrap();
        assert_eq!(fid.handle_type, FILEID_INO32_GEN);
        assert_eq!(fid.inode(), Some(12289));
        assert_eq!(fid.fsid_key(), all[0].fid().unwrap().fsid_key());
        assert_eq!(all[1].error(), Some((117, 1)));
    }

    #[test]
    fn truncated_and_inconsistent_buffers_are_errors() {
        let buf = hex(EIO_INODE);
        for cut in 0..buf.len() {
            assert!(event(&buf[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad = buf.clone();
        bad[4] = 2;
        assert_eq!(event(&bad), Err(DecodeError::Version(2)));
        let mut bad = buf.clone();
        bad[26] = 0xff; // info record longer than the event
        assert!(matches!(event(&bad), Err(DecodeError::BadInfo { .. })));
        let mut bad = buf;
        bad[0] = 8; // event_len below metadata_len
        assert!(matches!(event(&bad), Err(DecodeError::BadLength { .. })));
    }
}
