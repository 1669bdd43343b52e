//! Key notifications through the real daemon on a kernel that has watch_queue: the qemu
//! guest of the test bed (the host kernel lacks CONFIG_WATCH_QUEUE; tests/keys.rs covers
//! the host). One guest boot runs every step: boots cost seconds of TCG CPU.
//!
//! The host test prepares what the read-only shared root must already hold (test users,
//! the polkit files), boots the guest and re-runs `inside::keys_through_the_daemon` of
//! this binary there, which runs dbus-daemon, polkitd and watchqd, and does real key
//! operations (add_key, keyctl) as root and as the test users.
//! Run with: `cargo test --test guest_keys` (as root, after `tests/vm/setup-host`).

mod common;
#[path = "common/keyctl.rs"]
mod keyctl;
#[path = "common/vm.rs"]
mod vm;

use std::time::Duration;

const STEP: Duration = Duration::from_secs(600);

#[test]
fn key_changes_reach_subscribers_with_the_kernels_serials_and_policy() {
    common::polkit::install_policy();
    let _ = common::polkit::user("watchq-alice");
    let _ = common::polkit::user("watchq-bob");
    vm::Guest::run_inside(
        &vm::BootOptions::new(),
        "keys_through_the_daemon",
        STEP,
        |_, _| {},
    );
}

