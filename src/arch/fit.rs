//! `kv-budget --fit`: does a model fit a set of GPUs when vLLM or SGLang serves it, and with
//! which split. llmarch runs no cluster of its own; this is the plan an engine would make, with
//! every assumption stated ([`assumptions`]) so a reader can check it against their engine.
//!
//! The model of an engine is deliberately small and explicit:
//! - **GPUs**: one table of names → memory as the driver reports it ([`GPUS`]), or a size.
//! - **Memory**: the engine's fraction of each GPU (vLLM's `gpu_memory_utilization` 0.9, SGLang's
//!   `mem_fraction_static`), minus the weights on that GPU, minus an activation headroom (inside
//!   vLLM's fraction; outside SGLang's static one), is what the KV cache may take.
//! - **Tensor parallel** (TP, inside a node): a power of two dividing every layer's query heads.
//!   KV heads are split when TP ≤ KV heads and replicated (one head per rank) when TP is larger,
//!   as both engines do, so a single-KV-head model (DeepSeek V4) holds its whole cache on every
//!   rank. Gated DeltaNet heads are split and never replicated: TP above them is refused.
//! - **Pipeline parallel** (PP, across nodes): contiguous stages as vLLM's `get_pp_indices` cuts
//!   them; each layer's weights counted equal (the body ÷ the layers), the embedding on the
//!   first stage, the output head on the last. The tightest stage decides.
//! - **Expert parallel** (EP = TP, `--enable-expert-parallel`): the routed experts divided over
//!   the ranks; the bytes per GPU are those of TP-sharded experts either way.
//! - **KV**: the per-layer cache of [`budget`], split per rank as above; what the engine
//!   reserves rounds each sequence up to whole pages and sizes the states that depend on where a
//!   compression window stands at their largest ([`budget::reserved_layer_bytes`]).
//!
//! Arithmetic runs in u128 and is checked into u64 ([`budget::checked`]).

use super::budget::{self, KvDtype};
use super::{ArchSpec, Attention, Ffn, LayerSpec};
use anyhow::{anyhow, bail, Result};
use serde::Serialize;
use serde_json::Value;
use std::ops::Range;

/// A GPU model llmarch knows by name.
pub struct Gpu {
    pub name: &'static str,
    /// Other names for the same memory size.
    pub aliases: &'static [&'static str],
    /// Memory in MiB as the driver reports its total (`nvidia-smi`; AMD: the nominal size).
    pub mib: u64,
}

/// The GPUs `--gpu` knows by name.
pub const GPUS: &[Gpu] = &[
    gpu("h100", &["h100-80g", "h100-sxm", "h100-pcie"], 81_559),
    gpu("h100-nvl", &["h100-94g"], 95_830),
    gpu("h200", &["h200-141g"], 143_771),
    gpu("b200", &[], 183_359),
    gpu("a100-40g", &[], 40_960),
    gpu("a100-80g", &[], 81_920),
    gpu("l40s", &[], 46_068),
    gpu("l4", &[], 23_034),
    gpu("rtx4090", &["4090"], 24_564),
    gpu("rtx5090", &["5090"], 32_607),
    gpu("rtx6000-ada", &[], 49_140),
    gpu("mi300x", &[], 192 << 10),
    gpu("mi325x", &[], 256 << 10),
];

const fn gpu(name: &'static str, aliases: &'static [&'static str], mib: u64) -> Gpu {
    Gpu { name, aliases, mib }
}

/// The most GPUs a plan takes, and the most memory per GPU: far beyond any real cluster.
const MAX_GPUS: u64 = 1 << 16;
const MAX_GPU_BYTES: u128 = 1 << 50;

/// `--gpu`: which GPUs, how many per node, how many nodes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Cluster {
    /// The GPU's name, or the size given.
    pub gpu: String,
    /// Memory per GPU in bytes.
    pub memory: u64,
    pub per_node: u64,
    pub nodes: u64,
}

impl Cluster {
    pub fn gpus(&self) -> u64 {
        self.per_node * self.nodes
    }

