//! For the mounts tests (host and guest): private mount namespaces — a process alone in
//! its own namespace (`unshare -m --propagation private sleep`) and shell commands run in
//! it (`nsenter -m`), both from util-linux — and mounts as a client keeps them from a
//! snapshot and the events after it.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use watchqd::source::mounts::wire::{parse_mountinfo, MountinfoLine};
use zbus::Variant;

use super::{Signal, TIMEOUT};

/// A process alone in a private mount namespace (`unshare -m --propagation private`),
/// killed on drop.
pub struct Namespace {
    child: Child,
    /// Mount points live below here; the directory exists on the host, mounts on it only
    /// in the namespace.
    pub dir: tempfile::TempDir,
}

impl Namespace {
    pub fn start() -> Namespace {
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
        // unshare(1) execs sleep in the same process once the namespace exists.
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

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `name` below [`Self::dir`], not created.
    pub fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// The directory `name` below [`Self::dir`], created.
    pub fn mkdir(&self, name: &str) -> String {
        let path = self.dir.path().join(name);
        fs::create_dir_all(&path).expect("mkdir");
        path.display().to_string()
    }

    /// Runs a shell script inside the namespace; it must succeed.
    pub fn run(&self, script: &str) {
        run_in(self.pid(), script);
    }

    /// The namespace's `/proc/PID/mountinfo`, parsed.
    pub fn mountinfo(&self) -> Vec<MountinfoLine> {
        let text =
            fs::read_to_string(format!("/proc/{}/mountinfo", self.pid())).expect("mountinfo");
        parse_mountinfo(&text).expect("parse mountinfo")
    }

    /// Ends the namespace (and with it its mounts).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs the shell script `script` (`sh -ec`) in the mount namespace of process `pid`; it
/// must succeed.
pub fn run_in(pid: u32, script: &str) {
    let out = Command::new("nsenter")
        .args(["-t", &pid.to_string(), "-m", "sh", "-ec", script])
        .output()
        .expect("nsenter(1) must be installed (util-linux)");
    assert!(
        out.status.success(),
        "in the namespace: {script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A mount as a snapshot or an event describes it: what a client keeps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    pub mountinfo_id: u64,
    pub mount_point: String,
    pub fs_type: String,
    pub options: String,
}

/// (unique mount id, the mount) from a snapshot object's or an event's attributes.
pub fn mount_of(attributes: &HashMap<String, zbus::OwnedVariant>) -> (u64, Mount) {
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
        Mount {
            mountinfo_id: number("mountinfo-id"),
            mount_point: text("mount-point"),
            fs_type: text("fs-type"),
            options: text("options"),
        },
    )
}

/// Applies the mount events after sequence number `after` to a snapshot, as a client would.
pub fn apply(mounts: &mut BTreeMap<u64, Mount>, signals: &[Signal], after: u64) {
    for signal in signals {
        let Signal::Mount {
            seq,
            change,
            mount_id,
            attributes,
            ..
        } = signal
        else {
            continue;
        };
        if *seq <= after {
            continue;
        }
        if change == "detach" {
            mounts.remove(mount_id);
        } else {
            mounts.insert(*mount_id, mount_of(attributes).1);
        }
    }
}

/// `watchqctl monitor --json mounts` as `user` (its uid and gid, no other groups), started
/// behind `enter` (a command that puts it in the mount namespace to watch, ending in the
/// program it runs: `unshare -m …` for one of its own, `nsenter -t PID -m` for another
/// process's), once it says it watches. Its stdout is piped.
pub fn monitor_as(daemon: &super::Daemon, user: &super::polkit::User, enter: &[&str]) -> Child {
    let (monitor, first) = start_monitor_as(daemon, user, enter);
    assert!(first.starts_with("watching"), "as {}: {first}", user.name);
    monitor
}

/// [`monitor_as`] that does not judge: the monitor and the first line of its standard
/// error (`watching ...`, or why it could not watch).
pub fn start_monitor_as(
    daemon: &super::Daemon,
    user: &super::polkit::User,
    enter: &[&str],
) -> (Child, String) {
    let (program, args) = enter
        .split_first()
        .expect("a command to enter the namespace");
    let mut monitor = Command::new(program)
        .args(args)
        .arg("setpriv")
        .arg(format!("--reuid={}", user.uid))
        .arg(format!("--regid={}", user.gid))
        .args(["--clear-groups", env!("CARGO_BIN_EXE_watchqctl")])
        .args(["--address", daemon.address()])
        .args(["monitor", "--json", "--queue-depth", "16384", "mounts"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("watchqctl");
    let stderr = super::lines::lines(monitor.stderr.take().expect("stderr"));
    let first = stderr
        .recv_timeout(TIMEOUT)
        .expect("watchqctl's first line");
    (monitor, first)
}
