//! The packages a user installs: `packaging/build` run once, as the README says, and what
//! its .deb and .rpm contain, where, with which modes, dependencies and scripts; the man
//! pages render and document the real options; the completions, loaded in bash, zsh and
//! fish, offer the real subcommands and options.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

struct Built {
    deb: PathBuf,
    rpm: PathBuf,
    /// The .deb unpacked (`dpkg-deb -x`).
    root: PathBuf,
}

/// `packaging/build`, once for every test in this file (they run in parallel).
fn built() -> &'static Built {
    static BUILT: OnceLock<Built> = OnceLock::new();
    BUILT.get_or_init(|| {
        let out = Command::new(repo().join("packaging/build"))
            .current_dir(repo())
            .stderr(Stdio::inherit())
            .output()
            .expect("packaging/build");
        assert!(out.status.success(), "packaging/build failed");
        let stdout = String::from_utf8(out.stdout).unwrap();
        let paths: Vec<PathBuf> = stdout.lines().map(PathBuf::from).collect();
        assert_eq!(paths.len(), 2, "one path per package on stdout: {stdout:?}");
        for path in &paths {
            assert!(path.is_absolute() && path.is_file(), "{}", path.display());
        }
        let deb = paths
            .iter()
            .find(|p| p.extension().is_some_and(|e| e == "deb"));
        let rpm = paths
            .iter()
            .find(|p| p.extension().is_some_and(|e| e == "rpm"));
        let (deb, rpm) = (deb.unwrap().clone(), rpm.unwrap().clone());
        let root = repo().join("target/packages-test/deb-root");
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        run(
            "dpkg-deb",
            &["-x".as_ref(), deb.as_os_str(), root.as_os_str()],
        );
        Built { deb, rpm, root }
    })
}

fn run<S: AsRef<std::ffi::OsStr>>(program: &str, args: &[S]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {:?}: {}",
        args.iter().map(AsRef::as_ref).collect::<Vec<_>>(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Every file a package must hold: (Debian path, Fedora path, mode), computed from the
/// repository so that a new unit or interface file is expected in both packages.
fn expected() -> Vec<(String, String, u32)> {
    let mut files = vec![
        ("/usr/libexec/watchqd".to_owned(), 0o755),
        ("/usr/bin/watchqctl".to_owned(), 0o755),
        ("/usr/libexec/watchq-portal".to_owned(), 0o755),
        (
            "/usr/lib/systemd/user/watchq-portal.service".to_owned(),
            0o644,
        ),
        (
            "/usr/share/dbus-1/services/org.freedesktop.portal.Watchq.service".to_owned(),
            0o644,
        ),
        (
            "/usr/share/dbus-1/interfaces/org.freedesktop.portal.Watchq.xml".to_owned(),
            0o644,
        ),
        (
            "/usr/share/dbus-1/system-services/org.watchq1.service".to_owned(),
            0o644,
        ),
        (
            "/usr/share/dbus-1/system.d/org.watchq1.conf".to_owned(),
            0o644,
        ),
        (
            "/usr/share/polkit-1/actions/org.watchq1.policy".to_owned(),
            0o644,
        ),
        ("/etc/watchqd/watchqd.toml".to_owned(), 0o644),
        ("/usr/share/man/man8/watchqd.8.gz".to_owned(), 0o644),
        ("/usr/share/man/man1/watchqctl.1.gz".to_owned(), 0o644),
        ("/usr/share/man/man5/watchqd.toml.5.gz".to_owned(), 0o644),
        (
            "/usr/share/bash-completion/completions/watchqctl".to_owned(),
            0o644,
        ),
        (
            "/usr/share/zsh/vendor-completions/_watchqctl".to_owned(),
            0o644,
        ),
        (
            "/usr/share/fish/vendor_completions.d/watchqctl.fish".to_owned(),
            0o644,
        ),
        ("/usr/share/doc/watchqd/README.md".to_owned(), 0o644),
        ("/usr/share/doc/watchqd/copyright".to_owned(), 0o644),
    ];
    // System units; systemd/user/ is listed above.
    for unit in units() {
        files.push((format!("/lib/systemd/system/{unit}"), 0o644));
    }
    for xml in dir_names("dbus", |n| {
        n.starts_with("org.watchq1.") && n.ends_with(".xml")
    }) {
        files.push((format!("/usr/share/dbus-1/interfaces/{xml}"), 0o644));
    }
    files
        .into_iter()
        .map(|(deb, mode)| {
            let rpm = if let Some(unit) = deb.strip_prefix("/lib/systemd/system/") {
                format!("/usr/lib/systemd/system/{unit}")
            } else if deb == "/usr/share/zsh/vendor-completions/_watchqctl" {
                "/usr/share/zsh/site-functions/_watchqctl".to_owned()
            } else if deb == "/usr/share/doc/watchqd/copyright" {
                "/usr/share/licenses/watchqd/copyright".to_owned()
            } else {
                deb.clone()
            };
            (deb, rpm, mode)
        })
        .collect()
}

fn dir_names(dir: &str, keep: impl Fn(&str) -> bool) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(repo().join(dir))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| keep(n))
        .collect();
    names.sort();
    assert!(!names.is_empty(), "nothing in {dir}/");
    names
}

