//! The GPU executor on QLoRA and QDoRA training steps of a Llama-shaped
//! model (head dim 64, GQA, dropout on the adapters): which plans it takes
//! (checked without a GPU), and, on a GPU, the loss and gradients against
//! the CPU's (bf16 and an f32 twin), the eval loss, AdamW steps on the
//! device, and generation with the key/value cache.
//! The GPU part skips with a message where no GPU is usable.
#![cfg(feature = "cuda")]

mod common;

use common::rel_l2;
use graft::engine::optim::{clip_coef, clip_grad_norm, AdamW, AdamWConfig};
use graft::engine::{
    compile, compile_fused, compile_training_with, device_bytes_needed, gpu_unsupported,
    CompileOptions, CpuExecutor, Device, DeviceAdamW, Executor, Feeds, FusedInputs, FusedRule,
    GpuExecutor, Plan, Tensor,
};
use graft::ir::{AdaLomoSpec, DType};
use graft::models::{
    Batch, CausalLm, LoadOptions, Lora, LoraConfig, ModelConfig, RecordOptions, Recorded, Targets,
};
use std::path::Path;

const CONFIG: &str = r#"{
  "architectures": ["LlamaForCausalLM"], "model_type": "llama",
  "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
  "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
  "vocab_size": 1000, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
  "max_position_embeddings": 512, "hidden_act": "silu", "tie_word_embeddings": false
}"#;

fn model() -> CausalLm {
    let config = ModelConfig::parse(CONFIG, Path::new("<test config>")).unwrap();
    let opts = LoadOptions {
        dtype: DType::BF16,
        quantize: Some(64),
    };
    CausalLm::random(config, &opts, 5).unwrap()
}

fn lora(m: &CausalLm, use_dora: bool) -> Lora {
    let cfg = LoraConfig {
        r: 8,
        alpha: 16.0,
        dropout: 0.1,
        targets: Targets::AllLinear,
        use_rslora: false,
        use_dora,
    };
    let mut lora = Lora::init(cfg, &m.config, 7).unwrap();
    if use_dora {
        lora.init_magnitudes(m).unwrap();
    }
    // B away from zero, so every adapter term (and its gradient) matters.
    for (i, md) in lora.modules.iter_mut().enumerate() {
        let b = md.b.as_f32_mut().unwrap();
        b.iter_mut()
            .enumerate()
            .for_each(|(j, x)| *x = ((i + j) % 7) as f32 * 0.01 - 0.03);
    }
    lora
}

/// Two sequences of 80 tokens: 160 rows, ragged against every 64-row tile.
fn batch() -> Batch {
    batch_k(0)
}

/// Another micro-batch of the same shape for each `k`.
fn batch_k(k: i32) -> Batch {
    let seqs: Vec<Vec<i32>> = (0..2)
        .map(|s| {
            (0..80)
                .map(|t| (s * 311 + t * 37 + k * 101) % 1000)
                .collect()
        })
        .collect();
    let refs: Vec<&[i32]> = seqs.iter().map(Vec::as_slice).collect();
    Batch::new(&refs, None, 3 + k as u32).unwrap()
}

/// A GPU executor, or None with a visible message where no GPU is usable.
fn gpu() -> Option<GpuExecutor> {
    GpuExecutor::new(0)
        .map_err(|e| eprintln!("SKIPPED (no usable GPU): {e}"))
        .ok()
}

/// The eval plan `trainer run` measures its eval loss with: the forward
/// pass and the loss (cross-entropy of f32 logits), no gradients.
fn eval(m: &CausalLm, lora: &Lora) -> (Recorded, Plan) {
    let opts = RecordOptions {
        lora: Some(lora),
        loss: true,
        ..Default::default()
    };
    let rec = m.record(batch().tokens(), opts).unwrap();
    let plan = compile(rec.graph.clone(), &[rec.loss.unwrap()]).unwrap();
    (rec, plan)
}

fn step(m: &CausalLm, lora: &Lora, dropout: bool, recompute: bool) -> (Recorded, Plan) {
    let opts = RecordOptions {
        lora: Some(lora),
        train_lora: true,
        loss: true,
        dropout,
        ..Default::default()
    };
    let rec = m.record(batch().tokens(), opts).unwrap();
    let o = CompileOptions {
        fuse: true,
        checkpoints: match recompute {
            true => rec.layer_inputs.clone(),
            false => Vec::new(),
        },
    };
    let plan = compile_training_with(rec.graph.clone(), rec.loss.unwrap(), &[], &o).unwrap();
    (rec, plan)
}

#[test]
fn every_node_of_a_qlora_or_qdora_step_has_a_gpu_kernel() {
    let m = model();
    for use_dora in [false, true] {
        let l = lora(&m, use_dora);
        for (dropout, recompute) in [(false, false), (true, false), (true, true)] {
            let (_, plan) = step(&m, &l, dropout, recompute);
            let missing = gpu_unsupported(&plan);
            assert!(
                missing.is_empty(),
                "dora={use_dora} dropout={dropout} recompute={recompute}: {missing:?}"
            );
        }
        let (_, plan) = eval(&m, &l);
        let missing = gpu_unsupported(&plan);
        assert!(missing.is_empty(), "dora={use_dora} eval: {missing:?}");
    }
}

