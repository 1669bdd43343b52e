//! Shell-style `*` and `?` patterns, for the names callers put in watches and rules
//! (kernel names such as `loop*` or `sd?`, app ids, security labels): `*` matches any run
//! of characters, `?` any one character, everything else itself; nothing is escaped.
//!
//! A pattern is compiled once, when the watch is added or the configuration loaded, and
//! matched without allocating. The matching is the `wildmatch` crate's: runs of `*` are
//! collapsed when compiling, and a match is one pass with a single backtrack point,
//! O(pattern × text) characters at worst, never exponential. Two things here bound that
//! by the text alone:
//!
//! - a pattern without wildcards is kept as its text and compared for equality (and can
//!   be looked up in an index instead of being visited: [`Pattern::exact`]);
//! - a text shorter (in bytes) than the pattern's non-`*` characters cannot match and is
//!   refused in O(1). So any pattern that gets as far as matching has at most `t` non-`*`
//!   characters and, its stars collapsed, at most `t + 1` stars: every match costs
//!   O(t²) character steps for a text of `t` characters, whatever the pattern's length.
//!
//! Names in watches are limited to [`MAX_NAME_PATTERN`] bytes ([`Pattern::for_name`]).
//! A compiled wildcard pattern holds its characters as `char`s (4 bytes each, so at most
//! about 1 KiB for a name pattern); an exact one its text. `globset` was the other
//! candidate: it compiles every pattern to a regex (kilobytes each, and a user may hold
//! hundreds) and gives `[`, `{` and `\` meanings they do not have here.

use crate::error::Error;
use wildmatch::WildMatch;

/// The longest pattern a watch may give for a kernel name: a kernel name (a sysfs
/// directory entry) is at most 255 bytes, and longer patterns only cost time.
pub const MAX_NAME_PATTERN: usize = 255;

/// A compiled `*`/`?` pattern.
#[derive(Clone, PartialEq, Eq)]
pub struct Pattern(Compiled);

#[derive(Clone, PartialEq)]
enum Compiled {
    /// No wildcard: the text must be equal.
    Exact(Box<str>),
    Wild {
        /// The characters a matching text has at least (the non-`*` ones).
        min_chars: usize,
        matcher: WildMatch,
    },
}

// WildMatch is PartialEq only for its case-insensitive comparison's sake; two compiled
// patterns are equal exactly when their characters are.
impl Eq for Compiled {}

impl Pattern {
    /// Compiles `pattern` with no length limit (configuration, which only root writes).
    pub fn new(pattern: &str) -> Self {
        if !pattern.contains(['*', '?']) {
            return Pattern(Compiled::Exact(pattern.into()));
        }
        let matcher = WildMatch::new(pattern);
        let min_chars = matcher
            .pattern_chars()
            .iter()
            .filter(|c| **c != '*')
            .count();
        Pattern(Compiled::Wild { min_chars, matcher })
    }

    /// Compiles a caller's pattern for a kernel name (watch option `key`), refusing one
    /// longer than [`MAX_NAME_PATTERN`] bytes, as sent (before its stars are collapsed).
    pub fn for_name(key: &str, pattern: &str) -> Result<Self, Error> {
        if pattern.len() > MAX_NAME_PATTERN {
            return Err(Error::LimitExceeded(format!(
                "watch option '{key}' may be at most {MAX_NAME_PATTERN} bytes (a kernel name \
                 is at most {MAX_NAME_PATTERN}), got {}",
                pattern.len()
            )));
        }
        Ok(Self::new(pattern))
    }

    /// Whether `text` matches. Allocates nothing.
    pub fn matches(&self, text: &str) -> bool {
        match &self.0 {
            Compiled::Exact(exact) => **exact == *text,
            // A character is at least one byte: fewer bytes than required characters
            // cannot match, whatever the pattern's length.
            Compiled::Wild { min_chars, matcher } => {
                text.len() >= *min_chars && matcher.matches(text)
            }
        }
    }

    /// The one text this pattern matches, when it has no wildcard.
    pub fn exact(&self) -> Option<&str> {
        match &self.0 {
            Compiled::Exact(exact) => Some(exact),
            Compiled::Wild { .. } => None,
        }
    }
}

/// As the pattern reads after compiling (runs of `*` collapsed).
impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Compiled::Exact(exact) => f.write_str(exact),
            Compiled::Wild { matcher, .. } => matcher.fmt(f),
        }
    }
}

/// A quoted string, as the configuration and `--check-config` show it.
impl std::fmt::Debug for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&self.to_string(), f)
    }
}

