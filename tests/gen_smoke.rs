use microscopiq::config::Config;
use microscopiq::flow::{self, RunOptions, SplitMix64};
use microscopiq::weights::Matrix;

#[test]
fn smoke() {
    let mut c = Config::default_config();
    let spec = std::env::var("GEN").unwrap_or("4,8,2,4,2,2".into());
    let v: Vec<u32> = spec.split(',').map(|s| s.parse().unwrap()).collect();
    c.array.rows = v[0]; c.array.cols = v[1]; c.format.weight_bits = v[2]; c.format.ublock = v[3]; c.format.max_pairs = v[4];
    c.format.micro_exp_bits = v[5];
    if v.len() > 6 { c.array.recon_rows = Some(v[6]); }
    c.format.mab_rows = None; c.format.outlier_format = None;
    let r = c.resolve().unwrap();
    let mut rng = SplitMix64(7);
    let (n, k) = (20, 13);
    let data: Vec<f32> = (0..n * k).map(|_| { let x = rng.normal() as f32 * 0.05; if rng.next_u64() % 6 == 0 { x * 40.0 } else { x } }).collect();
    let m = Matrix::new("random", n, k, data);
    let rep = flow::run(&r, &m, &RunOptions { vectors: 5, seed: 1, work_dir: Some("/tmp/simrun".into()) }, &|s| eprintln!("{s}")).unwrap();
    eprintln!("{}", serde_json::to_string_pretty(&rep).unwrap());
    assert_eq!(rep.mismatches, 0);
    assert_eq!(rep.cycles, rep.cycles_predicted);
}
