//! Test harness: a real private system bus (dbus-daemon with the project's own policy
//! file), the real daemon binary, real loop devices, and a client that records signals.
//! Nothing here is mocked; every wait has a timeout and says what it waited for.
#![allow(dead_code)]

pub mod ext4;
pub mod lines;
pub mod mounts;
pub mod polkit;
pub mod portal;
pub mod private_bus;
pub mod prometheus;
pub mod scope;
pub mod sources;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use zbus::{Connection, OwnedObjectPath, OwnedVariant, Variant};

use watchqd::client::{Item, LostBody, Subscription, SubscriptionProxy, WatchRemovedBody};
use watchqd::signal::EventSignal;
use watchqd::source::blockerr::signal::BlockError;
use watchqd::source::devices::signal::DeviceChanged;
use watchqd::source::filesystems::signal::FilesystemError;
use watchqd::source::keys::signal::KeyChanged;
use watchqd::source::mounts::signal::MountChanged;
use watchqd::source::quota::signal::QuotaWarning;
use watchqd::source::space::signal::SpaceWarning;

pub const TIMEOUT: Duration = Duration::from_secs(30);

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A private system bus (dbus-daemon, or dbus-broker with `WATCHQD_TEST_BUS=dbus-broker`)
/// configured like the system bus, with `dbus/org.watchq1.conf`.
pub struct PrivateBus {
    child: Child,
    pub address: String,
    pub dir: tempfile::TempDir,
}

impl PrivateBus {
    /// The process that routes the messages (dbus-daemon, or dbus-broker under its
    /// launcher).
    pub fn pid(&self) -> u32 {
        private_bus::server_pid(self.child.id())
    }

    pub fn start() -> PrivateBus {
        let dir = tempfile::Builder::new()
            .prefix("watchq-bus-")
            .tempdir()
            .expect("temporary directory");
        // Other users' clients must reach the socket.
        fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("chmod bus dir");
        let (child, address) =
            private_bus::spawn(&repo(), dir.path(), TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
        PrivateBus {
            child,
            address,
            dir,
        }
    }
}

impl Drop for PrivateBus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The real `watchqd` binary on a private bus, started like systemd starts it: ready when
/// it sends READY=1 on `$NOTIFY_SOCKET`.
pub struct Daemon {
    child: Child,
    /// Dropped before the bus; present when started with [`Daemon::with_polkit`].
    pub polkit: Option<polkit::Polkitd>,
    pub bus: PrivateBus,
    pub log: PathBuf,
}

impl Daemon {
    pub fn start() -> Daemon {
        Daemon::with_config("")
    }

    pub fn with_config(toml: &str) -> Daemon {
        Daemon::launch(toml, false)
    }

    /// The daemon with a real polkitd on its bus (root callers never need one).
    pub fn with_polkit(toml: &str) -> Daemon {
        Daemon::launch(toml, true)
    }

    fn launch(toml: &str, with_polkit: bool) -> Daemon {
        Daemon::launch_with(toml, with_polkit, Vec::new())
    }

    /// The daemon started as systemd starts it from `watchqd.socket`: `sockets` become
    /// descriptors 3, 4, … with `LISTEN_FDS` and `LISTEN_PID` set.
    pub fn with_passed_sockets(toml: &str, sockets: Vec<std::os::fd::OwnedFd>) -> Daemon {
        Daemon::launch_with(toml, false, sockets)
    }

