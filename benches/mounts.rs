//! Mount events through watchqd against the same storm seen by a raw fanotify reader
//! (the ceiling) and by a monitor without events (one that rereads and parses the whole
//! mountinfo on every change), in one run, CPU against CPU.
//!
//! For a private mount namespace with its usual mounts and again with 1,000 extra mounts
//! in it, one process makes a storm of mount+umount pairs (as fast as the kernel goes;
//! its start-up is outside every measurement: it waits for a go), and
//! - watchqd delivers them to one subscriber: the daemon's CPU (utime+stime from
//!   `/proc/PID/stat`) per *delivered* `MountChanged` (a `Lost` count is reported, never
//!   counted as delivered), and delivered events/s from the go to the last signal;
//! - the ceiling, a thread of this process, reads the same namespace's fanotify group
//!   (`FAN_REPORT_MNT`, `FAN_MARK_MNTNS`, an unlimited queue), parses each record with the
//!   daemon's parser and describes each attached mount with `statmount` (what any correct
//!   fanotify monitor must do before the mount is gone): its thread CPU per event;
//! - the alternative, another thread of this process, reads and parses
//!   `/proc/PID/mountinfo` once per change: its thread CPU per change.
//!
//! Each figure is held to a target of [`TARGETS`] and printed as MET or MISSED;
//! `cargo bench --bench mounts -- --check` runs a shorter size and exits non-zero when
//! one is MISSED or was not measured. Under `cargo test` (no `--bench` argument) it runs
//! a small smoke version so that the benchmark cannot rot; it fails on nothing.

#[path = "../tests/common/mod.rs"]
#[allow(dead_code, clippy::all)]
mod common;
// (Shared with the delivery bench, which uses all of it.)
#[allow(dead_code)]
mod targets;

use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::{cpu_ticks, Daemon, Signal, Subscriber};
use nix::libc;
use targets::{Bound, Target, Verdicts};
use watchqd::source::mounts::wire;
use watchqd::sys::{fanotify, mount_api};
use zbus::Variant;

/// Every target of this benchmark; "the ceiling" is the raw fanotify reader, "the
/// rescan" the monitor that rereads mountinfo per change, both measured on the same
/// storm in the same run. The daemon's cost grows with the namespace where the
/// ceiling's does not: it also follows `/proc/PID/mountinfo` (`POLLPRI`, for remounts,
/// which fanotify does not report) and rereads and diffs the whole table when it fires.
/// Measured on a loaded 2-core machine, in three runs: 4.8-7.5x the ceiling at 21
/// mounts, 6.7-25.7x at 1,021 (the reread serves all the changes made meanwhile, so
/// the figure depends on how far the daemon falls behind), 0.03-0.10x the rescan there;
/// the limits leave about twice the worst.
const TARGETS: &[Target] = &[
    Target {
        id: "lost",
        what: "events lost through a queue deeper than the storm",
        bound: Bound::AtMost(0.0),
        known_miss: None,
    },
    Target {
        id: "vs-ceiling-small",
        what: "~20 mounts: daemon CPU per delivered event as a multiple of the ceiling's",
        bound: Bound::AtMost(12.0),
        known_miss: None,
    },
    Target {
        id: "vs-ceiling-large",
        what: "~1,000 mounts: daemon CPU per delivered event as a multiple of the ceiling's",
        bound: Bound::AtMost(50.0),
        known_miss: None,
    },
    Target {
        id: "vs-rescan-large",
        what:
            "~1,000 mounts: daemon CPU per delivered event as a multiple of the rescan's per change",
        bound: Bound::AtMost(0.5),
        known_miss: None,
    },
];

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ticks as f64
}

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec for the call to fill.
    let ret = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    assert_eq!(ret, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(
        u64::try_from(now.tv_sec).expect("seconds"),
        u32::try_from(now.tv_nsec).expect("nanoseconds"),
    )
}

