//! watchqd as a distribution runs it: a full-OS guest (Debian bookworm, systemd as PID 1,
//! dbus, polkitd, udev, logind, the user alice) booted from the cached image of
//! `tests/vm/build-os-image` on the test kernel; the package installed with `dpkg -i`.
//!
//! `os_guest_is_a_working_system` proves the bed itself; `installed_package_serves_the_system_bus`
//! installs watchqd into it and drives it through systemd and D-Bus activation.
//! Run with: `cargo test --test guest_system` (as root, after `tests/vm/setup-host`).

#[path = "common/vm.rs"]
mod vm;

use vm::{ok, sh};

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;

const STEP: Duration = Duration::from_secs(120);

fn boot(options: &vm::BootOptions) -> vm::Guest {
    let start = Instant::now();
    let guest =
        vm::Guest::boot(options).unwrap_or_else(|e| panic!("booting the full-OS guest: {e}"));
    println!("boot → agent ready: {:.1} s", start.elapsed().as_secs_f64());
    guest
}

/// `NAME=VALUE` lines (`systemctl show`) as a lookup.
fn property<'a>(show: &'a str, name: &str) -> &'a str {
    show.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {name}= in:\n{show}"))
}

/// Wait until the system has booted; no unit may have failed.
/// Hot-plugs a QEMU USB keyboard on the guest's xHCI controller.
fn plug_usb_keyboard(guest: &vm::Guest) {
    guest
        .qmp_execute(
            "device_add",
            &json!({"driver": "usb-kbd", "bus": "xhci.0", "id": "kbd0"}),
        )
        .expect("device_add usb-kbd");
}

/// The instance of `template` for `instance`, escaped by systemd itself.
fn unit_instance(guest: &vm::Guest, template: &str, instance: &str) -> String {
    ok(
        guest,
        &format!("systemd-escape --template={template} '{instance}'"),
    )
    .trim()
    .to_owned()
}

fn wait_running(guest: &vm::Guest) {
    let start = Instant::now();
    let state = sh(guest, "systemctl is-system-running --wait");
    let failed = ok(guest, "systemctl --failed --no-legend --plain --no-pager");
    println!(
        "system state: {} ({:.1} s after ready)",
        state.stdout.trim(),
        start.elapsed().as_secs_f64()
    );
    assert!(
        failed.trim().is_empty(),
        "failed units in the guest:\n{failed}\n{}",
        sh(guest, "journalctl -b -p warning --no-pager | tail -n 60").stdout
    );
    assert!(
        matches!(state.stdout.trim(), "running" | "degraded"),
        "systemctl is-system-running: {state}"
    );
}

#[test]
fn os_guest_is_a_working_system() {
    let start = Instant::now();
    let guest = boot(&vm::BootOptions::new().os().hotplug());
    wait_running(&guest);

    let init = ok(&guest, "readlink /proc/1/exe");
    assert!(init.trim().ends_with("/systemd"), "PID 1 is {init}");

    let names = ok(
        &guest,
        "busctl --system list --no-pager --acquired --activatable",
    );
    for name in ["org.freedesktop.systemd1", "org.freedesktop.PolicyKit1"] {
        assert!(
            names.contains(name),
            "{name} missing from the system bus:\n{names}"
        );
    }
    let backend = ok(
        &guest,
        "busctl --system call org.freedesktop.PolicyKit1 /org/freedesktop/PolicyKit1/Authority \
         org.freedesktop.DBus.Properties Get ss org.freedesktop.PolicyKit1.Authority BackendName",
    );
    println!("polkit backend: {}", backend.trim());
    assert!(backend.starts_with("v s "), "BackendName: {backend}");

    let user = ok(
        &guest,
        "su -l alice -c 'id -un; loginctl list-sessions --no-legend'",
    );
    println!("as alice: {user}");
    assert_eq!(user.lines().next(), Some("alice"), "su -l alice: {user}");

    let loop_dev = ok(
        &guest,
        "truncate -s 16M /var/tmp/loop.img && dev=$(losetup -f --show /var/tmp/loop.img) \
         && echo \"$dev\" && losetup -d \"$dev\"",
    );
    assert!(
        loop_dev.trim().starts_with("/dev/loop"),
        "losetup: {loop_dev}"
    );

    plug_usb_keyboard(&guest);
    let keyboard = ok(
        &guest,
        "for i in $(seq 300); do \
           dev=$(grep -l 'QEMU USB Keyboard' /sys/bus/usb/devices/*/product 2>/dev/null) && break; \
           sleep 0.1; \
         done; \
         [ -n \"$dev\" ] || { ls -l /sys/bus/usb/devices; exit 1; }; \
         udevadm settle && udevadm info \"${dev%/product}\" && \
         udevadm info --query=property --property=ID_INPUT_KEYBOARD /sys/class/input/event*",
    );
    println!("{keyboard}");
    assert!(
        keyboard.contains("ID_MODEL=QEMU_USB_Keyboard"),
        "udev did not describe the keyboard:\n{keyboard}"
    );
    assert!(
        keyboard.contains("ID_INPUT_KEYBOARD=1"),
        "udev did not tag an input device as keyboard:\n{keyboard}"
    );

    guest.shutdown().expect("guest shutdown");
    println!("whole test: {:.1} s", start.elapsed().as_secs_f64());
}

