//! The built-in model aliases: Hub repo ids and the real `config.json` of each, embedded so
//! `inspect` and `kv-budget` work with no network. Provenance of every file: `configs/README.md`.

/// One built-in alias.
#[derive(Debug)]
pub struct Alias {
    pub name: &'static str,
    pub repo: &'static str,
    /// Folder under `configs/` holding the embedded config.
    pub folder: &'static str,
    pub config_json: &'static str,
}

macro_rules! alias {
    ($name:literal, $repo:literal, $folder:literal) => {
        Alias {
            name: $name,
            repo: $repo,
            folder: $folder,
            config_json: include_str!(concat!("../../configs/", $folder, "/config.json")),
        }
    };
}

pub const ALIASES: &[Alias] = &[
    alias!("gemma4-e2b", "google/gemma-4-E2B-it", "gemma-4-E2B-it"),
    alias!("gemma4-e4b", "google/gemma-4-E4B-it", "gemma-4-E4B-it"),
    alias!(
        "gemma4-26b-a4b",
        "google/gemma-4-26B-A4B-it",
        "gemma-4-26B-A4B-it"
    ),
    alias!("gemma4-31b", "google/gemma-4-31B-it", "gemma-4-31B-it"),
    alias!("laguna-xs.2", "poolside/Laguna-XS.2", "Laguna-XS.2"),
    alias!("zaya1-8b", "Zyphra/ZAYA1-8B", "ZAYA1-8B"),
    alias!(
        "deepseek-v4-flash",
        "deepseek-ai/DeepSeek-V4-Flash",
        "DeepSeek-V4-Flash"
    ),
    alias!(
        "deepseek-v4-pro",
        "deepseek-ai/DeepSeek-V4-Pro",
        "DeepSeek-V4-Pro"
    ),
    alias!("qwen3.6-27b", "Qwen/Qwen3.6-27B", "Qwen3.6-27B"),
    alias!("qwen3.6-35b-a3b", "Qwen/Qwen3.6-35B-A3B", "Qwen3.6-35B-A3B"),
];

/// The alias with this name (case-insensitive), or whose repo id this is.
pub fn find(name: &str) -> Option<&'static Alias> {
    ALIASES
        .iter()
        .find(|a| a.name.eq_ignore_ascii_case(name) || a.repo.eq_ignore_ascii_case(name))
}

/// The alias closest to a misspelt name, for a `did you mean` hint.
pub fn closest(name: &str) -> Option<&'static Alias> {
    let name = name.to_ascii_lowercase();
    ALIASES
        .iter()
        .map(|a| (edit_distance(&name, a.name), a))
        .filter(|(d, a)| *d <= (a.name.len() / 3).max(2))
        .min_by_key(|(d, _)| *d)
        .map(|(_, a)| a)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_by_name_and_repo() {
        assert_eq!(find("GEMMA4-E2B").unwrap().repo, "google/gemma-4-E2B-it");
        assert_eq!(find("Qwen/Qwen3.6-27B").unwrap().name, "qwen3.6-27b");
        assert_eq!(closest("gemma4-e2").unwrap().name, "gemma4-e2b");
        assert!(closest("totally-different").is_none());
    }
}
