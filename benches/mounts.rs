//! Mount events through watchqd against `findmnt --poll` (util-linux, what an
//! administrator runs) on the same storm, in one run, at three sizes of namespace.
//!
//! For a private mount namespace with 20, 1,000 and 10,000 extra mounts (bind mounts of
//! one tmpfs, made by one `perl` process with `mount(2)`, not one `mount` process each),
//! one process makes a storm of tmpfs mount+umount pairs (as fast as the kernel goes;
//! its start-up is outside every measurement: it waits for a go), and at the same time
//! - watchqd delivers them to one subscriber watching the namespace: changes reported
//!   (every `MountChanged` below the storm's mount point; a `Lost` is never counted as
//!   reported) and the daemon's CPU per change made;
//! - `findmnt --poll` runs in the namespace: changes it printed for the storm's mount
//!   point, and its CPU per change made.
//!
//! CPU is the sum of the on-CPU nanoseconds of every thread (`/proc/PID/task/*/schedstat`),
//! from the go to the last change reported. The daemon's mountinfo rereads, which serve
//! remounts and are paced in time rather than per change, are counted apart (the
//! `mountinfo-rereads` and `mountinfo-reread-us` counters of `Manager.Counters`, read
//! before and after): `flat` holds the attach/detach work alone, the CPU less the
//! rereads, to its bound, because whether a paced reread falls into a storm of 50 ms is
//! a matter of timing (one did in a CI run: 74 µs per change at 10,000 mounts, 17 µs
//! without it). The rereads get their own target: in the 10,000-mount namespace a
//! paced churn (a mount+umount pair every 10 ms for about 6 s) must leave them at most
//! the 2% of the time the module doc states.
//!
//! Then, in the 10,000-mount namespace, a remount storm: one process remounts 200 of
//! the extra mounts read-only, one each (`MS_REMOUNT|MS_BIND|MS_RDONLY`), and every
//! remount must be reported within the bound the README states (fanotify does not
//! report remounts, so they come from coalesced mountinfo rereads; see
//! `src/source/mounts/mod.rs`): the figure is the time from the storm's end to its last
//! remount event. After the paced churn, the same 200 are remounted read-write with a
//! busy loop (`perl`) on every core, which stretches the clock-timed pacing (a known
//! miss).
//!
//! Then two users, each in their own user namespace: one churning mounts, the other's
//! latency and the daemon's CPU measured with and without the churn (see
//! `mounts_users/mod.rs`).
//!
//! `-- --only=sizes`, `--only=remounts` (the 10,000-mount namespace alone) or
//! `--only=users` runs one part, for working on it.
//!
//! Each figure is held to a target of [`TARGETS`] and printed as MET or MISSED;
//! `cargo bench --bench mounts -- --check` exits non-zero when one is MISSED or was not
//! measured. Under `cargo test` (no `--bench` argument) it runs a small smoke version
//! (smaller namespaces) so that the benchmark cannot rot; it fails on nothing.

#[path = "../tests/common/mod.rs"]
#[allow(dead_code, clippy::all)]
mod common;
// (Shared with the delivery bench, which uses all of it.)
#[allow(dead_code)]
mod targets;
// The two users part.
mod mounts_users;

use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::{Daemon, Signal, Subscriber};
use targets::{Bound, Target, Verdicts};
use zbus::Variant;

/// The remount latency the README states for a namespace of 10,000 mounts.
const REMOUNT_BOUND_MS: f64 = 1000.0;

/// Busy loops per core during the loaded remount storm: every core busy.
const BURNERS_PER_CORE: usize = 1;

