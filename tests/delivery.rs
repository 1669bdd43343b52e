//! Delivery that never blocks: a subscriber that stops reading costs the daemon a bounded
//! outbox, delays nobody, and later learns exactly what it missed.
//!
//! "Delays nobody" is measured, not assumed: the fast subscriber's time per batch with the
//! stalled one present is compared with its time per batch, in the same run, before the
//! stalled one existed. No speed target lives here (those are in `benches/`); only a
//! generous ratio between two halves of one run.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{kill, Signal as Sig};
use nix::unistd::Pid;
use zbus::Variant;

const EVENTS: usize = 10_000;
const BATCH: usize = 500;
/// Batches the fast subscriber receives alone, before the stalled one exists: the
/// baseline its later delivery is compared with.
const BASELINE_BATCHES: usize = 10;
/// How much slower than alone the fast subscriber may be while another one is stalled.
/// Generous: the machine is shared and has two cores, and the daemon now also fills and
/// counts a second outbox.
const SLOWDOWN: u32 = 3;
/// The bound never falls below this per batch, so that a tiny baseline (a quiet moment)
/// does not make a hiccup of a few milliseconds fail the test.
const FLOOR_PER_BATCH: Duration = Duration::from_millis(100);

/// Sends `batches` batches of `BATCH` real uevents for `disk`, each one only after `fast`
/// received all of the previous one, and returns how long each batch took from its first
/// write to its last signal.
async fn timed_batches(fast: &mut Subscriber, disk: &str, batches: usize) -> Vec<Duration> {
    let mut times = Vec::with_capacity(batches);
    for _ in 0..batches {
        let expected = fast.received.len() + BATCH;
        let name = disk.to_owned();
        let start = Instant::now();
        tokio::task::spawn_blocking(move || {
            for _ in 0..BATCH {
                std::fs::write(format!("/sys/block/{name}/uevent"), "change").unwrap();
            }
        })
        .await
        .unwrap();
        fast.until("the batch", |s| s.len() >= expected).await;
        times.push(start.elapsed());
    }
    times
}

fn process_state(pid: u32) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // The state follows the command name in parentheses.
    stat.rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next())
        .expect("state")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_subscriber_loses_exactly_what_it_missed_and_delays_nobody() {
    let daemon = Daemon::start();
    let disk = LoopDevice::attach(4);

    let mut fast = Subscriber::with_options(
        &daemon,
        HashMap::from([("queue-depth", Variant::from(4096u32))]),
    )
    .await;
    fast.watch("devices", 1, &[("name", Variant::from(disk.name.as_str()))])
        .await;
    // The baseline: the fast subscriber alone.
    let alone = timed_batches(&mut fast, &disk.name, BASELINE_BATCHES).await;
    assert_eq!(fast.received.len(), BASELINE_BATCHES * BATCH);

    // The stalled subscriber is a real client process, stopped with SIGSTOP: it reads
    // nothing, answers no Ping, and its socket fills up.
    let mut stalled = stalled_monitor(&daemon, &disk.name, 100);
    let stalled_pid = Pid::from_raw(stalled.id() as i32);

    let rss_before = daemon.rss_kib();

    // Real kernel uevents, in batches the fast subscriber keeps up with, so that what
    // the daemon holds is what the stalled one costs.
    let beside_stalled = timed_batches(&mut fast, &disk.name, EVENTS / BATCH).await;
    // Everything reached the fast subscriber while the other one was still stopped.
    assert_eq!(process_state(stalled.id()), 'T');
    assert_eq!(fast.received.len(), BASELINE_BATCHES * BATCH + EVENTS);
    assert!(fast
        .received
        .iter()
        .all(|s| matches!(s, Signal::Device { .. })));
    assert_contiguous(&fast.received);
    // And no later than it would have alone: the mean batch time beside the stalled
    // subscriber within SLOWDOWN times the mean alone (or the floor).
    let mean = |times: &[Duration]| {
        times.iter().sum::<Duration>() / u32::try_from(times.len()).expect("a few batches")
    };
    let (alone_mean, stalled_mean) = (mean(&alone), mean(&beside_stalled));
    let bound = (alone_mean * SLOWDOWN).max(FLOOR_PER_BATCH);
    let slowest = beside_stalled.iter().max().expect("batches");
    println!(
        "batch of {BATCH}: alone mean {alone_mean:?}, beside a stalled subscriber mean \
         {stalled_mean:?} (slowest {slowest:?}), bound {bound:?}"
    );
    assert!(
        stalled_mean <= bound,
        "the stalled subscriber delays the fast one: a batch of {BATCH} took {stalled_mean:?} \
         on average beside it, {alone_mean:?} alone (bound {bound:?}); batches: {beside_stalled:?}"
    );
    let rss_after = daemon.rss_kib();
    assert!(
        rss_after < rss_before + 8 * 1024,
        "daemon RSS grew from {rss_before} KiB to {rss_after} KiB"
    );

    // Resume it: it reads what the bus held, then the rest of its outbox, then Lost.
    kill(stalled_pid, Sig::SIGCONT).unwrap();
    let rx = common::lines::lines(stalled.stdout.take().unwrap());
    let (mut events, mut lost, mut next_seq) = (0u64, 0u64, 1u64);
    let mut lost_signals = 0;
    while events + lost < EVENTS as u64 {
        let line = rx.recv_timeout(TIMEOUT).unwrap_or_else(|_| {
            panic!("stalled subscriber saw {events} events + {lost} lost of {EVENTS}")
        });
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        let seq = value["seq"].as_u64().unwrap();
        assert_eq!(seq, next_seq, "gap or repeat in {line}");
        match value["signal"].as_str().unwrap() {
            "DeviceChanged" => {
                events += 1;
                next_seq += 1;
            }
            "Lost" => {
                assert_eq!(value["reason"], "queue-full");
                let count = value["count"].as_u64().unwrap();
                lost += count;
                lost_signals += 1;
                next_seq += count;
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(events + lost, EVENTS as u64);
    assert!(lost > 0 && lost_signals >= 1, "it must have lost events");
    assert!(events >= 100, "it keeps its queue's worth: {events}");
    kill(stalled_pid, Sig::SIGINT).unwrap();
    let status = stalled.wait().unwrap();
    assert!(status.success(), "watchqctl exited with {status}");
    assert!(
        rx.recv_timeout(Duration::from_millis(200)).is_err(),
        "nothing after the count"
    );
}
