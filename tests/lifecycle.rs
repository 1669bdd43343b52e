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

/// The daemon as systemd runs it: READY=1 with a STATUS once the name is owned, watchdog
/// pings at half of `WATCHDOG_USEC` while the bus answers and none while it does not, and
/// on SIGTERM STOPPING=1, the name released and a
/// clean exit.
#[test]
fn systemd_notifications_watchdog_and_clean_stop() {
    use std::os::unix::net::UnixDatagram;
    use std::process::Command;

    let bus = PrivateBus::start();
    let notify_path = bus.dir.path().join("notify-systemd");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(TIMEOUT)).unwrap();
    let config = bus.dir.path().join("empty.toml");
    std::fs::write(&config, "").unwrap();
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
    let mut messages = Vec::new();
    let mut buf = [0u8; 4096];
    // READY first, then at least three watchdog pings (every 100 ms).
    while messages
        .iter()
        .filter(|m: &&String| m.as_str() == "WATCHDOG=1")
        .count()
        < 3
    {
        let n = notify.recv(&mut buf).expect("a notification from watchqd");
        messages.extend(
            String::from_utf8_lossy(&buf[..n])
                .lines()
                .map(str::to_owned),
        );
    }
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
    // A ping already decided may still arrive.
    notify
        .set_read_timeout(Some(std::time::Duration::from_millis(300)))
        .unwrap();
    while notify.recv(&mut buf).is_ok() {}
    let hung = std::time::Instant::now();
    while let Ok(n) = notify.recv(&mut buf) {
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        assert!(
            !text.lines().any(|l| l == "WATCHDOG=1"),
            "pinged the watchdog {:?} after the bus stopped answering",
            hung.elapsed()
        );
        assert!(hung.elapsed() < TIMEOUT);
    }
    nix::sys::signal::kill(bus_pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    notify.set_read_timeout(Some(TIMEOUT)).unwrap();
    loop {
        let n = notify
            .recv(&mut buf)
            .expect("watchdog pings again once the bus answers");
        if String::from_utf8_lossy(&buf[..n])
            .lines()
            .any(|l| l == "WATCHDOG=1")
        {
            break;
        }
    }

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    loop {
        let n = notify.recv(&mut buf).expect("STOPPING=1 from watchqd");
        if String::from_utf8_lossy(&buf[..n])
            .lines()
            .any(|l| l == "STOPPING=1")
        {
            break;
        }
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "watchqd exited with {status} on SIGTERM");
    assert!(!watchqd_owns_the_name(&bus.address));
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