fn units() -> Vec<String> {
    dir_names("systemd", |n| n != "user")
}

/// `rwxr-xr-x` → 0o755.
fn mode(perms: &str) -> u32 {
    perms
        .chars()
        .rev()
        .take(9)
        .enumerate()
        .map(|(bit, c)| u32::from(c != '-') << bit)
        .sum()
}

#[test]
fn the_deb_holds_every_file_at_its_debian_path_with_its_mode() {
    let listing = run("dpkg-deb", &["-c".as_ref(), built().deb.as_os_str()]);
    let mut files = BTreeMap::new();
    for line in listing.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (perms, path) = (fields[0], fields[fields.len() - 1]);
        if perms.starts_with('-') {
            let path = path.strip_prefix('.').unwrap().to_owned();
            files.insert(path, mode(perms));
        } else {
            assert!(perms.starts_with('d'), "only files and directories: {line}");
        }
        assert!(line.contains(" 0/0 "), "owned by root: {line}");
    }
    let want: BTreeMap<String, u32> = expected().into_iter().map(|(d, _, m)| (d, m)).collect();
    assert_eq!(files, want, "dpkg-deb -c:\n{listing}");
}

#[test]
fn the_deb_depends_on_the_bus_polkit_and_libc_and_keeps_the_configuration() {
    let info = run(
        "dpkg-deb",
        &["-f".as_ref(), built().deb.as_os_str(), "Depends".as_ref()],
    );
    let depends: BTreeSet<&str> = info.trim().split(", ").collect();
    for wanted in [
        "default-dbus-system-bus | dbus-system-bus",
        "polkitd | policykit-1",
    ] {
        assert!(depends.contains(wanted), "Depends: {info}");
    }
    assert!(
        depends.iter().any(|d| d.starts_with("libc6 (>= ")),
        "libc6 from shlibs: {info}"
    );
    let conffiles = run(
        "dpkg-deb",
        &["-I".as_ref(), built().deb.as_os_str(), "conffiles".as_ref()],
    );
    assert_eq!(conffiles.trim(), "/etc/watchqd/watchqd.toml");
    let control = run("dpkg-deb", &["-I".as_ref(), built().deb.as_os_str()]);
    assert!(control.contains("Package: watchqd"), "{control}");
    // [metrics] writes for node_exporter's textfile collector.
    let suggests = run(
        "dpkg-deb",
        &["-f".as_ref(), built().deb.as_os_str(), "Suggests".as_ref()],
    );
    assert_eq!(suggests.trim(), "prometheus-node-exporter");
}

/// Debian's behaviour (dh_installsystemd): enable and start on installation, stop on
/// removal, mask on removal, forget on purge; systemd and the bus reload their
/// configuration. Every unit in systemd/ is named.
#[test]
fn the_deb_maintainer_scripts_enable_start_stop_and_purge_every_unit() {
    let script = |name: &str| {
        let text = run(
            "dpkg-deb",
            &["-I".as_ref(), built().deb.as_os_str(), name.as_ref()],
        );
        assert!(text.starts_with("#!/bin/sh\n"), "{name}: {text}");
        assert!(text.contains("\nset -e\n"), "{name}: {text}");
        assert!(!text.contains('@'), "{name}: a placeholder left: {text}");
        let status = Command::new("sh")
            .args(["-n", "-c", &text])
            .status()
            .unwrap();
        assert!(status.success(), "{name}: sh -n");
        for unit in units() {
            assert!(text.contains(&unit), "{name} names {unit}: {text}");
        }
        text
    };
    let postinst = script("postinst");
    for wanted in [
        "deb-systemd-helper enable",
        "systemctl --system daemon-reload",
        "deb-systemd-invoke \"$action\"",
        "org.freedesktop.DBus.ReloadConfig",
    ] {
        assert!(postinst.contains(wanted), "postinst: {wanted}: {postinst}");
    }
    assert!(script("prerm").contains("deb-systemd-invoke stop"));
    let postrm = script("postrm");
    for wanted in ["deb-systemd-helper mask", "deb-systemd-helper purge"] {
        assert!(postrm.contains(wanted), "postrm: {wanted}: {postrm}");
    }
}