    fn launch_with(toml: &str, with_polkit: bool, sockets: Vec<std::os::fd::OwnedFd>) -> Daemon {
        tracefs_mounted();
        let bus = PrivateBus::start();
        let polkit = with_polkit.then(|| polkit::Polkitd::start(&bus.address, bus.dir.path()));
        let config = bus.dir.path().join("watchqd.toml");
        fs::write(&config, toml).expect("write config");
        let log = bus.dir.path().join("watchqd.log");
        let child = start_watchqd(&bus, &config, &log, sockets, false);
        Daemon {
            child,
            polkit,
            bus,
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A crash and a restart, as systemd's `Restart=on-failure` makes one: SIGKILL (no
    /// clean-up; the bus sees the connection drop and the name lose its owner), then the
    /// daemon again with the same configuration on the **same** bus, returning once it
    /// sent READY=1 (it owns the name by then). Its log is appended to the same file.
    pub fn crash_and_restart(&mut self) {
        self.crash();
        self.restart();
    }

    /// SIGKILL, and waits until the process is gone (the bus then drops its name).
    pub fn crash(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The configuration file the daemon reads; rewrite it before [`Daemon::restart`] to
    /// restart with another configuration.
    pub fn config_path(&self) -> std::path::PathBuf {
        self.bus.dir.path().join("watchqd.toml")
    }

    /// Starts the daemon again after [`Daemon::crash`]: same configuration, same bus.
    pub fn restart(&mut self) {
        let config = self.bus.dir.path().join("watchqd.toml");
        self.child = start_watchqd(&self.bus, &config, &self.log, Vec::new(), true);
    }

    /// Inodes of the daemon's open netlink sockets of one protocol.
    pub fn netlink_socket_inodes(&self, protocol: u32) -> std::collections::HashSet<u64> {
        netlink_socket_inodes(self.pid(), protocol)
    }

    pub fn address(&self) -> &str {
        &self.bus.address
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Open file descriptors of the daemon.
    pub fn fd_count(&self) -> usize {
        fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .expect("daemon fds")
            .count()
    }

    /// Resident memory of the daemon in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }

    /// The daemon's open `NETLINK_KOBJECT_UEVENT` sockets.
    pub fn uevent_sockets(&self) -> usize {
        self.netlink_sockets(15)
    }

    /// The daemon's open netlink sockets of one protocol (15 uevent, 16 generic).
    pub fn netlink_sockets(&self, protocol: u32) -> usize {
        self.netlink_socket_inodes(protocol).len()
    }

    pub async fn connect(&self) -> Connection {
        watchqd::client::connect(Some(self.address()))
            .await
            .expect("connect to the private bus")
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid() as i32), signal)
            .expect("signal the daemon");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGCONT,
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- watchqd log ({}):\n{}",
                self.log.display(),
                self.log_text()
            );
        }
    }
}

/// Starts watchqd on `bus` and waits for READY=1 on `$NOTIFY_SOCKET`.
fn start_watchqd(
    bus: &PrivateBus,
    config: &Path,
    log: &Path,
    sockets: Vec<std::os::fd::OwnedFd>,
    append_log: bool,
) -> Child {
    let notify_path = bus.dir.path().join("notify");
    // A previous instance's socket file stays behind.
    let _ = fs::remove_file(&notify_path);
    let notify = UnixDatagram::bind(&notify_path).expect("notify socket");
    notify.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    let log_file = fs::File::options()
        .create(true)
        .write(true)
        .append(append_log)
        .truncate(!append_log)
        .open(log)
        .expect("daemon log");
    let mut child = daemon_command(sockets)
        .arg("--config")
        .arg(config)
        .args(["--log-level", "debug"])
        .env("DBUS_SYSTEM_BUS_ADDRESS", &bus.address)
        .env("NOTIFY_SOCKET", &notify_path)
        .env_remove("RUST_LOG")
        .stderr(log_file)
        .spawn()
        .expect("start watchqd");
    let mut buf = [0u8; 4096];
    loop {
        match notify.recv(&mut buf) {
            Ok(n) => {
                if String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .any(|l| l == "READY=1")
                {
                    return child;
                }
            }
            // A receive timeout makes the call fail with EINTR, not restart, when this
            // process is stopped and continued or catches a signal meanwhile.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "watchqd did not send READY=1 ({e}); log:\n{}",
                    fs::read_to_string(log).unwrap_or_default()
                )
            }
        }
    }
}

/// A loop device backed by a sparse file, detached on drop.
pub struct LoopDevice {
    attached: std::cell::Cell<bool>,
    pub device: String,
    pub name: String,
    pub backing: PathBuf,
    _dir: tempfile::TempDir,
}

impl LoopDevice {
    pub fn attach(size_mib: u64) -> LoopDevice {
        let dir = tempfile::tempdir().expect("temporary directory");
        let backing = dir.path().join("disk.img");
        let file = fs::File::create(&backing).expect("backing file");
        file.set_len(size_mib * 1024 * 1024)
            .expect("size backing file");
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&backing)
            .output()
            .expect("losetup must be installed (util-linux)");
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let device = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let name = device.trim_start_matches("/dev/").to_owned();
        LoopDevice {
            attached: std::cell::Cell::new(true),
            device,
            name,
            backing,
            _dir: dir,
        }
    }

    pub fn sys_path(&self) -> String {
        format!("/devices/virtual/block/{}", self.name)
    }

    /// A real kernel uevent: writing an action to the device's `uevent` file makes the
    /// kernel emit it (`kobject_synth_uevent`).
    pub fn synth_change(&self) {
        fs::write(format!("/sys/block/{}/uevent", self.name), "change")
            .expect("write /sys/block/N/uevent");
    }

    pub fn detach(&self) {
        if self.attached.replace(false) {
            run("losetup", &["-d", &self.device]);
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        // Never panic here: a test may already be failing.
        if self.attached.get() {
            let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
        }
    }
}

