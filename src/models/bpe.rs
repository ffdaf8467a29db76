//! Byte-pair-encoding tokenizer of the glassllm model, and reading of text slices by
//! character offset.
//!
//! The tokenizer file is JSON with `version` (1), `alphabet` (single characters) and
//! `merges` (ordered pairs of pieces). Ids are the four special tokens, then the alphabet in
//! file order, then one id per merge in merge order.
//!
//! Encoding NFC-normalises the text and replaces each space by `▁` (U+2581). It then splits
//! the text into chunks that merges never cross. A chunk is a newline, a run of `▁` followed
//! by characters that are neither `▁` nor a newline, or a run of `▁` alone. Each chunk starts as single
//! characters. The adjacent pair with the lowest merge rank is then merged at every
//! non-overlapping occurrence, left to right, until no adjacent pair has a merge.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};

use unicode_normalization::{is_nfc_quick, IsNormalized, UnicodeNormalization};

/// Id of the `<pad>` token.
pub const PAD_ID: u32 = 0;
/// Id of the `<unk>` token, which every character outside the alphabet maps to.
pub const UNK_ID: u32 = 1;
/// Id of the `<bos>` token. Encoding never emits it.
pub const BOS_ID: u32 = 2;
/// Id of the `<eos>` token. Encoding never emits it.
pub const EOS_ID: u32 = 3;

/// Pieces of the special tokens, in id order.
const SPECIAL_PIECES: [&str; 4] = ["<pad>", "<unk>", "<bos>", "<eos>"];

/// Character that stands for a space inside pieces.
const SPACE_MARK: char = '\u{2581}';

/// Tokenizer file version that this reader understands.
const SUPPORTED_VERSION: u32 = 1;

/// Layout of the tokenizer JSON file.
#[derive(serde::Deserialize)]
struct TokenizerFile {
    version: u32,
    alphabet: Vec<String>,
    merges: Vec<(String, String)>,
}

/// The glassllm BPE tokenizer.
#[derive(Clone, Debug)]
pub struct BpeTokenizer {
    /// Piece of each id: the special tokens, the alphabet, then the merges.
    pieces: Vec<String>,
    /// Id of each alphabet character.
    symbol_ids: HashMap<char, u32>,
    /// Id of the merged piece for each mergeable pair of ids. Merged ids grow with the merge
    /// rank, so the lowest id is the highest-priority merge.
    merges: HashMap<(u32, u32), u32>,
}

impl BpeTokenizer {
    /// Loads a tokenizer JSON file and checks that its vocabulary is consistent.
    ///
    /// Returns an error if the file is missing or unreadable, is not valid JSON of the
    /// expected layout, or has another version. The vocabulary is invalid, and also rejected,
    /// when an alphabet entry is not exactly one character, when a piece occurs twice, or when
    /// a merge uses a part that is not an earlier piece.
    pub fn load(path: &Path) -> Result<BpeTokenizer, TokenizerError> {
        let text = std::fs::read_to_string(path).map_err(|error| TokenizerError::Io {
            path: path.to_path_buf(),
            error,
        })?;
        let file: TokenizerFile =
            serde_json::from_str(&text).map_err(|error| TokenizerError::InvalidFile {
                path: path.to_path_buf(),
                reason: error.to_string(),
            })?;
        BpeTokenizer::from_parts(file).map_err(|reason| TokenizerError::InvalidFile {
            path: path.to_path_buf(),
            reason,
        })
    }

    /// Builds the id tables from a parsed file, or returns the reason the file is invalid.
    fn from_parts(file: TokenizerFile) -> Result<BpeTokenizer, String> {
        if file.version != SUPPORTED_VERSION {
            return Err(format!(
                "version {} is not supported, only version {SUPPORTED_VERSION}",
                file.version
            ));
        }

        let mut pieces: Vec<String> = SPECIAL_PIECES.iter().map(|p| p.to_string()).collect();
        let mut ids: HashMap<String, u32> = HashMap::new();
        let mut symbol_ids = HashMap::new();
        for (index, symbol) in file.alphabet.into_iter().enumerate() {
            let mut chars = symbol.chars();
            let character = match (chars.next(), chars.next()) {
                (Some(character), None) => character,
                _ => {
                    return Err(format!(
                        "alphabet entry {index} is {symbol:?}, but each entry must be exactly \
                         one character"
                    ))
                }
            };
            let id = pieces.len() as u32;
            if ids.insert(symbol.clone(), id).is_some() {
                return Err(format!(
                    "alphabet entry {index} ({symbol:?}) is a duplicate"
                ));
            }
            symbol_ids.insert(character, id);
            pieces.push(symbol);
        }

        let mut merges = HashMap::new();
        for (rank, (left, right)) in file.merges.into_iter().enumerate() {
            let part_id = |part: &str| {
                ids.get(part).copied().ok_or_else(|| {
                    format!(
                        "merge {rank} ({left:?}, {right:?}) uses {part:?}, which is neither an \
                         alphabet symbol nor the result of an earlier merge"
                    )
                })
            };
            let pair = (part_id(&left)?, part_id(&right)?);
            let merged = format!("{left}{right}");
            let id = pieces.len() as u32;
            // Ids are assigned per merge, so two merges with the same result would give one
            // piece two ids. Encoding by id would then disagree with encoding by string.
            if ids.insert(merged.clone(), id).is_some() {
                return Err(format!(
                    "merge {rank} ({left:?}, {right:?}) produces {merged:?}, which is already \
                     a piece"
                ));
            }
            merges.insert(pair, id);
            pieces.push(merged);
        }

        Ok(BpeTokenizer {
            pieces,
            symbol_ids,
            merges,
        })
    }

