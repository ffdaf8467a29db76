//! BERT's WordPiece tokenizer, configured from a Hugging Face `tokenizer.json`.
//!
//! Encoding follows the steps of the Hugging Face `tokenizers` pipeline for BERT models:
//!
//! 1. Added tokens such as `[MASK]` are matched literally in the raw text and keep their ids.
//! 2. The `BertNormalizer` removes control characters, maps whitespace to spaces, puts spaces
//!    around CJK ideographs, strips accents (NFD, then drop nonspacing marks) and lower-cases.
//! 3. The `BertPreTokenizer` splits on whitespace and makes every punctuation character its
//!    own word.
//! 4. WordPiece splits each word greedily into the longest vocabulary entries, marking each
//!    piece after the first with `##`. A word that cannot be split, or that is longer than
//!    `max_input_chars_per_word`, becomes `[UNK]`.
//! 5. The ids are wrapped in `[CLS]` ... `[SEP]` and truncated to [`MAX_TOKENS`].
//!
//! The padding and truncation settings in `tokenizer.json` are ignored, so the output contains
//! only real tokens and never needs an attention mask.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;
use unicode_general_category::{get_general_category, GeneralCategory};
use unicode_normalization::UnicodeNormalization;

use crate::models::minilm::ModelError;

/// Maximum number of ids that [`WordPiece::encode`] returns, `[CLS]` and `[SEP]` included.
///
/// This is `max_position_embeddings` in all-MiniLM-L6-v2's `config.json`. Longer texts are cut
/// at the end.
pub const MAX_TOKENS: usize = 512;

/// Text normalisation steps of the `BertNormalizer`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NormalizerOptions {
    /// Removes control characters and maps every whitespace character to a space.
    pub clean_text: bool,
    /// Puts a space before and after every CJK ideograph, so each one becomes a word.
    pub handle_chinese_chars: bool,
    /// Decomposes to NFD and removes nonspacing marks (general category Mn).
    pub strip_accents: bool,
    /// Lower-cases the text.
    pub lowercase: bool,
}

impl NormalizerOptions {
    /// Options of the uncased BERT models, such as all-MiniLM-L6-v2.
    pub const UNCASED: NormalizerOptions = NormalizerOptions {
        clean_text: true,
        handle_chinese_chars: true,
        strip_accents: true,
        lowercase: true,
    };
}

/// A WordPiece tokenizer with its vocabulary and normaliser options.
#[derive(Clone, Debug)]
pub struct WordPiece {
    vocab: HashMap<String, u32>,
    normalizer: NormalizerOptions,
    /// Tokens matched literally in the raw text before normalisation, longest first.
    added_tokens: Vec<(String, u32)>,
    continuing_subword_prefix: String,
    max_input_chars_per_word: usize,
    unk_id: u32,
    cls_id: u32,
    sep_id: u32,
}

impl WordPiece {
    /// Loads `tokenizer.json` from `model_dir`.
    ///
    /// The file must describe a WordPiece model with a `BertNormalizer` (or none) and a
    /// `BertPreTokenizer`, and its vocabulary must contain `[CLS]`, `[SEP]` and the unknown
    /// token. Returns an error that names the file and the field otherwise.
    pub fn load(model_dir: &Path) -> Result<WordPiece, ModelError> {
        let path = model_dir.join("tokenizer.json");
        let text = std::fs::read_to_string(&path).map_err(|source| ModelError::Read {
            path: path.clone(),
            source,
        })?;
        let json: Value = serde_json::from_str(&text).map_err(|error| ModelError::InvalidFile {
            path: path.clone(),
            reason: format!("it is not valid JSON: {error}"),
        })?;
        TokenizerJson { path, json }.parse()
    }