#[test]
fn the_rpm_holds_the_same_files_at_fedora_paths() {
    let listing = run(
        "rpm",
        &[
            "-qp".as_ref(),
            "--qf".as_ref(),
            "[%{FILEMODES:perms} %{FILEFLAGS:fflags} %{FILENAMES}\n]".as_ref(),
            built().rpm.as_os_str(),
        ],
    );
    let mut files = BTreeMap::new();
    let mut flags = BTreeMap::new();
    for line in listing.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        assert_eq!(fields.len(), 3, "{line}");
        files.insert(fields[2].to_owned(), mode(fields[0]));
        flags.insert(fields[2].to_owned(), fields[1].to_owned());
    }
    let want: BTreeMap<String, u32> = expected().into_iter().map(|(_, r, m)| (r, m)).collect();
    assert_eq!(files, want, "rpm -qp:\n{listing}");
    let names: BTreeSet<String> = run("rpm", &["-qlp".as_ref(), built().rpm.as_os_str()])
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(names, want.keys().cloned().collect());
    // %config(noreplace): an edited configuration survives an upgrade.
    let config = &flags["/etc/watchqd/watchqd.toml"];
    assert!(config.contains('c') && config.contains('n'), "{config}");
    let requires = run("rpm", &["-qpR".as_ref(), built().rpm.as_os_str()]);
    for wanted in ["dbus", "polkit", "libc.so.6()(64bit)"] {
        assert!(
            requires.lines().any(|l| l.trim() == wanted),
            "Requires {wanted}: {requires}"
        );
    }
}

#[test]
fn the_rpm_scriptlets_are_fedoras_systemd_macros_for_every_unit() {
    let scripts = run(
        "rpm",
        &[
            "-qp".as_ref(),
            "--scripts".as_ref(),
            built().rpm.as_os_str(),
        ],
    );
    for wanted in [
        "postinstall scriptlet",
        "systemd-update-helper install-system-units",
        "preuninstall scriptlet",
        "systemd-update-helper remove-system-units",
        "postuninstall scriptlet",
        "systemd-update-helper mark-restart-system-units",
        "org.freedesktop.DBus.ReloadConfig",
    ] {
        assert!(scripts.contains(wanted), "{wanted}:\n{scripts}");
    }
    assert!(!scripts.contains('@'), "a placeholder left:\n{scripts}");
    for unit in units() {
        assert!(scripts.contains(&unit), "{unit}:\n{scripts}");
    }
}

fn man_source(page: &str) -> String {
    let path = built().root.join(page);
    run("gzip", &["-dc".as_ref(), path.as_os_str()])
}

/// The page rendered as plain text, after checking groff warns about nothing.
fn man_text(page: &str) -> String {
    let source = man_source(page);
    let groff = |args: &[&str]| {
        let mut child = Command::new("groff")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("groff (package groff-base)");
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), source.as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    };
    let checked = groff(&["-ww", "-z", "-man", "-Tutf8"]);
    assert!(
        checked.status.success() && checked.stderr.is_empty(),
        "{page}: {}",
        String::from_utf8_lossy(&checked.stderr)
    );
    let text = groff(&["-man", "-Tascii", "-P-cbou"]);
    String::from_utf8(text.stdout).unwrap()
}

#[test]
fn the_man_pages_render_and_document_the_real_options() {
    let daemon = man_text("usr/share/man/man8/watchqd.8.gz");
    for option in [
        "--config",
        "--check-config",
        "--log-level",
        "watchqd.toml(5)",
    ] {
        assert!(daemon.contains(option), "watchqd.8: {option}:\n{daemon}");
    }
    let ctl = man_text("usr/share/man/man1/watchqctl.1.gz");
    for wanted in [
        "monitor",
        "status",
        "devices",
        "--address",
        "--match",
        "--queue-depth",
        "--json",
        "--bus",
    ] {
        assert!(ctl.contains(wanted), "watchqctl.1: {wanted}:\n{ctl}");
    }
    let config = man_text("usr/share/man/man5/watchqd.toml.5.gz");
    assert!(config.contains("/etc/watchqd/watchqd.toml"), "{config}");
}

