//! `watchq-portal` against the real thing: a real sandbox (bwrap, `.flatpak-info`,
//! xdg-dbus-proxy with Flatpak's default filter), a real session bus, the real portal
//! binary, real watchqd on a private system bus, real loop devices, and a GDBus client.

mod common;

#[path = "common/interface_xml.rs"]
mod interface_xml;

use std::time::Duration;

use common::portal::{store_lookup, store_set, AccessDialog, App, Portal, SessionBus};
use common::scope::Scope;
use common::*;
use interface_xml::{document, interface_element, normalized};
use serde_json::Value;

const DECLARED: &str = "[Policy watchq]\nsources=devices;\n";
const NOT_ALLOWED: &str = "org.freedesktop.portal.Error.NotAllowed";

/// An odd size no other loop device of a parallel test has: how the test tells its own
/// device among the ids it cannot read.
const SIZE_MIB: u64 = 13;

/// watchqd on a private system bus, a session bus, and the portal on both.
fn bed() -> (Daemon, SessionBus, Portal) {
    let daemon = Daemon::start();
    let session = SessionBus::start();
    let portal = Portal::start(&session, &daemon);
    (daemon, session, portal)
}

fn is_ours(props: &Value) -> bool {
    props["size"] == SIZE_MIB << 20
}

/// Two sandboxed apps each get the current devices, then a loop device attached and
/// detached as exactly one add and one remove under an opaque id of their own session,
/// with no path anywhere; one app cannot close the other's session.
#[test]
fn sandboxed_apps_get_a_loop_device_as_add_then_remove_with_opaque_ids() {
    let (daemon, session, portal) = bed();
    // The user said yes to both before (no dialog runs: asking would be refused).
    store_set(&session, "devices", "org.watchq.TestA", &["yes"]);
    store_set(&session, "devices", "org.watchq.TestB", &["yes"]);
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
        app.assert_only_session(path);
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

    // B leaves the bus without closing: its session ends too, and with both, their
    // subscriptions on watchqd.
    drop(b);
    let deadline = std::time::Instant::now() + TIMEOUT;
    while daemon.log_text().matches("subscription closed").count() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "portal: {}\nwatchqd: {}",
            portal.log_text(),
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = portal.log_text();
    assert_eq!(log.matches("session closed").count(), 2, "{log}");
    assert!(
        log.contains("ending=Asked") && log.contains("ending=OwnerLeft"),
        "{log}"
    );
}

