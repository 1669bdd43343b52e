//! Tests of the real-kernel test bed itself (tests/vm, tests/common/vm.rs).
//!
//! Each host test boots its own guest and re-runs this test binary inside it with
//! `--ignored --exact inside::NAME`; the `inside::*` tests do the kernel-facing work and only
//! make sense in the guest (they refuse to run elsewhere). The host side drives QMP.
//! Run with: `cargo test --test guest` (as root, after `tests/vm/setup-host`).

#[path = "common/keyctl.rs"]
mod keyctl;
#[path = "common/loop_ext4.rs"]
mod loop_ext4;
#[path = "common/vm.rs"]
mod vm;

use std::time::Duration;

use serde_json::json;

const STEP: Duration = Duration::from_secs(120);

#[test]
fn key_watch_enopkg_on_host_and_records_in_guest() {
    // The host kernel has no watch_queue: the probe must say so cleanly.
    match keyctl::notification_pipe() {
        Err(e) => assert_eq!(
            e.raw_os_error(),
            Some(nix::libc::ENOPKG),
            "pipe2(O_NOTIFICATION_PIPE) on the host: expected ENOPKG, got {e}"
        ),
        Ok(_) => panic!(
            "pipe2(O_NOTIFICATION_PIPE) succeeded on the host: this test expects a host kernel \
             without CONFIG_WATCH_QUEUE (BRIEF section 2)"
        ),
    }
    vm::Guest::run_inside(
        &vm::BootOptions::new(),
        "key_watch_delivers_records",
        STEP,
        |_, _| {},
    );
}

#[test]
fn usb_hotplug_uevents() {
    vm::Guest::run_inside(
        &vm::BootOptions::new().hotplug(),
        "usb_uevents",
        STEP,
        plug_and_unplug_usb,
    );
}

fn plug_and_unplug_usb(guest: &vm::Guest, listener: &vm::GuestProcess<'_>) {
    listener
        .wait_for_stdout("READY", STEP)
        .expect("uevent listener ready");

    guest
        .qmp_execute(
            "device_add",
            &json!({"driver": "usb-kbd", "bus": "xhci.0", "id": "kbd0"}),
        )
        .expect("device_add usb-kbd");
    listener
        .wait_for_stdout("SEEN add usb-kbd", STEP)
        .expect("usb-kbd add uevent");
    guest
        .qmp_execute("device_del", &json!({"id": "kbd0"}))
        .expect("device_del usb-kbd");
    listener
        .wait_for_stdout("SEEN remove usb-kbd", STEP)
        .expect("usb-kbd remove uevent");

    let image = guest.dir().join("stick.img");
    std::fs::write(&image, vec![0u8; 4 << 20]).expect("create the usb-storage image");
    guest
        .qmp_execute("blockdev-add", &vm::raw_blockdev("stick", &image))
        .expect("blockdev-add stick");
    guest
        .qmp_execute(
            "device_add",
            &json!({"driver": "usb-storage", "bus": "xhci.0", "drive": "stick", "id": "stick0"}),
        )
        .expect("device_add usb-storage");
    listener
        .wait_for_stdout("SEEN add usb-disk", STEP)
        .expect("usb disk add uevent");
    guest
        .qmp_execute("device_del", &json!({"id": "stick0"}))
        .expect("device_del usb-storage");
    listener
        .wait_for_stdout("SEEN remove usb-storage", STEP)
        .expect("usb-storage remove uevent");
}

#[test]
fn blkdebug_eio_fires_block_rq_error() {
    vm::Guest::run_inside(
        &vm::BootOptions::new().hotplug(),
        "virtio_disk_eio",
        STEP,
        plug_a_failing_disk,
    );
}

fn plug_a_failing_disk(guest: &vm::Guest, listener: &vm::GuestProcess<'_>) {
    listener
        .wait_for_stdout("READY", STEP)
        .expect("in-guest listener ready");

    let image = guest.dir().join("disk.img");
    std::fs::write(&image, vec![0u8; 8 << 20]).expect("create the virtio disk image");
    guest
        .qmp_execute(
            "blockdev-add",
            &vm::blkdebug_blockdev("bad", &image, inside::BAD_SECTOR, 5),
        )
        .expect("blockdev-add blkdebug");
    guest
        .qmp_execute(
            "device_add",
            &json!({"driver": "virtio-blk-pci", "bus": "rp0", "drive": "bad", "id": "vblk0"}),
        )
        .expect("device_add virtio-blk-pci on rp0");
    listener
        .wait_for_stdout("SEEN block_rq_error", STEP)
        .expect("block_rq_error");

    // PCIe unplug needs the guest's cooperation (pciehp waits ~5 s after the attention button).
    guest
        .qmp_execute("device_del", &json!({"id": "vblk0"}))
        .expect("device_del virtio-blk-pci");
    guest
        .qmp_wait_event("DEVICE_DELETED", &json!({"device": "vblk0"}), STEP)
        .expect("DEVICE_DELETED vblk0");
}

