//! Hub downloads against a local server that answers the way the Hugging Face Hub does
//! (`tests/common`: resolve URLs with ETag, X-Repo-Commit, Content-Range and range requests,
//! the `/api/models/{id}/revision/{rev}` file list, 401 without the right token), through the
//! real Hub client: gated repos, tokens, revisions, the offline cache, missing files,
//! interrupted and lossy downloads, and repos whose index points outside the snapshot.
//! `HF_TOKEN` must never appear in any output.

mod common;

use candle_core::{DType, Device};
use common::{expect_error, llmarch, repo_routes, stderr, stdout, FakeHub, Reply};
use llmarch::loader::hub::HubEnv;
use llmarch::loader::model_files::{resolve_with, ModelFiles, ResolveOptions};
use llmarch::loader::{weights, ModelRef};
use safetensors::Dtype;
use serde_json::json;
use std::path::{Path, PathBuf};

const TOKEN: &str = "hf_llmarchTestSecret9f3b2c71d4e5";
const COMMIT_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const COMMIT_B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

fn st(tensors: &[(&str, Vec<usize>, f32)]) -> Vec<u8> {
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s, v)| {
            let count: usize = s.iter().product();
            let bytes = (0..count)
                .flat_map(|i| (v + i as f32).to_le_bytes())
                .collect();
            (n.to_string(), s.clone(), bytes)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = data
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::tensor::serialize(views, None).unwrap()
}

/// A multimodal repo in several formats: a sharded wrapper checkpoint whose second shard is
/// vision-only, plus `consolidated.safetensors` and a GGUF that must never be fetched.
fn wrapper_repo() -> Vec<(&'static str, Vec<u8>)> {
    let lm = "model.language_model.";
    let index = json!({"metadata": {}, "weight_map": {
        format!("{lm}embed_tokens.weight"): "model-00001-of-00003.safetensors",
        "model.vision_tower.w": "model-00002-of-00003.safetensors",
        format!("{lm}norm.weight"): "model-00003-of-00003.safetensors",
        "lm_head.weight": "model-00003-of-00003.safetensors",
    }});
    vec![
        (
            "config.json",
            json!({"model_type": "gemma4"}).to_string().into_bytes(),
        ),
        ("tokenizer_config.json", b"{}".to_vec()),
        (
            "generation_config.json",
            json!({"eos_token_id": [1, 106]}).to_string().into_bytes(),
        ),
        (
            "model.safetensors.index.json",
            index.to_string().into_bytes(),
        ),
        (
            "model-00001-of-00003.safetensors",
            st(&[(&format!("{lm}embed_tokens.weight"), vec![6, 4], 0.5)]),
        ),
        (
            "model-00002-of-00003.safetensors",
            st(&[("model.vision_tower.w", vec![64], 9.0)]),
        ),
        (
            "model-00003-of-00003.safetensors",
            st(&[
                (&format!("{lm}norm.weight"), vec![4], 1.0),
                ("lm_head.weight", vec![6, 4], 2.0),
            ]),
        ),
        ("consolidated.safetensors", vec![7; 64]),
        ("gemma-q4.gguf", vec![7; 64]),
        ("README.md", b"# card".to_vec()),
    ]
}

fn env(hub: &FakeHub, home: &Path, token: Option<&str>) -> HubEnv {
    let mut env = HubEnv::new(&hub.url, home.join("hub"));
    env.token = token.map(str::to_string);
    env
}

fn repo(id: &str, rev: Option<&str>) -> ModelRef {
    ModelRef::Repo {
        id: id.to_string(),
        revision: rev.map(str::to_string),
    }
}

fn quiet() -> ResolveOptions {
    ResolveOptions { progress: false }
}

fn name(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().into_owned()
}

/// Every file under `dir`, relative, sorted (symlinks listed, not followed).
fn tree(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() && !p.is_symlink() {
                walk(base, &p, out);
            } else {
                out.push(p.strip_prefix(base).unwrap().display().to_string());
            }
        }
    }
    let mut out = vec![];
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// Errors and their chains, as the CLI would print them and as `{:?}` would.
fn all_text(e: &anyhow::Error) -> String {
    format!("{e:#}\n{e:?}")
}

