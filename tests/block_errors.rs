//! Block I/O errors from the kernel's block:block_rq_error tracepoint, caused for real
//! (a loop device whose backing file shrank under it), through a real bus.

mod common;

use std::fs;
use std::time::{Duration, Instant};

use common::*;
use zbus::Variant;

/// Sector of the failing read: 2 MiB into a device whose backing file is 1 MiB.
const BAD_SECTOR: u64 = 4096;

/// The daemon's perf event fds (`anon_inode:[perf_event]`).
fn perf_fds(daemon: &Daemon) -> usize {
    fs::read_dir(format!("/proc/{}/fd", daemon.pid()))
        .expect("daemon fds")
        .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .filter(|t| t.to_str() == Some("anon_inode:[perf_event]"))
        .count()
}

fn online_cpus() -> usize {
    let text = fs::read_to_string("/sys/devices/system/cpu/online").expect("online cpus");
    text.trim()
        .split(',')
        .map(|part| match part.split_once('-') {
            Some((a, b)) => b.parse::<usize>().unwrap() - a.parse::<usize>().unwrap() + 1,
            None => 1,
        })
        .sum()
}

fn monotonic_ns() -> u64 {
    let mut now = nix::libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec for the call to fill.
    let rc = unsafe { nix::libc::clock_gettime(nix::libc::CLOCK_MONOTONIC, &mut now) };
    assert_eq!(rc, 0, "clock_gettime");
    u64::try_from(now.tv_sec).unwrap() * 1_000_000_000 + u64::try_from(now.tv_nsec).unwrap()
}

