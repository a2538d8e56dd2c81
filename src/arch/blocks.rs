//! Where the per-layer table meets the blocks: `layers/` takes small values of its own (an
//! attention geometry, a list of cache owners and windows) and knows no [`LayerSpec`]; these
//! functions make them from the table, with the checks a block cannot make.

use super::{ArchSpec, Attention, LayerSpec};
use crate::layers::attention::AttentionGeometry;
use crate::layers::kv_store::KvStore;
use anyhow::{bail, Result};

impl LayerSpec {
    /// This layer as plain softmax attention (full or sliding, keys and values of one width).
    pub fn softmax_geometry(&self) -> Result<AttentionGeometry> {
        let window = match self.attention {
            Attention::Full => None,
            Attention::Sliding { window } => Some(window),
            ref other => bail!(
                "layer {}: attention `{}` is not plain softmax attention",
                self.index,
                other.label()
            ),
        };
        if self.v_head_dim != self.head_dim {
            bail!(
                "layer {}: value heads of {} differ from key heads of {}; not supported here",
                self.index,
                self.v_head_dim,
                self.head_dim
            );
        }
        Ok(AttentionGeometry {
            layer: self.index,
            q_heads: self.q_heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            window,
            kv_source: self.kv_source,
            k_eq_v: self.k_eq_v,
        })
    }
}

/// The store the per-layer table describes: a slot for every layer that owns a cache (not
/// KV-shared), keeping the window of sliding layers.
pub fn kv_store_for(spec: &ArchSpec) -> KvStore {
    let owns: Vec<bool> = spec.layers.iter().map(|l| l.kv_source.is_none()).collect();
    let windows: Vec<Option<usize>> = spec
        .layers
        .iter()
        .map(|l| match l.attention {
            Attention::Sliding { window }
            | Attention::Cca {
                window: Some(window),
            }
            | Attention::Compressed { window, .. } => Some(window),
            _ => None,
        })
        .collect();
    KvStore::new(&owns, &windows)
}