#[test]
fn gated_download_with_token_then_offline_with_no_request() {
    let id = "acme/gemma-wrapper";
    let hub = FakeHub::start(repo_routes(
        id,
        "main",
        COMMIT_A,
        &wrapper_repo(),
        Some(TOKEN),
    ));
    let home = tempfile::tempdir().unwrap();
    let mut outputs = vec![];

    // 1. No token: the Hub answers 401 and the error says what to do. Nothing is cached.
    let e = resolve_with(&repo(id, None), &env(&hub, home.path(), None), &quiet()).unwrap_err();
    let msg = format!("{e:#}");
    assert!(msg.starts_with("acme/gemma-wrapper is gated"), "{msg}");
    assert!(
        msg.contains("hint: accept the licence on the model page and set HF_TOKEN"),
        "{msg}"
    );
    assert!(
        !tree(home.path()).iter().any(|f| f.contains("snapshots")),
        "{:?}",
        tree(home.path())
    );
    outputs.push(all_text(&e));

    // A wrong token: the hint names the account's licence.
    let e = resolve_with(
        &repo(id, None),
        &env(&hub, home.path(), Some("hf_wrong")),
        &quiet(),
    )
    .unwrap_err();
    assert!(
        format!("{e:#}").contains("with the account whose HF_TOKEN you set"),
        "{e:#}"
    );
    outputs.push(all_text(&e));

    // 2. With the token: the file list, then only the text model's files.
    let before = hub.hit_count();
    let files = resolve_with(
        &repo(id, None),
        &env(&hub, home.path(), Some(TOKEN)),
        &quiet(),
    )
    .unwrap();
    let seen: Vec<_> = hub.seen.lock().unwrap()[before..].to_vec();
    assert_eq!(seen[0].path, format!("/api/models/{id}/revision/main"));
    let fetched: Vec<&str> = seen.iter().map(|s| s.path.as_str()).collect();
    for never in ["model-00002-of-00003", "consolidated", ".gguf", "README"] {
        assert!(
            !fetched.iter().any(|p| p.contains(never)),
            "{never} fetched: {fetched:?}"
        );
    }
    // Each file: a `bytes=0-0` probe (ETag, commit, size), then the body from byte 0.
    for f in [
        "config.json",
        "model-00001-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
    ] {
        let path = format!("/{id}/resolve/main/{f}");
        let ranges: Vec<_> = seen
            .iter()
            .filter(|s| s.path == path)
            .map(|s| s.range.clone().unwrap_or_default())
            .collect();
        assert_eq!(ranges, ["0-0", "0-"], "{f}");
    }
    assert!(seen
        .iter()
        .filter(|s| s.path.contains("/resolve/"))
        .all(|s| s.authorization.as_deref() == Some(&format!("Bearer {TOKEN}") as &str)));
    assert_eq!(files.commit.as_deref(), Some(COMMIT_A));
    assert_eq!(
        files.weights.iter().map(|p| name(p)).collect::<Vec<_>>(),
        [
            "model-00001-of-00003.safetensors",
            "model-00003-of-00003.safetensors"
        ]
    );
    assert!(files.tokenizer.is_none() && files.tokenizer_config.is_some());
    assert!(
        files.dir.ends_with(format!("snapshots/{COMMIT_A}")),
        "{}",
        files.dir.display()
    );
    for (n, bytes) in wrapper_repo() {
        let p = files.dir.join(n);
        if p.exists() {
            assert_eq!(std::fs::read(&p).unwrap(), bytes, "{n}");
        }
    }
    let w = weights::load(&files, DType::F32, &Device::Cpu).unwrap();
    assert!(w.lm_head(6, 4).unwrap().is_some());

    // 3. Online again: the file list only; every file comes from the cache.
    let before = hub.hit_count();
    resolve_with(
        &repo(id, None),
        &env(&hub, home.path(), Some(TOKEN)),
        &quiet(),
    )
    .unwrap();
    assert_eq!(
        hub.hits.lock().unwrap()[before..],
        [format!("/api/models/{id}/revision/main")]
    );

    // 4. Offline: the same files from the cache, and not one request.
    let before = hub.hit_count();
    let mut offline = env(&hub, home.path(), None);
    offline.offline = true;
    let again = resolve_with(&repo(id, None), &offline, &quiet()).unwrap();
    assert_eq!(again.weights, files.weights);
    assert_eq!(again.config, files.config);
    assert_eq!(hub.hit_count(), before, "offline made a request");
    // The alias-free repo id at an explicit commit works offline too.
    let pinned = resolve_with(&repo(id, Some(COMMIT_A)), &offline, &quiet()).unwrap();
    assert_eq!(pinned.weights, files.weights);
    assert_eq!(hub.hit_count(), before);

    // 5. Offline with nothing cached for that repo: a clear error, no request.
    let e = resolve_with(&repo("acme/other", None), &offline, &quiet()).unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains(
            "HF_HUB_OFFLINE is set and the snapshot of acme/other@main is not in the cache"
        ),
        "{msg}"
    );
    assert!(
        msg.contains("hint: run once without HF_HUB_OFFLINE=1"),
        "{msg}"
    );
    assert_eq!(hub.hit_count(), before);
    outputs.push(all_text(&e));

    // 6. The Hub unreachable (not offline): the cached snapshot answers, with a note.
    let mut down = env(&hub, home.path(), Some(TOKEN));
    down.endpoint = "http://127.0.0.1:9".to_string();
    let cached = resolve_with(&repo(id, None), &down, &quiet()).unwrap();
    assert_eq!(cached.weights, files.weights);
    assert!(
        cached.notes[0].contains("could not be reached"),
        "{:?}",
        cached.notes
    );
    let e = resolve_with(&repo("acme/other", None), &down, &quiet()).unwrap_err();
    assert!(
        format!("{e:#}").contains("cannot reach http://127.0.0.1:9"),
        "{e:#}"
    );
    outputs.push(all_text(&e));

    // The token never shows, not even in Debug output.
    outputs.push(format!("{:?}", env(&hub, home.path(), Some(TOKEN))));
    outputs.push(format!("{files:?}"));
    for o in outputs {
        assert!(!o.contains(TOKEN), "the token leaked: {o}");
    }
}

