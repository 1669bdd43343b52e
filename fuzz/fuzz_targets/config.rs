//! The configuration as the daemon reads it at start: `Config::load` on a file, with the
//! `WATCHQD_<SECTION>__<KEY>` environment layer on top. Input: the file's bytes, a NUL,
//! then environment lines `NAME=VALUE` (each NAME gets the `WATCHQD_` prefix; names
//! and values are raw bytes, as an environment's are). Whatever the file and the
//! environment, the result is a valid configuration or an error that names where it
//! came from; never a panic.
#![no_main]

use std::ffi::OsStr;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use watchqd::config::{Config, ENV_PREFIX};

/// One file per fuzzing process, rewritten for every input.
fn file() -> &'static PathBuf {
    static FILE: OnceLock<PathBuf> = OnceLock::new();
    FILE.get_or_init(|| {
        std::env::temp_dir().join(format!("watchqd-fuzz-config-{}.toml", std::process::id()))
    })
}

fuzz_target!(|data: &[u8]| {
    let (text, environment) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    // The previous input's variables go first (read as bytes: they may not be UTF-8).
    for (name, _) in std::env::vars_os() {
        if name.as_bytes().starts_with(ENV_PREFIX.as_bytes()) {
            std::env::remove_var(name);
        }
    }
    for line in environment.split(|&b| b == b'\n') {
        let Some(at) = line.iter().position(|&b| b == b'=') else {
            continue;
        };
        let (name, value) = (&line[..at], &line[at + 1..]);
        if name.contains(&0) || value.contains(&0) {
            continue; // no environment can hold a NUL
        }
        let mut full = format!("{ENV_PREFIX}_").into_bytes();
        full.extend_from_slice(name);
        std::env::set_var(OsStr::from_bytes(&full), OsStr::from_bytes(value));
    }
    let path = file();
    let mut written = std::fs::File::create(path).expect("the fuzz config file");
    written
        .write_all(text)
        .expect("writing the fuzz config file");
    drop(written);
    match Config::load(Some(path)) {
        Ok(config) => {
            assert!(config.delivery.default_queue_depth <= config.delivery.max_queue_depth);
            assert!(config.delivery.default_queue_depth >= 1);
            // A rule has an instance exactly when its unit is a template.
            for rule in &config.units {
                assert_eq!(rule.unit.is_template(), rule.instance.is_some());
            }
        }
        Err(e) => {
            let origin = format!("{} (and {ENV_PREFIX}_* environment)", path.display());
            assert!(e.to_string().starts_with(&origin), "{e}");
        }
    }
});
