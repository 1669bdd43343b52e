//! The short-lived helper that sets and removes key watches with a subscriber's
//! credentials.
//!
//! `KEYCTL_WATCH_KEY` checks View permission on the key and calls the security module's
//! `watch_key` hook with the credentials of the calling process; the kernel then checks
//! every notification against the credentials the watch was set with. For those checks to
//! be the subscriber's and not the daemon's, the daemon re-executes its own binary as
//! `watchqd --keys-helper ...`, which drops to the subscriber's uid, gid and groups before
//! it touches a key, with the daemon's notification pipe as its standard input. Being a
//! fresh single-threaded process, it can change credentials without the multithreaded
//! daemon forking. It first joins a new anonymous session keyring, so it does not possess
//! the daemon's keyrings (possession would grant more than the subscriber has).
//!
//! The helper also takes the subscriber's security label (SELinux context, AppArmor
//! profile), so that the kernel's `watch_key` security hook judges the subscriber too: after
//! dropping to its credentials it sets that label for its next exec and executes itself
//! once more ([`super::label`]). When the label cannot be taken the watch is refused.
//!
//! Protocol: arguments `--keys-helper OP UID GID GROUPS TARGET LABEL` where OP is `watch` or
//! `unwatch`, GROUPS a comma-separated list (possibly empty), TARGET `user`, `persistent`
//! or a serial, LABEL `-` (none to take), `label:TEXT` (take it), or `taken` (the second
//! run, already with the credentials and the label). One JSON line on stdout: `{"serial", "description", "outcome"}` (outcome
//! `watched`, `shared` when this pipe already watched the key, `unwatched`), or
//! `{"errno", "step", "message"}` with exit status 1.

use std::io::Write;
use std::process::{Command, ExitCode, Stdio};

use nix::libc;
use nix::unistd::{Gid, Uid};

use crate::error::Error;

/// The first argument that turns the daemon binary into the helper.
pub const HELPER_ARG: &str = "--keys-helper";

const KEYCTL_GET_KEYRING_ID: libc::c_long = 0;
const KEYCTL_JOIN_SESSION_KEYRING: libc::c_long = 1;
const KEYCTL_DESCRIBE: libc::c_long = 6;
const KEYCTL_GET_PERSISTENT: libc::c_long = 22;
const KEYCTL_WATCH_KEY: libc::c_long = 32;
const KEY_SPEC_PROCESS_KEYRING: libc::c_long = -2;
const KEY_SPEC_USER_KEYRING: libc::c_long = -4;
/// The watch id set on every kernel watch: records are told apart by key serial, and
/// the kernel allows one watch per key and pipe anyway.
const WATCH_ID: libc::c_long = 0;

/// Which key a watch names.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// The user keyring of the uid the helper runs as (created if missing).
    User,
    /// The persistent keyring of that uid (created if missing).
    Persistent,
    Serial(i32),
}

impl Target {
    fn as_arg(&self) -> String {
        match self {
            Target::User => "user".into(),
            Target::Persistent => "persistent".into(),
            Target::Serial(serial) => serial.to_string(),
        }
    }

    fn parse(arg: &str) -> Option<Target> {
        match arg {
            "user" => Some(Target::User),
            "persistent" => Some(Target::Persistent),
            other => other.parse().ok().map(Target::Serial),
        }
    }
}

/// The credentials a helper runs with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Creds {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    /// The subscriber's security label, which the helper takes before it sets a watch
    /// (see [`super::label`]).
    pub label: Option<String>,
}

/// What a key's `KEYCTL_DESCRIBE` says: `type;uid;gid;perm;description`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyInfo {
    pub kind: String,
    pub owner: u32,
    pub description: String,
}

