//! Direct subscriptions (`Manager.SubscribeDirect`): the subscription's signals on a
//! peer-to-peer connection of its own, handed over as a file descriptor through the bus.
//! Real bus, real daemon, real kernel uevents from loop devices.

mod common;

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use watchqd::client::ManagerProxy;
use zbus::connection::{AuthMechanism, Builder};
use zbus::{Connection, MessageStream, OwnedObjectPath, Variant};

const INTERFACE: &str = "org.watchq1.Subscription";

/// One direct subscription seen from a zbus client: the bus connection that opened it
/// (kept: the subscription ends when its opener leaves the bus), the peer-to-peer
/// connection on the fd, and every signal received on it.
struct Direct {
    _bus: Connection,
    conn: Connection,
    path: OwnedObjectPath,
    stream: MessageStream,
    received: Vec<Signal>,
}

/// Calls `SubscribeDirect` on `bus`.
async fn subscribe_direct(
    bus: &Connection,
    options: HashMap<&str, Variant<'_>>,
) -> zbus::Result<(OwnedObjectPath, OwnedFd)> {
    let (path, fd) = manager(bus).await.subscribe_direct(options).await?;
    Ok((path, fd.into()))
}

async fn manager(bus: &Connection) -> ManagerProxy<'static> {
    ManagerProxy::new(bus).await.expect("manager proxy")
}

/// A zbus peer-to-peer client on a direct subscription's fd.
async fn connect_direct(fd: OwnedFd) -> Connection {
    let stream = std::os::unix::net::UnixStream::from(fd);
    stream.set_nonblocking(true).expect("non-blocking");
    Builder::unix_stream(stream)
        .p2p()
        .auth_mechanism(AuthMechanism::Anonymous)
        .build()
        .await
        .expect("peer-to-peer handshake on the direct fd")
}

impl Direct {
    async fn open(daemon: &Daemon, options: HashMap<&str, Variant<'_>>) -> Direct {
        let bus = daemon.connect().await;
        let (path, fd) = subscribe_direct(&bus, options)
            .await
            .expect("SubscribeDirect");
        let conn = connect_direct(fd).await;
        let stream = MessageStream::from(&conn);
        Direct {
            _bus: bus,
            conn,
            path,
            stream,
            received: Vec::new(),
        }
    }

    async fn call(
        &self,
        member: &str,
        body: &(impl serde::Serialize + zbus::zvariant::DynamicType),
    ) -> zbus::Result<zbus::Message> {
        self.conn
            .call_method(None::<&str>, &self.path, Some(INTERFACE), member, body)
            .await
    }

    async fn watch(&self, tag: u64, spec: &[(&str, Variant<'_>)]) -> zbus::Result<()> {
        let spec: HashMap<&str, &Variant<'_>> = spec.iter().map(|(k, v)| (*k, v)).collect();
        self.call("AddWatch", &("devices", tag, spec))
            .await
            .map(drop)
    }

    /// Receives until `done` holds, failing after [`TIMEOUT`] without a signal.
    async fn until(&mut self, what: &str, mut done: impl FnMut(&[Signal]) -> bool) {
        let start = Instant::now();
        while !done(&self.received) {
            let message = tokio::time::timeout(TIMEOUT, self.stream.next())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "waited {:?} for {what}; received {}, last {:?}",
                        start.elapsed(),
                        self.received.len(),
                        self.received.last()
                    )
                })
                .expect("the direct connection ended")
                .expect("a message");
            let header = message.header();
            if message.message_type() == zbus::message::Type::Signal
                && header.path().map(|p| p.as_str()) == Some(self.path.as_str())
            {
                if let Some(signal) = decode(&message) {
                    self.received.push(signal);
                }
            }
        }
    }
}

