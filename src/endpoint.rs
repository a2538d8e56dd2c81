//! An OpenAI-compatible server (vLLM, SGLang, llama.cpp's `llama-server`) as a text source for
//! `run --endpoint` and `chat --endpoint`: one streaming request to `/v1/completions` or
//! `/v1/chat/completions`, the text as it arrives, and the token counts the server reports
//! (`usage`, with `prompt_tokens_details.cached_tokens` where it sends them).
//!
//! - **Streaming**: `stream: true` with `stream_options.include_usage`, read as server-sent
//!   events: `data:` lines of JSON chunks until `data: [DONE]`; the usage comes in the last
//!   chunk. A stream that ends before `[DONE]` is an error saying how much arrived.
//! - **No hang**: connect and read timeouts; a server that stalls ends in an error naming the
//!   endpoint and the timeout.
//! - **Secrets stay secret**: the API key is checked to be something an HTTP header can carry,
//!   sent to the endpoint only (no redirects are followed), and never printed; a password in the
//!   URL is shown as `***`. No message quotes a request or a header.

use crate::loader::hub::{check_token, shown_url, split_url};
use anyhow::{anyhow, bail, Result};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read};
use std::time::Duration;

/// The most bytes one event line or an error body may hold.
const LINE_LIMIT: u64 = 16 << 20;

/// Which of the two APIs a request goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `/v1/completions`: a raw prompt, continued.
    Completions,
    /// `/v1/chat/completions`: messages, rendered by the server's chat template.
    Chat,
}

impl Api {
    pub fn name(self) -> &'static str {
        match self {
            Api::Completions => "completions",
            Api::Chat => "chat",
        }
    }
}

/// A server and how to talk to it.
#[derive(Clone)]
pub struct Endpoint {
    /// The base URL up to and including `/v1` (may carry a password: print [`Self::shown`]).
    base: String,
    /// The API the URL named, if it named one (`.../v1/chat/completions`).
    pub named: Option<Api>,
    key: Option<String>,
    pub timeout: Duration,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("base", &self.shown())
            .field("key", &self.key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// The token counts a server reports for one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Prompt tokens the server took from its prefix cache, when it says.
    pub cached_tokens: Option<u64>,
}

/// What one streamed request gave.
#[derive(Debug, Clone, Default)]
pub struct Reply {
    pub text: String,
    /// The reasoning a chat server sent apart from the answer (`reasoning_content`).
    pub reasoning: String,
    pub usage: Option<Usage>,
    pub finish_reason: Option<String>,
    /// Text chunks received (the servers send about one token each).
    pub chunks: u64,
    /// Seconds to the first text, and to the end.
    pub first_s: Option<f64>,
    pub total_s: f64,
    /// The caller asked to stop (Ctrl-C) before the server finished.
    pub stopped: bool,
}

/// A piece of streamed text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece {
    Reasoning,
    Answer,
}

impl Endpoint {
    /// `url`: `http[s]://host[:port]` (then `/v1` is added), `.../v1`, or the full
    /// `.../v1/completions` or `.../v1/chat/completions`. `key` must be sendable in a header.
    pub fn new(url: &str, key: Option<String>, timeout: Duration) -> Result<Endpoint> {
        let url = url.trim().trim_end_matches('/');
        if split_url(url).is_none() {
            bail!(
                "--endpoint: not an http:// or https:// URL: `{}`\nhint: e.g. --endpoint http://localhost:8000/v1",
                shown_url(url).escape_debug()
            );
        }
        if url.contains(['?', '#']) {
            bail!("--endpoint: give the URL without a query or fragment\nhint: e.g. --endpoint http://localhost:8000/v1");
        }
        let (base, named) = if let Some(b) = url.strip_suffix("/chat/completions") {
            (b.to_string(), Some(Api::Chat))
        } else if let Some(b) = url.strip_suffix("/completions") {
            (b.to_string(), Some(Api::Completions))
        } else if url.ends_with("/v1") {
            (url.to_string(), None)
        } else {
            (format!("{url}/v1"), None)
        };
        if let Some(k) = &key {
            check_token(k).map_err(|why| {
                anyhow!(
                    "the API key (--api-key or OPENAI_API_KEY) {why}, so it cannot be sent\nhint: copy the key again"
                )
            })?;
        }
        Ok(Endpoint {
            base,
            named,
            key,
            timeout,
        })
    }

    /// The base URL as messages show it (a password becomes `***`).
    pub fn shown(&self) -> String {
        shown_url(&self.base)
    }

    fn url(&self, api: Api) -> String {
        match api {
            Api::Completions => format!("{}/completions", self.base),
            Api::Chat => format!("{}/chat/completions", self.base),
        }
    }

