//! Who a caller is: what the bus says about the connection (`GetConnectionCredentials`)
//! plus what the kernel says about the process behind it, read once when the caller
//! subscribes. Never from message bodies.
//!
//! Touches: `/proc/PID/cgroup` (systemd unit, login session, Flatpak and snap scopes),
//! `/proc/PID/root/.flatpak-info` (needs CAP_SYS_PTRACE for other users' processes),
//! `/proc/PID/attr/current` (the LSM label when the bus gives none), and
//! `pidfd_open(2)` (Linux 5.3) to pin the process while reading, when the bus gives no
//! `ProcessFD`. dbus-daemon 1.14 gives neither `ProcessFD` nor `LinuxSecurityLabel`.
//!
//! The parsers are pure functions over the files' text.

use std::os::fd::OwnedFd;
use std::path::PathBuf;

/// A caller as the bus and the kernel describe it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The caller's unique bus name (`:1.42`); subscriptions die with it.
    pub unique_name: String,
    pub uid: u32,
    pub gids: Vec<u32>,
    pub pid: Option<u32>,
    /// The LSM label (SELinux context, AppArmor profile, Smack label), if any LSM gives one.
    pub label: Option<String>,
    /// Set when the caller is a Flatpak or snap app, or could not be inspected.
    pub sandbox: Option<Sandbox>,
    /// The systemd unit the process runs in (`foo.service`, `session-3.scope`).
    pub unit: Option<String>,
    /// The login session (`3`), from a `session-N.scope` cgroup.
    pub session: Option<String>,
}

