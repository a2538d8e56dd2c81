//! Prompt-lookup drafting (`--draft ngram`): propose the continuation of the latest earlier
//! occurrence of the sequence's last tokens. No model runs; it pays off where the output copies
//! its context (code edits, quoting, repeated structure). Tried with the last
//! [`MAX_NGRAM`] tokens first, then fewer, so the longest match wins.

use super::speculative::Drafter;
use anyhow::Result;

/// The longest suffix looked up.
pub const MAX_NGRAM: usize = 3;

/// The prompt-lookup drafter; it keeps nothing between steps.
#[derive(Debug, Default)]
pub struct NgramDrafter;

/// Up to `n` tokens that followed the latest earlier occurrence of `history`'s last `m` tokens,
/// for the largest `m ≤ MAX_NGRAM` that occurs earlier with something after it.
pub fn lookup(history: &[u32], n: usize) -> Vec<u32> {
    let len = history.len();
    for m in (1..=MAX_NGRAM.min(len.saturating_sub(1))).rev() {
        let tail = &history[len - m..];
        // Starts of earlier occurrences, latest first; the tail itself is not one.
        if let Some(start) = (0..len - m).rev().find(|&s| &history[s..s + m] == tail) {
            let from = start + m;
            return history[from..(from + n).min(len)].to_vec();
        }
    }
    vec![]
}

impl Drafter for NgramDrafter {
    fn name(&self) -> String {
        "ngram".into()
    }

    fn draft(&mut self, ctx: super::speculative::DraftContext, n: usize) -> Result<Vec<u32>> {
        Ok(lookup(ctx.history, n))
    }
}

#[cfg(test)]
mod tests {
    use super::lookup;

    #[test]
    fn the_longest_latest_match_gives_its_continuation() {
        // "1 2 3" occurred at 0 and 5; the latest is followed by 9 8.
        let h = [1, 2, 3, 4, 7, 1, 2, 3, 9, 8, 5, 1, 2, 3];
        assert_eq!(lookup(&h, 2), [9, 8]);
        assert_eq!(lookup(&h, 9), [9, 8, 5, 1, 2, 3]);
        // Only the last token matches: a 1-gram.
        assert_eq!(lookup(&[5, 6, 7, 6], 3), [7, 6]);
        // A 3-gram beats a later 1-gram match.
        assert_eq!(lookup(&[1, 2, 3, 4, 9, 3, 0, 1, 2, 3], 1), [4]);
        assert!(lookup(&[1, 2, 3], 4).is_empty());
        assert!(lookup(&[], 4).is_empty());
        assert!(lookup(&[7], 4).is_empty());
    }
}
