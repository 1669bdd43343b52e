//! The checked-in interface contract (`dbus/*.xml`, `dbus/org.watchq1.conf`) is what the
//! daemon serves and what the bus enforces.

mod common;

use std::process::Command;

use common::*;
use zbus::fdo::IntrospectableProxy;

#[path = "common/interface_xml.rs"]
mod interface_xml;

use interface_xml::{interface_element, normalized};

async fn served(daemon: &Daemon, path: &str, name: &str) -> String {
    let conn = daemon.connect().await;
    let proxy = IntrospectableProxy::builder(&conn)
        .destination("org.watchq1")
        .path(path)
        .build()
        .await
        .unwrap();
    let xml = proxy.introspect().await.unwrap();
    interface_element(&xml, name).unwrap_or_else(|| panic!("{path} does not serve {name}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dbus_xml_files_equal_what_the_daemon_serves() {
    let daemon = Daemon::start();
    let sub = Subscriber::new(&daemon).await;
    for (path, name) in [
        ("/org/watchq1", "org.watchq1.Manager"),
        (sub.path.as_str(), "org.watchq1.Subscription"),
    ] {
        let live = served(&daemon, path, name).await;
        let file = repo().join(format!("dbus/{name}.xml"));
        let text =
            std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let checked_in = interface_element(&text, name).expect("interface element in the file");
        assert_eq!(
            normalized(&checked_in),
            normalized(&live),
            "{} differs from what the daemon serves; if the change is on purpose, \
             write it with `cargo run --example bless-interface` and commit the diff",
            file.display()
        );
    }
}

#[test]
fn only_root_may_own_the_name() {
    let bus = PrivateBus::start();
    // nobody (65534) exists on every Debian system.
    let out = Command::new("dbus-send")
        .args([
            "--print-reply",
            &format!("--bus={}", bus.address),
            "--dest=org.freedesktop.DBus",
        ])
        .args([
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus.RequestName",
            "string:org.watchq1",
            "uint32:4",
        ])
        .uid(65534)
        .output()
        .expect("dbus-send");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("AccessDenied"),
        "{stderr}"
    );
}

use std::os::unix::process::CommandExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unprivileged_user_can_monitor_devices_through_the_policy() {
    // A user's watch is polkit's decision (org.watchq1.watch-devices).
    let daemon = Daemon::with_polkit("");
    let disk = LoopDevice::attach(4);
    let mut child = Command::new(env!("CARGO_BIN_EXE_watchqctl"))
        .args([
            "--address",
            daemon.address(),
            "monitor",
            "--json",
            "devices",
        ])
        .arg(format!("--match=name={}", disk.name))
        .uid(65534)
        .gid(65534)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stderr, &mut line).unwrap();
    assert!(line.starts_with("watching"), "as nobody: {line}");
    disk.synth_change();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut event = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut event).unwrap();
    let value: serde_json::Value = serde_json::from_str(&event).unwrap();
    assert_eq!(value["sys_path"], disk.sys_path());
    assert_eq!(value["action"], "change");
    let _ = child.kill();
    let _ = child.wait();
}
