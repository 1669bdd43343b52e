//! USB and block devices on real hot-plug, and a block I/O error injected by the
//! hypervisor, seen by a subscriber of the real daemon on a real bus inside the qemu
//! guest (the host kernel has no USB). One guest boot covers every step: boots cost
//! seconds of TCG CPU.
//!
//! The host test drives QMP; `inside::hotplug_events` (this binary, re-run in the guest
//! with `--ignored --exact`) runs the daemon, subscribes, checks each event and prints
//! `SEEN <step>` lines that the host waits for before its next step.
//! Run with: `cargo test --test guest_devices` (as root, after `tests/vm/setup-host`).

mod common;
#[path = "common/vm.rs"]
mod vm;

use std::time::Duration;

use serde_json::json;

const STEP: Duration = Duration::from_secs(120);
/// The sector blkdebug fails reads of (a 4 KiB read there covers it).
const BAD_SECTOR: u64 = 2048;

#[test]
fn usb_and_virtio_hotplug_and_injected_eio_reach_a_subscriber() {
    vm::Guest::run_inside(
        &vm::BootOptions::new().hotplug(),
        "hotplug_events",
        STEP,
        drive_hotplug,
    );
}

/// The host's steps: each hot-plug or fault, then the in-guest subscriber's `SEEN` line.
fn drive_hotplug(guest: &vm::Guest, inside: &vm::GuestProcess<'_>) {
    let wait = |what: &str| {
        inside
            .wait_for_stdout(&format!("SEEN {what}"), STEP)
            .unwrap_or_else(|e| panic!("waiting for '{what}' in the guest: {e}"));
    };
    let qmp = |name: &str, args: serde_json::Value| qmp(guest, name, args);
    inside
        .wait_for_stdout("READY", STEP)
        .unwrap_or_else(|e| panic!("the in-guest subscriber did not start: {e}"));

    qmp(
        "device_add",
        json!({"driver": "usb-kbd", "bus": "xhci.0", "id": "kbd0"}),
    );
    wait("reset usb-kbd");
    qmp("device_del", json!({"id": "kbd0"}));
    wait("remove usb-kbd");

    let stick = guest.dir().join("stick.img");
    std::fs::write(&stick, vec![0u8; 4 << 20]).expect("create the usb-storage image");
    qmp("blockdev-add", vm::raw_blockdev("stick", &stick));
    qmp(
        "device_add",
        json!({"driver": "usb-storage", "bus": "xhci.0", "drive": "stick", "id": "stick0"}),
    );
    wait("add usb-disk");
    qmp("device_del", json!({"id": "stick0"}));
    wait("remove usb-storage");

    plug_failing_disk(guest);
    wait("block-error");
    // PCIe unplug needs the guest's cooperation (pciehp waits ~5 s after the button).
    qmp("device_del", json!({"id": "vblk0"}));
    guest
        .qmp_wait_event("DEVICE_DELETED", &json!({"device": "vblk0"}), STEP)
        .unwrap_or_else(|e| panic!("DEVICE_DELETED vblk0: {e}"));
}

/// Runs a QMP command; fails the test, naming it, when qemu refuses it.
fn qmp(guest: &vm::Guest, name: &str, args: serde_json::Value) {
    guest
        .qmp_execute(name, &args)
        .unwrap_or_else(|e| panic!("QMP {name} {args}: {e}"));
}

/// Plugs `vblk0`, an 8 MiB virtio disk on `rp0` whose reads of [`BAD_SECTOR`] fail with
/// EIO (qemu's blkdebug).
fn plug_failing_disk(guest: &vm::Guest) {
    let disk = guest.dir().join("disk.img");
    std::fs::write(&disk, vec![0u8; 8 << 20]).expect("create the virtio disk image");
    qmp(
        guest,
        "blockdev-add",
        vm::blkdebug_blockdev("bad", &disk, BAD_SECTOR, 5),
    );
    qmp(
        guest,
        "device_add",
        json!({"driver": "virtio-blk-pci", "bus": "rp0", "drive": "bad", "id": "vblk0"}),
    );
}

/// Failed reads the metrics test makes: more than the block-errors source's burst (10 per
/// device per second), so that most arrive summarised in one counted event.
const FAILED_READS: u64 = 15;