/// An app that declared no `[Policy watchq]` is refused, and so is one that declared
/// only another source, and one the permission store says no for: the user is not
/// asked, and nothing is made on watchqd for any.
#[test]
fn undeclared_apps_and_apps_the_store_refuses_get_not_allowed() {
    let (daemon, session, portal) = bed();
    let mut dialog = AccessDialog::start(&session, "yes");
    for (policy, token) in [("", "none"), ("[Policy watchq]\nsources=space;\n", "space")] {
        let mut app = App::start(&session, "org.watchq.Undeclared", policy, token);
        refused_saying(&mut app, "--add-policy=watchq.sources=devices");
    }
    store_set(&session, "devices", "org.watchq.Denied", &["no"]);
    let mut app = App::start(&session, "org.watchq.Denied", DECLARED, "denied");
    let answer = answer(&mut app);
    assert_eq!(answer["error"], NOT_ALLOWED, "{answer}");
    assert_eq!(
        dialog.asked().len(),
        0,
        "the user was asked: {:?}",
        dialog.asked
    );
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

/// A sandbox whose `/.flatpak-info` is a FIFO (nobody writes to it) is refused as not
/// a regular file, at once: opened without blocking, it cannot hold the portal, whose
/// other apps' sessions go on being made.
#[test]
fn a_fifo_for_flatpak_info_is_refused_and_holds_nothing_up() {
    let (_daemon, session, _portal) = bed();
    let mut hostile = App::start_with_fifo_info(&session, "fifo");
    refused_saying(&mut hostile, "not a regular file");
    let mut host = App::start_waiting(&session, "after");
    host.go();
    assert!(answer(&mut host)["created"].is_string(), "{:?}", host.seen);
}

/// The app's CreateSession was refused with NotAllowed, the message saying `says`.
fn refused_saying(app: &mut App, says: &str) {
    let answer = answer(app);
    assert_eq!(answer["error"], NOT_ALLOWED, "{answer}");
    assert!(
        answer["message"]
            .as_str()
            .unwrap_or_default()
            .contains(says),
        "{answer}"
    );
}

fn answer(app: &mut App) -> Value {
    app.until("the answer", |v| {
        v.get("created").is_some() || v.get("error").is_some()
    })
}

/// An app the store knows nothing of: the user is asked once, through the desktop's
/// access dialog, and the answer lands in the real xdg-permission-store; yes gives
/// sessions, no refuses now and later without asking again; taking the permission back
/// in the store closes the app's running sessions with `Closed`.
#[test]
fn the_user_is_asked_once_and_a_revocation_closes_running_sessions() {
    let (_daemon, session, _portal) = bed();

    let mut dialog = AccessDialog::start(&session, "yes");
    let mut first = App::start(&session, "org.watchq.Asked", DECLARED, "one");
    let first_path = answer(&mut first)["created"].as_str().map(str::to_owned);
    let first_path = first_path.unwrap_or_else(|| panic!("{:?}", first.seen));
    let mut second = App::start(&session, "org.watchq.Asked", DECLARED, "two");
    let second_path = answer(&mut second)["created"].as_str().map(str::to_owned);
    let second_path = second_path.unwrap_or_else(|| panic!("{:?}", second.seen));
    let asked = dialog.asked().to_vec();
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert_eq!(asked[0]["app_id"], "org.watchq.Asked");
    assert_eq!(
        store_lookup(&session, "devices")["org.watchq.Asked"],
        serde_json::json!(["yes"])
    );

    // Revoked while both sessions run: both close, at once.
    store_set(&session, "devices", "org.watchq.Asked", &["no"]);
    for (app, path) in [(&mut first, &first_path), (&mut second, &second_path)] {
        app.until("Closed", |v| {
            v["signal"] == "Closed" && v["session"] == path.as_str()
        });
    }
    drop(dialog);

    let mut dialog = AccessDialog::start(&session, "no");
    for token in ["r1", "r2"] {
        let mut app = App::start(&session, "org.watchq.Refused", DECLARED, token);
        assert_eq!(answer(&mut app)["error"], NOT_ALLOWED, "{:?}", app.seen);
    }
    assert_eq!(dialog.asked().len(), 1, "asked again: {:?}", dialog.asked);
    assert_eq!(
        store_lookup(&session, "devices")["org.watchq.Refused"],
        serde_json::json!(["no"])
    );
}

/// The checked-in `dbus/org.freedesktop.portal.Watchq.xml` is what the portal serves;
/// an unsandboxed caller (no `.flatpak-info`: the user's own program) gets a session
/// without declaring anything, with the standard Session interface on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_portal_serves_its_checked_in_interface_and_host_programs_get_sessions() {
    let (_daemon, session, _portal) = bed();
    let conn = session.connect().await;
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

    let path = common::portal::host_session(&conn, std::collections::HashMap::new())
        .await
        .expect("a host program gets a session");
    let session_xml = introspect(path.to_string()).await;
    let element = interface_element(&session_xml, "org.freedesktop.portal.Session")
        .expect("the session object serves org.freedesktop.portal.Session");
    assert!(
        element.contains("<method name=\"Close\">") && element.contains("<signal name=\"Closed\">"),
        "{element}"
    );
}

