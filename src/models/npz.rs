//! Reader for NumPy `.npz` archives: zip archives (stored or deflate-compressed) whose
//! entries are `.npy` files.
//!
//! The `.npy` header is parsed here, following the NumPy format specification
//! (`numpy.lib.format`, versions 1.0, 2.0 and 3.0). Supported element types are
//! little-endian `<f2` (widened exactly to `f32`), `<f4`, `<f8`, and 0-d `<U…` unicode strings
//! (UTF-32LE code units, as `np.savez` stores a Python `str`). Arrays must be in C order.
//! Anything else is rejected with an error that names the file and the entry.

use std::fmt;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use half::f16;
use zip::result::ZipError;
use zip::ZipArchive;

/// Magic string at the start of every `.npy` file.
const NPY_MAGIC: &[u8] = b"\x93NUMPY";

/// Suffix that `np.savez` appends to each array name to form the zip entry name.
const NPY_SUFFIX: &str = ".npy";

/// Element type of an array, as parsed from the `descr` field of a `.npy` header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    /// `<f2`: IEEE 754 binary16.
    F16,
    /// `<f4`: IEEE 754 binary32.
    F32,
    /// `<f8`: IEEE 754 binary64.
    F64,
    /// `<U{chars}`: fixed-length unicode string of `chars` UTF-32LE code units.
    Unicode { chars: usize },
}

impl Dtype {
    /// Size of one element in bytes.
    fn item_size(self) -> usize {
        match self {
            Dtype::F16 => 2,
            Dtype::F32 => 4,
            Dtype::F64 => 8,
            Dtype::Unicode { chars } => 4 * chars,
        }
    }
}

/// Element values of an array in C (row-major) order.
#[derive(Clone, Debug, PartialEq)]
pub enum Values {
    /// Values of an `<f2` or `<f4` array, each widened exactly to `f32`.
    F32(Vec<f32>),
    /// Values of an `<f8` array.
    F64(Vec<f64>),
    /// The string of a 0-d `<U…` array, without NumPy's trailing NUL padding.
    Text(String),
}

/// One array read from a `.npy` file.
#[derive(Clone, Debug, PartialEq)]
pub struct NpyArray {
    /// Element type as stored in the file.
    pub dtype: Dtype,
    /// Shape as stored in the file. A 0-d array has an empty shape.
    pub shape: Vec<usize>,
    /// Element values in C order.
    pub values: Values,
}

impl NpyArray {
    /// Returns the values of an `<f2` or `<f4` array, or `None` for other types.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.values {
            Values::F32(values) => Some(values),
            _ => None,
        }
    }

    /// Returns the string of a 0-d unicode array, or `None` for other types.
    pub fn as_text(&self) -> Option<&str> {
        match &self.values {
            Values::Text(text) => Some(text),
            _ => None,
        }
    }
}

/// An open `.npz` archive.
pub struct Npz {
    path: PathBuf,
    archive: ZipArchive<BufReader<File>>,
}

impl Npz {
    /// Opens an archive and reads its central directory. Entries are read by [`Npz::read`].
    pub fn open(path: &Path) -> Result<Npz, NpzError> {
        let file = File::open(path).map_err(|error| {
            let kind = if error.kind() == io::ErrorKind::NotFound {
                NpzErrorKind::FileNotFound
            } else {
                NpzErrorKind::Io(error)
            };
            NpzError::new(path, kind)
        })?;
        let archive = ZipArchive::new(BufReader::new(file)).map_err(|error| {
            let kind = match error {
                ZipError::Io(error) => NpzErrorKind::Io(error),
                other => NpzErrorKind::InvalidArchive(other.to_string()),
            };
            NpzError::new(path, kind)
        })?;
        Ok(Npz {
            path: path.to_path_buf(),
            archive,
        })
    }

    /// Path of the archive.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Returns the array names in archive order, without the `.npy` suffix of the entry names.
    pub fn names(&self) -> Vec<String> {
        self.archive
            .file_names()
            .map(|entry| entry.strip_suffix(NPY_SUFFIX).unwrap_or(entry).to_string())
            .collect()
    }

