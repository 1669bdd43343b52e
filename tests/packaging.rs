//! What a user installs and runs: the unit, the README's run command.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{kill, Signal as Sig};
use nix::unistd::Pid;

fn unit_with_binary(dir: &std::path::Path) -> std::path::PathBuf {
    let unit = std::fs::read_to_string(repo().join("systemd/watchqd.service")).unwrap();
    let path = dir.join("watchqd.service");
    std::fs::write(
        &path,
        unit.replace("/usr/libexec/watchqd", env!("CARGO_BIN_EXE_watchqd")),
    )
    .unwrap();
    path
}

#[test]
fn the_unit_files_verify_and_the_service_is_hardened() {
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_with_binary(dir.path());
    let socket = dir.path().join("watchqd.socket");
    std::fs::copy(repo().join("systemd/watchqd.socket"), &socket).unwrap();
    // --man=no: the man pages the units point to come with the package, not this checkout.
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&unit)
        .arg(&socket)
        .output()
        .expect("systemd-analyze (package systemd)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "warnings: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // 1.9 today, "OK" (issue 9 asks for 2.0 or lower). What keeps it from systemd's best
    // grades is what the kernel demands: CAP_SYS_ADMIN for fanotify mount-namespace and
    // filesystem marks, CAP_SETUID and CAP_SETGID for the helper that sets key watches as
    // the subscriber, CAP_PERFMON, CAP_SYS_PTRACE, and running as root. The threshold
    // keeps anything else from creeping in.
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--threshold=20"])
        .arg(&unit)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "exposure above 2.0:\n{text}");
}

/// Runs `scripts/run-daemon` as the README says, on a machine without a system bus, and
/// watches a loop device appear through `watchqctl monitor`.
#[test]
fn the_readme_run_command_serves_real_events_on_a_private_bus() {
    if std::path::Path::new("/run/dbus/system_bus_socket").exists() {
        panic!("this test checks the no-system-bus path; this machine has a system bus at /run/dbus/system_bus_socket");
    }
    let dir = tempfile::tempdir().unwrap();
    let mut run = Command::new(repo().join("scripts/run-daemon"))
        .current_dir(repo())
        .env_remove("DBUS_SYSTEM_BUS_ADDRESS")
        .env("WATCHQ_DEV_DIR", dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let group = Pid::from_raw(-(run.id() as i32));
    let rx = common::lines::lines(run.stdout.take().unwrap());
    // The instructions it prints: the address, then the watchqctl it built.
    let mut address = None;
    let watchqctl = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(600))
            .expect("run-daemon printed no instructions (building?)");
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("export DBUS_SYSTEM_BUS_ADDRESS='") {
            address = Some(rest.trim_end_matches('\'').to_owned());
        } else if let Some(bin) = line.strip_suffix("/watchqctl status") {
            break std::path::PathBuf::from(bin).join("watchqctl");
        }
    };
    let address = address.expect("run-daemon printed the bus address before watchqctl");
    let start = Instant::now();
    while !Command::new(&watchqctl)
        .args(["--address", &address, "status"])
        .output()
        .unwrap()
        .status
        .success()
    {
        assert!(
            start.elapsed() < TIMEOUT,
            "the daemon never answered status"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // A person's session: an unprivileged user running the monitor.
    let mut monitor = Command::new(&watchqctl)
        .args(["--address", &address, "monitor"])
        .uid(65534)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    BufReader::new(monitor.stderr.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert!(ready.starts_with("watching"), "{ready}");
    let disk = LoopDevice::attach(8);
    let lines = common::lines::lines(monitor.stdout.take().unwrap());
    let seen = loop {
        let line = lines
            .recv_timeout(TIMEOUT)
            .expect("monitor showed no event for the loop device");
        if line.contains(&format!(" {} ", disk.name)) && line.contains("loop-backing-file=") {
            break line;
        }
    };
    assert!(
        seen.contains("devices") && seen.contains(&disk.device),
        "{seen}"
    );
    let _ = monitor.kill();
    let _ = monitor.wait();
    kill(group, Sig::SIGINT).unwrap();
    let status = run.wait().unwrap();
    assert!(status.success(), "run-daemon exited with {status}");
    assert!(
        !dir.path().join("system_bus_socket").exists()
            || Command::new(&watchqctl)
                .args(["--address", &address, "status"])
                .output()
                .map(|o| !o.status.success())
                .unwrap_or(true),
        "the private bus kept running after Ctrl-C"
    );
}

/// The portal as installed: its `systemd --user` unit verifies, its session-bus
/// activation file names that unit and the binary the unit runs, and a session bus that
/// reads the file starts the portal when a program first calls it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_portal_is_started_by_the_session_bus_and_its_user_unit_verifies() {
    let unit = std::fs::read_to_string(repo().join("systemd/user/watchq-portal.service")).unwrap();
    let activation =
        std::fs::read_to_string(repo().join("dbus/org.freedesktop.portal.Watchq.service")).unwrap();
    for line in [
        "Type=dbus",
        "BusName=org.freedesktop.portal.Watchq",
        "ExecStart=/usr/libexec/watchq-portal",
    ] {
        assert!(unit.lines().any(|l| l == line), "unit: {line}");
    }
    for line in [
        "Name=org.freedesktop.portal.Watchq",
        "Exec=/usr/libexec/watchq-portal",
        "SystemdService=watchq-portal.service",
    ] {
        assert!(
            activation.lines().any(|l| l == line),
            "activation file: {line}"
        );
    }
    let binary = env!("CARGO_BIN_EXE_watchq-portal");
    let dir = tempfile::tempdir().unwrap();
    let runtime = tempfile::tempdir().unwrap();
    let unit_path = dir.path().join("watchq-portal.service");
    std::fs::write(
        &unit_path,
        unit.replace("/usr/libexec/watchq-portal", binary),
    )
    .unwrap();
    // A user manager's view; its runtime directory is all it needs to exist.
    let out = Command::new("systemd-analyze")
        .args(["--user", "verify", "--man=no"])
        .arg(&unit_path)
        .env("XDG_RUNTIME_DIR", runtime.path())
        .output()
        .expect("systemd-analyze (package systemd)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.is_empty(), "{stderr}");

    // Activation, for real: no portal runs until the call.
    let daemon = Daemon::start();
    let services = tempfile::tempdir().unwrap();
    std::fs::write(
        services
            .path()
            .join("org.freedesktop.portal.Watchq.service"),
        activation.replace("/usr/libexec/watchq-portal", binary),
    )
    .unwrap();
    let session = common::portal::SessionBus::with_services(services.path(), daemon.address());
    let conn = session.connect().await;
    let path = common::portal::host_session(&conn, std::collections::HashMap::new())
        .await
        .expect("the bus started the portal, which made a session");
    assert!(
        path.as_str()
            .starts_with("/org/freedesktop/portal/watchq/session/"),
        "{path}"
    );
}
