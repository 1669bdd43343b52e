//! ext4 on a loop device, mounted in a temporary directory of the host's mount namespace
//! (the daemon resolves watched paths in its own namespace, which is the host's).
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

/// The entry point of client processes: does nothing unless started by [`as_user`].
/// Subscribes, asks for the watch in `WATCHQ_FS_WATCH` (kind and path) and prints the
/// outcome as `@@ ok` or `@@ <error name>`.
pub fn client_process() {
    let Ok(address) = std::env::var(CLIENT_ENV) else {
        return;
    };
    let request = std::env::var("WATCHQ_FS_WATCH").expect("WATCHQ_FS_WATCH");
    let mut words = request.split(' ');
    let (kind, path) = (words.next().expect("kind"), words.next().expect("path"));
    let percent: Option<u32> = words.next().map(|p| p.parse().expect("low-percent"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let outcome = runtime.block_on(async {
        let conn = watchqd::client::connect(Some(&address))
            .await
            .expect("client connect");
        let watcher = super::Subscriber::on(conn, Default::default()).await;
        let mut spec: std::collections::HashMap<&str, Variant<'_>> =
            [("path", Variant::from(path))].into_iter().collect();
        if let Some(percent) = percent {
            spec.insert("low-percent", Variant::from(percent));
        }
        match watcher.proxy.add_watch(kind, 1, spec).await {
            Ok(()) => "ok".to_owned(),
            Err(zbus::Error::MethodError(name, message, _)) => {
                format!("{name} {}", message.unwrap_or_default())
            }
            Err(e) => format!("error {e}"),
        }
    });
    println!("@@ {outcome}");
}

/// Runs this test binary's `client_process` as `user` with `request` (\"KIND PATH
/// [LOW-PERCENT]\"); returns what it printed after `@@ `.
pub fn as_user(daemon: &super::Daemon, user: &super::polkit::User, request: &str) -> String {
    let out = Command::new(std::env::current_exe().expect("test binary"))
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
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("client process");
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .find_map(|l| l.split_once("@@ ").map(|(_, a)| a.to_owned()))
        .unwrap_or_else(|| {
            panic!(
                "the client printed no outcome; stdout:\n{stdout}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
}
