//! Checks of the glassllm reference model, tokenizer and npz reader against the real files
//! that `make fetch-models` downloads.
//!
//! The expected losses and perplexities are fp32 reference values for these exact inputs: the
//! Hamlet slice is characters 20000..80000 of `hamlet_gut.txt`, and window `i` predicts
//! `tokens[128i + 1 .. 128i + 129]` from `tokens[128i .. 128i + 128]`.
//!
//! A missing file fails these tests unless `MICROSCOPIQ_SKIP_MODELS=1` is set. The full-slice
//! and Othello perplexities take several seconds, so they run only with `MICROSCOPIQ_SLOW=1`.

use std::path::PathBuf;
use std::sync::OnceLock;

use microscopiq::models::bpe::{self, BpeTokenizer, UNK_ID};
use microscopiq::models::glassllm::{GlassLlm, RopeLayout};
use microscopiq::models::npz::Npz;
use microscopiq::weights;

/// Environment variable that turns missing model files from a failure into a skip.
const SKIP_MODELS_ENV: &str = "MICROSCOPIQ_SKIP_MODELS";

/// Environment variable that enables the perplexity checks that take several seconds.
const SLOW_ENV: &str = "MICROSCOPIQ_SLOW";

/// Character range of `hamlet_gut.txt` used by the reference evaluation.
const HAMLET_CHARS: std::ops::Range<usize> = 20_000..80_000;

/// Number of tokens in the Hamlet slice, from the exporter's tokenizer.
const HAMLET_TOKENS: usize = 26_221;

fn glassllm_dir() -> PathBuf {
    weights::models_dir().join("glassllm")
}

fn shakespeare_path(play: &str) -> PathBuf {
    weights::models_dir()
        .join("shakespeare")
        .join(format!("{play}.txt"))
}

/// Returns true when every file exists. When one is missing, the calling test fails with a
/// message that names the fix, unless `MICROSCOPIQ_SKIP_MODELS=1` is set: then this prints a
/// skip line and returns false, and the test should return.
fn require_files(test: &str) -> bool {
    let files = [
        glassllm_dir().join("en.npz"),
        glassllm_dir().join("en.tokenizer.json"),
        shakespeare_path("hamlet_gut"),
        shakespeare_path("othello_gut"),
    ];
    let Some(missing) = files.iter().find(|path| !path.is_file()) else {
        return true;
    };
    if std::env::var(SKIP_MODELS_ENV).as_deref() == Ok("1") {
        eprintln!(
            "skipped {test}: {} is missing and {SKIP_MODELS_ENV}=1",
            missing.display()
        );
        return false;
    }
    panic!(
        "{test} needs {}, which is missing: run `make fetch-models` \
         (python3 scripts/fetch_models.py --all), or set {SKIP_MODELS_ENV}=1 to skip the \
         tests that need the model files",
        missing.display()
    );
}

fn model() -> &'static GlassLlm {
    static MODEL: OnceLock<GlassLlm> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path = glassllm_dir().join("en.npz");
        GlassLlm::load(&path).unwrap_or_else(|e| panic!("loading glassllm failed: {e}"))
    })
}

fn tokenizer() -> &'static BpeTokenizer {
    static TOKENIZER: OnceLock<BpeTokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        let path = glassllm_dir().join("en.tokenizer.json");
        BpeTokenizer::load(&path).unwrap_or_else(|e| panic!("loading the tokenizer failed: {e}"))
    })
}

fn encode_play(play: &str, chars: std::ops::Range<usize>) -> Vec<u32> {
    let text = bpe::read_text_slice(&shakespeare_path(play), chars)
        .unwrap_or_else(|e| panic!("reading {play} failed: {e}"));
    tokenizer()
        .encode(&text)
        .unwrap_or_else(|e| panic!("encoding {play} failed: {e}"))
}

fn hamlet_tokens() -> &'static [u32] {
    static TOKENS: OnceLock<Vec<u32>> = OnceLock::new();
    TOKENS.get_or_init(|| encode_play("hamlet_gut", HAMLET_CHARS))
}

