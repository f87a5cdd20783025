//! safetensors checkpoints: one file or shards listed in
//! `model.safetensors.index.json`, memory-mapped, tensors handed out as
//! zero-copy views where dtype and alignment allow.

use crate::ModelError;
use graft_engine::ir::DType;
use graft_engine::Tensor;
use memmap2::Mmap;
use safetensors::tensor::{Dtype as StDtype, SafeTensors, TensorInfo};
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where one tensor lives in a parsed file.
#[derive(Clone, Debug)]
pub struct TensorEntry {
    pub dtype: StDtype,
    pub shape: Vec<usize>,
    /// Byte range within the whole file.
    pub range: Range<usize>,
}

/// Parses a safetensors buffer's header. Every failure is an error (never a
/// panic), and nothing is allocated beyond the size of `bytes`: this is the
/// fuzzed entry point.
pub fn parse_safetensors(
    bytes: &[u8],
    path: &Path,
) -> Result<BTreeMap<String, TensorEntry>, ModelError> {
    let bad = |msg: String| ModelError::Safetensors {
        path: path.to_path_buf(),
        msg,
    };
    if bytes.len() < 8 {
        return Err(bad(format!(
            "{} bytes is too short for a safetensors file (truncated?)",
            bytes.len()
        )));
    }
    let (header_len, meta) = SafeTensors::read_metadata(bytes).map_err(|e| {
        bad(match e {
            safetensors::SafeTensorError::TensorInvalidInfo => mismatched(bytes)
                .map(|name| {
                    format!("tensor `{name}`: its byte range does not match its dtype and shape")
                })
                .unwrap_or_else(|| describe(&e)),
            e => describe(&e),
        })
    })?;
    let data_start = 8 + header_len;
    let tensors: HashMap<String, &TensorInfo> = meta.tensors();
    Ok(tensors
        .into_iter()
        .map(|(name, info)| {
            let (s, e) = info.data_offsets;
            let entry = TensorEntry {
                dtype: info.dtype,
                shape: info.shape.clone(),
                range: data_start + s..data_start + e,
            };
            (name, entry)
        })
        .collect())
}

/// The first tensor (by name) whose header entry's byte range is not its
/// dtype's size times its element count: what the `safetensors` crate
/// refuses without naming it.
fn mismatched(bytes: &[u8]) -> Option<String> {
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
    let header: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(bytes.get(8..8usize.checked_add(n)?)?).ok()?;
    header.into_iter().find_map(|(name, info)| {
        let dtype: StDtype = serde_json::from_value(info.get("dtype")?.clone()).ok()?;
        let shape: Vec<usize> = serde_json::from_value(info.get("shape")?.clone()).ok()?;
        let offs: [usize; 2] = serde_json::from_value(info.get("data_offsets")?.clone()).ok()?;
        let want = shape
            .iter()
            .try_fold(dtype.bitsize(), |a, &d| a.checked_mul(d))
            .map(|bits| bits.div_ceil(8));
        (Some(offs[1].wrapping_sub(offs[0])) != want).then_some(name)
    })
}

fn describe(e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::MetadataIncompleteBuffer => {
            "the header's offsets do not match the file size (truncated file?)".into()
        }
        E::InvalidHeaderLength => {
            "the header length runs past the end of the file (truncated file?)".into()
        }
        E::InvalidOffset(name) => {
            format!("the header gives tensor `{name}` offsets that are not contiguous")
        }
        E::TensorInvalidInfo => "a tensor's byte range does not match its dtype and shape".into(),
        other => format!("invalid safetensors header: {other}"),
    }
}

/// The graft dtype of a safetensors dtype, for the dtypes weights may have.
pub fn dtype_of(d: StDtype) -> Option<DType> {
    Some(match d {
        StDtype::F32 => DType::F32,
        StDtype::BF16 => DType::BF16,
        StDtype::F16 => DType::F16,
        StDtype::I32 => DType::I32,
        StDtype::U32 => DType::U32,
        StDtype::U8 => DType::U8,
        _ => return None,
    })
}

struct MappedFile {
    path: PathBuf,
    map: Arc<Mmap>,
    tensors: BTreeMap<String, TensorEntry>,
}

/// A checkpoint directory opened for reading.
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<MappedFile>,
    /// Tensor name -> index into `files`.
    index: HashMap<String, usize>,
}

fn map_file(path: &Path) -> Result<MappedFile, ModelError> {
    let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    let len = file.metadata().map_err(|e| ModelError::io(path, e))?.len();
    if len < 8 {
        return Err(ModelError::Safetensors {
            path: path.to_path_buf(),
            msg: format!("{len} bytes is too short for a safetensors file (truncated?)"),
        });
    }
    // SAFETY: the mapping is read-only; a checkpoint rewritten underneath a
    // running process is outside what we can defend against (as every mmap
    // loader, transformers' included).
    let map = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
    let tensors = parse_safetensors(&map, path)?;
    Ok(MappedFile {
        path: path.to_path_buf(),
        map: Arc::new(map),
        tensors,
    })
}

