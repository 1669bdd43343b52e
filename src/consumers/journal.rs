//! Structured journal records of events (`[journal] events = true`).
//!
//! One record per event, written with the journal's native protocol: one datagram to
//! `/run/systemd/journal/socket` (or a namespace's socket, `[journal] socket`), holding
//! `KEY=value` lines, or, for a value with a newline, the key, a newline, the value's
//! length as a little-endian u64, the value and a newline (systemd's
//! `docs/JOURNAL_NATIVE_PROTOCOL.md`). A record too large for a datagram goes in a sealed
//! memfd passed with `SCM_RIGHTS`, as the protocol allows.
//!
//! Fields: `MESSAGE_ID` (a fixed 128-bit id per source and kind, each source's
//! [`JournalIds`](crate::source::JournalIds), so a log shipper can match events
//! without parsing text), `MESSAGE` (a line for people),
//! `PRIORITY`, `SYSLOG_IDENTIFIER=watchqd`, `WATCHQ_SOURCE`, `WATCHQ_KIND`, `WATCHQ_SEQ`
//! (the source's sequence number, as `Manager.Snapshot` reports it), `WATCHQ_OBJECT`
//! (the object id: a device's sysfs path, …) and every attribute as
//! `WATCHQ_<NAME>` (upper case, `-` as `_`: `WATCHQ_DEVNAME`, `WATCHQ_KERNEL_SEQNUM`).
//!
//! The `tracing-journald` layer the daemon logs through cannot write these: tracing
//! fields are named at compile time, and attributes differ per event; and records must
//! not depend on the log level or on whether stderr is the journal.
//!
//! Touches: an unbound `AF_UNIX` datagram socket, `sendto`/`sendmsg`, `memfd_create`
//! and `F_ADD_SEALS` for large records. No capability.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::{attr_text, kind_of};
use crate::dispatch::{Consumed, ConsumerFeed};
use crate::event::Record;
use crate::logging::LogLimit;
use crate::source::{Catalogue, Registry, CATALOGUE};

/// Records waiting to be written.
pub const QUEUE: usize = 1024;
pub const DEFAULT_SOCKET: &str = "/run/systemd/journal/socket";

/// `[journal]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JournalConfig {
    /// Whether to write a record per event.
    pub events: bool,
    /// The sources whose events are written; empty: every source that reports on its own.
    pub sources: Vec<&'static str>,
    /// The journal's native socket.
    pub socket: PathBuf,
}

impl Default for JournalConfig {
    fn default() -> Self {
        JournalConfig {
            events: false,
            sources: Vec::new(),
            socket: PathBuf::from(DEFAULT_SOCKET),
        }
    }
}

/// The sources whose events are written.
pub fn sources(config: &JournalConfig, catalogue: Catalogue<'_>) -> Vec<&'static str> {
    if config.sources.is_empty() {
        catalogue
            .iter()
            .filter(|s| s.system_wide)
            .map(|s| s.name)
            .collect()
    } else {
        config.sources.clone()
    }
}

/// `MESSAGE_ID` of the record saying events of a source were lost (the kernel dropped
/// them, the source failed and was reopened, or the journal writer fell behind):
/// `WATCHQ_LOST_REASON` is `kernel-overflow`, `source-restarted` or `queue-full`,
/// `WATCHQ_LOST_COUNT` the number dropped (0: unknown).
pub const LOST_MESSAGE_ID: &str = "b13a5e4199c24bc8a53bf497d57b091b";

/// The `MESSAGE_ID` of a (source, kind): the source's
/// [`JournalIds`](crate::source::JournalIds).
pub fn message_id(source: &str, kind: &str) -> Option<&'static str> {
    CATALOGUE.get(source)?.journal.message_id(kind)
}

/// The syslog priority of a (source, kind): the source's
/// [`JournalIds`](crate::source::JournalIds); info for a source the catalogue does not
/// know.
fn priority(source: &str, kind: &str) -> u8 {
    CATALOGUE
        .get(source)
        .map_or(6, |source| (source.journal.priority)(kind))
}

