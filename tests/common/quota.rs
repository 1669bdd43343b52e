//! Quota test helpers: the `VFS_DQUOT` generic netlink family seen from a test (a witness
//! that listens like any process may, a forger that multicasts like root may), and
//! `watchqctl monitor --json` run as another user, which is how a user's subscription
//! is observed from outside its process.
//!
//! Include with `#[path = "common/quota.rs"] mod quota;` next to `mod common;`.
#![allow(dead_code)]

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use nix::libc;
use nix::sys::socket::{
    self, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType,
};
use nix::sys::time::TimeVal;
use serde_json::Value;

use watchqd::source::quota::wire::{self, Family, Warning};

fn genl_socket() -> OwnedFd {
    let fd = socket::socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkGeneric,
    )
    .expect("socket(NETLINK_GENERIC)");
    socket::bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0)).expect("bind generic netlink");
    socket::setsockopt(&fd, sockopt::ReceiveTimeout, &TimeVal::new(1, 0)).expect("SO_RCVTIMEO");
    fd
}

/// The `VFS_DQUOT` family and the id of its `events` group, asked of the controller.
pub fn resolve() -> (Family, u32) {
    let fd = genl_socket();
    socket::sendto(
        fd.as_raw_fd(),
        &wire::get_family_request(wire::QUOTA_FAMILY, 7),
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )
    .expect("send CTRL_CMD_GETFAMILY");
    let mut buf = vec![0u8; 8192];
    let (n, _) =
        socket::recvfrom::<NetlinkAddr>(fd.as_raw_fd(), &mut buf).expect("the controller's answer");
    let message = wire::messages(&buf[..n])
        .next()
        .expect("one message")
        .expect("well-formed answer");
    let family = wire::parse_family_reply(&message)
        .expect("VFS_DQUOT resolves (CONFIG_QUOTA_NETLINK_INTERFACE)");
    let group = family.group(wire::QUOTA_GROUP).expect("the events group");
    (family, group)
}

/// A socket in the `events` group: receives what every listener receives.
pub struct Witness(OwnedFd);

impl Witness {
    pub fn join(group: u32) -> Witness {
        let fd = genl_socket();
        // SAFETY: the option value points to a live u32 of the size given.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                270, // SOL_NETLINK
                1,   // NETLINK_ADD_MEMBERSHIP
                (&raw const group).cast(),
                4,
            )
        };
        assert_eq!(
            rc,
            0,
            "NETLINK_ADD_MEMBERSHIP: {}",
            std::io::Error::last_os_error()
        );
        Witness(fd)
    }

    /// The next datagram and its sender's port id, or `None` after a second.
    pub fn receive(&self) -> Option<(Vec<u8>, u32)> {
        let mut buf = vec![0u8; 8192];
        match socket::recvfrom::<NetlinkAddr>(self.0.as_raw_fd(), &mut buf) {
            Ok((n, from)) => {
                buf.truncate(n);
                Some((buf, from.map_or(u32::MAX, |a| a.pid())))
            }
            Err(nix::errno::Errno::EAGAIN) => None,
            Err(e) => panic!("witness recv: {e}"),
        }
    }
}

/// Multicasts `datagram` to `group` from a userspace socket, as root in the initial
/// network namespace may (the destination is a bitmap of the first 32 groups).
pub fn forge(group: u32, datagram: &[u8]) {
    assert!(
        (1..=32).contains(&group),
        "the events group has id {group}: a sockaddr_nl can only address groups 1-32, so \
         this kernel cannot be sent forged quota warnings this way"
    );
    let fd = genl_socket();
    socket::sendto(
        fd.as_raw_fd(),
        datagram,
        &NetlinkAddr::new(0, 1 << (group - 1)),
        MsgFlags::empty(),
    )
    .expect("multicast a forged quota message (needs CAP_NET_ADMIN)");
}

/// A forged warning in the kernel's exact layout.
pub fn forged_warning(family: u16, warning: &Warning) -> Vec<u8> {
    wire::encode_warning(family, 1, warning)
}

/// `watchqctl monitor --json SOURCES…` as `uid`, its lines collected.
pub struct Monitor {
    child: Child,
    lines: Receiver<Line>,
    pub signals: Vec<Value>,
    pub stderr: String,
}

enum Line {
    Out(String),
    Err(String),
}

impl Monitor {
    /// Starts the monitor; returns once it watches, or with its error output if it
    /// exited (a refused watch).
    pub fn start(address: &str, uid: u32, gid: u32, args: &[&str]) -> Result<Monitor, String> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_watchqctl"))
            .args(["--address", address, "monitor", "--json"])
            .args(args)
            .uid(uid)
            .gid(gid)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start watchqctl");
        let (tx, lines) = channel();
        let out = child.stdout.take().expect("stdout");
        let err = child.stderr.take().expect("stderr");
        crate::common::lines::forward(out, tx.clone(), Line::Out);
        crate::common::lines::forward(err, tx, Line::Err);
        let mut monitor = Monitor {
            child,
            lines,
            signals: Vec::new(),
            stderr: String::new(),
        };
        let deadline = Instant::now() + crate::common::TIMEOUT;
        loop {
            // Its readiness line; an error names what it could not watch differently.
            if monitor.stderr.lines().any(|l| l.starts_with("watching ")) {
                return Ok(monitor);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match monitor
                .lines
                .recv_timeout(left.min(Duration::from_millis(200)))
            {
                Ok(line) => monitor.take(line),
                Err(_) => {
                    if let Ok(Some(status)) = monitor.child.try_wait() {
                        // Collect what is left of its error output.
                        while let Ok(line) = monitor.lines.recv_timeout(Duration::from_millis(200))
                        {
                            monitor.take(line);
                        }
                        return Err(format!("watchqctl exited ({status}): {}", monitor.stderr));
                    }
                    assert!(
                        Instant::now() < deadline,
                        "watchqctl did not start watching: {}",
                        monitor.stderr
                    );
                }
            }
        }
    }

    fn take(&mut self, line: Line) {
        match line {
            Line::Out(text) => self
                .signals
                .push(serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))),
            Line::Err(text) => {
                self.stderr.push_str(&text);
                self.stderr.push('\n');
            }
        }
    }

    /// Collects lines for `wait`.
    pub fn drain(&mut self, wait: Duration) {
        let deadline = Instant::now() + wait;
        while let Ok(line) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.take(line);
        }
    }

    /// Waits until a signal satisfies `pred`, failing after [`crate::common::TIMEOUT`].
    pub fn until(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + crate::common::TIMEOUT;
        loop {
            if let Some(found) = self.signals.iter().find(|s| pred(s)) {
                return found.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.take(line),
                Err(_) => panic!(
                    "no {what} within {:?}; signals: {:?}; stderr: {}",
                    crate::common::TIMEOUT,
                    self.signals,
                    self.stderr
                ),
            }
        }
    }

    pub fn quota_warnings(&self) -> Vec<&Value> {
        self.signals
            .iter()
            .filter(|s| s["signal"] == "QuotaWarning")
            .collect()
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
