//! How the scanner's prefilter literals are laid out in Teddy searchers
//! (design 0004, "2026-12-06 (session 31): the prefilter's layout").
//!
//! A Teddy searcher reads the haystack once, whatever its literals: each
//! searcher is a pass. It tests every position against each bucket with
//! nibble masks (the low and the high half of each of the first
//! `min(4, shortest literal)` bytes), so a bucket lets through every byte
//! string whose nibbles its literals hold between them, not only the
//! literals: a bucket of `SECRET` and `sk-api-` also lets through `secr`,
//! and each such candidate is verified by hand. Fewer passes mean fuller
//! buckets; fuller buckets let through more. Which literals share a bucket
//! decides the price: one that holds literals alike in their nibbles lets
//! through little else.
//!
//! The layout takes as few searchers as the CPU's widest Teddy allows
//! (AVX2's "fat" Teddy has 16 buckets: up to [`WIDE_CAP`] literals each,
//! else 32 in 8) and assigns literals to buckets so that the expected share
//! of positions each bucket lets through, estimated from how often each
//! byte occurs in source code ([`BYTE_FREQUENCY`]), is as low as pairwise
//! exchanges of literals can make it. Literals with the same low nibbles
//! (case variants: `azure`, `AZURE`, `Azure`) always share a bucket, as
//! Teddy gives them one; they move as one unit.
//!
//! Teddy gives the literal with id `i` the bucket `B - 1 - i % B` unless an
//! earlier literal has its low nibbles (aho-corasick 1.1.5,
//! `packed/teddy/generic.rs`), so the order of each searcher's literals
//! realises the layout. This only changes speed: every searcher finds every
//! occurrence of its literals whatever their order and bucket.

/// Relative frequency, per million bytes, of each byte value in source code
/// and its text (measured on 200 MB of the crates.io sources this workspace
/// builds from; every value at least 1).
const BYTE_FREQUENCY: [u32; 256] = [
    7, 1, 1, 2, 2, 1, 2, 2, 2, 1696, 26929, 1, 2, 343, 2, 2, 1, 1, 2, 1, 1, 1, 1, 2, 1, 1, 2, 1, 1,
    1, 1, 2, 206880, 1831, 9822, 4490, 718, 836, 1905, 2283, 11492, 11494, 3720, 671, 17527, 4657,
    7805, 14025, 20384, 8134, 6286, 5359, 3814, 3102, 4079, 2202, 3161, 2213, 17750, 7289, 1983,
    6671, 3507, 575, 178, 5113, 2688, 4078, 3337, 6557, 3117, 1506, 1199, 4958, 177, 783, 3671,
    2266, 3971, 3908, 3023, 506, 4088, 5616, 5866, 2190, 1435, 857, 640, 757, 278, 3171, 3094,
    3166, 196, 18898, 2712, 30266, 10076, 18253, 16591, 54502, 12977, 8493, 9815, 29508, 518, 3238,
    19481, 12991, 30125, 27358, 16263, 1926, 32444, 29501, 43231, 18898, 4353, 4687, 7124, 6560,
    1558, 3975, 679, 3973, 39, 2, 236, 95, 133, 93, 430, 438, 369, 106, 80, 86, 66, 67, 301, 95,
    66, 88, 128, 122, 74, 55, 85, 138, 98, 280, 47, 76, 77, 53, 54, 123, 93, 121, 85, 69, 58, 73,
    79, 75, 63, 69, 79, 77, 75, 81, 78, 79, 164, 85, 101, 85, 83, 89, 119, 87, 58, 118, 100, 91,
    104, 73, 88, 81, 79, 79, 1, 1, 19, 40, 10, 10, 5, 8, 7, 5, 4, 3, 279, 33, 42, 29, 14, 9, 6, 8,
    5, 3, 143, 18, 35, 42, 5, 10, 6, 6, 2, 6, 112, 1207, 443, 89, 9, 21, 18, 18, 16, 12, 89, 193,
    193, 94, 2, 85, 342, 9, 8, 14, 2, 2, 2, 2, 2, 3, 2, 2, 2, 2, 8, 2,
];

/// Most literals of one searcher with AVX2: fat Teddy's 16 buckets of
/// seven or eight. Measured on the benchmark corpus (design 0004), the
/// built-in rules' 228 long literals read faster in two such searchers
/// than in three (-6 % instructions) or in seven slim ones of 32.
pub(crate) const WIDE_CAP: usize = 120;

