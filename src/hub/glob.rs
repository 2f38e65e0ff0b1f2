//! Glob patterns as the `datasets` library uses them in `data_files`: `*` and `?` stay within a
//! path segment, `**` spans segments, `[abc]` / `[!abc]` / `[a-z]` are character classes.
//!
//! ```
//! use dpo::hub::glob::matches;
//! assert!(matches("data/train-*", "data/train-00000-of-00001.parquet"));
//! assert!(matches("**/*.jsonl", "a/b/c.jsonl"));
//! assert!(!matches("*.jsonl", "a/c.jsonl"));
//! ```

/// Whether `path` (with `/` separators) matches `pattern` in full.
pub fn matches(pattern: &str, path: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let s: Vec<char> = path.chars().collect();
    go(&p, &s)
}

fn go(p: &[char], s: &[char]) -> bool {
    match p.first() {
        None => s.is_empty(),
        Some('*') if p.get(1) == Some(&'*') => {
            // `**/` also matches zero segments.
            let rest = &p[2..];
            if rest.first() == Some(&'/') && go(&rest[1..], s) {
                return true;
            }
            (0..=s.len()).any(|i| go(rest, &s[i..]))
        }
        Some('*') => {
            let rest = &p[1..];
            for i in 0..=s.len() {
                if go(rest, &s[i..]) {
                    return true;
                }
                if i < s.len() && s[i] == '/' {
                    break;
                }
            }
            false
        }
        Some('?') => !s.is_empty() && s[0] != '/' && go(&p[1..], &s[1..]),
        Some('[') => match class(p) {
            Some((accepts, len)) => !s.is_empty() && s[0] != '/' && accepts(s[0]) && go(&p[len..], &s[1..]),
            None => !s.is_empty() && s[0] == '[' && go(&p[1..], &s[1..]),
        },
        Some(&c) => !s.is_empty() && s[0] == c && go(&p[1..], &s[1..]),
    }
}

/// Parses `[...]` at the start of `p`: a predicate and the pattern length it used.
fn class(p: &[char]) -> Option<(impl Fn(char) -> bool, usize)> {
    let end = p.iter().skip(2).position(|&c| c == ']')? + 2;
    let body: Vec<char> = p[1..end].to_vec();
    let (negate, body) = match body.first() {
        Some('!') | Some('^') => (true, body[1..].to_vec()),
        _ => (false, body),
    };
    let pred = move |c: char| {
        let mut hit = false;
        let mut i = 0;
        while i < body.len() {
            if i + 2 < body.len() && body[i + 1] == '-' {
                hit |= body[i] <= c && c <= body[i + 2];
                i += 3;
            } else {
                hit |= body[i] == c;
                i += 1;
            }
        }
        hit != negate
    };
    Some((pred, end + 1))
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn globs() {
        assert!(matches("data/train-*", "data/train-00000-of-00001.parquet"));
        assert!(matches("**", "a/b"));
        assert!(matches("**/train[-._ 0-9]*", "train-0.jsonl"));
        assert!(matches("**/train[-._ 0-9]*", "x/train.jsonl"));
        assert!(matches("**/train[-._ 0-9]*", "x/train_prefs.jsonl"));
        assert!(!matches("**/train[-._ 0-9]*", "x/trainer.jsonl"));
        assert!(matches("data/train_prefs-*", "data/train_prefs-00000-of-00001.parquet"));
        assert!(!matches("data/*.parquet", "data/sub/x.parquet"));
    }
}