    /// Creates a tokenizer from a vocabulary in id order, as in BERT's `vocab.txt`.
    ///
    /// The unknown token is `[UNK]`, continuation pieces start with `##`, words longer than
    /// 100 characters become `[UNK]`, and no added tokens are matched in the text.
    ///
    /// # Panics
    ///
    /// Panics if the vocabulary lacks `[UNK]`, `[CLS]` or `[SEP]`, or has more than `u32::MAX`
    /// entries.
    pub fn from_vocab(tokens: &[&str], normalizer: NormalizerOptions) -> WordPiece {
        let vocab: HashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(id, token)| {
                let id = u32::try_from(id).expect("vocabulary has more than u32::MAX entries");
                (token.to_string(), id)
            })
            .collect();
        let id_of = |token: &str| -> u32 {
            *vocab
                .get(token)
                .unwrap_or_else(|| panic!("vocabulary lacks the special token {token}"))
        };
        WordPiece {
            unk_id: id_of("[UNK]"),
            cls_id: id_of("[CLS]"),
            sep_id: id_of("[SEP]"),
            vocab,
            normalizer,
            added_tokens: Vec::new(),
            continuing_subword_prefix: "##".to_string(),
            max_input_chars_per_word: 100,
        }
    }

    /// Returns the id of `token`, or `None` if it is not in the vocabulary.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.vocab.get(token).copied()
    }

    /// Number of entries in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    /// Returns the normaliser options read from `tokenizer.json`.
    pub fn normalizer(&self) -> NormalizerOptions {
        self.normalizer
    }

    /// Encodes `text` as `[CLS]`, its WordPiece ids and `[SEP]`, with no padding.
    ///
    /// The result has at most [`MAX_TOKENS`] ids. A longer text keeps its first
    /// `MAX_TOKENS - 2` pieces and still ends with `[SEP]`.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = vec![self.cls_id];
        for segment in self.split_added_tokens(text) {
            match segment {
                Segment::Added(id) => ids.push(id),
                Segment::Text(text) => {
                    let normalized = normalize(text, self.normalizer);
                    for word in pre_tokenize(&normalized) {
                        self.push_word_pieces(word, &mut ids);
                    }
                }
            }
        }
        ids.truncate(MAX_TOKENS - 1);
        ids.push(self.sep_id);
        ids
    }

    /// Converts ids back to their vocabulary entries, with `None` for an unknown id.
    pub fn tokens(&self, ids: &[u32]) -> Vec<Option<String>> {
        let mut by_id: HashMap<u32, &str> = HashMap::with_capacity(ids.len());
        for (token, id) in &self.vocab {
            if ids.contains(id) {
                by_id.insert(*id, token);
            }
        }
        ids.iter()
            .map(|id| by_id.get(id).map(|token| token.to_string()))
            .collect()
    }

    /// Splits raw text at the leftmost, then longest, occurrence of each added token.
    fn split_added_tokens<'a>(&self, text: &'a str) -> Vec<Segment<'a>> {
        let mut segments = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            // `added_tokens` is sorted longest first, so at equal starts the longest wins.
            let next_match = self
                .added_tokens
                .iter()
                .filter_map(|(content, id)| {
                    rest.find(content.as_str()).map(|at| (at, content, *id))
                })
                .min_by_key(|(at, _, _)| *at);
            let Some((at, content, id)) = next_match else {
                segments.push(Segment::Text(rest));
                break;
            };
            if at > 0 {
                segments.push(Segment::Text(&rest[..at]));
            }
            segments.push(Segment::Added(id));
            rest = &rest[at + content.len()..];
        }
        segments
    }

    /// Appends the WordPiece ids of one pre-tokenized word, or `[UNK]` if it cannot be split.
    fn push_word_pieces(&self, word: &str, ids: &mut Vec<u32>) {
        if word.chars().count() > self.max_input_chars_per_word {
            ids.push(self.unk_id);
            return;
        }

        let first_new = ids.len();
        let mut start = 0;
        let mut candidate =
            String::with_capacity(word.len() + self.continuing_subword_prefix.len());
        while start < word.len() {
            // Try the longest remaining substring first and shorten it one character at a time.
            let mut end = word.len();
            let mut piece_id = None;
            while end > start {
                candidate.clear();
                if start > 0 {
                    candidate.push_str(&self.continuing_subword_prefix);
                }
                candidate.push_str(&word[start..end]);
                if let Some(&id) = self.vocab.get(&candidate) {
                    piece_id = Some(id);
                    break;
                }
                end = previous_char_boundary(word, end);
            }

            let Some(id) = piece_id else {
                ids.truncate(first_new);
                ids.push(self.unk_id);
                return;
            };
            ids.push(id);
            start = end;
        }
    }
}

/// A piece of raw text, or an added token found in it.
enum Segment<'a> {
    Text(&'a str),
    Added(u32),
}

/// Returns the byte index of the character boundary before `index` in `word`.
fn previous_char_boundary(word: &str, index: usize) -> usize {
    word[..index]
        .char_indices()
        .next_back()
        .map_or(0, |(at, _)| at)
}

/// The parsed contents of one `tokenizer.json`, with its path for error messages.
struct TokenizerJson {
    path: PathBuf,
    json: Value,
}

