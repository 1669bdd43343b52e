//! The devices source's netlink socket: passed by systemd or opened here, sized, bound to
//! the group followed, and on udev's group filtered in the kernel by subsystem.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{
    self, sockopt, AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType,
};

use super::{udev_wire, Monitor, NAME, SUBSYSTEMS};
use crate::activation;
use crate::sys::netlink::{self, Labels, Sender};

/// The socket systemd passed for `monitor`'s group (bound by its
/// `ListenNetlink=kobject-uevent 1` or `2`), or one of our own; and whether it was passed.
/// On udev's group the kernel drops, before the daemon wakes, what udev multicasts for
/// subsystems the source does not follow ([`udev_wire::subsystem_filter`]): net, input,
/// power_supply and the like change far more often than block and usb devices do.
pub(super) fn open_socket(monitor: Monitor, receive_buffer: usize) -> io::Result<(OwnedFd, bool)> {
    let (fd, passed) =
        match activation::passed_socket(activation::NETLINK_KOBJECT_UEVENT, monitor.group())? {
            Some(fd) => (fd, true),
            None => {
                let fd = socket::socket(
                    AddressFamily::Netlink,
                    SockType::Raw,
                    SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
                    SockProtocol::NetlinkKObjectUEvent,
                )?;
                (fd, false)
            }
        };
    if receive_buffer > 0 {
        size_buffer(&fd, receive_buffer, passed)?;
    }
    socket::setsockopt(&fd, sockopt::PassCred, &true)?;
    if monitor == Monitor::Udev {
        netlink::attach_filter(&fd, &udev_wire::subsystem_filter(SUBSYSTEMS)).map_err(|e| {
            io::Error::new(e.kind(), format!("attaching the subsystem filter: {e}"))
        })?;
    }
    if !passed {
        socket::bind(fd.as_raw_fd(), &NetlinkAddr::new(0, monitor.group()))?;
    }
    Ok((fd, passed))
}

/// Gives the socket `receive_buffer` bytes: exactly, for a socket of our own; at least,
/// for one systemd passed (its `ReceiveBuffer=` is the administrator's too).
pub(super) fn size_buffer(fd: &OwnedFd, receive_buffer: usize, passed: bool) -> io::Result<usize> {
    let got = if passed {
        activation::raise_receive_buffer(fd, receive_buffer)?
    } else {
        activation::set_receive_buffer(fd, receive_buffer)?
    };
    if got < receive_buffer {
        tracing::info!(
            source = NAME,
            "uevent socket buffer is {got} bytes, not {receive_buffer}: without CAP_NET_ADMIN the kernel caps it at net.core.rmem_max (ReceiveBuffer= in watchqd.socket sets it under systemd)"
        );
    }
    Ok(got)
}

/// How the uevent socket is read ([`crate::sys::netlink`]): credentials must say uid 0.
pub(super) const LABELS: Labels = Labels {
    source: NAME,
    socket: "uevent socket",
    message: "uevent",
    datagram: None,
    warn_truncated: false,
    check_credentials: true,
    sender: Sender::Kernel,
};

/// How udev's group is read: multicast by uid 0, as sd-device accepts it.
pub(super) const UDEV_LABELS: Labels = Labels {
    source: NAME,
    socket: "udev monitor socket",
    message: "udev message",
    datagram: None,
    warn_truncated: false,
    check_credentials: true,
    sender: Sender::RootMulticast,
};
