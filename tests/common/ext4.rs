//! ext4 on a loop device, mounted in a temporary directory of the host's mount namespace
//! (the daemon resolves watched paths in the caller's namespace, which here is the host's).
//! Unmounted and detached on drop, even when the test failed.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use zbus::Variant;

use super::{run, LoopDevice};

pub struct Ext4 {
    pub disk: LoopDevice,
    pub dir: tempfile::TempDir,
    mounted: std::cell::Cell<bool>,
}

impl Ext4 {
    /// `size_mib` of ext4 made with `mkfs_options` and mounted with `mount_options`.
    pub fn new(size_mib: u64, mkfs_options: &[&str], mount_options: &str) -> Ext4 {
        let disk = LoopDevice::attach(size_mib);
        let mut args = vec!["-q", "-F"];
        args.extend_from_slice(mkfs_options);
        args.push(&disk.device);
        run("mkfs.ext4", &args);
        let dir = tempfile::Builder::new()
            .prefix("watchq-ext4-")
            .tempdir()
            .expect("mount point");
        let ext4 = Ext4 {
            disk,
            dir,
            mounted: std::cell::Cell::new(false),
        };
        ext4.mount(mount_options);
        ext4
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn path_str(&self) -> String {
        self.path().display().to_string()
    }

    pub fn mount(&self, options: &str) {
        let mut args = vec!["-t", "ext4"];
        if !options.is_empty() {
            args.extend(["-o", options]);
        }
        let target = self.path_str();
        args.extend([self.disk.device.as_str(), target.as_str()]);
        run("mount", &args);
        self.mounted.set(true);
    }

    pub fn umount(&self) {
        if self.mounted.replace(false) {
            run("umount", &[&self.path_str()]);
        }
    }

    /// The kernel's ext4 directory for this filesystem (`/sys/fs/ext4/loopN`).
    pub fn sysfs(&self) -> PathBuf {
        PathBuf::from(format!("/sys/fs/ext4/{}", self.disk.name))
    }

    /// A real ext4 error without an inode: ext4_error() with EFSCORRUPTED.
    pub fn trigger_error(&self, message: &str) {
        fs::write(self.sysfs().join("trigger_fs_error"), message)
            .expect("write /sys/fs/ext4/N/trigger_fs_error");
    }

    /// `(major, minor)` of the loop device.
    pub fn dev(&self) -> (u32, u32) {
        let rdev = fs::metadata(&self.disk.device).expect("stat").rdev();
        (
            u32::try_from(nix::sys::stat::major(rdev)).unwrap(),
            u32::try_from(nix::sys::stat::minor(rdev)).unwrap(),
        )
    }
}

impl Drop for Ext4 {
    fn drop(&mut self) {
        if self.mounted.get() {
            let path = self.path_str();
            let ok = Command::new("umount")
                .arg(&path)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                let _ = Command::new("umount").args(["-l", &path]).status();
            }
        }
    }
}

// -------------------------------------------------------------------------------------
// A caller that is not root: the test binary run again as a test user.

const CLIENT_ENV: &str = "WATCHQ_FS_CLIENT";

