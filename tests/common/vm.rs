//! Test helper: boot the watchqd test guest (a real 6.12 kernel under qemu/TCG, see
//! `tests/vm/README.md`), run commands in it as root, and drive qemu over QMP.
//!
//! Include it from an integration test with
//!
//! ```ignore
//! #[path = "common/vm.rs"]
//! mod vm;
//!
//! let guest = vm::Guest::boot(&vm::BootOptions::new().hotplug())?;
//! let out = guest.run(&["uname", "-r"])?;
//! assert_eq!(out.status, 0, "{out}");
//! guest.qmp(&serde_json::json!({"execute": "device_add",
//!     "arguments": {"driver": "usb-kbd", "bus": "xhci.0", "id": "kbd0"}}))?;
//! ```
//!
//! A test whose work must happen in the guest is two halves in one binary: the host half
//! calls [`Guest::run_inside`] with the name of the in-guest half, `inside::NAME`
//! (`#[ignore]`d, so that it runs only when started there), which begins with
//! [`enter_guest`] (or [`require_guest`]).
//!
//! How it works: `tests/vm/run-in-guest --serve DIR` starts qemu. DIR (a fresh directory under
//! /tmp, exported read-write over 9p and mounted at the same path in the guest) holds
//! `console.log`, `qemu.log`, `qmp.sock`, `ctl.sock` and one `req/ID/` directory per command
//! (`argv`, `env`, `cwd` written by the host; `stdout`, `stderr` written by the guest). The
//! guest's init (`tests/vm/guest-init`) reads `run ID` lines from a virtio-serial port backed by
//! `ctl.sock`, runs each command in the background and answers `done ID STATUS`.
//! [`BootOptions::os`] boots the full-OS guest instead (systemd as PID 1, from the image of
//! `tests/vm/build-os-image`), whose `watchq-agent.service` runs `tests/vm/os-agent`, which
//! speaks the same protocol (`tests/vm/guest-lib`).
//!
//! Nothing here skips: a missing qemu or kernel is an error that names what to install. Every
//! wait has a timeout; every error names the console log. The guest directory is removed when
//! the `Guest` is dropped, unless a test panicked or a step failed: then it is kept and its path
//! printed.
#![allow(dead_code)]

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// How long a boot may take until the guest's init answers (normally ~1.5 s; generous for
/// several TCG guests sharing two cores).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// Default time limit of [`Guest::run`].
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);
/// How long one waiter holds a channel before letting other threads use it.
const SLICE: Duration = Duration::from_millis(200);
/// Time limit of one QMP command.
pub const QMP_TIMEOUT: Duration = Duration::from_secs(60);

/// An error of the test bed, with the context a person needs (command, file, console log).
/// `Debug` prints the message itself so that `unwrap()`/`expect()` in tests stays readable.
pub struct Error(String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

fn error(message: impl Into<String>) -> Error {
    Error(message.into())
}

/// The checkout's `tests/vm` directory.
pub fn vm_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vm")
}

const SETUP_HINT: &str =
    "run tests/vm/setup-host as root (it installs qemu-system-x86, keyutils, quota, \
     the kernel build's packages and debootstrap, and builds the guest kernel and the \
     full-OS image once, ~7 minutes)";

/// Path of the cached guest kernel, building it first if needed (`tests/vm/build-kernel
/// --no-install`: it never installs packages at test time, it fails naming them).
pub fn kernel() -> Result<PathBuf> {
    static KERNEL: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    cached_build(&KERNEL, "build-kernel")
}

/// Path of the cached root image of the full-OS guest (systemd as PID 1), building it first if
/// needed (`tests/vm/build-os-image --no-install`, ~2 minutes; it never installs packages).
pub fn os_image() -> Result<PathBuf> {
    static IMAGE: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    cached_build(&IMAGE, "build-os-image")
}