    /// Reads and parses one array, by array name (`"E"`) or entry name (`"E.npy"`).
    pub fn read(&mut self, name: &str) -> Result<NpyArray, NpzError> {
        let entry = self.entry_name(name).ok_or_else(|| {
            let kind = NpzErrorKind::EntryNotFound {
                entry: name.to_string(),
                available: self.names(),
            };
            NpzError::new(&self.path, kind)
        })?;

        let bytes = self.read_entry_bytes(&entry)?;
        parse_npy(&bytes).map_err(|error| {
            let kind = match error {
                NpyError::Invalid(reason) => NpzErrorKind::InvalidEntry { entry, reason },
                NpyError::UnsupportedDtype(descr) => {
                    NpzErrorKind::UnsupportedDtype { entry, descr }
                }
                NpyError::FortranOrder => NpzErrorKind::FortranOrder { entry },
            };
            NpzError::new(&self.path, kind)
        })
    }

    /// Maps an array or entry name to the entry name stored in the archive.
    fn entry_name(&self, name: &str) -> Option<String> {
        let with_suffix = format!("{name}{NPY_SUFFIX}");
        self.archive
            .file_names()
            .find(|entry| *entry == with_suffix || *entry == name)
            .map(str::to_string)
    }

    /// Decompresses one entry. The zip crate checks the CRC-32 when the entry ends.
    fn read_entry_bytes(&mut self, entry: &str) -> Result<Vec<u8>, NpzError> {
        let corrupt = |reason: String| NpzErrorKind::CorruptEntry {
            entry: entry.to_string(),
            reason,
        };
        let mut file = match self.archive.by_name(entry) {
            Ok(file) => file,
            Err(error) => return Err(NpzError::new(&self.path, corrupt(error.to_string()))),
        };
        let mut bytes = Vec::with_capacity(usize::try_from(file.size()).unwrap_or(0));
        if let Err(error) = file.read_to_end(&mut bytes) {
            let reason = format!("decompression failed: {error}");
            return Err(NpzError::new(&self.path, corrupt(reason)));
        }
        Ok(bytes)
    }
}

/// Error from reading an `.npz` archive, with the path of the archive.
#[derive(Debug)]
pub struct NpzError {
    path: PathBuf,
    kind: NpzErrorKind,
}

/// Cause of an [`NpzError`].
#[derive(Debug)]
#[non_exhaustive]
pub enum NpzErrorKind {
    /// The archive file does not exist.
    FileNotFound,
    /// Opening or reading the file failed for a reason other than a missing file.
    Io(io::Error),
    /// The file is not a readable zip archive, for the stated reason.
    InvalidArchive(String),
    /// The archive contains no entry with the requested name.
    EntryNotFound {
        entry: String,
        /// Array names in the archive, in archive order.
        available: Vec<String>,
    },
    /// The entry's zip record is unreadable or fails to decompress, for the stated reason.
    CorruptEntry { entry: String, reason: String },
    /// The entry is not a valid `.npy` file, for the stated reason.
    InvalidEntry { entry: String, reason: String },
    /// The entry's `descr` is not one of the supported element types.
    UnsupportedDtype { entry: String, descr: String },
    /// The entry is stored in Fortran (column-major) order.
    FortranOrder { entry: String },
}

impl NpzError {
    fn new(path: &Path, kind: NpzErrorKind) -> NpzError {
        NpzError {
            path: path.to_path_buf(),
            kind,
        }
    }

    /// Path of the archive that failed to load.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Cause of the failure.
    pub fn kind(&self) -> &NpzErrorKind {
        &self.kind
    }
}

impl fmt::Display for NpzError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = self.path.display();
        match &self.kind {
            NpzErrorKind::FileNotFound => write!(
                f,
                "npz file {path} not found (run `make fetch-models` to download the models, \
                 or set MICROSCOPIQ_MODELS to the directory that contains them)"
            ),
            NpzErrorKind::Io(error) => write!(f, "failed to read npz file {path}: {error}"),
            NpzErrorKind::InvalidArchive(reason) => write!(
                f,
                "{path} is not a valid npz (zip) archive: {reason}. If `make fetch-models` \
                 downloaded it, run `python3 scripts/fetch_models.py --force` to download it again"
            ),
            NpzErrorKind::EntryNotFound { entry, available } => {
                write!(f, "entry `{entry}` not found in {path}")?;
                if available.is_empty() {
                    return write!(f, ", which contains no entries");
                }
                let listed: Vec<String> = available
                    .iter()
                    .take(8)
                    .map(|name| format!("`{name}`"))
                    .collect();
                let more = if available.len() > listed.len() {
                    ", …"
                } else {
                    ""
                };
                write!(
                    f,
                    ", which contains {} entries: {}{more}",
                    available.len(),
                    listed.join(", ")
                )
            }
            NpzErrorKind::CorruptEntry { entry, reason } => write!(
                f,
                "entry `{entry}` in {path} is corrupt: {reason}. If `make fetch-models` \
                 downloaded the file, run `python3 scripts/fetch_models.py --force` to download \
                 it again"
            ),
            NpzErrorKind::InvalidEntry { entry, reason } => write!(
                f,
                "entry `{entry}` in {path} is not a valid .npy array: {reason}. \
                 Export the weights again"
            ),
            NpzErrorKind::UnsupportedDtype { entry, descr } => write!(
                f,
                "entry `{entry}` in {path} has the unsupported dtype `{descr}`. Supported \
                 dtypes are '<f2', '<f4', '<f8' and 0-d '<U…' strings; convert the array \
                 before saving it"
            ),
            NpzErrorKind::FortranOrder { entry } => write!(
                f,
                "entry `{entry}` in {path} is stored in Fortran order, which is not supported. \
                 Save it with np.ascontiguousarray first"
            ),
        }
    }
}

