//! A QLoRA training step of a Llama-2-7B-shaped model on the GPU (issue 7's
//! check): random NF4 base (hidden 4096, intermediate 11008, 32 heads of
//! 128, vocab 32000), LoRA (or DoRA) r=16 on all seven linears, one sequence of
//! `tokens` tokens, through the GPU executor: forward and backward with the
//! gradients copied back to the host, then the full step with AdamW on the
//! device (adapters resident, only the loss copied back). Prints tokens/s,
//! the device memory held, and the time per op kind of one step.
//! `lomo` / `adalomo` instead time full fine-tuning of the same shape in
//! f32, the update fused into the backward pass, weights and state resident
//! (27 GB of f32 weights at 32 layers: fewer layers fit smaller GPUs).
//!
//! Run: `cargo run --release --example gpu_step -- [tokens=2048] [layers=32] [recompute=1] [lora|dora|lomo|adalomo]`
//! (recompute: 0 keeps every activation, 1 recomputes each layer, 2 times both).

use graft::engine::optim::AdamWConfig;
use graft::engine::{
    compile_fused_with, compile_training_with, CompileOptions, DeviceAdamW, FusedRule, GpuExecutor,
    Tensor,
};
use graft::ir::{AdaLomoSpec, DType};
use graft::models::{
    Batch, CausalLm, LoadOptions, Lora, LoraConfig, ModelConfig, RecordOptions, Targets,
};
use std::path::Path;
use std::time::Instant;

fn arg(i: usize, default: usize) -> Result<usize, String> {
    match std::env::args().nth(i) {
        Some(a) => a.parse().map_err(|_| {
            format!("argument {i} is `{a}`: expected a whole number (see the usage above main)")
        }),
        None => Ok(default),
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Freed tensors' pages are reused, not faulted in again (as `trainer`).
    graft::engine::alloc::retain_freed_memory();
    let (tokens, layers) = (arg(1, 2048)?, arg(2, 32)?);
    let method = std::env::args().nth(4).unwrap_or_else(|| "lora".into());
    let fused = match method.as_str() {
        "lora" | "dora" => None,
        "lomo" => Some(FusedRule::Sgd {
            weight_decay: 0.0,
            clip_value: 0.0,
        }),
        "adalomo" => Some(FusedRule::AdaLomo(AdaLomoSpec::default())),
        other => {
            return Err(
                format!("argument 4 is `{other}`: expected lora, dora, lomo or adalomo").into(),
            )
        }
    };
    let use_dora = method == "dora";
    let modes: &[bool] = match arg(3, 1)? {
        0 => &[false],
        1 => &[true],
        _ => &[true, false],
    };
    let config = format!(
        r#"{{"architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": {layers},
        "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128,
        "vocab_size": 32000, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 4096, "hidden_act": "silu", "tie_word_embeddings": false}}"#
    );
    let config = ModelConfig::parse(&config, Path::new("<7B-shaped config>"))?;
    let t0 = Instant::now();
    let ids: Vec<i32> = (0..tokens as i32)
        .map(|t| (t * 7919 + 13) % 32000)
        .collect();
    let batch = Batch::new(&[&ids], None, 0)?;
    if let Some(rule) = fused {
        return full_fine_tuning(config, rule, &batch, tokens, modes, layers, &method);
    }
    let opts = LoadOptions {
        dtype: DType::BF16,
        quantize: Some(64),
    };
    let model = CausalLm::random(config, &opts, 1)?;
    let lora_cfg = LoraConfig {
        r: 16,
        alpha: 32.0,
        dropout: 0.0,
        targets: Targets::AllLinear,
        use_rslora: false,
        use_dora,
    };
    let mut lora = Lora::init(lora_cfg, &model.config, 2)?;
    if use_dora {
        lora.init_magnitudes(&model)?;
    }
    let rec = model.record(
        tokens,
        RecordOptions {
            lora: Some(&lora),
            train_lora: true,
            loss: true,
            ..Default::default()
        },
    )?;
    let feeds = rec.feeds(&model, Some(&lora), &batch)?;
    println!(
        "{layers} layers, {tokens} tokens, {}: model recorded in {:.1} s",
        if use_dora { "DoRA" } else { "LoRA" },
        t0.elapsed().as_secs_f64()
    );
    for &recompute in modes {
        let o = CompileOptions {
            fuse: true,
            checkpoints: match recompute {
                true => rec.layer_inputs.clone(),
                false => Vec::new(),
            },
        };
        let plan = compile_training_with(rec.graph.clone(), rec.loss.expect("recorded"), &[], &o)?;
        println!(
            "recomputation {recompute}: planned arena {:.2} GB",
            plan.peak_bytes() as f64 / 1e9
        );
        time_steps(&plan, &feeds, tokens)?;
    }
    Ok(())
}

