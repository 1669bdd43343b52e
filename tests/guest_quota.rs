//! Real quota warnings (the host kernel has no quota format) seen by subscribers of the
//! real daemon on a real bus with a real polkitd, inside the qemu guest: an ext4 with the
//! quota feature on a loop device, limits set with `setquota`, and unprivileged users
//! writing past them with `dd`. The daemon runs with `[metrics]`: its quota counters, by
//! device and kind, add up to what the administrator received, and count the forgery.
//!
//! The host test makes sure the test users and the polkit action file exist (the guest
//! shares the host's root read-only), boots the guest and re-runs
//! `inside::quota_warnings` of this binary there. Users' subscriptions are `watchqctl
//! monitor --json quota` run as those users.
//! Run with: `cargo test --test guest_quota` (as root, after `tests/vm/setup-host`).

mod common;
#[path = "common/loop_ext4.rs"]
mod loop_ext4;
#[path = "common/quota.rs"]
mod quota;
#[path = "common/vm.rs"]
mod vm;

use std::time::Duration;

const STEP: Duration = Duration::from_secs(300);

#[test]
fn users_get_their_own_quota_warnings_and_administrators_everyones() {
    // Made on the host: the guest's root filesystem is the host's, read-only.
    common::polkit::user("watchq-alice");
    common::polkit::user("watchq-bob");
    common::polkit::install_policy();
    vm::Guest::run_inside(&vm::BootOptions::new(), "quota_warnings", STEP, |_, _| {});
}

mod inside {
    use std::fs;
    use std::os::unix::process::CommandExt;
    use std::process::Command;
    use std::time::Duration;

    use serde_json::Value;
    use zbus::Variant;

    use super::common::polkit::{user, User};
    use super::common::*;
    use super::{loop_ext4, quota};
    use watchqd::source::quota::wire::{QuotaType, Warning};

    const IMAGE: &str = "/tmp/watchqd-quota.img";
    const MOUNT: &str = "/tmp/watchqd-quota";
    const METRICS: &str = "/tmp/watchqd-metrics";