    /// `h200:8`, `a100-80g:4x2` (4 per node × 2 nodes), `h100` (one), `96GiB:2` or `80GB`: a clap
    /// value parser, so the error names the flag.
    pub fn parse(s: &str) -> std::result::Result<Cluster, String> {
        let s = s.trim();
        let (name, count) = match s.split_once(':') {
            Some((n, c)) => (n.trim(), Some(c.trim())),
            None => (s, None),
        };
        let (per_node, nodes) = match count {
            None => (1, 1),
            Some(c) => {
                let (a, b) = c.split_once(['x', 'X']).unwrap_or((c, "1"));
                let n = |t: &str, what: &str| -> std::result::Result<u64, String> {
                    let v: u64 = t.trim().parse().map_err(|_| {
                        format!("`{s}`: {what} `{t}` is not a number (e.g. h200:8 or a100-80g:4x2)")
                    })?;
                    if v == 0 {
                        return Err(format!("`{s}`: {what} must be at least 1"));
                    }
                    Ok(v)
                };
                (n(a, "GPUs per node")?, n(b, "nodes")?)
            }
        };
        if per_node.checked_mul(nodes).is_none_or(|g| g > MAX_GPUS) {
            return Err(format!("`{s}`: more than {MAX_GPUS} GPUs"));
        }
        let lower = name.to_ascii_lowercase();
        let memory = match GPUS
            .iter()
            .find(|g| g.name == lower || g.aliases.contains(&lower.as_str()))
        {
            Some(g) => g.mib << 20,
            None => memory_size(&lower).map_err(|why| {
                let names: Vec<&str> = GPUS.iter().map(|g| g.name).collect();
                format!(
                    "`{name}` is {why}; known GPUs: {}; or a memory size such as 80GB or 96GiB",
                    names.join(", ")
                )
            })?,
        };
        Ok(Cluster {
            gpu: name.to_string(),
            memory,
            per_node,
            nodes,
        })
    }
}

/// `80gb` (10^9 bytes), `96gib` (2^30), `1.5tb`, `512mib`: bytes. Says why not.
pub fn memory_size(s: &str) -> std::result::Result<u64, String> {
    let lower = s.trim().to_ascii_lowercase();
    const UNITS: [(&str, f64); 6] = [
        ("gib", (1u64 << 30) as f64),
        ("tib", (1u64 << 40) as f64),
        ("mib", (1u64 << 20) as f64),
        ("gb", 1e9),
        ("tb", 1e12),
        ("mb", 1e6),
    ];
    let Some((num, unit)) = UNITS
        .iter()
        .find_map(|(u, m)| lower.strip_suffix(u).map(|n| (n, *m)))
    else {
        return Err(
            "not a GPU name llmarch knows, nor a size with a unit (GB, GiB, TB, ...)".into(),
        );
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("not a size: `{num}` is not a number"))?;
    let bytes = v * unit;
    if !bytes.is_finite() || bytes < 1.0 || bytes > MAX_GPU_BYTES as f64 {
        return Err("a size out of range (1 byte to 1 PiB)".into());
    }
    Ok(bytes.round() as u64)
}

/// The serving engine whose plan is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Engine {
    Vllm,
    Sglang,
}

impl Engine {
    pub fn name(self) -> &'static str {
        match self {
            Engine::Vllm => "vLLM",
            Engine::Sglang => "SGLang",
        }
    }

    /// The share of each GPU the engine takes by default, in parts per million.
    pub fn default_fraction_ppm(self) -> u64 {
        match self {
            Engine::Vllm => 900_000,
            Engine::Sglang => 850_000,
        }
    }

    /// Tokens per KV page: each sequence's context is rounded up to a whole page.
    pub fn page_tokens(self) -> u64 {
        match self {
            Engine::Vllm => 16,
            Engine::Sglang => 1,
        }
    }

    /// Whether the activation headroom comes out of the engine's share (vLLM) or out of what the
    /// share leaves (SGLang's static fraction holds only weights and KV).
    fn headroom_inside(self) -> bool {
        self == Engine::Vllm
    }
}

