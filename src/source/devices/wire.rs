//! Decoder for kernel uevent messages (`NETLINK_KOBJECT_UEVENT`, multicast group 1).
//!
//! Wire layout, as `lib/kobject_uevent.c` writes it:
//!
//! ```text
//! ACTION "@" DEVPATH NUL ( KEY "=" VALUE NUL )*
//! ```
//!
//! The environment always holds `ACTION`, `DEVPATH`, `SUBSYSTEM` and `SEQNUM`, and the
//! header repeats `ACTION` and `DEVPATH`. udev re-broadcasts events with a binary
//! header starting `libudev\0` on group 2; such a message on group 1 was not sent by the
//! kernel and is refused here. This is a pure function over bytes: no input panics.

use std::collections::BTreeMap;
use std::fmt;

/// The kernel's `enum kobject_action`, in its order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Add,
    Remove,
    Change,
    Move,
    Online,
    Offline,
    Bind,
    Unbind,
}

impl Action {
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "add" => Action::Add,
            "remove" => Action::Remove,
            "change" => Action::Change,
            "move" => Action::Move,
            "online" => Action::Online,
            "offline" => Action::Offline,
            "bind" => Action::Bind,
            "unbind" => Action::Unbind,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Add => "add",
            Action::Remove => "remove",
            Action::Change => "change",
            Action::Move => "move",
            Action::Online => "online",
            Action::Offline => "offline",
            Action::Bind => "bind",
            Action::Unbind => "unbind",
        }
    }
}

/// A decoded uevent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UEvent {
    pub action: Action,
    /// Path below `/sys`, starting with `/devices/`.
    pub devpath: String,
    pub subsystem: String,
    pub seqnum: u64,
    /// Every `KEY=VALUE` pair, including the four above.
    pub properties: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeError {
    Empty,
    /// A udev (userspace) message where only kernel messages may appear.
    Libudev,
    /// The first field is not `ACTION@DEVPATH`.
    BadHeader,
    NotUtf8,
    /// An environment entry without `=`.
    BadEntry(String),
    MissingKey(&'static str),
    /// The header disagrees with the environment.
    HeaderMismatch,
    UnknownAction(String),
    BadSeqnum(String),
    /// `DEVPATH` is not an absolute path without `..` components.
    BadDevpath(String),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Empty => write!(f, "empty message"),
            DecodeError::Libudev => write!(f, "udev message on the kernel group"),
            DecodeError::BadHeader => write!(f, "first field is not ACTION@DEVPATH"),
            DecodeError::NotUtf8 => write!(f, "message is not UTF-8"),
            DecodeError::BadEntry(e) => write!(f, "entry without '=': {e:?}"),
            DecodeError::MissingKey(k) => write!(f, "missing {k}"),
            DecodeError::HeaderMismatch => write!(f, "header disagrees with ACTION/DEVPATH"),
            DecodeError::UnknownAction(a) => write!(f, "unknown action {a:?}"),
            DecodeError::BadSeqnum(s) => write!(f, "SEQNUM is not a number: {s:?}"),
            DecodeError::BadDevpath(p) => write!(f, "DEVPATH is not a sysfs path: {p:?}"),
        }
    }
}

impl std::error::Error for DecodeError {}

pub fn parse(buf: &[u8]) -> Result<UEvent, DecodeError> {
    if buf.is_empty() {
        return Err(DecodeError::Empty);
    }
    if buf.starts_with(b"libudev\0") {
        return Err(DecodeError::Libudev);
    }
    let text = std::str::from_utf8(buf).map_err(|_| DecodeError::NotUtf8)?;
    let (header, environment) = text.split_once('\0').unwrap_or((text, ""));
    let (header_action, header_devpath) = header.split_once('@').ok_or(DecodeError::BadHeader)?;
    let event = decode_environment(environment)?;
    if event.action.as_str() != header_action || event.devpath != header_devpath {
        return Err(DecodeError::HeaderMismatch);
    }
    Ok(event)
}

/// An event from its environment alone (`KEY=VALUE` entries separated by NULs, without
/// the kernel's `ACTION@DEVPATH` header): how udev sends it (`udev_wire`), checked as
/// the kernel's is.
pub fn from_environment(buf: &[u8]) -> Result<UEvent, DecodeError> {
    let text = std::str::from_utf8(buf).map_err(|_| DecodeError::NotUtf8)?;
    decode_environment(text)
}