#[test]
fn revisions_resolve_to_their_own_snapshots() {
    let id = "acme/revs";
    let v = |x: f32| -> Vec<(&'static str, Vec<u8>)> {
        vec![
            ("config.json", json!({"rev": x}).to_string().into_bytes()),
            (
                "model.safetensors",
                st(&[("model.norm.weight", vec![2], x)]),
            ),
        ]
    };
    let mut routes = repo_routes(id, "main", COMMIT_A, &v(1.0), None);
    routes.extend(repo_routes(id, "v1.0", COMMIT_B, &v(2.0), None));
    routes.extend(repo_routes(id, "refs/pr/1", COMMIT_B, &v(2.0), None));
    let hub = FakeHub::start(routes);
    let home = tempfile::tempdir().unwrap();
    let e = env(&hub, home.path(), None);
    let main = resolve_with(&repo(id, None), &e, &quiet()).unwrap();
    let v1 = resolve_with(&repo(id, Some("v1.0")), &e, &quiet()).unwrap();
    let pr = resolve_with(&repo(id, Some("refs/pr/1")), &e, &quiet()).unwrap();
    assert_eq!(main.commit.as_deref(), Some(COMMIT_A));
    assert_eq!(v1.commit.as_deref(), Some(COMMIT_B));
    assert_eq!(pr.weights, v1.weights);
    let rev_of = |f: &ModelFiles| -> f64 {
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&f.config).unwrap()).unwrap();
        v["rev"].as_f64().unwrap()
    };
    assert_eq!((rev_of(&main), rev_of(&v1)), (1.0, 2.0));
    // Offline, each revision finds its own snapshot.
    let mut off = e.clone();
    off.offline = true;
    let before = hub.hit_count();
    assert_eq!(
        rev_of(&resolve_with(&repo(id, Some("v1.0")), &off, &quiet()).unwrap()),
        2.0
    );
    assert_eq!(
        rev_of(&resolve_with(&repo(id, None), &off, &quiet()).unwrap()),
        1.0
    );
    assert_eq!(hub.hit_count(), before);
    // A revision the Hub does not have.
    let err = resolve_with(&repo(id, Some("v9")), &e, &quiet()).unwrap_err();
    assert!(
        format!("{err:#}").contains("acme/revs@v9 not found on"),
        "{err:#}"
    );
}

#[test]
fn missing_files_give_clear_errors() {
    let id = "acme/holes";
    let index = json!({"weight_map": {
        "model.a": "model-00001-of-00002.safetensors",
        "model.b": "model-00002-of-00002.safetensors"}});
    let files = vec![
        ("config.json", b"{}".to_vec()),
        (
            "model.safetensors.index.json",
            index.to_string().into_bytes(),
        ),
        (
            "model-00001-of-00002.safetensors",
            st(&[("model.a", vec![1], 0.0)]),
        ),
        (
            "model-00002-of-00002.safetensors",
            st(&[("model.b", vec![1], 0.0)]),
        ),
    ];
    // The list names shard 2 but the Hub answers 404 for it.
    let mut routes = repo_routes(id, "main", COMMIT_A, &files, None);
    routes.remove(&format!(
        "/{id}/resolve/main/model-00002-of-00002.safetensors"
    ));
    let hub = FakeHub::start(routes);
    let home = tempfile::tempdir().unwrap();
    let e = resolve_with(&repo(id, None), &env(&hub, home.path(), None), &quiet()).unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains(
            "model-00002-of-00002.safetensors of acme/holes@main not found on http://127.0.0.1"
        ),
        "{msg}"
    );

    // The index names a shard the repo does not list: refused before any request for it.
    let id2 = "acme/holes2";
    let hub = FakeHub::start(repo_routes(id2, "main", COMMIT_A, &files[..3], None));
    let e = resolve_with(&repo(id2, None), &env(&hub, home.path(), None), &quiet()).unwrap_err();
    assert!(
        format!("{e:#}").contains(
            "names shard model-00002-of-00002.safetensors, but acme/holes2@main has no such file"
        ),
        "{e:#}"
    );
    assert!(!hub.hits.lock().unwrap().iter().any(|h| h.contains("00002")));

    // No config.json, and no repo at all.
    let hub = FakeHub::start(repo_routes(
        "acme/bare",
        "main",
        COMMIT_A,
        &files[1..],
        None,
    ));
    let e = resolve_with(
        &repo("acme/bare", None),
        &env(&hub, home.path(), None),
        &quiet(),
    )
    .unwrap_err();
    assert!(
        format!("{e:#}").contains("acme/bare@main has no config.json"),
        "{e:#}"
    );
    let e = resolve_with(
        &repo("acme/none", None),
        &env(&hub, home.path(), None),
        &quiet(),
    )
    .unwrap_err();
    assert!(
        format!("{e:#}").contains("acme/none@main not found on"),
        "{e:#}"
    );
}

