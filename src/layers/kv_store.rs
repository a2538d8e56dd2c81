//! The KV store: every layer's cache, kept outside the layers and indexed by the layer that owns
//! it, so cross-layer sharing is a lookup of the owner's view, not a special case.
//!
//! A layer appends the K (and V, unless K=V) of the tokens it is fed and gets back everything a
//! query of this chunk may attend: the cached tokens followed by the new ones. The stored copy
//! then keeps what the next step needs: every token for full attention, the last `window`
//! tokens for sliding layers, so memory stays flat past the window. [`KvStore::bytes`] measures
//! the tensors really held; it equals `kv-budget` for the same config and context.
//!
//! Full-attention layers write into a buffer with room to grow (made as large as the tokens
//! the caller said to expect, [`KvStore::reserve`]; past that its capacity at least doubles when
//! it fills; the untouched part is never paged in), so appending a token copies that token, not
//! the whole cache; the cache they hold is the buffer's first `tokens` rows. A buffer
//! shared with a snapshot (a clone of the store) is copied before it is written: snapshots never
//! change.
//!
//! Speculative decoding feeds drafted tokens that may be rejected. [`KvStore::checkpoint`]
//! records what a verify pass will change without copying a row: for full layers only how many
//! rows they hold (the pass writes past them, never over them), for sliding layers their window
//! tensors and for every layer its states (a forward replaces those tensors, it never writes
//! into them), so a checkpoint costs a few reference counts. [`KvStore::keep_prefix`] keeps the
//! accepted rows of the pass where the store holds only rows; elsewhere [`KvStore::rollback`]
//! puts the store back exactly as it was, byte for byte, and the caller feeds the accepted
//! tokens again.
//!
//! A drafter with layers of its own (an MTP head, `--draft mtp`) keeps them here too, in slots
//! past the model's ([`KvStore::add_full_layer`]), so checkpoints, snapshots and `clear` cover
//! them; it asks the model to leave the normed hidden state of every fed position
//! ([`KvStore::keep_hidden_rows`]), which it consumes when it drafts.

use anyhow::{bail, Result};
use candle_core::Tensor;

/// What one owning layer holds.
#[derive(Debug, Default, Clone)]
pub struct LayerKv {
    /// Keys `[batch, kv_heads, tokens, head_dim]` (for K=V layers, the one shared tensor).
    pub k: Option<Tensor>,
    /// Values `[batch, kv_heads, tokens, v_head_dim]`; `None` for K=V layers.
    pub v: Option<Tensor>,
    /// Keep at most this many tokens (sliding layers).
    pub window: Option<usize>,
    /// Fixed-size states (convolution, recurrent, compressor carry), by name.
    pub states: Vec<(&'static str, Tensor)>,
    /// The buffers `k` and `v` are views of: their first rows (full layers), or rows from
    /// `lo` on (sliding layers).
    room: Option<Room>,
}

/// K/V buffers `[batch, heads, capacity, dim]`, where the layer's rows start, and a token telling
/// whether a clone of the store shares them.
#[derive(Debug, Clone)]
struct Room {
    k: Tensor,
    v: Option<Tensor>,
    /// The first row of the layer's `k`/`v` in the buffers (0 for full layers).
    lo: usize,
    owner: std::sync::Arc<()>,
}

/// Rows a sliding layer's buffer holds past its window: appends go in place until they fill
/// it, then the window moves to a fresh buffer (one copy of the window per `SLIDE_ROOM` decode
/// steps, instead of one per step).
const SLIDE_ROOM: usize = 256;

/// `new` `[b, h, n, d]` written at row `at` of `buf` (grown, or copied away from a snapshot, as
/// needed, keeping its first `at` rows from `old`); returns the buffer. A buffer made here has
/// room for at least `reserve` rows.
fn write_rows(
    buf: Option<&Tensor>,
    old: Option<&Tensor>,
    new: &Tensor,
    at: usize,
    fresh: bool,
    reserve: usize,
) -> Result<Tensor> {
    let (b, h, n, d) = new.dims4()?;
    let need = at + n;
    let buf = match buf {
        Some(buf) if !fresh && buf.dim(2)? >= need => buf.clone(),
        _ => {
            let cap = need
                .max(buf.map_or(0, |t| t.dim(2).unwrap_or(0)) * 2)
                .max(256)
                .max(reserve);
            let grown = Tensor::zeros((b, h, cap, d), new.dtype(), new.device())?;
            if let Some(old) = old.filter(|_| at > 0) {
                grown.slice_set(&old.contiguous()?, 2, 0)?;
            }
            grown
        }
    };
    buf.slice_set(&new.contiguous()?, 2, at)?;
    Ok(buf)
}

impl LayerKv {
    /// The fixed-size state called `name`, if one is held.
    pub fn state(&self, name: &str) -> Option<&Tensor> {
        self.states.iter().find(|(n, _)| *n == name).map(|(_, t)| t)
    }

