//! Mount events through watchqd against what a monitor without them does: reread and
//! parse the whole mountinfo on every change.
//!
//! `cargo bench --bench mounts` prints, for a private mount namespace with its usual
//! mounts and again with 1,000 extra mounts in it:
//! - watchqd: a storm of mount+umount pairs made by one process (as fast as the kernel
//!   goes) through the daemon to one subscriber: events/s from the first syscall to the
//!   last signal received, and the daemon's CPU (utime+stime) per event;
//! - the alternative: reading and parsing `/proc/PID/mountinfo` once per change, timed
//!   in this process (the CPU a mountinfo-rescanning monitor spends per change).
//!
//! Under `cargo test` (no `--bench` argument) it runs a small smoke version so that the
//! benchmark cannot rot. Figures only; nothing here is asserted as a time limit.

#[path = "../tests/common/mod.rs"]
#[allow(dead_code, clippy::all)]
mod common;

use std::collections::HashMap;
use std::fs;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{cpu_ticks, Daemon, Signal, Subscriber};
use zbus::Variant;

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { nix::libc::sysconf(nix::libc::_SC_CLK_TCK) };
    ticks as f64
}

/// `perl` making mount(2) (165) and umount2(2) (166) syscalls on x86_64.
fn storm_script(point: &str, rounds: u64) -> String {
    format!(
        "perl -e 'my ($s, $d, $t) = (\"watchq-bench\", \"{point}\", \"tmpfs\"); \
         for (1..{rounds}) {{ syscall(165, $s, $d, $t, 0, 0) == 0 or die \"mount: $!\"; \
         syscall(166, $d, 0) == 0 or die \"umount: $!\"; }}'"
    )
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

async fn run(daemon: &Daemon, extra_mounts: u64, rounds: u64) {
    let dir = tempfile::Builder::new()
        .prefix("watchq-bench-")
        .tempdir()
        .expect("tempdir");
    let mut holder = Command::new("unshare")
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
                "mount -t tmpfs watchq-extra {extra}; i=0; while [ $i -lt {extra_mounts} ]; do \
                 mkdir {extra}/$i; i=$((i+1)); done; \
                 perl -e 'for my $i (0..{}) {{ my ($s, $d, $t) = (\"watchq-extra\", \"{extra}/$i\", \"tmpfs\"); \
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
    let cpu_before = cpu_ticks(daemon.pid());
    let start = Instant::now();
    nsenter(pid, &storm_script(&point, rounds));
    let counted = |signals: &[Signal]| -> u64 {
        signals
            .iter()
            .map(|s| match s {
                Signal::Mount { .. } => 1,
                Signal::Lost { count, .. } => *count,
                _ => 0,
            })
            .sum()
    };
    sub.until("the whole storm", |signals| counted(signals) >= produced)
        .await;
    let elapsed = start.elapsed();
    let cpu = (cpu_ticks(daemon.pid()) - cpu_before) as f64 / ticks_per_second();
    let lost: u64 = sub
        .received
        .iter()
        .map(|s| match s {
            Signal::Lost { count, .. } => *count,
            _ => 0,
        })
        .sum();

    // The alternative: a full mountinfo rescan per change.
    let rescan_start = Instant::now();
    let mut parsed = 0usize;
    for _ in 0..produced {
        let text = fs::read_to_string(&mountinfo_path).unwrap();
        parsed += watchqd::source::mounts::wire::parse_mountinfo(&text)
            .unwrap()
            .len();
    }
    let rescan = rescan_start.elapsed();
    assert!(parsed > 0);

    println!(
        "namespace of {lines} mounts, {produced} events ({lost} lost): watchqd {:.0} events/s, \
         daemon CPU {:.1} µs/event ({:.0} ms total); mountinfo rescan per change {:.1} µs \
         ({:.0} ms for {produced})",
        produced as f64 / elapsed.as_secs_f64(),
        cpu * 1e6 / produced as f64,
        cpu * 1e3,
        rescan.as_secs_f64() * 1e6 / produced as f64,
        rescan.as_secs_f64() * 1e3,
    );
    let _ = holder.kill();
    let _ = holder.wait();
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    assert_eq!(
        std::env::consts::ARCH,
        "x86_64",
        "the storm uses x86_64 syscall numbers"
    );
    let quick = !std::env::args().any(|a| a == "--bench");
    let (rounds, extra) = if quick { (50, 100) } else { (5000, 1000) };
    println!(
        "mounts bench ({}): {rounds} mount+umount pairs per run",
        if quick { "smoke run" } else { "full run" }
    );
    let daemon = Daemon::start();
    run(&daemon, 0, rounds).await;
    run(&daemon, extra, rounds).await;
}