/// Block I/O errors for fleets: the daemon in the guest runs with `[metrics]` and no
/// subscriber, writes its text file into the directory it shares with the host, and the
/// host's real node_exporter exports exactly the number of failed reads the guest made
/// on a blkdebug disk. A guest of its own: a subscriber would hold the block-errors
/// source open, and here only the metrics may.
#[test]
fn node_exporter_on_the_host_counts_every_injected_eio_of_the_guest() {
    vm::Guest::run_inside(
        &vm::BootOptions::new().hotplug(),
        "metrics_block_errors",
        STEP,
        drive_metrics,
    );
}

fn drive_metrics(guest: &vm::Guest, inside: &vm::GuestProcess<'_>) {
    use common::prometheus::{promtool_check, NodeExporter};
    let wait = |what: &str| {
        inside
            .wait_for_stdout(what, STEP)
            .unwrap_or_else(|e| panic!("waiting for '{what}' in the guest: {e}"));
    };
    wait("READY");
    let directory = guest.dir().join(inside::METRICS);
    let exporter = NodeExporter::start(&directory);
    // The daemon wrote its file at start; no block error was counted.
    let first = exporter.scrape();
    assert_eq!(
        first.value("watchqd_source_available", &[("source", "block-errors")]),
        Some(1.0),
        "{}",
        first.text
    );
    assert!(
        !first.text.contains("\nwatchqd_block_errors_total{"),
        "{}",
        first.text
    );

    plug_failing_disk(guest);
    wait("FAILED-READS ");
    let said = inside.stdout();
    let device = said
        .lines()
        .find_map(|l| l.strip_prefix("FAILED-READS "))
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the device the guest read")
        .to_owned();

    let errors = |m: &common::prometheus::Metrics| {
        m.value("watchqd_block_errors_total", &[("device", &device)])
    };
    let start = std::time::Instant::now();
    let counted = loop {
        let m = exporter.scrape();
        if errors(&m) == Some(FAILED_READS as f64) {
            break m;
        }
        assert!(
            start.elapsed() < common::TIMEOUT,
            "node_exporter did not show {FAILED_READS} block errors of {device} within {:?}; last scrape:\n{}",
            common::TIMEOUT,
            m.text
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // One series, a read: the kernel's rwbs for the O_DIRECT reads.
    assert!(
        counted
            .text
            .lines()
            .filter(|l| l.starts_with("watchqd_block_errors_total{"))
            .all(|l| l.starts_with(&format!(
                "watchqd_block_errors_total{{device=\"{device}\",operation=\"R"
            ))),
        "{}",
        counted.text
    );
    // And not more, once the source's summary interval (1 s) and a write have passed.
    std::thread::sleep(Duration::from_millis(1500));
    let settled = exporter.scrape();
    assert_eq!(
        errors(&settled),
        Some(FAILED_READS as f64),
        "{}",
        settled.text
    );
    let text = std::fs::read_to_string(directory.join("watchqd.prom")).expect("the file");
    promtool_check(&text).unwrap_or_else(|e| panic!("promtool check metrics:\n{e}\n{text}"));
    // The in-guest half stops its daemon when told.
    std::fs::write(guest.dir().join(inside::DONE), "").expect("tell the guest");
}

mod inside {
    use std::collections::HashMap;
    use std::fs;
    use std::os::fd::AsRawFd;
    use std::time::Duration;

    use zbus::Variant;

    use super::common::*;
    use super::BAD_SECTOR;

    fn attr(signal: &Signal, key: &str) -> String {
        signal.attr_str(key).unwrap_or_default()
    }

    fn is_usb_device(s: &Signal, action: &str, vendor: &str, product: &str) -> bool {
        matches!(s, Signal::Device { action: a, tag: 1, .. } if a == action)
            && attr(s, "devtype") == "usb_device"
            && attr(s, "vendor-id") == vendor
            && attr(s, "product-id") == product
    }

    /// The first signal matching `pred`, waiting for it.
    async fn expect(
        sub: &mut Subscriber,
        what: &str,
        pred: impl Fn(&Signal) -> bool + Copy,
    ) -> Signal {
        sub.until(what, |s| s.iter().any(pred)).await;
        let found = sub.received.iter().find(|s| pred(s)).cloned().unwrap();
        println!("SEEN {what}: {found:?}");
        found
    }

    /// What the kernel offers for USB resets and errors here, printed for the report.
    fn describe_usb_error_interfaces() {
        for dir in [
            "/sys/kernel/tracing/events/xhci-hcd",
            "/sys/kernel/tracing/events/usb",
            "/sys/kernel/debug/usb/usbmon",
        ] {
            println!(
                "INFO {dir}: {}",
                if fs::metadata(dir).is_ok() {
                    "present"
                } else {
                    "absent"
                }
            );
        }
        if let Ok(events) = fs::read_dir("/sys/kernel/tracing/events/xhci-hcd") {
            let mut names: Vec<String> = events
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            println!("INFO xhci-hcd tracepoints: {}", names.join(" "));
        }
        // Ports live below their hub's interface: usb1/1-0:1.0/usb1-port1.
        if let Ok(entries) = fs::read_dir("/sys/bus/usb/devices/usb1/1-0:1.0") {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.contains("-port") {
                    let files: Vec<String> = fs::read_dir(entry.path())
                        .map(|d| {
                            d.flatten()
                                .map(|e| e.file_name().to_string_lossy().into_owned())
                                .collect()
                        })
                        .unwrap_or_default();
                    println!("INFO port {name} attributes: {files:?}");
                    break;
                }
            }
        }
    }

    /// Every xhci-hcd tracepoint enabled in a private tracefs instance, to see which of
    /// them a reset fires (informational; printed, not asserted).
    struct XhciTrace(&'static str);

    impl XhciTrace {
        fn start() -> Self {
            let dir = "/sys/kernel/tracing/instances/watchqd-xhci-probe";
            let _ = fs::remove_dir(dir);
            fs::create_dir(dir).expect("tracefs instance");
            fs::write(format!("{dir}/events/xhci-hcd/enable"), "1").expect("enable xhci-hcd");
            XhciTrace(dir)
        }

        fn report(self) {
            let trace = fs::read_to_string(format!("{}/trace", self.0)).unwrap_or_default();
            let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
            // "task-pid [cpu] flags timestamp: event_name: details"
            for line in trace.lines().filter(|l| !l.starts_with('#')) {
                if let Some(name) = line.split(": ").nth(1) {
                    *counts.entry(name.to_owned()).or_default() += 1;
                }
            }
            println!("INFO xhci-hcd tracepoints fired by the reset: {counts:?}");
            for line in trace
                .lines()
                .filter(|l| l.contains("reset") || l.contains("RESET"))
                .take(12)
            {
                println!("INFO   {}", line.trim());
            }
            let _ = fs::write(format!("{}/events/xhci-hcd/enable", self.0), "0");
            let _ = fs::remove_dir(self.0);
        }
    }

    /// Reads a hub port's `state` attribute each time sysfs notifies it (POLLPRI), to see
    /// whether a reset shows there (informational; printed, not asserted).
    struct PortState {
        stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
        thread: std::thread::JoinHandle<Vec<String>>,
    }

    impl PortState {
        /// `kbd_path` is `/devices/…/usb1/1-1`: port 1 of root hub 1.
        fn watch(device_path: &str) -> Self {
            let (hub_dir, name) = device_path.rsplit_once('/').expect("device path");
            let (bus, port) = name.split_once('-').expect("usb device name");
            let path = format!("/sys{hub_dir}/{bus}-0:1.0/usb{bus}-port{port}/state");
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let flag = std::sync::Arc::clone(&stop);
            let thread = std::thread::spawn(move || {
                use std::io::{Read, Seek};
                let mut seen = Vec::new();
                let Ok(mut file) = fs::File::open(&path) else {
                    return vec![format!("cannot open {path}")];
                };
                while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                    let mut text = String::new();
                    let _ = file.rewind();
                    let _ = file.read_to_string(&mut text);
                    seen.push(text.trim().to_owned());
                    let mut pfd = nix::libc::pollfd {
                        fd: file.as_raw_fd(),
                        events: nix::libc::POLLPRI | nix::libc::POLLERR,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd for the duration of the call.
                    unsafe { nix::libc::poll(&mut pfd, 1, 200) };
                }
                seen.dedup();
                seen
            });
            PortState { stop, thread }
        }

        fn stop(self) -> Vec<String> {
            self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
            self.thread.join().unwrap_or_default()
        }
    }

    /// `USBDEVFS_RESET` on the device node, as `usbreset` does.
    fn reset_usb_device(busnum: u64, devnum: u64) {
        let node = format!("/dev/bus/usb/{busnum:03}/{devnum:03}");
        let file = fs::OpenOptions::new()
            .write(true)
            .open(&node)
            .unwrap_or_else(|e| panic!("open {node}: {e}"));
        const USBDEVFS_RESET: nix::libc::c_ulong = 0x5514; // _IO('U', 20)
                                                           // SAFETY: USBDEVFS_RESET takes no argument; the fd is open.
        let rc = unsafe { nix::libc::ioctl(file.as_raw_fd(), USBDEVFS_RESET as _) };
        assert_eq!(
            rc,
            0,
            "USBDEVFS_RESET on {node}: {}",
            std::io::Error::last_os_error()
        );
    }

    /// The metrics directory, in the directory the guest shares with the host.
    pub const METRICS: &str = "metrics";
    /// The file the host creates when it has scraped what it needs.
    pub const DONE: &str = "metrics-done";

    #[test]
    #[ignore = "runs inside the guest; started by the host test"]
    fn metrics_block_errors() {
        super::vm::enter_guest();
        let shared = super::vm::shared_dir();
        let directory = shared.join(METRICS);
        fs::create_dir(&directory).expect("the metrics directory");
        super::vm::block_on(async {
            // No subscriber: only the metrics hold the block-errors source open.
            let _daemon = Daemon::with_config(&format!(
                "[metrics]\ntextfile = true\ndirectory = \"{}\"\ninterval_ms = 200\n",
                directory.display()
            ));
            // The file exists before the host looks.
            let file = directory.join("watchqd.prom");
            let start = std::time::Instant::now();
            while !file.exists() {
                assert!(
                    start.elapsed() < TIMEOUT,
                    "no {} within {TIMEOUT:?}",
                    file.display()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            println!("READY");
            // The host plugs the blkdebug disk; no udev here, so nothing else reads it.
            let start = std::time::Instant::now();
            let name = loop {
                let vd = fs::read_dir("/sys/block")
                    .expect("/sys/block")
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .find(|n| n.starts_with("vd"));
                if let Some(vd) = vd {
                    break vd;
                }
                assert!(
                    start.elapsed() < TIMEOUT,
                    "no virtio disk within {TIMEOUT:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            let device = format!("/dev/{name}");
            for _ in 0..super::FAILED_READS {
                let err = failing_read(&device, BAD_SECTOR);
                assert_eq!(err.raw_os_error(), Some(nix::libc::EIO), "{err}");
            }
            println!("FAILED-READS {name} {}", super::FAILED_READS);
            // The daemon runs until the host has scraped its counts.
            let done = shared.join(DONE);
            let start = std::time::Instant::now();
            while !done.exists() {
                assert!(
                    start.elapsed() < super::STEP,
                    "the host did not finish within {:?}",
                    super::STEP
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }

    #[test]
    #[ignore = "runs inside the guest; started by the host test"]
    fn hotplug_events() {
        super::vm::enter_guest();
        super::vm::block_on(hotplug_events_async());
    }

    async fn hotplug_events_async() {
        describe_usb_error_interfaces();
        let daemon = Daemon::start();
        let mut sub = Subscriber::with_options(
            &daemon,
            HashMap::from([("queue-depth", Variant::from(4096u32))]),
        )
        .await;
        sub.watch("devices", 1, &[("subsystem", Variant::from("usb"))])
            .await;
        sub.watch("devices", 2, &[("subsystem", Variant::from("block"))])
            .await;
        sub.watch("block-errors", 3, &[]).await;
        println!("READY");

        // usb-kbd: qemu's keyboard is 0627:0001, "QEMU USB Keyboard" by "QEMU".
        let kbd = expect(&mut sub, "add usb-kbd", |s| {
            is_usb_device(s, "add", "0627", "0001")
        })
        .await;
        assert_eq!(attr(&kbd, "product"), "QEMU USB Keyboard", "{kbd:?}");
        assert_eq!(attr(&kbd, "manufacturer"), "QEMU", "{kbd:?}");
        assert!(!attr(&kbd, "serial").is_empty(), "{kbd:?}");
        assert!(!attr(&kbd, "speed").is_empty(), "{kbd:?}");
        let Signal::Device {
            sys_path: kbd_path, ..
        } = kbd.clone()
        else {
            unreachable!()
        };
        // Its HID interface (class 03) gets the usbhid driver.
        let interface = expect(&mut sub, "usbhid bound", |s| {
            matches!(s, Signal::Device { sys_path, .. } if sys_path.starts_with(&format!("{kbd_path}/")))
                && attr(s, "interface-class") == "03"
                && attr(s, "driver") == "usbhid"
        })
        .await;
        println!("INFO interface event: {interface:?}");

        // The attach ends with the device's own bind.
        expect(&mut sub, "usb-kbd bound", |s| {
            is_usb_device(s, "bind", "0627", "0001") && attr(s, "driver") == "usb"
        })
        .await;

        // A reset through usbfs: record what the kernel reports, as uevents and as
        // xhci-hcd tracepoints, for the report on USB reset and error events.
        let tracer = XhciTrace::start();
        let port_state = PortState::watch(&kbd_path);
        while sub.next(Duration::from_millis(300)).await.is_some() {}
        let before = sub.received.len();
        reset_usb_device(
            kbd.attr_u64("busnum").expect("busnum"),
            kbd.attr_u64("devnum").expect("devnum"),
        );
        while sub.next(Duration::from_millis(1500)).await.is_some() {}
        println!(
            "INFO uevents after USBDEVFS_RESET of the keyboard: {:?}",
            &sub.received[before..]
        );
        tracer.report();
        println!(
            "INFO port state values read on POLLPRI around the reset: {:?}",
            port_state.stop()
        );
        println!("SEEN reset usb-kbd");

        let removed = expect(&mut sub, "remove usb-kbd", |s| {
            is_usb_device(s, "remove", "0627", "0001")
        })
        .await;
        assert!(
            matches!(&removed, Signal::Device { sys_path, .. } if *sys_path == kbd_path),
            "{removed:?}"
        );
        assert_eq!(attr(&removed, "product"), "QEMU USB Keyboard");

        // usb-storage: 46f4:0001 "QEMU USB HARDDRIVE", then its SCSI disk.
        let stick = expect(&mut sub, "add usb-storage", |s| {
            is_usb_device(s, "add", "46f4", "0001")
        })
        .await;
        assert_eq!(attr(&stick, "product"), "QEMU USB HARDDRIVE", "{stick:?}");
        let usb_disk = |action: &'static str| {
            move |s: &Signal| {
                matches!(s, Signal::Device { action: a, tag: 2, sys_path, .. } if a == action && sys_path.contains("/usb"))
                    && s.attr_str("devtype").as_deref() == Some("disk")
            }
        };
        let disk = expect(&mut sub, "add usb-disk", usb_disk("add")).await;
        assert_eq!(disk.attr_u64("size"), Some(4 << 20), "{disk:?}");
        assert!(attr(&disk, "devname").starts_with("/dev/sd"), "{disk:?}");
        expect(&mut sub, "storage driver bound", |s| {
            matches!(s, Signal::Device { tag: 1, .. })
                && attr(s, "interface-class") == "08"
                && attr(s, "driver") == "usb-storage"
        })
        .await;
        let gone = expect(&mut sub, "remove usb-disk", usb_disk("remove")).await;
        assert_eq!(attr(&gone, "devname"), attr(&disk, "devname"));
        expect(&mut sub, "remove usb-storage", |s| {
            is_usb_device(s, "remove", "46f4", "0001")
        })
        .await;

        // virtio disk behind blkdebug: a read of BAD_SECTOR fails with EIO.
        let vd = |action: &'static str| {
            move |s: &Signal| {
                matches!(s, Signal::Device { action: a, tag: 2, .. } if a == action)
                    && s.attr_str("name").is_some_and(|n| n.starts_with("vd"))
                    && s.attr_str("devtype").as_deref() == Some("disk")
            }
        };
        let vda = expect(&mut sub, "add virtio-disk", vd("add")).await;
        let name = attr(&vda, "name");
        let err = failing_read(&format!("/dev/{name}"), BAD_SECTOR);
        assert_eq!(err.raw_os_error(), Some(nix::libc::EIO), "{err}");
        let error = expect(&mut sub, "block-error", |s| {
            matches!(s, Signal::BlockError { tag: 3, .. })
        })
        .await;
        match &error {
            Signal::BlockError {
                device,
                sector,
                errno,
                errno_name,
                operation,
                count,
                major,
                ..
            } => {
                assert_eq!(device, &name);
                assert_eq!(*sector, BAD_SECTOR);
                assert_eq!((*errno, errno_name.as_str()), (5, "EIO"));
                assert!(operation.starts_with('R'), "{operation}");
                assert_eq!(*count, 1);
                assert_eq!(Some(u64::from(*major)), vda.attr_u64("major"));
            }
            other => panic!("{other:?}"),
        }
        expect(&mut sub, "remove virtio-disk", vd("remove")).await;
        assert_contiguous(&sub.received);
    }
}