    /// Drop the state called `name`, if held.
    pub fn remove_state(&mut self, name: &str) {
        self.states.retain(|(n, _)| *n != name);
    }

    /// Hold `t` as the state called `name`, replacing any earlier one.
    pub fn set_state(&mut self, name: &'static str, t: Tensor) {
        match self.states.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = t,
            None => self.states.push((name, t)),
        }
    }
}

/// The keys and values a chunk attends: cached tokens then new ones, and the absolute position
/// of the first of them.
#[derive(Debug, Clone)]
pub struct KvView {
    pub k: Tensor,
    pub v: Option<Tensor>,
    /// Position of `k`'s first token in the sequence.
    pub start: usize,
}

/// What [`KvStore::rollback`] restores: the store as it was when [`KvStore::checkpoint`] ran.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    seen: usize,
    layers: Vec<Option<LayerMark>>,
    last_hidden: Option<Tensor>,
    hidden_rows: Option<(Vec<u32>, Vec<Tensor>)>,
}

/// One owning layer at a checkpoint.
#[derive(Debug, Clone)]
struct LayerMark {
    /// Full layers: the rows held (the room's first rows stay as they were).
    rows: usize,
    /// Sliding layers: the window tensors (replaced, never written into, by an append).
    k: Option<Tensor>,
    v: Option<Tensor>,
    states: Vec<(&'static str, Tensor)>,
}

/// All layers' caches; `None` for layers that own none (KV-shared layers). Cloning is cheap
/// (tensors are shared, and `append` makes new ones), so a snapshot at a turn boundary is a
/// clone: that is how `chat` undoes a turn without prefilling the history again.
#[derive(Debug, Default, Clone)]
pub struct KvStore {
    layers: Vec<Option<LayerKv>>,
    /// Tokens fed so far (the position of the next token).
    seen: usize,
    /// The model's normed hidden states of the last positions fed `[1, r, hidden]`, where it
    /// keeps them (Gemma 4): its assistant drafter starts from the last. Not KV: not counted
    /// in [`Self::bytes`].
    last_hidden: Option<Tensor>,
    /// Models leave the normed hidden state of every fed position here (see the module notes).
    keep_hidden_rows: bool,
    /// Those rows not yet consumed, for the positions just before `seen`: the tokens, and the
    /// rows one tensor per forward (joined when taken, not at every push: a long prompt's
    /// chunks would be copied again and again).
    hidden_rows: Option<(Vec<u32>, Vec<Tensor>)>,
    /// Rows a full layer's buffer is made with room for when it next grows (see
    /// [`Self::reserve`]).
    reserve: usize,
}

/// Normed hidden states of consecutive positions, ending at the last one fed, with the tokens
/// fed there.
#[derive(Debug, Clone)]
pub struct HiddenRows {
    pub ids: Vec<u32>,
    /// `[ids.len(), hidden]`.
    pub h: Tensor,
}

impl KvStore {
    /// One slot per layer; `owns[i]` says whether layer `i` keeps a cache, `windows[i]` its window.
    pub fn new(owns: &[bool], windows: &[Option<usize>]) -> Self {
        KvStore {
            layers: owns
                .iter()
                .zip(windows)
                .map(|(&own, &window)| {
                    own.then(|| LayerKv {
                        window,
                        ..Default::default()
                    })
                })
                .collect(),
            seen: 0,
            last_hidden: None,
            keep_hidden_rows: false,
            hidden_rows: None,
            reserve: 0,
        }
    }

    /// Expect to hold `tokens` tokens: a full layer's buffer that must grow is made that large
    /// at once, so a long prompt and the generation after it copy no rows. Without it the
    /// buffer doubles, and the copy of a long prompt's rows lands on the first decode step
    /// (8192 tokens on the 0.2 B bench model: 93 ms against 9.5 ms for the next steps). Rows
    /// reserved and never written are never paged in.
    pub fn reserve(&mut self, tokens: usize) {
        self.reserve = tokens;
    }

    /// Tokens fed so far: the position the next token gets.
    pub fn seen(&self) -> usize {
        self.seen
    }

