//! The Hugging Face Hub, honouring the standard environment: `HF_HUB_CACHE` / `HF_HOME`
//! (cache), `HF_TOKEN` (gated repos), `HF_ENDPOINT` (a mirror or a local test server),
//! `HF_HUB_OFFLINE=1` (cache only, no request at all); and `LLMARCH_HUB_TIMEOUT` (seconds a
//! silent server is given, default 30).
//!
//! The cache is the Hub's own layout (`models--org--name/{blobs,snapshots,refs}`, hf-hub's
//! `Cache`/`Repo` name it), so llmarch, transformers and huggingface-cli share downloads. The
//! requests are made here, with ureq, because every value a server sends is untrusted:
//! - **Nothing from the network becomes a path unchecked.** A revision is a plain ref name or a
//!   40-hex commit ([`check_revision`]); the commit a server reports (file list `sha`,
//!   `X-Repo-Commit`) must be 40 hex digits and the ETag a plain name, all checked before
//!   anything is written. A file's commit must equal the listing's (a push in between is an
//!   error, not a mixed snapshot).
//! - **No hang.** Connect and read timeouts: a server that accepts and never answers ends in an
//!   error naming the host; a slow download that keeps moving is never cut.
//! - **Secrets stay secret.** The token is checked to be something an HTTP header can carry
//!   (a BOM or a zero-width space from a copied token is named, not sent); it is sent only to
//!   the endpoint's own origin, never on to a CDN; no message quotes a request, a header or a
//!   URL, and a password in `HF_ENDPOINT` is shown as `***`. [`HubEnv`]'s `Debug` redacts both.
//! - **Downloads are verified before anyone trusts them**: the body streams into
//!   `blobs/<etag>.part` and only becomes the blob (and gets its snapshot link) when it holds
//!   exactly the byte count the Hub announced. A dropped connection is retried from where it
//!   stopped; a `.part` left by an interrupted run is resumed with a range request for the same
//!   ETag (the content hash), never read as a finished file.
//! - Progress: one indicatif bar per downloaded file on stderr (bytes, rate, ETA), hidden when
//!   stderr is not a terminal or under `--quiet`.

use anyhow::{anyhow, bail, Context, Result};
use hf_hub::{Cache, Repo, RepoType};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// How long a server may stay silent (connecting, or between two reads) unless
/// `LLMARCH_HUB_TIMEOUT` says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The largest file list (`/api/models/...` JSON) read from a server.
const LISTING_LIMIT: u64 = 64 << 20;

/// Retries of a dropped download, each resuming where the body stopped.
const RETRIES: u32 = 2;

/// Where the Hub is, where its cache lives, and how to authenticate.
#[derive(Clone)]
pub struct HubEnv {
    /// Base URL, no trailing slash (`HF_ENDPOINT`). May carry a password: print
    /// [`HubEnv::shown_endpoint`], never this.
    pub endpoint: String,
    /// The `hub` cache folder holding `models--org--name/` (`HF_HUB_CACHE`, `HF_HOME/hub`).
    pub cache_dir: PathBuf,
    /// `HF_TOKEN`, else the token file next to the cache. Never printed.
    pub token: Option<String>,
    /// Where the token came from, for messages: `HF_TOKEN` or the token file's path.
    pub token_source: String,
    /// `HF_HUB_OFFLINE=1`: answer from the cache only, make no request.
    pub offline: bool,
    /// Connect and read timeout (`LLMARCH_HUB_TIMEOUT`).
    pub timeout: Duration,
}

impl std::fmt::Debug for HubEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubEnv")
            .field("endpoint", &self.shown_endpoint())
            .field("cache_dir", &self.cache_dir)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("offline", &self.offline)
            .field("timeout", &self.timeout)
            .finish()
    }
}

fn env_nonempty(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.trim().is_empty())
}

