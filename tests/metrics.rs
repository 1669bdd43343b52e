//! `[metrics]`: the text file for node_exporter's textfile collector, checked with the
//! real tools — Debian's `prometheus-node-exporter` scraped over loopback, and
//! `promtool check metrics` — against a real daemon on a private bus, real uevents and
//! a real stalled client; and the same text from `watchqctl metrics`.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::prometheus::{promtool_check, Metrics, NodeExporter};
use common::*;
use nix::sys::signal::{kill, Signal as Sig};
use nix::unistd::Pid;
use zbus::Variant;

fn metrics_config(directory: &Path, interval_ms: u64) -> String {
    format!(
        "[metrics]\ntextfile = true\ndirectory = \"{}\"\ninterval_ms = {interval_ms}\n",
        directory.display()
    )
}

fn watchqctl_metrics(daemon: &Daemon) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_watchqctl"))
        .args(["--address", daemon.address(), "metrics"])
        .output()
        .expect("watchqctl");
    assert!(
        out.status.success(),
        "watchqctl metrics: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}

/// Scrapes until `done` holds for a scrape, failing after [`TIMEOUT`] with the last one.
fn scrape_until(exporter: &NodeExporter, what: &str, done: impl Fn(&Metrics) -> bool) -> Metrics {
    let start = Instant::now();
    loop {
        let metrics = exporter.scrape();
        if done(&metrics) {
            return metrics;
        }
        assert!(
            start.elapsed() < TIMEOUT,
            "waited {TIMEOUT:?} for {what}; last scrape:\n{}",
            metrics.text
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

const EVENTS: usize = 300;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_exporter_exports_exactly_the_events_delivered_and_lost_to_a_stalled_subscriber() {
    let dir = tempfile::tempdir().expect("directory");
    let daemon = Daemon::with_config(&metrics_config(dir.path(), 200));
    let exporter = NodeExporter::start(dir.path());
    let file = dir.path().join("watchqd.prom");
    // Written at start, with zeros, so that the series exist before anything happens.
    let before = scrape_until(&exporter, "the daemon's file", |m| {
        m.value("watchqd_subscriptions", &[]).is_some()
    });
    assert_eq!(
        before.value(
            "watchqd_events_lost_total",
            &[("source", "devices"), ("reason", "queue-full")]
        ),
        Some(0.0)
    );
    let mode = std::fs::metadata(&file).expect("file").permissions().mode();
    assert_eq!(mode & 0o777, 0o644, "the file's mode");

    let disk = LoopDevice::attach(4);
    // Its default queue (1,024 events) holds the whole storm.
    let mut fast = Subscriber::new(&daemon).await;
    fast.watch("devices", 1, &[("name", Variant::from(disk.name.as_str()))])
        .await;
    // The stalled subscriber: a real client process stopped with SIGSTOP, with a small
    // queue, so that the daemon drops and counts.
    let mut stalled = stalled_monitor(&daemon, &disk.name, 10);
    let stalled_pid = Pid::from_raw(i32::try_from(stalled.id()).expect("pid"));

    let name = disk.name.clone();
    tokio::task::spawn_blocking(move || {
        for _ in 0..EVENTS {
            std::fs::write(format!("/sys/block/{name}/uevent"), "change").expect("uevent");
        }
    })
    .await
    .expect("uevents");
    // Every event went through the daemon once the fast subscriber has them all.
    fast.until("every event", |s| s.len() >= EVENTS).await;

    kill(stalled_pid, Sig::SIGCONT).expect("SIGCONT");
    let rx = common::lines::lines(stalled.stdout.take().expect("stdout"));
    let (mut events, mut lost) = (0u64, 0u64);
    while events + lost < EVENTS as u64 {
        let line = rx.recv_timeout(TIMEOUT).unwrap_or_else(|_| {
            panic!("stalled subscriber saw {events} events + {lost} lost of {EVENTS}")
        });
        let value: serde_json::Value = serde_json::from_str(&line).expect("JSON");
        match value["signal"].as_str().expect("signal") {
            "DeviceChanged" => events += 1,
            "Lost" => lost += value["count"].as_u64().expect("count"),
            other => panic!("unexpected {other}"),
        }
    }
    kill(stalled_pid, Sig::SIGINT).expect("SIGINT");
    let _ = stalled.wait();
    assert!(lost > 0, "the stalled subscriber must have lost events");
    assert_eq!(fast.received.len(), EVENTS, "the fast one lost nothing");

    // What node_exporter exports is exactly what the two subscribers saw.
    let delivered = EVENTS as f64 + events as f64;
    let lost = lost as f64;
    let after = scrape_until(&exporter, "the counts of the storm", |m| {
        m.value(
            "watchqd_events_lost_total",
            &[("source", "devices"), ("reason", "queue-full")],
        ) == Some(lost)
            && m.value("watchqd_events_delivered_total", &[("source", "devices")])
                == Some(delivered)
    });
    // The stalled one's connection has left: one subscription and its watch remain.
    let after = if after.value("watchqd_subscriptions", &[]) == Some(1.0) {
        after
    } else {
        scrape_until(&exporter, "one subscription left", |m| {
            m.value("watchqd_subscriptions", &[]) == Some(1.0)
        })
    };
    assert_eq!(
        after.value("watchqd_watches", &[("source", "devices")]),
        Some(1.0)
    );
    assert_eq!(
        after.value("watchqd_source_available", &[("source", "devices")]),
        Some(1.0)
    );

    // promtool accepts the file, and watchqctl prints the same text.
    let text = std::fs::read_to_string(&file).expect("the file");
    promtool_check(&text).unwrap_or_else(|e| panic!("promtool check metrics:\n{e}\n{text}"));
    assert_eq!(watchqctl_metrics(&daemon), text);
    // Anyone may read the counters, as anyone may read the file: another user, through
    // the bus policy's default context, gets the same text, and reading changes none.
    let bob = common::polkit::user("watchq-bob");
    let out = Command::new("setpriv")
        .arg(format!("--reuid={}", bob.uid))
        .arg(format!("--regid={}", bob.gid))
        .arg("--clear-groups")
        .arg(env!("CARGO_BIN_EXE_watchqctl"))
        .args(["--address", daemon.address(), "metrics"])
        .output()
        .expect("setpriv (util-linux)");
    assert!(
        out.status.success(),
        "watchqctl metrics as {}: {}",
        bob.name,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), text);
    assert_eq!(std::fs::read_to_string(&file).expect("the file"), text);
    disk.detach();
}

/// Waits until the daemon's log says it marked the filesystem on `device` system-wide.
fn wait_until_marked(daemon: &Daemon, device: &str) {
    let start = Instant::now();
    while !daemon.log_text().lines().any(|l| {
        l.contains("marked filesystem for errors (system-wide)")
            && l.contains(&format!("\"{device}\""))
    }) {
        assert!(
            start.elapsed() < TIMEOUT,
            "the daemon did not mark {device} within {TIMEOUT:?}:\n{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_exporter_counts_every_filesystem_error_with_no_subscriber() {
    // One filesystem mounted before the daemon starts, one after: both are marked, the
    // second when the mount table changes.
    let before = common::ext4::Ext4::new(16, &[], "");
    let dir = tempfile::tempdir().expect("directory");
    let daemon = Daemon::with_config(&metrics_config(dir.path(), 200));
    let exporter = NodeExporter::start(dir.path());
    wait_until_marked(&daemon, &before.disk.name);
    let after = common::ext4::Ext4::new(16, &[], "");
    wait_until_marked(&daemon, &after.disk.name);

    // The kernel's own trigger, ext4_error() with EFSCORRUPTED (EUCLEAN): 2 and 3
    // writes. However the kernel merges them, the counts add up.
    for (fs, writes) in [(&before, 2), (&after, 3)] {
        for i in 0..writes {
            fs.trigger_error(&format!("watchq metrics test {i}"));
        }
    }
    let errors = |m: &Metrics, device: &str| {
        m.value(
            "watchqd_filesystem_errors_total",
            &[("device", device), ("fstype", "ext4"), ("errno", "EUCLEAN")],
        )
    };
    scrape_until(&exporter, "2 and 3 filesystem errors", |m| {
        errors(m, &before.disk.name) == Some(2.0) && errors(m, &after.disk.name) == Some(3.0)
    });
    // And not more, once the daemon had time for another write.
    std::thread::sleep(Duration::from_millis(600));
    let settled = exporter.scrape();
    assert_eq!(
        errors(&settled, &before.disk.name),
        Some(2.0),
        "{}",
        settled.text
    );
    assert_eq!(
        errors(&settled, &after.disk.name),
        Some(3.0),
        "{}",
        settled.text
    );
    let text = std::fs::read_to_string(dir.path().join("watchqd.prom")).expect("the file");
    promtool_check(&text).unwrap_or_else(|e| panic!("promtool check metrics:\n{e}\n{text}"));
    drop(after);
    drop(before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_exporter_counts_every_block_error_of_a_storm_with_no_subscriber() {
    let dir = tempfile::tempdir().expect("directory");
    // No subscriber: only the metrics hold the block-errors source open.
    let _daemon = Daemon::with_config(&metrics_config(dir.path(), 200));
    let exporter = NodeExporter::start(dir.path());
    let disk = shrunk_loop_device();
    // Real EIO from the block layer, past the end of the shrunk backing file: more than
    // the source's burst, so that most arrive summarised in counted events.
    const READS: u64 = 25;
    let device = disk.device.clone();
    tokio::task::spawn_blocking(move || {
        for i in 0..READS {
            // 2 MiB in, past the 1 MiB the backing file keeps.
            let err = failing_read(&device, 4096 + 8 * i);
            assert_eq!(err.raw_os_error(), Some(nix::libc::EIO));
        }
    })
    .await
    .expect("reads");
    let errors = |m: &Metrics| m.value("watchqd_block_errors_total", &[("device", &disk.name)]);
    scrape_until(&exporter, "every block error counted", |m| {
        errors(m) == Some(READS as f64)
    });
    // And not more, once the source's summary interval (1 s) and a write have passed.
    std::thread::sleep(Duration::from_millis(1500));
    let settled = exporter.scrape();
    assert_eq!(errors(&settled), Some(READS as f64), "{}", settled.text);
    let text = std::fs::read_to_string(dir.path().join("watchqd.prom")).expect("the file");
    promtool_check(&text).unwrap_or_else(|e| panic!("promtool check metrics:\n{e}\n{text}"));
    disk.detach();
}

/// The line of a sample as the text format writes it: label values escaped.
fn sample_line(name: &str, labels: &[(&str, &str)], value: &str) -> String {
    let labels: Vec<String> = labels
        .iter()
        .map(|(k, v)| {
            let v = v
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            format!("{k}=\"{v}\"")
        })
        .collect();
    format!("{name}{{{}}} {value}", labels.join(","))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_exporter_counts_every_forged_uevent_and_shows_why_sources_are_unavailable() {
    let dir = tempfile::tempdir().expect("directory");
    let daemon = Daemon::with_config(&metrics_config(dir.path(), 200));
    let exporter = NodeExporter::start(dir.path());
    // The devices source runs while watched; the file shows the watch before the
    // forgeries, which then are the only change of this daemon's figures that a real
    // uevent would not also make (other tests' loop devices run beside this one).
    let sub = Subscriber::new(&daemon).await;
    sub.watch("devices", 1, &[("subsystem", Variant::from("block"))])
        .await;
    scrape_until(&exporter, "the devices watch", |m| {
        m.value("watchqd_watches", &[("source", "devices")]) == Some(1.0)
    });
    const FORGED: usize = 7;
    forge_uevents(FORGED);
    let forged = |m: &Metrics| {
        m.value(
            "watchqd_forged_messages_rejected_total",
            &[("source", "devices")],
        )
    };
    scrape_until(&exporter, "every forged uevent counted", |m| {
        forged(m) == Some(FORGED as f64)
    });
    // And not more, once the daemon had time for another write.
    std::thread::sleep(Duration::from_millis(600));
    let settled = exporter.scrape();
    assert_eq!(forged(&settled), Some(FORGED as f64), "{}", settled.text);

    // Every source, as Manager.Sources says: available with no reason label, or
    // unavailable with its reason.
    let manager = watchqd::client::ManagerProxy::new(&daemon.connect().await)
        .await
        .expect("manager proxy");
    let sources = manager.sources().await.expect("Sources");
    let text = std::fs::read_to_string(dir.path().join("watchqd.prom")).expect("the file");
    let mut unavailable = 0;
    for source in &sources {
        let line = if source.available {
            sample_line("watchqd_source_available", &[("source", &source.name)], "1")
        } else {
            unavailable += 1;
            sample_line(
                "watchqd_source_available",
                &[("source", &source.name), ("reason", &source.reason)],
                "0",
            )
        };
        assert_eq!(
            text.lines().filter(|l| *l == line).count(),
            1,
            "no line {line:?}:\n{text}"
        );
    }
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("watchqd_source_available{"))
            .count(),
        sources.len(),
        "{text}"
    );
    println!("{} sources, {unavailable} unavailable here", sources.len());
    promtool_check(&text).unwrap_or_else(|e| panic!("promtool check metrics:\n{e}\n{text}"));
}

/// The alert rules of the README's "Metrics for Prometheus", as an administrator would
/// copy them into a rule file: `promtool check rules` (Debian's `prometheus`) accepts
/// them, and finds both.
#[test]
fn the_readme_alert_rules_pass_promtool_check_rules() {
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("README.md");
    let section = readme
        .split("\n## Metrics for Prometheus\n")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("the README's section Metrics for Prometheus");
    let rules = section
        .split("```yaml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("a yaml block in Metrics for Prometheus");
    assert!(
        rules.contains("increase(watchqd_filesystem_errors_total"),
        "the example alerts on filesystem errors increasing:\n{rules}"
    );
    let dir = tempfile::tempdir().expect("directory");
    let file = dir.path().join("watchqd.rules.yml");
    std::fs::write(&file, rules).expect("write the rule file");
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .expect("promtool must be installed (Debian's prometheus; scripts/test installs it)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.contains("SUCCESS: 2 rules found"),
        "promtool check rules:\n{said}\n{rules}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_exporter_counts_a_switch_to_read_only_once_and_every_failed_unit_start() {
    let fs = common::ext4::Ext4::new(16, &[], "errors=remount-ro");
    let dir = tempfile::tempdir().expect("directory");
    // A rule for change uevents of the filesystem's loop device; no systemd on the
    // private bus, so every start fails.
    let daemon = Daemon::with_config(&format!(
        "{}\n[[units]]\nsource = \"devices\"\nkinds = [\"change\"]\n\
         properties = {{ name = \"{}\" }}\nunit = \"watchq-metrics@.service\"\ninstance = \"name\"\n",
        metrics_config(dir.path(), 200),
        fs.disk.name
    ));
    let exporter = NodeExporter::start(dir.path());
    wait_until_marked(&daemon, &fs.disk.name);

    // One error; errors=remount-ro makes it one switch to read-only.
    fs.trigger_error("watchq metrics read-only");
    const CHANGES: usize = 4;
    for _ in 0..CHANGES {
        fs.disk.synth_change();
    }
    let device = fs.disk.name.as_str();
    let counts = |m: &Metrics| {
        (
            m.value(
                "watchqd_filesystem_errors_total",
                &[("device", device), ("fstype", "ext4"), ("errno", "EUCLEAN")],
            ),
            m.value("watchqd_filesystem_read_only_total", &[("device", device)]),
            m.value(
                "watchqd_unit_start_failures_total",
                &[("rule", "0"), ("unit", "watchq-metrics@.service")],
            ),
        )
    };
    let expected = (Some(1.0), Some(1.0), Some(CHANGES as f64));
    scrape_until(
        &exporter,
        "one error, one switch, every failed start",
        |m| counts(m) == expected,
    );
    let err = std::fs::write(fs.path().join("x"), b"x").expect_err("read-only");
    assert_eq!(err.raw_os_error(), Some(nix::libc::EROFS), "{err}");
    // And not more, once the daemon had time for another write.
    std::thread::sleep(Duration::from_millis(600));
    let settled = exporter.scrape();
    assert_eq!(counts(&settled), expected, "{}", settled.text);
    assert_eq!(
        settled.value(
            "watchqd_unit_starts_total",
            &[("rule", "0"), ("unit", "watchq-metrics@.service")]
        ),
        None,
        "no unit started without systemd:\n{}",
        settled.text
    );
    drop(daemon);
    drop(fs);
}