impl TokenizerJson {
    fn parse(&self) -> Result<WordPiece, ModelError> {
        let model = &self.json["model"];
        let model_type = model["type"].as_str().unwrap_or("(missing)");
        if model_type != "WordPiece" {
            return Err(self.invalid(format!(
                "model.type is {model_type}, but only WordPiece models are supported"
            )));
        }
        self.check_pre_tokenizer()?;
        let normalizer = self.normalizer_options()?;

        let vocab = self.vocab()?;
        let unk_token = self.string(&model["unk_token"], "model.unk_token")?;
        let id_of = |token: &str, field: &str| -> Result<u32, ModelError> {
            vocab.get(token).copied().ok_or_else(|| {
                self.invalid(format!("model.vocab lacks {token}, which {field} names"))
            })
        };
        let unk_id = id_of(&unk_token, "model.unk_token")?;
        let cls_id = id_of("[CLS]", "the BERT template")?;
        let sep_id = id_of("[SEP]", "the BERT template")?;

        let continuing_subword_prefix = self.string(
            &model["continuing_subword_prefix"],
            "model.continuing_subword_prefix",
        )?;
        let max_input_chars_per_word = model["max_input_chars_per_word"]
            .as_u64()
            .and_then(|max| usize::try_from(max).ok())
            .ok_or_else(|| {
                self.invalid("model.max_input_chars_per_word is missing or not a count".into())
            })?;

        Ok(WordPiece {
            added_tokens: self.added_tokens()?,
            vocab,
            normalizer,
            continuing_subword_prefix,
            max_input_chars_per_word,
            unk_id,
            cls_id,
            sep_id,
        })
    }

    fn check_pre_tokenizer(&self) -> Result<(), ModelError> {
        let pre_tokenizer = &self.json["pre_tokenizer"];
        match pre_tokenizer["type"].as_str() {
            Some("BertPreTokenizer") => Ok(()),
            other => Err(self.invalid(format!(
                "pre_tokenizer.type is {}, but only BertPreTokenizer is supported",
                other.unwrap_or("(missing)")
            ))),
        }
    }

    /// Reads the `BertNormalizer` options, or all-false options if there is no normaliser.
    fn normalizer_options(&self) -> Result<NormalizerOptions, ModelError> {
        let normalizer = &self.json["normalizer"];
        if normalizer.is_null() {
            return Ok(NormalizerOptions {
                clean_text: false,
                handle_chinese_chars: false,
                strip_accents: false,
                lowercase: false,
            });
        }
        let normalizer_type = normalizer["type"].as_str().unwrap_or("(missing)");
        if normalizer_type != "BertNormalizer" {
            return Err(self.invalid(format!(
                "normalizer.type is {normalizer_type}, but only BertNormalizer is supported"
            )));
        }

        let flag = |field: &str, default: bool| -> Result<bool, ModelError> {
            match &normalizer[field] {
                Value::Null => Ok(default),
                Value::Bool(value) => Ok(*value),
                other => Err(self.invalid(format!(
                    "normalizer.{field} is {other}, but it must be true, false or null"
                ))),
            }
        };
        let lowercase = flag("lowercase", true)?;
        Ok(NormalizerOptions {
            clean_text: flag("clean_text", true)?,
            handle_chinese_chars: flag("handle_chinese_chars", true)?,
            // A null `strip_accents` follows `lowercase`, as in the Hugging Face
            // `BertNormalizer`, so the uncased models strip accents.
            strip_accents: flag("strip_accents", lowercase)?,
            lowercase,
        })
    }

    fn vocab(&self) -> Result<HashMap<String, u32>, ModelError> {
        let entries = self.json["model"]["vocab"]
            .as_object()
            .ok_or_else(|| self.invalid("model.vocab is missing or not an object".into()))?;
        let mut vocab = HashMap::with_capacity(entries.len());
        for (token, id) in entries {
            let id = self.id(id, &format!("model.vocab[{token:?}]"))?;
            vocab.insert(token.clone(), id);
        }
        Ok(vocab)
    }

