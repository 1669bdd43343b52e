//! Hostile and failing input from the kernel side: forged uevents, kernel overflow.

mod common;

use std::collections::HashMap;
use std::io::IoSliceMut;
use std::os::fd::AsRawFd;
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal as Sig;
use nix::sys::socket::{self, MsgFlags, NetlinkAddr};
use zbus::Variant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_uevent_from_userspace_is_not_delivered() {
    let daemon = Daemon::start();
    let disk = LoopDevice::attach(4);
    let mut sub = Subscriber::new(&daemon).await;
    sub.watch("devices", 1, &[("subsystem", Variant::from("block"))])
        .await;

    // The devices source's counters, read twice through one proxy of our client
    // library (whose `Counters` must not be a cached first read).
    let manager = watchqd::client::ManagerProxy::builder(&sub.conn)
        .build()
        .await
        .expect("manager proxy");
    let rejected = || common::sources::counter(&manager, "devices", "messages-rejected");
    let rejected_before = rejected().await;

    // Root in the initial network namespace can multicast to the kernel's uevent group;
    // a witness socket proves the forgery really reached every listener.
    let witness = uevent_socket(1);
    // A flood of them: each is dropped and counted, but only a few are logged at warn.
    const FORGED: usize = 50;
    forge_uevents(FORGED);
    let mut buf = vec![0u8; 4096];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg =
        socket::recvmsg::<NetlinkAddr>(witness.as_raw_fd(), &mut iov, None, MsgFlags::empty())
            .unwrap();
    assert_ne!(
        msg.address.map(|a| a.pid()),
        Some(0),
        "the forgery carries its sender's port id"
    );

    // A real event afterwards is the barrier: once it arrives, the forgery would have too.
    disk.synth_change();
    let path = disk.sys_path();
    sub.until("the real event", |s| {
        s.iter()
            .any(|e| matches!(e, Signal::Device { sys_path, .. } if *sys_path == path))
    })
    .await;
    assert!(
        !sub.about(FORGED_DEVPATH).any(|_| true),
        "the forged uevent was delivered"
    );
    let log = daemon.log_text();
    let rejections: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("not sent by the kernel"))
        .collect();
    // The running total in the last line, parsed whole (a prefix would also match
    // larger counts).
    let total = rejections.last().and_then(|l| {
        let (_, rest) = l.split_once("rejected=")?;
        rest.split_whitespace().next()?.parse::<usize>().ok()
    });
    assert_eq!(
        total,
        Some(FORGED),
        "every rejection is counted: {:?}",
        rejections.last()
    );
    assert_eq!(
        rejected().await - rejected_before,
        FORGED as u64,
        "the Manager's Counters count every rejection"
    );
    let warned = rejections.iter().filter(|l| l.contains(" WARN ")).count();
    assert_eq!(
        warned,
        watchqd::logging::LogLimit::BURST as usize,
        "{FORGED} forgeries make a few warnings, not a flood"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_overflow_becomes_lost_and_a_rescan() {
    // A tiny socket buffer so that the kernel drops uevents while the daemon is stopped.
    let daemon = Daemon::with_config("[sources.devices]\nreceive_buffer = 4096\n");
    let disk = LoopDevice::attach(4);
    // Detached while events are lost: only a rescan can know it lost its backing file.
    let detached = LoopDevice::attach(4);
    let mut sub = Subscriber::with_options(
        &daemon,
        HashMap::from([("queue-depth", Variant::from(4096u32))]),
    )
    .await;
    sub.watch("devices", 3, &[("subsystem", Variant::from("block"))])
        .await;
    let (_, objects) = sub.proxy.snapshot("devices").await.unwrap();
    assert_eq!(
        backing_files(&objects).get(detached.backing.to_str().unwrap()),
        Some(&detached.sys_path()),
        "before the overflow the table knows the device that will be detached"
    );

    daemon.signal(Sig::SIGSTOP);
    for _ in 0..300 {
        disk.synth_change();
    }
    // Attached while events are lost, and never mentioned again: only a rescan can know
    // it. Attached before the detach, so that it cannot take the detached one's number.
    let attached = LoopDevice::attach(6);
    detached.detach();
    // The device changes while events are being lost: the rescan must catch it.
    let grown = 12u64 << 20;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&disk.backing)
        .unwrap()
        .set_len(grown)
        .unwrap();
    run("losetup", &["-c", &disk.device]);
    daemon.signal(Sig::SIGCONT);

    sub.until("Lost from the kernel overflow", |s| {
        s.iter()
            .any(|e| matches!(e, Signal::Lost { reason, .. } if reason == "kernel-overflow"))
    })
    .await;
    let lost = sub
        .received
        .iter()
        .find(|e| matches!(e, Signal::Lost { .. }))
        .unwrap()
        .clone();
    assert!(
        matches!(&lost, Signal::Lost { count: 0, source, .. } if source == "devices"),
        "{lost:?}"
    );
    let delivered = sub.about(&disk.sys_path()).count();
    assert!(
        delivered < 300,
        "the kernel dropped some of the 300 events, {delivered} arrived"
    );

    // The snapshot reflects the state after the loss.
    let (_, objects) = sub.proxy.snapshot("devices").await.unwrap();
    let object = objects
        .iter()
        .find(|o| o.0 == disk.sys_path())
        .expect("the disk");
    assert_eq!(&*object.2["size"], &Variant::from(grown));
    // What no event after the loss told: the device attached meanwhile is there with its
    // backing file and size, and the detached one's backing file is nowhere.
    let backing = backing_files(&objects);
    assert_eq!(
        backing.get(attached.backing.to_str().unwrap()),
        Some(&attached.sys_path()),
        "the device attached during the overflow is in the snapshot"
    );
    let object = objects
        .iter()
        .find(|o| o.0 == attached.sys_path())
        .expect("the attached device");
    assert_eq!(&*object.2["size"], &Variant::from(6u64 << 20));
    assert_eq!(
        backing.get(detached.backing.to_str().unwrap()),
        None,
        "the device detached during the overflow still has its backing file in the snapshot"
    );

    // And events flow again afterwards.
    let before = sub.received.len();
    tokio::time::sleep(Duration::from_millis(50)).await;
    disk.synth_change();
    let path = disk.sys_path();
    sub.until("an event after the overflow", |s| {
        s[before..]
            .iter()
            .any(|e| matches!(e, Signal::Device { sys_path, .. } if *sys_path == path))
    })
    .await;
    assert_contiguous(&sub.received);
    assert!(daemon.log_text().contains("ENOBUFS"));
}

/// Loop devices' backing files in a devices snapshot, and the device each backs.
fn backing_files(objects: &[watchqd::client::ReceivedObject]) -> HashMap<String, String> {
    objects
        .iter()
        .filter_map(|o| {
            let file = <&str>::try_from(&**o.2.get("loop-backing-file")?).ok()?;
            Some((file.to_owned(), o.0.clone()))
        })
        .collect()
}