/// Every target of this benchmark, all measured in the same run.
const TARGETS: &[Target] = &[
    Target {
        id: "unreported",
        what: "attach/detach changes watchqd did not report, at all three sizes and in \
               the paced churn",
        bound: Bound::AtMost(0.0),
        known_miss: None,
    },
    Target {
        id: "flat",
        what: "watchqd CPU per attach/detach (its mountinfo rereads aside) at 10,000 extra \
               mounts as a multiple of that at 20",
        bound: Bound::AtMost(2.0),
        known_miss: None,
    },
    Target {
        id: "vs-findmnt",
        what: "10,000 extra mounts: watchqd CPU per change as a multiple of findmnt --poll's",
        bound: Bound::AtMost(0.5),
        known_miss: None,
    },
    Target {
        id: "reread-share",
        what: "10,000 extra mounts, a paced churn: mountinfo rereads' CPU as a percentage \
               of its time, the first and the last aside (the module doc's bound)",
        bound: Bound::AtMost(2.0),
        known_miss: None,
    },
    Target {
        id: "remounts-unreported",
        what: "remounts at 10,000 extra mounts that watchqd did not report",
        bound: Bound::AtMost(0.0),
        known_miss: None,
    },
    Target {
        id: "remount-latency",
        what: "10,000 extra mounts: ms from the remount storm's end to its last event \
               (the README's bound)",
        bound: Bound::AtMost(REMOUNT_BOUND_MS),
        known_miss: None,
    },
    Target {
        id: "remount-latency-loaded",
        what: "the same with a CPU burner on every core: ms from the storm's end to its \
               last event",
        bound: Bound::AtMost(REMOUNT_BOUND_MS),
        known_miss: Some(
            "met on this stop's runs (405 and 653 ms) and in some earlier CI runs (328 ms), \
             missed in others (1.1 to 3.4 s): the reread interval is 50x the last reread's \
             time by the clock, which the burners stretch; timed in the thread's CPU time \
             it made more rereads under a competing load and failed flat",
        ),
    },
    Target {
        id: "bob-unreported",
        what: "two users: bob's changes not reported, alone and during alice's storm",
        bound: Bound::AtMost(0.0),
        known_miss: None,
    },
    Target {
        id: "bob-p50",
        what: "two users: bob's p50 latency during alice's storm as a multiple of alone",
        bound: Bound::AtMost(2.0),
        known_miss: Some(
            "met on every run this stop, 0.8x to 1.9x (1.27x to 2.8x before groups were \
             read a slice per turn); near the bound under a competing build, so not yet a \
             gate",
        ),
    },
    Target {
        id: "bob-p99",
        what: "two users: bob's p99 latency during alice's storm as a multiple of alone",
        bound: Bound::AtMost(2.0),
        known_miss: Some(
            "1.0x to 3.9x on ten runs (0.69 to 1.50 ms against 0.39 to 0.8 ms; on a quiet CI \
             machine 1.50 ms against 0.39 ms; 98x to 276x before resyncs and large rereads \
             left the reader's task): alice's churn holds one of the 2 cores and the \
             kernel's mount namespace lock, and while a job works for her (her share, about \
             10% of the time) bob's wakeups compete for the other; not yet a gate",
        ),
    },
    Target {
        id: "users-cpu",
        what: "two users: daemon CPU during alice's storm as a multiple of the bound \
               (base x T + share x (T + 1 s); see benches/mounts_users)",
        bound: Bound::AtMost(1.0),
        // Met in every run on a quiet machine, but without margin (0.93 to 0.98; 1.19
        // once with another build running): printed, not yet a gate.
        known_miss: Some(
            "met without margin: 0.93x to 0.98x of the bound on a quiet 2-core machine, \
             1.19x once with other work running; where the last few percent go is not \
             yet measured",
        ),
    },
];

/// On-CPU time of every thread of a process, in nanoseconds (`schedstat`, exact where
/// `/proc/PID/stat`'s clock ticks are 10 ms coarse).
fn cpu_ns(pid: u32) -> u64 {
    fs::read_dir(format!("/proc/{pid}/task"))
        .expect("the process's threads")
        .filter_map(|task| {
            let text = fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
            text.split(' ').next()?.parse::<u64>().ok()
        })
        .sum()
}