#[test]
fn quota_warning_over_generic_netlink() {
    vm::Guest::run_inside(
        &vm::BootOptions::new(),
        "quota_netlink_warning",
        STEP,
        |_, _| {},
    );
}

#[test]
fn boot_run_poweroff_cycle() {
    // Figures only (printed with --nocapture); nothing here asserts on time.
    let start = std::time::Instant::now();
    let guest = vm::Guest::boot(&vm::BootOptions::new())
        .unwrap_or_else(|e| panic!("booting the test guest: {e}"));
    let booted = start.elapsed();
    let out = guest
        .run(&[
            "sh",
            "-c",
            "echo $WATCHQD_VM_GUEST; cat /proc/sys/kernel/hostname; pwd",
        ])
        .expect("run sh");
    assert!(out.success(), "{out}");
    assert_eq!(
        out.stdout,
        format!(
            "1\nwatchqd-guest\n{}\n",
            std::env::current_dir().expect("cwd").display()
        ),
        "{out}"
    );
    let ran = start.elapsed();
    let failing = guest
        .run(&["sh", "-c", "echo oops >&2; exit 42"])
        .expect("run a failing command");
    assert_eq!(
        (failing.status, failing.stderr.as_str()),
        (42, "oops\n"),
        "{failing}"
    );
    // Commands run concurrently; a later one may finish first.
    let slow = guest
        .spawn(&["sh", "-c", "sleep 1; echo slow"], &[])
        .expect("spawn a slow command");
    let fast = guest.run(&["echo", "fast"]).expect("run a fast command");
    assert_eq!(fast.stdout, "fast\n", "{fast}");
    let slow = slow.wait(STEP).expect("wait for the slow command");
    assert_eq!(slow.stdout, "slow\n", "{slow}");
    // A command that ends before printing what a test waits for fails the wait at once,
    // with its status, instead of at the timeout; its status stays there for `wait`.
    let quitter = guest
        .spawn(&["sh", "-c", "echo partial; exit 3"], &[])
        .expect("spawn a command that quits early");
    let early = quitter
        .wait_for_stdout("READY", STEP)
        .expect_err("it never prints READY");
    assert!(
        early
            .to_string()
            .contains("ended with status 3 without printing 'READY'"),
        "{early}"
    );
    let quitter = quitter.wait(STEP).expect("its status, still on record");
    assert_eq!(
        (quitter.status, quitter.stdout.as_str()),
        (3, "partial\n"),
        "{quitter}"
    );
    guest.shutdown().expect("guest shutdown");
    println!(
        "boot to ready {booted:?}, first command done {ran:?}, powered off {:?}",
        start.elapsed()
    );
}