/// Every elementwise chain of the QLoRA and QDoRA steps (with and without
/// recomputation) and of their eval plans: its generated CUDA source
/// compiles with NVRTC for every architecture (no GPU needed; skipped
/// without NVRTC unless GRAFT_REQUIRE_NVRTC is set, as CI sets it).
#[test]
fn every_generated_chain_compiles() {
    use graft::engine::kernels::cuda::{compile_ptx, GpuError, ARCHS};
    let m = model();
    let mut sources = std::collections::BTreeMap::new();
    for use_dora in [false, true] {
        let l = lora(&m, use_dora);
        let plans = [
            step(&m, &l, true, false).1,
            step(&m, &l, true, true).1,
            eval(&m, &l).1,
        ];
        for plan in &plans {
            let g = plan.graph();
            for &n in plan.schedule() {
                if let graft::ir::Op::Elementwise(p) = &g.node(n).op {
                    let dtypes: Vec<DType> = g.node(n).inputs.iter().map(|&i| g.dtype(i)).collect();
                    let (name, src) = graft::engine::chain::kernel_name(p, &dtypes).unwrap();
                    sources.insert(name, src);
                }
            }
        }
    }
    assert!(sources.len() >= 4, "{} distinct chains", sources.len());
    for (name, src) in &sources {
        for arch in ARCHS {
            match compile_ptx(name, src, arch) {
                Ok(ptx) => assert!(ptx.contains(&format!(".entry {name}")), "{name} {arch}"),
                Err(GpuError::NoNvrtc) if std::env::var("GRAFT_REQUIRE_NVRTC").is_err() => {
                    eprintln!("SKIPPED: {}", GpuError::NoNvrtc);
                    return;
                }
                Err(e) => panic!("{e}\n{src}"),
            }
        }
    }
    let longest = sources.values().max_by_key(|s| s.len()).expect("chains");
    eprintln!(
        "{} generated chains compiled for {ARCHS:?}; the longest:\n{longest}",
        sources.len()
    );
}

#[test]
fn a_plan_the_gpu_cannot_run_is_refused_naming_its_nodes() {
    // Heads of 16: the GPU's attention kernels take 32, 64 and 128.
    let config = ModelConfig::parse(
        &CONFIG.replace(r#""head_dim": 64"#, r#""head_dim": 16"#),
        Path::new("<test config>"),
    )
    .unwrap();
    let opts = LoadOptions {
        dtype: DType::BF16,
        quantize: Some(64),
    };
    let m = CausalLm::random(config, &opts, 5).unwrap();
    let l = lora(&m, false);
    let (rec, plan) = step(&m, &l, false, false);
    let missing = gpu_unsupported(&plan);
    let names: Vec<&str> = missing
        .iter()
        .map(|(n, _)| plan.graph().node(*n).op.name())
        .collect();
    assert!(
        names.contains(&"attention") && !names.contains(&"embedding"),
        "{missing:?}"
    );
    assert!(
        missing.iter().all(|(_, why)| why.contains("head dim 16")),
        "{missing:?}"
    );
    // Without a GPU, opening one says what is missing and how to go on;
    // with one, running the plan names the first node it cannot run.
    match GpuExecutor::new(0) {
        Err(e) => assert!(e.to_string().contains("--device cpu"), "{e}"),
        Ok(mut gpu) => {
            let err = gpu
                .run(&plan, &rec.feeds(&m, Some(&l), &batch()).unwrap())
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(names[0]) && err.contains("--device cpu"),
                "{err}"
            );
        }
    }
}

/// The same model computing in f32: the same NF4 codes (the random draws do
/// not depend on the dtype) and the bf16 model's other weights widened.
fn model_f32(m: &CausalLm) -> CausalLm {
    let opts = LoadOptions {
        dtype: DType::F32,
        quantize: Some(64),
    };
    let mut f = CausalLm::random(m.config.clone(), &opts, 5).unwrap();
    for (name, w) in f.weights_mut().iter_mut() {
        if w.dtype() == DType::F32 {
            *w = m.weight(name).unwrap().to_dtype(DType::F32).unwrap();
        }
    }
    f
}

