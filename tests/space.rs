//! Space warnings on ext4 over a loop device, filled and freed for real, through a real
//! bus; the caller's own credentials decide which paths it may watch (real polkitd,
//! real test users).

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use common::ext4::Ext4;
use common::*;
use zbus::Variant;

fn fanotify_fds(daemon: &Daemon) -> usize {
    fs::read_dir(format!("/proc/{}/fd", daemon.pid()))
        .expect("daemon fds")
        .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .filter(|t| t.to_str() == Some("anon_inode:[fanotify]"))
        .count()
}

/// Context switches of every daemon thread: each wakeup of a sleeping thread counts.
fn daemon_switches(daemon: &Daemon) -> u64 {
    fs::read_dir(format!("/proc/{}/task", daemon.pid()))
        .expect("daemon tasks")
        .filter_map(|t| fs::read_to_string(t.ok()?.path().join("status")).ok())
        .flat_map(|status| {
            status
                .lines()
                .filter(|l| l.contains("ctxt_switches"))
                .filter_map(|l| l.split_whitespace().last()?.parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}

fn available(path: &std::path::Path) -> (u64, u64) {
    let stat = nix::sys::statvfs::statvfs(path).expect("statvfs");
    let unit = stat.fragment_size();
    (stat.blocks_available() * unit, stat.blocks() * unit)
}

fn warnings(signals: &[Signal]) -> Vec<(String, String)> {
    signals
        .iter()
        .filter_map(|s| match s {
            Signal::SpaceWarning { level, state, .. } => Some((level.clone(), state.clone())),
            _ => None,
        })
        .collect()
}

fn pair(level: &str, state: &str) -> (String, String) {
    (level.to_owned(), state.to_owned())
}

/// Writes `chunk` until `done` holds or the filesystem is full; returns the number of
/// chunks written.
fn fill(file: &mut fs::File, chunk: &[u8], mut done: impl FnMut() -> bool) -> usize {
    let mut n = 0;
    while !done() {
        match file.write_all(chunk).and_then(|()| file.sync_data()) {
            Ok(()) => n += 1,
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => break,
            Err(e) => panic!("write: {e}"),
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filling_crosses_each_level_once_and_freeing_clears_each_once() {
    let daemon = Daemon::start();
    // No root reserve: the test (root) fills what users could use.
    let fs = Ext4::new(32, &["-m", "0"], "");
    let mut watcher = Subscriber::new(&daemon).await;
    assert_eq!(fanotify_fds(&daemon), 0);
    // What the daemon does on its own when idle, for comparison.
    let before = daemon_switches(&daemon);
    std::thread::sleep(Duration::from_secs(2));
    let baseline = daemon_switches(&daemon) - before;
    watcher
        .watch(
            "space",
            5,
            &[
                ("path", Variant::from(fs.path_str().as_str())),
                ("low-percent", Variant::from(50u32)),
            ],
        )
        .await;
    assert_eq!(fanotify_fds(&daemon), 1, "one fanotify group while watched");
    // A healthy filesystem: nothing on the first look.
    assert!(watcher.next(Duration::from_millis(400)).await.is_none());

    // Idle: nothing writes, nothing wakes the daemon.
    let before = daemon_switches(&daemon);
    std::thread::sleep(Duration::from_secs(2));
    let idle = daemon_switches(&daemon) - before;
    eprintln!("daemon context switches in 2 s idle: {baseline} before the watch, {idle} with it");
    // A timer per interval would add 4 in 2 s.
    assert!(
        idle <= baseline + 2,
        "the daemon woke {idle} times in 2 s with nothing written ({baseline} without a watch)"
    );

    let path = fs.path().to_owned();
    let mut file = fs::File::create(path.join("fill")).unwrap();
    let chunk = vec![0xa5u8; 256 << 10];
    let before = daemon_switches(&daemon);
    let started = Instant::now();
    let written = fill(&mut file, &chunk, || {
        let (avail, total) = available(&path);
        avail * 100 < total * 30
    });
    let busy = daemon_switches(&daemon) - before;
    let busy_for = started.elapsed();
    eprintln!(
        "filling {written} x 256 KiB with fsync in {busy_for:?}: {busy} daemon context switches"
    );
    watcher
        .until("the low warning", |s| !warnings(s).is_empty())
        .await;
    assert_eq!(warnings(&watcher.received), vec![pair("low", "crossed")]);
    match &watcher.received[0] {
        Signal::SpaceWarning {
            tag,
            path: got_path,
            mount_point,
            available_bytes,
            total_bytes,
            threshold_bytes,
            ..
        } => {
            assert_eq!(*tag, 5);
            assert_eq!(got_path, &fs.path_str());
            assert_eq!(mount_point, &fs.path_str());
            assert_eq!(*threshold_bytes, total_bytes / 2);
            assert!(available_bytes < threshold_bytes);
        }
        other => panic!("{other:?}"),
    }

    // Until the filesystem is full: no second low warning, one full warning.
    fill(&mut file, &chunk, || false);
    watcher
        .until("the full warning", |s| warnings(s).len() >= 2)
        .await;
    assert_eq!(
        warnings(&watcher.received),
        vec![pair("low", "crossed"), pair("full", "crossed")]
    );

    // Freeing clears both, once each.
    drop(file);
    fs::remove_file(path.join("fill")).unwrap();
    watcher
        .until("both cleared", |s| warnings(s).len() >= 4)
        .await;
    let mut cleared = warnings(&watcher.received)[2..].to_vec();
    cleared.sort();
    assert_eq!(
        cleared,
        vec![pair("full", "cleared"), pair("low", "cleared")]
    );
    // Writing a little more (well above the threshold) says nothing.
    fs::write(path.join("small"), vec![1u8; 1 << 20]).unwrap();
    assert!(watcher.next(Duration::from_millis(1500)).await.is_none());
    assert_eq!(warnings(&watcher.received).len(), 4);
    assert_contiguous(&watcher.received);

    // Unwatched: the group is closed.
    watcher.proxy.remove_watch(5).await.expect("RemoveWatch");
    let deadline = Instant::now() + TIMEOUT;
    while fanotify_fds(&daemon) != 0 {
        assert!(Instant::now() < deadline, "fanotify group still open");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A filesystem already low when the watch is set is reported as crossed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filesystem_already_low_is_reported_when_watched() {
    let daemon = Daemon::start();
    let fs = Ext4::new(16, &["-m", "0"], "");
    let (avail, _) = available(fs.path());
    let mut watcher = Subscriber::new(&daemon).await;
    watcher
        .watch(
            "space",
            1,
            &[
                ("path", Variant::from(fs.path_str().as_str())),
                ("low-bytes", Variant::from(avail + (1 << 20))),
            ],
        )
        .await;
    watcher
        .until("the initial low warning", |s| !warnings(s).is_empty())
        .await;
    assert!(watcher.next(Duration::from_millis(700)).await.is_none());
    assert_eq!(warnings(&watcher.received), vec![pair("low", "crossed")]);
}

#[test]
fn client_process() {
    common::ext4::client_process();
}

/// A user may watch space only where it can reach with its own credentials; polkit
/// allows the action to every local user.
#[test]
fn users_watch_only_paths_they_can_reach() {
    let daemon = Daemon::with_polkit("");
    let fs = Ext4::new(16, &[], "");
    let private = fs.path().join("private");
    fs::create_dir(&private).unwrap();
    fs::set_permissions(&private, fs::Permissions::from_mode(0o700)).unwrap();
    fs::create_dir(private.join("inside")).unwrap();
    let open = fs.path().join("open");
    fs::create_dir(&open).unwrap();
    let alice = common::polkit::user("watchq-alice");
    let ask = |path: &std::path::Path| {
        common::ext4::as_user(&daemon, &alice, &format!("space {} 10", path.display()))
    };
    let denied = ask(&private.join("inside"));
    assert!(
        denied.starts_with("org.watchq1.Error.AccessDenied"),
        "{denied}"
    );
    assert_eq!(ask(&open), "ok");
    let missing = ask(&fs.path().join("missing"));
    assert!(
        missing.starts_with("org.watchq1.Error.NotFound"),
        "{missing}"
    );
    // Root reaches everything.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let watcher = Subscriber::new(&daemon).await;
        watcher
            .watch(
                "space",
                1,
                &[
                    (
                        "path",
                        Variant::from(private.join("inside").to_str().unwrap()),
                    ),
                    ("low-percent", Variant::from(10u32)),
                ],
            )
            .await;
    });
}

/// Two users watch the same filesystem with their own thresholds: each receives its own
/// warning, once, and nothing of the other's.
#[test]
fn each_user_receives_its_own_warnings_only() {
    let daemon = Daemon::with_polkit("");
    let fs = Ext4::new(32, &["-m", "0"], "");
    let shared = fs.path().join("shared");
    fs::create_dir(&shared).unwrap();
    fs::set_permissions(&shared, fs::Permissions::from_mode(0o777)).unwrap();
    let (alice, bob) = (
        common::polkit::user("watchq-alice"),
        common::polkit::user("watchq-bob"),
    );
    let request = |percent: u32| format!("space {} {percent}", shared.display());
    // Each expects one warning, then proves over 8 s that no second one came.
    let mut a = common::ext4::spawn_as_user(&daemon, &alice, &request(50), 2, 8000);
    let mut b = common::ext4::spawn_as_user(&daemon, &bob, &request(60), 2, 8000);
    assert_eq!(a.next_line(), "ok");
    assert_eq!(b.next_line(), "ok");
    std::thread::sleep(Duration::from_millis(300));
    let path = fs.path().to_owned();
    let mut file = fs::File::create(path.join("fill")).unwrap();
    fill(&mut file, &vec![7u8; 256 << 10], || {
        let (avail, total) = available(&path);
        avail * 100 < total * 30
    });
    let (_, total) = available(&path);
    let a_line = a.next_line();
    let b_line = b.next_line();
    assert!(
        a_line.starts_with("SpaceWarning 1 low crossed "),
        "{a_line}"
    );
    assert!(
        b_line.starts_with("SpaceWarning 1 low crossed "),
        "{b_line}"
    );
    let threshold = |line: &str| -> u64 { line.rsplit(' ').next().unwrap().parse().unwrap() };
    assert_eq!(threshold(&a_line), total / 2, "alice's own threshold");
    assert_eq!(threshold(&b_line), total * 60 / 100, "bob's own threshold");
    assert_eq!(a.next_line(), "timeout", "alice received a second signal");
    assert_eq!(b.next_line(), "timeout", "bob received a second signal");
}

/// `watchqctl monitor` with no source named watches every source it may, leaving out
/// the ones that need options (filesystems, space); with options, space is watched and
/// its numeric options are sent as numbers.
#[test]
fn watchqctl_monitor_leaves_out_sources_that_need_options() {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    let daemon = Daemon::with_polkit("");
    let first_line = |command: &mut std::process::Command| {
        let mut child = command
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("watchqctl");
        let mut line = String::new();
        std::io::BufReader::new(child.stderr.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let _ = child.kill();
        let _ = child.wait();
        line
    };
    let watchqctl = env!("CARGO_BIN_EXE_watchqctl");
    let line = first_line(
        std::process::Command::new(watchqctl)
            .args(["--address", daemon.address(), "monitor"])
            .uid(65534)
            .gid(65534),
    );
    assert!(line.starts_with("watching devices"), "{line}");
    assert!(
        line.contains("need --match options: filesystems, space"),
        "{line}"
    );
    let fs = Ext4::new(16, &[], "");
    let line = first_line(std::process::Command::new(watchqctl).args([
        "--address",
        daemon.address(),
        "monitor",
        "--match",
        &format!("path={}", fs.path_str()),
        "--match",
        "low-percent=10",
        "space",
    ]));
    assert!(line.starts_with("watching space "), "{line}");
}

/// A subscriber in a mount namespace of its own, where a tmpfs is mounted on a
/// directory that in the daemon's namespace lies on another filesystem: its space
/// watch (as a test user, so the lookup also runs with its credentials) watches its
/// tmpfs, and filling that tmpfs warns it.
#[test]
fn a_path_is_watched_as_the_caller_sees_it_in_its_mount_namespace() {
    use common::ext4::NamespacedMonitor;
    use std::os::unix::fs::MetadataExt;
    let daemon = Daemon::with_polkit("");
    let alice = common::polkit::user("watchq-alice");
    let dir = tempfile::Builder::new()
        .prefix("watchq-ns-")
        .tempdir()
        .unwrap();
    let dir_str = dir.path().display().to_string();
    let monitor = NamespacedMonitor::spawn(
        &daemon,
        &format!("mount -t tmpfs -o size=8m,mode=1777 watchq-ns-tmpfs '{dir_str}'"),
        Some((alice.uid, alice.gid)),
        &[
            "--match",
            &format!("path={dir_str}"),
            "--match",
            &format!("low-bytes={}", 4 << 20),
            "space",
        ],
    );
    let inside = monitor.inside(dir.path());
    // Two filesystems under one path: the daemon's and the subscriber's.
    let ours = fs::metadata(dir.path()).unwrap().dev();
    let theirs = fs::metadata(&inside).unwrap().dev();
    assert_ne!(
        ours, theirs,
        "the subscriber's tmpfs is not in our namespace"
    );
    let daemon_mounts = fs::read_to_string(format!("/proc/{}/mountinfo", daemon.pid())).unwrap();
    assert!(
        !daemon_mounts.contains("watchq-ns-tmpfs"),
        "the subscriber's tmpfs leaked into the daemon's namespace"
    );
    let (avail_ours, _) = available(dir.path());
    assert!(
        avail_ours >= 64 << 20,
        "the daemon's filesystem under {dir_str} must not be low itself"
    );
    // Nothing on the first look: the tmpfs is empty.
    assert!(monitor.next(Duration::from_millis(500)).is_none());

    let mut file = fs::File::create(inside.join("fill")).unwrap();
    fill(&mut file, &vec![3u8; 256 << 10], || {
        available(&inside).0 < 3 << 20
    });
    let warning = monitor
        .next(TIMEOUT)
        .expect("a low warning for the subscriber's tmpfs");
    assert_eq!(warning["signal"], "SpaceWarning", "{warning}");
    assert_eq!(warning["level"], "low", "{warning}");
    assert_eq!(warning["state"], "crossed", "{warning}");
    assert_eq!(warning["path"], dir_str.as_str(), "{warning}");
    // The mount point as the subscriber sees it; the tmpfs by its mount source.
    assert_eq!(warning["mount_point"], dir_str.as_str(), "{warning}");
    let (_, total) = available(&inside);
    assert_eq!(warning["total_bytes"], total, "{warning}");
    assert_eq!(warning["attributes"]["fs-type"], "tmpfs", "{warning}");
    assert_eq!(
        warning["attributes"]["device"], "watchq-ns-tmpfs",
        "{warning}"
    );
    drop(file);
}

/// A caller whose path does not exist in its own namespace is told so, even when the
/// path exists in the daemon's. (A caller the bus names no process of is refused by
/// type: see the unit tests of `sys::resolve`.)
#[test]
fn a_path_missing_in_the_callers_namespace_is_not_found_there() {
    use common::ext4::NamespacedMonitor;
    let daemon = Daemon::start();
    let dir = tempfile::Builder::new()
        .prefix("watchq-ns-")
        .tempdir()
        .unwrap();
    let dir_str = dir.path().display().to_string();
    // Hidden in the subscriber's namespace under an empty tmpfs: the daemon sees it.
    fs::create_dir(dir.path().join("only-outside")).unwrap();
    let setup = format!("mount -t tmpfs watchq-ns-tmpfs '{dir_str}'");
    let script_args = [
        "--match".to_owned(),
        format!("path={dir_str}/only-outside"),
        "--match".to_owned(),
        "low-percent=50".to_owned(),
        "space".to_owned(),
    ];
    let args: Vec<&str> = script_args.iter().map(String::as_str).collect();
    let message = match NamespacedMonitor::try_spawn(&daemon, &setup, None, &args) {
        Ok(_) => panic!("the watch of a path missing in the caller's namespace was accepted"),
        Err(message) => message,
    };
    assert!(message.contains("org.watchq1.Error.NotFound"), "{message}");
}
