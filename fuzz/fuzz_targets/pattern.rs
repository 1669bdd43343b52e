//! Compiled `*`/`?` patterns (`watchqd::glob::Pattern`, wildmatch behind a length check
//! and an exact-string shortcut) against a plain dynamic-programming matcher of the same
//! semantics: `*` any run of characters, `?` one character, nothing escaped. Input: the
//! pattern, a NUL byte, the text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use watchqd::glob::Pattern;

/// `matched[j]`: the pattern so far matches the first `j` characters of the text.
fn reference(pattern: &str, text: &str) -> bool {
    let text: Vec<char> = text.chars().collect();
    let mut matched = vec![false; text.len() + 1];
    matched[0] = true;
    for p in pattern.chars() {
        let mut next = vec![false; text.len() + 1];
        if p == '*' {
            let mut any = false;
            for (j, slot) in next.iter_mut().enumerate() {
                any |= matched[j];
                *slot = any;
            }
        } else {
            for j in 1..=text.len() {
                next[j] = matched[j - 1] && (p == '?' || p == text[j - 1]);
            }
        }
        matched = next;
    }
    matched[text.len()]
}

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else {
        return;
    };
    let Some((pattern, text)) = input.split_once('\0') else {
        return;
    };
    if pattern.len() > 512 || text.len() > 512 {
        return;
    }
    let compiled = Pattern::new(pattern);
    assert_eq!(
        compiled.matches(text),
        reference(pattern, text),
        "{pattern:?} {text:?}"
    );
    if let Some(exact) = compiled.exact() {
        assert_eq!(exact, pattern);
    }
});
