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
