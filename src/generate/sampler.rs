//! Choosing the next token from a row of logits: repeat penalty, temperature (0 = greedy),
//! top-k, top-p, min-p, then a seeded draw. Applied in the order transformers applies its logits
//! processors, so the same settings mean the same distribution.

use anyhow::Result;
use candle_core::{DType, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// Sampling settings; `temperature` 0 means greedy.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    pub temperature: f32,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    /// > 1 penalises tokens already in the sequence (prompt included), as transformers does.
    pub repeat_penalty: f32,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            min_p: None,
            repeat_penalty: 1.0,
            seed: 299_792_458,
        }
    }
}

impl Sampling {
    /// Refuse settings that mean nothing, naming the flag.
    pub fn validate(&self) -> anyhow::Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            anyhow::bail!(
                "--temperature must be 0 (greedy) or positive, not {}",
                self.temperature
            );
        }
        if self.top_k == Some(0) {
            anyhow::bail!("--top-k must be at least 1");
        }
        for (flag, v) in [("--top-p", self.top_p), ("--min-p", self.min_p)] {
            if let Some(v) = v {
                if !(0.0..=1.0).contains(&v) {
                    anyhow::bail!("{flag} must be between 0 and 1, not {v}");
                }
            }
        }
        if !(self.repeat_penalty > 0.0 && self.repeat_penalty.is_finite()) {
            anyhow::bail!(
                "--repeat-penalty must be positive, not {}",
                self.repeat_penalty
            );
        }
        Ok(())
    }
}

/// A seeded sampler.
pub struct Sampler {
    pub settings: Sampling,
    rng: StdRng,
}

impl Sampler {
    pub fn new(settings: Sampling) -> Self {
        let rng = StdRng::seed_from_u64(settings.seed);
        Sampler { settings, rng }
    }

    /// Whether [`Self::next`] is a plain argmax of the logits (greedy, no repeat penalty), which
    /// a GPU can take on the device ([`argmax_on_device`]).
    pub fn is_plain_greedy(&self) -> bool {
        self.settings.temperature == 0.0 && self.settings.repeat_penalty == 1.0
    }

    /// The `k` of a draw that reads only a top-k of a row of `vocab` logits, where the settings
    /// make one (a temperature, a top-k below the vocabulary of at most 1024 for the device's
    /// sorts, no repeat penalty: it reads the history's ids): see [`Self::next_among`].
    pub fn top_k_draw(&self, vocab: usize) -> Option<usize> {
        let s = &self.settings;
        match s.top_k {
            Some(k) if s.temperature > 0.0 && s.repeat_penalty == 1.0 && k < vocab && k <= 1024 => {
                Some(k.max(1))
            }
            _ => None,
        }
    }

    /// [`Self::next`] from the row's top-k only ([`Self::top_k_draw`]): the candidates' logits
    /// and ids, in any order, ties at the k-th place taken to the lower id. The same draw as
    /// from the whole row: the top-k's distribution reads nothing else, and the candidates are
    /// put in id order so that ties sort as they would there. (One exception: the device sees
    /// −0.0 and +0.0 as equal, the host's sort puts +0.0 first, so a row with both at the k-th
    /// place may keep the other one.)
    pub fn next_among(&mut self, logits: &[f32], ids: &[u32]) -> u32 {
        let mut pairs: Vec<(u32, f32)> = ids.iter().copied().zip(logits.iter().copied()).collect();
        pairs.sort_by_key(|p| p.0);
        let row: Vec<f32> = pairs.iter().map(|p| p.1).collect();
        let d = self.distribution(&row, &[]);
        pairs[self.draw(&d) as usize].0
    }

    /// Pick the next token from `logits` (one row, vocab-sized), given the sequence so far.
    pub fn next(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let d = self.distribution(logits, history);
        self.draw(&d)
    }