/// `--weights`: the format the engine holds the weights in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightsArg {
    /// The checkpoint's own format: its dtype, or DeepSeek V4's FP8 with FP4 routed experts
    AsShipped,
    Bf16,
    /// 1 byte per weight (block scales, under 0.03 %, not counted)
    Fp8,
    /// e2m1 with one 1-byte scale per 32 weights (MXFP4, as DeepSeek V4's experts): 17/32 byte
    Fp4,
    /// GGML blocks of 32 with an f16 scale: 34/32 byte
    #[value(name = "q8_0")]
    Q8_0,
    /// GGML blocks of 32 with an f16 scale: 18/32 byte
    #[value(name = "q4_0")]
    Q4_0,
}

/// Bytes per weight, as the fraction `num / den`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub name: &'static str,
    pub num: u128,
    pub den: u128,
}

impl Rate {
    pub const F32: Rate = Rate {
        name: "f32",
        num: 4,
        den: 1,
    };
    pub const BF16: Rate = Rate {
        name: "bf16",
        num: 2,
        den: 1,
    };
    pub const F16: Rate = Rate {
        name: "f16",
        num: 2,
        den: 1,
    };
    pub const FP8: Rate = Rate {
        name: "fp8",
        num: 1,
        den: 1,
    };
    pub const FP4: Rate = Rate {
        name: "fp4",
        num: 17,
        den: 32,
    };
    pub const Q8_0: Rate = Rate {
        name: "q8_0",
        num: 34,
        den: 32,
    };
    pub const Q4_0: Rate = Rate {
        name: "q4_0",
        num: 18,
        den: 32,
    };

    pub fn bytes(self, params: u128) -> u128 {
        (params * self.num).div_ceil(self.den)
    }
}

/// How the weights are held: lookup tables (embedding, per-layer embedding, output head), the
/// routed experts, everything else.
#[derive(Debug, Clone, PartialEq)]
pub struct Weights {
    pub label: String,
    pub tables: Rate,
    pub experts: Rate,
    pub dense: Rate,
}

impl Weights {
    /// The format `arg` names for `spec`, whose `config.json` is `raw` (for as shipped).
    pub fn of(arg: WeightsArg, spec: &ArchSpec, raw: &Value) -> Result<Weights> {
        let quantized = |r: Rate| Weights {
            label: format!("{} (tables bf16)", r.name),
            tables: Rate::BF16,
            experts: r,
            dense: r,
        };
        Ok(match arg {
            WeightsArg::Bf16 => Weights {
                label: "bf16".into(),
                tables: Rate::BF16,
                experts: Rate::BF16,
                dense: Rate::BF16,
            },
            WeightsArg::Fp8 => quantized(Rate::FP8),
            WeightsArg::Fp4 => quantized(Rate::FP4),
            WeightsArg::Q8_0 => quantized(Rate::Q8_0),
            WeightsArg::Q4_0 => quantized(Rate::Q4_0),
            WeightsArg::AsShipped => Weights::shipped(spec, raw)?,
        })
    }

    /// The checkpoint's own format: `quantization_config` (FP8 blocks; DeepSeek V4's routed
    /// experts FP4, as the Hub ships them), else the config's dtype (bf16 when it names none).
    fn shipped(spec: &ArchSpec, raw: &Value) -> Result<Weights> {
        let stored = match spec.dtype.as_deref() {
            Some("float32") => Rate::F32,
            Some("float16") => Rate::F16,
            _ => Rate::BF16,
        };
        let text = raw.get("text_config").unwrap_or(raw);
        let quant = raw
            .get("quantization_config")
            .or_else(|| text.get("quantization_config"))
            .filter(|q| !q.is_null());
        let Some(q) = quant else {
            return Ok(Weights {
                label: format!("as shipped: {}", stored.name),
                tables: stored,
                experts: stored,
                dense: stored,
            });
        };
        let method = q.get("quant_method").and_then(Value::as_str).unwrap_or("");
        if method != "fp8" {
            bail!(
                "--weights as-shipped: llmarch does not know the size of `quant_method` = `{}` weights\nhint: give the format the engine holds them in, e.g. --weights fp8 or fp4",
                method.escape_debug()
            );
        }
        let fp4_experts = text.get("expert_dtype").and_then(Value::as_str) == Some("fp4")
            || spec.family == "deepseek_v4";
        Ok(if fp4_experts {
            Weights {
                label: "as shipped: fp8 + fp4 experts".into(),
                tables: stored,
                experts: Rate::FP4,
                dense: Rate::FP8,
            }
        } else {
            Weights {
                label: "as shipped: fp8".into(),
                tables: stored,
                experts: Rate::FP8,
                dense: Rate::FP8,
            }
        })
    }
}

