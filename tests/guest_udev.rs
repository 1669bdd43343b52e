//! Devices as udev finished them: the full-OS guest (systemd and systemd-udevd running)
//! runs this build's daemon on a private bus; its `devices` source follows udev's
//! monitor group. One boot covers every step (TCG boots cost seconds of CPU):
//!
//! - `Sources` says the source follows udev, and why;
//! - a snapshot's block devices carry what udev's database holds of them, as
//!   `udevadm info` shows it;
//! - a udev-format message multicast to group 2 by a non-root process (uid 1000 holding
//!   `CAP_NET_ADMIN`, which sending on this protocol needs) and one unicast by root to the
//!   daemon's port are rejected, counted, and reach no subscriber; one multicast by root
//!   is taken: the trust boundary sd-device uses (root can forge as udevd itself does);
//! - udevd stopped, then started again, under the subscription: each switch between
//!   udev's group and the kernel's is a `Lost(kernel-overflow)` with a rescan, `Sources`
//!   follows, and the events after it are the kernel's, then udev's again (this runs
//!   last, after the stick below);
//! - a `[[units]]` rule on `ID_FS_TYPE=ext4`, in a second daemon on the guest's own
//!   system bus, makes systemd start its unit for an ext4 stick and not for an ext2 one
//!   plugged before it (this runs last);
//! - a USB stick holding ext4, hot-plugged through QMP, arrives with `ID_SERIAL`,
//!   `ID_FS_TYPE` and a `/dev/disk/by-id/` link in `DEVLINKS`, which the subscriber opens
//!   the moment it receives the event; the same events, compared with what
//!   `udevadm monitor --udev --property` printed beside it.
//!
//! The guest's root is Debian's, not the host's: the test stages this build (binaries,
//! this test binary, the bus configuration) in the shared directory and links it at the
//! checkout's path in the guest, so that the harness finds everything where it was built.
//! Run with: `cargo test --test guest_udev` (as root, after `tests/vm/setup-host`).

mod common;
#[path = "common/vm.rs"]
mod vm;

use std::fs;
use std::path::Path;
use std::time::Duration;

use serde_json::json;

const STEP: Duration = Duration::from_secs(180);

#[test]
fn usb_storage_arrives_as_udev_finished_it_and_forgeries_do_not() {
    let guest = vm::Guest::boot(&vm::BootOptions::new().os().hotplug())
        .unwrap_or_else(|e| panic!("booting the full-OS guest: {e}"));
    stage_build(&guest);
    let inside = guest
        .spawn_inside("udev_events")
        .unwrap_or_else(|e| panic!("starting the in-guest test: {e}"));
    let wait = |what: &str| {
        inside
            .wait_for_stdout(what, STEP)
            .unwrap_or_else(|e| panic!("waiting for '{what}' in the guest: {e}"));
    };
    wait("READY");

    // A stick holding an ext4 filesystem (no partition table: udev's blkid finds it on
    // the disk itself).
    plug_stick(&guest, "ext4", 0);
    wait("SEEN usb-disk");

    // Two more sticks for the [[units]] rule: ext2 first, then ext4 once the guest saw the
    // first (so that the rule had its chance at ext2 before ext4's unit starts).
    wait("READY units");
    plug_stick(&guest, "ext2", 2);
    wait("SEEN ext2");
    plug_stick(&guest, "ext4", 3);
    let out = inside
        .wait(STEP)
        .unwrap_or_else(|e| panic!("the in-guest test: {e}"));
    out.assert_inside_passed();
    guest.shutdown().expect("guest shutdown");
}

