//! The Hugging Face Hub through hf-hub, honouring the standard environment: `HF_HUB_CACHE` /
//! `HF_HOME` (cache), `HF_TOKEN` (gated repos), `HF_ENDPOINT` (a mirror or a local test server),
//! `HF_HUB_OFFLINE=1` (cache only, no request at all).
//!
//! Notable:
//! - Everything reads a [`HubEnv`] value rather than the process environment, so tests can
//!   point several hubs and caches at once; [`HubEnv::from_env`] is what the CLI uses.
//! - The token is a secret: [`HubEnv`]'s `Debug` redacts it, and no message here quotes a
//!   request header (hf-hub's own `Api`/`ApiBuilder` `Debug` would, so they are never printed).
//! - Downloads are verified before anyone trusts them: hf-hub streams into `blobs/<etag>.part`
//!   and only renames it to the blob (and links the snapshot) when the body ended cleanly; we
//!   then check the blob holds exactly the byte count the Hub announced and delete blob and
//!   link if not. A `.part` left by an interrupted download is only ever resumed with a range
//!   request for the same ETag (the content hash), never read as a finished file.
//! - Progress: one indicatif bar per downloaded file on stderr (bytes, rate, ETA), hidden when
//!   stderr is not a terminal or under `--quiet`.

use anyhow::{anyhow, bail, Context, Result};
use hf_hub::api::sync::{Api, ApiBuilder, ApiError};
use hf_hub::api::Progress;
use hf_hub::{Cache, Repo, RepoType};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Where the Hub is, where its cache lives, and how to authenticate.
#[derive(Clone)]
pub struct HubEnv {
    /// Base URL, no trailing slash (`HF_ENDPOINT`).
    pub endpoint: String,
    /// The `hub` cache folder holding `models--org--name/` (`HF_HUB_CACHE`, `HF_HOME/hub`).
    pub cache_dir: PathBuf,
    /// `HF_TOKEN`, else the token file next to the cache. Never printed.
    pub token: Option<String>,
    /// `HF_HUB_OFFLINE=1`: answer from the cache only, make no request.
    pub offline: bool,
}

impl std::fmt::Debug for HubEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubEnv")
            .field("endpoint", &self.endpoint)
            .field("cache_dir", &self.cache_dir)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("offline", &self.offline)
            .finish()
    }
}

fn env_nonempty(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.trim().is_empty())
}

impl HubEnv {
    /// Read the standard Hugging Face environment variables.
    pub fn from_env() -> HubEnv {
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
        let token = env_nonempty("HF_TOKEN")
            .map(|t| t.trim().to_string())
            .or_else(|| Cache::new(cache_dir.clone()).token());
        let endpoint = env_nonempty("HF_ENDPOINT")
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string())
            .trim_end_matches('/')
            .to_string();
        let offline = matches!(
            env_nonempty("HF_HUB_OFFLINE")
                .as_deref()
                .map(str::to_ascii_lowercase)
                .as_deref(),
            Some("1" | "true" | "yes" | "on")
        );
        HubEnv {
            endpoint,
            cache_dir,
            token,
            offline,
        }
    }

    fn api(&self, progress: bool) -> Result<Api> {
        ApiBuilder::from_cache(Cache::new(self.cache_dir.clone()))
            .with_endpoint(self.endpoint.clone())
            .with_token(self.token.clone())
            .with_progress(progress)
            // Resume from the `.part` within this run after a dropped connection.
            .with_retries(2)
            .build()
            // The error never holds the token (it is a TLS set-up failure).
            .map_err(|e| anyhow!("cannot set up the Hub client: {e}"))
    }
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

/// One repo at one revision on the Hub, with its cache.
pub struct HubRepo<'e> {
    env: &'e HubEnv,
    id: String,
    rev: String,
    progress: bool,
    api: Option<Api>,
}