/// A model's parameters in the groups whose placement differs.
#[derive(Debug, Clone, Copy)]
struct Parts {
    /// Token embedding plus per-layer embedding: the first stage.
    first: u128,
    /// The untied output head, or (tied) the embedding a last stage of its own must copy.
    head: u128,
    tied: bool,
    experts: u128,
    /// Everything else: the decoder layers' dense weights, norms, routers.
    dense: u128,
}

impl Parts {
    fn of(spec: &ArchSpec) -> Parts {
        let p = &spec.params;
        let first = p.embedding as u128 + p.ple as u128;
        let tied = p.lm_head == 0;
        let head = if tied { p.embedding } else { p.lm_head } as u128;
        let outside = first + if tied { 0 } else { head } + p.routed_experts as u128;
        Parts {
            first,
            head,
            tied,
            experts: p.routed_experts as u128,
            dense: (p.total as u128).saturating_sub(outside),
        }
    }
}

/// Weight bytes of the whole model in `w`.
pub fn total_weight_bytes(spec: &ArchSpec, w: &Weights) -> u128 {
    let p = Parts::of(spec);
    let head = if p.tied { 0 } else { w.tables.bytes(p.head) };
    w.tables.bytes(p.first) + head + w.experts.bytes(p.experts) + w.dense.bytes(p.dense)
}

/// The layers of each pipeline stage, as vLLM's `get_pp_indices` cuts them: equal stages, the
/// remainder one layer each to the stages just before the last.
pub fn stages(layers: usize, pp: usize) -> Vec<Range<usize>> {
    let mut sizes = vec![layers / pp; pp];
    for i in 2..(layers % pp) + 2 {
        sizes[pp - i] += 1;
    }
    let mut start = 0;
    sizes
        .into_iter()
        .map(|n| {
            start += n;
            start - n..start
        })
        .collect()
}

/// Why `spec` cannot run with tensor parallel `tp` and pipeline parallel `pp`, if it cannot.
pub fn check_split(spec: &ArchSpec, tp: u64, pp: u64) -> std::result::Result<(), String> {
    if tp == 0 || pp == 0 {
        return Err("a parallel size must be at least 1".into());
    }
    if pp > spec.layers.len() as u64 {
        return Err(format!(
            "pipeline parallel {pp} is more stages than its {} layers",
            spec.layers.len()
        ));
    }
    for l in &spec.layers {
        let (q, kv) = (l.q_heads as u64, l.kv_heads as u64);
        let i = l.index;
        if !q.is_multiple_of(tp) {
            return Err(format!(
                "tensor parallel {tp} does not divide layer {i}'s {q} query heads"
            ));
        }
        if l.attention == Attention::Linear {
            if !kv.is_multiple_of(tp) {
                return Err(format!(
                    "tensor parallel {tp} does not divide layer {i}'s {kv} DeltaNet key heads, which vLLM and SGLang split and never replicate"
                ));
            }
        } else if tp <= kv && !kv.is_multiple_of(tp) {
            return Err(format!(
                "tensor parallel {tp} does not divide layer {i}'s {kv} KV heads"
            ));
        } else if tp > kv && !tp.is_multiple_of(kv.max(1)) {
            return Err(format!(
                "layer {i}'s {kv} KV heads cannot be replicated evenly over tensor parallel {tp}"
            ));
        }
    }
    Ok(())
}

