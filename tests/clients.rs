//! Our own clients (`watchqctl monitor` and `watchqd::client::Subscription`, which the
//! tests' `Subscriber` also uses) against a hostile local user and a daemon that crashes
//! and comes back (issue 14, findings 3 and 5). Real bus, real polkitd, real users, real
//! kernel uevents; the forger is dbus-python, a real library, run as another user.

mod common;

use std::collections::HashMap;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;

use zbus::{Connection, OwnedVariant};

use common::lines::lines;
use common::polkit::{self, User};
use common::{Daemon, LoopDevice, TIMEOUT};
use watchqd::client::{Item, Restart, Subscription, DAEMON_RESTARTED};
use watchqd::source::devices::signal::DeviceChanged;
use zbus::names::OwnedUniqueName;

/// `watchqctl monitor --json devices --match=name=DISK`, its output read by threads so
/// that every read has a deadline.
struct Monitor {
    child: Child,
    stdout: Receiver<String>,
    stderr: Receiver<String>,
    /// Every stderr line read so far.
    errors: Vec<String>,
    /// The subscription it announced.
    path: String,
}

impl Monitor {
    fn start(daemon: &Daemon, disk: &str, user: Option<&User>) -> Monitor {
        Monitor::launch(daemon, disk, user, true)
    }

    /// The same in text mode.
    fn text(daemon: &Daemon, disk: &str) -> Monitor {
        Monitor::launch(daemon, disk, None, false)
    }