/// Waits for a namespace holder (`unshare -m … sleep`) to be in its own namespace.
fn private_namespace() -> mounts_users::Reaped {
    let holder = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sleep", "1000"])
        .stdin(Stdio::null())
        .spawn()
        .expect("unshare");
    let pid = holder.id();
    let own = fs::read_link("/proc/self/ns/mnt").expect("own namespace");
    while fs::read_link(format!("/proc/{pid}/ns/mnt")).ok().as_ref() == Some(&own)
        || !fs::read_link(format!("/proc/{pid}/exe"))
            .map(|e| e.ends_with("sleep"))
            .unwrap_or(false)
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    mounts_users::Reaped(holder)
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
/// line on its stdin runs `body` (which makes mount(2) (165) and umount2(2) (166) calls
/// on x86_64).
fn waiting_perl(pid: u32, body: &str) -> Child {
    let script = format!("$| = 1; print \"ready\\n\"; <STDIN>; {body}");
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

/// A waiting `perl` that mounts a tmpfs at `point` and unmounts it again, `pairs` times,
/// pausing `pause_ms` after each pair (none if 0).
fn pairs_storm(pid: u32, point: &str, pairs: u64, pause_ms: u64) -> Child {
    let pause = if pause_ms == 0 {
        String::new()
    } else {
        format!("select(undef, undef, undef, {});", pause_ms as f64 / 1e3)
    };
    waiting_perl(
        pid,
        &format!(
            "my ($s, $d, $t) = (\"watchq-bench\", \"{point}\", \"tmpfs\"); \
             for (1..{pairs}) {{ syscall(165, $s, $d, $t, 0, 0) == 0 or die \"mount: $!\"; \
             syscall(166, $d, 0) == 0 or die \"umount: $!\"; {pause} }}"
        ),
    )
}

/// A waiting `perl` that remounts `{dir}/1` to `{dir}/{count}` with mount(2) `flags`.
fn remount_storm(pid: u32, dir: &str, count: u64, flags: u32) -> Child {
    waiting_perl(
        pid,
        &format!(
            "for my $i (1..{count}) {{ \
             syscall(165, 0, \"{dir}/$i\", 0, {flags}, 0) == 0 or die \"remount: $!\"; }}"
        ),
    )
}

fn go(child: &mut Child) {
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"go\n")
        .expect("go");
}

/// `findmnt --poll` in the namespace of `pid`, its output counted by a thread: lines
/// naming a mount point below `storm` are counted; a line naming `probe` is announced
/// once, so that the bench knows findmnt is polling.
struct Findmnt {
    child: Child,
    storm_lines: Arc<AtomicU64>,
    last_line: Arc<std::sync::Mutex<Instant>>,
    /// How often the probe was mounted or unmounted.
    probes: u64,
}

impl Findmnt {
    fn start(pid: u32, storm: &str, probe: &str) -> Findmnt {
        let mut child = Command::new("nsenter")
            .args(["-t", &pid.to_string(), "-m", "findmnt", "--poll", "--raw"])
            .args(["--noheadings", "-o", "ACTION,TARGET"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("findmnt (util-linux)");
        let stdout = child.stdout.take().expect("findmnt's stdout");
        let storm_lines = Arc::new(AtomicU64::new(0));
        let last_line = Arc::new(std::sync::Mutex::new(Instant::now()));
        let (probed, seen) = mpsc::channel();
        {
            let (storm, probe) = (storm.to_owned(), probe.to_owned());
            let (count, last) = (Arc::clone(&storm_lines), Arc::clone(&last_line));
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let target = line.split(' ').nth(1).unwrap_or("");
                    if target.starts_with(&storm) {
                        count.fetch_add(1, Ordering::Relaxed);
                        *last.lock().expect("lock") = Instant::now();
                    } else if target.starts_with(&probe) {
                        let _ = probed.send(());
                    }
                }
            });
        }
        // findmnt reads the table first and reports changes after: until it reports
        // one, one more probe is mounted (never unmounted, which could cancel out in
        // findmnt's diff; at 10,000 mounts one diff takes it seconds).
        let (mut reported, mut probes) = (false, 0);
        for _ in 0..60 {
            nsenter(
                pid,
                &format!("mkdir {probe}/{probes}; mount -t tmpfs watchq-probe {probe}/{probes}"),
            );
            probes += 1;
            if seen.recv_timeout(Duration::from_secs(2)).is_ok() {
                reported = true;
                break;
            }
        }
        assert!(reported, "findmnt --poll never reported a probe");
        Findmnt {
            child,
            storm_lines,
            last_line,
            probes,
        }
    }

    /// Waits until findmnt is idle: it printed nothing and used no CPU for `quiet`
    /// (one of its rescans of 10,000 mounts takes seconds).
    fn settle(&self, quiet: Duration) {
        loop {
            let cpu = cpu_ns(self.child.id());
            std::thread::sleep(quiet);
            let since = self.last_line.lock().expect("lock").elapsed();
            if since >= quiet && cpu_ns(self.child.id()) == cpu {
                return;
            }
        }
    }
}

