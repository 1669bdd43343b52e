//! Clients we did not write, and clients that misbehave: every conforming D-Bus library
//! gets all its events, whether or not it answers `org.freedesktop.DBus.Peer.Ping`, and a
//! subscriber that stalls and dies leaves neither the daemon nor the bus working for it.
//!
//! The clients are `tests/foreign/subscriber.py` with jeepney, GDBus (PyGObject) and
//! libdbus (dbus-python), Debian's packages, as real processes.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{kill, Signal as Sig};
use nix::unistd::Pid;

/// A subscriber process written with a foreign library, and the lines it prints.
struct Foreign {
    name: String,
    child: Child,
    lines: mpsc::Receiver<String>,
    /// Event signals received, by sequence number, and the counts of `Lost` signals.
    events: Vec<u64>,
    lost: u64,
    /// Method calls the client received (jeepney prints them: the daemon's Pings).
    calls: usize,
}

impl Foreign {
    /// Starts the subscriber and waits until its watch is set.
    fn start(daemon: &Daemon, library: &str, ping: &str, spec: &[String]) -> Foreign {
        let mut child = Command::new("/usr/bin/python3")
            .arg(repo().join("tests/foreign/subscriber.py"))
            .args(["--address", daemon.address(), "--library", library])
            .args(["--ping", ping, "devices"])
            .args(spec)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 (scripts/test installs python3-jeepney, python3-gi, python3-dbus)");
        let lines = common::lines::lines(child.stdout.take().expect("stdout"));
        let foreign = Foreign {
            name: format!("{library} (ping {ping})"),
            child,
            lines,
            events: Vec::new(),
            lost: 0,
            calls: 0,
        };
        let first = foreign
            .lines
            .recv_timeout(TIMEOUT)
            .unwrap_or_else(|_| panic!("{} did not subscribe", foreign.name));
        assert!(
            first.starts_with("subscribed "),
            "{}: {first}",
            foreign.name
        );
        foreign
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// Reads lines until events and losses account for `total` sequence numbers,
    /// failing after [`TIMEOUT`] without a line or 4 × [`TIMEOUT`] in all (a client
    /// flooded with Pings prints lines but no events).
    fn receive_until(&mut self, total: u64) {
        let start = Instant::now();
        while self.events.len() as u64 + self.lost < total {
            assert!(
                start.elapsed() < TIMEOUT * 4,
                "{}: {} events, {} lost and {} method calls after {:?}",
                self.name,
                self.events.len(),
                self.lost,
                self.calls,
                start.elapsed()
            );
            let line = self.lines.recv_timeout(TIMEOUT).unwrap_or_else(|_| {
                panic!(
                    "{}: no signal for {TIMEOUT:?}; {} events and {} lost of {total}",
                    self.name,
                    self.events.len(),
                    self.lost
                )
            });
            let words: Vec<&str> = line.split(' ').collect();
            match words.as_slice() {
                ["call", _] => self.calls += 1,
                ["Lost", _, count] => self.lost += count.parse::<u64>().expect("count"),
                ["DeviceChanged", seq, _] => self.events.push(seq.parse().expect("seq")),
                _ => panic!("{}: unexpected line {line:?}", self.name),
            }
        }
    }
}

impl Drop for Foreign {
    fn drop(&mut self) {
        let _ = kill(self.pid(), Sig::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// jeepney never answers Ping (it stopped at 64 events, silently, for as long as it
/// ran); answering it with UnknownMethod also stopped at 64 and drew a Ping storm.
/// Every library gets every event, in order, with a bounded number of Pings.
#[test]
fn every_library_gets_every_event_whether_or_not_it_answers_ping() {
    const EVENTS: u64 = 600;
    let daemon = Daemon::start();
    let disk = LoopDevice::attach(4);
    let spec = [format!("name={}", disk.name)];
    let mut clients = vec![
        Foreign::start(&daemon, "jeepney", "ignore", &spec),
        Foreign::start(&daemon, "jeepney", "unknown-method", &spec),
        Foreign::start(&daemon, "gdbus", "ignore", &spec),
        Foreign::start(&daemon, "dbus-python", "ignore", &spec),
    ];
    for _ in 0..EVENTS {
        disk.synth_change();
    }
    for client in &mut clients {
        client.receive_until(EVENTS);
        assert_eq!(
            client.lost, 0,
            "{}: the queue (1024) holds them all",
            client.name
        );
        assert_eq!(
            client.events,
            (1..=EVENTS).collect::<Vec<_>>(),
            "{}: every event, in order",
            client.name
        );
    }
    // One Ping per half window at most (and the one that is never answered).
    let unknown_method = &clients[1];
    assert!(
        (1..=EVENTS / 32 + 2).contains(&(unknown_method.calls as u64)),
        "{}: {} Pings for {EVENTS} events",
        unknown_method.name,
        unknown_method.calls
    );
    let never = &clients[0];
    assert!(
        (1..=3).contains(&never.calls),
        "{}: {} Pings: an unanswered one is not sent again before it times out",
        never.name,
        never.calls
    );
}

/// Messages the daemon's connection sends, counted by a bus monitor (root may become
/// one), over `quiet`.
fn messages_from(daemon: &Daemon, sender: &str, quiet: Duration, then: impl FnOnce()) -> usize {
    let mut monitor = Command::new("dbus-monitor")
        .args(["--address", daemon.address(), "--profile"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("dbus-monitor");
    let lines = common::lines::lines(monitor.stdout.take().expect("stdout"));
    // The monitor's own NameAcquired/NameLost come first: it is listening.
    let ready = lines.recv_timeout(TIMEOUT).expect("dbus-monitor started");
    assert!(!ready.is_empty());
    std::thread::sleep(quiet);
    then();
    std::thread::sleep(Duration::from_millis(500));
    let _ = monitor.kill();
    let _ = monitor.wait();
    // --profile: type, timestamp, serial, sender, destination, path, interface, member.
    lines
        .try_iter()
        .filter(|line| line.split('\t').nth(3) == Some(sender))
        .count()
}

/// A subscriber that stalls with a full window and is killed made the daemon and the
/// bus spin for ever (zbus reports the bus's ServiceUnknown as `Error::FDO`, which the
/// Ping code did not recognise, and retried at once, for ever). Afterwards nothing may
/// be sent on its behalf and the daemon's CPU stays flat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_killed_with_a_full_window_costs_nothing_afterwards() {
    let daemon = Daemon::start();
    let disk = LoopDevice::attach(4);
    let spec = [format!("name={}", disk.name)];
    let mut stalled = vec![
        Foreign::start(&daemon, "jeepney", "ignore", &spec),
        Foreign::start(&daemon, "gdbus", "ignore", &spec),
    ];
    for client in &stalled {
        kill(client.pid(), Sig::SIGSTOP).expect("SIGSTOP");
    }
    // More than fits the window and the sockets: the daemon owes them a backlog.
    for _ in 0..2000 {
        disk.synth_change();
    }
    // Past the Ping patience, so that Ping and the bus statistics are both in play.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for client in &mut stalled {
        client.child.kill().expect("SIGKILL");
        client.child.wait().expect("reap");
    }
    let start = Instant::now();
    while daemon.log_text().matches("subscription closed").count() < 2 {
        assert!(start.elapsed() < TIMEOUT, "subscriptions not closed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let conn = daemon.connect().await;
    let dbus = zbus::fdo::DBusProxy::new(&conn).await.unwrap();
    let daemon_name = dbus
        .get_name_owner("org.watchq1".try_into().unwrap())
        .await
        .unwrap()
        .to_string();

    // A live subscriber, to prove the monitor sees the daemon's signals at all.
    let mut live = Subscriber::new(&daemon).await;
    live.watch(
        "devices",
        1,
        &[("name", zbus::Variant::from(disk.name.as_str()))],
    )
    .await;
    let (daemon_ticks, bus_ticks) = (cpu_ticks(daemon.pid()), cpu_ticks(daemon.bus.pid()));
    let quiet = Duration::from_secs(3);
    let sent = tokio::task::block_in_place(|| {
        messages_from(&daemon, &daemon_name, quiet, || disk.synth_change())
    });
    let daemon_cpu = cpu_ticks(daemon.pid()) - daemon_ticks;
    let bus_cpu = cpu_ticks(daemon.bus.pid()) - bus_ticks;
    live.until("the live subscriber's event", |s| !s.is_empty())
        .await;
    // Exactly the live subscriber's one signal; a Ping may follow it only for a window.
    assert_eq!(
        sent, 1,
        "messages from the daemon in {quiet:?} after the stalled subscribers died, plus one event"
    );
    // 3.5 s of a spinning loop is ~350 ticks each; idle is ~0.
    assert!(
        daemon_cpu <= 15,
        "daemon used {daemon_cpu} ticks while idle"
    );
    assert!(bus_cpu <= 15, "dbus-daemon used {bus_cpu} ticks while idle");
}