impl From<&str> for Pattern {
    fn from(pattern: &str) -> Self {
        Pattern::new(pattern)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The matcher every pattern went through before patterns were compiled (kept here
    /// as the reference the compiled form must agree with).
    fn glob_match(pattern: &str, text: &str) -> bool {
        let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
        let (mut pi, mut ti) = (0, 0);
        let mut backtrack: Option<(usize, usize)> = None;
        while ti < t.len() {
            if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
                pi += 1;
                ti += 1;
            } else if pi < p.len() && p[pi] == '*' {
                backtrack = Some((pi, ti));
                pi += 1;
            } else if let Some((star, matched)) = backtrack {
                pi = star + 1;
                ti = matched + 1;
                backtrack = Some((star, matched + 1));
            } else {
                return false;
            }
        }
        p[pi..].iter().all(|c| *c == '*')
    }

    /// (pattern, text, matches) as the old matcher answered.
    const CASES: &[(&str, &str, bool)] = &[
        ("loop*", "loop0", true),
        ("loop*", "loop", true),
        ("loop*", "lo", false),
        ("sd?", "sda", true),
        ("sd?", "sda1", false),
        ("sd?", "sd", false),
        ("*", "", true),
        ("", "", true),
        ("", "a", false),
        ("?", "", false),
        ("a*b*c", "axxbyyc", true),
        ("a*b*c", "axxbyy", false),
        ("org.example.*", "org.example.App", true),
        ("org.example.*", "org.other.App", false),
        ("*_t:s?", "u:r:x_t:s0", true),
        ("*:confined_t:*", "system_u:system_r:confined_t:s0", true),
        ("loop0", "loop0", true),
        ("loop0", "loop01", false),
        ("***a", "a", true),
        ("a***", "abc", true),
        ("*a*a*a*b", "aaaaaaaaaa", false),
        ("*?*", "x", true),
        ("?*?", "x", false),
        ("1-1.?", "1-1.2", true),
        ("/dev/*", "/dev/sda", true),
        ("é?", "éé", true),
        ("?", "é", true),
        ("??", "é", false),
        ("*é", "aé", true),
        ("[ab]", "a", false),
        ("[ab]", "[ab]", true),
        ("\\*", "\\x", true),
    ];

    #[test]
    fn compiled_patterns_answer_as_the_old_matcher_did() {
        for &(pattern, text, expected) in CASES {
            assert_eq!(
                glob_match(pattern, text),
                expected,
                "old: {pattern:?} {text:?}"
            );
            assert_eq!(
                Pattern::new(pattern).matches(text),
                expected,
                "compiled: {pattern:?} {text:?}"
            );
        }
    }

    /// Every pattern of up to 5 characters over `a b * ?` against every text of up to 6
    /// over `a b é`: the compiled form and the old matcher never disagree.
    #[test]
    fn compiled_patterns_agree_with_the_old_matcher_exhaustively() {
        fn all(alphabet: &[char], max: usize) -> Vec<String> {
            let mut out = vec![String::new()];
            let mut last = vec![String::new()];
            for _ in 0..max {
                last = last
                    .iter()
                    .flat_map(|s| {
                        alphabet.iter().map(move |c| {
                            let mut s = s.clone();
                            s.push(*c);
                            s
                        })
                    })
                    .collect();
                out.extend(last.iter().cloned());
            }
            out
        }
        let texts = all(&['a', 'b', 'é'], 6);
        for pattern in all(&['a', 'b', '*', '?'], 5) {
            let compiled = Pattern::new(&pattern);
            for text in &texts {
                assert_eq!(
                    compiled.matches(text),
                    glob_match(&pattern, text),
                    "{pattern:?} {text:?}"
                );
            }
        }
    }

    #[test]
    fn runs_of_stars_are_collapsed_when_compiling() {
        let hostile = format!("{}a", "*".repeat(4000));
        let compiled = Pattern::new(&hostile);
        assert_eq!(compiled.to_string(), "*a");
        assert_eq!(compiled, Pattern::new("*a"));
        assert_eq!(Pattern::new("a**?***b").to_string(), "a*?*b");
        assert!(compiled.matches("loopa") && !compiled.matches("loop0"));
    }

    #[test]
    fn only_patterns_without_wildcards_are_exact() {
        assert_eq!(Pattern::new("loop0").exact(), Some("loop0"));
        assert_eq!(Pattern::new("loop?").exact(), None);
        assert_eq!(Pattern::new("loop*").exact(), None);
        assert_eq!(format!("{:?}", Pattern::new("org.*")), "\"org.*\"");
    }

    #[test]
    fn name_patterns_longer_than_a_kernel_name_are_refused() {
        let longest = "?".repeat(MAX_NAME_PATTERN);
        assert!(Pattern::for_name("name", &longest).is_ok());
        let hostile = format!("{}a", "*".repeat(4000));
        assert!(matches!(
            Pattern::for_name("name", &hostile),
            Err(Error::LimitExceeded(m)) if m.contains("'name'") && m.contains("255") && m.contains("4001")
        ));
    }

    /// A text too short for the pattern's characters is refused before any matching.
    #[test]
    fn texts_shorter_than_the_pattern_needs_never_match() {
        let long = format!("*{}*", "a?".repeat(100));
        let compiled = Pattern::new(&long);
        assert!(!compiled.matches("aaaa"));
        assert!(compiled.matches(&"a".repeat(200)));
    }
}