/// A loop device whose backing file was truncated from 8 MiB to 1 MiB after attaching:
/// reads past 1 MiB fail in the block layer with EIO.
pub fn shrunk_loop_device() -> LoopDevice {
    let disk = LoopDevice::attach(8);
    fs::OpenOptions::new()
        .write(true)
        .open(&disk.backing)
        .expect("backing file")
        .set_len(1 << 20)
        .expect("truncate the backing file");
    disk
}

/// A kobject-uevent netlink socket bound to `groups` (1: the kernel's uevents; 0: none,
/// a forger's socket).
pub fn uevent_socket(groups: u32) -> std::os::fd::OwnedFd {
    use nix::sys::socket::{self, AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType};
    use std::os::fd::AsRawFd;
    let fd = socket::socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkKObjectUEvent,
    )
    .expect("uevent socket");
    socket::bind(fd.as_raw_fd(), &NetlinkAddr::new(0, groups)).expect("bind");
    fd
}

/// The device path of [`forge_uevents`]' forgeries.
pub const FORGED_DEVPATH: &str = "/devices/virtual/block/forged0";

/// Multicasts `count` forged `add` uevents of a block device `forged0` from userspace to
/// the kernel's uevent group, as root in the initial network namespace may.
pub fn forge_uevents(count: usize) {
    let path = FORGED_DEVPATH;
    use nix::sys::socket::{self, MsgFlags, NetlinkAddr};
    use std::os::fd::AsRawFd;
    let forger = uevent_socket(0);
    let forged = format!(
        "add@{path}\0ACTION=add\0DEVPATH={path}\0SUBSYSTEM=block\0SEQNUM=1\0DEVNAME=forged0\0DEVTYPE=disk\0"
    );
    for _ in 0..count {
        socket::sendto(
            forger.as_raw_fd(),
            forged.as_bytes(),
            &NetlinkAddr::new(0, 1),
            MsgFlags::empty(),
        )
        .expect("multicast a forged uevent");
    }
}

/// One 4 KiB `O_DIRECT` read at `sector` of a block device, which must fail (past the
/// end of a shrunk loop device's backing file, or at a blkdebug-injected sector);
/// returns its error.
pub fn failing_read(device: &str, sector: u64) -> std::io::Error {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_DIRECT)
        .open(device)
        .unwrap_or_else(|e| panic!("open {device} O_DIRECT: {e}"));
    let layout = std::alloc::Layout::from_size_align(4096, 4096).unwrap();
    // SAFETY: non-zero size; freed below with the same layout.
    let buf = unsafe { std::alloc::alloc(layout) };
    assert!(!buf.is_null());
    // SAFETY: buf is a live 4096-byte allocation; the offset is sector-aligned.
    let n = unsafe {
        nix::libc::pread(
            file.as_raw_fd(),
            buf.cast(),
            4096,
            nix::libc::off_t::try_from(sector * 512).unwrap(),
        )
    };
    let err = std::io::Error::last_os_error();
    // SAFETY: allocated above with this layout.
    unsafe { std::alloc::dealloc(buf, layout) };
    assert!(
        n < 0,
        "the read at sector {sector} of {device} succeeded ({n} bytes): expected an error"
    );
    err
}