/// Most literals of one searcher without AVX2: slim Teddy's limit.
pub(crate) const SLIM_CAP: usize = 32;

/// Most rounds of pairwise exchanges (the search stops earlier when a
/// round improves nothing). For the built-in rules the fourth round ends
/// within 2 % of where the eighth, the last that improves, does; each
/// round costs about 3 ms at startup.
const ROUNDS: usize = 4;

/// The searchers this CPU gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Shape {
    /// Most literals of one searcher.
    pub cap: usize,
    /// Whether a searcher of more than 32 literals is fat Teddy (16
    /// buckets): aho-corasick picks it where the CPU has AVX2.
    pub wide: bool,
}

impl Shape {
    pub const WIDE: Self = Self {
        cap: WIDE_CAP,
        wide: true,
    };
    pub const SLIM: Self = Self {
        cap: SLIM_CAP,
        wide: false,
    };

    /// The shape of this CPU's searchers.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            return Self::WIDE;
        }
        Self::SLIM
    }

    /// Teddy's buckets for a searcher of `size` literals.
    pub fn buckets(self, size: usize) -> usize {
        if self.wide && size > SLIM_CAP { 16 } else { 8 }
    }
}

/// Literals cut into searchers: those shorter than four bytes apart (they
/// would shorten every searcher's mask), each set in as few searchers of
/// near-equal size as `shape` allows, each searcher's literals in the order
/// that gives them the buckets laid out.
pub(crate) fn layout<T>(literals: Vec<(String, T)>, shape: Shape) -> Vec<Vec<(String, T)>> {
    let (mut short, mut long): (Vec<_>, Vec<_>) =
        literals.into_iter().partition(|(k, _)| k.len() < 4);
    let mut searchers = Vec::new();
    for set in [&mut short, &mut long] {
        if set.is_empty() {
            continue;
        }
        set.sort_by_cached_key(|(k, _)| (k.to_ascii_lowercase(), k.clone()));
        let mask = set.iter().map(|(k, _)| k.len()).min().unwrap_or(4).min(4);
        searchers.extend(lay_out_set(std::mem::take(set), mask, shape));
    }
    searchers
}

/// One unit: literals with the same low nibbles in the mask (indexes into
/// the set), and what it puts in a bucket's masks.
#[derive(Debug)]
struct Unit {
    members: Vec<usize>,
    /// Per mask byte: the low nibble, and the high nibbles (a bit each).
    lo: [u8; 4],
    hi: [u16; 4],
}

/// A bucket's masks, with counts so that a unit can leave it.
#[derive(Debug, Clone, Default)]
struct Bin {
    lo: [[u8; 16]; 4],
    hi: [[u8; 16]; 4],
    lo_mask: [u16; 4],
    hi_mask: [u16; 4],
    cost: f64,
}

/// The expected share of positions a bucket lets through: per mask byte,
/// the frequency of the bytes whose nibbles both masks hold, multiplied.
fn masks_cost(lo: &[u16; 4], hi: &[u16; 4], mask: usize, freq: &Frequencies) -> f64 {
    let mut cost = 1.0;
    for j in 0..mask {
        let [low, high] = lo[j].to_le_bytes().map(usize::from);
        let mut p = 0.0;
        for hn in bits(hi[j]) {
            p += freq.sums[hn][0][low] + freq.sums[hn][1][high];
        }
        cost *= p;
    }
    cost
}

impl Bin {
    fn add(&mut self, u: &Unit, mask: usize) {
        for j in 0..mask {
            let l = usize::from(u.lo[j]);
            self.lo[j][l] += 1;
            self.lo_mask[j] |= 1 << l;
            for n in bits(u.hi[j]) {
                self.hi[j][n] += 1;
            }
            self.hi_mask[j] |= u.hi[j];
        }
    }

    fn remove(&mut self, u: &Unit, mask: usize) {
        for j in 0..mask {
            let l = usize::from(u.lo[j]);
            self.lo[j][l] -= 1;
            if self.lo[j][l] == 0 {
                self.lo_mask[j] &= !(1 << l);
            }
            for n in bits(u.hi[j]) {
                self.hi[j][n] -= 1;
                if self.hi[j][n] == 0 {
                    self.hi_mask[j] &= !(1 << n);
                }
            }
        }
    }

