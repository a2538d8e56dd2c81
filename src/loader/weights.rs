//! The text model's weights: memory-mapped safetensors, validated before a byte of tensor data
//! is read, served to the model builder through a `candle_nn::VarBuilder`.
//!
//! Notable:
//! - Untrusted headers: every shard's header is checked against the file length and against
//!   itself (each tensor's byte range matches dtype × shape with overflow checks, lies inside
//!   the data section, and the ranges tile it without hole or overlap) before it is used, and
//!   each failure names the file and the tensor. The safetensors crate's own validation runs
//!   after ours as a second opinion.
//! - Only the text model: the layout (`model.language_model.` wrapper, transformers-4
//!   `language_model.model.`, or plain `model.`) is detected from the names; vision/audio
//!   tensors are never indexed, and text tensors must be F32, BF16 or F16 (integer tables such
//!   as DeepSeek's `tid2eid` stay integers).
//! - A family whose Hub checkpoints name tensors their own way (DeepSeek V4) passes a renaming
//!   ([`LoadOptions::rename`]) to the reference's module names; it is applied to every name
//!   before anything else.
//! - Block-scaled FP8 weights and packed FP4 experts (each `*.weight` with its
//!   `*.weight_scale_inv`) are dequantized to the load dtype as they are read (see
//!   [`super::quantized`]); a quantized weight without its scales is an error naming it.
//! - Sharded checkpoints are cross-checked against `model.safetensors.index.json`: a tensor
//!   the index puts in another shard, or in two shards, is an error.
//! - Shape errors name the tensor and both shapes; loads convert to the chosen dtype on the
//!   target device, and each loaded range is released from the page cache mapping
//!   (`MADV_DONTNEED`) so resident memory holds one copy of the weights, not two.

use super::model_files::{check_shard_name, Layout, ModelFiles, ShardIndex};
use super::quantized::{self, Quantized, ScaleDtype};
use crate::layers::linear::MappedSource;
use crate::layers::mapped::{MappedFile, MappedTensor, Mapping, SharedBytes};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The safetensors crate's limit on the JSON header.
const MAX_HEADER: usize = 100 * 1024 * 1024;

/// One tensor of the text model, located in a validated shard.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub shard: usize,
    /// The dtype it loads from (F32 for quantized weights, which are dequantized to it).
    pub dtype: DType,
    /// The logical shape (FP4-packed weights: twice the stored last dim).
    pub shape: Vec<usize>,
    /// Absolute byte range in the shard file.
    pub start: usize,
    pub end: usize,
    /// Quantized storage and its scale grid.
    pub quantized: Option<QuantizedEntry>,
}

/// How a quantized weight is stored, and where its scales are.
#[derive(Debug, Clone)]
pub struct QuantizedEntry {
    pub kind: Quantized,
    pub scale_dtype: ScaleDtype,
    pub scale_shard: usize,
    pub scale_start: usize,
    pub scale_end: usize,
    /// FP8 block `[rows, cols]`.
    pub block: (usize, usize),
}

/// Renames a checkpoint tensor to the reference's module name.
pub type Rename = fn(&str) -> String;

/// What a family needs the loader to know about its checkpoints.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    /// Applied to every tensor name first.
    pub rename: Option<Rename>,
    /// `quantization_config.weight_block_size` of an FP8 checkpoint; `None`: not quantized.
    pub fp8_block: Option<(usize, usize)>,
    /// Every tensor is the model's (a drafter such as Gemma 4's assistant keeps projections
    /// beside `model.`): [`Layout::BARE`], whatever the names.
    pub whole: bool,
}

struct Shard {
    path: PathBuf,
    mmap: Arc<MappedFile>,
}

struct Store {
    shards: Vec<Shard>,
    tensors: HashMap<String, TensorEntry>,
    layout: Layout,
    loaded_bytes: AtomicU64,
    used: Mutex<BTreeSet<String>>,
}

