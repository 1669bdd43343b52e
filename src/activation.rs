//! Netlink sockets the service manager opened for the daemon (`systemd/watchqd.socket`).
//!
//! Uevents and the `VFS_DQUOT` quota family reach only sockets in the host's network
//! namespace. Under systemd the daemon runs with `PrivateNetwork=yes` and without
//! `CAP_NET_ADMIN`; systemd, which is in the host's namespace, opens the two sockets
//! (`ListenNetlink=`, with a large `ReceiveBuffer=`) and passes them, the way
//! `systemd-udevd-kernel.socket` does for udevd. Elsewhere (a private bus, `scripts/run-daemon`)
//! nothing is passed and each source opens its own socket as before.
//!
//! A passed socket is kept for the daemon's lifetime: a source gets a duplicate each time
//! it opens, so that after its last watch goes and it closes, it can open again even
//! though the daemon could not create the socket itself. What the socket queued while no
//! source read it is stale and is discarded on each open.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::OnceLock;

use nix::errno::Errno;
use nix::libc;
use nix::sys::socket::{self, sockopt, MsgFlags, SockaddrLike, SockaddrStorage};

/// Netlink protocols a source may be handed (`NETLINK_KOBJECT_UEVENT`, `NETLINK_GENERIC`).
pub const NETLINK_KOBJECT_UEVENT: i32 = libc::NETLINK_KOBJECT_UEVENT;
pub const NETLINK_GENERIC: i32 = libc::NETLINK_GENERIC;

/// The passed sockets by netlink protocol and the multicast groups they were bound to
/// (`nl_groups`: `ListenNetlink=kobject-uevent 1` and `… 2` are the kernel's and udev's).
static PASSED: OnceLock<HashMap<(i32, u32), OwnedFd>> = OnceLock::new();

/// Takes the sockets systemd passed (`LISTEN_FDS`), keyed by netlink protocol and bound
/// groups, and clears
/// the activation variables so that no child (the key watch helper) sees them.
///
/// Must run before any thread starts: it changes the environment. A passed descriptor
/// that is not a netlink socket, or a second one of a protocol and groups, is refused: the unit
/// and the daemon disagree, and guessing would read the wrong events.
pub fn take_passed_sockets() -> io::Result<()> {
    let mut passed = HashMap::new();
    for fd in sd_notify::listen_fds()? {
        // SAFETY: systemd passed these descriptors to this process for it to own
        // (sd_listen_fds(3)); listen_fds() returns each number once and nothing else
        // in the process has used them yet.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let key = netlink_protocol(owned.as_fd()).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("passed descriptor {fd} is not a netlink socket: {e}"),
            )
        })?;
        if passed.insert(key, owned).is_some() {
            let (protocol, groups) = key;
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("two passed netlink sockets of protocol {protocol} on groups {groups:#x}"),
            ));
        }
    }
    if !passed.is_empty() {
        let mut protocols: Vec<_> = passed.keys().collect();
        protocols.sort();
        tracing::info!(?protocols, "using netlink sockets passed by systemd");
    }
    // A second call (a library user, a test in one process) keeps the first answer.
    let _ = PASSED.set(passed);
    Ok(())
}

/// Whether systemd passed a socket of this netlink `protocol` bound to `groups` (a
/// bitmask: 1 is group 1, 2 group 2; 0 for none).
pub fn has_passed(protocol: i32, groups: u32) -> bool {
    PASSED
        .get()
        .is_some_and(|passed| passed.contains_key(&(protocol, groups)))
}

/// Whether systemd passed any socket at all: the daemon then runs in a network namespace
/// of its own, where a socket it opens hears nothing from the host's.
pub fn any_passed() -> bool {
    PASSED.get().is_some_and(|passed| !passed.is_empty())
}

/// A fresh descriptor for the passed socket of `protocol`, drained of what it queued
/// before, or `None` when systemd passed none (the source then opens its own).
pub fn passed_socket(protocol: i32, groups: u32) -> io::Result<Option<OwnedFd>> {
    let Some(socket) = PASSED
        .get()
        .and_then(|passed| passed.get(&(protocol, groups)))
    else {
        return Ok(None);
    };
    let fd = socket.try_clone()?;
    drain(fd.as_fd())?;
    Ok(Some(fd))
}

/// A passed socket's netlink protocol and the groups it is bound to.
fn netlink_protocol(fd: BorrowedFd<'_>) -> io::Result<(i32, u32)> {
    let address: SockaddrStorage = socket::getsockname(fd.as_raw_fd())?;
    let Some(netlink) = address.as_netlink_addr() else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("address family {:?}", address.family()),
        ));
    };
    // Only uevent sockets are told apart by group (the kernel's, udev's). A generic
    // netlink socket is joined to its family's group at run time, and systemd keeps it
    // across restarts: the next daemon would find it bound to that group.
    let groups = netlink.groups();
    let mut protocol: libc::c_int = 0;
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).unwrap_or(4);
    // SAFETY: SO_PROTOCOL writes one c_int into the live `protocol`, whose size is `len`;
    // nix has no wrapper for this option.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PROTOCOL,
            (&raw mut protocol).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let groups = if protocol == NETLINK_KOBJECT_UEVENT {
        groups
    } else {
        0
    };
    Ok((protocol, groups))
}

/// Reads and drops everything queued, including a pending `ENOBUFS` (an overflow while
/// nobody read is no loss to anyone).
fn drain(fd: BorrowedFd<'_>) -> io::Result<()> {
    let raw: RawFd = fd.as_raw_fd();
    let mut buf = [0u8; 8192];
    loop {
        match socket::recv(raw, &mut buf, MsgFlags::MSG_DONTWAIT) {
            Ok(_) | Err(Errno::ENOBUFS) => continue,
            Err(Errno::EAGAIN) => return Ok(()),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Asks for a receive buffer of at least `bytes`, never shrinking one that is larger
/// (the one systemd set with `ReceiveBuffer=` may exceed what the daemon could set).
/// Without `CAP_NET_ADMIN` the kernel caps the size at `net.core.rmem_max`; the socket
/// still works, with less room for bursts.
pub fn raise_receive_buffer(fd: &OwnedFd, bytes: usize) -> io::Result<usize> {
    // The kernel reports twice what was set (its bookkeeping overhead).
    let current = socket::getsockopt(fd, sockopt::RcvBuf)? / 2;
    if current >= bytes {
        return Ok(current);
    }
    set_receive_buffer(fd, bytes)
}

/// Sets the receive buffer to `bytes` (as far as the kernel allows, see
/// [`raise_receive_buffer`]), smaller than the default if asked: the configured size
/// of a socket the daemon opened itself is the size it gets.
pub fn set_receive_buffer(fd: &OwnedFd, bytes: usize) -> io::Result<usize> {
    if socket::setsockopt(fd, sockopt::RcvBufForce, &bytes).is_err() {
        socket::setsockopt(fd, sockopt::RcvBuf, &bytes)?;
    }
    Ok(socket::getsockopt(fd, sockopt::RcvBuf)? / 2)
}
