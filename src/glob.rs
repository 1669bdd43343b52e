//! Shell-style `*` and `?` matching, for the names callers put in watches and rules
//! (kernel names such as `loop*` or `sd?`, app ids, security labels).

/// Whether `text` matches `pattern`, where `*` matches any run of characters and `?`
/// any one character. Linear in practice: one backtrack point, as in the classic
/// wildcard algorithm, never exponential.
pub fn glob_match(pattern: &str, text: &str) -> bool {
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

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn matches_kernel_names_app_ids_and_labels() {
        assert!(glob_match("loop*", "loop0"));
        assert!(glob_match("sd?", "sda"));
        assert!(!glob_match("sd?", "sda1"));
        assert!(glob_match("*", ""));
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(!glob_match("a*b*c", "axxbyy"));
        assert!(glob_match("org.example.*", "org.example.App"));
        assert!(!glob_match("org.example.*", "org.other.App"));
        assert!(glob_match("*_t:s?", "u:r:x_t:s0"));
    }
}