    /// The distribution [`Self::next`] draws from: the repeat penalty, temperature and
    /// truncations applied to `logits` after `history`. Greedy is a point mass on the argmax.
    pub fn distribution(&self, logits: &[f32], history: &[u32]) -> Dist {
        let s = &self.settings;
        // A copy only where the repeat penalty changes the logits.
        let mut l = std::borrow::Cow::Borrowed(logits);
        if s.repeat_penalty != 1.0 {
            let l = l.to_mut();
            let mut seen = vec![false; l.len()];
            for &t in history {
                if let Some(flag) = seen.get_mut(t as usize) {
                    *flag = true;
                }
            }
            for (x, seen) in l.iter_mut().zip(seen) {
                if seen {
                    *x = if *x > 0.0 {
                        *x / s.repeat_penalty
                    } else {
                        *x * s.repeat_penalty
                    };
                }
            }
        }
        let point = |id: u32| Dist {
            ids: vec![id],
            p: vec![1.0],
        };
        if s.temperature == 0.0 {
            return point(argmax(&l));
        }
        // Candidates sorted by logit, best first, ties to the lower id: one order, however the
        // candidates are found. With a top-k below the vocabulary only the k best are kept, in
        // one pass (a vocabulary of 262 K sorted whole, or even copied to be selected from,
        // costs milliseconds per token).
        let order = |&a: &usize, &b: &usize| l[b].total_cmp(&l[a]).then(a.cmp(&b));
        let mut idx = match s.top_k.map(|k| k.max(1)) {
            Some(k) if k < l.len() => best_k(&l, k),
            _ => (0..l.len()).filter(|&i| l[i].is_finite()).collect(),
        };
        if idx.is_empty() {
            return point(argmax(logits));
        }
        idx.sort_unstable_by(order);
        // Scaled after subtracting the best logit: a tiny temperature gives 0 or -inf, never
        // inf - inf (NaN), so it tends to greedy as it should.
        let best = l[idx[0]];
        let mut p: Vec<f32> = idx
            .iter()
            .map(|&i| ((l[i] - best) / s.temperature).exp())
            .collect();
        let sum: f32 = p.iter().sum();
        p.iter_mut().for_each(|x| *x /= sum);
        if let Some(top_p) = s.top_p {
            // Keep the smallest prefix whose mass reaches top_p (at least one token).
            let mut acc = 0.0;
            let keep = p
                .iter()
                .position(|&x| {
                    acc += x;
                    acc >= top_p
                })
                .map_or(p.len(), |i| i + 1);
            p.truncate(keep);
        }
        if let Some(min_p) = s.min_p {
            let floor = p[0] * min_p;
            let keep = p.iter().take_while(|&&x| x >= floor).count().max(1);
            p.truncate(keep);
        }
        idx.truncate(p.len());
        Dist {
            ids: idx.into_iter().map(|i| i as u32).collect(),
            p,
        }
    }

    /// One seeded draw from `d`.
    pub fn draw(&mut self, d: &Dist) -> u32 {
        if self.settings.temperature == 0.0 {
            return d.ids[0];
        }
        let total: f32 = d.p.iter().sum();
        let mut r = self.rng.random::<f32>() * total;
        for (j, &x) in d.p.iter().enumerate() {
            r -= x;
            if r <= 0.0 {
                return d.ids[j];
            }
        }
        d.ids[d.p.len() - 1]
    }

    /// A uniform draw in `[0, 1)` from the same seeded stream (speculative acceptance).
    pub fn uniform(&mut self) -> f32 {
        self.rng.random::<f32>()
    }
}

/// The ids of the `k` best finite entries of `l` (higher first, ties to the lower id, in
/// `total_cmp`'s order), in no particular order: one pass, a heap of the `k` best so far whose
/// root is the worst of them, which most entries fail to beat in one comparison.
fn best_k(l: &[f32], k: usize) -> Vec<usize> {
    /// Ordered so that the heap's greatest is the worst entry kept.
    struct Worst<'a>(&'a [f32], usize);
    impl Ord for Worst<'_> {
        fn cmp(&self, o: &Self) -> std::cmp::Ordering {
            o.0[o.1].total_cmp(&self.0[self.1]).then(self.1.cmp(&o.1))
        }
    }
    impl PartialOrd for Worst<'_> {
        fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
            Some(self.cmp(o))
        }
    }
    impl PartialEq for Worst<'_> {
        fn eq(&self, o: &Self) -> bool {
            self.cmp(o).is_eq()
        }
    }
    impl Eq for Worst<'_> {}
    let mut heap = std::collections::BinaryHeap::with_capacity(k + 1);
    for (i, v) in l.iter().enumerate() {
        if !v.is_finite() {
            continue;
        }
        if heap.len() < k {
            heap.push(Worst(l, i));
        } else if heap.peek().is_some_and(|w| Worst(l, i) < *w) {
            heap.pop();
            heap.push(Worst(l, i));
        }
    }
    heap.into_iter().map(|w| w.1).collect()
}