fn block_errors(signals: &[Signal]) -> Vec<&Signal> {
    signals
        .iter()
        .filter(|s| matches!(s, Signal::BlockError { .. }))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eio_on_a_loop_device_arrives_as_block_error_only_where_watched() {
    tracefs_mounted();
    let daemon = Daemon::start();
    assert_eq!(perf_fds(&daemon), 0, "no perf fd before anyone watches");

    let disk = shrunk_loop_device();
    let mut watcher = Subscriber::new(&daemon).await;
    let mut bystander = Subscriber::new(&daemon).await;
    // The bystander watches devices (another source) but not block errors.
    bystander
        .watch("devices", 1, &[("name", Variant::from(disk.name.as_str()))])
        .await;
    assert_eq!(perf_fds(&daemon), 0, "a device watch opens no perf fd");
    watcher
        .watch(
            "block-errors",
            42,
            &[("name", Variant::from(disk.name.as_str()))],
        )
        .await;
    assert_eq!(
        perf_fds(&daemon),
        online_cpus(),
        "one perf fd per online CPU while block errors are watched"
    );

    let before = monotonic_ns();
    let err = failing_read(&disk.device, BAD_SECTOR);
    let failed_at = monotonic_ns();
    assert_eq!(err.raw_os_error(), Some(nix::libc::EIO), "{err}");
    watcher
        .until("the BlockError", |s| !block_errors(s).is_empty())
        .await;
    let arrived = monotonic_ns();

    let event = block_errors(&watcher.received)[0].clone();
    let (major, minor) = {
        let dev = fs::read_to_string(format!("/sys/block/{}/dev", disk.name)).unwrap();
        let (a, b) = dev.trim().split_once(':').unwrap();
        (a.parse::<u32>().unwrap(), b.parse::<u32>().unwrap())
    };
    match &event {
        Signal::BlockError {
            tag,
            device,
            major: got_major,
            minor: got_minor,
            sector,
            sectors,
            operation,
            errno_name,
            errno,
            count,
            ..
        } => {
            assert_eq!(*tag, 42);
            assert_eq!(device, &disk.name);
            assert_eq!((*got_major, *got_minor), (major, minor));
            assert_eq!(*sector, BAD_SECTOR);
            assert_eq!(*sectors, 8);
            assert!(operation.starts_with('R'), "operation {operation}");
            assert_eq!(errno_name, "EIO");
            assert_eq!(*errno, 5);
            assert_eq!(*count, 1);
        }
        other => panic!("{other:?}"),
    }
    let traced_at = event.attr_u64("monotonic-ns").expect("monotonic-ns");
    assert!(
        (before..=failed_at).contains(&traced_at),
        "the error's CLOCK_MONOTONIC time {traced_at} lies within the read ({before}..{failed_at})"
    );
    println!(
        "latency: tracepoint → subscriber {} µs (read returned → subscriber {} µs)",
        (arrived - traced_at) / 1000,
        (arrived - failed_at) / 1000
    );
    assert_contiguous(&watcher.received);

    // The bystander's connection saw no block error; give a straggler the time the
    // watcher needed plus a margin.
    assert!(bystander.next(Duration::from_millis(300)).await.is_none());
    assert!(block_errors(&bystander.received).is_empty());

    watcher.proxy.remove_watch(42).await.unwrap();
    assert_eq!(
        perf_fds(&daemon),
        0,
        "the perf fds close with the last watch"
    );
    // Errors while nobody watches are not queued for later: the same device watched
    // again gets the error made after the new watch, alone, and never the one before.
    let unwatched = failing_read(&disk.device, BAD_SECTOR);
    assert_eq!(
        unwatched.raw_os_error(),
        Some(nix::libc::EIO),
        "{unwatched}"
    );
    let before_rewatch = watcher.received.len();
    watcher
        .watch(
            "block-errors",
            43,
            &[("name", Variant::from(disk.name.as_str()))],
        )
        .await;
    let watched_sector = BAD_SECTOR + 8;
    let err = failing_read(&disk.device, watched_sector);
    assert_eq!(err.raw_os_error(), Some(nix::libc::EIO), "{err}");
    watcher
        .until("the BlockError after the new watch", |s| {
            !block_errors(&s[before_rewatch..]).is_empty()
        })
        .await;
    // A straggler would have come by now; it is in what is checked below (a few at
    // most: any one is a failure).
    for _ in 0..4 {
        if watcher.next(Duration::from_millis(300)).await.is_none() {
            break;
        }
    }
    let after: Vec<(u64, u64, u64)> = block_errors(&watcher.received[before_rewatch..])
        .iter()
        .map(|e| match e {
            Signal::BlockError {
                tag, sector, count, ..
            } => (*tag, *sector, *count),
            _ => unreachable!("block_errors keeps BlockError only"),
        })
        .collect();
    assert_eq!(
        after,
        [(43, watched_sector, 1)],
        "(tag, sector, count) of the errors after the new watch: the error at sector \
         {BAD_SECTOR}, made while nobody watched, must not be among them"
    );
    assert_eq!(
        watcher.received.len(),
        before_rewatch + 1,
        "{:?}",
        watcher.received
    );
    assert_contiguous(&watcher.received);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_storm_becomes_counted_events_never_silence() {
    tracefs_mounted();
    let daemon = Daemon::start();
    let disk = shrunk_loop_device();
    let mut sub = Subscriber::new(&daemon).await;
    sub.watch(
        "block-errors",
        1,
        &[("name", Variant::from(disk.name.as_str()))],
    )
    .await;
    const READS: u64 = 40;
    let device = disk.device.clone();
    tokio::task::spawn_blocking(move || {
        for i in 0..READS {
            let err = failing_read(&device, BAD_SECTOR + 8 * i);
            assert_eq!(err.raw_os_error(), Some(nix::libc::EIO));
        }
    })
    .await
    .unwrap();
    let start = Instant::now();
    sub.until("events standing for every error", |s| {
        block_errors(s)
            .iter()
            .map(|e| match e {
                Signal::BlockError { count, .. } => *count,
                _ => 0,
            })
            .sum::<u64>()
            >= READS
    })
    .await;
    assert!(sub.next(Duration::from_millis(300)).await.is_none());
    let events = block_errors(&sub.received);
    let total: u64 = events
        .iter()
        .map(|e| match e {
            Signal::BlockError { count, .. } => *count,
            _ => 0,
        })
        .sum();
    assert_eq!(total, READS, "every error is counted exactly once");
    let singles = events
        .iter()
        .filter(|e| matches!(e, Signal::BlockError { count: 1, .. }))
        .count();
    assert!(
        events.len() < usize::try_from(READS).unwrap(),
        "a storm is summarised: {} events for {READS} errors",
        events.len()
    );
    let summary = events
        .iter()
        .find(|e| matches!(e, Signal::BlockError { count, .. } if *count > 1))
        .expect("a summary event");
    assert!(summary.attr_u64("last-sector").is_some());
    println!(
        "{READS} errors → {} events ({singles} single), summaries complete after {:?}",
        events.len(),
        start.elapsed()
    );
    assert_contiguous(&sub.received);
}