/// Run `tests/vm/SCRIPT --no-install` once per process and return the path it prints.
fn cached_build(
    cell: &OnceLock<std::result::Result<PathBuf, String>>,
    script: &str,
) -> Result<PathBuf> {
    cell.get_or_init(|| {
        let script = vm_dir().join(script);
        let out = Command::new(&script)
            .arg("--no-install")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            return Err(format!(
                "{} failed ({}):\n{stderr}\nfix: {SETUP_HINT}",
                script.display(),
                out.status
            ));
        }
        let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let path = PathBuf::from(path);
        if path.is_file() {
            Ok(path)
        } else {
            Err(format!(
                "{} printed '{}', which is not a file; stderr:\n{stderr}",
                script.display(),
                path.display()
            ))
        }
    })
    .clone()
    .map_err(Error)
}

/// Fails with the package to install when qemu is missing.
pub fn check_qemu() -> Result<()> {
    let found = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("qemu-system-x86_64").is_file()));
    if found {
        Ok(())
    } else {
        Err(error(format!(
            "qemu-system-x86_64 not found in PATH: apt-get install -y qemu-system-x86 (or {SETUP_HINT})"
        )))
    }
}

/// JSON for a raw virtual disk backed by the host file `image`: usable as QMP `blockdev-add`
/// arguments or with [`BootOptions::blockdev`].
pub fn raw_blockdev(node_name: &str, image: &Path) -> Value {
    json!({
        "driver": "raw",
        "node-name": node_name,
        "file": {"driver": "file", "filename": image.to_string_lossy()},
    })
}

/// JSON for a raw disk backed by `image` through qemu's `blkdebug` driver: every read that
/// touches 512-byte `sector` fails with `errno` (5 = EIO) once the disk has been read at all.
pub fn blkdebug_blockdev(node_name: &str, image: &Path, sector: u64, errno: i32) -> Value {
    json!({
        "driver": "raw",
        "node-name": node_name,
        "file": {
            "driver": "blkdebug",
            "inject-error": [{"event": "read_aio", "errno": errno, "sector": sector}],
            "image": {"driver": "file", "filename": image.to_string_lossy()},
        },
    })
}

/// How to boot a guest.
#[derive(Clone, Debug, Default)]
pub struct BootOptions {
    hotplug: bool,
    os: bool,
    lsm: Option<String>,
    qemu_args: Vec<String>,
}

impl BootOptions {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a `qemu-xhci` controller (bus `xhci.0`) and a `pcie-root-port` (bus `rp0`).
    pub fn hotplug(mut self) -> Self {
        self.hotplug = true;
        self
    }

    /// Boot the full-OS guest: a minimal Debian bookworm with systemd as PID 1, dbus, polkitd,
    /// udev, logind and the user `alice` (uid 1000), from the cached image of
    /// `tests/vm/build-os-image` (a snapshot: every boot starts clean). The host's files are
    /// not there: copy what the guest needs into [`Guest::dir`], where commands also run.
    pub fn os(mut self) -> Self {
        self.os = true;
        self
    }

    /// Boot with this security module active (`lsm=` on the kernel command line: `apparmor`
    /// or `selinux`; the kernel has both, exclusive). Without it the guest runs with none
    /// (`lsm=capability`), as the suite always has.
    pub fn lsm(mut self, lsm: &str) -> Self {
        self.lsm = Some(lsm.into());
        self
    }

    /// Add a block node at boot (see [`raw_blockdev`], [`blkdebug_blockdev`]).
    pub fn blockdev(mut self, json: &Value) -> Self {
        self.qemu_args.push("-blockdev".into());
        self.qemu_args.push(json.to_string());
        self
    }

    /// Add a device at boot, e.g. `virtio-blk-pci,drive=disk0,id=vblk0`.
    pub fn device(mut self, spec: &str) -> Self {
        self.qemu_args.push("-device".into());
        self.qemu_args.push(spec.into());
        self
    }

    /// Pass any other argument to qemu.
    pub fn qemu_arg(mut self, arg: &str) -> Self {
        self.qemu_args.push(arg.into());
        self
    }
}

