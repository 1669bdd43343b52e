//! Mount topology on a kernel without fanotify mount events: the qemu guest of the test
//! bed runs Linux 6.12 (statmount/listmount, no `FAN_REPORT_MNT`/`FAN_MARK_MNTNS`), so
//! the mounts source follows namespaces by diffing mountinfo. tests/mounts.rs covers the
//! fanotify path on the host (6.15 or later).
//!
//! The host test boots the guest and re-runs `inside::mountinfo_fallback_through_the_daemon`
//! of this binary there, which runs dbus-daemon and watchqd and makes real mounts in a
//! private mount namespace (`unshare -m`, `nsenter`).
//! Run with: `cargo test --test guest_mounts` (as root, after `tests/vm/setup-host`).

mod common;
#[path = "common/vm.rs"]
mod vm;

use std::time::Duration;

const STEP: Duration = Duration::from_secs(600);

#[test]
fn mount_changes_are_diffed_from_mountinfo_on_a_kernel_without_fanotify_mount_events() {
    vm::Guest::run_inside(
        &vm::BootOptions::new(),
        "mountinfo_fallback_through_the_daemon",
        STEP,
        |_, _| {},
    );
}

mod inside {
    use std::collections::BTreeMap;
    use std::fs;

    use zbus::Variant;

    use super::common::mounts::{apply, mount_of, Mount, Namespace};
    use super::common::sources::source_info;
    use super::common::*;

    /// Mounts by unique mount id.
    type Mounts = BTreeMap<u64, Mount>;

    /// (mountinfo id, mount point, fs type, options) of every mountinfo line, sorted.
    fn mountinfo_view(ns: &Namespace) -> Vec<(u64, String, String, String)> {
        let mut lines: Vec<_> = ns
            .mountinfo()
            .into_iter()
            .map(|l| (u64::from(l.id), l.mount_point, l.fs_type, l.mount_options))
            .collect();
        lines.sort();
        lines
    }

    async fn snapshot(sub: &Subscriber) -> (u64, Mounts) {
        let (seq, objects) = sub
            .proxy
            .snapshot("mounts")
            .await
            .expect("Snapshot(mounts)");
        let mounts = objects
            .iter()
            .map(|(_, _, attributes, _)| mount_of(attributes))
            .collect();
        (seq, mounts)
    }

    /// A snapshot in the shape of [`mountinfo_view`].
    fn view(mounts: &Mounts) -> Vec<(u64, String, String, String)> {
        let mut view: Vec<_> = mounts
            .values()
            .map(|m| {
                (
                    m.mountinfo_id,
                    m.mount_point.clone(),
                    m.fs_type.clone(),
                    m.options.clone(),
                )
            })
            .collect();
        view.sort();
        view
    }

    fn mount_events(signals: &[Signal], below: &str) -> Vec<(String, u64, String)> {
        signals
            .iter()
            .filter_map(|s| match s {
                Signal::Mount {
                    change,
                    mount_id,
                    mount_point,
                    ..
                } if mount_point.starts_with(below) => {
                    Some((change.clone(), *mount_id, mount_point.clone()))
                }
                _ => None,
            })
            .collect()
    }

    /// Waits until `count` mount events below `below` arrived, and returns them.
    async fn events(sub: &mut Subscriber, below: &str, count: usize) -> Vec<(String, u64, String)> {
        sub.until(&format!("{count} mount events below {below}"), |signals| {
            mount_events(signals, below).len() >= count
        })
        .await;
        mount_events(&sub.received, below)
    }

    #[test]
    #[ignore = "runs inside the guest; started by the host test"]
    fn mountinfo_fallback_through_the_daemon() {
        super::vm::enter_guest();
        super::vm::block_on(fallback_async());
    }

