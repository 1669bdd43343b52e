//! The portal's test bed, all real: a session `dbus-daemon` of the test's own, the real
//! `watchq-portal` binary on it (and on the daemon's private system bus), and sandboxed
//! apps as Flatpak makes them: `bwrap` with a `.flatpak-info` at the root of the
//! sandbox, a real `xdg-dbus-proxy` (itself in such a sandbox, as Flatpak runs it) with
//! Flatpak's default filter in front of the session bus, and a GDBus client
//! (`tests/foreign/portal_client.py`) behind it.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::polkit::User;
use super::{lines::lines, repo, Daemon, TIMEOUT};

/// Runs `command` as `user` (root when `None`).
fn as_user<'c>(command: &'c mut Command, user: Option<&User>) -> &'c mut Command {
    use std::os::unix::process::CommandExt;
    if let Some(user) = user {
        command.uid(user.uid).gid(user.gid);
    }
    command
}

/// A temporary directory `user` owns.
fn owned_dir(prefix: &str, user: Option<&User>) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("temporary directory");
    if let Some(user) = user {
        std::os::unix::fs::chown(dir.path(), Some(user.uid), Some(user.gid)).expect("chown");
    }
    dir
}

/// A session bus of the test's own.
pub struct SessionBus {
    child: Child,
    pub address: String,
    pub dir: tempfile::TempDir,
    /// Whose session it is: everything started on it runs as this user (root if none).
    pub user: Option<User>,
}

impl SessionBus {
    /// A session bus as the desktop's: Debian's session configuration, which activates
    /// the services installed in /usr/share/dbus-1/services (xdg-permission-store).
    pub fn start() -> SessionBus {
        SessionBus::start_as(None)
    }

    /// `user`'s session bus (root's when `None`).
    pub fn start_as(user: Option<&User>) -> SessionBus {
        SessionBus::spawn(user, |c, _| {
            c.arg("--session");
        })
    }

    /// A session bus that activates only the services in `services` (a directory of
    /// `.service` files), with `DBUS_SYSTEM_BUS_ADDRESS` set to `system` for them.
    pub fn with_services(services: &Path, system: &str) -> SessionBus {
        SessionBus::spawn(None, |c, dir| {
            let config = dir.join("session.conf");
            fs::write(
                &config,
                format!(
                    "<!DOCTYPE busconfig PUBLIC \"-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN\"\n \
                     \"http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd\">\n\
                     <busconfig><type>session</type><auth>EXTERNAL</auth>\
                     <listen>unix:path={}</listen><servicedir>{}</servicedir>\
                     <policy context=\"default\"><allow send_destination=\"*\" eavesdrop=\"true\"/>\
                     <allow eavesdrop=\"true\"/><allow own=\"*\"/></policy></busconfig>\n",
                    dir.join("bus").display(),
                    services.display()
                ),
            )
            .expect("write session.conf");
            c.arg(format!("--config-file={}", config.display()))
                .env("DBUS_SYSTEM_BUS_ADDRESS", system);
        })
    }

    fn spawn(user: Option<&User>, configure: impl FnOnce(&mut Command, &Path)) -> SessionBus {
        let dir = owned_dir("watchq-session-", user);
        let socket = dir.path().join("bus");
        let log = fs::File::create(dir.path().join("dbus-daemon.log")).expect("bus log");
        let mut command = Command::new("dbus-daemon");
        as_user(&mut command, user);
        // What the bus activates (xdg-permission-store, from its .service file) inherits
        // this: the store's database is the test's own, never the machine user's.
        command.env("XDG_DATA_HOME", dir.path().join("data"));
        configure(&mut command, dir.path());
        let mut child = command
            .args(["--nofork", "--nopidfile", "--print-address=1"])
            .arg(format!("--address=unix:path={}", socket.display()))
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("dbus-daemon must be installed");
        let out = child.stdout.take().expect("stdout");
        let address = lines(out)
            .recv_timeout(TIMEOUT)
            .expect("the session bus printed its address");
        SessionBus {
            child,
            address: address.trim().to_owned(),
            dir,
            user: user.cloned(),
        }
    }
}