/// `sh -c SCRIPT` in the guest as root, whatever its status; panics when it cannot run.
pub fn sh(guest: &Guest, script: &str) -> Output {
    guest
        .run(&["sh", "-c", script])
        .unwrap_or_else(|e| panic!("running '{script}' in the guest: {e}"))
}

/// `sh -c SCRIPT` in the guest as root; it must succeed. Returns its stdout.
pub fn ok(guest: &Guest, script: &str) -> String {
    let out = sh(guest, script);
    assert!(out.success(), "{out}");
    out.stdout
}

/// The result of a command run in the guest.
#[derive(Clone, Debug)]
pub struct Output {
    pub argv: Vec<String>,
    /// Exit status as the guest's shell reports it (128 + N when killed by signal N).
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status == 0
    }
}

impl fmt::Display for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "guest command {:?} exited with status {}",
            self.argv, self.status
        )?;
        writeln!(f, "--- stdout ---\n{}", self.stdout.trim_end())?;
        write!(f, "--- stderr ---\n{}", self.stderr.trim_end())
    }
}

/// A line-oriented reader on a Unix socket that keeps partial lines across timeouts.
struct LineReader {
    reader: BufReader<UnixStream>,
    partial: Vec<u8>,
}

impl LineReader {
    fn new(stream: UnixStream) -> Self {
        Self {
            reader: BufReader::new(stream),
            partial: Vec::new(),
        }
    }

