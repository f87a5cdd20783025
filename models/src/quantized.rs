//! bitsandbytes 4-bit (NF4, double quantization) checkpoints as transformers
//! saves them: reading their parts into NF4 tensors, and writing NF4 tensors
//! back as those parts.
//!
//! Per quantized weight `<w>` the checkpoint holds `<w>` (packed codes, u8),
//! `<w>.absmax` (u8 codes), `<w>.quant_map` (the 16 NF4 values),
//! `<w>.nested_absmax` (f32 per 256 blocks), `<w>.nested_quant_map` (256 f32)
//! and `<w>.quant_state.bitsandbytes__nf4` (u8 bytes of a JSON object with
//! quant_type, blocksize, dtype, shape, nested_blocksize, nested_offset).

use crate::checkpoint::Checkpoint;
use crate::ModelError;
use graft_engine::ir::{DType, Nf4Layout, NF4_NESTED_BLOCK};
use graft_engine::kernels::nf4::{Nf4Parts, NF4_CODE};
use graft_engine::Tensor;
use serde_json::{json, Value};
use std::path::Path;

pub const STATE_SUFFIX: &str = "quant_state.bitsandbytes__nf4";
/// The tensors beside an NF4 weight `<w>` that hold its parts: `<w><suffix>`.
pub const PART_SUFFIXES: [&str; 5] = [
    ".absmax",
    ".quant_map",
    ".nested_absmax",
    ".nested_quant_map",
    ".quant_state.bitsandbytes__nf4",
];

/// `quantization_config` of a bitsandbytes 4-bit checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct Bnb4Bit {
    /// `bnb_4bit_compute_dtype`, as written (e.g. "bfloat16").
    pub compute_dtype: Option<String>,
}

/// Reads config.json's `quantization_config`; `None` for an unquantized
/// checkpoint, an error for any quantization Graft cannot read exactly.
pub fn parse_quantization_config(
    q: Option<&Value>,
    path: &Path,
) -> Result<Option<Bnb4Bit>, ModelError> {
    let Some(q) = q.filter(|q| !q.is_null()) else {
        return Ok(None);
    };
    let err = |msg: String| ModelError::Config {
        path: path.to_path_buf(),
        msg,
    };
    let s = |k: &str| q.get(k).and_then(Value::as_str);
    let b = |k: &str| q.get(k).and_then(Value::as_bool);
    match s("quant_method") {
        Some("bitsandbytes") => {}
        other => {
            return Err(err(format!(
                "key `quantization_config.quant_method` is {other:?}; only bitsandbytes 4-bit checkpoints are supported"
            )))
        }
    }
    if b("load_in_8bit") == Some(true) || b("load_in_4bit") != Some(true) {
        return Err(err("key `quantization_config.load_in_4bit` must be true (8-bit checkpoints are not supported)".into()));
    }
    match s("bnb_4bit_quant_type").unwrap_or("fp4") {
        "nf4" => {}
        other => {
            return Err(err(format!(
                "key `quantization_config.bnb_4bit_quant_type` is {other:?}; only nf4 is supported"
            )))
        }
    }
    if b("bnb_4bit_use_double_quant") != Some(true) {
        return Err(err(
            "key `quantization_config.bnb_4bit_use_double_quant` must be true (single quantization is not supported yet)"
                .into(),
        ));
    }
    if let Some(st) = s("bnb_4bit_quant_storage").filter(|st| *st != "uint8") {
        return Err(err(format!(
            "key `quantization_config.bnb_4bit_quant_storage` is {st:?}; only uint8 is supported"
        )));
    }
    Ok(Some(Bnb4Bit {
        compute_dtype: s("bnb_4bit_compute_dtype").map(str::to_string),
    }))
}

/// The `quantization_config` transformers expects for the checkpoints
/// [`write_parts`] produces.
pub fn quantization_config(compute_dtype: &str) -> Value {
    json!({
        "quant_method": "bitsandbytes",
        "load_in_4bit": true,
        "load_in_8bit": false,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": true,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_enable_fp32_cpu_offload": false,
        "llm_int8_has_fp16_weight": false,
        "llm_int8_skip_modules": null,
        "llm_int8_threshold": 6.0,
    })
}

