//! Scopes: the partition a row belongs to, which tokens grant read and write access to.
//!
//! A row's scope is the value of its table's scope column, as text: text values as they are,
//! integers in decimal, reals in Rust's shortest round-trip form, blobs in lowercase hex.
//! Rows of tables without a scope column, and rows whose scope column is NULL, are in the
//! global scope, named [`GLOBAL_SCOPE`]. The relay and the clients derive scopes with this one
//! function so that filtering and checksums agree.
//!
//! Which scopes a replica holds is a [`ScopeSet`]: the intersection of unions of
//! [`Pattern`]s (a token's read patterns, the app's subscriptions). The relay announces the
//! set each connection delivers, the replica keeps it ([`HeldScopes`]) and names it in its
//! next hello, so that a scope it gains is back-filled by a snapshot and rows of a scope it
//! lost are evicted. Both sides match scopes with this one type so they agree on every row.

use crate::value::Value;
use serde::{Deserialize, Serialize};

/// The scope of tables without a scope column (and of rows whose scope value is NULL).
pub const GLOBAL_SCOPE: &str = "global";

/// The scope named by a scope column value.
pub fn scope_name(v: &Value) -> String {
    match v {
        Value::Null => GLOBAL_SCOPE.to_owned(),
        Value::Integer(i) => i.to_string(),
        Value::Real(f) => f.to_string(),
        Value::Text(s) => s.clone(),
        Value::Blob(b) => b.iter().map(|x| format!("{x:02x}")).collect(),
    }
}

/// Why a scope pattern was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    /// The pattern is empty.
    #[error("empty scope pattern")]
    Empty,
    /// The pattern has a `{...}` placeholder other than `{sub}` (or `{sub}` where none is
    /// substituted).
    #[error("scope pattern `{0}` has a placeholder other than {{sub}}")]
    Placeholder(String),
    /// The pattern is longer than [`MAX_PATTERN_BYTES`].
    #[error("scope pattern of {0} bytes is longer than {MAX_PATTERN_BYTES}")]
    TooLong(usize),
    /// A scope set has more parts than [`MAX_SET_PARTS`] or a part more patterns than
    /// [`MAX_SET_PATTERNS`].
    #[error(
        "scope set of {parts} parts and up to {patterns} patterns in one; at most {MAX_SET_PARTS} and {MAX_SET_PATTERNS}"
    )]
    TooMany {
        /// Parts (intersected unions).
        parts: usize,
        /// Patterns in the largest part.
        patterns: usize,
    },
}

/// Longest scope pattern accepted from a device (subscriptions, held scopes).
pub const MAX_PATTERN_BYTES: usize = 512;

/// Longest scope a row may be written into (its scope column's text): the relay refuses
/// longer ones (`invalid_change_set`). Scopes are matched against every reader's patterns.
pub const MAX_SCOPE_BYTES: usize = 512;

/// One segment of a compiled pattern.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Seg {
    /// Literal text.
    Lit(String),
    /// Any text, including none.
    Star,
}

/// A compiled scope pattern: literal text with `*` matching any text (`list:*`, `*`,
/// `user:alice`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Pattern(Vec<Seg>);

impl Pattern {
    /// Compiles `text`, substituting `{sub}` with `sub` literally (a token's patterns).
    pub fn compile(text: &str, sub: &str) -> Result<Pattern, PatternError> {
        Self::build(text, Some(sub))
    }

    /// Compiles `text`, which has no placeholder (an app's subscription).
    pub fn parse(text: &str) -> Result<Pattern, PatternError> {
        if text.len() > MAX_PATTERN_BYTES {
            return Err(PatternError::TooLong(text.len()));
        }
        Self::build(text, None)
    }

    fn build(text: &str, sub: Option<&str>) -> Result<Pattern, PatternError> {
        if text.is_empty() {
            return Err(PatternError::Empty);
        }
        let mut segs = Vec::new();
        let mut lit = String::new();
        let mut rest = text;
        while let Some(c) = rest.chars().next() {
            if let (Some(after), Some(sub)) = (rest.strip_prefix("{sub}"), sub) {
                lit.push_str(sub);
                rest = after;
                continue;
            }
            if c == '{' || c == '}' {
                return Err(PatternError::Placeholder(text.to_owned()));
            }
            if c == '*' {
                if !lit.is_empty() {
                    segs.push(Seg::Lit(std::mem::take(&mut lit)));
                }
                if segs.last() != Some(&Seg::Star) {
                    segs.push(Seg::Star);
                }
            } else {
                lit.push(c);
            }
            rest = &rest[c.len_utf8()..];
        }
        if !lit.is_empty() {
            segs.push(Seg::Lit(lit));
        }
        Ok(Pattern(segs))
    }

