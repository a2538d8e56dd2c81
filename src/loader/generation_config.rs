//! `generation_config.json`: the model author's sampling defaults and stop ids.
//!
//! Notable: `eos_token_id` is an int or a list; every field is optional (and `null` counts as
//! absent); a value of the wrong type or out of range is an error naming the file and key,
//! while keys we do not use are ignored (the file carries many that do not concern us).
//! transformers samples only when `do_sample` is true: [`GenerationDefaults::greedy`] says so.

use anyhow::{anyhow, bail, Result};
use serde::Deserialize;
use std::path::Path;

/// The defaults a model ships with. `None`: the file does not say.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationDefaults {
    pub do_sample: Option<bool>,
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub max_new_tokens: Option<usize>,
    pub max_length: Option<usize>,
    pub bos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
    /// Empty when the file names none.
    pub eos_token_ids: Vec<u32>,
}

/// An id or a list of ids, as HF configs write `eos_token_id`.
#[derive(Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<u32> {
        match self {
            OneOrMany::One(x) => vec![x],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Deserialize)]
struct Raw {
    do_sample: Option<bool>,
    temperature: Option<f32>,
    top_k: Option<usize>,
    top_p: Option<f32>,
    min_p: Option<f32>,
    repetition_penalty: Option<f32>,
    max_new_tokens: Option<usize>,
    max_length: Option<usize>,
    bos_token_id: Option<u32>,
    pad_token_id: Option<u32>,
    eos_token_id: Option<OneOrMany>,
}

impl GenerationDefaults {
    /// Read `generation_config.json`.
    pub fn read(path: &Path) -> Result<GenerationDefaults> {
        let raw = super::read_json(path)?;
        Self::from_json(&raw).map_err(|e| anyhow!("{}: {e}", path.display()))
    }

    /// Parse the JSON of a `generation_config.json`.
    pub fn from_json(raw: &serde_json::Value) -> Result<GenerationDefaults> {
        let r: Raw = serde_path_to_error::deserialize(raw).map_err(|e| {
            let key = e.path().to_string();
            anyhow!("key `{key}`: {}", e.into_inner())
        })?;
        let g = GenerationDefaults {
            do_sample: r.do_sample,
            temperature: r.temperature,
            top_k: r.top_k,
            top_p: r.top_p,
            min_p: r.min_p,
            repetition_penalty: r.repetition_penalty,
            max_new_tokens: r.max_new_tokens,
            max_length: r.max_length,
            bos_token_id: r.bos_token_id,
            pad_token_id: r.pad_token_id,
            eos_token_ids: r.eos_token_id.map(OneOrMany::into_vec).unwrap_or_default(),
        };
        g.validate()?;
        Ok(g)
    }

    fn validate(&self) -> Result<()> {
        let check = |key: &str, v: Option<f32>, ok: fn(f32) -> bool, range: &str| match v {
            Some(x) if !x.is_finite() || !ok(x) => {
                bail!("key `{key}` is {x}; it must be {range}")
            }
            _ => Ok(()),
        };
        check("temperature", self.temperature, |x| x >= 0.0, "≥ 0")?;
        check("top_p", self.top_p, |x| x > 0.0 && x <= 1.0, "in (0, 1]")?;
        check(
            "min_p",
            self.min_p,
            |x| (0.0..=1.0).contains(&x),
            "in [0, 1]",
        )?;
        check(
            "repetition_penalty",
            self.repetition_penalty,
            |x| x > 0.0,
            "> 0",
        )?;
        Ok(())
    }

    /// transformers decodes greedily unless `do_sample` is true, whatever the temperature.
    pub fn greedy(&self) -> bool {
        self.do_sample != Some(true)
    }
}
