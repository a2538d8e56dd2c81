//! What `run` and `chat` share: the sampling flags (defaults from `generation_config.json`), the
//! device and dtype flags, and loading a model end to end (spec, files, tokenizer, weights).
//! Also what every command that reads user input shares: token counts with `k`/`m` suffixes
//! ([`parse_tokens`]), reading a file or stream with a size limit ([`read_limited`],
//! [`INPUT_LIMIT`]), and telling a closed stdout pipe from a real error ([`is_broken_pipe`]).

use super::Ctx;
use crate::arch::CausalLm;
use crate::arch::{self, budget::KvDtype, ArchSpec};
use crate::generate::sampler::Sampling;
use crate::layers::linear::{with_weight_format, Quantization, WeightFormat};
use crate::loader::generation_config::GenerationDefaults;
use crate::loader::model_files::{self, ModelFiles, ResolveOptions};
use crate::loader::quant_cache::{CacheUse, QuantCache};
use crate::loader::tokenizer::{self, TokenizerBundle};
use crate::loader::{weights, ModelRef};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device};
use std::sync::Arc;
use std::time::Instant;

/// Sampling flags.
#[derive(Debug, Clone, clap::Args)]
pub struct SamplingArgs {
    /// Tokens to generate at most (default: generation_config.json's, else 128).
    #[arg(short = 'n', long)]
    pub max_new_tokens: Option<usize>,
    /// 0 = greedy. Default: generation_config.json's when it samples, else 0.
    #[arg(long, allow_negative_numbers = true)]
    pub temperature: Option<f32>,
    /// Keep only the k most likely tokens.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches p.
    #[arg(long, allow_negative_numbers = true)]
    pub top_p: Option<f32>,
    /// Drop tokens less likely than min-p × the most likely one.
    #[arg(long, allow_negative_numbers = true)]
    pub min_p: Option<f32>,
    /// > 1 makes tokens already in the sequence less likely.
    #[arg(long, allow_negative_numbers = true)]
    pub repeat_penalty: Option<f32>,
    #[arg(long, default_value_t = 299_792_458)]
    pub seed: u64,
}

impl SamplingArgs {
    /// Sampling from the flags, filling what they leave open from generation_config.json.
    pub fn sampling(&self, defaults: &GenerationDefaults) -> Sampling {
        let samples = defaults.do_sample.unwrap_or(false);
        Sampling {
            temperature: self.temperature.unwrap_or(if samples {
                defaults.temperature.unwrap_or(1.0)
            } else {
                0.0
            }),
            top_k: self.top_k.or(if samples { defaults.top_k } else { None }),
            top_p: self.top_p.or(if samples { defaults.top_p } else { None }),
            min_p: self.min_p.or(if samples { defaults.min_p } else { None }),
            repeat_penalty: self
                .repeat_penalty
                .or(defaults.repetition_penalty)
                .unwrap_or(1.0),
            seed: self.seed,
        }
    }

    /// `-n`, else generation_config.json's, else 128.
    pub fn max_new_tokens(&self, defaults: &GenerationDefaults) -> usize {
        self.max_new_tokens
            .or(defaults.max_new_tokens)
            .unwrap_or(128)
    }
}

/// Talking to a server (`run`/`chat --endpoint`) instead of running the model here.
#[derive(Debug, Clone, clap::Args)]
pub struct EndpointArgs {
    /// An OpenAI-compatible server to generate with (vLLM, SGLang, llama.cpp's llama-server):
    /// `http://host:port` or `.../v1` (run: /v1/completions, chat: /v1/chat/completions), or the
    /// full URL of either. MODEL still gives the architecture (config.json only, no weights):
    /// the KV panel is computed from it for the token counts the server reports.
    #[arg(long, value_name = "URL")]
    pub endpoint: Option<String>,
    /// API key for --endpoint (default: $OPENAI_API_KEY); sent only to the endpoint, never
    /// printed.
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// The model name the server serves (default: the alias's or repo's id, else MODEL as
    /// given): vLLM's --served-model-name.
    #[arg(long, requires = "endpoint")]
    pub served_model: Option<String>,
    /// Seconds a silent server may take to connect or to send the next bytes (a long prompt's
    /// prefill sends nothing until it ends).
    #[arg(long, env = "LLMARCH_ENDPOINT_TIMEOUT", default_value = "300", value_parser = parse_seconds)]
    pub endpoint_timeout: f64,
    /// The server's KV cache element type, for the computed KV panel (--endpoint).
    #[arg(long, value_enum, default_value = "bf16", requires = "endpoint")]
    pub kv_dtype: KvDtype,
}