impl std::error::Error for NpzError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.kind {
            NpzErrorKind::Io(error) => Some(error),
            _ => None,
        }
    }
}

/// Failure to parse one `.npy` file, before the entry name is attached.
#[derive(Debug, PartialEq)]
enum NpyError {
    Invalid(String),
    UnsupportedDtype(String),
    FortranOrder,
}

/// Fields of a `.npy` header that the reader uses.
#[derive(Debug, PartialEq)]
struct NpyHeader {
    descr: String,
    fortran_order: bool,
    shape: Vec<usize>,
}

/// Parses a complete `.npy` file: magic, version, header dictionary and data.
fn parse_npy(bytes: &[u8]) -> Result<NpyArray, NpyError> {
    let invalid = |reason: String| NpyError::Invalid(reason);

    if bytes.len() < NPY_MAGIC.len() + 2 || &bytes[..NPY_MAGIC.len()] != NPY_MAGIC {
        return Err(invalid("missing the \\x93NUMPY magic string".to_string()));
    }
    let major = bytes[NPY_MAGIC.len()];
    let minor = bytes[NPY_MAGIC.len() + 1];

    // Version 1.0 stores the header length as a u16, versions 2.0 and 3.0 as a u32. Version
    // 3.0 allows UTF-8 in the header, the others Latin-1.
    let length_bytes = match major {
        1 => 2,
        2 | 3 => 4,
        _ => {
            return Err(invalid(format!(
                "unsupported format version {major}.{minor}"
            )))
        }
    };
    let length_start = NPY_MAGIC.len() + 2;
    let header_start = length_start + length_bytes;
    if bytes.len() < header_start {
        return Err(invalid("file ends inside the header length".to_string()));
    }
    let mut header_length = 0usize;
    for (shift, byte) in bytes[length_start..header_start].iter().enumerate() {
        header_length |= usize::from(*byte) << (8 * shift);
    }
    let data_start = header_start
        .checked_add(header_length)
        .filter(|end| *end <= bytes.len())
        .ok_or_else(|| {
            invalid(format!(
                "header length {header_length} runs past the end of the {}-byte file",
                bytes.len()
            ))
        })?;

    let header_bytes = &bytes[header_start..data_start];
    let header_text: String = if major == 3 {
        std::str::from_utf8(header_bytes)
            .map_err(|error| invalid(format!("header is not valid UTF-8: {error}")))?
            .to_string()
    } else {
        header_bytes.iter().map(|byte| char::from(*byte)).collect()
    };
    let header = parse_header(&header_text).map_err(invalid)?;

    if header.fortran_order {
        return Err(NpyError::FortranOrder);
    }
    let dtype = parse_descr(&header.descr)?;
    decode_values(dtype, header.shape, &bytes[data_start..])
}

/// Checks the data length against shape and dtype and decodes the values.
fn decode_values(dtype: Dtype, shape: Vec<usize>, data: &[u8]) -> Result<NpyArray, NpyError> {
    let element_count = shape
        .iter()
        .try_fold(1usize, |count, dim| count.checked_mul(*dim))
        .ok_or_else(|| NpyError::Invalid(format!("shape {shape:?} overflows the element count")))?;
    let expected_bytes = element_count
        .checked_mul(dtype.item_size())
        .ok_or_else(|| NpyError::Invalid(format!("shape {shape:?} overflows the data size")))?;
    if data.len() != expected_bytes {
        return Err(NpyError::Invalid(format!(
            "shape {shape:?} of dtype {dtype:?} needs {expected_bytes} data bytes, but the \
             file contains {}",
            data.len()
        )));
    }

    let values = match dtype {
        Dtype::F16 => Values::F32(
            data.chunks_exact(2)
                .map(|b| f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
                .collect(),
        ),
        Dtype::F32 => Values::F32(
            data.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        ),
        Dtype::F64 => Values::F64(
            data.chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().expect("chunk of 8 bytes")))
                .collect(),
        ),
        Dtype::Unicode { .. } => {
            if !shape.is_empty() {
                return Err(NpyError::Invalid(format!(
                    "unicode arrays of shape {shape:?} are not supported, only 0-d strings"
                )));
            }
            Values::Text(decode_utf32le(data)?)
        }
    };
    Ok(NpyArray {
        dtype,
        shape,
        values,
    })
}

