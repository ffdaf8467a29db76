//! The MicroScopiQ quantizer for one linear layer.
//!
//! Per input channel k and micro-block (M consecutive output channels of that channel):
//! outliers are the values with |w - mean| > k_sigma * std, with the statistics taken over a
//! configurable scope; as many of the least salient inliers are pruned as there are outliers;
//! each outlier is encoded in the 2b-bit outlier format, its upper b bits stored in its own
//! slot and its lower b bits in a pruned slot. Inliers use sign-magnitude MX-INT-b on the
//! micro-block's exponent, which sits 0 to 2^u - 1 binades below the macro-block's E8M0 base.
//!
//! [`quantize`] rounds to nearest without error feedback. It is the identity-Hessian case of
//! GPTQ, so it ranks pruning candidates by the saliency w^2 / U_kk^2 with U_kk = 1, which is
//! the order of |w|. The steps for one input channel ([`plan_column`], [`base_exponent`],
//! [`encode_micro_block`]) are public so that the GPTQ column loop in [`crate::gptq`] can run
//! them one channel at a time on error-updated weights.

use crate::config::{OutlierScope, Resolved};
use crate::formats::{floor_log2_f64, E8m0};
use crate::recon::{self, SwitchOp};
use crate::weights::Matrix;

/// Outlier pairs of one micro-block, with the ReCoN commands that merge them.
#[derive(Clone, Debug, PartialEq)]
pub struct PairBlock {
    /// Input channel.
    pub k: usize,
    /// Micro-block index along the output channels.
    pub ublock: usize,
    /// (outlier lane, pruned lane) pairs, lanes counted inside the micro-block.
    pub pairs: Vec<(usize, usize)>,
    /// Stored outlier exponent offset: offset minus the configuration's smallest offset.
    pub offset_code: u32,
    pub commands: Vec<SwitchOp>,
}

/// Counts gathered while quantizing one layer.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct LayerStats {
    /// Weights of the original tensor.
    pub weights: usize,
    /// Outliers kept at outlier precision.
    pub outliers: usize,
    /// Inliers pruned to host outlier bits (equal to `outliers`).
    pub pruned: usize,
    /// Outliers demoted to inliers because ReCoN could not merge their micro-block in one
    /// pass with any pruned set that the quantizer tried.
    pub demoted: usize,
    /// Micro-blocks whose pruned lanes are not the least salient inliers, because ReCoN could
    /// not merge those in one pass and another set routed.
    pub repaired: usize,
    /// Outliers whose exponent offset was clamped to the stored range.
    pub offset_clamped: usize,
    /// Micro-blocks holding at least one pair.
    pub flagged_ublocks: usize,
    /// Micro-blocks in the padded layer.
    pub ublocks: usize,
    /// Micro-blocks by number of pairs (index = pairs).
    pub pairs_histogram: Vec<usize>,
    /// Routing outcomes by number of outlier candidates before demotion (index = candidates).
    pub routing: Vec<RoutingCounts>,
    /// ||W - Q(W)||_F / ||W||_F over the original weights.
    pub relative_error: f64,
}

/// Routing outcomes of the micro-blocks that share one number of outlier candidates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RoutingCounts {
    /// Micro-blocks with this many outlier candidates.
    pub ublocks: usize,
    /// Micro-blocks whose least salient inliers routed as the pruned lanes at once.
    pub routed_at_once: usize,
    /// Micro-blocks that kept every candidate because other pruned lanes routed.
    pub repaired: usize,
    /// Micro-blocks that demoted at least one candidate.
    pub demoted: usize,
}

impl RoutingCounts {
    /// Adds the counts of `other`.
    pub fn add(&mut self, other: &RoutingCounts) {
        self.ublocks += other.ublocks;
        self.routed_at_once += other.routed_at_once;
        self.repaired += other.repaired;
        self.demoted += other.demoted;
    }
}

