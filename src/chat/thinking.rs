//! Splitting a reply into thinking and answer as its tokens arrive, so thinking can be shown
//! dimmed (or hidden) while it streams and kept apart in the transcript.
//!
//! The markers are single tokens looked up in the vocabulary: Gemma 4's thinking channel
//! `<|channel>` … `<channel|>` and Qwen's `<think>` … `</think>`. A reply may start inside
//! thinking when the generation prompt already opened it (Qwen's `<|im_start|>assistant\n<think>\n`):
//! [`starts_in_thinking`] reads that from the rendered prompt.

use crate::loader::tokenizer::{StreamDecoder, TokenizerBundle};
use anyhow::Result;

/// Known (open, close) marker pairs.
const PAIRS: &[(&str, &str)] = &[("<|channel>", "<channel|>"), ("<think>", "</think>")];

/// The thinking markers this vocabulary has, as (open id, close id, open text, close text).
#[derive(Debug, Clone, Default)]
pub struct Markers {
    pairs: Vec<(u32, u32, &'static str, &'static str)>,
}

impl Markers {
    pub fn of(tok: &TokenizerBundle) -> Markers {
        let Ok(tokenizer) = tok.tokenizer() else {
            return Markers::default();
        };
        let pairs = PAIRS
            .iter()
            .filter_map(|&(o, c)| {
                Some((tokenizer.token_to_id(o)?, tokenizer.token_to_id(c)?, o, c))
            })
            .collect();
        Markers { pairs }
    }

    fn is_open(&self, id: u32) -> bool {
        self.pairs.iter().any(|p| p.0 == id)
    }

    fn is_close(&self, id: u32) -> bool {
        self.pairs.iter().any(|p| p.1 == id)
    }

    /// Whether a reply to `prompt` starts inside thinking: an opening marker comes after the
    /// last closing one.
    pub fn starts_in_thinking(&self, prompt: &str) -> bool {
        self.pairs
            .iter()
            .any(|&(_, _, o, c)| match prompt.rfind(o) {
                Some(open) => prompt.rfind(c).is_none_or(|close| close < open),
                None => false,
            })
    }
}

/// Which part of the reply a piece of text belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Thinking,
    Answer,
}

/// Streams a reply's text, tagged thinking or answer.
pub struct Splitter<'t> {
    tok: &'t TokenizerBundle,
    markers: Markers,
    thinking: bool,
    decoder: StreamDecoder<'t>,
    thinking_ids: Vec<u32>,
    answer_ids: Vec<u32>,
}

impl<'t> Splitter<'t> {
    pub fn new(tok: &'t TokenizerBundle, markers: Markers, starts_in_thinking: bool) -> Self {
        Splitter {
            tok,
            markers,
            thinking: starts_in_thinking,
            decoder: tok.stream_decoder(),
            thinking_ids: vec![],
            answer_ids: vec![],
        }
    }

    fn part(&self) -> Part {
        if self.thinking {
            Part::Thinking
        } else {
            Part::Answer
        }
    }

    /// Add one generated id (not a stop id); return the text it completes.
    pub fn push(&mut self, id: u32) -> Result<Vec<(Part, String)>> {
        let mut out = vec![];
        let open = self.markers.is_open(id);
        if open || self.markers.is_close(id) {
            if let Some(rest) = self.decoder.finish()? {
                out.push((self.part(), rest));
            }
            self.decoder = self.tok.stream_decoder();
            self.thinking = open;
            return Ok(out);
        }
        if self.thinking {
            self.thinking_ids.push(id);
        } else {
            self.answer_ids.push(id);
        }
        if let Some(piece) = self.decoder.push(id)? {
            out.push((self.part(), piece));
        }
        Ok(out)
    }

    /// Flush what is held back.
    pub fn finish(&mut self) -> Result<Vec<(Part, String)>> {
        Ok(self
            .decoder
            .finish()?
            .map(|t| (self.part(), t))
            .into_iter()
            .collect())
    }

    /// The answer and the thinking (without markers, and without Gemma's `thought` channel
    /// name), decoded in one piece for the transcript.
    pub fn texts(&self) -> Result<(String, Option<String>)> {
        let answer = self.tok.decode(&self.answer_ids, true)?;
        let thinking = self.tok.decode(&self.thinking_ids, true)?;
        let thinking = thinking
            .strip_prefix("thought\n")
            .unwrap_or(&thinking)
            .trim();
        Ok((answer, (!thinking.is_empty()).then(|| thinking.to_string())))
    }
}
