//! Tests of the all-MiniLM-L6-v2 forward pass and its WordPiece tokenizer on the real model
//! files that `make fetch-models` downloads.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Instant;

use microscopiq::models::minilm::{linear_layer_names, MiniLm, ModelError};
use microscopiq::models::wordpiece::WordPiece;
use microscopiq::weights::{self, Matrix};

/// Environment variable that turns missing model files from a failure into a skip.
const SKIP_MODELS_ENV: &str = "MICROSCOPIQ_SKIP_MODELS";

const EXAMPLE: &str = "This is an example sentence";

/// First 8 values of the sentence-transformers embedding of [`EXAMPLE`].
const EXAMPLE_EMBEDDING_PREFIX: [f32; 8] = [
    0.06765684,
    0.06349595,
    0.04871314,
    0.07930497,
    0.03744807,
    0.00265278,
    0.03937507,
    -0.00709842,
];

/// Ids of [`EXAMPLE`] in all-MiniLM-L6-v2's vocab.txt, where the id is the 0-based line
/// number: [CLS] this is an example sentence [SEP].
const EXAMPLE_IDS: [u32; 7] = [101, 2023, 2003, 2019, 2742, 6251, 102];

const UNK: u32 = 100;

/// Returns the model directory when its files exist.
///
/// When a file is missing, the calling test fails with a message that names the fix, unless
/// `MICROSCOPIQ_SKIP_MODELS=1` is set. Then this prints a skip line and returns `None`.
fn require_model_dir(test: &str) -> Option<PathBuf> {
    let dir = weights::models_dir().join("all-MiniLM-L6-v2");
    let missing: Vec<&str> = ["model.safetensors", "config.json", "tokenizer.json"]
        .into_iter()
        .filter(|file| !dir.join(file).is_file())
        .collect();
    if missing.is_empty() {
        return Some(dir);
    }
    if std::env::var(SKIP_MODELS_ENV).as_deref() == Ok("1") {
        eprintln!(
            "skipped {test}: {} lacks {} and {SKIP_MODELS_ENV}=1",
            dir.display(),
            missing.join(", ")
        );
        return None;
    }
    panic!(
        "{test} needs {} in {}, which are missing: run `make fetch-models`, or set \
         {SKIP_MODELS_ENV}=1 to skip the tests that need them",
        missing.join(", "),
        dir.display()
    );
}

/// Loads the model once per test binary, because loading reads about 90 MB.
fn model(test: &str) -> Option<&'static MiniLm> {
    static MODEL: OnceLock<MiniLm> = OnceLock::new();
    let dir = require_model_dir(test)?;
    Some(MODEL.get_or_init(|| {
        MiniLm::load(&dir).unwrap_or_else(|error| panic!("{test}: loading failed: {error}"))
    }))
}

fn tokenizer(test: &str) -> Option<WordPiece> {
    let dir = require_model_dir(test)?;
    Some(WordPiece::load(&dir).unwrap_or_else(|error| panic!("{test}: {error}")))
}

/// Returns whether `name` is the FFN output layer, the only one whose input has 1536 features.
fn is_ffn_output(name: &str) -> bool {
    name.ends_with(".output.dense.weight") && !name.contains("attention")
}

fn norm(values: &[f32]) -> f64 {
    values
        .iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt()
}

#[test]
fn example_sentence_matches_reference() {
    let Some(model) = model("example_sentence_matches_reference") else {
        return;
    };
    let tokenizer = tokenizer("example_sentence_matches_reference").unwrap();

    let embedding = model.embed(&tokenizer.encode(EXAMPLE), None);

    assert_eq!(embedding.len(), 384);
    for (index, (&actual, &expected)) in embedding.iter().zip(&EXAMPLE_EMBEDDING_PREFIX).enumerate()
    {
        assert!(
            (actual - expected).abs() < 1e-5,
            "embedding[{index}] is {actual}, expected {expected}"
        );
    }
    assert!(
        (norm(&embedding) - 1.0).abs() < 1e-6,
        "norm is {}",
        norm(&embedding)
    );
}

#[test]
fn padding_changes_embedding() {
    let Some(model) = model("padding_changes_embedding") else {
        return;
    };
    // tokenizer.json pads to 128 with [PAD] = 0. Without an attention mask the padding is
    // treated as real tokens, which must visibly move the embedding.
    let mut padded = EXAMPLE_IDS.to_vec();
    padded.resize(128, 0);

    let embedding = model.embed(&padded, None);

    let max_difference = embedding
        .iter()
        .zip(&EXAMPLE_EMBEDDING_PREFIX)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        max_difference > 1e-3,
        "padded embedding differs by only {max_difference}"
    );
}