fn parse_seconds(s: &str) -> std::result::Result<f64, String> {
    s.trim()
        .parse::<f64>()
        .ok()
        .filter(|v| *v > 0.0 && *v <= 86_400.0)
        .ok_or_else(|| format!("`{s}` is not a number of seconds between 0 and 86400"))
}

/// Where and in which precision the model runs.
#[derive(Debug, Clone, clap::Args)]
pub struct DeviceArgs {
    /// Weight type (default on the CPU: the checkpoint's own, e.g. bf16, read from the file
    /// without a copy; on a GPU: bf16).
    ///
    /// On the CPU activations and the KV cache are f32 whatever the weights, except that matmuls
    /// multiply as llama.cpp does where the CPU can: bf16 weights in bf16 (AVX512-BF16:
    /// activations rounded to bf16 at the matmul, f32 sums), q8_0/q4_0 weights as int8 products (AVX2 or
    /// AVX512-VNNI: activations quantized to q8 per block of 32). `--dtype f32` and
    /// `LLMARCH_KERNELS=avx512` keep f32 products. f32/bf16/f16
    /// weights stored in that type are read from the checkpoint's memory map (others are
    /// converted once at load); q8_0 (1.06 bytes per weight) and q4_0 (0.56) quantize the weight matrices at
    /// load to GGML's blocks of 32 with an f16 scale, straight from the stored bytes (norms,
    /// embeddings and routers keep their type), and keep the blocks for later runs (next to a Hub
    /// snapshot, or in the user's cache folder for a local one; `LLMARCH_QUANT_CACHE=off` does
    /// not), which then read them instead of quantizing. On a GPU, f32/bf16/f16 set weights and
    /// activations alike; q8_0 and q4_0 run on the CPU only (`--device auto` picks it).
    #[arg(long, value_enum)]
    pub dtype: Option<ComputeDtype>,
    /// Where the model runs (not with --endpoint: the server runs it).
    #[arg(long, value_enum, default_value = "cpu", conflicts_with = "endpoint")]
    pub device: DeviceArg,
}

/// The device, the activation dtype and how the weight matrices are held.
#[derive(Debug, Clone)]
pub struct Precision {
    pub device: Device,
    /// What the activations and KV cache are held in (and non-matrix weights load in).
    pub dtype: DType,
    /// How the weight matrices are held ([`with_weight_format`]).
    pub weights: WeightFormat,
}

impl Precision {
    /// The weights' name for `--json` and the summary: `f32`, `bf16`, `f16`, `q8_0` or `q4_0`;
    /// `stored` is the checkpoint's dtype (what the default format keeps).
    pub fn name(&self, stored: DType) -> String {
        let lower = |d: DType| format!("{d:?}").to_lowercase();
        match self.weights {
            WeightFormat::Quantized(Quantization::Q8_0) => "q8_0".into(),
            WeightFormat::Quantized(Quantization::Q4_0) => "q4_0".into(),
            WeightFormat::Mapped(Some(d)) => lower(d),
            WeightFormat::Mapped(None) => lower(stored),
            WeightFormat::Loaded => lower(self.dtype),
        }
    }
}