    /// Call once per forward, after every layer appended: `n` tokens were fed.
    pub fn advance(&mut self, n: usize) {
        self.seen += n;
    }

    /// Forget everything (a new conversation).
    pub fn clear(&mut self) {
        for l in self.layers.iter_mut().flatten() {
            l.k = None;
            l.v = None;
            l.room = None;
            l.states.clear();
        }
        self.seen = 0;
        self.last_hidden = None;
        self.hidden_rows = None;
    }

    /// The last normed hidden state the model left (see the field), `[1, 1, hidden]`.
    pub fn last_hidden(&self) -> Result<Option<Tensor>> {
        Ok(match &self.last_hidden {
            Some(h) => Some(h.narrow(1, h.dim(1)? - 1, 1)?),
            None => None,
        })
    }

    /// Keep `h` `[1, r, hidden]`, the normed hidden states of the last `r` positions fed (the
    /// last one, or every row of a verify pass, which [`Self::keep_prefix`] may cut).
    pub fn set_last_hidden(&mut self, h: Tensor) {
        self.last_hidden = Some(h);
    }

    /// From now on, models keep the normed hidden state of every position they are fed
    /// ([`Self::push_hidden_rows`]) until a drafter takes them.
    pub fn keep_hidden_rows(&mut self) {
        self.keep_hidden_rows = true;
    }

    /// Whether a model should push its hidden rows.
    pub fn wants_hidden_rows(&self) -> bool {
        self.keep_hidden_rows
    }

    /// Append the normed hidden states `h` `[n, hidden]` of the `n` tokens `ids` just fed.
    pub fn push_hidden_rows(&mut self, ids: &[u32], h: Tensor) {
        let (all_ids, parts) = self.hidden_rows.get_or_insert_with(Default::default);
        all_ids.extend_from_slice(ids);
        parts.push(h);
    }

    /// The hidden rows pushed since the last take: the positions just before [`Self::seen`].
    pub fn take_hidden_rows(&mut self) -> Result<Option<HiddenRows>> {
        Ok(match self.hidden_rows.take() {
            Some((ids, parts)) => Some(HiddenRows {
                ids,
                h: Tensor::cat(&parts, 0)?,
            }),
            None => None,
        })
    }

    /// Give slot `i` (past the model's layers) a full-attention cache, if it has none.
    pub fn add_full_layer(&mut self, i: usize) {
        if self.layers.len() <= i {
            self.layers.resize(i + 1, None);
        }
        self.layers[i].get_or_insert_with(LayerKv::default);
    }

    pub fn layer(&self, i: usize) -> Option<&LayerKv> {
        self.layers.get(i).and_then(|l| l.as_ref())
    }

    pub fn layer_mut(&mut self, i: usize) -> Result<&mut LayerKv> {
        let n = self.layers.len();
        match self.layers.get_mut(i) {
            Some(Some(l)) => Ok(l),
            Some(None) => bail!("layer {i} owns no KV cache (it reads another layer's)"),
            None => bail!("layer {i} does not exist ({n} layers)"),
        }
    }