    async fn fallback_async() {
        let release = fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
        println!("guest kernel {}", release.trim());
        let daemon = Daemon::start();
        let ns = Namespace::start();
        let (a, b, c) = (ns.mkdir("a"), ns.mkdir("b"), ns.mkdir("c"));
        let base = ns.dir.path().display().to_string();

        let mut sub = Subscriber::new(&daemon).await;
        let mounts = source_info(&sub.conn, "mounts").await;
        assert!(mounts.available, "{mounts:?}");
        assert!(
            mounts.reason.contains("FAN_REPORT_MNT") && mounts.reason.contains("mountinfo"),
            "the degraded mode is not reported: {mounts:?}"
        );

        sub.watch("mounts", 3, &[("pid", Variant::from(ns.pid()))])
            .await;
        let (seq0, mut cache) = snapshot(&sub).await;
        assert_eq!(
            view(&cache),
            mountinfo_view(&ns),
            "snapshot = mountinfo at start"
        );

        ns.run(&format!("mount -t tmpfs -o size=1m,nosuid watchq-a {a}"));
        let got = events(&mut sub, &base, 1).await;
        let (change, a_id, point) = got[0].clone();
        assert_eq!((change.as_str(), point.as_str()), ("attach", a.as_str()));
        assert!(!cache.contains_key(&a_id), "a new unique id");

        ns.run(&format!("mount --bind {a} {b}"));
        let got = events(&mut sub, &base, 2).await;
        let (change, b_id, point) = got[1].clone();
        assert_eq!((change.as_str(), point.as_str()), ("attach", b.as_str()));
        assert_ne!(b_id, a_id);

        ns.run(&format!("mount --move {b} {c}"));
        let got = events(&mut sub, &base, 3).await;
        assert_eq!(got[2], ("move".to_owned(), b_id, c.clone()));

        // Read-only mount and superblock: a's mount changes, and c (same superblock) too.
        ns.run(&format!("mount -o remount,ro {a}"));
        sub.until("the remount of a", |signals| {
            mount_events(signals, &base)
                .iter()
                .any(|(change, id, _)| change == "remount" && *id == a_id)
        })
        .await;
        let remount = sub
            .received
            .iter()
            .find(|s| matches!(s, Signal::Mount { change, mount_id, .. } if change == "remount" && *mount_id == a_id))
            .expect("remount of a")
            .clone();
        assert_eq!(remount.attr_bool("read-only"), Some(true));

        ns.run(&format!("umount {c}"));
        sub.until("the detach of the moved mount", |signals| {
            mount_events(signals, &base)
                .iter()
                .any(|(change, id, _)| change == "detach" && *id == b_id)
        })
        .await;
        ns.run(&format!("umount {a}"));
        sub.until("the detach of a", |signals| {
            mount_events(signals, &base)
                .iter()
                .any(|(change, id, _)| change == "detach" && *id == a_id)
        })
        .await;

        // Exactly these events: no duplicates, nothing invented.
        let changes: Vec<(String, u64)> = mount_events(&sub.received, &base)
            .into_iter()
            .map(|(change, id, _)| (change, id))
            .filter(|(change, id)| !(change == "remount" && *id == b_id))
            .collect();
        let expected: Vec<(String, u64)> = [
            ("attach", a_id),
            ("attach", b_id),
            ("move", b_id),
            ("remount", a_id),
            ("detach", b_id),
            ("detach", a_id),
        ]
        .iter()
        .map(|(change, id)| ((*change).to_owned(), *id))
        .collect();
        assert_eq!(changes, expected);
        assert_contiguous(&sub.received);

        // The first snapshot with every event applied is the namespace now, is the new
        // snapshot, and is mountinfo.
        apply(&mut cache, &sub.received, seq0);
        let (seq1, now) = snapshot(&sub).await;
        assert_eq!(seq1, sub.received.last().map_or(0, Signal::seq));
        assert_eq!(cache, now, "snapshot + events = snapshot");
        assert_eq!(
            view(&now),
            mountinfo_view(&ns),
            "snapshot = mountinfo at the end"
        );
    }
}