/// The share of a layer's cache one TP rank holds, as `(num, den)`.
fn rank_share(l: &LayerSpec, tp: u64) -> (u128, u128) {
    let kv = (l.kv_heads as u64).max(1);
    if l.attention == Attention::Linear || tp <= kv {
        (1, tp as u128)
    } else {
        (1, kv as u128) // one head per rank, replicated tp / kv times
    }
}

fn share(bytes: u128, (num, den): (u128, u128)) -> u128 {
    (bytes * num).div_ceil(den)
}

/// The routed experts per layer, for MoE models.
fn routed_experts(spec: &ArchSpec) -> Option<u64> {
    spec.layers.iter().find_map(|l| match l.ffn {
        Ffn::Moe { experts, .. } => Some(experts as u64),
        Ffn::Dense { .. } => None,
    })
}

/// What `--fit` was asked.
#[derive(Debug, Clone)]
pub struct Request {
    pub cluster: Cluster,
    pub engine: Engine,
    pub weights: Weights,
    pub kv: KvDtype,
    pub context: u64,
    pub batch: u64,
    /// The engine's share of each GPU, parts per million.
    pub fraction_ppm: u64,
    /// Activation headroom per GPU, bytes.
    pub headroom: u64,
    /// A pinned `(tp, pp)`; `None`: search.
    pub split: Option<(u64, u64)>,
}

/// A split and what it gives.
#[derive(Debug, Clone, Serialize)]
pub struct Split {
    pub tp: u64,
    pub pp: u64,
    /// Expert parallel size (= TP) when the routed experts divide evenly over the ranks.
    pub ep: Option<u64>,
    pub experts_per_gpu: Option<u64>,
    /// Each stage's layers, `[start, end)`.
    pub stages: Vec<[usize; 2]>,
    /// Layers whose KV heads are fewer than TP: replicated, one head per rank.
    pub replicated_kv_layers: usize,
}

/// One GPU of the tightest stage, in bytes.
#[derive(Debug, Clone, Serialize)]
pub struct PerGpu {
    pub memory: u64,
    /// The engine's share.
    pub usable: u64,
    pub weights: u64,
    /// What the engine reserves for the KV cache (whole pages, states at their largest).
    pub kv: u64,
    /// What the cache holds exactly at this context (`kv-budget`'s figure, per rank).
    pub kv_exact: u64,
    /// What an estimator blind to windows, compression, K=V and sharing counts, per rank.
    pub kv_blind: u64,
    pub headroom: u64,
    /// `usable − weights − KV − headroom` (headroom only where it comes out of the share).
    pub free: i64,
}

/// The plan for one model at one context and batch.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub split: Split,
    /// The stage whose GPUs have the least to spare.
    pub tightest_stage: usize,
    pub per_gpu: PerGpu,
    pub fits: bool,
    /// The largest context that fits at the batch asked (at most the model's own; 0: none).
    pub max_context: u64,
    /// The largest batch that fits at the context asked (0: none).
    pub max_batch: u64,
    pub weights_total: u64,
    /// Splits tried that the model cannot take, with why.
    pub refused: Vec<String>,
}

/// One split's arithmetic, reused by the searches.
struct Layout<'a> {
    spec: &'a ArchSpec,
    req: &'a Request,
    tp: u64,
    stages: Vec<Range<usize>>,
    /// Weight bytes per GPU of each stage.
    weights: Vec<u128>,
}