/// Decodes UTF-32LE code units and drops the NUL padding that NumPy adds after the string.
fn decode_utf32le(data: &[u8]) -> Result<String, NpyError> {
    let mut text = String::with_capacity(data.len() / 4);
    for (index, unit) in data.chunks_exact(4).enumerate() {
        let code = u32::from_le_bytes([unit[0], unit[1], unit[2], unit[3]]);
        let character = char::from_u32(code).ok_or_else(|| {
            NpyError::Invalid(format!(
                "code unit {index} of the string is {code:#x}, which is not a Unicode scalar value"
            ))
        })?;
        text.push(character);
    }
    let padding_start = text.trim_end_matches('\0').len();
    text.truncate(padding_start);
    Ok(text)
}

/// Maps a `descr` string to a supported [`Dtype`].
fn parse_descr(descr: &str) -> Result<Dtype, NpyError> {
    match descr {
        "<f2" => Ok(Dtype::F16),
        "<f4" => Ok(Dtype::F32),
        "<f8" => Ok(Dtype::F64),
        _ => {
            let chars = descr
                .strip_prefix("<U")
                .and_then(|count| count.parse::<usize>().ok())
                .ok_or_else(|| NpyError::UnsupportedDtype(descr.to_string()))?;
            Ok(Dtype::Unicode { chars })
        }
    }
}

/// Parses the header dictionary, a Python literal such as
/// `{'descr': '<f2', 'fortran_order': False, 'shape': (1024, 128), }`.
///
/// Values other than strings, booleans and tuples of integers are accepted only for keys
/// that the reader ignores. A `descr` that is a list (a structured dtype) is reported as an
/// unsupported dtype by the caller.
fn parse_header(text: &str) -> Result<NpyHeader, String> {
    let mut parser = HeaderParser {
        chars: text.chars().collect(),
        position: 0,
    };
    let mut descr = None;
    let mut fortran_order = None;
    let mut shape = None;

    parser.expect('{')?;
    loop {
        parser.skip_whitespace();
        if parser.eat('}') {
            break;
        }
        let key = parser.parse_string()?;
        parser.skip_whitespace();
        parser.expect(':')?;
        parser.skip_whitespace();
        match key.as_str() {
            "descr" => {
                descr = Some(if parser.peek() == Some('[') {
                    let literal = parser.skip_bracketed()?;
                    format!("structured dtype {literal}")
                } else {
                    parser.parse_string()?
                });
            }
            "fortran_order" => fortran_order = Some(parser.parse_bool()?),
            "shape" => shape = Some(parser.parse_shape()?),
            _ => parser.skip_value()?,
        }
        parser.skip_whitespace();
        if parser.eat(',') {
            continue;
        }
        parser.expect('}')?;
        break;
    }

    Ok(NpyHeader {
        descr: descr.ok_or("header has no 'descr' key")?,
        fortran_order: fortran_order.ok_or("header has no 'fortran_order' key")?,
        shape: shape.ok_or("header has no 'shape' key")?,
    })
}

/// Cursor over the characters of a `.npy` header dictionary.
struct HeaderParser {
    chars: Vec<char>,
    position: usize,
}

