//! The Hugging Face Hub through hf-hub, honouring the standard environment: `HF_HOME` (cache),
//! `HF_TOKEN` (gated repos), `HF_ENDPOINT` (a mirror or a local test server), `HF_HUB_OFFLINE=1`
//! (cache only).

use anyhow::{anyhow, Result};
use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};
use std::path::PathBuf;

fn offline() -> bool {
    matches!(
        std::env::var("HF_HUB_OFFLINE").as_deref(),
        Ok("1") | Ok("true") | Ok("TRUE") | Ok("yes") | Ok("ON") | Ok("on")
    )
}

fn repo(id: &str, revision: Option<&str>) -> Repo {
    Repo::with_revision(
        id.to_string(),
        RepoType::Model,
        revision.unwrap_or("main").to_string(),
    )
}

/// Fetch one file of a model repo into the HF cache (or find it there) and return its path.
pub fn fetch_file(id: &str, revision: Option<&str>, file: &str, progress: bool) -> Result<PathBuf> {
    let rev = revision.unwrap_or("main");
    let cache = Cache::from_env();
    if offline() {
        return cache.repo(repo(id, revision)).get(file).ok_or_else(|| {
            anyhow!(
                "HF_HUB_OFFLINE is set and {file} of {id}@{rev} is not in the cache ({})\n\
                 hint: run once without HF_HUB_OFFLINE=1 to download it, or point HF_HOME at the cache that has it",
                cache.path().display()
            )
        });
    }
    let token = std::env::var("HF_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
        .or_else(|| cache.token());
    let api = ApiBuilder::from_env()
        .with_token(token.clone())
        .with_progress(progress)
        .build()
        .map_err(|e| anyhow!("cannot set up the Hub client: {e}"))?;
    api.repo(repo(id, revision))
        .get(file)
        .map_err(|e| explain(e, id, rev, file, token.is_some()))
}

/// Turn an hf-hub error into one that says what happened and what to do.
fn explain(e: ApiError, id: &str, rev: &str, file: &str, has_token: bool) -> anyhow::Error {
    let endpoint =
        std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".to_string());
    if let ApiError::RequestError(req) = &e {
        match req.as_ref() {
            ureq::Error::Status(401 | 403, _) => {
                let hint = if has_token {
                    "hint: accept the licence on the model page with the account whose HF_TOKEN you set"
                } else {
                    "hint: accept the licence on the model page and set HF_TOKEN"
                };
                return anyhow!("{id} is gated: the Hub refused {file} without access\n{hint}");
            }
            ureq::Error::Status(404, _) => {
                return anyhow!(
                    "{file} of {id}@{rev} not found on {endpoint}\n\
                     hint: check the repo id and revision (`llmarch models` lists the aliases)"
                );
            }
            ureq::Error::Status(code, _) => {
                return anyhow!(
                    "the Hub ({endpoint}) answered HTTP {code} for {file} of {id}@{rev}"
                );
            }
            ureq::Error::Transport(t) => {
                return anyhow!(
                    "cannot reach {endpoint} for {file} of {id}@{rev}: {t}\n\
                     hint: check the network, or set HF_HUB_OFFLINE=1 to use the cache only"
                );
            }
        }
    }
    anyhow!("downloading {file} of {id}@{rev} from {endpoint}: {e}")
}