    /// Reads `added_tokens`, longest first so that overlapping matches prefer the longest.
    fn added_tokens(&self) -> Result<Vec<(String, u32)>, ModelError> {
        let Some(entries) = self.json["added_tokens"].as_array() else {
            return Ok(Vec::new());
        };
        let mut added = Vec::with_capacity(entries.len());
        for (index, entry) in entries.iter().enumerate() {
            let field = format!("added_tokens[{index}]");
            let content = self.string(&entry["content"], &format!("{field}.content"))?;
            let id = self.id(&entry["id"], &format!("{field}.id"))?;
            if entry["normalized"].as_bool() == Some(true) {
                // NOTE: Hugging Face matches such tokens in the normalized text. This tokenizer
                // matches every added token in the raw text, which differs only if the token
                // changes under normalization.
                eprintln!(
                    "info: {}: added token {content:?} is marked as normalized but is matched \
                     in the raw text",
                    self.path.display()
                );
            }
            if !content.is_empty() {
                added.push((content, id));
            }
        }
        added.sort_by_key(|(content, _)| std::cmp::Reverse(content.len()));
        Ok(added)
    }

    fn string(&self, value: &Value, field: &str) -> Result<String, ModelError> {
        value
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| self.invalid(format!("{field} is missing or not a string")))
    }

    fn id(&self, value: &Value, field: &str) -> Result<u32, ModelError> {
        value
            .as_u64()
            .and_then(|id| u32::try_from(id).ok())
            .ok_or_else(|| self.invalid(format!("{field} is {value}, which is not a valid id")))
    }

    fn invalid(&self, reason: String) -> ModelError {
        ModelError::InvalidFile {
            path: self.path.clone(),
            reason,
        }
    }
}

/// Applies the `BertNormalizer` steps that `options` enables, in the Hugging Face order.
pub fn normalize(text: &str, options: NormalizerOptions) -> String {
    let mut normalized = String::with_capacity(text.len());
    for c in text.chars() {
        if options.clean_text {
            if c == '\0' || c == '\u{fffd}' || is_control(c) {
                continue;
            }
            if is_whitespace(c) {
                normalized.push(' ');
                continue;
            }
        }
        if options.handle_chinese_chars && is_cjk_ideograph(c) {
            normalized.push(' ');
            normalized.push(c);
            normalized.push(' ');
        } else {
            normalized.push(c);
        }
    }

    if options.strip_accents {
        normalized = normalized
            .nfd()
            .filter(|&c| get_general_category(c) != GeneralCategory::NonspacingMark)
            .collect();
    }
    if options.lowercase {
        // Lower-case character by character, as Hugging Face `tokenizers` does. Unlike
        // `str::to_lowercase`, this maps a word-final capital sigma to σ, not ς.
        normalized = normalized.chars().flat_map(char::to_lowercase).collect();
    }
    normalized
}

/// Splits normalised text into words at whitespace and around each punctuation character.
pub fn pre_tokenize(text: &str) -> Vec<&str> {
    let mut words = Vec::new();
    let mut word_start = None;
    for (at, c) in text.char_indices() {
        let is_space = c.is_whitespace();
        let is_punct = is_punctuation(c);
        if is_space || is_punct {
            if let Some(start) = word_start.take() {
                words.push(&text[start..at]);
            }
            if is_punct {
                words.push(&text[at..at + c.len_utf8()]);
            }
        } else if word_start.is_none() {
            word_start = Some(at);
        }
    }
    if let Some(start) = word_start {
        words.push(&text[start..]);
    }
    words
}

/// Returns whether BERT treats `c` as whitespace: tab, line feed, carriage return, or a
/// character with the Unicode `White_Space` property.
fn is_whitespace(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r') || c.is_whitespace()
}

/// Returns whether BERT removes `c` as a control character: any character of a general
/// category C* (control, format, surrogate, private use, unassigned) except tab, line feed
/// and carriage return.
fn is_control(c: char) -> bool {
    if matches!(c, '\t' | '\n' | '\r') {
        return false;
    }
    matches!(
        get_general_category(c),
        GeneralCategory::Control
            | GeneralCategory::Format
            | GeneralCategory::Surrogate
            | GeneralCategory::PrivateUse
            | GeneralCategory::Unassigned
    )
}

/// Returns whether BERT splits at `c` as punctuation: ASCII punctuation (which includes
/// symbols such as `$`, `+` and `^`) or a character of a general category P*.
fn is_punctuation(c: char) -> bool {
    c.is_ascii_punctuation()
        || matches!(
            get_general_category(c),
            GeneralCategory::ConnectorPunctuation
                | GeneralCategory::DashPunctuation
                | GeneralCategory::OpenPunctuation
                | GeneralCategory::ClosePunctuation
                | GeneralCategory::InitialPunctuation
                | GeneralCategory::FinalPunctuation
                | GeneralCategory::OtherPunctuation
        )
}

