//! Filesystem errors from fanotify's FAN_FS_ERROR, caused for real on ext4 over a loop
//! device (the kernel's own trigger_fs_error, and real I/O errors from a backing file
//! that shrank under the filesystem), through a real bus and, for the policy case, a
//! real polkitd.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use common::ext4::Ext4;
use common::*;
use zbus::Variant;

/// The daemon's fanotify groups.
fn fanotify_fds(daemon: &Daemon) -> usize {
    fs::read_dir(format!("/proc/{}/fd", daemon.pid()))
        .expect("daemon fds")
        .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .filter(|t| t.to_str() == Some("anon_inode:[fanotify]"))
        .count()
}

fn fs_errors(signals: &[Signal]) -> Vec<&Signal> {
    signals
        .iter()
        .filter(|s| matches!(s, Signal::FilesystemError { .. }))
        .collect()
}

fn errors_of_kind<'a>(signals: &'a [Signal], wanted: &str) -> Vec<&'a Signal> {
    signals
        .iter()
        .filter(|s| matches!(s, Signal::FilesystemError { kind, .. } if kind == wanted))
        .collect()
}

fn total_count(signals: &[&Signal], errno_wanted: i32) -> u64 {
    signals
        .iter()
        .map(|s| match s {
            Signal::FilesystemError {
                errno, error_count, ..
            } if *errno == errno_wanted => u64::from(*error_count),
            _ => 0,
        })
        .sum()
}

