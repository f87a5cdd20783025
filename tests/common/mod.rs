//! Helpers shared by the workspace integration tests.
#![allow(dead_code)]

use graft::engine::Tensor;
use graft::models::checkpoint::Checkpoint;
use std::path::PathBuf;

pub const FIXTURES: [&str; 4] = ["llama", "mistral", "qwen2", "gemma"];

pub fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The oracle's expected tensors of a fixture.
pub struct Expected(Checkpoint);

impl Expected {
    pub fn load(name: &str) -> Expected {
        Self::open(name, "expected.safetensors")
    }
    /// Another file of expected tensors in the fixture's directory.
    pub fn open(name: &str, file: &str) -> Expected {
        let dir = fixture_dir(name);
        Expected(Checkpoint::open_files(&dir, &[file.to_string()]).expect(file))
    }
    pub fn tensor(&self, name: &str) -> Tensor {
        let (_, e) = self.0.entry(name).unwrap_or_else(|e| panic!("{e}"));
        let shape = e.shape.clone();
        let dtype = graft::models::checkpoint::dtype_of(e.dtype).expect("known dtype");
        if dtype.is_float() {
            self.0.load(name, &shape, graft::ir::DType::F32).unwrap()
        } else {
            self.ints(name, &shape, dtype)
        }
    }
    fn ints(&self, name: &str, shape: &[usize], dtype: graft::ir::DType) -> Tensor {
        // Integer tensors are read raw from the file.
        let (path, _) = self.0.entry(name).unwrap();
        let bytes = std::fs::read(path).unwrap();
        let (_, e) = self.0.entry(name).unwrap();
        Tensor::from_bytes(shape, dtype, &bytes[e.range.clone()]).unwrap()
    }
    pub fn f32(&self, name: &str) -> Vec<f32> {
        self.tensor(name).to_f32_vec().unwrap()
    }
    pub fn i32(&self, name: &str) -> Vec<i32> {
        self.tensor(name).as_i32().unwrap().to_vec()
    }
    pub fn names(&self) -> Vec<String> {
        self.0.names().map(str::to_string).collect()
    }
}

/// ||a - b|| / ||b||; NaN or a length mismatch gives infinity, so it never passes.
pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() || a.iter().chain(b).any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| ((*x - *y) as f64).powi(2))
        .sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-300)).sqrt()
}

/// The f32 logits of one sequence, for comparisons.
pub fn logits(
    model: &graft::models::CausalLm,
    lora: Option<&graft::models::Lora>,
    ids: &[i32],
) -> Vec<f32> {
    let rec = model
        .record(
            ids.len(),
            graft::models::RecordOptions {
                lora,
                ..Default::default()
            },
        )
        .unwrap();
    let batch = graft::models::Batch::new(&[ids], None, 0).unwrap();
    let plan = graft::engine::compile(rec.graph.clone(), &[rec.logits]).unwrap();
    let out = graft::engine::CpuExecutor::new()
        .run(&plan, &rec.feeds(model, lora, &batch).unwrap())
        .unwrap();
    out[0].to_f32_vec().unwrap()
}
