//! What a connection delivers, decided at hello from the token, the app's subscriptions and
//! the scopes the replica says it holds — kept apart from the stores and the socket so the
//! decision can be tested on its own (see `ferry_core::holding` for the device's side).
//!
//! * The **view** is what the token may read, narrowed by the subscriptions (`None`: the
//!   whole token). A subscription naming one scope the token may not read is refused with
//!   `forbidden`: asking for it is a mistake the app should hear about, not an empty sync.
//! * A replica whose view reaches beyond what it holds gets a **back-fill**: a snapshot of
//!   the view less the held scopes, after which the log continues from its cursor.
//! * A replica still catching up after a back-fill (its hello names `below`) gets no new
//!   back-fill on this connection: the view is narrowed to what it holds, and what it
//!   gained meanwhile is back-filled on its next connection. That keeps one `below` at a
//!   time, so the filter of a position never depends on more than two sets.

use crate::auth::Grants;
use crate::endpoint::Close;
use ferry_core::protocol::ErrorCode;
use ferry_core::scope::{HeldScopes, Pattern, ScopeSet};

/// Most subscriptions one hello may carry (the bound the device keeps to as well).
pub use ferry_core::MAX_SUBSCRIPTIONS;

/// The scopes a connection delivers: the token's grants, narrowed by the subscriptions.
pub fn view(grants: &Grants, subscriptions: Option<&[String]>) -> Result<ScopeSet, Close> {
    let read = grants.read_set();
    let Some(subs) = subscriptions else {
        return Ok(read);
    };
    if subs.len() > MAX_SUBSCRIPTIONS {
        return Err(Close::new(
            ErrorCode::TooLarge,
            format!(
                "hello carries {} subscriptions; at most {MAX_SUBSCRIPTIONS}",
                subs.len()
            ),
        ));
    }
    let mut patterns = Vec::with_capacity(subs.len());
    for s in subs {
        let p = Pattern::parse(s).map_err(|e| {
            Close::new(
                ErrorCode::BadFrame,
                format!(
                    "subscription `{}`: {e}",
                    s.chars().take(64).collect::<String>()
                ),
            )
        })?;
        if p.is_literal() && !grants.can_read(s) {
            return Err(Close::new(
                ErrorCode::Forbidden,
                format!(
                    "subscription to scope `{s}`, which this token ({}) may not read",
                    grants.sub
                ),
            ));
        }
        patterns.push(p);
    }
    Ok(read.and(&ScopeSet::any_of(patterns)))
}

/// Checks the bounds of the held scopes a hello names.
pub fn check_held(held: &HeldScopes) -> Result<(), Close> {
    let bad = |e: ferry_core::scope::PatternError| {
        use ferry_core::scope::PatternError as P;
        let code = match e {
            P::TooLong(_) | P::TooMany { .. } => ErrorCode::TooLarge,
            P::Empty | P::Placeholder(_) => ErrorCode::BadFrame,
        };
        Close::new(code, format!("hello's held scopes: {e}"))
    };
    held.scopes.check_bounds().map_err(bad)?;
    if let Some((_, below)) = &held.below {
        below.check_bounds().map_err(bad)?;
    }
    Ok(())
}

/// What one connection delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The scopes it delivers (announced in `Welcome.scopes`).
    pub view: ScopeSet,
    /// Positions up to `.0` are filtered by `.1` too.
    pub below: Option<(u64, ScopeSet)>,
    /// A back-fill of `view` less these (the scopes the replica holds).
    pub backfill: Option<ScopeSet>,
}