/// A zbus client opens a direct subscription, watches a loop device and receives its
/// real uevents on its own connection, numbered without a gap, exactly as many as made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zbus_client_receives_a_loop_devices_events_directly() {
    const EVENTS: usize = 500;
    let daemon = Daemon::start();
    let disk = LoopDevice::attach(1);
    let mut direct = Direct::open(&daemon, HashMap::new()).await;
    direct
        .watch(7, &[("name", Variant::from(disk.name.as_str()))])
        .await
        .expect("AddWatch on the direct connection");
    for _ in 0..EVENTS {
        disk.synth_change();
    }
    direct.until("the events", |s| s.len() >= EVENTS).await;
    assert_contiguous(&direct.received);
    assert!(direct.received.iter().all(
        |s| matches!(s, Signal::Device { tag: 7, sys_path, action, .. } if *sys_path == disk.sys_path() && action == "change")
    ));
    // Exactly as many: nothing more comes.
    let extra = tokio::time::timeout(Duration::from_millis(300), direct.stream.next()).await;
    assert!(extra.is_err(), "more than {EVENTS} signals: {extra:?}");
    // The properties are served there too, to the holder of the fd.
    let reply = direct
        .conn
        .call_method(
            None::<&str>,
            &direct.path,
            Some("org.freedesktop.DBus.Properties"),
            "Get",
            &(INTERFACE, "Watches"),
        )
        .await
        .expect("Watches");
    let value: zbus::OwnedVariant = reply.body().deserialize().expect("variant");
    let watches: Vec<(u64, String)> = value.try_into().expect("a(ts)");
    assert_eq!(watches, vec![(7, "devices".to_owned())]);

    // On the bus the object is not there, for a stranger nor for the opener: only the
    // fd reaches it.
    let stranger = daemon.connect().await;
    for conn in [&stranger, &direct._bus] {
        let spec: HashMap<&str, Variant<'_>> = HashMap::new();
        let refused = conn
            .call_method(
                Some("org.watchq1"),
                &direct.path,
                Some(INTERFACE),
                "AddWatch",
                &("devices", 8u64, spec),
            )
            .await;
        assert_eq!(
            error_name(refused),
            "org.freedesktop.DBus.Error.UnknownObject"
        );
    }

    // Close is answered, and ends the subscription: the connection closes.
    direct.call("Close", &()).await.expect("Close");
    let end = tokio::time::timeout(TIMEOUT, async {
        while let Some(Ok(_)) = direct.stream.next().await {}
    })
    .await;
    assert!(end.is_ok(), "the direct connection stayed open after Close");
    assert_eq!(subscription_count(&stranger).await, 0);
}

