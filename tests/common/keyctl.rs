//! Key syscalls for the key tests on the host and in the guest: `add_key(2)`, `keyctl(2)`
//! and the watch_queue notification pipe, called through libc as the daemon calls them
//! (keyutils' `keyctl` command is what the tests compare against, not what they use).
//!
//! Include with `#[path = "common/keyctl.rs"] mod keyctl;` (tests/guest.rs has no
//! `mod common`).
#![allow(dead_code)]

use std::ffi::CString;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use nix::libc;

/// `pipe2` flag asking for a notification pipe (`linux/watch_queue.h`).
pub const O_NOTIFICATION_PIPE: i32 = libc::O_EXCL;
/// `_IO('W', 0x60)`
pub const IOC_WATCH_QUEUE_SET_SIZE: libc::c_ulong = 0x5760;

pub const KEYCTL_GET_KEYRING_ID: libc::c_long = 0;
pub const KEYCTL_JOIN_SESSION_KEYRING: libc::c_long = 1;
pub const KEYCTL_UPDATE: libc::c_long = 2;
pub const KEYCTL_REVOKE: libc::c_long = 3;
pub const KEYCTL_SETPERM: libc::c_long = 5;
pub const KEYCTL_CLEAR: libc::c_long = 7;
pub const KEYCTL_UNLINK: libc::c_long = 9;
pub const KEYCTL_INVALIDATE: libc::c_long = 21;
pub const KEYCTL_GET_PERSISTENT: libc::c_long = 22;
pub const KEYCTL_WATCH_KEY: libc::c_long = 32;
pub const KEY_SPEC_PROCESS_KEYRING: i32 = -2;
pub const KEY_SPEC_SESSION_KEYRING: i32 = -3;

/// `pipe2(O_NOTIFICATION_PIPE)`: (read end, write end). The error keeps its errno
/// (ENOPKG on a kernel without CONFIG_WATCH_QUEUE).
pub fn notification_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds: [RawFd; 2] = [-1; 2];
    // SAFETY: fds points to two writable ints, as pipe2 requires.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), O_NOTIFICATION_PIPE | libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded: both fds are fresh and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// `keyctl(op, a, b, c)`; it must succeed (`what` names it in the failure). Returns what
/// the call returns (a serial, a length, or 0).
pub fn keyctl(
    what: &str,
    op: libc::c_long,
    a: libc::c_long,
    b: libc::c_long,
    c: libc::c_long,
) -> i64 {
    // SAFETY: keyctl with integer arguments, or a pointer/length pair kept alive by the
    // caller for the call.
    let r = unsafe { libc::syscall(libc::SYS_keyctl, op, a, b, c) };
    assert!(r >= 0, "{what}: {}", io::Error::last_os_error());
    r
}

/// `add_key(kind, description, payload, keyring)`; it must succeed. Returns the key's
/// serial.
pub fn add_key(kind: &str, description: &str, payload: &[u8], keyring: i32) -> i32 {
    let kind = CString::new(kind).expect("key type without NUL");
    let description_c = CString::new(description).expect("key description without NUL");
    // SAFETY: NUL-terminated strings and a payload pointer/length pair, alive for the call.
    let serial = unsafe {
        libc::syscall(
            libc::SYS_add_key,
            kind.as_ptr(),
            description_c.as_ptr(),
            payload.as_ptr(),
            payload.len(),
            keyring,
        )
    };
    assert!(
        serial > 0,
        "add_key {description}: {}",
        io::Error::last_os_error()
    );
    i32::try_from(serial).expect("a key serial is an i32")
}

/// `KEYCTL_UPDATE` of `key` with `payload`; it must succeed.
pub fn update(key: i32, payload: &[u8]) {
    #[allow(clippy::cast_possible_wrap)]
    keyctl(
        "KEYCTL_UPDATE",
        KEYCTL_UPDATE,
        key.into(),
        payload.as_ptr() as libc::c_long,
        payload.len() as libc::c_long,
    );
}
