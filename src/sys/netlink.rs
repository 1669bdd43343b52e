//! Receiving from the kernel on a netlink socket: one datagram at a time, each checked
//! for its origin at the edge (STYLE 4).
//!
//! A datagram counts as the kernel's only when the sender's netlink port id is 0 and,
//! where the socket passes credentials (`SO_PASSCRED`), they say uid 0. Root in the
//! initial network namespace can multicast forged messages from userspace; those carry
//! its own port id, and are counted, logged (at warn a few times per interval, then
//! counted: root can forge as fast as it likes) and dropped. A socket that listens to a
//! group userspace multicasts to ([`Sender::RootMulticast`]: udev's group 2) accepts
//! what was multicast by uid 0 instead, the trust boundary sd-device draws: anything
//! else (another uid, even with `CAP_NET_ADMIN`; a unicast to our port) is dropped and
//! counted the same way. A truncated datagram is
//! dropped too. `ENOBUFS` means the kernel dropped messages for us: it is counted and
//! handed to the source as [`Datagram::Overflow`], for it to tell its subscribers.

use std::io::{self, IoSliceMut};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use nix::libc;
use nix::sys::socket::{self, ControlMessageOwned, MsgFlags, NetlinkAddr};
use tokio::io::unix::AsyncFd;

use crate::logging::LogLimit;

/// Counters a person can read in the logs and tests can observe through the journal.
#[derive(Debug, Default)]
pub struct Counters {
    pub received: AtomicU64,
    pub rejected_origin: AtomicU64,
    /// Rejections are logged at warn a few times per interval, then counted: root can
    /// forge messages as fast as it likes.
    pub rejected_log: Mutex<LogLimit>,
    pub malformed: AtomicU64,
    pub overflows: AtomicU64,
}

/// How a source names what it receives, in the log lines written here.
#[derive(Clone, Copy, Debug)]
pub struct Labels {
    /// The source's name, the `source` field of every line.
    pub source: &'static str,
    /// The socket, as in "reading the {socket} failed" (`uevent socket`).
    pub socket: &'static str,
    /// One message, as in "dropped a {message} not sent by the kernel" (`uevent`).
    pub message: &'static str,
    /// Logged at debug for every datagram before any check, when given, so that a count
    /// that differs from what was sent can be traced.
    pub datagram: Option<&'static str>,
    /// Whether a truncated kernel message is logged at warn (else debug).
    pub warn_truncated: bool,
    /// Whether the socket passes credentials (`SO_PASSCRED`) that must say uid 0.
    pub check_credentials: bool,
    /// Who the socket's messages must come from.
    pub sender: Sender,
}

/// Who may send what a socket accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sender {
    /// The kernel: port id 0.
    Kernel,
    /// A root process multicasting from userspace (udevd on `NETLINK_KOBJECT_UEVENT`
    /// group 2): any port id, a multicast group, credentials that say uid 0 (the socket
    /// must pass them, `check_credentials`). sd-device also takes unicasts from one
    /// trusted port; nobody is trusted so here.
    RootMulticast,
}

impl Sender {
    /// What a rejected datagram was not, for the log line.
    fn expected(self) -> &'static str {
        match self {
            Sender::Kernel => "sent by the kernel",
            Sender::RootMulticast => "multicast by root",
        }
    }
}

/// What [`KernelSocket::next`] received.
#[derive(Debug, PartialEq, Eq)]
pub enum Datagram {
    /// A datagram from the kernel: [`KernelSocket::bytes`] of this length.
    Message(usize),
    /// The kernel dropped messages (`ENOBUFS`); the count so far.
    Overflow { total: u64 },
    /// A datagram not sent by the kernel was dropped and counted (`rejected_origin`):
    /// returned so that the source can say its counter changed.
    Rejected,
}