impl DeviceArgs {
    /// The device, the activation dtype and the weight format.
    pub fn resolve(&self, ctx: &Ctx) -> Result<Precision> {
        // Quantized weights run on the CPU only: `auto` picks it, a GPU is refused before it
        // opens.
        let quantized = match self.dtype {
            Some(ComputeDtype::Q8_0) => Some(Quantization::Q8_0),
            Some(ComputeDtype::Q4_0) => Some(Quantization::Q4_0),
            _ => None,
        };
        let device = match (quantized, self.device) {
            (Some(_), DeviceArg::Cuda | DeviceArg::Metal) => crate::usage!(
                "--dtype {} runs on the CPU only, not on --device {}\nhint: use --device cpu, or --dtype bf16 on the GPU",
                if quantized == Some(Quantization::Q8_0) { "q8_0" } else { "q4_0" },
                format!("{:?}", self.device).to_lowercase()
            ),
            (Some(_), _) => Device::Cpu,
            (_, d) => device(d)?,
        };
        if let Some(q) = quantized {
            return Ok(Precision {
                device,
                dtype: DType::F32,
                weights: WeightFormat::Quantized(q),
            });
        }
        let dtype = match self.dtype {
            Some(ComputeDtype::Bf16) => Some(DType::BF16),
            Some(ComputeDtype::F16) => Some(DType::F16),
            Some(_) => Some(DType::F32),
            None => None,
        };
        Ok(if crate::kernels::fast_cpu(&device) {
            // f32 activations; matrices from the mapping (`--dtype f32` widens them).
            Precision {
                device,
                dtype: DType::F32,
                weights: WeightFormat::Mapped(dtype),
            }
        } else {
            // A GPU computes in bf16 where it has the kernels; the generic path on the CPU in f32.
            let dtype = match (dtype, device.is_cpu()) {
                (Some(d), _) => {
                    if d == DType::BF16 && !gpu_has_bf16(&device) {
                        crate::usage!(
                            "--dtype bf16 needs a GPU of compute capability 8.0 or newer (candle's bf16 kernels)\nhint: use --dtype f16 or f32"
                        );
                    }
                    d
                }
                (None, true) => DType::F32,
                (None, false) if gpu_has_bf16(&device) => DType::BF16,
                (None, false) => {
                    ctx.warn("this GPU has no bf16 kernels (compute capability below 8.0): computing in f16 (--dtype f32 for full precision)");
                    DType::F16
                }
            };
            Precision {
                device,
                dtype,
                weights: WeightFormat::Loaded,
            }
        })
    }
}

/// Whether candle's bf16 kernels run on `device`: CUDA compute capability 8.0 or newer (Metal:
/// the backend's own support; the CPU always).
fn gpu_has_bf16(device: &Device) -> bool {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => d
            .cuda_stream()
            .context()
            .compute_capability()
            .is_ok_and(|(major, _)| major >= 8),
        _ => true,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ComputeDtype {
    /// f32 weights (CPU: widened from the checkpoint at load)
    F32,
    /// bfloat16 weights (GPU: activations and KV cache too)
    Bf16,
    /// float16 weights (GPU: activations and KV cache too)
    F16,
    /// weight matrices quantized at load to GGML q8_0 (1.06 bytes per weight); CPU only
    #[value(name = "q8_0")]
    Q8_0,
    /// weight matrices quantized at load to GGML q4_0 (0.56 bytes per weight); CPU only
    #[value(name = "q4_0")]
    Q4_0,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceArg {
    Cpu,
    Cuda,
    Metal,
    Auto,
}

/// The device, or an error saying how to get it.
pub fn device(arg: DeviceArg) -> Result<Device> {
    match arg {
        DeviceArg::Cpu => Ok(Device::Cpu),
        DeviceArg::Cuda => {
            if cfg!(feature = "cuda") {
                let device = Device::new_cuda(0).context("cannot open CUDA device 0")?;
                prepare(&device)?;
                Ok(device)
            } else {
                bail!("this llmarch was built without CUDA\nhint: rebuild with `cargo build --release --features cuda`")
            }
        }
        DeviceArg::Metal => {
            if cfg!(feature = "metal") {
                Device::new_metal(0).context("cannot open the Metal device")
            } else {
                bail!("this llmarch was built without Metal\nhint: rebuild with `cargo build --release --features metal`")
            }
        }
        DeviceArg::Auto => {
            if cfg!(feature = "cuda") {
                if let Ok(d) = Device::new_cuda(0) {
                    prepare(&d)?;
                    return Ok(d);
                }
            }
            if cfg!(feature = "metal") {
                if let Ok(d) = Device::new_metal(0) {
                    return Ok(d);
                }
            }
            Ok(Device::Cpu)
        }
    }
}

/// Sets a CUDA device up for many small ops on one stream:
/// - cudarc's event tracking off: with it on, every tensor's allocation creates two CUDA events
///   (and its drop destroys them) so that several streams could order their uses, four driver
///   calls per tensor op; llmarch runs every op of a device on the one stream candle gives it,
///   where those events order nothing (cudarc records them only once a second stream exists);
/// - the memory pool keeps what tensors free: its default release threshold (0) hands freed
///   memory back to the OS at every synchronisation, once per decode step (the chosen token is
///   read back), and the next step's allocations map it again.
fn prepare(device: &Device) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        use candle_core::cuda_backend::cudarc::driver::{result, sys};
        // SAFETY: tensors are used on the device's single stream only, so no use needs ordering
        // against another stream (the condition `disable_event_tracking` asks the caller to keep).
        unsafe { d.disable_event_tracking() };
        let mut keep = u64::MAX;
        // SAFETY: the device is the context's own; the release threshold is a u64.
        unsafe {
            let pool = result::device::get_default_mem_pool(d.cuda_stream().context().cu_device())?;
            result::mem_pool::set_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut keep as *mut u64).cast(),
            )?;
        }
    }
    let _ = device;
    Ok(())
}

