//! Bad input gets a typed error and changes nothing else.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use watchqd::client::{ManagerProxy, SubscriptionProxy};
use zbus::Variant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_calls_get_typed_errors_and_change_nothing() {
    let daemon = Daemon::start();
    let disk = LoopDevice::attach(4);
    let mut sub = Subscriber::new(&daemon).await;
    sub.watch("devices", 5, &[("name", Variant::from(disk.name.as_str()))])
        .await;
    let manager = ManagerProxy::new(&sub.conn).await.unwrap();

    let invalid = "org.watchq1.Error.InvalidArgument";
    let spec =
        |pairs: &[(&'static str, Variant<'static>)]| -> HashMap<&'static str, Variant<'static>> {
            pairs
                .iter()
                .map(|(k, v)| (*k, v.try_clone().unwrap()))
                .collect()
        };
    // Unknown watch kinds, keys, types and values.
    assert_eq!(
        error_name(sub.proxy.add_watch("toasters", 1, spec(&[])).await),
        invalid
    );
    assert_eq!(
        error_name(
            sub.proxy
                .add_watch("devices", 1, spec(&[("subsytem", "block".into())]))
                .await
        ),
        invalid
    );
    assert_eq!(
        error_name(
            sub.proxy
                .add_watch("devices", 1, spec(&[("subsystem", 42u32.into())]))
                .await
        ),
        invalid
    );
    assert_eq!(
        error_name(
            sub.proxy
                .add_watch("devices", 1, spec(&[("subsystem", "net".into())]))
                .await
        ),
        invalid
    );
    // A tag may be used once per subscription.
    assert_eq!(
        error_name(sub.proxy.add_watch("devices", 5, spec(&[])).await),
        invalid
    );
    // Filters name real sources and subtypes.
    assert_eq!(
        error_name(sub.proxy.set_filter(&[("devices", &["explode"][..])]).await),
        invalid
    );
    assert_eq!(
        error_name(sub.proxy.set_filter(&[("nowhere", &["add"][..])]).await),
        invalid
    );
    assert_eq!(
        error_name(sub.proxy.remove_watch(99).await),
        "org.watchq1.Error.NotFound"
    );
    assert_eq!(error_name(sub.proxy.snapshot("nowhere").await), invalid);
    // Subscribe options.
    for options in [
        HashMap::from([("queue-depth", Variant::from(0u32))]),
        HashMap::from([("queue-depth", Variant::from("deep"))]),
        HashMap::from([("colour", Variant::from("blue"))]),
    ] {
        assert_eq!(error_name(manager.subscribe(options).await), invalid);
    }
    // Deeper than delivery.max_queue_depth is a limit (tests/policy.rs covers every limit).
    assert_eq!(
        error_name(
            manager
                .subscribe(HashMap::from([("queue-depth", Variant::from(u32::MAX))]))
                .await
        ),
        "org.watchq1.Error.LimitExceeded"
    );
    // A call whose arguments do not have the method's signature never reaches the daemon's
    // logic: the bus library answers with the standard error.
    let reply = sub
        .conn
        .call_method(
            Some("org.watchq1"),
            sub.path.as_str(),
            Some("org.watchq1.Subscription"),
            "AddWatch",
            &("devices",),
        )
        .await;
    assert_eq!(error_name(reply), "org.freedesktop.DBus.Error.InvalidArgs");

    // Someone else's subscription: another connection, even of the same user.
    let intruder = daemon.connect().await;
    let theirs = SubscriptionProxy::builder(&intruder)
        .path(sub.path.clone())
        .build()
        .await
        .unwrap();
    let denied = "org.watchq1.Error.AccessDenied";
    assert_eq!(
        error_name(theirs.add_watch("devices", 6, spec(&[])).await),
        denied
    );
    assert_eq!(error_name(theirs.remove_watch(5).await), denied);
    assert_eq!(error_name(theirs.set_filter(&[]).await), denied);
    assert_eq!(error_name(theirs.snapshot("devices").await), denied);
    assert_eq!(error_name(theirs.close().await), denied);
    assert_eq!(error_name(theirs.watches().await), denied);

    // None of that changed anything: the one watch still delivers, unfiltered.
    assert_eq!(
        sub.proxy.watches().await.unwrap(),
        vec![(5, "devices".to_owned())]
    );
    disk.synth_change();
    let signal = sub.next(TIMEOUT).await.expect("the watch still works");
    assert!(
        matches!(signal, Signal::Device { tag: 5, seq: 1, .. }),
        "{signal:?}"
    );
    assert!(sub.next(Duration::from_millis(200)).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_give_limit_exceeded_and_leave_the_daemon_serving() {
    let daemon = Daemon::with_config(
        "[limits]\nsubscriptions_per_connection = 2\nwatches_per_subscription = 3\n",
    );
    let conn = daemon.connect().await;
    let manager = ManagerProxy::new(&conn).await.unwrap();
    let first = Subscriber::on(conn.clone(), HashMap::new()).await;
    let _second = Subscriber::on(conn.clone(), HashMap::new()).await;
    assert_eq!(
        error_name(manager.subscribe(HashMap::new()).await),
        "org.watchq1.Error.LimitExceeded"
    );
    for tag in 0..3 {
        first.watch("devices", tag, &[]).await;
    }
    assert_eq!(
        error_name(first.proxy.add_watch("devices", 3, HashMap::new()).await),
        "org.watchq1.Error.LimitExceeded"
    );
    // Another connection is unaffected.
    let other = Subscriber::new(&daemon).await;
    other.watch("devices", 1, &[]).await;
}

/// A name pattern longer than a kernel name (255 bytes) is refused with LimitExceeded
/// naming the option and the limit, and changes nothing; runs of `*` in an allowed
/// pattern are collapsed and it matches as before (issue 14: `"*"×4000 + "a"` patterns
/// cost every subscriber 22 ms per event).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn name_patterns_longer_than_a_kernel_name_are_refused() {
    let daemon = Daemon::start();
    let disk = LoopDevice::attach(4);
    let mut sub = Subscriber::new(&daemon).await;
    let hostile = format!("{}a", "*".repeat(4000));
    // One byte over: `?`s and the device's name.
    let too_long = format!("{}{}", "?".repeat(256 - disk.name.len()), disk.name);
    for pattern in [&hostile, &too_long] {
        let refused = sub
            .proxy
            .add_watch(
                "devices",
                1,
                HashMap::from([("name", Variant::from(pattern.as_str()))]),
            )
            .await;
        match refused {
            Err(zbus::Error::MethodError(name, Some(message), _)) => {
                assert_eq!(name.as_str(), "org.watchq1.Error.LimitExceeded");
                assert!(
                    message.contains("'name'") && message.contains("255"),
                    "{message}"
                );
                assert!(
                    message.len() < 200,
                    "the message does not echo the pattern: {message}"
                );
            }
            other => panic!("expected LimitExceeded, got {other:?}"),
        }
    }
    assert!(sub.proxy.watches().await.unwrap().is_empty());

    // 255 bytes, all stars but the device's name: allowed, collapsed to `*loopN`, and it
    // matches.
    let stars = format!("{}{}", "*".repeat(255 - disk.name.len()), disk.name);
    sub.watch("devices", 2, &[("name", Variant::from(stars.as_str()))])
        .await;
    disk.synth_change();
    // (`*loop3` also matches a `loop13` another test may be using.)
    let sys_path = disk.sys_path();
    sub.until("the starry watch's event", |signals| {
        signals
            .iter()
            .any(|s| matches!(s, Signal::Device { tag: 2, sys_path: p, .. } if *p == sys_path))
    })
    .await;
}

#[test]
fn a_broken_configuration_stops_the_daemon_at_start_naming_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    for (text, key) in [
        ("[delivery]\nin_flight = 0\n", "delivery.in_flight"),
        ("[delivery]\nqueue_depht = 4\n", "queue_depht"),
        (
            "[limits]\nwatches_per_subscription = \"lots\"\n",
            "watches_per_subscription",
        ),
        ("this is not toml", ""),
        (
            "[[units]]\nsource = \"devices\"\nunit = \"x.service\"\n\n[[units]]\nsource = \"devices\"\nunit = \"watchq@.service\"\n",
            "units[1]: 'watchq@.service' is a template",
        ),
        ("[journal]\nsources = [\"mounts\"]\n", "journal.sources"),
        ("[metrics]\ninterval_ms = 99\n", "metrics.interval_ms"),
        ("[metrics]\ninterval_ms = 86400001\n", "metrics.interval_ms"),
        ("[metrics]\ninterval_ms = -5\n", "interval_ms"),
        ("[metrics]\ndirectory = \"prom\"\n", "metrics.directory"),
        ("[metrics]\ntextfile = \"maybe\"\n", "textfile"),
        ("[metrics]\ntext_file = true\n", "text_file"),
    ] {
        let path = dir.path().join("broken.toml");
        std::fs::write(&path, text).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_watchqd"))
            .arg("--config")
            .arg(&path)
            .env("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/nonexistent")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{text:?}: {stderr}");
        assert!(
            stderr.contains(path.to_str().unwrap()) && stderr.contains(key),
            "{text:?}: {stderr}"
        );
    }
    // A missing --config file is an error too, not silently the defaults.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_watchqd"))
        .args(["--config", "/nonexistent/watchqd.toml", "--check-config"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    // The environment overrides the file, and is validated the same way.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_watchqd"))
        .args(["--check-config", "--config"])
        .arg(dir.path().join("broken.toml"))
        .env("WATCHQD_DELIVERY__IN_FLIGHT", "7")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78), "the broken file still counts");
    std::fs::write(dir.path().join("ok.toml"), "[delivery]\nin_flight = 8\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_watchqd"))
        .args(["--check-config", "--config"])
        .arg(dir.path().join("ok.toml"))
        .env("WATCHQD_DELIVERY__IN_FLIGHT", "12")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("in_flight: 12"));
}