/// The validated, mapped weights of a model's text part.
#[derive(Clone)]
pub struct Weights {
    store: Arc<Store>,
    dtype: DType,
    device: Device,
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Weights")
            .field("shards", &self.store.shards.len())
            .field("tensors", &self.store.tensors.len())
            .field("layout", &self.store.layout)
            .field("dtype", &self.dtype)
            .finish()
    }
}

/// Map and validate the safetensors of `files`; tensors load lazily in `dtype` on `device`.
pub fn load(files: &ModelFiles, dtype: DType, device: &Device) -> Result<Weights> {
    Weights::open(&files.weights, files.index.as_deref(), dtype, device)
}

/// [`load`] with a family's renaming and the checkpoint's quantization (from its config).
pub fn load_with(
    files: &ModelFiles,
    dtype: DType,
    device: &Device,
    opts: LoadOptions,
) -> Result<Weights> {
    Weights::open_with(&files.weights, files.index.as_deref(), dtype, device, opts)
}

impl Weights {
    /// Map and validate `shards` (cross-checked against `index` when given).
    pub fn open(
        shards: &[PathBuf],
        index: Option<&Path>,
        dtype: DType,
        device: &Device,
    ) -> Result<Weights> {
        Self::open_with(shards, index, dtype, device, LoadOptions::default())
    }

