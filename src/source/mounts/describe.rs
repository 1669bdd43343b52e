//! Mounts described: `statmount` into records and objects.

use super::*;

/// Describes one mount of namespace `namespace`.
pub(super) fn statmount(id: u64, namespace: u64, buf: &mut Vec<u64>) -> io::Result<StatMount> {
    let bytes = crate::sys::mount_api::statmount(id, namespace, wire::STATMOUNT_WANTED, buf)?;
    wire::parse_statmount(&bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Every mount of a namespace, described; mounts that vanish while listing are skipped.
pub(super) fn describe_all(namespace: u64) -> io::Result<Vec<StatMount>> {
    describe_all_with(namespace, || {})
}

/// Mounts described between two calls of [`describe_all_with`]'s `between`.
const DESCRIBED_BETWEEN: usize = 64;

/// [`describe_all`], calling `between` every [`DESCRIBED_BETWEEN`] mounts (a job yields
/// the CPU there: see `job`).
pub(super) fn describe_all_with(
    namespace: u64,
    mut between: impl FnMut(),
) -> io::Result<Vec<StatMount>> {
    let mut buf = vec![0u64; 512];
    let mut mounts = Vec::new();
    for (n, id) in list_mounts(namespace)?.into_iter().enumerate() {
        if n % DESCRIBED_BETWEEN == 0 {
            between();
        }
        match statmount(id, namespace, &mut buf) {
            Ok(mount) => mounts.push(mount),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(mounts)
}

pub(super) fn attributes(mount: &StatMount) -> Attrs {
    let mut attrs = Attrs::new();
    let mut put = |key: &str, value: Attr| {
        attrs.insert(key.to_owned(), value);
    };
    put("namespace", mount.namespace.into());
    put("mount-id", mount.id.into());
    put("parent-id", mount.parent_id.into());
    put("mountinfo-id", mount.old_id.into());
    put("parent-mountinfo-id", mount.old_parent_id.into());
    put("mount-point", mount.mount_point.clone().into());
    put("root", mount.root.clone().into());
    put("source", mount.source.clone().into());
    let fs_type = if mount.fs_subtype.is_empty() {
        mount.fs_type.clone()
    } else {
        format!("{}.{}", mount.fs_type, mount.fs_subtype)
    };
    put("fs-type", fs_type.into());
    put("options", mount.mount_options().into());
    put("fs-options", mount.fs_options.clone().into());
    put(
        "read-only",
        (mount.attr & wire::MOUNT_ATTR_RDONLY != 0).into(),
    );
    put(
        "fs-read-only",
        (mount.sb_flags & wire::SB_RDONLY != 0).into(),
    );
    put("nosuid", (mount.attr & wire::MOUNT_ATTR_NOSUID != 0).into());
    put("nodev", (mount.attr & wire::MOUNT_ATTR_NODEV != 0).into());
    put("noexec", (mount.attr & wire::MOUNT_ATTR_NOEXEC != 0).into());
    put(
        "nosymfollow",
        (mount.attr & wire::MOUNT_ATTR_NOSYMFOLLOW != 0).into(),
    );
    put(
        "idmapped",
        (mount.attr & wire::MOUNT_ATTR_IDMAP != 0).into(),
    );
    put("atime", mount.atime().into());
    put("propagation", mount.propagation_name().into());
    put("peer-group", mount.peer_group.into());
    put("master", mount.master.into());
    put("major", mount.dev_major.into());
    put("minor", mount.dev_minor.into());
    attrs
}

pub(super) fn object_id(namespace: u64, mount: u64) -> String {
    format!("{namespace}/{mount}")
}

pub(super) fn object_of(mount: &StatMount) -> Object {
    Object {
        id: object_id(mount.namespace, mount.id),
        changes: 0,
        attributes: attributes(mount),
        properties: Default::default(),
    }
}

pub(super) fn record(
    subtype: u8,
    change: Change,
    namespace: u64,
    id: u64,
    attributes: Attrs,
) -> Record {
    Record {
        source: NAME,
        subtype,
        object_id: object_id(namespace, id),
        change,
        attributes,
        properties: Default::default(),
        // Who may see a namespace's mounts was decided when the watch named it.
        audience: Audience::Everyone,
    }
}