    /// Append a chunk's `k` `[b, h, n, d]` (and `v`) to layer `i`; return what the chunk attends
    /// and keep what the next step needs (the last `window` tokens for sliding layers).
    pub fn append(&mut self, i: usize, k: Tensor, v: Option<Tensor>) -> Result<KvView> {
        let (seen, reserve) = (self.seen, self.reserve);
        let l = self.layer_mut(i)?;
        let cached = l.k.as_ref().map_or(0, |k| k.dim(2).unwrap_or(0));
        if l.window.is_none() {
            // Full attention: write the new rows into the room, view its first rows.
            let room = l.room.take();
            // Shared with a snapshot (or none yet): a buffer of our own first.
            let fresh = room
                .as_ref()
                .is_none_or(|r| std::sync::Arc::strong_count(&r.owner) > 1);
            let kb = write_rows(
                room.as_ref().map(|r| &r.k),
                l.k.as_ref(),
                &k,
                cached,
                fresh,
                reserve,
            )?;
            let vb = match &v {
                Some(v) => Some(write_rows(
                    room.as_ref().and_then(|r| r.v.as_ref()),
                    l.v.as_ref(),
                    v,
                    cached,
                    fresh,
                    reserve,
                )?),
                None => None,
            };
            let total = cached + k.dim(2)?;
            l.k = Some(kb.narrow(2, 0, total)?);
            l.v = vb.as_ref().map(|b| b.narrow(2, 0, total)).transpose()?;
            let owner = match room {
                Some(r) if !fresh => r.owner,
                _ => std::sync::Arc::new(()),
            };
            l.room = Some(Room {
                k: kb,
                v: vb,
                lo: 0,
                owner,
            });
            return Ok(KvView {
                k: l.k.clone().expect("just set"),
                v: l.v.clone(),
                // Every position from 0 (a drafter's slot may run ahead of `seen`).
                start: 0,
            });
        }
        // Sliding: the new rows go after the window's in the layer's buffer, in place while
        // there is room (and no snapshot shares it); else the window and the new rows move to a
        // fresh buffer with `SLIDE_ROOM` rows to spare. The view attended is the window then
        // the new rows; the layer keeps the last `window` of them.
        let window = l.window.unwrap_or(usize::MAX);
        let n = k.dim(2)?;
        let total = cached + n;
        let room = l.room.take().filter(|r| {
            std::sync::Arc::strong_count(&r.owner) == 1
                && r.k.dim(2).is_ok_and(|cap| r.lo + total <= cap)
        });
        let room = match room {
            Some(r) => {
                r.k.slice_set(&k.contiguous()?, 2, r.lo + cached)?;
                if let (Some(vb), Some(v)) = (&r.v, &v) {
                    vb.slice_set(&v.contiguous()?, 2, r.lo + cached)?;
                }
                r
            }
            None => {
                let rows = total + SLIDE_ROOM;
                let kb = write_rows(None, l.k.as_ref(), &k, cached, true, rows)?;
                let vb = match &v {
                    Some(v) => Some(write_rows(None, l.v.as_ref(), v, cached, true, rows)?),
                    None => None,
                };
                Room {
                    k: kb,
                    v: vb,
                    lo: 0,
                    owner: std::sync::Arc::new(()),
                }
            }
        };
        let keep = total.min(window);
        let rows = |b: &Tensor, from: usize, n: usize| b.narrow(2, room.lo + from, n);
        let view = KvView {
            k: rows(&room.k, 0, total)?,
            v: room.v.as_ref().map(|b| rows(b, 0, total)).transpose()?,
            start: seen - cached,
        };
        l.k = Some(rows(&room.k, total - keep, keep)?);
        l.v = room
            .v
            .as_ref()
            .map(|b| rows(b, total - keep, keep))
            .transpose()?;
        l.room = Some(Room {
            lo: room.lo + total - keep,
            ..room
        });
        Ok(view)
    }

