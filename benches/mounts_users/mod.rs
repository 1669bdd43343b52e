//! The mounts bench's two users (issue 22): one user's storm must not cost another
//! user's latency, nor the daemon more than the first user's share.
//!
//! Two unprivileged test users, each in a user and mount namespace of their own
//! (`unshare -Urm`, as any user may make one), each with their own `watchqctl monitor`
//! watching their own namespace (started in the namespace by root's `nsenter -m`, then
//! run as the user, so that the bus authenticates the user's uid and the daemon takes
//! the watch as the user's own, through polkit):
//! - **alice** has `extra` bind mounts in hers (10,000 in the full run) and, in the
//!   second half, churns tmpfs mount+umount pairs from inside it (`perl`, mount(2) and
//!   umount2(2), as alice) as fast as the kernel goes;
//! - **bob** makes a slow, regular series of changes in his (a tmpfs mounted and
//!   unmounted again, one change every [`BOB_INTERVAL`]), as bob, from inside it.
//!
//! Bob's latency is, per change, the time from the syscall's return (`CLOCK_MONOTONIC`,
//! printed by his `perl`) to his `watchqctl` printing the event (the same clock, read
//! by the bench as the line arrives): p50 and p99 of the series, first without alice's
//! storm, then with it, in the same run and the same daemon.
//!
//! The daemon's CPU (every thread's `schedstat`) is measured over each of bob's series;
//! during alice's storm it must stay within
//!
//! ```text
//! bound = base × T + share × (T + 1 s)
//! ```
//!
//! where `T` is the storm series' wall time, `base` the daemon's CPU per second during
//! the series without alice (bob's own work and what the daemon costs idle), and `share`
//! alice's `[sources.mounts] user_cpu_percent` of one CPU ([`USER_CPU_PERCENT`]), with
//! one second's worth more because a user may spend a full bucket at once (see
//! `src/source/mounts/budget.rs`). Alice's storm starts [`WARM_UP`] before bob's series,
//! so her first burst and the throttle's first turn are behind it.
//!
//! The figures include what alice's monitor saw (events, `Lost(kernel-overflow)`) and
//! what the Manager's `Counters` (what `watchqctl status` prints) counted during her
//! storm, so that a reader sees the throttle engaged.

use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::common::{self, polkit::User, Daemon};
use super::cpu_ns;

/// Context switches of every thread of a process (voluntary and not): how often the
/// daemon woke, which work that is not charged to anyone still costs.
fn switches(pid: u32) -> u64 {
    fs::read_dir(format!("/proc/{pid}/task"))
        .expect("the process's threads")
        .filter_map(|task| fs::read_to_string(task.ok()?.path().join("status")).ok())
        .flat_map(|status| {
            status
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}

/// Alice's share, the daemon's configuration in this part.
pub const USER_CPU_PERCENT: u8 = 10;

/// Between two of bob's changes.
pub const BOB_INTERVAL: Duration = Duration::from_millis(30);

/// From the start of alice's storm to the start of bob's series measured with it.
const WARM_UP: Duration = Duration::from_millis(1500);

/// How long bob's events may take at most before the missing ones are counted as
/// unreported (a figure held to 0, never a pass).
const EVENT_WAIT: Duration = Duration::from_secs(30);

/// `CLOCK_MONOTONIC` in seconds, the clock `perl`'s `Time::HiRes` reads too.
fn monotonic() -> f64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| Duration::from(t).as_secs_f64())
        .expect("CLOCK_MONOTONIC")
}

