//! Mount topology through a real bus: private mount namespaces made with `unshare -m`,
//! real mounts made in them with `nsenter`, fanotify mount events and statmount in the
//! daemon. Which path the daemon runs is asserted, not assumed: fanotify from Linux 6.15
//! (this host's kernel has it), the degraded mountinfo diff below
//! (`the_fanotify_path_runs_from_linux_6_15_and_the_mountinfo_fallback_below`; the
//! fallback itself is exercised in a 6.12 guest, `tests/guest_mounts.rs`).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::mounts::{apply, mount_of, run_in, Mount, Namespace};
use common::sources::source_info;
use common::*;
use zbus::Variant;

/// A subscription's mounts snapshot: (seq, mounts by unique id, their namespace).
async fn snapshot(sub: &Subscriber) -> (u64, BTreeMap<u64, Mount>, Vec<u64>) {
    let (seq, objects) = sub
        .proxy
        .snapshot("mounts")
        .await
        .expect("Snapshot(mounts)");
    let mut namespaces = Vec::new();
    let mounts = objects
        .iter()
        .map(|(id, _, attributes, _)| {
            let (mount_id, mount) = mount_of(attributes);
            let namespace = match attributes.get("namespace").map(|v| &**v) {
                Some(Variant::U64(n)) => *n,
                other => panic!("namespace is {other:?}"),
            };
            assert_eq!(id, &format!("{namespace}/{mount_id}"), "object id");
            namespaces.push(namespace);
            (mount_id, mount)
        })
        .collect();
    namespaces.sort_unstable();
    namespaces.dedup();
    (seq, mounts, namespaces)
}

/// What mountinfo says, in the same shape (mountinfo has no unique ids).
fn mountinfo_view(ns: &Namespace) -> Vec<(u64, String, String)> {
    let mut lines: Vec<_> = ns
        .mountinfo()
        .into_iter()
        .map(|l| (u64::from(l.id), l.mount_point, l.fs_type))
        .collect();
    lines.sort();
    lines
}

fn snapshot_view(mounts: &BTreeMap<u64, Mount>) -> Vec<(u64, String, String)> {
    let mut view: Vec<_> = mounts
        .values()
        .map(|m| (m.mountinfo_id, m.mount_point.clone(), m.fs_type.clone()))
        .collect();
    view.sort();
    view
}

fn pid_spec(pid: u32) -> [(&'static str, Variant<'static>); 1] {
    [("pid", Variant::from(pid))]
}

fn mount_events<'a>(signals: &'a [Signal], below: &'a str) -> Vec<&'a Signal> {
    signals
        .iter()
        .filter(
            |s| matches!(s, Signal::Mount { mount_point, .. } if mount_point.starts_with(below)),
        )
        .collect()
}

fn change_of(signal: &Signal) -> (&str, u64, &str) {
    match signal {
        Signal::Mount {
            change,
            mount_id,
            mount_point,
            ..
        } => (change.as_str(), *mount_id, mount_point.as_str()),
        other => panic!("not a mount event: {other:?}"),
    }
}

/// Waits for the next mount event below `below` after `count` such events.
async fn next_mount(sub: &mut Subscriber, below: &str, count: usize) -> Signal {
    sub.until(
        &format!("mount event #{} below {below}", count + 1),
        |signals| mount_events(signals, below).len() > count,
    )
    .await;
    mount_events(&sub.received, below)[count].clone()
}

/// The running kernel's (major, minor) version.
fn kernel_version() -> (u32, u32) {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
    let mut numbers = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| {
            n.parse::<u32>()
                .unwrap_or_else(|_| panic!("release {release}"))
        });
    let major = numbers.next().expect("major");
    let minor = numbers.next().expect("minor");
    (major, minor)
}

/// How many fanotify groups a process holds open.
fn fanotify_groups(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the daemon's fds")
        .filter_map(|entry| fs::read_link(entry.ok()?.path()).ok())
        .filter(|target| target.as_os_str() == "anon_inode:[fanotify]")
        .count()
}