/// Attaches a classic BPF `program` to the socket (`SO_ATTACH_FILTER`): the kernel runs
/// it on each datagram before queueing it, and drops those it returns 0 for.
pub fn attach_filter(fd: &impl AsRawFd, program: &[libc::sock_filter]) -> io::Result<()> {
    let len = u16::try_from(program.len())
        .map_err(|_| io::Error::other("a socket filter has at most 65,535 instructions"))?;
    let prog = libc::sock_fprog {
        len,
        filter: program.as_ptr().cast_mut(),
    };
    // SAFETY: `prog` points at `program`, which outlives the call; the kernel copies the
    // instructions and never writes through the pointer.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            std::ptr::from_ref(&prog).cast(),
            libc::socklen_t::try_from(std::mem::size_of::<libc::sock_fprog>())
                .unwrap_or(libc::socklen_t::MAX),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A non-blocking netlink socket the kernel multicasts to, read with the origin checks.
pub struct KernelSocket {
    fd: AsyncFd<OwnedFd>,
    buf: Vec<u8>,
    counters: Arc<Counters>,
    labels: Labels,
}

enum Received {
    Message(usize),
    /// Not sent by the kernel: dropped at the edge, counted in `rejected_origin`.
    Rejected,
    /// Truncated: dropped, counted in `malformed` (not a figure of the metrics).
    Truncated,
}

impl KernelSocket {
    /// Takes a bound, non-blocking socket; datagrams up to `buffer` bytes are whole.
    pub fn new(
        fd: OwnedFd,
        buffer: usize,
        counters: Arc<Counters>,
        labels: Labels,
    ) -> io::Result<Self> {
        // SAFETY: `register` needs the fd to stay open while registered; the AsyncFd
        // owns the OwnedFd, so it closes only when the AsyncFd is dropped.
        let fd = unsafe { AsyncFd::register(fd) }?;
        Ok(KernelSocket {
            fd,
            buf: vec![0; buffer],
            counters,
            labels,
        })
    }

    /// The socket, for its options.
    pub fn fd(&self) -> &OwnedFd {
        self.fd.get_ref()
    }

    /// The bytes of the last [`Datagram::Message`] of length `len`.
    pub fn bytes(&self, len: usize) -> &[u8] {
        &self.buf[..len.min(self.buf.len())]
    }

    /// The next datagram the kernel sent, or `None` when the socket failed for good
    /// (logged here).
    pub async fn next(&mut self) -> Option<Datagram> {
        let labels = self.labels;
        loop {
            let mut guard = match self.fd.readable().await {
                Ok(guard) => guard,
                Err(e) => {
                    tracing::error!(source = labels.source, "{} failed: {e}", labels.socket);
                    return None;
                }
            };
            let received = guard
                .try_io(|fd| recv_checked(fd.get_ref(), &mut self.buf, &self.counters, &labels));
            match received {
                Err(_would_block) => continue,
                Ok(Ok(Received::Rejected)) => return Some(Datagram::Rejected),
                Ok(Ok(Received::Truncated)) => continue,
                Ok(Ok(Received::Message(len))) => return Some(Datagram::Message(len)),
                Ok(Err(e)) if e.raw_os_error() == Some(nix::libc::ENOBUFS) => {
                    let total = self.counters.overflows.fetch_add(1, Ordering::Relaxed) + 1;
                    return Some(Datagram::Overflow { total });
                }
                Ok(Err(e)) => {
                    tracing::error!(
                        source = labels.source,
                        "reading the {} failed: {e}",
                        labels.socket
                    );
                    return None;
                }
            }
        }
    }
}

/// Receives one datagram and checks that the kernel sent it.
fn recv_checked(
    fd: &OwnedFd,
    buf: &mut [u8],
    counters: &Counters,
    labels: &Labels,
) -> io::Result<Received> {
    let mut cmsg = nix::cmsg_space!(nix::sys::socket::UnixCredentials);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = socket::recvmsg::<NetlinkAddr>(
        fd.as_raw_fd(),
        &mut iov,
        labels.check_credentials.then_some(&mut cmsg),
        MsgFlags::MSG_DONTWAIT,
    )
    .map_err(io::Error::from)?;
    let sender_port = msg.address.map(|a| a.pid());
    let multicast = msg.address.is_some_and(|a| a.groups() != 0);
    if let Some(datagram) = labels.datagram {
        tracing::debug!(
            source = labels.source,
            ?sender_port,
            len = msg.bytes,
            "{datagram}"
        );
    }
    let sender_uid = if labels.check_credentials {
        msg.cmsgs().ok().and_then(|mut cmsgs| {
            cmsgs.find_map(|c| match c {
                ControlMessageOwned::ScmCredentials(creds) => Some(creds.uid()),
                _ => None,
            })
        })
    } else {
        None
    };
    let origin_ok = match labels.sender {
        Sender::Kernel => sender_port == Some(0),
        Sender::RootMulticast => multicast && labels.check_credentials,
    };
    if !origin_ok || (labels.check_credentials && sender_uid != Some(0)) {
        reject(counters, labels, sender_port, sender_uid);
        return Ok(Received::Rejected);
    }
    if msg.flags.contains(MsgFlags::MSG_TRUNC) {
        counters.malformed.fetch_add(1, Ordering::Relaxed);
        if labels.warn_truncated {
            tracing::warn!(
                source = labels.source,
                "dropped a truncated {}",
                labels.message
            );
        } else {
            tracing::debug!(
                source = labels.source,
                "dropped a truncated {}",
                labels.message
            );
        }
        return Ok(Received::Truncated);
    }
    Ok(Received::Message(msg.bytes))
}

/// Counts and logs a datagram not sent by the kernel.
fn reject(counters: &Counters, labels: &Labels, sender_port: Option<u32>, sender_uid: Option<u32>) {
    let total = counters.rejected_origin.fetch_add(1, Ordering::Relaxed) + 1;
    let (source, message, expected) = (labels.source, labels.message, labels.sender.expected());
    match LogLimit::allow_shared(&counters.rejected_log) {
        Some(suppressed) => tracing::warn!(
            source,
            ?sender_port,
            ?sender_uid,
            rejected = total,
            "dropped a {message} not {expected} (spoofing attempt?){}",
            LogLimit::note(suppressed)
        ),
        None => tracing::debug!(
            source,
            ?sender_port,
            ?sender_uid,
            rejected = total,
            "dropped a {message} not {expected} (spoofing attempt?)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use nix::sys::socket::{sockopt, AddressFamily, SockFlag, SockProtocol, SockType};

    use super::*;

    const ROOT_MULTICAST: Labels = Labels {
        source: "test",
        socket: "test socket",
        message: "test message",
        datagram: None,
        warn_truncated: false,
        check_credentials: true,
        sender: Sender::RootMulticast,
    };

    fn uevent_socket(flags: SockFlag, groups: u32) -> OwnedFd {
        let fd = socket::socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC | flags,
            SockProtocol::NetlinkKObjectUEvent,
        )
        .expect("uevent socket");
        socket::bind(fd.as_raw_fd(), &NetlinkAddr::new(0, groups)).expect("bind");
        fd
    }

    /// udev's group as sd-device reads it: root's multicast is taken, a unicast to our
    /// port refused and counted even from root (no sender is trusted with unicasts).
    /// Needs root (as the suite does): only root may send on this protocol. Nothing on
    /// this host listens to group 2 (no udevd), so the multicast disturbs no one.
    #[tokio::test]
    async fn on_udevs_group_root_multicast_is_taken_and_a_unicast_refused() {
        let receiver = uevent_socket(SockFlag::SOCK_NONBLOCK, 2);
        socket::setsockopt(&receiver, sockopt::PassCred, &true).expect("SO_PASSCRED");
        let port = socket::getsockname::<NetlinkAddr>(receiver.as_raw_fd())
            .expect("getsockname")
            .pid();
        let counters = Arc::new(Counters::default());
        let mut socket =
            KernelSocket::new(receiver, 4096, Arc::clone(&counters), ROOT_MULTICAST).unwrap();
        let sender = uevent_socket(SockFlag::empty(), 0);
        for (payload, to) in [
            (&b"unicast"[..], NetlinkAddr::new(port, 0)),
            (&b"libudev\0multicast"[..], NetlinkAddr::new(0, 2)),
        ] {
            socket::sendto(sender.as_raw_fd(), payload, &to, MsgFlags::empty()).expect("send");
        }
        assert_eq!(socket.next().await, Some(Datagram::Rejected));
        assert_eq!(counters.rejected_origin.load(Ordering::Relaxed), 1);
        let Some(Datagram::Message(len)) = socket.next().await else {
            panic!("root's multicast was not taken");
        };
        assert_eq!(socket.bytes(len), b"libudev\0multicast");
        assert_eq!(counters.rejected_origin.load(Ordering::Relaxed), 1);
    }
}
