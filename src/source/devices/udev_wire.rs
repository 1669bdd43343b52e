//! Decoder for udev's monitor messages (`NETLINK_KOBJECT_UEVENT`, multicast group 2): the
//! events systemd-udevd re-broadcasts once its rules ran, with udev's properties.
//!
//! Wire layout, as sd-device's `device_monitor_send_device` writes it (systemd,
//! `src/libsystemd/sd-device/device-monitor.c`, `monitor_netlink_header`); `be` fields
//! are in network byte order (a socket filter loads them as such), `ne` ones in the
//! sender's own (the same machine's) order:
//!
//! ```text
//! offset size
//!      0    8  "libudev\0"
//!      8    4  magic 0xfeedcafe                       be
//!     12    4  header_size (40 today)                 ne
//!     16    4  properties_off                         ne
//!     20    4  properties_len                         ne
//!     24    4  filter_subsystem_hash  MurmurHash2     be
//!     28    4  filter_devtype_hash    MurmurHash2, 0 when none   be
//!     32    4  filter_tag_bloom_hi                    be
//!     36    4  filter_tag_bloom_lo                    be
//! properties_off: ( KEY "=" VALUE NUL )*  properties_len bytes
//! ```
//!
//! The hashes are systemd's `string_hash32` (MurmurHash2 of the bytes, seed 0); the tag
//! bloom filter sets, for each tag, 4 bits taken 6 at a time from its hash. The header is
//! decoded on its own ([`header`]) so that the source can drop a message for a subsystem
//! nobody watches before it reads the properties. This is a pure function over bytes: no
//! input panics.

use std::fmt;

use super::wire::{self, UEvent};

/// `"libudev\0"`: what tells a udev message from a kernel one.
pub const PREFIX: &[u8; 8] = b"libudev\0";
/// `UDEV_MONITOR_MAGIC`, protecting against a format mismatch between sender and reader.
pub const MAGIC: u32 = 0xfeed_cafe;
/// The header as systemd defines it; a sender may announce a longer one (fields added at
/// its end), never a shorter one.
pub const HEADER_LEN: usize = 40;

/// The fixed part of a udev monitor message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub header_size: u32,
    pub properties_off: u32,
    pub properties_len: u32,
    /// [`string_hash32`] of `SUBSYSTEM`.
    pub subsystem_hash: u32,
    /// [`string_hash32`] of `DEVTYPE`, or 0 when the device has none.
    pub devtype_hash: u32,
    /// The union of [`string_bloom64`] of every tag.
    pub tag_bloom: u64,
}

impl Header {
    /// Whether a device with tag `tag` may have sent this (a bloom filter: false
    /// positives happen, false negatives never).
    pub fn may_have_tag(&self, tag: &str) -> bool {
        let bits = string_bloom64(tag);
        self.tag_bloom & bits == bits
    }
}

/// Where the magic and the subsystem hash sit in the header (see the layout above).
const MAGIC_AT: u32 = 8;
const SUBSYSTEM_HASH_AT: u32 = 24;