/// Files of the cache a later run would trust: snapshot links and finished blobs.
fn trusted(cache: &Path) -> Vec<String> {
    tree(cache)
        .into_iter()
        .filter(|f| !f.ends_with(".part") && !f.ends_with(".lock") && !f.contains("/refs/"))
        .collect()
}

#[test]
fn an_interrupted_download_leaves_nothing_trusted_and_resumes() {
    let id = "acme/flaky";
    let weights_file = st(&[("model.embed_tokens.weight", vec![512], 0.25)]);
    let files = vec![
        ("config.json", b"{}".to_vec()),
        ("model.safetensors", weights_file.clone()),
    ];
    let good = repo_routes(id, "main", COMMIT_A, &files, None);
    let mut flaky = good.clone();
    let key = format!("/{id}/resolve/main/model.safetensors");
    let half = weights_file.len() / 2;
    flaky.insert(key.clone(), Reply::Cut(Box::new(flaky[&key].clone()), half));
    let home = tempfile::tempdir().unwrap();
    let cache = home.path().join("hub");
    {
        let hub = FakeHub::start(flaky);
        let e = resolve_with(&repo(id, None), &env(&hub, home.path(), None), &quiet()).unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.contains("download of model.safetensors of acme/flaky@main was interrupted"),
            "{msg}"
        );
        assert!(msg.contains("hint: run again to resume"), "{msg}");
        // The client retried from where the body stopped (range requests), and gave up.
        let ranges: Vec<_> = hub
            .seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.path == key)
            .map(|s| s.range.clone().unwrap_or_default())
            .collect();
        assert_eq!(ranges[..2], ["0-0".to_string(), "0-".to_string()]);
        assert!(
            ranges[2..].iter().all(|r| *r == format!("{half}-")),
            "{ranges:?}"
        );
    }
    // The config is complete and trusted; the weights are not there in any trusted form.
    let t = trusted(&cache);
    assert!(
        t.iter()
            .any(|f| f.ends_with(&format!("{COMMIT_A}/config.json"))),
        "{t:?}"
    );
    assert!(!t.iter().any(|f| f.ends_with("model.safetensors")), "{t:?}");
    assert_eq!(
        t.iter().filter(|f| f.contains("/blobs/")).count(),
        1,
        "{t:?}"
    );
    assert!(tree(&cache).iter().any(|f| f.ends_with(".part")));
    // Offline, the half file is not offered.
    let mut off = HubEnv::new("http://127.0.0.1:9", cache.clone());
    off.offline = true;
    let e = resolve_with(&repo(id, None), &off, &quiet()).unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("HF_HUB_OFFLINE is set and the weights (model.safetensors or model.safetensors.index.json) of acme/flaky@main is not in the cache"),
        "{msg}"
    );

    // The Hub is healthy again: the download resumes from the `.part` and completes.
    let hub = FakeHub::start(good);
    let files = resolve_with(&repo(id, None), &env(&hub, home.path(), None), &quiet()).unwrap();
    assert_eq!(std::fs::read(&files.weights[0]).unwrap(), weights_file);
    let resumed = hub
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.path == key)
        .map(|s| s.range.clone().unwrap_or_default())
        .collect::<Vec<_>>();
    assert_eq!(resumed, ["0-0".to_string(), format!("{half}-")]);
    assert!(!tree(&cache).iter().any(|f| f.ends_with(".part")));
    off.offline = true;
    resolve_with(&repo(id, None), &off, &quiet()).unwrap();
}

#[test]
fn a_server_that_loses_bytes_is_caught_and_nothing_kept() {
    let id = "acme/lossy";
    let body = st(&[("model.embed_tokens.weight", vec![256], 0.5)]);
    let files = vec![
        ("config.json", b"{}".to_vec()),
        ("model.safetensors", body.clone()),
    ];
    let mut routes = repo_routes(id, "main", COMMIT_A, &files, None);
    let key = format!("/{id}/resolve/main/model.safetensors");
    routes.insert(
        key.clone(),
        Reply::Short(Box::new(routes[&key].clone()), 100),
    );
    let hub = FakeHub::start(routes);
    let home = tempfile::tempdir().unwrap();
    let e = resolve_with(&repo(id, None), &env(&hub, home.path(), None), &quiet()).unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains(&format!(
            "download of model.safetensors of acme/lossy@main is incomplete: 100 of {} bytes; it was removed from the cache",
            body.len()
        )),
        "{msg}"
    );
    let t = trusted(&home.path().join("hub"));
    assert!(!t.iter().any(|f| f.ends_with("model.safetensors")), "{t:?}");
    assert_eq!(
        t.iter().filter(|f| f.contains("/blobs/")).count(),
        1,
        "{t:?}"
    );
}

