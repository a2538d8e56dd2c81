//! Laguna's forms of `rope_parameters` (see the family notes): nested by layer type, flat plus
//! `swa_rope_parameters`, legacy `rope_scaling`, and the reference's defaults, resolved into one
//! block per layer type.

use super::config::{LagunaConfig, FULL, SLIDING};
use anyhow::{anyhow, bail, Result};
use serde_json::Value;

/// Where the two layer types' RoPE blocks come from.
pub(super) struct RopeBlocks {
    pub(super) full: Option<Value>,
    pub(super) sliding: Option<Value>,
    /// Nested by layer type: YaRN's `truncate` then comes from the top level (`top_truncate`),
    /// not from the blocks.
    pub(super) nested: bool,
    pub(super) top_truncate: Option<Value>,
}

/// Resolve every form of `rope_parameters` the reference's config class accepts into one block
/// per layer type (see the family notes). Only the types in use must be present.
pub(super) fn resolve_rope(
    c: &LagunaConfig,
    used_full: bool,
    used_sliding: bool,
    warnings: &mut Vec<String>,
) -> Result<RopeBlocks> {
    let mut params = c.rope_parameters.clone().filter(|v| !v.is_null());
    if let Some(rs) = c.rope_scaling.clone().filter(|v| !v.is_null()) {
        warnings.push(
            "legacy key `rope_scaling` replaces `rope_parameters` (as the reference's setter does)"
                .into(),
        );
        params = Some(rs);
    }
    let ignored_top = |warnings: &mut Vec<String>| {
        for (k, present) in [
            ("rope_theta", c.rope_theta.is_some()),
            ("partial_rotary_factor", c.partial_rotary_factor.is_some()),
            (
                "original_max_position_embeddings",
                c.original_max_position_embeddings.is_some(),
            ),
        ] {
            if present {
                warnings.push(format!(
                    "key `{k}` is not read: the reference takes RoPE from `rope_parameters.<layer type>`"
                ));
            }
        }
    };
    let Some(params) = params else {
        // The reference's defaults.
        ignored_top(warnings);
        return Ok(RopeBlocks {
            full: Some(
                serde_json::json!({"rope_type": "default", "rope_theta": 500_000.0, "partial_rotary_factor": 0.5}),
            ),
            sliding: Some(
                serde_json::json!({"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 1.0}),
            ),
            nested: true,
            top_truncate: None,
        });
    };
    let obj = params
        .as_object()
        .ok_or_else(|| anyhow!("key `rope_parameters` is not an object"))?;
    let nested = obj.contains_key(FULL) || obj.contains_key(SLIDING);
    if nested {
        ignored_top(warnings);
        if c.swa_rope_parameters.as_ref().is_some_and(|v| !v.is_null()) {
            warnings.push("key `swa_rope_parameters` is not read: `rope_parameters` is nested by layer type, so sliding layers use `rope_parameters.sliding_attention`".into());
        }
        let is_yarn = |ty: &str| {
            obj.get(ty)
                .and_then(|b| b.get("rope_type").or_else(|| b.get("type")))
                .and_then(|t| t.as_str())
                == Some("yarn")
        };
        let yarn_used = (used_full && is_yarn(FULL)) || (used_sliding && is_yarn(SLIDING));
        for ty in [FULL, SLIDING] {
            let used = if ty == FULL { used_full } else { used_sliding };
            if used && is_yarn(ty) && obj.get(ty).is_some_and(|b| b.get("truncate").is_some()) {
                warnings.push(format!(
                    "key `rope_parameters.{ty}.truncate` is not read: the reference's YaRN takes \
                     `truncate` from the top level of `rope_parameters` (default true)"
                ));
            }
        }
        for k in obj.keys() {
            if k == "truncate" && yarn_used {
                continue; // read by the YaRN blocks, see the module notes
            }
            if k != FULL && k != SLIDING {
                let hint = if k == "original_max_position_embeddings" {
                    " (a YaRN block needs its own `original_max_position_embeddings`)"
                } else {
                    ""
                };
                warnings.push(format!(
                    "key `rope_parameters.{k}` is not read: with per-layer-type blocks the reference reads only `{FULL}` and `{SLIDING}`{hint}"
                ));
            }
        }
        let take = |ty: &str, used: bool| -> Result<Option<Value>> {
            if !used {
                return Ok(None);
            }
            match obj.get(ty) {
                Some(v) => Ok(Some(v.clone())),
                None => bail!(
                    "key `rope_parameters.{ty}` is missing, but some layers are `{ty}` (the reference fails to build the model)"
                ),
            }
        };
        return Ok(RopeBlocks {
            full: take(FULL, used_full)?,
            sliding: take(SLIDING, used_sliding)?,
            nested: true,
            top_truncate: obj.get("truncate").cloned(),
        });
    }
    // Flat form: the full layers' block, with the top-level keys as defaults; the sliding layers
    // read `swa_rope_parameters`.
    let mut full = obj.clone();
    if let Some(t) = c.rope_theta {
        full.entry("rope_theta").or_insert(Value::from(t));
    }
    if let Some(p) = c.partial_rotary_factor {
        full.entry("partial_rotary_factor")
            .or_insert(Value::from(p));
    }
    if c.original_max_position_embeddings.is_some() {
        warnings.push("key `original_max_position_embeddings` is not read: the reference looks for it inside the RoPE block".into());
    }
    let sliding = if used_sliding {
        match c.swa_rope_parameters.clone().filter(|v| !v.is_null()) {
            Some(v) => Some(v),
            None => bail!(
                "key `rope_parameters` is a single flat block, so the sliding layers' RoPE must be in \
                 `swa_rope_parameters`, which is missing (the nested form keys blocks by `{FULL}`/`{SLIDING}`)"
            ),
        }
    } else {
        None
    };
    warnings.push(format!(
        "flat `rope_parameters`{}: read as the pre-release layout (full layers: `rope_parameters`, \
         sliding layers: `swa_rope_parameters`); transformers 5.23 loads this config but cannot build \
         the model from it (it indexes `rope_parameters` by layer type)",
        if used_sliding { " + `swa_rope_parameters`" } else { "" }
    ));
    Ok(RopeBlocks {
        full: Some(Value::Object(full)),
        sliding,
        nested: false,
        top_truncate: None,
    })
}