    /// The next line, `Ok(None)` at end of stream, an error after `deadline`.
    fn next_line(&mut self, deadline: Instant) -> io::Result<Option<String>> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "timed out"));
            }
            self.reader.get_ref().set_read_timeout(Some(left))?;
            match self.reader.read_until(b'\n', &mut self.partial) {
                Ok(0) => return Ok(None),
                Ok(_) if self.partial.ends_with(b"\n") => {
                    let line = String::from_utf8_lossy(&self.partial).trim_end().to_owned();
                    self.partial.clear();
                    return Ok(Some(line));
                }
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// The reading side of the control channel. Waiters take it in short slices so that several
/// threads can wait for their own commands; the writing side has its own lock.
struct Ctl {
    reader: LineReader,
    finished: HashMap<u64, i32>,
}

struct Qmp {
    writer: UnixStream,
    reader: LineReader,
    events: Vec<Value>,
}

/// A running guest. Dropping it kills qemu.
pub struct Guest {
    dir: PathBuf,
    /// The full-OS guest (systemd), not the 9p-root one.
    os: bool,
    qemu: Mutex<Child>,
    ctl: Mutex<Ctl>,
    ctl_writer: Mutex<UnixStream>,
    qmp: Mutex<Qmp>,
    next_id: AtomicU64,
    keep: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Connect to a socket qemu creates, waiting until it exists (or qemu died, or the deadline).
fn connect(path: &Path, qemu: &mut Child, deadline: Instant, dir: &Path) -> Result<UnixStream> {
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e) => {
                if let Ok(Some(status)) = qemu.try_wait() {
                    return Err(error(format!(
                        "qemu exited ({status}) before {} appeared; qemu log {}:\n{}",
                        path.display(),
                        dir.join("qemu.log").display(),
                        fs::read_to_string(dir.join("qemu.log")).unwrap_or_default()
                    )));
                }
                if Instant::now() >= deadline {
                    return Err(error(format!("cannot connect to {}: {e}", path.display())));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Guest {
    /// Boot a fresh guest and wait until its init serves commands.
    pub fn boot(options: &BootOptions) -> Result<Guest> {
        check_qemu()?;
        let kernel = kernel()?;
        let os_image = if options.os { Some(os_image()?) } else { None };
        let dir = tempfile::Builder::new()
            .prefix("watchqd-vm.")
            .tempdir_in("/tmp")
            .map_err(|e| error(format!("cannot create a guest directory in /tmp: {e}")))?
            .keep();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))
            .map_err(|e| error(format!("chmod {}: {e}", dir.display())))?;
        fs::create_dir(dir.join("req"))
            .map_err(|e| error(format!("mkdir {}/req: {e}", dir.display())))?;

        let script = vm_dir().join("run-in-guest");
        let mut cmd = Command::new(&script);
        cmd.arg("--serve").arg(&dir).arg("--kernel").arg(&kernel);
        if options.hotplug {
            cmd.arg("--hotplug");
        }
        if let Some(image) = &os_image {
            cmd.arg("--os-image").arg(image);
        }
        if let Some(lsm) = &options.lsm {
            cmd.arg("--lsm").arg(lsm);
        }
        for arg in &options.qemu_args {
            cmd.arg("--qemu-arg").arg(arg);
        }
        let log = fs::File::create(dir.join("qemu.log"))
            .map_err(|e| error(format!("cannot create {}/qemu.log: {e}", dir.display())))?;
        let log2 = log
            .try_clone()
            .map_err(|e| error(format!("dup qemu.log: {e}")))?;
        let mut qemu = cmd
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| error(format!("cannot start {}: {e}", script.display())))?;

        let deadline = Instant::now() + BOOT_TIMEOUT;
        let ctl = connect(&dir.join("ctl.sock"), &mut qemu, deadline, &dir);
        let qmp = ctl.and_then(|ctl| {
            Ok((
                ctl,
                connect(&dir.join("qmp.sock"), &mut qemu, deadline, &dir)?,
            ))
        });
        let (ctl, qmp) = match qmp {
            Ok(pair) => pair,
            Err(e) => {
                let _ = qemu.kill();
                let _ = qemu.wait();
                return Err(error(format!("{e}\nguest files kept in {}", dir.display())));
            }
        };
        let guest = Guest {
            ctl_writer: Mutex::new(
                ctl.try_clone()
                    .map_err(|e| error(format!("dup ctl socket: {e}")))?,
            ),
            ctl: Mutex::new(Ctl {
                reader: LineReader::new(ctl),
                finished: HashMap::new(),
            }),
            qmp: Mutex::new(Qmp {
                writer: qmp
                    .try_clone()
                    .map_err(|e| error(format!("dup qmp socket: {e}")))?,
                reader: LineReader::new(qmp),
                events: Vec::new(),
            }),
            qemu: Mutex::new(qemu),
            dir,
            os: options.os,
            next_id: AtomicU64::new(1),
            keep: AtomicBool::new(false),
        };
        guest.qmp_handshake()?;
        guest.wait_ready(deadline)?;
        Ok(guest)
    }

    /// The per-guest directory (host path == guest path).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The guest's serial console (kernel messages, guest-init errors).
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    /// Keep the guest directory after drop and build an error that points at it.
    /// Mark the guest directory to be kept and build an error with the state of qemu and the
    /// last lines of the console and qemu logs. Never call it holding the `qemu` lock.
    fn fail(&self, message: impl fmt::Display) -> Error {
        self.keep.store(true, Ordering::Relaxed);
        // Give a dying qemu a moment to exit so that its status and last words are shown.
        let mut state = String::from("still running");
        for _ in 0..25 {
            if let Ok(Some(status)) = lock(&self.qemu).try_wait() {
                state = format!("exited ({status})");
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let tail = |path: &Path| {
            let text = fs::read_to_string(path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let mut out = String::new();
            for line in &lines[lines.len().saturating_sub(15)..] {
                out.push_str("\n  | ");
                out.push_str(line);
            }
            out
        };
        let qemu_log = self.dir.join("qemu.log");
        error(format!(
            "{message}\nqemu {state}; guest files kept in {}\nconsole log: {}{}\nqemu log: {}{}",
            self.dir.display(),
            self.console_log().display(),
            tail(&self.console_log()),
            qemu_log.display(),
            tail(&qemu_log),
        ))
    }

    fn wait_ready(&self, deadline: Instant) -> Result<()> {
        let mut ctl = lock(&self.ctl);
        match ctl.reader.next_line(deadline) {
            Ok(Some(line)) if line == "ready" => Ok(()),
            Ok(Some(line)) => {
                Err(self.fail(format!("guest init said '{line}' instead of 'ready'")))
            }
            Ok(None) => Err(self.fail("the guest ended during boot")),
            Err(e) => Err(self.fail(format!(
                "guest init not ready within {}s: {e}",
                BOOT_TIMEOUT.as_secs()
            ))),
        }
    }

    /// Run `argv` in the guest as root, in the host's current directory, and wait for it.
    pub fn run(&self, argv: &[&str]) -> Result<Output> {
        self.spawn(argv, &[])?.wait(COMMAND_TIMEOUT)
    }

    /// Start `argv` in the guest (as root, in the host's current directory) with a small
    /// environment (`PATH`, `HOME=/root`, `LANG`, `WATCHQD_VM_GUEST=1`, the host's `RUST_*` and
    /// WATCHQD_* variables) plus `env`; return at once.
    pub fn spawn(&self, argv: &[&str], env: &[(&str, &str)]) -> Result<GuestProcess<'_>> {
        if argv.is_empty() {
            return Err(error("Guest::spawn: empty command"));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let req = self.dir.join("req").join(id.to_string());
        let write = |name: &str, data: &[u8]| {
            fs::write(req.join(name), data)
                .map_err(|e| error(format!("write {}/{name}: {e}", req.display())))
        };
        fs::create_dir(&req).map_err(|e| error(format!("mkdir {}: {e}", req.display())))?;
        let nul_join = |items: &mut dyn Iterator<Item = String>| {
            let mut buf = Vec::new();
            for item in items {
                buf.extend_from_slice(item.as_bytes());
                buf.push(0);
            }
            buf
        };
        write("argv", &nul_join(&mut argv.iter().map(|s| (*s).to_owned())))?;
        let mut vars = vec![
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned(),
            "HOME=/root".into(),
            "LANG=C.UTF-8".into(),
            "TERM=dumb".into(),
            "WATCHQD_VM_GUEST=1".into(),
        ];
        for (k, v) in std::env::vars() {
            if k.starts_with("RUST_") || k.starts_with("WATCHQD_") {
                vars.push(format!("{k}={v}"));
            }
        }
        vars.extend(env.iter().map(|(k, v)| format!("{k}={v}")));
        write("env", &nul_join(&mut vars.into_iter()))?;
        // The full-OS guest has no host files: its commands run in the shared directory.
        let cwd = if self.os {
            self.dir.clone()
        } else {
            std::env::current_dir().map_err(|e| error(format!("current dir: {e}")))?
        };
        write("cwd", cwd.as_os_str().as_encoded_bytes())?;
        write("stdout", b"")?;
        write("stderr", b"")?;
        {
            let mut writer = lock(&self.ctl_writer);
            writeln!(writer, "run {id}")
                .and_then(|()| writer.flush())
                .map_err(|e| {
                    self.fail(format!("cannot send command {argv:?} to the guest: {e}"))
                })?;
        }
        Ok(GuestProcess {
            guest: self,
            id,
            argv: argv.iter().map(|s| (*s).to_owned()).collect(),
            dir: req,
        })
    }

    fn wait_done(&self, id: u64, argv: &[String], timeout: Duration) -> Result<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.take_done(id, argv, deadline.min(Instant::now() + SLICE))? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                return Err(self.fail(format!(
                    "guest command {argv:?} did not finish within {}s (its output: {})",
                    timeout.as_secs(),
                    self.dir.join("req").join(id.to_string()).display()
                )));
            }
        }
    }

    /// Command `id`'s exit status if it has ended, taken off the record: reads what
    /// the control channel says until `until` (the statuses of other commands are kept
    /// for their own waiters).
    fn take_done(&self, id: u64, argv: &[String], until: Instant) -> Result<Option<i32>> {
        let status = self.done_status(id, argv, until)?;
        if status.is_some() {
            lock(&self.ctl).finished.remove(&id);
        }
        Ok(status)
    }

    /// Command `id`'s exit status if it has ended by `until`, left on the record.
    fn done_status(&self, id: u64, argv: &[String], until: Instant) -> Result<Option<i32>> {
        loop {
            let mut ctl = lock(&self.ctl);
            if let Some(&status) = ctl.finished.get(&id) {
                return Ok(Some(status));
            }
            let line = match ctl.reader.next_line(until) {
                Ok(Some(line)) => line,
                Ok(None) => {
                    return Err(self.fail(format!("the guest ended while running {argv:?}")))
                }
                Err(e) if e.kind() == io::ErrorKind::TimedOut => return Ok(None),
                Err(e) => return Err(self.fail(format!("reading the guest control channel: {e}"))),
            };
            let mut words = line.split_whitespace();
            match (
                words.next(),
                words.next().and_then(|w| w.parse().ok()),
                words.next().and_then(|w| w.parse().ok()),
            ) {
                (Some("done"), Some(done_id), Some(status)) => {
                    ctl.finished.insert(done_id, status);
                }
                _ => return Err(self.fail(format!("unexpected line from guest init: '{line}'"))),
            }
        }
    }

    fn qmp_handshake(&self) -> Result<()> {
        let deadline = Instant::now() + QMP_TIMEOUT;
        let greeting = {
            let mut qmp = lock(&self.qmp);
            qmp.reader.next_line(deadline)
        };
        match greeting {
            Ok(Some(line)) if line.contains("\"QMP\"") => {}
            other => return Err(self.fail(format!("no QMP greeting: {other:?}"))),
        }
        self.qmp(&json!({"execute": "qmp_capabilities"}))
            .map(|_| ())
    }

    /// Send one QMP command (`{"execute": ..., "arguments": ...}`) and return its `return`
    /// value; a QMP `error` becomes an `Err` naming the command. Events read meanwhile are
    /// kept for [`Guest::qmp_wait_event`].
    pub fn qmp(&self, command: &Value) -> Result<Value> {
        let deadline = Instant::now() + QMP_TIMEOUT;
        let mut qmp = lock(&self.qmp);
        writeln!(qmp.writer, "{command}")
            .and_then(|()| qmp.writer.flush())
            .map_err(|e| self.fail(format!("QMP {command}: cannot send: {e}")))?;
        loop {
            let line = match qmp.reader.next_line(deadline) {
                Ok(Some(line)) => line,
                Ok(None) => return Err(self.fail(format!("QMP {command}: qemu closed the socket"))),
                Err(e) => return Err(self.fail(format!("QMP {command}: no answer: {e}"))),
            };
            let reply: Value = serde_json::from_str(&line)
                .map_err(|e| self.fail(format!("QMP {command}: bad JSON '{line}': {e}")))?;
            if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = reply.get("error") {
                return Err(error(format!("QMP {command} failed: {err}")));
            }
            if reply.get("event").is_some() {
                qmp.events.push(reply);
            }
        }
    }

    /// `{"execute": name, "arguments": arguments}`.
    pub fn qmp_execute(&self, name: &str, arguments: &Value) -> Result<Value> {
        self.qmp(&json!({"execute": name, "arguments": arguments}))
    }

    /// Wait for the next QMP event called `name` (e.g. `DEVICE_DELETED`) whose `data`
    /// contains all the fields of `data_subset`; return the whole event.
    pub fn qmp_wait_event(
        &self,
        name: &str,
        data_subset: &Value,
        timeout: Duration,
    ) -> Result<Value> {
        let matches = |ev: &Value| {
            ev["event"] == name
                && data_subset
                    .as_object()
                    .is_none_or(|fields| fields.iter().all(|(k, v)| ev["data"].get(k) == Some(v)))
        };
        let deadline = Instant::now() + timeout;
        loop {
            let mut qmp = lock(&self.qmp);
            if let Some(pos) = qmp.events.iter().position(matches) {
                return Ok(qmp.events.remove(pos));
            }
            let slice = deadline.min(Instant::now() + SLICE);
            let line = match qmp.reader.next_line(slice) {
                Ok(Some(line)) => line,
                Err(e) if e.kind() == io::ErrorKind::TimedOut && Instant::now() < deadline => {
                    continue; // let other threads use QMP meanwhile
                }
                Ok(None) => {
                    return Err(self.fail(format!(
                        "waiting for QMP event {name}: qemu closed the socket"
                    )))
                }
                Err(e) => {
                    return Err(self.fail(format!(
                        "no QMP event {name} {data_subset} within {}s: {e}",
                        timeout.as_secs()
                    )))
                }
            };
            let event: Value = serde_json::from_str(&line)
                .map_err(|e| self.fail(format!("QMP: bad JSON '{line}': {e}")))?;
            qmp.events.push(event);
        }
    }

    /// Ask the guest to power off and wait for qemu to exit (killing it after 30 s). The
    /// full-OS guest's agent does it with `systemctl reboot --force` (the writes to its
    /// snapshot are discarded anyway; the kernel has no ACPI power-off).
    pub fn shutdown(self) -> Result<()> {
        {
            let mut writer = lock(&self.ctl_writer);
            let _ = writeln!(writer, "poweroff 0");
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut qemu = lock(&self.qemu);
        loop {
            match qemu.try_wait() {
                Ok(Some(_)) => return Ok(()),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => {
                    let _ = qemu.kill();
                    drop(qemu);
                    return Err(self.fail("the guest did not power off within 30 s; killed qemu"));
                }
            }
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let qemu = self
            .qemu
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !matches!(qemu.try_wait(), Ok(Some(_))) {
            let _ = qemu.kill();
        }
        let _ = qemu.wait();
        if self.keep.load(Ordering::Relaxed) || std::thread::panicking() {
            eprintln!(
                "watchqd test guest files kept in {} (console log: {})",
                self.dir.display(),
                self.console_log().display()
            );
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

// ---- The two halves of a guest test ----
//
// A guest test is a host half, which boots the guest and drives qemu, and an in-guest half,
// `inside::NAME` of the same test binary (marked `#[ignore]`), which the host half runs in
// the guest with `--ignored --exact`.

impl Guest {
    /// The host half of a guest test: boot a guest with `options`, start `inside::NAME` of
    /// this test binary in it (see [`Guest::spawn_inside`]), let `drive` act from the host
    /// while it runs (QMP, files in [`Guest::dir`]; `|_, _| {}` for nothing), wait up to
    /// `timeout` for it to end, require that it passed, power the guest off and print the
    /// wall time. Panics naming the step that failed.
    pub fn run_inside(
        options: &BootOptions,
        name: &str,
        timeout: Duration,
        drive: impl FnOnce(&Guest, &GuestProcess<'_>),
    ) {
        let started = Instant::now();
        let guest = Guest::boot(options).unwrap_or_else(|e| panic!("booting the test guest: {e}"));
        let inside = guest
            .spawn_inside(name)
            .unwrap_or_else(|e| panic!("starting the in-guest test: {e}"));
        drive(&guest, &inside);
        let out = inside
            .wait(timeout)
            .unwrap_or_else(|e| panic!("the in-guest test: {e}"));
        out.assert_inside_passed();
        guest.shutdown().expect("guest shutdown");
        println!("guest test wall time: {:?}", started.elapsed());
    }

    /// Start `inside::NAME` of this test binary in the guest, alone and with its output
    /// shown (`--ignored --exact --nocapture --test-threads=1`, `RUST_BACKTRACE=1`).
    pub fn spawn_inside(&self, name: &str) -> Result<GuestProcess<'_>> {
        let exe = std::env::current_exe().map_err(|e| error(format!("current_exe: {e}")))?;
        let exe = exe
            .to_str()
            .ok_or_else(|| error(format!("test binary path {} is not UTF-8", exe.display())))?;
        let filter = format!("inside::{name}");
        self.spawn(
            &[
                exe,
                "--ignored",
                "--exact",
                &filter,
                "--nocapture",
                "--test-threads=1",
            ],
            &[("RUST_BACKTRACE", "1")],
        )
    }
}

impl Output {
    /// Print the in-guest test run and require that it ran its one test and passed.
    pub fn assert_inside_passed(&self) {
        println!("{self}");
        assert!(
            self.success() && self.stdout.contains("test result: ok. 1 passed"),
            "the in-guest test did not pass:\n{self}"
        );
    }
}

/// The first line of every in-guest half: fail at once outside the test guest.
pub fn require_guest() {
    assert!(
        std::env::var_os("WATCHQD_VM_GUEST").is_some(),
        "this test only runs inside the watchqd test guest (see tests/vm); the host test \
         that boots it starts it"
    );
}

/// The start of an in-guest half that runs the daemon: [`require_guest`], then drop the
/// `WATCHQD_VM_GUEST` marker. run-in-guest sets it, but the daemon reads every `WATCHQD_*`
/// variable as a configuration override and refuses an unknown key, and it inherits this
/// process's environment. Call it while this is the only thread (no runtime yet;
/// `--test-threads=1`).
pub fn enter_guest() {
    require_guest();
    std::env::remove_var("WATCHQD_VM_GUEST");
}

/// Inside the guest: the directory shared with the host (the host's [`Guest::dir`], mounted
/// at the same path), as `guest-init` finds it: `watchqd.shared=` on the kernel command line.
/// What an in-guest half writes there, the host reads at once (the share is `cache=none`).
/// Panics outside the guest, whose command line has no such word.
pub fn shared_dir() -> PathBuf {
    let cmdline = fs::read_to_string("/proc/cmdline").expect("read /proc/cmdline");
    cmdline
        .split_whitespace()
        .find_map(|word| word.strip_prefix("watchqd.shared="))
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("no watchqd.shared= on the guest's command line: {cmdline}"))
}

/// Run an in-guest half's async body on a two-worker tokio runtime.
pub fn block_on<F: std::future::Future>(test: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(test)
}

/// A command started with [`Guest::spawn`].
pub struct GuestProcess<'g> {
    guest: &'g Guest,
    id: u64,
    argv: Vec<String>,
    dir: PathBuf,
}

impl GuestProcess<'_> {
    /// Its standard output so far.
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&fs::read(self.dir.join("stdout")).unwrap_or_default()).into_owned()
    }

    /// Its standard error so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&fs::read(self.dir.join("stderr")).unwrap_or_default()).into_owned()
    }

    /// Wait until its standard output contains `needle` (polling the shared file).
    pub fn wait_for_stdout(&self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.stdout().contains(needle) {
                return Ok(());
            }
            // Ended without printing it: no use waiting out the timeout (its output
            // may have come between the look above and its end, so look once more).
            let ended = self.guest.done_status(
                self.id,
                &self.argv,
                Instant::now() + Duration::from_millis(20),
            )?;
            if let Some(status) = ended.filter(|_| !self.stdout().contains(needle)) {
                // Not the guest's failure: a test that panics on it keeps the guest's
                // directory anyway.
                return Err(error(format!(
                    "guest command {:?} ended with status {status} without printing '{needle}'\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    self.argv,
                    self.stdout(),
                    self.stderr()
                )));
            }
            if Instant::now() >= deadline {
                return Err(self.guest.fail(format!(
                    "guest command {:?} did not print '{needle}' within {}s\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    self.argv,
                    timeout.as_secs(),
                    self.stdout(),
                    self.stderr()
                )));
            }
        }
    }

    /// Wait for it to end and collect its output.
    pub fn wait(self, timeout: Duration) -> Result<Output> {
        let status = self.guest.wait_done(self.id, &self.argv, timeout)?;
        Ok(Output {
            status,
            stdout: self.stdout(),
            stderr: self.stderr(),
            argv: self.argv,
        })
    }
}