/// `Executor`: `Auto` runs on the GPU where one opens and otherwise on the
/// CPU, saying why; `Gpu` without one is one error naming what is missing;
/// `Cpu` is the CPU executor. The same step's loss either way.
#[test]
fn the_executor_picks_its_device() {
    let (m, b) = (model(), batch());
    let l = lora(&m, false);
    let (rec, plan) = step(&m, &l, true, false);
    let feeds = rec.feeds(&m, Some(&l), &b).unwrap();
    let loss = |t: Vec<Tensor>| t[0].as_f32().unwrap()[0];
    let want = loss(CpuExecutor::new().run(&plan, &feeds).unwrap());
    let mut cpu = Executor::new(Device::Cpu).unwrap();
    assert_eq!(cpu.placement(&plan), "CPU");
    assert_eq!(loss(cpu.run(&plan, &feeds).unwrap()), want);
    let mut auto = Executor::new(Device::Auto).unwrap();
    let place = auto.placement(&plan);
    let got = loss(auto.run(&plan, &feeds).unwrap());
    match GpuExecutor::new(0) {
        Err(e) => {
            assert!(place.starts_with("CPU; no usable GPU"), "{place}");
            assert_eq!(got, want, "auto without a GPU is the CPU");
            let e2 = Executor::new(Device::Gpu).err().expect("no GPU opens");
            assert!(e2.to_string().contains("--device cpu"), "{e} / {e2}");
        }
        Ok(_) => {
            assert!(place.starts_with("GPU"), "{place}");
            assert!(
                ((got - want) / want).abs() < 1e-2,
                "auto on the GPU: {got} vs {want}"
            );
        }
    }
}

/// The reference the GPU test measures against: the CPU's bf16 step is
/// close to its f32 twin (same NF4 codes), so the twin is the same model.
#[test]
fn the_f32_twin_computes_the_same_step() {
    let (m, b) = (model(), batch());
    let m32 = model_f32(&m);
    for use_dora in [false, true] {
        let l = lora(&m, use_dora);
        let (rec, plan) = step(&m, &l, true, false);
        let (rec32, plan32) = step(&m32, &l, true, false);
        let bf = CpuExecutor::new()
            .run(&plan, &rec.feeds(&m, Some(&l), &b).unwrap())
            .unwrap();
        let f = CpuExecutor::new()
            .run(&plan32, &rec32.feeds(&m32, Some(&l), &b).unwrap())
            .unwrap();
        let (lb, lf) = (bf[0].as_f32().unwrap()[0], f[0].as_f32().unwrap()[0]);
        assert!(((lb - lf) / lf).abs() < 1e-2, "loss bf16 {lb} f32 {lf}");
        for (i, (x, y)) in bf.iter().zip(&f).enumerate().skip(1) {
            let e = rel_l2(&x.to_f32_vec().unwrap(), &y.to_f32_vec().unwrap());
            let name = plan.graph().leaf_name(plan.grads()[i - 1].0).unwrap_or("?");
            eprintln!("dora={use_dora}: gradient of {name}: bf16 to f32 rel L2 {e:.2e}");
            assert!(
                e < 3e-2,
                "dora={use_dora}: gradient of {name}: bf16 to f32 rel L2 {e}"
            );
        }
    }
}

/// The f32 twin's step (NF4 weights under f32 compute: each weight
/// dequantized to f32, bit for bit the CPU's values, then cuBLAS's f32
/// products) runs whole on the GPU (checked without one). On a GPU, QLoRA
/// and QDoRA with and without dropout: the loss within 1e-5 of the CPU's
/// f32 step and every adapter gradient within 1e-4 relative L2 (f32 sums
/// in another order through a whole step).
#[test]
fn the_f32_step_on_the_gpu_matches_the_cpu() {
    let m32 = model_f32(&model());
    let b = batch();
    let mut gpu = gpu();
    for (use_dora, dropout) in [(false, true), (false, false), (true, true), (true, false)] {
        let l = lora(&m32, use_dora);
        let (rec, plan) = step(&m32, &l, dropout, false);
        let missing = gpu_unsupported(&plan);
        assert!(missing.is_empty(), "dora={use_dora}: {missing:?}");
        let Some(gpu) = gpu.as_mut() else { continue };
        let what = format!("f32 step dora={use_dora} dropout={dropout}");
        let feeds = rec.feeds(&m32, Some(&l), &b).unwrap();
        let want = CpuExecutor::new().run(&plan, &feeds).unwrap();
        let got = gpu.run(&plan, &feeds).unwrap();
        let loss = |t: &[Tensor]| t[0].as_f32().unwrap()[0];
        let (lg, lc) = (loss(&got), loss(&want));
        eprintln!("{what}: loss GPU {lg} CPU {lc}");
        assert!(
            ((lg - lc) / lc).abs() < 1e-5,
            "{what}: loss GPU {lg} CPU {lc}"
        );
        let mut worst = 0f64;
        for (i, (g, c)) in got.iter().zip(&want).enumerate().skip(1) {
            let e = rel_l2(&g.to_f32_vec().unwrap(), &c.to_f32_vec().unwrap());
            let name = plan.graph().leaf_name(plan.grads()[i - 1].0).unwrap_or("?");
            assert!(e < 1e-4, "{what}: gradient of {name}: rel L2 {e:e}");
            worst = worst.max(e);
        }
        eprintln!("{what}: worst gradient rel L2 vs the CPU {worst:.2e}");
    }
}