    /// Number of ids, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    /// Returns the piece of an id, with `▁` for spaces, or `None` for an id out of range.
    pub fn piece(&self, id: u32) -> Option<&str> {
        self.pieces.get(id as usize).map(String::as_str)
    }

    /// Encodes text into token ids, without `<bos>` or `<eos>`.
    ///
    /// Characters outside the alphabet become [`UNK_ID`], and they never merge. No input
    /// fails today. The `Result` leaves room for stricter input checks.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let normalized: String = if is_nfc_quick(text.chars()) == IsNormalized::Yes {
            text.to_string()
        } else {
            text.nfc().collect()
        };
        let marked: Vec<char> = normalized
            .chars()
            .map(|c| if c == ' ' { SPACE_MARK } else { c })
            .collect();

        let mut ids = Vec::with_capacity(marked.len() / 3);
        for chunk in split_chunks(&marked) {
            self.encode_chunk(chunk, &mut ids);
        }
        Ok(ids)
    }

    /// Applies the merges to one chunk and appends its ids to `out`.
    fn encode_chunk(&self, chunk: &[char], out: &mut Vec<u32>) {
        let mut symbols: Vec<u32> = chunk
            .iter()
            .map(|c| self.symbol_ids.get(c).copied().unwrap_or(UNK_ID))
            .collect();

        loop {
            let best = symbols
                .windows(2)
                .filter_map(|pair| {
                    let pair = (pair[0], pair[1]);
                    self.merges.get(&pair).map(|merged| (*merged, pair))
                })
                .min();
            let Some((merged, pair)) = best else { break };

            let mut next = Vec::with_capacity(symbols.len());
            let mut index = 0;
            while index < symbols.len() {
                if index + 1 < symbols.len() && (symbols[index], symbols[index + 1]) == pair {
                    next.push(merged);
                    index += 2;
                } else {
                    next.push(symbols[index]);
                    index += 1;
                }
            }
            symbols = next;
        }
        out.extend(symbols);
    }
}

/// Splits text (with spaces already replaced by `▁`) into the chunks that the regular
/// expression `\n|▁*[^▁\n]+|▁+` finds, scanning left to right.
fn split_chunks(chars: &[char]) -> Vec<&[char]> {
    let mut chunks = Vec::new();
    let mut start = 0;
    while start < chars.len() {
        if chars[start] == '\n' {
            chunks.push(&chars[start..start + 1]);
            start += 1;
            continue;
        }
        let mut end = start;
        while end < chars.len() && chars[end] == SPACE_MARK {
            end += 1;
        }
        // `▁*[^▁\n]+` matches only when the run of `▁` is followed by another character that
        // is not a newline. Otherwise `▁+` matches the run alone.
        if end < chars.len() && chars[end] != '\n' {
            while end < chars.len() && chars[end] != SPACE_MARK && chars[end] != '\n' {
                end += 1;
            }
        }
        chunks.push(&chars[start..end]);
        start = end;
    }
    chunks
}