/// A redirect without `Location` (hf-hub 0.4 unwrapped `None` here): one clear error, no panic.
#[test]
fn a_redirect_without_location_is_an_error_not_a_panic() {
    let id = "acme/odd";
    let files = vec![("config.json", b"{}".to_vec())];
    let mut routes = repo_routes(id, "main", COMMIT_A, &files, None);
    let raw = format!(
        "HTTP/1.1 302 Found\r\nETag: \"abc\"\r\nX-Repo-Commit: {COMMIT_A}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    routes.insert(
        format!("/{id}/resolve/main/config.json"),
        Reply::Raw(raw.into_bytes()),
    );
    let hub = FakeHub::start(routes);
    let home = tempfile::tempdir().unwrap();
    let e = resolve_with(&repo(id, None), &env(&hub, home.path(), None), &quiet()).unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("answered in a way the Hub never does"),
        "{msg}"
    );
    // And through the binary: exit 1, no panic message.
    let o = llmarch()
        .args(["inspect", id])
        .env("HF_ENDPOINT", &hub.url)
        .env("HF_HOME", home.path())
        .env_remove("HF_HUB_OFFLINE")
        .output()
        .unwrap();
    let err = expect_error(&o, 1);
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains("answered in a way the Hub never does"),
        "{err}"
    );
}

#[test]
fn a_corrupt_shard_from_the_hub_is_refused_at_load() {
    let id = "acme/corrupt";
    let mut body = st(&[("model.embed_tokens.weight", vec![64], 0.5)]);
    body.truncate(body.len() - 8); // the Hub serves it whole, but it was uploaded cut
    let files = vec![("config.json", b"{}".to_vec()), ("model.safetensors", body)];
    let hub = FakeHub::start(repo_routes(id, "main", COMMIT_A, &files, None));
    let home = tempfile::tempdir().unwrap();
    let files = resolve_with(&repo(id, None), &env(&hub, home.path(), None), &quiet()).unwrap();
    let e = weights::load(&files, DType::F32, &Device::Cpu).unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("model.safetensors") && msg.contains("truncated"),
        "{msg}"
    );
}

#[test]
fn an_index_pointing_outside_the_snapshot_is_refused_before_any_request() {
    let home = tempfile::tempdir().unwrap();
    for (n, evil) in [
        "../../x.safetensors",
        "../../../../../../tmp/llmarch-evil.safetensors",
        "/etc/passwd.safetensors",
        "blobs/../../x.safetensors",
    ]
    .into_iter()
    .enumerate()
    {
        let id = format!("acme/evil{n}");
        let index = json!({"weight_map": {"model.a": evil}});
        let files = vec![
            ("config.json", b"{}".to_vec()),
            (
                "model.safetensors.index.json",
                index.to_string().into_bytes(),
            ),
        ];
        let mut routes = repo_routes(&id, "main", COMMIT_A, &files, None);
        // Even if the Hub lists and serves the file, it is never asked for.
        let info = format!("/api/models/{id}/revision/main");
        let listed = json!({"sha": COMMIT_A, "siblings": [
            {"rfilename": "config.json"}, {"rfilename": "model.safetensors.index.json"},
            {"rfilename": evil}]});
        routes.insert(info, Reply::Json(listed.to_string()));
        routes.insert(
            format!("/{id}/resolve/main/{evil}"),
            Reply::File(st(&[("model.a", vec![1], 0.0)])),
        );
        let hub = FakeHub::start(routes);
        let e =
            resolve_with(&repo(&id, None), &env(&hub, home.path(), None), &quiet()).unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.contains("refusing to read outside the model folder"),
            "{evil}: {msg}"
        );
        assert!(
            !hub.hits
                .lock()
                .unwrap()
                .iter()
                .any(|h| h.contains("safetensors") && !h.ends_with("index.json")),
            "{evil}: {:?}",
            hub.hits.lock().unwrap()
        );
    }
    // Nothing was written anywhere but the cache's own folders.
    for f in tree(home.path()) {
        let top = Path::new(&f)
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_owned();
        assert_eq!(top, "hub", "{f}");
        assert!(!f.contains("x.safetensors") && !f.contains("passwd"), "{f}");
    }
    assert!(!Path::new("/tmp/llmarch-evil.safetensors").exists());
}

