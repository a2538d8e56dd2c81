//! The quantized-weights cache: `--dtype q8_0`/`q4_0` quantize every matrix as the model loads
//! (seconds for a real-size model), so the first run keeps what it made in one safetensors file
//! and later runs read that back instead, at the speed of reading the file.
//!
//! Notable:
//! - Where: next to the snapshot for a Hub model (`<repo folder>/llmarch/<commit>.<format>.
//!   safetensors`, beside `snapshots/`), under the user's cache folder for a local folder
//!   (`<cache>/llmarch/quantized/<hash of the folder's path>/<format>.safetensors`).
//!   `LLMARCH_QUANT_CACHE=off` turns the cache off.
//! - What: for each matrix `<name>` quantized from the checkpoint, `<name>.codes` and
//!   `<name>.scales` as the kernels hold them, interleaved in groups of 16 rows
//!   (`kernels::gemv::BlockMatrix`): codes `I8` `[rows, in]` for q8_0, `U8` `[rows, in/2]` for
//!   q4_0, scales `F16` `[rows, in/32]`, where `rows` is `out` rounded up to 16. Little-endian,
//!   as on every CPU the kernels run on.
//! - Trusted only when everything matches, else ignored and rebuilt: the header's
//!   `llmarch.version` ([`CACHE_VERSION`], bumped whenever quantization changes),
//!   `llmarch.source` (the snapshot's commit, or for a local folder its path and each weight
//!   file's size and modification time), `llmarch.quantization`; safetensors' own check that the
//!   file holds every byte its header promises (a truncated file fails it); each tensor's dtype
//!   and shape.
//! - Read with `pread` into the kernels' own buffers (2 MB pages, [`WeightBuf`]), never
//!   mapped: the file's pages do not count against the process.
//! - Written once the whole model is built, only when a matrix had to be quantized: to a
//!   temporary file renamed over the old one, so no reader ever sees half a file. A failed
//!   write is a warning, not an error: the run has its weights either way.

use super::model_files::ModelFiles;
use crate::kernels::gemv::{Q4_0Matrix, Q8_0Matrix};
use crate::kernels::hugepages::{WeightBuf, Zeroable};
use crate::layers::linear::{MappedSource, Quantization, QuantizedMatrix};
use crate::layers::mapped::{MappedFile, MappedTensor, Mapping};
use anyhow::{anyhow, Context, Result};
use safetensors::{Dtype, SafeTensors, View};
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The cache format's version: bump it whenever a quantized block would come out differently.
pub const CACHE_VERSION: &str = "3";

/// One format's cache for one checkpoint, as a model loads.
pub struct QuantCache {
    path: PathBuf,
    /// What the weights came from (a commit, or a local folder's fingerprint).
    source: String,
    q: Quantization,
    /// The file an earlier run wrote, when it checked out.
    existing: Option<Existing>,
    /// Every matrix quantized in this load.
    kept: Mutex<Kept>,
}

/// The matrices quantized in one load, read back or made, to write; and the names of those
/// read back.
#[derive(Default)]
struct Kept {
    matrices: HashMap<String, QuantizedMatrix>,
    read_back: HashSet<String>,
}

/// A validated cache file.
struct Existing {
    file: MappedFile,
    /// Absolute byte ranges, dtypes and shapes of its tensors.
    tensors: HashMap<String, (Dtype, Vec<usize>, std::ops::Range<usize>)>,
}

/// What became of the cache in one load, for the summary.
#[derive(Debug, Clone, PartialEq)]
pub enum CacheUse {
    /// Every quantized matrix came from this file.
    Read(PathBuf),
    /// This file was written (bytes).
    Written(PathBuf, u64),
    /// Nothing was read or written (nothing to quantize, or the cache is off).
    Unused,
}

