//! Writing a model back out as a Hugging Face checkpoint: after full
//! fine-tuning, and after merging an adapter into the base weights (NF4
//! weights are dequantized on the way).

use crate::checkpoint::write_safetensors_streaming;
use crate::lora::Lora;
use crate::{CausalLm, ModelError};
use graft_engine::ir::DType;
use graft_engine::Tensor;
use serde_json::Value;
use std::path::Path;

fn torch_name(d: DType) -> &'static str {
    match d {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    }
}

impl CausalLm {
    /// Writes `dir` as a plain (unquantized) HF checkpoint in `dtype`:
    /// model.safetensors, config.json (the source's, without
    /// `quantization_config`) and the source's tokenizer and generation files.
    pub fn save(&self, dir: &Path, dtype: DType) -> Result<(), ModelError> {
        if !dtype.is_float() {
            return Err(ModelError::Input(format!(
                "a checkpoint is saved in a float dtype, not {dtype}"
            )));
        }
        let same = match (self.dir.canonicalize(), dir.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        };
        if same {
            return Err(ModelError::Input(format!(
                "{}: refusing to overwrite the model being read",
                dir.display()
            )));
        }
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
        let config_path = self.dir.join("config.json");
        let text =
            std::fs::read_to_string(&config_path).map_err(|e| ModelError::io(&config_path, e))?;
        let mut json: Value = serde_json::from_str(&text).map_err(|e| ModelError::Config {
            path: config_path.clone(),
            msg: e.to_string(),
        })?;
        if let Some(o) = json.as_object_mut() {
            o.remove("quantization_config");
            o.insert("torch_dtype".into(), torch_name(dtype).into());
            o.insert("dtype".into(), torch_name(dtype).into());
        }
        // Only tensors in another dtype are converted (copied); the rest are
        // written from where they are.
        let mut names: Vec<&String> = self.weights().keys().collect();
        names.sort();
        let converted: Vec<Option<Tensor>> = names
            .iter()
            .map(|n| {
                let t = &self.weights()[*n];
                (t.dtype() != dtype).then(|| t.to_dtype(dtype)).transpose()
            })
            .collect::<Result<_, _>>()?;
        let refs: Vec<(String, &Tensor)> = names
            .iter()
            .zip(&converted)
            .map(|(n, c)| ((*n).clone(), c.as_ref().unwrap_or(&self.weights()[*n])))
            .collect();
        // NaN or inf written out would load without a word and spoil every
        // output: a weight that holds one (a merged adapter that did, or a
        // value past f16's range) is named instead. One tensor at a time.
        for ((name, t), c) in refs.iter().zip(&converted) {
            if let Err(e) = crate::check_finite(&self.dir, name, &t.to_f32_vec()?) {
                let source = &self.weights()[name];
                let fits = c.is_some() && source.to_f32_vec()?.iter().all(|x| x.is_finite());
                return Err(match fits {
                    true => ModelError::Input(format!(
                        "tensor `{name}` has values beyond {dtype}'s range: write it in another dtype (bf16 or f32)"
                    )),
                    false => e,
                });
            }
        }
        let meta = [("format".to_string(), "pt".to_string())]
            .into_iter()
            .collect();
        write_safetensors_streaming(
            &dir.join("model.safetensors"),
            &refs,
            Some(meta),
            &mut |_| {},
        )?;
        let pretty = serde_json::to_string_pretty(&json).expect("a json value always serialises");
        crate::write_atomically(&dir.join("config.json"), pretty.as_bytes())?;
        crate::quantized::copy_side_files(&self.dir, dir)
    }
}

impl Lora {
    /// Folds the adapter into the base: `W ← W + s·B·A` for every adapted
    /// module (DoRA: then each row scaled by `m / ‖W + s·B·A‖_row`), in f32
    /// (an NF4 weight is dequantized first and stays f32).
    pub fn merge_into(&self, model: &mut CausalLm) -> Result<(), ModelError> {
        let s = self.config.scaling();
        for m in &self.modules {
            let name = format!("{}.weight", m.path);
            let dir = model.dir.clone();
            let w =
                model
                    .weights_mut()
                    .get_mut(&name)
                    .ok_or_else(|| ModelError::MissingTensor {
                        name: name.clone(),
                        dir,
                    })?;
            let (out, inp) = (w.shape()[0], w.shape()[1]);
            let mut merged = w.to_f32_vec()?;
            let (a, b) = (m.a.as_f32()?, m.b.as_f32()?);
            let r = m.a.shape()[0];
            for (o, row) in merged.chunks_mut(inp).enumerate().take(out) {
                for k in 0..r {
                    let sb = s * b[o * r + k];
                    if sb != 0.0 {
                        for (x, &ak) in row.iter_mut().zip(&a[k * inp..(k + 1) * inp]) {
                            *x += sb * ak;
                        }
                    }
                }
            }
            if let Some(mag) = &m.magnitude {
                let norms = crate::dora::row_norms(w, a, b, r, s)?;
                for ((row, m), n) in merged.chunks_mut(inp).zip(mag.as_f32()?).zip(norms) {
                    let g = m / n;
                    row.iter_mut().for_each(|x| *x *= g);
                }
            }
            *w = Tensor::from_f32(&[out, inp], &merged)?;
        }
        Ok(())
    }
}