#[test]
fn capture_sees_every_linear_input() {
    let Some(model) = model("capture_sees_every_linear_input") else {
        return;
    };
    let expected_names = linear_layer_names(6);
    let mut calls: Vec<(String, usize, usize)> = Vec::new();
    let mut first_query_input = Vec::new();

    let embedding = model.embed(
        &EXAMPLE_IDS,
        Some(&mut |name: &str, rows: &[f32], in_features: usize| {
            if calls.is_empty() {
                first_query_input = rows.to_vec();
            }
            calls.push((name.to_string(), rows.len(), in_features));
        }),
    );

    assert_eq!(calls.len(), 36);
    let layers = model.linear_layers();
    assert_eq!(layers.len(), 36);
    for (index, (name, length, in_features)) in calls.iter().enumerate() {
        assert_eq!(name, &expected_names[index], "call {index}");
        assert_eq!(name, &layers[index].0, "call {index}");
        assert_eq!(
            *in_features, layers[index].2,
            "width of call {index} ({name})"
        );
        assert_eq!(
            *length,
            EXAMPLE_IDS.len() * in_features,
            "rows of call {index} ({name})"
        );
        let expected_width = if is_ffn_output(name) { 1536 } else { 384 };
        assert_eq!(
            *in_features, expected_width,
            "width of call {index} ({name})"
        );
    }
    // The first query input is the embedding LayerNorm output. Its rows have a mean near 0
    // (the mean of the LayerNorm shift), unlike raw embeddings.
    for row in first_query_input.chunks_exact(384) {
        let mean = row.iter().map(|&x| f64::from(x)).sum::<f64>() / 384.0;
        assert!(mean.abs() < 0.1, "row mean {mean}");
    }
    let without_capture = model.embed(&EXAMPLE_IDS, None);
    assert_eq!(embedding, without_capture);
}

#[test]
fn linear_layers_have_model_shapes() {
    let Some(model) = model("linear_layers_have_model_shapes") else {
        return;
    };

    let layers = model.linear_layers();

    let names: Vec<&str> = layers.iter().map(|(name, _, _)| name.as_str()).collect();
    assert_eq!(names, linear_layer_names(6));
    for (name, out, inp) in &layers {
        let expected = if name.contains("intermediate") {
            (1536, 384)
        } else if is_ffn_output(name) {
            (384, 1536)
        } else {
            (384, 384)
        };
        assert_eq!((*out, *inp), expected, "{name}");
        let weight = model.linear_weight(name).unwrap();
        assert_eq!((weight.rows, weight.cols), (*out, *inp), "{name}");
        assert_eq!(&weight.name, name);
    }
    assert!(model
        .linear_weight("embeddings.word_embeddings.weight")
        .is_none());
    // The 7.9148 outlier at [99, 856] that the quantizer tests use.
    let output = model
        .linear_weight("encoder.layer.0.output.dense.weight")
        .unwrap();
    assert!((output.get(99, 856) - 7.9148).abs() < 1e-4);
}

#[test]
fn set_linear_weight_changes_output() {
    let Some(model) = model("set_linear_weight_changes_output") else {
        return;
    };
    let name = "encoder.layer.3.intermediate.dense.weight";
    let mut changed = model.clone();
    let original = model.linear_weight(name).unwrap();
    let mut scaled = original.clone();
    for value in &mut scaled.data {
        *value *= 0.5;
    }
    scaled.name = "a dequantized copy".to_string();

    changed.set_linear_weight(name, &scaled).unwrap();

    assert_eq!(changed.linear_weight(name).unwrap().data, scaled.data);
    assert_eq!(changed.linear_weight(name).unwrap().name, name);
    let before = model.embed(&EXAMPLE_IDS, None);
    let after = changed.embed(&EXAMPLE_IDS, None);
    assert_ne!(before, after);

    changed.set_linear_weight(name, &original).unwrap();
    assert_eq!(changed.embed(&EXAMPLE_IDS, None), before);
}

#[test]
fn set_linear_weight_rejects_bad_input() {
    let Some(model) = model("set_linear_weight_rejects_bad_input") else {
        return;
    };
    let mut model = model.clone();
    let name = "encoder.layer.0.attention.self.key.weight";
    let wrong_shape = Matrix::new("w", 384, 1536, vec![0.0; 384 * 1536]);
    let mut non_finite = model.linear_weight(name).unwrap();
    non_finite.data[5 * 384 + 7] = f32::NAN;

    let unknown = model
        .set_linear_weight("encoder.layer.9.attention.self.key.weight", &wrong_shape)
        .unwrap_err();
    let shape = model.set_linear_weight(name, &wrong_shape).unwrap_err();
    let nan = model.set_linear_weight(name, &non_finite).unwrap_err();

    assert!(
        matches!(unknown, ModelError::UnknownLayer { .. }),
        "{unknown}"
    );
    assert!(matches!(shape, ModelError::WeightShape { .. }), "{shape}");
    assert!(shape.to_string().contains("384 x 1536"), "{shape}");
    assert!(nan.to_string().contains("[5, 7]"), "{nan}");
}

