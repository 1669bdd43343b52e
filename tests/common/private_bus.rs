//! dbus-daemon configured like the system bus, with the project's own policy file
//! (`packaging/dev/system-bus.conf.in` filled in with `dbus/org.watchq1.conf`). Shared by
//! the test harness (`PrivateBus`) and `examples/bless-interface.rs`.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Starts the bus listening on `DIR/system_bus_socket` and returns it with its address once
/// it listens. Its configuration and log (`dbus-daemon.log`) stay in `dir`.
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
    let log_path = dir.join("dbus-daemon.log");
    let log = fs::File::create(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
    let mut child = Command::new("dbus-daemon")
        .arg(format!("--config-file={}", config_path.display()))
        .args(["--nofork", "--nopidfile", "--print-address=1"])
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("dbus-daemon must be installed (apt-get install dbus-daemon): {e}"))?;
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
            "dbus-daemon printed no address within {timeout:?}; {}:\n{}",
            log_path.display(),
            fs::read_to_string(&log_path).unwrap_or_default()
        ));
    }
    Ok((child, address))
}