/// What the ceiling reader saw: events, overflows, and its thread's CPU from the go to
/// its last event.
struct Ceiling {
    events: u64,
    overflows: u64,
    cpu: Duration,
}

/// The ceiling: a fanotify group on the namespace of `pid`, read and parsed with the
/// daemon's parser, each attached mount described by `statmount`. Sends `()` once
/// marked, then counts `expected` events (or gives up when `stop` is set).
fn ceiling_reader(
    pid: u32,
    expected: u64,
    ready: mpsc::Sender<()>,
    stop: Arc<AtomicBool>,
) -> Ceiling {
    let group = fanotify::init(
        fanotify::FAN_CLASS_NOTIF
            | fanotify::FAN_CLOEXEC
            | fanotify::FAN_REPORT_MNT
            | fanotify::FAN_UNLIMITED_QUEUE,
    )
    .expect("fanotify_init(FAN_REPORT_MNT)");
    let ns = mount_api::open_namespace(&format!("/proc/{pid}/ns/mnt")).expect("the namespace");
    fanotify::mark(
        group.as_fd(),
        fanotify::FAN_MARK_ADD | fanotify::FAN_MARK_MNTNS,
        wire::FAN_MNT_ATTACH | wire::FAN_MNT_DETACH,
        ns.as_raw_fd(),
        None,
    )
    .expect("fanotify_mark(FAN_MARK_MNTNS)");
    let ns_id = mount_api::namespace_id(ns.as_fd()).expect("ioctl(NS_GET_MNTNS_ID)");
    ready.send(()).expect("the bench waits");
    let start = thread_cpu();
    let mut end = start;
    let (mut events, mut overflows) = (0u64, 0u64);
    let mut buf = vec![0u8; 16 * 1024];
    let mut described = vec![0u64; 512];
    while events < expected && !stop.load(Ordering::Relaxed) {
        let mut poll = libc::pollfd {
            fd: group.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut poll, 1, 100) } <= 0 {
            continue;
        }
        let n = nix::unistd::read(&group, &mut buf).expect("reading the fanotify group");
        for event in wire::fanotify_events(&buf[..n]).expect("fanotify records") {
            events += 1;
            match event.notice {
                wire::MountNotice::Attach(id) | wire::MountNotice::Move(id) => {
                    // Gone already (its detach is queued): what a monitor would meet too.
                    if let Ok(bytes) =
                        mount_api::statmount(id, ns_id, wire::STATMOUNT_WANTED, &mut described)
                    {
                        let _ = wire::parse_statmount(&bytes);
                    }
                }
                wire::MountNotice::Overflow => overflows += 1,
                _ => {}
            }
        }
        end = thread_cpu();
    }
    Ceiling {
        events,
        overflows,
        cpu: end - start,
    }
}

/// Waits for a namespace holder (`unshare -m … sleep`) to be in its own namespace.
fn private_namespace() -> std::process::Child {
    let holder = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sleep", "1000"])
        .stdin(Stdio::null())
        .spawn()
        .expect("unshare");
    let pid = holder.id();
    let own = fs::read_link("/proc/self/ns/mnt").unwrap();
    while fs::read_link(format!("/proc/{pid}/ns/mnt")).ok().as_ref() == Some(&own)
        || !fs::read_link(format!("/proc/{pid}/exe"))
            .map(|e| e.ends_with("sleep"))
            .unwrap_or(false)
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    holder
}