    /// Stream one request: `body` (the API's fields but `stream` and `stream_options`, which are
    /// set here). `on_piece` gets the text as it arrives and returns false to stop early (the
    /// connection is then dropped, and the reply says `stopped`).
    pub fn stream(
        &self,
        api: Api,
        mut body: Value,
        on_piece: &mut dyn FnMut(Piece, &str) -> Result<bool>,
    ) -> Result<Reply> {
        if let Some(o) = body.as_object_mut() {
            o.insert("stream".into(), true.into());
            o.insert("stream_options".into(), json!({"include_usage": true}));
        }
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(self.timeout)
            .timeout_read(self.timeout)
            .timeout_write(self.timeout)
            .redirects(0)
            .user_agent(concat!("llmarch/", env!("CARGO_PKG_VERSION")))
            .build();
        let mut req = agent
            .post(&self.url(api))
            .set("Accept", "text/event-stream");
        if let Some(k) = &self.key {
            req = req.set("Authorization", &format!("Bearer {k}"));
        }
        let t0 = std::time::Instant::now();
        let resp = req.send_json(body).map_err(|e| self.failure(e, api))?;
        let mut reply = Reply::default();
        let mut reader = BufReader::new(resp.into_reader());
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = (&mut reader)
                .take(LINE_LIMIT)
                .read_until(b'\n', &mut line)
                .map_err(|e| self.broken(&e, &reply))?;
            if n == 0 {
                bail!(
                    "{} closed the stream before it finished (no `data: [DONE]`): {} chunk{} of text had arrived\nhint: the server may have stopped or restarted; see its log",
                    self.shown(),
                    reply.chunks,
                    if reply.chunks == 1 { "" } else { "s" }
                );
            }
            let text = String::from_utf8_lossy(&line);
            let Some(data) = text.trim_end().strip_prefix("data:") else {
                continue; // comments, `event:` and blank lines
            };
            let data = data.trim();
            if data == "[DONE]" {
                break;
            }
            let chunk: Value = serde_json::from_str(data).map_err(|e| {
                anyhow!(
                    "{} sent an event that is not JSON ({e})\nhint: is --endpoint an OpenAI-compatible server?",
                    self.shown()
                )
            })?;
            if let Some(err) = chunk.get("error") {
                bail!(
                    "{} reported an error mid-stream: {}",
                    self.shown(),
                    error_text(err)
                );
            }
            if let Some(u) = chunk.get("usage").filter(|u| !u.is_null()) {
                reply.usage = Some(parse_usage(u)?);
            }
            let Some(choice) = chunk.get("choices").and_then(|c| c.get(0)) else {
                continue;
            };
            if let Some(r) = choice.get("finish_reason").and_then(Value::as_str) {
                reply.finish_reason = Some(r.to_string());
            }
            let delta = choice.get("delta");
            let pieces = [
                (
                    Piece::Reasoning,
                    delta.and_then(|d| d.get("reasoning_content").or_else(|| d.get("reasoning"))),
                ),
                (
                    Piece::Answer,
                    delta
                        .and_then(|d| d.get("content"))
                        .or_else(|| choice.get("text")),
                ),
            ];
            for (kind, v) in pieces {
                let Some(s) = v.and_then(Value::as_str).filter(|s| !s.is_empty()) else {
                    continue;
                };
                reply.chunks += 1;
                reply.first_s.get_or_insert(t0.elapsed().as_secs_f64());
                match kind {
                    Piece::Reasoning => reply.reasoning.push_str(s),
                    Piece::Answer => reply.text.push_str(s),
                }
                if !on_piece(kind, s)? {
                    reply.stopped = true;
                    reply.total_s = t0.elapsed().as_secs_f64();
                    return Ok(reply);
                }
            }
        }
        reply.total_s = t0.elapsed().as_secs_f64();
        Ok(reply)
    }

    /// A failed request, said without the key or the URL's password.
    fn failure(&self, e: ureq::Error, api: Api) -> anyhow::Error {
        let at = self.shown();
        match e {
            ureq::Error::Status(code @ (401 | 403), resp) => {
                let detail = body_error(resp);
                let hint = if self.key.is_some() {
                    "hint: the server refused the API key given (--api-key or OPENAI_API_KEY): check it is the one the server was started with (vLLM/SGLang --api-key)"
                } else {
                    "hint: the server wants an API key: set OPENAI_API_KEY or give --api-key"
                };
                anyhow!("{at} answered HTTP {code} (not authorised){detail}\n{hint}")
            }
            ureq::Error::Status(404, resp) => anyhow!(
                "{at} has no /{} (HTTP 404){}\nhint: give the server's OpenAI-compatible base URL, e.g. http://localhost:8000/v1, and check --served-model",
                self.url(api).rsplit("/v1/").next().unwrap_or(""),
                body_error(resp)
            ),
            ureq::Error::Status(code, resp) => {
                anyhow!("{at} answered HTTP {code}{}", body_error(resp))
            }
            ureq::Error::Transport(t) => anyhow!(
                "cannot reach {at}: {}\nhint: is the server running and listening there?",
                self.transport_why(&t)
            ),
        }
    }

    /// A read that failed mid-stream: a timeout says so.
    fn broken(&self, e: &std::io::Error, reply: &Reply) -> anyhow::Error {
        let why = if matches!(
            e.kind(),
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
        ) {
            format!(
                "no data within {} s (LLMARCH_ENDPOINT_TIMEOUT)",
                self.timeout.as_secs_f64()
            )
        } else {
            e.to_string()
        };
        anyhow!(
            "the stream from {} broke after {} chunk{} of text: {why}",
            self.shown(),
            reply.chunks,
            if reply.chunks == 1 { "" } else { "s" }
        )
    }

    fn transport_why(&self, t: &ureq::Transport) -> String {
        let io = std::error::Error::source(t).and_then(|e| e.downcast_ref::<std::io::Error>());
        if io.is_some_and(|e| {
            matches!(
                e.kind(),
                std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
            )
        }) {
            return format!(
                "no answer within {} s (LLMARCH_ENDPOINT_TIMEOUT)",
                self.timeout.as_secs_f64()
            );
        }
        let kind = t.kind().to_string().to_lowercase();
        let detail = std::error::Error::source(t)
            .map(|s| s.to_string())
            .unwrap_or_default();
        let why = if detail.is_empty() {
            kind
        } else {
            format!("{kind}: {detail}")
        };
        why.replace(&self.base, &self.shown())
    }
}

