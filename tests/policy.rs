//! Policy on a real private system bus with a real polkitd: callers of different users
//! (test users made by the set-up), root, a process presenting itself as a Flatpak app,
//! polkit rules, polkit gone, and every limit.
//!
//! Callers as other users are this test binary run again as a client process
//! ([`client_process`]), driven over its stdin/stdout, with its uid set by the kernel
//! (`Command::uid`) and its identity what the bus says.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use serde_json::{json, Value};
use zbus::{MatchRule, MessageStream, Variant};

use common::ext4::Ext4;
use common::polkit::{pkaction, user, User};
use common::scope::Scope;
use common::*;
use watchqd::client::{ManagerProxy, SubscriptionProxy};
use watchqd::policy::{Answer, Authority, Polkit, WATCH_RULES};

const CLIENT_ENV: &str = "WATCHQ_POLICY_CLIENT";
const DENIED: &str = "org.watchq1.Error.AccessDenied";
const LIMIT: &str = "org.watchq1.Error.LimitExceeded";
const SANDBOXED: &str = "org.watchq1.Error.Sandboxed";

// ---------------------------------------------------------------------------------------
// The client process.

/// The entry point of client processes: does nothing unless this binary was started as
/// a client by [`Client::spawn`]. Reads one JSON request per line, answers `@@ {json}`.
#[test]
fn client_process() {
    let Ok(address) = std::env::var(CLIENT_ENV) else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(client_main(address));
}

type Seen = Arc<Mutex<Vec<Value>>>;

async fn client_main(address: String) {
    let conn = watchqd::client::connect(Some(&address))
        .await
        .expect("client connect");
    // Every signal from the daemon, whatever its path: a leak would show here.
    let rule = MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .sender("org.watchq1")
        .build()
        .expect("match rule");
    let mut stream = MessageStream::for_match_rule(rule, &conn, None)
        .await
        .expect("stream");
    let seen: Seen = Arc::default();
    let sink = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Some(Ok(message)) = stream.next().await {
            let header = message.header();
            let path = header.path().map(|p| p.to_string()).unwrap_or_default();
            let member = header.member().map(|m| m.to_string()).unwrap_or_default();
            let mut entry = json!({ "path": path, "member": member });
            if let Some(signal) = decode(&message) {
                entry["seq"] = json!(signal.seq());
                // What the event is about and what happened to it, for every source the
                // leak test causes events of.
                let (action, object) = match &signal {
                    Signal::Device {
                        tag,
                        sys_path,
                        action,
                        properties,
                        ..
                    } => {
                        entry["tag"] = json!(tag);
                        entry["sys_path"] = json!(sys_path);
                        entry["synth"] = json!(properties.get("SYNTH_UUID"));
                        (action.clone(), sys_path.clone())
                    }
                    Signal::Mount {
                        change,
                        mount_point,
                        ..
                    } => (change.clone(), mount_point.clone()),
                    Signal::SpaceWarning {
                        level, state, path, ..
                    } => (format!("{level} {state}"), path.clone()),
                    Signal::FilesystemError {
                        kind, mount_point, ..
                    } => (kind.clone(), mount_point.clone()),
                    Signal::BlockError {
                        operation, device, ..
                    } => (operation.clone(), device.clone()),
                    Signal::WatchRemoved { tag, reason, .. } => {
                        entry["tag"] = json!(tag);
                        entry["reason"] = json!(reason);
                        (String::new(), String::new())
                    }
                    Signal::Lost { count, reason, .. } => {
                        entry["count"] = json!(count);
                        entry["reason"] = json!(reason);
                        (String::new(), String::new())
                    }
                    _ => (String::new(), String::new()),
                };
                entry["action"] = json!(action);
                entry["object"] = json!(object);
            }
            sink.lock().unwrap().push(entry);
        }
    });
    let manager = ManagerProxy::new(&conn).await.expect("manager");
    let mut subscriptions: Vec<SubscriptionProxy<'static>> = Vec::new();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    while let Some(line) = rx.recv().await {
        let request: Value = serde_json::from_str(&line).expect("request");
        let answer = serve(&conn, &manager, &mut subscriptions, &seen, &request).await;
        println!("@@ {answer}");
        std::io::stdout().flush().expect("stdout");
    }
}

fn outcome<T>(result: zbus::Result<T>, ok: impl FnOnce(T) -> Value) -> Value {
    match result {
        Ok(v) => json!({ "ok": ok(v) }),
        Err(zbus::Error::MethodError(name, message, _)) => {
            json!({ "err": name.to_string(), "message": message.unwrap_or_default() })
        }
        Err(e) => json!({ "err": e.to_string() }),
    }
}