impl QuantCache {
    /// The cache for `files` quantized to `q`, reading an earlier run's file if it checks out;
    /// `None` when the cache is off (`LLMARCH_QUANT_CACHE=off`) or has no place.
    pub fn open(files: &ModelFiles, q: Quantization) -> Option<QuantCache> {
        if std::env::var("LLMARCH_QUANT_CACHE").is_ok_and(|v| v == "off" || v == "0") {
            return None;
        }
        let (path, source) = location(files, q)?;
        let existing = Existing::open(&path, &source, q).ok();
        Some(QuantCache {
            path,
            source,
            q,
            existing,
            kept: Mutex::default(),
        })
    }

    /// `inner` with this cache consulted for quantized matrices and told of each one made.
    pub fn wrap(self: &Arc<Self>, inner: Arc<dyn MappedSource>) -> Arc<dyn MappedSource> {
        Arc::new(Cached {
            inner,
            cache: self.clone(),
        })
    }

    /// After a successful build: writes the file if any matrix had to be quantized.
    pub fn finish(&self) -> Result<CacheUse> {
        let kept = std::mem::take(&mut *self.kept.lock().unwrap_or_else(|e| e.into_inner()));
        if kept.matrices.is_empty() {
            return Ok(CacheUse::Unused);
        }
        if kept.read_back.len() == kept.matrices.len() {
            return Ok(CacheUse::Read(self.path.clone()));
        }
        let bytes = write(&self.path, &self.source, self.q, &kept.matrices).with_context(|| {
            format!(
                "could not keep the quantized weights in {} (LLMARCH_QUANT_CACHE=off skips this)",
                self.path.display()
            )
        })?;
        Ok(CacheUse::Written(self.path.clone(), bytes))
    }

    fn read(
        &self,
        name: &str,
        q: Quantization,
        (out, n): (usize, usize),
    ) -> Option<QuantizedMatrix> {
        let e = self.existing.as_ref().filter(|_| q == self.q)?;
        let rows = Q4_0Matrix::stored_rows(out); // q8_0 stores as many
        let scales = e.read::<half::f16>(&format!("{name}.scales"), Dtype::F16, &[rows, n / 32])?;
        let codes = format!("{name}.codes");
        Some(match q {
            Quantization::Q8_0 => {
                let qs = e.read::<i8>(&codes, Dtype::I8, &[rows, n])?;
                let m = Q8_0Matrix::from_parts(out, n, qs, scales).ok()?;
                QuantizedMatrix::Q8_0(Arc::new(m))
            }
            Quantization::Q4_0 => {
                let qs = e.read::<u8>(&codes, Dtype::U8, &[rows, n / 2])?;
                let m = Q4_0Matrix::from_parts(out, n, qs, scales).ok()?;
                QuantizedMatrix::Q4_0(Arc::new(m))
            }
        })
    }
}

/// The cache file's path and the source key for `files` quantized to `q`.
fn location(files: &ModelFiles, q: Quantization) -> Option<(PathBuf, String)> {
    let name = quantization_name(q);
    if let Some(commit) = &files.commit {
        // `<repo folder>/snapshots/<commit>`: the cache goes beside `snapshots/`.
        let snapshots = files.dir.parent()?;
        if snapshots.file_name()? != "snapshots" {
            return None;
        }
        let file = format!("{commit}.{name}.safetensors");
        return Some((
            snapshots.parent()?.join("llmarch").join(file),
            commit.clone(),
        ));
    }
    let dir = files.dir.canonicalize().ok()?;
    let mut source = format!("local:{}", dir.display());
    for w in &files.weights {
        let meta = std::fs::metadata(w).ok()?;
        let mtime = meta
            .modified()
            .ok()?
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?;
        let file = w.file_name()?.to_string_lossy();
        source.push_str(&format!(";{file}:{}:{}", meta.len(), mtime.as_nanos()));
    }
    let folder = format!("{:016x}", fnv1a(dir.as_os_str().as_encoded_bytes()));
    let path = dirs::cache_dir()?
        .join("llmarch")
        .join("quantized")
        .join(folder);
    Some((path.join(format!("{name}.safetensors")), source))
}

fn quantization_name(q: Quantization) -> &'static str {
    match q {
        Quantization::Q8_0 => "q8_0",
        Quantization::Q4_0 => "q4_0",
    }
}