/// The GPU's bf16 step against an f32 step of the same model on the CPU,
/// beside the CPU's own bf16 step: loss and every adapter gradient. Two
/// bf16 computations differ from each other by about as much as each
/// differs from f32, so the bound is the CPU's distance to f32: the GPU
/// must be no further than twice it (+ 1e-3 for gradients near zero). The
/// GPU rounds some partial sums to bf16 that the CPU keeps in f32 (each
/// cuBLAS product of a group rounds its output), so it may be somewhat
/// further; a wrong term or index is off by far more.
#[test]
fn gpu_step_matches_the_cpu_step() {
    let Some(mut gpu) = gpu() else { return };
    let (m, b) = (model(), batch());
    let m32 = model_f32(&m);
    // Every case runs before the verdict, so one GPU run shows them all.
    let mut failed = Vec::new();
    for (use_dora, dropout) in [(false, true), (false, false), (true, true), (true, false)] {
        let mut l = lora(&m, use_dora);
        let (rec, plan) = step(&m, &l, dropout, false);
        let (rec32, plan32) = step(&m32, &l, dropout, false);
        // Twice: the second run after the adapters changed, so trainable
        // parameters must be uploaded again while the base stays resident.
        for round in 0..2 {
            let what = format!("dora={use_dora} dropout={dropout} round {round}");
            let feeds = rec.feeds(&m, Some(&l), &b).unwrap();
            let cpu = CpuExecutor::new().run(&plan, &feeds).unwrap();
            let f32_ref = CpuExecutor::new()
                .run(&plan32, &rec32.feeds(&m32, Some(&l), &b).unwrap())
                .unwrap();
            let got = match gpu.run(&plan, &feeds) {
                Ok(got) => got,
                Err(e) => {
                    failed.push(format!("{what}: {e}"));
                    continue;
                }
            };
            assert_eq!(cpu.len(), got.len());
            let loss = |t: &[graft::engine::Tensor]| t[0].as_f32().unwrap()[0];
            let (lg, lc, lf) = (loss(&got), loss(&cpu), loss(&f32_ref));
            eprintln!("{what}: loss GPU {lg} CPU bf16 {lc} CPU f32 {lf}");
            if !(lg.is_finite() && ((lg - lf) / lf).abs() < 1e-2) {
                failed.push(format!("{what}: loss GPU {lg} against f32 {lf}"));
            }
            let mut worst = (0f64, 0f64, "");
            for (i, ((g, c), f)) in got.iter().zip(&cpu).zip(&f32_ref).enumerate().skip(1) {
                let f = f.to_f32_vec().unwrap();
                let e_gpu = rel_l2(&g.to_f32_vec().unwrap(), &f);
                let e_cpu = rel_l2(&c.to_f32_vec().unwrap(), &f);
                let name = plan.graph().leaf_name(plan.grads()[i - 1].0).unwrap_or("?");
                assert_eq!(
                    plan32.graph().leaf_name(plan32.grads()[i - 1].0),
                    Some(name)
                );
                eprintln!("{what}: gradient of {name}: rel L2 to f32: GPU {e_gpu:.2e}, CPU bf16 {e_cpu:.2e}");
                if e_gpu >= 2.0 * e_cpu + 1e-3 || e_gpu >= 3e-2 {
                    failed.push(format!(
                        "{what}: gradient of {name}: GPU {e_gpu:.2e} from f32, CPU bf16 {e_cpu:.2e}"
                    ));
                }
                if e_gpu > worst.0 {
                    worst = (e_gpu, e_cpu, name);
                }
            }
            eprintln!(
                "{what}: {} gradients, worst rel L2 to f32 GPU {:.2e} (CPU bf16 {:.2e}) in {}",
                got.len() - 1,
                worst.0,
                worst.1,
                worst.2
            );
            for md in l.modules.iter_mut() {
                md.b.as_f32_mut()
                    .unwrap()
                    .iter_mut()
                    .for_each(|x| *x *= -2.0);
            }
        }
    }
    assert!(failed.is_empty(), "{failed:#?}");
}