    /// Record the store as it is now, for [`Self::rollback`]; copies no tensor data and does
    /// not share the full layers' buffers (so the next append still writes in place).
    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            seen: self.seen,
            layers: self
                .layers
                .iter()
                .map(|l| {
                    l.as_ref().map(|l| {
                        let full = l.window.is_none();
                        LayerMark {
                            rows: l.k.as_ref().map_or(0, |k| k.dim(2).unwrap_or(0)),
                            k: if full { None } else { l.k.clone() },
                            v: if full { None } else { l.v.clone() },
                            states: l.states.clone(),
                        }
                    })
                })
                .collect(),
            last_hidden: self.last_hidden.clone(),
            hidden_rows: self.hidden_rows.clone(),
        }
    }

    /// Put the store back as it was at `cp` (taken from this store, with nothing cleared since):
    /// byte for byte what it held then, whatever was fed in between.
    pub fn rollback(&mut self, cp: &Checkpoint) -> Result<()> {
        if cp.layers.len() != self.layers.len() || cp.seen > self.seen {
            bail!("internal: a checkpoint of another cache (or of a later state)");
        }
        for (l, m) in self.layers.iter_mut().zip(&cp.layers) {
            let (Some(l), Some(m)) = (l.as_mut(), m.as_ref()) else {
                continue;
            };
            if l.window.is_none() {
                // The rows past `m.rows` are the rejected tokens'; the room keeps its capacity.
                let cut = |t: &Option<Tensor>| -> Result<Option<Tensor>> {
                    Ok(match t {
                        Some(t) if m.rows > 0 => Some(t.narrow(2, 0, m.rows)?),
                        _ => None,
                    })
                };
                l.k = cut(&l.k)?;
                l.v = cut(&l.v)?;
            } else {
                // The window as it was (rows of the buffer no append since has written over);
                // the next append moves it to a buffer of its own.
                l.k = m.k.clone();
                l.v = m.v.clone();
                l.room = None;
            }
            l.states = m.states.clone();
        }
        self.seen = cp.seen;
        self.last_hidden = cp.last_hidden.clone();
        self.hidden_rows = cp.hidden_rows.clone();
        Ok(())
    }

    /// After a forward of `fed` tokens from `cp` (a verify pass), keep only the first `keep`
    /// of them, as if only those had been fed: full layers drop the rows past them, sliding
    /// layers put the kept rows after the checkpoint's window, the hidden rows and the last
    /// hidden state are cut to match. The rows kept are the ones the pass computed, so this
    /// equals a [`Self::rollback`] and a refeed of the `keep` tokens wherever a forward's rows
    /// do not depend on how many rows it had (tested for every family that takes this path),
    /// and saves the refeed. `Ok(false)`, with the store unchanged, where it cannot: a layer
    /// keeps states (DeltaNet, convolution, compressor carries hold no rows to cut), a sliding
    /// window already evicted some of the fed rows, or the last hidden state holds too few rows.
    pub fn keep_prefix(&mut self, cp: &Checkpoint, keep: usize) -> Result<bool> {
        let fed = self.seen.checked_sub(cp.seen);
        let (Some(fed), true) = (fed, cp.layers.len() == self.layers.len()) else {
            bail!("internal: a checkpoint of another cache (or of a later state)");
        };
        if keep > fed {
            bail!("internal: keeping {keep} of the {fed} tokens fed since the checkpoint");
        }
        let rows = |t: &Option<Tensor>| t.as_ref().map_or(0, |t| t.dim(2).unwrap_or(0));
        for (l, m) in self.layers.iter().zip(&cp.layers) {
            let (Some(l), Some(m)) = (l, m) else {
                continue;
            };
            if !l.states.is_empty() || !m.states.is_empty() {
                return Ok(false);
            }
            let now = rows(&l.k);
            match l.window {
                None if now != m.rows && now != m.rows + fed => {
                    bail!(
                        "internal: a full layer holds {now} rows, not {} + {fed}",
                        m.rows
                    )
                }
                Some(_) if now < fed => return Ok(false),
                _ => {}
            }
        }
        let last_rows = match &self.last_hidden {
            Some(h) => h.dim(1)?,
            None => usize::MAX,
        };
        if last_rows < fed - keep + 1 {
            return Ok(false);
        }

        for (l, m) in self.layers.iter_mut().zip(&cp.layers) {
            let (Some(l), Some(m)) = (l.as_mut(), m.as_ref()) else {
                continue;
            };
            let now = rows(&l.k);
            if l.window.is_none() {
                if now == m.rows + fed && fed > keep {
                    let cut =
                        |t: &Option<Tensor>| t.as_ref().map(|t| t.narrow(2, 0, m.rows + keep));
                    l.k = cut(&l.k).transpose()?;
                    l.v = cut(&l.v).transpose()?;
                }
                continue;
            }
            // The fed rows are the window's last `fed`: the kept ones go after the checkpoint's
            // window, trimmed as an append of them would trim. [b, h, rows, d]
            let window = l.window.unwrap_or(usize::MAX);
            let splice = |old: &Option<Tensor>, now_t: &Option<Tensor>| -> Result<Option<Tensor>> {
                let Some(t) = now_t else { return Ok(None) };
                let kept = t.narrow(2, now - fed, keep)?;
                let all = match old {
                    Some(o) => Tensor::cat(&[o, &kept], 2)?,
                    None => kept,
                };
                let total = all.dim(2)?;
                Ok(Some(if total > window {
                    all.narrow(2, total - window, window)?.contiguous()?
                } else {
                    all
                }))
            };
            l.k = splice(&m.k, &l.k)?;
            l.v = splice(&m.v, &l.v)?;
            l.room = None;
        }
        if let Some(h) = &self.last_hidden {
            let r = h.dim(1)?;
            self.last_hidden = Some(h.narrow(1, r - (fed - keep) - 1, 1)?);
        }
        if let Some((ids, parts)) = &mut self.hidden_rows {
            // Drop the last `fed - keep` rows.
            ids.truncate(ids.len() - (fed - keep));
            let mut drop = fed - keep;
            while drop > 0 {
                let Some(last) = parts.pop() else { break };
                let n = last.dim(0)?;
                if n > drop {
                    parts.push(last.narrow(0, 0, n - drop)?);
                }
                drop -= n.min(drop);
            }
        }
        self.seen = cp.seen + keep;
        Ok(true)
    }

    /// Bytes each layer really holds now (K, V and states), measured from the tensors.
    pub fn bytes(&self) -> Vec<u64> {
        let size = |t: &Tensor| (t.elem_count() * t.dtype().size_in_bytes()) as u64;
        self.layers
            .iter()
            .map(|l| {
                l.as_ref().map_or(0, |l| {
                    l.k.iter().chain(l.v.iter()).map(size).sum::<u64>()
                        + l.states.iter().map(|(_, t)| size(t)).sum::<u64>()
                })
            })
            .collect()
    }
}