impl HubEnv {
    /// A Hub at `endpoint` with its cache in `cache_dir`: no token, online, default timeout.
    pub fn new(endpoint: &str, cache_dir: PathBuf) -> HubEnv {
        HubEnv {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            cache_dir,
            token: None,
            token_source: "HF_TOKEN".into(),
            offline: false,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Read the standard Hugging Face environment variables. A malformed `HF_ENDPOINT` or
    /// `LLMARCH_HUB_TIMEOUT` is an error naming the variable (a malformed token is reported
    /// when a request would carry it, so offline runs are not stopped by it).
    pub fn from_env() -> Result<HubEnv> {
        let cache_dir = if let Some(dir) = env_nonempty("HF_HUB_CACHE") {
            PathBuf::from(dir)
        } else if let Some(home) = env_nonempty("HF_HOME") {
            PathBuf::from(home).join("hub")
        } else if let Some(xdg) = env_nonempty("XDG_CACHE_HOME") {
            PathBuf::from(xdg).join("huggingface").join("hub")
        } else if let Some(home) = env_nonempty("HOME") {
            PathBuf::from(home)
                .join(".cache")
                .join("huggingface")
                .join("hub")
        } else {
            PathBuf::from(".cache").join("huggingface").join("hub")
        };
        let endpoint = env_nonempty("HF_ENDPOINT").unwrap_or_else(|| DEFAULT_ENDPOINT.into());
        let mut env = HubEnv::new(endpoint.trim(), cache_dir);
        if split_url(&env.endpoint).is_none() {
            bail!(
                "HF_ENDPOINT is not an http:// or https:// URL: `{}`\nhint: e.g. HF_ENDPOINT=https://hf-mirror.example.org, or unset it for {DEFAULT_ENDPOINT}",
                env.shown_endpoint()
            );
        }
        if let Some(t) = env_nonempty("HF_TOKEN") {
            // Surrounding whitespace (a newline from `echo`) is no part of a token.
            env.token = Some(t.trim().to_string());
        } else {
            let cache = Cache::new(env.cache_dir.clone());
            env.token = cache.token();
            env.token_source = cache.token_path().display().to_string();
        }
        if let Some(t) = env_nonempty("LLMARCH_HUB_TIMEOUT") {
            let secs: f64 = t.trim().parse().ok().filter(|s: &f64| *s > 0.0 && *s <= 3600.0).ok_or_else(|| {
                anyhow!("LLMARCH_HUB_TIMEOUT must be a number of seconds between 0 and 3600, not `{t}`")
            })?;
            env.timeout = Duration::from_secs_f64(secs);
        }
        env.offline = matches!(
            env_nonempty("HF_HUB_OFFLINE")
                .as_deref()
                .map(str::to_ascii_lowercase)
                .as_deref(),
            Some("1" | "true" | "yes" | "on")
        );
        Ok(env)
    }

    /// The endpoint as messages show it: a password (`user:pw@`) becomes `***@`.
    pub fn shown_endpoint(&self) -> String {
        shown_url(&self.endpoint)
    }

    /// The HTTP client, after checking the token can travel in a header.
    fn client(&self) -> Result<Client<'_>> {
        if let Some(t) = &self.token {
            check_token(t).map_err(|why| {
                anyhow!(
                    "the Hub token from {} {why}, so it cannot be sent\nhint: copy the token again (hf_…, letters and digits only), or save the token file without a byte-order mark",
                    self.token_source
                )
            })?;
        }
        let agent = |redirects| {
            ureq::AgentBuilder::new()
                .try_proxy_from_env(true)
                .timeout_connect(self.timeout)
                .timeout_read(self.timeout)
                .timeout_write(self.timeout)
                .redirects(redirects)
                .user_agent(concat!("llmarch/", env!("CARGO_PKG_VERSION")))
                .build()
        };
        Ok(Client {
            env: self,
            plain: agent(0),
            follow: agent(5),
            origin: split_url(&self.endpoint)
                .map(|(s, _, rest)| format!("{s}://{}", rest.split('/').next().unwrap_or("")))
                .unwrap_or_default(),
        })
    }
}

/// `scheme://[userinfo@]rest` → (scheme, userinfo, rest), for http and https URLs with a host.
pub fn split_url(url: &str) -> Option<(&str, Option<&str>, &str)> {
    let (scheme, after) = url.split_once("://")?;
    if !matches!(scheme, "http" | "https") {
        return None;
    }
    let authority_end = after.find('/').unwrap_or(after.len());
    let (user, rest) = match after[..authority_end].rfind('@') {
        Some(at) => (Some(&after[..at]), &after[at + 1..]),
        None => (None, after),
    };
    let host = rest.split('/').next().unwrap_or("");
    (!host.is_empty() && !host.chars().any(|c| c.is_whitespace() || c.is_control()))
        .then_some((scheme, user, rest))
}

/// `url` as messages show it: a password (`user:pw@`) becomes `***@`, whatever the scheme (a
/// URL refused for its scheme is shown too, so its password must not be).
pub fn shown_url(url: &str) -> String {
    let Some((scheme, after)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority = &after[..after.find('/').unwrap_or(after.len())];
    match authority.rfind('@') {
        Some(at) => format!("{scheme}://***@{}", &after[at + 1..]),
        None => url.to_string(),
    }
}

/// A token travels in `Authorization: Bearer <token>`: visible ASCII only. Says why not.
pub fn check_token(token: &str) -> std::result::Result<(), String> {
    match token
        .chars()
        .enumerate()
        .find(|(_, c)| !c.is_ascii_graphic())
    {
        None if token.is_empty() => Err("is empty".into()),
        None => Ok(()),
        Some((i, c)) => {
            let name = match c {
                '\u{feff}' => " (a byte-order mark, as Windows editors save)",
                '\u{200b}' | '\u{200c}' | '\u{200d}' | '\u{2060}' => " (a zero-width space)",
                '\r' | '\n' => " (a line break)",
                ' ' | '\t' => " (a blank)",
                _ => "",
            };
            Err(format!(
                "holds U+{:04X}{name} at character {}, which an HTTP header cannot carry",
                c as u32,
                i + 1
            ))
        }
    }
}

/// A revision names a branch or tag (`main`, `v1.0`, `refs/pr/3`) or a 40-hex commit; it
/// becomes a path in the cache (`refs/<rev>`), so nothing else is accepted.
pub fn check_revision(rev: &str) -> Result<()> {
    let part_ok = |p: &str| {
        !p.is_empty()
            && !p.starts_with('.')
            && !p.ends_with(".lock")
            && !p.contains("..")
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+'))
    };
    if rev.len() <= 200 && rev.split('/').all(part_ok) {
        return Ok(());
    }
    bail!(
        "`{}` is not a revision\nhint: give a branch or tag name (letters, digits, `-`, `_`, `.`, `/` between parts) or a 40-hex commit",
        rev.escape_debug()
    )
}

/// A full commit id: 40 hex digits.
fn is_commit(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// An untrusted value, cut and escaped, for a message.
fn quoted(s: &str) -> String {
    let cut: String = s.chars().take(48).collect();
    format!(
        "`{}`{}",
        cut.escape_debug(),
        if cut.len() < s.len() { "…" } else { "" }
    )
}

/// The Hub's file list (`GET /api/models/{id}/revision/{rev}`): the commit (40 hex digits,
/// lower-cased) and the file names, or what is wrong with it (untrusted bytes).
pub fn parse_listing(body: &[u8]) -> std::result::Result<(String, Vec<String>), String> {
    #[derive(serde::Deserialize)]
    struct Info {
        sha: String,
        #[serde(default)]
        siblings: Vec<Sibling>,
    }
    #[derive(serde::Deserialize)]
    struct Sibling {
        rfilename: String,
    }
    if body.len() as u64 > LISTING_LIMIT {
        return Err("a file list over 64 MiB".into());
    }
    let info: Info = serde_json::from_slice(body)
        .map_err(|e| format!("the file list is not the Hub's JSON ({e})"))?;
    if !is_commit(&info.sha) {
        return Err(format!("commit {} is not 40 hex digits", quoted(&info.sha)));
    }
    let files = info.siblings.into_iter().map(|s| s.rfilename).collect();
    Ok((info.sha.to_ascii_lowercase(), files))
}

/// The files of one repo at one revision, as the Hub (or the cache) lists them.
#[derive(Debug, Clone)]
pub struct Listing {
    /// The commit the revision points at.
    pub commit: String,
    /// File names relative to the repo root.
    pub files: Vec<String>,
    /// Read from the local cache (offline, or the Hub was unreachable).
    pub from_cache: bool,
}

/// Why a request failed.
enum Failure {
    /// No answer at all (refused, DNS, timeout, TLS): the cache may stand in.
    Unreachable(anyhow::Error),
    Other(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Failure {
        Failure::Other(e)
    }
}

impl Failure {
    fn into_error(self) -> anyhow::Error {
        match self {
            Failure::Unreachable(e) | Failure::Other(e) => e,
        }
    }
}

/// One Hub's HTTP side: agents with timeouts, and the token for the endpoint's origin only.
struct Client<'e> {
    env: &'e HubEnv,
    /// Follows no redirect: the probe reads the Hub's own headers on the redirect itself.
    plain: ureq::Agent,
    /// Follows redirects (CDN), never forwarding the token (ureq drops it on redirect).
    follow: ureq::Agent,
    /// `scheme://host[:port]` of the endpoint (with any userinfo).
    origin: String,
}

impl Client<'_> {
    fn get(&self, agent: &ureq::Agent, url: &str, range: Option<&str>) -> ureq::Request {
        let mut req = agent.get(url);
        if let Some(r) = range {
            req = req.set("Range", r);
        }
        match &self.env.token {
            Some(t) if url.starts_with(&format!("{}/", self.origin)) => {
                req.set("Authorization", &format!("Bearer {t}"))
            }
            _ => req,
        }
    }

    /// Turn a ureq error for `what` (`file` of repo `id`, or its file list when `None`) into
    /// one that says what happened and what to do.
    fn failure(&self, e: ureq::Error, id: &str, file: Option<&str>, what: &str) -> Failure {
        let endpoint = self.env.shown_endpoint();
        let has_token = self.env.token.is_some();
        match e {
            ureq::Error::Status(401 | 403, _) => {
                let hint = if has_token {
                    "hint: accept the licence on the model page with the account whose HF_TOKEN you set"
                } else {
                    "hint: accept the licence on the model page and set HF_TOKEN"
                };
                let refused = match file {
                    None => "the Hub refused to list its files (a private repo or a wrong id also answer this way)".to_string(),
                    Some(f) => format!("the Hub refused {f} without access"),
                };
                Failure::Other(anyhow!("{id} is gated: {refused}\n{hint}"))
            }
            ureq::Error::Status(404, _) => Failure::Other(anyhow!(
                "{} not found on {endpoint}\n\
                 hint: check the repo id and revision (`llmarch models` lists the aliases)",
                if file.is_some() {
                    what
                } else {
                    what.trim_start_matches("the file list of ")
                }
            )),
            ureq::Error::Status(code, _) => Failure::Other(anyhow!(
                "the Hub ({endpoint}) answered HTTP {code} for {what}"
            )),
            ureq::Error::Transport(t) => Failure::Unreachable(anyhow!(
                "cannot reach {endpoint} for {what}: {}\n\
                 hint: check the network, or set HF_HUB_OFFLINE=1 to use the cache only",
                transport_why(&t, self.env)
            )),
        }
    }

    /// An answer no Hub gives: `detail` says which.
    fn hostile(&self, what: &str, detail: &str) -> anyhow::Error {
        anyhow!(
            "{} answered in a way the Hub never does for {what}: {detail}; nothing was written\nhint: check HF_ENDPOINT; a mirror or proxy may be rewriting the answers",
            self.env.shown_endpoint()
        )
    }
}

/// What the `bytes=0-0` probe of a file tells.
struct Probe {
    /// The content hash: the blob's file name.
    etag: String,
    commit: String,
    size: u64,
    /// Where the body is fetched (the CDN after the Hub's redirect).
    url: String,
}

/// One repo at one revision on the Hub, with its cache.
pub struct HubRepo<'e> {
    env: &'e HubEnv,
    id: String,
    rev: String,
    progress: bool,
}

impl<'e> HubRepo<'e> {
    /// The repo `id` at `revision` (default `main`); the revision must pass [`check_revision`].
    pub fn new(
        env: &'e HubEnv,
        id: &str,
        revision: Option<&str>,
        progress: bool,
    ) -> Result<HubRepo<'e>> {
        let rev = revision.unwrap_or("main");
        check_revision(rev).with_context(|| format!("model {id}@{}", rev.escape_debug()))?;
        Ok(HubRepo {
            env,
            id: id.to_string(),
            rev: rev.to_string(),
            progress,
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn revision(&self) -> &str {
        &self.rev
    }

    /// `<cache>/models--org--name`.
    pub fn cache_path(&self) -> PathBuf {
        let repo = Repo::with_revision(self.id.clone(), RepoType::Model, self.rev.clone());
        self.env.cache_dir.join(repo.folder_name())
    }

    fn url(&self, tail: &str) -> String {
        format!("{}/{tail}", self.env.endpoint)
    }

    /// The revision in a URL: a `/` inside it is escaped, as the Hub expects.
    fn url_rev(&self) -> String {
        self.rev.replace('/', "%2F")
    }

    /// The commit this revision points at in the cache: `refs/<rev>`, or the revision itself
    /// when it is a commit hash with a snapshot.
    fn cached_commit(&self) -> Option<String> {
        let base = self.cache_path();
        if let Ok(c) = std::fs::read_to_string(base.join("refs").join(&self.rev)) {
            let c = c.trim().to_string();
            // A ref names a commit: a plain folder name, never a path.
            if is_commit(&c) {
                return Some(c);
            }
        }
        (is_commit(&self.rev) && base.join("snapshots").join(&self.rev).is_dir())
            .then(|| self.rev.clone())
    }

    /// The error for `what` missing from the cache when only the cache can answer.
    pub fn not_cached(&self, what: &str) -> anyhow::Error {
        let (id, rev, cache) = (&self.id, &self.rev, self.env.cache_dir.display());
        if self.env.offline {
            anyhow!(
                "HF_HUB_OFFLINE is set and {what} of {id}@{rev} is not in the cache ({cache})\n\
                 hint: run once without HF_HUB_OFFLINE=1 to download it, or point HF_HOME at the cache that has it"
            )
        } else {
            anyhow!(
                "{} could not be reached and {what} of {id}@{rev} is not in the cache ({cache})\n\
                 hint: check the network",
                self.env.shown_endpoint()
            )
        }
    }

    /// The repo's files from the cached snapshot of this revision.
    pub fn cached_listing(&self) -> Result<Listing> {
        let commit = self
            .cached_commit()
            .ok_or_else(|| self.not_cached("the snapshot"))?;
        let dir = self.cache_path().join("snapshots").join(&commit);
        let mut files = vec![];
        let entries = std::fs::read_dir(&dir).map_err(|_| self.not_cached("the snapshot"))?;
        for entry in entries.flatten() {
            // `is_file` follows the snapshot's symlink: a link to a missing blob is no file.
            if entry.path().is_file() {
                if let Some(name) = entry.file_name().to_str() {
                    files.push(name.to_string());
                }
            }
        }
        files.sort();
        Ok(Listing {
            commit,
            files,
            from_cache: true,
        })
    }

    /// List the repo's files: `GET /api/models/{id}/revision/{rev}`, or the cached snapshot
    /// when offline. When the Hub cannot be reached at all and the cache has a snapshot of
    /// this revision, that snapshot answers instead (the caller says so).
    pub fn listing(&mut self) -> Result<Listing> {
        if self.env.offline {
            return self.cached_listing();
        }
        match self.fetch_listing() {
            Ok(l) => Ok(l),
            Err(Failure::Unreachable(e)) => self.cached_listing().or(Err(e)),
            Err(f) => Err(f.into_error()),
        }
    }

    fn fetch_listing(&self) -> std::result::Result<Listing, Failure> {
        let client = self.env.client()?;
        let what = format!("the file list of {}@{}", self.id, self.rev);
        let url = self.url(&format!(
            "api/models/{}/revision/{}",
            self.id,
            self.url_rev()
        ));
        let resp = client
            .get(&client.follow, &url, None)
            .call()
            .map_err(|e| client.failure(e, &self.id, None, &what))?;
        let mut body = vec![];
        resp.into_reader()
            .take(LISTING_LIMIT + 1)
            .read_to_end(&mut body)
            .map_err(|e| anyhow!("reading the Hub's answer for {what}: {e}"))?;
        let (commit, files) =
            parse_listing(&body).map_err(|detail| client.hostile(&what, &detail))?;
        Ok(Listing {
            commit,
            files,
            from_cache: false,
        })
    }

    /// The path of `file` in the cached snapshot of `commit`, if it is there.
    pub fn cached_file(&self, commit: &str, file: &str) -> Option<PathBuf> {
        if !is_commit(commit) {
            return None;
        }
        let p = self.cache_path().join("snapshots").join(commit).join(file);
        p.is_file().then_some(p)
    }

    /// `file` of this revision: from the snapshot of `commit` when cached (no request), else
    /// downloaded (and verified) into the cache. Offline, only the cache answers.
    pub fn get(
        &mut self,
        file: &str,
        commit: Option<&str>,
        index: (usize, usize),
    ) -> Result<PathBuf> {
        if let Some(p) = commit.and_then(|c| self.cached_file(c, file)) {
            return Ok(p);
        }
        if self.env.offline {
            return match self
                .cached_commit()
                .and_then(|c| self.cached_file(&c, file))
            {
                Some(p) => Ok(p),
                None => Err(self.not_cached(file)),
            };
        }
        if commit.is_none() {
            // No listing was asked for: the cache of this revision is trusted as it stands.
            if let Some(p) = self
                .cached_commit()
                .and_then(|c| self.cached_file(&c, file))
            {
                return Ok(p);
            }
        }
        self.download(file, commit, index)
    }

    /// Read the Hub's headers for `file` with a `bytes=0-0` request: ETag, commit, size, and
    /// where the body lives. Relative redirects (a renamed repo) are followed here; an
    /// absolute one (the CDN) is where the body is fetched.
    fn probe(
        &self,
        client: &Client,
        file: &str,
        what: &str,
    ) -> std::result::Result<Probe, Failure> {
        let fail = |e| client.failure(e, &self.id, Some(file), what);
        let mut url = self.url(&format!("{}/resolve/{}/{file}", self.id, self.url_rev()));
        let mut hops = 0;
        let resp = loop {
            let resp = client
                .get(&client.plain, &url, Some("bytes=0-0"))
                .call()
                .map_err(fail)?;
            let relative = resp
                .header("Location")
                .filter(|l| l.starts_with('/') && !l.starts_with("//"));
            match relative {
                Some(l) if (300..400).contains(&resp.status()) && hops < 5 => {
                    url = format!("{}{l}", client.origin);
                    hops += 1;
                }
                _ => break resp,
            }
        };
        let header = |name: &str| resp.header(name).map(str::to_string);
        let etag = header("X-Linked-Etag")
            .or_else(|| header("ETag"))
            .ok_or_else(|| client.hostile(what, "no ETag header"))?;
        let etag = etag.trim_start_matches("W/").replace('"', "");
        if etag.is_empty()
            || etag.len() > 128
            || !etag
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            let detail = format!("ETag {} is not a content hash", quoted(&etag));
            return Err(client.hostile(what, &detail).into());
        }
        let commit = header("X-Repo-Commit")
            .ok_or_else(|| client.hostile(what, "no X-Repo-Commit header"))?;
        if !is_commit(&commit) {
            let detail = format!("commit {} is not 40 hex digits", quoted(&commit));
            return Err(client.hostile(what, &detail).into());
        }
        let (url, sized) = if (300..400).contains(&resp.status()) {
            let Some(location) = header("Location") else {
                return Err(client.hostile(what, "a redirect without Location").into());
            };
            let sized = client
                .get(&client.follow, &location, Some("bytes=0-0"))
                .call()
                .map_err(fail)?;
            (location, sized)
        } else {
            (url, resp)
        };
        let size = sized
            .header("Content-Range")
            .and_then(|r| r.rsplit_once('/'))
            .and_then(|(_, n)| n.trim().parse::<u64>().ok())
            .ok_or_else(|| {
                client.hostile(what, "no valid Content-Range (bytes 0-0/SIZE) header")
            })?;
        Ok(Probe {
            etag,
            commit: commit.to_ascii_lowercase(),
            size,
            url,
        })
    }

    fn download(
        &mut self,
        file: &str,
        listed: Option<&str>,
        (n, total): (usize, usize),
    ) -> Result<PathBuf> {
        let what = format!("{file} of {}@{}", self.id, self.rev);
        let client = self.env.client()?;
        let probe = self
            .probe(&client, file, &what)
            .map_err(Failure::into_error)?;
        if let Some(listed) = listed.filter(|c| !c.eq_ignore_ascii_case(&probe.commit)) {
            bail!(
                "{}@{} moved while downloading: the file list was of commit {}, {file} is of {}\nhint: run again to download the new commit",
                self.id, self.rev, &listed[..7.min(listed.len())], &probe.commit[..7]
            );
        }
        let base = self.cache_path();
        let blobs = base.join("blobs");
        let blob = blobs.join(&probe.etag);
        let complete = std::fs::metadata(&blob).map(|m| m.is_file() && m.len() == probe.size);
        if !complete.unwrap_or(false) {
            std::fs::create_dir_all(&blobs)
                .with_context(|| format!("creating {}", blobs.display()))?;
            let lock = lock(&blob.with_extension("lock"), &what)?;
            let part = blob.with_extension("part");
            self.fetch_body(&client, &probe, &part, (file, &what), (n, total))?;
            std::fs::rename(&part, &blob)
                .with_context(|| format!("moving {} into place", part.display()))?;
            drop(lock);
        }
        // The snapshot entry: a relative link to the blob, as the Hub's cache has it.
        let snapshot = base.join("snapshots").join(&probe.commit);
        let pointer = snapshot.join(file);
        let depth = file.split('/').count() + 1;
        let target = PathBuf::from("../".repeat(depth))
            .join("blobs")
            .join(&probe.etag);
        if let Some(parent) = pointer.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        let _ = std::fs::remove_file(&pointer);
        link_or_copy(&target, &blob, &pointer)?;
        if self.rev != probe.commit {
            let refs = base.join("refs").join(&self.rev);
            write_small(&refs, &probe.commit)?;
        }
        Ok(pointer)
    }

    /// Stream the body into `part`, resuming what is there, retrying a dropped connection from
    /// where it stopped; verify the byte count.
    fn fetch_body(
        &self,
        client: &Client,
        probe: &Probe,
        part: &Path,
        (file, what): (&str, &str),
        (n, total): (usize, usize),
    ) -> Result<()> {
        let bar = self.bar(file, probe.size, (n, total));
        let mut attempt = 0;
        loop {
            match self.fetch_from(client, probe, part, &bar) {
                Ok(()) => break,
                Err(e) if attempt < RETRIES && e.retry => {
                    attempt += 1;
                    std::thread::sleep(Duration::from_millis(300 << attempt));
                }
                Err(e) => {
                    bar.abandon();
                    end_line(&bar);
                    return Err(e.error.context_for(what, part));
                }
            }
        }
        bar.finish();
        end_line(&bar);
        let got = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0);
        if got != probe.size {
            let _ = std::fs::remove_file(part);
            bail!(
                "download of {what} is incomplete: {got} of {} bytes; it was removed from the cache\n\
                 hint: run again to retry",
                probe.size
            );
        }
        Ok(())
    }