/// A quantized layer: every slot code, exponent and pair, plus the dequantized weights.
#[derive(Clone, Debug)]
pub struct QuantizedLayer {
    pub name: String,
    /// Output channels of the original tensor.
    pub n_out: usize,
    /// Input channels of the original tensor.
    pub k_in: usize,
    /// Output channels after zero padding to a multiple of the array columns.
    pub n_pad: usize,
    /// Input channels after zero padding to a multiple of the macro-block rows.
    pub k_pad: usize,
    /// E8M0 base exponents, `[k_pad / R][n_pad / M]`.
    pub bases: Vec<E8m0>,
    /// Micro-exponents d, `[k_pad][n_pad / M]`.
    pub micro_exps: Vec<u8>,
    /// Slot codes, `[k_pad][n_pad]`.
    pub slots: Vec<u8>,
    /// Index into `pair_blocks` per micro-block, `[k_pad][n_pad / M]`; `u32::MAX` for none.
    pub pair_index: Vec<u32>,
    pub pair_blocks: Vec<PairBlock>,
    /// Dequantized weights, `[n_out][k_in]`, exact.
    pub dequant: Vec<f64>,
    pub stats: LayerStats,
}

impl QuantizedLayer {
    /// Creates a layer of the shape of `weights` with every code zero and the smallest base.
    pub fn empty(weights: &Matrix, r: &Resolved) -> QuantizedLayer {
        let (n_out, k_in) = (weights.rows, weights.cols);
        let (n_pad, k_pad) = padded_shape(n_out, k_in, r);
        let ub_per_k = n_pad / r.m;
        let mabs_k = k_pad / r.mab_rows;
        QuantizedLayer {
            name: weights.name.clone(),
            n_out,
            k_in,
            n_pad,
            k_pad,
            bases: vec![E8m0::from_exponent(E8m0::MIN_EXPONENT); mabs_k * ub_per_k],
            micro_exps: vec![0; k_pad * ub_per_k],
            slots: vec![0; k_pad * n_pad],
            pair_index: vec![u32::MAX; k_pad * ub_per_k],
            pair_blocks: Vec::new(),
            dequant: vec![0.0; n_out * k_in],
            stats: LayerStats {
                weights: n_out * k_in,
                ublocks: k_pad * ub_per_k,
                pairs_histogram: vec![0; r.max_pairs + 1],
                routing: vec![RoutingCounts::default(); r.max_pairs + 1],
                ..LayerStats::default()
            },
        }
    }

    /// Micro-blocks per input channel.
    pub fn ublocks_per_channel(&self, m: usize) -> usize {
        self.n_pad / m
    }

    /// Returns the pair block of micro-block `ublock` of input channel `k`, if it has pairs.
    pub fn pair_block(&self, k: usize, ublock: usize, m: usize) -> Option<&PairBlock> {
        let index = self.pair_index[k * (self.n_pad / m) + ublock];
        (index != u32::MAX).then(|| &self.pair_blocks[index as usize])
    }

    /// Writes micro-block `ublock` of input channel `k`: slots, micro-exponent, dequantized
    /// values, pair entry and counts.
    ///
    /// Pair entries are appended, so callers store micro-blocks in the order (macro-block
    /// row, micro-block, input channel) to get the entry order of [`quantize`].
    pub fn store_micro_block(
        &mut self,
        r: &Resolved,
        k: usize,
        ublock: usize,
        block: &MicroBlock,
        encoded: &EncodedBlock,
    ) {
        let m = r.m;
        let ub_per_k = self.n_pad / m;
        self.micro_exps[k * ub_per_k + ublock] = encoded.micro_exp as u8;
        for i in 0..m {
            let n = ublock * m + i;
            self.slots[k * self.n_pad + n] = encoded.slots[i];
            if block.real[i] {
                self.dequant[n * self.k_in + k] = encoded.values[i];
            }
        }
        self.stats.demoted += block.demoted;
        self.stats.repaired += usize::from(block.repaired);
        let routing = &mut self.stats.routing[block.candidates];
        routing.ublocks += 1;
        if block.demoted > 0 {
            routing.demoted += 1;
        } else if block.repaired {
            routing.repaired += 1;
        } else {
            routing.routed_at_once += 1;
        }
        let pairs = block.route.pairs.len();
        self.stats.pairs_histogram[pairs] += 1;
        if pairs > 0 {
            self.stats.outliers += pairs;
            self.stats.pruned += pairs;
            self.stats.flagged_ublocks += 1;
            if encoded.offset_clamped {
                self.stats.offset_clamped += pairs;
            }
            self.pair_index[k * ub_per_k + ublock] = self.pair_blocks.len() as u32;
            self.pair_blocks.push(PairBlock {
                k,
                ublock,
                pairs: block.route.pairs.clone(),
                offset_code: encoded.offset_code,
                commands: block.route.commands.clone(),
            });
        }
    }