impl SessionBus {
    /// A connection of the test's own, an unsandboxed program's.
    pub async fn connect(&self) -> zbus::Connection {
        zbus::connection::Builder::address(self.address.as_str())
            .build()
            .await
            .expect("connect to the session bus")
    }
}

impl Drop for SessionBus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `watchq-portal`, serving on `session`, a client of `daemon`'s system bus.
pub struct Portal {
    child: Child,
    pub log: PathBuf,
}

impl Portal {
    pub fn start(session: &SessionBus, daemon: &Daemon) -> Portal {
        let log = session.dir.path().join("watchq-portal.log");
        let child = as_user(
            &mut Command::new(env!("CARGO_BIN_EXE_watchq-portal")),
            session.user.as_ref(),
        )
        .env("DBUS_SESSION_BUS_ADDRESS", &session.address)
        .env("DBUS_SYSTEM_BUS_ADDRESS", daemon.address())
        .env("RUST_LOG", "watchqd=debug")
        // The access dialog is the test's stand-in (tests/foreign/access_dialog.py).
        .env("WATCHQ_PORTAL_ACCESS", ACCESS_NAME)
        .stderr(fs::File::create(&log).expect("portal log"))
        .spawn()
        .expect("watchq-portal");
        let portal = Portal { child, log };
        let deadline = Instant::now() + TIMEOUT;
        while !portal.log_text().contains("serving") {
            assert!(
                Instant::now() < deadline,
                "the portal did not start: {}",
                portal.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        portal
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Portal {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- watchq-portal log:\n{}", self.log_text());
        }
    }
}

/// `CreateSession` from an unsandboxed program (the test itself) on `conn`.
pub async fn host_session(
    conn: &zbus::Connection,
    options: std::collections::HashMap<&str, zbus::Variant<'_>>,
) -> zbus::Result<zbus::OwnedObjectPath> {
    let reply = conn
        .call_method(
            Some("org.freedesktop.portal.Watchq"),
            "/org/freedesktop/portal/watchq",
            Some("org.freedesktop.portal.Watchq"),
            "CreateSession",
            &(options,),
        )
        .await?;
    reply.body().deserialize()
}

/// The bus name of the test's access dialog.
pub const ACCESS_NAME: &str = "org.watchq.test.Access";

/// The permission store's `watchq` table entry for `source`: app → permissions, as
/// the real xdg-permission-store (activated by the session bus) holds it.
pub fn store_lookup(session: &SessionBus, source: &str) -> Value {
    let out = as_user(&mut Command::new("busctl"), session.user.as_ref())
        .arg(format!("--address={}", session.address))
        .args([
            "--json=short",
            "call",
            STORE,
            STORE_PATH,
            STORE,
            "Lookup",
            "ss",
            "watchq",
            source,
        ])
        .output()
        .expect("busctl");
    if !out.status.success() {
        return Value::Null;
    }
    let reply: Value = serde_json::from_slice(&out.stdout).expect("busctl's JSON");
    reply["data"][0].clone()
}

/// Sets `app`'s permissions for `source` in the store, as a settings panel or
/// `flatpak permission-set` would.
pub fn store_set(session: &SessionBus, source: &str, app: &str, permissions: &[&str]) {
    let count = permissions.len().to_string();
    let status = as_user(&mut Command::new("busctl"), session.user.as_ref())
        .arg(format!("--address={}", session.address))
        .args([
            "call",
            STORE,
            STORE_PATH,
            STORE,
            "SetPermission",
            "sbssas",
            "watchq",
            "true",
            source,
            app,
        ])
        .arg(&count)
        .args(permissions)
        .status()
        .expect("busctl");
    assert!(status.success(), "SetPermission");
}

const STORE: &str = "org.freedesktop.impl.portal.PermissionStore";
const STORE_PATH: &str = "/org/freedesktop/impl/portal/PermissionStore";

/// The desktop's access dialog, answering every question with `answer`.
pub struct AccessDialog {
    child: Child,
    out: Receiver<String>,
    /// The questions asked so far, as printed.
    pub asked: Vec<Value>,
}

impl AccessDialog {
    pub fn start(session: &SessionBus, answer: &str) -> AccessDialog {
        let mut child = as_user(&mut Command::new("/usr/bin/python3"), session.user.as_ref())
            .arg(repo().join("tests/foreign/access_dialog.py"))
            .args([ACCESS_NAME, answer])
            .env("DBUS_SESSION_BUS_ADDRESS", &session.address)
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3-gi");
        let out = lines(child.stdout.take().expect("stdout"));
        let ready = out
            .recv_timeout(TIMEOUT)
            .expect("the access dialog owns its name");
        assert!(ready.contains("ready"), "{ready}");
        AccessDialog {
            child,
            out,
            asked: Vec::new(),
        }
    }

    /// Every question asked until now (the answers were sent before the portal went on,
    /// so they have all been printed).
    pub fn asked(&mut self) -> &[Value] {
        while let Ok(line) = self.out.recv_timeout(Duration::from_millis(100)) {
            self.asked
                .push(serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line}: {e}")));
        }
        &self.asked
    }
}

impl Drop for AccessDialog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `bwrap` arguments for a Flatpak-like sandbox: the host's /usr read-only, its own
/// /proc, /dev and /tmp, `dir` shared, `info` at `/.flatpak-info`, a pid namespace;
/// the caller adds its own options, then `--` and the command.
fn bwrap(dir: &Path, info: &Path, user: Option<&User>) -> Command {
    let mut c = Command::new("bwrap");
    as_user(&mut c, user);
    c.args(["--ro-bind", "/usr", "/usr"])
        .args([
            "--symlink",
            "usr/bin",
            "/bin",
            "--symlink",
            "usr/lib",
            "/lib",
        ])
        .args([
            "--symlink",
            "usr/lib64",
            "/lib64",
            "--symlink",
            "usr/sbin",
            "/sbin",
        ])
        .args(["--ro-bind", "/etc", "/etc"])
        .args(["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"])
        .arg("--bind")
        .args([dir, dir])
        .arg("--ro-bind")
        .arg(info)
        .arg("/.flatpak-info")
        .args(["--unshare-pid", "--die-with-parent"]);
    c
}

/// A sandboxed app: its `.flatpak-info`, its bus proxy, and its client.
pub struct App {
    /// The bus proxy of a sandboxed app; none for an unsandboxed program.
    proxy: Option<Child>,
    client: Child,
    stdin: ChildStdin,
    out: Receiver<String>,
    /// Everything the client printed, in order.
    pub seen: Vec<Value>,
    _dir: tempfile::TempDir,
}

impl App {
    /// Starts app `app_id` with `policy` appended to its `.flatpak-info` (a
    /// `[Policy watchq]` group, or nothing), and has it create a session named `token`.
    pub fn start(session: &SessionBus, app_id: &str, policy: &str, token: &str) -> App {
        let dir = owned_dir("watchq-app-", session.user.as_ref());
        let info = dir.path().join("flatpak-info");
        fs::write(
            &info,
            format!(
                "[Application]\nname={app_id}\nruntime=runtime/org.freedesktop.Platform/x86_64/23.08\n\n\
                 [Instance]\ninstance-id=42\nsession-bus-proxy=true\n\n{policy}"
            ),
        )
        .expect("write .flatpak-info");
        App::start_in(session, dir, &info, token)
    }

    /// A hostile sandbox whose `/.flatpak-info` is a FIFO nobody writes to.
    pub fn start_with_fifo_info(session: &SessionBus, token: &str) -> App {
        let dir = owned_dir("watchq-app-", session.user.as_ref());
        let info = dir.path().join("flatpak-info");
        nix::unistd::mkfifo(&info, nix::sys::stat::Mode::from_bits_truncate(0o644))
            .expect("mkfifo");
        App::start_in(session, dir, &info, token)
    }

    fn start_in(session: &SessionBus, dir: tempfile::TempDir, info: &Path, token: &str) -> App {
        let user = session.user.as_ref();
        let info = info.to_path_buf();
        let socket = dir.path().join("bus");
        // Flatpak's default session-bus filter: portals, and nothing else. The proxy's
        // sandbox sees the real bus socket; the app's sees only the proxy's.
        let proxy = bwrap(dir.path(), &info, user)
            .arg("--bind")
            .args([session.dir.path(), session.dir.path()])
            .args(["--", "xdg-dbus-proxy"])
            .arg(&session.address)
            .arg(&socket)
            .args(["--filter", "--talk=org.freedesktop.portal.*"])
            .stderr(fs::File::create(dir.path().join("proxy.log")).expect("proxy log"))
            .spawn()
            .expect("bwrap and xdg-dbus-proxy must be installed");
        let deadline = Instant::now() + TIMEOUT;
        while !socket.exists() {
            assert!(Instant::now() < deadline, "xdg-dbus-proxy made no socket");
            std::thread::sleep(Duration::from_millis(10));
        }
        let script = repo().join("tests/foreign/portal_client.py");
        let client = bwrap(dir.path(), &info, user)
            .args(["--ro-bind"])
            .arg(&script)
            .args(["/app/portal_client.py"])
            .args(["--setenv", "DBUS_SESSION_BUS_ADDRESS"])
            .arg(format!("unix:path={}", socket.display()))
            .args(["--", "/usr/bin/python3", "/app/portal_client.py", token])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("bwrap and python3-gi must be installed");
        App::of(client, Some(proxy), dir)
    }

    fn of(mut client: Child, proxy: Option<Child>, dir: tempfile::TempDir) -> App {
        let stdin = client.stdin.take().expect("stdin");
        let out = lines(client.stdout.take().expect("stdout"));
        App {
            proxy,
            client,
            stdin,
            out,
            seen: Vec::new(),
            _dir: dir,
        }
    }

    /// An unsandboxed program on the session bus itself that waits for [`App::go`]
    /// before it creates its session.
    pub fn start_waiting(session: &SessionBus, token: &str) -> App {
        let client = as_user(&mut Command::new("/usr/bin/python3"), session.user.as_ref())
            .arg(repo().join("tests/foreign/portal_client.py"))
            .args([token, "--wait"])
            .env("DBUS_SESSION_BUS_ADDRESS", &session.address)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3-gi");
        App::of(
            client,
            None,
            owned_dir("watchq-app-", session.user.as_ref()),
        )
    }

    /// The client's pid.
    pub fn pid(&self) -> u32 {
        self.client.id()
    }

    /// Lets a client started with [`App::start_waiting`] create its session.
    pub fn go(&mut self) {
        self.command("go");
    }

    /// The next line the client prints.
    pub fn next(&mut self, what: &str) -> Value {
        let line = self
            .out
            .recv_timeout(TIMEOUT)
            .unwrap_or_else(|e| panic!("no {what} ({e}); seen: {:?}", self.seen));
        let value: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line}: {e}"));
        self.seen.push(value.clone());
        value
    }

    /// Reads lines until `done` holds for one; returns it.
    pub fn until(&mut self, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        loop {
            let value = self.next(what);
            if done(&value) {
                return value;
            }
        }
    }

    /// Lines printed within `window`, without waiting for more.
    pub fn drain_for(&mut self, window: Duration) {
        let deadline = Instant::now() + window;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.out.recv_timeout(left) {
                Ok(line) => self
                    .seen
                    .push(serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line}: {e}"))),
                Err(_) => break,
            }
        }
    }

    /// Every signal the app received was about `session`: nothing of other sessions
    /// reached it.
    pub fn assert_only_session(&self, session: &str) {
        assert!(
            self.seen
                .iter()
                .filter(|v| v.get("signal").is_some())
                .all(|v| v["session"] == session),
            "{:?}",
            self.seen
        );
    }

    pub fn command(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").expect("client stdin");
    }

    /// The `DeviceEvents` entries for `session`, in order: (action, id, properties).
    pub fn device_events(&self, session: &str) -> Vec<(String, String, Value)> {
        self.seen
            .iter()
            .filter(|v| v["signal"] == "DeviceEvents" && v["session"] == session)
            .flat_map(|v| v["events"].as_array().cloned().unwrap_or_default())
            .map(|e| {
                (
                    e[0].as_str().unwrap_or_default().to_owned(),
                    e[1].as_str().unwrap_or_default().to_owned(),
                    e[2].clone(),
                )
            })
            .collect()
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.client.kill();
        let _ = self.client.wait();
        if let Some(proxy) = &mut self.proxy {
            let _ = proxy.kill();
            let _ = proxy.wait();
        }
    }
}