/// Reads the parts of quantized weight `name` (shape `want` from config.json)
/// into an NF4 tensor, checking each against the quant state.
pub fn load_nf4(ckpt: &Checkpoint, name: &str, want: &[usize]) -> Result<Tensor, ModelError> {
    let state_name = format!("{name}.{STATE_SUFFIX}");
    let (path, _, state_bytes) = ckpt.raw(&state_name)?;
    let path = path.to_path_buf();
    let bad = |msg: String| ModelError::Safetensors {
        path: path.clone(),
        msg: format!("tensor `{name}`: {msg}"),
    };
    let state: Value = serde_json::from_slice(state_bytes)
        .map_err(|e| bad(format!("quant state is not JSON: {e}")))?;
    let quant_type = state
        .get("quant_type")
        .and_then(Value::as_str)
        .unwrap_or("?");
    if quant_type != "nf4" {
        return Err(bad(format!(
            "quant_type {quant_type:?} is not supported (only nf4)"
        )));
    }
    let block = state
        .get("blocksize")
        .and_then(Value::as_u64)
        .ok_or_else(|| bad("quant state has no blocksize".into()))? as usize;
    if !(block.is_power_of_two() && (32..=4096).contains(&block)) {
        return Err(bad(format!(
            "blocksize {block} is not supported (32, 64, ..., 4096)"
        )));
    }
    let shape: Vec<usize> = state
        .get("shape")
        .and_then(|s| serde_json::from_value(s.clone()).ok())
        .ok_or_else(|| bad("quant state has no shape".into()))?;
    if shape != want {
        return Err(bad(format!(
            "quant state shape {shape:?} disagrees with config.json's {want:?}"
        )));
    }
    if state.get("nested_blocksize").and_then(Value::as_u64) != Some(NF4_NESTED_BLOCK as u64) {
        return Err(bad(
            "nested_blocksize must be 256 (double quantization)".into()
        ));
    }
    let offset = state
        .get("nested_offset")
        .and_then(Value::as_f64)
        .ok_or_else(|| bad("quant state has no nested_offset".into()))? as f32;
    // The dtype dequantization restores: a float one, as bitsandbytes writes.
    if let Some(d) = state.get("dtype").and_then(Value::as_str) {
        if !["float32", "bfloat16", "float16"].contains(&d) {
            return Err(bad(format!(
                "quant state dtype {d:?} is not a float dtype (float32, bfloat16, float16)"
            )));
        }
    }

    let l = Nf4Layout::new(shape.iter().product(), block);
    let part = |suffix: &str, dtype: DType, len: usize| -> Result<&[u8], ModelError> {
        let part_name = if suffix.is_empty() {
            name.to_string()
        } else {
            format!("{name}.{suffix}")
        };
        let (p, e, bytes) = ckpt.raw(&part_name)?;
        let got = crate::checkpoint::dtype_of(e.dtype);
        if got != Some(dtype) || bytes.len() != dtype.bytes(len) {
            return Err(ModelError::Safetensors {
                path: p.to_path_buf(),
                msg: format!(
                    "tensor `{part_name}` is {:?} {:?} but blocksize {block} and shape {shape:?} need {len} {dtype} values (truncated or mismatched?)",
                    e.dtype, e.shape
                ),
            });
        }
        Ok(bytes)
    };
    let f32s = |b: &[u8]| -> Vec<f32> {
        b.chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    let quant_map = f32s(part("quant_map", DType::F32, 16)?);
    if quant_map
        .iter()
        .zip(NF4_CODE)
        .any(|(a, b)| a.to_bits() != b.to_bits())
    {
        return Err(bad("quant_map is not the NF4 code book".into()));
    }
    let parts = Nf4Parts {
        block,
        packed: part("", DType::U8, l.packed.len())?.to_vec(),
        absmax: part("absmax", DType::U8, l.blocks)?.to_vec(),
        nested_scales: f32s(part("nested_absmax", DType::F32, l.nested_blocks)?),
        offset,
        nested_map: f32s(part("nested_quant_map", DType::F32, 256)?),
    };
    // Every weight value is a code times these scales: one NaN spoils a block.
    for (suffix, v) in [
        ("nested_absmax", &parts.nested_scales),
        ("nested_quant_map", &parts.nested_map),
        ("quant_state.nested_offset", &vec![offset]),
    ] {
        crate::check_finite(&path, &format!("{name}.{suffix}"), v)?;
    }
    // The parts are copied into the tensor: let their source pages go.
    ckpt.release(name);
    for suffix in PART_SUFFIXES {
        ckpt.release(&format!("{name}{suffix}"));
    }
    Ok(Tensor::from_nf4(want, &parts)?)
}

/// The six tensors transformers saves for NF4 weight `name`; `dtype` is the
/// dtype name dequantization restores (e.g. "bfloat16").
pub fn write_parts(
    name: &str,
    t: &Tensor,
    dtype: &str,
) -> Result<Vec<(String, Tensor)>, ModelError> {
    let w = t.nf4()?;
    let f32_tensor = |v: &[f32]| Tensor::from_f32(&[v.len()], v);
    let state = json!({
        "quant_type": "nf4",
        "blocksize": w.block,
        "dtype": dtype,
        "shape": t.shape(),
        "nested_blocksize": NF4_NESTED_BLOCK,
        "nested_dtype": "float32",
        "nested_offset": w.offset as f64,
    });
    let state = serde_json::to_vec(&state).expect("a json! value always serialises");
    Ok(vec![
        (
            name.to_string(),
            Tensor::from_bytes(&[w.packed.len(), 1], DType::U8, w.packed)?,
        ),
        (
            format!("{name}.absmax"),
            Tensor::from_bytes(&[w.absmax.len()], DType::U8, w.absmax)?,
        ),
        (format!("{name}.quant_map"), f32_tensor(&NF4_CODE)?),
        (
            format!("{name}.nested_absmax"),
            f32_tensor(w.nested_scales)?,
        ),
        (
            format!("{name}.nested_quant_map"),
            f32_tensor(w.nested_map)?,
        ),
        (
            format!("{name}.{STATE_SUFFIX}"),
            Tensor::from_bytes(&[state.len()], DType::U8, &state)?,
        ),
    ])
}

/// What [`quantize_checkpoint`] did.
#[derive(Clone, Debug)]
pub struct QuantizeReport {
    /// The source's tensors that config.json's model does not read (left out).
    pub unexpected: Vec<String>,
    pub quantized_tensors: usize,
    pub kept_tensors: usize,
    pub quantized_params: usize,
    /// Bytes of the quantized weights' parts (packed, codes, scales, maps, states).
    pub quantized_bytes: usize,
    pub output_bytes: u64,
}

impl QuantizeReport {
    /// Storage of the quantized weights in bits per parameter, all parts included.
    pub fn bits_per_param(&self) -> f64 {
        8.0 * self.quantized_bytes as f64 / self.quantized_params as f64
    }
}

fn torch_dtype_name(d: DType) -> &'static str {
    match d {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    }
}

