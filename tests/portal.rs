//! `watchq-portal` against the real thing: a real sandbox (bwrap, `.flatpak-info`,
//! xdg-dbus-proxy with Flatpak's default filter), a real session bus, the real portal
//! binary, real watchqd on a private system bus, real loop devices, and a GDBus client.

mod common;

#[path = "common/interface_xml.rs"]
mod interface_xml;

use std::time::Duration;

use common::portal::{App, Portal, SessionBus};
use common::*;
use interface_xml::{document, interface_element, normalized};
use serde_json::Value;

const DECLARED: &str = "[Policy watchq]\nsources=devices;\n";
const NOT_ALLOWED: &str = "org.freedesktop.portal.Error.NotAllowed";

/// An odd size no other loop device of a parallel test has: how the test tells its own
/// device among the ids it cannot read.
const SIZE_MIB: u64 = 13;

fn is_ours(props: &Value) -> bool {
    props["size"] == SIZE_MIB << 20
}

/// Two sandboxed apps each get the current devices, then a loop device attached and
/// detached as exactly one add and one remove under an opaque id of their own session,
/// with no path anywhere; one app cannot close the other's session.
#[test]
fn sandboxed_apps_get_a_loop_device_as_add_then_remove_with_opaque_ids() {
    let daemon = Daemon::start();
    let session = SessionBus::start();
    let portal = Portal::start(&session, &daemon);
    let mut a = App::start(&session, "org.watchq.TestA", DECLARED, "ta");
    let mut b = App::start(&session, "org.watchq.TestB", DECLARED, "tb");
    let a_path = a.until("A's session", |v| {
        v.get("created").is_some() || v.get("error").is_some()
    });
    let b_path = b.until("B's session", |v| {
        v.get("created").is_some() || v.get("error").is_some()
    });
    let (a_path, b_path) = (
        a_path["created"].as_str().unwrap().to_owned(),
        b_path["created"].as_str().unwrap().to_owned(),
    );
    assert!(
        a_path.starts_with("/org/freedesktop/portal/watchq/session/") && a_path.ends_with("/ta"),
        "{a_path}"
    );
    // The snapshot batch comes first, whatever it holds.
    for (app, path) in [(&mut a, &a_path), (&mut b, &b_path)] {
        app.until("the snapshot batch", |v| {
            v["signal"] == "DeviceEvents" && v["session"] == path.as_str()
        });
    }

    let disk = LoopDevice::attach(SIZE_MIB);
    for (app, path) in [(&mut a, &a_path), (&mut b, &b_path)] {
        app.until("the loop device's add", |v| {
            v["signal"] == "DeviceEvents"
                && v["session"] == path.as_str()
                && v["events"]
                    .as_array()
                    .is_some_and(|e| e.iter().any(|e| e[0] == "add" && is_ours(&e[2])))
        });
    }
    disk.detach();
    let mut ids = Vec::new();
    for (app, path) in [(&mut a, &a_path), (&mut b, &b_path)] {
        let id = app
            .device_events(path)
            .into_iter()
            .find(|(action, _, props)| action == "add" && is_ours(props))
            .map(|(_, id, _)| id)
            .unwrap();
        app.until("the loop device's remove", |v| {
            v["signal"] == "DeviceEvents"
                && v["events"]
                    .as_array()
                    .is_some_and(|e| e.iter().any(|e| e[0] == "remove" && e[1] == id.as_str()))
        });
        // Anything late about it would show here.
        app.drain_for(Duration::from_millis(300));
        let about: Vec<String> = app
            .device_events(path)
            .into_iter()
            .filter(|(_, i, _)| *i == id)
            .map(|(action, _, _)| action)
            .collect();
        assert_eq!(about, ["add", "remove"], "{:?}", app.seen);
        // Only its own session's signals reach an app.
        assert!(
            app.seen
                .iter()
                .filter(|v| v.get("signal").is_some())
                .all(|v| v["session"] == path.as_str()),
            "{:?}",
            app.seen
        );
        let text = serde_json::to_string(&app.seen).unwrap();
        assert!(
            !text.contains("/sys") && !text.contains("/dev/") && !text.contains("/devices/"),
            "{text}"
        );
        assert_eq!(id.len(), 32, "{id}");
        ids.push(id);
    }
    assert_ne!(ids[0], ids[1], "ids are per session");

    // B cannot close A's session; A's still works and A can close it.
    b.command(&format!("close {a_path}"));
    let refused = b.until("B's Close", |v| {
        v.get("close-error").is_some() || v.get("closed").is_some()
    });
    assert_eq!(refused["close-error"], NOT_ALLOWED, "{refused}");
    let disk = LoopDevice::attach(SIZE_MIB);
    a.until("A's next add", |v| {
        v["signal"] == "DeviceEvents"
            && v["events"]
                .as_array()
                .is_some_and(|e| e.iter().any(|e| e[0] == "add" && is_ours(&e[2])))
    });
    a.command(&format!("close {a_path}"));
    let closed = a.until("A's Close", |v| {
        v.get("close-error").is_some() || v.get("closed").is_some()
    });
    assert_eq!(closed["closed"], a_path.as_str(), "{closed}");
    disk.detach();
    assert!(
        portal.log_text().contains("session closed"),
        "{}",
        portal.log_text()
    );
}