impl<'a> Layout<'a> {
    fn new(spec: &'a ArchSpec, req: &'a Request, tp: u64, pp: u64) -> Layout<'a> {
        let stages = stages(spec.layers.len(), pp as usize);
        let p = Parts::of(spec);
        let w = &req.weights;
        let body = w.dense.bytes(p.dense) + w.experts.bytes(p.experts);
        let layers = spec.layers.len().max(1) as u128;
        let last = stages.len() - 1;
        let weights = stages
            .iter()
            .enumerate()
            .map(|(s, r)| {
                let mut bytes = (body * r.len() as u128).div_ceil(layers);
                if s == 0 {
                    bytes += w.tables.bytes(p.first);
                }
                if s == last && (!p.tied || last > 0) {
                    bytes += w.tables.bytes(p.head);
                }
                bytes.div_ceil(tp as u128)
            })
            .collect();
        Layout {
            spec,
            req,
            tp,
            stages,
            weights,
        }
    }

    fn layers(&self, s: usize) -> &'a [LayerSpec] {
        &self.spec.layers[self.stages[s].clone()]
    }

    /// What the engine reserves per GPU of stage `s` for the KV cache.
    fn kv_reserved(&self, s: usize, context: u64, batch: u64) -> u128 {
        let page = self.req.engine.page_tokens();
        self.layers(s)
            .iter()
            .map(|l| {
                let b = budget::reserved_layer_bytes(l, context, page, batch, self.req.kv);
                share(b, rank_share(l, self.tp))
            })
            .sum()
    }

    fn headroom_taken(&self) -> u128 {
        if self.req.engine.headroom_inside() {
            self.req.headroom as u128
        } else {
            0
        }
    }

    fn usable(&self) -> u128 {
        self.req.cluster.memory as u128 * self.req.fraction_ppm as u128 / 1_000_000
    }

    /// Bytes to spare on stage `s`'s GPUs (negative: short by that much).
    fn spare(&self, s: usize, context: u64, batch: u64) -> i128 {
        let need = self.weights[s] + self.headroom_taken() + self.kv_reserved(s, context, batch);
        self.usable() as i128 - need as i128
    }

    fn fits(&self, context: u64, batch: u64) -> bool {
        (0..self.stages.len()).all(|s| self.spare(s, context, batch) >= 0)
    }

    /// The largest `n` in `1..=hi` with `ok(n)`, for `ok` true up to some point and false after
    /// (0 when `ok(1)` is false).
    fn largest(hi: u64, ok: impl Fn(u64) -> bool) -> u64 {
        if !ok(1) {
            return 0;
        }
        let (mut lo, mut hi) = (1, hi);
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            if ok(mid) {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        lo
    }

    fn plan(&self, refused: Vec<String>) -> Result<Plan> {
        let (req, spec, tp) = (self.req, self.spec, self.tp);
        let (context, batch) = (req.context, req.batch);
        let check = |v: u128| budget::checked(v, context, batch);
        let tightest = (0..self.stages.len())
            .min_by_key(|&s| self.spare(s, context, batch))
            .unwrap_or(0);
        let exact = budget::compute(spec, context, batch, req.kv)?;
        let layers = self.layers(tightest);
        let kv_exact: u128 = layers
            .iter()
            .map(|l| share(exact.layers[l.index].bytes as u128, rank_share(l, tp)))
            .sum();
        let kv_blind: u128 = layers
            .iter()
            .map(|l| {
                let b = budget::window_and_sharing_blind_bytes(l, context, batch, req.kv);
                share(b, rank_share(l, tp))
            })
            .sum();
        let spare = self.spare(tightest, context, batch);
        let free = i64::try_from(spare).map_err(|_| {
            anyhow!("the plan at {context} tokens × batch {batch} is beyond what llmarch counts")
        })?;
        let experts_per_gpu = routed_experts(spec)
            .filter(|e| tp > 1 && e.is_multiple_of(tp))
            .map(|e| e / tp);
        let per_gpu = PerGpu {
            memory: req.cluster.memory,
            usable: check(self.usable())?,
            weights: check(self.weights[tightest])?,
            kv: check(self.kv_reserved(tightest, context, batch))?,
            kv_exact: check(kv_exact)?,
            kv_blind: check(kv_blind)?,
            headroom: req.headroom,
            free,
        };
        Ok(Plan {
            split: Split {
                tp,
                pp: self.stages.len() as u64,
                ep: experts_per_gpu.map(|_| tp),
                experts_per_gpu,
                stages: self.stages.iter().map(|r| [r.start, r.end]).collect(),
                replicated_kv_layers: spec
                    .layers
                    .iter()
                    .filter(|l| {
                        l.attention != Attention::Linear
                            && !l.cache.is_empty()
                            && (l.kv_heads as u64) < tp
                    })
                    .count(),
            },
            tightest_stage: tightest,
            fits: free >= 0,
            max_context: Self::largest(spec.max_context as u64, |c| self.fits(c, batch)),
            max_batch: Self::largest(budget::MAX_BATCH, |b| self.fits(context, b)),
            weights_total: check(total_weight_bytes(spec, &req.weights))?,
            per_gpu,
            refused,
        })
    }
}