/// A distribution over token ids: `ids` with weights `p` (summing to 1 before truncation; only
/// the ratios matter). Ids outside `ids` have probability 0.
#[derive(Debug, Clone, PartialEq)]
pub struct Dist {
    pub ids: Vec<u32>,
    pub p: Vec<f32>,
}

impl Dist {
    /// The normalised probability of `id`.
    pub fn prob(&self, id: u32) -> f32 {
        let total: f32 = self.p.iter().sum();
        match self.ids.iter().position(|&i| i == id) {
            Some(j) if total > 0.0 => self.p[j] / total,
            _ => 0.0,
        }
    }

    /// This distribution with `id` removed (what is left to draw from after a rejected point
    /// draft), or `None` when nothing else has any weight.
    pub fn without(&self, id: u32) -> Option<Dist> {
        let (ids, p): (Vec<u32>, Vec<f32>) = self
            .ids
            .iter()
            .zip(&self.p)
            .filter(|(&i, &x)| i != id && x > 0.0)
            .map(|(&i, &x)| (i, x))
            .unzip();
        (!ids.is_empty()).then_some(Dist { ids, p })
    }
}

/// [`argmax`] of `row` `[vocab]` (f32) where it lies, the first on ties, and whether the row holds
/// NaN or +∞: two numbers read back instead of the vocabulary. `iota` is `0, 1, …, vocab − 1` in
/// f32 on the same device (exact up to 2²⁴ entries).
///
/// Each reduction runs in two stages, over the row cut into [`first_stage`] columns and then over
/// their results: candle gives each output of a reduction one block of threads, and one block
/// over a 262,144-entry row took 150 µs on an H200 (three of them per token) where rows of a
/// thousand in parallel take a few.
pub fn argmax_on_device(row: &Tensor, iota: &Tensor) -> Result<(u32, bool)> {
    let vocab = row.dim(0)?;
    let cols = first_stage(vocab);
    let shape = (vocab / cols, cols);
    let row = row.reshape(shape)?;
    let max = row.max_keepdim(1)?.max_keepdim(0)?; // [1, 1]
    let at_max = row.broadcast_eq(&max)?.to_dtype(DType::F32)?;
    // Indices at the maximum, every other pushed past the end; the smallest is the first.
    let first = (iota.reshape(shape)? + at_max.affine(-(vocab as f64), vocab as f64)?)?
        .min_keepdim(1)?
        .min_keepdim(0)?;
    let bad = bad_entries(&row)?;
    let got: Vec<f32> = Tensor::cat(&[first, bad], 0)?.flatten_all()?.to_vec1()?;
    Ok((got[0] as u32, got[1] > 0.0))
}

/// `[1]` f32: above 0 where `row` `[vocab]` (f32) holds NaN or +∞, computed where it lies.
pub fn holds_nan_or_infinity(row: &Tensor) -> Result<Tensor> {
    let vocab = row.dim(0)?;
    let cols = first_stage(vocab);
    Ok(bad_entries(&row.reshape((vocab / cols, cols))?)?.flatten_all()?)
}

/// `[1, 1]`: above 0 where `row` `[r, c]` holds NaN or +∞ (two-stage reductions).
fn bad_entries(row: &Tensor) -> Result<Tensor> {
    let nan = row.ne(row)?;
    let inf = row.eq(f32::INFINITY)?;
    Ok((nan.to_dtype(DType::F32)? + inf.to_dtype(DType::F32)?)?
        .max_keepdim(1)?
        .max_keepdim(0)?)
}

/// The columns of [`argmax_on_device`]'s first stage for a row of `vocab`: its largest divisor up
/// to 2048, or the whole row when it has none from 256 up (one stage).
fn first_stage(vocab: usize) -> usize {
    (256..=2048.min(vocab))
        .rev()
        .find(|&c| vocab.is_multiple_of(c))
        .unwrap_or(vocab)
}

