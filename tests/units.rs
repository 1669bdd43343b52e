//! The daemon's own consumers of events, on a real private bus with real loop devices:
//! `[[units]]` rules (here with no systemd on the bus, so every start fails) and
//! `[journal]` records (to a real datagram socket, and to none). Neither may delay or
//! disturb delivery to subscribers. Starting units through a real systemd is tested in
//! the full-OS guest.

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use common::*;
use watchqd::logging::LogLimit;
use zbus::Variant;

/// Waits until the daemon's log holds `needle`, and returns the log.
fn wait_for_log(daemon: &Daemon, needle: &str) -> String {
    let start = Instant::now();
    loop {
        let log = daemon.log_text();
        if log.contains(needle) {
            return log;
        }
        assert!(
            start.elapsed() < TIMEOUT,
            "waited {TIMEOUT:?} for {needle:?} in the daemon's log"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn watch_loop_devices(daemon: &Daemon) -> Subscriber {
    let sub = Subscriber::new(daemon).await;
    sub.watch(
        "devices",
        1,
        &[
            ("subsystem", Variant::from("block")),
            ("name", Variant::from("loop*")),
        ],
    )
    .await;
    sub
}

/// Receives until `count` change events of `path` arrived, then checks the whole stream:
/// numbered without a gap, no `Lost`.
async fn expect_changes(sub: &mut Subscriber, path: &str, count: usize) {
    sub.until("every change event", |s| {
        s.iter()
            .filter(|e| matches!(e, Signal::Device { action, sys_path, .. } if action == "change" && sys_path == path))
            .count()
            >= count
    })
    .await;
    assert!(
        !sub.received
            .iter()
            .any(|s| matches!(s, Signal::Lost { .. })),
        "a subscriber lost events"
    );
    assert_contiguous(&sub.received);
}

/// How many failed starts of `unit` the log accounts for: each line that says so, plus
/// the suppressed ones its note counts (`LogLimit::note`: "(N similar messages
/// suppressed)"); and the number of lines.
fn failures_accounted(log: &str, unit: &str) -> (u64, u64) {
    let needle = format!("cannot start unit {unit}");
    let (mut lines, mut total) = (0u64, 0u64);
    for line in log.lines().filter(|l| l.contains(&needle)) {
        lines += 1;
        total += 1;
        // The note ends the message; tracing's fields follow it.
        if let Some((head, _)) = line.split_once(" similar messages suppressed)") {
            let (_, count) = head
                .rsplit_once('(')
                .unwrap_or_else(|| panic!("a note without its count: {line}"));
            total += count
                .parse::<u64>()
                .unwrap_or_else(|_| panic!("a note without its count: {line}"));
        }
    }
    (lines, total)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_rule_without_systemd_logs_each_failure_and_never_delays_delivery() {
    // The device first, so that the rule can name it alone: loop devices of other tests
    // on this machine must not add failures to the count.
    let disk = LoopDevice::attach(4);
    let daemon = Daemon::with_config(&format!(
        r#"
[[units]]
source = "devices"
kinds = ["add", "change"]
properties = {{ subsystem = "block", name = "{}" }}
unit = "watchq-test@.service"
instance = "devname"
"#,
        disk.name
    ));
    // The rule holds the devices source open with nobody subscribed.
    wait_for_log(&daemon, "unit rules: 1 rule(s) watch devices events");
    assert_eq!(daemon.uevent_sockets(), 1, "the rule's source is open");

    let mut sub = watch_loop_devices(&daemon).await;
    let path = disk.sys_path();
    disk.synth_change();
    let unit = format!("watchq-test@dev-{}.service", disk.name);
    let log = wait_for_log(&daemon, &format!("cannot start unit {unit}"));
    let failure = log
        .lines()
        .find(|l| l.contains(&format!("cannot start unit {unit}")))
        .unwrap();
    assert!(
        failure.contains("rule units[0]")
            && failure.contains("org.freedesktop.systemd1")
            && failure.contains(&format!("for devices change {path}")),
        "the failure names the rule, the unit, the reason and the event: {failure}"
    );

    eprintln!("failure line: {failure}");
    // A flood of matching events: every one reaches the subscriber, in order, while
    // each start fails; the log gets a few lines, not a flood.
    for _ in 0..200 {
        disk.synth_change();
    }
    expect_changes(&mut sub, &path, 201).await;
    // The rest are counted, and the count is told with the first line allowed after
    // the rate limit's interval: wait it out, then fail once more.
    tokio::time::sleep(LogLimit::INTERVAL + Duration::from_millis(500)).await;
    disk.synth_change();
    expect_changes(&mut sub, &path, 202).await;
    let log = wait_for_log(&daemon, " similar messages suppressed)");
    let (lines, failures) = failures_accounted(&log, &unit);
    println!("{failures} failed starts in {lines} log lines");
    let changes = sub
        .about(&path)
        .filter(|s| matches!(s, Signal::Device { action, .. } if action == "change"))
        .count();
    assert_eq!(changes, 202, "change events delivered");
    assert!(
        !log.contains("event(s) dropped"),
        "the rule's queue dropped events"
    );
    assert_eq!(
        failures,
        202,
        "every failed start logged or counted as suppressed, in {lines} lines:\n{}",
        log.lines()
            .filter(|l| l.contains("cannot start unit"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        (2..=10).contains(&lines),
        "{lines} failure lines for 202 failed starts"
    );
    // Still serving, and the source still open after the subscriber leaves.
    sub.proxy.close().await.expect("Close");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(daemon.uevent_sockets(), 1, "the rule keeps its source open");
    let mut again = watch_loop_devices(&daemon).await;
    disk.synth_change();
    expect_changes(&mut again, &path, 1).await;
}

/// The fields of one native-protocol journal record (both value forms).
fn journal_fields(mut buf: &[u8]) -> Vec<(String, String)> {
    let mut fields = Vec::new();
    while let Some(end) = buf.iter().position(|b| *b == b'\n') {
        let line = &buf[..end];
        if let Some(eq) = line.iter().position(|b| *b == b'=') {
            fields.push((
                String::from_utf8_lossy(&line[..eq]).into_owned(),
                String::from_utf8_lossy(&line[eq + 1..]).into_owned(),
            ));
            buf = &buf[end + 1..];
        } else {
            let rest = &buf[end + 1..];
            let len = usize::try_from(u64::from_le_bytes(rest[..8].try_into().unwrap())).unwrap();
            fields.push((
                String::from_utf8_lossy(line).into_owned(),
                String::from_utf8_lossy(&rest[8..8 + len]).into_owned(),
            ));
            buf = &rest[9 + len..];
        }
    }
    fields
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_records_carry_the_kind_s_message_id_and_every_attribute() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("journal.socket");
    let journal = UnixDatagram::bind(&socket_path).expect("bind a journal socket");
    journal.set_read_timeout(Some(TIMEOUT)).unwrap();
    let daemon = Daemon::with_config(&format!(
        "[journal]\nevents = true\nsources = [\"devices\"]\nsocket = \"{}\"\n",
        socket_path.display()
    ));
    assert_eq!(daemon.uevent_sockets(), 1, "the journal's source is open");

    // No subscriber at all: the records are written anyway.
    let disk = LoopDevice::attach(4);
    disk.synth_change();
    let path = disk.sys_path();
    let mut buf = vec![0u8; 65536];
    let record = loop {
        let n = journal.recv(&mut buf).expect("a journal record");
        let fields = journal_fields(&buf[..n]);
        let has = |k: &str, v: &str| fields.iter().any(|(name, value)| name == k && value == v);
        if has("WATCHQ_OBJECT", &path) && has("WATCHQ_KIND", "change") {
            break fields;
        }
    };
    let get = |k: &str| {
        record
            .iter()
            .find(|(name, _)| name == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("no {k} in {record:?}"))
    };
    assert_eq!(get("MESSAGE_ID"), "9dac70fd54f04de293ff2890bf916cae");
    assert_eq!(get("SYSLOG_IDENTIFIER"), "watchqd");
    assert_eq!(get("WATCHQ_SOURCE"), "devices");
    assert_eq!(get("WATCHQ_DEVNAME"), disk.device);
    assert_eq!(get("WATCHQ_NAME"), disk.name);
    assert_eq!(get("WATCHQ_SUBSYSTEM"), "block");
    assert_eq!(get("WATCHQ_MAJOR"), "7");
    assert!(get("WATCHQ_SEQ").parse::<u64>().is_ok_and(|n| n > 0));
    assert!(get("WATCHQ_KERNEL_SEQNUM").parse::<u64>().is_ok());
    assert!(get("MESSAGE").starts_with(&format!("devices change {path}")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_journal_the_daemon_says_so_once_and_serves_events() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::with_config(&format!(
        "[journal]\nevents = true\nsocket = \"{}\"\n",
        dir.path().join("no-journal-here").display()
    ));
    let mut sub = watch_loop_devices(&daemon).await;
    let disk = LoopDevice::attach(4);
    for _ in 0..20 {
        disk.synth_change();
    }
    expect_changes(&mut sub, &disk.sys_path(), 20).await;
    let log = wait_for_log(&daemon, "journal: unavailable at");
    assert_eq!(
        log.matches("journal: unavailable at").count(),
        1,
        "said once: {log}"
    );
}

/// `systemctl reload` on the host: a `[[units]]` rule added to the file and applied with
/// SIGHUP acts on the next matching event, while a subscriber keeps its subscription and
/// its numbering (no gap, no `Lost`); a reload with a broken file is refused, naming the
/// file and the key, and changes nothing: the rule still acts and the subscriber still
/// receives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_rule_added_by_reload_acts_on_the_next_event_and_a_broken_reload_changes_nothing() {
    let disk = LoopDevice::attach(4);
    let daemon = Daemon::with_config("");
    let mut sub = watch_loop_devices(&daemon).await;
    let path = disk.sys_path();
    disk.synth_change();
    expect_changes(&mut sub, &path, 1).await;
    let unit = format!("watchq-test@dev-{}.service", disk.name);
    assert_eq!(failures_accounted(&daemon.log_text(), &unit), (0, 0));

    std::fs::write(
        daemon.config_path(),
        format!(
            r#"
[[units]]
source = "devices"
kinds = ["change"]
properties = {{ subsystem = "block", name = "{}" }}
unit = "watchq-test@.service"
instance = "devname"
"#,
            disk.name
        ),
    )
    .unwrap();
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    wait_for_log(
        &daemon,
        "configuration reloaded: applied [[units]] and [journal]",
    );
    // The rule shares the devices source the subscriber's watch holds open.
    assert_eq!(daemon.uevent_sockets(), 1);
    disk.synth_change();
    let log = wait_for_log(&daemon, &format!("cannot start unit {unit}"));
    assert_eq!(failures_accounted(&log, &unit), (1, 1), "{log}");
    expect_changes(&mut sub, &path, 2).await;

    std::fs::write(daemon.config_path(), "[limits]\nwatches_per_uid = 0\n").unwrap();
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    let log = wait_for_log(&daemon, "reload refused");
    let refusal = log.lines().find(|l| l.contains("reload refused")).unwrap();
    let file = daemon.config_path();
    assert!(
        refusal.contains(file.to_str().unwrap())
            && refusal.contains("limits.watches_per_uid")
            && refusal.contains("previous configuration stays in effect"),
        "the refusal names the file and the key: {refusal}"
    );
    disk.synth_change();
    let start = Instant::now();
    while failures_accounted(&daemon.log_text(), &unit).1 < 2 {
        assert!(
            start.elapsed() < TIMEOUT,
            "the rule stopped acting after a refused reload:\n{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    expect_changes(&mut sub, &path, 3).await;
    assert_eq!(
        daemon.log_text().matches("subscription closed").count(),
        0,
        "a reload closed a subscription"
    );
}