/// From Linux 6.15 the kernel reports mount events through fanotify and the source must
/// be fully available and use it (one fanotify group for the daemon's own namespace and
/// one per watched namespace); below, it runs degraded on the mountinfo diff, says so,
/// and holds no fanotify group. A mount attached and detached at once is seen only by
/// fanotify, so on a new kernel it is asserted as behaviour too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fanotify_path_runs_from_linux_6_15_and_the_mountinfo_fallback_below() {
    let daemon = Daemon::start();
    let ns = Namespace::start();
    let point = ns.mkdir("quick");
    let mut sub = Subscriber::new(&daemon).await;
    let mounts = source_info(&sub.conn, "mounts").await;
    // Nobody watches mounts yet, so the source holds nothing open.
    assert_eq!(
        fanotify_groups(daemon.pid()),
        0,
        "fanotify groups before a watch"
    );
    sub.watch("mounts", 1, &pid_spec(ns.pid())).await;
    let groups = fanotify_groups(daemon.pid());

    let (major, minor) = kernel_version();
    if (major, minor) >= (6, 15) {
        assert!(
            mounts.available && mounts.reason.is_empty(),
            "Linux {major}.{minor} has fanotify mount events, yet: {mounts:?}"
        );
        assert_eq!(
            groups, 2,
            "fanotify groups for the daemon's namespace and the watched one"
        );
        ns.run(&format!(
            "mount -t tmpfs watchq-quick {point}; umount {point}"
        ));
        sub.until("the quick mount's attach and detach", |signals| {
            signals.len() >= 2
        })
        .await;
        let changes: Vec<(&str, u64)> = sub
            .received
            .iter()
            .map(|s| {
                let (change, id, _) = change_of(s);
                (change, id)
            })
            .collect();
        let id = changes[0].1;
        assert_eq!(
            changes,
            [("attach", id), ("detach", id)],
            "a mount attached and detached at once"
        );
        println!("Linux {major}.{minor}: the mounts source runs on fanotify mount events");
    } else {
        assert!(mounts.available, "{mounts:?}");
        assert!(
            mounts.reason.contains("FAN_REPORT_MNT") && mounts.reason.contains("mountinfo"),
            "Linux {major}.{minor}: the degraded mode is not reported: {mounts:?}"
        );
        assert_eq!(groups, 0, "fanotify groups in the mountinfo fallback");
        println!("Linux {major}.{minor}: the mounts source runs degraded, on mountinfo alone");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_mount_operation_is_one_typed_event_in_its_namespace_only() {
    let daemon = Daemon::start();
    let mut ns = Namespace::start();
    let base = ns.dir.path().display().to_string();
    for dir in ["a", "b", "c", "d"] {
        ns.mkdir(dir);
    }

    let mut inside = Subscriber::new(&daemon).await;
    inside.watch("mounts", 7, &pid_spec(ns.pid())).await;
    // The test's own namespace: another namespace from the one that changes.
    let mut outside = Subscriber::new(&daemon).await;
    outside.watch("mounts", 8, &[]).await;

    let (seq0, mut mounts, namespaces) = snapshot(&inside).await;
    assert_eq!(
        namespaces.len(),
        1,
        "the snapshot holds one namespace: {namespaces:?}"
    );
    let namespace = namespaces[0];
    assert_eq!(seq0, 0, "nothing was delivered before the snapshot");
    assert_eq!(
        snapshot_view(&mounts),
        mountinfo_view(&ns),
        "snapshot = mountinfo at start"
    );
    let (_, outside_mounts, outside_namespaces) = snapshot(&outside).await;
    assert_eq!(outside_namespaces.len(), 1);
    assert_ne!(outside_namespaces[0], namespace);
    assert!(outside_mounts
        .values()
        .all(|m| !m.mount_point.starts_with(&base)));

    let (a, b, c, d) = (ns.path("a"), ns.path("b"), ns.path("c"), ns.path("d"));

    // mount
    ns.run(&format!("mount -t tmpfs -o size=1m,nosuid watchq-a {a}"));
    let attach = next_mount(&mut inside, &base, 0).await;
    let (change, a_id, point) = change_of(&attach);
    assert_eq!((change, point), ("attach", a.as_str()));
    let Signal::Mount {
        tag,
        source,
        fs_type,
        options,
        parent_id,
        ..
    } = &attach
    else {
        unreachable!()
    };
    assert_eq!(*tag, 7);
    assert_eq!((source.as_str(), fs_type.as_str()), ("watchq-a", "tmpfs"));
    assert!(options.starts_with("rw,nosuid"), "options {options}");
    assert!(
        mounts.contains_key(parent_id),
        "parent {parent_id} is a known mount"
    );
    assert_eq!(attach.attr_bool("nosuid"), Some(true));
    assert_eq!(attach.attr_bool("read-only"), Some(false));
    assert_eq!(attach.attr_u64("namespace"), Some(namespace));
    assert_eq!(attach.attr_str("propagation").as_deref(), Some("private"));
    assert!(attach
        .attr_str("fs-options")
        .unwrap_or_default()
        .contains("size=1024k"));

    // bind mount
    ns.run(&format!("mount --bind {a} {b}"));
    let bind = next_mount(&mut inside, &base, 1).await;
    let (change, b_id, point) = change_of(&bind);
    assert_eq!((change, point), ("attach", b.as_str()));
    assert_ne!(b_id, a_id);
    assert_eq!(bind.attr_str("source").as_deref(), Some("watchq-a"));

    // move: one event, same mount, new place
    ns.run(&format!("mount --move {b} {c}"));
    let moved = next_mount(&mut inside, &base, 2).await;
    assert_eq!(change_of(&moved), ("move", b_id, c.as_str()));

    // remount read-only: the mount at a (and the superblock it shares with c)
    ns.run(&format!("mount -o remount,ro {a}"));
    inside
        .until("a remount of the first mount", |signals| {
            mount_events(signals, &base)
                .iter()
                .any(|s| change_of(s) == ("remount", a_id, a.as_str()))
        })
        .await;
    let remount = mount_events(&inside.received, &base)
        .into_iter()
        .find(|s| change_of(s) == ("remount", a_id, a.as_str()))
        .expect("remount")
        .clone();
    assert_eq!(remount.attr_bool("read-only"), Some(true));
    assert_eq!(remount.attr_bool("fs-read-only"), Some(true));
    assert!(remount
        .attr_str("options")
        .unwrap_or_default()
        .starts_with("ro,"));

    // umount
    let before = mount_events(&inside.received, &base).len();
    ns.run(&format!("umount {c}"));
    inside
        .until("the detach of the moved mount", |signals| {
            mount_events(signals, &base)
                .iter()
                .any(|s| change_of(s).0 == "detach")
        })
        .await;
    let detach = mount_events(&inside.received, &base)[before..]
        .iter()
        .find(|s| change_of(s).0 == "detach")
        .map(|s| (*s).clone())
        .expect("detach");
    // Described as it was: the kernel can no longer say.
    assert_eq!(change_of(&detach), ("detach", b_id, c.as_str()));
    assert_eq!(detach.attr_str("fs-type").as_deref(), Some("tmpfs"));

    // lazy umount of a tree: every mount in it is detached
    ns.run(&format!(
        "mount -t tmpfs watchq-d {d}; mkdir {d}/e; mount -t tmpfs watchq-e {d}/e"
    ));
    inside
        .until("the attach of d/e", |signals| {
            mount_events(signals, &format!("{d}/e")).len() == 1
        })
        .await;
    let d_id = mount_events(&inside.received, &d)
        .iter()
        .map(|s| change_of(s))
        .find(|(change, _, point)| *change == "attach" && *point == d)
        .expect("attach of d")
        .1;
    let e_id = change_of(mount_events(&inside.received, &format!("{d}/e"))[0]).1;
    ns.run(&format!("umount -l {d}"));
    inside
        .until("the detach of d and d/e", |signals| {
            let detached: Vec<u64> = mount_events(signals, &d)
                .iter()
                .map(|s| change_of(s))
                .filter(|(change, _, _)| *change == "detach")
                .map(|(_, id, _)| id)
                .collect();
            detached.contains(&d_id) && detached.contains(&e_id)
        })
        .await;

    ns.run(&format!("umount {a}"));
    inside
        .until("the detach of a", |signals| {
            mount_events(signals, &base)
                .iter()
                .any(|s| change_of(s) == ("detach", a_id, a.as_str()))
        })
        .await;

    // Exactly these events, in this order (remounts: a, and c when its superblock's
    // options changed under it).
    let changes: Vec<(String, u64)> = mount_events(&inside.received, &base)
        .iter()
        .map(|s| {
            let (change, id, _) = change_of(s);
            (change.to_owned(), id)
        })
        .filter(|(change, id)| !(change == "remount" && *id == b_id))
        .collect();
    let expected: Vec<(String, u64)> = [
        ("attach", a_id),
        ("attach", b_id),
        ("move", b_id),
        ("remount", a_id),
        ("detach", b_id),
        ("attach", d_id),
        ("attach", e_id),
    ]
    .iter()
    .map(|(c, i)| ((*c).to_owned(), *i))
    .collect();
    assert_eq!(changes[..expected.len()], expected[..]);
    let mut tail: Vec<_> = changes[expected.len()..].to_vec();
    tail.sort();
    let mut expected_tail = vec![
        ("detach".to_owned(), a_id),
        ("detach".to_owned(), d_id),
        ("detach".to_owned(), e_id),
    ];
    expected_tail.sort();
    assert_eq!(tail, expected_tail);
    assert_contiguous(&inside.received);

    // The snapshot taken first, with every later event applied, is the namespace now.
    apply(&mut mounts, &inside.received, seq0);
    let (seq1, now, _) = snapshot(&inside).await;
    assert_eq!(seq1, inside.received.last().map_or(0, Signal::seq));
    assert_eq!(mounts, now, "snapshot + events = snapshot");
    assert_eq!(
        snapshot_view(&now),
        mountinfo_view(&ns),
        "snapshot = mountinfo at the end"
    );

    // The other namespace's subscriber saw none of it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    while outside.next(Duration::from_millis(100)).await.is_some() {}
    assert!(
        outside
            .received
            .iter()
            .all(|s| s.attr_u64("namespace") != Some(namespace)
                && !matches!(s, Signal::Mount { mount_point, .. } if mount_point.starts_with(&base))),
        "the other namespace's watch received: {:?}",
        outside.received
    );

    // The namespace's last process exits: the watch ends.
    ns.kill();
    inside
        .until("WatchRemoved after the namespace emptied", |signals| {
            signals
                .iter()
                .any(|s| matches!(s, Signal::WatchRemoved { tag: 7, .. }))
        })
        .await;
    let Some(Signal::WatchRemoved { reason, .. }) = inside.received.last() else {
        panic!("expected WatchRemoved last: {:?}", inside.received.last())
    };
    assert!(reason.starts_with("namespace-gone"), "reason {reason}");
    let watches = inside.proxy.watches().await.expect("Watches");
    assert!(watches.is_empty(), "watches left: {watches:?}");
}

/// A storm through a queue of 8: it overflows, every event is received or counted in a
/// `Lost`, and a snapshot taken after the loss plus the events after it is the truth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mount_storm_through_a_small_queue_loses_nothing_silently() {
    const ROUNDS: u64 = 1000;
    let daemon = Daemon::start();
    let ns = Namespace::start();
    let point = ns.mkdir("storm");
    let mut sub = Subscriber::with_options(
        &daemon,
        HashMap::from([("queue-depth", Variant::from(8u32))]),
    )
    .await;
    sub.watch("mounts", 1, &pid_spec(ns.pid())).await;
    let (seq0, _, _) = snapshot(&sub).await;
    assert_eq!(seq0, 0);

    // As fast as the kernel goes: one process making the syscalls (mount(2) is 165 and
    // umount2(2) 166 on x86_64), so events arrive faster than a queue of 8 drains.
    assert!(
        std::env::consts::ARCH == "x86_64",
        "the storm script uses x86_64 syscall numbers"
    );
    ns.run(&format!(
        "perl -e 'my ($s, $d, $t) = (\"watchq-storm\", \"{point}\", \"tmpfs\"); \
         for (1..{ROUNDS}) {{ syscall(165, $s, $d, $t, 0, 0) == 0 or die \"mount: $!\"; \
         syscall(166, $d, 0) == 0 or die \"umount: $!\"; }}'"
    ));
    let produced = 2 * ROUNDS;
    let accounted = |signals: &[Signal]| -> u64 {
        // Every mount event of the watch: a mount gone before the daemon described it
        // has no mount point.
        let events = signals
            .iter()
            .filter(|s| matches!(s, Signal::Mount { .. }))
            .count() as u64;
        let lost: u64 = signals
            .iter()
            .map(|s| match s {
                Signal::Lost { count, .. } => *count,
                _ => 0,
            })
            .sum();
        events + lost
    };
    sub.until("every storm event received or counted lost", |signals| {
        accounted(signals) >= produced
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    while sub.next(Duration::from_millis(200)).await.is_some() {}
    assert_contiguous(&sub.received);
    assert!(
        !sub.received
            .iter()
            .any(|s| matches!(s, Signal::Lost { reason, .. } if reason == "kernel-overflow")),
        "the kernel queue overflowed"
    );
    assert_eq!(
        accounted(&sub.received),
        produced,
        "received + Lost = produced"
    );
    let losses: Vec<u64> = sub
        .received
        .iter()
        .filter_map(|s| match s {
            Signal::Lost { count, reason, .. } => {
                assert_eq!(reason, "queue-full", "{s:?}");
                Some(*count)
            }
            _ => None,
        })
        .collect();
    let lost: u64 = losses.iter().sum();
    println!(
        "storm: {produced} events, {lost} counted lost in {} Lost signals with a queue of 8",
        losses.len()
    );
    // 2,000 events from one tight loop cannot fit through a queue of 8: it overflowed,
    // or the depth was not applied.
    assert!(
        lost > 0,
        "a queue of 8 took a storm of {produced} without loss"
    );

    // After the loss a client starts again from a snapshot: it is valid exactly after
    // the storm's last number (every event and every lost one had its number), it is
    // what the namespace holds, and events after it bring it up to date.
    let (seq1, mut mounts, _) = snapshot(&sub).await;
    assert_eq!(
        seq1, produced,
        "the snapshot after the storm is valid at its end"
    );
    assert_eq!(
        snapshot_view(&mounts),
        mountinfo_view(&ns),
        "the snapshot after the loss = mountinfo"
    );
    let (a, b) = (ns.mkdir("after-a"), ns.mkdir("after-b"));
    let below = ns.dir.path().display().to_string();
    let before = mount_events(&sub.received, &below).len();
    // One at a time: a mount detached before the daemon described it has no mount point.
    ns.run(&format!("mount -t tmpfs watchq-a {a}"));
    next_mount(&mut sub, &below, before).await;
    ns.run(&format!("mount -t tmpfs watchq-b {b}"));
    next_mount(&mut sub, &below, before + 1).await;
    ns.run(&format!("umount {a}"));
    let last = next_mount(&mut sub, &below, before + 2).await;
    let (change, _, point) = change_of(&last);
    assert_eq!((change, point), ("detach", a.as_str()), "{last:?}");
    let after: Vec<(u64, &str)> = sub
        .received
        .iter()
        .filter(|s| s.seq() > seq1)
        .map(|s| (s.seq(), change_of(s).0))
        .collect();
    assert_eq!(
        after,
        [
            (seq1 + 1, "attach"),
            (seq1 + 2, "attach"),
            (seq1 + 3, "detach")
        ],
        "the three events after the snapshot, numbered after it"
    );
    apply(&mut mounts, &sub.received, seq1);
    let (_, now, _) = snapshot(&sub).await;
    assert_eq!(
        mounts, now,
        "snapshot after the loss + later events = snapshot now"
    );
    assert_eq!(
        snapshot_view(&now),
        mountinfo_view(&ns),
        "final snapshot = mountinfo"
    );
    assert!(
        now.values().any(|m| m.mount_point == b) && now.values().all(|m| m.mount_point != a),
        "the later mount is there and the unmounted one gone"
    );
}

/// The kernel's fanotify queue overflows while the daemon is stopped: the source lists
/// the namespace again, the subscriber is told with Lost(kernel-overflow), and the
/// snapshot is right afterwards, including a mount whose event the kernel dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kernel_queue_overflow_is_rescanned_and_reported() {
    let limit: u64 = fs::read_to_string("/proc/sys/fs/fanotify/max_queued_events")
        .expect("fanotify's queue limit")
        .trim()
        .parse()
        .expect("a number");
    let rounds = limit / 2 + 500;
    let daemon = Daemon::start();
    let ns = Namespace::start();
    let point = ns.mkdir("storm");
    let last = ns.mkdir("last");
    let mut sub = Subscriber::new(&daemon).await;
    sub.watch("mounts", 1, &pid_spec(ns.pid())).await;
    let _ = snapshot(&sub).await;

    daemon.signal(nix::sys::signal::Signal::SIGSTOP);
    assert_eq!(
        std::env::consts::ARCH,
        "x86_64",
        "the storm uses x86_64 syscall numbers"
    );
    ns.run(&format!(
        "perl -e 'my ($s, $d, $t) = (\"watchq-storm\", \"{point}\", \"tmpfs\"); \
         for (1..{rounds}) {{ syscall(165, $s, $d, $t, 0, 0) == 0 or die \"mount: $!\"; \
         syscall(166, $d, 0) == 0 or die \"umount: $!\"; }}'; \
         mount -t tmpfs watchq-last {last}"
    ));
    daemon.signal(nix::sys::signal::Signal::SIGCONT);

    sub.until("Lost(kernel-overflow)", |signals| {
        signals.iter().any(
            |s| matches!(s, Signal::Lost { reason, source, .. } if reason == "kernel-overflow" && source == "mounts"),
        )
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    while sub.next(Duration::from_millis(200)).await.is_some() {}
    assert_contiguous(&sub.received);
    let (_, now, _) = snapshot(&sub).await;
    assert!(
        now.values().any(|m| m.mount_point == last),
        "the mount made after the overflow is in the snapshot"
    );
    assert_eq!(
        snapshot_view(&now),
        mountinfo_view(&ns),
        "snapshot = mountinfo after the overflow"
    );
}

/// An unprivileged user, through polkit: its own namespace by default (the one its
/// process runs in, as the bus reports its pid), and not another process's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_watches_its_own_namespace_and_not_another() {
    let daemon = Daemon::with_polkit("");
    let alice = common::polkit::user("watchq-alice");
    let others = Namespace::start();
    let dir = tempfile::Builder::new()
        .prefix("watchq-mnt-")
        .tempdir()
        .expect("temporary directory");
    let point = dir.path().join("alice");
    fs::create_dir(&point).expect("mkdir");
    let point = point.display().to_string();
    let watchqctl = env!("CARGO_BIN_EXE_watchqctl");
    let as_alice = |extra: &[&str]| {
        let mut command = Command::new("unshare");
        command
            .args(["-m", "--propagation", "private", "setpriv"])
            .arg(format!("--reuid={}", alice.uid))
            .arg(format!("--regid={}", alice.gid))
            .args(["--clear-groups", watchqctl, "--address", daemon.address()])
            .args(["monitor", "--json", "mounts"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command
    };

    // Another process's namespace is an administrator's action: refused.
    let refused = as_alice(&[&format!("--match=pid={}", others.pid())])
        .output()
        .expect("watchqctl");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "alice watched another namespace");
    assert!(stderr.contains("AccessDenied"), "refusal: {stderr}");

    // Her own: watchqctl runs alone in a private namespace; a mount made there arrives.
    let mut child = as_alice(&[]).spawn().expect("watchqctl");
    let mut stderr = std::io::BufReader::new(child.stderr.take().expect("stderr"));
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stderr, &mut line).expect("watchqctl's first line");
    assert!(line.starts_with("watching"), "as alice: {line}");
    run_in(
        child.id(),
        &format!("mount -t tmpfs watchq-alice '{point}'"),
    );
    let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut event = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut event).expect("an event");
    let _ = child.kill();
    let _ = child.wait();
    let value: serde_json::Value = serde_json::from_str(&event).expect("JSON");
    assert_eq!(value["signal"], "MountChanged");
    assert_eq!(value["change"], "attach");
    assert_eq!(value["mount_point"], point.as_str());
    assert_eq!(value["mount_source"], "watchq-alice");
    assert_eq!(value["fs_type"], "tmpfs");
}

/// Makes `count` bind mounts of one tmpfs below `dir` in the namespace, with one
/// process (`perl`, mount(2) = 165 on x86_64, MS_BIND = 4096): a large namespace fast.
fn bind_mounts(ns: &Namespace, dir: &str, count: u64) {
    ns.run(&format!(
        "mount -t tmpfs watchq-many {dir}; \
         perl -e 'for my $i (1..{count}) {{ my $d = \"{dir}/$i\"; \
         mkdir $d or die \"mkdir: $!\"; \
         syscall(165, $d, $d, 0, 4096, 0) == 0 or die \"mount: $!\"; }}'"
    ));
}

/// A namespace's first listing is a job off the reader's task; watches that name the
/// namespace while it runs are answered only once the hub holds its mounts. Four
/// subscribers add a watch on one 2,000-mount namespace at once: each one's snapshot
/// right after holds every mount mountinfo shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_added_at_once_on_a_large_namespace_each_see_all_of_it() {
    let daemon = Daemon::start();
    let ns = Namespace::start();
    let dir = ns.mkdir("many");
    bind_mounts(&ns, &dir, 2000);
    let mut subs = Vec::new();
    for _ in 0..4 {
        subs.push(Subscriber::new(&daemon).await);
    }
    let spec = pid_spec(ns.pid());
    // Each asks for its snapshot as soon as its own AddWatch returned.
    let seen = futures_util::future::join_all(subs.iter().map(|sub| async {
        sub.watch("mounts", 1, &spec).await;
        snapshot(sub).await.1.len()
    }))
    .await;
    let text = fs::read_to_string(format!("/proc/{}/mountinfo", ns.pid())).expect("mountinfo");
    let mountinfo = watchqd::source::mounts::wire::parse_mountinfo(&text)
        .expect("parse mountinfo")
        .len();
    assert!(mountinfo > 2000, "{mountinfo} lines");
    assert_eq!(seen, [mountinfo; 4], "snapshots right after AddWatch");
}

