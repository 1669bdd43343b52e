//! The daemon as `watchqd.socket` starts it: netlink sockets opened by someone else (systemd,
//! in the host's network namespace) and passed as descriptors 3 and 4. Here the test opens
//! them, exactly as systemd's `ListenNetlink=` does, and checks that the daemon reads
//! events from those and opens none of its own.

mod common;

use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use common::*;
use nix::sys::socket::{
    self, sockopt, AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType,
};
use watchqd::client::ManagerProxy;
use zbus::Variant;

const UEVENT: u32 = 15;
const GENERIC: u32 = 16;

/// What systemd does for `ListenNetlink=<family> <group>` with `ReceiveBuffer=`.
fn listen_netlink(protocol: SockProtocol, group: u32) -> OwnedFd {
    let fd = socket::socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        protocol,
    )
    .expect("netlink socket");
    socket::setsockopt(&fd, sockopt::RcvBufForce, &(16 << 20)).expect("SO_RCVBUFFORCE");
    socket::setsockopt(&fd, sockopt::PassCred, &true).expect("SO_PASSCRED");
    socket::bind(fd.as_raw_fd(), &NetlinkAddr::new(0, group)).expect("bind");
    fd
}

fn inode(fd: &OwnedFd) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .expect("socket inode")
        .ino()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passed_netlink_sockets_are_the_only_ones_used_and_survive_the_source_closing() {
    // As watchqd.socket has it: the kernel's uevent group, udev's, and generic netlink.
    let uevent = listen_netlink(SockProtocol::NetlinkKObjectUEvent, 1);
    let udev = listen_netlink(SockProtocol::NetlinkKObjectUEvent, 2);
    let generic = listen_netlink(SockProtocol::NetlinkGeneric, 0);
    let (uevent_inode, udev_inode, generic_inode) = (inode(&uevent), inode(&udev), inode(&generic));
    let daemon = Daemon::with_passed_sockets("", vec![uevent, udev, generic]);
    assert!(
        daemon.log_text().contains("passed by systemd"),
        "the daemon did not say it uses the passed sockets:\n{}",
        daemon.log_text()
    );

    // Both sources report themselves available without opening anything.
    let manager = ManagerProxy::new(&daemon.connect().await).await.unwrap();
    let sources = manager.sources().await.unwrap();
    for name in ["devices", "quota"] {
        let source = sources.iter().find(|s| s.name == name).expect(name);
        assert!(source.available, "{name}: {}", source.reason);
    }
    // No udevd on this host: the kernel's group, whose socket was passed too.
    let devices = sources
        .iter()
        .find(|s| s.name == "devices")
        .expect("devices");
    assert!(
        devices.reason.starts_with("kernel: no udevd"),
        "{}",
        devices.reason
    );

    // Events from before anyone watched are stale: a device attached now must not come
    // back as news to the first watcher.
    let stale = LoopDevice::attach(4);
    std::thread::sleep(Duration::from_millis(300));

    for round in 0..2 {
        let mut sub = Subscriber::new(&daemon).await;
        sub.watch("devices", 1, &[("subsystem", Variant::from("block"))])
            .await;
        sub.watch("quota", 2, &[("scope", Variant::from("system"))])
            .await;
        assert_eq!(
            daemon.netlink_socket_inodes(UEVENT),
            [uevent_inode, udev_inode].into(),
            "round {round}: the daemon must read uevents from the passed sockets only"
        );
        assert_eq!(
            daemon.netlink_socket_inodes(GENERIC),
            [generic_inode].into(),
            "round {round}: quota must use the passed generic netlink socket only"
        );

        let disk = LoopDevice::attach(8);
        let path = disk.sys_path();
        sub.until("the loop device's events", |s| {
            s.iter().any(|e| {
                matches!(e, Signal::Device { sys_path, .. } if *sys_path == path)
                    && e.attr_u64("size") == Some(8 << 20)
            })
        })
        .await;
        let stale_path = stale.sys_path();
        assert!(
            sub.about(&stale_path).next().is_none(),
            "round {round}: an event queued before the watch was delivered: {:?}",
            sub.about(&stale_path).next()
        );
        assert_contiguous(&sub.received);
        // The last watch goes: the sources close, the passed sockets stay for next time.
        drop(sub);
        // Each round stops both sources once: the wait fails if they do not.
        let start = std::time::Instant::now();
        loop {
            let log = daemon.log_text();
            let stopped = |source: &str| {
                log.lines()
                    .filter(|l| {
                        l.contains("source stopped") && l.contains(&format!("source=\"{source}\""))
                    })
                    .count()
            };
            let counts = (stopped("devices"), stopped("quota"));
            if counts == (round + 1, round + 1) {
                break;
            }
            assert!(
                counts.0 <= round + 1 && counts.1 <= round + 1 && start.elapsed() < TIMEOUT,
                "round {round}: after {:?}, 'source stopped' for devices {} and quota {} \
                 times, expected {} each:\n{log}",
                start.elapsed(),
                counts.0,
                counts.1,
                round + 1
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(
            daemon.netlink_socket_inodes(UEVENT),
            [uevent_inode, udev_inode].into(),
            "round {round}: the passed sockets were closed with the source"
        );
        stale.synth_change();
    }
}

#[test]
fn a_passed_descriptor_that_is_not_a_netlink_socket_is_a_configuration_error() {
    let (read, _write) = nix::unistd::pipe().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("watchqd.toml");
    std::fs::write(&config, "").unwrap();
    let out = daemon_command(vec![read])
        .arg("--config")
        .arg(&config)
        .env("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/nonexistent")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("descriptor 3 is not a netlink socket"),
        "{stderr}"
    );
}