    /// The pattern naming exactly `scope`.
    pub fn literal(scope: &str) -> Pattern {
        Pattern(vec![Seg::Lit(scope.to_owned())])
    }

    /// The literal text every matching scope starts with (empty when the pattern starts
    /// with `*`).
    pub fn prefix(&self) -> &str {
        match self.0.first() {
            Some(Seg::Lit(l)) => l,
            _ => "",
        }
    }

    /// True when the pattern has no `*` (it names one scope).
    pub fn is_literal(&self) -> bool {
        !self.0.contains(&Seg::Star)
    }

    /// True when the pattern matches every scope (`*`).
    pub fn is_universal(&self) -> bool {
        self.0 == [Seg::Star]
    }

    /// Encoded length (bounds what a device may send).
    fn text_len(&self) -> usize {
        self.0
            .iter()
            .map(|s| match s {
                Seg::Lit(l) => l.len(),
                Seg::Star => 1,
            })
            .sum()
    }

    /// True when `scope` matches.
    ///
    /// Linear in the scope's length: the literals before the first `*` are a prefix, those
    /// after the last a suffix, and each literal between two stars is taken at its leftmost
    /// match (any later match leaves less for the rest, so it can only fail where the leftmost
    /// succeeds). A backtracking matcher spent 21.6 s of relay CPU on one 80 KB scope against
    /// patterns like `list:*:z*:q`.
    pub fn matches(&self, scope: &str) -> bool {
        let segs = &self.0;
        let mut s = scope;
        let (mut i, mut j) = (0, segs.len());
        while let Some(Seg::Lit(l)) = segs.get(i).filter(|_| i < j) {
            let Some(t) = s.strip_prefix(l.as_str()) else {
                return false;
            };
            s = t;
            i += 1;
        }
        if i == j {
            return s.is_empty();
        }
        while let Some(Seg::Lit(l)) = segs.get(j - 1).filter(|_| j > i) {
            let Some(t) = s.strip_suffix(l.as_str()) else {
                return false;
            };
            s = t;
            j -= 1;
        }
        for seg in &segs[i..j] {
            if let Seg::Lit(l) = seg {
                let Some(k) = s.find(l.as_str()) else {
                    return false;
                };
                s = &s[k + l.len()..];
            }
        }
        true
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for s in &self.0 {
            match s {
                Seg::Lit(l) => f.write_str(l)?,
                Seg::Star => f.write_str("*")?,
            }
        }
        Ok(())
    }
}

/// Most unions one [`ScopeSet`] intersects, and most patterns per union, accepted from a
/// device.
pub const MAX_SET_PARTS: usize = 8;
/// Most patterns in one union of a [`ScopeSet`] accepted from a device.
pub const MAX_SET_PATTERNS: usize = 256;

/// A set of scopes: the intersection of unions of patterns (`all_of: [[a, b], [c]]` is
/// "(a or b) and c"). No unions at all is every scope.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ScopeSet {
    /// The unions intersected.
    pub all_of: Vec<Vec<Pattern>>,
}

impl ScopeSet {
    /// Every scope.
    pub fn everything() -> ScopeSet {
        ScopeSet { all_of: Vec::new() }
    }

    /// The scopes matching any of `patterns` (none: no scope).
    pub fn any_of(patterns: Vec<Pattern>) -> ScopeSet {
        ScopeSet {
            all_of: vec![patterns],
        }
    }

    /// The scopes in both sets.
    pub fn and(&self, other: &ScopeSet) -> ScopeSet {
        let mut all_of = self.all_of.clone();
        for part in &other.all_of {
            if !all_of.contains(part) {
                all_of.push(part.clone());
            }
        }
        ScopeSet { all_of }
    }

    /// True when `scope` is in the set.
    pub fn matches(&self, scope: &str) -> bool {
        self.all_of
            .iter()
            .all(|union| union.iter().any(|p| p.matches(scope)))
    }

