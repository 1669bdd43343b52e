//! Writes what the packages ship but the repository does not keep: man pages and
//! watchqctl's shell completions. Run by `packaging/build`; not installed anywhere.
//!
//! ```sh
//! cargo run --example packaging-assets -- OUT_DIR [CONFIG_FILE]
//! ```
//!
//! Writes `OUT_DIR/man/{watchqd.8,watchqctl.1,watchqd.toml.5}` and
//! `OUT_DIR/completions/{watchqctl.bash,_watchqctl,watchqctl.fish}`.
//!
//! `watchqd.8` and `watchqctl.1` come from the clap definitions the binaries parse
//! (`watchqd::cli`), so an option cannot be added without appearing there.
//! `watchqd.toml.5` comes from the commented default configuration (`config/watchqd.toml`,
//! the file installed as `/etc/watchqd/watchqd.toml`): its comments are the documentation,
//! so the page cannot fall behind the file, and a new section needs nothing here.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::CommandFactory;
use clap_complete::Shell;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let Some(out) = args.get(1).map(PathBuf::from) else {
        eprintln!("usage: packaging-assets OUT_DIR [CONFIG_FILE]");
        return ExitCode::from(2);
    };
    let config = args.get(2).map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("config/watchqd.toml"),
        PathBuf::from,
    );
    match write_all(&out, &config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("packaging-assets: {e}");
            ExitCode::FAILURE
        }
    }
}