/// A journal field name for an attribute: `WATCHQ_` and the name in upper case, every
/// character other than a letter or digit as `_`, at most 64 bytes (the journal's limit).
pub fn field_name(attribute: &str) -> String {
    let mut name: String = "WATCHQ_"
        .chars()
        .chain(attribute.chars().map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        }))
        .collect();
    name.truncate(64);
    name
}

fn put_field(buf: &mut Vec<u8>, name: &str, value: &str) {
    buf.extend_from_slice(name.as_bytes());
    if value.contains('\n') {
        buf.push(b'\n');
        buf.extend_from_slice(&(value.len() as u64).to_le_bytes());
    } else {
        buf.push(b'=');
    }
    buf.extend_from_slice(value.as_bytes());
    buf.push(b'\n');
}

/// The native-protocol record of one event.
pub fn encode(record: &Record, kind: &str, seq: u64) -> Vec<u8> {
    let mut buf = Vec::with_capacity(512);
    if let Some(id) = message_id(record.source, kind) {
        put_field(&mut buf, "MESSAGE_ID", id);
    }
    let mut message = format!("{} {kind} {}", record.source, record.object_id);
    for key in ["devname", "errno-name", "excess-id", "mount-point"] {
        if let Some(value) = record.attributes.get(key) {
            message.push_str(&format!(" {key}={}", attr_text(value)));
        }
    }
    put_field(&mut buf, "MESSAGE", &message);
    put_field(
        &mut buf,
        "PRIORITY",
        &priority(record.source, kind).to_string(),
    );
    put_field(&mut buf, "SYSLOG_IDENTIFIER", "watchqd");
    put_field(&mut buf, "WATCHQ_SOURCE", record.source);
    put_field(&mut buf, "WATCHQ_KIND", kind);
    put_field(&mut buf, "WATCHQ_SEQ", &seq.to_string());
    put_field(&mut buf, "WATCHQ_OBJECT", &record.object_id);
    for (key, value) in &record.attributes {
        let name = field_name(key);
        if !matches!(
            name.as_str(),
            "WATCHQ_SOURCE" | "WATCHQ_KIND" | "WATCHQ_SEQ" | "WATCHQ_OBJECT"
        ) {
            put_field(&mut buf, &name, &attr_text(value));
        }
    }
    buf
}

/// The record saying `count` events of `source` were lost (`count` 0: unknown).
pub fn encode_lost(source: &str, reason: &str, count: u64) -> Vec<u8> {
    let mut buf = Vec::with_capacity(256);
    put_field(&mut buf, "MESSAGE_ID", LOST_MESSAGE_ID);
    let message = match count {
        0 => format!("{source} events were lost ({reason})"),
        n => format!("{n} {source} events were not written to the journal ({reason})"),
    };
    put_field(&mut buf, "MESSAGE", &message);
    put_field(&mut buf, "PRIORITY", "4");
    put_field(&mut buf, "SYSLOG_IDENTIFIER", "watchqd");
    put_field(&mut buf, "WATCHQ_SOURCE", source);
    put_field(&mut buf, "WATCHQ_LOST_REASON", reason);
    put_field(&mut buf, "WATCHQ_LOST_COUNT", &count.to_string());
    buf
}

/// Sends one record; too large for a datagram, through a sealed memfd.
fn send(socket: &UnixDatagram, path: &Path, payload: &[u8]) -> io::Result<()> {
    match socket.send_to(payload, path) {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(nix::libc::EMSGSIZE) => {
            send_memfd(socket, path, payload)
        }
        Err(e) => Err(e),
    }
}

fn send_memfd(socket: &UnixDatagram, path: &Path, payload: &[u8]) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, SealFlag};
    use nix::sys::memfd::{memfd_create, MFdFlags};
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
    use std::io::Write;
    let fd = memfd_create(
        c"watchqd-journal",
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )?;
    let mut file = std::fs::File::from(fd);
    file.write_all(payload)?;
    fcntl(&file, FcntlArg::F_ADD_SEALS(SealFlag::all()))?;
    let address = UnixAddr::new(path)?;
    let fds = [file.as_raw_fd()];
    sendmsg(
        socket.as_raw_fd(),
        &[],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        Some(&address),
    )?;
    Ok(())
}