/// The token never appears on stdout or stderr of the binary, whatever happens.
#[test]
fn hf_token_never_appears_in_cli_output() {
    let config = common::read("configs/gemma-4-E2B-it/config.json");
    let files = vec![("config.json", config.into_bytes())];
    let mut routes = repo_routes("acme/gated", "main", COMMIT_A, &files, Some(TOKEN));
    routes.extend(repo_routes("acme/open", "main", COMMIT_A, &files, None));
    let hub = FakeHub::start(routes);
    let home = tempfile::tempdir().unwrap();
    let run = |args: &[&str], token: &str| {
        llmarch()
            .args(args)
            .env("HF_ENDPOINT", &hub.url)
            .env("HF_HOME", home.path())
            .env("HF_TOKEN", token)
            .env("RUST_LOG", "trace")
            .env("RUST_BACKTRACE", "1")
            .output()
            .unwrap()
    };
    let mut all = String::new();
    // A token the Hub refuses (nothing cached yet): the error names the repo, not the token.
    let wrong = format!("{TOKEN}-revoked");
    let o = run(&["inspect", "acme/gated@main"], &wrong);
    let err = common::expect_error(&o, 1);
    assert!(err.contains("acme/gated is gated"), "{err}");
    assert!(err.contains("whose HF_TOKEN you set"), "{err}");
    all += &(stdout(&o) + &stderr(&o));
    // The right token: downloads and prints the model.
    let o = run(&["inspect", "acme/gated", "--json"], TOKEN);
    assert!(o.status.success(), "{}", stderr(&o));
    all += &(stdout(&o) + &stderr(&o));
    let o = run(&["inspect", "acme/open", "--allow-unknown-keys"], TOKEN);
    all += &(stdout(&o) + &stderr(&o));
    let o = run(
        &["kv-budget", "acme/gated", "--context", "1k", "--explain"],
        TOKEN,
    );
    all += &(stdout(&o) + &stderr(&o));
    let o = run(&["inspect", "acme/unreachable"], TOKEN);
    all += &(stdout(&o) + &stderr(&o));
    assert!(
        !all.contains("llmarchTestSecret"),
        "the token leaked:\n{all}"
    );
    // It was sent, though: the fake Hub saw it in the Authorization header.
    assert!(hub
        .seen
        .lock()
        .unwrap()
        .iter()
        .any(|s| s.authorization.as_deref() == Some(&format!("Bearer {TOKEN}") as &str)));
}

/// Local paths in `ModelFiles` stay inside the cache.
#[test]
fn resolved_paths_live_in_the_snapshot() {
    let id = "acme/paths";
    let files = wrapper_repo();
    let hub = FakeHub::start(repo_routes(id, "main", COMMIT_A, &files, None));
    let home = tempfile::tempdir().unwrap();
    let got = resolve_with(&repo(id, None), &env(&hub, home.path(), None), &quiet()).unwrap();
    let snap: PathBuf = home
        .path()
        .join("hub/models--acme--paths/snapshots")
        .join(COMMIT_A);
    let mut all = vec![got.config.clone()];
    all.extend(got.weights.clone());
    all.extend(got.index.clone());
    all.extend(got.generation_config.clone());
    for p in all {
        assert_eq!(p.parent().unwrap(), snap, "{}", p.display());
        // The snapshot entry is a link to a blob of the same repo.
        let blob = std::fs::canonicalize(&p).unwrap();
        assert!(
            blob.starts_with(
                std::fs::canonicalize(home.path().join("hub/models--acme--paths/blobs")).unwrap()
            ),
            "{}",
            blob.display()
        );
    }
}

/// Run the binary with a deadline: a hang is a failure, not a stuck test run.
fn output_within(cmd: &mut std::process::Command, secs: u64) -> std::process::Output {
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    match rx.recv_timeout(std::time::Duration::from_secs(secs)) {
        Ok(o) => o.unwrap(),
        Err(_) => {
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status();
            panic!("still running after {secs} s");
        }
    }
}

/// A server that accepts connections and never answers.
fn silent_server() -> (String, std::thread::JoinHandle<()>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let handle = std::thread::spawn(move || {
        let mut held = vec![];
        for s in listener.incoming().take(4) {
            held.push(s);
            if held.len() == 1 {
                std::thread::sleep(std::time::Duration::from_secs(8));
            }
        }
    });
    (url, handle)
}

#[test]
fn a_silent_server_ends_in_an_error_naming_the_host() {
    let (url, _h) = silent_server();
    let home = tempfile::tempdir().unwrap();
    let mut e = HubEnv::new(&url, home.path().join("hub"));
    e.timeout = std::time::Duration::from_secs(1);
    let err = resolve_with(&repo("acme/silent", None), &e, &quiet()).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains(&format!("cannot reach {url}")), "{msg}");
    assert!(msg.contains("no answer within 1 s"), "{msg}");
    // Through the binary, with the variable that sets the timeout.
    let (url, _h) = silent_server();
    let o = output_within(
        llmarch()
            .args(["inspect", "acme/silent"])
            .env("HF_ENDPOINT", &url)
            .env("HF_HOME", home.path())
            .env("LLMARCH_HUB_TIMEOUT", "1"),
        30,
    );
    let err = expect_error(&o, 1);
    assert!(err.contains(&format!("cannot reach {url}")), "{err}");
}