    /// [`Weights::open`] with [`LoadOptions`].
    pub fn open_with(
        shards: &[PathBuf],
        index: Option<&Path>,
        dtype: DType,
        device: &Device,
        opts: LoadOptions,
    ) -> Result<Weights> {
        if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
            bail!("cannot load weights as {dtype:?}: llmarch computes in f32, bf16 or f16");
        }
        if shards.is_empty() {
            bail!("no safetensors files to load");
        }
        // 1. Map every shard and validate its header.
        let mut mapped = vec![];
        let mut headers = vec![];
        for path in shards {
            if index.is_some() {
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                check_shard_name(name, index.unwrap_or(Path::new("")))?;
            }
            let file =
                std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
            // SAFETY: the mapping is read-only; like every mmap loader we rely on the file not
            // being truncated while we run (the HF cache never rewrites a blob in place).
            let mmap = unsafe { MappedFile::map(file) }
                .with_context(|| format!("mapping {}", path.display()))?;
            let mut header = parse_header(path, &mmap)?;
            if let Some(rename) = opts.rename {
                header.iter_mut().for_each(|t| t.name = rename(&t.name));
            }
            headers.push(header);
            mapped.push(Shard {
                path: path.clone(),
                mmap: Arc::new(mmap),
            });
        }
        // 2. The layout, from every name in every shard.
        let all_names = headers.iter().flatten().map(|t| t.name.as_str());
        let detected = if opts.whole {
            Some(Layout::BARE)
        } else {
            Layout::detect(all_names)
        };
        let layout = detected.ok_or_else(|| {
            anyhow!(
                "{}: no tensor under `model.language_model.`, `language_model.model.` or `model.`: not a Hugging Face text or multimodal checkpoint",
                shard_list(shards)
            )
        })?;
        // 3. Index the text tensors; refuse a dtype we do not load, and duplicates. Scales of
        //    quantized weights are set aside, then paired with their weights.
        let mut tensors: HashMap<String, TensorEntry> = HashMap::new();
        //    Scales are `*_scale_inv`, or `B.scale` beside a quantized `B.weight` (DeepSeek V4's
        //    Hub files; transformers renames them as its FP8 quantizer loads).
        let quantized_bases: BTreeSet<&str> = headers
            .iter()
            .flatten()
            .filter(|t| matches!(t.dtype.as_str(), "F8_E4M3" | "I8" | "U8"))
            .filter_map(|t| t.name.strip_suffix(".weight"))
            .collect();
        let is_scale = |name: &str| {
            name.ends_with("_scale_inv")
                || name
                    .strip_suffix(".scale")
                    .is_some_and(|b| quantized_bases.contains(b))
        };
        let is_scale: Vec<Vec<bool>> = headers
            .iter()
            .map(|h| h.iter().map(|t| is_scale(&t.name)).collect())
            .collect();
        let mut scales: HashMap<String, (usize, HeaderTensor, ScaleDtype)> = HashMap::new();
        let mut packed: Vec<(String, Quantized)> = vec![];
        // Every text tensor's shard, scales included, for the index check.
        let mut holders: HashMap<String, usize> = HashMap::new();
        for (shard, header) in headers.into_iter().enumerate() {
            for (t, scale) in header.into_iter().zip(&is_scale[shard]) {
                if !layout.is_text(&t.name) {
                    continue;
                }
                let file = shards[shard].display();
                holders.insert(t.name.clone(), shard);
                if *scale {
                    let sd = ScaleDtype::from_safetensors(&t.dtype).ok_or_else(|| {
                        anyhow!("tensor {} in {file} has dtype {}; scales are F32, BF16, F16 or F8_E8M0", t.name, t.dtype)
                    })?;
                    scales.insert(t.name.clone(), (shard, t, sd));
                    continue;
                }
                let (dtype, quant) = match t.dtype.as_str() {
                    "F32" => (DType::F32, None),
                    "BF16" => (DType::BF16, None),
                    "F16" => (DType::F16, None),
                    "I64" => (DType::I64, None),
                    "F8_E4M3" => (DType::F32, Some(Quantized::Fp8E4m3)),
                    "I8" | "U8" => (DType::F32, Some(Quantized::Fp4Packed)),
                    other => bail!(
                        "tensor {} in {file} has dtype {other}; llmarch loads F32, BF16 and F16 weights (and FP8/FP4 with scales)",
                        t.name,
                    ),
                };
                if let Some(prev) = tensors.get(&t.name) {
                    bail!(
                        "tensor {} is in both {} and {}",
                        t.name,
                        shards[prev.shard].display(),
                        file
                    );
                }
                if let Some(kind) = quant {
                    packed.push((t.name.clone(), kind));
                }
                let shape = match quant {
                    Some(kind) => quantized::logical_shape(kind, &t.shape),
                    None => t.shape,
                };
                let entry = TensorEntry {
                    shard,
                    dtype,
                    shape,
                    start: t.start,
                    end: t.end,
                    quantized: None,
                };
                tensors.insert(t.name, entry);
            }
        }
        for (name, kind) in packed {
            let scale_name = match name.strip_suffix(".weight") {
                Some(base) => format!("{base}.weight_scale_inv"),
                None => format!("{name}_scale_inv"),
            };
            let e = tensors.get_mut(&name).expect("indexed above");
            let file = shards[e.shard].display();
            let found = scales.remove(&scale_name).or_else(|| {
                let base = name.strip_suffix(".weight")?;
                scales.remove(&format!("{base}.scale"))
            });
            let Some((scale_shard, st, scale_dtype)) = found else {
                bail!(
                    "tensor {name} in {file} is quantized ({kind:?}) but its scales (`{scale_name}`, or `.scale` beside the weight) are missing from the checkpoint"
                );
            };
            let block = match (kind, opts.fp8_block) {
                (Quantized::Fp8E4m3, None) => bail!(
                    "tensor {name} in {file} is F8_E4M3, but config.json has no fp8 `quantization_config`"
                ),
                (Quantized::Fp8E4m3, Some(b)) => b,
                (Quantized::Fp4Packed, _) => (1, quantized::FP4_GROUP),
            };
            let want = quantized::scale_shape(kind, &e.shape, block);
            if st.shape != want {
                bail!(
                    "tensor {scale_name} in {} has shape {:?}, but the {kind:?} weight {name} {:?} needs {want:?} (blocks {block:?})",
                    shards[scale_shard].display(),
                    st.shape,
                    e.shape
                );
            }
            e.quantized = Some(QuantizedEntry {
                kind,
                scale_dtype,
                scale_shard,
                scale_start: st.start,
                scale_end: st.end,
                block,
            });
        }
        if let Some(orphan) = scales.keys().min() {
            bail!("tensor {orphan} holds scales, but there is no quantized weight it belongs to");
        }
        if tensors.is_empty() {
            bail!("{} hold no text-model tensor", shard_list(shards));
        }
        // 4. The index must agree with the shards about the text tensors (scales included; its
        //    names renamed as the shards' were).
        if let Some(index_path) = index {
            let index = ShardIndex::read(index_path)?;
            for (name, file) in &index.weight_map {
                let name = match opts.rename {
                    Some(rename) => rename(name),
                    None => name.clone(),
                };
                if !layout.is_text(&name) {
                    continue;
                }
                let holder = holders
                    .get(&name)
                    .map(|&shard| shards[shard].file_name().and_then(|f| f.to_str()));
                match holder {
                    Some(Some(f)) if f == file => {}
                    Some(Some(f)) => bail!(
                        "{} puts tensor {name} in {file}, but {f} holds it",
                        index_path.display()
                    ),
                    _ => bail!(
                        "{} lists tensor {name} in {file}, but no loaded shard holds it",
                        index_path.display()
                    ),
                }
            }
        }
        Ok(Weights {
            store: Arc::new(Store {
                shards: mapped,
                tensors,
                layout,
                loaded_bytes: AtomicU64::new(0),
                used: Mutex::new(BTreeSet::new()),
            }),
            dtype,
            device: device.clone(),
        })
    }

    /// A `VarBuilder` at the root of every (text) tensor name, e.g. `model.language_model.`
    /// is reached through `.pp("model").pp("language_model")`.
    pub fn root_vb(&self) -> VarBuilder<'static> {
        VarBuilder::from_backend(
            Box::new(Backend(self.store.clone())),
            self.dtype,
            self.device.clone(),
        )
    }

    /// Whether any tensor's name starts with `prefix` (e.g. `mtp.`).
    pub fn has_prefix(&self, prefix: &str) -> bool {
        self.store.tensors.keys().any(|n| n.starts_with(prefix))
    }

    /// A `VarBuilder` positioned at the text model (`embed_tokens`, `layers.N...`, `norm`).
    pub fn text_vb(&self) -> VarBuilder<'static> {
        match self.store.layout.root.trim_end_matches('.') {
            "" => self.root_vb(),
            root => self.root_vb().pp(root),
        }
    }

    /// A `VarBuilder` at the LM head (`.get(shape, "weight")`), or `None` when the checkpoint
    /// has none and the head is tied to the token embedding.
    pub fn lm_head_vb(&self) -> Option<VarBuilder<'static>> {
        let name = format!("{}weight", self.store.layout.lm_head);
        self.store.tensors.contains_key(&name).then(|| {
            self.root_vb()
                .pp(self.store.layout.lm_head.trim_end_matches('.'))
        })
    }

    /// The LM head's weight `[vocab, hidden]` in the load dtype, or `None` when tied.
    pub fn lm_head(&self, vocab: usize, hidden: usize) -> Result<Option<Tensor>> {
        match self.lm_head_vb() {
            Some(vb) => Ok(Some(vb.get((vocab, hidden), "weight")?)),
            None => Ok(None),
        }
    }

    /// Serves the dense F32/BF16/F16 tensors straight from the mappings (for
    /// [`with_weight_format`](crate::layers::linear::with_weight_format)); a tensor it serves is
    /// counted as loaded and used.
    pub fn mapped_source(&self) -> Arc<dyn MappedSource> {
        Arc::new(Backend(self.store.clone()))
    }

    /// The dtype most of the text tensors' bytes are stored in (FP8/FP4 count as F32, the dtype
    /// they are dequantized to).
    pub fn stored_dtype(&self) -> DType {
        let mut bytes: Vec<(DType, u64)> = vec![];
        for e in self.store.tensors.values() {
            let n = (e.end - e.start) as u64;
            match bytes.iter_mut().find(|(d, _)| *d == e.dtype) {
                Some(slot) => slot.1 += n,
                None => bytes.push((e.dtype, n)),
            }
        }
        bytes
            .into_iter()
            .max_by_key(|&(_, n)| n)
            .map_or(DType::F32, |(d, _)| d)
    }

    /// The block-quantized formats the checkpoint stores (`fp8`, `fp4`), dequantized as read.
    pub fn quantized_formats(&self) -> Vec<&'static str> {
        let mut out = vec![];
        for e in self.store.tensors.values() {
            let name = match e.quantized.as_ref().map(|q| q.kind) {
                Some(quantized::Quantized::Fp8E4m3) => "fp8",
                Some(quantized::Quantized::Fp4Packed) => "fp4",
                None => continue,
            };
            if !out.contains(&name) {
                out.push(name);
            }
        }
        out.sort();
        out.reverse(); // fp8 first
        out
    }

    /// The detected layout (text root and LM head prefixes).
    pub fn layout(&self) -> Layout {
        self.store.layout
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Is there a text tensor of this name (relative to the text root)?
    pub fn has_text_tensor(&self, name: &str) -> bool {
        self.store
            .tensors
            .contains_key(&format!("{}{name}", self.store.layout.root))
    }

    /// The text tensors (full names), with dtype and shape as stored.
    pub fn tensors(&self) -> impl Iterator<Item = (&str, &TensorEntry)> {
        self.store.tensors.iter().map(|(n, e)| (n.as_str(), e))
    }

    /// Bytes of the tensors handed out so far, in the load dtype: what the model holds.
    pub fn loaded_bytes(&self) -> u64 {
        self.store.loaded_bytes.load(Ordering::Relaxed)
    }

    /// Bytes of every text tensor in the load dtype: what loading all of them costs.
    pub fn text_bytes(&self) -> u64 {
        let size = self.dtype.size_in_bytes() as u64;
        self.store
            .tensors
            .values()
            .map(|e| e.shape.iter().product::<usize>() as u64 * size)
            .sum()
    }

    /// Text tensors that were never loaded, sorted: weights the model ignored (e.g. k/v
    /// projections some checkpoints keep on KV-shared layers).
    pub fn unused(&self) -> Vec<String> {
        let used = self
            .store
            .used
            .lock()
            .map(|u| u.clone())
            .unwrap_or_default();
        let mut names: Vec<String> = self
            .store
            .tensors
            .keys()
            .filter(|n| !used.contains(*n))
            .cloned()
            .collect();
        names.sort();
        names
    }
}