impl KeyInfo {
    pub fn parse(text: &str) -> Option<KeyInfo> {
        let mut fields = text.splitn(5, ';');
        let kind = fields.next()?.to_owned();
        let owner = fields.next()?.parse().ok()?;
        let _gid = fields.next()?;
        let _perm = fields.next()?;
        let description = fields.next()?.to_owned();
        Some(KeyInfo {
            kind,
            owner,
            description,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A new kernel watch was set.
    Watched,
    /// The pipe already watched the key; the caller passed the permission checks.
    Shared,
    Unwatched,
}

#[derive(Debug)]
pub struct Answer {
    pub serial: i32,
    pub info: Option<KeyInfo>,
    pub outcome: Outcome,
}

/// Runs the helper as `creds` on `pipe` and reads its answer. Kernel refusals come back
/// as typed errors: EACCES/EPERM → AccessDenied, ENOKEY/EKEYREVOKED/EKEYEXPIRED →
/// NotFound, EOPNOTSUPP/ENOPKG → NotSupported.
pub fn run(
    exe: &std::path::Path,
    op: &str,
    creds: &Creds,
    target: &Target,
    pipe: &std::os::fd::OwnedFd,
) -> Result<Answer, Error> {
    let pipe = pipe
        .try_clone()
        .map_err(|e| Error::Unavailable(format!("cannot pass the notification pipe: {e}")))?;
    let groups: Vec<String> = creds.groups.iter().map(u32::to_string).collect();
    let own = super::label::own_label();
    let label = creds
        .label
        .as_deref()
        .filter(|label| super::label::needs_transition(Some(label), own.as_deref()));
    let label_arg = label.map_or_else(|| "-".to_owned(), |label| format!("label:{label}"));
    let output = Command::new(exe)
        .arg(HELPER_ARG)
        .arg(op)
        .arg(creds.uid.to_string())
        .arg(creds.gid.to_string())
        .arg(groups.join(","))
        .arg(target.as_arg())
        .arg(&label_arg)
        .env_clear()
        .stdin(Stdio::from(pipe))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| {
            Error::Unavailable(format!(
                "cannot run the key watch helper {}: {e}",
                exe.display()
            ))
        })?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let answer: serde_json::Value = serde_json::from_str(stdout.trim()).map_err(|e| {
        if let Some(label) = label {
            // Killed in its exec under the label (the label's policy refused the binary).
            return Error::AccessDenied(format!(
                "the key watch helper could not run under your security label {label} \
                 ({e}; status {}, stderr: {}); refusing the watch",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        Error::Unavailable(format!(
            "the key watch helper gave no answer ({e}; status {}, stderr: {})",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    })?;
    if let Some(errno) = answer.get("errno").and_then(serde_json::Value::as_i64) {
        let step = answer["step"].as_str().unwrap_or("?");
        let message = answer["message"].as_str().unwrap_or("?");
        let what = format!(
            "{step} of key {} as uid {}: {message}",
            target.as_arg(),
            creds.uid
        );
        let errno = i32::try_from(errno).unwrap_or(0);
        if step.contains("security label") {
            return Err(Error::AccessDenied(format!(
                "the key watch helper cannot take your security label {} ({step}: {message}); \
                 refusing the watch rather than setting it under the daemon's label (the \
                 daemon's own domain must be allowed to change to it on exec; see the README)",
                label.unwrap_or("?")
            )));
        }
        if step.starts_with("set") {
            return Err(Error::Unavailable(format!(
                "the key watch helper cannot take uid {}'s credentials ({step}: {message}); \
                 the daemon needs CAP_SETUID and CAP_SETGID",
                creds.uid
            )));
        }
        return Err(match errno {
            libc::EACCES | libc::EPERM => Error::AccessDenied(format!("the kernel refused {what}")),
            libc::ENOKEY | libc::EKEYREVOKED | libc::EKEYEXPIRED | libc::ENOENT => {
                Error::NotFound(what)
            }
            libc::EOPNOTSUPP | libc::ENOPKG => Error::NotSupported(what),
            libc::EAGAIN | libc::EDQUOT => Error::LimitExceeded(format!(
                "{what} (the user's watch limit, RLIMIT_NOFILE, is reached)"
            )),
            _ => Error::Unavailable(what),
        });
    }
    let serial = answer
        .get("serial")
        .and_then(serde_json::Value::as_i64)
        .and_then(|s| i32::try_from(s).ok())
        .ok_or_else(|| Error::Unavailable(format!("the key watch helper said {stdout}")))?;
    let outcome = match answer.get("outcome").and_then(serde_json::Value::as_str) {
        Some("watched") => Outcome::Watched,
        Some("shared") => Outcome::Shared,
        Some("unwatched") => Outcome::Unwatched,
        _ => {
            return Err(Error::Unavailable(format!(
                "the key watch helper said {stdout}"
            )))
        }
    };
    let info = answer
        .get("description")
        .and_then(serde_json::Value::as_str)
        .and_then(KeyInfo::parse);
    Ok(Answer {
        serial,
        info,
        outcome,
    })
}

fn keyctl(op: libc::c_long, a: libc::c_long, b: libc::c_long, c: libc::c_long) -> Result<i64, i32> {
    // SAFETY: keyctl with integer arguments, or a pointer/length pair the caller keeps
    // alive for the call.
    let r = unsafe { libc::syscall(libc::SYS_keyctl, op, a, b, c) };
    if r < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(r)
    }
}

fn describe(serial: i32) -> Result<String, i32> {
    let mut buf = vec![0u8; 4096 + 64];
    #[allow(clippy::cast_possible_wrap)]
    let n = keyctl(
        KEYCTL_DESCRIBE,
        serial.into(),
        buf.as_mut_ptr() as libc::c_long,
        buf.len() as libc::c_long,
    )?;
    let n = usize::try_from(n).unwrap_or(0).min(buf.len());
    buf.truncate(n);
    if buf.last() == Some(&0) {
        buf.pop();
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// Drops to the subscriber's uid, gid and groups.
fn become_subscriber(uid: &str, gid: &str, groups: &str) -> Result<(), ExitCode> {
    let parsed = (
        uid.parse::<u32>(),
        gid.parse::<u32>(),
        groups
            .split(',')
            .filter(|g| !g.is_empty())
            .map(str::parse::<u32>)
            .collect::<Result<Vec<_>, _>>(),
    );
    let (Ok(uid), Ok(gid), Ok(groups)) = parsed else {
        return Err(fail("arguments", libc::EINVAL));
    };
    let groups: Vec<Gid> = groups.into_iter().map(Gid::from_raw).collect();
    if let Err(e) = nix::unistd::setgroups(&groups) {
        return Err(fail("setgroups", e as i32));
    }
    let gid = Gid::from_raw(gid);
    if let Err(e) = nix::unistd::setresgid(gid, gid, gid) {
        return Err(fail("setresgid", e as i32));
    }
    let uid = Uid::from_raw(uid);
    if let Err(e) = nix::unistd::setresuid(uid, uid, uid) {
        return Err(fail("setresuid", e as i32));
    }
    Ok(())
}

/// Sets `label` for the next exec and executes this helper again, as `taken`. Returns
/// only on failure.
fn exec_under_label(label: &str, args: [&String; 5]) -> ExitCode {
    use std::os::unix::process::CommandExt;
    if let Err(errno) = super::label::set_exec_label(label) {
        return fail("setting the caller's security label for exec", errno);
    }
    // By its path, so that it keeps its name (comm) in the kernel's records.
    let exe = std::env::current_exe().unwrap_or_else(|_| "/proc/self/exe".into());
    let error = Command::new(exe)
        .arg(HELPER_ARG)
        .args(args)
        .arg("taken")
        .env_clear()
        .exec();
    fail(
        "executing under the caller's security label",
        error.raw_os_error().unwrap_or(libc::EIO),
    )
}

fn fail(step: &str, errno: i32) -> ExitCode {
    let message = std::io::Error::from_raw_os_error(errno).to_string();
    println!(
        "{}",
        serde_json::json!({"errno": errno, "step": step, "message": message})
    );
    let _ = std::io::stdout().flush();
    ExitCode::FAILURE
}

/// The helper's `main`: `args` are what follows [`HELPER_ARG`]. Must run before the
/// daemon starts any thread.
pub fn helper_main(args: &[String]) -> ExitCode {
    let [op, uid, gid, groups, target, label] = args else {
        return fail("arguments", libc::EINVAL);
    };
    if label != "taken" {
        if let Err(code) = become_subscriber(uid, gid, groups) {
            return code;
        }
        if let Some(label) = label.strip_prefix("label:") {
            return exec_under_label(label, [op, uid, gid, groups, target]);
        }
    }
    let Some(target) = Target::parse(target) else {
        return fail("arguments", libc::EINVAL);
    };
    // A new anonymous session keyring: stop possessing the daemon's.
    if let Err(errno) = keyctl(KEYCTL_JOIN_SESSION_KEYRING, 0, 0, 0) {
        return fail("joining a session keyring", errno);
    }
    let serial = match target {
        Target::User => keyctl(KEYCTL_GET_KEYRING_ID, KEY_SPEC_USER_KEYRING, 1, 0),
        Target::Persistent => keyctl(KEYCTL_GET_PERSISTENT, -1, KEY_SPEC_PROCESS_KEYRING, 0),
        Target::Serial(serial) => Ok(i64::from(serial)),
    };
    let serial = match serial.map(i32::try_from) {
        Ok(Ok(serial)) => serial,
        Ok(Err(_)) => return fail("resolving the keyring", libc::ERANGE),
        Err(errno) => return fail("resolving the keyring", errno),
    };
    let outcome = match op.as_str() {
        "watch" => match keyctl(KEYCTL_WATCH_KEY, serial.into(), 0, WATCH_ID) {
            Ok(_) => "watched",
            // The kernel found this pipe already watching the key, after the View check
            // and the security hook passed for us.
            Err(libc::EBUSY) => "shared",
            Err(errno) => return fail("KEYCTL_WATCH_KEY", errno),
        },
        "unwatch" => match keyctl(KEYCTL_WATCH_KEY, serial.into(), 0, -1) {
            Ok(_) => "unwatched",
            Err(errno) => return fail("removing the watch (KEYCTL_WATCH_KEY -1)", errno),
        },
        _ => return fail("arguments", libc::EINVAL),
    };
    // Described after the watch succeeded, so a key we may not view says nothing.
    let description = match describe(serial) {
        Ok(text) => serde_json::Value::from(text),
        Err(_) => serde_json::Value::Null,
    };
    println!(
        "{}",
        serde_json::json!({"serial": serial, "description": description, "outcome": outcome})
    );
    let _ = std::io::stdout().flush();
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_description_fields() {
        assert_eq!(
            KeyInfo::parse("keyring;1000;1000;3f130000;_uid.1000"),
            Some(KeyInfo {
                kind: "keyring".into(),
                owner: 1000,
                description: "_uid.1000".into()
            })
        );
        // A description may itself contain ';'.
        assert_eq!(
            KeyInfo::parse("user;0;0;3f010000;a;b").map(|i| i.description),
            Some("a;b".into())
        );
        assert_eq!(KeyInfo::parse("user;x;0;0;d"), None);
        assert_eq!(KeyInfo::parse("user"), None);
    }

    #[test]
    fn targets_round_trip() {
        for target in [Target::User, Target::Persistent, Target::Serial(123_456)] {
            assert_eq!(Target::parse(&target.as_arg()), Some(target));
        }
        assert_eq!(Target::parse("session"), None);
    }
}