/// The eval loss on the GPU against the CPU's bf16 and f32 ones; then, on
/// the same executor, a training step (another plan of the same model,
/// whose value ids differ) and the eval again after the adapters changed
/// in place, as `trainer run` does between evaluations: the GPU must see
/// the new adapters, not its earlier copies.
#[test]
fn gpu_eval_loss_matches_the_cpu() {
    let Some(mut gpu) = gpu() else { return };
    let (m, b) = (model(), batch());
    let m32 = model_f32(&m);
    let loss = |t: Vec<Tensor>| t[0].as_f32().unwrap()[0];
    let mut l = lora(&m, false);
    for (use_dora, round) in [(false, 0), (false, 1), (true, 0), (true, 1)] {
        if round == 0 {
            l = lora(&m, use_dora);
        }
        let (rec, plan) = eval(&m, &l);
        let (rec32, plan32) = eval(&m32, &l);
        let feeds = rec.feeds(&m, Some(&l), &b).unwrap();
        let got = loss(gpu.run(&plan, &feeds).unwrap());
        let cpu = loss(CpuExecutor::new().run(&plan, &feeds).unwrap());
        let f32_ref = loss(
            CpuExecutor::new()
                .run(&plan32, &rec32.feeds(&m32, Some(&l), &b).unwrap())
                .unwrap(),
        );
        eprintln!(
            "dora={use_dora} round {round}: eval loss: GPU {got}, CPU bf16 {cpu}, CPU f32 {f32_ref}"
        );
        let (e_gpu, e_cpu) = ((got - f32_ref).abs(), (cpu - f32_ref).abs());
        assert!(
            got.is_finite() && e_gpu <= 1.5 * e_cpu + 1e-3 * f32_ref.abs(),
            "dora={use_dora} round {round}: eval loss: GPU {got}, CPU bf16 {cpu}, f32 {f32_ref}"
        );
        // A training step's plan on the same executor, then new adapters
        // written in place (their host addresses unchanged).
        let (srec, splan) = step(&m, &l, false, false);
        gpu.run(&splan, &srec.feeds(&m, Some(&l), &b).unwrap())
            .unwrap();
        for md in l.modules.iter_mut() {
            md.b.as_f32_mut()
                .unwrap()
                .iter_mut()
                .for_each(|x| *x = -3.0 * *x + 0.01);
        }
    }
}

/// `train_step` keeps the adapters on the device and updates them there:
/// each step equals the host's AdamW applied to the GPU's own gradients of
/// the same parameters, and later steps read the device's parameters, not
/// the stale ones the feeds still bind. The last step is the trainer's with
/// `grad_accum = 2`: two micro-batches' gradients summed with weights,
/// clipped to a global norm (and to a value) and applied, against the
/// trainer's host arithmetic on the same gradients (`clip_grad_norm`, the
/// clamp, `AdamW`).
#[test]
fn device_adamw_steps_match_the_host_optimizer() {
    let (Some(mut trainer), Some(mut reference)) = (gpu(), gpu()) else {
        return;
    };
    let (m, b) = (model(), batch());
    let l = lora(&m, false);
    let (rec, plan) = step(&m, &l, false, false);
    let feeds = rec.feeds(&m, Some(&l), &b).unwrap();
    let mut host: Vec<Tensor> = plan
        .grads()
        .iter()
        .map(|&(p, _)| feeds.get(p).unwrap().clone())
        .collect();
    let sizes: Vec<usize> = host.iter().map(Tensor::numel).collect();
    let mut adam = AdamW::new(AdamWConfig::default(), &sizes);
    let mut dev = DeviceAdamW::new(AdamWConfig::default());
    let lr = 1e-3;
    for round in 0..3 {
        // The reference: the GPU's gradients of the host's parameters.
        let mut grads_of = |b: &Batch, host: &[Tensor]| {
            let mut f = rec.feeds(&m, Some(&l), b).unwrap();
            for (&(p, _), t) in plan.grads().iter().zip(host) {
                f.bind(p, t);
            }
            let out = reference.run(&plan, &f).unwrap();
            let grads: Vec<Vec<f32>> = out[1..].iter().map(|t| t.to_f32_vec().unwrap()).collect();
            (out[0].as_f32().unwrap()[0], grads)
        };
        let (loss, loss_ref) = if round < 2 {
            let (loss_ref, grads) = grads_of(&b, &host);
            let mut params: Vec<&mut [f32]> =
                host.iter_mut().map(|t| t.as_f32_mut().unwrap()).collect();
            let g: Vec<&[f32]> = grads.iter().map(Vec::as_slice).collect();
            adam.step(&mut params, &g, lr).unwrap();
            // The original feeds: stale from the second round on.
            let loss = trainer.train_step(&plan, &feeds, &mut dev, lr).unwrap();
            (loss, loss_ref)
        } else {
            let (b0, b1) = (batch_k(1), batch_k(2));
            let w = [0.375f32, 0.625];
            let (l0, g0) = grads_of(&b0, &host);
            let (l1, g1) = grads_of(&b1, &host);
            let mut acc: Vec<Vec<f32>> = g0
                .iter()
                .map(|g| g.iter().map(|x| w[0] * x).collect())
                .collect();
            for (a, g) in acc.iter_mut().zip(&g1) {
                a.iter_mut().zip(g).for_each(|(a, g)| *a += w[1] * g);
            }
            let loss = trainer
                .accumulate(&plan, &rec.feeds(&m, Some(&l), &b0).unwrap(), w[0], true)
                .unwrap()
                * w[0]
                + trainer
                    .accumulate(&plan, &rec.feeds(&m, Some(&l), &b1).unwrap(), w[1], false)
                    .unwrap()
                    * w[1];
            let norm = trainer.grad_norm(&plan).unwrap();
            let mut views: Vec<&mut [f32]> = acc.iter_mut().map(Vec::as_mut_slice).collect();
            let max_norm = 0.5 * norm;
            let host_norm = clip_grad_norm(&mut views, max_norm);
            eprintln!("accumulated: gradient norm GPU {norm}, host {host_norm}");
            assert!(
                ((norm - host_norm) / host_norm).abs() < 1e-9,
                "norm {norm} vs {host_norm}"
            );
            let max_value = 0.5 * acc.iter().flatten().fold(0f32, |m, x| m.max(x.abs()));
            acc.iter_mut()
                .flatten()
                .for_each(|x| *x = x.clamp(-max_value, max_value));
            let mut params: Vec<&mut [f32]> =
                host.iter_mut().map(|t| t.as_f32_mut().unwrap()).collect();
            let g: Vec<&[f32]> = acc.iter().map(Vec::as_slice).collect();
            adam.step(&mut params, &g, lr).unwrap();
            let coef = clip_coef(norm, max_norm);
            assert!(coef < 1.0, "clipping must act: coef {coef}");
            trainer
                .adamw_step(&plan, &mut dev, lr, coef, max_value)
                .unwrap();
            (loss, w[0] * l0 + w[1] * l1)
        };
        eprintln!("round {round}: loss {loss} (reference {loss_ref})");
        assert!(
            ((loss - loss_ref) / loss_ref).abs() < 1e-6,
            "round {round}: loss {loss} vs {loss_ref}"
        );
        let got = trainer.download_params(&plan).unwrap();
        assert_eq!(got.len(), host.len());
        for ((name, t), want) in got.iter().zip(&host) {
            let e = rel_l2(&t.to_f32_vec().unwrap(), &want.to_f32_vec().unwrap());
            assert!(
                e < 1e-5,
                "round {round}: {name} rel L2 {e} to the host's AdamW"
            );
        }
        // What the executor and the optimizer hold is the plan-time
        // estimate `check_fits` compares with the free memory.
        let (held, need) = (
            trainer.device_bytes() + dev.device_bytes(),
            device_bytes_needed(&plan),
        );
        eprintln!("round {round}: device bytes held {held}, estimated {need}");
        assert!(
            (held as f64 - need as f64).abs() <= 0.02 * need as f64,
            "held {held} vs estimated {need}"
        );
        // The moments a checkpoint saves are the host optimizer's.
        for (i, (&(p, _), (mh, vh))) in plan.grads().iter().zip(&adam.moments).enumerate() {
            let name = plan.graph().leaf_name(p).unwrap();
            let (md, vd) = dev.moments(trainer.gpu(), name, sizes[i]).unwrap();
            assert!(
                rel_l2(&md, mh) < 1e-5 && rel_l2(&vd, vh) < 1e-5,
                "{name} moments"
            );
        }
    }
}