impl HeaderParser {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.position).copied()
    }

    fn skip_whitespace(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.position += 1;
        }
    }

    /// Consumes `expected` if it is the next character.
    fn eat(&mut self, expected: char) -> bool {
        if self.peek() == Some(expected) {
            self.position += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, expected: char) -> Result<(), String> {
        self.skip_whitespace();
        if self.eat(expected) {
            return Ok(());
        }
        let found = self
            .peek()
            .map_or("the end".to_string(), |c| format!("`{c}`"));
        Err(format!(
            "header dictionary expects `{expected}` at character {} but found {found}",
            self.position
        ))
    }

    /// Parses a single- or double-quoted Python string literal with simple backslash escapes.
    fn parse_string(&mut self) -> Result<String, String> {
        let quote = match self.peek() {
            Some(quote @ ('\'' | '"')) => quote,
            _ => {
                return Err(format!(
                    "header dictionary expects a quoted string at character {}",
                    self.position
                ))
            }
        };
        self.position += 1;
        let mut value = String::new();
        loop {
            match self.peek() {
                None => return Err("header dictionary ends inside a string".to_string()),
                Some(c) if c == quote => {
                    self.position += 1;
                    return Ok(value);
                }
                Some('\\') => {
                    self.position += 1;
                    let escaped = self
                        .peek()
                        .ok_or("header dictionary ends inside a string")?;
                    value.push(escaped);
                    self.position += 1;
                }
                Some(c) => {
                    value.push(c);
                    self.position += 1;
                }
            }
        }
    }

    fn parse_bool(&mut self) -> Result<bool, String> {
        let rest: String = self.chars[self.position..].iter().take(5).collect();
        if rest.starts_with("True") {
            self.position += 4;
            Ok(true)
        } else if rest.starts_with("False") {
            self.position += 5;
            Ok(false)
        } else {
            Err(format!(
                "'fortran_order' must be True or False, found `{rest}…`"
            ))
        }
    }

    /// Parses a tuple of non-negative integers such as `()`, `(5,)` or `(1024, 128)`.
    fn parse_shape(&mut self) -> Result<Vec<usize>, String> {
        self.expect('(')?;
        let mut shape = Vec::new();
        loop {
            self.skip_whitespace();
            if self.eat(')') {
                return Ok(shape);
            }
            let start = self.position;
            while self.peek().is_some_and(|c| c.is_ascii_digit()) {
                self.position += 1;
            }
            let digits: String = self.chars[start..self.position].iter().collect();
            let dim = digits.parse::<usize>().map_err(|_| {
                format!("'shape' must be a tuple of non-negative integers, at character {start}")
            })?;
            shape.push(dim);
            self.skip_whitespace();
            if !self.eat(',') {
                self.expect(')')?;
                return Ok(shape);
            }
        }
    }

    /// Skips a value of an ignored key: a string, or anything up to the next top-level `,`
    /// or `}`, with brackets balanced.
    fn skip_value(&mut self) -> Result<(), String> {
        match self.peek() {
            Some('\'' | '"') => self.parse_string().map(drop),
            Some('(' | '[' | '{') => self.skip_bracketed().map(drop),
            _ => {
                while self.peek().is_some_and(|c| c != ',' && c != '}') {
                    self.position += 1;
                }
                Ok(())
            }
        }
    }

    /// Skips a bracketed literal, including nested brackets and strings, and returns its text.
    fn skip_bracketed(&mut self) -> Result<String, String> {
        let start = self.position;
        let mut depth = 0usize;
        loop {
            match self.peek() {
                None => return Err("header dictionary ends inside brackets".to_string()),
                Some('\'' | '"') => {
                    self.parse_string()?;
                    continue;
                }
                Some('(' | '[' | '{') => depth += 1,
                Some(')' | ']' | '}') => {
                    depth -= 1;
                    if depth == 0 {
                        self.position += 1;
                        return Ok(self.chars[start..self.position].iter().collect());
                    }
                }
                Some(_) => {}
            }
            self.position += 1;
        }
    }
}

/// Builders of `.npy` and `.npz` files for the tests of this and other model modules.
#[cfg(test)]
pub(crate) mod test_support {
    use std::fs::File;
    use std::io::Write;
    use std::path::Path;

    use zip::write::SimpleFileOptions;
    use zip::{CompressionMethod, ZipWriter};

    use super::NPY_MAGIC;

    /// Builds a `.npy` file of format version `major` with the given header dictionary and
    /// data.
    pub(crate) fn npy_with_version(major: u8, dictionary: &str, data: &[u8]) -> Vec<u8> {
        let length_bytes = if major == 1 { 2 } else { 4 };
        // NumPy pads the header with spaces and a newline so that data starts at a multiple
        // of 64 bytes. The reader must not depend on that, so only the newline is added here.
        let header = format!("{dictionary}\n");
        let mut bytes = NPY_MAGIC.to_vec();
        bytes.extend([major, 0]);
        bytes.extend(&(header.len() as u32).to_le_bytes()[..length_bytes]);
        bytes.extend(header.as_bytes());
        bytes.extend(data);
        bytes
    }

    /// Builds a version 1.0 `.npy` file with the given header dictionary and data.
    pub(crate) fn npy_v1(dictionary: &str, data: &[u8]) -> Vec<u8> {
        npy_with_version(1, dictionary, data)
    }

