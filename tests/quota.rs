//! Quota warnings on the host: the real `VFS_DQUOT` family, a real dbus-daemon and
//! polkitd, subscribers as other users through `watchqctl`. This kernel has no quota
//! format, so no real warning can happen here (that is `tests/guest_quota.rs`); what is
//! shown here is that forged warnings reach nobody, that the source opens only when
//! watched, and that watching every uid's quota needs authorization.

mod common;
#[path = "common/quota.rs"]
mod quota;

use std::time::{Duration, Instant};

use common::polkit::user;
use common::sources::source_info;
use common::*;
use watchqd::source::quota::wire::{QuotaType, Warning};
use zbus::Variant;

/// The daemon's open `NETLINK_GENERIC` sockets (protocol 16 in /proc/net/netlink).
/// The quota multicast group is one for the whole machine: the forgeries one test sends
/// reach every other test's daemon, and the overflow test's flood overflows theirs. The
/// tests that listen to the group take turns.
static GROUP: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn genl_sockets(daemon: &Daemon) -> usize {
    daemon.netlink_sockets(16)
}

/// Waits until the daemon's log has `count` lines containing `needle`.
fn wait_for_log(daemon: &Daemon, needle: &str, count: usize) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let seen = daemon.log_text().matches(needle).count();
        if seen >= count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the daemon logged '{needle}' {seen} times, expected {count}; log:\n{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The running totals the daemon logged with each rejected (forged) quota message, in
/// log order: the numbers after `rejected=`, parsed whole (so 2 is not 20–29).
fn rejection_totals(log: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| l.contains("dropped a quota message not sent by the kernel"))
        .map(|l| {
            let (_, rest) = l
                .split_once("rejected=")
                .unwrap_or_else(|| panic!("a rejection without its count: {l}"));
            let number = rest.split_whitespace().next().unwrap_or_default();
            number
                .parse()
                .unwrap_or_else(|_| panic!("rejected={number} is not a count: {l}"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_quota_warnings_reach_nobody_and_the_source_runs_only_while_watched() {
    let _group = GROUP.lock().await;
    let daemon = Daemon::with_polkit("");
    let alice = user("watchq-alice");
    let (family, group) = quota::resolve();

    // The family resolves here, so the source must say it is available.
    let status = source_info(&daemon.connect().await, "quota").await;
    assert!(status.available, "quota unavailable: {}", status.reason);
    assert_eq!(genl_sockets(&daemon), 0, "a source nobody watches is open");

    // Root watches every uid's quota; alice watches her own, through watchqctl as her.
    let mut admin = Subscriber::new(&daemon).await;
    admin
        .watch("quota", 1, &[("scope", Variant::from("system"))])
        .await;
    admin
        .watch("devices", 2, &[("subsystem", Variant::from("block"))])
        .await;
    assert_eq!(genl_sockets(&daemon), 1, "the watched source is open");
    let mut alices = quota::Monitor::start(
        daemon.address(),
        alice.uid,
        alice.gid,
        &["quota", "devices"],
    )
    .expect("alice watches her own quota");

    // Root in the initial network namespace multicasts forged warnings to the group:
    // one in the kernel's exact layout about alice, and garbage. A witness in the group
    // proves that they really reached every listener.
    let witness = quota::Witness::join(group);
    let forged = quota::forged_warning(
        family.id,
        &Warning {
            quota_type: QuotaType::User,
            excess_id: u64::from(alice.uid),
            code: 4,
            major: 7,
            minor: 0,
            caused_id: u64::from(alice.uid),
        },
    );
    quota::forge(group, &forged);
    quota::forge(group, b"\x10\0\0\0garbage!garbage!");
    let mut witnessed = Vec::new();
    while witnessed.len() < 2 {
        let (datagram, port) = witness
            .receive()
            .expect("the witness received the forged messages");
        assert_ne!(port, 0, "the forgery carries its sender's port id");
        witnessed.push(datagram);
    }
    assert_eq!(witnessed[0], forged);

    // The daemon read both before the device event below happens.
    wait_for_log(&daemon, "quota netlink datagram", 2);

    // The subscriptions are undisturbed: the next thing each receives is a real device
    // event, numbered 1.
    let disk = LoopDevice::attach(4);
    disk.synth_change();
    let path = disk.sys_path();
    admin
        .until("the real device event", |s| {
            s.iter()
                .any(|e| matches!(e, Signal::Device { sys_path, .. } if *sys_path == path))
        })
        .await;
    assert!(
        matches!(&admin.received[0], Signal::Device { seq: 1, .. }),
        "root received {:?}",
        admin.received
    );
    let first = alices.until("alice's device event", |s| s["sys_path"] == path.as_str());
    assert_eq!(first["seq"], 1, "{:?}", alices.signals);
    alices.drain(Duration::from_millis(300));
    assert!(
        alices.quota_warnings().is_empty(),
        "alice got a forged warning: {:?}",
        alices.signals
    );
    assert!(
        !admin
            .received
            .iter()
            .any(|s| matches!(s, Signal::QuotaWarning { .. })),
        "root got a forged warning: {:?}",
        admin.received
    );
    assert_contiguous(&admin.received);
    // They were dropped at the edge, and counted.
    wait_for_log(&daemon, "dropped a quota message not sent by the kernel", 2);
    assert_eq!(
        rejection_totals(&daemon.log_text()),
        [1, 2],
        "the two rejections are counted, one by one"
    );

    // The socket closes with the last quota watch.
    drop(alices);
    let deadline = Instant::now() + TIMEOUT;
    admin.proxy.remove_watch(1).await.expect("RemoveWatch");
    while genl_sockets(&daemon) != 0 {
        assert!(
            Instant::now() < deadline,
            "the quota socket stayed open after the last watch went"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watching_every_uids_quota_needs_authorization() {
    let _group = GROUP.lock().await;
    let daemon = Daemon::with_polkit("");
    let (alice, bob) = (user("watchq-alice"), user("watchq-bob"));
    for who in [&alice, &bob] {
        let refused = quota::Monitor::start(
            daemon.address(),
            who.uid,
            who.gid,
            &["--match", "scope=system", "quota"],
        )
        .err()
        .unwrap_or_else(|| panic!("{} may watch every uid's quota", who.name));
        assert!(
            refused.contains("org.watchq1.Error.AccessDenied"),
            "{}: {refused}",
            who.name
        );
        quota::Monitor::start(daemon.address(), who.uid, who.gid, &["quota"])
            .unwrap_or_else(|e| panic!("{} cannot watch their own quota: {e}", who.name));
    }
    // Options are checked before policy is asked.
    let typo = quota::Monitor::start(
        daemon.address(),
        alice.uid,
        alice.gid,
        &["--match", "scope=everyone", "quota"],
    )
    .err()
    .expect("a bad scope is refused");
    assert!(typo.contains("InvalidArgument"), "{typo}");
    // Root is an administrator.
    let root = Subscriber::new(&daemon).await;
    root.watch("quota", 1, &[("scope", Variant::from("system"))])
        .await;
}

/// Warnings the kernel could not queue for the daemon (its socket buffer full while it
/// was stopped) become `Lost(kernel-overflow)` for every quota watcher. Forged messages
/// fill the buffer like real ones: the kernel queues before anyone checks origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kernel_overflow_becomes_lost_for_quota_watchers() {
    let _group = GROUP.lock().await;
    use nix::sys::signal::Signal as Sig;
    let daemon = Daemon::start();
    let (family, group) = quota::resolve();
    let mut admin = Subscriber::new(&daemon).await;
    admin
        .watch("quota", 1, &[("scope", Variant::from("system"))])
        .await;
    let forged = quota::forged_warning(
        family.id,
        &Warning {
            quota_type: QuotaType::User,
            excess_id: 4242,
            code: 6,
            major: 7,
            minor: 0,
            caused_id: 4242,
        },
    );
    daemon.signal(Sig::SIGSTOP);
    // Far more than the daemon's 256 KiB buffer holds (each costs ~1 KiB of it).
    for _ in 0..4000 {
        quota::forge(group, &forged);
    }
    daemon.signal(Sig::SIGCONT);
    admin
        .until("Lost from the kernel overflow", |s| {
            s.iter().any(|e| matches!(e, Signal::Lost { .. }))
        })
        .await;
    assert!(
        matches!(&admin.received[0], Signal::Lost { seq: 1, count: 0, source, reason }
            if source == "quota" && reason == "kernel-overflow"),
        "{:?}",
        admin.received
    );
    wait_for_log(&daemon, "kernel dropped quota warnings (ENOBUFS)", 1);
    // Everything that was queued is then read and rejected, and none of it delivered.
    wait_for_log(
        &daemon,
        "dropped a quota message not sent by the kernel",
        100,
    );
    // Everything that comes within the window, not just the first signal of a burst.
    admin.receive_for(Duration::from_millis(500)).await;
    let rejected = rejection_totals(&daemon.log_text())
        .into_iter()
        .max()
        .unwrap_or(0);
    println!("4000 forged while stopped: the kernel queued {rejected} for the daemon");
    assert!(
        rejected < 4000,
        "the kernel queued all 4000 forged messages"
    );
    assert!(
        !admin
            .received
            .iter()
            .any(|s| matches!(s, Signal::QuotaWarning { .. })),
        "{:?}",
        admin.received
    );
}

/// Outside the initial network namespace the family does not exist: the source says so
/// and why, as the daemon under `PrivateNetwork=` would report it.
#[test]
fn the_source_is_unavailable_where_the_family_does_not_resolve() {
    use watchqd::source::{Availability, EventSource};
    let availability = std::thread::spawn(|| {
        // SAFETY: unshare(2) with a flag; it moves only this thread.
        let rc = unsafe { nix::libc::unshare(nix::libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
        watchqd::source::quota::Quota::new().probe()
    })
    .join()
    .expect("probe thread");
    match availability {
        Availability::Unavailable(reason) => {
            assert!(
                reason.contains("VFS_DQUOT does not exist"),
                "unclear reason: {reason}"
            );
        }
        Availability::Available | Availability::Via(_) | Availability::Degraded(_) => {
            panic!("VFS_DQUOT resolved in a new network namespace")
        }
    }
    assert_eq!(
        watchqd::source::quota::Quota::new().probe(),
        Availability::Available
    );
}