#[test]
fn tokenizer_example_ids() {
    let Some(tokenizer) = tokenizer("tokenizer_example_ids") else {
        return;
    };

    let ids = tokenizer.encode(EXAMPLE);

    assert_eq!(ids, EXAMPLE_IDS);
    let tokens: Vec<String> = tokenizer
        .tokens(&ids)
        .into_iter()
        .map(Option::unwrap)
        .collect();
    assert_eq!(
        tokens,
        ["[CLS]", "this", "is", "an", "example", "sentence", "[SEP]"]
    );
}

#[test]
fn tokenizer_matches_vocab_txt() {
    let Some(dir) = require_model_dir("tokenizer_matches_vocab_txt") else {
        return;
    };
    let tokenizer = tokenizer("tokenizer_matches_vocab_txt").unwrap();
    let vocab = std::fs::read_to_string(dir.join("vocab.txt")).unwrap();

    let lines: Vec<&str> = vocab.lines().collect();

    assert_eq!(lines.len(), tokenizer.vocab_size());
    for (id, token) in lines.iter().enumerate() {
        assert_eq!(
            tokenizer.token_id(token),
            Some(id as u32),
            "vocab.txt line {id}: {token}"
        );
    }
}

#[test]
fn tokenizer_splits_into_pieces() {
    let Some(tokenizer) = tokenizer("tokenizer_splits_into_pieces") else {
        return;
    };

    let ids = tokenizer.encode("Tokenization unaffable");

    let tokens: Vec<String> = tokenizer
        .tokens(&ids)
        .into_iter()
        .map(Option::unwrap)
        .collect();
    assert_eq!(
        tokens,
        [
            "[CLS]",
            "token",
            "##ization",
            "una",
            "##ffa",
            "##ble",
            "[SEP]"
        ]
    );
    assert_eq!(ids, [101, 19204, 3989, 14477, 20961, 3468, 102]);
}

#[test]
fn tokenizer_punctuation_accents_and_unknowns() {
    let Some(tokenizer) = tokenizer("tokenizer_punctuation_accents_and_unknowns") else {
        return;
    };
    // Expected ids from the Hugging Face `tokenizers` library with this tokenizer.json and
    // padding disabled. 你 and 好 are CJK ideographs missing from the vocabulary, and the emoji
    // is neither in the vocabulary nor splittable, so each becomes [UNK].
    let text = "Héllo, wörld… 你好 🙂 naïve [MASK] x[SEP]y";

    let ids = tokenizer.encode(text);

    let expected = [
        101, 7592, 1010, 2088, 1529, UNK, UNK, UNK, 15743, 103, 1060, 102, 1061, 102,
    ];
    assert_eq!(ids, expected);
}

#[test]
fn tokenizer_does_not_pad() {
    let Some(tokenizer) = tokenizer("tokenizer_does_not_pad") else {
        return;
    };

    for (text, length) in [
        ("", 2),
        ("hello", 3),
        (EXAMPLE, 7),
        ("a b c d e f g h i j", 12),
    ] {
        let ids = tokenizer.encode(text);

        assert_eq!(ids.len(), length, "{text:?}");
        assert!(!ids.contains(&0), "{text:?} contains [PAD]");
    }
}

#[test]
fn tokenizer_truncates_at_512() {
    let Some(tokenizer) = tokenizer("tokenizer_truncates_at_512") else {
        return;
    };

    let ids = tokenizer.encode(&"word ".repeat(600));

    assert_eq!(ids.len(), 512);
    assert_eq!(ids[511], 102);
}

/// Prints the time of one embedding and of 64 embeddings. Run with
/// `cargo test --release --test minilm -- --ignored --nocapture`.
#[test]
#[ignore = "timing only; run in release mode"]
fn embedding_timing() {
    let Some(model) = model("embedding_timing") else {
        return;
    };
    let tokenizer = tokenizer("embedding_timing").unwrap();
    let sentences: Vec<String> = (0..64)
        .map(|i| format!("Sentence number {i} describes a quantized accelerator in a few words."))
        .collect();
    let encoded: Vec<Vec<u32>> = sentences.iter().map(|s| tokenizer.encode(s)).collect();
    let total_tokens: usize = encoded.iter().map(Vec::len).sum();

    // The first call also builds the erf table, so it is timed separately.
    let start = Instant::now();
    let single = model.embed(&tokenizer.encode(EXAMPLE), None);
    let first = start.elapsed();
    let start = Instant::now();
    model.embed(&tokenizer.encode(EXAMPLE), None);
    let warm = start.elapsed();
    let start = Instant::now();
    for ids in &encoded {
        model.embed(ids, None);
    }
    let batch = start.elapsed();

    assert_eq!(single.len(), 384);
    println!(
        "one sentence ({} tokens): {:.1} ms, first call {:.1} ms; 64 sentences \
         ({total_tokens} tokens): {:.1} ms",
        EXAMPLE_IDS.len(),
        warm.as_secs_f64() * 1e3,
        first.as_secs_f64() * 1e3,
        batch.as_secs_f64() * 1e3
    );
}