/// The Debian package, built by the README's one command for it (`packaging/build`, which
/// prints the .deb's path first).
fn watchqd_deb() -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(repo.join("packaging/build"))
        .current_dir(repo)
        .output()
        .expect("run packaging/build");
    assert!(
        out.status.success(),
        "packaging/build: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let deb = stdout
        .lines()
        .find(|line| line.ends_with(".deb"))
        .unwrap_or_else(|| panic!("packaging/build printed no .deb path:\n{stdout}"));
    PathBuf::from(deb)
}

/// What an administrator adds to /etc/watchqd/watchqd.toml: a USB device plugged in
/// starts a templated unit named after it. (Device events going to the journal is a
/// one-word edit of the installed file's `[journal]` section.) The first rule names a
/// unit that was never installed: its failure must not keep the second from starting.
const ADMIN_RULE: &str = r#"
[[units]]
source = "devices"
kinds = ["add"]
properties = { subsystem = "usb", devtype = "usb_device" }
unit = "watchq-absent@.service"
instance = "name"

[[units]]
source = "devices"
kinds = ["add"]
properties = { subsystem = "usb", devtype = "usb_device" }
unit = "watchq-usb@.service"
instance = "name"
"#;

/// The unit the rule starts: it records which device it was started for.
const USB_TEMPLATE: &str = "[Unit]
Description=USB device %I, announced by watchqd

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'echo \"%I\" >>/run/watchq-usb-started'
";

/// MESSAGE_ID of a device `change` record (README, "Journal records").
const DEVICE_CHANGE_ID: &str = "9dac70fd54f04de293ff2890bf916cae";
/// MESSAGE_ID of a device `add` record.
const DEVICE_ADD_ID: &str = "384f719155194359bb7ed41ca9f34bb1";
/// What dbus-daemon logs when a call to org.watchq1 starts watchqd through systemd
/// (followed by `requested by ':1.N' (uid=U pid=P comm="…")`).
const BUS_ACTIVATION: &str =
    "Activating via systemd: service name='org.watchq1' unit='watchqd.service' requested by";

/// `systemctl show` of the unit's state and restart count.
fn unit_state(guest: &vm::Guest) -> String {
    ok(
        guest,
        "systemctl show -p ActiveState,SubState,Type,NRestarts,MainPID watchqd",
    )
}

/// Fail with the unit's journal when it is not running.
fn assert_running(guest: &vm::Guest, show: &str, context: &str) {
    if property(show, "ActiveState") != "active" || property(show, "SubState") != "running" {
        let journal = sh(
            guest,
            "systemctl status --no-pager watchqd; journalctl -u watchqd -b --no-pager",
        );
        panic!(
            "watchqd is not running {context}:\n{show}\n{}",
            journal.stdout
        );
    }
}

/// The signals `watchqctl monitor --json` printed, one JSON object a line, of one kind.
fn json_signals(stdout: &str, signal: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .filter(|line| line.starts_with('{'))
        .map(|line| {
            serde_json::from_str::<serde_json::Value>(line).unwrap_or_else(|e| {
                panic!("watchqctl printed a line that is not JSON ({e}): {line}")
            })
        })
        .filter(|value| value["signal"] == signal)
        .collect()
}

