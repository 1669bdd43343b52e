//! `[metrics]` while nothing happens: no rewrite of the file and no wakeup of the daemon
//! in a minute. A test binary of its own, so that the other metrics tests (mounts, block
//! errors: real events the daemon must wake for) never run beside it.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;

/// The file's identity: a rewrite is a rename of a new file over it, a new inode.
fn file_identity(path: &PathBuf) -> Option<(u64, i64, i64)> {
    std::fs::metadata(path)
        .ok()
        .map(|m| (m.ino(), m.mtime(), m.mtime_nsec()))
}

const IDLE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_with_metrics_on_no_rewrite_and_no_wakeup_in_a_minute() {
    let dir = tempfile::tempdir().expect("directory");
    // A short interval, so that a rewrite the daemon owed would happen within the minute.
    let daemon = Daemon::with_config(&format!(
        "[metrics]\ntextfile = true\ndirectory = \"{}\"\ninterval_ms = 1000\n",
        dir.path().display()
    ));
    let file = dir.path().join("watchqd.prom");
    let start = Instant::now();
    while file_identity(&file).is_none() {
        assert!(
            start.elapsed() < TIMEOUT,
            "no metrics file within {TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Past the first interval: whatever start-up changed is written by now.
    std::thread::sleep(Duration::from_millis(1500));
    let pid = daemon.pid();
    let (identity, switches) = (file_identity(&file), context_switches(pid));
    // Polled far faster than the interval, so no rewrite can hide between two looks.
    let mut rewrites = 0;
    let mut last = identity;
    let end = Instant::now() + IDLE;
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(100));
        let now = file_identity(&file);
        if now != last {
            rewrites += 1;
            last = now;
        }
    }
    let wakeups = context_switches(pid) - switches;
    println!("idle {IDLE:?} with metrics on: {rewrites} rewrites, {wakeups} daemon wakeups");
    assert_eq!(rewrites, 0, "the file was rewritten while nothing happened");
    assert_eq!(wakeups, 0, "the daemon woke while nothing happened");

    // The same looks see a change when there is one: a subscription is one rewrite.
    let _sub = Subscriber::new(&daemon).await;
    let start = Instant::now();
    while file_identity(&file) == last {
        assert!(
            start.elapsed() < TIMEOUT,
            "a new subscription did not rewrite the file within {TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let text = std::fs::read_to_string(&file).expect("the file");
    assert!(text.contains("\nwatchqd_subscriptions 1\n"), "{text}");
}
