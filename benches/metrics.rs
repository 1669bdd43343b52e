//! What reading the metrics costs the daemon: `Manager.Metrics`, which anyone on the
//! system bus may call, as often as they like.
//!
//! The daemon keeps the text it last rendered and renders again only when a figure
//! changed, so that a caller looping on `Manager.Metrics` while nothing happens costs it
//! a copy per call rather than a render. Measured here as the daemon's CPU (user +
//! system, from `/proc`) per call, against its CPU per read of the `Version` property
//! (the cheapest call with an answer) by the same client in the same run.
//!
//! The text is made large for real: 400 `[[units]]` rules match one loop device's
//! `change` uevent and, with no systemd on the private bus, each fails once, so
//! `watchqd_unit_start_failures_total` holds 400 series (about 40 KB of text, what a
//! machine with many devices and errors shows). A render then costs the daemon several
//! times a call; a copy does not.
//!
//! `cargo bench --bench metrics` runs the full size; `-- --check` a shorter one (CI) and
//! exits non-zero when the target is MISSED; under `cargo test` a smoke run.

#[path = "../tests/common/mod.rs"]
#[allow(dead_code, clippy::all)]
mod common;
#[allow(dead_code)]
mod targets;

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::Instant;

use common::{cpu_ticks, Daemon, LoopDevice, TIMEOUT};
use targets::{Bound, Target, Verdicts};
use zbus::Connection;

const TARGETS: &[Target] = &[Target {
    id: "metrics-call-cpu",
    what: "daemon CPU per Manager.Metrics call while nothing changes, as a multiple of its \
           CPU per Version property read",
    bound: Bound::AtMost(2.0),
    known_miss: None,
}];

const RULES: usize = 400;

fn config(device: &str) -> String {
    let mut toml = String::new();
    for i in 0..RULES {
        // Writing to a String cannot fail.
        let _ = write!(
            toml,
            "[[units]]\nsource = \"devices\"\nkinds = [\"change\"]\n\
             properties = {{ name = \"{device}\" }}\nunit = \"watchq-bench-{i}.service\"\n\n"
        );
    }
    toml
}

async fn metrics(conn: &Connection) -> String {
    let reply = conn
        .call_method(
            Some("org.watchq1"),
            "/org/watchq1",
            Some("org.watchq1.Manager"),
            "Metrics",
            &(),
        )
        .await
        .expect("Manager.Metrics");
    reply.body().deserialize::<String>().expect("a string")
}

async fn version(conn: &Connection) -> String {
    let reply = conn
        .call_method(
            Some("org.watchq1"),
            "/org/watchq1",
            Some("org.freedesktop.DBus.Properties"),
            "Get",
            &("org.watchq1.Manager", "Version"),
        )
        .await
        .expect("Get Version");
    let value: zbus::OwnedVariant = reply.body().deserialize().expect("a variant");
    String::try_from(value).expect("a string")
}

/// The CPU time the daemon's threads have run, in nanoseconds (the scheduler's own
/// account, `/proc/PID/task/*/schedstat`: far finer than clock ticks). Its threads live
/// as long as it does (the tokio workers), so no time leaves the sum.
fn cpu_ns(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("the daemon's tasks")
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|stat| stat.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// The daemon's CPU time over `calls` sequential calls of `call`, in nanoseconds.
async fn cpu_over<F, Fut>(pid: u32, calls: usize, call: F) -> u64
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = String>,
{
    let before = cpu_ns(pid);
    for _ in 0..calls {
        std::hint::black_box(call().await);
    }
    cpu_ns(pid) - before
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let quick = !args.iter().any(|a| a == "--bench");
    let check = args.iter().any(|a| a == "--check");
    let (rounds, calls) = if quick {
        (1, 50)
    } else if check {
        (6, 1_000)
    } else {
        (10, 3_000)
    };
    println!(
        "metrics bench ({}): {rounds} alternating rounds of {calls} Version reads and {calls} \
         Metrics calls",
        targets::run_kind(quick, check)
    );
    let disk = LoopDevice::attach(4);
    let daemon = Daemon::with_config(&config(&disk.name));
    let conn = daemon.connect().await;
    std::fs::write(format!("/sys/block/{}/uevent", disk.name), "change").expect("uevent");
    // Every rule failed once: the text holds one series per rule.
    let series = format!("watchqd_unit_start_failures_total{{rule=\"{}\"", RULES - 1);
    let start = Instant::now();
    let text = loop {
        let text = metrics(&conn).await;
        if text.contains(&series) {
            break text;
        }
        assert!(
            start.elapsed() < TIMEOUT,
            "{RULES} unit start failures were not counted within {TIMEOUT:?}:\n{text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let lines = text
        .lines()
        .filter(|l| l.starts_with("watchqd_unit_start_failures_total{"))
        .count();
    assert_eq!(lines, RULES, "one failure series per rule");
    println!("text: {} bytes, {} lines", text.len(), text.lines().count());

    let pid = daemon.pid();
    let ticks_before = cpu_ticks(pid);
    let (mut version_ns, mut metrics_ns) = (0, 0);
    for _ in 0..rounds {
        version_ns += cpu_over(pid, calls, || version(&conn)).await;
        metrics_ns += cpu_over(pid, calls, || metrics(&conn)).await;
    }
    let ticks = cpu_ticks(pid) - ticks_before;
    // Nothing changed meanwhile: every call answered the same text.
    assert_eq!(
        metrics(&conn).await,
        text,
        "the text changed during the run"
    );
    let total = (rounds * calls) as f64;
    let per_call = |ns: u64| ns as f64 / 1e3 / total;
    let ratio = metrics_ns as f64 / version_ns.max(1) as f64;
    println!(
        "daemon CPU per call: Version {:.1} us, Metrics {:.1} us, over {total} calls each \
         (clock ticks over both: {ticks})",
        per_call(version_ns),
        per_call(metrics_ns)
    );
    let mut verdicts = Verdicts::new(TARGETS).smoke(quick);
    println!(
        "{}",
        verdicts.target(
            "metrics-call-cpu",
            ratio,
            &format!(
                "{:.1} / {:.1} us",
                per_call(metrics_ns),
                per_call(version_ns)
            )
        )
    );
    disk.detach();
    if check && !verdicts.passed() {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