/// The kernel has AppArmor and SELinux built in, exclusive, picked per boot: a default boot
/// runs with neither (`lsm=capability`, the suite as it always ran) unless
/// `WATCHQ_TEST_LSM` names one for the whole run, `.lsm(..)` enables one, and a process
/// then has that module's label (`attr/current`).
#[test]
fn security_module_per_boot() {
    let script = "cat /sys/kernel/security/lsm; echo; cat /proc/self/attr/current 2>&1 || true";
    let default = match std::env::var("WATCHQ_TEST_LSM").as_deref() {
        Err(_) | Ok("capability") => ("capability\n", "Invalid argument"),
        Ok("apparmor") => ("capability,apparmor\n", "unconfined\n"),
        Ok("selinux") => ("capability,selinux\n", "kernel"),
        Ok(other) => panic!("WATCHQ_TEST_LSM={other}: this test knows apparmor and selinux"),
    };
    let boots: [(Option<&'static str>, &'static str, &'static str); 3] = [
        (None, default.0, default.1),
        (Some("apparmor"), "capability,apparmor\n", "unconfined\n"),
        (Some("selinux"), "capability,selinux\n", "kernel"),
    ];
    let guests: Vec<_> = boots
        .into_iter()
        .map(|(lsm, want_lsm, want_label)| {
            std::thread::spawn(move || {
                let mut options = vm::BootOptions::new();
                if let Some(lsm) = lsm {
                    options = options.lsm(lsm);
                }
                let guest = vm::Guest::boot(&options)
                    .unwrap_or_else(|e| panic!("booting with lsm {lsm:?}: {e}"));
                let out = guest.run(&["sh", "-c", script]).expect("run sh");
                guest.shutdown().expect("guest shutdown");
                assert!(out.success(), "{out}");
                let (active, label) = out.stdout.split_once('\n').unwrap_or(("", ""));
                assert_eq!(format!("{active}\n"), want_lsm, "lsm {lsm:?}: {out}");
                assert!(label.contains(want_label), "lsm {lsm:?}: {out}");
            })
        })
        .collect();
    for guest in guests {
        guest.join().expect("a boot's thread panicked");
    }
}

#[test]
fn qemu_failure_is_reported_with_its_log() {
    let err = vm::Guest::boot(&vm::BootOptions::new().device("no-such-device"))
        .err()
        .expect("booting with an unknown qemu device must fail");
    let message = err.to_string();
    println!("{message}");
    assert!(
        message.contains("qemu exited")
            && message.contains("no-such-device")
            && message.contains("qemu.log"),
        "unhelpful error: {message}"
    );
    // The kept directory is named in the message; clean it up.
    let kept = message.lines().find_map(|l| {
        l.split_once("guest files kept in ")
            .map(|(_, dir)| dir.to_owned())
    });
    if let Some(dir) = kept {
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[test]
fn run_in_guest_script_passes_output_and_status() {
    vm::kernel().expect("guest kernel");
    let script = vm::vm_dir().join("run-in-guest");
    let out = std::process::Command::new(&script)
        .args([
            "--",
            "sh",
            "-c",
            "echo out-$WATCHQD_VM_GUEST; pwd; echo err >&2; exit 7",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let context = format!(
        "{}: status {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        script.display(),
        out.status
    );
    assert_eq!(out.status.code(), Some(7), "{context}");
    assert!(stdout.contains("out-1\n"), "{context}");
    assert!(
        stdout.contains(&format!("{}\n", env!("CARGO_MANIFEST_DIR"))),
        "{context}"
    );
    assert!(stderr.contains("err\n"), "{context}");
}

/// The halves that run inside the guest. They fail at once elsewhere.
mod inside {
    use std::fs;
    use std::io;
    use std::os::fd::{AsRawFd, OwnedFd, RawFd};
    use std::os::unix::fs::OpenOptionsExt;
    use std::process::Command;
    use std::time::{Duration, Instant};

    use nix::libc;
    use nix::sys::socket::{
        bind, recvfrom, sendto, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr,
        SockFlag, SockProtocol, SockType,
    };
    use nix::sys::time::TimeVal;

    use super::keyctl::{
        add_key, keyctl, notification_pipe, update, IOC_WATCH_QUEUE_SET_SIZE, KEYCTL_WATCH_KEY,
        KEY_SPEC_PROCESS_KEYRING,
    };
    use super::loop_ext4::{mount_with_quota, run};

    /// The 512-byte sector at which blkdebug injects EIO.
    pub const BAD_SECTOR: u64 = 2048;
    const WAIT: Duration = Duration::from_secs(60);

    // ---- keys and watch_queue ----

    const WATCH_TYPE_KEY_NOTIFY: u32 = 1;
    const NOTIFY_KEY_UPDATED: u8 = 1;
    const NOTIFY_KEY_LINKED: u8 = 2;

    /// A key record: (type, subtype, watch tag, key id, aux).
    #[derive(Debug, PartialEq)]
    struct Record {
        kind: u32,
        subtype: u8,
        tag: u8,
        key: i32,
        aux: i32,
    }

    /// Parse the records of one `read()` of a notification pipe.
    /// Layout (`linux/watch_queue.h`, `struct key_notification`): `u32 type:24|subtype:8`,
    /// `u32 info` (bits 0-6 length in bytes, 8-15 watch tag), then for keys `u32 key_id, aux`.
    fn parse_records(mut buf: &[u8]) -> Vec<Record> {
        let mut out = Vec::new();
        while buf.len() >= 8 {
            let word = |i: usize| u32::from_ne_bytes(buf[i..i + 4].try_into().expect("4 bytes"));
            let head = word(0);
            let info = word(4);
            let len = (info & 0x7f) as usize;
            assert!(
                len >= 8 && len <= buf.len(),
                "bad watch_queue record length {len} in {buf:?}"
            );
            if head & 0x00ff_ffff == WATCH_TYPE_KEY_NOTIFY {
                assert!(len >= 16, "short key record {buf:?}");
                out.push(Record {
                    kind: head & 0x00ff_ffff,
                    subtype: (head >> 24) as u8,
                    tag: ((info >> 8) & 0xff) as u8,
                    key: i32::from_ne_bytes(buf[8..12].try_into().expect("4 bytes")),
                    aux: i32::from_ne_bytes(buf[12..16].try_into().expect("4 bytes")),
                });
            } else {
                println!(
                    "non-key record: type {} subtype {}",
                    head & 0x00ff_ffff,
                    head >> 24
                );
            }
            buf = &buf[len..];
        }
        out
    }

    fn poll_in(fd: RawFd, timeout: Duration) -> bool {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&raw mut pfd, 1, ms) > 0 }
    }

    fn read_records(fd: &OwnedFd, want: usize) -> Vec<Record> {
        let deadline = Instant::now() + WAIT;
        let mut records = Vec::new();
        while records.len() < want {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "only {records:?} read from the notification pipe within {WAIT:?}"
            );
            if !poll_in(fd.as_raw_fd(), left) {
                continue;
            }
            let mut buf = [0u8; 4096];
            // SAFETY: buf is writable for its length.
            let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            assert!(
                n >= 0,
                "read(notification pipe): {}",
                io::Error::last_os_error()
            );
            records.extend(parse_records(&buf[..n.unsigned_abs()]));
        }
        records
    }

    #[test]
    #[ignore = "runs inside the guest via tests/vm; started by the host test"]
    fn key_watch_delivers_records() {
        super::vm::require_guest();
        let (rd, _wr) = notification_pipe().expect("pipe2(O_NOTIFICATION_PIPE) in the guest");
        // SAFETY: ioctl on our pipe fd with an integer argument (number of notes).
        let r = unsafe { libc::ioctl(rd.as_raw_fd(), IOC_WATCH_QUEUE_SET_SIZE, 256) };
        assert_eq!(
            r,
            0,
            "IOC_WATCH_QUEUE_SET_SIZE: {}",
            io::Error::last_os_error()
        );

        let ring = add_key("keyring", "watchqd-vm-test", &[], KEY_SPEC_PROCESS_KEYRING);
        keyctl(
            "KEYCTL_WATCH_KEY keyring",
            KEYCTL_WATCH_KEY,
            ring.into(),
            rd.as_raw_fd().into(),
            0x11,
        );
        let key = add_key("user", "probe", b"one", ring);
        keyctl(
            "KEYCTL_WATCH_KEY key",
            KEYCTL_WATCH_KEY,
            key.into(),
            rd.as_raw_fd().into(),
            0x22,
        );
        update(key, b"two");

        let records = read_records(&rd, 2);
        println!("keyring {ring}, key {key}, records {records:?}");
        assert!(
            records.contains(&Record {
                kind: WATCH_TYPE_KEY_NOTIFY,
                subtype: NOTIFY_KEY_LINKED,
                tag: 0x11,
                key: ring,
                aux: key
            }),
            "no LINKED record for key {key} on keyring {ring}: {records:?}"
        );
        assert!(
            records.iter().any(|r| r.kind == WATCH_TYPE_KEY_NOTIFY
                && r.subtype == NOTIFY_KEY_UPDATED
                && r.tag == 0x22
                && r.key == key),
            "no UPDATED record for key {key}: {records:?}"
        );
    }

    // ---- uevents ----

    /// A kernel uevent: action, devpath and the KEY=VALUE environment.
    #[derive(Debug)]
    struct Uevent {
        action: String,
        devpath: String,
        env: std::collections::HashMap<String, String>,
    }

    impl Uevent {
        fn get(&self, key: &str) -> &str {
            self.env.get(key).map_or("", String::as_str)
        }
    }

    struct UeventSocket(OwnedFd);

    impl UeventSocket {
        fn open() -> Self {
            let fd = socket(
                AddressFamily::Netlink,
                SockType::Datagram,
                SockFlag::SOCK_CLOEXEC,
                SockProtocol::NetlinkKObjectUEvent,
            )
            .expect("socket(NETLINK_KOBJECT_UEVENT)");
            bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 1)).expect("bind uevent socket to group 1");
            setsockopt(&fd, sockopt::ReceiveTimeout, &TimeVal::new(1, 0)).expect("SO_RCVTIMEO");
            Self(fd)
        }

        /// The next uevent sent by the kernel (`nl_pid` 0), or `None` after a 1 s timeout.
        fn next(&self) -> Option<Uevent> {
            let mut buf = vec![0u8; 16384];
            match recvfrom::<NetlinkAddr>(self.0.as_raw_fd(), &mut buf) {
                Ok((n, from)) => {
                    if from.is_none_or(|a| a.pid() != 0) {
                        println!("ignoring a uevent not sent by the kernel: {from:?}");
                        return None;
                    }
                    let mut parts = buf[..n]
                        .split(|&b| b == 0)
                        .map(|p| String::from_utf8_lossy(p).into_owned());
                    let head = parts.next().unwrap_or_default();
                    let (action, devpath) = head.split_once('@')?;
                    let env = parts
                        .filter_map(|p| {
                            p.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned()))
                        })
                        .collect();
                    Some(Uevent {
                        action: action.to_owned(),
                        devpath: devpath.to_owned(),
                        env,
                    })
                }
                Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => None,
                Err(e) => panic!("recv uevent: {e}"),
            }
        }
    }

    /// Print `SEEN <what>` once per label (the host waits for these lines).
    fn seen(done: &mut Vec<String>, what: &str, ev: &Uevent) {
        if !done.iter().any(|d| d == what) {
            println!(
                "SEEN {what} ({} {} {})",
                ev.action,
                ev.devpath,
                ev.get("PRODUCT")
            );
            done.push(what.to_owned());
        }
    }

    #[test]
    #[ignore = "runs inside the guest via tests/vm; started by the host test"]
    fn usb_uevents() {
        super::vm::require_guest();
        let sock = UeventSocket::open();
        println!("READY");
        let want = [
            "add usb-kbd",
            "remove usb-kbd",
            "add usb-storage",
            "add usb-disk",
            "remove usb-disk",
            "remove usb-storage",
        ];
        let mut done: Vec<String> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(300);
        while !want.iter().all(|w| done.iter().any(|d| d == w)) {
            assert!(
                Instant::now() < deadline,
                "uevents seen so far: {done:?}; wanted {want:?}"
            );
            let Some(ev) = sock.next() else { continue };
            println!(
                "uevent {} {} {:?}",
                ev.action,
                ev.devpath,
                ev.env.get("SUBSYSTEM")
            );
            let usb_device = ev.get("SUBSYSTEM") == "usb" && ev.get("DEVTYPE") == "usb_device";
            let action = ev.action.as_str();
            // qemu's usb-kbd is 0627:0001, usb-storage 46f4:0001.
            if usb_device && ev.get("PRODUCT").starts_with("627/1/") {
                seen(&mut done, &format!("{action} usb-kbd"), &ev);
            }
            if usb_device && ev.get("PRODUCT").starts_with("46f4/1/") {
                seen(&mut done, &format!("{action} usb-storage"), &ev);
            }
            if ev.get("SUBSYSTEM") == "block"
                && ev.get("DEVTYPE") == "disk"
                && ev.devpath.contains("/usb")
            {
                seen(&mut done, &format!("{action} usb-disk"), &ev);
            }
        }
    }

    // ---- block_rq_error through blkdebug ----

    #[test]
    #[ignore = "runs inside the guest via tests/vm; started by the host test"]
    fn virtio_disk_eio() {
        super::vm::require_guest();
        let instance = "/sys/kernel/tracing/instances/watchqd-vm-test";
        let _ = fs::remove_dir(instance);
        fs::create_dir(instance).expect("create a tracefs instance");
        fs::write(
            format!("{instance}/events/block/block_rq_error/enable"),
            "1",
        )
        .expect("enable block:block_rq_error");
        let sock = UeventSocket::open();
        println!("READY");

        let deadline = Instant::now() + Duration::from_secs(300);
        let devname = loop {
            assert!(Instant::now() < deadline, "no virtio disk appeared");
            let Some(ev) = sock.next() else { continue };
            println!("uevent {} {}", ev.action, ev.devpath);
            if ev.action == "add"
                && ev.get("SUBSYSTEM") == "block"
                && ev.get("DEVNAME").starts_with("vd")
            {
                println!("SEEN add {}", ev.get("DEVNAME"));
                break ev.get("DEVNAME").to_owned();
            }
        };

        let dev = format!("/dev/{devname}");
        let file = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&dev)
            .unwrap_or_else(|e| panic!("open {dev} O_DIRECT: {e}"));
        let layout = std::alloc::Layout::from_size_align(4096, 4096).expect("layout");
        // SAFETY: non-zero size; freed below with the same layout.
        let buf = unsafe { std::alloc::alloc(layout) };
        assert!(!buf.is_null());
        let read_at = |sector: u64| {
            // SAFETY: buf is a live 4096-byte allocation; the offset is a multiple of 512.
            let n = unsafe {
                libc::pread(
                    file.as_raw_fd(),
                    buf.cast(),
                    4096,
                    libc::off_t::try_from(sector * 512).expect("offset"),
                )
            };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n)
            }
        };
        read_at(0).unwrap_or_else(|e| panic!("read of sector 0 of {dev}: {e}"));
        let err = read_at(BAD_SECTOR).expect_err("read of the blkdebug sector must fail");
        // SAFETY: allocated above with this layout.
        unsafe { std::alloc::dealloc(buf, layout) };
        assert_eq!(
            err.raw_os_error(),
            Some(libc::EIO),
            "read of sector {BAD_SECTOR}: {err}"
        );

        let trace = fs::read_to_string(format!("{instance}/trace")).expect("read the trace");
        let hit = trace.lines().find(|l| {
            l.contains("block_rq_error:")
                && l.contains(&format!(" {BAD_SECTOR} + "))
                && l.contains("[-5]")
        });
        assert!(
            hit.is_some(),
            "no block_rq_error for sector {BAD_SECTOR} with -5 in the trace:\n{trace}"
        );
        println!("SEEN block_rq_error: {}", hit.unwrap_or_default().trim());
        let _ = fs::write(
            format!("{instance}/events/block/block_rq_error/enable"),
            "0",
        );
        let _ = fs::remove_dir(instance);
        drop(file);

        loop {
            assert!(Instant::now() < deadline, "no remove uevent for {devname}");
            let Some(ev) = sock.next() else { continue };
            if ev.action == "remove" && ev.get("DEVNAME") == devname {
                println!("SEEN remove {devname}");
                break;
            }
        }
    }

    // ---- quota warnings over generic netlink ----

    const GENL_ID_CTRL: u16 = 0x10;
    const CTRL_CMD_GETFAMILY: u8 = 3;
    const CTRL_ATTR_FAMILY_ID: u16 = 1;
    const CTRL_ATTR_FAMILY_NAME: u16 = 2;
    const CTRL_ATTR_MCAST_GROUPS: u16 = 7;
    const CTRL_ATTR_MCAST_GRP_NAME: u16 = 1;
    const CTRL_ATTR_MCAST_GRP_ID: u16 = 2;
    const QUOTA_NL_C_WARNING: u8 = 1;
    const QUOTA_NL_A_QTYPE: u16 = 1;
    const QUOTA_NL_A_EXCESS_ID: u16 = 2;
    const QUOTA_NL_A_WARNING: u16 = 3;
    const QUOTA_NL_A_DEV_MAJOR: u16 = 4;
    const QUOTA_NL_A_CAUSED_ID: u16 = 6;
    const QUOTA_NL_BHARDWARN: u32 = 4;
    const QUOTA_NL_BSOFTWARN: u32 = 6;
    const NLMSG_ERROR: u16 = 2;
    const SOL_NETLINK: i32 = 270;
    const NETLINK_ADD_MEMBERSHIP: i32 = 1;
    const NOBODY: u32 = 65534;

    /// Netlink attributes (u16 len, u16 type, payload, padded to 4) as (type, payload).
    fn attrs(mut buf: &[u8]) -> Vec<(u16, &[u8])> {
        let mut out = Vec::new();
        while buf.len() >= 4 {
            let len = usize::from(u16::from_ne_bytes([buf[0], buf[1]]));
            let kind = u16::from_ne_bytes([buf[2], buf[3]]) & 0x3fff;
            if len < 4 || len > buf.len() {
                break;
            }
            out.push((kind, &buf[4..len]));
            buf = &buf[((len + 3) & !3).min(buf.len())..];
        }
        out
    }

    fn u32_of(payload: &[u8]) -> u32 {
        u32::from_ne_bytes(payload[..4].try_into().expect("u32 attribute"))
    }

    fn u64_of(payload: &[u8]) -> u64 {
        u64::from_ne_bytes(payload[..8].try_into().expect("u64 attribute"))
    }

    /// Netlink messages in one datagram: (type, payload after the 16-byte header).
    fn messages(mut buf: &[u8]) -> Vec<(u16, &[u8])> {
        let mut out = Vec::new();
        while buf.len() >= 16 {
            let len = u32_of(buf) as usize;
            if len < 16 || len > buf.len() {
                break;
            }
            out.push((u16::from_ne_bytes([buf[4], buf[5]]), &buf[16..len]));
            buf = &buf[((len + 3) & !3).min(buf.len())..];
        }
        out
    }

    /// Resolve a generic netlink family and one of its multicast groups: (family id, group id).
    fn resolve_genl(fd: &OwnedFd, family: &str, group: &str) -> (u16, u32) {
        let mut name = family.as_bytes().to_vec();
        name.push(0);
        let attr_len = 4 + name.len();
        let total = 16 + 4 + ((attr_len + 3) & !3);
        let mut msg = Vec::with_capacity(total);
        msg.extend_from_slice(&u32::try_from(total).expect("small").to_ne_bytes());
        msg.extend_from_slice(&GENL_ID_CTRL.to_ne_bytes());
        msg.extend_from_slice(
            &u16::try_from(libc::NLM_F_REQUEST)
                .expect("flag")
                .to_ne_bytes(),
        );
        msg.extend_from_slice(&1u32.to_ne_bytes()); // seq
        msg.extend_from_slice(&0u32.to_ne_bytes()); // pid
        msg.extend_from_slice(&[CTRL_CMD_GETFAMILY, 1, 0, 0]); // genlmsghdr: cmd, version
        msg.extend_from_slice(&u16::try_from(attr_len).expect("small").to_ne_bytes());
        msg.extend_from_slice(&CTRL_ATTR_FAMILY_NAME.to_ne_bytes());
        msg.extend_from_slice(&name);
        msg.resize(total, 0);
        sendto(
            fd.as_raw_fd(),
            &msg,
            &NetlinkAddr::new(0, 0),
            MsgFlags::empty(),
        )
        .expect("send CTRL_CMD_GETFAMILY");

        let mut buf = vec![0u8; 16384];
        let (n, _) = recvfrom::<NetlinkAddr>(fd.as_raw_fd(), &mut buf)
            .expect("receive the family description");
        let (kind, payload) = *messages(&buf[..n]).first().expect("a reply");
        assert_ne!(
            kind, NLMSG_ERROR,
            "generic netlink family {family} not found (CONFIG_QUOTA_NETLINK_INTERFACE?)"
        );
        let mut family_id = None;
        let mut group_id = None;
        for (attr, value) in attrs(&payload[4..]) {
            match attr {
                CTRL_ATTR_FAMILY_ID => family_id = Some(u16::from_ne_bytes([value[0], value[1]])),
                CTRL_ATTR_MCAST_GROUPS => {
                    for (_, grp) in attrs(value) {
                        let fields = attrs(grp);
                        let is_ours = fields.iter().any(|&(t, v)| {
                            t == CTRL_ATTR_MCAST_GRP_NAME
                                && v.split(|&b| b == 0).next() == Some(group.as_bytes())
                        });
                        if is_ours {
                            group_id = fields
                                .iter()
                                .find(|&&(t, _)| t == CTRL_ATTR_MCAST_GRP_ID)
                                .map(|&(_, v)| u32_of(v));
                        }
                    }
                }
                _ => {}
            }
        }
        (
            family_id.unwrap_or_else(|| panic!("no family id for {family}")),
            group_id.unwrap_or_else(|| panic!("no multicast group '{group}' in family {family}")),
        )
    }

    #[test]
    #[ignore = "runs inside the guest via tests/vm; started by the host test"]
    #[allow(clippy::too_many_lines)]
    fn quota_netlink_warning() {
        super::vm::require_guest();
        let img = "/tmp/watchqd-quota.img";
        let mnt = "/tmp/watchqd-quota";
        mount_with_quota(img, mnt, 32, "usrquota");
        std::os::unix::fs::chown(mnt, Some(NOBODY), Some(NOBODY)).expect("chown mountpoint");
        // block soft limit 64 KiB, hard limit 128 KiB, no inode limits
        run(Command::new("setquota").args(["-u", &NOBODY.to_string(), "64", "128", "0", "0", mnt]));

        let fd = socket(
            AddressFamily::Netlink,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkGeneric,
        )
        .expect("socket(NETLINK_GENERIC)");
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0)).expect("bind generic netlink");
        setsockopt(&fd, sockopt::ReceiveTimeout, &TimeVal::new(1, 0)).expect("SO_RCVTIMEO");
        let (family, group) = resolve_genl(&fd, "VFS_DQUOT", "events");
        println!("VFS_DQUOT family {family}, events group {group}");
        // SAFETY: setsockopt with a pointer to a live u32 of the given size.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                SOL_NETLINK,
                NETLINK_ADD_MEMBERSHIP,
                (&raw const group).cast(),
                libc::socklen_t::try_from(std::mem::size_of::<u32>()).expect("4"),
            )
        };
        assert_eq!(
            r,
            0,
            "NETLINK_ADD_MEMBERSHIP: {}",
            io::Error::last_os_error()
        );

        // An unprivileged uid writes 256 KiB: past both limits.
        let out = Command::new("dd")
            .args([
                "if=/dev/zero",
                &format!("of={mnt}/fill"),
                "bs=4096",
                "count=64",
                "conv=fsync",
            ])
            .uid(NOBODY)
            .gid(NOBODY)
            .output()
            .expect("run dd as nobody");
        let dd_err = String::from_utf8_lossy(&out.stderr);
        println!("dd as uid {NOBODY}: {} {dd_err}", out.status);
        assert!(
            !out.status.success() && dd_err.contains("quota"),
            "dd past the hard limit must fail with EDQUOT: {dd_err}"
        );

        let mut warnings = Vec::new();
        let deadline = Instant::now() + WAIT;
        while !warnings.iter().any(|&(w, _)| w == QUOTA_NL_BHARDWARN) {
            assert!(
                Instant::now() < deadline,
                "no BHARDWARN quota warning within {WAIT:?}; got {warnings:?}"
            );
            let mut buf = vec![0u8; 16384];
            let (n, from) = match recvfrom::<NetlinkAddr>(fd.as_raw_fd(), &mut buf) {
                Ok(r) => r,
                Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => continue,
                Err(e) => panic!("recv quota warning: {e}"),
            };
            assert!(
                from.is_some_and(|a| a.pid() == 0),
                "quota message not from the kernel: {from:?}"
            );
            for (kind, payload) in messages(&buf[..n]) {
                if kind != family || payload.first() != Some(&QUOTA_NL_C_WARNING) {
                    continue;
                }
                let (mut qtype, mut excess, mut warning, mut major, mut caused) =
                    (None, None, None, None, None);
                for (attr, value) in attrs(&payload[4..]) {
                    match attr {
                        QUOTA_NL_A_QTYPE => qtype = Some(u32_of(value)),
                        QUOTA_NL_A_EXCESS_ID => excess = Some(u64_of(value)),
                        QUOTA_NL_A_WARNING => warning = Some(u32_of(value)),
                        QUOTA_NL_A_DEV_MAJOR => major = Some(u32_of(value)),
                        QUOTA_NL_A_CAUSED_ID => caused = Some(u64_of(value)),
                        _ => {}
                    }
                }
                println!("VFS_DQUOT warning: qtype {qtype:?} excess id {excess:?} warning {warning:?} dev major {major:?} caused by {caused:?}");
                assert_eq!(qtype, Some(0), "user quota");
                assert_eq!(excess, Some(NOBODY.into()), "excess id");
                assert_eq!(caused, Some(NOBODY.into()), "caused id");
                assert_eq!(major, Some(7), "loop device major");
                let warning = warning.expect("warning code");
                assert!(
                    [QUOTA_NL_BHARDWARN, QUOTA_NL_BSOFTWARN].contains(&warning),
                    "unexpected warning code {warning}"
                );
                warnings.push((warning, caused));
            }
        }
        run(Command::new("umount").arg(mnt));
    }

    use std::os::unix::process::CommandExt;
}
