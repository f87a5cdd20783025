//! Text generation with a key/value cache: the prompt runs once through a
//! plan recorded for its length (prefill), then one plan for a single token
//! runs per new token, attending to the cached keys and values of every
//! earlier position. Greedy, or temperature with nucleus (top-p) sampling.
//! The plans run on the executor given (a GPU keeps the caches and copies
//! only each step's new rows: `Tensor::write_at`).

use crate::data::prepare::Reference;
use crate::run::RunError;
use graft_engine::rng::Rng;
use graft_engine::{compile, Executor, Plan, Tensor};
use graft_models::{Batch, CausalLm, Lora, RecordOptions, Recorded};
use std::collections::HashMap;
use tokenizers::Tokenizer;

/// How the next token is chosen.
#[derive(Clone, Copy, Debug)]
pub struct Sampling {
    /// 0: greedy (the most likely token).
    pub temperature: f32,
    /// Sample from the smallest set of tokens whose probability reaches this.
    pub top_p: f32,
    pub seed: u64,
}

impl Sampling {
    pub const GREEDY: Sampling = Sampling {
        temperature: 0.0,
        top_p: 1.0,
        seed: 0,
    };
}

pub struct Generator<'a> {
    model: &'a CausalLm,
    lora: Option<&'a Lora>,
    /// Rows of the caches: grown (doubling) as generation goes, so a large
    /// `max_new` that stops early costs nothing.
    capacity: usize,
    /// Plans by number of new tokens.
    plans: HashMap<usize, (Recorded, Plan)>,
    /// Per layer, the cached keys and values (`capacity` rows).
    caches: Vec<(Tensor, Tensor)>,
    exec: &'a mut Executor,
}

/// Tokens that end a response: EOS and the chat templates' end-of-turn tokens.
pub fn stop_tokens(tok: &Tokenizer, eos: &str) -> Vec<i32> {
    [eos, "<|im_end|>", "<|eot_id|>", "</s>", "<end_of_turn>"]
        .iter()
        .filter_map(|t| tok.token_to_id(t))
        .map(|i| i as i32)
        .collect()
}

impl<'a> Generator<'a> {
    /// A generator running on `exec`.
    pub fn new(model: &'a CausalLm, lora: Option<&'a Lora>, exec: &'a mut Executor) -> Self {
        Generator {
            model,
            lora,
            capacity: 0,
            plans: HashMap::new(),
            caches: Vec::new(),
            exec,
        }
    }

    /// Caches of at least `need` rows (the rows held are kept); the plans,
    /// recorded for the old size, are made again.
    fn reserve(&mut self, need: usize) -> Result<(), RunError> {
        if need <= self.capacity {
            return Ok(());
        }
        let cap = need.max(self.capacity.saturating_mul(2)).max(64);
        let c = &self.model.config;
        let kv = c.num_kv_heads * c.head_dim;
        let bytes =
            (2 * c.num_layers).saturating_mul(self.model.dtype.bytes(kv).saturating_mul(cap));
        if graft_engine::host_available_bytes().is_some_and(|have| bytes > have) {
            return Err(RunError::Invalid(format!(
                "generating {need} positions needs a key/value cache of {:.2} GB, more than this machine has available: generate fewer tokens",
                bytes as f64 / 1e9
            )));
        }
        let grow = |old: Option<&Tensor>| -> Result<Tensor, RunError> {
            let mut t = Tensor::zeros(&[cap, kv], self.model.dtype);
            if let Some(old) = old {
                t.write_at(0, old.bytes())?;
            }
            Ok(t)
        };
        self.caches = (0..c.num_layers)
            .map(|l| {
                let old = self.caches.get(l);
                Ok((grow(old.map(|o| &o.0))?, grow(old.map(|o| &o.1))?))
            })
            .collect::<Result<_, RunError>>()?;
        self.capacity = cap;
        self.plans.clear();
        Ok(())
    }

    /// Records and compiles the plan for `n` new tokens, once.
    fn prepare(&mut self, n: usize) -> Result<(), RunError> {
        if !self.plans.contains_key(&n) {
            let rec = self.model.record(
                n,
                RecordOptions {
                    lora: self.lora,
                    kv_cache: Some(self.capacity),
                    ..Default::default()
                },
            )?;
            let cache = rec.kv_cache.as_ref().expect("recorded with a cache");
            let mut outs = vec![rec.logits];
            outs.extend(cache.layers.iter().flat_map(|l| [l[2], l[3]]));
            let plan = compile(rec.graph.clone(), &outs)?;
            // Under `--device gpu`, a plan the GPU cannot run is an error;
            // one too large for the memory where it runs, anywhere.
            self.exec.require_gpu(&plan)?;
            self.exec.check_fits(&plan)?;
            self.plans.insert(n, (rec, plan));
        }
        Ok(())
    }

    /// Where the steps of one new token run, in words (the GPU, or the CPU
    /// and why).
    pub fn placement(&mut self) -> Result<String, RunError> {
        self.reserve(1)?;
        self.prepare(1)?;
        Ok(self.exec.placement(&self.plans[&1].1))
    }