/// Start `sh -c SCRIPT` in the background, its pid in `PIDFILE`, so that it can be stopped.
fn spawn_killable<'g>(guest: &'g vm::Guest, pidfile: &str, script: &str) -> vm::GuestProcess<'g> {
    let wrapped = format!("echo $$ >{pidfile}; exec {script}");
    guest
        .spawn(&["sh", "-c", &wrapped], &[])
        .unwrap_or_else(|e| panic!("starting '{script}' in the guest: {e}"))
}

#[test]
fn installed_package_serves_the_system_bus() {
    let start = Instant::now();
    let deb = watchqd_deb();
    println!("package built in {:.1} s", start.elapsed().as_secs_f64());
    let guest = boot(&vm::BootOptions::new().os().hotplug());
    wait_running(&guest);
    fs::copy(&deb, guest.dir().join("watchqd.deb")).expect("copy the package to the guest");

    // Installed as Debian does it: enabled and started by the package.
    let installed = ok(&guest, "dpkg -i watchqd.deb");
    println!("{installed}");
    let show = unit_state(&guest);
    assert_running(&guest, &show, "after dpkg -i");
    assert_eq!(
        ok(
            &guest,
            "systemctl is-enabled watchqd.service watchqd.socket"
        )
        .lines()
        .collect::<Vec<_>>(),
        ["enabled", "enabled"]
    );

    // An administrator stops it, configures a rule and the journal, and starts it the
    // README's way.
    ok(
        &guest,
        "systemctl disable --now watchqd.service watchqd.socket",
    );
    fs::write(guest.dir().join("admin.toml"), ADMIN_RULE).expect("write the admin rule");
    fs::write(guest.dir().join("watchq-usb@.service"), USB_TEMPLATE).expect("write the template");
    ok(
        &guest,
        "sed -i 's/^events = false$/events = true/' /etc/watchqd/watchqd.toml \
         && grep -qx 'events = true' /etc/watchqd/watchqd.toml \
         && /usr/libexec/watchqd --check-config >/dev/null \
         && cp watchq-usb@.service /etc/systemd/system/ && systemctl daemon-reload",
    );
    ok(&guest, "systemctl enable --now watchqd");
    let show = unit_state(&guest);
    println!("{show}");
    assert_running(&guest, &show, "after systemctl enable --now");
    assert_eq!(property(&show, "Type"), "notify", "{show}");
    assert_eq!(
        ok(&guest, "systemctl is-active watchqd.socket").trim(),
        "active"
    );
    let first_pid = property(&show, "MainPID").to_owned();

    println!("{}", ok(&guest, "su -l alice -c 'watchqctl status'"));
    let introspection = ok(
        &guest,
        "su -l alice -c 'busctl --system introspect org.watchq1 /org/watchq1'",
    );
    assert!(
        introspection.contains("org.watchq1.Manager"),
        "introspection as alice:\n{introspection}"
    );

    // The hardening as systemd itself scores it, on the installed unit.
    let security = ok(
        &guest,
        "systemd-analyze security --no-pager watchqd.service",
    );
    println!("systemd-analyze security watchqd.service:\n{security}");
    let exposure: f64 = security
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for watchqd.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no overall exposure in:\n{security}"));
    assert!(
        exposure <= 2.0,
        "exposure {exposure} above 2.0:\n{security}"
    );

    // Two subscribers (alice: a direct subscription, watchqctl's default, and one on the
    // bus with --bus) and a bus monitor (root) see a loop device arrive, through the
    // uevent socket systemd opened (the daemon has a network namespace of its own). The
    // monitor sees the bus subscriber's signals; the direct one's never cross the bus.
    let monitor = spawn_killable(
        &guest,
        "/run/monitor.pid",
        "busctl --system monitor org.watchq1",
    );
    let subscriber = spawn_killable(
        &guest,
        "/run/subscriber.pid",
        "su -l alice -c 'exec watchqctl monitor --json devices 2>&1'",
    );
    let bus_subscriber = spawn_killable(
        &guest,
        "/run/bus-subscriber.pid",
        "su -l alice -c 'exec watchqctl monitor --bus --json devices 2>&1'",
    );
    subscriber
        .wait_for_stdout("watching devices", STEP)
        .expect("watchqctl monitor subscribed");
    bus_subscriber
        .wait_for_stdout("watching devices", STEP)
        .expect("watchqctl monitor --bus subscribed");
    let loop_device = ok(
        &guest,
        "truncate -s 16M /var/tmp/watched.img && losetup -f --show /var/tmp/watched.img",
    );
    let loop_device = loop_device.trim();
    subscriber
        .wait_for_stdout("\"signal\":\"DeviceChanged\"", STEP)
        .expect("DeviceChanged at the subscriber");
    bus_subscriber
        .wait_for_stdout("\"signal\":\"DeviceChanged\"", STEP)
        .expect("DeviceChanged at the bus subscriber");
    monitor
        .wait_for_stdout("Member=DeviceChanged", STEP)
        .expect("DeviceChanged in busctl monitor");
    ok(
        &guest,
        "kill $(cat /run/monitor.pid /run/subscriber.pid /run/bus-subscriber.pid)",
    );
    let monitor = monitor.wait(STEP).expect("busctl monitor ends");
    let subscriber = subscriber.wait(STEP).expect("watchqctl monitor ends");
    let bus_subscriber = bus_subscriber
        .wait(STEP)
        .expect("watchqctl monitor --bus ends");
    println!("watchqctl monitor as alice:\n{}", subscriber.stdout);
    println!(
        "watchqctl monitor --bus as alice:\n{}",
        bus_subscriber.stdout
    );
    assert!(
        bus_subscriber.stdout.contains(loop_device),
        "no {loop_device} among the bus subscriber's events:\n{}",
        bus_subscriber.stdout
    );
    let signal = monitor
        .stdout
        .split("\n\n")
        .find(|message| message.contains("Member=DeviceChanged"))
        .unwrap_or_default();
    println!("busctl monitor, the first DeviceChanged:\n{signal}");
    assert!(
        subscriber.stdout.contains(loop_device),
        "no {loop_device} among the subscriber's events:\n{}",
        subscriber.stdout
    );

    // The same event in the journal, findable by its MESSAGE_ID and fields.
    let journal = ok(
        &guest,
        &format!(
            "for i in $(seq 100); do \
               out=$(journalctl -b -o export --no-pager MESSAGE_ID={DEVICE_CHANGE_ID} \
                     WATCHQ_DEVNAME={loop_device}); \
               [ -n \"$out\" ] && break; sleep 0.1; \
             done; echo \"$out\""
        ),
    );
    assert!(
        journal.contains("WATCHQ_SOURCE=devices") && journal.contains("WATCHQ_KIND=change"),
        "no journal record of {loop_device}'s change:\n{journal}\n{}",
        sh(
            &guest,
            "journalctl -b -o verbose --no-pager -t watchqd | tail -n 80"
        )
        .stdout
    );

    // The unit rules, added to the file and applied with `systemctl reload` (ExecReload=
    // on systemd 252): the same process, still running, takes them.
    ok(
        &guest,
        "cat admin.toml >>/etc/watchqd/watchqd.toml \
         && /usr/libexec/watchqd --check-config >/dev/null \
         && systemctl reload watchqd",
    );
    let show = unit_state(&guest);
    assert_running(&guest, &show, "after systemctl reload");
    assert_eq!(
        property(&show, "MainPID"),
        first_pid,
        "a reload restarted the daemon: {show}"
    );
    // On systemd 252 the reload job ends when `kill` has sent SIGHUP, not when the
    // daemon is done: wait for its word.
    let reloaded = ok(
        &guest,
        "for i in $(seq 100); do \
           journalctl -b -u watchqd --no-pager | grep -q 'configuration reloaded' && break; \
           sleep 0.1; \
         done; journalctl -b -u watchqd --no-pager",
    );
    assert!(
        reloaded.contains("configuration reloaded: applied [[units]] and [journal]"),
        "{reloaded}"
    );

    // A USB keyboard plugged in: the rule added by the reload starts
    // watchq-usb@<its name>.service.
    plug_usb_keyboard(&guest);
    let started = ok(
        &guest,
        "for i in $(seq 600); do [ -s /run/watchq-usb-started ] && break; sleep 0.1; done; \
         cat /run/watchq-usb-started",
    );
    let name = started.trim();
    let product = ok(&guest, &format!("cat /sys/bus/usb/devices/{name}/product"));
    assert_eq!(product.trim(), "QEMU USB Keyboard", "started for {name}");
    let unit = unit_instance(&guest, "watchq-usb@.service", name);
    assert_eq!(
        ok(&guest, &format!("systemctl is-active '{unit}'")).trim(),
        "active"
    );
    let log = ok(&guest, "journalctl -b -u watchqd --no-pager");
    assert!(
        log.contains(&format!("started unit {unit} for devices add")),
        "{log}"
    );
    // The rule before it failed, said why, and delayed nothing.
    let absent = unit_instance(&guest, "watchq-absent@.service", name);
    let failure = format!("rule units[0]: cannot start unit {absent}");
    let failed = log
        .lines()
        .find(|line| line.contains(&failure))
        .unwrap_or_else(|| panic!("no '{failure}' in the log:\n{log}"));
    assert!(
        failed.contains("NoSuchUnit") && failed.contains("for devices add"),
        "the failure names systemd's reason and the event: {failed}"
    );
    // The metrics, as any user reads them: one start of rule 1, one failure of rule 0.
    // Counted once systemd answered, which may come after the unit ran: waited for.
    let started_line = "watchqd_unit_starts_total{rule=\"1\",unit=\"watchq-usb@.service\"} 1";
    let metrics = ok(
        &guest,
        &format!(
            "for i in $(seq 100); do \
               su -l alice -c 'watchqctl metrics' | grep -qxF '{started_line}' && break; \
               sleep 0.1; \
             done; su -l alice -c 'watchqctl metrics'"
        ),
    );
    for line in [
        started_line,
        "watchqd_unit_start_failures_total{rule=\"0\",unit=\"watchq-absent@.service\"} 1",
    ] {
        assert_eq!(
            metrics.lines().filter(|l| *l == line).count(),
            1,
            "no {line} in:\n{metrics}"
        );
    }
    assert_eq!(
        metrics
            .lines()
            .filter(|l| l.starts_with("watchqd_unit_start"))
            .count(),
        2,
        "one series for each rule, nothing else:\n{metrics}"
    );
    let journal = ok(
        &guest,
        &format!(
            "journalctl -b -o export --no-pager MESSAGE_ID={DEVICE_ADD_ID} WATCHQ_SUBSYSTEM=usb \
             WATCHQ_NAME={name}"
        ),
    );
    assert!(journal.contains("WATCHQ_DEVTYPE=usb_device"), "{journal}");

    // Key changes as alice: the helper sets her watch with her credentials, under
    // KeyringMode=private, the syscall filter and ProtectProc=invisible.
    let keys = spawn_killable(
        &guest,
        "/run/keys.pid",
        "su -l alice -c 'exec watchqctl monitor --json keys 2>&1'",
    );
    keys.wait_for_stdout("watching keys", STEP)
        .expect("alice watches her keys");
    let user_keyring = ok(&guest, "su -l alice -c 'keyctl id @u'");
    let user_keyring: i64 = user_keyring
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("keyctl id @u as alice printed {user_keyring:?}: {e}"));
    let key = ok(&guest, "su -l alice -c 'keyctl add user watched v1 @u'");
    let key: i64 = key
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("keyctl add printed {key:?}: {e}"));
    // Her user keyring's record of the link names the new key.
    keys.wait_for_stdout(&format!("\"aux\":{key}"), STEP)
        .expect("KeyChanged naming alice's new key");
    ok(&guest, "kill $(cat /run/keys.pid)");
    let keys = keys.wait(STEP).expect("watchqctl monitor keys ends");
    println!("alice's keys, after adding {key}:\n{}", keys.stdout);
    let key_changes = json_signals(&keys.stdout, "KeyChanged");
    assert!(
        key_changes
            .iter()
            .any(|k| k["change"] == "linked" && k["key"] == user_keyring && k["aux"] == key),
        "no KeyChanged: linked {key} into alice's user keyring {user_keyring}:\n{}",
        keys.stdout
    );

    // Low space on a filesystem alice owns under /home (ProtectHome, PrivateMounts: the
    // path is resolved in her namespace, the mount made after the daemon started).
    ok(
        &guest,
        "truncate -s 32M /var/tmp/small.img && mkfs.ext4 -q /var/tmp/small.img \
         && mkdir /home/alice/small && mount -o loop /var/tmp/small.img /home/alice/small \
         && chown alice: /home/alice/small",
    );
    let space = spawn_killable(
        &guest,
        "/run/space.pid",
        "su -l alice -c 'exec watchqctl monitor --json space --match path=/home/alice/small \
         --match low-percent=50 2>&1'",
    );
    space
        .wait_for_stdout("watching space", STEP)
        .expect("alice watches her filesystem's space");
    ok(
        &guest,
        "su -l alice -c 'dd if=/dev/zero of=/home/alice/small/fill bs=1M count=24 status=none; sync'",
    );
    space
        .wait_for_stdout("\"signal\":\"SpaceWarning\"", STEP)
        .expect("SpaceWarning for alice's filesystem");
    ok(&guest, "kill $(cat /run/space.pid)");
    let space = space.wait(STEP).expect("watchqctl monitor space ends");
    println!("alice's space warnings:\n{}", space.stdout);
    // Every warning is about her path, on its own mount; the first, that it went low.
    let warnings = json_signals(&space.stdout, "SpaceWarning");
    assert!(
        !warnings.is_empty(),
        "no SpaceWarning line:\n{}",
        space.stdout
    );
    for warning in &warnings {
        assert_eq!(warning["path"], "/home/alice/small", "{warning}");
        assert_eq!(warning["mount_point"], "/home/alice/small", "{warning}");
        assert_eq!(warning["attributes"]["fs-type"], "ext4", "{warning}");
    }
    assert_eq!(
        (&warnings[0]["level"], &warnings[0]["state"]),
        (&json!("low"), &json!("crossed")),
        "{}",
        warnings[0]
    );

    // Killed: systemd restarts it (Restart=on-failure).
    ok(&guest, "systemctl kill -s KILL watchqd");
    let show = ok(
        &guest,
        "for i in $(seq 300); do \
           s=$(systemctl show -p ActiveState,SubState,Type,NRestarts,MainPID watchqd); \
           echo \"$s\" | grep -qx NRestarts=1 && echo \"$s\" | grep -qx SubState=running && break; \
           sleep 0.1; \
         done; echo \"$s\"",
    );
    println!("after SIGKILL:\n{show}");
    assert_running(&guest, &show, "after systemctl kill -s KILL");
    assert_eq!(property(&show, "NRestarts"), "1", "{show}");
    assert_ne!(property(&show, "MainPID"), first_pid, "{show}");
    ok(&guest, "su -l alice -c 'watchqctl status'");

    // Stopped, with its socket (a uevent on a listening socket would start it too): a
    // client's call starts it again through D-Bus activation, which dbus-daemon logs
    // naming the caller.
    ok(&guest, "systemctl stop watchqd.socket watchqd.service");
    assert_eq!(
        sh(&guest, "systemctl is-active watchqd.socket watchqd.service")
            .stdout
            .lines()
            .collect::<Vec<_>>(),
        ["inactive", "inactive"]
    );
    let activations = || -> usize {
        ok(
            &guest,
            &format!("journalctl -b -o cat --no-pager | grep -cF \"{BUS_ACTIVATION}\" || true"),
        )
        .trim()
        .parse()
        .expect("a count from grep -c")
    };
    let activations_before = activations();
    let alice_uid = ok(&guest, "id -u alice");
    ok(&guest, "su -l alice -c 'watchqctl status'");
    let show = unit_state(&guest);
    println!("after D-Bus activation:\n{show}");
    assert_running(&guest, &show, "after D-Bus activation");
    // journald may take a moment to store dbus-daemon's line.
    let activation = ok(
        &guest,
        &format!(
            "for i in $(seq 100); do \
               n=$(journalctl -b -o cat --no-pager | grep -cF \"{BUS_ACTIVATION}\"); \
               [ \"$n\" -gt {activations_before} ] && break; sleep 0.1; \
             done; journalctl -b -o cat --no-pager | grep -F \"{BUS_ACTIVATION}\" | tail -n 1"
        ),
    );
    assert_eq!(activations(), activations_before + 1, "{activation}");
    assert!(
        activation.contains(&format!("(uid={} ", alice_uid.trim())),
        "the activation was not requested by alice's call: {activation}"
    );
    let log = ok(&guest, "journalctl -u watchqd -b --no-pager");
    println!("journalctl -u watchqd -b:\n{log}");
    let errors = ok(
        &guest,
        "journalctl -b _SYSTEMD_UNIT=watchqd.service -p err -o cat --no-pager",
    );
    assert!(errors.trim().is_empty(), "watchqd logged errors:\n{errors}");

    guest.shutdown().expect("guest shutdown");
    println!("whole test: {:.1} s", start.elapsed().as_secs_f64());
}