/// Remounts made while a namespace's first listing runs (a job reading a duplicate of
/// its mountinfo) are not lost. The kernel's `POLLPRI` on mountinfo is taken in by the
/// poll that reports it, and epoll polls an fd twice (when it is added, when it
/// delivers): a mountinfo added to the epoll set after the listing, as it was, lost
/// every change made between the listing's read and that moment. Here the listing of
/// 5,000 mounts takes hundreds of milliseconds, and four remounts land 100-250 ms after
/// AddWatch is sent, the last before AddWatch returns; no later change rescues them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remounts_while_a_large_namespace_is_first_listed_are_reported() {
    let daemon = Daemon::start();
    let ns = Namespace::start();
    let dir = ns.mkdir("many");
    bind_mounts(&ns, &dir, 5000);
    let mut sub = Subscriber::with_options(
        &daemon,
        HashMap::from([("queue-depth", Variant::from(16384u32))]),
    )
    .await;
    let pid = ns.pid();
    // MS_REMOUNT | MS_BIND | MS_RDONLY = 4129.
    let script = format!(
        "perl -e 'for my $i (1..4) {{ select(undef, undef, undef, $i == 1 ? 0.1 : 0.05); \
         syscall(165, 0, \"{dir}/$i\", 0, 4129, 0) == 0 or die \"remount: $!\"; }}'"
    );
    let remounts = std::thread::spawn(move || run_in(pid, &script));
    let sent = std::time::Instant::now();
    sub.watch("mounts", 1, &pid_spec(pid)).await;
    let listed = sent.elapsed();
    remounts.join().expect("the remounts");
    assert!(
        listed > Duration::from_millis(250),
        "AddWatch returned after {listed:?}, before the last remount: a later change could \
         have rescued a lost one (the test proves nothing then)"
    );
    let (seq, mut mounts, _) = snapshot(&sub).await;
    let below = format!("{dir}/");
    let read_only = |mounts: &BTreeMap<u64, Mount>| {
        let mut ro: Vec<String> = mounts
            .values()
            .filter(|m| m.mount_point.starts_with(&below))
            .filter(|m| m.options.split(',').any(|o| o == "ro"))
            .map(|m| m.mount_point.clone())
            .collect();
        ro.sort();
        ro
    };
    let expected: Vec<String> = (1..=4).map(|i| format!("{dir}/{i}")).collect();
    // The snapshot has those the listing read; the rest come as events.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut view = mounts.clone();
        apply(&mut view, &sub.received, seq);
        if read_only(&view) == expected {
            mounts = view;
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "30 s after AddWatch returned, snapshot + events show read-only {:?}, not {expected:?}",
            read_only(&view)
        );
        sub.receive_for(Duration::from_millis(100)).await;
    }
    assert_contiguous(&sub.received);
    assert_eq!(
        snapshot_view(&mounts),
        mountinfo_view(&ns),
        "snapshot + events = mountinfo"
    );
}