/// The configuration page is made from config/watchqd.toml: every key a TOML parser finds
/// there is on the page, under its table's heading.
#[test]
fn the_configuration_page_documents_every_key_of_the_installed_file() {
    let source = man_source("usr/share/man/man5/watchqd.toml.5.gz");
    let installed = std::fs::read_to_string(built().root.join("etc/watchqd/watchqd.toml")).unwrap();
    let table: toml::Table = installed.parse().unwrap();
    let mut keys = Vec::new();
    walk(&table, "", false, &mut keys);
    assert!(keys.len() > 5, "{keys:?}");
    for (heading, key) in &keys {
        let at = source
            .find(&format!(".SS \"{heading}\"\n"))
            .unwrap_or_else(|| panic!("no heading {heading}:\n{source}"));
        let rest = &source[at..];
        let end = rest[1..].find(".SS ").map_or(rest.len(), |i| i + 1);
        assert!(
            rest[..end].contains(&format!("\\fB{key}\\fR = ")),
            "{key} under {heading}:\n{source}"
        );
    }
}

/// (table heading as written, key) for every key that is not itself a table.
fn walk(table: &toml::Table, path: &str, array: bool, out: &mut Vec<(String, String)>) {
    let heading = if array {
        format!("[[{path}]]")
    } else {
        format!("[{path}]")
    };
    for (key, value) in table {
        let child = if path.is_empty() {
            key.clone()
        } else {
            format!("{path}.{key}")
        };
        match value {
            toml::Value::Table(t) => walk(t, &child, false, out),
            toml::Value::Array(items)
                if !items.is_empty() && items.iter().all(toml::Value::is_table) =>
            {
                for item in items {
                    if let Some(t) = item.as_table() {
                        walk(t, &child, true, out);
                    }
                }
            }
            _ => {
                assert!(!path.is_empty(), "a key outside any table: {key}");
                out.push((heading.clone(), key.clone()));
            }
        }
    }
}

/// What the completions must offer, from the clap definition `watchqctl` parses: its
/// subcommands (after `watchqctl `) and `monitor`'s long options (after
/// `watchqctl monitor --`).
fn what_watchqctl_parses() -> (BTreeSet<String>, BTreeSet<String>) {
    use clap::CommandFactory;
    let mut cli = watchqd::cli::ctl::Args::command();
    // Adds what clap generates (`help`, `--help`) and the global `--address` to each
    // subcommand, as the completion generators see them.
    cli.build();
    let subcommands: BTreeSet<String> = cli
        .get_subcommands()
        .map(|c| c.get_name().to_owned())
        .collect();
    let monitor = cli
        .find_subcommand("monitor")
        .expect("a monitor subcommand");
    let options: BTreeSet<String> = monitor
        .get_arguments()
        .filter_map(clap::Arg::get_long)
        .map(|long| format!("--{long}"))
        .collect();
    for wanted in ["monitor", "status", "devices", "help"] {
        assert!(subcommands.contains(wanted), "{wanted}: {subcommands:?}");
    }
    for wanted in [
        "--json",
        "--match",
        "--queue-depth",
        "--bus",
        "--address",
        "--help",
    ] {
        assert!(options.contains(wanted), "{wanted}: {options:?}");
    }
    (subcommands, options)
}

/// How long one shell may take to load a completion and complete one line.
const SHELL_TIMEOUT: &str = "60";

/// `SHELL OPTIONS -c SCRIPT SHELL ARGS…` (ARGS are the script's positional parameters),
/// killed after [`SHELL_TIMEOUT`] seconds, a failure; its stdout.
fn in_shell(shell: &str, options: &[&str], script: &str, args: &[&std::ffi::OsStr]) -> String {
    let mut argv: Vec<&std::ffi::OsStr> = vec![SHELL_TIMEOUT.as_ref(), shell.as_ref()];
    argv.extend(options.iter().map(std::ffi::OsStr::new));
    argv.extend([std::ffi::OsStr::new("-c"), script.as_ref(), shell.as_ref()]);
    argv.extend(args);
    run("timeout", &argv)
}