    /// Sets `stats.relative_error` to ||W - Q(W)||_F / ||W||_F over the original `weights`.
    pub fn set_relative_error(&mut self, weights: &Matrix) {
        let mut err = 0.0;
        let mut norm = 0.0;
        for n in 0..self.n_out {
            for k in 0..self.k_in {
                let w = weights.get(n, k) as f64;
                let d = self.dequant[n * self.k_in + k] - w;
                err += d * d;
                norm += w * w;
            }
        }
        self.stats.relative_error = if norm > 0.0 { (err / norm).sqrt() } else { 0.0 };
    }
}

/// Exact 2^e as f64 for exponents in the normal range.
pub fn pow2(e: i32) -> f64 {
    assert!((-1022..=1023).contains(&e), "2^{e} is outside the f64 normal range");
    f64::from_bits(((e + 1023) as u64) << 52)
}

fn round_up(value: usize, multiple: usize) -> usize {
    value.div_ceil(multiple).max(1) * multiple
}

/// Returns `(n_pad, k_pad)`: the output channels padded to a multiple of the array columns
/// and the input channels padded to a multiple of the macro-block rows.
pub fn padded_shape(n_out: usize, k_in: usize, r: &Resolved) -> (usize, usize) {
    (round_up(n_out, r.cols), round_up(k_in, r.mab_rows))
}

/// Mean and population standard deviation of the values.
fn mean_std(values: impl Iterator<Item = f64> + Clone) -> (f64, f64) {
    let count = values.clone().count();
    if count == 0 {
        return (0.0, 0.0);
    }
    let mean = values.clone().sum::<f64>() / count as f64;
    let var = values.map(|v| (v - mean) * (v - mean)).sum::<f64>() / count as f64;
    (mean, var.sqrt())
}

/// Layer weights as f64 input-channel columns, `data[k * n_out + n]`.
///
/// The GPTQ loop updates these values in place, while [`quantize`] only reads them.
#[derive(Clone, Debug, PartialEq)]
pub struct Columns {
    pub n_out: usize,
    pub k_in: usize,
    pub data: Vec<f64>,
}

impl Columns {
    /// Copies an `[out, in]` matrix into columns, widening each value exactly to f64.
    pub fn from_matrix(weights: &Matrix) -> Columns {
        let (n_out, k_in) = (weights.rows, weights.cols);
        let mut data = vec![0.0; n_out * k_in];
        for n in 0..n_out {
            for k in 0..k_in {
                data[k * n_out + n] = weights.get(n, k) as f64;
            }
        }
        Columns { n_out, k_in, data }
    }

    /// Returns the `n_out` values of input channel `k`.
    pub fn column(&self, k: usize) -> &[f64] {
        &self.data[k * self.n_out..(k + 1) * self.n_out]
    }

    /// Returns the `n_out` values of input channel `k` for updating.
    pub fn column_mut(&mut self, k: usize) -> &mut [f64] {
        &mut self.data[k * self.n_out..(k + 1) * self.n_out]
    }

    /// Value at output `n` and input `k`, or `None` in the zero padding.
    fn value(&self, n: usize, k: usize) -> Option<f64> {
        (n < self.n_out && k < self.k_in).then(|| self.data[k * self.n_out + n])
    }
}

/// One micro-block after outlier detection, pruning and routing, before encoding.
#[derive(Clone, Debug, PartialEq)]
pub struct MicroBlock {
    /// Weight values of the M lanes, 0 in the padding.
    pub values: Vec<f64>,
    /// Lanes that hold a weight of the original tensor (false in the padding).
    pub real: Vec<bool>,
    /// Outlier lanes, ascending.
    pub outliers: Vec<usize>,
    /// Pruned lanes, ascending.
    pub pruned: Vec<usize>,
    /// Pairing and ReCoN commands.
    pub route: recon::Route,
    /// Outlier candidates detected, before any demotion (at most `max_pairs`).
    pub candidates: usize,
    /// The pruned lanes are not the least salient inliers, because ReCoN could not merge
    /// those in one pass.
    pub repaired: bool,
    /// Outlier candidates dropped because no pruned set within the search bound routed.
    pub demoted: usize,
}

