//! A system bus of the tests' own, configured like the system bus with the project's
//! own policy file (`packaging/dev/system-bus.conf.in` filled in with
//! `dbus/org.watchq1.conf`): dbus-daemon, or dbus-broker (the system bus of Fedora, RHEL
//! and Arch) when `WATCHQD_TEST_BUS=dbus-broker`. Shared by the test harness
//! (`PrivateBus`) and `examples/bless-interface.rs`.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The bus implementations the tests run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Implementation {
    DbusDaemon,
    DbusBroker,
}

impl Implementation {
    /// `WATCHQD_TEST_BUS`: `dbus-daemon` (the default) or `dbus-broker`.
    pub fn chosen() -> Result<Implementation, String> {
        match std::env::var("WATCHQD_TEST_BUS").as_deref() {
            Err(_) | Ok("") | Ok("dbus-daemon") => Ok(Implementation::DbusDaemon),
            Ok("dbus-broker") => Ok(Implementation::DbusBroker),
            Ok(other) => Err(format!(
                "WATCHQD_TEST_BUS={other}: expected dbus-daemon or dbus-broker"
            )),
        }
    }
}

/// Starts the bus listening on `DIR/system_bus_socket` and returns it with its address once
/// it listens. Its configuration and log (`dbus-daemon.log`, or `dbus-broker.log`: the
/// broker's journal records) stay in `dir`.
pub fn spawn(repo: &Path, dir: &Path, timeout: Duration) -> Result<(Child, String), String> {
    let template_path = repo.join("packaging/dev/system-bus.conf.in");
    let template = fs::read_to_string(&template_path)
        .map_err(|e| format!("{}: {e}", template_path.display()))?;
    let socket = dir.join("system_bus_socket");
    let config = template
        .replace("@LISTEN@", &format!("unix:path={}", socket.display()))
        .replace(
            "@POLICY@",
            &repo.join("dbus/org.watchq1.conf").display().to_string(),
        );
    let config_path = dir.join("system-bus.conf");
    fs::write(&config_path, config).map_err(|e| format!("{}: {e}", config_path.display()))?;
    let implementation = Implementation::chosen()?;
    let (name, log_path) = match implementation {
        Implementation::DbusDaemon => ("dbus-daemon", dir.join("dbus-daemon.log")),
        Implementation::DbusBroker => ("dbus-broker", dir.join("dbus-broker.log")),
    };
    // Appended to, by the broker's launcher script too.
    let log = fs::File::create(&log_path)
        .and_then(|_| fs::OpenOptions::new().append(true).open(&log_path))
        .map_err(|e| format!("{}: {e}", log_path.display()))?;
    let mut command = match implementation {
        Implementation::DbusDaemon => {
            let mut c = Command::new("dbus-daemon");
            c.arg(format!("--config-file={}", config_path.display()))
                .args(["--nofork", "--nopidfile", "--print-address=1"]);
            c
        }
        Implementation::DbusBroker => {
            // The launcher's journal records go to the log; its stderr too.
            let mut c = Command::new("unshare");
            c.args(["--mount", "--propagation", "private", "--"])
                .arg(repo.join("tests/bus/launch-dbus-broker"))
                .arg(&socket)
                .arg(&config_path)
                .arg(&log_path);
            c
        }
    };
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("{name} must be installed (apt-get install {name}): {e}"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    if let Some(stdout) = child.stdout.take() {
        // It prints its address once it listens; it exits (EOF, an empty line) on a bad
        // configuration.
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
    }
    let address = rx
        .recv_timeout(timeout)
        .unwrap_or_default()
        .trim()
        .to_owned();
    if address.is_empty() {
        let _ = child.kill();
        let _ = child.wait();
        return Err(format!(
            "{name} printed no address within {timeout:?}; {}:\n{}",
            log_path.display(),
            fs::read_to_string(&log_path).unwrap_or_default()
        ));
    }
    // The suite must run on the bus it was asked for, not pass on another one.
    let server = server_pid(child.id());
    let comm = fs::read_to_string(format!("/proc/{server}/comm")).unwrap_or_default();
    if comm.trim() != name {
        let _ = child.kill();
        let _ = child.wait();
        return Err(format!(
            "asked for {name}, but the bus is served by {:?} (pid {server})",
            comm.trim()
        ));
    }
    Ok((child, address))
}

/// The process that routes the bus's messages, in the tree started by [`spawn`] from
/// `pid`: dbus-daemon itself, or the `dbus-broker` under its launcher (what a test stops
/// to make the bus hang, or measures).
pub fn server_pid(pid: u32) -> u32 {
    let mut queue = std::collections::VecDeque::from([pid]);
    while let Some(p) = queue.pop_front() {
        let comm = fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
        if matches!(comm.trim(), "dbus-daemon" | "dbus-broker") {
            return p;
        }
        let children =
            fs::read_to_string(format!("/proc/{p}/task/{p}/children")).unwrap_or_default();
        queue.extend(
            children
                .split_whitespace()
                .filter_map(|c| c.parse::<u32>().ok()),
        );
    }
    pid
}