#[test]
fn npz_config_entry_parses() {
    if !require_files("npz_config_entry_parses") {
        return;
    }
    let path = glassllm_dir().join("en.npz");
    let mut npz = Npz::open(&path).unwrap_or_else(|e| panic!("{e}"));
    let names = npz.names();
    assert_eq!(names.first().map(String::as_str), Some("__config__"));
    assert!(
        names.iter().any(|name| name == "blocks.3.ffn.W2"),
        "{names:?}"
    );
    assert_eq!(names.len(), 1 + 1 + 4 * 9 + 1, "{names:?}");

    let config = npz.read("__config__").unwrap_or_else(|e| panic!("{e}"));
    let json: serde_json::Value =
        serde_json::from_str(config.as_text().expect("0-d string")).expect("valid JSON");
    assert_eq!(json["vocab_size"], 1024);
    assert_eq!(json["n_kv_heads"], 2);

    let embedding = npz.read("E").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(embedding.shape, vec![1024, 128]);
    assert_eq!(embedding.dtype, microscopiq::models::npz::Dtype::F16);
}

#[test]
fn model_config_matches_file() {
    if !require_files("model_config_matches_file") {
        return;
    }
    let config = &model().config;
    assert_eq!(config.vocab, 1024);
    assert_eq!(config.d_model, 128);
    assert_eq!(config.n_layers, 4);
    assert_eq!(config.n_heads, 4);
    assert_eq!(config.n_kv_heads, 2);
    assert_eq!(config.max_len, 128);
    assert_eq!(config.rope_base, 10_000.0);
    assert_eq!(config.eps, 1e-6);
    assert_eq!(config.ffn, 341);
    assert_eq!(config.head_dim(), 32);
    assert_eq!(tokenizer().vocab_size(), config.vocab);
}

#[test]
fn tokenizer_counts_hamlet_slice() {
    if !require_files("tokenizer_counts_hamlet_slice") {
        return;
    }
    let tokens = hamlet_tokens();
    assert_eq!(tokens.len(), HAMLET_TOKENS);
    // First and last ids and the id sum, from an independent Python implementation of the
    // same tokenizer.
    assert_eq!(
        tokens[..10],
        [69, 75, 251, 119, 144, 64, 761, 264, 126, 884]
    );
    assert_eq!(tokens[tokens.len() - 5..], [129, 692, 175, 961, 94]);
    let id_sum: u64 = tokens.iter().map(|id| u64::from(*id)).sum();
    assert_eq!(id_sum % 1_000_003, 568_122);
}

#[test]
fn tokenizer_encodes_small_strings() {
    if !require_files("tokenizer_encodes_small_strings") {
        return;
    }
    // Expected ids from an independent Python implementation of the same tokenizer.
    let cases: [(&str, &[u32]); 9] = [
        ("the", &[181]),
        (" the", &[97]),
        (
            "  To be, or not to be ",
            &[91, 317, 70, 145, 11, 411, 248, 111, 145, 91],
        ),
        (
            "Hamlet\n\nHORATIO.",
            &[34, 230, 140, 75, 4, 4, 34, 41, 44, 27, 46, 35, 41, 13],
        ),
        ("caf\u{20ac} x", &[58, 56, 61, UNK_ID, 91, 79]),
        ("", &[]),
        ("\n", &[4]),
        ("   ", &[91, 91, 91]),
        (
            "Ophelia's  \n  grave",
            &[41, 71, 93, 726, 56, 222, 91, 91, 4, 91, 135, 942],
        ),
    ];
    for (text, expected) in cases {
        let ids = tokenizer().encode(text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ids, expected, "text {text:?}");
    }
    assert_eq!(tokenizer().piece(97), Some("\u{2581}the"));
}

#[test]
fn hamlet_cross_entropy_matches_reference() {
    if !require_files("hamlet_cross_entropy_matches_reference") {
        return;
    }
    let (nats, predictions) = model().cross_entropy(hamlet_tokens(), 0..20);
    assert_eq!(predictions, 2560);
    assert!(
        (nats - 4.9473).abs() < 1e-3,
        "mean cross-entropy {nats:.6} nats/token, expected 4.9473"
    );
    assert!(
        (nats.exp() - 140.8).abs() < 0.15,
        "perplexity {:.3}, expected 140.8",
        nats.exp()
    );
}

