//! Names of errno values as the kernel reports them in events.

/// `EIO`, `ENOSPC`, … for a positive errno; `E<number>` when the number has no name.
pub fn errno_name(errno: i32) -> String {
    match nix::errno::Errno::from_raw(errno) {
        nix::errno::Errno::UnknownErrno => format!("E{errno}"),
        known => format!("{known:?}"),
    }
}

/// The kernel's own name for an errno a filesystem reports, where it differs from the
/// userspace name: ext4 and xfs call 117 `EFSCORRUPTED` and 74 `EFSBADCRC`.
pub fn filesystem_errno_name(errno: i32) -> Option<&'static str> {
    match errno {
        117 => Some("EFSCORRUPTED"),
        74 => Some("EFSBADCRC"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errnos_have_names_and_unknown_ones_their_number() {
        assert_eq!(errno_name(61), "ENODATA");
        assert_eq!(errno_name(9999), "E9999");
        assert_eq!(filesystem_errno_name(117), Some("EFSCORRUPTED"));
        assert_eq!(filesystem_errno_name(5), None);
    }
}