/// 64-bit FNV-1a: a stable name for a folder path.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    })
}

impl Existing {
    /// The file at `path` if its header says it holds `source` quantized to `q` by this
    /// version, and it holds every byte the header promises.
    fn open(path: &Path, source: &str, q: Quantization) -> Result<Existing> {
        let file = std::fs::File::open(path)?;
        // SAFETY: cache files are only ever replaced by rename, never written in place.
        let file = unsafe { MappedFile::map(file)? };
        let (n, meta) = SafeTensors::read_metadata(file.bytes())?;
        let header = meta.metadata().clone().unwrap_or_default();
        let want = [
            ("llmarch.version", CACHE_VERSION),
            ("llmarch.source", source),
            ("llmarch.quantization", quantization_name(q)),
        ];
        for (key, value) in want {
            if header.get(key).map(String::as_str) != Some(value) {
                return Err(anyhow!("{}: `{key}` is not `{value}`", path.display()));
            }
        }
        let start = 8 + n;
        let tensors = meta
            .tensors()
            .into_iter()
            .map(|(name, info)| {
                let (a, b) = info.data_offsets;
                (name, (info.dtype, info.shape.clone(), start + a..start + b))
            })
            .collect();
        Ok(Existing { file, tensors })
    }

    /// Tensor `name`, if it has this dtype and shape, read into a fresh buffer.
    fn read<T: Zeroable>(&self, name: &str, dtype: Dtype, shape: &[usize]) -> Option<WeightBuf<T>> {
        let (d, s, range) = self.tensors.get(name)?;
        let len: usize = shape.iter().product();
        if *d != dtype || s != shape || range.len() != len * std::mem::size_of::<T>() {
            return None;
        }
        WeightBuf::filled_by(len, |buf| self.file.read_at(range.start, buf)).ok()
    }
}

/// A [`MappedSource`] whose quantized matrices go through a [`QuantCache`].
struct Cached {
    inner: Arc<dyn MappedSource>,
    cache: Arc<QuantCache>,
}

impl MappedSource for Cached {
    fn mapped(&self, name: &str, shape: &[usize]) -> Result<Option<MappedTensor>> {
        self.inner.mapped(name, shape)
    }

    fn cached(
        &self,
        name: &str,
        q: Quantization,
        shape: (usize, usize),
    ) -> Option<QuantizedMatrix> {
        let m = self.cache.read(name, q, shape)?;
        let mut kept = self.cache.kept.lock().unwrap_or_else(|e| e.into_inner());
        kept.read_back.insert(name.to_string());
        Some(m)
    }

    fn quantized(&self, name: &str, matrix: &QuantizedMatrix) {
        let mut kept = self.cache.kept.lock().unwrap_or_else(|e| e.into_inner());
        kept.matrices
            .entry(name.to_string())
            .or_insert_with(|| matrix.clone());
    }
}

/// One tensor to write: borrowed bytes.
struct Bytes<'a> {
    dtype: Dtype,
    shape: Vec<usize>,
    data: &'a [u8],
}