/// The KV-cache dtype the budget is computed in for a compute dtype.
pub fn kv_dtype_of(d: DType) -> KvDtype {
    match d {
        DType::BF16 => KvDtype::Bf16,
        DType::F16 => KvDtype::F16,
        _ => KvDtype::F32,
    }
}

/// The spec (from config.json only) and, when the family can run, the function that builds it:
/// a family that cannot run fails here, before any download.
pub fn runnable_spec(
    ctx: &Ctx,
    model: &str,
) -> Result<(ModelRef, ArchSpec, &'static arch::Family)> {
    let (model_ref, spec) = crate::loader::load_spec(model, &ctx.parse, ctx.progress())?;
    for w in &spec.warnings {
        ctx.warn(w);
    }
    let family =
        arch::family_of(&spec).ok_or_else(|| anyhow!("internal: no family `{}`", spec.family))?;
    if family.build.is_none() {
        bail!(
            "llmarch cannot run the `{}` family yet; `inspect` and `kv-budget` work for it",
            spec.family
        );
    }
    Ok((model_ref, spec, family))
}

/// Every file of the model (downloading what is missing) and its tokenizer.
pub fn files_and_tokenizer(
    ctx: &Ctx,
    model_ref: &ModelRef,
) -> Result<(ModelFiles, TokenizerBundle)> {
    let files = model_files::resolve(
        model_ref,
        &ResolveOptions {
            progress: ctx.progress(),
        },
    )?;
    for n in &files.notes {
        ctx.warn(n);
    }
    let tok = tokenizer::load(&files)?;
    Ok((files, tok))
}

/// Load the weights in `dtype` on `device` and build the network (as loaded: copies in `dtype`,
/// no quantization); returns it with the seconds it took.
pub fn build_model(
    files: &ModelFiles,
    family: &arch::Family,
    ctx: &Ctx,
    dtype: DType,
    device: &Device,
) -> Result<(Box<dyn CausalLm>, f64)> {
    let precision = Precision {
        device: device.clone(),
        dtype,
        weights: WeightFormat::Loaded,
    };
    build_model_in(files, family, ctx, &precision).map(|b| (b.model, b.load_s))
}

/// A model loaded with nothing printed, as the benchmarks in `examples/` load one: the network,
/// the weights as `device` says, and the spec.
pub fn quiet_model(model: &str, device: &DeviceArgs) -> Result<(Box<dyn CausalLm>, ArchSpec)> {
    let ctx = Ctx {
        quiet: true,
        verbose: false,
        parse: Default::default(),
    };
    let precision = device.resolve(&ctx)?;
    let (model_ref, spec, family) = runnable_spec(&ctx, model)?;
    let (files, _) = files_and_tokenizer(&ctx, &model_ref)?;
    Ok((
        build_model_in(&files, family, &ctx, &precision)?.model,
        spec,
    ))
}

/// The prompt ids `bench/vs-llamacpp.sh` feeds: BOS (2), then a fixed spread below a
/// vocabulary of `vocab` ids.
pub fn bench_ids(n: usize, vocab: usize) -> Vec<u32> {
    let vocab = vocab as u64;
    (0..n as u64)
        .map(|i| if i == 0 { 2 } else { (i * 7919) % (vocab - 200) + 100 } as u32)
        .collect()
}