    /// The price of this bucket with `out` taken out and `inn` put in.
    fn cost_with(&self, out: &Unit, inn: &Unit, mask: usize, freq: &Frequencies) -> f64 {
        let (mut lo, mut hi) = (self.lo_mask, self.hi_mask);
        for j in 0..mask {
            let l = usize::from(out.lo[j]);
            if self.lo[j][l] == 1 {
                lo[j] &= !(1 << l);
            }
            lo[j] |= 1 << inn.lo[j];
            for n in bits(out.hi[j]) {
                if self.hi[j][n] == 1 {
                    hi[j] &= !(1 << n);
                }
            }
            hi[j] |= inn.hi[j];
        }
        masks_cost(&lo, &hi, mask, freq)
    }
}

fn bits(mut m: u16) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        (m != 0).then(|| {
            let n = m.trailing_zeros() as usize;
            m &= m - 1;
            n
        })
    })
}

/// [`BYTE_FREQUENCY`] as shares, summed for [`masks_cost`]: for each high
/// nibble, the share of the bytes with that high nibble and a low nibble in
/// a set, the set given as the low (`[h][0][m]`) or the high (`[h][1][m]`)
/// eight bits of a 16-bit mask. A bucket's price is then a few additions per
/// mask byte, not one per pair of nibbles (the layout's exchanges price
/// buckets about 90,000 times for the built-in rules).
#[derive(Debug)]
struct Frequencies {
    sums: Box<[[[f64; 256]; 2]; 16]>,
}

fn frequencies() -> Frequencies {
    let total: u32 = BYTE_FREQUENCY.iter().sum();
    let mut sums = Box::new([[[0f64; 256]; 2]; 16]);
    for (hn, halves) in sums.iter_mut().enumerate() {
        for (half, table) in halves.iter_mut().enumerate() {
            for m in 1..256usize {
                // The set `m` is its lowest member plus the rest.
                let low = m.trailing_zeros() as usize;
                let share =
                    f64::from(BYTE_FREQUENCY[hn << 4 | (half * 8 + low)]) / f64::from(total);
                table[m] = table[m & (m - 1)] + share;
            }
        }
    }
    Frequencies { sums }
}