/// Decides the connection's view, back-fill and `below` filter (see the module docs).
/// A replica that takes no snapshots, names nothing it holds (an older client), or has
/// applied nothing (it gets a first snapshot or the whole log) is served the view as is.
pub fn plan(view: ScopeSet, cursor: u64, snapshots: bool, held: Option<HeldScopes>) -> Plan {
    let plain = |view| Plan {
        view,
        below: None,
        backfill: None,
    };
    let Some(held) = held.filter(|_| snapshots && cursor > 0) else {
        return plain(view);
    };
    match held.below {
        Some((at, before)) if cursor < at => Plan {
            view: view.and(&held.scopes),
            below: Some((at, before)),
            backfill: None,
        },
        _ if view.is_within(&held.scopes) => plain(view),
        _ => Plan {
            view,
            below: None,
            backfill: Some(held.scopes),
        },
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn grants(read: &[&str]) -> Grants {
        crate::auth::reading("u", read)
    }

    fn subs(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    /// Held scopes named in a hello are bounded: too many or too long is `too_large`, an
    /// empty pattern `bad_frame`.
    #[test]
    fn held_scopes_out_of_bounds_are_refused_with_a_code_naming_why() {
        let held = |all_of: Vec<Vec<Pattern>>, below: bool| HeldScopes {
            scopes: if below {
                ScopeSet::everything()
            } else {
                ScopeSet {
                    all_of: all_of.clone(),
                }
            },
            below: below.then_some((7, ScopeSet { all_of })),
        };
        let ok = vec![vec![Pattern::literal("list:1")]];
        assert!(check_held(&held(ok, false)).is_ok());
        let wide = vec![
            (0..300)
                .map(|i| Pattern::literal(&format!("s{i}")))
                .collect(),
        ];
        for below in [false, true] {
            let e = check_held(&held(wide.clone(), below)).unwrap_err();
            assert_eq!(e.code, ErrorCode::TooLarge, "{}", e.message);
        }
        let long = vec![vec![Pattern::literal(&"x".repeat(600))]];
        assert_eq!(
            check_held(&held(long, false)).unwrap_err().code,
            ErrorCode::TooLarge
        );
        let empty = vec![vec![Pattern::literal("")]];
        assert_eq!(
            check_held(&held(empty, true)).unwrap_err().code,
            ErrorCode::BadFrame
        );
    }

    #[test]
    fn subscriptions_narrow_the_token_and_unreadable_ones_are_refused() {
        let g = grants(&["list:*"]);
        let v = view(&g, Some(&subs(&["list:1"]))).unwrap();
        assert!(v.matches("list:1") && !v.matches("list:2"));
        let all = view(&g, None).unwrap();
        assert!(all.matches("list:2") && !all.matches("other"));
        let e = view(&g, Some(&subs(&["secret"]))).err().unwrap();
        assert_eq!(e.code, ErrorCode::Forbidden);
        // A pattern reaching beyond the token is narrowed by it, not refused.
        let v = view(&g, Some(&subs(&["*"]))).unwrap();
        assert!(v.matches("list:9") && !v.matches("secret"));
        let e = view(&g, Some(&subs(&["{sub}"]))).err().unwrap();
        assert_eq!(e.code, ErrorCode::BadFrame);
        let many: Vec<String> = (0..=MAX_SUBSCRIPTIONS)
            .map(|i| format!("list:{i}"))
            .collect();
        assert_eq!(
            view(&g, Some(&many)).err().unwrap().code,
            ErrorCode::TooLarge
        );
    }

    #[test]
    fn gained_scopes_are_back_filled_and_lost_ones_are_not() {
        let g = grants(&["a", "b"]);
        let held_a = HeldScopes {
            scopes: grants(&["a"]).read_set(),
            below: None,
        };
        let ab = view(&g, None).unwrap();
        let p = plan(ab.clone(), 10, true, Some(held_a.clone()));
        assert_eq!(p.backfill, Some(held_a.scopes.clone()));
        assert_eq!(p.view, ab);
        // Losing scopes needs no back-fill.
        let a = grants(&["a"]).read_set();
        let p = plan(
            a.clone(),
            10,
            true,
            Some(HeldScopes {
                scopes: ab.clone(),
                below: None,
            }),
        );
        assert_eq!(p.backfill, None);
        // An older client (nothing held named), a first sync, no snapshots: as is.
        assert_eq!(plan(ab.clone(), 10, true, None).backfill, None);
        assert_eq!(
            plan(ab.clone(), 0, true, Some(held_a.clone())).backfill,
            None
        );
        assert_eq!(
            plan(ab.clone(), 10, false, Some(held_a.clone())).backfill,
            None
        );
        // Still below a back-fill: narrowed to what is held, no second back-fill.
        let below = HeldScopes {
            scopes: a.clone(),
            below: Some((20, ScopeSet::any_of(Vec::new()))),
        };
        let p = plan(ab.clone(), 10, true, Some(below.clone()));
        assert_eq!(p.backfill, None);
        assert_eq!(p.view, ab.and(&a));
        assert!(p.below.is_some());
        // Past it, the gain is back-filled.
        let p = plan(ab, 20, true, Some(below));
        assert_eq!(p.backfill, Some(a));
        assert_eq!(p.below, None);
    }
}