impl<'e> HubRepo<'e> {
    pub fn new(env: &'e HubEnv, id: &str, revision: Option<&str>, progress: bool) -> HubRepo<'e> {
        HubRepo {
            env,
            id: id.to_string(),
            rev: revision.unwrap_or("main").to_string(),
            progress,
            api: None,
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn revision(&self) -> &str {
        &self.rev
    }

    fn repo(&self) -> Repo {
        Repo::with_revision(self.id.clone(), RepoType::Model, self.rev.clone())
    }

    /// `<cache>/models--org--name`.
    pub fn cache_path(&self) -> PathBuf {
        self.env.cache_dir.join(self.repo().folder_name())
    }

    fn api(&mut self) -> Result<&Api> {
        if self.api.is_none() {
            self.api = Some(self.env.api(self.progress)?);
        }
        Ok(self.api.as_ref().expect("set above"))
    }

    /// The commit this revision points at in the cache: `refs/<rev>`, or the revision itself
    /// when it is a commit hash with a snapshot.
    fn cached_commit(&self) -> Option<String> {
        let base = self.cache_path();
        if let Ok(c) = std::fs::read_to_string(base.join("refs").join(&self.rev)) {
            let c = c.trim().to_string();
            // A ref names a commit: a plain folder name, never a path.
            if !c.is_empty() && c.chars().all(|ch| ch.is_ascii_alphanumeric()) {
                return Some(c);
            }
        }
        let is_hash = self.rev.len() == 40 && self.rev.chars().all(|c| c.is_ascii_hexdigit());
        (is_hash && base.join("snapshots").join(&self.rev).is_dir()).then(|| self.rev.clone())
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
                self.env.endpoint
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

    /// List the repo's files: `GET /api/models/{id}/revision/{rev}` (hf-hub's `info`), or the
    /// cached snapshot when offline. When the Hub cannot be reached at all and the cache has a
    /// snapshot of this revision, that snapshot answers instead (the caller says so).
    pub fn listing(&mut self) -> Result<Listing> {
        if self.env.offline {
            return self.cached_listing();
        }
        let repo = self.repo();
        let (id, rev) = (self.id.clone(), self.rev.clone());
        let has_token = self.env.token.is_some();
        let endpoint = self.env.endpoint.clone();
        let api = self.api()?;
        let info = guard_panic(&endpoint, || api.repo(repo).info())?;
        match info {
            Ok(info) => Ok(Listing {
                commit: info.sha,
                files: info.siblings.into_iter().map(|s| s.rfilename).collect(),
                from_cache: false,
            }),
            Err(e) => {
                let unreachable = matches!(&e, ApiError::RequestError(r) if matches!(r.as_ref(), ureq::Error::Transport(_)));
                if unreachable {
                    if let Ok(listing) = self.cached_listing() {
                        return Ok(listing);
                    }
                }
                Err(explain(e, &endpoint, &id, &rev, None, has_token))
            }
        }
    }

    /// The path of `file` in the cached snapshot of `commit`, if it is there.
    pub fn cached_file(&self, commit: &str, file: &str) -> Option<PathBuf> {
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
        self.download(file, index)
    }

    fn download(&mut self, file: &str, (n, total): (usize, usize)) -> Result<PathBuf> {
        let bar = if self.progress {
            ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr())
        } else {
            ProgressBar::hidden()
        };
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
        let progress = Counted {
            bar: bar.clone(),
            announced: Arc::new(AtomicU64::new(0)),
        };
        let announced = progress.announced.clone();
        let repo = self.repo();
        let (id, rev) = (self.id.clone(), self.rev.clone());
        let has_token = self.env.token.is_some();
        let endpoint = self.env.endpoint.clone();
        let blobs = self.cache_path().join("blobs");
        let api = self.api()?;
        let result = guard_panic(&endpoint, || {
            api.repo(repo).download_with_progress(file, progress)
        })
        .and_then(|r| {
            r.map_err(|e| explain(e, &endpoint, &id, &rev, Some((file, &blobs)), has_token))
        });
        let path = match result {
            Ok(p) => p,
            Err(e) => {
                bar.abandon();
                end_line(&bar);
                return Err(e);
            }
        };
        bar.finish();
        end_line(&bar);
        // Verify: the blob holds exactly what the Hub announced.
        let expected = announced.load(Ordering::SeqCst);
        let got = std::fs::metadata(&path)
            .with_context(|| format!("reading the downloaded {}", path.display()))?
            .len();
        if got != expected {
            let blob = std::fs::canonicalize(&path).ok();
            let _ = std::fs::remove_file(&path);
            if let Some(b) = blob {
                let _ = std::fs::remove_file(b);
            }
            bail!(
                "download of {file} of {id}@{rev} is incomplete: {got} of {expected} bytes; it was removed from the cache\n\
                 hint: run again to retry"
            );
        }
        Ok(path)
    }
}

/// Fetch one file of a model repo into the HF cache (or find it there) and return its path.
/// The cache is trusted as it stands (no listing request), which is what `inspect` wants.
pub fn fetch_file(id: &str, revision: Option<&str>, file: &str, progress: bool) -> Result<PathBuf> {
    let env = HubEnv::from_env();
    HubRepo::new(&env, id, revision, progress).get(file, None, (1, 1))
}

/// A finished bar stays on screen; what comes next starts on a line of its own.
fn end_line(bar: &ProgressBar) {
    if !bar.is_hidden() {
        eprintln!();
    }
}

/// hf-hub's progress callbacks driving an indicatif bar and keeping the announced size.
struct Counted {
    bar: ProgressBar,
    /// The size the Hub announced (`Content-Range`), read back to verify the blob.
    announced: Arc<AtomicU64>,
}

impl Progress for Counted {
    fn init(&mut self, size: usize, filename: &str) {
        // hf-hub calls this again (then `update(resume_offset)`) for every attempt.
        self.announced.store(size as u64, Ordering::SeqCst);
        self.bar.set_length(size as u64);
        self.bar.set_position(0);
        self.bar.set_message(filename.to_string());
    }

    fn update(&mut self, size: usize) {
        self.bar.inc(size as u64);
    }

    fn finish(&mut self) {}
}

/// Turn an hf-hub error into one that says what happened and what to do. `file` is `None` for
/// the listing request; `blobs` is where partial downloads live.
/// Run an hf-hub call, turning a panic inside it into an error: hf-hub 0.4 unwraps some things
/// a malformed (or hostile) server can leave out, e.g. the `Location` of a redirect. The panic
/// message is kept from stderr while it runs.
fn guard_panic<T>(endpoint: &str, call: impl FnOnce() -> T) -> Result<T> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(call));
    std::panic::set_hook(hook);
    result.map_err(|payload| {
        let why = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".into());
        anyhow!(
            "{endpoint} answered in a way the Hub never does (the Hub client failed: {why})\nhint: check HF_ENDPOINT; a mirror or proxy may be rewriting the answers"
        )
    })
}

fn explain(
    e: ApiError,
    endpoint: &str,
    id: &str,
    rev: &str,
    file: Option<(&str, &Path)>,
    has_token: bool,
) -> anyhow::Error {
    let what = match file {
        Some((f, _)) => format!("{f} of {id}@{rev}"),
        None => format!("the file list of {id}@{rev}"),
    };
    let e = match e {
        ApiError::TooManyRetries(inner) => *inner,
        e => e,
    };
    match e {
        ApiError::RequestError(req) => match *req {
            ureq::Error::Status(401 | 403, _) => {
                let hint = if has_token {
                    "hint: accept the licence on the model page with the account whose HF_TOKEN you set"
                } else {
                    "hint: accept the licence on the model page and set HF_TOKEN"
                };
                let refused = match file {
                    Some((f, _)) => format!("the Hub refused {f} without access"),
                    None => "the Hub refused to list its files (a private repo or a wrong id also answer this way)".to_string(),
                };
                anyhow!("{id} is gated: {refused}\n{hint}")
            }
            ureq::Error::Status(404, _) => match file {
                Some(_) => anyhow!(
                    "{what} not found on {endpoint}\n\
                     hint: check the repo id and revision (`llmarch models` lists the aliases)"
                ),
                None => anyhow!(
                    "{id}@{rev} not found on {endpoint}\n\
                     hint: check the repo id and revision (`llmarch models` lists the aliases)"
                ),
            },
            ureq::Error::Status(code, _) => {
                anyhow!("the Hub ({endpoint}) answered HTTP {code} for {what}")
            }
            ureq::Error::Transport(t) => {
                // Kind, message and cause, not the URL: a proxy URL may carry credentials.
                let mut why = t.kind().to_string();
                if let Some(m) = t.message() {
                    why.push_str(&format!(": {m}"));
                }
                if let Some(src) = std::error::Error::source(&t) {
                    why.push_str(&format!(": {src}"));
                }
                anyhow!(
                    "cannot reach {endpoint} for {what}: {why}\n\
                     hint: check the network, or set HF_HUB_OFFLINE=1 to use the cache only"
                )
            }
        },
        ApiError::IoError(io) => match file {
            Some((_, blobs)) => anyhow!(
                "download of {what} was interrupted: {io}\n\
                 hint: run again to resume; the partial download waits in {} as a `.part` file and is never used as a finished one",
                blobs.display()
            ),
            None => anyhow!("reading the Hub's answer for {what}: {io}"),
        },
        ApiError::InvalidResume => {
            let dir = file.map(|(_, b)| b.display().to_string()).unwrap_or_default();
            anyhow!(
                "the partial download of {what} is longer than the file on the Hub\n\
                 hint: delete the `.part` files in {dir} and run again"
            )
        }
        ApiError::MissingHeader(h) | ApiError::InvalidHeader(h) => anyhow!(
            "the answer of {endpoint} for {what} has no valid `{h}` header: is HF_ENDPOINT a Hugging Face Hub?"
        ),
        ApiError::LockAcquisition(p) => anyhow!(
            "another process is downloading {what} (lock {})\nhint: wait for it, or delete the lock file if no download is running",
            p.display()
        ),
        other => anyhow!("downloading {what} from {endpoint}: {other}"),
    }
}