fn parse_usage(u: &Value) -> Result<Usage> {
    let count = |v: Option<&Value>, what: &str| -> Result<Option<u64>> {
        match v {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| anyhow!("the server's usage.{what} is not a token count: {v}")),
        }
    };
    Ok(Usage {
        prompt_tokens: count(u.get("prompt_tokens"), "prompt_tokens")?.unwrap_or(0),
        completion_tokens: count(u.get("completion_tokens"), "completion_tokens")?.unwrap_or(0),
        cached_tokens: count(
            u.get("prompt_tokens_details")
                .and_then(|d| d.get("cached_tokens")),
            "prompt_tokens_details.cached_tokens",
        )?,
    })
}

/// An OpenAI error object's message, cut and escaped.
fn error_text(err: &Value) -> String {
    let msg = err
        .get("message")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| err.to_string());
    let cut: String = msg.chars().take(300).collect();
    format!(
        "{}{}",
        cut.escape_debug(),
        if cut.len() < msg.len() { "…" } else { "" }
    )
}

/// `: <message>` from an error answer's JSON body, when it has one.
fn body_error(resp: ureq::Response) -> String {
    let mut body = String::new();
    let _ = resp.into_reader().take(64 << 10).read_to_string(&mut body);
    match serde_json::from_str::<Value>(&body) {
        Ok(v) => match v.get("error").or(v.get("message").map(|_| &v)) {
            Some(e) => format!(": {}", error_text(e)),
            None => String::new(),
        },
        Err(_) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_the_api_or_get_v1() {
        let t = Duration::from_secs(1);
        let e = Endpoint::new("http://h:8000", None, t).unwrap();
        assert_eq!((e.base.as_str(), e.named), ("http://h:8000/v1", None));
        let e = Endpoint::new("http://h:8000/v1/", None, t).unwrap();
        assert_eq!(e.base, "http://h:8000/v1");
        let e = Endpoint::new("http://h/v1/chat/completions", None, t).unwrap();
        assert_eq!((e.base.as_str(), e.named), ("http://h/v1", Some(Api::Chat)));
        let e = Endpoint::new("http://u:secret@h/v1/completions", None, t).unwrap();
        assert_eq!(e.named, Some(Api::Completions));
        assert_eq!(e.shown(), "http://***@h/v1");
        assert!(!format!("{e:?}").contains("secret"));
        let err = Endpoint::new("ftp://u:secret@h", None, t).unwrap_err();
        assert!(!format!("{err:#}").contains("secret"), "{err:#}");
        let err = Endpoint::new("http://h", Some("sk-\u{feff}x".into()), t).unwrap_err();
        assert!(format!("{err:#}").contains("byte-order mark"), "{err:#}");
        assert!(!format!("{err:#}").contains("sk-"), "{err:#}");
    }

    #[test]
    fn usage_with_and_without_cached_tokens() {
        let u = parse_usage(&json!({"prompt_tokens": 7, "completion_tokens": 3,
            "prompt_tokens_details": {"cached_tokens": 4}}))
        .unwrap();
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.cached_tokens),
            (7, 3, Some(4))
        );
        let u = parse_usage(&json!({"prompt_tokens": 7, "completion_tokens": 3,
            "prompt_tokens_details": null}))
        .unwrap();
        assert_eq!(u.cached_tokens, None);
        assert!(parse_usage(&json!({"prompt_tokens": -1})).is_err());
    }
}
