//! Loading of dense weight matrices from safetensors files.
//!
//! Every loaded matrix is normalised to the PyTorch `nn.Linear` layout `[out, in]` and widened
//! exactly to `f32`. Loading rejects NaN and infinite values, so later statistics such as a
//! block's maximum magnitude are always finite.

use std::fmt;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use safetensors::tensor::Metadata;
use safetensors::Dtype;

/// Environment variable that overrides the directory written by `scripts/fetch_models.py`.
const MODELS_DIR_ENV: &str = "MICROSCOPIQ_MODELS";

/// Size in bytes of the little-endian `u64` header length at the start of a safetensors file.
const HEADER_LENGTH_BYTES: u64 = 8;

/// Maximum number of similar tensor names that a "tensor not found" error lists.
const MAX_SUGGESTIONS: usize = 5;

/// Storage layout of a 2-D weight tensor in its file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// `[out, in]`, as PyTorch `nn.Linear` stores its weight.
    OutIn,
    /// `[in, out]`, as files written for `x @ W` store it.
    InOut,
}

/// A dense weight matrix normalised to `[out, in]` (row-major: `data[o * cols + i]`), with
/// values widened exactly to `f32`.
#[derive(Clone, Debug, PartialEq)]
pub struct Matrix {
    /// Name of the tensor that the matrix was loaded from.
    pub name: String,
    /// Number of output features.
    pub rows: usize,
    /// Number of input features.
    pub cols: usize,
    /// Row-major values, `rows * cols` of them.
    pub data: Vec<f32>,
}

impl Matrix {
    /// Creates a matrix from row-major data.
    ///
    /// # Panics
    ///
    /// Panics if `data.len()` is not `rows * cols`.
    pub fn new(name: impl Into<String>, rows: usize, cols: usize, data: Vec<f32>) -> Matrix {
        let name = name.into();
        let expected = rows.checked_mul(cols);
        assert!(
            expected == Some(data.len()),
            "matrix `{name}` of shape {rows} x {cols} needs {} values but {} were given",
            rows as u128 * cols as u128,
            data.len()
        );
        Matrix {
            name,
            rows,
            cols,
            data,
        }
    }

    /// Returns the value at output row `row` and input column `col`.
    ///
    /// # Panics
    ///
    /// Panics if `row >= self.rows` or `col >= self.cols`.
    pub fn get(&self, row: usize, col: usize) -> f32 {
        assert!(
            row < self.rows && col < self.cols,
            "index [{row}, {col}] is out of bounds for matrix `{}` of shape {} x {}",
            self.name,
            self.rows,
            self.cols
        );
        self.data[row * self.cols + col]
    }
}

/// Name, data type and shape of one tensor in a safetensors file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// Tensor name as stored in the file header.
    pub name: String,
    /// Data type as the safetensors format spells it, such as `"F32"` or `"BF16"`.
    pub dtype: String,
    /// Shape as stored in the file, before any transposition.
    pub shape: Vec<usize>,
}

/// Error from reading a weight file, with the path of the file.
#[derive(Debug)]
pub struct WeightError {
    path: PathBuf,
    kind: WeightErrorKind,
}

/// Cause of a [`WeightError`].
#[derive(Debug)]
#[non_exhaustive]
pub enum WeightErrorKind {
    /// The file does not exist.
    FileNotFound,
    /// Opening or reading the file failed for a reason other than a missing file.
    Io(io::Error),
    /// The file is not a valid safetensors file, for the stated reason.
    InvalidFile(String),
    /// The file contains no tensor with the requested name.
    TensorNotFound {
        tensor: String,
        /// Names in the file that are closest to the requested one, best match first.
        closest: Vec<String>,
        tensor_count: usize,
    },
    /// The tensor has a dimension of size 0, so it contains no values.
    EmptyTensor { tensor: String, shape: Vec<usize> },
    /// The tensor is not 2-D.
    NotTwoDimensional { tensor: String, shape: Vec<usize> },
    /// The tensor's data type is not F32, F16 or BF16.
    UnsupportedDtype { tensor: String, dtype: String },
    /// The tensor contains a NaN or infinite value at `[row, col]` of its stored shape.
    NonFinite {
        tensor: String,
        row: usize,
        col: usize,
        value: f32,
    },
}

impl WeightError {
    fn new(path: &Path, kind: WeightErrorKind) -> WeightError {
        WeightError {
            path: path.to_path_buf(),
            kind,
        }
    }

    /// Path of the weight file that failed to load.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Cause of the failure.
    pub fn kind(&self) -> &WeightErrorKind {
        &self.kind
    }
}