/// Whether an error means nobody listens at the socket (no journald here).
fn is_absent(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(nix::libc::ENOENT | nix::libc::ECONNREFUSED | nix::libc::ENOTDIR)
    )
}

/// Writes a record per event in `feed` until the daemon stops. Without a journal at
/// `path`, says so once and drops records until one appears.
pub async fn run(mut feed: ConsumerFeed, path: PathBuf, registry: Registry) {
    let socket = match UnixDatagram::unbound().and_then(|s| {
        s.set_nonblocking(true)?;
        Ok(s)
    }) {
        Ok(socket) => socket,
        Err(e) => {
            tracing::error!("journal: cannot make a datagram socket: {e}; no event records");
            std::future::pending::<()>().await;
            return;
        }
    };
    let mut reachable: Option<bool> = None;
    let mut failures = LogLimit::default();
    while let Some(entry) = feed.receiver.recv().await {
        let mut payloads = Vec::with_capacity(2);
        let dropped = feed.take_dropped();
        match entry {
            Consumed::Event { seq, record } => {
                if dropped > 0 {
                    payloads.push(encode_lost(record.source, "queue-full", dropped));
                }
                let subtypes = registry
                    .get(record.source)
                    .map_or(&[][..], |s| s.subtypes());
                payloads.push(encode(&record, kind_of(subtypes, &record), seq));
            }
            Consumed::Missed { source, reason } => {
                if dropped > 0 {
                    payloads.push(encode_lost(source, "queue-full", dropped));
                }
                payloads.push(encode_lost(source, reason, 0));
            }
        }
        for payload in payloads {
            match send(&socket, &path, &payload) {
                Ok(()) => {
                    if reachable == Some(false) {
                        tracing::info!(
                            "journal: {} is reachable again; writing event records",
                            path.display()
                        );
                    }
                    reachable = Some(true);
                }
                Err(e) if is_absent(&e) => {
                    if reachable != Some(false) {
                        tracing::warn!(
                            "journal: unavailable at {} ({e}); event records are not written until it is",
                            path.display()
                        );
                    }
                    reachable = Some(false);
                }
                Err(e) => {
                    if let Some(suppressed) = failures.allow(Instant::now()) {
                        tracing::warn!(
                            "journal: cannot write an event record to {}: {e}{}",
                            path.display(),
                            LogLimit::note(suppressed)
                        );
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Attrs, Audience, Change};

    /// Parses native-protocol fields (both forms).
    pub fn parse(mut buf: &[u8]) -> Vec<(String, String)> {
        let mut fields = Vec::new();
        while !buf.is_empty() {
            let line_end = buf.iter().position(|b| *b == b'\n').unwrap();
            let line = &buf[..line_end];
            if let Some(eq) = line.iter().position(|b| *b == b'=') {
                fields.push((
                    String::from_utf8(line[..eq].to_vec()).unwrap(),
                    String::from_utf8(line[eq + 1..].to_vec()).unwrap(),
                ));
                buf = &buf[line_end + 1..];
            } else {
                let name = String::from_utf8(line.to_vec()).unwrap();
                let rest = &buf[line_end + 1..];
                let len =
                    usize::try_from(u64::from_le_bytes(rest[..8].try_into().unwrap())).unwrap();
                fields.push((name, String::from_utf8(rest[8..8 + len].to_vec()).unwrap()));
                assert_eq!(rest[8 + len], b'\n');
                buf = &rest[9 + len..];
            }
        }
        fields
    }

    #[test]
    fn each_source_gives_its_priorities() {
        assert_eq!(priority("block-errors", "read"), 3, "failed I/O: error");
        assert_eq!(priority("quota", "block-hard"), 4, "over a limit: warning");
        assert_eq!(
            priority("quota", "block-hard-below"),
            5,
            "back below: notice"
        );
        assert_eq!(priority("devices", "add"), 6);
        assert_eq!(priority("mounts", "attach"), 6);
        assert_eq!(priority("no-such-source", "x"), 6);
    }

    #[test]
    fn every_kind_of_every_system_wide_source_has_its_own_id() {
        let mut ids = vec![LOST_MESSAGE_ID];
        for source in CATALOGUE.iter() {
            if source.system_wide {
                for kind in source.subtypes {
                    assert!(
                        message_id(source.name, kind).is_some(),
                        "no MESSAGE_ID for {} {kind}",
                        source.name
                    );
                }
            }
            for (kind, id) in source.journal.message_ids {
                assert!(
                    source.subtypes.contains(kind),
                    "{}: a MESSAGE_ID for {kind}, which is not one of its subtypes",
                    source.name
                );
                ids.push(id);
            }
        }
        for id in &ids {
            assert!(
                id.len() == 32
                    && id
                        .bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
                "{id}"
            );
        }
        let all = ids.len();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), all, "ids are unique");
    }

    #[test]
    fn a_record_has_the_id_the_fields_and_every_attribute() {
        let mut attributes = Attrs::new();
        attributes.insert("devname".into(), "/dev/loop0".into());
        attributes.insert("kernel-seqnum".into(), 4242u64.into());
        attributes.insert("read-only".into(), false.into());
        attributes.insert("loop-backing-file".into(), "/tmp/a\nb".into());
        let record = Record {
            source: "devices",
            subtype: 0,
            object_id: "/devices/virtual/block/loop0".into(),
            change: Change::Upsert,
            attributes,
            properties: Default::default(),
            audience: Audience::Everyone,
        };
        let fields = parse(&encode(&record, "add", 17));
        let get = |k: &str| {
            fields
                .iter()
                .find(|(name, _)| name == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("MESSAGE_ID"), Some("384f719155194359bb7ed41ca9f34bb1"));
        assert_eq!(
            get("MESSAGE"),
            Some("devices add /devices/virtual/block/loop0 devname=/dev/loop0")
        );
        assert_eq!(get("PRIORITY"), Some("6"));
        assert_eq!(get("WATCHQ_SOURCE"), Some("devices"));
        assert_eq!(get("WATCHQ_KIND"), Some("add"));
        assert_eq!(get("WATCHQ_SEQ"), Some("17"));
        assert_eq!(get("WATCHQ_OBJECT"), Some("/devices/virtual/block/loop0"));
        assert_eq!(get("WATCHQ_DEVNAME"), Some("/dev/loop0"));
        assert_eq!(get("WATCHQ_KERNEL_SEQNUM"), Some("4242"));
        assert_eq!(get("WATCHQ_READ_ONLY"), Some("false"));
        assert_eq!(get("WATCHQ_LOOP_BACKING_FILE"), Some("/tmp/a\nb"));
        assert!(fields.iter().all(|(name, _)| name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')));
    }

    #[test]
    fn a_record_too_large_for_a_datagram_goes_through_a_memfd() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("socket");
        let receiver = UnixDatagram::bind(&path).unwrap();
        let sender = UnixDatagram::unbound().unwrap();
        let payload = encode_lost(&"x".repeat(400_000), "queue-full", 1);
        send(&sender, &path, &payload).unwrap();
        let mut buf = [0u8; 16];
        let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let msg = nix::sys::socket::recvmsg::<()>(
            receiver.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            nix::sys::socket::MsgFlags::empty(),
        )
        .unwrap();
        let fd = msg
            .cmsgs()
            .unwrap()
            .find_map(|c| match c {
                nix::sys::socket::ControlMessageOwned::ScmRights(fds) => fds.first().copied(),
                _ => None,
            })
            .expect("a memfd");
        // SAFETY: the fd was just received with SCM_RIGHTS and is owned by nobody else.
        let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        // The journal reads the memfd from its start; the offset is the sender's.
        let mut received = vec![0u8; payload.len() + 1];
        let n = std::os::unix::fs::FileExt::read_at(&file, &mut received, 0).unwrap();
        assert!(
            n == payload.len() && received[..n] == payload[..],
            "{n} bytes"
        );
    }
}