/// Remounts are not reported by fanotify; they come from mountinfo rereads, coalesced
/// per namespace (one per interval, however many `POLLPRI`). A storm of remounts in a
/// namespace of 2,000 mounts, each mount remounted read-only once: every remount is
/// one event, none lost, and snapshot + events = mountinfo afterwards, options included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_remount_of_a_storm_in_a_large_namespace_is_reported() {
    let daemon = Daemon::start();
    let ns = Namespace::start();
    let dir = ns.mkdir("many");
    bind_mounts(&ns, &dir, 2000);
    let mut sub = Subscriber::with_options(
        &daemon,
        HashMap::from([("queue-depth", Variant::from(16384u32))]),
    )
    .await;
    sub.watch("mounts", 1, &pid_spec(ns.pid())).await;
    let (seq, mut mounts, _) = snapshot(&sub).await;

    let remounts = 300;
    // MS_REMOUNT | MS_BIND | MS_RDONLY = 4129.
    ns.run(&format!(
        "perl -e 'for my $i (1..{remounts}) {{ \
         syscall(165, 0, \"{dir}/$i\", 0, 4129, 0) == 0 or die \"remount: $!\"; }}'"
    ));
    let below = format!("{dir}/");
    sub.until("every remount", |signals| {
        mount_events(signals, &below).len() >= remounts
    })
    .await;
    // Nothing more may come: no second report of a remount, no loss.
    sub.receive_for(Duration::from_millis(500)).await;
    assert_contiguous(&sub.received);
    let events = mount_events(&sub.received, &below);
    assert_eq!(events.len(), remounts, "one event per remount");
    let mut remounted: Vec<u64> = events
        .iter()
        .map(|s| {
            let (change, id, _) = change_of(s);
            assert_eq!(change, "remount");
            id
        })
        .collect();
    remounted.sort_unstable();
    remounted.dedup();
    assert_eq!(remounted.len(), remounts, "each mount remounted once");
    assert!(
        !sub.received
            .iter()
            .any(|s| matches!(s, Signal::Lost { .. })),
        "nothing lost"
    );

    apply(&mut mounts, &sub.received, seq);
    assert_eq!(
        snapshot_view(&mounts),
        mountinfo_view(&ns),
        "snapshot + events"
    );
    let read_only = |options: &str| options.split(',').any(|o| o == "ro");
    let info = ns.mountinfo();
    for mount in mounts
        .values()
        .filter(|m| m.mount_point.starts_with(&below))
    {
        let line = info
            .iter()
            .find(|l| u64::from(l.id) == mount.mountinfo_id)
            .expect("in mountinfo");
        assert_eq!(
            read_only(&mount.options),
            read_only(&line.mount_options),
            "{}: options {} against mountinfo's {}",
            mount.mount_point,
            mount.options,
            line.mount_options
        );
    }
    let (_, now, _) = snapshot(&sub).await;
    assert_eq!(now, mounts, "the daemon's snapshot = snapshot + events");
}