impl fmt::Display for WeightError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = self.path.display();
        match &self.kind {
            WeightErrorKind::FileNotFound => write!(
                f,
                "weight file {path} not found (run `make fetch-models` to download the models, \
                 or set {MODELS_DIR_ENV} to the directory that contains them)"
            ),
            WeightErrorKind::Io(error) => write!(f, "failed to read weight file {path}: {error}"),
            WeightErrorKind::InvalidFile(reason) => write!(
                f,
                "{path} is not a valid safetensors file: {reason} \
                 (if `make fetch-models` downloaded it, run \
                 `python3 scripts/fetch_models.py --force` to download it again)"
            ),
            WeightErrorKind::TensorNotFound {
                tensor,
                closest,
                tensor_count,
            } => {
                write!(f, "tensor `{tensor}` not found in {path}")?;
                if closest.is_empty() {
                    return write!(f, ", which contains no tensors");
                }
                let names: Vec<String> = closest.iter().map(|name| format!("`{name}`")).collect();
                write!(
                    f,
                    ", which contains {}. The closest names are {}",
                    count_noun(*tensor_count, "tensor"),
                    names.join(", ")
                )
            }
            WeightErrorKind::EmptyTensor { tensor, shape } => write!(
                f,
                "tensor `{tensor}` in {path} is empty (shape {shape:?}), so it contains no \
                 weights to load. Choose a tensor whose dimensions are all nonzero"
            ),
            WeightErrorKind::NotTwoDimensional { tensor, shape } => write!(
                f,
                "tensor `{tensor}` in {path} has shape {shape:?}, but a weight matrix must be \
                 2-D. Choose a 2-D tensor such as a linear layer's weight"
            ),
            WeightErrorKind::UnsupportedDtype { tensor, dtype } => write!(
                f,
                "tensor `{tensor}` in {path} has the unsupported dtype {dtype}. \
                 Convert it to F32, F16 or BF16"
            ),
            WeightErrorKind::NonFinite {
                tensor,
                row,
                col,
                value,
            } => write!(
                f,
                "tensor `{tensor}` in {path} contains the non-finite value {value} at \
                 [{row}, {col}] (row and column as stored in the file). Replace the value \
                 or export the weights again"
            ),
        }
    }
}

impl std::error::Error for WeightError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.kind {
            WeightErrorKind::Io(error) => Some(error),
            _ => None,
        }
    }
}

/// Returns the directory that `scripts/fetch_models.py` downloads models into.
///
/// This is `$MICROSCOPIQ_MODELS` if it is set and not empty, else
/// `$HOME/.cache/microscopiq/models`.
pub fn models_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(MODELS_DIR_ENV).filter(|dir| !dir.is_empty()) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME")
        .filter(|home| !home.is_empty())
        .map(PathBuf::from)
        .or_else(std::env::home_dir)
        .unwrap_or_default();
    home.join(".cache").join("microscopiq").join("models")
}

/// Lists the tensors in a safetensors file in the order of their data in the file.
///
/// Only the header is read, so this is cheap even for large files.
pub fn list_tensors(path: &Path) -> Result<Vec<TensorInfo>, WeightError> {
    let file = SafetensorsFile::open(path)?;
    let infos = file
        .names_in_file_order()
        .into_iter()
        .map(|name| {
            let info = file.info(&name);
            TensorInfo {
                dtype: info.dtype.to_string(),
                shape: info.shape.clone(),
                name,
            }
        })
        .collect();
    Ok(infos)
}

/// Loads one 2-D F32, F16 or BF16 tensor by name and returns it as an `[out, in]` matrix.
///
/// F16 and BF16 values are widened exactly to `f32`. An `InOut` tensor is transposed.
/// Returns an error when the file or tensor is missing, the file is malformed, the tensor is
/// empty, not 2-D or of another dtype, or when it contains a NaN or infinite value. The error
/// message names the file and the tensor and suggests a fix.
pub fn load_matrix(path: &Path, name: &str, layout: Layout) -> Result<Matrix, WeightError> {
    let mut file = SafetensorsFile::open(path)?;
    if file.metadata.info(name).is_none() {
        let names = file.names_in_file_order();
        let kind = WeightErrorKind::TensorNotFound {
            tensor: name.to_string(),
            closest: closest_names(name, &names, MAX_SUGGESTIONS),
            tensor_count: names.len(),
        };
        return Err(WeightError::new(path, kind));
    }

    let rows_cols = check_loadable(file.info(name)).map_err(|skip| {
        let kind = skip.into_error_kind(name);
        WeightError::new(path, kind)
    })?;
    file.read_matrix(name, rows_cols, layout)
}