fn write_all(out: &Path, config: &Path) -> Result<(), String> {
    let man = out.join("man");
    let completions = out.join("completions");
    for dir in [&man, &completions] {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    write(&man.join("watchqd.8"), &daemon_page()?)?;
    write(&man.join("watchqctl.1"), &ctl_page()?)?;
    let text = std::fs::read_to_string(config).map_err(|e| format!("{}: {e}", config.display()))?;
    write(&man.join("watchqd.toml.5"), config_page(&text).as_bytes())?;
    for (shell, name) in [
        (Shell::Bash, "watchqctl.bash"),
        (Shell::Zsh, "_watchqctl"),
        (Shell::Fish, "watchqctl.fish"),
    ] {
        let mut buf = Vec::new();
        clap_complete::generate(
            shell,
            &mut watchqd::cli::ctl::Args::command(),
            "watchqctl",
            &mut buf,
        );
        write(&completions.join(name), &buf)?;
    }
    Ok(())
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), String> {
    std::fs::File::create(path)
        .and_then(|mut f| f.write_all(bytes))
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// The last section of both program pages.
const SEE_ALSO: &str = "watchqd(8), watchqctl(1), watchqd.toml(5)";

fn daemon_page() -> Result<Vec<u8>, String> {
    let cmd = watchqd::cli::daemon::Args::command();
    let man = clap_mangen::Man::new(cmd)
        .section("8")
        .manual("System Administration");
    let mut buf = Vec::new();
    man.render(&mut buf).map_err(|e| e.to_string())?;
    buf.extend_from_slice(
        roff_section(
            "FILES",
            "/etc/watchqd/watchqd.toml: the configuration, see watchqd.toml(5).\n\
             watchqd runs as the systemd unit watchqd.service and is started by D-Bus \
             activation of the name org.watchq1 on the system bus.\n\
             /usr/share/dbus-1/interfaces/org.watchq1.*.xml: the D-Bus interfaces it serves.",
        )
        .as_bytes(),
    );
    buf.extend_from_slice(roff_section("SEE ALSO", SEE_ALSO).as_bytes());
    Ok(buf)
}

/// `watchqctl.1`: the top-level page clap_mangen renders, then one section per
/// subcommand with its own synopsis and options, so that one page documents everything.
fn ctl_page() -> Result<Vec<u8>, String> {
    let cmd = watchqd::cli::ctl::Args::command();
    let mut buf = Vec::new();
    // Not `render()`: its SUBCOMMANDS section points at per-command pages we do not ship.
    let man = clap_mangen::Man::new(cmd.clone()).section("1");
    man.render_title(&mut buf).map_err(|e| e.to_string())?;
    man.render_name_section(&mut buf)
        .map_err(|e| e.to_string())?;
    man.render_synopsis_section(&mut buf)
        .map_err(|e| e.to_string())?;
    man.render_description_section(&mut buf)
        .map_err(|e| e.to_string())?;
    man.render_options_section(&mut buf)
        .map_err(|e| e.to_string())?;
    for sub in cmd.get_subcommands() {
        let name = format!("watchqctl {}", sub.get_name());
        let sub = sub.clone().bin_name(name.clone());
        let man = clap_mangen::Man::new(sub.clone());
        let mut part = Vec::new();
        man.render_synopsis_section(&mut part)
            .map_err(|e| e.to_string())?;
        if sub.get_arguments().any(|a| !a.is_hide_set()) {
            man.render_options_section(&mut part)
                .map_err(|e| e.to_string())?;
        }
        let part = String::from_utf8_lossy(&part);
        let mut text = format!(".SH \"{}\"\n", name.to_uppercase());
        if let Some(about) = sub.get_about() {
            let _ = writeln!(text, "{}", escape(&about.to_string()));
        }
        // The subcommand's own SYNOPSIS and OPTIONS become subsections of its section.
        for line in part.lines() {
            match line.strip_prefix(".SH ") {
                Some(title) => {
                    let _ = writeln!(text, ".SS {title}");
                }
                None => {
                    let _ = writeln!(text, "{line}");
                }
            }
        }
        buf.extend_from_slice(text.as_bytes());
    }
    buf.extend_from_slice(
        roff_section(
            "ENVIRONMENT",
            "DBUS_SYSTEM_BUS_ADDRESS: the system bus to use when --address is not given.",
        )
        .as_bytes(),
    );
    buf.extend_from_slice(roff_section("SEE ALSO", SEE_ALSO).as_bytes());
    Ok(buf)
}

fn roff_section(title: &str, text: &str) -> String {
    let mut out = format!(".SH \"{title}\"\n");
    for (i, paragraph) in text.split('\n').enumerate() {
        if i > 0 {
            out.push_str(".PP\n");
        }
        out.push_str(&escape(paragraph));
        out.push('\n');
    }
    out
}

/// Text safe on a roff line of its own.
fn escape(text: &str) -> String {
    let text = text.replace('\\', "\\e");
    if text.starts_with('.') || text.starts_with('\'') {
        format!("\\&{text}")
    } else {
        text
    }
}

/// One piece of the commented configuration file.
enum Item {
    /// `[name]` or `[[name]]`, as written.
    Section(String),
    /// A comment block (the `# ` removed) and the keys that follow it directly, each
    /// `(key, value as written)`. Either part may be empty.
    Group(Vec<String>, Vec<(String, String)>),
}

/// Splits the configuration into sections and commented key groups. Only the comment
/// layout is read here; the TOML itself is the daemon's business (and the test's).
fn parse_config(text: &str) -> (Vec<String>, Vec<Item>) {
    let mut header = Vec::new();
    let mut items = Vec::new();
    let mut comment: Vec<String> = Vec::new();
    let mut keys: Vec<(String, String)> = Vec::new();
    let mut seen_section = false;
    let mut lines = text.lines();
    let flush = |items: &mut Vec<Item>, comment: &mut Vec<String>, keys: &mut Vec<_>| {
        if !comment.is_empty() || !keys.is_empty() {
            items.push(Item::Group(std::mem::take(comment), std::mem::take(keys)));
        }
    };
    while let Some(raw) = lines.next() {
        let line = raw.trim();
        if let Some(rest) = line.strip_prefix('#') {
            if !keys.is_empty() {
                flush(&mut items, &mut comment, &mut keys);
            }
            let rest = rest.strip_prefix(' ').unwrap_or(rest);
            if seen_section {
                comment.push(rest.to_owned());
            } else {
                header.push(rest.to_owned());
            }
        } else if line.is_empty() {
            flush(&mut items, &mut comment, &mut keys);
        } else if line.starts_with('[') {
            flush(&mut items, &mut comment, &mut keys);
            seen_section = true;
            items.push(Item::Section(line.to_owned()));
        } else if let Some((key, value)) = line.split_once('=') {
            let mut value = value.trim().to_owned();
            // An array or inline table written over several lines.
            let depth = |v: &str| {
                v.chars().filter(|c| matches!(c, '[' | '{')).count()
                    > v.chars().filter(|c| matches!(c, ']' | '}')).count()
            };
            while depth(&value) {
                match lines.next() {
                    Some(more) => {
                        value.push(' ');
                        value.push_str(more.trim());
                    }
                    None => break,
                }
            }
            keys.push((key.trim().trim_matches('"').to_owned(), value));
        }
    }
    flush(&mut items, &mut comment, &mut keys);
    (header, items)
}

/// Whether a comment line is a TOML example rather than prose.
fn looks_like_toml(line: &str) -> bool {
    line.starts_with('[')
        || line.split_once(" = ").is_some_and(|(k, _)| {
            !k.is_empty()
                && k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        })
}

/// Comment lines as roff: prose paragraphs separated by empty comment lines, TOML
/// examples (a paragraph that starts with a table header or `key = value`) kept as
/// written, indented, in a no-fill block. `break_with` separates paragraphs.
fn render_comment(lines: &[String], break_with: &str) -> String {
    let mut out = String::new();
    let paragraphs: Vec<&[String]> = lines
        .split(|l| l.trim().is_empty())
        .filter(|p| !p.is_empty())
        .collect();
    for (i, paragraph) in paragraphs.iter().enumerate() {
        if i > 0 {
            out.push_str(break_with);
            out.push('\n');
        }
        if paragraph.first().is_some_and(|l| looks_like_toml(l)) {
            out.push_str(".RS 4\n.nf\n");
            for line in *paragraph {
                let _ = writeln!(out, "\\&{}", line.replace('\\', "\\e"));
            }
            out.push_str(".fi\n.RE\n");
        } else {
            for line in *paragraph {
                let _ = writeln!(out, "{}", escape(line));
            }
        }
    }
    out
}

/// `watchqd.toml.5` from the commented default configuration.
fn config_page(text: &str) -> String {
    let (header, items) = parse_config(text);
    let mut out = String::new();
    let _ = writeln!(
        out,
        ".TH WATCHQD.TOML 5 \"\" \"watchqd {}\" \"File Formats\"",
        env!("CARGO_PKG_VERSION")
    );
    out.push_str(".SH NAME\nwatchqd.toml \\- configuration of watchqd(8)\n");
    out.push_str(".SH SYNOPSIS\n/etc/watchqd/watchqd.toml\n");
    out.push_str(".SH DESCRIPTION\n");
    out.push_str(&render_comment(&header, ".PP"));
    out.push_str(
        ".PP\nThe sections below list every key with its default value, in the order of \
         the installed file, whose comments this page is made from.\n",
    );
    out.push_str(".SH KEYS\n");
    for item in &items {
        match item {
            Item::Section(name) => {
                let _ = writeln!(out, ".SS \"{}\"", name.replace('"', "\\(dq"));
            }
            Item::Group(comment, keys) if keys.is_empty() => {
                out.push_str(".PP\n");
                out.push_str(&render_comment(comment, ".PP"));
            }
            Item::Group(comment, keys) => {
                for (i, (key, value)) in keys.iter().enumerate() {
                    out.push_str(if i == 0 { ".TP\n" } else { ".TQ\n" });
                    let _ = writeln!(
                        out,
                        "\\fB{}\\fR = {}",
                        key.replace('\\', "\\e"),
                        value.replace('\\', "\\e")
                    );
                }
                if comment.is_empty() {
                    out.push_str("(no description)\n");
                } else {
                    out.push_str(&render_comment(comment, ".sp"));
                }
            }
        }
    }
    out.push_str(".SH FILES\n/etc/watchqd/watchqd.toml\n");
    out.push_str(".SH \"SEE ALSO\"\nwatchqd(8), watchqctl(1)\n");
    out
}