    /// True when every scope of `self` is certainly in `other`, judged from the patterns
    /// (each union of `other` contains, pattern for pattern, a union of `self`, or matches
    /// everything). A `false` may be wrong (the sets may still be nested); callers treat it
    /// as "maybe not", which costs a back-fill that finds nothing new, never a missed row.
    pub fn is_within(&self, other: &ScopeSet) -> bool {
        other.all_of.iter().all(|theirs| {
            theirs.iter().any(Pattern::is_universal)
                || self
                    .all_of
                    .iter()
                    .any(|ours| ours.iter().all(|p| theirs.contains(p)))
        })
    }

    /// Literal prefixes covering every scope of the set, shortest covering list, or `None`
    /// when some scope may start with anything. Any one union's prefixes cover the
    /// intersection; the union with the fewest is taken, of those the most specific.
    pub fn prefixes(&self) -> Option<Vec<String>> {
        self.all_of
            .iter()
            .filter_map(|union| union_prefixes(union))
            .min_by_key(|p| {
                let chars: usize = p.iter().map(String::len).sum();
                (p.len(), std::cmp::Reverse(chars))
            })
    }

    /// Checks the bounds a device's set must keep (the relay decodes it from a hello).
    pub fn check_bounds(&self) -> Result<(), PatternError> {
        if self.all_of.len() > MAX_SET_PARTS
            || self.all_of.iter().any(|u| u.len() > MAX_SET_PATTERNS)
        {
            return Err(PatternError::TooMany {
                parts: self.all_of.len(),
                patterns: self.all_of.iter().map(Vec::len).max().unwrap_or(0),
            });
        }
        for p in self.all_of.iter().flatten() {
            let n = p.text_len();
            if n > MAX_PATTERN_BYTES || n == 0 {
                return Err(if n == 0 {
                    PatternError::Empty
                } else {
                    PatternError::TooLong(n)
                });
            }
        }
        Ok(())
    }
}

impl std::fmt::Display for ScopeSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.all_of.is_empty() {
            return f.write_str("every scope");
        }
        for (i, union) in self.all_of.iter().enumerate() {
            if i > 0 {
                f.write_str(" and ")?;
            }
            f.write_str("(")?;
            for (j, p) in union.iter().enumerate() {
                if j > 0 {
                    f.write_str(" or ")?;
                }
                write!(f, "{p}")?;
            }
            f.write_str(")")?;
        }
        Ok(())
    }
}

/// The literal prefixes of one union of patterns, shortest covering list; `None` when one
/// starts with `*`.
fn union_prefixes(union: &[Pattern]) -> Option<Vec<String>> {
    let mut all: Vec<&str> = Vec::with_capacity(union.len());
    for p in union {
        if p.prefix().is_empty() {
            return None;
        }
        all.push(p.prefix());
    }
    all.sort_unstable();
    let mut out: Vec<String> = Vec::new();
    for p in all {
        // A prefix that extends a kept one names no scope the kept one does not.
        if !out.last().is_some_and(|k| p.starts_with(k.as_str())) {
            out.push(p.to_owned());
        }
    }
    Some(out)
}

