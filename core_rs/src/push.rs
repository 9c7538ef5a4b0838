//! Pushed messages: whether a recomputed list is news to its subscriber, and its JSON text.
//!
//! The publisher recomputes a subscribed user's list when the user's own events changed the
//! model, and now and then for drift (other users' events moving item vectors). Which of
//! those lists go out is decided here, beside the computation, so that a list that is no
//! news costs no text and no Python objects:
//!
//! * [`Rule::Always`]: pushed whatever it holds;
//! * [`Rule::Changed`]: pushed when its items or their order differ from the last push;
//! * [`Rule::Drifted`]: pushed when its membership changed or an item moved more than a
//!   slack of places from where the last push showed it (item vectors move a little on
//!   every event, and a reshuffle of near-equal scores is not news).
//!
//! A message is `{head},"items":[entries],{tail}`: the head and tail are the subscription's
//! (user, variant) and the push's (version, cause), written by the caller; the entries are
//! `{"item", "score"}` objects (plus `"because"` and `"reason"` when explaining and
//! `"explore": true` on exploration slots), numbers as Python's `json.dumps` writes them.

use std::collections::HashMap;
use std::fmt::Write;

use crate::ids::ExtId;
use crate::model::Rec;

/// When a recomputed list is pushed (see the module).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    Always,
    Changed,
    Drifted { slack: usize },
}

impl Rule {
    /// Whether a list of the items `now` is pushed to a subscriber last shown `last` (None:
    /// nothing yet).
    pub fn pushes(self, last: Option<&[ExtId]>, now: &[&ExtId]) -> bool {
        let Some(last) = last else { return true };
        match self {
            Rule::Always => true,
            Rule::Changed => last.len() != now.len() || last.iter().zip(now).any(|(a, b)| a != *b),
            Rule::Drifted { slack } => drifted(last, now, slack),
        }
    }
}

/// Lists longer than this find an item's old rank through a map instead of a scan.
const SCAN_RANKS_MAX: usize = 32;

/// Whether `now` has other members than `last`, or an item more than `slack` places from
/// its rank in `last`.
fn drifted(last: &[ExtId], now: &[&ExtId], slack: usize) -> bool {
    if last.len() != now.len() {
        return true;
    }
    let moved = |rank: usize, before: Option<usize>| before.is_none_or(|b| b.abs_diff(rank) > slack);
    if last.len() <= SCAN_RANKS_MAX {
        return now.iter().enumerate().any(|(rank, &item)| moved(rank, last.iter().position(|x| x == item)));
    }
    let was: HashMap<&ExtId, usize> = last.iter().enumerate().map(|(rank, x)| (x, rank)).collect();
    now.iter().enumerate().any(|(rank, item)| moved(rank, was.get(item).copied()))
}

/// Appends the message `{head},"items":[entries],{tail}` to `out` (see the module).
pub fn message(out: &mut String, head: &str, recs: &[Rec], explain: bool, tail: &str) {
    out.push_str(head);
    out.push_str(",\"items\":");
    entries_json(out, recs, explain);
    out.push_str(tail);
}

/// Appends `recs` as a JSON array of entries (see the module).
pub fn entries_json(out: &mut String, recs: &[Rec], explain: bool) {
    out.push('[');
    for (n, r) in recs.iter().enumerate() {
        if n > 0 {
            out.push(',');
        }
        out.push_str("{\"item\":");
        json_id(out, &r.item);
        out.push_str(",\"score\":");
        json_f32(out, r.score);
        if explain {
            out.push_str(",\"because\":[");
            for (m, b) in r.because.iter().enumerate() {
                if m > 0 {
                    out.push(',');
                }
                json_id(out, b);
            }
            out.push_str("],\"reason\":");
            json_str(out, r.reason.as_str());
        }
        if r.explore {
            out.push_str(",\"explore\":true");
        }
        out.push('}');
    }
    out.push(']');
}

fn json_id(out: &mut String, id: &ExtId) {
    match id {
        ExtId::Int(i) => _ = write!(out, "{i}"),
        ExtId::Str(s) => json_str(out, s),
    }
}