mod inside {
    use std::collections::HashMap;
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};
    use std::time::Duration;

    use zbus::Variant;

    use super::common::*;
    use super::keyctl::*;

    /// The burst: more updates than the kernel queue holds (256 notes).
    const BURST: usize = 5000;

    fn key_spec(
        pairs: &[(&'static str, Variant<'static>)],
    ) -> Vec<(&'static str, Variant<'static>)> {
        pairs
            .iter()
            .map(|(k, v)| (*k, v.try_clone().unwrap()))
            .collect()
    }

    /// (tag, change, key, aux) of every KeyChanged received.
    fn key_events(sub: &Subscriber) -> Vec<(u64, String, i32, i32)> {
        sub.received
            .iter()
            .filter_map(|s| match s {
                Signal::Key {
                    tag,
                    change,
                    key,
                    aux,
                    ..
                } => Some((*tag, change.clone(), *key, *aux)),
                _ => None,
            })
            .collect()
    }

    async fn expect_key(sub: &mut Subscriber, tag: u64, change: &str, key: i32, aux: Option<i32>) {
        let what = format!("{change} of key {key} (tag {tag}, aux {aux:?})");
        sub.until(&what, |signals| {
            signals.iter().any(|s| {
                matches!(s, Signal::Key { tag: t, change: c, key: k, aux: a, .. }
                    if *t == tag && c == change && *k == key && aux.is_none_or(|x| x == *a))
            })
        })
        .await;
        println!("SEEN {what}");
    }

    async fn expect_removed(sub: &mut Subscriber, tag: u64) -> String {
        sub.until(&format!("WatchRemoved of tag {tag}"), |signals| {
            signals
                .iter()
                .any(|s| matches!(s, Signal::WatchRemoved { tag: t, .. } if *t == tag))
        })
        .await;
        let reason = sub
            .received
            .iter()
            .find_map(|s| match s {
                Signal::WatchRemoved { tag: t, reason, .. } if *t == tag => Some(reason.clone()),
                _ => None,
            })
            .unwrap();
        println!("SEEN WatchRemoved tag {tag}: {reason}");
        reason
    }

    /// Drains what is already on its way.
    async fn settle(sub: &mut Subscriber) {
        while sub.next(Duration::from_millis(500)).await.is_some() {}
    }

    fn as_user(user: &super::common::polkit::User, program: &str, args: &[&str]) -> Command {
        let mut command = Command::new(program);
        command
            .args(args)
            .uid(user.uid)
            .gid(user.gid)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
        command
    }

    fn output_of(mut command: Command) -> (bool, String, String) {
        let out = command.output().expect("run a command");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        )
    }

    #[test]
    #[ignore = "runs inside the guest; started by the host test"]
    fn keys_through_the_daemon() {
        super::vm::enter_guest();
        // Our own session keyring, owned by root, for the keys this test makes.
        keyctl(
            "join a session keyring",
            KEYCTL_JOIN_SESSION_KEYRING,
            0,
            0,
            0,
        );
        super::vm::block_on(keys_async());
    }

    async fn keys_async() {
        let daemon = Daemon::with_polkit("");
        let depth = HashMap::from([("queue-depth", Variant::from(16384u32))]);
        let mut sub = Subscriber::with_options(&daemon, depth.clone()).await;
        let session = i32::try_from(keyctl(
            "session keyring id",
            KEYCTL_GET_KEYRING_ID,
            KEY_SPEC_SESSION_KEYRING.into(),
            0,
            0,
        ))
        .unwrap();
        // While the only watch wants unlinks, the kernel's filter drops links: the daemon
        // never reads them (its debug log shows every record it reads).
        let narrow = add_key("keyring", "watchqd-narrow", &[], session);
        let mut narrow_sub = Subscriber::with_options(&daemon, depth.clone()).await;
        narrow_sub
            .watch(
                "keys",
                6,
                &key_spec(&[
                    ("serial", Variant::from(narrow)),
                    ("changes", Variant::from(vec!["unlinked"])),
                ]),
            )
            .await;
        let n = add_key("user", "n", b"v", narrow);
        keyctl("KEYCTL_UNLINK n", KEYCTL_UNLINK, n.into(), narrow.into(), 0);
        expect_key(&mut narrow_sub, 6, "unlinked", narrow, Some(n)).await;
        let log = daemon.log_text();
        assert!(
            log.contains(&format!(
                "change: Unlinked, watch_id: 0, key: {narrow}, aux: {n}"
            )) && !log.contains(&format!("change: Linked, watch_id: 0, key: {narrow}")),
            "the kernel filter let a link through, or the unlink was not logged:\n{log}"
        );
        narrow_sub.proxy.remove_watch(6).await.expect("RemoveWatch");
        println!("SEEN kernel filter");

        let ring = add_key("keyring", "watchqd-guest", &[], session);
        sub.watch("keys", 1, &key_spec(&[("serial", Variant::from(ring))]))
            .await;
        // A second subscriber wants only unlinks of the same keyring (kernel filter and
        // matcher), a third filters with SetFilter.
        let mut unlinks = Subscriber::with_options(&daemon, depth.clone()).await;
        unlinks
            .watch(
                "keys",
                7,
                &key_spec(&[
                    ("serial", Variant::from(ring)),
                    ("changes", Variant::from(vec!["unlinked"])),
                ]),
            )
            .await;
        let mut filtered = Subscriber::with_options(&daemon, depth.clone()).await;
        filtered
            .watch("keys", 8, &key_spec(&[("serial", Variant::from(ring))]))
            .await;
        filtered
            .proxy
            .set_filter(&[("keys", &["linked"][..])])
            .await
            .expect("SetFilter");

        // linked
        let x = add_key("user", "x", b"one", ring);
        expect_key(&mut sub, 1, "linked", ring, Some(x)).await;
        sub.watch("keys", 2, &key_spec(&[("serial", Variant::from(x))]))
            .await;
        // updated
        update(x, b"two");
        expect_key(&mut sub, 2, "updated", x, Some(0)).await;
        // setattr
        keyctl("KEYCTL_SETPERM", KEYCTL_SETPERM, x.into(), 0x3f3f_0000, 0);
        expect_key(&mut sub, 2, "setattr", x, None).await;
        // unlinked
        let y = add_key("user", "y", b"v", ring);
        expect_key(&mut sub, 1, "linked", ring, Some(y)).await;
        keyctl("KEYCTL_UNLINK", KEYCTL_UNLINK, y.into(), ring.into(), 0);
        expect_key(&mut sub, 1, "unlinked", ring, Some(y)).await;
        // revoked
        keyctl("KEYCTL_REVOKE", KEYCTL_REVOKE, x.into(), 0, 0);
        expect_key(&mut sub, 2, "revoked", x, None).await;
        // cleared
        let inner = add_key("keyring", "inner", &[], ring);
        sub.watch("keys", 3, &key_spec(&[("serial", Variant::from(inner))]))
            .await;
        let z = add_key("user", "z", b"v", inner);
        expect_key(&mut sub, 3, "linked", inner, Some(z)).await;
        keyctl("KEYCTL_CLEAR", KEYCTL_CLEAR, inner.into(), 0, 0);
        expect_key(&mut sub, 3, "cleared", inner, None).await;
        // invalidated, then destroyed by the garbage collector: WatchRemoved.
        let w = add_key("user", "w", b"v", ring);
        sub.watch("keys", 4, &key_spec(&[("serial", Variant::from(w))]))
            .await;
        keyctl("KEYCTL_INVALIDATE", KEYCTL_INVALIDATE, w.into(), 0, 0);
        expect_key(&mut sub, 4, "invalidated", w, None).await;
        let reason = expect_removed(&mut sub, 4).await;
        assert!(reason.starts_with("key-destroyed"), "{reason}");
        // The revoked x, unlinked from its last keyring, is destroyed too.
        keyctl("KEYCTL_UNLINK x", KEYCTL_UNLINK, x.into(), ring.into(), 0);
        expect_key(&mut sub, 1, "unlinked", ring, Some(x)).await;
        let reason = expect_removed(&mut sub, 2).await;
        assert!(reason.starts_with("key-destroyed"), "{reason}");

        // Descriptions come with the watched key.
        let linked = sub
            .received
            .iter()
            .find(|s| matches!(s, Signal::Key { tag: 1, .. }))
            .cloned()
            .unwrap();
        match &linked {
            Signal::Key {
                key_type,
                description,
                ..
            } => assert_eq!(
                (key_type.as_str(), description.as_str()),
                ("keyring", "watchqd-guest")
            ),
            other => panic!("{other:?}"),
        }

        // The persistent keyring, resolved by the helper as the subscriber (root here).
        sub.watch(
            "keys",
            10,
            &key_spec(&[("keyring", Variant::from("persistent"))]),
        )
        .await;
        let persistent = i32::try_from(keyctl(
            "KEYCTL_GET_PERSISTENT",
            KEYCTL_GET_PERSISTENT,
            -1,
            session.into(),
            0,
        ))
        .unwrap();
        let p = add_key("user", "p", b"v", persistent);
        expect_key(&mut sub, 10, "linked", persistent, Some(p)).await;

        settle(&mut unlinks).await;
        settle(&mut filtered).await;
        let only_unlinks = key_events(&unlinks);
        assert_eq!(
            only_unlinks,
            vec![
                (7, "unlinked".to_owned(), ring, y),
                (7, "unlinked".to_owned(), ring, x)
            ],
            "{:?}",
            unlinks.received
        );
        let only_links: Vec<_> = key_events(&filtered);
        assert!(
            !only_links.is_empty() && only_links.iter().all(|(_, c, _, _)| c == "linked"),
            "{:?}",
            filtered.received
        );
        println!("SEEN subtype filters");

        // The burst: more updates than the kernel queue holds, while the daemon competes
        // for the CPU. Whatever was not delivered must be covered by Lost.
        let mut burst = Subscriber::with_options(&daemon, depth.clone()).await;
        let b = add_key("user", "burst", b"0", ring);
        burst
            .watch("keys", 5, &key_spec(&[("serial", Variant::from(b))]))
            .await;
        for i in 0..BURST {
            update(b, format!("{i}").as_bytes());
        }
        // The end of the burst, however loaded the machine (a pause of silence is not one
        // under TCG): a setattr posted after it, again each second until one arrives (the
        // kernel queue may still be full when one is posted). Records arrive in order, so
        // what of the burst is ever delivered has been delivered by then.
        let is_marker =
            |s: &Signal| matches!(s, Signal::Key { tag: 5, change, .. } if change == "setattr");
        let deadline = std::time::Instant::now() + TIMEOUT;
        while !burst.received.iter().any(is_marker) {
            assert!(
                std::time::Instant::now() < deadline,
                "no setattr after the burst within {TIMEOUT:?}"
            );
            keyctl(
                "KEYCTL_SETPERM burst",
                KEYCTL_SETPERM,
                b.into(),
                0x3f3f_0000,
                0,
            );
            let second = std::time::Instant::now() + Duration::from_secs(1);
            while let Some(signal) = burst
                .next(second.saturating_duration_since(std::time::Instant::now()))
                .await
            {
                if is_marker(&signal) {
                    break;
                }
            }
        }
        let updates = key_events(&burst)
            .iter()
            .filter(|(_, change, _, _)| change == "updated")
            .count();
        let kernel_losses = burst
            .received
            .iter()
            .filter(|s| matches!(s, Signal::Lost { reason, .. } if reason == "kernel-overflow"))
            .count();
        println!("SEEN burst: {updates} of {BURST} updates delivered, {kernel_losses} kernel-overflow Lost");
        assert!(
            updates == BURST || kernel_losses > 0,
            "{updates} of {BURST} updates arrived and no Lost said why"
        );
        assert!(
            kernel_losses > 0,
            "a burst of {BURST} updates did not overflow the kernel queue of 256 notes; the \
             test proves nothing about loss ({updates} delivered)"
        );
        assert_contiguous(&burst.received);
        assert_contiguous(&sub.received);
        assert_contiguous(&unlinks.received);
        assert_contiguous(&filtered.received);

        compare_with_keyctl_watch(&mut sub, ring).await;
        users(&daemon).await;
    }

    /// The same operations under `keyctl watch` (keyutils) and through watchqd: the same
    /// records, one for one, of every kind keyctl prints but `inst` (a key is instantiated
    /// before anyone can watch it, unless made by a request-key upcall): on a keyring
    /// `link`, `unlk`, `attr`, `clr`, `rev` and its destruction (`gc`); on a user key
    /// `upd`, `inv` and its destruction. keyctl prints a removal as the serial the kernel's
    /// removal record names; watchqd's `WatchRemoved` reason must name the same key.
    async fn compare_with_keyctl_watch(sub: &mut Subscriber, ring: i32) {
        let cmp = add_key("keyring", "compare", &[], ring);
        let user_key = add_key("user", "compare-user", b"a", ring);
        let watching_keyring = keyctl_watch(cmp);
        let watching_user_key = keyctl_watch(user_key);
        sub.watch("keys", 9, &key_spec(&[("serial", Variant::from(cmp))]))
            .await;
        sub.watch(
            "keys",
            11,
            &key_spec(&[("serial", Variant::from(user_key))]),
        )
        .await;
        // keyctl watch sets its watch as it starts; give it time under TCG.
        std::thread::sleep(Duration::from_secs(2));
        let before = sub.received.len();
        let k1 = add_key("user", "c1", b"a", cmp);
        let k2 = add_key("user", "c2", b"a", cmp);
        keyctl("unlink c1", KEYCTL_UNLINK, k1.into(), cmp.into(), 0);
        keyctl(
            "setperm compare",
            KEYCTL_SETPERM,
            cmp.into(),
            0x3f3f_0000,
            0,
        );
        keyctl("clear compare", KEYCTL_CLEAR, cmp.into(), 0, 0);
        let _ = k2;
        keyctl("revoke compare", KEYCTL_REVOKE, cmp.into(), 0, 0);
        // Unlinked from its only keyring, the keyring is destroyed: keyctl prints "gc",
        // watchqd ends the watch.
        keyctl("unlink compare", KEYCTL_UNLINK, cmp.into(), ring.into(), 0);
        update(user_key, b"b");
        // An invalidated key is destroyed by the garbage collector at once.
        keyctl(
            "invalidate compare-user",
            KEYCTL_INVALIDATE,
            user_key.into(),
            0,
            0,
        );
        expect_removed(sub, 9).await;
        expect_removed(sub, 11).await;
        settle(sub).await;
        // keyctl watch exits by itself after the removal record of its watch.
        let theirs_keyring = keyctl_watch_output(watching_keyring);
        let theirs_user_key = keyctl_watch_output(watching_user_key);
        let ours_keyring = records_of(&sub.received[before..], 9);
        let ours_user_key = records_of(&sub.received[before..], 11);
        assert_eq!(
            ours_keyring,
            [
                format!("{cmp} link {k1}"),
                format!("{cmp} link {k2}"),
                format!("{cmp} unlk {k1}"),
                format!("{cmp} attr"),
                format!("{cmp} clr"),
                format!("{cmp} rev"),
                format!("{cmp} gc"),
            ],
            "watchqd's records of the keyring"
        );
        assert_eq!(
            ours_keyring, theirs_keyring,
            "watchqd vs keyctl watch: keyring"
        );
        assert_eq!(
            ours_user_key,
            [
                format!("{user_key} upd"),
                format!("{user_key} inv"),
                format!("{user_key} gc"),
            ],
            "watchqd's records of the user key"
        );
        assert_eq!(
            ours_user_key, theirs_user_key,
            "watchqd vs keyctl watch: user key"
        );
        println!(
            "SEEN keyctl watch comparison: {} + {} records equal",
            ours_keyring.len(),
            ours_user_key.len()
        );
    }

    /// `keyctl watch KEY` (keyutils), printing one record a line.
    fn keyctl_watch(key: i32) -> std::process::Child {
        Command::new("keyctl")
            .args(["watch", &key.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("keyctl (keyutils) must be installed")
    }

    /// The records `keyctl watch` printed, once it has exited after its watch's removal
    /// record; it failing to exit is a failure (it did not see the removal).
    fn keyctl_watch_output(mut child: std::process::Child) -> Vec<String> {
        let deadline = std::time::Instant::now() + TIMEOUT;
        while child.try_wait().expect("keyctl watch status").is_none() {
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let output = child.wait_with_output().expect("keyctl watch output");
                panic!(
                    "keyctl watch did not exit after its removal record within {TIMEOUT:?}; \
                     it printed:\n{}",
                    String::from_utf8_lossy(&output.stdout)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let output = child.wait_with_output().expect("keyctl watch output");
        let printed = String::from_utf8_lossy(&output.stdout).into_owned();
        println!("INFO keyctl watch printed:\n{printed}");
        println!(
            "INFO keyctl watch stderr: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(output.status.success(), "keyctl watch: {}", output.status);
        // Its records; not a banner.
        printed
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with(|c: char| c.is_ascii_digit()))
            .map(str::to_owned)
            .collect()
    }

    /// What watchqd delivered for watch `tag`, written as `keyctl watch` prints it.
    fn records_of(signals: &[Signal], tag: u64) -> Vec<String> {
        // keyutils' abbreviations for the kernel's change kinds.
        let short = |change: &str| match change {
            "instantiated" => "inst",
            "updated" => "upd",
            "linked" => "link",
            "unlinked" => "unlk",
            "cleared" => "clr",
            "revoked" => "rev",
            "invalidated" => "inv",
            "setattr" => "attr",
            other => panic!("unknown change {other}"),
        };
        signals
            .iter()
            .filter_map(|s| match s {
                Signal::Key {
                    tag: t,
                    change,
                    key,
                    aux,
                    ..
                } if *t == tag => Some(match change.as_str() {
                    "linked" | "unlinked" => format!("{key} {} {aux}", short(change)),
                    _ => format!("{key} {}", short(change)),
                }),
                // The key the reason names, as keyctl prints the removal record's serial;
                // a reason of another form stays whole, to fail the comparison visibly.
                Signal::WatchRemoved { tag: t, reason, .. } if *t == tag => Some(
                    reason
                        .strip_prefix("key-destroyed: key ")
                        .and_then(|rest| rest.split_once(" was destroyed "))
                        .map_or_else(
                            || format!("? gc ({reason})"),
                            |(key, _)| format!("{key} gc"),
                        ),
                ),
                _ => None,
            })
            .collect()
    }

    /// A user cannot watch another user's keyring and sees nothing of it; root can.
    async fn users(daemon: &Daemon) {
        let alice = super::common::polkit::user("watchq-alice");
        let bob = super::common::polkit::user("watchq-bob");
        let (ok, bob_ring, err) = output_of(as_user(&bob, "keyctl", &["id", "@u"]));
        assert!(ok, "keyctl id @u as bob: {err}");
        let bob_ring: i32 = bob_ring.parse().expect("bob's user keyring serial");

        // Root watches bob's user keyring by uid (the helper runs as bob).
        let mut root = Subscriber::new(daemon).await;
        root.watch(
            "keys",
            1,
            &key_spec(&[
                ("keyring", Variant::from("user")),
                ("uid", Variant::from(bob.uid)),
            ]),
        )
        .await;

        // Root also watches alice's user keyring: alice's own watch below then shares
        // the kernel watch (her helper gets EBUSY after passing the kernel's checks).
        root.watch(
            "keys",
            2,
            &key_spec(&[
                ("keyring", Variant::from("user")),
                ("uid", Variant::from(alice.uid)),
            ]),
        )
        .await;

        let ctl = env!("CARGO_BIN_EXE_watchqctl");
        let monitor = |args: &[&str]| {
            let mut command = as_user(&alice, ctl, args);
            command
                .env("DBUS_SYSTEM_BUS_ADDRESS", daemon.address())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            command
        };
        // Alice names bob's keyring by serial: the kernel refuses her.
        let serial_arg = format!("serial={bob_ring}");
        let (ok, _, err) = output_of(monitor(&[
            "monitor",
            "--json",
            "--match",
            &serial_arg,
            "keys",
        ]));
        assert!(
            !ok && err.contains("org.watchq1.Error.AccessDenied"),
            "{err}"
        );
        // By uid: policy refuses her (watching other users' keys is for administrators).
        let uid_arg = format!("uid={}", bob.uid);
        let (ok, _, err) = output_of(monitor(&["monitor", "--json", "--match", &uid_arg, "keys"]));
        assert!(
            !ok && err.contains("org.watchq1.Error.AccessDenied"),
            "{err}"
        );
        println!("SEEN alice refused bob's keyring");

        // Alice watches her own user keyring and sees her own changes only.
        let mut alice_monitor = monitor(&["monitor", "--json", "keys"])
            .spawn()
            .expect("watchqctl monitor as alice");
        let stderr = alice_monitor.stderr.take().unwrap();
        let mut stderr = BufReader::new(stderr);
        let mut line = String::new();
        stderr.read_line(&mut line).expect("watchqctl banner");
        assert!(line.starts_with("watching keys"), "{line}");
        let (ok, _, err) = output_of(as_user(
            &bob,
            "keyctl",
            &["add", "user", "bobs", "secret", "@u"],
        ));
        assert!(ok, "{err}");
        let (ok, alice_key, err) = output_of(as_user(
            &alice,
            "keyctl",
            &["add", "user", "alices", "secret", "@u"],
        ));
        assert!(ok, "{err}");
        let alice_key: i32 = alice_key.parse().unwrap();
        std::thread::sleep(Duration::from_secs(3));
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(alice_monitor.id()).unwrap()),
            nix::sys::signal::Signal::SIGINT,
        );
        let out = alice_monitor.wait_with_output().expect("alice's monitor");
        let printed = String::from_utf8_lossy(&out.stdout).into_owned();
        println!("INFO alice's monitor printed:\n{printed}");
        let lines: Vec<serde_json::Value> = printed
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        assert!(
            lines
                .iter()
                .any(|l| l["change"] == "linked" && l["aux"] == alice_key),
            "alice did not see her own key {alice_key}: {printed}"
        );
        assert!(
            lines.iter().all(|l| l["key"] != bob_ring),
            "alice saw something of bob's keyring: {printed}"
        );

        // Root saw bob's key linked into bob's user keyring.
        expect_key(&mut root, 1, "linked", bob_ring, None).await;
        let alice_ring = lines
            .iter()
            .find(|l| l["aux"] == alice_key)
            .and_then(|l| l["key"].as_i64())
            .and_then(|k| i32::try_from(k).ok())
            .unwrap();
        expect_key(&mut root, 2, "linked", alice_ring, Some(alice_key)).await;
        assert!(
            daemon.log_text().contains("outcome=Shared"),
            "alice's watch did not share root's kernel watch"
        );
        println!("SEEN root watches bob's keyring");
    }
}
