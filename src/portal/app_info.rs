//! Who is calling the portal, as xdg-desktop-portal establishes it
//! (`xdp-app-info-flatpak.c`): the bus tells the caller's pid (and its pidfd, where the
//! bus gives `ProcessFD`); the process's root is opened through `/proc/PID/root`, and
//! `.flatpak-info` in it, without following any link and only if it is a regular file.
//! No such file: a host app, which gets everything the API offers. A file that cannot
//! be read or parsed, or a process that cannot be inspected, is refused: never guess.
//! The caller is usually xdg-dbus-proxy, which Flatpak runs in a sandbox with the same
//! `.flatpak-info` as the app. Nothing the app sends about itself is read.

use std::io::Read;
use std::os::fd::OwnedFd;

use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::Mode;
use zbus::fdo::DBusProxy;
use zbus::names::{BusName, UniqueName};

use super::error::PortalError;
use crate::policy::flatpak_info::{FlatpakInfo, MAX_SIZE};

/// The calling application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppInfo {
    /// Not sandboxed: the user's own program (app id "" for the permission store).
    Host,
    /// A Flatpak app.
    Flatpak {
        app_id: String,
        instance_id: Option<String>,
        /// `[Policy watchq] sources`: what the app declared it uses; `None` if nothing.
        sources: Option<Vec<String>>,
    },
}

impl AppInfo {
    /// The app id as the permission store and logs know it ("" for the host).
    pub fn id(&self) -> &str {
        match self {
            AppInfo::Host => "",
            AppInfo::Flatpak { app_id, .. } => app_id,
        }
    }

    /// Whether the app's static declaration lets it ask for `source` at all.
    ///
    /// # Errors
    /// `NotAllowed`, naming the `finish-args` line the app lacks.
    pub fn declared(&self, source: &str) -> Result<(), PortalError> {
        match self {
            AppInfo::Host => Ok(()),
            AppInfo::Flatpak {
                app_id, sources, ..
            } => {
                if sources
                    .as_ref()
                    .is_some_and(|s| s.iter().any(|d| d == source))
                {
                    Ok(())
                } else {
                    Err(PortalError::NotAllowed(format!(
                        "{app_id} did not declare the '{source}' source; its manifest needs \
                         finish-args --add-policy=watchq.sources={source}"
                    )))
                }
            }
        }
    }
}

/// The application behind bus connection `sender`.
///
/// # Errors
/// `NotAllowed` when the caller's process cannot be inspected or its `.flatpak-info`
/// is unreadable or malformed.
pub async fn of_peer(
    dbus: &DBusProxy<'_>,
    sender: &UniqueName<'_>,
) -> Result<AppInfo, PortalError> {
    let credentials = dbus
        .get_connection_credentials(BusName::Unique(sender.clone()))
        .await?;
    let refuse =
        |why: String| PortalError::NotAllowed(format!("cannot identify the caller: {why}"));
    let pid = credentials
        .process_id()
        .ok_or_else(|| refuse("the bus does not report its process id".to_owned()))?;
    // The bus's pidfd names the very process that connected; without one, a pidfd
    // opened now and checked after reading narrows a pid-reuse race to the time the
    // bus call took (as xdg-desktop-portal does on buses without ProcessFD).
    let pidfd: OwnedFd = match credentials.into_process_fd() {
        Some(fd) => fd.into(),
        None => crate::sys::pidfd::open(pid).map_err(|e| refuse(format!("pidfd of {pid}: {e}")))?,
    };
    let info = read_flatpak_info(pid).map_err(refuse)?;
    let other = match &info {
        Some(_) => None,
        None => other_sandbox(pid).map_err(refuse)?,
    };
    if crate::sys::pidfd::exited(&pidfd).unwrap_or(true) {
        return Err(refuse(format!(
            "process {pid} exited while being inspected"
        )));
    }
    if let Some(sandbox) = other {
        // Not the host, and not a sandbox the portal can read the declaration of.
        return Err(PortalError::NotAllowed(format!(
            "{sandbox}: only Flatpak apps and unsandboxed programs are served so far"
        )));
    }
    Ok(match info {
        None => AppInfo::Host,
        Some(info) => AppInfo::Flatpak {
            app_id: info
                .app_id
                .clone()
                .ok_or_else(|| refuse("its .flatpak-info names no application".to_owned()))?,
            instance_id: info.instance_id.clone(),
            sources: info.policy("watchq", "sources"),
        },
    })
}

/// A sandbox without `.flatpak-info` that must not pass for the host: a snap (by its
/// cgroup or its AppArmor label), or a Flatpak scope whose root shows no `.flatpak-info`.
fn other_sandbox(pid: u32) -> Result<Option<String>, String> {
    use crate::policy::identity::{parse_cgroup, parse_label, snap_of_label};
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .map_err(|e| format!("/proc/{pid}/cgroup: {e}"))?;
    let facts = parse_cgroup(&cgroup);
    if let Some(app) = facts.flatpak_app {
        return Ok(Some(format!("Flatpak app {app} without /.flatpak-info")));
    }
    // No label (no LSM, EINVAL/ENOENT) is no snap.
    let label = std::fs::read(format!("/proc/{pid}/attr/current"))
        .ok()
        .as_deref()
        .and_then(parse_label);
    Ok(facts
        .snap
        .or_else(|| label.as_deref().and_then(snap_of_label))
        .map(|snap| format!("snap {snap}")))
}

/// `/proc/PID/root/.flatpak-info`: `None` when there is none.
fn read_flatpak_info(pid: u32) -> Result<Option<FlatpakInfo>, String> {
    let root_path = format!("/proc/{pid}/root");
    let root = nix::fcntl::open(
        root_path.as_str(),
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | OFlag::O_NOCTTY,
        Mode::empty(),
    )
    .map_err(|e| format!("{root_path}: {e}"))?;
    // Beneath the app's root, following no link: a sandbox could otherwise point its
    // `.flatpak-info` at some other file the portal may read. Without blocking: a FIFO
    // there would otherwise hold the open, and the portal, until someone wrote to it
    // (it is refused below as not a regular file).
    let how = OpenHow::new()
        .flags(
            OFlag::O_RDONLY
                | OFlag::O_CLOEXEC
                | OFlag::O_NOCTTY
                | OFlag::O_NOFOLLOW
                | OFlag::O_NONBLOCK,
        )
        .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_BENEATH);
    let fd = match nix::fcntl::openat2(&root, ".flatpak-info", how) {
        Ok(fd) => fd,
        Err(nix::errno::Errno::ENOENT) => return Ok(None),
        Err(e) => return Err(format!("{root_path}/.flatpak-info: {e}")),
    };
    let mut file = std::fs::File::from(fd);
    let meta = file
        .metadata()
        .map_err(|e| format!("{root_path}/.flatpak-info: {e}"))?;
    if !meta.file_type().is_file() {
        return Err(format!("{root_path}/.flatpak-info is not a regular file"));
    }
    let mut text = String::new();
    (&mut file)
        .take(u64::try_from(MAX_SIZE).unwrap_or(u64::MAX) + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("{root_path}/.flatpak-info: {e}"))?;
    if text.len() > MAX_SIZE {
        return Err(format!(
            "{root_path}/.flatpak-info is over {MAX_SIZE} bytes"
        ));
    }
    FlatpakInfo::parse(&text)
        .map(Some)
        .map_err(|e| format!("{root_path}/.flatpak-info: {e}"))
}