fn nsenter(pid: u32, script: &str) {
    let out = Command::new("nsenter")
        .args(["-t", &pid.to_string(), "-m", "sh", "-ec", script])
        .output()
        .expect("nsenter");
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `perl` in the namespace of `pid`, started and waiting: it prints `ready`, and on a
/// line on its stdin makes `rounds` mount(2) (165) + umount2(2) (166) pairs on x86_64.
fn storm(pid: u32, point: &str, rounds: u64) -> std::process::Child {
    let script = format!(
        "$| = 1; my ($s, $d, $t) = (\"watchq-bench\", \"{point}\", \"tmpfs\"); \
         print \"ready\\n\"; <STDIN>; \
         for (1..{rounds}) {{ syscall(165, $s, $d, $t, 0, 0) == 0 or die \"mount: $!\"; \
         syscall(166, $d, 0) == 0 or die \"umount: $!\"; }}"
    );
    let mut child = Command::new("nsenter")
        .args(["-t", &pid.to_string(), "-m", "perl", "-e", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("nsenter perl");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("the storm's ready");
    assert_eq!(line.trim(), "ready", "the storm did not start");
    child
}

/// The figures of one namespace.
struct Run {
    lines: usize,
    produced: u64,
    delivered: u64,
    lost: u64,
    daemon_us: f64,
    rate: f64,
    ceiling_us: f64,
    ceiling_events: u64,
    rescan_us: f64,
}

async fn run(daemon: &Daemon, extra_mounts: u64, rounds: u64) -> Run {
    let dir = tempfile::Builder::new()
        .prefix("watchq-bench-")
        .tempdir()
        .expect("tempdir");
    let mut holder = private_namespace();
    let pid = holder.id();
    let point = dir.path().join("storm");
    fs::create_dir(&point).unwrap();
    let point = point.display().to_string();
    if extra_mounts > 0 {
        let extra = dir.path().join("extra");
        fs::create_dir(&extra).unwrap();
        let extra = extra.display().to_string();
        nsenter(
            pid,
            &format!(
                "mount -t tmpfs watchq-extra {extra}; \
                 perl -e 'for my $i (0..{}) {{ my ($s, $d, $t) = (\"watchq-extra\", \"{extra}/$i\", \"tmpfs\"); \
                 mkdir $d or die \"mkdir: $!\"; \
                 syscall(165, $s, $d, $t, 0, 0) == 0 or die \"mount: $!\"; }}'",
                extra_mounts - 2
            ),
        );
    }
    let mountinfo_path = format!("/proc/{pid}/mountinfo");
    let lines = fs::read_to_string(&mountinfo_path).unwrap().lines().count();

    let mut sub = Subscriber::with_options(
        daemon,
        HashMap::from([("queue-depth", Variant::from(16384u32))]),
    )
    .await;
    sub.watch("mounts", 1, &[("pid", Variant::from(pid))]).await;
    let produced = 2 * rounds;
    let (ready_tx, ready) = mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || ceiling_reader(pid, produced, ready_tx, stop))
    };
    ready
        .recv_timeout(Duration::from_secs(10))
        .expect("the ceiling reader's mark");
    let mut perl = storm(pid, &point, rounds);

    let cpu_before = cpu_ticks(daemon.pid());
    let start = Instant::now();
    perl.stdin
        .take()
        .expect("stdin")
        .write_all(b"go\n")
        .expect("go");
    let delivered = |signals: &[Signal]| -> u64 {
        signals
            .iter()
            .filter(|s| matches!(s, Signal::Mount { .. }))
            .count() as u64
    };
    let lost = |signals: &[Signal]| -> u64 {
        signals
            .iter()
            .map(|s| match s {
                Signal::Lost { count, .. } => *count,
                _ => 0,
            })
            .sum()
    };
    sub.until("the whole storm", |signals| {
        delivered(signals) + lost(signals) >= produced
    })
    .await;
    let elapsed = start.elapsed();
    let cpu = (cpu_ticks(daemon.pid()) - cpu_before) as f64 / ticks_per_second();
    assert!(
        perl.wait().expect("the storm").success(),
        "the storm failed"
    );
    let (delivered, lost) = (delivered(&sub.received), lost(&sub.received));
    let ceiling = {
        // Everything the daemon got, the reader had too; a second more is generous.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !reader.is_finished() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.store(true, Ordering::Relaxed);
        reader.join().expect("the ceiling reader")
    };
    assert_eq!(
        ceiling.overflows, 0,
        "the ceiling reader's unlimited queue overflowed"
    );
    assert_eq!(ceiling.events, produced, "the ceiling reader missed events");

    // The alternative: a full mountinfo rescan per change, on a thread of its own.
    let path = mountinfo_path.clone();
    let rescan = std::thread::spawn(move || {
        let start = thread_cpu();
        let mut parsed = 0usize;
        for _ in 0..produced {
            let text = fs::read_to_string(&path).unwrap();
            parsed += wire::parse_mountinfo(&text).unwrap().len();
        }
        assert!(parsed > 0);
        thread_cpu() - start
    })
    .join()
    .expect("the rescan");
    let _ = holder.kill();
    let _ = holder.wait();
    let per = |total: f64, n: u64| total * 1e6 / n.max(1) as f64;
    Run {
        lines,
        produced,
        delivered,
        lost,
        daemon_us: per(cpu, delivered),
        rate: delivered as f64 / elapsed.as_secs_f64(),
        ceiling_us: per(ceiling.cpu.as_secs_f64(), ceiling.events),
        ceiling_events: ceiling.events,
        rescan_us: per(rescan.as_secs_f64(), produced),
    }
}

fn describe(run: &Run) {
    println!(
        "namespace of {} mounts, {} events: watchqd delivered {} ({} lost), {:.0} events/s, \
         daemon CPU {:.1} µs per delivered event; ceiling (raw fanotify + statmount) {:.1} µs \
         per event ({} events); mountinfo rescan {:.1} µs per change",
        run.lines,
        run.produced,
        run.delivered,
        run.lost,
        run.rate,
        run.daemon_us,
        run.ceiling_us,
        run.ceiling_events,
        run.rescan_us,
    );
    println!(
        "  daemon / ceiling {:.1}x; daemon / rescan {:.2}x",
        run.daemon_us / run.ceiling_us,
        run.daemon_us / run.rescan_us
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> std::process::ExitCode {
    assert_eq!(
        std::env::consts::ARCH,
        "x86_64",
        "the storm uses x86_64 syscall numbers"
    );
    let args: Vec<String> = std::env::args().collect();
    let quick = !args.iter().any(|a| a == "--bench");
    let check = args.iter().any(|a| a == "--check");
    let (rounds, extra) = if quick {
        (50, 100)
    } else if check {
        (2000, 1000)
    } else {
        (5000, 1000)
    };
    println!(
        "mounts bench ({}): {rounds} mount+umount pairs per run",
        targets::run_kind(quick, check)
    );
    let daemon = Daemon::start();
    let small = run(&daemon, 0, rounds).await;
    describe(&small);
    let large = run(&daemon, extra, rounds).await;
    describe(&large);
    let mut verdicts = Verdicts::new(TARGETS).smoke(quick);
    println!(
        "{}",
        verdicts.target(
            "lost",
            (small.lost + large.lost) as f64,
            &format!("{} and {}", small.lost, large.lost),
        )
    );
    println!(
        "{}",
        verdicts.target(
            "vs-ceiling-small",
            small.daemon_us / small.ceiling_us,
            &format!("{:.1} µs / {:.1} µs", small.daemon_us, small.ceiling_us),
        )
    );
    println!(
        "{}",
        verdicts.target(
            "vs-ceiling-large",
            large.daemon_us / large.ceiling_us,
            &format!("{:.1} µs / {:.1} µs", large.daemon_us, large.ceiling_us),
        )
    );
    println!(
        "{}",
        verdicts.target(
            "vs-rescan-large",
            large.daemon_us / large.rescan_us,
            &format!("{:.1} µs / {:.1} µs", large.daemon_us, large.rescan_us),
        )
    );
    if !quick {
        println!("\n(reproduce: cargo bench --bench mounts [-- --check])");
    }
    let ok = !check || verdicts.passed();
    drop(daemon);
    if ok {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