fn shard_list(shards: &[PathBuf]) -> String {
    match shards {
        [one] => one.display().to_string(),
        many => format!(
            "{} shards in {}",
            many.len(),
            many[0]
                .parent()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        ),
    }
}

/// A tensor as the header describes it, after validation.
#[derive(Debug)]
struct HeaderTensor {
    name: String,
    dtype: String,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// Bits per element of every dtype the safetensors format knows (the crate's own table).
fn dtype_bits(dtype: &str) -> Option<usize> {
    serde_json::from_value::<safetensors::Dtype>(serde_json::Value::String(dtype.to_string()))
        .ok()
        .map(|d| d.bitsize())
}

/// Validate a safetensors header against the file and itself; return its tensors with
/// absolute byte ranges.
fn parse_header(path: &Path, bytes: &[u8]) -> Result<Vec<HeaderTensor>> {
    let file = path.display();
    let len = bytes.len();
    // 1. The 8-byte little-endian header length, and the header inside the file.
    let Some(n) = bytes.get(..8) else {
        bail!("{file} is {len} bytes: too short for a safetensors file (truncated?)");
    };
    let n = u64::from_le_bytes(n.try_into().expect("8 bytes"));
    if n > MAX_HEADER as u64 {
        bail!("{file}: the header claims {n} bytes (limit {MAX_HEADER}): not a safetensors file, or corrupt");
    }
    let n = n as usize;
    let data_start = 8 + n;
    if data_start > len {
        bail!(
            "{file}: the header claims {n} bytes but the file has only {len}: truncated or corrupt"
        );
    }
    let text = std::str::from_utf8(&bytes[8..data_start])
        .map_err(|e| anyhow!("{file}: the header is not UTF-8: {e}"))?;
    let raw: serde_json::Map<String, serde_json::Value> = serde_json::from_str(text)
        .map_err(|e| anyhow!("{file}: the header is not a JSON object: {e}"))?;
    let data_len = len - data_start;
    // 2. Each tensor: known dtype, a shape, offsets matching dtype × shape.
    let mut tensors = vec![];
    for (name, info) in raw {
        if name == "__metadata__" {
            continue;
        }
        let bad = |why: String| anyhow!("{file}: tensor {name}: {why}");
        let dtype = info
            .get("dtype")
            .and_then(|d| d.as_str())
            .ok_or_else(|| bad("no `dtype` string".into()))?
            .to_string();
        let bits = dtype_bits(&dtype).ok_or_else(|| bad(format!("unknown dtype {dtype}")))?;
        let shape = info
            .get("shape")
            .and_then(|s| s.as_array())
            .ok_or_else(|| bad("no `shape` list".into()))?
            .iter()
            .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(|| bad("a dimension is not a non-negative integer".into()))?;
        let offsets = info
            .get("data_offsets")
            .and_then(|o| o.as_array())
            .filter(|o| o.len() == 2)
            .and_then(|o| Some((o[0].as_u64()?, o[1].as_u64()?)))
            .ok_or_else(|| bad("`data_offsets` is not [begin, end]".into()))?;
        let (begin, end) = (offsets.0 as usize, offsets.1 as usize);
        if end < begin {
            return Err(bad(format!("data_offsets [{begin}, {end}] run backwards")));
        }
        let nbits = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .and_then(|e| e.checked_mul(bits))
            .ok_or_else(|| bad(format!("shape {shape:?} overflows")))?;
        if nbits % 8 != 0 {
            return Err(bad(format!(
                "shape {shape:?} of {dtype} is not a whole number of bytes"
            )));
        }
        let need = nbits / 8;
        if end - begin != need {
            return Err(bad(format!(
                "{dtype} {shape:?} needs {need} bytes but data_offsets [{begin}, {end}] hold {}",
                end - begin
            )));
        }
        if end > data_len {
            return Err(bad(format!(
                "data_offsets [{begin}, {end}] pass the end of the data ({data_len} bytes): the file is truncated or the header lies"
            )));
        }
        tensors.push(HeaderTensor {
            name,
            dtype,
            shape,
            start: begin,
            end,
        });
    }
    // 3. The ranges tile the data section: no overlap, no hole, nothing after.
    tensors.sort_by_key(|t| (t.start, t.end));
    let mut at = 0usize;
    for t in &tensors {
        if t.start != at {
            let why = if t.start < at {
                "overlaps the tensor before it"
            } else {
                "leaves a hole before it"
            };
            bail!(
                "{file}: tensor {} starts at byte {} but the data before it ends at {at}: the header {why}",
                t.name,
                t.start
            );
        }
        at = t.end;
    }
    if at != data_len {
        bail!(
            "{file}: the header accounts for {at} data bytes but the file holds {data_len}: {}",
            if at > data_len {
                "truncated"
            } else {
                "trailing bytes no tensor owns"
            }
        );
    }
    // 4. Second opinion: the safetensors crate's own validation.
    safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| anyhow!("{file}: invalid safetensors: {e}"))?;
    for t in &mut tensors {
        t.start += data_start;
        t.end += data_start;
    }
    Ok(tensors)
}

