//! watchqd's label rules against a real security module: the full-OS guest booted with
//! AppArmor (`lsm=apparmor`), enforcing, two test profiles loaded with `apparmor_parser`,
//! and `watchqctl` run under them with `aa-exec` against the system bus's dbus-daemon,
//! polkitd and the freshly built (debug) watchqd. One boot for the whole binary.
//!
//! What it shows (issue 21): the label is what the daemon sees (`watchqctl status` prints
//! it, and every decision is logged with it at debug level); a `[[policy.rules]]` deny
//! rule refuses a confined client even as root; a permit rule lets it through to polkit,
//! which still says no to what the caller's uid may not watch; a subscriber whose label a
//! reloaded rule denies loses its watch and gets none of the later events; a key watch is
//! set by the daemon's helper running under the subscriber's profile (the profile's audit
//! rule records it there). With SELinux (enforcing, a test policy module): a subscriber in
//! a domain denied `key { view }` on a key is refused its watch, the same subscriber in
//! `unconfined_t` is allowed.
//! Run with: `cargo test --test guest_lsm` (as root, after `tests/vm/setup-host`).

#[path = "common/vm.rs"]
mod vm;

use vm::{ok, sh};

use std::fs;
use std::time::{Duration, Instant};

const STEP: Duration = Duration::from_secs(120);