/// Generation's plans on the GPU: a prompt of 7 tokens, then single tokens
/// at positions 7.., teacher-forced, with the key/value caches as
/// `trainer`'s generator keeps them (host tensors whose new rows are
/// written with `Tensor::write_at`, which the GPU executor copies alone).
/// Every step's logits against the CPU's from the same caches (the CPU's
/// new rows are written, so both read the same history): within 2e-2
/// relative L2 in bf16, 1e-4 for the f32 twin (NF4 weights dequantized to
/// f32, f32 rows); the last step's logits on a fresh executor (whole caches
/// uploaded) must equal, bit for bit, those of the executor that took only
/// the new rows all along.
#[test]
fn gpu_generation_with_the_kv_cache_matches_the_cpu() {
    let m = model();
    generation_on_the_gpu(&m, DType::BF16, 2e-2);
    generation_on_the_gpu(&model_f32(&m), DType::F32, 1e-4);
}

fn generation_on_the_gpu(m: &CausalLm, dtype: DType, bound: f64) {
    let cap = 24;
    let l = lora(m, false);
    let record = |n: usize| {
        let opts = RecordOptions {
            lora: Some(&l),
            kv_cache: Some(cap),
            ..Default::default()
        };
        let rec = m.record(n, opts).unwrap();
        let cache = rec.kv_cache.clone().unwrap();
        let mut outs = vec![rec.logits];
        outs.extend(cache.layers.iter().flat_map(|x| [x[2], x[3]]));
        let plan = compile(rec.graph.clone(), &outs).unwrap();
        (rec, plan)
    };
    let plans = [record(7), record(1)];
    for (_, plan) in &plans {
        assert_eq!(gpu_unsupported(plan), Vec::new());
    }
    let Some(mut gpu) = gpu() else { return };
    let kv = m.config.num_kv_heads * m.config.head_dim;
    let mut caches: Vec<Tensor> = (0..2 * m.config.num_layers)
        .map(|_| Tensor::zeros(&[cap, kv], dtype))
        .collect();
    let tokens: Vec<i32> = (0..13).map(|i| (i * 211 + 5) % 1000).collect();
    // Runs the plan for tokens start..start+n on `exec` with the caches.
    let run = |start: usize,
               n: usize,
               caches: &[Tensor],
               exec: &mut dyn FnMut(&Plan, &graft::engine::Feeds) -> Vec<Tensor>| {
        let (rec, plan) = &plans[(n == 1) as usize];
        let pos: Vec<i32> = (start..start + n).map(|p| p as i32).collect();
        let b = Batch {
            ids: Tensor::from_i32(&[n], &tokens[start..start + n]).unwrap(),
            positions: Tensor::from_i32(&[n], &pos).unwrap(),
            segments: Tensor::from_i32(&[n], &vec![0; n]).unwrap(),
            labels: Tensor::from_i32(&[n], &vec![-100; n]).unwrap(),
            seed: Tensor::from_u32(&[1], &[0]).unwrap(),
        };
        let start_t = Tensor::from_i32(&[1], &[start as i32]).unwrap();
        let cache = rec.kv_cache.as_ref().unwrap();
        let mut feeds = rec.feeds(m, Some(&l), &b).unwrap();
        feeds.bind(cache.start, &start_t);
        for (i, layer) in cache.layers.iter().enumerate() {
            feeds
                .bind(layer[0], &caches[2 * i])
                .bind(layer[1], &caches[2 * i + 1]);
        }
        exec(plan, &feeds)
    };
    let mut steps = vec![(0, 7)];
    steps.extend((7..13).map(|p| (p, 1)));
    let mut last = Vec::new();
    for &(start, n) in &steps {
        let got = run(start, n, &caches, &mut |p, f| gpu.run(p, f).unwrap());
        let want = run(start, n, &caches, &mut |p, f| {
            CpuExecutor::new().run(p, f).unwrap()
        });
        let (g, w) = (got[0].as_f32().unwrap(), want[0].as_f32().unwrap());
        let e = rel_l2(g, w);
        eprintln!("generation {dtype} start={start} n={n}: logits rel L2 GPU vs CPU {e:.2e}");
        assert!(
            g.iter().all(|x| x.is_finite()) && e < bound,
            "{dtype} start={start}: {e}"
        );
        last = got[0].as_f32().unwrap().to_vec();
        for (c, new) in caches.iter_mut().zip(&want[1..]) {
            let row = new.bytes().len() / n;
            c.write_at(start * row, new.bytes()).unwrap();
        }
    }
    // The last step again on a fresh executor, which uploads the caches
    // whole (the row written after it is past what that step reads).
    let (start, n) = steps[steps.len() - 1];
    let mut fresh = GpuExecutor::new(0).unwrap();
    let again = run(start, n, &caches, &mut |p, f| fresh.run(p, f).unwrap());
    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(
        bits(again[0].as_f32().unwrap()),
        bits(&last),
        "caches updated by their new rows alone differ from caches uploaded whole"
    );
}