async fn serve(
    conn: &zbus::Connection,
    manager: &ManagerProxy<'static>,
    subscriptions: &mut Vec<SubscriptionProxy<'static>>,
    seen: &Seen,
    request: &Value,
) -> Value {
    let sub = |i: &Value| usize::try_from(i.as_u64().unwrap_or(0)).unwrap_or(0);
    match request["op"].as_str().unwrap_or_default() {
        "whoami" => json!({ "ok": conn.unique_name().map(|n| n.to_string()) }),
        "subscribe" => {
            let mut options = HashMap::new();
            if let Some(depth) = request["depth"].as_u64() {
                options.insert("queue-depth", Variant::from(u32::try_from(depth).unwrap()));
            }
            if let Some(app_id) = request["app-id"].as_str() {
                options.insert("app-id", Variant::from(app_id.to_owned()));
            }
            let result = manager.subscribe(options).await;
            if let Ok(path) = &result {
                let proxy = SubscriptionProxy::builder(conn)
                    .path(path.clone())
                    .build()
                    .await
                    .unwrap();
                subscriptions.push(proxy);
            }
            outcome(result, |p| json!(p.to_string()))
        }
        "watch" => {
            // Strings as `s`, numbers as `u` (`low-percent`, `pid`).
            let spec: HashMap<&str, Variant<'_>> = request["spec"]
                .as_object()
                .map(|o| {
                    o.iter()
                        .map(|(k, v)| {
                            let value = match v.as_u64() {
                                Some(n) => Variant::from(u32::try_from(n).unwrap()),
                                None => Variant::from(v.as_str().unwrap_or_default()),
                            };
                            (k.as_str(), value)
                        })
                        .collect()
                })
                .unwrap_or_default();
            let kind = request["kind"].as_str().unwrap();
            let tag = request["tag"].as_u64().unwrap();
            outcome(
                subscriptions[sub(&request["sub"])]
                    .add_watch(kind, tag, spec)
                    .await,
                |()| json!(null),
            )
        }
        "unwatch" => outcome(
            subscriptions[sub(&request["sub"])]
                .remove_watch(request["tag"].as_u64().unwrap())
                .await,
            |()| json!(null),
        ),
        "filter" => {
            let entries: Vec<(String, Vec<String>)> =
                serde_json::from_value(request["filter"].clone()).unwrap();
            let borrowed: Vec<Vec<&str>> = entries
                .iter()
                .map(|(_, names)| names.iter().map(String::as_str).collect())
                .collect();
            let filter: Vec<(&str, &[&str])> = entries
                .iter()
                .zip(&borrowed)
                .map(|((source, _), names)| (source.as_str(), names.as_slice()))
                .collect();
            outcome(
                subscriptions[sub(&request["sub"])]
                    .set_filter(&filter)
                    .await,
                |()| json!(null),
            )
        }
        "snapshot" => outcome(
            subscriptions[sub(&request["sub"])]
                .snapshot(request["source"].as_str().unwrap())
                .await,
            |(seq, objects)| json!([seq, objects.len()]),
        ),
        "manager-snapshot" => outcome(
            manager.snapshot(request["source"].as_str().unwrap()).await,
            |(seq, objects)| json!([seq, objects.len()]),
        ),
        // A method called on any subscription path (someone else's).
        "call" => {
            let path = request["path"].as_str().unwrap().to_owned();
            let proxy = SubscriptionProxy::builder(conn)
                .path(path)
                .build()
                .await
                .unwrap();
            match request["method"].as_str().unwrap() {
                "AddWatch" => outcome(proxy.add_watch("devices", 99, HashMap::new()).await, |()| {
                    json!(null)
                }),
                "RemoveWatch" => outcome(proxy.remove_watch(1).await, |()| json!(null)),
                "SetFilter" => outcome(proxy.set_filter(&[]).await, |()| json!(null)),
                "Snapshot" => outcome(proxy.snapshot("devices").await, |_| json!(null)),
                "Close" => outcome(proxy.close().await, |()| json!(null)),
                "Watches" => outcome(proxy.watches().await, |watches| {
                    json!(watches.iter().map(|(tag, _)| *tag).collect::<Vec<u64>>())
                }),
                other => panic!("unknown method {other}"),
            }
        }
        // Waits until a signal with the given field value arrived (a DeviceChanged
        // about "sys_path", or a "member"), then returns every signal.
        "until" => {
            let (field, wanted) = request
                .as_object()
                .and_then(|o| o.iter().find(|(k, _)| *k != "op"))
                .map(|(k, v)| (k.clone(), v.clone()))
                .unwrap();
            let start = std::time::Instant::now();
            loop {
                let done = seen.lock().unwrap().iter().any(|s| s[&field] == wanted);
                if done {
                    break;
                }
                if start.elapsed() > TIMEOUT {
                    return json!({ "err": format!("no signal with {field} = {wanted}") });
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            json!({ "ok": seen.lock().unwrap().clone() })
        }
        // Waits until a signal has every field of "match" (its "path" names one
        // subscription), then returns every signal.
        "until-all" => {
            let wanted = request["match"].as_object().cloned().unwrap_or_default();
            let matches = |s: &Value| wanted.iter().all(|(k, v)| &s[k] == v);
            let start = std::time::Instant::now();
            while !seen.lock().unwrap().iter().any(matches) {
                if start.elapsed() > TIMEOUT {
                    return json!({ "err": format!("no signal with {wanted:?}") });
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            json!({ "ok": seen.lock().unwrap().clone() })
        }
        other => json!({ "err": format!("unknown op {other}") }),
    }
}

// ---------------------------------------------------------------------------------------
// The test side.

/// A client process on the daemon's bus, as a test user or root.
struct Client {
    child: Child,
    stdin: ChildStdin,
    answers: Receiver<String>,
    name: String,
}

/// How the client process is started.
enum As<'a> {
    Root,
    User(&'a User),
    /// In a chroot with `/.flatpak-info`, inside a private mount namespace.
    FlatpakChroot(&'a User, &'a std::path::Path),
}

impl Client {
    fn spawn(daemon: &Daemon, who: As<'_>) -> Client {
        let exe = std::env::current_exe().expect("test binary");
        let test_args = [
            "--exact",
            "client_process",
            "--nocapture",
            "--test-threads=1",
        ];
        let mut command = match who {
            As::Root => Command::new(&exe),
            As::User(user) => {
                let mut c = Command::new(&exe);
                c.uid(user.uid).gid(user.gid);
                c
            }
            As::FlatpakChroot(user, root) => {
                // Bind what the client needs into the chroot, in a mount namespace that
                // dies with it, then drop to the user.
                let exe_dir = exe.parent().unwrap().display().to_string();
                let bus_dir = daemon.bus.dir.path().display().to_string();
                let root = root.display().to_string();
                let script = format!(
                    "set -e; for d in usr etc proc dev {exe_dir} {bus_dir}; do \
                       mkdir -p {root}/$d; done; \
                     mount --rbind /usr {root}/usr; mount --rbind /etc {root}/etc; \
                     mount -t proc proc {root}/proc; mount --rbind /dev {root}/dev; \
                     mount --bind {exe_dir} {root}{exe_dir}; mount --bind {bus_dir} {root}{bus_dir}; \
                     for l in bin lib lib64 sbin; do [ -e {root}/$l ] || ln -s usr/$l {root}/$l; done; \
                     exec chroot --userspec={}:{} --groups={} {root} \"$@\"",
                    user.uid, user.gid, user.gid
                );
                let mut c = Command::new("unshare");
                c.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
                    .arg(script)
                    .arg("sh")
                    .arg(&exe);
                c
            }
        };
        command
            .args(test_args)
            .env(CLIENT_ENV, daemon.address())
            .env_remove("RUST_LOG")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = command.spawn().expect("client process");
        let stdin = child.stdin.take().unwrap();
        let answers = common::lines::answers(child.stdout.take().unwrap());
        let mut client = Client {
            child,
            stdin,
            answers,
            name: String::new(),
        };
        client.name = client.ask(json!({"op": "whoami"}))["ok"]
            .as_str()
            .unwrap()
            .to_owned();
        client
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn ask(&mut self, request: Value) -> Value {
        writeln!(self.stdin, "{request}").expect("write to client");
        // Longer than the client's own waits, so that their errors are what is seen.
        let line = self
            .answers
            .recv_timeout(TIMEOUT + std::time::Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("client gave no answer to {request}"));
        serde_json::from_str(&line).expect("answer")
    }

    /// "ok" or the D-Bus error name.
    fn result(&mut self, request: Value) -> String {
        let answer = self.ask(request);
        match answer.get("err") {
            Some(e) => e.as_str().unwrap().to_owned(),
            None => "ok".to_owned(),
        }
    }

    fn subscribe(&mut self) -> String {
        let answer = self.ask(json!({"op": "subscribe"}));
        answer["ok"]
            .as_str()
            .unwrap_or_else(|| panic!("Subscribe: {answer}"))
            .to_owned()
    }

    fn watch(&mut self, sub: usize, kind: &str, tag: u64, spec: Value) -> String {
        self.result(json!({"op": "watch", "sub": sub, "kind": kind, "tag": tag, "spec": spec}))
    }

    /// Every signal received, once one with every field of `wanted` has arrived.
    fn until_all(&mut self, wanted: Value) -> Vec<Value> {
        let answer = self.ask(json!({"op": "until-all", "match": wanted}));
        answer["ok"]
            .as_array()
            .unwrap_or_else(|| panic!("{answer}"))
            .clone()
    }

    /// Every signal received, once one about `sys_path` has arrived.
    fn until(&mut self, sys_path: &str) -> Vec<Value> {
        let answer = self.ask(json!({"op": "until", "sys_path": sys_path}));
        answer["ok"]
            .as_array()
            .unwrap_or_else(|| panic!("{answer}"))
            .clone()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn alice() -> User {
    user("watchq-alice")
}
fn bob() -> User {
    user("watchq-bob")
}
fn carol() -> User {
    user("watchq-carol")
}
fn dave() -> User {
    user("watchq-dave")
}

/// polkitd parses the shipped action file: every action of the table is there with the
/// defaults the table promises (usbguard#531: a policy file nobody checked was ignored).
#[test]
fn polkit_file_is_parsed_by_polkitd_with_the_promised_defaults() {
    let daemon = Daemon::with_polkit("");
    for rule in WATCH_RULES {
        let out = pkaction(daemon.address(), rule.action);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "pkaction {}: {}",
            rule.action,
            String::from_utf8_lossy(&out.stderr)
        );
        let any = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("implicit any:"))
            .map(str::trim);
        let expected = if rule.admin { "auth_admin" } else { "yes" };
        assert_eq!(any, Some(expected), "{}:\n{text}", rule.action);
    }
}

/// Two users and root: who may subscribe, watch, snapshot, and touch whose subscription.
#[test]
fn users_and_root_get_what_policy_says_and_never_each_others_subscriptions() {
    let daemon = Daemon::with_polkit("");
    let (alice, bob) = (alice(), bob());
    let mut a = Client::spawn(&daemon, As::User(&alice));
    let mut b = Client::spawn(&daemon, As::User(&bob));
    let mut r = Client::spawn(&daemon, As::Root);
    let a_path = a.subscribe();
    let b_path = b.subscribe();
    let r_path = r.subscribe();

    // Device events: any local user (polkit: watch-devices, allow_any yes).
    for c in [&mut a, &mut b, &mut r] {
        assert_eq!(c.watch(0, "devices", 1, json!({})), "ok");
        assert_eq!(
            c.result(json!({"op": "manager-snapshot", "source": "devices"})),
            "ok"
        );
        assert_eq!(
            c.result(json!({"op": "snapshot", "source": "devices"})),
            "ok"
        );
    }
    // Block I/O errors: administrators only. Users get a refusal (polkit answers with a
    // challenge, which is a denial); root is not refused by policy (the source may still
    // be unavailable on a kernel without perf or tracefs).
    for c in [&mut a, &mut b] {
        assert_eq!(c.watch(0, "block-errors", 2, json!({})), DENIED);
        assert_eq!(
            c.result(json!({"op": "manager-snapshot", "source": "block-errors"})),
            DENIED
        );
    }
    assert_eq!(r.watch(0, "block-errors", 2, json!({})), "ok");

    // Nobody may touch another connection's subscription, root included.
    let methods = [
        "AddWatch",
        "RemoveWatch",
        "SetFilter",
        "Snapshot",
        "Watches",
        "Close",
    ];
    let mut clients = [a, b, r];
    // (caller, owner of the subscription): alice→bob, bob→alice, alice→root, root→alice.
    for (caller, path) in [(0, &b_path), (1, &a_path), (0, &r_path), (2, &a_path)] {
        for method in methods {
            assert_eq!(
                clients[caller].result(json!({"op": "call", "path": path, "method": method})),
                DENIED,
                "{method} on {path}"
            );
        }
    }
    let [mut a, mut b, mut r] = clients;

    // Each receives its own subscription's signals only: a device event reaches all
    // three, each on its own path; nothing of anyone else's arrives.
    let disk = LoopDevice::attach(1);
    disk.synth_change();
    for (c, path) in [(&mut a, &a_path), (&mut b, &b_path), (&mut r, &r_path)] {
        let signals = c.until(&disk.sys_path());
        assert!(
            signals
                .iter()
                .all(|s| s["path"].as_str() == Some(path.as_str())),
            "{path}: {signals:?}"
        );
    }
}

/// Every combination of the watch kinds that run on this kernel (devices, block-errors,
/// quota, filesystems, space, mounts; keys need the guest) and of filters over them, for
/// two users and root, with real events of every source that can make one here (quota
/// warnings cannot: no quota format in this kernel): a user is refused exactly the
/// administrator watches, receives no signal of another's subscription and no
/// administrator-only event, and each subscription receives exactly what its filter
/// passes; root receives what it asks.
#[test]
fn no_event_leaks_across_users_under_any_watch_and_filter_combination() {
    let daemon = Daemon::with_polkit("");
    let (alice, bob) = (alice(), bob());
    let disk = LoopDevice::attach(1);
    // Half full, so that a space watch at 90% is crossed as soon as it is set.
    let fs = Ext4::new(16, &["-m", "0"], "errors=continue");
    let fs_path = fs.path_str();
    std::fs::write(fs.path().join("half"), vec![1u8; 8 << 20]).expect("fill half");
    run("sync", &[]);
    let filters = [
        json!([]),
        json!([["devices", ["change"]]]),
        json!([["devices", ["add", "remove"]]]),
        json!([["devices", ["change"]], ["block-errors", ["read"]]]),
        json!([
            ["devices", ["change"]],
            ["filesystems", ["error"]],
            ["quota", ["block-hard", "block-soft"]]
        ]),
        json!([
            ["devices", ["add"]],
            ["space", ["low"]],
            ["mounts", ["attach", "detach"]]
        ]),
    ];
    let device_specs = [
        json!({}),
        json!({"subsystem": "block"}),
        json!({"name": disk.name}),
        json!({"name": "nothing-matches-this"}),
    ];
    // Every other kind, with whether a user may set it.
    let watches = [
        ("block-errors", json!({}), false),
        ("quota", json!({}), true),
        ("quota", json!({"scope": "system"}), false),
        ("filesystems", json!({"path": fs_path}), false),
        ("space", json!({"path": fs_path, "low-percent": 90}), true),
        ("mounts", json!({}), true),
    ];
    let mut clients = [
        (Client::spawn(&daemon, As::User(&alice)), Vec::new()),
        (Client::spawn(&daemon, As::User(&bob)), Vec::new()),
        (Client::spawn(&daemon, As::Root), Vec::new()),
    ];
    const ROOT: usize = 2;
    for (c, (client, paths)) in clients.iter_mut().enumerate() {
        // One subscription per filter, each with every watch.
        for (i, filter) in filters.iter().enumerate() {
            paths.push(client.subscribe());
            if filter.as_array().is_some_and(|f| !f.is_empty()) {
                assert_eq!(
                    client.result(json!({"op": "filter", "sub": i, "filter": filter})),
                    "ok"
                );
            }
            let mut tag = 0;
            for spec in &device_specs {
                tag += 1;
                assert_eq!(client.watch(i, "devices", tag, spec.clone()), "ok");
            }
            for (kind, spec, users_may) in &watches {
                tag += 1;
                let expected = if c == ROOT || *users_may {
                    "ok"
                } else {
                    DENIED
                };
                assert_eq!(
                    client.watch(i, kind, tag, spec.clone()),
                    expected,
                    "client {c}: {kind} {spec}"
                );
            }
        }
    }

    // Real events of every source, each seen by root before the next: a block I/O error
    // and a filesystem error (administrators only), a mount and unmount (everyone's own
    // namespace), and the space warning each watch got when it was set.
    let _failing = block_error();
    let root_all = clients[ROOT].1[0].clone();
    clients[ROOT]
        .0
        .until_all(json!({"path": root_all, "member": "BlockError"}));
    fs.trigger_error("watchq policy test");
    clients[ROOT]
        .0
        .until_all(json!({"path": root_all, "member": "FilesystemError"}));
    let mount_point = tempfile::Builder::new()
        .prefix("watchq-policy-")
        .tempdir()
        .expect("mount point");
    let mount_path = mount_point.path().display().to_string();
    // Unmounted only once root saw it attached: a mount gone before the daemon reads its
    // attach can no longer be described (statmount fails; its records then carry its id
    // but no mount point), which a loaded machine made of this test now and then.
    let tmpfs = Tmpfs::mount(&mount_path);
    let mount_change = |action: &str| json!({"path": root_all, "member": "MountChanged", "object": mount_path, "action": action});
    clients[ROOT].0.until_all(mount_change("attach"));
    tmpfs.unmount();
    clients[ROOT].0.until_all(mount_change("detach"));
    // Everything above has reached every subscription it was pushed to by the time a
    // later device event reaches it: a marker per subscription, on that subscription's
    // own path (a change and an add, so that every filter passes one of them).
    let marker = format!("{:08x}-0000-4000-8000-{:012x}", std::process::id(), 15u64);
    for action in ["change", "add"] {
        std::fs::write(
            format!("/sys/block/{}/uevent", disk.name),
            format!("{action} {marker}"),
        )
        .expect("synthesize the marker");
    }

    for (c, (client, paths)) in clients.iter_mut().enumerate() {
        let is_root = c == ROOT;
        let mut signals = Vec::new();
        for (i, path) in paths.iter().enumerate() {
            let filter = &filters[i];
            // What this subscription must receive: its marker, and every event of a
            // source it may watch that its filter passes.
            let mut required = vec![json!({"path": path, "synth": marker})];
            if passes(filter, "space", "low") {
                required.push(json!({"path": path, "member": "SpaceWarning",
                    "object": fs_path, "action": "low crossed"}));
            }
            for change in ["attach", "detach"] {
                if passes(filter, "mounts", change) {
                    required.push(json!({"path": path, "member": "MountChanged",
                        "object": mount_path, "action": change}));
                }
            }
            if is_root && passes(filter, "block-errors", "read") {
                required.push(json!({"path": path, "member": "BlockError"}));
            }
            if is_root && passes(filter, "filesystems", "error") {
                required.push(json!({"path": path, "member": "FilesystemError",
                    "object": fs_path, "action": "error"}));
            }
            for wanted in required {
                signals = client.until_all(wanted);
            }
        }
        for s in &signals {
            let path = s["path"].as_str().unwrap_or_default();
            let Some(i) = paths.iter().position(|p| p == path) else {
                panic!("client {c}: foreign signal {s}");
            };
            let filter = &filters[i];
            let member = s["member"].as_str().unwrap_or_default();
            let action = s["action"].as_str().unwrap_or_default();
            let allowed = match member {
                "DeviceChanged" => passes(filter, "devices", action),
                "SpaceWarning" => passes(filter, "space", "low"),
                "MountChanged" => passes(filter, "mounts", action),
                "BlockError" => is_root && passes(filter, "block-errors", "read"),
                "FilesystemError" => is_root && passes(filter, "filesystems", action),
                // What a subscription may get whatever it watches.
                "Lost" | "WatchRemoved" => true,
                _ => false,
            };
            assert!(allowed, "client {c}, filter {filter}: {s}");
        }
        // The warning each space watch got when it was set, once.
        for (i, path) in paths.iter().enumerate() {
            let warnings = signals
                .iter()
                .filter(|s| s["path"] == path.as_str() && s["member"] == "SpaceWarning")
                .count();
            let expected = usize::from(passes(&filters[i], "space", "low"));
            assert_eq!(warnings, expected, "client {c}, filter {}", filters[i]);
        }
    }
}

/// Whether a `SetFilter` list (as JSON) passes a source's subtype: an empty list passes
/// everything.
fn passes(filter: &Value, source: &str, subtype: &str) -> bool {
    let entries = filter.as_array().expect("a filter list");
    entries.is_empty()
        || entries.iter().any(|entry| {
            entry[0] == source
                && entry[1]
                    .as_array()
                    .is_some_and(|names| names.iter().any(|n| n == subtype))
        })
}

/// A tmpfs mounted in the host's mount namespace, unmounted at the latest on drop.
struct Tmpfs(String, std::cell::Cell<bool>);

impl Tmpfs {
    fn mount(path: &str) -> Tmpfs {
        run(
            "mount",
            &["-t", "tmpfs", "-o", "size=1m", "watchq-policy", path],
        );
        Tmpfs(path.to_owned(), std::cell::Cell::new(true))
    }

    fn unmount(&self) {
        if self.1.replace(false) {
            run("umount", &[&self.0]);
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Never panic here: a test may already be failing.
        if self.1.get() {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
}

/// A real EIO from the block layer: an 8 MiB loop device whose backing file shrinks to
/// 1 MiB, read past 1 MiB with O_DIRECT. Keep the device until the error was seen.
fn block_error() -> LoopDevice {
    let failing = LoopDevice::attach(8);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&failing.backing)
        .unwrap()
        .set_len(1024 * 1024)
        .unwrap();
    let status = Command::new("dd")
        .arg(format!("if={}", failing.device))
        .args([
            "of=/dev/null",
            "bs=4096",
            "skip=512",
            "count=1",
            "iflag=direct",
        ])
        .stderr(Stdio::null())
        .status()
        .expect("dd");
    assert!(!status.success(), "reading past the backing file must fail");
    failing
}

/// A polkit rule (scoped to test-only users) granting carol one administrator action
/// changes exactly that decision; one refusing dave a default action changes exactly
/// that one. Checked through polkit for every action, and end to end through the daemon.
#[test]
fn a_polkit_rule_changes_exactly_the_decision_it_names() {
    let daemon = Daemon::with_polkit("");
    let (alice, carol, dave) = (alice(), carol(), dave());
    let mut a = Client::spawn(&daemon, As::User(&alice));
    let mut c = Client::spawn(&daemon, As::User(&carol));
    let mut d = Client::spawn(&daemon, As::User(&dave));

    // polkit's answer for every action, for each user's connection.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let answers = runtime.block_on(async {
        let conn = daemon.connect().await;
        let polkit = Polkit::new(conn);
        let mut answers = HashMap::new();
        for (who, name) in [("alice", &a.name), ("carol", &c.name), ("dave", &d.name)] {
            for rule in WATCH_RULES {
                let answer = polkit.check(name, rule.action).await.expect("polkit");
                answers.insert((who, rule.action), answer);
            }
        }
        answers
    });
    for rule in WATCH_RULES {
        let baseline = if rule.admin {
            Answer::Challenge
        } else {
            Answer::Authorized
        };
        assert_eq!(
            answers[&("alice", rule.action)],
            baseline,
            "{}",
            rule.action
        );
        let carol_expected = if rule.action == "org.watchq1.watch-block-errors" {
            Answer::Authorized
        } else {
            baseline
        };
        assert_eq!(
            answers[&("carol", rule.action)],
            carol_expected,
            "{}",
            rule.action
        );
        let dave_expected = if rule.action == "org.watchq1.watch-devices" {
            Answer::NotAuthorized
        } else {
            baseline
        };
        assert_eq!(
            answers[&("dave", rule.action)],
            dave_expected,
            "{}",
            rule.action
        );
    }

    // The same through the daemon.
    for client in [&mut a, &mut c, &mut d] {
        client.subscribe();
    }
    assert_eq!(a.watch(0, "devices", 1, json!({})), "ok");
    assert_eq!(a.watch(0, "block-errors", 2, json!({})), DENIED);
    assert_eq!(c.watch(0, "devices", 1, json!({})), "ok");
    assert_eq!(c.watch(0, "block-errors", 2, json!({})), "ok");
    assert_eq!(d.watch(0, "devices", 1, json!({})), DENIED);
    assert_eq!(d.watch(0, "block-errors", 2, json!({})), DENIED);
    // The grant reaches delivery too: carol receives block I/O errors (administrator
    // events) through the event-time check.
    let _failing = block_error();
    let answer = c.ask(json!({"op": "until", "member": "BlockError"}));
    assert!(
        answer.get("ok").is_some(),
        "carol got no BlockError: {answer}"
    );
}

/// Decisions are cached per connection for its life, and polkit gone means no.
#[test]
fn polkit_unreachable_fails_closed_and_decisions_last_for_the_connection() {
    let mut daemon = Daemon::with_polkit("");
    let alice = alice();
    let mut before = Client::spawn(&daemon, As::User(&alice));
    before.subscribe();
    assert_eq!(before.watch(0, "devices", 1, json!({})), "ok");

    let address = daemon.address().to_owned();
    daemon.polkit.as_mut().unwrap().stop(&address);

    // Same connection, same action: the cached answer.
    assert_eq!(before.watch(0, "devices", 2, json!({})), "ok");
    // A new connection: polkit must be asked, and cannot be: refused.
    let mut after = Client::spawn(&daemon, As::User(&alice));
    after.subscribe();
    let answer =
        after.ask(json!({"op": "watch", "sub": 0, "kind": "devices", "tag": 1, "spec": {}}));
    assert_eq!(answer["err"], DENIED, "{answer}");
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("cannot ask polkit"),
        "{answer}"
    );
    // Root needs no polkit.
    let mut root = Client::spawn(&daemon, As::Root);
    root.subscribe();
    assert_eq!(root.watch(0, "devices", 1, json!({})), "ok");
}

fn flatpak_root(app: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("watchq-flatpak-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::fs::write(
        dir.path().join(".flatpak-info"),
        format!(
            "[Application]\nname={app}\nruntime=runtime/org.freedesktop.Platform/x86_64/23.08\n"
        ),
    )
    .unwrap();
    dir
}

/// Processes that present themselves as Flatpak apps are refused with the portal error:
/// by `/.flatpak-info` in their root, by an `app-flatpak-*.scope` cgroup, or both; a
/// configuration rule can let one app through to polkit.
#[test]
fn flatpak_apps_are_refused_with_the_portal_error() {
    let daemon = Daemon::with_polkit("");
    let alice = alice();
    let app = "org.watchq.TestApp";

    let root_dir = flatpak_root(app);
    let mut chrooted = Client::spawn(&daemon, As::FlatpakChroot(&alice, root_dir.path()));
    let mut scoped = Client::spawn(&daemon, As::User(&alice));
    let _scope = Scope::enter(&format!("app-flatpak-{app}"), scoped.pid());
    let both_dir = flatpak_root(app);
    let mut both = Client::spawn(&daemon, As::FlatpakChroot(&alice, both_dir.path()));
    let _both_scope = Scope::enter(&format!("app-flatpak-{app}"), both.pid());
    let mut root_app = Client::spawn(&daemon, As::Root);
    let _root_scope = Scope::enter(&format!("app-flatpak-{app}"), root_app.pid());

    for client in [&mut chrooted, &mut scoped, &mut both, &mut root_app] {
        let answer = client.ask(json!({"op": "subscribe"}));
        assert_eq!(answer["err"], SANDBOXED, "{answer}");
        let message = answer["message"].as_str().unwrap();
        assert!(
            message.contains("org.freedesktop.portal.Watchq") && message.contains(app),
            "{message}"
        );
        let answer = client.ask(json!({"op": "manager-snapshot", "source": "devices"}));
        assert_eq!(answer["err"], SANDBOXED, "{answer}");
    }
    drop((chrooted, scoped, both, root_app));

    // A rule naming the app lets it through to polkit, which allows device watches.
    let daemon = Daemon::with_polkit(&format!(
        "[[policy.rules]]\napp_id = \"{app}\"\nverdict = \"permit\"\n"
    ));
    let dir = flatpak_root(app);
    let mut permitted = Client::spawn(&daemon, As::FlatpakChroot(&alice, dir.path()));
    permitted.subscribe();
    assert_eq!(permitted.watch(0, "devices", 1, json!({})), "ok");
    assert_eq!(permitted.watch(0, "block-errors", 2, json!({})), DENIED);

    // `app-id` in Subscribe's options is what the caller says of itself: it decides
    // nothing. Another app naming the permitted one is still refused; the permitted app
    // naming another is still let through; either way the log records the claim.
    let other = "org.watchq.OtherApp";
    let other_dir = flatpak_root(other);
    let mut impostor = Client::spawn(&daemon, As::FlatpakChroot(&alice, other_dir.path()));
    let answer = impostor.ask(json!({"op": "subscribe", "app-id": app}));
    assert_eq!(answer["err"], SANDBOXED, "{answer}");
    let answer = permitted.ask(json!({"op": "subscribe", "app-id": other}));
    assert!(answer["ok"].is_string(), "{answer}");
    let log = daemon.log_text();
    assert_eq!(
        log.matches("subscribing for an application").count(),
        1,
        "one subscription was made with an app-id: {log}"
    );
    assert!(log.contains(other), "{log}");
}

/// Each limit gives LimitExceeded and changes nothing for anyone else.
#[test]
fn every_limit_gives_limit_exceeded_and_the_daemon_keeps_serving() {
    let daemon = Daemon::with_polkit(
        "[delivery]\nmax_queue_depth = 8\ndefault_queue_depth = 8\n\n\
         [limits]\nsubscriptions_per_connection = 2\nsubscriptions_per_uid = 3\n\
         watches_per_subscription = 2\nfilter_entries = 2\nwatch_spec_size = 64\n",
    );
    let (alice, bob) = (alice(), bob());
    let mut a = Client::spawn(&daemon, As::User(&alice));
    let mut a2 = Client::spawn(&daemon, As::User(&alice));
    // Attached before any device watch opens the uevent socket: its attach events are
    // never received, and the watches below name it alone (queues are 8 deep, and other
    // devices' events would overflow them).
    let disk = LoopDevice::attach(1);
    let only_disk = json!({"name": disk.name});

    // Queue depth.
    assert_eq!(a.result(json!({"op": "subscribe", "depth": 9})), LIMIT);
    // Subscriptions per connection, then per uid across connections.
    let a_path = a.subscribe();
    a.subscribe();
    assert_eq!(a.result(json!({"op": "subscribe"})), LIMIT);
    a2.subscribe();
    assert_eq!(a2.result(json!({"op": "subscribe"})), LIMIT);
    // Watches per subscription.
    assert_eq!(a.watch(0, "devices", 1, only_disk.clone()), "ok");
    assert_eq!(a.watch(0, "devices", 2, only_disk.clone()), "ok");
    assert_eq!(a.watch(0, "devices", 3, only_disk.clone()), LIMIT);
    // Watch spec size.
    assert_eq!(
        a.watch(1, "devices", 1, json!({"name": "x".repeat(100)})),
        LIMIT
    );
    // Filter entries, and subtypes per entry.
    let three = json!([
        ["devices", ["add"]],
        ["devices", ["change"]],
        ["devices", ["remove"]]
    ]);
    assert_eq!(
        a.result(json!({"op": "filter", "sub": 1, "filter": three})),
        LIMIT
    );
    let many = json!([["devices", vec!["add"; 300]]]);
    assert_eq!(
        a.result(json!({"op": "filter", "sub": 1, "filter": many})),
        LIMIT
    );

    // Bob is served as before, and so is alice within her limits.
    let mut b = Client::spawn(&daemon, As::User(&bob));
    let b_path = b.subscribe();
    assert_eq!(b.watch(0, "devices", 7, only_disk), "ok");
    // One change: one signal per watch that names the disk, numbered from 1, and nothing
    // else (what has arrived 300 ms after the last one expected).
    disk.synth_change();
    b.until_all(json!({"path": b_path, "tag": 7}));
    a.until_all(json!({"path": a_path, "tag": 1}));
    a.until_all(json!({"path": a_path, "tag": 2}));
    std::thread::sleep(std::time::Duration::from_millis(300));
    let sys_path = disk.sys_path();
    let received = |client: &mut Client, path: &str| -> Vec<(u64, u64)> {
        let signals = client.until_all(json!({"path": path}));
        let mut got: Vec<(u64, u64)> = signals
            .iter()
            .map(|s| {
                assert_eq!(
                    (&s["path"], &s["member"], &s["sys_path"], &s["action"]),
                    (
                        &json!(path),
                        &json!("DeviceChanged"),
                        &json!(sys_path),
                        &json!("change")
                    ),
                    "{s}"
                );
                (s["tag"].as_u64().unwrap(), s["seq"].as_u64().unwrap())
            })
            .collect();
        got.sort_unstable();
        got
    };
    assert_eq!(received(&mut b, &b_path), [(7, 1)]);
    let a_signals = received(&mut a, &a_path);
    assert_eq!(
        a_signals.iter().map(|(tag, _)| *tag).collect::<Vec<_>>(),
        [1, 2],
        "{a_signals:?}"
    );
    let mut seqs: Vec<u64> = a_signals.iter().map(|(_, seq)| *seq).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, [1, 2], "{a_signals:?}");
}

/// `limits.watches_per_uid` counts a user's watches on all her connections, refuses the
/// one over it with LimitExceeded naming the limit, leaves other users alone, and gives
/// room back when a watch goes (issue 14: one user's watches must not cost everyone).
#[test]
fn watches_per_uid_count_across_a_users_connections() {
    let daemon = Daemon::with_polkit("[limits]\nwatches_per_uid = 3\n");
    let (alice, bob) = (alice(), bob());
    let mut a1 = Client::spawn(&daemon, As::User(&alice));
    let mut a2 = Client::spawn(&daemon, As::User(&alice));
    a1.subscribe();
    a2.subscribe();
    assert_eq!(a1.watch(0, "devices", 1, json!({"name": "loop*"})), "ok");
    assert_eq!(a1.watch(0, "devices", 2, json!({"name": "sd?"})), "ok");
    assert_eq!(a2.watch(0, "devices", 1, json!({"name": "vda"})), "ok");
    let refused = a2.ask(json!({"op": "watch", "sub": 0, "kind": "devices", "tag": 2, "spec": {}}));
    assert_eq!(refused["err"], LIMIT, "{refused}");
    let message = refused["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("limits.watches_per_uid") && message.contains('3'),
        "{message}"
    );
    // A second subscription on the same connection is no way round it.
    a2.subscribe();
    assert_eq!(a2.watch(1, "devices", 1, json!({})), LIMIT);

    // Bob has limits of his own.
    let mut b = Client::spawn(&daemon, As::User(&bob));
    b.subscribe();
    for tag in 1..=3 {
        assert_eq!(b.watch(0, "devices", tag, json!({})), "ok");
    }

    // One of alice's watches goes, on the other connection: room for one more.
    assert_eq!(
        a1.result(json!({"op": "unwatch", "sub": 0, "tag": 2})),
        "ok"
    );
    assert_eq!(a2.watch(1, "devices", 1, json!({})), "ok");
    assert_eq!(a2.watch(1, "devices", 2, json!({})), LIMIT);
}

/// The polkit rules file of the revocation test: it grants `watch-block-errors` to
/// `watchq-erin`, a test user no other test uses, so that removing it while other
/// tests run changes none of their decisions (carol's grant in the shared rules file
/// stays). Removed on drop.
struct RevocableGrant(&'static str);

impl RevocableGrant {
    const PATH: &'static str = "/etc/polkit-1/rules.d/48-watchq-test-revocation.rules";

    fn install() -> RevocableGrant {
        let rules = r#"// Installed by watchqd's revocation test; concerns a test-only user only.
polkit.addRule(function(action, subject) {
    if (subject.user == "watchq-erin" && action.id == "org.watchq1.watch-block-errors")
        return polkit.Result.YES;
});
"#;
        let tmp = format!("{}.tmp-{}", Self::PATH, std::process::id());
        std::fs::write(&tmp, rules).expect("write the rules file");
        std::fs::rename(&tmp, Self::PATH).expect("install the rules file");
        RevocableGrant(Self::PATH)
    }

    fn revoke(&self) {
        std::fs::remove_file(self.0).expect("remove the rules file");
    }
}

impl Drop for RevocableGrant {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.0);
    }
}

/// Signals of one subscription path received after the one matching `after`.
fn signals_after(seen: &[Value], path: &str, after: impl Fn(&Value) -> bool) -> Vec<Value> {
    let of_path: Vec<&Value> = seen.iter().filter(|s| s["path"] == path).collect();
    let start = of_path
        .iter()
        .position(|s| after(s))
        .expect("the signal to start after");
    of_path[start + 1..].iter().map(|s| (*s).clone()).collect()
}

/// Waits until the client's watch `tag` ended with `WatchRemoved(tag, "policy-changed")`.
fn expect_policy_changed(client: &mut Client, tag: u64, daemon: &Daemon) {
    let removed = json!({"member": "WatchRemoved", "tag": tag, "reason": "policy-changed"});
    let answer = client.ask(json!({"op": "until-all", "match": removed}));
    assert!(
        answer.get("ok").is_some(),
        "watch {tag} did not end: {answer}\n{}",
        daemon.log_text()
    );
}

/// Sequence numbers of one subscription path, checked to be contiguous from 1.
fn assert_numbered_without_gap(seen: &[Value], path: &str) {
    let mut next = 1;
    for signal in seen.iter().filter(|s| s["path"] == path) {
        assert_eq!(
            signal["seq"],
            json!(next),
            "a gap before {signal} in {seen:?}"
        );
        next += signal["count"].as_u64().unwrap_or(1).max(1);
    }
}

/// Revocation with a real polkitd: a user granted `watch-block-errors` by a rules file
/// subscribes and receives a BlockError; the rules file is removed; polkitd's `Changed`
/// makes the daemon drop its cached decisions and re-authorize, the watch ends with
/// `WatchRemoved(tag, "policy-changed")`, the user's other watch (devices, still
/// allowed) stays, and the next block error does not reach her although it is
/// published (root receives it) and a later device event does reach her.
#[test]
fn a_revoked_polkit_grant_ends_the_live_watch_and_the_next_error_does_not_arrive() {
    let grant = RevocableGrant::install();
    let daemon = Daemon::with_polkit("");
    let erin = user("watchq-erin");
    let mut e = Client::spawn(&daemon, As::User(&erin));
    let path = e.subscribe();
    assert_eq!(e.watch(0, "devices", 1, json!({"name": "loop*"})), "ok");
    assert_eq!(e.watch(0, "block-errors", 2, json!({})), "ok");
    let mut root = Client::spawn(&daemon, As::Root);
    root.subscribe();
    assert_eq!(root.watch(0, "block-errors", 2, json!({})), "ok");

    let first = block_error();
    let answer =
        e.ask(json!({"op": "until-all", "match": {"member": "BlockError", "object": first.name}}));
    assert!(
        answer.get("ok").is_some(),
        "erin got no BlockError: {answer}"
    );

    grant.revoke();
    expect_policy_changed(&mut e, 2, &daemon);
    // Asked again, polkit says no.
    assert_eq!(e.watch(0, "block-errors", 3, json!({})), DENIED);

    let second = block_error();
    let answer = root
        .ask(json!({"op": "until-all", "match": {"member": "BlockError", "object": second.name}}));
    assert!(
        answer.get("ok").is_some(),
        "root got no BlockError: {answer}"
    );
    // Published after the second error: once erin has it, she has everything before it.
    second.synth_change();
    let seen = e.until_all(
        json!({"member": "DeviceChanged", "sys_path": second.sys_path(), "action": "change"}),
    );
    let after = signals_after(&seen, &path, |s| s["member"] == "WatchRemoved");
    assert!(
        !after.iter().any(|s| s["member"] == "BlockError"),
        "a block error reached erin after her grant was revoked: {after:?}"
    );
    assert!(
        !seen
            .iter()
            .any(|s| s["member"] == "BlockError" && s["object"] == second.name.as_str()),
        "{seen:?}"
    );
    assert_numbered_without_gap(&seen, &path);
}

/// A `[[policy.rules]]` rule turned from permit to deny by a reload ends the live watches
/// it matches with `WatchRemoved(tag, "policy-changed")`, and only those. (The rule
/// matches an app id: a security label needs an LSM, which the test machine lacks; both
/// go through the same rule and the same re-authorization.)
#[test]
fn a_rule_turned_to_deny_by_reload_ends_the_matching_live_watches() {
    let app = "org.watchq.ReloadApp";
    let permit = format!("[[policy.rules]]\napp_id = \"{app}\"\nverdict = \"permit\"\n");
    let daemon = Daemon::with_polkit(&permit);
    let alice = alice();
    let dir = flatpak_root(app);
    let mut sandboxed = Client::spawn(&daemon, As::FlatpakChroot(&alice, dir.path()));
    let app_path = sandboxed.subscribe();
    assert_eq!(
        sandboxed.watch(0, "devices", 4, json!({"name": "loop*"})),
        "ok"
    );
    let mut plain = Client::spawn(&daemon, As::User(&alice));
    let plain_path = plain.subscribe();
    assert_eq!(plain.watch(0, "devices", 4, json!({"name": "loop*"})), "ok");

    std::fs::write(
        daemon.config_path(),
        format!(
            "[[policy.rules]]\napp_id = \"{app}\"\nsources = [\"devices\"]\nverdict = \"deny\"\n"
        ),
    )
    .unwrap();
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    expect_policy_changed(&mut sandboxed, 4, &daemon);
    assert_eq!(sandboxed.watch(0, "devices", 5, json!({})), DENIED);

    let disk = LoopDevice::attach(4);
    disk.synth_change();
    let seen = plain.until_all(
        json!({"member": "DeviceChanged", "sys_path": disk.sys_path(), "action": "change"}),
    );
    assert!(
        !seen
            .iter()
            .any(|s| s["path"] == plain_path && s["member"] == "WatchRemoved"),
        "the watch no rule denies was ended: {seen:?}"
    );
    // The app's own stream ends with the removal: nothing of the device reached it.
    // (Before it, other tests' loop devices may have: their names are reused.)
    let app_seen = sandboxed.until_all(json!({"member": "WatchRemoved"}));
    let after = signals_after(&app_seen, &app_path, |s| s["member"] == "WatchRemoved");
    assert!(after.is_empty(), "{app_seen:?}");
    assert_numbered_without_gap(&app_seen, &app_path);
}

/// The tags of one of the client's own subscriptions' watches, from its `Watches`.
fn watch_tags(client: &mut Client, path: &str) -> Value {
    let answer = client.ask(json!({"op": "call", "path": path, "method": "Watches"}));
    answer["ok"].clone()
}

/// Waits until the daemon logged its `n`th finished reload.
fn wait_for_reloads(daemon: &Daemon, n: usize) {
    let deadline = std::time::Instant::now() + TIMEOUT;
    while daemon.log_text().matches("configuration reloaded").count() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "reload {n} did not finish:\n{}",
            daemon.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Lowered limits: by default a reload keeps the watches a subscription or user already
/// has over them and refuses new ones; with `limits.trim_on_reload` the administrator
/// asks for them to be enforced, and exactly the watches over them end, the most
/// recently added first, each with `WatchRemoved(tag, "limit-lowered")` — another
/// user's watches within the limits are untouched, and the kept watches still deliver.
#[test]
fn a_reload_keeps_watches_over_lowered_limits_unless_asked_to_trim_them() {
    let daemon = Daemon::with_polkit("");
    let (alice, bob) = (alice(), bob());
    let mut a = Client::spawn(&daemon, As::User(&alice));
    let first = a.subscribe();
    let second = a.subscribe();
    for tag in 1..=4 {
        assert_eq!(a.watch(0, "devices", tag, json!({"name": "loop*"})), "ok");
    }
    for tag in 1..=2 {
        assert_eq!(a.watch(1, "devices", tag, json!({"name": "loop*"})), "ok");
    }
    let mut b = Client::spawn(&daemon, As::User(&bob));
    let bobs = b.subscribe();
    for tag in 1..=3 {
        assert_eq!(b.watch(0, "devices", tag, json!({"name": "loop*"})), "ok");
    }

    let lowered = "[limits]\nwatches_per_subscription = 3\nwatches_per_uid = 4\n";
    std::fs::write(daemon.config_path(), lowered).unwrap();
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    wait_for_reloads(&daemon, 1);
    assert_eq!(watch_tags(&mut a, &first), json!([1, 2, 3, 4]));
    assert_eq!(watch_tags(&mut a, &second), json!([1, 2]));
    assert_eq!(a.watch(1, "devices", 3, json!({})), LIMIT);

    std::fs::write(
        daemon.config_path(),
        format!("{lowered}trim_on_reload = true\n"),
    )
    .unwrap();
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    wait_for_reloads(&daemon, 2);
    // Tag 4 is over the subscription limit; of the five left, alice's newest (the
    // second subscription's tag 2) is over her user limit.
    let removed = |path: &str, tag: u64| json!({"path": path, "member": "WatchRemoved", "tag": tag, "reason": "limit-lowered"});
    a.until_all(removed(&first, 4));
    let seen = a.until_all(removed(&second, 2));
    assert_eq!(watch_tags(&mut a, &first), json!([1, 2, 3]));
    assert_eq!(watch_tags(&mut a, &second), json!([1]));
    assert_eq!(watch_tags(&mut b, &bobs), json!([1, 2, 3]));

    let disk = LoopDevice::attach(4);
    disk.synth_change();
    let seen_after = a.until_all(json!({"path": second, "member": "DeviceChanged", "sys_path": disk.sys_path(), "action": "change"}));
    let bob_seen = b.until_all(json!({"path": bobs, "member": "DeviceChanged", "sys_path": disk.sys_path(), "action": "change"}));
    let removals = |seen: &[Value]| {
        seen.iter()
            .filter(|s| s["member"] == "WatchRemoved")
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(removals(&seen_after).len(), 2, "{seen:?}");
    assert!(removals(&bob_seen).is_empty(), "{bob_seen:?}");
    assert_numbered_without_gap(&seen_after, &first);
    assert_numbered_without_gap(&seen_after, &second);
}