/// Waits until the daemon's fanotify fd count is `want` (a stopped source's pump ends
/// asynchronously after the watch went).
fn wait_fanotify_fds(daemon: &Daemon, want: usize, what: &str) {
    let deadline = Instant::now() + TIMEOUT;
    while fanotify_fds(daemon) != want {
        assert!(
            Instant::now() < deadline,
            "{what}: the daemon has {} fanotify fds, expected {want}",
            fanotify_fds(daemon)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A 64 MiB ext4 with 1 KiB blocks (8 groups of 8 MiB), every group's inode table in
/// its own group and no journal, so that cutting the backing file to 8 MiB makes the
/// inode tables of groups 1–7 unreadable while the superblock and group descriptors
/// stay. No background work reads the lost groups (no lazy init, no bitmap prefetch).
fn ext4_for_io_errors() -> Ext4 {
    Ext4::new(
        64,
        &[
            "-b",
            "1024",
            "-O",
            "^flex_bg,^has_journal",
            "-E",
            "lazy_itable_init=0",
        ],
        "errors=continue,noinit_itable,no_prefetch_block_bitmaps",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext4_errors_arrive_typed_with_errno_count_and_inode_only_where_watched() {
    let daemon = Daemon::start();
    assert_eq!(
        fanotify_fds(&daemon),
        0,
        "no fanotify group before anyone watches"
    );

    let fs = ext4_for_io_errors();
    // Directories spread over the groups (Orlov); one in a group past 8 MiB.
    let inodes_per_group = 2048;
    let mut victim = None;
    for i in 0..8 {
        let dir = fs.path().join(format!("d{i}"));
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("f"), b"x").unwrap();
        let ino = fs::metadata(&dir).unwrap().ino();
        if ino > inodes_per_group && victim.is_none() {
            victim = Some((dir, ino));
        }
    }
    let (victim, victim_ino) = victim.expect("a directory outside group 0");
    // Cut the backing file under the filesystem, and mount it again so that nothing of
    // the lost groups is cached.
    fs.umount();
    fs::OpenOptions::new()
        .write(true)
        .open(&fs.disk.backing)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    fs.mount("errors=continue,noinit_itable,no_prefetch_block_bitmaps");
    let (major, minor) = fs.dev();

    let mut watcher = Subscriber::new(&daemon).await;
    let mut bystander = Subscriber::new(&daemon).await;
    bystander
        .watch(
            "devices",
            1,
            &[("name", Variant::from(fs.disk.name.as_str()))],
        )
        .await;
    watcher
        .watch(
            "filesystems",
            7,
            &[("path", Variant::from(fs.path_str().as_str()))],
        )
        .await;
    assert_eq!(fanotify_fds(&daemon), 1, "one fanotify group while watched");

    // 1. The kernel's own trigger: ext4_error() without an inode, EFSCORRUPTED (117).
    let sent = Instant::now();
    fs.trigger_error("watchq test");
    let written = sent.elapsed();
    watcher
        .until("the triggered FilesystemError", |s| {
            !fs_errors(s).is_empty()
        })
        .await;
    let latency = sent.elapsed();
    match fs_errors(&watcher.received)[0] {
        Signal::FilesystemError {
            tag,
            kind,
            device,
            major: got_major,
            minor: got_minor,
            fs_type,
            mount_point,
            errno_name,
            errno,
            error_count,
            inode,
            ..
        } => {
            assert_eq!(*tag, 7);
            assert_eq!(kind, "error");
            assert_eq!(device, &fs.disk.name);
            assert_eq!((*got_major, *got_minor), (major, minor));
            assert_eq!(fs_type, "ext4");
            assert_eq!(mount_point, &fs.path_str());
            assert_eq!(errno_name, "EUCLEAN");
            assert_eq!(*errno, 117);
            assert_eq!(*error_count, 1);
            assert_eq!(*inode, 0, "trigger_fs_error names no inode");
        }
        other => panic!("{other:?}"),
    }
    let first = fs_errors(&watcher.received)[0];
    assert_eq!(
        first.attr_str("kernel-errno-name").as_deref(),
        Some("EFSCORRUPTED")
    );
    assert_eq!(first.attr_u64("handle-type"), Some(255));
    assert_eq!(first.attr_u64("inode"), None);
    eprintln!(
        "trigger_fs_error: the write took {written:?}; FilesystemError received after {latency:?}"
    );

    // Three more: however the kernel merges them, the counts add up to three.
    for i in 0..3 {
        fs.trigger_error(&format!("again {i}"));
    }
    watcher
        .until("three more EUCLEAN errors counted", |s| {
            total_count(&fs_errors(s), 117) >= 4
        })
        .await;
    assert_eq!(total_count(&fs_errors(&watcher.received), 117), 4);

    // 2. A real I/O error: looking up a directory whose inode table block is past the
    // end of the backing file. ext4 reports EIO with the inode it could not read.
    let err = fs::metadata(victim.join("f")).expect_err("the inode table is gone");
    assert_eq!(err.raw_os_error(), Some(nix::libc::EIO), "{err}");
    watcher
        .until("the EIO FilesystemError", |s| {
            fs_errors(s)
                .iter()
                .any(|e| matches!(e, Signal::FilesystemError { errno: 5, .. }))
        })
        .await;
    let eio = fs_errors(&watcher.received)
        .into_iter()
        .find(|e| matches!(e, Signal::FilesystemError { errno: 5, .. }))
        .unwrap()
        .clone();
    match &eio {
        Signal::FilesystemError {
            errno_name,
            error_count,
            inode,
            device,
            ..
        } => {
            assert_eq!(errno_name, "EIO");
            assert_eq!(*error_count, 1);
            assert_eq!(*inode, victim_ino, "the inode ext4 could not read");
            assert_eq!(device, &fs.disk.name);
        }
        _ => unreachable!(),
    }
    assert_eq!(eio.attr_u64("inode"), Some(victim_ino));
    assert!(
        fs_errors(&watcher.received).iter().all(
            |e| matches!(e, Signal::FilesystemError { errno: 5 | 117, kind, .. } if kind == "error")
        ),
        "only the errors caused here: {:?}",
        watcher.received
    );
    assert_contiguous(&watcher.received);

    // The bystander watches devices only: no filesystem error reached it.
    bystander.receive_for(Duration::from_millis(300)).await;
    assert!(fs_errors(&bystander.received).is_empty());

    // 3. Unwatched: the group is closed, and errors go nowhere.
    watcher.proxy.remove_watch(7).await.expect("RemoveWatch");
    wait_fanotify_fds(&daemon, 0, "after the last filesystem watch");
    let before = watcher.received.len();
    fs.trigger_error("nobody listens");
    assert!(watcher.next(Duration::from_millis(500)).await.is_none());
    assert_eq!(watcher.received.len(), before);
}

/// A subscriber of its own watching `fs` for filesystem errors under `tag`.
async fn watching(daemon: &Daemon, fs: &Ext4, tag: u64) -> Subscriber {
    let watcher = Subscriber::new(daemon).await;
    watcher
        .watch(
            "filesystems",
            tag,
            &[("path", Variant::from(fs.path_str().as_str()))],
        )
        .await;
    watcher
}

/// ext4 with errors=remount-ro stops writing after an error: the error, then the switch
/// to read-only, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext4_going_read_only_after_an_error_is_reported_once() {
    let daemon = Daemon::start();
    let fs = Ext4::new(16, &[], "errors=remount-ro");
    let mut watcher = watching(&daemon, &fs, 3).await;
    fs.trigger_error("going read-only");
    watcher
        .until("the switch to read-only", |s| {
            !errors_of_kind(s, "read-only").is_empty()
        })
        .await;
    // The filesystem really refuses writes now.
    let err = fs::write(fs.path().join("x"), b"x").expect_err("read-only");
    assert_eq!(err.raw_os_error(), Some(nix::libc::EROFS), "{err}");
    // Nothing more arrives: one error, one switch.
    watcher.receive_for(Duration::from_millis(800)).await;
    let errors = errors_of_kind(&watcher.received, "error");
    let switches = errors_of_kind(&watcher.received, "read-only");
    assert_eq!(errors.len(), 1, "{:?}", watcher.received);
    assert_eq!(switches.len(), 1, "{:?}", watcher.received);
    match switches[0] {
        Signal::FilesystemError {
            tag, errno, device, ..
        } => {
            assert_eq!(*tag, 3);
            assert_eq!(*errno, 117, "the error that caused it");
            assert_eq!(device, &fs.disk.name);
        }
        _ => unreachable!(),
    }
    assert_eq!(switches[0].attr_bool("read-only"), Some(true));
    assert_eq!(switches[0].attr_bool("after-error"), Some(true));
    // Errors come before the switch they caused.
    assert!(errors[0].seq() < switches[0].seq());
}

/// A remount between read-write and read-only (mountinfo POLLPRI) is reported as a
/// read-only switch with no error behind it, each way once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remounting_read_only_and_back_is_reported_each_way() {
    let daemon = Daemon::start();
    let fs = Ext4::new(16, &[], "");
    let mut watcher = watching(&daemon, &fs, 4).await;
    run("mount", &["-o", "remount,ro", &fs.path_str()]);
    watcher
        .until("the switch to read-only", |s| {
            !errors_of_kind(s, "read-only").is_empty()
        })
        .await;
    run("mount", &["-o", "remount,rw", &fs.path_str()]);
    watcher
        .until("the switch back", |s| {
            errors_of_kind(s, "read-only").len() >= 2
        })
        .await;
    assert!(watcher.next(Duration::from_millis(300)).await.is_none());
    let switches = errors_of_kind(&watcher.received, "read-only");
    assert_eq!(switches.len(), 2, "{:?}", watcher.received);
    assert_eq!(switches[0].attr_bool("read-only"), Some(true));
    assert_eq!(switches[1].attr_bool("read-only"), Some(false));
    for switch in &switches {
        assert_eq!(switch.attr_bool("after-error"), Some(false));
        assert!(
            matches!(switch, Signal::FilesystemError { errno: 0, tag: 4, errno_name, .. } if errno_name.is_empty()),
            "{switch:?}"
        );
    }
    assert!(errors_of_kind(&watcher.received, "error").is_empty());
}

/// Unmounting the watched filesystem ends the watch with WatchRemoved, and with it the
/// source's last watch: the group is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmounting_a_watched_filesystem_ends_its_watch() {
    let daemon = Daemon::start();
    let fs = Ext4::new(16, &[], "");
    let mut watcher = watching(&daemon, &fs, 9).await;
    assert_eq!(fanotify_fds(&daemon), 1);
    // An unrelated mount change ends nothing.
    let other = Ext4::new(16, &[], "");
    drop(other);
    fs.umount();
    watcher
        .until("WatchRemoved", |s| {
            s.iter().any(|s| matches!(s, Signal::WatchRemoved { .. }))
        })
        .await;
    match &watcher.received[..] {
        [Signal::WatchRemoved { tag, reason, .. }] => {
            assert_eq!(*tag, 9);
            assert!(reason.starts_with("unmounted"), "{reason}");
            assert!(reason.contains(&fs.disk.name), "{reason}");
        }
        other => panic!("expected exactly one WatchRemoved, got {other:?}"),
    }
    wait_fanotify_fds(&daemon, 0, "after the watched filesystem went");
    assert!(watcher.proxy.watches().await.expect("Watches").is_empty());
}

/// Two watches of one filesystem (through different paths) share its mark: removing
/// one leaves the other receiving, and the first receives nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_of_one_filesystem_share_its_mark() {
    let daemon = Daemon::start();
    let fs = Ext4::new(16, &[], "");
    let sub = fs.path().join("sub");
    fs::create_dir(&sub).unwrap();
    let mut first = Subscriber::new(&daemon).await;
    let mut second = Subscriber::new(&daemon).await;
    first
        .watch(
            "filesystems",
            1,
            &[("path", Variant::from(fs.path_str().as_str()))],
        )
        .await;
    second
        .watch(
            "filesystems",
            2,
            &[("path", Variant::from(sub.to_str().unwrap()))],
        )
        .await;
    assert_eq!(fanotify_fds(&daemon), 1, "one group for every watch");
    fs.trigger_error("both");
    first
        .until("the first watch's error", |s| !fs_errors(s).is_empty())
        .await;
    second
        .until("the second watch's error", |s| !fs_errors(s).is_empty())
        .await;
    first.proxy.remove_watch(1).await.expect("RemoveWatch");
    fs.trigger_error("second only");
    second
        .until("the second error", |s| fs_errors(s).len() >= 2)
        .await;
    assert!(first.next(Duration::from_millis(300)).await.is_none());
    assert_eq!(fs_errors(&first.received).len(), 1);
    for s in fs_errors(&second.received) {
        assert!(
            matches!(s, Signal::FilesystemError { tag: 2, mount_point, .. } if mount_point == &fs.path_str())
        );
    }
    assert_eq!(fanotify_fds(&daemon), 1);
}