/// The score widened to f64 and written as its shortest round-trip decimal, the number
/// Python's `json.dumps` gives for the same float; `null` when not finite.
fn json_f32(out: &mut String, x: f32) {
    if x.is_finite() {
        _ = write!(out, "{}", x as f64);
    } else {
        out.push_str("null");
    }
}

/// A JSON string literal (RFC 8259 §7): quote, backslash and control characters escaped.
fn json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => _ = write!(out, "\\u{:04x}", c as u32),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Reason;

    fn recs(items: &[i64]) -> Vec<Rec> {
        items
            .iter()
            .map(|&i| Rec {
                item: ExtId::Int(i),
                score: 0.5,
                because: Vec::new(),
                explore: false,
                reason: Reason::SimilarUsers,
            })
            .collect()
    }

    fn ids(items: &[i64]) -> Vec<ExtId> {
        items.iter().map(|&i| ExtId::Int(i)).collect()
    }

    /// Whether `rule` pushes the list `now` after `last`.
    fn pushes(rule: Rule, last: Option<&[i64]>, now: &[i64]) -> bool {
        let last = last.map(ids);
        let now = ids(now);
        rule.pushes(last.as_deref(), &now.iter().collect::<Vec<_>>())
    }

    #[test]
    fn a_first_list_is_always_news() {
        for rule in [Rule::Always, Rule::Changed, Rule::Drifted { slack: 2 }] {
            assert!(pushes(rule, None, &[1, 2]));
        }
    }

    #[test]
    fn changed_means_other_items_or_another_order() {
        let last = [1, 2, 3];
        assert!(!pushes(Rule::Changed, Some(&last[..]), &[1, 2, 3]));
        assert!(pushes(Rule::Changed, Some(&last[..]), &[1, 3, 2]));
        assert!(pushes(Rule::Changed, Some(&last[..]), &[1, 2]));
        assert!(pushes(Rule::Changed, Some(&last[..]), &[1, 2, 4]));
        assert!(pushes(Rule::Always, Some(&last[..]), &[1, 2, 3]));
    }

    #[test]
    fn drift_ignores_moves_within_the_slack() {
        let last = [1, 2, 3, 4, 5];
        let slack2 = Rule::Drifted { slack: 2 };
        assert!(!pushes(slack2, Some(&last[..]), &[1, 2, 3, 4, 5]));
        assert!(!pushes(slack2, Some(&last[..]), &[3, 1, 2, 4, 5]), "moved two places");
        assert!(pushes(slack2, Some(&last[..]), &[4, 1, 2, 3, 5]), "moved three places");
        assert!(pushes(slack2, Some(&last[..]), &[1, 2, 3, 4, 6]), "another member");
        assert!(pushes(slack2, Some(&last[..]), &[1, 2, 3, 4]), "shorter");
    }

    #[test]
    fn long_lists_find_ranks_the_same_way() {
        let n = 2 * SCAN_RANKS_MAX as i64;
        let last: Vec<i64> = (0..n).collect();
        let mut shifted: Vec<i64> = (0..n).collect();
        shifted.swap(0, 2);
        assert!(!pushes(Rule::Drifted { slack: 2 }, Some(&last[..]), &shifted));
        shifted.swap(0, 10);
        assert!(pushes(Rule::Drifted { slack: 2 }, Some(&last[..]), &shifted));
    }

    #[test]
    fn messages_are_head_entries_and_tail() {
        let mut out = String::new();
        let mut r = recs(&[7]);
        r.push(Rec {
            item: ExtId::Str("a\"b\n".into()),
            score: f32::NAN,
            because: Vec::new(),
            explore: true,
            reason: Reason::Exploration,
        });
        message(&mut out, "{\"user\":1", &r, false, ",\"version\":3,\"cause\":null}");
        assert_eq!(
            out,
            "{\"user\":1,\"items\":[{\"item\":7,\"score\":0.5},\
             {\"item\":\"a\\\"b\\n\",\"score\":null,\"explore\":true}],\"version\":3,\"cause\":null}"
        );
    }
}
