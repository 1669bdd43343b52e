//! Decoder for what one `read()` of a notification pipe returns (`linux/watch_queue.h`).
//!
//! Every record starts with `struct watch_notification`, in native byte order:
//!
//! ```text
//! u32  type:24 | subtype:8     (type in the low 24 bits on little-endian and big-endian:
//!                               the kernel writes the bitfield, we read the u32)
//! u32  info                    bits 0-6 length in bytes, 8-15 watch id (our tag),
//!                              16-31 type-specific flags
//! ```
//!
//! Key records (`WATCH_TYPE_KEY_NOTIFY`, `struct key_notification`) add `u32 key_id, aux`
//! (16 bytes). Meta records (`WATCH_TYPE_META`): a removal (the watched object is gone, or
//! the watch was removed; 8 bytes, or 16 with the `u64` object id, for keys the serial)
//! and a loss (the kernel dropped notes because the pipe was full; 8 bytes, inserted by
//! the kernel on the next `read()`). This is a pure function over bytes: no input panics.

use std::fmt;

pub const WATCH_TYPE_META: u32 = 0;
pub const WATCH_TYPE_KEY_NOTIFY: u32 = 1;
pub const WATCH_META_REMOVAL_NOTIFICATION: u8 = 0;
pub const WATCH_META_LOSS_NOTIFICATION: u8 = 1;

const WATCH_INFO_LENGTH: u32 = 0x0000_007f;
const WATCH_INFO_ID: u32 = 0x0000_ff00;
const WATCH_INFO_ID_SHIFT: u32 = 8;
const HEADER_LEN: usize = 8;
const KEY_RECORD_LEN: usize = 16;

/// The kernel's `enum key_notification_subtype`, in its order. The names are those of
/// keyutils' `keyctl watch`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeyChange {
    /// The key got its payload; aux is 0 or a negative error (a negatively instantiated
    /// key).
    Instantiated,
    Updated,
    /// The key aux was linked into the watched keyring.
    Linked,
    /// The key aux was unlinked from the watched keyring.
    Unlinked,
    /// The watched keyring was cleared.
    Cleared,
    Revoked,
    Invalidated,
    /// Permissions, ownership or expiry changed.
    Setattr,
}

impl KeyChange {
    pub const ALL: [KeyChange; 8] = [
        KeyChange::Instantiated,
        KeyChange::Updated,
        KeyChange::Linked,
        KeyChange::Unlinked,
        KeyChange::Cleared,
        KeyChange::Revoked,
        KeyChange::Invalidated,
        KeyChange::Setattr,
    ];

    pub fn from_subtype(subtype: u8) -> Option<Self> {
        Self::ALL.get(usize::from(subtype)).copied()
    }

    /// The kernel's subtype number, also the daemon's subtype index for keys.
    pub fn subtype(self) -> u8 {
        self as u8
    }

    pub fn as_str(self) -> &'static str {
        match self {
            KeyChange::Instantiated => "instantiated",
            KeyChange::Updated => "updated",
            KeyChange::Linked => "linked",
            KeyChange::Unlinked => "unlinked",
            KeyChange::Cleared => "cleared",
            KeyChange::Revoked => "revoked",
            KeyChange::Invalidated => "invalidated",
            KeyChange::Setattr => "setattr",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|c| c.as_str() == name)
    }
}

/// One decoded record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Note {
    Key {
        change: KeyChange,
        /// The watch id the watch was set with (bits 8-15 of info).
        watch_id: u8,
        key: i32,
        /// The other key of a link or unlink; the error of a negative instantiation;
        /// otherwise 0. Kept raw (`u32`) as the kernel wrote it.
        aux: u32,
    },
    /// A watch ended: the object was destroyed (for keys, by the garbage collector after
    /// its last reference went), or the watch was removed. `object` is the key serial
    /// when the kernel gave one.
    Removal { watch_id: u8, object: Option<u64> },
    /// The kernel dropped notes for lack of room in the pipe.
    Loss,
    /// A well-formed record of a type or subtype this daemon does not know.
    Unknown { kind: u32, subtype: u8 },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WireError {
    /// Fewer bytes left than a header, or than the record's length says.
    Truncated {
        offset: usize,
        need: usize,
        have: usize,
    },
    /// A length below the header's, which would never advance.
    BadLength { offset: usize, length: usize },
    /// A key record shorter than `struct key_notification`.
    ShortKeyRecord { offset: usize, length: usize },
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::Truncated { offset, need, have } => write!(
                f,
                "record at byte {offset} needs {need} bytes, only {have} left"
            ),
            WireError::BadLength { offset, length } => write!(
                f,
                "record at byte {offset} says it is {length} bytes long, less than its header"
            ),
            WireError::ShortKeyRecord { offset, length } => write!(
                f,
                "key record at byte {offset} is {length} bytes, a key_notification is {KEY_RECORD_LEN}"
            ),
        }
    }
}