impl View for Bytes<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Writes `kept` to `path` through a temporary file; the bytes written.
fn write(
    path: &Path,
    source: &str,
    q: Quantization,
    kept: &HashMap<String, QuantizedMatrix>,
) -> Result<u64> {
    let dir = path.parent().ok_or_else(|| anyhow!("no folder"))?;
    std::fs::create_dir_all(dir)?;
    let mut views = vec![];
    for (name, m) in kept {
        let (codes, scales, (rows, n)) = match m {
            QuantizedMatrix::Q8_0(m) => {
                let (q, s) = m.bytes_stored();
                (
                    Bytes {
                        dtype: Dtype::I8,
                        shape: vec![Q8_0Matrix::stored_rows(m.out_dim()), m.in_dim()],
                        data: q,
                    },
                    s,
                    (Q8_0Matrix::stored_rows(m.out_dim()), m.in_dim()),
                )
            }
            QuantizedMatrix::Q4_0(m) => {
                let (q, s) = m.bytes_stored();
                (
                    Bytes {
                        dtype: Dtype::U8,
                        shape: vec![Q4_0Matrix::stored_rows(m.out_dim()), m.in_dim() / 2],
                        data: q,
                    },
                    s,
                    (Q4_0Matrix::stored_rows(m.out_dim()), m.in_dim()),
                )
            }
        };
        views.push((format!("{name}.codes"), codes));
        views.push((
            format!("{name}.scales"),
            Bytes {
                dtype: Dtype::F16,
                shape: vec![rows, n / 32],
                data: scales,
            },
        ));
    }
    let header = HashMap::from([
        ("llmarch.version".to_string(), CACHE_VERSION.to_string()),
        ("llmarch.source".to_string(), source.to_string()),
        (
            "llmarch.quantization".to_string(),
            quantization_name(q).to_string(),
        ),
    ]);
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name()
            .map_or(Cow::Borrowed("cache"), |f| f.to_string_lossy()),
        std::process::id()
    ));
    let written = safetensors::serialize_to_file(views, Some(header), &tmp)
        .map_err(anyhow::Error::from)
        .and_then(|()| Ok(std::fs::metadata(&tmp)?.len()))
        .and_then(|bytes| {
            std::fs::rename(&tmp, path)?;
            Ok(bytes)
        });
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrices() -> Vec<(String, QuantizedMatrix)> {
        let w: Vec<f32> = (0..64 * 96)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        vec![
            (
                "a.weight".into(),
                QuantizedMatrix::Q4_0(Arc::new(Q4_0Matrix::quantize(&w, 64, 96).unwrap())),
            ),
            (
                "b.weight".into(),
                QuantizedMatrix::Q4_0(Arc::new(
                    Q4_0Matrix::quantize(&w[..32 * 96], 32, 96).unwrap(),
                )),
            ),
        ]
    }

    fn cache_at(path: &Path, source: &str, q: Quantization) -> QuantCache {
        QuantCache {
            path: path.to_path_buf(),
            source: source.into(),
            q,
            existing: Existing::open(path, source, q).ok(),
            kept: Mutex::default(),
        }
    }

    fn stored(m: &QuantizedMatrix) -> Vec<u8> {
        let (a, b) = match m {
            QuantizedMatrix::Q8_0(m) => m.bytes_stored(),
            QuantizedMatrix::Q4_0(m) => m.bytes_stored(),
        };
        [a, b].concat()
    }

    #[test]
    fn a_written_cache_reads_back_the_same_blocks_and_nothing_else_is_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("q4_0.safetensors");
        let kept: HashMap<_, _> = matrices().into_iter().collect();
        write(&path, "abc123", Quantization::Q4_0, &kept).unwrap();

        // Read back: the same codes and scales, by name and shape only.
        let cache = cache_at(&path, "abc123", Quantization::Q4_0);
        for (name, m) in &kept {
            let shape = match m {
                QuantizedMatrix::Q4_0(m) => (m.out_dim(), m.in_dim()),
                QuantizedMatrix::Q8_0(m) => (m.out_dim(), m.in_dim()),
            };
            let back = cache.read(name, Quantization::Q4_0, shape).expect(name);
            assert_eq!(stored(&back), stored(m), "{name}");
            assert!(cache
                .read(name, Quantization::Q4_0, (shape.0, 64))
                .is_none());
            assert!(cache.read(name, Quantization::Q8_0, shape).is_none());
        }
        assert!(cache
            .read("c.weight", Quantization::Q4_0, (64, 96))
            .is_none());

        // Another source (commit, or a changed local file), another format: not trusted.
        assert!(Existing::open(&path, "abc124", Quantization::Q4_0).is_err());
        assert!(Existing::open(&path, "abc123", Quantization::Q8_0).is_err());

        // Another cache version: not trusted.
        let bytes = std::fs::read(&path).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        let key = format!("\"llmarch.version\":\"{CACHE_VERSION}\"");
        let at = text.find(&key).expect("version in the header");
        let mut other = bytes.clone();
        other[at + "\"llmarch.version\":\"".len()] = b'0';
        std::fs::write(&path, &other).unwrap();
        assert!(Existing::open(&path, "abc123", Quantization::Q4_0).is_err());

        // Truncated by one byte: not trusted.
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        assert!(Existing::open(&path, "abc123", Quantization::Q4_0).is_err());
        std::fs::write(&path, &bytes).unwrap();
        assert!(Existing::open(&path, "abc123", Quantization::Q4_0).is_ok());
    }

    #[test]
    fn finish_writes_only_what_had_to_be_quantized_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q8_0.safetensors");
        let w: Vec<f32> = (0..16 * 64).map(|i| (i % 13) as f32 - 6.0).collect();
        let m = QuantizedMatrix::Q8_0(Arc::new(Q8_0Matrix::quantize(&w, 16, 64).unwrap()));
        let source = |cache: Arc<QuantCache>| Cached {
            inner: Arc::new(NoMapping),
            cache,
        };

        // Nothing quantized: nothing written.
        let cache = Arc::new(cache_at(&path, "s", Quantization::Q8_0));
        assert_eq!(cache.finish().unwrap(), CacheUse::Unused);
        assert!(!path.exists());

        // A miss, then the matrix made: written.
        let cache = Arc::new(cache_at(&path, "s", Quantization::Q8_0));
        let s = source(cache.clone());
        assert!(s.cached("m.weight", Quantization::Q8_0, (16, 64)).is_none());
        s.quantized("m.weight", &m);
        assert!(matches!(cache.finish().unwrap(), CacheUse::Written(p, _) if p == path));

        // The next load reads it all back: nothing rewritten.
        let cache = Arc::new(cache_at(&path, "s", Quantization::Q8_0));
        let s = source(cache.clone());
        let back = s.cached("m.weight", Quantization::Q8_0, (16, 64)).unwrap();
        assert_eq!(stored(&back), stored(&m));
        s.quantized("m.weight", &back);
        let before = std::fs::metadata(&path).unwrap().modified().unwrap();
        assert_eq!(cache.finish().unwrap(), CacheUse::Read(path.clone()));
        assert_eq!(
            std::fs::metadata(&path).unwrap().modified().unwrap(),
            before
        );
    }

    #[test]
    fn hub_snapshots_keep_the_cache_beside_snapshots_and_local_folders_key_it_by_their_files() {
        let dir = tempfile::tempdir().unwrap();
        let snapshot = dir.path().join("models--org--name/snapshots/abc123");
        std::fs::create_dir_all(&snapshot).unwrap();
        let weights = snapshot.join("model.safetensors");
        std::fs::write(&weights, b"x").unwrap();
        let files = |commit: Option<&str>| ModelFiles {
            source: "test".into(),
            dir: snapshot.clone(),
            commit: commit.map(Into::into),
            config: snapshot.join("config.json"),
            tokenizer: None,
            tokenizer_config: None,
            generation_config: None,
            chat_template: None,
            index: None,
            weights: vec![weights.clone()],
            notes: vec![],
        };
        let (path, source) = location(&files(Some("abc123")), Quantization::Q4_0).unwrap();
        assert_eq!(
            path,
            dir.path()
                .join("models--org--name/llmarch/abc123.q4_0.safetensors")
        );
        assert_eq!(source, "abc123");

        // A local folder: keyed by its path and its weight files' sizes and times.
        let (_, before) = location(&files(None), Quantization::Q8_0).unwrap();
        assert!(before.starts_with("local:") && before.contains("model.safetensors:1:"));
        std::fs::write(&weights, b"xy").unwrap();
        let (_, after) = location(&files(None), Quantization::Q8_0).unwrap();
        assert_ne!(before, after, "a rewritten weight file is another source");
    }

    struct NoMapping;
    impl MappedSource for NoMapping {
        fn mapped(&self, _: &str, _: &[usize]) -> Result<Option<MappedTensor>> {
            Ok(None)
        }
    }
}