/// Kills and reaps on drop (a panic included: a namespace holder left behind would keep
/// the bench's output pipe open).
pub struct Reaped(pub Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A process of `user` alone in a user and mount namespace of its own.
fn user_namespace(user: &User) -> Reaped {
    let holder = Command::new("setpriv")
        .arg(format!("--reuid={}", user.uid))
        .arg(format!("--regid={}", user.gid))
        .args([
            "--clear-groups",
            "unshare",
            "-Urm",
            "--propagation",
            "private",
        ])
        .args(["sleep", "1000"])
        .stdin(Stdio::null())
        .spawn()
        .expect("setpriv, unshare (util-linux)");
    let pid = holder.id();
    let own = fs::read_link("/proc/self/ns/mnt").expect("own namespace");
    let deadline = Instant::now() + common::TIMEOUT;
    while fs::read_link(format!("/proc/{pid}/ns/mnt")).ok().as_ref() == Some(&own)
        || !fs::read_link(format!("/proc/{pid}/exe"))
            .map(|e| e.ends_with("sleep"))
            .unwrap_or(false)
    {
        assert!(
            Instant::now() < deadline,
            "{}'s user namespace did not start",
            user.name
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    Reaped(holder)
}

/// `program` run as `user` inside the user and mount namespace of `pid` (the user's
/// own: entering it needs no privilege), as its root, which is the user.
fn as_user_inside(user: &User, pid: u32, program: &[&str]) -> Command {
    let mut command = Command::new("setpriv");
    command
        .arg(format!("--reuid={}", user.uid))
        .arg(format!("--regid={}", user.gid))
        .args(["--clear-groups", "nsenter", "-t", &pid.to_string()])
        .args(["-U", "-m", "--preserve-credentials"])
        .args(program);
    command
}

fn succeed(command: &mut Command, what: &str) {
    let out = command.output().expect(what);
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A directory below a temporary one, both the user's.
fn user_dir(user: &User) -> (tempfile::TempDir, String) {
    let dir = tempfile::Builder::new()
        .prefix("watchq-bench-")
        .tempdir()
        .expect("tempdir");
    std::os::unix::fs::chown(dir.path(), Some(user.uid), Some(user.gid)).expect("chown");
    let path = dir.path().display().to_string();
    (dir, path)
}

/// The user's `watchqctl monitor --json mounts`, in the namespace of `pid` and as the
/// user (root enters the mount namespace only, so the process stays in the host's user
/// namespace and the bus authenticates the user's own uid); each line it prints, with
/// the `CLOCK_MONOTONIC` time it arrived at.
struct Monitor {
    _child: Reaped,
    lines: mpsc::Receiver<(f64, serde_json::Value)>,
}

impl Monitor {
    fn start(daemon: &Daemon, user: &User, pid: u32) -> Monitor {
        let pid = pid.to_string();
        let mut child = common::mounts::monitor_as(daemon, user, &["nsenter", "-t", &pid, "-m"]);
        let stdout = child.stdout.take().expect("stdout");
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let at = monotonic();
                let value = serde_json::from_str(&line).expect("watchqctl's JSON");
                if sender.send((at, value)).is_err() {
                    break;
                }
            }
        });
        Monitor {
            _child: Reaped(child),
            lines,
        }
    }
}

/// Bob's `perl`: one change (mount, then unmount, of a tmpfs on `point`) per line on
/// its stdin, printing the `CLOCK_MONOTONIC` time the syscall returned.
struct Changer {
    _child: Reaped,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Changer {
    fn start(user: &User, pid: u32, point: &str) -> Changer {
        let script = format!(
            "use Time::HiRes qw(clock_gettime CLOCK_MONOTONIC); $| = 1; \
             my ($s, $d, $t, $on) = (\"watchq-bob\", \"{point}\", \"tmpfs\", 0); \
             print \"ready\\n\"; \
             while (<STDIN>) {{ \
               if ($on) {{ syscall(166, $d, 0) == 0 or die \"umount: $!\"; }} \
               else {{ syscall(165, $s, $d, $t, 0, 0) == 0 or die \"mount: $!\"; }} \
               $on = !$on; printf \"%.9f\\n\", clock_gettime(CLOCK_MONOTONIC); }}"
        );
        let mut child = as_user_inside(user, pid, &["perl", "-e", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("perl");
        let stdin = child.stdin.take().expect("stdin");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("bob's perl");
        assert_eq!(line.trim(), "ready", "bob's perl did not start");
        Changer {
            _child: Reaped(child),
            stdin,
            stdout,
        }
    }

    /// One change; the time it was made.
    fn change(&mut self) -> f64 {
        self.stdin.write_all(b"\n").expect("to bob's perl");
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("bob's perl");
        line.trim()
            .parse()
            .unwrap_or_else(|_| panic!("bob's change failed: {line:?}"))
    }
}

/// One of bob's series.
pub struct Series {
    /// Latency per change reported, in ms, sorted.
    latencies_ms: Vec<f64>,
    pub unreported: u64,
    /// Daemon CPU over the series, in seconds, and the series' wall time.
    pub daemon_cpu_s: f64,
    pub wall_s: f64,
    /// The daemon's context switches over the series.
    pub daemon_switches: u64,
}

impl Series {
    /// The latency `p` percent of the changes reported were within (nearest rank).
    pub fn percentile_ms(&self, p: usize) -> f64 {
        if self.latencies_ms.is_empty() {
            return f64::NAN;
        }
        let rank = (p * self.latencies_ms.len()).div_ceil(100);
        self.latencies_ms[rank.clamp(1, self.latencies_ms.len()) - 1]
    }
}

fn series(daemon: &Daemon, bob: &mut Changer, monitor: &Monitor, n: u64) -> Series {
    // Anything before (the previous series' tail) is not this series'.
    while monitor.lines.try_recv().is_ok() {}
    let cpu_before = cpu_ns(daemon.pid());
    let switches_before = switches(daemon.pid());
    let started = Instant::now();
    let mut made = Vec::new();
    for k in 0..n {
        let at = started + BOB_INTERVAL * u32::try_from(k).expect("a small series");
        std::thread::sleep(at.saturating_duration_since(Instant::now()));
        made.push(bob.change());
    }
    let mut received = Vec::new();
    let deadline = Instant::now() + EVENT_WAIT;
    while (received.len() as u64) < n {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok((at, value)) = monitor.lines.recv_timeout(left) else {
            break;
        };
        // Every MountChanged is bob's: his monitor watches his namespace, where nothing
        // else changes. (Not matched by mount point: an attach described after its
        // detach carries the mount's id alone.)
        if value["signal"] == "MountChanged" {
            received.push(at);
        }
    }
    let wall_s = started.elapsed().as_secs_f64();
    let daemon_cpu_s = (cpu_ns(daemon.pid()) - cpu_before) as f64 / 1e9;
    let daemon_switches = switches(daemon.pid()) - switches_before;
    let mut latencies_ms: Vec<f64> = made
        .iter()
        .zip(&received)
        .map(|(made, got)| (got - made) * 1e3)
        .collect();
    latencies_ms.sort_by(f64::total_cmp);
    Series {
        latencies_ms,
        unreported: n - received.len() as u64,
        daemon_cpu_s,
        wall_s,
        daemon_switches,
    }
}

/// The figures of this part.
pub struct Figures {
    pub extra: u64,
    pub bob_changes: u64,
    pub alone: Series,
    pub storm: Series,
    /// `base × T + share × (T + 1 s)`, in CPU seconds.
    pub bound_s: f64,
    pub alice_changes: u64,
    pub alice_events: u64,
    pub alice_lost: u64,
    /// The mounts source's counters' growth during the storm.
    pub counters: Vec<(String, u64)>,
}

/// The mounts source's counters, as `watchqctl status` prints them.
pub async fn mounts_counters(daemon: &Daemon) -> HashMap<String, u64> {
    let conn = daemon.connect().await;
    let manager = watchqd::client::ManagerProxy::builder(&conn)
        .build()
        .await
        .expect("manager proxy");
    manager
        .counters()
        .await
        .expect("Counters")
        .into_iter()
        .filter(|(source, _, _)| source == "mounts")
        .map(|(_, name, value)| (name, value))
        .collect()
}

pub async fn run(extra: u64, bob_changes: u64) -> Figures {
    let daemon = Daemon::with_polkit(&format!(
        "[sources.mounts]\nuser_cpu_percent = {USER_CPU_PERCENT}\n"
    ));
    let alice = common::polkit::user("watchq-alice");
    let bob = common::polkit::user("watchq-bob");

    // Alice's namespace and her mounts, made by her.
    let (_alice_dir, alice_path) = user_dir(&alice);
    let alice_ns = user_namespace(&alice);
    let alice_pid = alice_ns.0.id();
    let (many, storm) = (format!("{alice_path}/many"), format!("{alice_path}/storm"));
    succeed(
        as_user_inside(&alice, alice_pid, &["sh", "-ec"]).arg(format!(
            "mkdir {many} {storm}; mount -t tmpfs watchq-many {many}; \
             perl -e 'for my $i (1..{extra}) {{ my $d = \"{many}/$i\"; \
             mkdir $d or die \"mkdir: $!\"; \
             syscall(165, $d, $d, 0, 4096, 0) == 0 or die \"mount: $!\"; }}'"
        )),
        "alice's mounts",
    );
    let alice_monitor = Monitor::start(&daemon, &alice, alice_pid);

    // Bob's.
    let (_bob_dir, bob_path) = user_dir(&bob);
    let bob_ns = user_namespace(&bob);
    let bob_pid = bob_ns.0.id();
    let point = format!("{bob_path}/point");
    succeed(
        &mut as_user_inside(&bob, bob_pid, &["mkdir", &point]),
        "bob's mount point",
    );
    let bob_monitor = Monitor::start(&daemon, &bob, bob_pid);
    let mut changer = Changer::start(&bob, bob_pid, &point);
    if bob_changes % 2 == 1 {
        panic!("bob's series must end unmounted: an even number of changes");
    }

    let alone = series(&daemon, &mut changer, &bob_monitor, bob_changes);

    // Alice's storm, until the end of bob's second series.
    let counters_before = mounts_counters(&daemon).await;
    while alice_monitor.lines.try_recv().is_ok() {}
    let churn = format!(
        "$| = 1; my ($s, $d, $t, $n) = (\"watchq-storm\", \"{storm}\", \"tmpfs\", 0); \
         $SIG{{TERM}} = sub {{ print \"$n\\n\"; exit 0 }}; \
         while (1) {{ syscall(165, $s, $d, $t, 0, 0) == 0 or die \"mount: $!\"; \
         syscall(166, $d, 0) == 0 or die \"umount: $!\"; $n += 2; }}"
    );
    let churner = as_user_inside(&alice, alice_pid, &["perl", "-e", &churn])
        .stdout(Stdio::piped())
        .spawn()
        .expect("alice's storm");
    std::thread::sleep(WARM_UP);
    let storm_series = series(&daemon, &mut changer, &bob_monitor, bob_changes);
    // SIGTERM to perl, which prints its count: setpriv and nsenter exec'd it (nsenter
    // forks only to enter a pid namespace), so it has the child's pid.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(churner.id()).expect("a pid")),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("stop alice's storm");
    let out = churner.wait_with_output().expect("alice's storm");
    let alice_changes: u64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("alice's count of changes");
    let counters_after = mounts_counters(&daemon).await;
    // What alice's monitor printed during and just after her storm.
    let (mut alice_events, mut alice_lost) = (0, 0);
    // Until her monitor is quiet, and 10 s at most: a monitor that never falls quiet
    // (a daemon that keeps resyncing her) must not hang the bench.
    let quiet_by = Instant::now() + Duration::from_secs(10);
    while let Some(Ok((_, value))) = (Instant::now() < quiet_by)
        .then(|| alice_monitor.lines.recv_timeout(Duration::from_millis(500)))
    {
        if value["signal"] == "MountChanged" {
            alice_events += 1;
        } else if value["signal"] == "Lost" && value["reason"] == "kernel-overflow" {
            alice_lost += 1;
        }
    }
    let mut counters: Vec<(String, u64)> = counters_after
        .iter()
        .map(|(name, after)| {
            let before = counters_before.get(name).copied().unwrap_or(0);
            (name.clone(), after - before)
        })
        .collect();
    counters.sort();

    let base = alone.daemon_cpu_s / alone.wall_s;
    let t = storm_series.wall_s;
    let bound_s = base * t + f64::from(USER_CPU_PERCENT) / 100.0 * (t + 1.0);
    drop((bob_monitor, alice_monitor, changer, bob_ns, alice_ns));
    Figures {
        extra,
        bob_changes,
        alone,
        storm: storm_series,
        bound_s,
        alice_changes,
        alice_events,
        alice_lost,
        counters,
    }
}

pub fn describe(f: &Figures) {
    let line = |what: &str, s: &Series| {
        println!(
            "  bob {what}: {} of {} changes reported, latency p50 {:.2} ms, p99 {:.2} ms; \
             daemon CPU {:.0} ms over {:.2} s, {} context switches",
            f.bob_changes - s.unreported,
            f.bob_changes,
            s.percentile_ms(50),
            s.percentile_ms(99),
            s.daemon_cpu_s * 1e3,
            s.wall_s,
            s.daemon_switches
        )
    };
    println!(
        "two users: alice churns in a namespace of {} extra mounts (share {USER_CPU_PERCENT}% \
         of one CPU), bob changes one mount every {} ms",
        f.extra,
        BOB_INTERVAL.as_millis()
    );
    line("alone", &f.alone);
    line("during alice's storm", &f.storm);
    println!(
        "  alice: {} changes made, {} events and {} Lost(kernel-overflow) to her monitor; \
         Counters during her storm: {}",
        f.alice_changes,
        f.alice_events,
        f.alice_lost,
        f.counters
            .iter()
            .map(|(name, n)| format!("{name} +{n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "  daemon CPU during the storm {:.0} ms, bound {:.0} ms (base {:.1} ms/s × {:.2} s \
         + {USER_CPU_PERCENT}% × ({:.2} s + 1 s))",
        f.storm.daemon_cpu_s * 1e3,
        f.bound_s * 1e3,
        f.alone.daemon_cpu_s / f.alone.wall_s * 1e3,
        f.storm.wall_s,
        f.storm.wall_s
    );
}
