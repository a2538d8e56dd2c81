//! One harness over every registered family (`llmarch::arch::FAMILIES`): a family added to the
//! registry without fixtures, a measured logit bound, a bf16 reference, q8_0/q4_0 references or a
//! CLI run fails here instead of skipping a check. Each check loops over the registry, builds
//! every fixture the way `llmarch run` does (the registry picks the family from `config.json`),
//! and compares with what transformers 5.23.0 recorded (`tests/oracle/`).
//!
//! What the per-family files (`tests/<family>_reference.rs`) add on top is family-specific:
//! layouts, config forms, error messages, routing details.

mod common;

use candle_core::DType;
use common::reference::{
    build_any, check_against_reference, check_bad_token_ids, check_bf16_near_reference,
    family_fixtures, fixture_name, fixtures_root, logit_tol, read_json, runnable_families, Fixture,
    BF16_FACTOR,
};
use std::collections::BTreeMap;

/// Every fixture of every family: full forward and cached greedy decode equal the reference's
/// tokens and logits within the family's measured bound; the cache holds `kv-budget`'s bytes.
#[test]
fn every_fixture_of_every_family_matches_the_reference_in_f32() {
    let mut worst: BTreeMap<&str, (f32, String)> = BTreeMap::new();
    for family in runnable_families() {
        let tol = logit_tol(family.name); // fails for a family without a measured bound
        for dir in family_fixtures(family.name) {
            let name = fixture_name(&dir);
            let f = Fixture::load(dir.clone());
            let model = build_any(&dir, DType::F32);
            assert_eq!(model.spec().family, family.name, "{name}");
            let (_, err) = check_against_reference(&name, model.as_ref(), &f);
            let w = worst.entry(family.name).or_insert((0.0, String::new()));
            if err >= w.0 {
                *w = (err, name);
            }
        }
        eprintln!(
            "{}: largest f32 logit error {:.2e} ({}), bound {tol:.0e}",
            family.name, worst[family.name].0, worst[family.name].1
        );
    }
}

#[test]
fn every_family_refuses_bad_token_ids() {
    for family in runnable_families() {
        let dir = &family_fixtures(family.name)[0];
        let model = build_any(dir, DType::F32);
        check_bad_token_ids(model.as_ref());
    }
}

/// Each family runs in bf16 and stays within [`BF16_FACTOR`] × the reference's own bf16 error,
/// on every fixture that has `logits_bf16`; every family has at least one such fixture, stored in
/// f32 (so llmarch rounds the weights itself) or in bf16.
#[test]
fn every_family_runs_bf16_within_a_multiple_of_the_references_bf16_error() {
    for family in runnable_families() {
        let mut checked = 0;
        for dir in family_fixtures(family.name) {
            let f = Fixture::load(dir.clone());
            if f.logits_bf16.is_none() {
                continue;
            }
            let model = build_any(&dir, DType::BF16);
            check_bf16_near_reference(&fixture_name(&dir), model.as_ref(), &f);
            checked += 1;
        }
        assert!(
            checked > 0,
            "{}: no fixture with `logits_bf16` (run tests/oracle/bf16_logits.py); bound {BF16_FACTOR}×",
            family.name
        );
    }
}

/// Every family has a q8_0 and a q4_0 reference (`tests/oracle/q8_0_fixtures.py`), which
/// `tests/quantized.rs` runs through `llmarch run --dtype`.
#[test]
fn every_family_has_quantized_references() {
    for format in ["q8_0", "q4_0"] {
        let mut covered: Vec<String> = vec![];
        for e in std::fs::read_dir(fixtures_root().join(format)).unwrap() {
            let r = read_json(&e.unwrap().path().join("reference.json"));
            assert_eq!(r["format"], format);
            let src = r["fixture"].as_str().unwrap();
            let family = src
                .strip_prefix("tests/fixtures/")
                .and_then(|s| s.split('/').next())
                .unwrap_or_else(|| panic!("{format}: fixture {src}"));
            covered.push(family.to_string());
        }
        for family in runnable_families() {
            assert!(
                covered.iter().any(|c| c == family.name),
                "{format}: no reference for the `{}` family (tests/oracle/q8_0_fixtures.py)",
                family.name
            );
        }
    }
}