/// Bad specs are refused with InvalidArgument or NotFound before anything is armed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_filesystem_watches_are_refused_with_a_reason() {
    let daemon = Daemon::start();
    let watcher = Subscriber::new(&daemon).await;
    let add = |spec: Vec<(&'static str, Variant<'static>)>| {
        let proxy = watcher.proxy.clone();
        async move {
            proxy
                .add_watch("filesystems", 1, spec.into_iter().collect())
                .await
        }
    };
    assert_eq!(
        error_name(add(vec![]).await),
        "org.watchq1.Error.InvalidArgument"
    );
    assert_eq!(
        error_name(add(vec![("path", Variant::from("relative"))]).await),
        "org.watchq1.Error.InvalidArgument"
    );
    assert_eq!(
        error_name(add(vec![("path", Variant::from(7u32))]).await),
        "org.watchq1.Error.InvalidArgument"
    );
    assert_eq!(
        error_name(add(vec![("path", Variant::from("/nonexistent/watchq"))]).await),
        "org.watchq1.Error.NotFound"
    );
    wait_fanotify_fds(&daemon, 0, "after refused watches");
}

// ---------------------------------------------------------------------------------------
// A caller that is not root: this binary run again as a test user.

/// The client side of `common::ext4::as_user`; does nothing in a normal run.
#[test]
fn client_process() {
    common::ext4::client_process();
}