/// A built network, with what loading it cost.
pub struct Built {
    pub model: Box<dyn CausalLm>,
    pub load_s: f64,
    /// The weights' format for reports: `bf16`, `q4_0`, ...
    pub weights: String,
    /// The quantized-weights cache: `"read"` (every matrix from it), `"written"`, or unused.
    pub quant_cache: Option<&'static str>,
}

/// [`build_model`] with the weight matrices held as `precision` says.
/// The weights as the summary names them: `bf16`, `q8_0`, or `fp8+fp4 as f32` for a
/// block-quantized checkpoint (dequantized as it loads).
fn weights_label(runs_as: &str, stored_quantized: &[&str]) -> String {
    if stored_quantized.is_empty() {
        runs_as.to_string()
    } else {
        format!("{} as {runs_as}", stored_quantized.join("+"))
    }
}

/// Checkpoint tensors the model never read: said in one line, listed with `-v`.
fn warn_unused(ctx: &Ctx, unused: &[String]) {
    const SHOWN: usize = 3;
    if unused.is_empty() {
        return;
    }
    let list = if ctx.verbose || unused.len() <= SHOWN {
        unused.join(", ")
    } else {
        format!("{}, … (-v lists all)", unused[..SHOWN].join(", "))
    };
    ctx.warn(&format!(
        "{} tensor{} of the checkpoint {} never read by the model: {list}",
        unused.len(),
        if unused.len() == 1 { "" } else { "s" },
        if unused.len() == 1 { "is" } else { "are" },
    ));
}

pub fn build_model_in(
    files: &ModelFiles,
    family: &arch::Family,
    ctx: &Ctx,
    precision: &Precision,
) -> Result<Built> {
    let t_load = Instant::now();
    let build = family
        .build
        .ok_or_else(|| anyhow!("internal: the `{}` family cannot run", family.name))?;
    let config = files.config_json()?;
    let opts = weights::LoadOptions {
        rename: family.rename,
        fp8_block: crate::loader::quantized::fp8_block(&config)?,
        whole: false,
    };
    let weights = weights::load_with(files, precision.dtype, &precision.device, opts)?;
    // Matrices are read from the mapping (CPU) or quantized from it one at a time as the
    // family reads them: no f32 copy of the checkpoint is ever held.
    let mut source = crate::kernels::fast_cpu(&precision.device).then(|| weights.mapped_source());
    // Quantized formats read back what an earlier run quantized, and keep what this one makes.
    let cache = match (&source, precision.weights) {
        (Some(_), WeightFormat::Quantized(q)) => QuantCache::open(files, q).map(Arc::new),
        _ => None,
    };
    if let Some(cache) = &cache {
        source = source.map(|s| cache.wrap(s));
    }
    let model = with_weight_format(precision.weights, source, || {
        build(&config, &ctx.parse, weights.text_vb(), weights.lm_head_vb())
    })
    .with_context(|| format!("building the model from {}", files.source))?;
    warn_unused(ctx, &weights.unused());
    let quant_cache = match cache.map(|c| c.finish()).transpose() {
        Ok(Some(CacheUse::Written(path, bytes))) => {
            if !ctx.quiet {
                eprintln!(
                    "{} kept the quantized weights for later runs: {} ({}; LLMARCH_QUANT_CACHE=off skips this)",
                    crate::report::prefix("note"),
                    path.display(),
                    crate::report::units::bytes(bytes)
                );
            }
            Some("written")
        }
        Ok(Some(CacheUse::Read(_))) => Some("read"),
        Ok(_) => None,
        Err(e) => {
            ctx.warn(&format!("{e:#}"));
            None
        }
    };
    Ok(Built {
        model,
        quant_cache,
        load_s: t_load.elapsed().as_secs_f64(),
        weights: weights_label(
            &precision.name(weights.stored_dtype()),
            &weights.quantized_formats(),
        ),
    })
}

/// The most a token count on the command line may be (`--context`, `--max-context`): 2^40, a
/// million times the longest context of a real model, and small enough that no cache figure
/// computed from it overflows before [`crate::arch::budget`] checks it.
pub const MAX_TOKENS: u64 = 1 << 40;