/// A classic BPF program for the udev monitor socket, like the one sd-device attaches:
/// the kernel drops a udev message (its magic) whose subsystem hash is that of none of
/// `subsystems`, before the daemon wakes; anything else passes to the checks in user
/// space, other senders' datagrams included (rejected and counted there). A datagram
/// too short to hold the hash is dropped by the kernel (a load past its end ends the
/// program with 0): it could not be an event anyway.
pub fn subsystem_filter(subsystems: &[&str]) -> Vec<nix::libc::sock_filter> {
    use nix::libc::sock_filter;
    // BPF_LD | BPF_W | BPF_ABS: a word at an offset, in network byte order.
    const LOAD_WORD: u16 = 0x20;
    // BPF_JMP | BPF_JEQ | BPF_K: jump `jt` instructions on equal, `jf` otherwise.
    const JUMP_IF_EQUAL: u16 = 0x15;
    // BPF_RET | BPF_K: accept that many bytes of the datagram (0: drop it).
    const RETURN: u16 = 0x06;
    let stmt = |code, k| sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    let jump = |k, jt, jf| sock_filter {
        code: JUMP_IF_EQUAL,
        jt,
        jf,
        k,
    };
    // [0] load magic, [1] not ours: pass, [2] load hash, [3, 3 + n) equal: pass,
    // [3 + n] drop, [4 + n] pass. Jumps count from the next instruction.
    let n = u8::try_from(subsystems.len())
        .unwrap_or(u8::MAX - 2)
        .min(u8::MAX - 2);
    let mut program = vec![
        stmt(LOAD_WORD, MAGIC_AT),
        jump(MAGIC, 0, n + 2),
        stmt(LOAD_WORD, SUBSYSTEM_HASH_AT),
    ];
    for (i, subsystem) in (0..n).zip(subsystems) {
        program.push(jump(string_hash32(subsystem), n - i, 0));
    }
    program.push(stmt(RETURN, 0));
    program.push(stmt(RETURN, u32::MAX));
    program
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// Shorter than the header.
    Short(usize),
    /// Not starting `libudev\0`: a kernel message, or nothing udev sent.
    NotLibudev,
    BadMagic(u32),
    /// The header announces a size below [`HEADER_LEN`].
    BadHeaderSize(u32),
    /// The properties do not lie after the header and within the message.
    BadProperties {
        off: u32,
        len: u32,
        message: usize,
    },
    /// The properties, decoded as the kernel's environment.
    Properties(wire::DecodeError),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Short(len) => write!(f, "{len} bytes, shorter than udev's header"),
            DecodeError::NotLibudev => write!(f, "does not start with \"libudev\\0\""),
            DecodeError::BadMagic(magic) => write!(f, "magic {magic:#010x}, not {MAGIC:#010x}"),
            DecodeError::BadHeaderSize(size) => {
                write!(f, "header size {size}, below {HEADER_LEN}")
            }
            DecodeError::BadProperties { off, len, message } => write!(
                f,
                "properties at {off}+{len} do not fit after the header in {message} bytes"
            ),
            DecodeError::Properties(e) => write!(f, "properties: {e}"),
        }
    }
}

impl std::error::Error for DecodeError {}

fn be32(buf: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    if let Some(bytes) = buf.get(at..at + 4) {
        word.copy_from_slice(bytes);
    }
    u32::from_be_bytes(word)
}

fn ne32(buf: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    if let Some(bytes) = buf.get(at..at + 4) {
        word.copy_from_slice(bytes);
    }
    u32::from_ne_bytes(word)
}

/// The header of a udev monitor message, checked: prefix, magic, and properties that lie
/// after the header and inside `buf`.
pub fn header(buf: &[u8]) -> Result<Header, DecodeError> {
    if buf.len() < HEADER_LEN {
        return Err(if buf.starts_with(PREFIX) || PREFIX.starts_with(buf) {
            DecodeError::Short(buf.len())
        } else {
            DecodeError::NotLibudev
        });
    }
    if !buf.starts_with(PREFIX) {
        return Err(DecodeError::NotLibudev);
    }
    let magic = be32(buf, 8);
    if magic != MAGIC {
        return Err(DecodeError::BadMagic(magic));
    }
    let header = Header {
        header_size: ne32(buf, 12),
        properties_off: ne32(buf, 16),
        properties_len: ne32(buf, 20),
        subsystem_hash: be32(buf, 24),
        devtype_hash: be32(buf, 28),
        tag_bloom: (u64::from(be32(buf, 32)) << 32) | u64::from(be32(buf, 36)),
    };
    let header_size = usize::try_from(header.header_size).unwrap_or(usize::MAX);
    if header_size < HEADER_LEN {
        return Err(DecodeError::BadHeaderSize(header.header_size));
    }
    let bad = DecodeError::BadProperties {
        off: header.properties_off,
        len: header.properties_len,
        message: buf.len(),
    };
    let off = usize::try_from(header.properties_off).map_err(|_| bad.clone())?;
    let len = usize::try_from(header.properties_len).map_err(|_| bad.clone())?;
    let end = off.checked_add(len).ok_or_else(|| bad.clone())?;
    if off < header_size || end > buf.len() {
        return Err(bad);
    }
    Ok(header)
}