    /// Builds a C-order `<f4` `.npy` file.
    pub(crate) fn npy_f32(shape: &[usize], values: &[f32]) -> Vec<u8> {
        let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
        let tuple = match dims.len() {
            1 => format!("({},)", dims[0]),
            _ => format!("({})", dims.join(", ")),
        };
        let dictionary = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {tuple}, }}");
        let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        npy_v1(&dictionary, &data)
    }

    /// Builds a 0-d `<U…` `.npy` file, padded with NULs to `chars` code units.
    pub(crate) fn npy_text(text: &str, chars: usize) -> Vec<u8> {
        let dictionary = format!("{{'descr': '<U{chars}', 'fortran_order': False, 'shape': (), }}");
        npy_v1(&dictionary, &utf32_bytes(text, chars))
    }

    /// Encodes `text` as UTF-32LE code units, padded with NULs to `chars` units.
    pub(crate) fn utf32_bytes(text: &str, chars: usize) -> Vec<u8> {
        let mut units: Vec<u32> = text.chars().map(u32::from).collect();
        units.resize(chars, 0);
        units.iter().flat_map(|u| u.to_le_bytes()).collect()
    }

    /// Writes a deflate-compressed zip archive with the given entry names and contents.
    pub(crate) fn write_npz(path: &Path, entries: &[(String, Vec<u8>)]) {
        let mut writer = ZipWriter::new(File::create(path).expect("create npz"));
        let options = SimpleFileOptions::default().compression_method(CompressionMethod::Deflated);
        for (name, bytes) in entries {
            writer
                .start_file(name.as_str(), options)
                .expect("start entry");
            writer.write_all(bytes).expect("write entry");
        }
        writer.finish().expect("finish npz");
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::{npy_v1, npy_with_version, utf32_bytes, write_npz};
    use super::*;

    fn f16_bytes(bits: &[u16]) -> Vec<u8> {
        bits.iter().flat_map(|b| b.to_le_bytes()).collect()
    }

    #[test]
    fn f16_widening_is_exact() {
        let cases: [(u16, f32); 9] = [
            (0x3C00, 1.0),
            (0xC000, -2.0),
            (0x3555, 0.333_251_95),
            (0x7BFF, 65504.0),
            (0x0001, 2f32.powi(-24)),
            (0x03FF, 1023.0 * 2f32.powi(-24)),
            (0x0400, 2f32.powi(-14)),
            (0x7C00, f32::INFINITY),
            (0x8000, -0.0),
        ];
        let bits: Vec<u16> = cases.iter().map(|(bits, _)| *bits).collect();
        let bytes = npy_v1(
            "{'descr': '<f2', 'fortran_order': False, 'shape': (9,), }",
            &f16_bytes(&bits),
        );
        let array = parse_npy(&bytes).expect("valid f2 array");
        let values = array.as_f32().expect("f2 widens to f32");
        for ((bits, expected), actual) in cases.iter().zip(values) {
            assert_eq!(
                actual.to_bits(),
                expected.to_bits(),
                "f16 bits {bits:#06x} widened to {actual}, expected {expected}"
            );
        }
    }

    #[test]
    fn f4_and_f8_arrays_decode() {
        let values = [1.5f32, -0.25, 3.0e-8, 7.0, 8.0, 9.0];
        let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let bytes = npy_v1(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }",
            &data,
        );
        let array = parse_npy(&bytes).expect("valid f4 array");
        assert_eq!(array.shape, vec![2, 3]);
        assert_eq!(array.as_f32(), Some(&values[..]));

        let doubles = [0.1f64, -1e300];
        let data: Vec<u8> = doubles.iter().flat_map(|v| v.to_le_bytes()).collect();
        let bytes = npy_v1(
            "{'descr': '<f8', 'fortran_order': False, 'shape': (2,), }",
            &data,
        );
        let array = parse_npy(&bytes).expect("valid f8 array");
        assert_eq!(array.values, Values::F64(doubles.to_vec()));
    }

    #[test]
    fn unicode_scalar_drops_padding() {
        let data = utf32_bytes("{\"a\": 1} ▁é", 16);
        let bytes = npy_v1(
            "{'descr': '<U16', 'fortran_order': False, 'shape': (), }",
            &data,
        );
        let array = parse_npy(&bytes).expect("valid 0-d string");
        assert_eq!(array.shape, Vec::<usize>::new());
        assert_eq!(array.as_text(), Some("{\"a\": 1} ▁é"));
    }

    #[test]
    fn header_versions_2_and_3_parse() {
        let data = f16_bytes(&[0x3C00]);
        let dictionary = "{\"descr\": \"<f2\", \"shape\": (1,), \"fortran_order\": False}";
        for major in [2, 3] {
            let array = parse_npy(&npy_with_version(major, dictionary, &data))
                .unwrap_or_else(|e| panic!("version {major}: {e:?}"));
            assert_eq!(array.as_f32(), Some(&[1.0f32][..]), "version {major}");
        }
    }

    #[test]
    fn header_ignores_unknown_keys() {
        let dictionary = "{'descr': '<f4', 'extra': [1, (2, 3)], 'fortran_order': False, \
                          'shape': (0,)}";
        let array = parse_npy(&npy_v1(dictionary, &[])).expect("unknown keys are skipped");
        assert_eq!(array.shape, vec![0]);
    }

    #[test]
    fn fortran_order_is_rejected() {
        let data = f16_bytes(&[0, 0, 0, 0]);
        let bytes = npy_v1(
            "{'descr': '<f2', 'fortran_order': True, 'shape': (2, 2), }",
            &data,
        );
        assert_eq!(parse_npy(&bytes), Err(NpyError::FortranOrder));
    }

    #[test]
    fn unsupported_dtypes_are_rejected() {
        for descr in [">f4", "<i8", "|u1", "<c8", "|b1", "<U", "<Ux"] {
            let dictionary =
                format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': (), }}");
            let result = parse_npy(&npy_v1(&dictionary, &[0; 8]));
            assert_eq!(
                result,
                Err(NpyError::UnsupportedDtype(descr.to_string())),
                "{descr}"
            );
        }
        let structured = "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (), }";
        let result = parse_npy(&npy_v1(structured, &[0; 4]));
        assert!(
            matches!(&result, Err(NpyError::UnsupportedDtype(d)) if d.contains("('a', '<f4')")),
            "{result:?}"
        );
    }

    #[test]
    fn malformed_npy_is_rejected() {
        let good = "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }";
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("bad magic", b"\x93NUMPX\x01\x00".to_vec(), "magic"),
            (
                "version 4",
                npy_with_version(4, good, &[0; 8]),
                "version 4.0",
            ),
            ("short data", npy_v1(good, &[0; 7]), "needs 8 data bytes"),
            ("long data", npy_v1(good, &[0; 9]), "needs 8 data bytes"),
            (
                "missing shape",
                npy_v1("{'descr': '<f4', 'fortran_order': False}", &[]),
                "no 'shape'",
            ),
            (
                "negative dim",
                npy_v1(
                    "{'descr': '<f4', 'fortran_order': False, 'shape': (-1,)}",
                    &[],
                ),
                "non-negative",
            ),
            (
                "unicode vector",
                npy_v1(
                    "{'descr': '<U1', 'fortran_order': False, 'shape': (1,)}",
                    &[65, 0, 0, 0],
                ),
                "only 0-d",
            ),
            (
                "surrogate code unit",
                npy_v1(
                    "{'descr': '<U1', 'fortran_order': False, 'shape': ()}",
                    &[0, 0xD8, 0, 0],
                ),
                "not a Unicode scalar",
            ),
        ];
        for (case, bytes, expected) in cases {
            match parse_npy(&bytes) {
                Err(NpyError::Invalid(reason)) => {
                    assert!(reason.contains(expected), "{case}: reason `{reason}`")
                }
                other => panic!("{case}: expected an invalid-file error, got {other:?}"),
            }
        }
        let mut truncated = npy_v1(good, &[0; 8]);
        truncated[8] = 0xFF;
        truncated[9] = 0x7F;
        assert!(
            matches!(parse_npy(&truncated), Err(NpyError::Invalid(r)) if r.contains("runs past")),
            "header length past the end"
        );
    }

    /// Writes the entries into `tiny.npz` in a new temporary folder.
    fn write_tiny_npz(entries: &[(&str, Vec<u8>)]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("temporary folder");
        let path = dir.path().join("tiny.npz");
        let owned: Vec<(String, Vec<u8>)> = entries
            .iter()
            .map(|(name, bytes)| (name.to_string(), bytes.clone()))
            .collect();
        write_npz(&path, &owned);
        (dir, path)
    }

    fn tiny_npz_entries() -> Vec<(&'static str, Vec<u8>)> {
        let halves = f16_bytes(&[0x3C00, 0xBC00, 0x3800, 0x0001]);
        let singles: Vec<u8> = [0.5f32, 2.0, -3.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        vec![
            (
                "__config__.npy",
                npy_v1(
                    "{'descr': '<U11', 'fortran_order': False, 'shape': (), }",
                    &utf32_bytes("{\"d\": 128}", 11),
                ),
            ),
            (
                "half.npy",
                npy_v1(
                    "{'descr': '<f2', 'fortran_order': False, 'shape': (2, 2), }",
                    &halves,
                ),
            ),
            (
                "single.npy",
                npy_v1(
                    "{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }",
                    &singles,
                ),
            ),
            (
                "fortran.npy",
                npy_v1(
                    "{'descr': '<f4', 'fortran_order': True, 'shape': (3,), }",
                    &singles,
                ),
            ),
            ("broken.npy", b"not an npy file".to_vec()),
            (
                "ints.npy",
                npy_v1(
                    "{'descr': '<i4', 'fortran_order': False, 'shape': (1,), }",
                    &[0; 4],
                ),
            ),
        ]
    }

    #[test]
    fn tiny_npz_reads_all_types() {
        let (_dir, path) = write_tiny_npz(&tiny_npz_entries());
        let mut npz = Npz::open(&path).expect("open tiny npz");
        assert_eq!(
            npz.names(),
            vec!["__config__", "half", "single", "fortran", "broken", "ints"]
        );

        let config = npz.read("__config__").expect("read __config__");
        assert_eq!(config.as_text(), Some("{\"d\": 128}"));

        let half = npz.read("half").expect("read half");
        assert_eq!(half.dtype, Dtype::F16);
        assert_eq!(half.shape, vec![2, 2]);
        assert_eq!(half.as_f32(), Some(&[1.0, -1.0, 0.5, 2f32.powi(-24)][..]));

        let single = npz.read("single.npy").expect("read by entry name");
        assert_eq!(single.as_f32(), Some(&[0.5f32, 2.0, -3.0][..]));
    }

    #[test]
    fn npz_errors_name_file_and_entry() {
        let (_dir, path) = write_tiny_npz(&tiny_npz_entries());
        let mut npz = Npz::open(&path).expect("open tiny npz");
        let cases = [
            ("missing", "entry `missing` not found"),
            ("fortran", "entry `fortran.npy`"),
            ("broken", "entry `broken.npy`"),
            ("ints", "unsupported dtype `<i4`"),
        ];
        for (entry, expected) in cases {
            let message = npz.read(entry).expect_err(entry).to_string();
            assert!(message.contains(expected), "{entry}: `{message}`");
            assert!(
                message.contains(&path.display().to_string()),
                "{entry}: `{message}`"
            );
        }
        let message = npz.read("missing").expect_err("missing").to_string();
        assert!(message.contains("contains 6 entries"), "{message}");
        assert!(message.contains("`half`"), "{message}");
    }

    #[test]
    fn corrupt_entry_data_is_rejected() {
        let (_dir, path) = write_tiny_npz(&tiny_npz_entries());
        let mut bytes = std::fs::read(&path).expect("read npz");
        // Flip bits in the compressed data of the first entry, which follows its 30-byte
        // local header, the entry name and the extra field.
        let name_length = usize::from(u16::from_le_bytes([bytes[26], bytes[27]]));
        let extra_length = usize::from(u16::from_le_bytes([bytes[28], bytes[29]]));
        let data_start = 30 + name_length + extra_length;
        for byte in &mut bytes[data_start + 4..data_start + 10] {
            *byte ^= 0xA5;
        }
        std::fs::write(&path, &bytes).expect("write corrupt npz");
        let mut npz = Npz::open(&path).expect("central directory is intact");
        let error = npz.read("__config__").expect_err("corrupt data must fail");
        assert!(
            matches!(error.kind(), NpzErrorKind::CorruptEntry { entry, .. } if entry == "__config__.npy"),
            "{error}"
        );
    }

    #[test]
    fn missing_and_non_zip_files_are_rejected() {
        let dir = tempfile::tempdir().expect("temporary folder");
        let missing = dir.path().join("absent.npz");
        let error = Npz::open(&missing).err().expect("missing file");
        assert!(
            matches!(error.kind(), NpzErrorKind::FileNotFound),
            "{error}"
        );
        assert!(error.to_string().contains("make fetch-models"), "{error}");

        let not_zip = dir.path().join("plain.npz");
        std::fs::write(&not_zip, b"plain text, not a zip archive").expect("write file");
        let error = Npz::open(&not_zip).err().expect("not a zip archive");
        assert!(
            matches!(error.kind(), NpzErrorKind::InvalidArchive(_)),
            "{error}"
        );
    }
}
