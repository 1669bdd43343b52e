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
    use std::collections::{BTreeMap, HashMap};
    use std::fs;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use watchqd::client::ManagerProxy;
    use zbus::Variant;

    use super::common::*;

    /// A process alone in a private mount namespace, killed on drop.
    struct Namespace {
        child: Child,
        dir: tempfile::TempDir,
    }

    impl Namespace {
        fn start() -> Namespace {
            let dir = tempfile::Builder::new()
                .prefix("watchq-mnt-")
                .tempdir()
                .expect("temporary directory");
            let child = Command::new("unshare")
                .args(["-m", "--propagation", "private", "sleep", "1000"])
                .stdin(Stdio::null())
                .spawn()
                .expect("unshare(1) must be installed (util-linux)");
            let ns = Namespace { child, dir };
            let own = fs::read_link("/proc/self/ns/mnt").expect("own namespace");
            let deadline = Instant::now() + TIMEOUT;
            while fs::read_link(format!("/proc/{}/ns/mnt", ns.pid()))
                .ok()
                .as_ref()
                == Some(&own)
                || fs::read_link(format!("/proc/{}/exe", ns.pid()))
                    .map(|exe| !exe.ends_with("sleep"))
                    .unwrap_or(true)
            {
                assert!(
                    Instant::now() < deadline,
                    "unshare did not start sleep in a new namespace"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            ns
        }

        fn pid(&self) -> u32 {
            self.child.id()
        }

        fn mkdir(&self, name: &str) -> String {
            let path = self.dir.path().join(name);
            fs::create_dir_all(&path).expect("mkdir");
            path.display().to_string()
        }

        fn run(&self, script: &str) {
            let out = Command::new("nsenter")
                .args(["-t", &self.pid().to_string(), "-m", "sh", "-ec", script])
                .output()
                .expect("nsenter(1) must be installed (util-linux)");
            assert!(
                out.status.success(),
                "in the namespace: {script}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }

        /// (old id, mount point, fs type, options) of every line, sorted.
        fn mountinfo(&self) -> Vec<(u64, String, String, String)> {
            let text =
                fs::read_to_string(format!("/proc/{}/mountinfo", self.pid())).expect("mountinfo");
            let mut lines: Vec<_> = watchqd::source::mounts::wire::parse_mountinfo(&text)
                .expect("parse mountinfo")
                .into_iter()
                .map(|l| (u64::from(l.id), l.mount_point, l.fs_type, l.mount_options))
                .collect();
            lines.sort();
            lines
        }
    }

    impl Drop for Namespace {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// (mountinfo id, mount point, fs type, options) by unique mount id.
    type Mounts = BTreeMap<u64, (u64, String, String, String)>;

    fn mount_of(
        attributes: &HashMap<String, zbus::OwnedVariant>,
    ) -> (u64, (u64, String, String, String)) {
        let text = |key: &str| {
            attributes
                .get(key)
                .and_then(|v| <&str>::try_from(&**v).ok())
                .unwrap_or_else(|| panic!("attribute {key} missing or not a string"))
                .to_owned()
        };
        let number = |key: &str| match attributes.get(key).map(|v| &**v) {
            Some(Variant::U64(n)) => *n,
            Some(Variant::U32(n)) => u64::from(*n),
            other => panic!("attribute {key} is {other:?}"),
        };
        (
            number("mount-id"),
            (
                number("mountinfo-id"),
                text("mount-point"),
                text("fs-type"),
                text("options"),
            ),
        )
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

    fn view(mounts: &Mounts) -> Vec<(u64, String, String, String)> {
        let mut view: Vec<_> = mounts.values().cloned().collect();
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
        let manager = ManagerProxy::new(&sub.conn).await.expect("manager proxy");
        let sources = manager.sources().await.expect("Sources");
        let mounts = sources
            .iter()
            .find(|s| s.name == "mounts")
            .unwrap_or_else(|| panic!("no mounts source in {sources:?}"));
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
            ns.mountinfo(),
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
        for signal in &sub.received {
            if let Signal::Mount {
                seq,
                change,
                mount_id,
                attributes,
                ..
            } = signal
            {
                if *seq <= seq0 {
                    continue;
                }
                if change == "detach" {
                    cache.remove(mount_id);
                } else {
                    cache.insert(*mount_id, mount_of(attributes).1);
                }
            }
        }
        let (seq1, now) = snapshot(&sub).await;
        assert_eq!(seq1, sub.received.last().map_or(0, Signal::seq));
        assert_eq!(cache, now, "snapshot + events = snapshot");
        assert_eq!(
            view(&now),
            ns.mountinfo(),
            "snapshot = mountinfo at the end"
        );
    }
}
