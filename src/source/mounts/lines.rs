//! A namespace's mountinfo as lines: read in small pieces, compared as text, and the
//! one diff that turns changed lines into records.

use super::describe::*;
use super::*;

/// A mountinfo line as two reads compare it (by its old id): the text after the id
/// (parent, mount point, options, type, source, super options, propagation), undecoded.
/// Only a line whose text changed needs a look (`statmount` describes its mount), so a
/// reread decodes nothing: at 10,000 mounts, decoding every line took about as long as
/// the kernel takes to write them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Line(Box<str>);

/// The one diff of a namespace's mounts: the lines of a new mountinfo read that differ
/// from the previous read name the mounts to look at; `statmount` says what each is now,
/// and comparing that with the cached description says what happened to it (the cache
/// is updated). With `follow_topology` false, fanotify reports attaches, detaches and
/// moves, so only remounts are taken from here.
fn diff(
    id: u64,
    mounts: &mut HashMap<u64, StatMount>,
    cached: &mut HashMap<u32, Line>,
    lines: HashMap<u32, Line>,
    follow_topology: bool,
) -> Vec<Record> {
    let by_old_id: HashMap<u32, u64> = mounts.values().map(|m| (m.old_id, m.id)).collect();
    let mut look_at = Vec::new();
    let mut appeared = false;
    for (old_id, line) in &lines {
        if cached.get(old_id) == Some(line) {
            continue;
        }
        match by_old_id.get(old_id) {
            Some(&mount) => look_at.push(mount),
            None => appeared = true,
        }
    }
    if follow_topology {
        look_at.extend(
            cached
                .keys()
                .filter(|old_id| !lines.contains_key(old_id))
                .filter_map(|old_id| by_old_id.get(old_id)),
        );
    }
    *cached = lines;
    // Newest first, so that of a tree detached at once, children go before parents.
    look_at.sort_unstable_by(|a, b| b.cmp(a));
    look_at.dedup();

    let mut buf = vec![0u64; 512];
    let mut records = Vec::new();
    for mount in look_at {
        let Some(before) = mounts.get(&mount) else {
            continue;
        };
        match statmount(mount, id, &mut buf) {
            Ok(now) => {
                let moved =
                    now.mount_point != before.mount_point || now.parent_id != before.parent_id;
                let remounted = now.attr != before.attr
                    || now.sb_flags != before.sb_flags
                    || now.fs_options != before.fs_options;
                let attrs = attributes(&now);
                mounts.insert(mount, now);
                if moved && follow_topology {
                    records.push(record(MOVE, Change::Upsert, id, mount, attrs.clone()));
                }
                if remounted {
                    records.push(record(REMOUNT, Change::Upsert, id, mount, attrs));
                }
            }
            // Gone (its old id may be another mount's now): fanotify's detach follows.
            Err(e) if !follow_topology => {
                tracing::debug!(
                    source = NAME,
                    mount,
                    "statmount after a mountinfo change: {e}"
                );
            }
            Err(e) => {
                if e.raw_os_error() != Some(libc::ENOENT) {
                    tracing::warn!(source = NAME, mount, "statmount: {e}; taken as detached");
                }
                appeared = true;
                if let Some(known) = mounts.remove(&mount) {
                    let attrs = attributes(&known);
                    records.push(record(DETACH, Change::Remove, id, mount, attrs));
                }
            }
        }
    }
    if follow_topology && appeared {
        match list_mounts(id) {
            Ok(mut listed) => {
                listed.retain(|mount| !mounts.contains_key(mount));
                listed.sort_unstable();
                for mount in listed {
                    match statmount(mount, id, &mut buf) {
                        Ok(now) => {
                            let attrs = attributes(&now);
                            mounts.insert(mount, now);
                            records.push(record(ATTACH, Change::Upsert, id, mount, attrs));
                        }
                        // Gone again before it could be described: nothing to report.
                        Err(e) => tracing::debug!(source = NAME, mount, "statmount: {e}"),
                    }
                }
            }
            Err(e) => tracing::warn!(source = NAME, namespace = id, "listmount: {e}"),
        }
    }
    records
}

/// Reads the mountinfo again and [`diff`]s it with the cache (the reader's own for a
/// small namespace, a job's for a large one); a failed read is logged and changes
/// nothing.
pub(super) fn reread(
    id: u64,
    file: &mut File,
    mounts: &mut HashMap<u64, StatMount>,
    cached: &mut HashMap<u32, Line>,
    follow_topology: bool,
    between: impl FnMut(),
) -> Vec<Record> {
    match read_lines(file, between) {
        Ok(lines) => diff(id, mounts, cached, lines, follow_topology),
        Err(e) => {
            tracing::warn!(source = NAME, namespace = id, "reading mountinfo: {e}");
            Vec::new()
        }
    }
}

/// Bytes asked of mountinfo per `read`: the kernel holds the mount namespace lock
/// (`namespace_sem`) while it writes one read's lines, and every mount, unmount and
/// `statmount` in any namespace waits for it. Left to grow (as `read_to_string` does),
/// one read of a 10,000-mount namespace held it for milliseconds, which another user's
/// mount changes waited out.
const MOUNTINFO_CHUNK: usize = 4 * 1024;

/// A namespace's mountinfo by line, calling `between` before each read (a job yields
/// the CPU there: see `job`).
pub(super) fn read_lines(
    file: &mut File,
    mut between: impl FnMut(),
) -> io::Result<HashMap<u32, Line>> {
    file.rewind()?;
    let mut bytes = Vec::new();
    loop {
        between();
        let at = bytes.len();
        bytes.resize(at + MOUNTINFO_CHUNK, 0);
        let n = file.read(&mut bytes[at..])?;
        bytes.truncate(at + n);
        if n == 0 {
            break;
        }
    }
    let text = String::from_utf8(bytes)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("mountinfo: {e}")))?;
    text.lines()
        .filter(|line| !line.is_empty())
        .map(|line| {
            line.split_once(' ')
                .and_then(|(id, rest)| Some((id.parse().ok()?, Line(rest.into()))))
                .ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("mountinfo line {line:?}"),
                    )
                })
        })
        .collect()
}