/// The `VarBuilder` backend over the validated mappings.
struct Backend(Arc<Store>);

impl Backend {
    fn entry(&self, name: &str) -> candle_core::Result<&TensorEntry> {
        self.0.tensors.get(name).ok_or_else(|| {
            let store = &self.0;
            let hint = if !name.starts_with(store.layout.root)
                && !name.starts_with(store.layout.lm_head)
            {
                format!(
                    " (this checkpoint's text tensors are under `{}`)",
                    store.layout.root
                )
            } else {
                String::new()
            };
            candle_core::Error::Msg(format!(
                "tensor {name} is missing from {}{hint}",
                shard_list(
                    &store
                        .shards
                        .iter()
                        .map(|s| s.path.clone())
                        .collect::<Vec<_>>()
                )
            ))
        })
    }

    fn load(
        &self,
        name: &str,
        e: &TensorEntry,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if matches!(e.dtype, DType::I64) != matches!(dtype, DType::I64) {
            return Err(candle_core::Error::Msg(format!(
                "tensor {name} holds {} ({:?}) but is read as {dtype:?}",
                if e.dtype == DType::I64 {
                    "integers"
                } else {
                    "floats"
                },
                e.dtype
            )));
        }
        let shard = &self.0.shards[e.shard];
        // In bounds: checked against the file length when the header was validated.
        let bytes = &shard.mmap[e.start..e.end];
        let t = match &e.quantized {
            None => Tensor::from_raw_buffer(bytes, e.dtype, &e.shape, dev)?,
            Some(q) => {
                let scales = &self.0.shards[q.scale_shard].mmap[q.scale_start..q.scale_end];
                let values =
                    quantized::dequantize(q.kind, bytes, &e.shape, scales, q.scale_dtype, q.block)
                        .map_err(|err| candle_core::Error::Msg(format!("tensor {name}: {err}")))?;
                Tensor::from_vec(values, e.shape.as_slice(), dev)?
            }
        }
        .to_dtype(dtype)?;
        // Page-cache pages of this range are no longer needed: drop them from our mapping so
        // the resident set holds only the loaded copy.
        shard.mmap.advise(e.start..e.end, false);
        let bytes = (t.elem_count() * dtype.size_in_bytes()) as u64;
        self.0.loaded_bytes.fetch_add(bytes, Ordering::Relaxed);
        if let Ok(mut used) = self.0.used.lock() {
            used.insert(name.to_string());
        }
        Ok(t)
    }
}