/// Loads every 2-D F32, F16 or BF16 tensor whose name satisfies `keep`, in file order.
///
/// Each returned matrix has at least one row and one column. Kept tensors that cannot be
/// loaded are skipped with an `info:` line on stderr. These are tensors that are empty, not
/// floating-point (such as the I64 `embeddings.position_ids`), or of an unsupported
/// floating-point type such as F64. Tensors that are not 2-D, such as biases, are skipped
/// with one summary line. The result is empty if no tensor qualifies. A NaN or infinite
/// value in a loaded tensor fails the whole call.
pub fn load_all_matrices(
    path: &Path,
    layout: Layout,
    keep: impl Fn(&str) -> bool,
) -> Result<Vec<Matrix>, WeightError> {
    let mut file = SafetensorsFile::open(path)?;
    let mut matrices = Vec::new();
    let mut not_two_dimensional: Vec<(String, Vec<usize>)> = Vec::new();

    for name in file.names_in_file_order() {
        if !keep(&name) {
            continue;
        }
        match check_loadable(file.info(&name)) {
            Ok(rows_cols) => matrices.push(file.read_matrix(&name, rows_cols, layout)?),
            Err(Skip::NotTwoDimensional(shape)) => not_two_dimensional.push((name, shape)),
            Err(skip) => eprintln!("info: skipping tensor `{name}`: {}", skip.reason()),
        }
    }

    if let Some((first_name, first_shape)) = not_two_dimensional.first() {
        eprintln!(
            "info: skipping {} whose shape is not 2-D, such as `{first_name}` with shape \
             {first_shape:?}",
            count_noun(not_two_dimensional.len(), "tensor")
        );
    }
    Ok(matrices)
}

/// Formats a count with a noun that takes a plural `s`, such as "1 tensor" or "3 tensors".
fn count_noun(count: usize, noun: &str) -> String {
    if count == 1 {
        format!("{count} {noun}")
    } else {
        format!("{count} {noun}s")
    }
}

/// Reason why a tensor cannot be loaded as a matrix.
#[derive(Debug)]
enum Skip {
    NotFloat(Dtype),
    UnsupportedFloat(Dtype),
    Empty(Vec<usize>),
    NotTwoDimensional(Vec<usize>),
}

impl Skip {
    fn reason(&self) -> String {
        match self {
            Skip::NotFloat(dtype) => format!("dtype {dtype} is not a floating-point type"),
            Skip::UnsupportedFloat(dtype) => {
                format!("dtype {dtype} is not supported (supported: F32, F16, BF16)")
            }
            Skip::Empty(shape) => format!("empty shape {shape:?}"),
            Skip::NotTwoDimensional(shape) => format!("shape {shape:?} is not 2-D"),
        }
    }

    fn into_error_kind(self, tensor: &str) -> WeightErrorKind {
        let tensor = tensor.to_string();
        match self {
            Skip::NotFloat(dtype) | Skip::UnsupportedFloat(dtype) => {
                WeightErrorKind::UnsupportedDtype {
                    tensor,
                    dtype: dtype.to_string(),
                }
            }
            Skip::Empty(shape) => WeightErrorKind::EmptyTensor { tensor, shape },
            Skip::NotTwoDimensional(shape) => WeightErrorKind::NotTwoDimensional { tensor, shape },
        }
    }
}

/// Checks that a tensor is a non-empty 2-D F32, F16 or BF16 tensor and returns its stored
/// `[rows, cols]`.
fn check_loadable(info: &safetensors::tensor::TensorInfo) -> Result<[usize; 2], Skip> {
    match info.dtype {
        Dtype::F32 | Dtype::F16 | Dtype::BF16 => {}
        Dtype::F64
        | Dtype::F4
        | Dtype::F6_E2M3
        | Dtype::F6_E3M2
        | Dtype::F8_E5M2
        | Dtype::F8_E4M3
        | Dtype::F8_E8M0
        | Dtype::F8_E4M3FNUZ
        | Dtype::F8_E5M2FNUZ => return Err(Skip::UnsupportedFloat(info.dtype)),
        // `Dtype` is non-exhaustive, so a type added by a later safetensors release lands here.
        _ => return Err(Skip::NotFloat(info.dtype)),
    }
    if info.shape.contains(&0) {
        return Err(Skip::Empty(info.shape.clone()));
    }
    match info.shape[..] {
        [rows, cols] => Ok([rows, cols]),
        _ => Err(Skip::NotTwoDimensional(info.shape.clone())),
    }
}

/// An open safetensors file whose header has been parsed and validated.
struct SafetensorsFile<'a> {
    path: &'a Path,
    file: File,
    /// Byte offset in the file where the tensor data section starts.
    data_start: u64,
    metadata: Metadata,
}