/// Causal (and windowed) additive mask for `n` queries at positions `q_start..q_start+n` over
/// keys at `k_start..k_start+k_len`: 0 where visible, −∞ elsewhere. `[n, k_len]`, f32.
pub fn causal_mask(
    n: usize,
    q_start: usize,
    k_start: usize,
    k_len: usize,
    window: Option<usize>,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let mut m = vec![0f32; n * k_len];
    for qi in 0..n {
        let qp = q_start + qi;
        for kj in 0..k_len {
            let kp = k_start + kj;
            let visible = kp <= qp && window.is_none_or(|w| qp - kp < w);
            if !visible {
                m[qi * k_len + kj] = f32::NEG_INFINITY;
            }
        }
    }
    Ok(Tensor::from_vec(m, (n, k_len), device)?)
}

/// Softmax over the last dimension in f32, returning the input dtype.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    Ok(candle_nn::ops::softmax_last_dim(&x.to_dtype(candle_core::DType::F32)?)?.to_dtype(dtype)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn chunk(n: usize, start: f32) -> Tensor {
        Tensor::arange(start, start + n as f32, &Device::Cpu)
            .unwrap()
            .reshape((1, 1, n, 1))
            .unwrap()
    }

    #[test]
    fn sliding_layers_keep_the_window_and_report_bytes() {
        let mut s = KvStore::new(&[true, true, false], &[Some(4), None, None]);
        // Prefill 6 tokens, then 2 decode steps.
        for (n, start) in [(6usize, 0f32), (1, 6.0), (1, 7.0)] {
            let v0 = s.append(0, chunk(n, start), Some(chunk(n, start))).unwrap();
            let v1 = s.append(1, chunk(n, start), None).unwrap();
            assert_eq!(v1.start, 0);
            assert_eq!(v1.k.dim(2).unwrap(), s.seen() + n);
            // The sliding view: the cached window, then the new tokens.
            assert_eq!(v0.start + v0.k.dim(2).unwrap(), s.seen() + n);
            s.advance(n);
        }
        let k0: Vec<f32> = s
            .layer(0)
            .unwrap()
            .k
            .as_ref()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(k0, [4.0, 5.0, 6.0, 7.0]);
        let f32b = DType::F32.size_in_bytes() as u64;
        assert_eq!(s.bytes(), vec![2 * 4 * f32b, 8 * f32b, 0]);
        assert!(s.layer_mut(2).is_err());
        s.clear();
        assert_eq!(s.bytes(), vec![0, 0, 0]);
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// Sliding layers append in place: each view is the window then the new rows, as a
    /// concatenation would give, the buffer is replaced once per `SLIDE_ROOM` steps, and a
    /// snapshot (a clone) or a checkpoint keeps the window it held.
    #[test]
    fn sliding_layers_append_in_place_and_snapshots_never_change() {
        let w = 4;
        let mut s = KvStore::new(&[true], &[Some(w)]);
        let mut at = 0f32;
        let mut buffers = 0;
        let mut cap = 0;
        let mut snapshot = None;
        for step in 0..2 * SLIDE_ROOM + 10 {
            let n = if step == 0 { 6 } else { 1 };
            let view = s
                .append(0, chunk(n, at), Some(chunk(n, at + 1000.0)))
                .unwrap();
            let first = (at as usize).saturating_sub(w) as f32;
            let want: Vec<f32> = (first as usize..at as usize + n)
                .map(|p| p as f32)
                .collect();
            assert_eq!(values(&view.k), want, "step {step}");
            let want_v: Vec<f32> = want.iter().map(|p| p + 1000.0).collect();
            assert_eq!(values(view.v.as_ref().unwrap()), want_v, "step {step}");
            assert_eq!(view.start, first as usize);
            at += n as f32;
            s.advance(n);
            let room = s.layer(0).unwrap().room.as_ref().unwrap();
            let c = room.k.dim(2).unwrap();
            if room.lo == 0 || c != cap {
                buffers += 1;
                cap = c;
            }
            if step == 20 {
                snapshot = Some((s.clone(), values(s.layer(0).unwrap().k.as_ref().unwrap())));
            }
        }
        // One buffer for the prompt, one per SLIDE_ROOM steps after it, one after the snapshot.
        assert!(buffers <= 5, "{buffers} buffers");
        let (snap, held) = snapshot.unwrap();
        assert_eq!(values(snap.layer(0).unwrap().k.as_ref().unwrap()), held);
        assert_eq!(held, [22.0, 23.0, 24.0, 25.0]); // 26 tokens fed by then

        // A checkpoint, appends in place past it, a rollback: the window it held.
        let cp = s.checkpoint();
        let before = values(s.layer(0).unwrap().k.as_ref().unwrap());
        for _ in 0..3 {
            s.append(0, chunk(1, at), Some(chunk(1, at))).unwrap();
            s.advance(1);
            at += 1.0;
        }
        s.rollback(&cp).unwrap();
        assert_eq!(values(s.layer(0).unwrap().k.as_ref().unwrap()), before);
        let view = s.append(0, chunk(1, 99.0), Some(chunk(1, 99.0))).unwrap();
        let mut want = before.clone();
        want.push(99.0);
        assert_eq!(values(&view.k), want);
    }

    /// Full layers write into a growing buffer: past its capacity the cache still holds every
    /// token in order, and a snapshot (a clone) keeps what it held while the store goes on, and
    /// can go on itself on a different branch.
    #[test]
    fn full_layers_grow_in_place_and_snapshots_never_change() {
        let mut s = KvStore::new(&[true], &[None]);
        let mut at = 0f32;
        for n in [300usize, 1, 1, 200, 1] {
            let v = s
                .append(0, chunk(n, at), Some(chunk(n, at + 1000.0)))
                .unwrap();
            at += n as f32;
            s.advance(n);
            let want: Vec<f32> = (0..at as usize).map(|i| i as f32).collect();
            assert_eq!(values(&v.k), want, "after {at} tokens");
            assert_eq!(values(s.layer(0).unwrap().k.as_ref().unwrap()), want);
        }
        assert_eq!(
            s.bytes(),
            vec![2 * 503 * 4],
            "bytes count the tokens held, not the room"
        );
        let snapshot = s.clone();
        // The live store goes on with 7, 8, ...
        s.append(0, chunk(2, 7.0), Some(chunk(2, 8.0))).unwrap();
        s.advance(2);
        // ... the snapshot, on its own branch, with 50, 51.
        let mut other = snapshot.clone();
        other
            .append(0, chunk(2, 50.0), Some(chunk(2, 60.0)))
            .unwrap();
        other.advance(2);
        let k = |st: &KvStore| values(st.layer(0).unwrap().k.as_ref().unwrap());
        assert_eq!(k(&snapshot).len(), 503);
        assert_eq!(k(&snapshot)[502], 502.0);
        assert_eq!(k(&s)[503..], [7.0, 8.0]);
        assert_eq!(k(&other)[503..], [50.0, 51.0]);
        let v = values(other.layer(0).unwrap().v.as_ref().unwrap());
        assert_eq!((v[0], v[503], v.len()), (1000.0, 60.0, 505));
    }

    /// A store told how many tokens to expect makes each full layer's buffer that large once:
    /// a prompt and the steps after it never copy the rows held. Without it the buffer grows.
    #[test]
    fn a_reserved_store_makes_its_buffer_once() {
        let room = |s: &KvStore| s.layer(0).unwrap().room.as_ref().unwrap().k.dim(2).unwrap();
        for reserve in [0, 1000] {
            let mut s = KvStore::new(&[true], &[None]);
            s.reserve(reserve);
            let mut rooms = vec![];
            let mut at = 0f32;
            for n in [300usize, 1, 1, 200, 1, 400] {
                s.append(0, chunk(n, at), Some(chunk(n, at))).unwrap();
                at += n as f32;
                s.advance(n);
                rooms.push(room(&s));
            }
            let want: Vec<f32> = (0..at as usize).map(|i| i as f32).collect();
            assert_eq!(values(s.layer(0).unwrap().k.as_ref().unwrap()), want);
            match reserve {
                0 => assert_eq!(rooms, [300, 600, 600, 600, 600, 1200]),
                _ => assert_eq!(rooms, [1000; 6]),
            }
        }
    }

    /// A rollback undoes appends and state changes on full and sliding layers alike, keeps the
    /// full layer's buffer (the next append writes in place), and leaves a snapshot alone.
    #[test]
    fn rollback_restores_the_checkpoint_exactly() {
        let mut s = KvStore::new(&[true, true], &[None, Some(3)]);
        let feed = |s: &mut KvStore, n: usize, at: f32| {
            s.append(0, chunk(n, at), Some(chunk(n, at + 100.0)))
                .unwrap();
            s.append(1, chunk(n, at), None).unwrap();
            s.layer_mut(1).unwrap().set_state("carry", chunk(1, at));
            s.advance(n);
        };
        feed(&mut s, 5, 0.0);
        let snapshot = s.clone();
        let cp = s.checkpoint();
        let dump = |s: &KvStore| {
            (0..2)
                .map(|i| {
                    let l = s.layer(i).unwrap();
                    let mut v = values(l.k.as_ref().unwrap());
                    v.extend(l.v.iter().flat_map(values));
                    v.extend(l.states.iter().flat_map(|(_, t)| values(t)));
                    v
                })
                .collect::<Vec<_>>()
        };
        let before = dump(&s);
        feed(&mut s, 4, 50.0);
        s.rollback(&cp).unwrap();
        assert_eq!((dump(&s), s.seen()), (before.clone(), 5));
        assert_eq!(dump(&snapshot), before);
        // Going on after the rollback: the full layer continues from row 5.
        feed(&mut s, 1, 9.0);
        let k = values(s.layer(0).unwrap().k.as_ref().unwrap());
        assert_eq!(k, [0.0, 1.0, 2.0, 3.0, 4.0, 9.0]);
        assert_eq!(
            values(s.layer(1).unwrap().k.as_ref().unwrap()),
            [3.0, 4.0, 9.0]
        );
        assert!(KvStore::new(&[true], &[None]).rollback(&cp).is_err());
    }

    /// Keeping a prefix of the fed rows gives the store of a run fed only that prefix (rows,
    /// window, last hidden state, hidden rows), and declines, changing nothing, where a layer
    /// keeps states or the window evicted fed rows.
    #[test]
    fn keep_prefix_equals_feeding_the_prefix_only() {
        let feed = |s: &mut KvStore, n: usize, at: f32| {
            s.append(0, chunk(n, at), Some(chunk(n, at + 100.0)))
                .unwrap();
            s.append(1, chunk(n, at), None).unwrap();
            s.set_last_hidden(chunk(n, at).reshape((1, n, 1)).unwrap());
            s.push_hidden_rows(&vec![7; n], chunk(n, at).reshape((n, 1)).unwrap());
            s.advance(n);
        };
        let state = |s: &KvStore| {
            let mut v: Vec<Vec<f32>> = (0..2)
                .flat_map(|i| {
                    let l = s.layer(i).unwrap();
                    [l.k.as_ref(), l.v.as_ref()]
                        .into_iter()
                        .flatten()
                        .map(values)
                })
                .collect();
            v.push(values(&s.last_hidden().unwrap().unwrap()));
            let rows = s.clone().take_hidden_rows().unwrap().unwrap();
            v.push(values(&rows.h));
            (v, rows.ids.len(), s.seen())
        };
        for keep in [1usize, 3, 4] {
            let mut s = KvStore::new(&[true, true], &[None, Some(6)]);
            feed(&mut s, 5, 0.0);
            let mut prefix_only = s.clone();
            let cp = s.checkpoint();
            feed(&mut s, 4, 50.0);
            assert!(s.keep_prefix(&cp, keep).unwrap());
            feed(&mut prefix_only, keep, 50.0);
            assert_eq!(state(&s), state(&prefix_only), "keep {keep}");
        }
        // A window smaller than the rows fed, or a state: declined, nothing changed.
        for (window, with_state) in [(3, false), (6, true)] {
            let mut s = KvStore::new(&[true, true], &[None, Some(window)]);
            feed(&mut s, 5, 0.0);
            let cp = s.checkpoint();
            feed(&mut s, 4, 50.0);
            if with_state {
                s.layer_mut(1).unwrap().set_state("carry", chunk(1, 0.0));
            }
            let before = s.clone();
            assert!(!s.keep_prefix(&cp, 2).unwrap());
            assert_eq!(
                values(s.layer(1).unwrap().k.as_ref().unwrap()),
                values(before.layer(1).unwrap().k.as_ref().unwrap())
            );
            assert_eq!(s.seen(), 9);
        }
    }

    #[test]
    fn masks() {
        let m = causal_mask(2, 3, 1, 4, Some(2), &Device::Cpu).unwrap();
        let m: Vec<Vec<f32>> = m.to_vec2().unwrap();
        let inf = f32::NEG_INFINITY;
        // query 3 sees keys 2,3; query 4 sees 3,4 (window 2).
        assert_eq!(m, vec![vec![inf, 0.0, 0.0, inf], vec![inf, inf, 0.0, 0.0]]);
    }
}
