//! `chat`: multi-turn conversation over the one generation loop.
//!
//! - [`template`]: the model's own Jinja chat template, rendered with minijinja as transformers
//!   renders it (sandboxed, on a fuel budget), and the built-in fallback templates.
//! - [`session`]: the conversation and the KV cache kept across turns. Each turn renders the
//!   whole conversation, keeps the cached token prefix it shares and prefills only the rest;
//!   snapshots at turn boundaries make `/undo`, `/regen` and templates that rewrite earlier
//!   turns cheap.
//! - [`thinking`]: splitting a reply into its thinking and its answer, token by token.
//! - [`commands`]: the slash commands and multi-line input, parsed without any I/O.
//! - [`transcript`]: `/save` and `/load` files.
//! - [`pyfmt`], [`strftime`]: the Python behaviour templates were written against.

pub mod commands;
pub mod pyfmt;
pub mod session;
pub mod strftime;
pub mod template;
pub mod thinking;
pub mod transcript;