impl MicroBlock {
    /// Inliers that are kept (neither outlier nor pruned).
    fn kept_inliers(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.values.len()).filter(|i| !self.outliers.contains(i) && !self.pruned.contains(i))
    }

    /// Exponent the inliers need as base when they sit on the micro-exponent d = 0.
    fn natural_inlier_exponent(&self, r: &Resolved) -> Option<i32> {
        let max = self.kept_inliers().map(|i| self.values[i].abs()).fold(0.0, f64::max);
        floor_log2_f64(max).map(|e| e - r.int_format.emax())
    }

    /// Element exponent of the largest outlier in the outlier format.
    fn natural_outlier_exponent(&self, r: &Resolved) -> Option<i32> {
        let max = self.outliers.iter().map(|&i| self.values[i].abs()).fold(0.0, f64::max);
        let fp = r.outlier?;
        floor_log2_f64(max).map(|e| e - fp.emax())
    }
}

/// A micro-block encoded at one micro-exponent.
#[derive(Clone, Debug, PartialEq)]
pub struct EncodedBlock {
    /// Micro-exponent d: the inliers sit d binades below the base.
    pub micro_exp: u32,
    /// Slot codes of the M lanes.
    pub slots: Vec<u8>,
    /// Dequantized lane values: the inlier value, the outlier's full value, 0 when pruned.
    pub values: Vec<f64>,
    /// Stored outlier exponent offset code (0 without pairs).
    pub offset_code: u32,
    /// The outlier offset was clamped to the largest stored offset.
    pub offset_clamped: bool,
}

/// Saliency of pruning the weight `w`: w^2 / u^2, where `u` is the diagonal entry of the
/// upper Cholesky factor of H^-1 for the weight's input channel (1 with an identity Hessian).
///
/// It is proportional to the loss increase (Optimal Brain Surgeon) of setting `w` to zero
/// while the channels not yet quantized compensate, because u^2 is the diagonal entry of
/// their inverse Hessian.
pub fn saliency(w: f64, u: f64) -> f64 {
    w * w / (u * u)
}

/// Returns the `count` least salient lanes that are not in `excluded`, least salient first.
///
/// Lane i has saliency [`saliency`]`(values[i], u[i])`. Equal saliencies rank the smaller
/// |w| first and then the lower index, so lanes that share one `u` rank exactly by |w|.
pub fn least_salient(values: &[f64], u: &[f64], excluded: &[usize], count: usize) -> Vec<usize> {
    assert_eq!(values.len(), u.len(), "one Cholesky diagonal entry per lane");
    let mut candidates: Vec<usize> = (0..values.len()).filter(|i| !excluded.contains(i)).collect();
    candidates.sort_by(|&a, &b| {
        saliency(values[a], u[a])
            .total_cmp(&saliency(values[b], u[b]))
            .then(values[a].abs().total_cmp(&values[b].abs()))
    });
    candidates.truncate(count);
    candidates
}

/// Returns the outlier candidates of one micro-block: real lanes with |w - mean| >
/// k_sigma * std, largest magnitude first (ties to the lower lane), at most `max_pairs`.
pub fn outlier_candidates(values: &[f64], real: &[bool], mean: f64, std: f64, r: &Resolved) -> Vec<usize> {
    let mut candidates: Vec<usize> = (0..values.len())
        .filter(|&i| real[i] && std > 0.0 && (values[i] - mean).abs() > r.k_sigma * std)
        .collect();
    // The stable sort keeps the lower index first on ties.
    candidates.sort_by(|&a, &b| values[b].abs().total_cmp(&values[a].abs()));
    candidates.truncate(r.max_pairs);
    candidates
}

/// Detects the outliers of one micro-block from the scope statistics `(mean, std)`, prunes
/// as many inliers, and routes the pairs through ReCoN.
///
/// `u` contains each lane's Cholesky diagonal entry for [`least_salient`]. The pruned lanes
/// are the least salient inliers when ReCoN merges that set in one pass. Otherwise
/// [`route_least_salient`] re-pairs the outliers with other inliers, and only when no set
/// within its search bound routes is the smallest outlier demoted to an inlier.
pub fn plan_micro_block(values: Vec<f64>, real: Vec<bool>, stats: (f64, f64), u: &[f64], r: &Resolved) -> MicroBlock {
    let (mean, std) = stats;
    let mut candidates = outlier_candidates(&values, &real, mean, std, r);
    let detected = candidates.len();
    let mut demoted = 0;
    loop {
        let mut outliers = candidates.clone();
        outliers.sort_unstable();
        if let Some(choice) = route_least_salient(r.m, &values, u, &outliers) {
            return MicroBlock {
                values,
                real,
                outliers,
                pruned: choice.pruned,
                route: choice.route,
                candidates: detected,
                repaired: choice.sets_tried > 1,
                demoted,
            };
        }
        // NOTE: an outlier that no pruned set within the search bound can host in one pass
        // is demoted; multi-pass ReCoN would keep it.
        candidates.pop();
        demoted += 1;
    }
}