    fn launch(daemon: &Daemon, disk: &str, user: Option<&User>, json: bool) -> Monitor {
        let mut command = Command::new(env!("CARGO_BIN_EXE_watchqctl"));
        command
            .args(["--address", daemon.address(), "monitor"])
            .args(json.then_some("--json"))
            .arg("devices")
            .arg(format!("--match=name={disk}"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(user) = user {
            command.uid(user.uid).gid(user.gid);
        }
        let mut child = command.spawn().expect("watchqctl");
        let stdout = lines(child.stdout.take().expect("stdout"));
        let stderr = lines(child.stderr.take().expect("stderr"));
        let mut monitor = Monitor {
            child,
            stdout,
            stderr,
            errors: Vec::new(),
            path: String::new(),
        };
        let watching = monitor.stderr_until("the 'watching' line", |l| l.starts_with("watching"));
        monitor.path = watching
            .split_once("(subscription ")
            .and_then(|(_, rest)| rest.split_once(')'))
            .map(|(path, _)| path.to_owned())
            .unwrap_or_else(|| panic!("no subscription path in {watching:?}"));
        monitor
    }

    /// The next line on stdout, failing after [`TIMEOUT`].
    fn line(&mut self, what: &str) -> String {
        self.stdout.recv_timeout(TIMEOUT).unwrap_or_else(|e| {
            self.errors.extend(self.stderr.try_iter());
            panic!(
                "watchqctl printed no {what} ({e}); stderr: {:?}",
                self.errors
            )
        })
    }

    /// The next JSON line on stdout, failing after [`TIMEOUT`].
    fn next(&mut self, what: &str) -> serde_json::Value {
        let line = self.line(what);
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
    }

    /// Reads stderr until a line satisfies `done`, failing after [`TIMEOUT`] without one.
    fn stderr_until(&mut self, what: &str, done: impl Fn(&str) -> bool) -> String {
        loop {
            let line = self.stderr.recv_timeout(TIMEOUT).unwrap_or_else(|e| {
                panic!(
                    "watchqctl said no {what} on stderr ({e}): {:?}",
                    self.errors
                )
            });
            self.errors.push(line.clone());
            if done(&line) {
                return line;
            }
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The unique bus name of the connection process `pid` holds (a monitor has one).
async fn unique_name_of(conn: &Connection, pid: u32) -> String {
    let dbus = zbus::fdo::DBusProxy::new(conn).await.expect("bus proxy");
    for name in dbus.list_names().await.expect("ListNames") {
        if !name.starts_with(':') {
            continue;
        }
        if dbus
            .get_connection_unix_process_id(name.as_ref())
            .await
            .is_ok_and(|p| p == pid)
        {
            return name.to_string();
        }
    }
    panic!("no connection of pid {pid} on the bus");
}

/// dbus-python, run as another user: the strongest forgery a peer can make (right
/// destination, right path, right interface, a well-formed body; only the sender, which
/// the bus writes, differs): a device event, a `Lost`, and the bus's `NameOwnerChanged`
/// saying the daemon left. Ends with a call to the bus: the bus handles one sender's
/// messages in order, so once it answered, the forged signals sit in the victim's queue
/// ahead of any event made afterwards.
const FORGER: &str = r#"
import sys, dbus, dbus.lowlevel
address, victim, path = sys.argv[1:4]
bus = dbus.bus.BusConnection(address)
def send(path, interface, member, signature, *args):
    message = dbus.lowlevel.SignalMessage(path, interface, member)
    message.set_destination(victim)
    message.append(*args, signature=signature)
    bus.send_message(message)
send(path, "org.watchq1.Subscription", "DeviceChanged", "ttsssa{sv}a{ss}",
     424242, 1, "change", "block", "/devices/virtual/block/FORGED",
     {"name": "FORGED"}, {"DEVNAME": "/dev/FORGED"})
send(path, "org.watchq1.Subscription", "Lost", "ttss", 1, 999, "devices", "queue-full")
send("/org/freedesktop/DBus", "org.freedesktop.DBus", "NameOwnerChanged", "sss",
     "org.watchq1", "", "")
bus.call_blocking("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                  "GetId", "", ())
print(bus.get_unique_name())
"#;

async fn forge(address: &str, forger: &User, victim: &str, path: &str) {
    let mut command = Command::new("/usr/bin/python3");
    command
        .args(["-c", FORGER, address, victim, path])
        .uid(forger.uid)
        .gid(forger.gid);
    let out = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("forger thread")
        .expect("/usr/bin/python3 (python3-dbus)");
    assert!(
        out.status.success(),
        "forger: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn name_spec(disk: &LoopDevice) -> HashMap<String, OwnedVariant> {
    HashMap::from([(
        "name".to_owned(),
        OwnedVariant::try_from(zbus::Variant::from(disk.name.as_str())).expect("owned"),
    )])
}

/// The next item of `sub`, failing after [`TIMEOUT`].
async fn next_item(sub: &mut Subscription) -> Item {
    tokio::time::timeout(TIMEOUT, sub.next())
        .await
        .expect("an item before the deadline")
        .expect("the connection is open")
        .expect("no error")
}

/// One daemon restart under `sub`, as its items say it: `DaemonGone`, any `Retrying`,
/// then `Restarted`. Returns the owner `DaemonGone` named, and the restart.
async fn next_restart(sub: &mut Subscription) -> (OwnedUniqueName, Restart) {
    let gone = match next_item(sub).await {
        Item::DaemonGone { previous_owner } => previous_owner,
        other => panic!("expected DaemonGone, got {other:?}"),
    };
    loop {
        match next_item(sub).await {
            Item::Retrying { .. } => {}
            Item::Restarted(restart) => return (gone, restart),
            other => panic!("expected Restarted, got {other:?}"),
        }
    }
}

/// The (seq, action, sys_path) of a `DeviceChanged` item; fails on anything else.
fn device_event(item: &Item) -> (u64, String, String) {
    let Item::Signal(message) = item else {
        panic!("expected a DeviceChanged signal, got {item:?}");
    };
    let header = message.header();
    assert_eq!(
        header.member().map(|m| m.as_str()),
        Some("DeviceChanged"),
        "{message:?}"
    );
    let DeviceChanged {
        seq,
        action,
        sys_path,
        ..
    } = message
        .body()
        .deserialize::<DeviceChanged>()
        .expect("DeviceChanged body");
    (seq, action.into_owned(), sys_path.into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_forged_by_another_user_reach_no_client_of_ours() {
    let daemon = Daemon::with_polkit("");
    let disk = LoopDevice::attach(4);
    let forger = polkit::user("watchq-forger");
    let bob = polkit::user("watchq-bob");

    let mut as_bob = Monitor::start(&daemon, &disk.name, Some(&bob));
    let mut as_root = Monitor::start(&daemon, &disk.name, None);
    let conn = daemon.connect().await;
    let mut rust = Subscription::builder(&conn)
        .watch("devices", 1, name_spec(&disk))
        .build()
        .await
        .expect("subscription");

    let look = daemon.connect().await;
    let victims = [
        (
            unique_name_of(&look, as_bob.child.id()).await,
            as_bob.path.clone(),
        ),
        (
            unique_name_of(&look, as_root.child.id()).await,
            as_root.path.clone(),
        ),
        (
            conn.unique_name().expect("unique name").to_string(),
            rust.path().expect("subscribed").to_string(),
        ),
    ];
    for (victim, path) in &victims {
        forge(daemon.address(), &forger, victim, path).await;
    }

    // A real event after the forgeries: the first thing every client hands out.
    disk.synth_change();
    for monitor in [&mut as_bob, &mut as_root] {
        let event = monitor.next("event");
        assert_eq!(event["signal"], "DeviceChanged", "{event}");
        assert_eq!(event["seq"], 1, "{event}");
        assert_eq!(event["sys_path"], disk.sys_path(), "{event}");
        assert_eq!(event["action"], "change", "{event}");
        // The forged NameOwnerChanged made no client think the daemon had left.
        assert!(
            !monitor.errors.iter().any(|l| l.contains("left the bus")),
            "{:?}",
            monitor.errors
        );
    }
    let (seq, action, sys_path) = device_event(&next_item(&mut rust).await);
    assert_eq!((seq, action.as_str()), (1, "change"));
    assert_eq!(sys_path, disk.sys_path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_restart_is_reported_in_band_and_events_flow_again() {
    let mut daemon = Daemon::start();
    let disk = LoopDevice::attach(4);
    // A watch the restarted daemon cannot set again: its path is gone by then.
    let gone = tempfile::tempdir().expect("temporary directory");
    let space = HashMap::from([
        (
            "path".to_owned(),
            OwnedVariant::try_from(zbus::Variant::from(gone.path().to_str().expect("utf-8")))
                .expect("owned"),
        ),
        ("low-percent".to_owned(), OwnedVariant::from(1u32)),
    ]);

    let mut monitor = Monitor::start(&daemon, &disk.name, None);
    let mut text = Monitor::text(&daemon, &disk.name);
    let conn = daemon.connect().await;
    let mut rust = Subscription::builder(&conn)
        .retry_delays(
            std::time::Duration::from_millis(50),
            std::time::Duration::from_secs(1),
        )
        .watch("devices", 1, name_spec(&disk))
        .watch("space", 2, space)
        .build()
        .await
        .expect("subscription");
    disk.synth_change();
    assert_eq!(monitor.next("the first event")["seq"], 1);
    let line = text.line("the first event");
    assert!(line.starts_with("#1 "), "{line}");
    assert_eq!(device_event(&next_item(&mut rust).await).0, 1);
    let first_owner = rust.owner().expect("subscribed").clone();
    let first_pid = daemon.pid();

    daemon.crash();
    drop(gone);
    daemon.restart();
    assert_ne!(daemon.pid(), first_pid);

    // watchqctl says on stderr that the daemon left and came back, and prints the gap.
    monitor.stderr_until("that the daemon left", |l| l.contains("left the bus"));
    monitor.stderr_until("that the daemon is back", |l| l.contains("is back"));
    let gap = monitor.next("the gap");
    assert_eq!(gap["signal"], "Lost", "{gap}");
    assert_eq!(gap["reason"], DAEMON_RESTARTED, "{gap}");
    assert_eq!(gap["next_seq"], 1, "{gap}");
    assert_ne!(gap["subscription"], "", "{gap}");
    text.stderr_until("that the daemon left", |l| l.contains("left the bus"));
    let line = text.line("the gap");
    assert!(
        line.starts_with("#-") && line.contains("LOST") && line.contains(DAEMON_RESTARTED),
        "{line}"
    );

    // The Rust client: gone, perhaps some attempts, back; the refused watch by its tag.
    let (gone, restart) = next_restart(&mut rust).await;
    assert_eq!(gone, first_owner);
    assert_eq!(restart.previous_owner, first_owner);
    assert_ne!(restart.owner, first_owner);
    assert_eq!(Some(&restart.owner), rust.owner());
    match next_item(&mut rust).await {
        Item::WatchNotRestored { tag, kind, error } => {
            assert_eq!((tag, kind.as_str()), (2, "space"));
            // The path is gone: the daemon's own typed refusal, naming it.
            assert!(
                matches!(&error, zbus::Error::MethodError(name, Some(message), _)
                    if name.as_str() == "org.watchq1.Error.NotFound" && message.contains("does not exist")),
                "{error:?}"
            );
        }
        other => panic!("expected WatchNotRestored for tag 2, got {other:?}"),
    }
    assert_eq!(
        rust.watches().iter().map(|w| w.tag).collect::<Vec<_>>(),
        [1]
    );

    // Real events after the restart reach both, numbered afresh.
    disk.synth_change();
    let event = monitor.next("an event after the restart");
    assert_eq!(event["signal"], "DeviceChanged", "{event}");
    assert_eq!(event["seq"], 1, "{event}");
    assert_eq!(event["sys_path"], disk.sys_path(), "{event}");
    let line = text.line("an event after the restart");
    assert!(
        line.starts_with("#1 ") && line.contains(&disk.name),
        "{line}"
    );
    let (seq, action, sys_path) = device_event(&next_item(&mut rust).await);
    assert_eq!((seq, action.as_str()), (1, "change"));
    assert_eq!(sys_path, disk.sys_path());
    disk.synth_change();
    assert_eq!(monitor.next("the second event after the restart")["seq"], 2);
    assert_eq!(device_event(&next_item(&mut rust).await).0, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_in_a_row_are_one_gap() {
    let mut daemon = Daemon::start();
    let disk = LoopDevice::attach(4);
    let conn = daemon.connect().await;
    let mut rust = Subscription::builder(&conn)
        .retry_delays(
            std::time::Duration::from_millis(50),
            std::time::Duration::from_secs(1),
        )
        .watch("devices", 1, name_spec(&disk))
        .build()
        .await
        .expect("subscription");
    disk.synth_change();
    assert_eq!(device_event(&next_item(&mut rust).await).0, 1);
    let first_owner = rust.owner().expect("subscribed").clone();

    // Five restarts while the client reads nothing: the bus's news of four instances
    // that came and went is queued behind the first departure and read after it. A
    // client that retries before it has read all the news subscribes to the last
    // instance and then takes an older instance's departure for its own (the code
    // before 0017f4e did, in 2 of 4 runs: whether it retries first is tokio's choice).
    for _ in 0..5 {
        let pid = daemon.pid();
        daemon.crash();
        daemon.restart();
        assert_ne!(daemon.pid(), pid);
    }
    let dbus = zbus::fdo::DBusProxy::new(&conn).await.expect("bus proxy");
    let last_owner = dbus
        .get_name_owner(watchqd::client::BUS_NAME.try_into().expect("bus name"))
        .await
        .expect("the last instance owns the name");

    let (gone, restart) = next_restart(&mut rust).await;
    assert_eq!(gone, first_owner);
    assert_eq!(restart.previous_owner, first_owner);
    assert_eq!(restart.owner.as_str(), last_owner.as_str());

    // One gap, not two: the next items are the new subscription's events, from 1.
    disk.synth_change();
    let (seq, action, sys_path) = device_event(&next_item(&mut rust).await);
    assert_eq!((seq, action.as_str()), (1, "change"));
    assert_eq!(sys_path, disk.sys_path());
    disk.synth_change();
    assert_eq!(device_event(&next_item(&mut rust).await).0, 2);
    assert_eq!(rust.owner().map(|o| o.as_str()), Some(last_owner.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_the_restarted_daemon_refuses_is_reported_and_dropped() {
    let mut daemon = Daemon::start();
    let disk = LoopDevice::attach(4);
    let conn = daemon.connect().await;
    // Two entries; only `add` of devices passes.
    let filter = vec![
        ("devices".to_owned(), vec!["add".to_owned()]),
        ("mounts".to_owned(), vec!["attach".to_owned()]),
    ];
    let mut rust = Subscription::builder(&conn)
        .retry_delays(
            std::time::Duration::from_millis(50),
            std::time::Duration::from_secs(1),
        )
        .watch("devices", 1, name_spec(&disk))
        .filter(filter)
        .build()
        .await
        .expect("subscription");

    // The administrator lowers the limit the filter is within, and restarts.
    daemon.crash();
    std::fs::write(daemon.config_path(), "[limits]\nfilter_entries = 1\n").expect("config");
    daemon.restart();

    next_restart(&mut rust).await;
    match next_item(&mut rust).await {
        Item::FilterNotRestored { error } => assert!(
            matches!(&error, zbus::Error::MethodError(name, Some(message), _)
                if name.as_str() == "org.watchq1.Error.LimitExceeded" && message.contains("at most 1")),
            "{error:?}"
        ),
        other => panic!("expected FilterNotRestored, got {other:?}"),
    }
    // The watch was restored, and without the filter a `change` now passes.
    assert_eq!(
        rust.watches().iter().map(|w| w.tag).collect::<Vec<_>>(),
        [1]
    );
    disk.synth_change();
    let (seq, action, sys_path) = device_event(&next_item(&mut rust).await);
    assert_eq!((seq, action.as_str()), (1, "change"));
    assert_eq!(sys_path, disk.sys_path());

    // The dropped filter stays dropped: a later restart, with the limit back, does not
    // bring it back behind the application's back.
    daemon.crash();
    std::fs::write(daemon.config_path(), "").expect("config");
    daemon.restart();
    next_restart(&mut rust).await;
    disk.synth_change();
    let (seq, action, _) = device_event(&next_item(&mut rust).await);
    assert_eq!((seq, action.as_str()), (1, "change"));
}

/// Match rules `conn` holds on the bus, as dbus-daemon counts them.
async fn match_rules(look: &Connection, conn: &Connection) -> u32 {
    let name = conn.unique_name().expect("unique name").to_string();
    let reply = look
        .call_method(
            Some("org.freedesktop.DBus"),
            "/org/freedesktop/DBus",
            Some("org.freedesktop.DBus.Debug.Stats"),
            "GetConnectionStats",
            &(name.as_str(),),
        )
        .await
        .expect("GetConnectionStats");
    let stats: HashMap<String, OwnedVariant> = reply.body().deserialize().expect("stats");
    u32::try_from(&stats["MatchRules"]).expect("MatchRules")
}

/// `watchqd::client` reads its subscriptions' signals without bus match rules (they are
/// unicast, and every rule is one more that dbus-daemon walks for each message it
/// routes): three subscriptions on one connection add one rule between them, the watch
/// on the daemon's name owner they share (zbus asks the bus once for equal rules) — with
/// a rule per subscription's signals it was four — and each still gets its event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_add_no_match_rule_for_their_signals() {
    let daemon = Daemon::start();
    let disk = LoopDevice::attach(4);
    let conn = daemon.connect().await;
    let look = daemon.connect().await;
    let before = match_rules(&look, &conn).await;
    let mut subs = Vec::new();
    for _ in 0..3 {
        subs.push(
            Subscription::builder(&conn)
                .watch("devices", 1, name_spec(&disk))
                .build()
                .await
                .expect("subscription"),
        );
    }
    assert_eq!(match_rules(&look, &conn).await - before, 1);
    disk.synth_change();
    for sub in &mut subs {
        let (seq, action, sys_path) = device_event(&next_item(sub).await);
        assert_eq!((seq, action.as_str()), (1, "change"));
        assert_eq!(sys_path, disk.sys_path());
    }
}