/// What a replica holds, as it tells the relay in its hello.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HeldScopes {
    /// The scopes whose rows the replica holds, complete up to its cursor (the set the
    /// relay last announced, once its back-fill, if any, was applied).
    pub scopes: ScopeSet,
    /// After a back-fill: the replica's cursor is still below the position the back-fill
    /// was read at (`at`), and for positions up to there it holds only `scopes` (the set it
    /// held before). The relay filters those positions by both, so that rows the back-fill
    /// brought are not sent again, and scope moves into the new scopes come with history.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub below: Option<(u64, ScopeSet)>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn set(parts: &[&[&str]]) -> ScopeSet {
        ScopeSet {
            all_of: parts
                .iter()
                .map(|u| u.iter().map(|p| Pattern::parse(p).unwrap()).collect())
                .collect(),
        }
    }

    /// A set from a device is bounded in parts, patterns per part and bytes per pattern,
    /// each refusal naming which.
    #[test]
    fn bounds_name_what_was_too_large() {
        assert_eq!(set(&[&["a", "b:*"], &["*"]]).check_bounds(), Ok(()));
        let wide: Vec<String> = (0..=MAX_SET_PATTERNS).map(|i| format!("s{i}")).collect();
        let wide: Vec<&str> = wide.iter().map(String::as_str).collect();
        assert_eq!(
            set(&[&wide]).check_bounds(),
            Err(PatternError::TooMany {
                parts: 1,
                patterns: MAX_SET_PATTERNS + 1
            })
        );
        let deep = vec![&["a"][..]; MAX_SET_PARTS + 1];
        assert!(matches!(
            set(&deep).check_bounds(),
            Err(PatternError::TooMany { parts, .. }) if parts == MAX_SET_PARTS + 1
        ));
        // Parsing refuses it too; a set decoded from a hello is checked here.
        let long = ScopeSet {
            all_of: vec![vec![Pattern::literal(&"x".repeat(MAX_PATTERN_BYTES + 1))]],
        };
        assert_eq!(
            long.check_bounds(),
            Err(PatternError::TooLong(MAX_PATTERN_BYTES + 1))
        );
    }

    #[test]
    fn patterns() {
        let p = Pattern::compile("a*b*c", "s").unwrap();
        assert!(p.matches("abc") && p.matches("aXbYc") && !p.matches("acb"));
        assert!(Pattern::compile("{user}", "s").is_err());
        assert!(Pattern::parse("{sub}").is_err());
        assert!(Pattern::parse("").is_err());
        assert_eq!(
            Pattern::compile("user:{sub}:*", "a*").unwrap().to_string(),
            "user:a*:*"
        );
        assert!(Pattern::compile("user:{sub}", "a*").unwrap().is_literal());
    }

    #[test]
    fn sets_intersect_and_nest() {
        let grants = set(&[&["list:*", "global"]]);
        let subs = set(&[&["list:1", "list:2"]]);
        let view = grants.and(&subs);
        assert!(view.matches("list:1") && !view.matches("list:3") && !view.matches("global"));
        assert!(view.is_within(&grants) && view.is_within(&subs));
        assert!(!grants.is_within(&view));
        assert!(set(&[&["a"]]).is_within(&set(&[&["*"]])));
        assert!(set(&[&["a"]]).is_within(&ScopeSet::everything()));
        assert!(!ScopeSet::everything().is_within(&set(&[&["a"]])));
        assert_eq!(
            view.prefixes(),
            Some(vec!["list:1".to_owned(), "list:2".to_owned()])
        );
        assert_eq!(set(&[&["*"]]).prefixes(), None);
        assert!(ScopeSet::everything().matches("anything"));
        assert!(!ScopeSet::any_of(Vec::new()).matches("x"));
    }

    #[test]
    fn names() {
        assert_eq!(scope_name(&Value::Text("list:1".into())), "list:1");
        assert_eq!(scope_name(&Value::Integer(-4)), "-4");
        assert_eq!(scope_name(&Value::Blob(vec![0, 255])), "00ff");
        assert_eq!(scope_name(&Value::Null), GLOBAL_SCOPE);
    }

    /// The linear matcher agrees with the definition (a backtracking search over every split)
    /// on random patterns and scopes over a small alphabet, where stars and literals overlap
    /// most; and an 80 KB scope against star-heavy patterns finishes at once (the backtracking
    /// matcher took seconds).
    #[test]
    fn matching_agrees_with_backtracking_and_is_linear() {
        fn reference(segs: &[Seg], s: &str) -> bool {
            match segs.split_first() {
                None => s.is_empty(),
                Some((Seg::Lit(l), rest)) => s
                    .strip_prefix(l.as_str())
                    .is_some_and(|t| reference(rest, t)),
                Some((Seg::Star, rest)) => (0..=s.len())
                    .filter(|i| s.is_char_boundary(*i))
                    .any(|i| reference(rest, &s[i..])),
            }
        }
        use rand::{RngExt, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let alphabet = ['a', 'b', ':', '*'];
        for _ in 0..20_000 {
            let plen = rng.random_range(1..8);
            let pat: String = (0..plen)
                .map(|_| alphabet[rng.random_range(0..4)])
                .collect();
            let Ok(p) = Pattern::parse(&pat) else {
                continue;
            };
            let slen = rng.random_range(0..10);
            let s: String = (0..slen)
                .map(|_| alphabet[rng.random_range(0..3)])
                .collect();
            assert_eq!(p.matches(&s), reference(&p.0, &s), "`{pat}` on `{s}`");
        }
        let big = format!("list:{}", "z:".repeat(40_000));
        for pat in ["list:*:z*:q", "*z*z*z*z*z*z*q", "l*:*:*:*:*:*x"] {
            assert!(!Pattern::parse(pat).unwrap().matches(&big), "{pat}");
        }
        assert!(Pattern::parse("list:*:z*:").unwrap().matches(&big));
    }
}