/// A slow download that keeps moving is not cut by the read timeout.
#[test]
fn a_slow_but_moving_download_completes() {
    let id = "acme/slow";
    let body: Vec<u8> = (0..4000u32).map(|i| (i * 7) as u8).collect();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let info = json!({"sha": COMMIT_A, "siblings": [{"rfilename": "config.json"}]}).to_string();
    let served = body.clone();
    std::thread::spawn(move || {
        use std::io::{BufRead, Write};
        for stream in listener.incoming().take(8) {
            let mut stream = stream.unwrap();
            let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
            let (mut first, mut range) = (String::new(), String::new());
            reader.read_line(&mut first).unwrap();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if line.to_ascii_lowercase().starts_with("range:") {
                    range = line.clone();
                }
            }
            if first.contains("/api/models/") {
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    info.len()
                );
                let _ = stream.write_all((head + &info).as_bytes());
                continue;
            }
            let n = served.len();
            let probe = range.contains("0-0");
            let len = if probe { 1 } else { n };
            let head = format!(
                "HTTP/1.1 206 Partial Content\r\nContent-Length: {len}\r\nContent-Range: bytes 0-{}/{n}\r\nETag: \"slowetag\"\r\nX-Repo-Commit: {COMMIT_A}\r\nConnection: close\r\n\r\n",
                len - 1
            );
            let _ = stream.write_all(head.as_bytes());
            // Six pieces, 400 ms apart: 2.4 s in all, never 1 s without a byte.
            for chunk in served[..len].chunks(len.div_ceil(6)) {
                let _ = stream.write_all(chunk);
                let _ = stream.flush();
                if !probe {
                    std::thread::sleep(std::time::Duration::from_millis(400));
                }
            }
        }
    });
    let home = tempfile::tempdir().unwrap();
    let mut e = HubEnv::new(&url, home.path().join("hub"));
    e.timeout = std::time::Duration::from_secs(1);
    let mut r = llmarch::loader::hub::HubRepo::new(&e, id, None, false).unwrap();
    let p = r.get("config.json", Some(COMMIT_A), (1, 1)).unwrap();
    assert_eq!(std::fs::read(p).unwrap(), body);
}

#[test]
fn a_malformed_token_is_named_and_never_sent() {
    let files = vec![("config.json", b"{}".to_vec())];
    let hub = FakeHub::start(repo_routes("acme/t", "main", COMMIT_A, &files, None));
    let home = tempfile::tempdir().unwrap();
    for (token, why) in [
        (format!("\u{feff}{TOKEN}"), "byte-order mark"),
        (format!("{TOKEN}\u{200b}"), "zero-width space"),
        ("hf_llmarch\r\nTestSecret".to_string(), "line break"),
    ] {
        let o = llmarch()
            .args(["inspect", "acme/t"])
            .env("HF_ENDPOINT", &hub.url)
            .env("HF_HOME", home.path())
            .env("HF_TOKEN", &token)
            .output()
            .unwrap();
        let err = expect_error(&o, 1);
        assert!(err.contains("the Hub token from HF_TOKEN"), "{err}");
        assert!(err.contains(why), "{err}");
        assert!(
            !err.contains("TestSecret") && !err.contains("Bearer"),
            "{err}"
        );
        assert!(!err.contains("check the network"), "{err}");
    }
    assert_eq!(hub.hit_count(), 0, "a request went out");
    // From the token file: the file is named.
    std::fs::write(home.path().join("token"), format!("\u{feff}{TOKEN}\n")).unwrap();
    let o = llmarch()
        .args(["inspect", "acme/t"])
        .env("HF_ENDPOINT", &hub.url)
        .env("HF_HOME", home.path())
        .output()
        .unwrap();
    let err = expect_error(&o, 1);
    assert!(
        err.contains(&home.path().join("token").display().to_string()),
        "{err}"
    );
    assert!(!err.contains("TestSecret"), "{err}");
}

#[test]
fn a_password_in_hf_endpoint_is_never_printed() {
    let files = vec![("config.json", b"{}".to_vec())];
    let hub = FakeHub::start(repo_routes("acme/p", "main", COMMIT_A, &files, None));
    let home = tempfile::tempdir().unwrap();
    let host = hub.url.trim_start_matches("http://").to_string();
    for endpoint in [
        format!("http://user:hunter2pw@{host}"),
        "http://user:hunter2pw@127.0.0.1:9".to_string(),
    ] {
        for model in ["acme/missing", "acme/p@nobranch"] {
            let o = llmarch()
                .args(["inspect", model])
                .env("HF_ENDPOINT", &endpoint)
                .env("HF_HOME", home.path())
                .env("RUST_BACKTRACE", "1")
                .output()
                .unwrap();
            let err = expect_error(&o, 1);
            assert!(!err.contains("hunter2pw"), "{err}");
            assert!(err.contains("http://***@"), "{err}");
        }
    }
}