/// Upper bound on the pruned-lane sets that [`route_least_salient`] tries for one set of
/// outliers. The first set costs nothing extra, and each further one that fails costs a full
/// router search (up to [`recon::MAX_ROUTE_PLACEMENTS`] path placements).
pub const MAX_PRUNED_SETS: usize = 64;

/// Pruned lanes that ReCoN can pair with a micro-block's outliers, as chosen by
/// [`route_least_salient`].
#[derive(Clone, Debug, PartialEq)]
pub struct PrunedChoice {
    /// Pruned lanes, ascending.
    pub pruned: Vec<usize>,
    /// Pairing and ReCoN commands.
    pub route: recon::Route,
    /// Pruned sets tried, this one included (1 when the least salient set routes).
    pub sets_tried: usize,
}

/// Chooses the pruned lanes for `outliers`: the set of `outliers.len()` inliers with the
/// smallest total saliency whose pairs ReCoN merges in one pass.
///
/// Sets are tried in order of increasing total [`saliency`]. Equal totals try first the set
/// whose lanes rank earlier in the order of [`least_salient`] (saliency, then |w|, then lane
/// index), so the search is deterministic. The first set tried is the one [`least_salient`]
/// returns. [`recon::route`] already tries every assignment of outliers to the pruned lanes
/// of a set, so re-pairing only changes which lanes are pruned. Returns `None` when none of
/// the first [`MAX_PRUNED_SETS`] sets routes.
pub fn route_least_salient(m: usize, values: &[f64], u: &[f64], outliers: &[usize]) -> Option<PrunedChoice> {
    let n = outliers.len();
    if n == 0 {
        // The only set is the empty one, whatever the ranking.
        let route = recon::route(m, &[], &[])?;
        return Some(PrunedChoice { pruned: Vec::new(), route, sets_tried: 1 });
    }
    let ranked = least_salient(values, u, outliers, values.len());
    if n > ranked.len() {
        return None;
    }
    // The cheapest set is ranks 0..n, which [`CheapestSubsets`] also yields first. Trying it
    // before building the search saves the heap and its set in the common case.
    let mut pruned: Vec<usize> = ranked[..n].to_vec();
    pruned.sort_unstable();
    if let Some(route) = recon::route(m, outliers, &pruned) {
        return Some(PrunedChoice { pruned, route, sets_tried: 1 });
    }
    let costs: Vec<f64> = ranked.iter().map(|&i| saliency(values[i], u[i])).collect();
    let mut sets = CheapestSubsets::new(costs, n);
    sets.next();
    for sets_tried in 2..=MAX_PRUNED_SETS {
        let Some(ranks) = sets.next() else { break };
        let mut pruned: Vec<usize> = ranks.iter().map(|&rank| ranked[rank]).collect();
        pruned.sort_unstable();
        if let Some(route) = recon::route(m, outliers, &pruned) {
            return Some(PrunedChoice { pruned, route, sets_tried });
        }
    }
    None
}

/// A `size`-subset of ranks with its total cost, ordered by cost and then by the ranks.
#[derive(Clone, Debug)]
struct RankedSubset {
    cost: f64,
    ranks: Vec<usize>,
}

impl PartialEq for RankedSubset {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == std::cmp::Ordering::Equal
    }
}

impl Eq for RankedSubset {}

impl PartialOrd for RankedSubset {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for RankedSubset {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.cost.total_cmp(&other.cost).then_with(|| self.ranks.cmp(&other.ranks))
    }
}

