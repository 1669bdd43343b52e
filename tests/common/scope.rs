//! A cgroup scope named as systemd names Flatpak's (`app-flatpak-<app>-<n>.scope`) and
//! snapd's (`snap.<name>.<app>-<n>.scope`), with a process moved into it: how a test
//! makes a process look like one of theirs to whoever reads `/proc/PID/cgroup`.

/// `<name>-<pid>.scope` under a slice of this test process's own.
pub struct Scope {
    dir: std::path::PathBuf,
}

impl Scope {
    pub fn enter(name: &str, pid: u32) -> Scope {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let cgroup2 = mountinfo
            .lines()
            .find(|l| l.contains(" - cgroup2 "))
            .and_then(|l| l.split_whitespace().nth(4))
            .expect("a cgroup2 mount");
        let dir = std::path::PathBuf::from(cgroup2)
            .join(format!("watchq-test-{}.slice", std::process::id()))
            .join(format!("{name}-{pid}.scope"));
        std::fs::create_dir_all(&dir).expect("create cgroup");
        std::fs::write(dir.join("cgroup.procs"), pid.to_string()).expect("move into cgroup");
        Scope { dir }
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        // Removable once its process is gone (drop the process first); the kernel may
        // take a moment after the reaping to see the cgroup empty (EBUSY meanwhile).
        for _ in 0..50 {
            match std::fs::remove_dir(&self.dir) {
                Err(e) if e.raw_os_error() == Some(nix::libc::EBUSY) => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                _ => break,
            }
        }
        if let Some(parent) = self.dir.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}