impl Identity {
    /// This caller as the kernel plumbing that resolves its paths needs it.
    pub fn caller(&self) -> crate::sys::resolve::Caller<'_> {
        crate::sys::resolve::Caller {
            unique_name: &self.unique_name,
            uid: self.uid,
            gids: &self.gids,
            pid: self.pid,
        }
    }

    /// A caller the bus knows only by name and uid.
    pub fn new(unique_name: String, uid: u32) -> Identity {
        Identity {
            unique_name,
            uid,
            gids: Vec::new(),
            pid: None,
            label: None,
            sandbox: None,
            unit: None,
            session: None,
        }
    }

    pub fn is_administrator(&self) -> bool {
        self.uid == 0
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SandboxKind {
    Flatpak,
    Snap,
    /// The process could not be inspected (gone, hidden, unreadable): treated as
    /// sandboxed, so that not knowing never grants more.
    Unknown,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sandbox {
    pub kind: SandboxKind,
    pub app_id: Option<String>,
}

impl Sandbox {
    pub fn describe(&self) -> String {
        let app = self.app_id.as_deref().unwrap_or("(unknown app)");
        match self.kind {
            SandboxKind::Flatpak => format!("Flatpak app {app}"),
            SandboxKind::Snap => format!("snap {app}"),
            SandboxKind::Unknown => format!("a process that cannot be inspected ({app})"),
        }
    }
}

/// What the bus said about a connection.
#[derive(Debug)]
pub struct BusCredentials {
    pub unique_name: String,
    pub uid: u32,
    pub gids: Vec<u32>,
    pub pid: Option<u32>,
    pub label: Option<Vec<u8>>,
    pub pidfd: Option<OwnedFd>,
}

/// Facts read from a process's cgroup path.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CgroupFacts {
    pub unit: Option<String>,
    pub session: Option<String>,
    pub flatpak_app: Option<String>,
    pub snap: Option<String>,
}

/// Parses `/proc/PID/cgroup`. The unified (`0::`) line is preferred, then systemd's
/// named v1 hierarchy. Flatpak runs apps in `app-flatpak-<app id>-<n>.scope`; snapd in
/// `snap.<name>.<app>-<uuid>.scope` or `snap.<name>.<app>.service`.
pub fn parse_cgroup(text: &str) -> CgroupFacts {
    let path = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .or_else(|| {
            text.lines()
                .find_map(|l| l.split_once(":name=systemd:").map(|(_, p)| p))
        })
        .unwrap_or("");
    let mut facts = CgroupFacts::default();
    for part in path.split('/').filter(|p| !p.is_empty()) {
        if let Some(rest) = part
            .strip_prefix("app-flatpak-")
            .and_then(|r| r.strip_suffix(".scope"))
        {
            // The app id, then "-" and a number.
            let app = rest.rsplit_once('-').map_or(rest, |(app, _)| app);
            facts.flatpak_app = Some(app.to_owned());
        }
        if let Some(rest) = part.strip_prefix("snap.") {
            if part.ends_with(".scope") || part.ends_with(".service") {
                facts.snap = rest.split('.').next().map(str::to_owned);
            }
        }
        if let Some(id) = part
            .strip_prefix("session-")
            .and_then(|r| r.strip_suffix(".scope"))
        {
            facts.session = Some(id.to_owned());
        }
        if part.ends_with(".service") || part.ends_with(".scope") {
            facts.unit = Some(part.to_owned());
        }
    }
    facts
}

/// The app id in a `.flatpak-info` keyfile: `name` in `[Application]`, or `runtime` in
/// `[Runtime]` for a bare runtime.
pub fn parse_flatpak_info(text: &str) -> Option<String> {
    super::flatpak_info::FlatpakInfo::parse(text).ok()?.app_id
}

/// An LSM label as the kernel prints it: trailing NUL and newline removed, and the
/// AppArmor mode suffix (` (enforce)`) dropped. Empty means none.
pub fn parse_label(raw: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(raw);
    let text = text.trim_end_matches(['\0', '\n']);
    let text = text
        .strip_suffix(" (enforce)")
        .or_else(|| text.strip_suffix(" (complain)"))
        .unwrap_or(text);
    (!text.is_empty()).then(|| text.to_owned())
}

/// The snap a `snap.<name>.<app>` AppArmor label belongs to.
pub fn snap_of_label(label: &str) -> Option<String> {
    label
        .strip_prefix("snap.")
        .and_then(|rest| rest.split('.').next())
        .map(str::to_owned)
}

/// Builds the caller's identity from the bus's answer and the process's /proc entries.
/// Any doubt about the process (no pid, hidden or vanished process, unreadable files
/// other than a missing `.flatpak-info`) marks it [`SandboxKind::Unknown`].
pub fn resolve(credentials: BusCredentials) -> Identity {
    let BusCredentials {
        unique_name,
        uid,
        gids,
        pid,
        label,
        pidfd,
    } = credentials;
    let mut identity = Identity {
        gids,
        pid,
        label: label.as_deref().and_then(parse_label),
        ..Identity::new(unique_name, uid)
    };
    let Some(pid) = pid else {
        identity.sandbox = Some(unknown("the bus does not know the caller's pid"));
        return identity;
    };
    // Pin the process so that everything below is about it, not a recycled pid.
    let pidfd = pidfd.or_else(|| crate::sys::pidfd::open(pid).ok());
    match inspect(pid, &mut identity) {
        Ok(()) => {}
        Err(why) => identity.sandbox = Some(unknown(&why)),
    }
    if pidfd
        .as_ref()
        .is_none_or(|fd| crate::sys::pidfd::exited(fd).unwrap_or(true))
    {
        identity.sandbox = Some(unknown("the process exited while it was being inspected"));
    }
    identity
}

fn unknown(why: &str) -> Sandbox {
    Sandbox {
        kind: SandboxKind::Unknown,
        app_id: Some(why.to_owned()),
    }
}

fn inspect(pid: u32, identity: &mut Identity) -> Result<(), String> {
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let cgroup = std::fs::read_to_string(proc_dir.join("cgroup"))
        .map_err(|e| format!("cannot read /proc/{pid}/cgroup: {e}"))?;
    let facts = parse_cgroup(&cgroup);
    identity.unit = facts.unit;
    identity.session = facts.session;
    if identity.label.is_none() {
        // EINVAL or ENOENT when no LSM provides a label: none.
        identity.label = std::fs::read(proc_dir.join("attr/current"))
            .ok()
            .as_deref()
            .and_then(parse_label);
    }
    let flatpak_info = match std::fs::read_to_string(proc_dir.join("root/.flatpak-info")) {
        Ok(text) => Some(parse_flatpak_info(&text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(format!("cannot read /proc/{pid}/root/.flatpak-info: {e}")),
    };
    if flatpak_info.is_some() || facts.flatpak_app.is_some() {
        identity.sandbox = Some(Sandbox {
            kind: SandboxKind::Flatpak,
            app_id: flatpak_info.flatten().or(facts.flatpak_app),
        });
    } else if let Some(snap) = facts
        .snap
        .or_else(|| identity.label.as_deref().and_then(snap_of_label))
    {
        identity.sandbox = Some(Sandbox {
            kind: SandboxKind::Snap,
            app_id: Some(snap),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_of_a_flatpak_app() {
        let text = "0::/user.slice/user-1000.slice/user@1000.service/app.slice/app-flatpak-org.gnome.Maps-2481.scope\n";
        let facts = parse_cgroup(text);
        assert_eq!(facts.flatpak_app.as_deref(), Some("org.gnome.Maps"));
        assert_eq!(
            facts.unit.as_deref(),
            Some("app-flatpak-org.gnome.Maps-2481.scope")
        );
        assert_eq!(facts.session, None);
    }

    #[test]
    fn cgroup_of_a_snap_and_of_a_session() {
        let snap = parse_cgroup(
            "0::/user.slice/user-1000.slice/user@1000.service/app.slice/snap.firefox.firefox-8c1f.scope\n",
        );
        assert_eq!(snap.snap.as_deref(), Some("firefox"));
        let session = parse_cgroup("0::/user.slice/user-1000.slice/session-3.scope\n");
        assert_eq!(session.session.as_deref(), Some("3"));
        assert_eq!(session.unit.as_deref(), Some("session-3.scope"));
        assert_eq!(session.flatpak_app, None);
        // Hybrid hierarchy: systemd's named v1 line when the unified one is the root.
        let hybrid = parse_cgroup(
            "9:name=systemd:/system.slice/cron.service\n4:memory:/x\n0::/system.slice/cron.service\n",
        );
        assert_eq!(hybrid.unit.as_deref(), Some("cron.service"));
        assert_eq!(parse_cgroup("0::/\n"), CgroupFacts::default());
    }

    #[test]
    fn flatpak_info_names_the_app() {
        let text = "[Application]\nname=org.example.App\nruntime=runtime/org.gnome.Platform/x86_64/46\n\n[Instance]\ninstance-id=1\n";
        assert_eq!(parse_flatpak_info(text).as_deref(), Some("org.example.App"));
        assert_eq!(
            parse_flatpak_info("[Runtime]\nruntime=org.gnome.Platform\n").as_deref(),
            Some("org.gnome.Platform")
        );
        assert_eq!(parse_flatpak_info(""), None);
    }

    #[test]
    fn labels() {
        assert_eq!(
            parse_label(b"snap.firefox.firefox (enforce)\n").as_deref(),
            Some("snap.firefox.firefox")
        );
        assert_eq!(
            parse_label(b"unconfined_u:unconfined_r:unconfined_t:s0\0").as_deref(),
            Some("unconfined_u:unconfined_r:unconfined_t:s0")
        );
        assert_eq!(parse_label(b"\0"), None);
        assert_eq!(
            snap_of_label("snap.firefox.firefox").as_deref(),
            Some("firefox")
        );
    }

    #[test]
    fn this_process_resolves_as_itself() {
        let identity = resolve(BusCredentials {
            unique_name: ":1.1".into(),
            uid: 0,
            gids: vec![0],
            pid: Some(std::process::id()),
            label: None,
            pidfd: None,
        });
        assert_eq!(identity.sandbox, None, "{identity:?}");
        assert_eq!(identity.pid, Some(std::process::id()));
    }

    #[test]
    fn an_unknown_pid_is_never_trusted() {
        let identity = resolve(BusCredentials {
            unique_name: ":1.1".into(),
            uid: 1000,
            gids: vec![],
            pid: None,
            label: None,
            pidfd: None,
        });
        assert_eq!(identity.sandbox.map(|s| s.kind), Some(SandboxKind::Unknown));
    }
}