    fn sh(cmd: &mut Command) -> std::process::Output {
        let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        println!(
            "INFO {cmd:?}: {} {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        out
    }

    fn run_ok(cmd: &mut Command) {
        let out = sh(cmd);
        assert!(out.status.success(), "{cmd:?} failed");
    }

    /// `dd` of `kib` KiB of zeros to `name` on the quota filesystem, as `who`.
    fn write_as(who: &User, name: &str, kib: u32) -> std::process::Output {
        write_as_in_group(who, who.gid, name, kib)
    }

    /// [`write_as`] with `gid` as the group (the file's group, charged to its quota).
    fn write_as_in_group(who: &User, gid: u32, name: &str, kib: u32) -> std::process::Output {
        sh(Command::new("dd")
            .args([
                "if=/dev/zero",
                &format!("of={MOUNT}/{name}"),
                "bs=4096",
                &format!("count={}", kib / 4),
                "conv=fsync",
            ])
            .uid(who.uid)
            .gid(gid))
    }

    fn warning_of(signal: &Value) -> &str {
        signal["warning"].as_str().unwrap_or_default()
    }

    #[test]
    #[ignore = "runs inside the guest; started by the host test"]
    fn quota_warnings() {
        super::vm::enter_guest();
        super::vm::block_on(quota_warnings_async());
    }

    #[allow(clippy::too_many_lines)]
    async fn quota_warnings_async() {
        let (alice, bob) = (user("watchq-alice"), user("watchq-bob"));

        // ext4 with user quota on a loop device; alice: soft 64 KiB, hard 128 KiB; bob:
        // soft 32 KiB, hard 1 MiB.
        loop_ext4::mount_with_quota(IMAGE, MOUNT, 32, "usrquota:grpquota");
        fs::set_permissions(MOUNT, std::os::unix::fs::PermissionsExt::from_mode(0o1777))
            .expect("chmod mount point");
        run_ok(Command::new("setquota").args(["-u", &alice.name, "64", "128", "0", "0", MOUNT]));
        run_ok(Command::new("setquota").args(["-u", &bob.name, "32", "1024", "0", "0", MOUNT]));
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        let (major, minor) = mountinfo
            .lines()
            .find(|l| l.split(' ').nth(4) == Some(MOUNT))
            .and_then(|l| l.split(' ').nth(2))
            .and_then(|d| d.split_once(':'))
            .map(|(a, b)| (a.parse::<u64>().unwrap(), b.parse::<u64>().unwrap()))
            .expect("the quota filesystem in mountinfo");
        let device = fs::read_link(format!("/sys/dev/block/{major}:{minor}"))
            .expect("the loop device in /sys/dev/block")
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        println!("INFO quota filesystem on {device} ({major}:{minor})");

        // With [metrics]: its quota counters must add up to what the administrator got.
        fs::create_dir_all(METRICS).expect("the metrics directory");
        let daemon = Daemon::with_polkit(&format!(
            "[metrics]\ntextfile = true\ndirectory = \"{METRICS}\"\n"
        ));
        let mut admin = Subscriber::new(&daemon).await;
        admin
            .watch("quota", 1, &[("scope", Variant::from("system"))])
            .await;
        let mut alices = quota::Monitor::start(daemon.address(), alice.uid, alice.gid, &["quota"])
            .expect("alice watches her own quota");
        let mut bobs = quota::Monitor::start(daemon.address(), bob.uid, bob.gid, &["quota"])
            .expect("bob watches his own quota");

        // A forgery about alice first: a witness sees it, nobody's subscription does.
        let (family, group) = quota::resolve();
        let witness = quota::Witness::join(group);
        quota::forge(
            group,
            &quota::forged_warning(
                family.id,
                &Warning {
                    quota_type: QuotaType::User,
                    excess_id: u64::from(alice.uid),
                    code: 4,
                    major: 99,
                    minor: 99,
                    caused_id: u64::from(alice.uid),
                },
            ),
        );
        let (_, port) = witness.receive().expect("the witness got the forgery");
        assert_ne!(port, 0);

        // alice: 96 KiB, past her soft limit.
        assert!(write_as(&alice, "alice-1", 96).status.success());
        let soft = alices.until("alice's block-soft", |s| warning_of(s) == "block-soft");
        println!("SEEN alice soft: {soft}");
        assert_eq!(
            soft["seq"], 1,
            "the forgery was not delivered before: {soft}"
        );
        assert_eq!(soft["kind"], "soft");
        assert_eq!(soft["resource"], "blocks");
        assert_eq!(soft["quota_type"], "user");
        assert_eq!(soft["excess_id"], u64::from(alice.uid));
        assert_eq!(soft["caused_id"], u64::from(alice.uid));
        assert_eq!(soft["device"], device.as_str());
        assert_eq!(
            (soft["major"].as_u64(), soft["minor"].as_u64()),
            (Some(major), Some(minor))
        );
        assert_eq!(soft["attributes"]["mount-point"], MOUNT);
        assert_eq!(soft["attributes"]["fs-type"], "ext4");
        assert_eq!(soft["attributes"]["code"], 6);

        // 64 KiB more: past the hard limit, the write fails.
        let out = write_as(&alice, "alice-2", 64);
        assert!(
            !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("quota"),
            "dd past the hard limit must fail with EDQUOT"
        );
        let hard = alices.until("alice's block-hard", |s| warning_of(s) == "block-hard");
        println!("SEEN alice hard: {hard}");
        assert_eq!(hard["kind"], "hard");
        assert_eq!(hard["major"], major);

        // Freeing everything brings her back below the soft limit.
        run_ok(
            Command::new("rm")
                .args([format!("{MOUNT}/alice-2"), format!("{MOUNT}/alice-1")])
                .uid(alice.uid)
                .gid(alice.gid),
        );
        let below = alices.until("alice's block-soft-below", |s| {
            warning_of(s) == "block-soft-below"
        });
        println!("SEEN alice below: {below}");
        assert_eq!(below["kind"], "soft-below");

        // A group quota whose gid is bob's uid (ids of users and of groups are separate
        // spaces), over its soft limit by alice's write as a member of that group. The
        // warning names the gid, which bob must not take for his uid: it belongs to the uid
        // whose write crossed the limit. The group is made so, not left to the order in
        // which useradd handed out ids.
        let group_id = bob.uid;
        run_ok(Command::new("setquota").args(["-u", &alice.name, "0", "0", "0", "0", MOUNT]));
        run_ok(Command::new("setquota").args([
            "-g",
            &group_id.to_string(),
            "64",
            "0",
            "0",
            "0",
            MOUNT,
        ]));
        assert!(write_as_in_group(&alice, group_id, "alice-3", 96)
            .status
            .success());
        let group = alices.until("the group's block-soft", |s| {
            warning_of(s) == "block-soft" && s["quota_type"] == "group"
        });
        println!("SEEN group soft: {group}");
        // The coincidence the leak check below stands on, as the kernel reported it.
        assert_eq!(group["excess_id"], u64::from(bob.uid));
        assert_eq!(group["caused_id"], u64::from(alice.uid));
        run_ok(
            Command::new("rm")
                .arg(format!("{MOUNT}/alice-3"))
                .uid(alice.uid)
                .gid(group_id),
        );
        alices.until("the group's block-soft-below", |s| {
            warning_of(s) == "block-soft-below" && s["quota_type"] == "group"
        });

        // bob, last: his own warning is the first signal he ever receives (the group's,
        // naming his uid as its gid, was not his).
        assert!(write_as(&bob, "bob-1", 48).status.success());
        let bob_soft = bobs.until("bob's block-soft", |s| {
            warning_of(s) == "block-soft" && s["quota_type"] == "user"
        });
        println!("SEEN bob soft: {bob_soft}");
        assert_eq!(
            bob_soft["seq"], 1,
            "bob received alice's warnings: {:?}",
            bobs.signals
        );
        assert_eq!(bob_soft["excess_id"], u64::from(bob.uid));

        // The administrator got all of them, in order, and no forgery.
        admin
            .until("bob's warning at the administrator", |s| {
                s.iter().any(|e| {
                    matches!(e, Signal::QuotaWarning { caused_id, .. } if *caused_id == u64::from(bob.uid))
                })
            })
            .await;
        let seen: Vec<(String, String, u64)> = admin
            .received
            .iter()
            .filter_map(|s| match s {
                Signal::QuotaWarning {
                    warning,
                    quota_type,
                    excess_id,
                    ..
                } => Some((warning.clone(), quota_type.clone(), *excess_id)),
                _ => None,
            })
            .collect();
        println!("INFO administrator received {seen:?}");
        let alice_id = u64::from(alice.uid);
        let position = |w: &str, t: &str, id: u64| {
            seen.iter()
                .position(|(sw, st, sid)| sw == w && st == t && *sid == id)
                .unwrap_or_else(|| panic!("the administrator lacks {w} of {id}: {seen:?}"))
        };
        assert!(
            position("block-soft", "user", alice_id) < position("block-hard", "user", alice_id)
                && position("block-hard", "user", alice_id)
                    < position("block-soft-below", "user", alice_id)
                && position("block-soft-below", "user", alice_id)
                    < position("block-soft", "group", u64::from(group_id))
                && position("block-soft", "group", u64::from(group_id))
                    < position("block-soft", "user", u64::from(bob.uid))
        );
        assert!(
            !admin
                .received
                .iter()
                .any(|s| matches!(s, Signal::QuotaWarning { major: 99, .. })),
            "the forgery reached the administrator"
        );
        assert_contiguous(&admin.received);

        // The metrics counted every warning the administrator got, by device and kind,
        // and the forgery as rejected (Manager.Metrics: the file's text).
        let manager = watchqd::client::ManagerProxy::new(&daemon.connect().await)
            .await
            .expect("manager proxy");
        let mut expected: std::collections::BTreeMap<String, usize> = Default::default();
        for (warning, _, _) in &seen {
            *expected.entry(warning.clone()).or_default() += 1;
        }
        let lines = |text: &str| -> std::collections::BTreeMap<String, usize> {
            let prefix = format!("watchqd_quota_warnings_total{{device=\"{device}\",kind=\"");
            text.lines()
                .filter_map(|l| l.strip_prefix(&prefix))
                .filter_map(|rest| rest.split_once("\"} "))
                .map(|(kind, n)| (kind.to_owned(), n.parse().expect("a count")))
                .collect()
        };
        let forged = "watchqd_forged_messages_rejected_total{source=\"quota\"} 1\n";
        let start = std::time::Instant::now();
        let text = loop {
            let text = manager.metrics().await.expect("Manager.Metrics");
            if lines(&text) == expected && text.contains(forged) {
                break text;
            }
            assert!(
                start.elapsed() < TIMEOUT,
                "the metrics do not count {expected:?} and one forgery within {TIMEOUT:?}:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        println!("SEEN metrics: quota warnings {:?}", lines(&text));
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with("watchqd_quota_warnings_total{"))
                .count(),
            expected.len(),
            "only this device's warnings:\n{text}"
        );

        // alice got hers only (her user quota, her writes to her group's), bob his only.
        alices.drain(Duration::from_secs(1));
        bobs.drain(Duration::from_secs(1));
        for (who, monitor, uid) in [("alice", &alices, alice.uid), ("bob", &bobs, bob.uid)] {
            let warnings = monitor.quota_warnings();
            println!("INFO {who} received {warnings:?}");
            assert!(
                warnings.iter().all(|w| w["major"] != 99
                    && if w["quota_type"] == "user" {
                        w["excess_id"] == u64::from(uid)
                    } else {
                        w["caused_id"] == u64::from(uid)
                    }),
                "{who} received a warning about someone else: {warnings:?}"
            );
        }
        assert_eq!(bobs.quota_warnings().len(), 1);
        assert!(
            daemon
                .log_text()
                .contains("dropped a quota message not sent by the kernel"),
            "the forgery was rejected at the edge"
        );
        drop((alices, bobs));
        run_ok(Command::new("umount").arg(MOUNT));
    }
}