/// watchqd restarting under a session loses events: the app hears `Lost`, then every
/// current device again as "add" (ids of devices still there kept, a device that came
/// meanwhile new), as after any loss.
#[test]
fn after_watchqd_restarts_the_app_hears_lost_then_the_devices_again_under_their_ids() {
    let (mut daemon, session, _portal) = bed();
    store_set(&session, "devices", "org.watchq.Restarts", &["yes"]);
    let mut app = App::start(&session, "org.watchq.Restarts", DECLARED, "r");
    let path = answer(&mut app)["created"].as_str().map(str::to_owned);
    let path = path.unwrap_or_else(|| panic!("{:?}", app.seen));
    app.until("the snapshot batch", |v| v["signal"] == "DeviceEvents");
    let kept = LoopDevice::attach(SIZE_MIB);
    let added = app.until("the add", |v| {
        v["events"]
            .as_array()
            .is_some_and(|e| e.iter().any(|e| e[0] == "add" && is_ours(&e[2])))
    });
    let kept_id = added["events"]
        .as_array()
        .and_then(|e| e.iter().find(|e| is_ours(&e[2])))
        .map(|e| e[1].clone())
        .unwrap();

    daemon.crash();
    // Attached while watchqd is away: no event will ever say so.
    let meanwhile = LoopDevice::attach(11);
    daemon.restart();
    app.until("Lost", |v| {
        v["signal"] == "Lost" && v["session"] == path.as_str()
    });
    let batch = app.until("the batch after Lost", |v| {
        v["signal"] == "DeviceEvents" && v["session"] == path.as_str()
    });
    let events = batch["events"].as_array().cloned().unwrap_or_default();
    let ours: Vec<&Value> = events.iter().filter(|e| is_ours(&e[2])).collect();
    assert_eq!(ours.len(), 1, "{batch}");
    assert_eq!(
        (&ours[0][0], &ours[0][1]),
        (&Value::from("add"), &kept_id),
        "{batch}"
    );
    let new: Vec<&Value> = events
        .iter()
        .filter(|e| e[2]["size"] == 11u64 << 20)
        .collect();
    assert_eq!(new.len(), 1, "{batch}");
    assert_eq!(new[0][0], "add", "{batch}");
    assert_ne!(new[0][1], kept_id, "{batch}");
    drop((kept, meanwhile));
}

async fn create(
    conn: &zbus::Connection,
    options: std::collections::HashMap<&str, zbus::Variant<'_>>,
) -> Result<String, String> {
    match common::portal::host_session(conn, options).await {
        Ok(path) => Ok(path.to_string()),
        Err(e) => Err(error_name(Err::<(), _>(e))),
    }
}

/// Bad options are refused with InvalidArgument and a connection holds at most 8
/// sessions (NotAllowed past that, room again after a Close); refusals make nothing on
/// watchqd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_options_and_too_many_sessions_are_refused_and_change_nothing() {
    use std::collections::HashMap;
    use zbus::Variant;
    let (daemon, session, _portal) = bed();
    let conn = session.connect().await;
    let token = |t: &str| HashMap::from([("session_handle_token", Variant::from(t.to_owned()))]);
    const INVALID: &str = "org.freedesktop.portal.Error.InvalidArgument";
    for bad in [
        HashMap::from([("bogus", Variant::from(1u32))]),
        HashMap::from([("session_handle_token", Variant::from(5u32))]),
        token("a/b"),
        token(""),
        token(&"x".repeat(65)),
    ] {
        assert_eq!(create(&conn, bad).await, Err(INVALID.to_owned()));
    }
    let mut paths = Vec::new();
    for i in 0..8 {
        paths.push(create(&conn, token(&format!("s{i}"))).await.unwrap());
    }
    assert_eq!(create(&conn, token("s0")).await, Err(INVALID.to_owned()));
    assert_eq!(
        create(&conn, token("s8")).await,
        Err(NOT_ALLOWED.to_owned())
    );
    let deadline = std::time::Instant::now() + TIMEOUT;
    let subscribed = || daemon.log_text().matches(" subscribed ").count();
    while subscribed() < 8 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(subscribed(), 8, "{}", daemon.log_text());

    conn.call_method(
        Some("org.freedesktop.portal.Watchq"),
        paths[0].as_str(),
        Some("org.freedesktop.portal.Session"),
        "Close",
        &(),
    )
    .await
    .unwrap();
    assert!(create(&conn, token("s8")).await.is_ok());
}