/// An app that declared no `[Policy watchq]` is refused, and so is one that declared
/// only another source; nothing is made on watchqd for either.
#[test]
fn an_app_without_the_declaration_is_refused_with_not_allowed() {
    let daemon = Daemon::start();
    let session = SessionBus::start();
    let portal = Portal::start(&session, &daemon);
    for (policy, token) in [("", "none"), ("[Policy watchq]\nsources=space;\n", "space")] {
        let mut app = App::start(&session, "org.watchq.Undeclared", policy, token);
        let answer = app.until("the answer", |v| {
            v.get("created").is_some() || v.get("error").is_some()
        });
        assert_eq!(answer["error"], NOT_ALLOWED, "{answer}");
        assert!(
            answer["message"]
                .as_str()
                .unwrap_or_default()
                .contains("--add-policy=watchq.sources=devices"),
            "{answer}"
        );
    }
    assert!(
        !portal.log_text().contains("session created"),
        "{}",
        portal.log_text()
    );
    assert!(
        !daemon.log_text().contains("subscribed"),
        "{}",
        daemon.log_text()
    );
}

/// The checked-in `dbus/org.freedesktop.portal.Watchq.xml` is what the portal serves;
/// an unsandboxed caller (no `.flatpak-info`: the user's own program) gets a session
/// without declaring anything, with the standard Session interface on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_portal_serves_its_checked_in_interface_and_host_programs_get_sessions() {
    let daemon = Daemon::start();
    let session = SessionBus::start();
    let _portal = Portal::start(&session, &daemon);
    let conn = zbus::connection::Builder::address(session.address.as_str())
        .build()
        .await
        .unwrap();
    let introspect = |path: String| {
        let conn = conn.clone();
        async move {
            zbus::fdo::IntrospectableProxy::builder(&conn)
                .destination("org.freedesktop.portal.Watchq")
                .path(path)
                .build()
                .await
                .unwrap()
                .introspect()
                .await
                .unwrap()
        }
    };
    let name = "org.freedesktop.portal.Watchq";
    let live = interface_element(
        &introspect("/org/freedesktop/portal/watchq".into()).await,
        name,
    )
    .expect("the portal serves its interface");
    let file = repo().join(format!("dbus/{name}.xml"));
    let text = std::fs::read_to_string(&file).unwrap_or_default();
    assert_eq!(
        interface_element(&text, name).map(|e| normalized(&e)),
        Some(normalized(&live)),
        "{} differs from what the portal serves; if on purpose, put this in it:\n{}",
        file.display(),
        document(&live)
    );

    let reply = conn
        .call_method(
            Some("org.freedesktop.portal.Watchq"),
            "/org/freedesktop/portal/watchq",
            Some("org.freedesktop.portal.Watchq"),
            "CreateSession",
            &(std::collections::HashMap::<String, zbus::Variant<'_>>::new(),),
        )
        .await
        .expect("a host program gets a session");
    let path: zbus::OwnedObjectPath = reply.body().deserialize().unwrap();
    let session_xml = introspect(path.to_string()).await;
    let element = interface_element(&session_xml, "org.freedesktop.portal.Session")
        .expect("the session object serves org.freedesktop.portal.Session");
    assert!(
        element.contains("<method name=\"Close\">") && element.contains("<signal name=\"Closed\">"),
        "{element}"
    );
}