impl<'a> SafetensorsFile<'a> {
    /// Opens `path` and parses its header.
    ///
    /// The header is validated by the safetensors crate, which checks that the tensors' byte
    /// ranges are contiguous and match their shapes and dtypes. This function also checks that
    /// the file is exactly as long as the header declares, which catches truncated downloads.
    fn open(path: &'a Path) -> Result<SafetensorsFile<'a>, WeightError> {
        let io_error = |error: io::Error| {
            let kind = if error.kind() == io::ErrorKind::NotFound {
                WeightErrorKind::FileNotFound
            } else {
                WeightErrorKind::Io(error)
            };
            WeightError::new(path, kind)
        };
        let invalid = |reason: String| WeightError::new(path, WeightErrorKind::InvalidFile(reason));

        let mut file = File::open(path).map_err(io_error)?;
        let file_len = file.metadata().map_err(io_error)?.len();
        if file_len < HEADER_LENGTH_BYTES {
            return Err(invalid(format!(
                "the file is {file_len} bytes long, shorter than the 8-byte header length"
            )));
        }

        let mut length_bytes = [0u8; HEADER_LENGTH_BYTES as usize];
        file.read_exact(&mut length_bytes).map_err(io_error)?;
        let header_len = u64::from_le_bytes(length_bytes);
        if header_len > file_len - HEADER_LENGTH_BYTES {
            return Err(invalid(format!(
                "the header length {header_len} exceeds the file size {file_len}"
            )));
        }

        // The check above bounds the allocation by the file size.
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header).map_err(io_error)?;
        let metadata: Metadata = serde_json::from_slice(&header)
            .map_err(|error| invalid(format!("invalid header: {error}")))?;

        let data_start = HEADER_LENGTH_BYTES + header_len;
        let expected_len = data_start + metadata.data_len() as u64;
        if expected_len != file_len {
            return Err(invalid(format!(
                "the header describes {expected_len} bytes but the file is {file_len} bytes long"
            )));
        }

        Ok(SafetensorsFile {
            path,
            file,
            data_start,
            metadata,
        })
    }

    fn names_in_file_order(&self) -> Vec<String> {
        self.metadata.offset_keys()
    }

    /// Returns the header entry of `name`, which must be in the file.
    fn info(&self, name: &str) -> &safetensors::tensor::TensorInfo {
        self.metadata
            .info(name)
            .expect("callers pass only names listed in the header")
    }

    /// Reads a tensor that passed [`check_loadable`], rejects non-finite values and converts
    /// it to an `[out, in]` matrix.
    fn read_matrix(
        &mut self,
        name: &str,
        [stored_rows, stored_cols]: [usize; 2],
        layout: Layout,
    ) -> Result<Matrix, WeightError> {
        let info = self.info(name);
        let dtype = info.dtype;
        let (start, end) = info.data_offsets;

        let mut bytes = vec![0u8; end - start];
        self.file
            .seek(SeekFrom::Start(self.data_start + start as u64))
            .and_then(|_| self.file.read_exact(&mut bytes))
            .map_err(|error| WeightError::new(self.path, WeightErrorKind::Io(error)))?;

        let values = widen_to_f32(dtype, &bytes);
        if let Some(index) = values.iter().position(|value| !value.is_finite()) {
            let kind = WeightErrorKind::NonFinite {
                tensor: name.to_string(),
                row: index / stored_cols,
                col: index % stored_cols,
                value: values[index],
            };
            return Err(WeightError::new(self.path, kind));
        }

        let matrix = match layout {
            Layout::OutIn => Matrix::new(name, stored_rows, stored_cols, values),
            Layout::InOut => {
                let transposed = transpose(&values, stored_rows, stored_cols);
                Matrix::new(name, stored_cols, stored_rows, transposed)
            }
        };
        Ok(matrix)
    }
}

/// Decodes little-endian F32, F16 or BF16 bytes into `f32`.
///
/// Every F16 and BF16 value, including subnormals, is exactly representable in `f32`.
fn widen_to_f32(dtype: Dtype, bytes: &[u8]) -> Vec<f32> {
    let half_bits = || {
        bytes
            .chunks_exact(2)
            .map(|pair| u16::from_le_bytes([pair[0], pair[1]]))
    };
    match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|word| f32::from_le_bytes([word[0], word[1], word[2], word[3]]))
            .collect(),
        Dtype::F16 => half_bits()
            .map(|bits| half::f16::from_bits(bits).to_f32())
            .collect(),
        Dtype::BF16 => half_bits()
            .map(|bits| half::bf16::from_bits(bits).to_f32())
            .collect(),
        other => unreachable!("check_loadable admits only F32, F16 and BF16, not {other}"),
    }
}

/// Transposes a row-major `rows x cols` matrix into a row-major `cols x rows` one.
fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut transposed = Vec::with_capacity(values.len());
    for col in 0..cols {
        for row in 0..rows {
            transposed.push(values[row * cols + col]);
        }
    }
    transposed
}

