//! Writes `dbus/org.watchq1.Manager.xml` and `dbus/org.watchq1.Subscription.xml` from what
//! the daemon built from this checkout serves. Run it (as root: the daemon owns a system bus
//! name and opens kernel sockets) after changing the interface on purpose, read the diff,
//! and commit it with the change:
//!
//! ```sh
//! cargo run --example bless-interface
//! ```
//!
//! `tests/interface.rs` only compares; it never writes the files, so a test run cannot
//! make the contract agree with a daemon that broke it.
//!
//! It builds the binaries of its own profile, starts a private system bus with the
//! project's policy (`packaging/dev/system-bus.conf.in`, `dbus/org.watchq1.conf`), starts
//! `watchqd` on it and waits for READY=1, subscribes (a subscription object exists only
//! while its owner is connected), and introspects both objects.

#[path = "../tests/common/interface_xml.rs"]
mod interface_xml;
#[path = "../tests/common/private_bus.rs"]
mod private_bus;

use std::fs;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode};
use std::time::Duration;

use watchqd::client::Subscription;
use zbus::fdo::IntrospectableProxy;

/// How long the bus and the daemon may take to start.
const START_TIMEOUT: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    match bless() {
        Ok(files) => {
            for file in files {
                println!("{}", file.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bless-interface: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A child process killed when dropped, so that an error on the way leaves nothing running.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn bless() -> Result<Vec<PathBuf>, String> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let daemon = build_daemon()?;
    let dir = tempfile::Builder::new()
        .prefix("watchq-bless-")
        .tempdir()
        .map_err(|e| format!("temporary directory: {e}"))?;
    let (_bus, address) = start_bus(repo, dir.path())?;
    let _daemon = start_daemon(&daemon, &address, dir.path())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    let served = runtime.block_on(served_elements(&address))?;
    let mut written = Vec::new();
    for (name, element) in served {
        let file = repo.join(format!("dbus/{name}.xml"));
        fs::write(&file, interface_xml::document(&element))
            .map_err(|e| format!("{}: {e}", file.display()))?;
        written.push(file);
    }
    Ok(written)
}

/// Builds the binaries of the profile this example was built with and returns the
/// daemon's path: a stale daemon would bless an old interface.
fn build_daemon() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("own path: {e}"))?;
    // target/<profile dir>/examples/bless-interface
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| format!("{} is not under target/<profile>/examples", exe.display()))?;
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev".to_owned(),
        Some(name) => name.to_owned(),
        None => return Err(format!("no profile directory above {}", exe.display())),
    };
    // `cargo run` says which cargo runs it.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(&cargo)
        .args(["build", "--quiet", "--bins", "--profile", &profile])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .map_err(|e| format!("{}: {e}", cargo.to_string_lossy()))?;
    if !status.success() {
        return Err(format!("cargo build --bins --profile {profile}: {status}"));
    }
    Ok(profile_dir.join("watchqd"))
}

/// dbus-daemon configured like the system bus, with the project's policy file.
fn start_bus(repo: &Path, dir: &Path) -> Result<(Running, String), String> {
    let (child, address) = private_bus::spawn(repo, dir, START_TIMEOUT)?;
    Ok((Running(child), address))
}

/// watchqd with an empty configuration (all defaults), started as systemd starts it:
/// ready when it sends READY=1, which it does after owning its name.
fn start_daemon(daemon: &Path, address: &str, dir: &Path) -> Result<Running, String> {
    let config = dir.join("watchqd.toml");
    fs::write(&config, "").map_err(|e| format!("{}: {e}", config.display()))?;
    let notify_path = dir.join("notify");
    let notify =
        UnixDatagram::bind(&notify_path).map_err(|e| format!("{}: {e}", notify_path.display()))?;
    notify
        .set_read_timeout(Some(START_TIMEOUT))
        .map_err(|e| format!("notify socket timeout: {e}"))?;
    let log_path = dir.join("watchqd.log");
    let log = fs::File::create(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
    let child = Command::new(daemon)
        .arg("--config")
        .arg(&config)
        .env("DBUS_SYSTEM_BUS_ADDRESS", address)
        .env("NOTIFY_SOCKET", &notify_path)
        .stderr(log)
        .spawn()
        .map_err(|e| format!("{}: {e}", daemon.display()))?;
    let running = Running(child);
    let mut buf = [0u8; 4096];
    loop {
        let n = notify.recv(&mut buf).map_err(|e| {
            format!(
                "{} sent no READY=1 ({e}); its log:\n{}",
                daemon.display(),
                fs::read_to_string(&log_path).unwrap_or_default()
            )
        })?;
        if String::from_utf8_lossy(&buf[..n])
            .lines()
            .any(|l| l == "READY=1")
        {
            return Ok(running);
        }
    }
}

/// (interface name, element as served) for the Manager and a Subscription.
async fn served_elements(address: &str) -> Result<Vec<(&'static str, String)>, String> {
    let conn = watchqd::client::connect(Some(address))
        .await
        .map_err(|e| format!("connect to {address}: {e}"))?;
    let subscription = Subscription::builder(&conn)
        .build()
        .await
        .map_err(|e| format!("Subscribe: {e}"))?;
    let sub_path = subscription
        .path()
        .ok_or("the subscription has no path")?
        .to_string();
    let mut served = Vec::new();
    for (path, name) in [
        ("/org/watchq1", "org.watchq1.Manager"),
        (sub_path.as_str(), "org.watchq1.Subscription"),
    ] {
        let proxy = IntrospectableProxy::builder(&conn)
            .destination("org.watchq1")
            .path(path)
            .build()
            .await
            .map_err(|e| format!("proxy for {path}: {e}"))?;
        let xml = proxy
            .introspect()
            .await
            .map_err(|e| format!("Introspect {path}: {e}"))?;
        let element = interface_xml::interface_element(&xml, name)
            .ok_or_else(|| format!("{path} does not serve {name}"))?;
        served.push((name, element));
    }
    Ok(served)
}
