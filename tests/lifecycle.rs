//! Subscriptions die with their owner's connection and leave nothing behind.

mod common;

use std::time::{Duration, Instant};

use common::*;
use zbus::fdo::IntrospectableProxy;
use zbus::Variant;

async fn subscription_nodes(daemon: &Daemon) -> usize {
    let conn = daemon.connect().await;
    let proxy = IntrospectableProxy::builder(&conn)
        .destination("org.watchq1")
        .path("/org/watchq1/subscription")
        .build()
        .await
        .unwrap();
    // With no subscription left, the parent node itself is gone.
    match proxy.introspect().await {
        Ok(xml) => xml.matches("<node name=").count(),
        Err(zbus::fdo::Error::UnknownObject(_)) => 0,
        Err(e) => panic!("Introspect: {e}"),
    }
}

async fn wait_for_no_subscriptions(daemon: &Daemon) {
    let start = Instant::now();
    while subscription_nodes(daemon).await > 0 {
        assert!(
            start.elapsed() < TIMEOUT,
            "subscriptions outlived their owners"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_disappears_with_its_owner() {
    let daemon = Daemon::start();
    let sub = Subscriber::new(&daemon).await;
    sub.watch("devices", 1, &[]).await;
    let path = sub.path.clone();
    assert_eq!(subscription_nodes(&daemon).await, 1);
    assert_eq!(daemon.uevent_sockets(), 1);
    drop(sub);
    wait_for_no_subscriptions(&daemon).await;
    assert_eq!(
        daemon.uevent_sockets(),
        0,
        "the source stopped with its last watcher"
    );

    // Calling the old path now fails: the object is gone.
    let conn = daemon.connect().await;
    let stale = watchqd::client::SubscriptionProxy::builder(&conn)
        .path(path)
        .build()
        .await
        .unwrap();
    let name = error_name(stale.remove_watch(1).await);
    assert!(
        name.starts_with("org.freedesktop.DBus.Error.Unknown"),
        "{name}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_removes_the_subscription() {
    let daemon = Daemon::start();
    let sub = Subscriber::new(&daemon).await;
    sub.watch("devices", 1, &[]).await;
    sub.proxy.close().await.expect("Close");
    assert_eq!(subscription_nodes(&daemon).await, 0);
    assert_eq!(daemon.uevent_sockets(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_subscribe_disconnect_cycles_leak_nothing() {
    let daemon = Daemon::start();
    // Warm up once so that lazily created state (proxies, tasks) is counted in "before".
    {
        let sub = Subscriber::new(&daemon).await;
        sub.watch("devices", 1, &[("subsystem", Variant::from("block"))])
            .await;
    }
    wait_for_no_subscriptions(&daemon).await;
    let fds_before = daemon.fd_count();
    let rss_before = daemon.rss_kib();

    for cycle in 0..1000u64 {
        let sub = Subscriber::new(&daemon).await;
        sub.watch("devices", cycle, &[("subsystem", Variant::from("block"))])
            .await;
        if cycle % 2 == 0 {
            sub.watch("devices", cycle + 1, &[("subsystem", Variant::from("usb"))])
                .await;
        }
        drop(sub);
    }
    wait_for_no_subscriptions(&daemon).await;
    assert_eq!(daemon.uevent_sockets(), 0);
    assert_eq!(
        daemon.fd_count(),
        fds_before,
        "open fds before and after 1,000 cycles"
    );
    let rss_after = daemon.rss_kib();
    assert!(
        rss_after < rss_before + 4 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB over 1,000 cycles"
    );
}

/// Receives notifications from `socket` until `done` holds for one of their lines,
/// failing at `deadline`: a daemon that keeps sending something else cannot hang the
/// test. Returns every line received.
fn receive_until(
    socket: &std::os::unix::net::UnixDatagram,
    what: &str,
    deadline: Instant,
    mut done: impl FnMut(&str) -> bool,
) -> Vec<String> {
    let mut lines = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "no {what} before the deadline; got {lines:?}"
        );
        socket.set_read_timeout(Some(left)).expect("read timeout");
        let n = socket
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no {what} before the deadline ({e}); got {lines:?}"));
        let mut finished = false;
        for line in String::from_utf8_lossy(&buf[..n]).lines() {
            finished |= done(line);
            lines.push(line.to_owned());
        }
        if finished {
            return lines;
        }
    }
}

/// Every notification line that arrives within `window`, which ends at the deadline
/// whatever the sender does.
fn receive_for(socket: &std::os::unix::net::UnixDatagram, window: Duration) -> Vec<String> {
    let end = Instant::now() + window;
    let mut lines = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return lines;
        }
        socket.set_read_timeout(Some(left)).expect("read timeout");
        match socket.recv(&mut buf) {
            Ok(n) => lines.extend(
                String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .map(str::to_owned),
            ),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("receiving notifications: {e}"),
        }
    }
}

/// A private bus, a socket to receive the daemon's notifications on (as systemd's) and
/// its path, and an empty configuration file.
fn bus_and_notify_socket() -> (
    PrivateBus,
    std::os::unix::net::UnixDatagram,
    std::path::PathBuf,
    std::path::PathBuf,
) {
    let bus = PrivateBus::start();
    let notify_path = bus.dir.path().join("notify-systemd");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    let config = bus.dir.path().join("watchqd.toml");
    std::fs::write(&config, "").unwrap();
    (bus, notify, notify_path, config)
}

/// The daemon as systemd runs it: READY=1 with a STATUS once the name is owned, watchdog
/// pings at half of `WATCHDOG_USEC` while the bus answers and none while it does not, and
/// on SIGTERM STOPPING=1, the name released and a
/// clean exit. Every wait has a deadline that fails the test.
#[test]
fn systemd_notifications_watchdog_and_clean_stop() {
    use std::process::Command;

    let (bus, notify, notify_path, config) = bus_and_notify_socket();
    // systemd sets WATCHDOG_PID to the main process; `exec` keeps the shell's pid.
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(r#"WATCHDOG_PID=$$ exec "$0" --config "$1""#)
        .arg(env!("CARGO_BIN_EXE_watchqd"))
        .arg(&config)
        .env("DBUS_SYSTEM_BUS_ADDRESS", &bus.address)
        .env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", "200000")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // READY first, then at least three watchdog pings (every 100 ms).
    let mut pings = 0;
    let messages = receive_until(
        &notify,
        "READY=1 and three watchdog pings",
        Instant::now() + TIMEOUT,
        |line| {
            pings += usize::from(line == "WATCHDOG=1");
            pings == 3
        },
    );
    let ready = messages
        .iter()
        .position(|m| m == "READY=1")
        .expect("READY=1");
    let first_ping = messages.iter().position(|m| m == "WATCHDOG=1").unwrap();
    assert!(ready < first_ping, "{messages:?}");
    assert!(
        messages
            .iter()
            .any(|m| m.starts_with("STATUS=Serving org.watchq1;")),
        "{messages:?}"
    );
    assert!(
        watchqd_owns_the_name(&bus.address),
        "READY=1 came before the name was owned"
    );

    // A bus that stops answering: the daemon cannot deliver, so it must stop pinging and
    // let systemd restart it; when the bus answers again, the pings come back.
    let bus_pid = nix::unistd::Pid::from_raw(i32::try_from(bus.pid()).unwrap());
    nix::sys::signal::kill(bus_pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    // A ping already decided may arrive in the first interval (100 ms; its health check
    // gives the bus 50 ms); none in the ten intervals after it.
    let settle = receive_for(&notify, Duration::from_millis(300));
    let hung = receive_for(&notify, Duration::from_secs(1));
    assert!(
        !hung.iter().any(|l| l == "WATCHDOG=1"),
        "pinged the watchdog while the bus did not answer: {hung:?} (before: {settle:?})"
    );
    nix::sys::signal::kill(bus_pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    receive_until(
        &notify,
        "a watchdog ping once the bus answers again",
        Instant::now() + TIMEOUT,
        |line| line == "WATCHDOG=1",
    );

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    receive_until(
        &notify,
        "STOPPING=1 after SIGTERM",
        Instant::now() + TIMEOUT,
        |line| line == "STOPPING=1",
    );
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for watchqd") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("watchqd did not exit within {TIMEOUT:?} of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "watchqd exited with {status} on SIGTERM");
    assert!(!watchqd_owns_the_name(&bus.address));
}

/// A reload as systemd's `Type=notify-reload` (253) expects it: `RELOADING=1` with
/// `MONOTONIC_USEC`, then `READY=1`; for a broken file, with `READY=1`, a `STATUS=` that
/// names the file and the key, and the daemon keeps serving (no exit 78).
#[test]
fn reload_speaks_the_notify_reload_protocol_and_refuses_a_broken_file() {
    use std::process::Command;

    let (bus, notify, notify_path, config) = bus_and_notify_socket();
    let mut child = Command::new(env!("CARGO_BIN_EXE_watchqd"))
        .arg("--config")
        .arg(&config)
        .env("DBUS_SYSTEM_BUS_ADDRESS", &bus.address)
        .env("NOTIFY_SOCKET", &notify_path)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    receive_until(&notify, "READY=1", Instant::now() + TIMEOUT, |l| {
        l == "READY=1"
    });

    let reload = |toml: &str, what: &str| {
        std::fs::write(&config, toml).unwrap();
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
        let lines = receive_until(&notify, what, Instant::now() + TIMEOUT, |l| l == "READY=1");
        assert_eq!(
            lines.first().map(String::as_str),
            Some("RELOADING=1"),
            "{lines:?}"
        );
        lines
    };
    let refused = reload(
        "[delivery]\nin_flight = 1\n",
        "READY=1 after a refused reload",
    );
    assert!(
        refused.iter().any(|l| l.starts_with("MONOTONIC_USEC=")
            && l["MONOTONIC_USEC=".len()..]
                .parse::<u64>()
                .is_ok_and(|v| v > 0)),
        "{refused:?}"
    );
    let status = refused
        .iter()
        .find(|l| l.starts_with("STATUS="))
        .unwrap_or_else(|| panic!("no STATUS= for the refusal: {refused:?}"));
    assert!(
        status.contains("reload refused")
            && status.contains(config.to_str().unwrap())
            && status.contains("delivery.in_flight"),
        "{status}"
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "a broken reload stopped the daemon"
    );
    assert!(watchqd_owns_the_name(&bus.address));

    let applied = reload("[delivery]\nin_flight = 32\n", "READY=1 after a reload");
    assert!(
        applied
            .iter()
            .any(|l| l.starts_with("STATUS=Serving org.watchq1;")),
        "{applied:?}"
    );
    let _ = child.kill();
    let _ = child.wait();
}

fn watchqd_owns_the_name(address: &str) -> bool {
    let out = std::process::Command::new("dbus-send")
        .args([
            "--print-reply",
            &format!("--bus={address}"),
            "--dest=org.freedesktop.DBus",
        ])
        .args([
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus.NameHasOwner",
            "string:org.watchq1",
        ])
        .output()
        .expect("dbus-send");
    String::from_utf8_lossy(&out.stdout).contains("boolean true")
}