/// Index of the largest value (the first on ties, as torch.argmax does on CPU).
pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in x.iter().enumerate() {
        if *v > x[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_on_device_takes_the_first_maximum_and_flags_nan_and_infinity() {
        let dev = candle_core::Device::Cpu;
        let iota = Tensor::arange(0u32, 6, &dev)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let on_device =
            |v: &[f32]| argmax_on_device(&Tensor::new(v, &dev).unwrap(), &iota).unwrap();
        for v in [
            [0.5f32, 2.0, -1.0, 2.0, 2.0, 0.0],
            [3.0, 3.0, 3.0, 3.0, 3.0, 3.0],
            [f32::NEG_INFINITY; 6],
            [-4.0, -1.0, f32::NEG_INFINITY, -1.5, -0.25, -0.25],
        ] {
            assert_eq!(on_device(&v), (argmax(&v), false), "{v:?}");
        }
        assert!(on_device(&[0.0, f32::NAN, 1.0, 0.0, 0.0, 0.0]).1);
        assert!(on_device(&[0.0, 1.0, f32::INFINITY, 0.0, 0.0, 0.0]).1);
    }

    /// A draw from a top-k's candidates ([`crate::layers::top_k::top_k_entries`], as a GPU
    /// reads them back) equals the draw from the whole row, seed by seed and draw by draw, with
    /// ties across the k-th place and every truncation.
    #[test]
    fn a_draw_among_the_top_k_is_the_draw_from_the_whole_row() {
        use crate::layers::top_k;
        let dev = candle_core::Device::Cpu;
        let tri = top_k::triangle(&dev).unwrap();
        let logits: Vec<f32> = (0..3000u32)
            .map(|i| ((i * 7919) % 101) as f32 * 0.1)
            .collect();
        let row = Tensor::new(logits.as_slice(), &dev).unwrap();
        for (k, top_p, min_p) in [
            (1, None, None),
            (20, None, None),
            (64, Some(0.9), None),
            (64, Some(0.5), Some(0.1)),
            (1000, Some(0.95), None),
        ] {
            for seed in 0..10 {
                let settings = Sampling {
                    temperature: 0.8,
                    top_k: Some(k),
                    top_p,
                    min_p,
                    seed,
                    ..Sampling::default()
                };
                let mut whole = Sampler::new(settings.clone());
                let mut among = Sampler::new(settings);
                let k = among.top_k_draw(logits.len()).expect("a top-k draw");
                let (values, ids) = top_k::top_k_entries(&row, k, &tri).unwrap();
                let values: Vec<f32> = values.to_vec1().unwrap();
                let ids: Vec<u32> = ids
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|&i| i as u32)
                    .collect();
                for draw in 0..3 {
                    assert_eq!(
                        whole.next(&logits, &[]),
                        among.next_among(&values, &ids),
                        "k {k}, seed {seed}, draw {draw}"
                    );
                }
            }
        }
        // What needs the whole row (a repeat penalty, no top-k, greedy) is not drawn this way.
        for settings in [
            Sampling {
                temperature: 0.8,
                top_k: Some(5),
                repeat_penalty: 1.1,
                ..Sampling::default()
            },
            Sampling {
                temperature: 0.8,
                ..Sampling::default()
            },
            Sampling {
                top_k: Some(5),
                ..Sampling::default()
            },
        ] {
            assert_eq!(Sampler::new(settings).top_k_draw(3000), None);
        }
    }

    /// In two stages (rows of a few hundred and more), with the maximum and its ties in different
    /// parts of the row.
    #[test]
    fn argmax_on_device_in_two_stages_takes_the_first_maximum() {
        let dev = candle_core::Device::Cpu;
        for vocab in [248_320usize, 3 * 1024, 1031] {
            assert!(first_stage(vocab) < vocab || vocab == 1031, "{vocab}");
            let iota = Tensor::arange(0u32, vocab as u32, &dev)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let mut v: Vec<f32> = (0..vocab).map(|i| ((i * 7919) % 997) as f32).collect();
            for (places, bad) in [
                (vec![], false),
                (vec![vocab - 1, 5], false),
                (vec![700], true),
            ] {
                for &p in &places {
                    v[p] = 2000.0;
                }
                if bad {
                    v[vocab / 2] = f32::INFINITY;
                }
                let got = argmax_on_device(&Tensor::new(v.as_slice(), &dev).unwrap(), &iota);
                assert_eq!(got.unwrap(), (argmax(&v), bad), "{vocab} {places:?}");
            }
        }
    }

    /// A top-k found by selection is the top-k of the whole sort, ties included (to the lower id),
    /// in the same order with the same probabilities.
    #[test]
    fn top_k_by_selection_equals_the_sorted_prefix() {
        // Few distinct values: ties across the k-th place.
        let logits: Vec<f32> = (0..500u32)
            .map(|i| ((i * 7919) % 23) as f32 * 0.5)
            .collect();
        let settings = |top_k| Sampling {
            temperature: 0.7,
            top_k,
            ..Sampling::default()
        };
        let all = Sampler::new(settings(None)).distribution(&logits, &[]);
        for k in [1, 5, 21, 22, 23, 64, 499, 500, 600] {
            let d = Sampler::new(settings(Some(k))).distribution(&logits, &[]);
            let n = k.min(500);
            assert_eq!(d.ids, all.ids[..n], "k = {k}");
            // The same best-first order: ties to the lower id.
            assert!(d.ids.windows(2).all(|w| {
                let (a, b) = (logits[w[0] as usize], logits[w[1] as usize]);
                a > b || (a == b && w[0] < w[1])
            }));
            let sum: f32 = all.p[..n].iter().sum();
            for (p, q) in d.p.iter().zip(&all.p[..n]) {
                assert!((p - q / sum).abs() < 1e-6, "k = {k}");
            }
        }
    }

    #[test]
    fn greedy_and_penalty() {
        let mut s = Sampler::new(Sampling::default());
        assert_eq!(s.next(&[0.1, 3.0, 2.9], &[]), 1);
        let mut s = Sampler::new(Sampling {
            repeat_penalty: 2.0,
            ..Default::default()
        });
        // 3.0 / 2 < 2.9: the repeated token loses.
        assert_eq!(s.next(&[0.1, 3.0, 2.9], &[1]), 2);
    }

    #[test]
    fn truncations_restrict_the_draw() {
        let logits = [5.0, 4.9, 0.0, -1.0];
        for settings in [
            Sampling {
                temperature: 1.0,
                top_k: Some(2),
                ..Default::default()
            },
            Sampling {
                temperature: 1.0,
                top_p: Some(0.9),
                ..Default::default()
            },
            Sampling {
                temperature: 1.0,
                min_p: Some(0.5),
                ..Default::default()
            },
        ] {
            let mut s = Sampler::new(settings.clone());
            let mut counts = [0; 4];
            for _ in 0..400 {
                counts[s.next(&logits, &[]) as usize] += 1;
            }
            assert_eq!(counts[2] + counts[3], 0, "{settings:?}: {counts:?}");
            assert!(
                counts[0] > 100 && counts[1] > 100,
                "{settings:?}: {counts:?}"
            );
        }
        // Same seed, same draws.
        let draw = |seed| {
            let mut s = Sampler::new(Sampling {
                temperature: 1.0,
                seed,
                ..Default::default()
            });
            (0..20).map(|_| s.next(&logits, &[])).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
    }

    /// Dividing by a tiny temperature first overflowed to inf - inf = NaN and drew garbage.
    #[test]
    fn a_tiny_temperature_tends_to_greedy() {
        for t in [1e-38, 1e-20, 1e-6] {
            let mut s = Sampler::new(Sampling {
                temperature: t,
                ..Sampling::default()
            });
            for _ in 0..50 {
                assert_eq!(s.next(&[30.0, 31.0, -5.0, 30.9], &[]), 1, "T = {t}");
            }
        }
    }

    #[test]
    fn validation_names_the_flag() {
        let bad = Sampling {
            temperature: -1.0,
            ..Default::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--temperature"));
        let bad = Sampling {
            top_p: Some(1.5),
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("--top-p"));
    }
}