impl Checkpoint {
    /// Opens `DIR/model.safetensors`, else the shards named by
    /// `DIR/model.safetensors.index.json` (transformers' order of choice).
    pub fn open(dir: &Path) -> Result<Self, ModelError> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let names: Vec<String> = if single.exists() {
            vec!["model.safetensors".into()]
        } else if index_path.exists() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| ModelError::io(&index_path, e))?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| ModelError::Config {
                    path: index_path.clone(),
                    msg: e.to_string(),
                })?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::Config {
                    path: index_path.clone(),
                    msg: "key `weight_map` is missing or not an object".into(),
                })?;
            let mut files: Vec<String> = Vec::new();
            for (tensor, file) in map {
                let file = file.as_str().ok_or_else(|| ModelError::Config {
                    path: index_path.clone(),
                    msg: format!("key `weight_map.{tensor}` is not a file name"),
                })?;
                if file.contains('/') || file.contains('\\') || file == ".." {
                    return Err(ModelError::Config {
                        path: index_path.clone(),
                        msg: format!("key `weight_map.{tensor}` names {file:?}, outside the checkpoint directory"),
                    });
                }
                if !files.iter().any(|f| f == file) {
                    files.push(file.to_string());
                }
            }
            files
        } else {
            return Err(ModelError::Io {
                path: single,
                msg: "not found (nor model.safetensors.index.json beside it)".into(),
            });
        };
        Self::open_files(dir, &names)
    }

    /// Opens the given files of `dir` as one checkpoint.
    pub fn open_files(dir: &Path, names: &[String]) -> Result<Self, ModelError> {
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for name in names {
            let f = map_file(&dir.join(name))?;
            for t in f.tensors.keys() {
                if let Some(prev) = index.insert(t.clone(), files.len()) {
                    let prev: &MappedFile = &files[prev];
                    return Err(ModelError::Safetensors {
                        path: f.path.clone(),
                        msg: format!("tensor `{t}` also appears in {}", prev.path.display()),
                    });
                }
            }
            files.push(f);
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            files,
            index,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The file holding `name` and its entry.
    pub fn entry(&self, name: &str) -> Result<(&Path, &TensorEntry), ModelError> {
        let &f = self
            .index
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.to_string(),
                dir: self.dir.clone(),
            })?;
        let file = &self.files[f];
        Ok((&file.path, &file.tensors[name]))
    }

    /// A fingerprint of the weights as stored: every tensor's name, dtype,
    /// shape, and the first and last 4 KiB of its bytes. Cheap on any size
    /// (a few pages per tensor), and it tells apart another model of the
    /// same shapes (a fine-tune changes every weight), which a resumed run
    /// must not silently train on.
    pub fn fingerprint(&self) -> String {
        const EDGE: usize = 4096;
        let mut names: Vec<&str> = self.names().collect();
        names.sort_unstable();
        let mut parts: Vec<Vec<u8>> = Vec::with_capacity(names.len() * 2);
        for name in names {
            let file = &self.files[self.index[name]];
            let e = &file.tensors[name];
            let bytes = &file.map[e.range.clone()];
            let mut head = format!("{name} {:?} {:?}", e.dtype, e.shape).into_bytes();
            head.extend_from_slice(&bytes[..bytes.len().min(EDGE)]);
            parts.push(head);
            parts.push(bytes[bytes.len().saturating_sub(EDGE)..].to_vec());
        }
        let parts: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
        format!("{:016x}", graft_engine::kernels::cache::fnv1a(&parts))
    }

    /// The stored bytes of `name`, with its file and entry.
    pub fn raw(&self, name: &str) -> Result<(&Path, &TensorEntry, &[u8]), ModelError> {
        let (path, e) = self.entry(name)?;
        let file = &self.files[self.index[name]];
        Ok((path, e, &file.map[e.range.clone()]))
    }

    /// Lets the OS drop `name`'s pages from this process's memory: a
    /// streaming pass calls it once a tensor is converted, so the resident set
    /// never holds the whole checkpoint. The bytes stay readable (re-read from
    /// the file on the next access).
    pub fn release(&self, name: &str) {
        if let Some(&f) = self.index.get(name) {
            let file = &self.files[f];
            let range = &file.tensors[name].range;
            // SAFETY: the mapping is read-only and never written, so dropping
            // its pages loses nothing; later reads fault them back in.
            let _ = unsafe {
                file.map.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    range.start,
                    range.len(),
                )
            };
        }
    }

    /// Loads `name`, checking its shape against `want`, converted to `dtype`
    /// (zero-copy when it is stored as `dtype` and aligned).
    pub fn load(&self, name: &str, want: &[usize], dtype: DType) -> Result<Tensor, ModelError> {
        Ok(self.load_stored(name, want)?.to_dtype(dtype)?)
    }

    /// Loads `name` (checked as [`Checkpoint::load_stored`]) quantized to NF4
    /// in blocks of `block`, straight from the mapped file, then lets its
    /// pages go: no float copy of the weight is made, nor kept resident.
    pub fn load_quantized(
        &self,
        name: &str,
        want: &[usize],
        block: usize,
    ) -> Result<Tensor, ModelError> {
        let (path, _) = self.entry(name)?;
        let t = self
            .load_stored(name, want)?
            .quantize_nf4(block)
            .map_err(|e| {
                ModelError::Input(format!(
                    "{}: tensor `{name}`: {}",
                    path.display(),
                    crate::tensor_msg(&e)
                ))
            })?;
        self.release(name);
        Ok(t)
    }

    /// Loads `name` in the dtype it is stored in (zero-copy when aligned):
    /// what quantization reads, so no float copy of a weight is made.
    pub fn load_stored(&self, name: &str, want: &[usize]) -> Result<Tensor, ModelError> {
        let (path, e) = self.entry(name)?;
        if e.shape != want {
            return Err(ModelError::Shape {
                path: path.to_path_buf(),
                name: name.to_string(),
                got: e.shape.clone(),
                want: want.to_vec(),
            });
        }
        let stored =
            dtype_of(e.dtype)
                .filter(|d| d.is_float())
                .ok_or_else(|| ModelError::Safetensors {
                    path: path.to_path_buf(),
                    msg: format!(
                        "tensor `{name}` has dtype {:?}; weights must be F32, BF16 or F16",
                        e.dtype
                    ),
                })?;
        let file = &self.files[self.index[name]];
        Ok(Tensor::mapped(
            file.map.clone(),
            e.range.clone(),
            &e.shape,
            stored,
        )?)
    }
}