/// `watchqctl monitor --json mounts` as `user`, alone in a private mount namespace of its
/// own (root's `unshare -m`): a user watching their own namespace, once it watches. Its
/// stdout is piped.
fn own_namespace_monitor(daemon: &Daemon, user: &common::polkit::User) -> std::process::Child {
    common::mounts::monitor_as(daemon, user, &["unshare", "-m", "--propagation", "private"])
}

/// One user's namespaces may take `[sources.mounts] user_cpu_percent` of the daemon's
/// time (1 here). Alice, unprivileged, watches her own namespace while a storm runs in
/// it: past her share her events are coalesced into Lost(kernel-overflow) and a resync,
/// counted in the Manager's Counters (what `watchqctl status` shows); the snapshot of
/// her namespace is right afterwards. Another namespace's watcher, in the same run,
/// gets every one of its events and no Lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_past_their_share_is_coalesced_into_lost_and_others_are_not() {
    let daemon = Daemon::with_polkit("[sources.mounts]\nuser_cpu_percent = 1\n");
    let alice = common::polkit::user("watchq-alice");
    let mut monitor = own_namespace_monitor(&daemon, &alice);
    let alice_pid = monitor.id();
    let alice_lines = common::lines::lines(monitor.stdout.take().expect("stdout"));

    // The administrator watches alice's namespace too (sharing its fate: a Lost), and
    // bob's, which must be untouched.
    let mut admin = Subscriber::with_options(
        &daemon,
        HashMap::from([("queue-depth", Variant::from(16384u32))]),
    )
    .await;
    admin.watch("mounts", 1, &pid_spec(alice_pid)).await;
    let bob_ns = Namespace::start();
    let mut bob = Subscriber::new(&daemon).await;
    bob.watch("mounts", 2, &pid_spec(bob_ns.pid())).await;

    let dir = tempfile::Builder::new()
        .prefix("watchq-mnt-")
        .tempdir()
        .expect("temporary directory");
    let storm = dir.path().join("storm");
    fs::create_dir(&storm).expect("mkdir");
    let storm = storm.display().to_string();
    // The storm ends by unmounting one mount made before it and making another that
    // stays, in all likelihood while alice is still throttled: so the resync's
    // difference must remove and add, not only find the namespace as it was.
    let (gone, stays) = (dir.path().join("gone"), dir.path().join("stays"));
    for point in [&gone, &stays] {
        fs::create_dir(point).expect("mkdir");
    }
    let (gone, stays) = (gone.display().to_string(), stays.display().to_string());
    let made = Command::new("nsenter")
        .args(["-t", &alice_pid.to_string(), "-m", "mount", "-t", "tmpfs"])
        .args(["watchq-gone", &gone])
        .status()
        .expect("nsenter mount");
    assert!(made.success(), "mount {gone} in alice's namespace");
    let pairs = 3000;
    let churn = Command::new("nsenter")
        .args(["-t", &alice_pid.to_string(), "-m", "perl", "-e"])
        .arg(format!(
            "my ($s, $d, $t) = (\"watchq-storm\", \"{storm}\", \"tmpfs\"); \
             my ($g, $k) = (\"{gone}\", \"{stays}\"); \
             for (1..{pairs}) {{ syscall(165, $s, $d, $t, 0, 0) == 0 or die \"mount: $!\"; \
             syscall(166, $d, 0) == 0 or die \"umount: $!\"; }} \
             syscall(166, $g, 0) == 0 or die \"umount: $!\"; \
             syscall(165, $s, $k, $t, 0, 0) == 0 or die \"mount: $!\";"
        ))
        .spawn()
        .expect("nsenter perl");
    // Bob's mounts while alice churns.
    let bob_points: Vec<String> = (0..5).map(|i| bob_ns.mkdir(&format!("b{i}"))).collect();
    for point in &bob_points {
        bob_ns.run(&format!("mount -t tmpfs watchq-bob {point}"));
    }
    let churn = churn.wait_with_output().expect("the storm");
    assert!(churn.status.success(), "the storm failed");

    bob.until("bob's mounts", |signals| {
        mount_events(signals, &bob_ns.path("b")).len() >= bob_points.len()
    })
    .await;
    bob.receive_for(Duration::from_millis(300)).await;
    assert_eq!(mount_events(&bob.received, &bob_ns.path("b")).len(), 5);
    assert!(
        !bob.received
            .iter()
            .any(|s| matches!(s, Signal::Lost { .. })),
        "bob lost nothing: {:?}",
        bob.received
    );

    // Alice's monitor says Lost(kernel-overflow); so does the administrator's watch.
    let deadline = std::time::Instant::now() + TIMEOUT;
    let mut alice_lost = false;
    while !alice_lost {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = alice_lines.recv_timeout(left).expect("alice's Lost");
        let value: serde_json::Value = serde_json::from_str(&line).expect("JSON");
        alice_lost = value["signal"] == "Lost"
            && value["reason"] == "kernel-overflow"
            && value["source"] == "mounts";
    }
    admin
        .until("Lost(kernel-overflow)", |signals| {
            signals
                .iter()
                .any(|s| matches!(s, Signal::Lost { reason, .. } if reason == "kernel-overflow"))
        })
        .await;
    // The resync left the administrator's view of alice's namespace right.
    admin.receive_for(Duration::from_millis(500)).await;
    let (_, now, _) = snapshot(&admin).await;
    let text = fs::read_to_string(format!("/proc/{alice_pid}/mountinfo")).expect("mountinfo");
    let mut lines: Vec<_> = watchqd::source::mounts::wire::parse_mountinfo(&text)
        .expect("parse mountinfo")
        .into_iter()
        .map(|l| (u64::from(l.id), l.mount_point, l.fs_type))
        .collect();
    lines.sort();
    let _ = monitor.kill();
    let _ = monitor.wait();
    assert_eq!(
        snapshot_view(&now),
        lines,
        "snapshot = mountinfo after the resync"
    );
    let points: Vec<&str> = lines.iter().map(|(_, point, _)| point.as_str()).collect();
    assert!(
        points.contains(&stays.as_str()) && !points.contains(&gone.as_str()),
        "the storm's last changes are in mountinfo: {points:?}"
    );

    let manager = watchqd::client::ManagerProxy::builder(&admin.conn)
        .build()
        .await
        .expect("manager proxy");
    let counters = manager.counters().await.expect("Counters");
    let counter = |name: &str| {
        counters
            .iter()
            .find(|(source, n, _)| source == "mounts" && n == name)
            .map(|(_, _, v)| *v)
            .unwrap_or_else(|| panic!("counter {name} in {counters:?}"))
    };
    assert!(counter("users-throttled") >= 1, "{counters:?}");
    assert!(counter("namespaces-resynced") >= 1, "{counters:?}");
}