/// Returns up to `count` names from `names` ordered by edit distance to `target`, keeping
/// the order of `names` among equal distances.
fn closest_names(target: &str, names: &[String], count: usize) -> Vec<String> {
    let mut ranked: Vec<(usize, &String)> = names
        .iter()
        .map(|name| (edit_distance(target, name), name))
        .collect();
    ranked.sort_by_key(|(distance, _)| *distance);
    ranked
        .into_iter()
        .take(count)
        .map(|(_, name)| name.clone())
        .collect()
}

/// Levenshtein distance between two strings, counted in characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    let mut current = vec![0; b.len() + 1];
    for (i, a_char) in a.chars().enumerate() {
        current[0] = i + 1;
        for (j, b_char) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(a_char != *b_char);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        std::mem::swap(&mut previous, &mut current);
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use safetensors::tensor::TensorView;

    /// One tensor to write: name, dtype, shape and little-endian data bytes.
    type RawTensor<'a> = (&'a str, Dtype, Vec<usize>, Vec<u8>);

    /// Writes `tensors` into `dir/name` with the safetensors crate and returns the path.
    fn write_safetensors(dir: &Path, file_name: &str, tensors: &[RawTensor]) -> PathBuf {
        let views: Vec<(&str, TensorView)> = tensors
            .iter()
            .map(|(name, dtype, shape, bytes)| {
                let view =
                    TensorView::new(*dtype, shape.clone(), bytes).expect("valid test tensor");
                (*name, view)
            })
            .collect();
        let path = dir.join(file_name);
        safetensors::serialize_to_file(views, None, &path).expect("write test file");
        path
    }

    fn f32_bytes(values: &[f32]) -> Vec<u8> {
        values
            .iter()
            .flat_map(|value| value.to_le_bytes())
            .collect()
    }

    fn u16_bytes(bits: &[u16]) -> Vec<u8> {
        bits.iter().flat_map(|value| value.to_le_bytes()).collect()
    }

    fn ramp(len: usize) -> Vec<f32> {
        (0..len).map(|i| i as f32 * 0.25 - 1.0).collect()
    }

    #[test]
    fn load_all_skips_empty_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_safetensors(
            dir.path(),
            "empty.safetensors",
            &[
                ("e", Dtype::F32, vec![0], Vec::new()),
                ("w", Dtype::F32, vec![2, 8], f32_bytes(&ramp(16))),
            ],
        );

        let matrices = load_all_matrices(&path, Layout::OutIn, |_| true).unwrap();

        assert_eq!(matrices.len(), 1);
        assert_eq!(matrices[0].name, "w");
        assert_eq!((matrices[0].rows, matrices[0].cols), (2, 8));
        assert_eq!(matrices[0].data, ramp(16));
    }

    #[test]
    fn load_matrix_rejects_empty_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_safetensors(
            dir.path(),
            "empty.safetensors",
            &[
                ("e", Dtype::F32, vec![0], Vec::new()),
                ("w", Dtype::F32, vec![2, 8], f32_bytes(&ramp(16))),
            ],
        );

        let error = load_matrix(&path, "e", Layout::OutIn).unwrap_err();
        let message = error.to_string();

        assert!(matches!(error.kind(), WeightErrorKind::EmptyTensor { .. }));
        assert!(message.contains("`e`"), "{message}");
        assert!(message.contains("empty"), "{message}");
        assert!(message.contains("[0]"), "{message}");
        assert!(message.contains(&path.display().to_string()), "{message}");
    }

    #[test]
    fn load_all_skips_empty_matrix_dimension() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_safetensors(
            dir.path(),
            "zero_rows.safetensors",
            &[("z", Dtype::F32, vec![0, 4], Vec::new())],
        );

        let matrices = load_all_matrices(&path, Layout::InOut, |_| true).unwrap();

        assert!(matrices.is_empty());
    }

    #[test]
    fn bf16_widens_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_safetensors(
            dir.path(),
            "bf16.safetensors",
            &[(
                "b",
                Dtype::BF16,
                vec![1, 3],
                u16_bytes(&[0x3F80, 0xC000, 0x0001]),
            )],
        );

        let matrix = load_matrix(&path, "b", Layout::OutIn).unwrap();

        assert_eq!(matrix.get(0, 0), 1.0);
        assert_eq!(matrix.get(0, 1), -2.0);
        assert_eq!(matrix.get(0, 2).to_bits(), 0x0001_0000);
        assert_eq!(matrix.get(0, 2), 9.18355e-41);
    }

    #[test]
    fn bf16_infinity_rejected_with_index() {
        let dir = tempfile::tempdir().unwrap();
        let bits = [0x3F80, 0x3F80, 0x3F80, 0x3F80, 0x3F80, 0x7F80];
        let path = write_safetensors(
            dir.path(),
            "bf16_inf.safetensors",
            &[("attn.bf16", Dtype::BF16, vec![2, 3], u16_bytes(&bits))],
        );

        let error = load_matrix(&path, "attn.bf16", Layout::OutIn).unwrap_err();
        let message = error.to_string();

        assert!(message.contains("`attn.bf16`"), "{message}");
        assert!(message.contains("[1, 2]"), "{message}");
        assert!(message.contains("inf"), "{message}");
    }

    #[test]
    fn f16_widens_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_safetensors(
            dir.path(),
            "f16.safetensors",
            &[(
                "h",
                Dtype::F16,
                vec![3, 1],
                u16_bytes(&[0x3C00, 0x0001, 0x7BFF]),
            )],
        );

        let matrix = load_matrix(&path, "h", Layout::OutIn).unwrap();

        assert_eq!(matrix.get(0, 0), 1.0);
        assert_eq!(matrix.get(1, 0), 5.9604645e-8);
        assert_eq!(matrix.get(1, 0), 2f32.powi(-24));
        assert_eq!(matrix.get(2, 0), 65504.0);
    }

    #[test]
    fn f16_infinity_rejected_with_index() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_safetensors(
            dir.path(),
            "f16_inf.safetensors",
            &[(
                "mlp.f16",
                Dtype::F16,
                vec![2, 2],
                u16_bytes(&[0x3C00, 0x7C00, 0x3C00, 0x3C00]),
            )],
        );

        let error = load_matrix(&path, "mlp.f16", Layout::OutIn).unwrap_err();
        let message = error.to_string();

        assert!(message.contains("`mlp.f16`"), "{message}");
        assert!(message.contains("[0, 1]"), "{message}");
        assert!(message.contains("inf"), "{message}");
    }

    #[test]
    fn f32_nan_rejected_with_index() {
        let dir = tempfile::tempdir().unwrap();
        let mut values = ramp(12);
        values[7] = f32::NAN;
        let path = write_safetensors(
            dir.path(),
            "nan.safetensors",
            &[("w", Dtype::F32, vec![3, 4], f32_bytes(&values))],
        );

        let error = load_matrix(&path, "w", Layout::OutIn).unwrap_err();
        let message = error.to_string();

        match error.kind() {
            WeightErrorKind::NonFinite {
                row, col, value, ..
            } => {
                assert_eq!((*row, *col), (1, 3));
                assert!(value.is_nan());
            }
            other => panic!("expected NonFinite, got {other:?}"),
        }
        assert!(message.contains("`w`"), "{message}");
        assert!(message.contains("[1, 3]"), "{message}");
        assert!(message.contains("NaN"), "{message}");
    }

    #[test]
    fn nan_index_uses_stored_layout() {
        let dir = tempfile::tempdir().unwrap();
        let mut values = ramp(6);
        values[5] = f32::NAN;
        let path = write_safetensors(
            dir.path(),
            "nan_in_out.safetensors",
            &[("w", Dtype::F32, vec![3, 2], f32_bytes(&values))],
        );

        let message = load_matrix(&path, "w", Layout::InOut)
            .unwrap_err()
            .to_string();

        assert!(message.contains("[2, 1]"), "{message}");
    }

    #[test]
    fn load_all_fails_on_nan() {
        let dir = tempfile::tempdir().unwrap();
        let mut values = ramp(4);
        values[0] = f32::NEG_INFINITY;
        let path = write_safetensors(
            dir.path(),
            "neg_inf.safetensors",
            &[
                ("bad", Dtype::F32, vec![2, 2], f32_bytes(&values)),
                ("good", Dtype::F32, vec![2, 2], f32_bytes(&ramp(4))),
            ],
        );

        let message = load_all_matrices(&path, Layout::OutIn, |_| true)
            .unwrap_err()
            .to_string();

        assert!(message.contains("`bad`"), "{message}");
        assert!(message.contains("[0, 0]"), "{message}");
        assert!(message.contains("-inf"), "{message}");
    }

    #[test]
    fn in_out_tensor_transposed() {
        let dir = tempfile::tempdir().unwrap();
        // Stored as [in = 3, out = 2]: row i contains the weights from input i to outputs 0 and 1.
        let stored = [10.0, 11.0, 20.0, 21.0, 30.0, 31.0];
        let path = write_safetensors(
            dir.path(),
            "in_out.safetensors",
            &[("w", Dtype::F32, vec![3, 2], f32_bytes(&stored))],
        );

        let matrix = load_matrix(&path, "w", Layout::InOut).unwrap();

        assert_eq!((matrix.rows, matrix.cols), (2, 3));
        assert_eq!(matrix.data, vec![10.0, 20.0, 30.0, 11.0, 21.0, 31.0]);
        for input in 0..3 {
            for output in 0..2 {
                assert_eq!(matrix.get(output, input), stored[input * 2 + output]);
            }
        }
    }

    #[test]
    fn out_in_tensor_kept() {
        let dir = tempfile::tempdir().unwrap();
        let stored = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let path = write_safetensors(
            dir.path(),
            "out_in.safetensors",
            &[("w", Dtype::F32, vec![3, 2], f32_bytes(&stored))],
        );

        let matrix = load_matrix(&path, "w", Layout::OutIn).unwrap();

        assert_eq!((matrix.rows, matrix.cols), (3, 2));
        assert_eq!(matrix.data, stored.to_vec());
        assert_eq!(matrix.get(2, 0), 5.0);
    }

    #[test]
    fn missing_file_names_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent").join("model.safetensors");

        let error = load_matrix(&path, "w", Layout::OutIn).unwrap_err();
        let message = error.to_string();

        assert!(matches!(error.kind(), WeightErrorKind::FileNotFound));
        assert_eq!(error.path(), path.as_path());
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains("make fetch-models"), "{message}");
        assert!(list_tensors(&path).is_err());
        assert!(load_all_matrices(&path, Layout::OutIn, |_| true).is_err());
    }

    #[test]
    fn missing_tensor_suggests_close_names() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_safetensors(
            dir.path(),
            "names.safetensors",
            &[
                (
                    "layer.0.dense.weight",
                    Dtype::F32,
                    vec![1, 2],
                    f32_bytes(&[1.0, 2.0]),
                ),
                (
                    "layer.1.dense.weight",
                    Dtype::F32,
                    vec![1, 2],
                    f32_bytes(&[1.0, 2.0]),
                ),
                (
                    "pooler.weight",
                    Dtype::F32,
                    vec![1, 2],
                    f32_bytes(&[1.0, 2.0]),
                ),
            ],
        );

        let error = load_matrix(&path, "layer.0.dense.weights", Layout::OutIn).unwrap_err();
        let message = error.to_string();

        match error.kind() {
            WeightErrorKind::TensorNotFound {
                closest,
                tensor_count,
                ..
            } => {
                assert_eq!(closest[0], "layer.0.dense.weight");
                assert_eq!(*tensor_count, 3);
            }
            other => panic!("expected TensorNotFound, got {other:?}"),
        }
        assert!(message.contains("`layer.0.dense.weights`"), "{message}");
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains("`layer.0.dense.weight`"), "{message}");
    }

    #[test]
    fn non_2d_tensor_rejected_with_shape() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_safetensors(
            dir.path(),
            "shapes.safetensors",
            &[
                ("bias", Dtype::F32, vec![4], f32_bytes(&ramp(4))),
                ("conv", Dtype::F32, vec![2, 2, 2], f32_bytes(&ramp(8))),
            ],
        );

        let bias_message = load_matrix(&path, "bias", Layout::OutIn)
            .unwrap_err()
            .to_string();
        let conv_message = load_matrix(&path, "conv", Layout::OutIn)
            .unwrap_err()
            .to_string();
        let matrices = load_all_matrices(&path, Layout::OutIn, |_| true).unwrap();

        assert!(bias_message.contains("[4]"), "{bias_message}");
        assert!(bias_message.contains("2-D"), "{bias_message}");
        assert!(conv_message.contains("[2, 2, 2]"), "{conv_message}");
        assert!(matrices.is_empty());
    }

    #[test]
    fn integer_tensor_rejected_and_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let ids: Vec<u8> = (0i64..4).flat_map(|id| id.to_le_bytes()).collect();
        let path = write_safetensors(
            dir.path(),
            "ids.safetensors",
            &[
                ("embeddings.position_ids", Dtype::I64, vec![1, 4], ids),
                ("w", Dtype::F32, vec![2, 2], f32_bytes(&ramp(4))),
            ],
        );

        let message = load_matrix(&path, "embeddings.position_ids", Layout::OutIn)
            .unwrap_err()
            .to_string();
        let matrices = load_all_matrices(&path, Layout::OutIn, |_| true).unwrap();

        assert!(message.contains("I64"), "{message}");
        assert!(message.contains("`embeddings.position_ids`"), "{message}");
        assert_eq!(matrices.len(), 1);
        assert_eq!(matrices[0].name, "w");
    }

    #[test]
    fn f64_tensor_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let values: Vec<u8> = [1.0f64, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let path = write_safetensors(
            dir.path(),
            "f64.safetensors",
            &[("d", Dtype::F64, vec![1, 2], values)],
        );

        let message = load_matrix(&path, "d", Layout::OutIn)
            .unwrap_err()
            .to_string();

        assert!(message.contains("F64"), "{message}");
        assert!(load_all_matrices(&path, Layout::OutIn, |_| true)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn load_all_applies_filter() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_safetensors(
            dir.path(),
            "filter.safetensors",
            &[
                ("a.weight", Dtype::F32, vec![2, 2], f32_bytes(&ramp(4))),
                (
                    "b.weight",
                    Dtype::F16,
                    vec![1, 2],
                    u16_bytes(&[0x3C00, 0x4000]),
                ),
                ("c.other", Dtype::F32, vec![2, 2], f32_bytes(&ramp(4))),
            ],
        );

        let matrices =
            load_all_matrices(&path, Layout::OutIn, |name| name.ends_with(".weight")).unwrap();
        let names: Vec<&str> = matrices.iter().map(|m| m.name.as_str()).collect();

        assert_eq!(names, ["a.weight", "b.weight"]);
        assert_eq!(matrices[1].data, vec![1.0, 2.0]);
    }

    #[test]
    fn list_tensors_reports_header() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_safetensors(
            dir.path(),
            "list.safetensors",
            &[
                ("w", Dtype::F32, vec![2, 3], f32_bytes(&ramp(6))),
                ("h", Dtype::BF16, vec![4], u16_bytes(&[0; 4])),
            ],
        );

        let mut infos = list_tensors(&path).unwrap();
        infos.sort_by(|a, b| a.name.cmp(&b.name));

        assert_eq!(
            infos,
            vec![
                TensorInfo {
                    name: "h".into(),
                    dtype: "BF16".into(),
                    shape: vec![4]
                },
                TensorInfo {
                    name: "w".into(),
                    dtype: "F32".into(),
                    shape: vec![2, 3]
                },
            ]
        );
    }

    #[test]
    fn truncated_file_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_safetensors(
            dir.path(),
            "truncated.safetensors",
            &[("w", Dtype::F32, vec![2, 2], f32_bytes(&ramp(4)))],
        );
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 4]).unwrap();

        let error = load_matrix(&path, "w", Layout::OutIn).unwrap_err();
        let message = error.to_string();

        assert!(matches!(error.kind(), WeightErrorKind::InvalidFile(_)));
        assert!(
            message.contains("not a valid safetensors file"),
            "{message}"
        );
    }

    #[test]
    fn garbage_file_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("garbage.safetensors");
        std::fs::write(&path, b"not a safetensors file at all").unwrap();

        let error = load_matrix(&path, "w", Layout::OutIn).unwrap_err();

        assert!(matches!(error.kind(), WeightErrorKind::InvalidFile(_)));
    }

    #[test]
    #[should_panic(expected = "needs 6 values but 5 were given")]
    fn matrix_new_rejects_wrong_length() {
        Matrix::new("m", 2, 3, vec![0.0; 5]);
    }

    #[test]
    #[should_panic(expected = "out of bounds")]
    fn matrix_get_rejects_column_overflow() {
        let matrix = Matrix::new("m", 2, 3, vec![0.0; 6]);
        matrix.get(0, 3);
    }

    #[test]
    fn edit_distance_counts_edits() {
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("weight", "weight"), 0);
    }

    #[test]
    fn layout_serializes_snake_case() {
        assert_eq!(serde_json::to_string(&Layout::InOut).unwrap(), "\"in_out\"");
        assert_eq!(
            serde_json::from_str::<Layout>("\"out_in\"").unwrap(),
            Layout::OutIn
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn in_out_load_is_transpose_of_out_in(
            rows in 1usize..9,
            cols in 1usize..9,
            seed in any::<u32>(),
        ) {
            let values: Vec<f32> = (0..rows * cols)
                .map(|i| (i as f32 + seed as f32 * 1e-3).sin())
                .collect();
            let dir = tempfile::tempdir().unwrap();
            let path = write_safetensors(
                dir.path(),
                "random.safetensors",
                &[("w", Dtype::F32, vec![rows, cols], f32_bytes(&values))],
            );

            let out_in = load_matrix(&path, "w", Layout::OutIn).unwrap();
            let in_out = load_matrix(&path, "w", Layout::InOut).unwrap();

            prop_assert_eq!((in_out.rows, in_out.cols), (cols, rows));
            for row in 0..rows {
                for col in 0..cols {
                    prop_assert_eq!(in_out.get(col, row).to_bits(), out_in.get(row, col).to_bits());
                }
            }
        }
    }

    /// Checks a known value of all-MiniLM-L6-v2 when `make fetch-models` has downloaded it.
    #[test]
    fn minilm_output_dense_weight() {
        let path = models_dir()
            .join("all-MiniLM-L6-v2")
            .join("model.safetensors");
        if !path.exists() {
            println!(
                "skipping: {} not found (run `make fetch-models`)",
                path.display()
            );
            return;
        }

        let matrix =
            load_matrix(&path, "encoder.layer.0.output.dense.weight", Layout::OutIn).unwrap();

        assert_eq!(matrix.rows, 384);
        assert_eq!(matrix.cols, 1536);
        assert!(
            (matrix.get(99, 856) - 7.9148).abs() < 1e-4,
            "value at [99, 856] is {}",
            matrix.get(99, 856)
        );
    }
}