/// Writes tensors to a safetensors file atomically (a temporary file renamed
/// into place), with optional string metadata.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, &Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<(), ModelError> {
    write_safetensors_streaming(path, tensors, metadata, &mut |_| {})
}

fn st_dtype(d: DType) -> Option<&'static str> {
    Some(match d {
        DType::F32 => "F32",
        DType::BF16 => "BF16",
        DType::F16 => "F16",
        DType::I32 => "I32",
        DType::U32 => "U32",
        DType::U8 => "U8",
        DType::Nf4 { .. } => return None,
    })
}

/// [`write_safetensors`], calling `written(name)` once each tensor's bytes
/// are out: a caller streaming from a memory-mapped checkpoint releases the
/// source pages there. Tensors are laid out widest dtype first, so every
/// tensor stays aligned for zero-copy reading.
pub fn write_safetensors_streaming(
    path: &Path,
    tensors: &[(String, &Tensor)],
    metadata: Option<HashMap<String, String>>,
    written: &mut dyn FnMut(&str),
) -> Result<(), ModelError> {
    let mut order: Vec<&(String, &Tensor)> = tensors.iter().collect();
    order.sort_by_key(|(_, t)| std::cmp::Reverse(t.dtype().align()));
    let mut header = serde_json::Map::new();
    if let Some(meta) = metadata {
        header.insert("__metadata__".into(), serde_json::json!(meta));
    }
    let mut offset = 0usize;
    for (name, t) in &order {
        let dtype = st_dtype(t.dtype()).ok_or_else(|| ModelError::Safetensors {
            path: path.to_path_buf(),
            msg: format!("tensor `{name}` is nf4: write its bitsandbytes parts instead"),
        })?;
        let len = t.bytes().len();
        let entry = serde_json::json!({"dtype": dtype, "shape": t.shape(), "data_offsets": [offset, offset + len]});
        if header.insert(name.clone(), entry).is_some() {
            return Err(ModelError::Safetensors {
                path: path.to_path_buf(),
                msg: format!("tensor `{name}` given twice"),
            });
        }
        offset += len;
    }
    let mut head = serde_json::to_vec(&header).expect("a json map always serialises");
    // Pad with spaces so the data starts 8-aligned.
    head.resize(head.len().div_ceil(8) * 8, b' ');
    crate::write_atomically_with(path, &mut |w| {
        w.write_all(&(head.len() as u64).to_le_bytes())?;
        w.write_all(&head)?;
        for (name, t) in &order {
            w.write_all(t.bytes())?;
            written(name);
        }
        Ok(())
    })
}