/// Reads a UTF-8 text file and returns the characters (Unicode scalar values) at the
/// positions in `chars`.
///
/// Line endings `\r\n` and lone `\r` become `\n` first, as Python's text mode reads them, so
/// offsets agree with Python's `open(path, encoding="utf-8").read()[start:end]`. As in Python
/// slicing, an end past the text is clamped to the text length, so `start..usize::MAX`
/// reads to the end. A start past the text or after the end is an error.
pub fn read_text_slice(path: &Path, chars: Range<usize>) -> Result<String, TokenizerError> {
    let bytes = std::fs::read(path).map_err(|error| TokenizerError::Io {
        path: path.to_path_buf(),
        error,
    })?;
    let text = String::from_utf8(bytes).map_err(|error| TokenizerError::InvalidUtf8 {
        path: path.to_path_buf(),
        byte_offset: error.utf8_error().valid_up_to(),
    })?;
    let text = if text.contains('\r') {
        text.replace("\r\n", "\n").replace('\r', "\n")
    } else {
        text
    };

    let char_count = text.chars().count();
    if chars.start > chars.end || chars.start > char_count {
        return Err(TokenizerError::RangeOutOfBounds {
            path: path.to_path_buf(),
            range: chars,
            char_count,
        });
    }
    Ok(text
        .chars()
        .skip(chars.start)
        .take(chars.end - chars.start)
        .collect())
}

/// Error from loading a tokenizer or reading a text file.
#[derive(Debug)]
#[non_exhaustive]
pub enum TokenizerError {
    /// The file is missing or could not be read.
    Io { path: PathBuf, error: io::Error },
    /// The tokenizer file is not valid JSON of the expected layout, for the stated reason.
    InvalidFile { path: PathBuf, reason: String },
    /// The text file is not valid UTF-8 from `byte_offset` on.
    InvalidUtf8 { path: PathBuf, byte_offset: usize },
    /// The requested character range is inverted or starts past the end of the text.
    RangeOutOfBounds {
        path: PathBuf,
        range: Range<usize>,
        char_count: usize,
    },
}

impl fmt::Display for TokenizerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenizerError::Io { path, error } if error.kind() == io::ErrorKind::NotFound => {
                write!(
                    f,
                    "{} not found (run `make fetch-models` to download the models, or set \
                     MICROSCOPIQ_MODELS to the directory that contains them)",
                    path.display()
                )
            }
            TokenizerError::Io { path, error } => {
                write!(f, "failed to read {}: {error}", path.display())
            }
            TokenizerError::InvalidFile { path, reason } => write!(
                f,
                "{} is not a valid tokenizer file: {reason}. If `make fetch-models` \
                 downloaded it, run `python3 scripts/fetch_models.py --force` to download it \
                 again",
                path.display()
            ),
            TokenizerError::InvalidUtf8 { path, byte_offset } => write!(
                f,
                "{} is not valid UTF-8 (first invalid byte at offset {byte_offset}). Convert \
                 the text to UTF-8",
                path.display()
            ),
            TokenizerError::RangeOutOfBounds {
                path,
                range,
                char_count,
            } => write!(
                f,
                "character range {range:?} is invalid for {}, which contains {char_count} \
                 characters. The start must not exceed the end or the text length",
                path.display()
            ),
        }
    }
}