#[test]
fn half_split_rope_gives_known_wrong_loss() {
    if !require_files("half_split_rope_gives_known_wrong_loss") {
        return;
    }
    let mut model = model().clone();
    model.set_rope_layout(RopeLayout::HalfSplit);
    let (nats, _) = model.cross_entropy(hamlet_tokens(), 0..20);
    assert!(
        (nats - 5.3156).abs() < 1e-3,
        "half-split RoPE gives {nats:.6}, expected 5.3156"
    );
}

#[test]
fn capture_reports_all_linear_inputs() {
    if !require_files("capture_reports_all_linear_inputs") {
        return;
    }
    let model = model();
    let tokens = &hamlet_tokens()[..128];
    let mut captured: Vec<(String, usize, usize)> = Vec::new();
    let mut record = |name: &str, rows: &[f32], width: usize| {
        assert!(
            rows.iter().all(|v| v.is_finite()),
            "{name} input is not finite"
        );
        captured.push((name.to_string(), rows.len(), width));
    };
    model.forward(tokens, Some(&mut record));

    let suffixes = [
        "attn.W_Q", "attn.W_K", "attn.W_V", "attn.W_O", "ffn.W1", "ffn.W3", "ffn.W2",
    ];
    let widths = [128, 128, 128, 128, 128, 128, 341];
    assert_eq!(captured.len(), 4 * 7);
    for (index, (name, len, width)) in captured.iter().enumerate() {
        let (layer, slot) = (index / 7, index % 7);
        assert_eq!(name, &format!("blocks.{layer}.{}", suffixes[slot]));
        assert_eq!(*width, widths[slot], "{name}");
        assert_eq!(*len, 128 * widths[slot], "{name}");
    }

    let layers = model.linear_layers();
    let names: Vec<&String> = captured.iter().map(|(name, _, _)| name).collect();
    let layer_names: Vec<&String> = layers.iter().map(|(name, _, _)| name).collect();
    assert_eq!(names, layer_names);
    assert_eq!(layers[1], ("blocks.0.attn.W_K".to_string(), 64, 128));
    assert_eq!(layers[6], ("blocks.0.ffn.W2".to_string(), 128, 341));
}

#[test]
fn restoring_weight_keeps_loss() {
    if !require_files("restoring_weight_keeps_loss") {
        return;
    }
    let mut model = model().clone();
    let tokens = hamlet_tokens();
    let (before, _) = model.cross_entropy(tokens, 0..2);

    let weight = model.linear_weight("blocks.2.ffn.W1").expect("known layer");
    assert_eq!((weight.rows, weight.cols), (341, 128));
    let mut zeroed = weight.clone();
    zeroed.data.fill(0.0);
    model
        .set_linear_weight("blocks.2.ffn.W1", &zeroed)
        .unwrap_or_else(|e| panic!("{e}"));
    let (without, _) = model.cross_entropy(tokens, 0..2);
    assert_ne!(without, before);

    model
        .set_linear_weight("blocks.2.ffn.W1", &weight)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(model.cross_entropy(tokens, 0..2).0, before);
}

#[test]
fn slow_perplexities_match_reference() {
    if std::env::var(SLOW_ENV).as_deref() != Ok("1") {
        eprintln!("skipped slow_perplexities_match_reference: set {SLOW_ENV}=1 to run it");
        return;
    }
    if !require_files("slow_perplexities_match_reference") {
        return;
    }
    let model = model();
    let hamlet = hamlet_tokens();
    let windows = model.window_count(hamlet.len());
    assert_eq!(windows, 204);
    let (nats, _) = model.cross_entropy(hamlet, 0..windows);
    assert!(
        (nats.exp() - 137.70).abs() < 0.01,
        "Hamlet perplexity {:.3}",
        nats.exp()
    );

    let othello = encode_play("othello_gut", 20_000..usize::MAX);
    let (nats, predictions) = model.cross_entropy(&othello, 0..150);
    assert_eq!(predictions, 150 * 128);
    assert!(
        (nats.exp() - 130.73).abs() < 0.01,
        "Othello perplexity {:.3}",
        nats.exp()
    );
}