/// Hot-plugs USB stick number `n` holding a filesystem of `fs_type` labelled
/// `watchqstick` (`mkfs.<fs_type>` from e2fsprogs on the host).
fn plug_stick(guest: &vm::Guest, fs_type: &str, n: u32) {
    let image = guest.dir().join(format!("stick{n}.img"));
    fs::write(&image, vec![0u8; 16 << 20]).expect("create the usb-storage image");
    let mkfs = std::process::Command::new(format!("mkfs.{fs_type}"))
        .args(["-q", "-F", "-L", "watchqstick"])
        .arg(&image)
        .status()
        .unwrap_or_else(|e| panic!("mkfs.{fs_type} (e2fsprogs): {e}"));
    assert!(mkfs.success(), "mkfs.{fs_type}: {mkfs}");
    let node = format!("stick{n}");
    for (name, args) in [
        ("blockdev-add", vm::raw_blockdev(&node, &image)),
        (
            "device_add",
            json!({"driver": "usb-storage", "bus": "xhci.0", "drive": node, "id": format!("{node}dev")}),
        ),
    ] {
        guest
            .qmp_execute(name, &args)
            .unwrap_or_else(|e| panic!("QMP {name} {args}: {e}"));
    }
}

/// Puts this build where the harness looks for it, in a guest whose root is not the
/// host's: the binaries, this test binary and the files the private bus is made from,
/// hard-linked (or copied) into the shared directory, which the guest links at the
/// checkout's own path.
fn stage_build(guest: &vm::Guest) {
    let repo = common::repo();
    let stage = guest.dir().join("checkout");
    let this_test = std::env::current_exe().expect("current_exe");
    let files = [
        Path::new(env!("CARGO_BIN_EXE_watchqd")),
        Path::new(env!("CARGO_BIN_EXE_watchqctl")),
        this_test.as_path(),
        &repo.join("dbus/org.watchq1.conf"),
        &repo.join("packaging/dev/system-bus.conf.in"),
    ];
    for file in files {
        let relative = file
            .strip_prefix(&repo)
            .unwrap_or_else(|_| panic!("{} is outside the checkout", file.display()));
        let to = stage.join(relative);
        fs::create_dir_all(to.parent().expect("a parent")).expect("mkdir in the stage");
        if fs::hard_link(file, &to).is_err() {
            fs::copy(file, &to)
                .unwrap_or_else(|e| panic!("copy {} to the guest: {e}", file.display()));
        }
    }
    let link = format!(
        "mkdir -p '{parent}' && ln -sfn '{stage}' '{repo}'",
        parent = repo.parent().expect("the checkout's parent").display(),
        stage = stage.display(),
        repo = repo.display(),
    );
    let out = guest
        .run(&["sh", "-c", &link])
        .unwrap_or_else(|e| panic!("linking the build in the guest: {e}"));
    assert!(out.success(), "{out}");
}

mod inside {
    use std::collections::BTreeMap;
    use std::io::{BufRead, BufReader};
    use std::os::fd::AsRawFd;
    use std::process::{Command, Stdio};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use nix::sys::socket::{self, MsgFlags, NetlinkAddr};
    use watchqd::source::devices::udev_wire::string_hash32;
    use zbus::Variant;

    use super::common::sources::{counter, source_info};
    use super::common::*;
    use super::vm;

    /// What the non-root forger multicasts, and what root unicasts to the daemon.
    const FORGED_BY_USER: &str = "/devices/virtual/block/forged-by-user0";
    const FORGED_UNICAST: &str = "/devices/virtual/block/forged-unicast0";
    /// Multicast by root: taken, as sd-device takes it.
    const SENT_BY_ROOT: &str = "/devices/virtual/block/sent-by-root0";

    /// A udev monitor message as udevd builds it, for a block disk at `devpath`.
    fn udev_message(devpath: &str) -> Vec<u8> {
        let name = devpath.rsplit('/').next().unwrap_or("forged");
        let properties = format!(
            "ACTION=add\0DEVPATH={devpath}\0SUBSYSTEM=block\0DEVNAME=/dev/{name}\0\
             DEVTYPE=disk\0SEQNUM=1\0USEC_INITIALIZED=1\0ID_FS_TYPE=ext4\0"
        );
        let mut buf = Vec::new();
        buf.extend_from_slice(b"libudev\0");
        buf.extend_from_slice(&0xfeed_cafe_u32.to_be_bytes());
        buf.extend_from_slice(&40u32.to_ne_bytes());
        buf.extend_from_slice(&40u32.to_ne_bytes());
        buf.extend_from_slice(&u32::try_from(properties.len()).unwrap().to_ne_bytes());
        buf.extend_from_slice(&string_hash32("block").to_be_bytes());
        buf.extend_from_slice(&string_hash32("disk").to_be_bytes());
        buf.extend_from_slice(&[0; 8]);
        buf.extend_from_slice(properties.as_bytes());
        buf
    }