/// Enumerates the `size`-subsets of `0..costs.len()` in increasing order of total cost, with
/// ties in lexicographic order of the ascending rank lists. `costs` must be ascending.
///
/// This is a best-first search from the cheapest subset {0, .., size - 1}. A successor moves
/// one rank up by one. Its cost is not smaller, because the costs are ascending and floating
/// point addition is monotone. Its rank list is lexicographically larger. So every subset
/// comes after the subsets it is reached from, and the heap yields them in order.
struct CheapestSubsets {
    costs: Vec<f64>,
    heap: std::collections::BinaryHeap<std::cmp::Reverse<RankedSubset>>,
    seen: std::collections::HashSet<Vec<usize>>,
}

impl CheapestSubsets {
    fn new(costs: Vec<f64>, size: usize) -> CheapestSubsets {
        debug_assert!(costs.windows(2).all(|w| w[0] <= w[1]), "costs must be ascending");
        let mut subsets = CheapestSubsets { costs, heap: Default::default(), seen: Default::default() };
        if size <= subsets.costs.len() {
            subsets.push((0..size).collect());
        }
        subsets
    }

    fn push(&mut self, ranks: Vec<usize>) {
        if self.seen.insert(ranks.clone()) {
            // Summing in rank order makes the cost of a set independent of how it was reached.
            let cost = ranks.iter().map(|&rank| self.costs[rank]).sum();
            self.heap.push(std::cmp::Reverse(RankedSubset { cost, ranks }));
        }
    }
}

impl Iterator for CheapestSubsets {
    type Item = Vec<usize>;

    fn next(&mut self) -> Option<Vec<usize>> {
        let std::cmp::Reverse(subset) = self.heap.pop()?;
        let ranks = &subset.ranks;
        for i in 0..ranks.len() {
            let limit = ranks.get(i + 1).copied().unwrap_or(self.costs.len());
            if ranks[i] + 1 < limit {
                let mut successor = ranks.clone();
                successor[i] += 1;
                self.push(successor);
            }
        }
        Some(subset.ranks)
    }
}

/// Plans every micro-block of input channel `k` from the current values in `weights`.
///
/// The outlier statistics come from the configured scope: the whole channel, the R x M
/// values of the macro-block (all R channels as they are in `weights` now), or the
/// micro-block. `u` is the channel's Cholesky diagonal entry, shared by all its lanes.
/// Channels at or beyond `weights.k_in` are zero padding. Returns `n_pad / M` blocks.
pub fn plan_column(weights: &Columns, r: &Resolved, k: usize, n_pad: usize, u: f64) -> Vec<MicroBlock> {
    let m = r.m;
    let column_stats = if r.scope == OutlierScope::Column && k < weights.k_in {
        mean_std(weights.column(k).iter().copied())
    } else {
        (0.0, 0.0)
    };
    let kb = k / r.mab_rows;
    let k_range = kb * r.mab_rows..(kb + 1) * r.mab_rows;
    let lane_u = vec![u; m];
    (0..n_pad / m)
        .map(|nb| {
            let values: Vec<f64> = (0..m).map(|i| weights.value(nb * m + i, k).unwrap_or(0.0)).collect();
            let real: Vec<bool> = (0..m).map(|i| weights.value(nb * m + i, k).is_some()).collect();
            let stats = match r.scope {
                OutlierScope::Column => column_stats,
                OutlierScope::MacroBlock => {
                    let scope: Vec<f64> = k_range
                        .clone()
                        .flat_map(|kk| (0..m).filter_map(move |i| weights.value(nb * m + i, kk)))
                        .collect();
                    mean_std(scope.iter().copied())
                }
                OutlierScope::MicroBlock => mean_std((0..m).filter(|&i| real[i]).map(|i| values[i])),
            };
            plan_micro_block(values, real, stats, &lane_u, r)
        })
        .collect()
}

/// Base exponent of one macro-block column from its planned micro-blocks (one per input
/// channel): the largest natural inlier exponent, raised where an outlier would otherwise
/// need an offset above the stored range.
pub fn base_exponent<'a>(blocks: impl IntoIterator<Item = &'a MicroBlock>, r: &Resolved) -> E8m0 {
    let mut base: Option<i32> = None;
    for block in blocks {
        let wanted = [
            block.natural_inlier_exponent(r),
            block.natural_outlier_exponent(r).map(|e| e - r.offset_max()),
        ];
        for e in wanted.into_iter().flatten() {
            base = Some(base.map_or(e, |x: i32| x.max(e)));
        }
    }
    E8m0::from_exponent(base.unwrap_or(E8m0::MIN_EXPONENT))
}