/// `watchqd_subscriptions` from `Manager.Metrics`.
async fn subscription_count(bus: &Connection) -> u64 {
    let text = manager(bus).await.metrics().await.expect("Metrics");
    text.lines()
        .find_map(|l| l.strip_prefix("watchqd_subscriptions "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no watchqd_subscriptions in {text}"))
}

/// Waits until `done` holds, for up to [`TIMEOUT`].
async fn eventually(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !done().await {
        assert!(start.elapsed() < TIMEOUT, "waited {TIMEOUT:?} for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `SubscribeDirect` is refused where `Subscribe` is, with the same error: bad options,
/// a queue deeper than allowed, and the per-connection limit, which direct subscriptions
/// count in both directions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_direct_is_refused_where_subscribe_is() {
    let daemon = Daemon::with_config(
        "[delivery]\nmax_queue_depth = 8\ndefault_queue_depth = 8\n\n\
         [limits]\nsubscriptions_per_connection = 2\n",
    );
    let bus = daemon.connect().await;
    let subscribe = |options: HashMap<&'static str, Variant<'static>>| {
        let bus = bus.clone();
        async move { error_name(manager(&bus).await.subscribe(options).await.map(drop)) }
    };
    let direct = |options: HashMap<&'static str, Variant<'static>>| {
        let bus = bus.clone();
        async move { error_name(subscribe_direct(&bus, options).await.map(drop)) }
    };
    for options in [
        HashMap::from([("queue-depth", Variant::from(9u32))]),
        HashMap::from([("queue-depth", Variant::from("deep"))]),
        HashMap::from([("colour", Variant::from(1u32))]),
    ] {
        let refused = subscribe(options.clone()).await;
        assert!(refused.starts_with("org.watchq1.Error."), "{refused}");
        assert_eq!(direct(options).await, refused);
    }
    // One of each fills the connection's two; then both are refused alike.
    let (_path, fd) = subscribe_direct(&bus, HashMap::new())
        .await
        .expect("the first SubscribeDirect");
    let _direct = connect_direct(fd).await;
    manager(&bus)
        .await
        .subscribe(HashMap::new())
        .await
        .expect("Subscribe beside a direct one");
    let limit = "org.watchq1.Error.LimitExceeded";
    assert_eq!(subscribe(HashMap::new()).await, limit);
    assert_eq!(direct(HashMap::new()).await, limit);
}

/// 1,000 direct subscriptions opened, used and closed by closing the fd leave the
/// daemon's descriptors and subscriptions where they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_direct_open_close_cycles_leak_nothing() {
    const CYCLES: usize = 1_000;
    let daemon = Daemon::start();
    let bus = daemon.connect().await;
    // One cycle first, so that whatever the first one opens for good is counted before.
    let cycle = || async {
        let (path, fd) = subscribe_direct(&bus, HashMap::new())
            .await
            .expect("SubscribeDirect");
        let conn = connect_direct(fd).await;
        conn.call_method(
            None::<&str>,
            &path,
            Some("org.freedesktop.DBus.Properties"),
            "Get",
            &(INTERFACE, "QueueDepth"),
        )
        .await
        .expect("QueueDepth on the direct connection");
        drop(conn);
    };
    cycle().await;
    eventually("the first one to end", async || {
        subscription_count(&bus).await == 0
    })
    .await;
    let fds_before = daemon.fd_count();
    for _ in 0..CYCLES {
        cycle().await;
    }
    eventually("every direct subscription to end", async || {
        subscription_count(&bus).await == 0
    })
    .await;
    eventually("the daemon's descriptors to return", async || {
        daemon.fd_count() <= fds_before
    })
    .await;
}
/// A holder of a direct fd who authenticates and then sends a message header announcing
/// 100 MiB, and nothing more, costs the daemon nothing: the connection is closed at
/// once (zbus would otherwise allocate the 100 MiB and wait for them), the subscription
/// ends, and the daemon's memory does not grow. A subscription on another connection
/// goes on receiving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_announcing_a_huge_message_is_disconnected_and_costs_nothing() {
    use std::io::{Read, Write};
    const HOSTILE: usize = 8;
    let daemon = Daemon::start();
    let bus = daemon.connect().await;
    let mut bystander = Direct::open(&daemon, HashMap::new()).await;
    let disk = LoopDevice::attach(1);
    bystander
        .watch(1, &[("name", Variant::from(disk.name.as_str()))])
        .await
        .expect("AddWatch");
    let rss_before = daemon.rss_kib();
    let mut sockets = Vec::new();
    for _ in 0..HOSTILE {
        let (_, fd) = subscribe_direct(&bus, HashMap::new())
            .await
            .expect("SubscribeDirect");
        let mut socket = std::os::unix::net::UnixStream::from(fd);
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("read timeout");
        // Authenticated as a real client is ("6869" is a trace string, hex), and the
        // daemon's OK read, so that the header below reaches zbus's message reader.
        socket
            .write_all(b"\0AUTH ANONYMOUS 6869\r\n")
            .expect("authenticate");
        let mut ok = Vec::new();
        let mut byte = [0u8];
        while !ok.ends_with(b"\r\n") {
            socket.read_exact(&mut byte).expect("the daemon's answer");
            ok.push(byte[0]);
        }
        assert!(ok.starts_with(b"OK "), "{:?}", String::from_utf8_lossy(&ok));
        socket.write_all(b"BEGIN\r\n").expect("BEGIN");
        // A method call, little-endian, announcing a body of 100 MiB.
        let mut header = vec![b'l', 1, 0, 1];
        header.extend((100u32 << 20).to_le_bytes());
        header.extend(1u32.to_le_bytes());
        header.extend(0u32.to_le_bytes());
        socket.write_all(&header).expect("the header");
        sockets.push(socket);
    }
    for mut socket in sockets {
        // The end of the stream, or a reset: not the read timeout of a connection left
        // open.
        let read = tokio::task::spawn_blocking(move || socket.read_to_end(&mut Vec::new()))
            .await
            .expect("reader");
        assert!(
            !matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "the daemon kept the connection open: {read:?}"
        );
    }
    eventually("the hostile subscriptions to end", async || {
        subscription_count(&bus).await == 1
    })
    .await;
    let grown = daemon.rss_kib().saturating_sub(rss_before);
    assert!(
        grown < 16 * 1024,
        "the daemon's RSS grew by {grown} KiB for {HOSTILE} peers announcing 100 MiB each"
    );
    disk.synth_change();
    bystander
        .until("the bystander's event", |signals| !signals.is_empty())
        .await;
    assert!(
        matches!(&bystander.received[..], [Signal::Device { tag: 1, .. }]),
        "{:?}",
        bystander.received
    );
}

/// A GDBus client (PyGObject, `tests/foreign/subscriber.py --direct`) opens a direct
/// subscription, makes a `GDBusConnection` on the fd and receives every event of a loop
/// device there, in order.
#[test]
fn a_gdbus_client_receives_a_loop_devices_events_directly() {
    const EVENTS: u64 = 500;
    let daemon = Daemon::start();
    let disk = LoopDevice::attach(1);
    let (_child, lines) = gdbus_direct(&daemon, &disk, None);
    for _ in 0..EVENTS {
        disk.synth_change();
    }
    let mut seqs = Vec::new();
    while (seqs.len() as u64) < EVENTS {
        let line = lines
            .recv_timeout(TIMEOUT)
            .unwrap_or_else(|_| panic!("GDBus direct client: {} of {EVENTS} events", seqs.len()));
        match line.split(' ').collect::<Vec<_>>().as_slice() {
            ["DeviceChanged", seq, "1"] => seqs.push(seq.parse::<u64>().expect("seq")),
            _ => panic!("unexpected line {line:?}"),
        }
    }
    assert_eq!(seqs, (1..=EVENTS).collect::<Vec<_>>());
    assert!(
        lines.recv_timeout(Duration::from_millis(300)).is_err(),
        "more than {EVENTS} signals"
    );
}

/// `tests/foreign/subscriber.py --library gdbus --direct` watching `disk`, once it
/// watches: the process and its output lines.
fn gdbus_direct(
    daemon: &Daemon,
    disk: &LoopDevice,
    queue_depth: Option<u32>,
) -> (Killed, std::sync::mpsc::Receiver<String>) {
    let mut command = std::process::Command::new("/usr/bin/python3");
    command
        .arg(repo().join("tests/foreign/subscriber.py"))
        .args([
            "--address",
            daemon.address(),
            "--library",
            "gdbus",
            "--direct",
        ]);
    if let Some(depth) = queue_depth {
        command.arg(format!("--queue-depth={depth}"));
    }
    let mut child = Killed(
        command
            .arg("devices")
            .arg(format!("name={}", disk.name))
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 with python3-gi"),
    );
    let lines = common::lines::lines(child.0.stdout.take().expect("stdout"));
    let first = lines.recv_timeout(TIMEOUT).expect("the client subscribed");
    assert!(first.starts_with("subscribed "), "{first}");
    (child, lines)
}

/// A child process killed when the test ends, passed or failed.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A direct subscriber stopped with SIGSTOP while 10,000 real uevents are made fills its
/// socket, then its queue: once resumed it receives events and `Lost` counts that add up
/// to all 10,000 exactly, numbered without a gap; a second direct subscriber, reading,
/// loses nothing meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_direct_subscriber_loses_exactly_what_it_missed_and_no_one_else_does() {
    use nix::sys::signal::{kill, Signal as Sig};
    const EVENTS: u64 = 10_000;
    const BATCH: usize = 500;
    const DEPTH: u32 = 100;
    let daemon = Daemon::start();
    let disk = LoopDevice::attach(4);
    let mut fast = Direct::open(
        &daemon,
        HashMap::from([("queue-depth", Variant::from(4096u32))]),
    )
    .await;
    fast.watch(1, &[("name", Variant::from(disk.name.as_str()))])
        .await
        .expect("AddWatch");
    let (stalled, lines) = gdbus_direct(&daemon, &disk, Some(DEPTH));
    let pid = nix::unistd::Pid::from_raw(i32::try_from(stalled.0.id()).expect("pid"));
    kill(pid, Sig::SIGSTOP).expect("SIGSTOP");
    // In batches the fast subscriber keeps up with, so that its queue never overflows.
    for _ in 0..EVENTS / BATCH as u64 {
        let expected = fast.received.len() + BATCH;
        let name = disk.name.clone();
        tokio::task::spawn_blocking(move || {
            for _ in 0..BATCH {
                std::fs::write(format!("/sys/block/{name}/uevent"), "change").expect("a uevent");
            }
        })
        .await
        .expect("writer");
        fast.until("the batch", |s| s.len() >= expected).await;
    }
    assert_eq!(fast.received.len() as u64, EVENTS);
    assert!(fast
        .received
        .iter()
        .all(|s| matches!(s, Signal::Device { .. })));
    assert_contiguous(&fast.received);

    kill(pid, Sig::SIGCONT).expect("SIGCONT");
    let (mut events, mut lost, mut next_seq) = (0u64, 0u64, 1u64);
    while events + lost < EVENTS {
        let line = lines.recv_timeout(TIMEOUT).unwrap_or_else(|_| {
            panic!("stalled direct subscriber: {events} events + {lost} lost of {EVENTS}")
        });
        let words: Vec<&str> = line.split(' ').collect();
        let [member, seq, count] = words.as_slice() else {
            panic!("unexpected line {line:?}")
        };
        let (seq, count) = (
            seq.parse::<u64>().expect("seq"),
            count.parse::<u64>().expect("count"),
        );
        assert_eq!(seq, next_seq, "gap or repeat at {line}");
        match *member {
            "DeviceChanged" => events += 1,
            "Lost" => lost += count,
            other => panic!("unexpected {other}"),
        }
        next_seq += count;
    }
    assert_eq!(events + lost, EVENTS);
    assert!(
        lost > 0,
        "a stopped reader of a {DEPTH}-deep queue must have lost events"
    );
    assert!(
        events >= u64::from(DEPTH),
        "it keeps at least its queue's worth: {events}"
    );
    assert!(
        lines.recv_timeout(Duration::from_millis(300)).is_err(),
        "nothing after the count"
    );
}

/// `tests/foreign/direct_fd.py MODE ARGS…` as `user`, its output line by line.
fn direct_fd_as(
    user: &common::polkit::User,
    args: &[&str],
) -> (Killed, std::sync::mpsc::Receiver<String>) {
    use std::os::unix::process::CommandExt;
    let mut child = Killed(
        std::process::Command::new("/usr/bin/python3")
            .arg(repo().join("tests/foreign/direct_fd.py"))
            .args(args)
            .uid(user.uid)
            .gid(user.gid)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 with python3-gi"),
    );
    let lines = common::lines::lines(child.0.stdout.take().expect("stdout"));
    (child, lines)
}

fn line(lines: &std::sync::mpsc::Receiver<String>, what: &str) -> String {
    lines
        .recv_timeout(TIMEOUT)
        .unwrap_or_else(|_| panic!("no line from the {what}"))
}

/// A direct subscription's fd handed by its opener (alice) to another user's process
/// (carol, whom polkit lets watch block errors) gives that process nothing more than
/// alice has: on alice's fd carol's AddWatch of block-errors is refused as alice's would
/// be, and a device watch (alice may) is allowed; on a direct subscription of her own,
/// carol may add both. Real polkitd, real users.
#[test]
fn a_passed_on_direct_fd_gives_its_holder_nothing_more_than_the_opener_had() {
    let daemon = Daemon::with_polkit("");
    let (alice, carol) = (
        common::polkit::user("watchq-alice"),
        common::polkit::user("watchq-carol"),
    );
    let address = daemon.address();
    let watches = ["block-errors", "devices"];

    // Carol's own: both allowed (the rule in common::polkit grants her block errors).
    let (_own, own) = direct_fd_as(
        &carol,
        &[&["own", "--address", address][..], &watches].concat(),
    );
    assert_eq!(line(&own, "own client"), "block-errors ok");
    assert_eq!(line(&own, "own client"), "devices ok");

    // Alice's, held by carol.
    let dir = tempfile::tempdir().expect("temporary directory");
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .expect("chmod");
    let socket = dir.path().join("fd.sock");
    let socket = socket.to_str().expect("a UTF-8 path");
    let (_holder, held) = direct_fd_as(
        &carol,
        &[&["hold", "--listen", socket][..], &watches].concat(),
    );
    assert_eq!(line(&held, "holder"), "listening");
    let (_opener, opened) = direct_fd_as(&alice, &["open", "--address", address, "--send", socket]);
    assert!(line(&opened, "opener").starts_with("sent /org/watchq1/subscription/"));
    assert_eq!(
        line(&held, "holder"),
        "block-errors org.watchq1.Error.AccessDenied"
    );
    assert_eq!(line(&held, "holder"), "devices ok");
}

/// `watchqctl monitor` reads a direct subscription by default and the bus with `--bus`;
/// either way it prints every event of a loop device, numbered without a gap.
#[test]
fn watchqctl_monitor_is_direct_by_default_and_on_the_bus_with_a_flag() {
    const EVENTS: u64 = 200;
    let daemon = Daemon::start();
    let disk = LoopDevice::attach(1);
    for (flags, direct) in [(&[][..], true), (&["--bus"][..], false)] {
        let mut child = Killed(
            std::process::Command::new(env!("CARGO_BIN_EXE_watchqctl"))
                .args(["--address", daemon.address(), "monitor", "--json"])
                .args(flags)
                .arg(format!("--match=name={}", disk.name))
                .arg("devices")
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("watchqctl"),
        );
        let errors = common::lines::lines(child.0.stderr.take().expect("stderr"));
        let lines = common::lines::lines(child.0.stdout.take().expect("stdout"));
        let watching = line(&errors, "watchqctl's stderr");
        assert!(watching.starts_with("watching devices"), "{watching}");
        assert_eq!(
            watching.contains("on a connection of its own"),
            direct,
            "{flags:?}: {watching}"
        );
        for _ in 0..EVENTS {
            disk.synth_change();
        }
        for seq in 1..=EVENTS {
            let event: serde_json::Value =
                serde_json::from_str(&line(&lines, "watchqctl")).expect("JSON");
            assert_eq!(event["seq"], seq, "{flags:?}: {event}");
            assert_eq!(event["signal"], "DeviceChanged", "{flags:?}: {event}");
        }
    }
}

/// A direct subscription ends when its opener leaves the bus (its identity, and polkit's
/// subject for it, are gone), even while its fd is still open: the connection closes and
/// the subscription is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_subscription_ends_when_its_opener_leaves_the_bus() {
    let daemon = Daemon::start();
    let watcher = daemon.connect().await;
    let Direct {
        _bus: opener,
        conn,
        mut stream,
        ..
    } = Direct::open(&daemon, HashMap::new()).await;
    assert_eq!(subscription_count(&watcher).await, 1);
    drop(opener);
    let end = tokio::time::timeout(TIMEOUT, async {
        while let Some(Ok(_)) = stream.next().await {}
    })
    .await;
    assert!(end.is_ok(), "the direct connection outlived its opener");
    eventually("the subscription to end", async || {
        subscription_count(&watcher).await == 0
    })
    .await;
    drop(conn);
}