pub fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A signal from a subscription, decoded.
#[derive(Debug, Clone)]
pub enum Signal {
    Device {
        seq: u64,
        tag: u64,
        action: String,
        subsystem: String,
        sys_path: String,
        attributes: HashMap<String, OwnedVariant>,
        properties: BTreeMap<String, String>,
    },
    Lost {
        seq: u64,
        count: u64,
        source: String,
        reason: String,
    },
    WatchRemoved {
        seq: u64,
        tag: u64,
        reason: String,
    },
    BlockError {
        seq: u64,
        tag: u64,
        device: String,
        major: u32,
        minor: u32,
        sector: u64,
        sectors: u32,
        operation: String,
        errno_name: String,
        errno: i32,
        count: u64,
        attributes: HashMap<String, OwnedVariant>,
    },
    QuotaWarning {
        seq: u64,
        tag: u64,
        warning: String,
        kind: String,
        resource: String,
        quota_type: String,
        excess_id: u64,
        caused_id: u64,
        device: String,
        major: u32,
        minor: u32,
        attributes: HashMap<String, OwnedVariant>,
    },
    FilesystemError {
        seq: u64,
        tag: u64,
        kind: String,
        device: String,
        major: u32,
        minor: u32,
        fs_type: String,
        mount_point: String,
        errno_name: String,
        errno: i32,
        error_count: u32,
        inode: u64,
        attributes: HashMap<String, OwnedVariant>,
    },
    SpaceWarning {
        seq: u64,
        tag: u64,
        state: String,
        level: String,
        path: String,
        mount_point: String,
        available_bytes: u64,
        total_bytes: u64,
        threshold_bytes: u64,
        attributes: HashMap<String, OwnedVariant>,
    },
    Mount {
        seq: u64,
        tag: u64,
        change: String,
        mount_id: u64,
        parent_id: u64,
        mount_point: String,
        source: String,
        fs_type: String,
        options: String,
        attributes: HashMap<String, OwnedVariant>,
    },
    Key {
        seq: u64,
        tag: u64,
        change: String,
        key: i32,
        aux: i32,
        key_type: String,
        description: String,
        attributes: HashMap<String, OwnedVariant>,
    },
}

impl Signal {
    pub fn seq(&self) -> u64 {
        match self {
            Signal::Device { seq, .. }
            | Signal::Lost { seq, .. }
            | Signal::WatchRemoved { seq, .. }
            | Signal::BlockError { seq, .. }
            | Signal::QuotaWarning { seq, .. }
            | Signal::FilesystemError { seq, .. }
            | Signal::SpaceWarning { seq, .. }
            | Signal::Mount { seq, .. }
            | Signal::Key { seq, .. } => *seq,
        }
    }

    /// How many sequence numbers the signal stands for.
    pub fn span(&self) -> u64 {
        match self {
            Signal::Lost { count, .. } => (*count).max(1),
            _ => 1,
        }
    }

    /// The typed attributes of a signal that carries them.
    pub fn attributes(&self) -> Option<&HashMap<String, OwnedVariant>> {
        match self {
            Signal::Device { attributes, .. }
            | Signal::BlockError { attributes, .. }
            | Signal::QuotaWarning { attributes, .. }
            | Signal::FilesystemError { attributes, .. }
            | Signal::SpaceWarning { attributes, .. }
            | Signal::Mount { attributes, .. }
            | Signal::Key { attributes, .. } => Some(attributes),
            _ => None,
        }
    }

    pub fn attr_str(&self, key: &str) -> Option<String> {
        self.attributes()?
            .get(key)
            .and_then(|v| <&str>::try_from(&**v).ok())
            .map(str::to_owned)
    }

    pub fn attr_u64(&self, key: &str) -> Option<u64> {
        self.attributes()?.get(key).and_then(|v| match &**v {
            Variant::U64(n) => Some(*n),
            Variant::U32(n) => Some(u64::from(*n)),
            _ => None,
        })
    }

    pub fn attr_bool(&self, key: &str) -> Option<bool> {
        self.attributes()?
            .get(key)
            .and_then(|v| bool::try_from(&**v).ok())
    }
}

/// An event signal decoded into its source's typed struct, when it is that signal.
fn typed<S: EventSignal>(message: &zbus::Message) -> Option<S> {
    watchqd::client::event::<S>(message)
        .map(|body| body.unwrap_or_else(|e| panic!("{} body: {e}", S::MEMBER)))
}