/// The entry point of client processes: does nothing unless started by
/// [`spawn_as_user`]. Subscribes, asks for the watch in `WATCHQ_FS_WATCH` (`KIND PATH
/// [LOW-PERCENT]`) and prints the outcome as `@@ ok` or `@@ <error name> <message>`;
/// then, if `WATCHQ_FS_SIGNALS` is N, prints the first N signals it receives as
/// `@@ <member> <tag> ...` (or `@@ timeout` after `WATCHQ_FS_WAIT_MS`).
pub fn client_process() {
    let Ok(address) = std::env::var(CLIENT_ENV) else {
        return;
    };
    let request = std::env::var("WATCHQ_FS_WATCH").expect("WATCHQ_FS_WATCH");
    let wanted: usize = std::env::var("WATCHQ_FS_SIGNALS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    // How long to wait for each signal; a short wait proves that nothing more came.
    let wait = std::env::var("WATCHQ_FS_WAIT_MS")
        .ok()
        .and_then(|n| n.parse().ok())
        .map_or(super::TIMEOUT, std::time::Duration::from_millis);
    let mut words = request.split(' ');
    let (kind, path) = (words.next().expect("kind"), words.next().expect("path"));
    let percent: Option<u32> = words.next().map(|p| p.parse().expect("low-percent"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let conn = watchqd::client::connect(Some(&address))
            .await
            .expect("client connect");
        let mut watcher = super::Subscriber::on(conn, Default::default()).await;
        let mut spec: std::collections::HashMap<&str, Variant<'_>> =
            [("path", Variant::from(path))].into_iter().collect();
        if let Some(percent) = percent {
            spec.insert("low-percent", Variant::from(percent));
        }
        let outcome = match watcher.proxy.add_watch(kind, 1, spec).await {
            Ok(()) => "ok".to_owned(),
            Err(zbus::Error::MethodError(name, message, _)) => {
                format!("{name} {}", message.unwrap_or_default())
            }
            Err(e) => format!("error {e}"),
        };
        println!("@@ {outcome}");
        for _ in 0..wanted {
            let line = match watcher.next(wait).await {
                Some(super::Signal::SpaceWarning {
                    tag,
                    level,
                    state,
                    threshold_bytes,
                    ..
                }) => format!("SpaceWarning {tag} {level} {state} {threshold_bytes}"),
                Some(super::Signal::FilesystemError { tag, kind, .. }) => {
                    format!("FilesystemError {tag} {kind}")
                }
                Some(other) => format!("{other:?}"),
                None => "timeout".to_owned(),
            };
            println!("@@ {line}");
        }
    });
}

/// A client process running as a test user.
pub struct UserClient {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl UserClient {
    /// The next `@@` line, failing after [`super::TIMEOUT`].
    pub fn next_line(&mut self) -> String {
        self.lines
            .recv_timeout(super::TIMEOUT)
            .unwrap_or_else(|_| panic!("the client printed nothing more"))
    }
}

impl Drop for UserClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts this test binary's `client_process` as `user` with `request`, to print its
/// outcome and then `signals` signals, waiting at most `wait_ms` for each.
pub fn spawn_as_user(
    daemon: &super::Daemon,
    user: &super::polkit::User,
    request: &str,
    signals: usize,
    wait_ms: u64,
) -> UserClient {
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "client_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .uid(user.uid)
        .gid(user.gid)
        .env(CLIENT_ENV, daemon.address())
        .env("WATCHQ_FS_WATCH", request)
        .env("WATCHQ_FS_SIGNALS", signals.to_string())
        .env("WATCHQ_FS_WAIT_MS", wait_ms.to_string())
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("client process");
    let lines = super::lines::answers(child.stdout.take().expect("client stdout"));
    UserClient { child, lines }
}

/// The outcome of one watch request by `user` (`ok` or the error name and message).
pub fn as_user(daemon: &super::Daemon, user: &super::polkit::User, request: &str) -> String {
    spawn_as_user(daemon, user, request, 0, 0).next_line()
}

/// `watchqctl monitor --json` run in a private mount namespace of its own (`unshare -m`,
/// private propagation) after `setup` (shell commands) mounted what it watches there:
/// a subscriber whose paths mean something else in the daemon's namespace.
pub struct NamespacedMonitor {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl NamespacedMonitor {
    /// `as_user`: `uid:gid` to run watchqctl as, after the mounts (root otherwise).
    pub fn spawn(
        daemon: &super::Daemon,
        setup: &str,
        as_user: Option<(u32, u32)>,
        monitor_args: &[&str],
    ) -> NamespacedMonitor {
        Self::try_spawn(daemon, setup, as_user, monitor_args).unwrap_or_else(|e| {
            panic!("watchqctl in a private mount namespace did not start watching: {e}")
        })
    }

    /// As [`Self::spawn`]; Err: what watchqctl said instead of starting to watch.
    pub fn try_spawn(
        daemon: &super::Daemon,
        setup: &str,
        as_user: Option<(u32, u32)>,
        monitor_args: &[&str],
    ) -> Result<NamespacedMonitor, String> {
        use std::io::BufRead;
        let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
        let mut command = vec![quote(env!("CARGO_BIN_EXE_watchqctl"))];
        command.extend(["--address", daemon.address(), "monitor", "--json"].map(quote));
        command.extend(monitor_args.iter().map(|a| quote(a)));
        let user = match as_user {
            Some((uid, gid)) => {
                format!("setpriv --reuid={uid} --regid={gid} --init-groups ")
            }
            None => String::new(),
        };
        let script = format!("set -e; {setup}; exec {user}{}", command.join(" "));
        let mut child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("unshare (util-linux)");
        let mut stderr = std::io::BufReader::new(child.stderr.take().expect("stderr"));
        let mut first = String::new();
        let _ = stderr.read_line(&mut first);
        if !first.starts_with("watching ") {
            let _ = child.kill();
            let _ = child.wait();
            return Err(first);
        }
        let lines = super::lines::lines(child.stdout.take().expect("stdout"));
        Ok(NamespacedMonitor { child, lines })
    }

    /// The monitor's pid: its `/proc/PID/root` shows its namespace's mounts.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `path` (absolute) as the monitor sees it, reached from this namespace.
    pub fn inside(&self, path: &Path) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root", self.pid()))
            .join(path.strip_prefix("/").expect("absolute path"))
    }

    /// The next signal printed, as JSON, or None after `timeout`.
    pub fn next(&self, timeout: std::time::Duration) -> Option<serde_json::Value> {
        let line = self.lines.recv_timeout(timeout).ok()?;
        Some(serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}")))
    }
}

impl Drop for NamespacedMonitor {
    fn drop(&mut self) {
        // The namespace, and with it its mounts, ends with the process.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