/// A token count: a number with an optional binary `k`/`m` suffix (`128k` = 131072, `1m` =
/// 1048576), from 1 to [`MAX_TOKENS`]. A clap value parser, so the error names the flag.
pub fn parse_tokens(s: &str) -> std::result::Result<u64, String> {
    let item = s.trim();
    let lower = item.to_ascii_lowercase();
    let (num, mult) = if let Some(n) = lower.strip_suffix('k') {
        (n, 1u64 << 10)
    } else if let Some(n) = lower.strip_suffix('m') {
        (n, 1 << 20)
    } else {
        (lower.as_str(), 1)
    };
    let n: u64 = num.parse().map_err(|_| {
        format!("`{item}` is not a context length (use e.g. 4096, 32k, 128k or 1m)")
    })?;
    n.checked_mul(mult)
        .filter(|&t| t > 0 && t <= MAX_TOKENS)
        .ok_or_else(|| format!("`{item}` is out of range (1 to 1T tokens)"))
}

/// [`parse_tokens`] as a `usize`, for flags that size a context.
pub fn parse_tokens_usize(s: &str) -> std::result::Result<usize, String> {
    parse_tokens(s).map(|t| t as usize)
}

/// How much llmarch reads from one input file or stream (`chat --input`, chat's `/load`, a
/// prompt file), and the longest line it takes from a stream: 16 MiB, far more than any context
/// holds as text, far less than memory.
pub const INPUT_LIMIT: u64 = 16 << 20;

/// Everything `reader` gives, at most `limit` bytes; more is an error naming `what` (e.g.
/// `--input /dev/zero`) and the limit, and nothing read is returned.
pub fn read_limited(reader: impl std::io::Read, limit: u64, what: &str) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut buf = vec![];
    reader
        .take(limit.saturating_add(1))
        .read_to_end(&mut buf)
        .with_context(|| format!("cannot read {what}"))?;
    if buf.len() as u64 > limit {
        let shown = if limit >= 1 << 20 && limit.is_multiple_of(1 << 20) {
            format!("{} MiB", limit >> 20)
        } else {
            format!("{limit} bytes")
        };
        bail!("{what} is larger than {shown}: llmarch reads at most that much from one input");
    }
    Ok(buf)
}

/// The file at `path` as UTF-8 text, at most `limit` bytes (see [`read_limited`]); errors name
/// `what`.
pub fn read_text_limited(path: &std::path::Path, limit: u64, what: &str) -> Result<String> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot read {what}"))?;
    let bytes = read_limited(file, limit, what)?;
    String::from_utf8(bytes).map_err(|e| {
        anyhow!(
            "{what} is not UTF-8 text (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        )
    })
}

/// The error comes from writing to a closed pipe (`llmarch ... | head`): the reader has gone,
/// so the command stops quietly.
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

#[cfg(test)]
mod input_tests {
    use super::*;

    #[test]
    fn token_counts_take_binary_suffixes_and_a_bound() {
        assert_eq!(parse_tokens("1k"), Ok(1024));
        assert_eq!(parse_tokens("128K"), Ok(131_072));
        assert_eq!(parse_tokens("1m"), Ok(1 << 20));
        assert_eq!(parse_tokens("1000"), Ok(1000));
        assert_eq!(parse_tokens("1048576m"), Ok(1 << 40));
        for bad in [
            "0",
            "",
            "k",
            "1g",
            "-5",
            "1048577m",
            "18446744073709551615",
            "99999999999999999999m",
        ] {
            assert!(parse_tokens(bad).is_err(), "{bad}");
        }
        assert!(parse_tokens("18446744073709551615")
            .unwrap_err()
            .contains("out of range"));
    }

    #[test]
    fn reads_stop_at_the_limit_with_an_error_naming_the_input() {
        assert_eq!(read_limited(&b"abcd"[..], 4, "x").unwrap(), b"abcd");
        let e = read_limited(std::io::repeat(0), 1 << 20, "--input /dev/zero").unwrap_err();
        assert_eq!(
            e.to_string(),
            "--input /dev/zero is larger than 1 MiB: llmarch reads at most that much from one input"
        );
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("latin1.txt");
        std::fs::write(&p, b"caf\xe9").unwrap();
        let e = read_text_limited(&p, 100, "--input latin1.txt").unwrap_err();
        assert!(e.to_string().contains("not UTF-8"), "{e}");
        let e = read_text_limited(&dir.path().join("none"), 100, "--input none").unwrap_err();
        assert!(
            format!("{e:#}").starts_with("cannot read --input none: "),
            "{e:#}"
        );
    }
}
