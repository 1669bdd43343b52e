//! A real polkitd on the private bus, the project's polkit action file installed where
//! polkitd reads it, and test users created by the set-up.
//!
//! Everything installed on the machine is idempotent and safe under parallel tests:
//! files are replaced atomically and only when their content differs; the JS rules only
//! concern test-only users (`watchq-carol`, `watchq-dave`), so no other test's decisions
//! change; users are created once and reused.

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{repo, TIMEOUT};

pub const ACTIONS_PATH: &str = "/usr/share/polkit-1/actions/org.watchq1.policy";
pub const RULES_PATH: &str = "/etc/polkit-1/rules.d/49-watchq-test-users.rules";

/// polkit rules for test-only users: carol is granted one administrator action, dave is
/// refused one action every local user has by default.
pub const TEST_RULES: &str = r#"// Installed by watchqd's tests; concerns test-only users only.
polkit.addRule(function(action, subject) {
    if (subject.user == "watchq-carol" && action.id == "org.watchq1.watch-block-errors")
        return polkit.Result.YES;
    if (subject.user == "watchq-dave" && action.id == "org.watchq1.watch-devices")
        return polkit.Result.NO;
});
"#;

/// Writes `path` with `content` and `mode` unless it already has that content; atomic.
fn install(path: &str, content: &[u8], mode: u32) {
    if fs::read(path).is_ok_and(|c| c == content) {
        return;
    }
    let tmp = format!("{path}.tmp-{}", std::process::id());
    fs::write(&tmp, content).unwrap_or_else(|e| panic!("write {tmp}: {e}"));
    fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(mode)).expect("chmod");
    fs::rename(&tmp, path).unwrap_or_else(|e| panic!("install {path}: {e}"));
}

/// The action file and the test users' rules, where polkitd reads them.
pub fn install_policy() {
    let actions = fs::read(repo().join("polkit/org.watchq1.policy")).expect("polkit file");
    install(ACTIONS_PATH, &actions, 0o644);
    install(RULES_PATH, TEST_RULES.as_bytes(), 0o644);
}

/// A local user made by the test set-up.
#[derive(Clone, Debug)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

fn id_of(name: &str, flag: &str) -> Option<u32> {
    let out = Command::new("id").args([flag, name]).output().ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// Creates (once) and returns the test user `name`. Concurrent creation by another test
/// process is expected: "already exists" and a busy passwd lock are retried.
pub fn user(name: &str) -> User {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let (Some(uid), Some(gid)) = (id_of(name, "-u"), id_of(name, "-g")) {
            return User {
                name: name.to_owned(),
                uid,
                gid,
            };
        }
        let out = Command::new("useradd")
            .args([
                "--system",
                "--user-group",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                name,
            ])
            .output()
            .expect("useradd (passwd package)");
        // 0: created; 9: someone else created it; 10: passwd locked by someone else.
        let code = out.status.code();
        assert!(
            matches!(code, Some(0 | 9 | 10)) && Instant::now() < deadline,
            "useradd {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if code == Some(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `/usr/lib/polkit-1/polkitd` on a private bus, stopped on drop.
pub struct Polkitd {
    child: Option<Child>,
}

impl Polkitd {
    pub fn start(address: &str, dir: &Path) -> Polkitd {
        install_policy();
        let log = fs::File::create(dir.join("polkitd.log")).expect("polkitd log");
        let child = Command::new("/usr/lib/polkit-1/polkitd")
            .arg("--no-debug")
            .env_clear()
            .env("DBUS_SYSTEM_BUS_ADDRESS", address)
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("polkitd must be installed (apt-get install polkitd)");
        let polkitd = Polkitd { child: Some(child) };
        // Ready once it owns its name.
        let start = Instant::now();
        while !name_has_owner(address, "org.freedesktop.PolicyKit1") {
            assert!(
                start.elapsed() < TIMEOUT,
                "polkitd did not take org.freedesktop.PolicyKit1; see {}/polkitd.log",
                dir.display()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        polkitd
    }

    /// Stops polkitd now (to show that the daemon fails closed without it) and waits
    /// until its name is gone from the bus.
    pub fn stop(&mut self, address: &str) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let start = Instant::now();
        while name_has_owner(address, "org.freedesktop.PolicyKit1") {
            assert!(
                start.elapsed() < TIMEOUT,
                "polkitd's name stayed on the bus"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Polkitd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn name_has_owner(address: &str, name: &str) -> bool {
    Command::new("dbus-send")
        .arg(format!("--bus={address}"))
        .args([
            "--print-reply",
            "--dest=org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus.NameHasOwner",
        ])
        .arg(format!("string:{name}"))
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("boolean true"))
}

/// `pkaction --action-id ID --verbose` against the private bus's polkitd.
pub fn pkaction(address: &str, action: &str) -> std::process::Output {
    Command::new("pkaction")
        .args(["--action-id", action, "--verbose"])
        .env("DBUS_SYSTEM_BUS_ADDRESS", address)
        .output()
        .expect("pkaction (polkitd package)")
}