/// A profile that allows everything a bus client needs (and more), with `extra` rules.
/// The test's profiles differ only by name (and an audit rule), so that the rules below
/// tell them apart by label alone.
fn profile(name: &str, extra: &str) -> String {
    format!(
        "profile {name} flags=(enforce) {{
  include <abstractions/base>
{extra}  /usr/local/bin/watchqctl mrix,
  /usr/local/bin/watchqd mr,
  /** r,
  /run/dbus/system_bus_socket rw,
  unix,
  dbus,
  network unix,
  signal,
}}
"
    )
}

/// The profiles loaded into the guest.
fn profiles() -> String {
    [
        "abi <abi/3.0>,\ninclude <tunables/global>\n".to_owned(),
        profile("watchqd-test-denied", ""),
        // Logged for every process under this profile that starts through ld.so: who ran
        // under it (comm) shows in the kernel's audit records.
        profile("watchqd-test-permitted", "  audit /etc/ld.so.cache r,\n"),
    ]
    .join("\n")
}

/// The configuration: the denied profile is refused everything (root too); the permitted
/// one gets `permitted` (`verdict = "permit"`: on to polkit). The first matching rule
/// decides.
fn rules(permitted: &str) -> String {
    format!(
        r#"
[policy]
refuse_sandboxed = true

[[policy.rules]]
label = "watchqd-test-denied"
verdict = "deny"

[[policy.rules]]
label = "watchqd-test-perm*"
{permitted}
"#
    )
}

/// Waits (bounded) until `path` in the guest's directory holds `needle`; its text.
fn wait_for_file(guest: &vm::Guest, name: &str, needle: &str) -> String {
    let path = guest.dir().join(name);
    let deadline = Instant::now() + STEP;
    loop {
        let text = fs::read_to_string(&path).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "no '{needle}' in {name} within {STEP:?}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Installs the freshly built watchqd and watchqctl, the bus policy and the polkit actions,
/// writes the configuration and starts watchqd (debug log in `daemon.err`, its pid in
/// `daemon.pid`); returns once it owns its name.
fn start_watchqd<'g>(guest: &'g vm::Guest) -> vm::GuestProcess<'g> {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let copies = [
        (env!("CARGO_BIN_EXE_watchqd").into(), "watchqd"),
        (env!("CARGO_BIN_EXE_watchqctl").into(), "watchqctl"),
        (repo.join("dbus/org.watchq1.conf"), "org.watchq1.conf"),
        (repo.join("polkit/org.watchq1.policy"), "org.watchq1.policy"),
    ];
    for (from, to) in copies {
        let from: std::path::PathBuf = from;
        fs::copy(&from, guest.dir().join(to))
            .unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
    }
    fs::write(
        guest.dir().join("watchqd.toml"),
        rules("verdict = \"permit\""),
    )
    .expect("write watchqd.toml");
    ok(
        guest,
        "install -m 0755 watchqd watchqctl /usr/local/bin/ && \
         install -m 0644 org.watchq1.conf /usr/share/dbus-1/system.d/ && \
         install -m 0644 org.watchq1.policy /usr/share/polkit-1/actions/ && \
         systemctl reload dbus",
    );
    let daemon = guest
        .spawn(
            &[
                "sh",
                "-c",
                "echo $$ >daemon.pid; exec /usr/local/bin/watchqd --config watchqd.toml \
                 --log-level debug >daemon.out 2>daemon.err",
            ],
            &[],
        )
        .expect("start watchqd");
    ok(
        guest,
        "for i in $(seq 600); do \
           busctl --system status org.watchq1 >/dev/null 2>&1 && exit 0; sleep 0.1; \
         done; cat daemon.err; exit 1",
    );
    daemon
}

/// Loads the test's AppArmor profiles.
fn load_profiles(guest: &vm::Guest) {
    fs::write(guest.dir().join("profiles"), profiles()).expect("write profiles");
    ok(
        guest,
        "install -m 0644 profiles /etc/apparmor.d/watchqd-test && \
         apparmor_parser -r -W /etc/apparmor.d/watchqd-test",
    );
    let profiles = ok(
        guest,
        "aa-enabled && cat /sys/kernel/security/apparmor/profiles",
    );
    for name in [
        "watchqd-test-denied (enforce)",
        "watchqd-test-permitted (enforce)",
    ] {
        assert!(profiles.contains(name), "{name} not loaded:\n{profiles}");
    }
}

/// `watchqctl ARGS` as `user` (root or alice) under the AppArmor profile `profile`.
fn confined(user: &str, profile: &str, args: &str) -> String {
    let inner = format!("aa-exec -p {profile} -- /usr/local/bin/watchqctl {args}");
    if user == "root" {
        inner
    } else {
        format!("su {user} -s /bin/sh -c '{inner}'")
    }
}

/// A test domain for SELinux: `watchqd_test_t` is unconfined (it may do what
/// `unconfined_t` may) except that it may not view keys labelled `watchqd_key_t` (not a
/// `domain`, so unconfined's key rules do not cover it), the label of keys created in that
/// permissive domain; `unconfined_t` may. The agent's `initrc_t` is made permissive so that it keeps its 9p
/// directory when the guest enforces.
const SELINUX_MODULE: &str = "
(type watchqd_test_t)
(roletype system_r watchqd_test_t)
(typeattributeset domain (watchqd_test_t))
(typeattributeset unconfined_domain_type (watchqd_test_t))
(typeattributeset kern_unconfined (watchqd_test_t))
(typeattributeset files_unconfined_type (watchqd_test_t))
(typeattributeset filesystem_unconfined_type (watchqd_test_t))
(typeattributeset devices_unconfined_type (watchqd_test_t))
(typeattributeset corenet_unconfined_type (watchqd_test_t))
(typeattributeset dbusd_unconfined (watchqd_test_t))
(typeattributeset process_uncond_exempt (watchqd_test_t))
(allow watchqd_test_t bin_t (file (entrypoint execute read open getattr map)))
(type watchqd_key_t)
(roletype system_r watchqd_key_t)
(typepermissive watchqd_key_t)
(allow watchqd_key_t bin_t (file (entrypoint execute read open getattr map)))
(allow unconfined_t watchqd_key_t (key (view read search)))
(allow unconfined_t bin_t (file (entrypoint)))
(typepermissive initrc_t)
";

/// The full-OS guest with the security module `lsm` active.
fn boot(lsm: &str) -> vm::Guest {
    let start = Instant::now();
    let guest = vm::Guest::boot(&vm::BootOptions::new().os().lsm(lsm))
        .unwrap_or_else(|e| panic!("booting the full-OS guest with {lsm}: {e}"));
    println!(
        "{lsm}: boot → agent ready: {:.1} s",
        start.elapsed().as_secs_f64()
    );
    guest
}

#[test]
fn apparmor_labels_decide() {
    let start = Instant::now();
    let guest = boot("apparmor");
    let lsm = ok(&guest, "cat /sys/kernel/security/lsm");
    assert_eq!(lsm, "capability,apparmor", "active security modules");
    load_profiles(&guest);
    let _daemon = start_watchqd(&guest);

    // The label as the daemon sees it, for the caller's own connection.
    let status = ok(
        &guest,
        &confined("root", "watchqd-test-denied", "status --json"),
    );
    let status: serde_json::Value = serde_json::from_str(status.trim())
        .unwrap_or_else(|e| panic!("watchqctl status --json ({e}): {status}"));
    assert_eq!(
        status["caller"]["label"], "watchqd-test-denied",
        "the caller as the daemon saw it: {status}"
    );
    assert_eq!(status["caller"]["uid"], "0", "{status}");
    let text = ok(
        &guest,
        &confined("alice", "watchqd-test-permitted", "status"),
    );
    assert!(
        text.contains("caller: uid 1000, security label watchqd-test-permitted"),
        "watchqctl status as alice, confined:\n{text}"
    );

    // deny: refused even as root.
    let denied = sh(
        &guest,
        // Bounded: a monitor let through would run until stopped.
        &format!(
            "timeout 60 {}",
            confined("root", "watchqd-test-denied", "monitor --bus devices")
        ),
    );
    assert!(
        !denied.success() && denied.stderr.contains("denied to uid 0 by rule 1"),
        "root under the denied profile: {denied}"
    );
    // permit: through to polkit, which lets alice watch devices but not block errors.
    let refused = sh(
        &guest,
        &format!(
            "timeout 60 {}",
            confined(
                "alice",
                "watchqd-test-permitted",
                "monitor --bus block-errors"
            )
        ),
    );
    assert!(
        !refused.success() && refused.stderr.contains("org.watchq1.watch-block-errors"),
        "alice under the permitted profile, block errors: {refused}"
    );
    let _monitor = guest
        .spawn(
            &[
                "sh",
                "-c",
                &format!(
                    "echo $$ >monitor.pid; exec {} >monitor.out 2>monitor.err",
                    confined(
                        "alice",
                        "watchqd-test-permitted",
                        "monitor --bus --json --match subsystem=block devices"
                    )
                ),
            ],
            &[],
        )
        .expect("start the permitted monitor");
    // watchqctl says so on stderr once its watch is set.
    wait_for_file(&guest, "monitor.err", "watching devices");
    ok(
        &guest,
        "truncate -s 8M /var/tmp/a.img && losetup -f --show /var/tmp/a.img >loop-a",
    );
    let loop_a = fs::read_to_string(guest.dir().join("loop-a")).expect("loop-a");
    let seen = wait_for_file(
        &guest,
        "monitor.out",
        loop_a.trim().trim_start_matches("/dev/"),
    );
    println!("the permitted subscriber saw:\n{seen}");

    // Every decision was logged at debug with the label.
    let log = fs::read_to_string(guest.dir().join("daemon.err")).expect("daemon.err");
    for (label, outcome) in [
        ("watchqd-test-denied", "policy: refused"),
        ("watchqd-test-permitted", "policy: allowed"),
        ("watchqd-test-permitted", "policy: refused"),
    ] {
        assert!(
            log.lines()
                .any(|l| l.contains(outcome) && l.contains(&format!("label=\"{label}\""))),
            "no '{outcome}' logged with label {label}:\n{log}"
        );
    }

    // Key watches are set by a helper (the daemon's binary, run again) under the
    // subscriber's label: the profile's audit rule records it running there.
    let _keys = guest
        .spawn(
            &[
                "sh",
                "-c",
                &format!(
                    "echo $$ >keys.pid; exec {} >keys.out 2>keys.err",
                    confined("alice", "watchqd-test-permitted", "monitor --bus keys")
                ),
            ],
            &[],
        )
        .expect("start the permitted key monitor");
    wait_for_file(&guest, "keys.err", "watching keys");
    let audit = ok(
        &guest,
        "{ dmesg; journalctl -b --no-pager -o cat; } | grep 'apparmor=\"AUDIT\"' || true",
    );
    let helper_under_label = |line: &&str| {
        line.contains("profile=\"watchqd-test-permitted\"") && line.contains("comm=\"watchqd\"")
    };
    assert!(
        audit.lines().any(|line| helper_under_label(&line)),
        "no audit record of the key watch helper (comm watchqd) under \
         watchqd-test-permitted:\n{audit}"
    );

    // A reloaded rule denies the permitted label the devices source: its watch ends,
    // and the next device event never reaches it.
    fs::write(
        guest.dir().join("watchqd.toml"),
        // After the reload: the permitted profile is denied the devices source.
        rules("sources = [\"devices\"]\nverdict = \"deny\""),
    )
    .expect("rewrite watchqd.toml");
    ok(&guest, "kill -HUP $(cat daemon.pid)");
    wait_for_file(&guest, "monitor.out", "policy-changed");
    ok(
        &guest,
        "truncate -s 8M /var/tmp/b.img && losetup -f --show /var/tmp/b.img >loop-b",
    );
    let loop_b = fs::read_to_string(guest.dir().join("loop-b")).expect("loop-b");
    let loop_b = loop_b.trim().trim_start_matches("/dev/").to_owned();
    // An unconfined root subscriber that receives loop-b's event proves it was published
    // (after the reload): the denied subscriber's watch was gone by then.
    let witness = ok(
        &guest,
        &format!(
            "timeout 60 /usr/local/bin/watchqctl monitor --bus --json --match subsystem=block \
               devices >witness.out 2>witness.err & \
             for i in $(seq 600); do grep -q 'watching devices' witness.err && break; sleep 0.1; done; \
             losetup -c /dev/{loop_b} && truncate -s 16M /var/tmp/b.img && losetup -c /dev/{loop_b}; \
             for i in $(seq 600); do grep -q '{loop_b}' witness.out && break; sleep 0.1; done; \
             cat witness.out"
        ),
    );
    assert!(
        witness.contains(&loop_b),
        "the witness saw no {loop_b} event: {witness}"
    );
    let after = fs::read_to_string(guest.dir().join("monitor.out")).expect("monitor.out");
    let removed = after.find("policy-changed").expect("WatchRemoved");
    assert!(
        !after[removed..].contains(&loop_b),
        "a label-denied subscriber received an event of {loop_b}:\n{after}"
    );
    // su waits for its command; systemd's shutdown would wait for su.
    ok(
        &guest,
        "kill $(cat monitor.pid keys.pid daemon.pid); \
         for pid in $(cat monitor.pid keys.pid daemon.pid); do \
           while kill -0 $pid 2>/dev/null; do sleep 0.1; done; \
         done",
    );
    guest.shutdown().expect("guest shutdown");
    println!("whole test: {:.1} s", start.elapsed().as_secs_f64());
}

/// The full-OS guest with SELinux: Debian's reference policy loaded, the image labelled at
/// build. What the bus reports as a client's LinuxSecurityLabel is the label watchqd sees
/// and `watchqctl status` prints. Then enforcing, with [`SELINUX_MODULE`]: alice in
/// `watchqd_test_t` is refused the watch of her own key labelled `watchqd_key_t` (the
/// helper ran in her domain and the kernel's `key { view }` check said no), alice in
/// `unconfined_t` is allowed. The daemon runs in the agent's `initrc_t`, which the module
/// makes permissive: without the transition the helper's check passes there.
#[test]
fn selinux_labels_and_key_watches() {
    let start = Instant::now();
    let guest = boot("selinux");
    let facts = ok(
        &guest,
        "cat /sys/kernel/security/lsm; echo; getenforce; id -Z; \
         ls -Z /usr/lib/systemd/systemd; systemctl is-system-running --wait; \
         systemctl --failed --no-legend --plain",
    );
    let lines: Vec<&str> = facts.lines().collect();
    assert!(
        matches!(
            lines.as_slice(),
            ["capability,selinux", "Permissive", own, systemd, "running"]
                if own.contains(":initrc_t:") && systemd.contains(":init_exec_t:")
        ),
        "SELinux guest (lsm, mode, the agent's context, systemd's file label, state, \
         failed units):\n{facts}"
    );
    let own = lines[2].trim().to_owned();
    let _daemon = start_watchqd(&guest);
    let status = ok(&guest, "/usr/local/bin/watchqctl status --json");
    let status: serde_json::Value = serde_json::from_str(status.trim())
        .unwrap_or_else(|e| panic!("watchqctl status --json ({e}): {status}"));
    assert_eq!(
        status["caller"]["label"],
        own.as_str(),
        "the caller as the daemon saw it: {status}"
    );
    // Enforcing, with a test domain that may not view keys labelled watchqd_key_t.
    fs::write(guest.dir().join("watchqd_test.cil"), SELINUX_MODULE).expect("write the module");
    ok(
        &guest,
        "semodule -i watchqd_test.cil && setenforce 1 && getenforce",
    );
    let key = ok(
        &guest,
        "setpriv --reuid 1000 --regid 1000 --init-groups \
           runcon -t watchqd_key_t keyctl add user watchqd-test secret @u",
    );
    let key = key.trim();
    // alice's `watchqctl monitor keys` in `domain`: its first line (an error, or the
    // "watching" note once the watch is set). In /run: enforcing, no new file can be made
    // in the unlabelled 9p directory.
    let as_alice = |domain: &str| {
        ok(
            &guest,
            &format!(
                "setpriv --reuid 1000 --regid 1000 --init-groups runcon -t {domain} \
                   /usr/local/bin/watchqctl monitor --bus keys --match serial={key} \
                   >/run/{domain}.out 2>&1 & pid=$!; \
                 for i in $(seq 600); do [ -s /run/{domain}.out ] && break; sleep 0.1; done; \
                 kill $pid 2>/dev/null; head -n 1 /run/{domain}.out"
            ),
        )
    };
    let confined = as_alice("watchqd_test_t");
    let unconfined = as_alice("unconfined_t");
    let avc = sh(
        &guest,
        "journalctl -b --no-pager -o cat | grep 'avc: .*tclass=key'",
    );
    println!(
        "watchqd_test_t: {confined}unconfined_t: {unconfined}{}",
        avc.stdout
    );
    assert!(
        confined.contains("the kernel refused KEYCTL_WATCH_KEY"),
        "alice in watchqd_test_t watching key {key}: {confined}\n{}",
        avc.stdout
    );
    assert!(
        unconfined.starts_with("watching keys"),
        "alice in unconfined_t watching key {key}: {unconfined}\n{}",
        avc.stdout
    );
    ok(
        &guest,
        "kill $(cat daemon.pid); while kill -0 $(cat daemon.pid) 2>/dev/null; do sleep 0.1; done",
    );
    guest.shutdown().expect("guest shutdown");
    println!("whole test: {:.1} s", start.elapsed().as_secs_f64());
}