/// Encodes one micro-block under the base exponent `base` at the micro-exponent with the
/// smallest squared error (the smaller d on ties).
pub fn encode_micro_block(block: &MicroBlock, base: E8m0, r: &Resolved) -> EncodedBlock {
    let beta = base.exponent().expect("the quantizer never writes the NaN scale");
    let nat_out = block.natural_outlier_exponent(r);
    let mut best: Option<(f64, u32)> = None;
    for d in 0..=r.micro_exp_max() {
        let bound = best.map(|(e, _)| e);
        if let Some(err) = squared_error_below(r, block, beta - d as i32, nat_out, bound) {
            if best.is_none_or(|(e, _)| err < e) {
                best = Some((err, d));
            }
        }
    }
    let d = best.expect("at least one micro-exponent").1;
    encode_at(r, block, d, beta - d as i32, nat_out).1
}

/// Returns the squared error that [`encode_at`] reports at inlier exponent `e_in`, with the
/// same operations in the same order, but without building the encoding.
///
/// Returns `None` as soon as the running sum of the inlier errors reaches `bound`. The terms
/// are not negative, and rounded addition of a non-negative term never lowers a sum, so the
/// full error would not be below `bound` either. Without a bound the error is always returned,
/// even when it is infinite.
fn squared_error_below(
    r: &Resolved,
    block: &MicroBlock,
    e_in: i32,
    nat_out: Option<i32>,
    bound: Option<f64>,
) -> Option<f64> {
    let mut err = 0.0;
    for i in block.kept_inliers() {
        let q = r.int_format.quantize(block.values[i], e_in, r.rounding);
        let value = r.int_format.value(q, e_in);
        err += (value - block.values[i]).powi(2);
        if bound.is_some_and(|bound| err >= bound) {
            return None;
        }
    }
    if let (Some(fp), Some(nat)) = (r.outlier, nat_out) {
        let natural_offset = nat - e_in;
        let outlier_error = |offset: i32| -> f64 {
            let e_out = e_in + offset;
            let mut error = 0.0;
            for &(o, _) in &block.route.pairs {
                let code = fp.encode(block.values[o] * pow2(-e_out), r.rounding);
                let value = fp.decode(code) * pow2(e_out);
                error += (value - block.values[o]).powi(2);
            }
            error
        };
        let first = natural_offset.clamp(r.offset_min, r.offset_max());
        let second = (natural_offset + 1).clamp(r.offset_min, r.offset_max());
        let mut outlier_err = outlier_error(first);
        if second != first {
            let second_err = outlier_error(second);
            if second_err < outlier_err {
                outlier_err = second_err;
            }
        }
        err += outlier_err;
    }
    Some(err)
}

/// Quantizes `weights` (`[out, in]`) with the configuration `r`.
pub fn quantize(weights: &Matrix, r: &Resolved) -> QuantizedLayer {
    let columns = Columns::from_matrix(weights);
    let mut layer = QuantizedLayer::empty(weights, r);
    let ub_per_k = layer.n_pad / r.m;
    for kb in 0..layer.k_pad / r.mab_rows {
        let plans: Vec<Vec<MicroBlock>> = (kb * r.mab_rows..(kb + 1) * r.mab_rows)
            .map(|k| plan_column(&columns, r, k, layer.n_pad, 1.0))
            .collect();
        for nb in 0..ub_per_k {
            let base = base_exponent(plans.iter().map(|plan| &plan[nb]), r);
            layer.bases[kb * ub_per_k + nb] = base;
            for (row, plan) in plans.iter().enumerate() {
                let encoded = encode_micro_block(&plan[nb], base, r);
                layer.store_micro_block(r, kb * r.mab_rows + row, nb, &plan[nb], &encoded);
            }
        }
    }
    layer.set_relative_error(weights);
    layer
}