    fn send(message: &[u8], to: &NetlinkAddr) {
        let forger = uevent_socket(0);
        socket::sendto(forger.as_raw_fd(), message, to, MsgFlags::empty())
            .unwrap_or_else(|e| panic!("sending a udev-format message to {to}: {e}"));
    }

    /// The non-root forger: started by `udev_events` under `setpriv` as uid 1000 with
    /// `CAP_NET_ADMIN` (the kernel lets no one else send on this protocol).
    #[test]
    #[ignore = "runs inside the test guest, started by udev_events"]
    fn forge_as_user() {
        vm::require_guest();
        assert_ne!(
            nix::unistd::getuid().as_raw(),
            0,
            "the forger must not be root"
        );
        send(&udev_message(FORGED_BY_USER), &NetlinkAddr::new(0, 2));
        println!("FORGED");
    }

    /// The netlink port of the daemon's socket on udev's group (`/proc/net/netlink`:
    /// sk, protocol, port id, groups, …, inode).
    fn daemon_port(daemon: &Daemon) -> u32 {
        let inodes = daemon.netlink_socket_inodes(15);
        let table = std::fs::read_to_string("/proc/net/netlink").expect("/proc/net/netlink");
        table
            .lines()
            .skip(1)
            .find_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let inode: u64 = fields.last()?.parse().ok()?;
                (fields.get(1) == Some(&"15")
                    && fields.get(3) == Some(&"00000002")
                    && inodes.contains(&inode))
                .then(|| fields.get(2)?.parse().ok())?
            })
            .unwrap_or_else(|| panic!("no group-2 socket of the daemon in:\n{table}"))
    }

    /// `udevadm monitor --udev --property` output, split into events: property maps.
    fn monitor_events(text: &str) -> Vec<BTreeMap<String, String>> {
        text.split("\n\n")
            .filter(|block| block.starts_with("UDEV"))
            .map(|block| {
                block
                    .lines()
                    .skip(1)
                    .filter_map(|l| l.split_once('='))
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect()
            })
            .collect()
    }

    #[test]
    #[ignore = "runs inside the test guest, started by the host test"]
    fn udev_events() {
        vm::enter_guest();
        vm::block_on(async {
            assert!(
                std::path::Path::new("/run/udev/control").exists(),
                "udevd does not run in the full-OS guest"
            );
            let daemon = Daemon::start();
            let mut sub = Subscriber::new(&daemon).await;
            let devices = source_info(&sub.conn, "devices").await;
            assert!(
                devices.available
                    && devices
                        .reason
                        .starts_with("udev: /run/udev/control present"),
                "Sources does not say the source follows udev: {devices:?}"
            );
            sub.watch("devices", 1, &[("subsystem", Variant::from("block"))])
                .await;

            // The socket filter: what udevd multicasts for a subsystem the source does not
            // follow (`mem`: null, zero, random, …) is dropped in the kernel and never
            // received; a block device's change after it is, alone. The socket's queue is
            // in order: once that change arrived, the mem messages would have been read.
            let manager = watchqd::client::ManagerProxy::builder(&sub.conn)
                .build()
                .await
                .expect("manager proxy");
            let received = || counter(&manager, "devices", "messages-received");
            let mem = std::fs::read_dir("/sys/class/mem").map_or(0, Iterator::count);
            assert!(mem > 0, "no mem devices to trigger");
            let before = received().await;
            let trigger = |args: &[&str]| {
                let out = Command::new("udevadm")
                    .args(["trigger", "--action=change", "--settle"])
                    .args(args)
                    .output()
                    .expect("udevadm trigger");
                assert!(out.status.success(), "udevadm trigger {args:?}: {out:?}");
            };
            trigger(&["--subsystem-match=mem"]);
            let mut blocks: Vec<String> = std::fs::read_dir("/sys/class/block")
                .expect("/sys/class/block")
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect();
            blocks.sort();
            let sentinel = blocks.first().expect("a block device").clone();
            trigger(&[&format!("/sys/class/block/{sentinel}")]);
            sub.until("the sentinel's change", |s| {
                s.iter().any(|e| {
                    matches!(e, Signal::Device { sys_path, properties, .. }
                        if sys_path.ends_with(&format!("/{sentinel}"))
                            && properties.get("ACTION").map(String::as_str) == Some("change"))
                })
            })
            .await;
            assert_eq!(
                received().await,
                before + 1,
                "after {mem} mem devices' changes and {sentinel}'s, only {sentinel}'s was received"
            );

            // udevadm's own view, beside the subscriber.
            // stdbuf: a line at a time, though its stdout is a pipe.
            let mut monitor = Command::new("stdbuf")
                .args([
                    "-oL",
                    "udevadm",
                    "monitor",
                    "--udev",
                    "--property",
                    "--subsystem-match=block",
                ])
                .stdout(Stdio::piped())
                .spawn()
                .expect("udevadm monitor");
            let printed = Arc::new(Mutex::new(String::new()));
            {
                let printed = Arc::clone(&printed);
                let stdout = monitor.stdout.take().expect("udevadm's stdout");
                std::thread::spawn(move || {
                    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                        let mut text = printed.lock().unwrap();
                        text.push_str(&line);
                        text.push('\n');
                    }
                });
            }

            let deadline = Instant::now() + Duration::from_secs(60);
            while !printed.lock().unwrap().contains("UDEV - the event") {
                assert!(Instant::now() < deadline, "udevadm monitor did not start");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }

            // Forgeries: by uid 1000 with CAP_NET_ADMIN, multicast; by root, unicast to
            // the daemon's port. Then root's multicast, which is taken.
            let exe = std::env::current_exe().expect("current_exe");
            let forger = Command::new("setpriv")
                .args([
                    "--reuid=1000",
                    "--regid=1000",
                    "--clear-groups",
                    "--inh-caps=+net_admin",
                    "--ambient-caps=+net_admin",
                ])
                .arg(&exe)
                .args([
                    "--ignored",
                    "--exact",
                    "inside::forge_as_user",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env("WATCHQD_VM_GUEST", "1")
                .output()
                .expect("setpriv (util-linux)");
            let said = String::from_utf8_lossy(&forger.stdout);
            assert!(
                forger.status.success() && said.contains("FORGED"),
                "the non-root forger failed: {said}\n{}",
                String::from_utf8_lossy(&forger.stderr)
            );
            send(
                &udev_message(FORGED_UNICAST),
                &NetlinkAddr::new(daemon_port(&daemon), 0),
            );
            send(&udev_message(SENT_BY_ROOT), &NetlinkAddr::new(0, 2));
            sub.until("root's multicast", |s| {
                s.iter().any(
                    |e| matches!(e, Signal::Device { sys_path, .. } if sys_path == SENT_BY_ROOT),
                )
            })
            .await;
            // Messages from one socket's queue come in order: had the forgeries been
            // taken, they would have come before root's.
            for forged in [FORGED_BY_USER, FORGED_UNICAST] {
                assert!(sub.about(forged).next().is_none(), "{forged} was delivered");
            }
            let log = daemon.log_text();
            let rejected = log
                .lines()
                .rfind(|l| l.contains("dropped a udev message not multicast by root"))
                .and_then(|l| {
                    l.split_once("rejected=")?
                        .1
                        .split_whitespace()
                        .next()?
                        .parse::<u32>()
                        .ok()
                });
            assert_eq!(
                rejected,
                Some(2),
                "both forgeries rejected and counted:\n{log}"
            );

            // The devices present before the source opened, from the snapshot: what udev
            // recorded of each (its database), as `udevadm info` reads it too.
            let (_, objects) = sub.proxy.snapshot("devices").await.expect("Snapshot");
            let mut with_links = 0;
            for (id, _, _, properties) in objects
                .iter()
                .filter(|(_, _, _, p)| p.get("SUBSYSTEM").map(String::as_str) == Some("block"))
            {
                let info = Command::new("udevadm")
                    .args(["info", "--query=property", "--path"])
                    .arg(id)
                    .output()
                    .expect("udevadm info");
                let udev: BTreeMap<String, String> = String::from_utf8_lossy(&info.stdout)
                    .lines()
                    .filter_map(|l| l.split_once('='))
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect();
                for (key, value) in &udev {
                    if key.starts_with("ID_") || key == "DEVNAME" || key == "USEC_INITIALIZED" {
                        assert_eq!(
                            properties.get(key),
                            Some(value),
                            "{key} of {}: the snapshot and udevadm info disagree",
                            id
                        );
                    }
                }
                if let Some(links) = udev.get("DEVLINKS") {
                    with_links += 1;
                    let set = |v: Option<&String>| {
                        let mut items: Vec<String> = v
                            .map(|v| v.split(' ').map(str::to_owned).collect())
                            .unwrap_or_default();
                        items.sort_unstable();
                        items
                    };
                    assert_eq!(
                        set(properties.get("DEVLINKS")),
                        set(Some(links)),
                        "DEVLINKS of {}",
                        id
                    );
                }
            }
            assert!(
                with_links > 0,
                "no block device with udev links in the snapshot: {objects:?}"
            );

            // The host plugs the stick now.
            println!("READY");
            let start = Instant::now();
            let is_stick = |e: &Signal| {
                matches!(e, Signal::Device { action, properties, .. }
                    if action == "add"
                        && properties.get("ID_BUS").map(String::as_str) == Some("usb")
                        && properties.get("DEVTYPE").map(String::as_str) == Some("disk"))
            };
            sub.until("the stick as udev finished it", |s| s.iter().any(is_stick))
                .await;
            let event = sub
                .received
                .iter()
                .find(|e| is_stick(e))
                .cloned()
                .expect("until() saw it");
            let Signal::Device {
                sys_path,
                properties,
                ..
            } = &event
            else {
                unreachable!("is_stick matches device events only");
            };
            let (sys_path, properties) = (sys_path.clone(), properties.clone());
            // On receipt: the link udev made is there.
            let devlinks = properties.get("DEVLINKS").cloned().unwrap_or_default();
            let by_id = devlinks
                .split(' ')
                .find(|l| l.starts_with("/dev/disk/by-id/usb-"))
                .unwrap_or_else(|| panic!("no by-id link in DEVLINKS: {properties:?}"))
                .to_owned();
            let opened = std::fs::File::open(&by_id);
            println!(
                "SEEN usb-disk {sys_path} after {:.1} s; {by_id}: {opened:?}",
                start.elapsed().as_secs_f64()
            );
            assert!(
                opened.is_ok(),
                "{by_id} could not be opened on receipt: {opened:?}"
            );
            assert_eq!(
                properties.get("ID_FS_TYPE").map(String::as_str),
                Some("ext4"),
                "{properties:?}"
            );
            assert_eq!(
                properties.get("ID_FS_LABEL").map(String::as_str),
                Some("watchqstick"),
                "{properties:?}"
            );
            assert!(
                properties.get("ID_SERIAL").is_some_and(|s| !s.is_empty()),
                "{properties:?}"
            );
            let devname = properties.get("DEVNAME").cloned().unwrap_or_default();
            assert!(devname.starts_with("/dev/sd"), "{properties:?}");
            assert_eq!(
                event.attr_str("devname"),
                Some(devname.clone()),
                "the devname attribute is the node's path once"
            );

            // udevadm printed the same events, property for property.
            let deadline = Instant::now() + Duration::from_secs(60);
            let printed = loop {
                let text = printed.lock().unwrap().clone();
                if text.contains(&format!("DEVPATH={sys_path}\n")) || Instant::now() > deadline {
                    break text;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            let _ = monitor.kill();
            let _ = monitor.wait();
            println!("udevadm monitor --udev --property:\n{printed}");
            let seen = monitor_events(&printed);
            let stick = seen
                .iter()
                .find(|e| {
                    e.get("DEVPATH") == Some(&sys_path)
                        && e.get("ACTION").map(String::as_str) == Some("add")
                })
                .unwrap_or_else(|| panic!("udevadm did not print the add of {sys_path}"));
            for key in [
                "ACTION",
                "DEVPATH",
                "SEQNUM",
                "ID_SERIAL",
                "ID_FS_TYPE",
                "ID_FS_UUID",
                "ID_FS_LABEL",
                "ID_PATH",
                "DEVLINKS",
                "TAGS",
                "CURRENT_TAGS",
                "DEVNAME",
            ] {
                // Links and tags are sets: udevadm lists them in its own hash order, the
                // daemon passes udevd's string on.
                let separator = if key == "DEVLINKS" { ' ' } else { ':' };
                let set = |value: Option<&String>| {
                    let mut items: Vec<String> = value
                        .map(|v| {
                            v.split(separator)
                                .filter(|i| !i.is_empty())
                                .map(str::to_owned)
                                .collect()
                        })
                        .unwrap_or_default();
                    items.sort_unstable();
                    (value.is_some(), items)
                };
                assert_eq!(
                    set(properties.get(key)),
                    set(stick.get(key)),
                    "{key}: udevadm and the subscriber disagree"
                );
            }
            // Every block event udevadm printed reached the subscriber, in its order.
            let received: Vec<(String, String)> = sub
                .received
                .iter()
                .filter_map(|e| match e {
                    Signal::Device { properties, .. } => Some((
                        properties.get("SEQNUM")?.clone(),
                        properties.get("DEVPATH")?.clone(),
                    )),
                    _ => None,
                })
                .collect();
            // Up to the stick's add: what udevd sent after it may still be on its way.
            let printed: Vec<(String, String)> = seen
                .iter()
                .take_while(|e| !std::ptr::eq(*e, stick))
                .chain([stick])
                .filter_map(|e| Some((e.get("SEQNUM")?.clone(), e.get("DEVPATH")?.clone())))
                .collect();
            let position = |p: &(String, String)| received.iter().position(|r| r == p);
            let positions: Vec<Option<usize>> = printed.iter().map(position).collect();
            assert!(
                positions.iter().all(Option::is_some) && positions.windows(2).all(|w| w[0] < w[1]),
                "udevadm printed {printed:?}; the subscriber received {received:?}"
            );

            // udevd stopped, then started, under the running subscription: each switch of
            // group is a loss with a rescan, never silent, and Sources follows.
            let losses = |s: &[Signal]| {
                s.iter()
                    .filter(|e| {
                        matches!(e, Signal::Lost { source, reason, .. }
                            if source == "devices" && reason == "kernel-overflow")
                    })
                    .count()
            };
            let sda = sys_path.clone();
            let changes_of_sda = |s: &[Signal], udev: bool| {
                s.iter()
                    .filter(|e| {
                        matches!(e, Signal::Device { sys_path, properties, .. }
                            if *sys_path == sda
                                && properties.get("ACTION").map(String::as_str) == Some("change")
                                && properties.contains_key("USEC_INITIALIZED") == udev)
                    })
                    .count()
            };
            let before = losses(&sub.received);
            systemctl(&[
                "stop",
                "systemd-udevd.service",
                "systemd-udevd-control.socket",
                "systemd-udevd-kernel.socket",
            ]);
            sub.until("a loss when udevd stopped", |s| losses(s) > before)
                .await;
            let devices = source_info(&sub.conn, "devices").await;
            assert!(
                devices
                    .reason
                    .starts_with("kernel: no udevd (/run/udev/control absent)"),
                "Sources after udevd stopped: {devices:?}"
            );
            let uevent = format!("/sys{sys_path}/uevent");
            std::fs::write(&uevent, "change").expect("synthesize a change");
            sub.until("the kernel's change, without udev", |s| {
                changes_of_sda(s, false) > 0
            })
            .await;

            systemctl(&["start", "systemd-udevd.service"]);
            sub.until("a loss when udevd started", |s| losses(s) > before + 1)
                .await;
            let devices = source_info(&sub.conn, "devices").await;
            assert!(
                devices
                    .reason
                    .starts_with("udev: /run/udev/control present"),
                "Sources after udevd started: {devices:?}"
            );
            let udev_changes = changes_of_sda(&sub.received, true);
            std::fs::write(&uevent, "change").expect("synthesize a change");
            sub.until("udev's change", |s| changes_of_sda(s, true) > udev_changes)
                .await;
            println!("SWITCHED kernel and back");

            // A [[units]] rule on udev's ID_FS_TYPE, in a second daemon on the guest's own
            // system bus, where systemd starts what it asks for.
            units_start_only_for_the_filesystem_named(&mut sub, is_stick).await;
        });
    }

    /// The rule's unit records the instance it was started for.
    const FS_TEMPLATE: &str = "[Unit]\nDescription=watchqd test: an ext4 stick, %I\n\n\
        [Service]\nType=oneshot\nExecStart=/bin/sh -c 'echo \"%f\" >>/run/watchq-fs-started'\n";
    const FS_RULE: &str = "[[units]]\nsource = \"devices\"\nkinds = [\"add\"]\n\
        properties = { ID_FS_TYPE = \"ext4\", DEVTYPE = \"disk\" }\n\
        unit = \"watchq-fs@.service\"\ninstance = \"devname\"\n";

    async fn units_start_only_for_the_filesystem_named(
        sub: &mut Subscriber,
        is_stick: impl Fn(&Signal) -> bool,
    ) {
        let repo = repo();
        std::fs::copy(
            repo.join("dbus/org.watchq1.conf"),
            "/etc/dbus-1/system.d/org.watchq1.conf",
        )
        .expect("install the bus policy");
        std::fs::write("/etc/systemd/system/watchq-fs@.service", FS_TEMPLATE)
            .expect("write the unit template");
        systemctl(&["daemon-reload"]);
        systemctl(&["reload", "dbus"]);
        let dir = tempfile::tempdir().expect("a directory for the second daemon");
        let config = dir.path().join("watchqd.toml");
        std::fs::write(&config, FS_RULE).expect("write the rule");
        let log = dir.path().join("watchqd.log");
        let mut daemon = Command::new(env!("CARGO_BIN_EXE_watchqd"))
            .arg("--config")
            .arg(&config)
            .env_remove("DBUS_SYSTEM_BUS_ADDRESS")
            .env_remove("NOTIFY_SOCKET")
            .stderr(std::fs::File::create(&log).expect("the log"))
            .spawn()
            .expect("watchqd on the system bus");
        let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !read_log().contains("Serving org.watchq1") {
            assert!(
                Instant::now() < deadline,
                "the second daemon did not start:\n{}",
                read_log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let sticks = |s: &[Signal]| s.iter().filter(|e| is_stick(e)).count();
        let before = sticks(&sub.received);
        println!("READY units");
        sub.until("the ext2 stick", |s| sticks(s) > before).await;
        println!("SEEN ext2");
        sub.until("the ext4 stick", |s| sticks(s) > before + 1)
            .await;
        let last = sub
            .received
            .iter()
            .rev()
            .find(|e| is_stick(e))
            .cloned()
            .expect("until() saw it");
        let Signal::Device { properties, .. } = &last else {
            unreachable!("is_stick matches device events only");
        };
        assert_eq!(
            properties.get("ID_FS_TYPE").map(String::as_str),
            Some("ext4"),
            "{last:?}"
        );
        let devname = properties.get("DEVNAME").cloned().unwrap_or_default();
        let deadline = Instant::now() + Duration::from_secs(60);
        let started = loop {
            let started = std::fs::read_to_string("/run/watchq-fs-started").unwrap_or_default();
            if !started.is_empty() || Instant::now() > deadline {
                break started;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let _ = daemon.kill();
        let _ = daemon.wait();
        println!("started for: {started}\nsecond daemon:\n{}", read_log());
        // %f is the instance unescaped as a path: the ext4 stick's node, and nothing for
        // the ext2 one (whose event reached the daemon before the ext4 one was plugged).
        assert_eq!(
            started.lines().collect::<Vec<_>>(),
            [devname.as_str()],
            "{}",
            read_log()
        );
    }

    fn systemctl(args: &[&str]) {
        let out = Command::new("systemctl")
            .args(args)
            .output()
            .expect("systemctl");
        assert!(
            out.status.success(),
            "systemctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