/// Full fine-tuning in f32 with the update fused into the backward pass
/// (`rule`): the plan on a fresh GPU executor, weights and AdaLomo's state
/// resident (`run_resident`), lr 1e-5; the first step (uploads, compiles),
/// then five timed, and the device memory held.
fn full_fine_tuning(
    config: ModelConfig,
    rule: FusedRule,
    batch: &Batch,
    tokens: usize,
    modes: &[bool],
    layers: usize,
    method: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    let t0 = Instant::now();
    let opts = LoadOptions {
        dtype: DType::F32,
        quantize: None,
    };
    let mut model = CausalLm::random(config, &opts, 1)?;
    let rec = model.record(
        tokens,
        RecordOptions {
            train_base: true,
            loss: true,
            ..Default::default()
        },
    )?;
    println!(
        "{layers} layers, {tokens} tokens, {method} (f32 full fine-tuning): model made and recorded in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let scalar = |x: f32| Tensor::from_f32(&[1], &[x]);
    let (lr, one) = (scalar(1e-5)?, scalar(1.0)?);
    for &recompute in modes {
        let o = CompileOptions {
            fuse: true,
            checkpoints: match recompute {
                true => rec.layer_inputs.clone(),
                false => Vec::new(),
            },
        };
        let (plan, inputs) =
            compile_fused_with(rec.graph.clone(), rec.loss.expect("recorded"), rule, &o)?;
        println!(
            "recomputation {recompute}: planned arena {:.2} GB",
            plan.peak_bytes() as f64 / 1e9
        );
        let mut gpu = GpuExecutor::new(0)?;
        let base_mem = gpu.gpu().memory_in_use()?;
        let mut state = inputs.zero_state(&plan);
        let mut times = Vec::new();
        for t in 0..6 {
            let step = scalar((t + 1) as f32)?;
            let mut feeds = rec.feeds_mut(&mut model, batch)?;
            feeds.bind(inputs.lr, &lr).bind(inputs.coef, &one);
            if let Some(s) = inputs.step {
                feeds.bind(s, &step);
            }
            for ((r, c), (rt, ct)) in inputs.state.iter().zip(state.iter_mut()) {
                feeds.bind_mut(*r, rt).bind_mut(*c, ct);
            }
            let t0 = Instant::now();
            let out = gpu.run_resident(&plan, &feeds)?;
            let dt = t0.elapsed().as_secs_f64();
            let loss = out[0].as_f32()?[0];
            assert!(loss.is_finite(), "the loss is not finite");
            if t == 0 {
                println!("first step (uploads, compiles): {dt:.2} s, loss {loss}");
            } else {
                println!("  step {:.1} ms, loss {loss}", dt * 1e3);
                times.push(dt);
            }
        }
        report(
            &format!("{method} step (forward + backward + fused update on the device)"),
            &mut times,
            tokens,
            &gpu,
            base_mem,
        )?;
    }
    Ok(())
}

/// Times `plan` on a fresh GPU executor: the first step (uploads and
/// compiles), five more with where their time went, the device memory the
/// executor holds, and one profiled step by op kind.
fn time_steps(
    plan: &graft::engine::Plan,
    feeds: &graft::engine::Feeds,
    tokens: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut gpu = GpuExecutor::new(0)?;
    let base_mem = gpu.gpu().memory_in_use()?;
    println!("GPU: {} ({})", gpu.gpu().name(), gpu.gpu().arch());
    let t0 = Instant::now();
    let first = gpu.run(plan, feeds)?;
    println!(
        "first step (uploads, compiles): {:.2} s, loss {}",
        t0.elapsed().as_secs_f64(),
        first[0].as_f32()?[0]
    );
    let mut times = Vec::new();
    for _ in 0..5 {
        let t0 = Instant::now();
        let out = gpu.run(plan, feeds)?;
        times.push(t0.elapsed().as_secs_f64());
        assert!(out[0].as_f32()?[0].is_finite(), "the loss is not finite");
        let p = gpu.last_run_phases();
        println!(
            "  step {:.1} ms: upload {:.1} ms, launch + compute {:.1} ms, download {:.1} ms",
            times.last().expect("pushed") * 1e3,
            p.upload * 1e3,
            p.compute * 1e3,
            p.download * 1e3
        );
    }
    report(
        "step (forward + backward, gradients to the host)",
        &mut times,
        tokens,
        &gpu,
        base_mem,
    )?;
    // The full step: AdamW on the device, the adapters resident, only the
    // loss copied back.
    let mut opt = DeviceAdamW::new(AdamWConfig::default());
    gpu.train_step(plan, feeds, &mut opt, 1e-4)?;
    let mut full = Vec::new();
    for _ in 0..5 {
        let t0 = Instant::now();
        let loss = gpu.train_step(plan, feeds, &mut opt, 1e-4)?;
        full.push(t0.elapsed().as_secs_f64());
        assert!(loss.is_finite(), "the loss is not finite");
    }
    report(
        "full training step (forward + backward + AdamW on the device)",
        &mut full,
        tokens,
        &gpu,
        base_mem,
    )?;
    gpu.profile_ops(true);
    gpu.run(plan, feeds)?;
    if let Some(p) = gpu.op_profile() {
        println!(
            "time per op kind of one profiled step (each node waited for):\n{}",
            p.table(40)
        );
    }
    Ok(())
}

/// Prints the median of `times` (seconds per step) as ms and tokens/s, with
/// the device memory held beyond `base_mem` and the executor's own count.
fn report(
    what: &str,
    times: &mut [f64],
    tokens: usize,
    gpu: &GpuExecutor,
    base_mem: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let used = gpu.gpu().memory_in_use()?.saturating_sub(base_mem);
    println!(
        "{what}: median {:.1} ms -> {:.0} tokens/s; device memory held {:.2} GB (executor {:.2} GB)",
        median * 1e3,
        tokens as f64 / median,
        used as f64 / 1e9,
        gpu.device_bytes() as f64 / 1e9
    );
    Ok(())
}