    /// Runs `ids` at positions `start..`, appends their keys and values to
    /// the cache and returns the logits of the last one.
    fn forward(&mut self, ids: &[i32], start: usize) -> Result<Vec<f32>, RunError> {
        let n = ids.len();
        self.reserve(start + n)?;
        self.prepare(n)?;
        let (rec, plan) = &self.plans[&n];
        let pos: Vec<i32> = (start..start + n).map(|p| p as i32).collect();
        let batch = Batch {
            ids: Tensor::from_i32(&[n], ids)?,
            positions: Tensor::from_i32(&[n], &pos)?,
            segments: Tensor::from_i32(&[n], &vec![0; n])?,
            labels: Tensor::from_i32(&[n], &vec![-100; n])?,
            seed: Tensor::from_u32(&[1], &[0])?,
        };
        let start_t = Tensor::from_i32(&[1], &[start as i32])?;
        let cache = rec.kv_cache.as_ref().expect("recorded with a cache");
        let out = {
            let mut feeds = rec.feeds(self.model, self.lora, &batch)?;
            feeds.bind(cache.start, &start_t);
            for (l, (kc, vc)) in cache.layers.iter().zip(&self.caches) {
                feeds.bind(l[0], kc).bind(l[1], vc);
            }
            self.exec.run(plan, &feeds)?
        };
        for (i, (kc, vc)) in self.caches.iter_mut().enumerate() {
            for (cache, new) in [(kc, &out[1 + 2 * i]), (vc, &out[2 + 2 * i])] {
                let row = new.bytes().len() / n;
                cache.write_at(start * row, new.bytes())?;
            }
        }
        let vocab = self.model.config.vocab_size;
        let logits = &out[0].as_f32()?[(n - 1) * vocab..];
        // NaN would pick token 0 for ever, silently.
        if let Some(x) = logits.iter().find(|x| !x.is_finite()) {
            return Err(RunError::Invalid(format!(
                "the model's logits at position {} hold {x}: its weights (or the adapter's) hold NaN or inf",
                start + n - 1
            )));
        }
        Ok(logits.to_vec())
    }

    /// Continues `prompt` by up to `max_new` tokens, stopping after a token
    /// of `stop` (which is not returned).
    pub fn generate(
        &mut self,
        prompt: &[i32],
        max_new: usize,
        stop: &[i32],
        sampling: &Sampling,
    ) -> Result<Vec<i32>, RunError> {
        if prompt.is_empty() {
            return Err(RunError::Invalid("the prompt has no tokens".into()));
        }
        let mut rng = Rng::new(sampling.seed);
        let mut logits = self.forward(prompt, 0)?;
        let mut out = Vec::new();
        for _ in 0..max_new {
            let next = pick(&logits, sampling, &mut rng);
            if stop.contains(&next) {
                break;
            }
            out.push(next);
            if out.len() == max_new {
                break;
            }
            logits = self.forward(&[next], prompt.len() + out.len() - 1)?;
        }
        Ok(out)
    }
}

/// The next token from `logits`.
fn pick(logits: &[f32], s: &Sampling, rng: &mut Rng) -> i32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |best, (i, &x)| {
                if x > best.1 {
                    (i, x)
                } else {
                    best
                }
            })
            .0 as i32
    };
    if s.temperature <= 0.0 {
        return argmax();
    }
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(usize, f32)> = logits
        .iter()
        .map(|&x| ((x - m) / s.temperature).exp())
        .enumerate()
        .collect();
    let total: f32 = probs.iter().map(|p| p.1).sum();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    // The nucleus: the most likely tokens until their mass reaches top_p.
    let mut mass = 0.0;
    let mut keep = 0;
    for p in &probs {
        mass += p.1 / total;
        keep += 1;
        if mass >= s.top_p {
            break;
        }
    }
    let probs = &probs[..keep];
    let kept: f32 = probs.iter().map(|p| p.1).sum();
    let mut u = rng.next_f32() * kept;
    for p in probs {
        u -= p.1;
        if u <= 0.0 {
            return p.0 as i32;
        }
    }
    probs[keep - 1].0 as i32
}

/// Text compared for exact match: trimmed, whitespace runs collapsed.
fn normalize(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Exact-match accuracy of greedy answers to `refs`: (correct, total).
pub fn exact_match(
    model: &CausalLm,
    lora: Option<&Lora>,
    tok: &Tokenizer,
    stop: &[i32],
    refs: &[Reference],
    exec: &mut Executor,
) -> Result<(usize, usize), RunError> {
    let answer_len = |r: &Reference| {
        tok.encode(r.answer.as_str(), false)
            .map(|e| e.get_ids().len())
            .unwrap_or(0)
    };
    // Room for the longest answer and one token more (a wrong, longer
    // answer must not pass by being cut).
    let max_new = refs.iter().map(answer_len).max().unwrap_or(0) + 2;
    let mut g = Generator::new(model, lora, exec);
    let mut correct = 0;
    for r in refs {
        let ids = g.generate(&r.prompt, max_new, stop, &Sampling::GREEDY)?;
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        let text = tok
            .decode(&ids, true)
            .map_err(|e| RunError::Invalid(format!("tokenizer: {e}")))?;
        correct += (normalize(&text) == normalize(&r.answer)) as usize;
    }
    Ok((correct, refs.len()))
}
