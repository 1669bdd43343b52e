//! ext4 with the quota feature in an image file mounted with `-o loop`, for the quota tests
//! in the guest (the host kernel has no quota format; on the host, `common::ext4::Ext4` is
//! ext4 on a `LoopDevice`).
//!
//! Include with `#[path = "common/loop_ext4.rs"] mod loop_ext4;` (tests/guest.rs has no
//! `mod common`).
#![allow(dead_code)]

use std::fs;
use std::process::Command;

/// Runs `cmd`; it must succeed (its output is in the failure).
pub fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Makes `size_mib` of ext4 in the file `image` with quota of `quotatypes` (`usrquota`,
/// `usrquota:grpquota`) and mounts it at `mount` (created) with those quotas on.
pub fn mount_with_quota(image: &str, mount: &str, size_mib: u64, quotatypes: &str) {
    fs::File::create(image)
        .and_then(|f| f.set_len(size_mib << 20))
        .unwrap_or_else(|e| panic!("create the image {image}: {e}"));
    run(Command::new("mkfs.ext4").args([
        "-q",
        "-F",
        "-O",
        "quota",
        "-E",
        &format!("quotatype={quotatypes}"),
        image,
    ]));
    fs::create_dir_all(mount).unwrap_or_else(|e| panic!("mkdir {mount}: {e}"));
    let options = format!("loop,{}", quotatypes.replace(':', ","));
    run(Command::new("mount").args(["-o", &options, image, mount]));
}