/// The test's view of a signal, decoded through the sources' own signal types.
pub fn decode(message: &zbus::Message) -> Option<Signal> {
    if let Some(s) = typed::<DeviceChanged>(message) {
        return Some(Signal::Device {
            seq: s.seq,
            tag: s.tag,
            action: s.action.into_owned(),
            subsystem: s.subsystem.into_owned(),
            sys_path: s.sys_path.into_owned(),
            attributes: s.attributes.into_map().into_iter().collect(),
            properties: s.properties.into_owned(),
        });
    }
    if let Some(s) = typed::<BlockError>(message) {
        return Some(Signal::BlockError {
            seq: s.seq,
            tag: s.tag,
            device: s.device.into_owned(),
            major: s.major,
            minor: s.minor,
            sector: s.sector,
            sectors: s.sectors,
            operation: s.operation.into_owned(),
            errno_name: s.errno_name.into_owned(),
            errno: s.errno,
            count: s.count,
            attributes: s.attributes.into_map().into_iter().collect(),
        });
    }
    if let Some(s) = typed::<QuotaWarning>(message) {
        return Some(Signal::QuotaWarning {
            seq: s.seq,
            tag: s.tag,
            warning: s.warning.into_owned(),
            kind: s.kind.into_owned(),
            resource: s.resource.into_owned(),
            quota_type: s.quota_type.into_owned(),
            excess_id: s.excess_id,
            caused_id: s.caused_id,
            device: s.device.into_owned(),
            major: s.major,
            minor: s.minor,
            attributes: s.attributes.into_map().into_iter().collect(),
        });
    }
    if let Some(s) = typed::<FilesystemError>(message) {
        return Some(Signal::FilesystemError {
            seq: s.seq,
            tag: s.tag,
            kind: s.kind.into_owned(),
            device: s.device.into_owned(),
            major: s.major,
            minor: s.minor,
            fs_type: s.fs_type.into_owned(),
            mount_point: s.mount_point.into_owned(),
            errno_name: s.errno_name.into_owned(),
            errno: s.errno,
            error_count: s.error_count,
            inode: s.inode,
            attributes: s.attributes.into_map().into_iter().collect(),
        });
    }
    if let Some(s) = typed::<SpaceWarning>(message) {
        return Some(Signal::SpaceWarning {
            seq: s.seq,
            tag: s.tag,
            state: s.state.into_owned(),
            level: s.level.into_owned(),
            path: s.path.into_owned(),
            mount_point: s.mount_point.into_owned(),
            available_bytes: s.available_bytes,
            total_bytes: s.total_bytes,
            threshold_bytes: s.threshold_bytes,
            attributes: s.attributes.into_map().into_iter().collect(),
        });
    }
    if let Some(s) = typed::<MountChanged>(message) {
        return Some(Signal::Mount {
            seq: s.seq,
            tag: s.tag,
            change: s.change.into_owned(),
            mount_id: s.mount_id,
            parent_id: s.parent_id,
            mount_point: s.mount_point.into_owned(),
            source: s.source.into_owned(),
            fs_type: s.fs_type.into_owned(),
            options: s.options.into_owned(),
            attributes: s.attributes.into_map().into_iter().collect(),
        });
    }
    if let Some(s) = typed::<KeyChanged>(message) {
        return Some(Signal::Key {
            seq: s.seq,
            tag: s.tag,
            change: s.change.into_owned(),
            key: s.key,
            aux: s.aux,
            key_type: s.key_type.into_owned(),
            description: s.description.into_owned(),
            attributes: s.attributes.into_map().into_iter().collect(),
        });
    }
    let header = message.header();
    let body = message.body();
    match header.member()?.as_str() {
        "Lost" => {
            let (seq, count, source, reason) = body.deserialize::<LostBody>().expect("Lost body");
            Some(Signal::Lost {
                seq,
                count,
                source,
                reason,
            })
        }
        "WatchRemoved" => {
            let (seq, tag, reason) = body
                .deserialize::<WatchRemovedBody>()
                .expect("WatchRemoved body");
            Some(Signal::WatchRemoved { seq, tag, reason })
        }
        _ => None,
    }
}

/// A subscription with a signal stream opened before any watch exists. It is a
/// [`watchqd::client::Subscription`], so it receives only what the daemon holding it sent.
pub struct Subscriber {
    pub conn: Connection,
    pub path: OwnedObjectPath,
    pub proxy: SubscriptionProxy<'static>,
    subscription: Subscription,
    /// Every signal received so far, in order.
    pub received: Vec<Signal>,
}

impl Subscriber {
    pub async fn new(daemon: &Daemon) -> Subscriber {
        Subscriber::with_options(daemon, HashMap::new()).await
    }

    pub async fn with_options(daemon: &Daemon, options: HashMap<&str, Variant<'_>>) -> Subscriber {
        let conn = daemon.connect().await;
        Subscriber::on(conn, options).await
    }

