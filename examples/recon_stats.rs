//! Measures how often random outlier/pruned sets route through ReCoN in one pass, and how
//! often re-pairing with other pruned lanes rescues a set that does not.
//!
//! For each micro-block size M and pair count n it draws n distinct outlier lanes, gives
//! every other lane a random normal weight, and measures two things:
//!
//! - whether the set of the n least salient inliers routes at once (`recon::route`),
//! - whether `quantizer::route_least_salient` finds a routable pruned set within its bound,
//!   and how many sets it tries.
//!
//! Run with `cargo run --release --example recon_stats -- [TRIALS] [SEED]`
//! (defaults: 2000 trials, seed 1).

use std::time::Instant;

use microscopiq::flow::SplitMix64;
use microscopiq::quantizer;
use microscopiq::recon;

/// Largest pair count measured, M / 2 for M = 16. A router search stops after
/// `recon::MAX_ROUTE_PLACEMENTS` path placements, which may come before it has tried every
/// pairing of many pairs, so a failure there can come from that bound and not from the network.
const MAX_PAIRS_MEASURED: usize = 8;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parse = |index: usize, default: u64, name: &str| -> u64 {
        args.get(index).map_or(default, |text| {
            text.parse().unwrap_or_else(|_| {
                eprintln!("invalid {name} `{text}`: expected a non-negative integer");
                std::process::exit(2)
            })
        })
    };
    let trials = parse(0, 2000, "TRIALS") as usize;
    let seed = parse(1, 1, "SEED");
    println!("{trials} random sets per row, seed {seed}");
    println!();
    println!("|  M | pairs | routed at once | routed after re-pairing | mean sets tried when re-paired | seconds |");
    println!("|---:|------:|---------------:|------------------------:|-------------------------------:|--------:|");
    for m in [8usize, 16, 32] {
        for n in 1..=(m / 2).min(MAX_PAIRS_MEASURED) {
            let started = Instant::now();
            let mut rng = SplitMix64(seed ^ ((m as u64) << 32) ^ n as u64);
            let mut at_once = 0;
            let mut repaired = 0;
            let mut sets_when_repaired = 0;
            for _ in 0..trials {
                let mut lanes: Vec<usize> = (0..m).collect();
                for i in (1..m).rev() {
                    lanes.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
                }
                let mut outliers = lanes[..n].to_vec();
                outliers.sort_unstable();
                let values: Vec<f64> = (0..m).map(|_| rng.normal()).collect();
                let u = vec![1.0; m];
                let mut pruned = quantizer::least_salient(&values, &u, &outliers, n);
                pruned.sort_unstable();
                if recon::route(m, &outliers, &pruned).is_some() {
                    at_once += 1;
                    continue;
                }
                if let Some(choice) = quantizer::route_least_salient(m, &values, &u, &outliers) {
                    repaired += 1;
                    sets_when_repaired += choice.sets_tried;
                }
            }
            let percent = |count: usize| 100.0 * count as f64 / trials as f64;
            let mean_sets = if repaired > 0 { format!("{:.1}", sets_when_repaired as f64 / repaired as f64) } else { "-".into() };
            println!(
                "| {m:>2} | {n:>5} | {:>13.1}% | {:>22.1}% | {mean_sets:>30} | {:>7.1} |",
                percent(at_once),
                percent(at_once + repaired),
                started.elapsed().as_secs_f64()
            );
        }
    }
}