/// Someone else's subscription answers AccessDenied whatever the arguments: ownership is
/// checked before anything is read (an unknown kind answered InvalidArgument first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_gets_access_denied_before_any_argument_is_judged() {
    let daemon = Daemon::start();
    let owner = Subscriber::new(&daemon).await;
    let stranger = daemon.connect().await;
    let theirs = SubscriptionProxy::builder(&stranger)
        .path(owner.path.clone())
        .build()
        .await
        .unwrap();
    let denied = "org.watchq1.Error.AccessDenied";
    assert_eq!(
        error_name(theirs.add_watch("toasters", 1, HashMap::new()).await),
        denied
    );
    assert_eq!(error_name(theirs.remove_watch(404).await), denied);
    assert_eq!(
        error_name(theirs.set_filter(&[("toasters", &["burnt"])]).await),
        denied
    );
    assert_eq!(error_name(theirs.snapshot("toasters").await), denied);
    // The owner's own errors are unchanged.
    assert_eq!(
        error_name(owner.proxy.add_watch("toasters", 1, HashMap::new()).await),
        "org.watchq1.Error.InvalidArgument"
    );
}

/// An error quotes what the caller sent, but never echoes megabytes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_quote_at_most_a_bounded_part_of_what_was_sent() {
    let daemon = Daemon::start();
    let conn = daemon.connect().await;
    let manager = ManagerProxy::new(&conn).await.unwrap();
    let key = "k".repeat(1 << 20);
    let result = manager
        .subscribe(HashMap::from([(key.as_str(), Variant::from(1u32))]))
        .await;
    let Err(zbus::Error::MethodError(name, Some(message), _)) = result else {
        panic!("expected an error, got {result:?}");
    };
    assert_eq!(name.as_str(), "org.watchq1.Error.InvalidArgument");
    assert!(
        message.starts_with("unknown Subscribe option 'kkk"),
        "{message:.80}"
    );
    assert!(
        message.len() <= 600,
        "{} bytes echoed for a 1 MiB key",
        message.len()
    );
    assert!(
        message.ends_with("bytes cut)"),
        "{}",
        &message[message.len() - 40..]
    );
}