/// One set of literals (all at least `mask` long, sorted) laid out.
fn lay_out_set<T>(set: Vec<(String, T)>, mask: usize, shape: Shape) -> Vec<Vec<(String, T)>> {
    let freq = frequencies();
    // Units, in sorted order of their first literal.
    let mut units: Vec<Unit> = Vec::new();
    for (i, (k, _)) in set.iter().enumerate() {
        let bytes = &k.as_bytes()[..mask];
        let mut lo = [0u8; 4];
        for (j, b) in bytes.iter().enumerate() {
            lo[j] = b & 15;
        }
        match units.iter_mut().find(|u| u.lo[..mask] == lo[..mask]) {
            Some(u) => {
                u.members.push(i);
                for (j, b) in bytes.iter().enumerate() {
                    u.hi[j] |= 1 << (b >> 4);
                }
            }
            None => {
                let mut hi = [0u16; 4];
                for (j, b) in bytes.iter().enumerate() {
                    hi[j] = 1 << (b >> 4);
                }
                units.push(Unit {
                    members: vec![i],
                    lo,
                    hi,
                });
            }
        }
    }
    // Searchers of near-equal size in sorted order, each unit whole; then
    // each searcher's units in runs of sorted neighbours, one run a bucket.
    let n = set.len();
    let count = n.div_ceil(shape.cap);
    let mut searcher_of = vec![0usize; units.len()];
    let (mut s, mut taken) = (0, 0);
    for (u, unit) in units.iter().enumerate() {
        if taken >= (s + 1) * n / count && s + 1 < count {
            s += 1;
        }
        searcher_of[u] = s;
        taken += unit.members.len();
    }
    let sizes: Vec<usize> = (0..count)
        .map(|s| {
            (0..units.len())
                .filter(|&u| searcher_of[u] == s)
                .map(|u| units[u].members.len())
                .sum()
        })
        .collect();
    let widths: Vec<usize> = sizes.iter().map(|&size| shape.buckets(size)).collect();
    // Bins are numbered searcher by searcher.
    let first_bin: Vec<usize> = widths
        .iter()
        .scan(0, |acc, w| {
            let first = *acc;
            *acc += w;
            Some(first)
        })
        .collect();
    let mut bin_of = vec![0usize; units.len()];
    for s in 0..count {
        let members: Vec<usize> = (0..units.len()).filter(|&u| searcher_of[u] == s).collect();
        let m = members.len().max(1);
        for (k, &u) in members.iter().enumerate() {
            bin_of[u] = first_bin[s] + k * widths[s] / m;
        }
    }
    let nbins: usize = widths.iter().sum();
    let mut bins = vec![Bin::default(); nbins];
    for (u, unit) in units.iter().enumerate() {
        bins[bin_of[u]].add(unit, mask);
    }
    for bin in &mut bins {
        bin.cost = masks_cost(&bin.lo_mask, &bin.hi_mask, mask, &freq);
    }
    // Pairwise exchanges while one lowers the total: two units of the same
    // searcher, or of the same size across searchers (sizes stay as cut).
    for _ in 0..ROUNDS {
        let mut improved = false;
        for a in 0..units.len() {
            for b in a + 1..units.len() {
                let (ba, bb) = (bin_of[a], bin_of[b]);
                if ba == bb
                    || (searcher_of[a] != searcher_of[b]
                        && units[a].members.len() != units[b].members.len())
                {
                    continue;
                }
                let (ua, ub) = (&units[a], &units[b]);
                let ca = bins[ba].cost_with(ua, ub, mask, &freq);
                let cb = bins[bb].cost_with(ub, ua, mask, &freq);
                if ca + cb < (bins[ba].cost + bins[bb].cost) * (1.0 - 1e-9) {
                    bins[ba].remove(ua, mask);
                    bins[ba].add(ub, mask);
                    bins[bb].remove(ub, mask);
                    bins[bb].add(ua, mask);
                    bins[ba].cost = ca;
                    bins[bb].cost = cb;
                    bin_of.swap(a, b);
                    searcher_of.swap(a, b);
                    improved = true;
                }
            }
        }
        if !improved {
            break;
        }
    }
    // Each searcher's order: the first literal of each unit round by round
    // (id `r * B + p` gets bucket `B - 1 - p`: the bins with more units
    // first, so that the last, partial round fills the first positions),
    // then the units' other literals, which follow their first.
    let mut slots: Vec<Option<(String, T)>> = set.into_iter().map(Some).collect();
    let mut searchers = Vec::with_capacity(count);
    for s in 0..count {
        let mut per_bin: Vec<Vec<usize>> = (0..widths[s])
            .map(|k| {
                (0..units.len())
                    .filter(|&u| bin_of[u] == first_bin[s] + k)
                    .collect()
            })
            .collect();
        per_bin.sort_by_key(|v| std::cmp::Reverse(v.len()));
        let mut order: Vec<usize> = Vec::with_capacity(sizes[s]);
        let rounds = per_bin.first().map_or(0, Vec::len);
        for r in 0..rounds {
            order.extend(
                per_bin
                    .iter()
                    .filter_map(|units_of| units_of.get(r))
                    .map(|&u| units[u].members[0]),
            );
        }
        for bin in &per_bin {
            for &u in bin {
                order.extend(units[u].members[1..].iter().copied());
            }
        }
        if !order.is_empty() {
            searchers.push(order.into_iter().filter_map(|i| slots[i].take()).collect());
        }
    }
    searchers
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The built-in rules' prefilter literals, as the engine makes them.
    fn builtin_literals() -> Vec<String> {
        let engine = crate::engine::Engine::with_rules(&[]).unwrap();
        engine.prefilter_literals()
    }

    /// The bucket Teddy gives each literal of a searcher, in its order
    /// (aho-corasick 1.1.5, `packed/teddy/generic.rs`).
    fn teddy_buckets(order: &[&str], buckets: usize) -> Vec<usize> {
        let mask = order.iter().map(|k| k.len()).min().unwrap().min(4);
        let mut seen: Vec<(Vec<u8>, usize)> = Vec::new();
        order
            .iter()
            .enumerate()
            .map(|(id, k)| {
                let lo: Vec<u8> = k.as_bytes()[..mask].iter().map(|b| b & 15).collect();
                match seen.iter().find(|(l, _)| *l == lo) {
                    Some(&(_, b)) => b,
                    None => {
                        let b = buckets - 1 - id % buckets;
                        seen.push((lo, b));
                        b
                    }
                }
            })
            .collect()
    }

    /// The model's price of searchers as Teddy would bucket them.
    fn price(searchers: &[Vec<&str>], shape: Shape) -> f64 {
        let freq = frequencies();
        let mut sum = 0.0;
        for order in searchers {
            let width = shape.buckets(order.len());
            let mask = order.iter().map(|k| k.len()).min().unwrap().min(4);
            let given = teddy_buckets(order, width);
            for bucket in 0..width {
                let (mut lo, mut hi) = ([0u16; 4], [0u16; 4]);
                let mut any = false;
                for (k, _) in order.iter().zip(&given).filter(|(_, b)| **b == bucket) {
                    any = true;
                    for (j, b) in k.as_bytes()[..mask].iter().enumerate() {
                        lo[j] |= 1 << (b & 15);
                        hi[j] |= 1 << (b >> 4);
                    }
                }
                if any {
                    sum += masks_cost(&lo, &hi, mask, &freq);
                }
            }
        }
        sum
    }

    /// Sorted, cut in order, buckets of sorted neighbours: the layout
    /// before this one (design 0004, "2026-12-04: the prefilter").
    fn sorted_runs(literals: &[String], shape: Shape) -> Vec<Vec<&str>> {
        let (mut short, mut long): (Vec<&str>, Vec<&str>) = literals
            .iter()
            .map(String::as_str)
            .partition(|k| k.len() < 4);
        let mut out = Vec::new();
        for set in [&mut short, &mut long] {
            set.sort_by_key(|k| (k.to_ascii_lowercase(), k.to_string()));
            let n = set.len();
            if n == 0 {
                continue;
            }
            let count = n.div_ceil(shape.cap);
            let mut rest = set.iter().copied();
            for g in 0..count {
                let size = n / count + usize::from(g < n % count);
                let width = shape.buckets(size);
                let runs: Vec<Vec<&str>> = (0..width)
                    .map(|b| {
                        let len = size / width + usize::from(b < size % width);
                        rest.by_ref().take(len).collect()
                    })
                    .collect();
                let mut order = Vec::new();
                for r in 0..=size / width {
                    order.extend(runs.iter().filter_map(|run| run.get(r)));
                }
                out.push(order);
            }
        }
        out
    }

    fn lay(literals: &[String], shape: Shape) -> Vec<Vec<String>> {
        let tagged: Vec<(String, ())> = literals.iter().map(|k| (k.clone(), ())).collect();
        layout(tagged, shape)
            .into_iter()
            .map(|s| s.into_iter().map(|(k, ())| k).collect())
            .collect()
    }

    #[test]
    fn every_literal_lands_in_one_searcher_with_the_short_ones_apart() {
        let literals = builtin_literals();
        for shape in [Shape::WIDE, Shape::SLIM] {
            let searchers = lay(&literals, shape);
            let mut all: Vec<&String> = searchers.iter().flatten().collect();
            all.sort();
            let mut want: Vec<&String> = literals.iter().collect();
            want.sort();
            assert_eq!(all, want, "{shape:?}");
            let short = literals.iter().filter(|k| k.len() < 4).count();
            let long = literals.len() - short;
            assert_eq!(
                searchers.len(),
                short.div_ceil(shape.cap) + long.div_ceil(shape.cap),
                "{shape:?}"
            );
            for s in &searchers {
                let n = s.iter().filter(|k| k.len() < 4).count();
                assert!(n == 0 || n == s.len(), "{s:?}");
                assert!(s.len() <= shape.cap + 4, "{shape:?} {}", s.len());
            }
        }
    }

    /// The built-in rules' three-byte literals fit one slim searcher: past
    /// 32, aho-corasick builds fat Teddy, which reads 16 bytes a step
    /// instead of 32 and made the scan 7-10 % dearer (design 0004, session
    /// 39). A rule that needs more must give some back.
    #[test]
    fn the_built_in_short_literals_fit_one_slim_searcher() {
        let short = builtin_literals().iter().filter(|k| k.len() < 4).count();
        assert!(short <= SLIM_CAP, "{short} three-byte literals");
    }

    #[test]
    fn teddy_buckets_of_the_layout_let_through_less_than_sorted_neighbours() {
        // The model's expected share of positions that the buckets let
        // through, with the buckets Teddy gives each searcher's order: the
        // layout's must be well under that of sorted neighbours (about a
        // fifth for the built-in rules), for both shapes of searcher.
        let literals = builtin_literals();
        for shape in [Shape::WIDE, Shape::SLIM] {
            let laid = lay(&literals, shape);
            let laid: Vec<Vec<&str>> = laid
                .iter()
                .map(|s| s.iter().map(String::as_str).collect())
                .collect();
            let ours = price(&laid, shape);
            let before = price(&sorted_runs(&literals, shape), shape);
            assert!(
                ours < before * 0.5,
                "{shape:?}: {ours:e} against {before:e}"
            );
        }
    }

    #[test]
    fn case_variants_share_one_bucket_and_a_bucket_of_alike_literals_is_kept() {
        // `azure`/`AZURE`/`Azure` share their low nibbles: Teddy gives them
        // one bucket, wherever they stand in the order.
        let literals: Vec<String> = [
            "azure",
            "AZURE",
            "Azure",
            "ghp_",
            "gho_",
            "ghs_",
            "ghu_",
            "SECRET",
            "sk-api-",
            "SessionToken",
            "AKIA",
            "ASIA",
            "xai-",
            "T3BlbkFJ",
        ]
        .iter()
        .map(|k| k.to_string())
        .collect();
        let searchers = lay(&literals, Shape::SLIM);
        assert_eq!(searchers.len(), 1);
        let order: Vec<&str> = searchers[0].iter().map(String::as_str).collect();
        let buckets = teddy_buckets(&order, 8);
        let bucket = |k: &str| buckets[order.iter().position(|o| *o == k).unwrap()];
        assert_eq!(bucket("azure"), bucket("AZURE"));
        assert_eq!(bucket("azure"), bucket("Azure"));
        // Fourteen literals in eight buckets: `SECRET`'s bucket does not
        // let the lowercase word through (the built-in rules' sorted order
        // gave it one with `SessionToken` and `sk-api-`, whose nibbles
        // spell `secr`).
        let accepts = |bucket: usize, text: &[u8]| {
            (0..4).all(|j| {
                let (lo, hi) = (text[j] & 15, text[j] >> 4);
                let members = order.iter().zip(&buckets).filter(|(_, b)| **b == bucket);
                members.clone().any(|(k, _)| k.as_bytes()[j] & 15 == lo)
                    && members.clone().any(|(k, _)| k.as_bytes()[j] >> 4 == hi)
            })
        };
        assert!(accepts(bucket("SECRET"), b"SECR"));
        assert!(!accepts(bucket("SECRET"), b"secr"), "{order:?} {buckets:?}");
        let sorted = sorted_runs(&literals, Shape::SLIM);
        assert!(price(std::slice::from_ref(&order), Shape::SLIM) < price(&sorted, Shape::SLIM));
    }

    #[test]
    fn literals_that_share_their_first_four_bytes_stay_together() {
        // One unit of 130 (`qz00_a`…): a searcher of its own, past the cap,
        // rather than one cut in two or an empty one; the others beside it.
        let mut literals: Vec<String> = (0..130).map(|i| format!("qz00_{i:03}")).collect();
        literals.extend((0..10).map(|i| format!("k{i}_x")));
        let searchers = lay(&literals, Shape::WIDE);
        assert!(searchers.iter().all(|s| !s.is_empty()), "{searchers:?}");
        let unit = searchers
            .iter()
            .filter(|s| s.iter().any(|k| k.starts_with("qz00")))
            .count();
        assert_eq!(unit, 1);
        assert_eq!(searchers.iter().map(Vec::len).sum::<usize>(), 140);
    }

    #[test]
    fn the_same_literals_give_the_same_layout() {
        let literals = builtin_literals();
        let mut reversed = literals.clone();
        reversed.reverse();
        assert_eq!(lay(&literals, Shape::WIDE), lay(&reversed, Shape::WIDE));
    }

    /// The summed tables price a bucket as the sum over every pair of
    /// nibbles its masks hold does, for masks of one to sixteen nibbles.
    #[test]
    fn a_buckets_price_is_the_share_of_the_bytes_its_masks_let_through() {
        let freq = frequencies();
        let total: u32 = BYTE_FREQUENCY.iter().sum();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 16) as u16
        };
        for _ in 0..2_000 {
            let (lo, hi) = (
                [next(), next(), next(), next()],
                [next(), next(), next(), next()],
            );
            let mut direct = 1.0;
            for j in 0..4 {
                let mut p = 0.0;
                for hn in bits(hi[j]) {
                    for ln in bits(lo[j]) {
                        p += f64::from(BYTE_FREQUENCY[hn << 4 | ln]) / f64::from(total);
                    }
                }
                direct *= p;
            }
            let summed = masks_cost(&lo, &hi, 4, &freq);
            assert!(
                (summed - direct).abs() <= 1e-12 * direct.max(1e-300),
                "{lo:?} {hi:?}"
            );
        }
        // One byte: the share of that byte alone.
        let b = usize::from(b'k');
        let one = masks_cost(
            &[1 << (b & 15), 0, 0, 0],
            &[1 << (b >> 4), 0, 0, 0],
            1,
            &freq,
        );
        assert_eq!(one, f64::from(BYTE_FREQUENCY[b]) / f64::from(total));
    }
}
