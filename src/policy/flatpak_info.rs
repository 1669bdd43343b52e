//! `.flatpak-info`: the GLib keyfile Flatpak writes at the root of every sandbox. The
//! app cannot change it (it is bind-mounted read-only from the host), so what it says
//! about the app is what the app is: `[Application] name`, `[Instance] instance-id`, and
//! `[Policy GROUP]` for what `flatpak build-finish --add-policy=GROUP.KEY=VALUE` declared.
//!
//! A small reader of GLib's keyfile format (`g_key_file_load_from_data`): `[group]`
//! lines, `key=value` lines (spaces around `=` dropped), `#` comments, blank lines;
//! values unescape `\s \n \t \r \\`, and lists split at unescaped `;`. Anything else is
//! an error, as it is for GLib, so a file GLib would refuse is refused here too.

use std::collections::BTreeMap;

/// The most a `.flatpak-info` is read: Flatpak's are a few KiB.
pub const MAX_SIZE: usize = 64 * 1024;

/// A parsed keyfile: group → key → raw (still escaped) value. A key given twice keeps
/// the later value, as GLib does.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Keyfile {
    groups: BTreeMap<String, BTreeMap<String, String>>,
}

impl Keyfile {
    /// Parses `text`.
    ///
    /// # Errors
    /// The number and text of the first line that is neither a group, a key, a comment
    /// nor blank, or a key before any group.
    pub fn parse(text: &str) -> Result<Keyfile, String> {
        let mut keyfile = Keyfile::default();
        let mut group: Option<String> = None;
        for (number, line) in text.lines().enumerate() {
            let trimmed = line.trim_start();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            if let Some(name) = trimmed
                .trim_end()
                .strip_prefix('[')
                .and_then(|l| l.strip_suffix(']'))
            {
                if name.is_empty() || name.contains(['[', ']']) {
                    return Err(format!("line {}: bad group name '{name}'", number + 1));
                }
                keyfile.groups.entry(name.to_owned()).or_default();
                group = Some(name.to_owned());
                continue;
            }
            let Some((key, value)) = trimmed.split_once('=') else {
                return Err(format!("line {}: neither a group nor a key", number + 1));
            };
            let Some(group) = &group else {
                return Err(format!("line {}: a key before any group", number + 1));
            };
            let key = key.trim_end();
            if key.is_empty() {
                return Err(format!("line {}: an empty key", number + 1));
            }
            keyfile
                .groups
                .entry(group.clone())
                .or_default()
                .insert(key.to_owned(), value.trim_start().to_owned());
        }
        Ok(keyfile)
    }

    /// The unescaped string value of `key` in `group`.
    pub fn string(&self, group: &str, key: &str) -> Option<String> {
        let raw = self.groups.get(group)?.get(key)?;
        Some(unescape(raw, false).concat())
    }

    /// The list value of `key` in `group` (`a;b;c;`, a trailing `;` optional), empty
    /// items dropped.
    pub fn list(&self, group: &str, key: &str) -> Option<Vec<String>> {
        let raw = self.groups.get(group)?.get(key)?;
        Some(
            unescape(raw, true)
                .into_iter()
                .filter(|item| !item.is_empty())
                .collect(),
        )
    }

    /// Whether `group` exists, keys or not.
    pub fn has_group(&self, group: &str) -> bool {
        self.groups.contains_key(group)
    }
}

/// GLib's escapes; with `split`, the value cut at unescaped `;`.
fn unescape(raw: &str, split: bool) -> Vec<String> {
    let mut items = vec![String::new()];
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        let current = items.last_mut().expect("items starts with one item");
        match c {
            '\\' => match chars.next() {
                Some('s') => current.push(' '),
                Some('n') => current.push('\n'),
                Some('t') => current.push('\t'),
                Some('r') => current.push('\r'),
                Some(other) => current.push(other),
                None => {}
            },
            ';' if split => items.push(String::new()),
            other => current.push(other),
        }
    }
    items
}

/// What the portal and the daemon need from a `.flatpak-info`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlatpakInfo {
    /// `[Application] name`, or `[Runtime] runtime` for a bare runtime (as
    /// xdg-desktop-portal reads it).
    pub app_id: Option<String>,
    /// `[Instance] instance-id`.
    pub instance_id: Option<String>,
    keyfile: Keyfile,
}

impl FlatpakInfo {
    /// Parses a `.flatpak-info`.
    ///
    /// # Errors
    /// What [`Keyfile::parse`] refuses.
    pub fn parse(text: &str) -> Result<FlatpakInfo, String> {
        let keyfile = Keyfile::parse(text)?;
        let app_id = if keyfile.has_group("Runtime") {
            keyfile.string("Runtime", "runtime")
        } else {
            keyfile.string("Application", "name")
        };
        Ok(FlatpakInfo {
            app_id,
            instance_id: keyfile.string("Instance", "instance-id"),
            keyfile,
        })
    }

    /// A `[Policy GROUP] KEY` list that `--add-policy=GROUP.KEY=VALUE` declared; `None`
    /// when the app declared none.
    pub fn policy(&self, group: &str, key: &str) -> Option<Vec<String>> {
        self.keyfile.list(&format!("Policy {group}"), key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `.flatpak-info` as flatpak 1.14 writes it, with a policy from
    /// `--add-policy=watchq.sources=devices --add-policy=watchq.sources=space`.
    const WRITTEN_BY_FLATPAK: &str = "[Application]\nname=org.example.Hotplug\n\
        runtime=runtime/org.freedesktop.Platform/x86_64/23.08\n\n\
        [Instance]\ninstance-id=1815385312\narch=x86_64\nflatpak-version=1.14.4\n\n\
        [Context]\nshared=network;ipc;\n\n[Policy watchq]\nsources=devices;space;\n";

    #[test]
    fn flatpaks_own_file_gives_app_instance_and_policy() {
        let info = FlatpakInfo::parse(WRITTEN_BY_FLATPAK).unwrap();
        assert_eq!(info.app_id.as_deref(), Some("org.example.Hotplug"));
        assert_eq!(info.instance_id.as_deref(), Some("1815385312"));
        assert_eq!(
            info.policy("watchq", "sources"),
            Some(vec!["devices".to_owned(), "space".to_owned()])
        );
        assert_eq!(info.policy("watchq", "other"), None);
        assert_eq!(info.policy("usb", "sources"), None);
    }

    #[test]
    fn a_runtime_is_named_by_its_runtime_key() {
        let info = FlatpakInfo::parse("[Runtime]\nruntime=org.gnome.Platform\n").unwrap();
        assert_eq!(info.app_id.as_deref(), Some("org.gnome.Platform"));
    }

    #[test]
    fn escapes_comments_spaces_and_repeated_keys_read_as_glib_reads_them() {
        let text = "# comment\n[Policy watchq]\n  sources = dev\\;ices;\\sspace\\\\;\n\
                    [Application]\nname=first\nname=second\n";
        let info = FlatpakInfo::parse(text).unwrap();
        assert_eq!(
            info.policy("watchq", "sources"),
            Some(vec!["dev;ices".to_owned(), " space\\".to_owned()])
        );
        assert_eq!(info.app_id.as_deref(), Some("second"));
    }

    #[test]
    fn what_glib_refuses_is_refused() {
        for bad in [
            "name=before-any-group\n",
            "[Application]\njust words\n",
            "[Application]\n=no key\n",
            "[]\n",
        ] {
            assert!(Keyfile::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(FlatpakInfo::parse("").unwrap().app_id, None);
    }
}
