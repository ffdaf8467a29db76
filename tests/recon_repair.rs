//! ReCoN routing and re-pairing: property tests on random pair sets for M = 8, 16 and 32, and
//! a Verilator co-simulation of an M = 16 layer whose micro-blocks needed re-pairing.

mod common;

use microscopiq::config::Resolved;
use microscopiq::flow::{self, RunOptions, SplitMix64};
use microscopiq::quantizer::{self, MAX_PRUNED_SETS};
use microscopiq::recon;
use microscopiq::weights::Matrix;
use proptest::prelude::*;

/// Returns `m` lanes shuffled by `rng` (Fisher-Yates).
fn shuffled_lanes(m: usize, rng: &mut SplitMix64) -> Vec<usize> {
    let mut lanes: Vec<usize> = (0..m).collect();
    for i in (1..m).rev() {
        lanes.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
    lanes
}

/// Checks `route` numerically: distinct lane values through `recon::apply` must give the
/// pair sums on the outlier lanes, 0 on the pruned lanes and the input elsewhere. Returns
/// the first violation.
fn check_merge(m: usize, route: &recon::Route) -> Result<(), String> {
    let before: Vec<i64> = (0..m).map(|i| 1000 + 37 * i as i64).collect();
    let mut lanes = before.clone();
    recon::apply(&route.commands, &mut lanes, 0, |a, b| a + b);
    let mut expected = before.clone();
    for &(o, p) in &route.pairs {
        expected[o] = before[o] + before[p];
        expected[p] = 0;
    }
    if lanes != expected {
        return Err(format!("pairs {:?}: lanes {lanes:?}, expected {expected:?}", route.pairs));
    }
    Ok(())
}

/// Returns the sorted outlier and pruned lanes of `route`.
fn route_lanes(route: &recon::Route) -> (Vec<usize>, Vec<usize>) {
    let mut outliers: Vec<usize> = route.pairs.iter().map(|&(o, _)| o).collect();
    let mut pruned: Vec<usize> = route.pairs.iter().map(|&(_, p)| p).collect();
    outliers.sort_unstable();
    pruned.sort_unstable();
    (outliers, pruned)
}

/// Ranks the lanes outside `outliers` as the quantizer must: by saliency w^2 / u^2, then by
/// |w|, then by lane index. Written independently of `quantizer::least_salient`.
fn reference_rank(values: &[f64], u: &[f64], outliers: &[usize]) -> Vec<usize> {
    let mut lanes: Vec<usize> = (0..values.len()).filter(|i| !outliers.contains(i)).collect();
    lanes.sort_by(|&a, &b| {
        let sa = values[a] * values[a] / (u[a] * u[a]);
        let sb = values[b] * values[b] / (u[b] * u[b]);
        sa.total_cmp(&sb).then(values[a].abs().total_cmp(&values[b].abs())).then(a.cmp(&b))
    });
    lanes
}

/// Returns the first `limit` pruned sets (as rank lists) of `size` lanes in the order the
/// re-pairing search must try them: increasing total saliency, ties by the rank list.
///
/// It sorts every subset by brute force, unlike the best-first search of the quantizer.
fn reference_order(costs: &[f64], size: usize, limit: usize) -> Vec<Vec<usize>> {
    let mut subsets: Vec<(f64, Vec<usize>)> = Vec::new();
    let mut ranks: Vec<usize> = (0..size).collect();
    loop {
        subsets.push((ranks.iter().map(|&rank| costs[rank]).sum(), ranks.clone()));
        // Next combination in lexicographic order.
        let Some(i) = (0..size).rev().find(|&i| ranks[i] < costs.len() - size + i) else { break };
        ranks[i] += 1;
        for j in i + 1..size {
            ranks[j] = ranks[j - 1] + 1;
        }
    }
    subsets.sort_by(|a, b| a.0.total_cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
    subsets.truncate(limit);
    subsets.into_iter().map(|(_, ranks)| ranks).collect()
}

/// Draws lane weights for the re-pairing properties. Even seeds draw from a few values so
/// that saliency ties are common, odd seeds draw normal values.
fn lane_values(m: usize, rng: &mut SplitMix64) -> Vec<f64> {
    let few_values = rng.next_u64() % 2 == 0;
    (0..m)
        .map(|_| if few_values { [0.0, 0.125, -0.125, 0.25, -0.5][(rng.next_u64() % 5) as usize] } else { rng.normal() })
        .collect()
}

/// Largest pair count drawn for M = 16 and 32. A failing router search costs up to
/// `recon::MAX_ROUTE_PLACEMENTS` path placements. In the random sets of
/// `examples/recon_stats.rs` the first failures appear at 7 pairs.
const MAX_RANDOM_PAIRS: usize = 7;

/// Compares `quantizer::route_least_salient` with the reference order on one case. Returns
/// true when the least salient set did not route, so that the search had to go further.
fn check_against_reference(m: usize, outliers: &[usize], values: &[f64]) -> Result<bool, String> {
    let n = outliers.len();
    let u = vec![1.0; m];
    let ranked = reference_rank(values, &u, outliers);
    let costs: Vec<f64> = ranked.iter().map(|&lane| values[lane] * values[lane]).collect();
    let mut expected = None;
    for (index, ranks) in reference_order(&costs, n, MAX_PRUNED_SETS).iter().enumerate() {
        let mut pruned: Vec<usize> = ranks.iter().map(|&rank| ranked[rank]).collect();
        pruned.sort_unstable();
        if let Some(route) = recon::route(m, outliers, &pruned) {
            expected = Some(quantizer::PrunedChoice { pruned, route, sets_tried: index + 1 });
            break;
        }
    }
    let label = format!("M = {m}, outliers {outliers:?}, values {values:?}");
    let choice = quantizer::route_least_salient(m, values, &u, outliers);
    if choice != expected {
        return Err(format!("{label}: search returned {choice:?}, reference {expected:?}"));
    }
    if let Some(choice) = &choice {
        if choice.pruned.iter().any(|p| outliers.contains(p)) {
            return Err(format!("{label}: pruned lanes {:?} hold an outlier", choice.pruned));
        }
    }
    if quantizer::route_least_salient(m, values, &u, outliers) != choice {
        return Err(format!("{label}: a second search returned another result"));
    }
    Ok(choice.is_none_or(|c| c.sets_tried > 1))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn random_routes_merge_exactly_their_pairs(m_log in 3u32..6, pairs in 1usize..=MAX_RANDOM_PAIRS, seed in any::<u64>()) {
        let m = 1usize << m_log;
        let n = pairs.min(m / 2);
        let lanes = shuffled_lanes(m, &mut SplitMix64(seed));
        let mut outliers = lanes[..n].to_vec();
        let mut pruned = lanes[n..2 * n].to_vec();
        outliers.sort_unstable();
        pruned.sort_unstable();
        let route = recon::route(m, &outliers, &pruned);
        if m == 8 {
            prop_assert!(route.is_some(), "M = 8: {outliers:?} with {pruned:?} does not route");
        }
        if let Some(route) = route {
            prop_assert_eq!(route.commands.len(), recon::stage_count(m) * m / 2);
            prop_assert_eq!(route_lanes(&route), (outliers, pruned));
            prop_assert!(recon::merges_pairs(m, &route.pairs, &route.commands));
            if let Err(message) = check_merge(m, &route) {
                return Err(TestCaseError::fail(message));
            }
        }
    }

    #[test]
    fn repairing_picks_cheapest_routable_set(m_log in 3u32..6, pairs in 1usize..=MAX_RANDOM_PAIRS, seed in any::<u64>()) {
        let m = 1usize << m_log;
        let n = pairs.min(m / 2);
        let mut rng = SplitMix64(seed);
        let mut outliers = shuffled_lanes(m, &mut rng)[..n].to_vec();
        outliers.sort_unstable();
        let values = lane_values(m, &mut rng);
        if let Err(message) = check_against_reference(m, &outliers, &values) {
            return Err(TestCaseError::fail(message));
        }
    }
}

/// Re-paired cases that [`repairing_order_with_ties`] must see.
const TIED_REPAIRS: usize = 6;

#[test]
fn repairing_order_with_ties() {
    // Seven pairs in 16 lanes, where about a quarter of the least salient sets do not route,
    // with weights from five values, so that many pruned sets tie on total saliency.
    let mut rng = SplitMix64(11);
    let mut repaired = 0;
    let mut draws = 0;
    while repaired < TIED_REPAIRS {
        draws += 1;
        assert!(draws <= 100, "100 draws gave only {repaired} re-paired cases");
        let mut outliers = shuffled_lanes(16, &mut rng)[..7].to_vec();
        outliers.sort_unstable();
        let values: Vec<f64> = (0..16).map(|_| [0.0, 0.125, -0.125, 0.25, -0.5][(rng.next_u64() % 5) as usize]).collect();
        match check_against_reference(16, &outliers, &values) {
            Ok(true) => repaired += 1,
            Ok(false) => {}
            Err(message) => panic!("{message}"),
        }
    }
}

/// Resolves an M-lane configuration with a 4 x M array and `max_pairs` = M / 2.
fn wide_config(m: u32, k_sigma: f64) -> Resolved {
    let mut config = common::config(4, m, 2, m, m / 2);
    config.quantizer.k_sigma = k_sigma;
    common::resolve(&config)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn planning_keeps_outliers_and_least_salient_slots(m_log in 3u32..5, seed in any::<u64>()) {
        let m = 1usize << m_log;
        let r = wide_config(m as u32, 1.0);
        let mut rng = SplitMix64(seed);
        let values: Vec<f64> = (0..m)
            .map(|_| if rng.next_u64() % 3 == 0 { rng.normal() * 4.0 } else { rng.normal() * 0.05 })
            .collect();
        let real = vec![true; m];
        let mean = values.iter().sum::<f64>() / m as f64;
        let std = (values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / m as f64).sqrt();
        let u = vec![1.0; m];
        let candidates = quantizer::outlier_candidates(&values, &real, mean, std, &r);
        let block = quantizer::plan_micro_block(values.clone(), real.clone(), (mean, std), &u, &r);

        prop_assert_eq!(block.candidates, candidates.len());
        prop_assert_eq!(block.outliers.len() + block.demoted, candidates.len());
        let mut kept = candidates[..block.outliers.len()].to_vec();
        kept.sort_unstable();
        prop_assert_eq!(&block.outliers, &kept, "kept outliers are not the largest candidates");
        prop_assert_eq!(block.pruned.len(), block.outliers.len());
        prop_assert!(block.pruned.iter().all(|p| !candidates.contains(p)), "pruned {:?} holds a candidate of {:?}", block.pruned, candidates);
        prop_assert_eq!(route_lanes(&block.route), (block.outliers.clone(), block.pruned.clone()));
        prop_assert!(recon::merges_pairs(m, &block.route.pairs, &block.route.commands));

        let mut least = quantizer::least_salient(&values, &u, &block.outliers, block.outliers.len());
        least.sort_unstable();
        if block.repaired {
            prop_assert!(recon::route(m, &block.outliers, &least).is_none(), "re-paired although the least salient set routes");
            let cost = |lanes: &[usize]| lanes.iter().map(|&i| values[i] * values[i]).sum::<f64>();
            prop_assert!(cost(&block.pruned) >= cost(&least));
        } else {
            prop_assert_eq!(&block.pruned, &least);
        }
        if block.demoted > 0 {
            let mut all = candidates[..block.outliers.len() + 1].to_vec();
            all.sort_unstable();
            prop_assert!(quantizer::route_least_salient(m, &values, &u, &all).is_none(), "demoted although a set routes");
        }
        let again = quantizer::plan_micro_block(values, real, (mean, std), &u, &r);
        prop_assert_eq!(block, again, "planning is not deterministic");
    }
}

/// Draws one input channel of 16 output channels with 7 outliers: ±(1.5 to 2) on random
/// lanes, and normal inliers with standard deviation 0.01. With k_sigma = 1 all 7 are
/// candidates, because the channel's standard deviation stays below 1.2.
fn seven_outlier_channel(rng: &mut SplitMix64) -> Vec<f32> {
    let lanes = shuffled_lanes(16, rng);
    let mut values: Vec<f32> = (0..16).map(|_| (rng.normal() * 0.01) as f32).collect();
    for (i, &lane) in lanes[..7].iter().enumerate() {
        let magnitude = 1.5 + (rng.next_u64() % 500) as f32 / 1000.0;
        values[lane] = if i % 2 == 0 { magnitude } else { -magnitude };
    }
    values
}

/// Builds a `[16, k_in]` matrix from columns: each column is one input channel.
fn matrix_from_columns(columns: &[Vec<f32>]) -> Matrix {
    let k_in = columns.len();
    let data = (0..16).flat_map(|n| columns.iter().map(move |column| column[n])).collect();
    Matrix::new(format!("seven-outlier channels [16, {k_in}]"), 16, k_in, data)
}

/// Input channels in the co-simulated layer that must have needed re-pairing.
const REPAIRED_CHANNELS: usize = 3;

#[test]
fn repaired_ublocks_cosimulate_m16() {
    let r = wide_config(16, 1.0);
    assert_eq!(r.max_pairs, 8);

    // Keep seeded channels whose least salient inliers do not route, until there are enough.
    let mut rng = SplitMix64(7);
    let mut columns = Vec::new();
    let mut draws = 0;
    while columns.len() < REPAIRED_CHANNELS {
        draws += 1;
        assert!(draws <= 200, "200 seeded channels gave only {} that needed re-pairing", columns.len());
        let column = seven_outlier_channel(&mut rng);
        let layer = quantizer::quantize(&matrix_from_columns(std::slice::from_ref(&column)), &r);
        if layer.stats.routing[7].repaired == 1 {
            columns.push(column);
        }
    }
    // Fill two row tiles with channels that route at once or hold no outliers.
    while columns.len() < 8 {
        let column: Vec<f32> = (0..16).map(|_| (rng.normal() * 0.05) as f32).collect();
        columns.push(column);
    }
    let weights = matrix_from_columns(&columns);

    let layer = quantizer::quantize(&weights, &r);
    assert_eq!(layer.stats.repaired, REPAIRED_CHANNELS, "re-paired micro-blocks");
    assert_eq!(layer.stats.demoted, 0, "demoted outliers");
    assert_eq!(layer.stats.routing[7].repaired, REPAIRED_CHANNELS, "routing counts {:?}", layer.stats.routing);
    for block in &layer.pair_blocks {
        assert!(recon::merges_pairs(16, &block.pairs, &block.commands), "pair entry {block:?} does not merge");
    }

    let options = RunOptions { vectors: 3, seed: 5, ..RunOptions::default() };
    let report = flow::run(&r, &weights, &options, &|_| {}).unwrap_or_else(|e| panic!("M = 16 run failed: {e}"));
    assert_eq!(report.repaired, REPAIRED_CHANNELS, "flow::run quantized differently");
    assert_eq!(report.mismatches, 0, "first mismatch {:?}, files in {:?}", report.first_mismatch, report.work_dir);
    assert_eq!(report.cycles, report.cycles_predicted, "RTL cycle count differs from the prediction");
    assert_eq!(report.outputs_compared, report.tiles * 3 * 16, "not every column output was compared");
}
