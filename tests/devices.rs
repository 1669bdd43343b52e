//! Block device events from real uevents, through a real bus, to real subscribers.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::time::Duration;

use common::*;
use zbus::Variant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loop_device_lifecycle_arrives_with_attributes_tags_and_sequence() {
    let daemon = Daemon::start();
    let mut sub = Subscriber::new(&daemon).await;
    sub.watch(
        "devices",
        7,
        &[
            ("subsystem", Variant::from("block")),
            ("name", Variant::from("loop*")),
        ],
    )
    .await;

    let disk = LoopDevice::attach(8);
    let path = disk.sys_path();
    let part_path = format!("{path}/{}p1", disk.name);

    // Attach: the kernel announces the new size of the loop device with a change.
    sub.until("the attach event", |s| {
        s.iter().any(|e| {
            matches!(e, Signal::Device { sys_path, .. } if *sys_path == path)
                && e.attr_u64("size") == Some(8 << 20)
        })
    })
    .await;
    let attached = sub
        .about(&path)
        .find(|e| e.attr_u64("size") == Some(8 << 20))
        .unwrap()
        .clone();
    assert_eq!(
        attached.attr_str("devname").as_deref(),
        Some(disk.device.as_str())
    );
    assert_eq!(
        attached.attr_str("loop-backing-file").as_deref(),
        Some(disk.backing.to_str().unwrap())
    );
    assert_eq!(attached.attr_u64("major"), Some(7));
    assert_eq!(attached.attr_bool("read-only"), Some(false));
    assert!(matches!(&attached, Signal::Device { tag: 7, subsystem, .. } if subsystem == "block"));

    // Resize: grow the backing file and tell the loop driver.
    fs::OpenOptions::new()
        .write(true)
        .open(&disk.backing)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    run("losetup", &["-c", &disk.device]);
    sub.until("the resize event", |s| {
        s.iter().any(|e| matches!(e, Signal::Device { action, sys_path, .. } if action == "resize" && *sys_path == path))
    })
    .await;
    let resized = sub
        .about(&path)
        .find(|e| matches!(e, Signal::Device { action, .. } if action == "resize"))
        .unwrap();
    assert_eq!(resized.attr_u64("size"), Some(16 << 20));

    // A partition, added and removed by hand (no partition table parsers needed).
    run("addpart", &[&disk.device, "1", "2048", "4096"]);
    sub.until("the partition's add event", |s| {
        s.iter().any(|e| matches!(e, Signal::Device { action, sys_path, .. } if action == "add" && *sys_path == part_path))
    })
    .await;
    let added = sub.about(&part_path).next().unwrap();
    assert_eq!(added.attr_str("devtype").as_deref(), Some("partition"));
    assert_eq!(added.attr_u64("partition"), Some(1));
    assert_eq!(added.attr_u64("partition-offset"), Some(2048 * 512));
    assert_eq!(added.attr_u64("size"), Some(4096 * 512));

    run("delpart", &[&disk.device, "1"]);
    sub.until("the partition's remove event", |s| {
        s.iter().any(|e| matches!(e, Signal::Device { action, sys_path, .. } if action == "remove" && *sys_path == part_path))
    })
    .await;
    // Gone from sysfs, yet the removal says what was removed.
    let removed = sub.about(&part_path).last().unwrap();
    assert_eq!(removed.attr_u64("size"), Some(4096 * 512));
    assert_eq!(
        removed.attr_str("devname").as_deref(),
        Some(format!("{}p1", disk.device).as_str())
    );

    // The attach announced a media change too: wait for one that follows the detach
    // (waiting for "any" returned at once, and the last signal could be the resize's).
    let before_detach = sub.received.len();
    let is_media_change = |e: &Signal| matches!(e, Signal::Device { action, sys_path, .. } if action == "media-change" && *sys_path == path);
    disk.detach();
    sub.until("the detach media change", |s| {
        s[before_detach..].iter().any(is_media_change)
    })
    .await;
    let detached = sub.received[before_detach..]
        .iter()
        .find(|e| is_media_change(e))
        .unwrap();
    assert_eq!(detached.attr_u64("size"), Some(0));

    assert!(
        sub.received
            .iter()
            .all(|s| matches!(s, Signal::Device { tag: 7, .. })),
        "{:?}",
        sub.received
    );
    assert_contiguous(&sub.received);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filter_excludes_the_subtypes_it_does_not_list() {
    let daemon = Daemon::start();
    let mut sub = Subscriber::new(&daemon).await;
    // The filter first: set after the watch, a change of any other block device (a
    // parallel test's) could arrive unfiltered in between.
    sub.proxy
        .set_filter(&[("devices", &["add", "remove"][..])])
        .await
        .expect("SetFilter");
    sub.watch("devices", 1, &[("subsystem", Variant::from("block"))])
        .await;
    assert_eq!(
        sub.proxy.watches().await.unwrap(),
        vec![(1, "devices".to_owned())]
    );

    let disk = LoopDevice::attach(8);
    for _ in 0..5 {
        disk.synth_change();
    }
    run("addpart", &[&disk.device, "1", "2048", "2048"]);
    run("delpart", &[&disk.device, "1"]);
    let part_path = format!("{}/{}p1", disk.sys_path(), disk.name);
    sub.until("the partition's remove", |s| {
        s.iter().any(|e| matches!(e, Signal::Device { action, sys_path, .. } if action == "remove" && *sys_path == part_path))
    })
    .await;
    let actions: Vec<&str> = sub
        .received
        .iter()
        .filter_map(|s| match s {
            Signal::Device { action, .. } => Some(action.as_str()),
            _ => None,
        })
        .collect();
    assert!(
        actions.iter().all(|a| *a == "add" || *a == "remove"),
        "{actions:?}"
    );
    // The disk itself may be announced with "add" (losetup creates a loop device when
    // every existing one is busy, as under a parallel test run); its changes must not.
    assert!(
        !sub.about(&disk.sys_path())
            .any(|s| matches!(s, Signal::Device { action, .. } if action == "change")),
        "change events of the disk passed the filter"
    );

    // An empty filter passes everything again.
    sub.proxy.set_filter(&[]).await.expect("clear filter");
    disk.synth_change();
    let path = disk.sys_path();
    sub.until("a change after clearing the filter", |s| {
        s.iter().any(|e| matches!(e, Signal::Device { action, sys_path, .. } if action == "change" && *sys_path == path))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_subscriptions_each_get_only_their_own_devices() {
    let daemon = Daemon::start();
    let (a, b) = (LoopDevice::attach(4), LoopDevice::attach(4));
    let mut sub_a = Subscriber::new(&daemon).await;
    let mut sub_b = Subscriber::new(&daemon).await;
    sub_a
        .watch("devices", 10, &[("name", Variant::from(a.name.as_str()))])
        .await;
    sub_b
        .watch(
            "devices",
            20,
            &[(
                "properties",
                Variant::from(HashMap::from([("DEVNAME", b.name.as_str())])),
            )],
        )
        .await;

    for _ in 0..20 {
        a.synth_change();
        b.synth_change();
    }
    let (pa, pb) = (a.sys_path(), b.sys_path());
    sub_a.until("20 events of a", |s| s.len() >= 20).await;
    sub_b.until("20 events of b", |s| s.len() >= 20).await;
    // Anything more would have arrived by the time the other one's events did; give
    // stragglers a moment so that a leak is caught.
    assert!(sub_a.next(Duration::from_millis(300)).await.is_none());
    assert!(sub_b.next(Duration::from_millis(300)).await.is_none());
    assert!(sub_a
        .received
        .iter()
        .all(|s| matches!(s, Signal::Device { sys_path, tag: 10, .. } if *sys_path == pa)));
    assert!(sub_b
        .received
        .iter()
        .all(|s| matches!(s, Signal::Device { sys_path, tag: 20, .. } if *sys_path == pb)));
    assert_contiguous(&sub_a.received);
    assert_contiguous(&sub_b.received);
}

/// The kernel sequence number an event or snapshot object carries.
fn kernel_seqnum(attributes: &HashMap<String, zbus::OwnedVariant>) -> Option<u64> {
    match attributes.get("kernel-seqnum").map(|v| &**v) {
        Some(Variant::U64(n)) => Some(*n),
        _ => None,
    }
}

const PARTITIONS: u32 = 16;

/// Partitions added by hand outlive the loop device's detach: removed whatever happens,
/// or the next user of this loop device inherits them.
struct Partitions(String);

impl Partitions {
    fn remove_all(&self) {
        for n in 1..=PARTITIONS {
            let _ = std::process::Command::new("delpart")
                .args([&self.0, &n.to_string()])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

impl Drop for Partitions {
    fn drop(&mut self) {
        self.remove_all();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_taken_under_load_agrees_with_the_events_around_it() {
    // The check means something only when the snapshot lands inside the event stream,
    // with events on both sides of it; if the load finished first, "snapshot + later
    // events = now" would compare the snapshot with itself. On a loaded machine the
    // load can outrun delivery, so an attempt where it did is made again, a few times.
    const ATTEMPTS: u32 = 5;
    for attempt in 1..=ATTEMPTS {
        match snapshot_under_load().await {
            Landed::Inside => return,
            Landed::After { seq } => println!(
                "attempt {attempt}: the snapshot at seq {seq} came after the last event; again"
            ),
        }
    }
    panic!("in {ATTEMPTS} attempts the snapshot never landed inside the event stream");
}

/// Where a snapshot taken under load fell in the subscription's event stream.
enum Landed {
    /// Events before and after it, and everything around it checked.
    Inside,
    /// At or after the last event: nothing checked.
    After { seq: u64 },
}

async fn snapshot_under_load() -> Landed {
    const CHANGES: usize = 300;
    const REMOVED: u32 = 8;
    const BEFORE: usize = 100;
    let daemon = Daemon::start();
    // Deep enough that this test is about snapshots, not about loss.
    let mut sub = Subscriber::with_options(
        &daemon,
        HashMap::from([("queue-depth", Variant::from(4096u32))]),
    )
    .await;
    let disk = LoopDevice::attach(8);
    // A loop device can arrive with partitions an earlier user left on it.
    let partitions_guard = Partitions(disk.device.clone());
    partitions_guard.remove_all();
    sub.watch("devices", 1, &[("name", Variant::from(disk.name.as_str()))])
        .await;
    let partitions = format!("{}p*", disk.name);
    sub.watch(
        "devices",
        2,
        &[("name", Variant::from(partitions.as_str()))],
    )
    .await;
    let path = disk.sys_path();
    let ours = |sys_path: &str| sys_path == path || sys_path.starts_with(&format!("{path}/"));

    // Events flow while the snapshot is taken: changes of the disk, and partitions
    // added (and some removed again) between them.
    let (name, device) = (disk.name.clone(), disk.device.clone());
    let load = tokio::task::spawn_blocking(move || {
        for i in 0..CHANGES {
            fs::write(format!("/sys/block/{name}/uevent"), "change").unwrap();
            let i = u32::try_from(i).unwrap();
            if i % 10 == 0 && i / 10 < PARTITIONS {
                let number = i / 10 + 1;
                let start = 2048 + (number - 1) * 256;
                run(
                    "addpart",
                    &[&device, &number.to_string(), &start.to_string(), "256"],
                );
            }
            if i % 10 == 5 && i / 10 < REMOVED {
                run("delpart", &[&device, &(i / 10 + 1).to_string()]);
            }
        }
    });
    // Some partitions exist by now, more are coming.
    sub.until("the first hundred events", |s| s.len() >= BEFORE)
        .await;
    let (seq, objects) = sub.proxy.snapshot("devices").await.expect("Snapshot");
    assert!(
        seq >= BEFORE as u64,
        "the snapshot's seq {seq} is below the {BEFORE} events already received"
    );
    load.await.unwrap();
    let part_path = |n: u32| format!("{path}/{}p{n}", disk.name);
    sub.until("every change, add and remove", |s| {
        let count = |action: &str, p: &str| {
            s.iter()
                .filter(|e| matches!(e, Signal::Device { action: a, sys_path, .. } if a == action && sys_path == p))
                .count()
        };
        s.iter()
            .filter(|e| matches!(e, Signal::Device { action, sys_path, .. } if action == "change" && *sys_path == path))
            .count()
            >= CHANGES
            && (1..=PARTITIONS).all(|n| count("add", &part_path(n)) == 1)
            && (1..=REMOVED).all(|n| count("remove", &part_path(n)) == 1)
    })
    .await;
    assert!(sub.next(Duration::from_millis(300)).await.is_none());
    let last = sub.received.last().map_or(0, Signal::seq);
    println!("snapshot at seq {seq} of {last} events");
    assert!(
        seq <= last,
        "the snapshot's seq {seq} is beyond the last event {last}"
    );
    if seq == last {
        return Landed::After { seq };
    }
    // No loss: every number from 1 on, none skipped, none repeated.
    assert_contiguous(&sub.received);
    // No duplicate: each kernel uevent reached the subscriber once.
    let mut seen = std::collections::BTreeSet::new();
    for signal in &sub.received {
        if let Signal::Device { attributes, .. } = signal {
            let n = kernel_seqnum(attributes).expect("kernel-seqnum");
            assert!(seen.insert(n), "kernel event {n} delivered twice");
        }
    }

    // Per device: the snapshot holds exactly the events numbered up to its sequence,
    // and every later event is newer than what it holds.
    let mut devices: BTreeMap<String, Option<u64>> = objects
        .iter()
        .filter(|o| ours(&o.0))
        .map(|o| (o.0.clone(), kernel_seqnum(&o.2)))
        .collect();
    let mut ids: Vec<&String> = devices.keys().collect();
    ids.extend(sub.received.iter().filter_map(|s| match s {
        Signal::Device { sys_path, .. } => Some(sys_path),
        _ => None,
    }));
    ids.sort();
    ids.dedup();
    for id in ids {
        let events: Vec<&Signal> = sub.about(id).collect();
        let in_snapshot = devices.get(id);
        match events.iter().rev().find(|e| e.seq() <= seq) {
            Some(Signal::Device {
                action, attributes, ..
            }) if action == "remove" => assert!(
                in_snapshot.is_none(),
                "{id} was removed at or before seq {seq} yet is in the snapshot"
            ),
            Some(Signal::Device { attributes, .. }) => assert_eq!(
                in_snapshot.copied().flatten(),
                kernel_seqnum(attributes),
                "{id}: the snapshot at seq {seq} does not hold the last event before it"
            ),
            _ => {}
        }
        if let Some(Some(held)) = in_snapshot {
            for later in events.iter().filter(|e| e.seq() > seq) {
                if let Signal::Device { attributes, .. } = later {
                    assert!(
                        kernel_seqnum(attributes) > Some(*held),
                        "{id}: event {later:?} after the snapshot is already in it"
                    );
                }
            }
        }
    }

    // Snapshot + later events = the state now.
    for signal in sub.received.iter().filter(|s| s.seq() > seq) {
        if let Signal::Device {
            action,
            sys_path,
            attributes,
            ..
        } = signal
        {
            if action == "remove" {
                devices.remove(sys_path);
            } else {
                devices.insert(sys_path.clone(), kernel_seqnum(attributes));
            }
        }
    }
    let (_, now) = sub.proxy.snapshot("devices").await.expect("Snapshot");
    let now: BTreeMap<String, Option<u64>> = now
        .iter()
        .filter(|o| ours(&o.0))
        .map(|o| (o.0.clone(), kernel_seqnum(&o.2)))
        .collect();
    assert_eq!(
        devices, now,
        "snapshot at {seq} + later events != snapshot now"
    );
    let object = objects
        .iter()
        .find(|o| o.0 == path)
        .expect("the loop device is in the snapshot");
    let applied = sub.about(&path).filter(|e| e.seq() <= seq).count();
    assert!(
        object.1 >= u64::try_from(applied).unwrap(),
        "the change counter counts every event applied"
    );

    // The Manager's snapshot lists it too; an unwatched source is scanned on demand.
    let manager = watchqd::client::ManagerProxy::new(&sub.conn).await.unwrap();
    let (_, objects) = manager.snapshot("devices").await.unwrap();
    assert!(objects.iter().any(|o| o.0 == path));
    Landed::Inside
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_uevent_socket_exists_only_while_devices_are_watched() {
    let daemon = Daemon::start();
    assert_eq!(
        daemon.uevent_sockets(),
        0,
        "no socket before anyone watches"
    );
    let sub = Subscriber::new(&daemon).await;
    assert_eq!(
        daemon.uevent_sockets(),
        0,
        "a subscription alone opens nothing"
    );
    sub.watch("devices", 1, &[]).await;
    sub.watch("devices", 2, &[("subsystem", Variant::from("usb"))])
        .await;
    assert_eq!(
        daemon.uevent_sockets(),
        1,
        "one socket however many watches"
    );
    sub.proxy.remove_watch(1).await.unwrap();
    assert_eq!(daemon.uevent_sockets(), 1);
    sub.proxy.remove_watch(2).await.unwrap();
    assert_eq!(
        daemon.uevent_sockets(),
        0,
        "closed when the last watch goes"
    );
}

/// The receive buffer of process `pid`'s one uevent socket, as `SO_RCVBUF` reports it
/// (twice what was set: the kernel's bookkeeping): the socket is borrowed from the
/// process with `pidfd_getfd`, so this is the kernel's figure, not the daemon's word.
fn uevent_receive_buffer(pid: u32) -> usize {
    use nix::libc;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    let inodes = netlink_socket_inodes(pid, 15);
    assert_eq!(inodes.len(), 1, "uevent sockets of pid {pid}: {inodes:?}");
    let fd: i32 = fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the daemon's fds")
        .filter_map(Result::ok)
        .find(|entry| {
            fs::read_link(entry.path()).is_ok_and(|link| {
                inodes
                    .iter()
                    .any(|inode| link.to_string_lossy() == format!("socket:[{inode}]"))
            })
        })
        .and_then(|entry| entry.file_name().to_str()?.parse().ok())
        .expect("the uevent socket's fd");
    // SAFETY: plain syscalls; each returned descriptor is owned here and closed on drop.
    let borrowed = unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid, 0);
        assert!(
            pidfd >= 0,
            "pidfd_open: {}",
            std::io::Error::last_os_error()
        );
        let pidfd = OwnedFd::from_raw_fd(i32::try_from(pidfd).expect("an fd"));
        let copy = libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0);
        assert!(
            copy >= 0,
            "pidfd_getfd: {}",
            std::io::Error::last_os_error()
        );
        OwnedFd::from_raw_fd(i32::try_from(copy).expect("an fd"))
    };
    nix::sys::socket::getsockopt(&borrowed, nix::sys::socket::sockopt::RcvBuf).expect("SO_RCVBUF")
}

/// `[sources.devices] receive_buffer` changed by a reload applies to the open socket:
/// the same socket (same inode) has the new size, and device events go on arriving
/// across the reload with no gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_resizes_the_open_uevent_socket_in_place() {
    let daemon = Daemon::with_config("[sources.devices]\nreceive_buffer = 1048576\n");
    let mut sub = Subscriber::new(&daemon).await;
    sub.watch("devices", 1, &[("name", Variant::from("loop*"))])
        .await;
    let socket = daemon.netlink_socket_inodes(15);
    assert_eq!(socket.len(), 1, "{socket:?}");
    assert_eq!(uevent_receive_buffer(daemon.pid()), 2 << 20);

    let disk = LoopDevice::attach(4);
    let path = disk.sys_path();
    disk.synth_change();
    let changes_of = |signals: &[Signal]| {
        signals
            .iter()
            .filter(|e| matches!(e, Signal::Device { sys_path, action, .. } if *sys_path == path && action == "change"))
            .count()
    };
    sub.until("a change before the reload", |s| changes_of(s) >= 1)
        .await;
    let before = changes_of(&sub.received);

    fs::write(
        daemon.config_path(),
        "[sources.devices]\nreceive_buffer = 4194304\n",
    )
    .unwrap();
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    let deadline = std::time::Instant::now() + TIMEOUT;
    while uevent_receive_buffer(daemon.pid()) != 8 << 20 {
        assert!(
            std::time::Instant::now() < deadline,
            "the buffer is still {} bytes after the reload:\n{}",
            uevent_receive_buffer(daemon.pid()),
            daemon.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        daemon.netlink_socket_inodes(15),
        socket,
        "the socket was replaced, not resized"
    );

    disk.synth_change();
    sub.until("a change after the reload", |s| changes_of(s) > before)
        .await;
    assert_contiguous(&sub.received);
}

/// Where no udevd runs (this host: no `/run/udev/control`), the source follows the
/// kernel's group, says so and why in `Sources` (as `watchqctl status` prints it), and
/// its events are the kernel's, without udev's properties.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_udevd_the_kernel_group_is_followed_and_the_reason_shown() {
    assert!(
        !std::path::Path::new("/run/udev/control").exists(),
        "this test needs a host without udevd"
    );
    let daemon = Daemon::start();
    let mut sub = Subscriber::new(&daemon).await;
    let devices = sources::source_info(&sub.conn, "devices").await;
    assert!(devices.available, "{devices:?}");
    assert!(
        devices
            .reason
            .starts_with("kernel: no udevd (/run/udev/control absent)"),
        "Sources does not say which group and why: {:?}",
        devices.reason
    );
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_watchqctl"))
        .args(["--address", daemon.address(), "status"])
        .output()
        .expect("watchqctl status");
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.contains("note: kernel: no udevd (/run/udev/control absent)"),
        "watchqctl status:\n{status}"
    );

    sub.watch("devices", 1, &[("subsystem", Variant::from("block"))])
        .await;
    let disk = LoopDevice::attach(4);
    let path = disk.sys_path();
    disk.synth_change();
    sub.until("the kernel's event", |s| {
        s.iter()
            .any(|e| matches!(e, Signal::Device { sys_path, .. } if *sys_path == path))
    })
    .await;
    let event = sub.about(&path).next().expect("an event about the disk");
    let Signal::Device { properties, .. } = event else {
        unreachable!("about() returned a device event")
    };
    assert!(
        !properties.contains_key("USEC_INITIALIZED"),
        "a kernel event carries udev's properties: {properties:?}"
    );
    assert!(
        daemon
            .log_text()
            .contains("following kernel: no udevd (/run/udev/control absent)"),
        "{}",
        daemon.log_text()
    );
    // Without udevd the kernel's group is simply the means, not a degraded source: the
    // start says so at info, with no warning (containers would log one at every start).
    let log = daemon.log_text();
    assert!(
        log.contains("source devices available: kernel: no udevd")
            && !log.contains("source devices available, degraded"),
        "{log}"
    );
}