/// A local user without an administrator authorization is refused filesystem errors
/// (polkit: auth_admin, which without an agent is a refusal), and nothing is armed.
#[test]
fn users_without_authorization_are_refused_filesystem_errors() {
    let daemon = Daemon::with_polkit("");
    let fs = Ext4::new(16, &[], "");
    let alice = common::polkit::user("watchq-alice");
    let outcome = common::ext4::as_user(&daemon, &alice, &format!("filesystems {}", fs.path_str()));
    assert!(
        outcome.starts_with("org.watchq1.Error.AccessDenied"),
        "{outcome}"
    );
    assert_eq!(
        fanotify_fds(&daemon),
        0,
        "nothing armed for a refused watch"
    );
}

/// A subscriber (root) in a mount namespace of its own, where an ext4 is mounted on a
/// directory that in the daemon's namespace lies on another filesystem: its watch of
/// that path watches its ext4, named by the mount point it sees, and a real error of
/// that ext4 reaches it.
#[test]
fn a_path_is_watched_as_the_caller_sees_it_in_its_mount_namespace() {
    use common::ext4::NamespacedMonitor;
    let daemon = Daemon::start();
    let disk = LoopDevice::attach(16);
    run("mkfs.ext4", &["-q", "-F", &disk.device]);
    let dir = tempfile::Builder::new()
        .prefix("watchq-ns-")
        .tempdir()
        .unwrap();
    let dir_str = dir.path().display().to_string();
    let monitor = NamespacedMonitor::spawn(
        &daemon,
        &format!("mount -t ext4 '{}' '{dir_str}'", disk.device),
        None,
        &["--match", &format!("path={dir_str}"), "filesystems"],
    );
    let ours = fs::metadata(dir.path()).unwrap().dev();
    let theirs = fs::metadata(monitor.inside(dir.path())).unwrap().dev();
    assert_ne!(
        ours, theirs,
        "the subscriber's ext4 is not in our namespace"
    );
    let daemon_mounts = fs::read_to_string(format!("/proc/{}/mountinfo", daemon.pid())).unwrap();
    assert!(
        !daemon_mounts.contains(&format!(" {} ", disk.device)),
        "the subscriber's ext4 leaked into the daemon's namespace"
    );
    assert_eq!(fanotify_fds(&daemon), 1, "the watch is set");

    fs::write(
        format!("/sys/fs/ext4/{}/trigger_fs_error", disk.name),
        "watchq namespace test",
    )
    .expect("write /sys/fs/ext4/N/trigger_fs_error");
    let error = monitor
        .next(TIMEOUT)
        .expect("an error of the subscriber's ext4");
    assert_eq!(error["signal"], "FilesystemError", "{error}");
    assert_eq!(error["kind"], "error", "{error}");
    assert_eq!(error["device"], disk.name.as_str(), "{error}");
    assert_eq!(error["fs_type"], "ext4", "{error}");
    assert_eq!(error["mount_point"], dir_str.as_str(), "{error}");
    drop(monitor);
    // The namespace ended with the monitor: its ext4 is unmounted once the daemon let
    // go of it too (its watch ends with the subscriber's connection).
    wait_fanotify_fds(&daemon, 0, "after the subscriber left");
}