impl std::error::Error for TokenizerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TokenizerError::Io { error, .. } => Some(error),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a tokenizer with alphabet `a b c ▁ \n` and merges `a b`, `▁ ab`, `c c`.
    fn tiny() -> BpeTokenizer {
        let json = r#"{"version": 1, "alphabet": ["a", "b", "c", "\u2581", "\n"],
                       "merges": [["a", "b"], ["\u2581", "ab"], ["c", "c"]]}"#;
        let file: TokenizerFile = serde_json::from_str(json).expect("valid JSON");
        BpeTokenizer::from_parts(file).expect("valid vocabulary")
    }

    fn chunk_strings(text: &str) -> Vec<String> {
        let marked: Vec<char> = text
            .chars()
            .map(|c| if c == ' ' { '▁' } else { c })
            .collect();
        split_chunks(&marked)
            .iter()
            .map(|chunk| chunk.iter().collect())
            .collect()
    }

    #[test]
    fn chunks_follow_the_regex() {
        let cases: [(&str, &[&str]); 7] = [
            ("", &[]),
            ("ab cd", &["ab", "▁cd"]),
            ("  ab", &["▁▁ab"]),
            ("ab  ", &["ab", "▁▁"]),
            ("a\n\n b", &["a", "\n", "\n", "▁b"]),
            ("a  \nb", &["a", "▁▁", "\n", "b"]),
            ("x,y. z", &["x,y.", "▁z"]),
        ];
        for (text, expected) in cases {
            assert_eq!(chunk_strings(text), expected, "text {text:?}");
        }
    }

    #[test]
    fn ids_follow_specials_alphabet_merges() {
        let tokenizer = tiny();
        assert_eq!(tokenizer.vocab_size(), 4 + 5 + 3);
        assert_eq!(tokenizer.piece(UNK_ID), Some("<unk>"));
        assert_eq!(tokenizer.piece(4), Some("a"));
        assert_eq!(tokenizer.piece(9), Some("ab"));
        assert_eq!(tokenizer.piece(10), Some("▁ab"));
        assert_eq!(tokenizer.piece(11), Some("cc"));
        assert_eq!(tokenizer.piece(12), None);
    }

    #[test]
    fn encode_merges_by_rank() {
        let tokenizer = tiny();
        let cases: [(&str, &[u32]); 8] = [
            ("ab", &[9]),
            (" ab", &[10]),
            ("ab ab", &[9, 10]),
            ("ccc", &[11, 6]),
            ("cccc", &[11, 11]),
            ("  ab ", &[7, 10, 7]),
            ("a\nb", &[4, 8, 5]),
            ("axb", &[4, UNK_ID, 5]),
        ];
        for (text, expected) in cases {
            assert_eq!(
                tokenizer.encode(text).expect("encode"),
                expected,
                "text {text:?}"
            );
        }
    }

    #[test]
    fn encode_normalizes_to_nfc() {
        let json = r#"{"version": 1, "alphabet": ["e", "\u00e9"], "merges": []}"#;
        let file: TokenizerFile = serde_json::from_str(json).expect("valid JSON");
        let tokenizer = BpeTokenizer::from_parts(file).expect("valid vocabulary");
        let decomposed = "e\u{0301}";
        assert_eq!(tokenizer.encode(decomposed).expect("encode"), vec![5]);
        assert_eq!(tokenizer.encode("\u{00e9}e").expect("encode"), vec![5, 4]);
    }

    #[test]
    fn invalid_vocabularies_are_rejected() {
        let cases = [
            (
                r#"{"version": 2, "alphabet": [], "merges": []}"#,
                "version 2",
            ),
            (
                r#"{"version": 1, "alphabet": ["ab"], "merges": []}"#,
                "exactly one character",
            ),
            (
                r#"{"version": 1, "alphabet": ["a", "a"], "merges": []}"#,
                "duplicate",
            ),
            (
                r#"{"version": 1, "alphabet": ["a"], "merges": [["a", "b"]]}"#,
                "uses \"b\"",
            ),
            (
                r#"{"version": 1, "alphabet": ["a", "b"], "merges": [["a", "b"], ["a", "b"]]}"#,
                "already a piece",
            ),
        ];
        for (json, expected) in cases {
            let file: TokenizerFile = serde_json::from_str(json).expect("valid JSON");
            let reason = BpeTokenizer::from_parts(file).expect_err(json);
            assert!(reason.contains(expected), "{json}: `{reason}`");
        }
    }

    #[test]
    fn load_reports_path_and_reason() {
        let dir = tempfile::tempdir().expect("temporary folder");
        let missing = dir.path().join("absent.json");
        let message = BpeTokenizer::load(&missing)
            .expect_err("missing")
            .to_string();
        assert!(message.contains("absent.json not found"), "{message}");
        assert!(message.contains("make fetch-models"), "{message}");

        let broken = dir.path().join("broken.json");
        std::fs::write(&broken, r#"{"version": 1, "alphabet": "abc"}"#).expect("write");
        let message = BpeTokenizer::load(&broken).expect_err("broken").to_string();
        assert!(
            message.contains("broken.json is not a valid tokenizer file"),
            "{message}"
        );
    }

    #[test]
    fn text_slice_counts_characters() {
        let dir = tempfile::tempdir().expect("temporary folder");
        let path = dir.path().join("text.txt");
        std::fs::write(&path, "a\u{00e6}\r\nb\u{2014}c\rd").expect("write");
        assert_eq!(
            read_text_slice(&path, 0..usize::MAX).expect("all"),
            "a\u{00e6}\nb\u{2014}c\nd"
        );
        assert_eq!(read_text_slice(&path, 1..4).expect("middle"), "\u{00e6}\nb");
        assert_eq!(read_text_slice(&path, 8..8).expect("empty at end"), "");

        let error = read_text_slice(&path, 9..10).expect_err("start past the end");
        assert!(
            error.to_string().contains("contains 8 characters"),
            "{error}"
        );
        #[allow(clippy::reversed_empty_ranges)]
        let inverted = read_text_slice(&path, 3..2);
        assert!(inverted.is_err(), "inverted range must fail");

        let latin1 = dir.path().join("latin1.txt");
        std::fs::write(&latin1, b"ab\xe6").expect("write");
        let error = read_text_slice(&latin1, 0..1).expect_err("not UTF-8");
        assert!(error.to_string().contains("offset 2"), "{error}");
    }
}
