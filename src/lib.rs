//! llmarch: run and inspect the newest open-weight LLM architectures, and see what their
//! long-context tricks cost and save.
//!
//! Map of the crate:
//! - [`cli`]: clap types, one file per subcommand; no model math.
//! - [`loader`]: where the bytes come from: model references (alias, `org/name[@rev]`, local
//!   directory), the embedded configs of the aliases, the Hub (its cache layout, our own
//!   checked requests).
//! - [`arch`]: what a model is: the family registry and the per-layer [`arch::ArchSpec`] table,
//!   one file per family; [`arch::budget`] is the KV-cache arithmetic over that table.
//! - [`layers`]: how models compute: blocks named for the technique, the KV store.
//! - [`kernels`]: the CPU kernels the blocks call (gemv, GEMM, GELU, the thread pool).
//! - [`generate`]: the one prefill/decode loop every family shares.
//! - [`chat`]: chat templates (minijinja), the conversation and the KV cache kept across turns.
//! - [`endpoint`]: an OpenAI-compatible server (vLLM, SGLang, llama-server) streaming text and
//!   token counts, for `run`/`chat --endpoint`.
//! - [`report`]: tables, bars and unit formatting.

pub mod arch;
pub mod chat;
pub mod cli;
pub mod endpoint;
pub mod generate;
pub mod kernels;
pub mod layers;
pub mod loader;
pub mod report;