    pub async fn on(conn: Connection, options: HashMap<&str, Variant<'_>>) -> Subscriber {
        let mut builder = Subscription::builder(&conn)
            .max_queued(std::num::NonZeroUsize::new(100_000).expect("non-zero"));
        for (key, value) in options {
            builder = builder.option(key, value.try_to_owned().expect("owned option"));
        }
        let subscription = builder.build().await.expect("Subscribe");
        let path = subscription.path().expect("subscribed").clone();
        let proxy = SubscriptionProxy::builder(&conn)
            .path(path.clone())
            .build()
            .await
            .expect("subscription proxy");
        Subscriber {
            conn,
            path,
            proxy,
            subscription,
            received: Vec::new(),
        }
    }

    pub async fn watch(&self, kind: &str, tag: u64, spec: &[(&str, Variant<'_>)]) {
        let spec = spec
            .iter()
            .map(|(k, v)| (*k, v.try_clone().expect("clone variant")))
            .collect();
        self.proxy
            .add_watch(kind, tag, spec)
            .await
            .expect("AddWatch");
    }

    /// The next signal, or `None` after `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Option<Signal> {
        loop {
            let item = tokio::time::timeout(timeout, self.subscription.next())
                .await
                .ok()??;
            match item.expect("subscription item") {
                Item::Signal(message) => {
                    if let Some(signal) = decode(&message) {
                        self.received.push(signal.clone());
                        return Some(signal);
                    }
                }
                // Tests that restart the daemon use `Subscription` itself.
                other => panic!("the daemon went away under a Subscriber: {other:?}"),
            }
        }
    }

    /// Receives until `done` holds for the signals received so far, failing after
    /// [`TIMEOUT`] without progress.
    pub async fn until(&mut self, what: &str, mut done: impl FnMut(&[Signal]) -> bool) {
        let start = Instant::now();
        while !done(&self.received) {
            if self.next(TIMEOUT).await.is_none() {
                panic!(
                    "waited {:?} for {what}; received {} signals, last: {:?}",
                    start.elapsed(),
                    self.received.len(),
                    self.received.last()
                );
            }
        }
    }

    /// Receives every signal that arrives within `window`, however many: for checks that
    /// nothing unwanted came, where taking one signal could stop before the unwanted one.
    /// Ends at the deadline whatever the daemon sends. Returns how many arrived.
    pub async fn receive_for(&mut self, window: Duration) -> usize {
        let end = Instant::now() + window;
        let mut count = 0;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() || self.next(left).await.is_none() {
                return count;
            }
            count += 1;
        }
    }

    /// Signals about one device.
    pub fn about<'a>(&'a self, sys_path: &'a str) -> impl Iterator<Item = &'a Signal> + 'a {
        self.received
            .iter()
            .filter(move |s| matches!(s, Signal::Device { sys_path: p, .. } if p == sys_path))
    }
}

/// Asserts that sequence numbers start at 1 and grow by each signal's span, no gap, no
/// repeat.
pub fn assert_contiguous(signals: &[Signal]) {
    let mut expected = 1;
    for signal in signals {
        assert_eq!(
            signal.seq(),
            expected,
            "sequence gap or repeat at {signal:?}"
        );
        expected += signal.span();
    }
}

/// The error name of a failed call.
pub fn error_name<T: std::fmt::Debug>(result: zbus::Result<T>) -> String {
    match result {
        Err(zbus::Error::MethodError(name, _, _)) => name.to_string(),
        Err(zbus::Error::FDO(e)) => zbus::DBusError::name(&*e).to_string(),
        other => panic!("expected a D-Bus error, got {other:?}"),
    }
}

pub fn path_exists(path: &Path) -> bool {
    path.exists()
}

/// The daemon binary the harness runs: this build's, or `$WATCHQD_DAEMON` when set — a
/// benchmark measures an earlier build against this one that way, e.g.
/// `WATCHQD_DAEMON=/tmp/watchqd-before cargo bench --bench delivery`.
pub fn daemon_binary() -> PathBuf {
    std::env::var_os("WATCHQD_DAEMON").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_watchqd")),
        PathBuf::from,
    )
}