impl std::error::Error for WireError {}

fn u32_at(buf: &[u8], at: usize) -> Option<u32> {
    let bytes = buf.get(at..at.checked_add(4)?)?;
    Some(u32::from_ne_bytes(bytes.try_into().ok()?))
}

fn u64_at(buf: &[u8], at: usize) -> Option<u64> {
    let bytes = buf.get(at..at.checked_add(8)?)?;
    Some(u64::from_ne_bytes(bytes.try_into().ok()?))
}

/// Decodes every record of one read. Records before a malformed one are returned with
/// the error, so that what the kernel did deliver is not thrown away.
pub fn parse(buf: &[u8]) -> (Vec<Note>, Option<WireError>) {
    let mut notes = Vec::new();
    let mut offset = 0;
    while offset < buf.len() {
        match parse_one(buf, offset) {
            Ok((note, length)) => {
                notes.push(note);
                offset += length;
            }
            Err(e) => return (notes, Some(e)),
        }
    }
    (notes, None)
}

fn parse_one(buf: &[u8], offset: usize) -> Result<(Note, usize), WireError> {
    let have = buf.len() - offset;
    let truncated = |need| WireError::Truncated { offset, need, have };
    let (Some(head), Some(info)) = (u32_at(buf, offset), u32_at(buf, offset + 4)) else {
        return Err(truncated(HEADER_LEN));
    };
    // Both masks keep the values far below usize::MAX and u8::MAX.
    let length = (info & WATCH_INFO_LENGTH) as usize;
    if length < HEADER_LEN {
        return Err(WireError::BadLength { offset, length });
    }
    if length > have {
        return Err(truncated(length));
    }
    let kind = head & 0x00ff_ffff;
    let subtype = (head >> 24) as u8;
    let watch_id = ((info & WATCH_INFO_ID) >> WATCH_INFO_ID_SHIFT) as u8;
    let note = match (kind, subtype) {
        (WATCH_TYPE_KEY_NOTIFY, _) => {
            if length < KEY_RECORD_LEN {
                return Err(WireError::ShortKeyRecord { offset, length });
            }
            let key = u32_at(buf, offset + 8).ok_or_else(|| truncated(KEY_RECORD_LEN))?;
            let aux = u32_at(buf, offset + 12).ok_or_else(|| truncated(KEY_RECORD_LEN))?;
            match KeyChange::from_subtype(subtype) {
                Some(change) => Note::Key {
                    change,
                    watch_id,
                    // Serials are positive i32 (key_serial_t); the kernel stores them in
                    // a u32 field.
                    key: i32::from_ne_bytes(key.to_ne_bytes()),
                    aux,
                },
                None => Note::Unknown { kind, subtype },
            }
        }
        (WATCH_TYPE_META, WATCH_META_REMOVAL_NOTIFICATION) => Note::Removal {
            watch_id,
            object: if length >= 16 {
                u64_at(buf, offset + 8)
            } else {
                None
            },
        },
        (WATCH_TYPE_META, WATCH_META_LOSS_NOTIFICATION) => Note::Loss,
        _ => Note::Unknown { kind, subtype },
    };
    Ok((note, length))
}

/// Encodes a key record as the kernel writes it; for tests, seeds and the fuzz target.
pub fn encode_key(change: KeyChange, watch_id: u8, key: i32, aux: u32) -> [u8; 16] {
    let mut out = [0u8; 16];
    let head = WATCH_TYPE_KEY_NOTIFY | (u32::from(change.subtype()) << 24);
    let info = 16 | (u32::from(watch_id) << WATCH_INFO_ID_SHIFT);
    out[0..4].copy_from_slice(&head.to_ne_bytes());
    out[4..8].copy_from_slice(&info.to_ne_bytes());
    out[8..12].copy_from_slice(&key.to_ne_bytes());
    out[12..16].copy_from_slice(&aux.to_ne_bytes());
    out
}