/// The event a udev monitor message carries, its header already checked by [`header`]:
/// the same record the kernel path makes, whose properties are udev's (`ID_*`,
/// `DEVLINKS`, `TAGS`, `DEVNAME` as a path, … beside the kernel's).
pub fn event(buf: &[u8], header: &Header) -> Result<UEvent, DecodeError> {
    let off = usize::try_from(header.properties_off).unwrap_or(usize::MAX);
    let len = usize::try_from(header.properties_len).unwrap_or(usize::MAX);
    let properties = off
        .checked_add(len)
        .and_then(|end| buf.get(off..end))
        .ok_or(DecodeError::BadProperties {
            off: header.properties_off,
            len: header.properties_len,
            message: buf.len(),
        })?;
    wire::from_environment(properties).map_err(DecodeError::Properties)
}

/// [`header`] then [`event`].
pub fn parse(buf: &[u8]) -> Result<(Header, UEvent), DecodeError> {
    let header = header(buf)?;
    let event = event(buf, &header)?;
    Ok((header, event))
}

/// MurmurHash2 (Austin Appleby's 32-bit hash), as systemd's `src/basic/MurmurHash2.c`
/// computes it: 4-byte blocks read little-endian (x86, where the header's hashes are made).
pub fn murmur_hash2(data: &[u8], seed: u32) -> u32 {
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    // The length is mixed in modulo 2^32, as the C code's `uint32_t h = seed ^ len` does.
    #[allow(clippy::cast_possible_truncation)]
    let mut h = seed ^ (data.len() as u32);
    let mut blocks = data.chunks_exact(4);
    for block in &mut blocks {
        let mut k = u32::from_le_bytes([block[0], block[1], block[2], block[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = blocks.remainder();
    if tail.len() == 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if let Some(&first) = tail.first() {
        h ^= u32::from(first);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

/// systemd's `string_hash32`: the header's subsystem and devtype hashes.
pub fn string_hash32(text: &str) -> u32 {
    murmur_hash2(text.as_bytes(), 0)
}

/// systemd's `string_bloom64`: the 4 bits a tag sets in the header's bloom filter.
pub fn string_bloom64(text: &str) -> u64 {
    let hash = string_hash32(text);
    [0, 6, 12, 18]
        .iter()
        .fold(0, |bits, shift| bits | 1u64 << ((hash >> shift) & 63))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A message as udevd sends it, built byte by byte: the header in its two byte
    /// orders, then the properties.
    fn message(subsystem: &str, devtype: Option<&str>, tags: &[&str], props: &str) -> Vec<u8> {
        let bloom = tags.iter().fold(0u64, |b, t| b | string_bloom64(t));
        let mut buf = Vec::new();
        buf.extend_from_slice(b"libudev\0");
        buf.extend_from_slice(&0xfeed_cafe_u32.to_be_bytes());
        buf.extend_from_slice(&40u32.to_ne_bytes());
        buf.extend_from_slice(&40u32.to_ne_bytes());
        buf.extend_from_slice(&u32::try_from(props.len()).unwrap().to_ne_bytes());
        buf.extend_from_slice(&string_hash32(subsystem).to_be_bytes());
        buf.extend_from_slice(&devtype.map_or(0, string_hash32).to_be_bytes());
        buf.extend_from_slice(&u32::try_from(bloom >> 32).unwrap().to_be_bytes());
        buf.extend_from_slice(&u32::try_from(bloom & 0xffff_ffff).unwrap().to_be_bytes());
        assert_eq!(buf.len(), HEADER_LEN);
        buf.extend_from_slice(props.as_bytes());
        buf
    }

    /// What udevd sends for a USB stick's filesystem (the properties of `udevadm monitor
    /// --udev --property` for a QEMU usb-storage disk holding ext4).
    const SDA_ADD: &str = "ACTION=add\0DEVPATH=/devices/pci0000:00/0000:00:02.0/usb1/1-1/1-1:1.0/host0/target0:0:0/0:0:0:0/block/sda\0SUBSYSTEM=block\0DEVNAME=/dev/sda\0DEVTYPE=disk\0DISKSEQ=2\0SEQNUM=1720\0USEC_INITIALIZED=9123456\0ID_SERIAL=QEMU_QEMU_HARDDISK_1-0000:00:02.0-1-0:0\0ID_FS_TYPE=ext4\0ID_FS_UUID=0b1e4c8a-7d0e-4a6c-9c55-2f0f8d3c1a11\0DEVLINKS=/dev/disk/by-id/usb-QEMU_QEMU_HARDDISK_1-0000:00:02.0-1-0:0 /dev/disk/by-uuid/0b1e4c8a-7d0e-4a6c-9c55-2f0f8d3c1a11\0TAGS=:systemd:\0CURRENT_TAGS=:systemd:\0MAJOR=8\0MINOR=0\0";

    #[test]
    fn decodes_a_message_built_byte_by_byte() {
        let buf = message("block", Some("disk"), &["systemd"], SDA_ADD);
        let (header, event) = parse(&buf).unwrap();
        assert_eq!(header.subsystem_hash, string_hash32("block"));
        assert_eq!(header.devtype_hash, string_hash32("disk"));
        assert!(header.may_have_tag("systemd"));
        assert!(!header.may_have_tag("uaccess"));
        assert_eq!(event.action, wire::Action::Add);
        assert!(event.devpath.ends_with("/block/sda"));
        assert_eq!(event.subsystem, "block");
        assert_eq!(event.seqnum, 1720);
        assert_eq!(event.properties["ID_FS_TYPE"], "ext4");
        assert_eq!(event.properties["DEVNAME"], "/dev/sda");
        assert!(event.properties["DEVLINKS"].contains("/dev/disk/by-id/usb-QEMU"));
        assert_eq!(event.properties["TAGS"], ":systemd:");
    }

    /// Values computed by an independent implementation (Python, from Appleby's reference
    /// `MurmurHash2.cpp`); the full-OS guest test checks them against udevd itself, whose
    /// block events pass the source's subsystem filter only if they agree.
    #[test]
    fn hashes_agree_with_the_reference() {
        assert_eq!(string_hash32(""), 0);
        assert_eq!(string_hash32("a"), 0x9268_5f5e);
        assert_eq!(string_hash32("usb"), 0x0577_c5e5);
        assert_eq!(string_hash32("disk"), 0x7bcb_c5ee);
        assert_eq!(string_hash32("block"), 0xf003_1db7);
        assert_eq!(string_hash32("partition"), 0xcb23_4489);
        assert_eq!(string_hash32("usb_device"), 0x27f8_f50c);
        assert_eq!(string_bloom64("uaccess"), 0x0000_2008_0000_1008);
        assert_eq!(string_bloom64("systemd"), 0x0200_0400_1080_0000);
        assert_eq!(string_bloom64(""), 1);
    }

    /// Runs the instructions [`subsystem_filter`] uses as the kernel does
    /// (`net/core/filter.c`, classic BPF): what it returns for `packet`.
    fn run_filter(program: &[nix::libc::sock_filter], packet: &[u8]) -> u32 {
        let mut pc = 0;
        let mut a = 0u32;
        loop {
            let op = program[pc];
            pc += 1;
            match op.code {
                0x20 => match packet.get(op.k as usize..op.k as usize + 4) {
                    Some(word) => a = u32::from_be_bytes(word.try_into().unwrap()),
                    None => return 0,
                },
                0x15 => pc += usize::from(if a == op.k { op.jt } else { op.jf }),
                0x06 => return op.k,
                code => panic!("instruction {code:#x} not expected"),
            }
        }
    }

    /// The kernel-side filter passes udev's block and usb messages whole, drops its
    /// other subsystems' and what is too short to say, and passes what is not udev's.
    #[test]
    fn the_socket_filter_passes_block_and_usb_only() {
        let program = subsystem_filter(&["block", "usb"]);
        assert_eq!(program.len(), 7);
        let whole = u32::MAX;
        for subsystem in ["block", "usb"] {
            let passed = message(subsystem, None, &[], SDA_ADD);
            assert_eq!(run_filter(&program, &passed), whole, "{subsystem}");
        }
        for subsystem in ["net", "input", "power_supply", "blocks", ""] {
            let dropped = message(subsystem, None, &[], SDA_ADD);
            assert_eq!(run_filter(&program, &dropped), 0, "{subsystem}");
        }
        let kernel = b"add@/devices/a\0ACTION=add\0DEVPATH=/devices/a\0SUBSYSTEM=net\0SEQNUM=1\0";
        assert_eq!(run_filter(&program, kernel), whole);
        let good = message("net", None, &[], SDA_ADD);
        assert_eq!(run_filter(&program, &good[..20]), 0);
        assert_eq!(run_filter(&subsystem_filter(&[]), &good), 0);
        assert_eq!(run_filter(&subsystem_filter(&["net"]), &good), whole);
    }

    #[test]
    fn refuses_kernel_messages_and_bad_headers() {
        let good = message("block", None, &[], SDA_ADD);
        assert_eq!(
            header(b"add@/devices/a\0ACTION=add\0DEVPATH=/devices/a\0SUBSYSTEM=block\0SEQNUM=1\0"),
            Err(DecodeError::NotLibudev)
        );
        assert_eq!(header(b"libudev\0\xfe\xed"), Err(DecodeError::Short(10)));
        assert_eq!(header(b""), Err(DecodeError::Short(0)));

        let mut bad_magic = good.clone();
        bad_magic[8..12].copy_from_slice(&0xcafe_feed_u32.to_be_bytes());
        assert_eq!(header(&bad_magic), Err(DecodeError::BadMagic(0xcafe_feed)));
        // The magic in the wrong byte order is a different magic.
        let mut swapped = good.clone();
        swapped[8..12].copy_from_slice(&0xfeed_cafe_u32.to_le_bytes());
        assert!(matches!(header(&swapped), Err(DecodeError::BadMagic(_))));

        let mut small = good.clone();
        small[12..16].copy_from_slice(&8u32.to_ne_bytes());
        assert_eq!(header(&small), Err(DecodeError::BadHeaderSize(8)));

        // Properties inside the header, past the end, or wrapping around.
        for (off, len) in [(8u32, 40u32), (40, 100_000), (u32::MAX, 2), (41, u32::MAX)] {
            let mut bad = good.clone();
            bad[16..20].copy_from_slice(&off.to_ne_bytes());
            bad[20..24].copy_from_slice(&len.to_ne_bytes());
            assert!(
                matches!(header(&bad), Err(DecodeError::BadProperties { .. })),
                "{off}+{len}"
            );
        }
        // A longer header (fields a later udev added) is skipped.
        let mut longer = good[..HEADER_LEN].to_vec();
        longer[12..16].copy_from_slice(&48u32.to_ne_bytes());
        longer[16..20].copy_from_slice(&48u32.to_ne_bytes());
        longer.extend_from_slice(&[0xaa; 8]);
        longer.extend_from_slice(SDA_ADD.as_bytes());
        assert_eq!(parse(&longer).unwrap().1.seqnum, 1720);
    }

    #[test]
    fn refuses_properties_the_kernel_path_would_refuse() {
        let no_seqnum = message(
            "block",
            None,
            &[],
            "ACTION=add\0DEVPATH=/devices/a\0SUBSYSTEM=block\0",
        );
        assert_eq!(
            parse(&no_seqnum),
            Err(DecodeError::Properties(wire::DecodeError::MissingKey(
                "SEQNUM"
            )))
        );
        let escape = message(
            "block",
            None,
            &[],
            "ACTION=add\0DEVPATH=/devices/../etc\0SUBSYSTEM=block\0SEQNUM=1\0",
        );
        assert!(matches!(
            parse(&escape),
            Err(DecodeError::Properties(wire::DecodeError::BadDevpath(_)))
        ));
    }

    /// Every prefix of a good message, and every single-byte change to its header, is
    /// refused or decoded without a panic (what the fuzz target explores further).
    #[test]
    fn truncations_and_header_corruptions_never_panic() {
        let good = message("block", Some("disk"), &["systemd", "uaccess"], SDA_ADD);
        for end in 0..good.len() {
            let _ = parse(&good[..end]);
        }
        for at in 0..HEADER_LEN {
            for value in [0u8, 1, 0x7f, 0x80, 0xff] {
                let mut bad = good.clone();
                bad[at] = value;
                let _ = parse(&bad);
            }
        }
    }
}