/// The model of these tests, f32 and unquantized: what LOMO trains.
fn full_model() -> CausalLm {
    let config = ModelConfig::parse(CONFIG, Path::new("<test config>")).unwrap();
    let opts = LoadOptions {
        dtype: DType::F32,
        quantize: None,
    };
    CausalLm::random(config, &opts, 5).unwrap()
}

/// Three fused steps of `plan` (lr 0.05, step 2 with LOMO's two-pass
/// clipping at norm 0.5) through `run`, AdaLomo's state in `state`; the
/// losses and gradient norms of the updating passes.
fn fused_steps(
    m: &mut CausalLm,
    rec: &Recorded,
    plan: &Plan,
    inputs: &FusedInputs,
    state: &mut [(Tensor, Tensor)],
    run: &mut dyn FnMut(&Plan, &Feeds) -> Vec<Tensor>,
) -> Vec<(f32, f64)> {
    let b = batch();
    let scalar = |x: f32| Tensor::from_f32(&[1], &[x]).unwrap();
    let mut out = Vec::new();
    for t in 1..=3 {
        let step = scalar(t as f32);
        let mut pass = |m: &mut CausalLm, lr: f32, coef: f32| {
            let (lr, coef) = (scalar(lr), scalar(coef));
            let mut feeds = rec.feeds_mut(m, &b).unwrap();
            feeds.bind(inputs.lr, &lr).bind(inputs.coef, &coef);
            if let Some(s) = inputs.step {
                feeds.bind(s, &step);
            }
            for ((r, c), (rt, ct)) in inputs.state.iter().zip(state.iter_mut()) {
                feeds.bind_mut(*r, rt).bind_mut(*c, ct);
            }
            let o = run(plan, &feeds);
            let sq: f64 = o[1..].iter().map(|t| t.as_f32().unwrap()[0] as f64).sum();
            (o[0].as_f32().unwrap()[0], sq.sqrt())
        };
        let coef = if t == 2 {
            let (_, norm) = pass(m, 0.0, 1.0);
            (0.5 / (norm + 1e-6)).min(1.0) as f32
        } else {
            1.0
        };
        out.push(pass(m, 0.05, coef));
    }
    out
}