/// Two users, each with their own session bus and portal running as them (the portal
/// subscribes to watchqd as its user, which polkit allows for devices): a sandboxed
/// app in each session gets the loop device under an id of its own session, and
/// nothing of the other's.
#[test]
fn two_users_portals_each_serve_their_own_apps() {
    let daemon = Daemon::with_polkit("");
    let alice = common::polkit::user("watchq-alice");
    let root_session = SessionBus::start();
    let alice_session = SessionBus::start_as(Some(&alice));
    let _root_portal = Portal::start(&root_session, &daemon);
    let alice_portal = Portal::start(&alice_session, &daemon);
    store_set(&root_session, "devices", "org.watchq.Root", &["yes"]);
    store_set(&alice_session, "devices", "org.watchq.Alice", &["yes"]);
    let mut apps = Vec::new();
    for (session, app_id) in [
        (&root_session, "org.watchq.Root"),
        (&alice_session, "org.watchq.Alice"),
    ] {
        let mut app = App::start(session, app_id, DECLARED, "u");
        let path = answer(&mut app)["created"].as_str().map(str::to_owned);
        let path = path.unwrap_or_else(|| panic!("{app_id}: {:?}", app.seen));
        app.until("the snapshot batch", |v| v["signal"] == "DeviceEvents");
        apps.push((app, path));
    }
    let disk = LoopDevice::attach(SIZE_MIB);
    let mut ids = Vec::new();
    for (app, path) in &mut apps {
        let added = app.until("the add", |v| {
            v["events"]
                .as_array()
                .is_some_and(|e| e.iter().any(|e| e[0] == "add" && is_ours(&e[2])))
        });
        assert_eq!(added["session"], path.as_str(), "{added}");
        ids.push(
            added["events"]
                .as_array()
                .and_then(|e| e.iter().find(|e| is_ours(&e[2])))
                .map(|e| e[1].clone())
                .unwrap(),
        );
    }
    disk.detach();
    assert_ne!(ids[0], ids[1]);
    for ((app, path), id) in apps.iter_mut().zip(&ids) {
        app.until("the remove", |v| {
            v["events"]
                .as_array()
                .is_some_and(|e| e.iter().any(|e| e[0] == "remove" && e[1] == *id))
        });
        app.assert_only_session(path);
    }
    // Alice's portal subscribed as alice.
    assert!(
        daemon.log_text().contains(&format!("uid={}", alice.uid)),
        "{}\n{}",
        daemon.log_text(),
        alice_portal.log_text()
    );
}

/// A snap app has no `.flatpak-info` but must not pass for an unsandboxed program:
/// a process in a snap's scope is refused, and so is one in a Flatpak app's scope
/// whose root shows no `.flatpak-info`.
#[test]
fn a_snap_or_a_flatpak_scope_without_flatpak_info_is_not_taken_for_the_host() {
    let (_daemon, session, portal) = bed();
    for (scope, token, says) in [
        ("snap.watchqtest.app", "snap", "snap watchqtest"),
        (
            "app-flatpak-org.watchq.Scoped",
            "scoped",
            "Flatpak app org.watchq.Scoped",
        ),
    ] {
        let mut app = App::start_waiting(&session, token);
        let cgroup = Scope::enter(scope, app.pid());
        app.go();
        refused_saying(&mut app, says);
        // The process first: a cgroup with a process in it cannot be removed.
        drop(app);
        drop(cgroup);
    }
    assert!(
        !portal.log_text().contains("session created"),
        "{}",
        portal.log_text()
    );
}