fn decode_environment(text: &str) -> Result<UEvent, DecodeError> {
    let mut properties = BTreeMap::new();
    for field in text.split('\0').filter(|f| !f.is_empty()) {
        let (key, value) = field
            .split_once('=')
            .ok_or_else(|| DecodeError::BadEntry(field.to_owned()))?;
        properties.insert(key.to_owned(), value.to_owned());
    }

    let get = |key: &'static str| {
        properties
            .get(key)
            .map(String::as_str)
            .ok_or(DecodeError::MissingKey(key))
    };
    let action_text = get("ACTION")?;
    let devpath = get("DEVPATH")?;
    let subsystem = get("SUBSYSTEM")?;
    let seqnum_text = get("SEQNUM")?;
    let action = Action::parse(action_text)
        .ok_or_else(|| DecodeError::UnknownAction(action_text.to_owned()))?;
    let seqnum = seqnum_text
        .parse()
        .map_err(|_| DecodeError::BadSeqnum(seqnum_text.to_owned()))?;
    if !devpath.starts_with('/') || devpath.split('/').any(|c| c == "..") {
        return Err(DecodeError::BadDevpath(devpath.to_owned()));
    }

    Ok(UEvent {
        action,
        devpath: devpath.to_owned(),
        subsystem: subsystem.to_owned(),
        seqnum,
        properties,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Captured from `losetup -f` on the 6.18 host kernel.
    const LOOP_CHANGE: &[u8] = b"change@/devices/virtual/block/loop0\0ACTION=change\0DEVPATH=/devices/virtual/block/loop0\0SUBSYSTEM=block\0DISK_MEDIA_CHANGE=1\0MAJOR=7\0MINOR=0\0DEVNAME=loop0\0DEVTYPE=disk\0DISKSEQ=9\0SEQNUM=4242\0";

    #[test]
    fn decodes_a_captured_loop_media_change() {
        let event = parse(LOOP_CHANGE).unwrap();
        assert_eq!(event.action, Action::Change);
        assert_eq!(event.devpath, "/devices/virtual/block/loop0");
        assert_eq!(event.subsystem, "block");
        assert_eq!(event.seqnum, 4242);
        assert_eq!(event.properties["DISK_MEDIA_CHANGE"], "1");
        assert_eq!(event.properties["DEVNAME"], "loop0");
    }

    #[test]
    fn refuses_libudev_messages() {
        assert_eq!(
            parse(b"libudev\0\xfe\xed\xca\xfe"),
            Err(DecodeError::Libudev)
        );
    }

    #[test]
    fn refuses_header_that_disagrees_with_environment() {
        let msg = b"add@/devices/a\0ACTION=remove\0DEVPATH=/devices/a\0SUBSYSTEM=block\0SEQNUM=1\0";
        assert_eq!(parse(msg), Err(DecodeError::HeaderMismatch));
    }

    #[test]
    fn refuses_missing_keys_and_bad_values() {
        assert_eq!(
            parse(b"add@/devices/a\0ACTION=add\0DEVPATH=/devices/a\0SEQNUM=1\0"),
            Err(DecodeError::MissingKey("SUBSYSTEM"))
        );
        assert!(matches!(
            parse(b"add@/devices/a\0ACTION=add\0DEVPATH=/devices/a\0SUBSYSTEM=usb\0SEQNUM=x\0"),
            Err(DecodeError::BadSeqnum(_))
        ));
        assert!(matches!(
            parse(b"add@/devices/../etc\0ACTION=add\0DEVPATH=/devices/../etc\0SUBSYSTEM=usb\0SEQNUM=1\0"),
            Err(DecodeError::BadDevpath(_))
        ));
        assert!(matches!(
            parse(b"jump@/devices/a\0ACTION=jump\0DEVPATH=/devices/a\0SUBSYSTEM=usb\0SEQNUM=1\0"),
            Err(DecodeError::UnknownAction(_))
        ));
        assert_eq!(parse(b"nonsense"), Err(DecodeError::BadHeader));
        assert_eq!(parse(b"\xff@x"), Err(DecodeError::NotUtf8));
        assert_eq!(parse(b""), Err(DecodeError::Empty));
    }
}