/// LOMO (SGD with weight decay) and AdaLomo steps of a full f32 model: the
/// plan runs whole on the GPU (checked without one). On a GPU, three steps
/// (one with two-pass clipping) against the CPU's: losses and norms within
/// 1e-5, every weight's change and AdaLomo's state within 1e-4 relative L2
/// (f32 products in another order through a whole model, three times).
/// `run` writes the updates back into the bound host tensors, as the CPU
/// does; `run_resident` leaves them unchanged and keeps the updates on the
/// device, where `download_owned` finds them bit-identical to `run`'s.
#[test]
fn lomo_and_adalomo_steps_on_the_gpu_match_the_cpu() {
    let start = full_model();
    let opts = RecordOptions {
        train_base: true,
        loss: true,
        ..Default::default()
    };
    let rec = start.record(batch().tokens(), opts).unwrap();
    let rules = [
        FusedRule::Sgd {
            weight_decay: 0.01,
            clip_value: 0.0,
        },
        FusedRule::AdaLomo(AdaLomoSpec {
            weight_decay: 0.01,
            clip_value: 1.0,
            ..Default::default()
        }),
    ];
    for rule in rules {
        let (plan, inputs) = compile_fused(rec.graph.clone(), rec.loss.unwrap(), rule).unwrap();
        let missing = gpu_unsupported(&plan);
        assert!(missing.is_empty(), "{rule:?}: {missing:?}");
        let Some(mut gpu) = gpu() else { return };
        let mut cpu = CpuExecutor::new();
        let (mut mc, mut mg, mut mr) = (full_model(), full_model(), full_model());
        let (mut sc, mut sg, mut sr) = (
            inputs.zero_state(&plan),
            inputs.zero_state(&plan),
            inputs.zero_state(&plan),
        );
        let want = fused_steps(&mut mc, &rec, &plan, &inputs, &mut sc, &mut |p, f| {
            cpu.run(p, f).unwrap()
        });
        let got = fused_steps(&mut mg, &rec, &plan, &inputs, &mut sg, &mut |p, f| {
            gpu.run(p, f).unwrap()
        });
        let mut resident = GpuExecutor::new(0).unwrap();
        let kept = fused_steps(&mut mr, &rec, &plan, &inputs, &mut sr, &mut |p, f| {
            resident.run_resident(p, f).unwrap()
        });
        for (i, ((w, g), k)) in want.iter().zip(&got).zip(&kept).enumerate() {
            eprintln!(
                "{rule:?} step {}: loss {} / {}, norm {} / {}",
                i + 1,
                w.0,
                g.0,
                w.1,
                g.1
            );
            assert!((w.0 - g.0).abs() <= 1e-5 * w.0.abs(), "loss {w:?} vs {g:?}");
            assert!((w.1 - g.1).abs() <= 1e-5 * w.1, "norm {w:?} vs {g:?}");
            assert_eq!(g, k, "run_resident's loss and norm differ from run's");
        }
        let names: Vec<String> = plan
            .updated()
            .iter()
            .map(|&p| plan.graph().leaf_name(p).unwrap().to_string())
            .collect();
        let on_device = resident.download_owned(&plan, plan.updated()).unwrap();
        let mut worst = 0f64;
        for (n, (dn, dt)) in names.iter().zip(&on_device) {
            assert_eq!(n, dn);
            let s0 = start.weight(n).unwrap().to_f32_vec().unwrap();
            let (c, g) = (mc.weight(n).unwrap(), mg.weight(n).unwrap());
            let change = |t: &Tensor| -> Vec<f32> {
                t.as_f32()
                    .unwrap()
                    .iter()
                    .zip(&s0)
                    .map(|(a, b)| a - b)
                    .collect()
            };
            let e = rel_l2(&change(g), &change(c));
            assert!(e < 1e-4, "{rule:?} `{n}`: change rel L2 {e:e}");
            worst = worst.max(e);
            assert_eq!(
                dt.as_f32().unwrap(),
                g.as_f32().unwrap(),
                "`{n}` on the device"
            );
            assert_eq!(
                mr.weight(n).unwrap().as_f32().unwrap(),
                &s0[..],
                "`{n}` on the host"
            );
        }
        for ((c, g), r) in sc.iter().zip(&sg).zip(&sr) {
            for (a, b) in [(&c.0, &g.0), (&c.1, &g.1)] {
                let e = rel_l2(b.as_f32().unwrap(), a.as_f32().unwrap());
                assert!(e < 1e-4, "{rule:?} state: rel L2 {e:e}");
                worst = worst.max(e);
            }
            // The resident state stayed on the device: the host's is zero.
            assert!(r.0.as_f32().unwrap().iter().all(|&x| x == 0.0));
        }
        let state_ids: Vec<_> = inputs.state.iter().flat_map(|&(r, c)| [r, c]).collect();
        let state_dev = resident.download_owned(&plan, &state_ids).unwrap();
        for ((_, d), s) in state_dev.iter().zip(sg.iter().flat_map(|(r, c)| [r, c])) {
            assert_eq!(
                d.as_f32().unwrap(),
                s.as_f32().unwrap(),
                "state on the device"
            );
        }
        eprintln!("{rule:?}: worst rel L2 vs the CPU {worst:.2e}");
    }
}