    /// One attempt: `Range: bytes=<have>-` appended to `part`.
    fn fetch_from(
        &self,
        client: &Client,
        probe: &Probe,
        part: &Path,
        bar: &ProgressBar,
    ) -> std::result::Result<(), Attempt> {
        let mut out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(part)
            .map_err(|e| Attempt::fatal(BodyError::Io(e)))?;
        let mut have = out
            .metadata()
            .map_err(|e| Attempt::fatal(BodyError::Io(e)))?
            .len();
        if have > probe.size {
            return Err(Attempt::fatal(BodyError::LongerPart));
        }
        bar.set_position(have);
        if have == probe.size {
            return Ok(());
        }
        let resp = match client
            .get(&client.follow, &probe.url, Some(&format!("bytes={have}-")))
            .call()
        {
            Ok(r) => r,
            Err(ureq::Error::Transport(t)) => {
                return Err(Attempt::retry(BodyError::Net(transport_why(&t, self.env))))
            }
            Err(ureq::Error::Status(code, _)) => {
                return Err(Attempt::fatal(BodyError::Status(code)))
            }
        };
        if resp.status() == 200 && have > 0 {
            // The server ignored the range: start over.
            out.set_len(0)
                .map_err(|e| Attempt::fatal(BodyError::Io(e)))?;
            have = 0;
            bar.set_position(0);
        }
        let mut reader = resp.into_reader().take(probe.size - have + 1);
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let k = match reader.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(k) => k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Attempt::retry(BodyError::Io(e))),
            };
            if have + k as u64 > probe.size {
                return Err(Attempt::fatal(BodyError::TooLong));
            }
            out.write_all(&buf[..k])
                .map_err(|e| Attempt::fatal(BodyError::Io(e)))?;
            have += k as u64;
            bar.set_position(have);
        }
    }

    fn bar(&self, name: &str, size: u64, (n, total): (usize, usize)) -> ProgressBar {
        if !self.progress {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::with_draw_target(Some(size), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix}{msg:24!} [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        if total > 1 {
            bar.set_prefix(format!("[{n}/{total}] "));
        }
        bar.set_message(name.to_string());
        bar
    }
}

/// How a body request went wrong.
enum BodyError {
    Io(std::io::Error),
    Net(String),
    Status(u16),
    LongerPart,
    TooLong,
}

struct Attempt {
    error: BodyError,
    /// A dropped connection: worth another try from where it stopped.
    retry: bool,
}

impl Attempt {
    fn retry(error: BodyError) -> Attempt {
        Attempt { error, retry: true }
    }
    fn fatal(error: BodyError) -> Attempt {
        Attempt {
            error,
            retry: false,
        }
    }
}

impl BodyError {
    fn context_for(self, what: &str, part: &Path) -> anyhow::Error {
        let dir = part.parent().unwrap_or(Path::new(".")).display();
        match self {
            BodyError::Io(e) => anyhow!(
                "download of {what} was interrupted: {e}\n\
                 hint: run again to resume; the partial download waits in {dir} as a `.part` file and is never used as a finished one"
            ),
            BodyError::Net(e) => anyhow!(
                "download of {what} was interrupted: {e}\n\
                 hint: run again to resume; the partial download waits in {dir} as a `.part` file and is never used as a finished one"
            ),
            BodyError::Status(code) => anyhow!("the Hub answered HTTP {code} for the body of {what}"),
            BodyError::LongerPart => anyhow!(
                "the partial download of {what} is longer than the file on the Hub\n\
                 hint: delete the `.part` files in {dir} and run again"
            ),
            BodyError::TooLong => {
                let _ = std::fs::remove_file(part);
                anyhow!("the server sent more bytes of {what} than it announced; the download was removed\nhint: check HF_ENDPOINT")
            }
        }
    }
}

/// What went wrong on the wire, without the URL (it may carry a password): `connection
/// failed: Connection refused`, or `no answer within 30 s` for a silent server.
fn transport_why(t: &ureq::Transport, env: &HubEnv) -> String {
    let io = std::error::Error::source(t).and_then(|e| e.downcast_ref::<std::io::Error>());
    if io.is_some_and(|e| {
        matches!(
            e.kind(),
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
        )
    }) {
        return format!("no answer within {} s", env.timeout.as_secs_f64());
    }
    let detail = match (std::error::Error::source(t), t.message()) {
        (Some(src), _) => src.to_string(),
        (None, Some(m)) => m.to_string(),
        (None, None) => String::new(),
    };
    let kind = t.kind().to_string().to_lowercase();
    let why = if detail.is_empty() {
        kind
    } else {
        format!("{kind}: {detail}")
    };
    why.replace(&env.endpoint, &env.shown_endpoint())
}

/// An exclusive lock on `path` (one download of a blob at a time), waiting up to 5 s.
fn lock(path: &Path, what: &str) -> Result<std::fs::File> {
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    for _ in 0..5 {
        if file.try_lock().is_ok() {
            return Ok(file);
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    bail!(
        "another process is downloading {what} (lock {})\nhint: wait for it, or delete the lock file if no download is running",
        path.display()
    )
}

/// The snapshot's link to its blob (a copy where links are not allowed).
fn link_or_copy(target: &Path, blob: &Path, pointer: &Path) -> Result<()> {
    #[cfg(unix)]
    let linked = std::os::unix::fs::symlink(target, pointer);
    #[cfg(not(unix))]
    let linked: std::io::Result<()> = {
        let _ = target;
        Err(std::io::ErrorKind::Unsupported.into())
    };
    if linked.is_err() {
        std::fs::copy(blob, pointer).with_context(|| format!("linking {}", pointer.display()))?;
    }
    Ok(())
}

/// Write a small file whole: to a temporary name, then renamed over.
fn write_small(path: &Path, text: &str) -> Result<()> {
    let parent = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_context(|| format!("writing {}", path.display()))
}

/// Fetch one file of a model repo into the HF cache (or find it there) and return its path.
/// The cache is trusted as it stands (no listing request), which is what `inspect` wants.
pub fn fetch_file(id: &str, revision: Option<&str>, file: &str, progress: bool) -> Result<PathBuf> {
    let env = HubEnv::from_env()?;
    HubRepo::new(&env, id, revision, progress)?.get(file, None, (1, 1))
}

/// A finished bar stays on screen; what comes next starts on a line of its own.
fn end_line(bar: &ProgressBar) {
    if !bar.is_hidden() {
        eprintln!();
    }
}