/// The splits a search tries, best first: TP a power of two dividing the GPUs per node, largest
/// first (inside a node, fewest pipeline stages), PP the rest.
fn candidates(c: &Cluster) -> Vec<(u64, u64)> {
    let mut tp = 1u64 << (63 - c.per_node.leading_zeros());
    let mut out = vec![];
    while tp >= 1 {
        if c.per_node.is_multiple_of(tp) {
            out.push((tp, c.gpus() / tp));
        }
        tp /= 2;
    }
    out
}

/// The plan for `spec`: the pinned split, or the first of [`candidates`] that the model takes
/// and that fits (else the first it takes). An error when it takes none.
pub fn plan(spec: &ArchSpec, req: &Request) -> Result<Plan> {
    if let Some((tp, pp)) = req.split {
        check_split(spec, tp, pp).map_err(|why| anyhow!("{why}"))?;
        return Layout::new(spec, req, tp, pp).plan(vec![]);
    }
    let mut refused = vec![];
    let mut first_ok: Option<Layout> = None;
    for (tp, pp) in candidates(&req.cluster) {
        if let Err(why) = check_split(spec, tp, pp) {
            refused.push(format!("TP {tp} × PP {pp}: {why}"));
            continue;
        }
        let layout = Layout::new(spec, req, tp, pp);
        if layout.fits(req.context, req.batch) {
            return layout.plan(refused);
        }
        first_ok.get_or_insert(layout);
    }
    match first_ok {
        Some(layout) => layout.plan(refused),
        None => bail!(
            "no split of {} × {} ({} per node) suits it: {}\nhint: give fewer GPUs per node, or pin a split with --tp and --pp",
            req.cluster.gpus(),
            req.cluster.gpu,
            req.cluster.per_node,
            refused.join("; ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clusters_parse_with_clear_errors() {
        let c = Cluster::parse("a100-80g:4x2").unwrap();
        assert_eq!((c.memory, c.per_node, c.nodes), (81_920 << 20, 4, 2));
        let c = Cluster::parse("H200:8").unwrap();
        assert_eq!((c.memory, c.gpus()), (143_771 << 20, 8));
        assert_eq!(Cluster::parse("96GiB:2").unwrap().memory, 96 << 30);
        assert_eq!(Cluster::parse("80GB").unwrap().memory, 80_000_000_000);
        for (bad, why) in [
            ("h200:0", "must be at least 1"),
            ("h200:4x0", "must be at least 1"),
            ("h300:8", "known GPUs: h100"),
            ("80:8", "a size with a unit"),
            ("h200:eight", "is not a number"),
            ("h200:65536x2", "more than 65536 GPUs"),
            ("0GB", "out of range"),
            ("9999999TB", "out of range"),
        ] {
            let e = Cluster::parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn stages_follow_vllm() {
        // get_pp_indices: 43 // 2 = 21 each, the one left over to the stage before the last.
        assert_eq!(stages(43, 2), vec![0..22, 22..43]);
        assert_eq!(stages(10, 4), vec![0..2, 2..5, 5..8, 8..10]);
        assert_eq!(stages(8, 1), vec![0..8]);
    }

    #[test]
    fn candidates_keep_tp_in_a_node() {
        let c = Cluster::parse("h100:8x2").unwrap();
        assert_eq!(candidates(&c), vec![(8, 2), (4, 4), (2, 8), (1, 16)]);
        let c = Cluster::parse("h100:6").unwrap();
        assert_eq!(candidates(&c), vec![(2, 3), (1, 6)]);
    }
}