/// A namespace's first listing is work charged to the user who asks for it, so a user
/// past their share is refused a new one (`LimitExceeded`, saying when to retry)
/// rather than having it listed anyway, again and again over namespaces of their own.
/// Alice churns in her namespace at a 1% share and asks, again and again, to watch a
/// new namespace of hers; she is refused while she owes. Bob, asking in the meantime,
/// is not; nor is root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_past_their_share_is_refused_a_new_namespace_and_others_are_not() {
    let daemon = Daemon::with_polkit("[sources.mounts]\nuser_cpu_percent = 1\n");
    let alice = common::polkit::user("watchq-alice");
    let bob = common::polkit::user("watchq-bob");
    let mut monitor = own_namespace_monitor(&daemon, &alice);
    let alice_pid = monitor.id();
    let dir = tempfile::Builder::new()
        .prefix("watchq-mnt-")
        .tempdir()
        .expect("temporary directory");
    let storm = dir.path().display().to_string();
    let mut churn = Command::new("nsenter")
        .args(["-t", &alice_pid.to_string(), "-m", "perl", "-e"])
        .arg(format!(
            "my ($s, $d, $t) = (\"watchq-storm\", \"{storm}\", \"tmpfs\"); \
             while (1) {{ syscall(165, $s, $d, $t, 0, 0) == 0 or die \"mount: $!\"; \
             syscall(166, $d, 0) == 0 or die \"umount: $!\"; }}"
        ))
        .spawn()
        .expect("nsenter perl");
    let enter = ["unshare", "-m", "--propagation", "private"];
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut attempts = 0;
    let refusal = loop {
        let (mut other, first) = common::mounts::start_monitor_as(&daemon, &alice, &enter);
        let _ = other.kill();
        let _ = other.wait();
        attempts += 1;
        if !first.starts_with("watching") {
            break first;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "alice, churning past a 1% share, was never refused a new namespace in \
             {attempts} attempts over 60 s"
        );
    };
    // Bob has spent nothing: his own new namespace is watched while alice owes.
    let mut bobs = own_namespace_monitor(&daemon, &bob);
    let _ = bobs.kill();
    let _ = bobs.wait();
    let root = Subscriber::new(&daemon).await;
    let other = Namespace::start();
    root.watch("mounts", 1, &pid_spec(other.pid())).await;
    let churned = churn.try_wait().expect("the churn's status");
    let _ = churn.kill();
    let _ = churn.wait();
    assert_eq!(churned, None, "the churn still ran");
    println!("refused at attempt {attempts}: {refusal}");
    let _ = monitor.kill();
    let _ = monitor.wait();
    assert!(
        refusal.contains("org.watchq1.Error.LimitExceeded")
            && refusal.contains("user_cpu_percent")
            && refusal.contains("can be watched in"),
        "attempt {attempts}: {refusal}"
    );
}