/// Turns the f32/bf16/f16 checkpoint in `src` into a bitsandbytes NF4
/// checkpoint in `dst` that transformers loads: the decoder's linear weights
/// quantized with block size `block` (double quantization), everything else
/// kept as stored, config.json given its `quantization_config`, other files
/// (tokenizer, generation config) copied. One weight is converted at a time
/// and source pages are released once used, so the resident set stays near
/// the quantized size plus one tensor.
pub fn quantize_checkpoint(
    src: &Path,
    dst: &Path,
    block: usize,
) -> Result<QuantizeReport, ModelError> {
    // Before anything is read or created.
    graft_engine::kernels::nf4::check_block(block)
        .map_err(|e| ModelError::Input(format!("--block-size: {e}")))?;
    let config_path = src.join("config.json");
    let text =
        std::fs::read_to_string(&config_path).map_err(|e| ModelError::io(&config_path, e))?;
    let config = crate::ModelConfig::parse(&text, &config_path)?;
    if config.quantization.is_some() {
        return Err(ModelError::Config {
            path: config_path,
            msg: "key `quantization_config`: this checkpoint is already quantized".into(),
        });
    }
    if src.canonicalize().ok() == dst.canonicalize().ok() {
        return Err(ModelError::Input(format!(
            "--out {} must differ from --model",
            dst.display()
        )));
    }
    let ckpt = Checkpoint::open(src)?;
    std::fs::create_dir_all(dst).map_err(|e| ModelError::io(dst, e))?;

    let mut out: Vec<(String, Tensor)> = Vec::new();
    let mut report = QuantizeReport {
        unexpected: config.unexpected(ckpt.names()),
        quantized_tensors: 0,
        kept_tensors: 0,
        quantized_params: 0,
        quantized_bytes: 0,
        output_bytes: 0,
    };
    let mut compute_dtype = "float32";
    for (name, shape) in config.expected_tensors() {
        let (path, entry) = ckpt.entry(&name)?;
        let stored = crate::checkpoint::dtype_of(entry.dtype)
            .filter(|d| d.is_float())
            .ok_or_else(|| ModelError::Safetensors {
                path: path.to_path_buf(),
                msg: format!(
                    "tensor `{name}` has dtype {:?}; weights must be F32, BF16 or F16",
                    entry.dtype
                ),
            })?;
        if config.is_linear_weight(&name) {
            let t = ckpt.load_quantized(&name, &shape, block)?;
            compute_dtype = torch_dtype_name(stored);
            let parts = write_parts(&name, &t, compute_dtype)?;
            report.quantized_tensors += 1;
            report.quantized_params += t.numel();
            report.quantized_bytes += parts.iter().map(|(_, p)| p.bytes().len()).sum::<usize>();
            out.extend(parts);
        } else {
            report.kept_tensors += 1;
            out.push((name.clone(), ckpt.load(&name, &shape, stored)?));
        }
    }
    let refs: Vec<(String, &Tensor)> = out.iter().map(|(n, t)| (n.clone(), t)).collect();
    let meta = [("format".to_string(), "pt".to_string())]
        .into_iter()
        .collect();
    let weights = dst.join("model.safetensors");
    crate::checkpoint::write_safetensors_streaming(&weights, &refs, Some(meta), &mut |name| {
        ckpt.release(name)
    })?;
    report.output_bytes = std::fs::metadata(&weights)
        .map_err(|e| ModelError::io(&weights, e))?
        .len();

    let mut json: Value = serde_json::from_str(&text).map_err(|e| ModelError::Config {
        path: config_path.clone(),
        msg: e.to_string(),
    })?;
    json["quantization_config"] = quantization_config(compute_dtype);
    let pretty = serde_json::to_string_pretty(&json).expect("a json value always serialises");
    crate::write_atomically(&dst.join("config.json"), pretty.as_bytes())?;
    copy_side_files(src, dst)?;
    Ok(report)
}

/// Copies what is not weights or config (tokenizer files, generation
/// config, a README): weights in any format (`pytorch_model.bin`, `.pt`,
/// GGUF, …) would be stale beside the new ones, and can be large.
pub(crate) fn copy_side_files(src: &Path, dst: &Path) -> Result<(), ModelError> {
    const WEIGHTS: [&str; 10] = [
        ".safetensors",
        ".bin",
        ".pt",
        ".pth",
        ".ckpt",
        ".gguf",
        ".h5",
        ".msgpack",
        ".onnx",
        ".index.json",
    ];
    for entry in std::fs::read_dir(src).map_err(|e| ModelError::io(src, e))? {
        let path = entry.map_err(|e| ModelError::io(src, e))?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let weights = WEIGHTS.iter().any(|w| name.ends_with(w));
        if path.is_file() && !weights && name != "config.json" {
            let to = dst.join(&name);
            std::fs::copy(&path, &to).map_err(|e| ModelError::Io {
                path: to.clone(),
                msg: format!("copying {}: {e}", path.display()),
            })?;
        }
    }
    Ok(())
}