/// Encodes a meta record (removal with an id, or loss) as the kernel writes it.
pub fn encode_meta(subtype: u8, watch_id: u8, object: Option<u64>) -> Vec<u8> {
    let length: u32 = if object.is_some() { 16 } else { 8 };
    let head = WATCH_TYPE_META | (u32::from(subtype) << 24);
    let info = length | (u32::from(watch_id) << WATCH_INFO_ID_SHIFT);
    let mut out = Vec::with_capacity(16);
    out.extend_from_slice(&head.to_ne_bytes());
    out.extend_from_slice(&info.to_ne_bytes());
    if let Some(object) = object {
        out.extend_from_slice(&object.to_ne_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_every_key_change_with_serials_and_watch_id() {
        for change in KeyChange::ALL {
            let bytes = encode_key(change, 0x2a, 1234, 5678);
            let (notes, error) = parse(&bytes);
            assert_eq!(error, None);
            assert_eq!(
                notes,
                vec![Note::Key {
                    change,
                    watch_id: 0x2a,
                    key: 1234,
                    aux: 5678
                }]
            );
            assert_eq!(KeyChange::parse(change.as_str()), Some(change));
        }
    }

    #[test]
    fn decodes_removal_with_and_without_id_and_loss_in_one_read() {
        let mut buf = Vec::new();
        buf.extend_from_slice(&encode_key(KeyChange::Linked, 0, 10, 11));
        buf.extend(encode_meta(WATCH_META_LOSS_NOTIFICATION, 0, None));
        buf.extend(encode_meta(WATCH_META_REMOVAL_NOTIFICATION, 3, Some(10)));
        buf.extend(encode_meta(WATCH_META_REMOVAL_NOTIFICATION, 4, None));
        let (notes, error) = parse(&buf);
        assert_eq!(error, None);
        assert_eq!(
            notes[1..],
            [
                Note::Loss,
                Note::Removal {
                    watch_id: 3,
                    object: Some(10)
                },
                Note::Removal {
                    watch_id: 4,
                    object: None
                },
            ]
        );
    }

    #[test]
    fn unknown_types_and_subtypes_are_skipped_by_their_length() {
        let mut buf = encode_meta(9, 0, Some(1));
        buf[0] = 7; // type 7
        let mut key = encode_key(KeyChange::Updated, 0, 1, 0);
        key[3] = 200; // subtype 200
        buf.extend_from_slice(&key);
        buf.extend_from_slice(&encode_key(KeyChange::Revoked, 0, 2, 0));
        let (notes, error) = parse(&buf);
        assert_eq!(error, None);
        assert_eq!(notes.len(), 3);
        assert_eq!(
            notes[0],
            Note::Unknown {
                kind: 7,
                subtype: 9
            }
        );
        assert_eq!(
            notes[1],
            Note::Unknown {
                kind: WATCH_TYPE_KEY_NOTIFY,
                subtype: 200
            }
        );
        assert!(matches!(
            notes[2],
            Note::Key {
                change: KeyChange::Revoked,
                key: 2,
                ..
            }
        ));
    }

    #[test]
    fn malformed_records_are_errors_after_the_good_ones() {
        let good = encode_key(KeyChange::Updated, 0, 1, 0);
        let mut buf = good.to_vec();
        buf.extend_from_slice(&good[..12]);
        let (notes, error) = parse(&buf);
        assert_eq!(notes.len(), 1);
        assert_eq!(
            error,
            Some(WireError::Truncated {
                offset: 16,
                need: 16,
                have: 12
            })
        );

        let mut zero_length = good;
        zero_length[4..8].copy_from_slice(&0u32.to_ne_bytes());
        assert_eq!(
            parse(&zero_length).1,
            Some(WireError::BadLength {
                offset: 0,
                length: 0
            })
        );
        let mut short_key = good;
        short_key[4..8].copy_from_slice(&8u32.to_ne_bytes());
        assert_eq!(
            parse(&short_key).1,
            Some(WireError::ShortKeyRecord {
                offset: 0,
                length: 8
            })
        );
        assert!(parse(&[1, 2, 3])
            .1
            .is_some_and(|e| !e.to_string().is_empty()));
    }
}