/// The watchqd binary; with `sockets`, as socket activation runs it (descriptors from 3,
/// `LISTEN_FDS`, and `LISTEN_PID` naming the daemon itself, set by a shell that execs it).
pub fn daemon_command(sockets: Vec<std::os::fd::OwnedFd>) -> Command {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    if sockets.is_empty() {
        return Command::new(daemon_binary());
    }
    let mut command = Command::new("/bin/sh");
    command
        .args(["-c", "LISTEN_PID=$$ exec \"$0\" \"$@\""])
        .arg(daemon_binary())
        .env("LISTEN_FDS", sockets.len().to_string());
    // SAFETY: only fcntl and dup2, which are async-signal-safe, run between fork and exec.
    // The closure owns the sockets, so the parent's copies close when the Command goes.
    unsafe {
        command.pre_exec(move || {
            // Copies above every target first, so that no dup2 overwrites a socket not
            // yet moved; the copies close at exec, the targets stay.
            let high: Vec<i32> = sockets
                .iter()
                .map(|fd| nix::libc::fcntl(fd.as_raw_fd(), nix::libc::F_DUPFD_CLOEXEC, 100))
                .collect();
            for (target, &fd) in (3..).zip(&high) {
                if fd < 0 || nix::libc::dup2(fd, target) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    command
}

/// Inodes of the netlink sockets of `protocol` (15 uevent, 16 generic) open in `pid`.
pub fn netlink_socket_inodes(pid: u32, protocol: u32) -> std::collections::HashSet<u64> {
    let inodes: Vec<String> = fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("process fds")
        .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .filter_map(|t| {
            t.to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')
                .map(str::to_owned)
        })
        .collect();
    let protocol = protocol.to_string();
    let table = fs::read_to_string("/proc/net/netlink").expect("/proc/net/netlink");
    // Counted by inode: the kernel walks a hash table that other tests' sockets may be
    // resizing, and a walk during a resize can list one socket twice.
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // sk Eth Pid Groups Rmem Wmem Dump Locks Drops Inode
            (cols.len() >= 10 && cols[1] == protocol && inodes.iter().any(|i| i == cols[9]))
                .then(|| cols[9].parse().ok())
                .flatten()
        })
        .collect()
}

/// A subscriber that reads nothing: `watchqctl monitor --bus --json` watching the device
/// `name` with a queue of `depth` events, stopped with SIGSTOP once it watches, so that
/// it answers no Ping and its socket fills up. On the bus path: the direct path's
/// stalled reader is `tests/direct.rs`'s. Resume it with SIGCONT; its stdout then
/// gives one JSON object per signal.
pub fn stalled_monitor(daemon: &Daemon, name: &str, depth: u32) -> Child {
    use std::io::BufRead;
    let mut stalled = Command::new(env!("CARGO_BIN_EXE_watchqctl"))
        .args([
            "--address",
            daemon.address(),
            "monitor",
            "--bus",
            "--json",
            "--queue-depth",
        ])
        .arg(depth.to_string())
        .arg(format!("--match=name={name}"))
        .arg("devices")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("watchqctl");
    let mut stderr = std::io::BufReader::new(stalled.stderr.take().expect("stderr"));
    let mut line = String::new();
    stderr.read_line(&mut line).expect("watchqctl's first line");
    assert!(line.starts_with("watching"), "watchqctl: {line}");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(stalled.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
    stalled
}

/// Context switches of every thread of a process: each one is a wakeup.
pub fn context_switches(pid: u32) -> u64 {
    let mut total = 0;
    for task in fs::read_dir(format!("/proc/{pid}/task"))
        .expect("tasks")
        .flatten()
    {
        let status = fs::read_to_string(task.path().join("status")).unwrap_or_default();
        for line in status.lines() {
            if let Some(v) = line
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                total += v.trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    total
}

/// utime + stime of a process, in clock ticks.
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the command: state is index 0, utime is 11, stime 12.
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .expect("stat format")
        .1
        .split(' ')
        .collect();
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

/// tracefs must be mounted for the source to find the event (systemd mounts it on every
/// boot; a bare CI container may not have). Mounting it is the test bed's set-up, done
/// before every daemon starts, so that no test depends on another having run first.
pub fn tracefs_mounted() {
    let event = std::path::Path::new("/sys/kernel/tracing/events/block/block_rq_error");
    if !event.exists() {
        let out = std::process::Command::new("mount")
            .args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"])
            .output()
            .expect("mount(8)");
        assert!(
            event.exists(),
            "block:block_rq_error is not available: tracefs is not mounted at /sys/kernel/tracing \
             and mounting it failed ({}), or the kernel lacks CONFIG_BLK_DEV_IO_TRACE",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
}