/// bash: the file sourced (as bash-completion loads it), then the function that
/// `complete -p watchqctl` names called as readline would call it for `words`, the last
/// one being completed.
fn bash_offers(words: &[&str]) -> BTreeSet<String> {
    const SCRIPT: &str = r#"
        source "$1" || exit 1
        spec=$(complete -p watchqctl) || exit 1
        [[ $spec == *" -F "* ]] || { echo "no completion function: $spec" >&2; exit 1; }
        func=${spec##* -F }
        func=${func%% *}
        COMP_WORDS=("${@:2}")
        COMP_CWORD=$((${#COMP_WORDS[@]} - 1))
        COMP_LINE="${COMP_WORDS[*]}"
        COMP_POINT=${#COMP_LINE}
        "$func" watchqctl "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD - 1]}"
        printf '%s\n' "${COMPREPLY[@]}"
    "#;
    let file = built()
        .root
        .join("usr/share/bash-completion/completions/watchqctl");
    let mut args = vec![file.as_os_str()];
    args.extend(words.iter().map(std::ffi::OsStr::new));
    in_shell("bash", &["--norc"], SCRIPT, &args)
        .lines()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect()
}

/// fish: the packaged directory first in `fish_complete_path`, so that fish autoloads
/// `watchqctl.fish` by name as it does from vendor_completions.d (only for a command on
/// `PATH`: the packaged `usr/bin` goes first there), then `complete -C LINE`, which prints
/// what pressing Tab after LINE offers, one `candidate<TAB>description` a line.
fn fish_offers(line: &str) -> BTreeSet<String> {
    let bin = built().root.join("usr/bin");
    let dir = built().root.join("usr/share/fish/vendor_completions.d");
    let out = in_shell(
        "fish",
        &["--no-config"],
        // $argv[1] is the name in_shell passes as bash and zsh take $0.
        "set -p PATH $argv[2]; set -p fish_complete_path $argv[3]; complete -C $argv[4]",
        &[bin.as_os_str(), dir.as_os_str(), line.as_ref()],
    );
    out.lines()
        .map(|l| l.split('\t').next().unwrap_or_default().to_owned())
        .collect()
}

/// zsh: an interactive zsh on a pseudo-terminal (zsh/zpty) with the packaged directory in
/// `fpath` and `compinit`, which registers `_watchqctl` from its `#compdef` line; LINE is
/// typed and Tab pressed. A `compadd` wrapper prints each match the completion adds (the
/// calls that only compute, with -O/-A/-D, pass through) and the shell exits after
/// completing, so a completion that never runs ends in the timeout, a failure.
fn zsh_offers(line: &str) -> BTreeSet<String> {
    const SCRIPT: &str = r#"
        zmodload zsh/zpty || exit 1
        export TERM=xterm
        zpty z zsh -f -i
        zpty -w z "PROMPT= RPROMPT= PS2=; fpath=(${(q)1} \$fpath); autoload -Uz compinit; compinit -u -D"
        # The marker is split so that the shell's echo of this line never contains it.
        zpty -w z 'compadd() { if [[ ${@[1,(i)(-|--)]} == *-(O|A|D)\ * ]]; then builtin compadd "$@"; return; fi; local -a hits; builtin compadd -A hits "$@"; print -rl -- "<ma""tch>"${^hits}; }'
        zpty -w z 'comppostfuncs=(exit); bindkey "^I" complete-word'
        zpty -w -n z "$2"$'\t'
        while zpty -r z out; do print -r -- "$out"; done
    "#;
    let dir = built().root.join("usr/share/zsh/vendor-completions");
    let out = in_shell("zsh", &["-f"], SCRIPT, &[dir.as_os_str(), line.as_ref()]);
    out.split(['\r', '\n'])
        .filter_map(|l| l.split_once("<match>"))
        // A match ends where the terminal's control sequences start.
        .map(|(_, m)| {
            m.split(|c: char| c.is_control())
                .next()
                .unwrap_or_default()
                .to_owned()
        })
        .collect()
}

#[test]
fn the_bash_completion_offers_the_real_subcommands_and_options() {
    let (subcommands, options) = what_watchqctl_parses();
    // At the first word bash offers the top-level options too.
    let first: BTreeSet<String> = bash_offers(&["watchqctl", ""])
        .into_iter()
        .filter(|w| !w.starts_with('-'))
        .collect();
    assert_eq!(first, subcommands);
    assert_eq!(bash_offers(&["watchqctl", "monitor", "--"]), options);
}

#[test]
fn the_zsh_completion_offers_the_real_subcommands_and_options() {
    let (subcommands, options) = what_watchqctl_parses();
    assert_eq!(zsh_offers("watchqctl "), subcommands);
    assert_eq!(zsh_offers("watchqctl monitor --"), options);
}

#[test]
fn the_fish_completion_offers_the_real_subcommands_and_options() {
    let (subcommands, options) = what_watchqctl_parses();
    assert_eq!(fish_offers("watchqctl "), subcommands);
    assert_eq!(fish_offers("watchqctl monitor --"), options);
}

#[test]
fn the_packaged_binaries_run() {
    let daemon = built().root.join("usr/libexec/watchqd");
    let version = run(daemon.to_str().unwrap(), &["--version"]);
    assert_eq!(
        version.trim(),
        format!("watchqd {}", env!("CARGO_PKG_VERSION"))
    );
    let ctl = built().root.join("usr/bin/watchqctl");
    let help = run(ctl.to_str().unwrap(), &["--help"]);
    assert!(help.contains("monitor"), "{help}");
}