/// Returns whether `c` is in one of the CJK Unified Ideographs blocks that BERT treats as
/// single-character words.
///
/// These are the ranges of the original BERT tokenizer: the basic block, extensions A to E and
/// both compatibility ideograph blocks. Hangul, kana and later extensions are not included.
fn is_cjk_ideograph(c: char) -> bool {
    matches!(
        u32::from(c),
        0x4E00..=0x9FFF
            | 0x3400..=0x4DBF
            | 0x20000..=0x2A6DF
            | 0x2A700..=0x2B73F
            | 0x2B740..=0x2B81F
            | 0x2B820..=0x2CEAF
            | 0xF900..=0xFAFF
            | 0x2F800..=0x2FA1F
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small vocabulary in id order: `[PAD]` is 0, `[UNK]` 1, `[CLS]` 2, `[SEP]` 3.
    const VOCAB: &[&str] = &[
        "[PAD]", "[UNK]", "[CLS]", "[SEP]", "un", "##aff", "##able", "hello", ",", "!", "cafe",
        "world", "##s", "a", "中", "$",
    ];

    fn tokenizer() -> WordPiece {
        WordPiece::from_vocab(VOCAB, NormalizerOptions::UNCASED)
    }

    fn id(token: &str) -> u32 {
        VOCAB.iter().position(|t| *t == token).unwrap() as u32
    }

    #[test]
    fn encode_wraps_in_cls_sep() {
        let ids = tokenizer().encode("hello world");

        assert_eq!(
            ids,
            vec![id("[CLS]"), id("hello"), id("world"), id("[SEP]")]
        );
    }

    #[test]
    fn encode_empty_text() {
        assert_eq!(tokenizer().encode(""), vec![id("[CLS]"), id("[SEP]")]);
        assert_eq!(tokenizer().encode(" \t\n"), vec![id("[CLS]"), id("[SEP]")]);
    }

    #[test]
    fn word_split_into_continuation_pieces() {
        let ids = tokenizer().encode("unaffable worlds");

        let expected = ["[CLS]", "un", "##aff", "##able", "world", "##s", "[SEP]"];
        assert_eq!(ids, expected.map(id).to_vec());
    }

    #[test]
    fn unsplittable_word_is_one_unk() {
        // "un" and "##aff" match, but nothing matches the rest, so the whole word is [UNK].
        let ids = tokenizer().encode("unaffx hello");

        assert_eq!(ids, ["[CLS]", "[UNK]", "hello", "[SEP]"].map(id).to_vec());
    }

    #[test]
    fn punctuation_split_off() {
        let ids = tokenizer().encode("hello,world!$");

        let expected = ["[CLS]", "hello", ",", "world", "!", "$", "[SEP]"];
        assert_eq!(ids, expected.map(id).to_vec());
    }

    #[test]
    fn accents_stripped_and_lowercased() {
        assert_eq!(
            normalize("Café NAÏVE", NormalizerOptions::UNCASED),
            "cafe naive"
        );
        assert_eq!(
            tokenizer().encode("CAFÉ"),
            ["[CLS]", "cafe", "[SEP]"].map(id).to_vec()
        );
    }

    #[test]
    fn capital_sigma_lowercased_without_context() {
        assert_eq!(normalize("ΟΣ Σ", NormalizerOptions::UNCASED), "οσ σ");
    }

    #[test]
    fn spacing_marks_kept() {
        // U+093E DEVANAGARI VOWEL SIGN AA is a spacing mark (Mc), so accent stripping keeps it.
        assert_eq!(
            normalize("\u{093E}", NormalizerOptions::UNCASED),
            "\u{093E}"
        );
    }

    #[test]
    fn control_characters_removed() {
        let text = "a\u{0}b\u{200B}c\u{FFFD}d\u{7}e\u{E000}f\tg\r\nh";
        let other_spaces = "x\u{85}y\u{B}z\u{A0}w";

        assert_eq!(normalize(text, NormalizerOptions::UNCASED), "abcdef g  h");
        // U+0085 and U+000B are White_Space but also control characters, so they are removed.
        assert_eq!(normalize(other_spaces, NormalizerOptions::UNCASED), "xyz w");
    }

    #[test]
    fn cjk_ideographs_become_words() {
        assert_eq!(normalize("a中b", NormalizerOptions::UNCASED), "a 中 b");
        assert_eq!(pre_tokenize("a 中 b"), vec!["a", "中", "b"]);
        // Hiragana is not in the CJK ideograph ranges, so it stays inside its word.
        assert_eq!(normalize("aのb", NormalizerOptions::UNCASED), "aのb");
    }

    #[test]
    fn normalizer_steps_can_be_disabled() {
        let cased = NormalizerOptions {
            clean_text: false,
            handle_chinese_chars: false,
            strip_accents: false,
            lowercase: false,
        };

        assert_eq!(normalize("Café\u{7}中", cased), "Café\u{7}中");
    }

    #[test]
    fn unknown_character_is_unk() {
        let ids = tokenizer().encode("hello \u{1F642}");

        assert_eq!(ids, ["[CLS]", "hello", "[UNK]", "[SEP]"].map(id).to_vec());
    }

    #[test]
    fn overlong_word_is_unk() {
        let long_word = "a".repeat(101);

        let ids = tokenizer().encode(&long_word);

        assert_eq!(ids, ["[CLS]", "[UNK]", "[SEP]"].map(id).to_vec());
    }

    #[test]
    fn long_text_truncated_to_max_tokens() {
        let text = "hello ".repeat(MAX_TOKENS * 2);

        let ids = tokenizer().encode(&text);

        assert_eq!(ids.len(), MAX_TOKENS);
        assert_eq!(ids[0], id("[CLS]"));
        assert_eq!(ids[MAX_TOKENS - 2], id("hello"));
        assert_eq!(ids[MAX_TOKENS - 1], id("[SEP]"));
    }

    #[test]
    fn added_tokens_matched_in_raw_text() {
        let mut wordpiece = tokenizer();
        wordpiece.added_tokens = vec![("[SEP]".to_string(), id("[SEP]"))];

        let ids = wordpiece.encode("hello[SEP]WORLD");

        let expected = ["[CLS]", "hello", "[SEP]", "world", "[SEP]"];
        assert_eq!(ids, expected.map(id).to_vec());
    }

    #[test]
    fn pre_tokenize_splits_whitespace_and_punctuation() {
        assert_eq!(pre_tokenize("  a-b  c… "), vec!["a", "-", "b", "c", "…"]);
        assert!(pre_tokenize("   ").is_empty());
    }

    #[test]
    fn tokens_maps_ids_back() {
        let wordpiece = tokenizer();

        let tokens = wordpiece.tokens(&[id("hello"), 999]);

        assert_eq!(tokens, vec![Some("hello".to_string()), None]);
    }

    #[test]
    fn load_reports_missing_file() {
        let dir = tempfile::tempdir().unwrap();

        let message = WordPiece::load(dir.path()).unwrap_err().to_string();

        assert!(message.contains("tokenizer.json"), "{message}");
        assert!(message.contains("make fetch-models"), "{message}");
    }

    #[test]
    fn load_rejects_other_model_type() {
        let dir = tempfile::tempdir().unwrap();
        let json = r#"{"model": {"type": "BPE", "vocab": {}}, "pre_tokenizer": null}"#;
        std::fs::write(dir.path().join("tokenizer.json"), json).unwrap();

        let message = WordPiece::load(dir.path()).unwrap_err().to_string();

        assert!(message.contains("model.type is BPE"), "{message}");
    }

    #[test]
    fn load_reads_minimal_file() {
        let dir = tempfile::tempdir().unwrap();
        let json = r###"{
            "added_tokens": [{"id": 3, "content": "[SEP]", "normalized": false}],
            "normalizer": {"type": "BertNormalizer", "clean_text": true,
                           "handle_chinese_chars": true, "strip_accents": null,
                           "lowercase": true},
            "pre_tokenizer": {"type": "BertPreTokenizer"},
            "model": {"type": "WordPiece", "unk_token": "[UNK]",
                      "continuing_subword_prefix": "##", "max_input_chars_per_word": 3,
                      "vocab": {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "ab": 4,
                                "##c": 5, "abcd": 6}}
        }"###;
        std::fs::write(dir.path().join("tokenizer.json"), json).unwrap();

        let wordpiece = WordPiece::load(dir.path()).unwrap();

        assert_eq!(wordpiece.normalizer(), NormalizerOptions::UNCASED);
        assert_eq!(wordpiece.vocab_size(), 7);
        // "abcd" is in the vocabulary but longer than max_input_chars_per_word.
        assert_eq!(wordpiece.encode("ÁBc abcd[SEP]"), vec![2, 4, 5, 1, 3, 3]);
    }
}