impl Drop for Findmnt {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The figures of one namespace.
struct Run {
    extra: u64,
    lines: usize,
    changes: u64,
    reported: u64,
    lost: u64,
    daemon_us: f64,
    /// The storm's time, from the go to the last change reported.
    storm_ms: f64,
    /// Whole-mountinfo rereads during it (for remounts), and their CPU per change made.
    rereads: u64,
    reread_us: f64,
    findmnt_reported: u64,
    findmnt_us: f64,
    remount: Option<Remounts>,
}

impl Run {
    /// CPU per change made, less the mountinfo rereads: what the attaches and detaches
    /// themselves cost (the rereads, which serve remounts, are paced in time, so their
    /// share of a short storm is whether one fell into it; the paced churn measures them).
    fn attach_detach_us(&self) -> f64 {
        self.daemon_us - self.reread_us
    }
}

struct Remounts {
    made: u64,
    reported: u64,
    latency_ms: f64,
    daemon_us: f64,
    /// The second storm's, with CPU burners on every core.
    loaded_reported: u64,
    loaded_ms: f64,
    /// A paced churn of attaches and detaches afterwards, for the rereads' pacing.
    churn: Churn,
}

/// Mount+umount pairs at a steady pace for a few seconds: what the mountinfo rereads
/// (which serve remounts, and which every change's `POLLPRI` asks for) cost over time.
struct Churn {
    changes: u64,
    reported: u64,
    ms: f64,
    rereads: u64,
    reread_ms: f64,
}

impl Churn {
    /// The rereads' CPU as a percentage of the churn's time, the first and the last
    /// reread aside: the first follows a quiet spell, so it is immediate, and the pause
    /// the last one earns falls after the churn.
    fn share_percent(&self) -> f64 {
        let each = self.reread_ms / self.rereads.max(1) as f64;
        (self.reread_ms - 2.0 * each).max(0.0) / self.ms * 100.0
    }
}

/// Busy loops (`perl`), `per_core` for each online CPU, killed on drop: a loaded machine.
struct Burners(Vec<Child>);

impl Burners {
    fn start(per_core: usize) -> Burners {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        Burners(
            (0..per_core * cores)
                .map(|_| {
                    Command::new("perl")
                        .args(["-e", "1 while 1"])
                        .spawn()
                        .expect("perl")
                })
                .collect(),
        )
    }
}

impl Drop for Burners {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The storm's changes among `signals`: every attach and detach but the probe's. (An
/// attach is counted by its change, not its mount point: when the mount is gone before
/// `statmount` describes it, the event carries its id alone.)
fn storm_changes(signals: &[Signal], probe: &str) -> u64 {
    signals
        .iter()
        .filter(|s| {
            matches!(s, Signal::Mount { mount_point, change, .. }
                if !mount_point.starts_with(probe) && (change == "attach" || change == "detach"))
        })
        .count() as u64
}

fn probe_changes(signals: &[Signal], probe: &str) -> u64 {
    signals
        .iter()
        .filter(
            |s| matches!(s, Signal::Mount { mount_point, .. } if mount_point.starts_with(probe)),
        )
        .count() as u64
}

fn mount_events_below(signals: &[Signal], below: &str, change: &str) -> u64 {
    signals
        .iter()
        .filter(|s| {
            matches!(s, Signal::Mount { mount_point, change: c, .. }
                if mount_point.starts_with(below) && c == change)
        })
        .count() as u64
}

fn lost(signals: &[Signal]) -> u64 {
    signals
        .iter()
        .map(|s| match s {
            Signal::Lost { count, .. } => *count,
            _ => 0,
        })
        .sum()
}

/// One namespace of `extra` mounts and its storm of `pairs`; in the largest, `remounts`
/// (how many remounts, and the paced churn's pairs).
async fn run(daemon: &Daemon, extra: u64, pairs: u64, remounts: Option<(u64, u64)>) -> Run {
    let dir = tempfile::Builder::new()
        .prefix("watchq-bench-")
        .tempdir()
        .expect("tempdir");
    let holder = private_namespace();
    let pid = holder.0.id();
    let point = dir.path().join("storm");
    fs::create_dir(&point).expect("mkdir");
    let point = point.display().to_string();
    let probe = dir.path().join("probe");
    fs::create_dir(&probe).expect("mkdir");
    let probe = probe.display().to_string();
    let extra_dir = dir.path().join("extra");
    fs::create_dir(&extra_dir).expect("mkdir");
    let extra_dir = extra_dir.display().to_string();
    // One tmpfs and extra - 1 bind mounts of its directories (MS_BIND = 4096).
    nsenter(
        pid,
        &format!(
            "mount -t tmpfs watchq-extra {extra_dir}; \
             perl -e 'for my $i (1..{}) {{ my $d = \"{extra_dir}/$i\"; \
             mkdir $d or die \"mkdir: $!\"; \
             syscall(165, $d, $d, 0, 4096, 0) == 0 or die \"mount: $!\"; }}'",
            extra - 1
        ),
    );
    let mountinfo_path = format!("/proc/{pid}/mountinfo");
    let lines = fs::read_to_string(&mountinfo_path)
        .expect("mountinfo")
        .lines()
        .count();

    let mut sub = Subscriber::with_options(
        daemon,
        HashMap::from([("queue-depth", Variant::from(16384u32))]),
    )
    .await;
    sub.watch("mounts", 1, &[("pid", Variant::from(pid))]).await;
    let findmnt = Findmnt::start(pid, &point, &probe);
    let findmnt_pid = findmnt.child.id();
    let changes = 2 * pairs;
    let mut storm = pairs_storm(pid, &point, pairs, 0);

    // The probe's events are in before the go, so that the storm's are all that follow.
    let probes = findmnt.probes;
    sub.until("the probe's events", |signals| {
        probe_changes(signals, &probe) >= probes
    })
    .await;
    let counters_before = mounts_users::mounts_counters(daemon).await;
    let daemon_before = cpu_ns(daemon.pid());
    let findmnt_before = cpu_ns(findmnt_pid);
    let started = Instant::now();
    go(&mut storm);
    sub.until("the whole storm", |signals| {
        storm_changes(signals, &probe) + lost(signals) >= changes
    })
    .await;
    let daemon_cpu = cpu_ns(daemon.pid()) - daemon_before;
    let storm_ms = started.elapsed().as_secs_f64() * 1e3;
    let counters_after = mounts_users::mounts_counters(daemon).await;
    let grew = |name: &str| counters_after[name] - counters_before[name];
    assert!(
        storm.wait().expect("the storm").success(),
        "the storm failed"
    );
    findmnt.settle(Duration::from_millis(500));
    let findmnt_cpu = cpu_ns(findmnt_pid) - findmnt_before;
    let reported = storm_changes(&sub.received, &probe);
    let findmnt_reported = findmnt.storm_lines.load(Ordering::Relaxed);
    drop(findmnt);

    let remount = match remounts {
        Some((made, churn_pairs)) => {
            // MS_REMOUNT | MS_BIND | MS_RDONLY.
            let mut storm = remount_storm(pid, &extra_dir, made, 4129);
            let before = cpu_ns(daemon.pid());
            go(&mut storm);
            assert!(
                storm.wait().expect("the remounts").success(),
                "remounts failed"
            );
            let ended = Instant::now();
            let below = format!("{extra_dir}/");
            sub.until("every remount", |signals| {
                mount_events_below(signals, &below, "remount") + lost(signals) >= made
            })
            .await;
            let latency = ended.elapsed();
            let reported = mount_events_below(&sub.received, &below, "remount");
            let daemon_us = (cpu_ns(daemon.pid()) - before) as f64 / 1e3 / made as f64;
            // Before the loaded storm, whose rereads the burners stretch into long pauses;
            // after the one above, whose latency is measured after a quiet spell.
            let churn = churn(daemon, &mut sub, pid, &point, &probe, changes, churn_pairs).await;
            // The same mounts remounted read-write again (MS_REMOUNT | MS_BIND), with
            // every core busy: the pacing is by the clock, which the load stretches (a
            // known miss of the bound).
            let mut storm = remount_storm(pid, &extra_dir, made, 4128);
            let burners = Burners::start(BURNERS_PER_CORE);
            go(&mut storm);
            assert!(
                storm.wait().expect("the remounts").success(),
                "remounts failed"
            );
            let ended = Instant::now();
            sub.until("every remount under load", |signals| {
                mount_events_below(signals, &below, "remount") + lost(signals) >= 2 * made
            })
            .await;
            let loaded = ended.elapsed();
            drop(burners);
            Some(Remounts {
                made,
                reported,
                latency_ms: latency.as_secs_f64() * 1e3,
                daemon_us,
                loaded_reported: mount_events_below(&sub.received, &below, "remount") - reported,
                loaded_ms: loaded.as_secs_f64() * 1e3,
                churn,
            })
        }
        None => None,
    };
    let lost = lost(&sub.received);
    drop(holder);
    let per = |ns: u64| ns as f64 / 1e3 / changes as f64;
    Run {
        extra,
        lines,
        changes,
        reported,
        lost,
        daemon_us: per(daemon_cpu),
        storm_ms,
        rereads: grew("mountinfo-rereads"),
        reread_us: per(grew("mountinfo-reread-us") * 1000),
        findmnt_reported,
        findmnt_us: per(findmnt_cpu),
        remount,
    }
}

/// Pause between two mount+umount pairs of the paced churn, and how many pairs.
const CHURN_PAUSE_MS: u64 = 10;

/// A paced churn at `point` in the namespace of `pid` (see [`Churn`]); `earlier` storm
/// changes were reported before it.
async fn churn(
    daemon: &Daemon,
    sub: &mut Subscriber,
    pid: u32,
    point: &str,
    probe: &str,
    earlier: u64,
    pairs: u64,
) -> Churn {
    let changes = 2 * pairs;
    let mut storm = pairs_storm(pid, point, pairs, CHURN_PAUSE_MS);
    let before = mounts_users::mounts_counters(daemon).await;
    let started = Instant::now();
    go(&mut storm);
    sub.until("the paced churn", |signals| {
        storm_changes(signals, probe) + lost(signals) >= earlier + changes
    })
    .await;
    let ms = started.elapsed().as_secs_f64() * 1e3;
    let after = mounts_users::mounts_counters(daemon).await;
    assert!(
        storm.wait().expect("the churn").success(),
        "the churn failed"
    );
    let grew = |name: &str| after[name] - before[name];
    Churn {
        changes,
        reported: storm_changes(&sub.received, probe) - earlier,
        ms,
        rereads: grew("mountinfo-rereads"),
        reread_ms: grew("mountinfo-reread-us") as f64 / 1e3,
    }
}

fn describe(run: &Run) {
    println!(
        "{:>6} extra mounts ({} lines): watchqd {} of {} ({} lost) / {:.1} µs per change \
         ({} rereads, {:.1} µs of it; storm {:.0} ms); findmnt --poll {} of {} / {:.1} µs \
         per change",
        run.extra,
        run.lines,
        run.reported,
        run.changes,
        run.lost,
        run.daemon_us,
        run.rereads,
        run.reread_us,
        run.storm_ms,
        run.findmnt_reported,
        run.changes,
        run.findmnt_us,
    );
    if let Some(r) = &run.remount {
        println!(
            "       remount storm: watchqd {} of {} remounts, the last {:.0} ms after the \
             storm's end, {:.1} µs per remount; with every core busy: {} of {}, the last \
             {:.0} ms after",
            r.reported, r.made, r.latency_ms, r.daemon_us, r.loaded_reported, r.made, r.loaded_ms
        );
        let c = &r.churn;
        println!(
            "         paced churn: {} of {} changes over {:.0} ms (a pair every {CHURN_PAUSE_MS} \
             ms): {} rereads took {:.1} ms of CPU, {:.2}% of the time past the first and last",
            c.reported,
            c.changes,
            c.ms,
            c.rereads,
            c.reread_ms,
            c.share_percent()
        );
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> std::process::ExitCode {
    assert_eq!(
        std::env::consts::ARCH,
        "x86_64",
        "the storms use x86_64 syscall numbers"
    );
    let args: Vec<String> = std::env::args().collect();
    let quick = !args.iter().any(|a| a == "--bench");
    let check = args.iter().any(|a| a == "--check");
    // One part alone, for working on it (`-- --only=sizes` or `--only=users`): the other
    // part's targets are then not measured, which `--check` counts as a miss.
    let only = args.iter().find_map(|a| a.strip_prefix("--only="));
    let (pairs, mut sizes, remounts, churn_pairs) = if quick {
        (50, vec![20, 200, 1000], 50, 100)
    } else {
        (200, vec![20, 1000, 10_000], 200, 600)
    };
    // `--only=remounts`: the largest namespace alone (its storm and its remounts).
    if only == Some("remounts") {
        sizes.drain(..sizes.len() - 1);
    }
    println!(
        "mounts bench ({}): {pairs} mount+umount pairs per namespace, {remounts} remounts \
         at the largest",
        targets::run_kind(quick, check)
    );
    let mut verdicts = Verdicts::new(TARGETS).smoke(quick);
    if only.is_none_or(|o| o == "sizes" || o == "remounts") {
        let daemon = Daemon::start();
        let mut runs = Vec::new();
        for (i, &extra) in sizes.iter().enumerate() {
            let remounts = (i == sizes.len() - 1).then_some((remounts, churn_pairs));
            let run = run(&daemon, extra, pairs, remounts).await;
            describe(&run);
            runs.push(run);
        }
        let (small, large) = (&runs[0], &runs[runs.len() - 1]);
        let churned = runs
            .iter()
            .filter_map(|r| r.remount.as_ref())
            .map(|r| &r.churn);
        let unreported: u64 = runs.iter().map(|r| r.changes - r.reported).sum::<u64>()
            + churned.map(|c| c.changes - c.reported).sum::<u64>();
        println!(
            "{}",
            verdicts.target(
                "unreported",
                unreported as f64,
                &runs
                    .iter()
                    .map(|r| format!("{} of {}", r.reported, r.changes))
                    .collect::<Vec<_>>()
                    .join(", "),
            )
        );
        println!(
            "{}",
            verdicts.target(
                "flat",
                large.attach_detach_us() / small.attach_detach_us(),
                &format!(
                    "{:.1} µs / {:.1} µs; with the rereads {:.1} µs / {:.1} µs",
                    large.attach_detach_us(),
                    small.attach_detach_us(),
                    large.daemon_us,
                    small.daemon_us
                ),
            )
        );
        println!(
            "{}",
            verdicts.target(
                "vs-findmnt",
                large.daemon_us / large.findmnt_us,
                &format!("{:.1} µs / {:.1} µs", large.daemon_us, large.findmnt_us),
            )
        );
        if let Some(r) = &large.remount {
            println!(
                "{}",
                verdicts.target(
                    "remounts-unreported",
                    (2 * r.made - r.reported - r.loaded_reported) as f64,
                    &format!(
                        "{} of {}, {} of {} under load",
                        r.reported, r.made, r.loaded_reported, r.made
                    ),
                )
            );
            let c = &r.churn;
            println!(
                "{}",
                verdicts.target(
                    "reread-share",
                    c.share_percent(),
                    &format!(
                        "{} rereads, {:.1} ms of CPU in {:.0} ms; {} of {} changes reported",
                        c.rereads, c.reread_ms, c.ms, c.reported, c.changes
                    ),
                )
            );
            println!(
                "{}",
                verdicts.target(
                    "remount-latency",
                    r.latency_ms,
                    &format!("{:.0} ms", r.latency_ms)
                )
            );
            println!(
                "{}",
                verdicts.target(
                    "remount-latency-loaded",
                    r.loaded_ms,
                    &format!("{:.0} ms", r.loaded_ms)
                )
            );
        }
        drop(daemon);
    }
    if only.is_none_or(|o| o == "users") {
        let (extra, changes) = if quick { (200, 10) } else { (10_000, 300) };
        let users = mounts_users::run(extra, changes).await;
        mounts_users::describe(&users);
        let (alone, storm) = (&users.alone, &users.storm);
        println!(
            "{}",
            verdicts.target(
                "bob-unreported",
                (alone.unreported + storm.unreported) as f64,
                &format!(
                    "{} and {} of {}",
                    changes - alone.unreported,
                    changes - storm.unreported,
                    changes
                ),
            )
        );
        for (id, p) in [("bob-p50", 50), ("bob-p99", 99)] {
            let (with, without) = (storm.percentile_ms(p), alone.percentile_ms(p));
            println!(
                "{}",
                verdicts.target(
                    id,
                    with / without,
                    &format!("{with:.2} ms / {without:.2} ms")
                )
            );
        }
        println!(
            "{}",
            verdicts.target(
                "users-cpu",
                storm.daemon_cpu_s / users.bound_s,
                &format!(
                    "{:.0} ms / {:.0} ms",
                    storm.daemon_cpu_s * 1e3,
                    users.bound_s * 1e3
                ),
            )
        );
    }
    if !quick {
        println!("\n(reproduce: cargo bench --bench mounts [-- --check])");
    }
    let ok = !check || verdicts.passed();
    if ok {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