/// What an unprivileged user may learn of other users' mount namespaces. The mounts
/// source's counters are aggregates (how often some user went over their share, not
/// who, nor which namespace), so anyone may read them: through the Manager's `Counters`
/// property (what `watchqctl status` prints) and `Manager.Metrics`. Bob, hostile, reads
/// them right after alice was throttled: he sees that a throttle happened, the same
/// entries root sees, and nothing naming alice, her uid, her namespace or her mounts;
/// he cannot write the property; and the Manager's `Snapshot` of the mounts table,
/// which holds every watched namespace's mounts, is refused to him (it needs a
/// system-wide grant).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_user_reads_aggregate_mount_counters_and_nothing_of_alices() {
    let daemon = Daemon::with_polkit("[sources.mounts]\nuser_cpu_percent = 1\n");
    let alice = common::polkit::user("watchq-alice");
    let bob = common::polkit::user("watchq-bob");
    let watchqctl = env!("CARGO_BIN_EXE_watchqctl");
    let mut monitor = own_namespace_monitor(&daemon, &alice);
    let alice_pid = monitor.id();
    // Read, so that her monitor keeps up.
    let _alice_lines = common::lines::lines(monitor.stdout.take().expect("stdout"));
    let ns = fs::File::open(format!("/proc/{alice_pid}/ns/mnt")).expect("alice's namespace");
    let alice_namespace = watchqd::sys::mount_api::namespace_id(std::os::fd::AsFd::as_fd(&ns))
        .expect("NS_GET_MNTNS_ID");

    // Alice's storm, in her namespace only, below a name nobody else should learn.
    let dir = tempfile::Builder::new()
        .prefix("watchq-mnt-")
        .tempdir()
        .expect("temporary directory");
    let storm = dir.path().join("alices-secret-storm");
    fs::create_dir(&storm).expect("mkdir");
    let storm = storm.display().to_string();
    let pairs = 3000;
    run_in(
        alice_pid,
        &format!(
            "perl -e 'my ($s, $d, $t) = (\"watchq-storm\", \"{storm}\", \"tmpfs\"); \
             for (1..{pairs}) {{ syscall(165, $s, $d, $t, 0, 0) == 0 or die \"mount: $!\"; \
             syscall(166, $d, 0) == 0 or die \"umount: $!\"; }}'"
        ),
    );
    // Left mounted, so that alice's namespace holds a mount of that name.
    run_in(alice_pid, &format!("mount -t tmpfs watchq-storm '{storm}'"));

    // Root's view, for comparison.
    let conn = daemon.connect().await;
    let manager = watchqd::client::ManagerProxy::builder(&conn)
        .build()
        .await
        .expect("manager proxy");
    let root_counters = manager.counters().await.expect("Counters");
    let throttled = root_counters
        .iter()
        .find(|(source, name, _)| source == "mounts" && name == "users-throttled")
        .map(|(_, _, n)| *n);
    assert!(
        throttled.is_some_and(|n| n >= 1),
        "alice was throttled: {root_counters:?}"
    );
    let (_, root_table) = manager.snapshot("mounts").await.expect("root's Snapshot");
    assert!(
        root_table
            .iter()
            .any(|o| o.0.starts_with(&format!("{alice_namespace}/"))),
        "the mounts table holds alice's namespace (so a snapshot of it would tell)"
    );

    let as_bob = |program: &str, args: &[&str]| {
        let out = Command::new("setpriv")
            .arg(format!("--reuid={}", bob.uid))
            .arg(format!("--regid={}", bob.gid))
            .args(["--clear-groups", program])
            .args(args)
            .output()
            .expect("setpriv");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let address = format!("--address={}", daemon.address());
    // Nothing bob can read names alice, her uid, her namespace or her mounts.
    let tells = |text: &str| -> Vec<String> {
        let mut found = Vec::new();
        for (what, marker) in [
            ("alice's name", alice.name.clone()),
            ("her storm's mount point", "alices-secret-storm".to_owned()),
            ("her namespace's object ids", format!("{alice_namespace}/")),
            (
                "her namespace's watch object",
                format!("mntns:{alice_namespace}"),
            ),
            ("a uid", "uid".to_owned()),
        ] {
            if text.contains(&marker) {
                found.push(format!("{what} ({marker})"));
            }
        }
        found
    };

    let (ok, status, err) = as_bob(
        watchqctl,
        &["--address", daemon.address(), "status", "--json"],
    );
    assert!(ok, "bob's watchqctl status: {err}");
    let status: serde_json::Value = serde_json::from_str(&status).expect("status JSON");
    let mounts = status["sources"]
        .as_array()
        .expect("sources")
        .iter()
        .find(|s| s["name"] == "mounts")
        .expect("the mounts source");
    // The same entries root reads: aggregates, none per user or per namespace.
    let mut bob_names: Vec<String> = mounts["counters"]
        .as_object()
        .expect("counters")
        .keys()
        .cloned()
        .collect();
    let mut root_names: Vec<String> = root_counters
        .iter()
        .filter(|(source, _, _)| source == "mounts")
        .map(|(_, name, _)| name.clone())
        .collect();
    bob_names.sort();
    root_names.sort();
    assert_eq!(bob_names, root_names, "bob's counters are root's");
    assert_eq!(
        root_names,
        [
            "events-coalesced",
            "mountinfo-reread-us",
            "mountinfo-rereads",
            "namespaces-resynced",
            "users-throttled"
        ],
        "the mounts source's counters"
    );
    assert!(
        mounts["counters"]["users-throttled"].as_u64() >= Some(1),
        "bob sees that a throttle happened: {mounts}"
    );
    // The sources' part says nothing of alice; the caller's part is bob himself, as the
    // daemon sees him (Manager.Caller), and only him.
    assert_eq!(
        tells(&status["sources"].to_string()),
        Vec::<String>::new(),
        "status as bob"
    );
    assert_eq!(
        status["caller"]["uid"],
        bob.uid.to_string(),
        "status as bob: {status}"
    );
    assert_eq!(
        tells(&status["caller"].to_string()),
        vec!["a uid (uid)".to_owned()],
        "status as bob: {status}"
    );

    let (ok, counters, err) = as_bob(
        "busctl",
        &[
            &address,
            "get-property",
            "org.watchq1",
            "/org/watchq1",
            "org.watchq1.Manager",
            "Counters",
        ],
    );
    assert!(ok, "bob's Counters: {err}");
    assert_eq!(
        tells(&counters),
        Vec::<String>::new(),
        "Counters as bob: {counters}"
    );

    let (ok, metrics, err) = as_bob(watchqctl, &["--address", daemon.address(), "metrics"]);
    assert!(ok, "bob's watchqctl metrics: {err}");
    assert_eq!(tells(&metrics), Vec::<String>::new(), "Metrics as bob");

    // Hostile writes and reads: the property is not writable, the table needs a grant.
    let (ok, _, err) = as_bob(
        "busctl",
        &[
            &address,
            "set-property",
            "org.watchq1",
            "/org/watchq1",
            "org.watchq1.Manager",
            "Counters",
            "a(sst)",
            "0",
        ],
    );
    assert!(!ok, "bob wrote Counters");
    // The bus policy refuses it before the daemon (which has no setter) would.
    assert!(
        ["Access denied", "AccessDenied", "read-only", "ReadOnly"]
            .iter()
            .any(|refusal| err.contains(refusal)),
        "bob's write: {err}"
    );
    let (ok, table, err) = as_bob(
        "busctl",
        &[
            &address,
            "call",
            "org.watchq1",
            "/org/watchq1",
            "org.watchq1.Manager",
            "Snapshot",
            "s",
            "mounts",
        ],
    );
    assert!(!ok, "bob read the mounts table: {table}");
    assert!(
        err.contains("allowed to root only"),
        "bob's Snapshot refused by policy: {err}"
    );
    assert_eq!(tells(&table), Vec::<String>::new(), "Snapshot as bob");
    let _ = monitor.kill();
    let _ = monitor.wait();
}