impl MappedSource for Backend {
    fn mapped(&self, name: &str, shape: &[usize]) -> Result<Option<MappedTensor>> {
        // A missing tensor is left to the `VarBuilder`, whose error names it.
        let Some(e) = self.0.tensors.get(name) else {
            return Ok(None);
        };
        let shard = &self.0.shards[e.shard];
        if e.shape.as_slice() != shape {
            bail!(
                "tensor `{name}` has shape {:?}, but this model needs {shape:?} ({})",
                e.shape,
                shard.path.display()
            );
        }
        if e.quantized.is_some() {
            return Ok(None);
        }
        let bytes: SharedBytes = shard.mmap.clone();
        let m = MappedTensor::new(bytes, e.start, e.end, e.dtype, e.shape.clone())?
            .map(|m| m.with_name(name));
        if m.is_some() {
            let n = (e.end - e.start) as u64;
            self.0.loaded_bytes.fetch_add(n, Ordering::Relaxed);
            if let Ok(mut used) = self.0.used.lock() {
                used.insert(name.to_string());
            }
        }
        Ok(m)
    }
}

impl SimpleBackend for Backend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let e = self.entry(name)?;
        if e.shape.as_slice() != s.dims() {
            return Err(candle_core::Error::Msg(format!(
                "tensor {name} has shape {:?} but the model needs {:?} ({})",
                e.shape,
                s.dims(),
                self.0.shards[e.shard].path.display()
            )));
        }
        self.load(name, e, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let e = self.entry(name)?;
        self.load(name, e, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.tensors.contains_key(name)
    }
}
