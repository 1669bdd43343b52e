//! Block device events from real uevents, through a real bus, to real subscribers.

mod common;

use std::collections::HashMap;
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

    disk.detach();
    sub.until("the detach media change", |s| {
        s.iter().any(|e| matches!(e, Signal::Device { action, sys_path, .. } if action == "media-change" && *sys_path == path))
    })
    .await;
    let detached = sub.about(&path).last().unwrap();
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
    sub.watch("devices", 1, &[("subsystem", Variant::from("block"))])
        .await;
    sub.proxy
        .set_filter(&[("devices", &["add", "remove"][..])])
        .await
        .expect("SetFilter");
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
    assert!(
        !sub.about(&disk.sys_path()).any(|_| true),
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_taken_under_load_agrees_with_the_events_around_it() {
    let daemon = Daemon::start();
    // Deep enough that this test is about snapshots, not about loss.
    let mut sub = Subscriber::with_options(
        &daemon,
        HashMap::from([("queue-depth", Variant::from(4096u32))]),
    )
    .await;
    let disk = LoopDevice::attach(4);
    sub.watch("devices", 1, &[("name", Variant::from(disk.name.as_str()))])
        .await;
    let path = disk.sys_path();

    // Events flow while the snapshot is taken.
    let name = disk.name.clone();
    let load = tokio::task::spawn_blocking(move || {
        for _ in 0..300 {
            fs::write(format!("/sys/block/{name}/uevent"), "change").unwrap();
        }
    });
    tokio::time::sleep(Duration::from_millis(5)).await;
    let (seq, objects) = sub.proxy.snapshot("devices").await.expect("Snapshot");
    load.await.unwrap();
    sub.until("all 300 changes", |s| s.len() >= 300).await;
    assert!(sub.next(Duration::from_millis(300)).await.is_none());
    assert_contiguous(&sub.received);

    // Events numbered up to the snapshot's sequence are in it, later ones are not:
    // the snapshot's last kernel event is exactly the last one numbered <= seq.
    let object = objects
        .iter()
        .find(|o| o.0 == path)
        .expect("the loop device is in the snapshot");
    let in_snapshot = match &*object.2["kernel-seqnum"] {
        Variant::U64(n) => Some(*n),
        _ => None,
    };
    let covered = sub
        .received
        .iter()
        .rfind(|s| s.seq() <= seq)
        .and_then(|s| s.attr_u64("kernel-seqnum"));
    if seq == 0 {
        assert!(covered.is_none());
    } else {
        assert_eq!(in_snapshot, covered, "snapshot at seq {seq}");
    }
    assert!(
        object.1 >= seq,
        "the change counter counts every event applied"
    );

    // The Manager's snapshot lists it too; an unwatched source is scanned on demand.
    let manager = watchqd::client::ManagerProxy::new(&sub.conn).await.unwrap();
    let (_, objects) = manager.snapshot("devices").await.unwrap();
    assert!(objects.iter().any(|o| o.0 == path));
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
