//! The subscriber's security label for the key watch helper.
//!
//! `KEYCTL_WATCH_KEY` calls the security module's `watch_key` hook (SELinux: `key { view }`)
//! with the calling process's label. The helper already runs with the subscriber's uid,
//! gid and groups; this makes it run under the subscriber's label too: after it has
//! dropped to the subscriber's credentials, it asks the kernel to put it in that label at
//! its next exec (SELinux: the context written to `/proc/thread-self/attr/exec`, what
//! `setexeccon(3)` does; AppArmor: `exec PROFILE` written to
//! `/proc/thread-self/attr/apparmor/exec`, what `aa_change_onexec(2)` does) and executes
//! itself once more. A caller with a label that cannot be taken is refused (fail closed).
//!
//! Touches: `/proc/self/attr/current`, `/proc/self/attr/apparmor/current` (which module
//! labels this process), `/proc/thread-self/attr/exec` or `.../apparmor/exec`.

use std::io::Write;

/// Whether a helper for a caller labelled `caller` must take that label: not when there
/// is none, when it is AppArmor's `unconfined`, or when it is the daemon's own label.
pub fn needs_transition(caller: Option<&str>, own: Option<&str>) -> bool {
    match caller {
        None | Some("" | "unconfined") => false,
        Some(label) => Some(label) != own,
    }
}

/// The daemon's own label, as [`crate::policy::identity::parse_label`] reads a caller's.
pub fn own_label() -> Option<String> {
    std::fs::read("/proc/self/attr/current")
        .ok()
        .as_deref()
        .and_then(crate::policy::identity::parse_label)
}

/// Sets `label` for this thread's next exec. The errno when the kernel refuses (or no
/// module takes labels).
pub fn set_exec_label(label: &str) -> Result<(), i32> {
    // AppArmor answers on its own attribute directory, whatever else is stacked.
    let apparmor = std::fs::read("/proc/self/attr/apparmor/current").is_ok();
    let (path, text) = if apparmor {
        (
            "/proc/thread-self/attr/apparmor/exec",
            format!("exec {label}"),
        )
    } else {
        ("/proc/thread-self/attr/exec", label.to_owned())
    };
    let errno = |e: std::io::Error| e.raw_os_error().unwrap_or(nix::libc::EIO);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(errno)?;
    file.write_all(text.as_bytes()).map_err(errno)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_callers_need_their_label_taken() {
        assert!(!needs_transition(None, None));
        assert!(!needs_transition(Some("unconfined"), None));
        assert!(!needs_transition(Some("a_t"), Some("a_t")));
        assert!(needs_transition(Some("watchqd-test"), None));
        assert!(needs_transition(
            Some("user_u:user_r:user_t:s0"),
            Some("system_u:system_r:watchqd_t:s0")
        ));
    }
}