/// Every file under `home` lies in the cache's own repo folder.
fn only_in_repo_folder(home: &Path, folder: &str) {
    for f in tree(home) {
        assert!(f.starts_with(&format!("hub/{folder}/")), "{f} written");
    }
}

#[test]
fn revisions_that_are_paths_are_refused_before_anything_is_written() {
    let files = vec![("config.json", b"{}".to_vec())];
    let hub = FakeHub::start(repo_routes("acme/r", "main", COMMIT_A, &files, None));
    let home = tempfile::tempdir().unwrap();
    for rev in [
        "../../x",
        "..",
        "a/../../b",
        "/etc",
        "main\n",
        ".hidden",
        "x.lock",
    ] {
        let e = resolve_with(
            &repo("acme/r", Some(rev)),
            &env(&hub, home.path(), None),
            &quiet(),
        )
        .unwrap_err();
        assert!(
            format!("{e:#}").contains("is not a revision"),
            "{rev}: {e:#}"
        );
        let o = llmarch()
            .args(["inspect", &format!("acme/r@{rev}")])
            .env("HF_ENDPOINT", &hub.url)
            .env("HF_HOME", home.path())
            .output()
            .unwrap();
        assert!(stderr(&o).contains("is not a revision"), "{}", stderr(&o));
        assert!(!o.status.success());
    }
    assert_eq!(hub.hit_count(), 0);
    assert!(tree(home.path()).is_empty(), "{:?}", tree(home.path()));
    // Branch, tag, PR ref and commit names are revisions.
    for ok in ["main", "v1.0", "refs/pr/3", COMMIT_A, "release_2-b"] {
        llmarch::loader::hub::check_revision(ok).unwrap();
    }
}

#[test]
fn a_server_reporting_a_path_as_commit_or_etag_writes_nothing() {
    let home = tempfile::tempdir().unwrap();
    let body = b"{}".to_vec();
    // The file list's commit.
    let id = "acme/evilsha";
    let mut routes = repo_routes(id, "main", COMMIT_A, &[("config.json", body.clone())], None);
    let listed = json!({"sha": "../../../../x", "siblings": [{"rfilename": "config.json"}]});
    routes.insert(
        format!("/api/models/{id}/revision/main"),
        Reply::Json(listed.to_string()),
    );
    let hub = FakeHub::start(routes);
    let e = resolve_with(&repo(id, None), &env(&hub, home.path(), None), &quiet()).unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("answered in a way the Hub never does"),
        "{msg}"
    );
    assert!(msg.contains("is not 40 hex digits"), "{msg}");
    assert!(tree(home.path()).is_empty(), "{:?}", tree(home.path()));
    // X-Repo-Commit on a file (with `inspect`, which asks for no listing).
    let id = "acme/evilcommit";
    let routes = repo_routes(
        id,
        "main",
        "../../../../x",
        &[("config.json", body.clone())],
        None,
    );
    let hub = FakeHub::start(routes);
    let o = llmarch()
        .args(["inspect", id])
        .env("HF_ENDPOINT", &hub.url)
        .env("HF_HOME", home.path())
        .output()
        .unwrap();
    let err = expect_error(&o, 1);
    assert!(err.contains("is not 40 hex digits"), "{err}");
    assert!(tree(home.path()).is_empty(), "{:?}", tree(home.path()));
    // The ETag names the blob file.
    let id = "acme/eviletag";
    let mut routes = repo_routes(id, "main", COMMIT_A, &[("config.json", body.clone())], None);
    let raw = format!(
        "HTTP/1.1 206 Partial Content\r\nContent-Length: 1\r\nContent-Range: bytes 0-0/2\r\nETag: \"../../../x\"\r\nX-Repo-Commit: {COMMIT_A}\r\nConnection: close\r\n\r\n{{"
    );
    routes.insert(
        format!("/{id}/resolve/main/config.json"),
        Reply::Raw(raw.into_bytes()),
    );
    let hub = FakeHub::start(routes);
    let e = resolve_with(&repo(id, None), &env(&hub, home.path(), None), &quiet()).unwrap_err();
    assert!(format!("{e:#}").contains("is not a content hash"), "{e:#}");
    assert!(tree(home.path()).is_empty(), "{:?}", tree(home.path()));
    // A file of another commit than the listing's: refused, not mixed into the snapshot.
    let id = "acme/moved";
    let mut routes = repo_routes(id, "main", COMMIT_A, &[("config.json", body.clone())], None);
    routes.insert(
        format!("/{id}/resolve/main/config.json"),
        Reply::FileAt(body, COMMIT_B.to_string()),
    );
    let hub = FakeHub::start(routes);
    let e = resolve_with(&repo(id, None), &env(&hub, home.path(), None), &quiet()).unwrap_err();
    assert!(
        format!("{e:#}").contains("moved while downloading"),
        "{e:#}"
    );
    only_in_repo_folder(home.path(), "models--acme--moved");
    assert!(!tree(home.path()).iter().any(|f| f.contains("snapshots")));
}