/// Encodes one micro-block at micro-exponent `d` (inlier exponent `e_in`) and returns the
/// squared error over the kept values (inliers and outliers) and the encoding.
fn encode_at(r: &Resolved, block: &MicroBlock, d: u32, e_in: i32, nat_out: Option<i32>) -> (f64, EncodedBlock) {
    let m = block.values.len();
    let mut slots = vec![0u8; m];
    let mut values = vec![0.0; m];
    let mut err = 0.0;
    for i in block.kept_inliers() {
        let q = r.int_format.quantize(block.values[i], e_in, r.rounding);
        slots[i] = r.int_format.encode(q) as u8;
        values[i] = r.int_format.value(q, e_in);
        err += (values[i] - block.values[i]).powi(2);
    }
    let mut offset_code = 0;
    let mut offset_clamped = false;
    if let (Some(fp), Some(nat)) = (r.outlier, nat_out) {
        // The floor rule of MX scales puts the largest outlier at most at 2^(emax+1) times the
        // scale, where the element format saturates below it (7.9 at scale 2^0 clips to 6 in
        // E2M1). One binade more often fits better, so both offsets are tried.
        // The one with the smaller squared error over the outliers is kept, and a tie keeps
        // the finer one.
        let natural_offset = nat - e_in;
        let mask = (1u32 << r.b) - 1;
        let encode_outliers = |offset: i32| -> (f64, Vec<(u32, f64)>) {
            let e_out = e_in + offset;
            let mut error = 0.0;
            let mut codes = Vec::with_capacity(block.route.pairs.len());
            for &(o, _) in &block.route.pairs {
                let code = fp.encode(block.values[o] * pow2(-e_out), r.rounding);
                let value = fp.decode(code) * pow2(e_out);
                error += (value - block.values[o]).powi(2);
                codes.push((code, value));
            }
            (error, codes)
        };
        let first = natural_offset.clamp(r.offset_min, r.offset_max());
        let second = (natural_offset + 1).clamp(r.offset_min, r.offset_max());
        let (mut offset, (mut outlier_err, mut codes)) = (first, encode_outliers(first));
        if second != first {
            let (second_err, second_codes) = encode_outliers(second);
            if second_err < outlier_err {
                offset = second;
                outlier_err = second_err;
                codes = second_codes;
            }
        }
        offset_clamped = natural_offset > r.offset_max();
        offset_code = (offset - r.offset_min) as u32;
        for (&(o, p), &(code, value)) in block.route.pairs.iter().zip(&codes) {
            slots[o] = (code >> r.b) as u8;
            slots[p] = (code & mask) as u8;
            values[o] = value;
        }
        err += outlier_err;
    }
    (err, EncodedBlock { micro_exp: d, slots, values, offset_code, offset_clamped })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Returns every `size`-subset of `0..costs.len()` sorted by (total cost, ranks).
    fn sorted_subsets(costs: &[f64], size: usize) -> Vec<Vec<usize>> {
        let mut subsets: Vec<(f64, Vec<usize>)> = (0u32..(1 << costs.len()))
            .filter(|mask| mask.count_ones() as usize == size)
            .map(|mask| {
                let ranks: Vec<usize> = (0..costs.len()).filter(|i| mask >> i & 1 == 1).collect();
                (ranks.iter().map(|&rank| costs[rank]).sum(), ranks)
            })
            .collect();
        subsets.sort_by(|a, b| a.0.total_cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
        subsets.into_iter().map(|(_, ranks)| ranks).collect()
    }

    #[test]
    fn cheapest_subsets_follow_cost_order() {
        let cases: [&[f64]; 4] = [
            &[0.0, 0.0, 1.0, 1.0, 1.0, 4.0, 9.0, 9.0],
            &[0.01, 0.02, 0.5, 0.51, 0.7, 1.9, 2.0, 2.0, 2.5, 7.0],
            &[1.0; 7],
            &[0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5],
        ];
        for costs in cases {
            for size in 0..=costs.len() {
                let expected = sorted_subsets(costs, size);
                let got: Vec<Vec<usize>> = CheapestSubsets::new(costs.to_vec(), size).collect();
                assert_eq!(got, expected, "costs {costs:?}, size {size}");
            }
        }
    }

    #[test]
    fn cheapest_subsets_larger_than_pool() {
        assert_eq!(CheapestSubsets::new(vec![1.0, 2.0], 3).count(), 0);
    }

    #[test]
    fn least_salient_set_is_tried_first() {
        let values = [0.9, -0.05, 0.3, 1.2, -0.01, 0.2, 0.02, -0.7];
        let u = [1.0; 8];
        let outliers = [0, 3];
        let choice = route_least_salient(8, &values, &u, &outliers).expect("every pair set of 8 lanes routes");
        assert_eq!(choice.sets_tried, 1);
        assert_eq!(choice.pruned, [4, 6]);
    }
}
