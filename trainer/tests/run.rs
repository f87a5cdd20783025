//! `trainer run` end to end on the embedded default model: a short real run,
//! exact resumption (stopped, or killed at a random moment), gradient
//! accumulation normalised over the whole batch, divergence stopping with a
//! loadable checkpoint, and the bad-input cases.

mod common;

use common::{tmp, trainer};
use graft_models::{CausalLm, Lora};
use graft_trainer::config::Config;
use graft_trainer::run::{checkpoint, train, RunOptions};
use serde_json::Value;
use std::path::Path;
use std::process::Output;

/// `--set` arguments for a short run of the default into `out`.
fn short(out: &Path, extra: &[&str]) -> Vec<String> {
    let mut sets = vec![
        format!("output.dir={}", out.display()),
        "output.eval_accuracy=false".into(),
        "output.log_steps=1".into(),
        "train.max_steps=6".into(),
        "train.warmup_steps=0".into(),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    sets
}

fn run_cli(out: &Path, extra: &[&str], flags: &[&str]) -> Output {
    let mut args = vec!["run".to_string()];
    for s in short(out, extra) {
        args.push("--set".into());
        args.push(s);
    }
    args.extend(flags.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    trainer(&refs)
}

fn ok(o: &Output) -> String {
    let (stdout, stderr) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success(), "failed:\n{stdout}\n{stderr}");
    stdout.into_owned()
}

fn err(o: &Output) -> String {
    assert!(!o.status.success(), "should fail");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The train-loss records of a run, as written (so equal text is equal
/// bits): the text after `"loss":`, not the value parsed and printed again.
fn losses(out: &Path) -> Vec<(u64, String)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let r = serde_json::from_str::<Value>(l).unwrap();
            let text = l.split("\"loss\":").nth(1)?;
            let end = text.find([',', '}']).unwrap();
            Some((r["step"].as_u64().unwrap(), text[..end].to_string()))
        })
        .collect()
}

fn adapter_bytes(out: &Path) -> Vec<u8> {
    std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap()
}

#[test]
fn a_short_run_writes_a_peft_adapter_metrics_and_a_plot() {
    let out = tmp("run-short");
    let stdout = ok(&run_cli(&out, &[], &[]));
    assert!(stdout.contains("step 6/6"), "{stdout}");
    let l = losses(&out);
    assert_eq!(
        l.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5, 6]
    );
    let first: f64 = l[0].1.parse().unwrap();
    let last: f64 = l[5].1.parse().unwrap();
    assert!(first.is_finite() && last < first, "loss {first} -> {last}");
    // The adapter: PEFT's files and keys, loadable, not all zero.
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 16);
    let model_dir = graft_trainer::embedded::model_dir().unwrap();
    let model = CausalLm::load(&model_dir, graft_engine::ir::DType::F32).unwrap();
    let lora = Lora::load(&out.join("adapter"), &model.config).unwrap();
    assert_eq!(lora.modules.len(), 7 * model.config.num_layers);
    assert!(lora.modules[0]
        .key_a()
        .starts_with("base_model.model.model.layers.0."));
    assert!(lora
        .modules
        .iter()
        .any(|m| m.b.as_f32().unwrap().iter().any(|&x| x != 0.0)));
    let svg = std::fs::read_to_string(out.join("loss.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("polyline"));
    // Checkpoints: every 50 steps and the last one.
    let cps = checkpoint::list(&out).unwrap();
    assert_eq!(cps.iter().map(|c| c.0).collect::<Vec<_>>(), [6]);
    // Running again into the same directory is refused, naming --resume.
    let e = err(&run_cli(&out, &[], &[]));
    assert!(e.contains("--resume"), "{e}");
}

#[test]
fn a_stopped_run_resumes_to_the_same_bits() {
    let (a, b) = (tmp("run-whole"), tmp("run-resumed"));
    let extra = ["output.save_steps=2", "train.grad_accum=2"];
    ok(&run_cli(&a, &extra, &[]));
    let stopped = err(&run_cli(&b, &extra, &["--stop-after", "3"]));
    assert!(stopped.contains("stopped after 3 steps"), "{stopped}");
    assert_eq!(checkpoint::list(&b).unwrap().last().unwrap().0, 2);
    assert_eq!(losses(&b).len(), 3, "the stopped run logged 3 steps");
    // Resumed on a device named explicitly (the first half ran on `auto`).
    ok(&run_cli(&b, &extra, &["--resume", "--device", "cpu"]));
    assert_eq!(losses(&a), losses(&b), "loss curves differ");
    assert_eq!(adapter_bytes(&a), adapter_bytes(&b), "adapters differ");
    // A resumed run must keep the configuration.
    let e = err(&run_cli(
        &b,
        &["output.save_steps=2", "train.grad_accum=2", "train.lr=0.5"],
        &["--resume"],
    ));
    assert!(e.contains("train.lr"), "{e}");
}

#[test]
fn a_killed_run_leaves_loadable_checkpoints_and_resumes_exactly() {
    let (a, b) = (tmp("kill-whole"), tmp("kill-resumed"));
    let extra = ["output.save_steps=1", "output.save_total_limit=0"];
    ok(&run_cli(&a, &extra, &[]));
    let mut args = vec!["run".to_string()];
    for s in short(&b, &extra) {
        args.push("--set".into());
        args.push(s);
    }
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(&args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once the second checkpoint exists (mid-way through the run,
    // possibly in the middle of writing the third).
    let t0 = std::time::Instant::now();
    while checkpoint::list(&b).unwrap().len() < 2 && t0.elapsed().as_secs() < 120 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let model_dir = graft_trainer::embedded::model_dir().unwrap();
    let config = graft_models::ModelConfig::load(&model_dir).unwrap();
    let cps = checkpoint::list(&b).unwrap();
    assert!(cps.len() >= 2, "{cps:?}");
    for (_, dir) in &cps {
        Lora::load(dir, &config).unwrap();
        checkpoint::read_state(dir).unwrap();
        graft_models::checkpoint::Checkpoint::open_files(dir, &[checkpoint::OPTIMIZER.into()])
            .unwrap();
    }
    eprintln!(
        "killed with checkpoints {:?}",
        cps.iter().map(|c| c.0).collect::<Vec<_>>()
    );
    if cps.last().unwrap().0 < 6 {
        ok(&run_cli(&b, &extra, &["--resume"]));
    }
    assert_eq!(losses(&a), losses(&b), "loss curves differ");
    assert_eq!(adapter_bytes(&a), adapter_bytes(&b), "adapters differ");
}

/// One step over two sequences: as one micro-batch of two rows, or as two
/// accumulated micro-batches of one row, the loss and the update are those of
/// the mean over all counted tokens.
#[test]
fn gradient_accumulation_weights_micro_batches_by_counted_tokens() {
    let mut finals = Vec::new();
    for (rows, accum) in [(2, 1), (1, 2)] {
        let out = tmp(&format!("accum-{rows}"));
        let sets = short(
            &out,
            &[
                "train.max_steps=1",
                "data.packing=false",
                "adapter.dropout=0.0",
                "model.compute_dtype=\"f32\"",
                "model.quantize=\"none\"",
                &format!("train.micro_batch_size={rows}"),
                &format!("train.grad_accum={accum}"),
                "train.optimizer=\"sgd\"",
                "train.max_grad_norm=0.0",
                "train.lr=1.0",
            ],
        );
        let cfg = Config::from_texts(&[(graft_trainer::embedded::run_config(), "default")], &sets)
            .unwrap();
        let r = train(&cfg, &RunOptions::default()).unwrap();
        let model_dir = graft_trainer::embedded::model_dir().unwrap();
        let config = graft_models::ModelConfig::load(&model_dir).unwrap();
        let lora = Lora::load(&r.output, &config).unwrap();
        let b: Vec<f32> = lora
            .modules
            .iter()
            .flat_map(|m| m.b.as_f32().unwrap().to_vec())
            .collect();
        finals.push((r.loss, b));
    }
    let (l1, b1) = &finals[0];
    let (l2, b2) = &finals[1];
    assert!((l1 - l2).abs() <= 1e-5 * l1.abs(), "loss {l1} vs {l2}");
    let num: f64 = b1
        .iter()
        .zip(b2)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum();
    let den: f64 = b1.iter().map(|x| (*x as f64).powi(2)).sum();
    let rel = (num / den).sqrt();
    assert!(den > 0.0 && rel < 1e-4, "update rel L2 {rel:e}");
}

#[test]
fn a_diverging_run_stops_and_keeps_its_last_good_checkpoint() {
    let out = tmp("diverge");
    let e = err(&run_cli(
        &out,
        &[
            "train.optimizer=\"sgd\"",
            "train.lr=1e30",
            "train.max_grad_norm=0.0",
            "output.save_steps=1",
        ],
        &[],
    ));
    assert!(
        e.contains("the loss is") || e.contains("gradient norm"),
        "{e}"
    );
    assert!(
        e.contains("last good checkpoint") || e.contains("No checkpoint"),
        "{e}"
    );
    let config =
        graft_models::ModelConfig::load(&graft_trainer::embedded::model_dir().unwrap()).unwrap();
    for (_, dir) in checkpoint::list(&out).unwrap() {
        Lora::load(&dir, &config).unwrap();
    }
}

#[test]
fn bad_input_is_one_clear_error() {
    let out = tmp("bad-run");
    let data = tmp("bad-data.jsonl");
    std::fs::write(
        &data,
        "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n",
    )
    .unwrap();
    let train_set = format!("data.train={}", data.display());
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["adapter.target_modules=[\"nope_proj\"]"], "nope_proj"),
        (vec![&train_set], ":1: key `messages` has no assistant turn"),
        (vec!["train.lrr=1"], "did you mean `train.lr`"),
        (vec!["train.learning_rate=1"], "did you mean `train.lr`"),
        (vec!["data.template=\"alpaca\""], "train.jsonl:1: template:"),
        (vec!["data.template=\"auto\""], "has no chat_template"),
        (vec!["adapter.method=\"full\""], "model.quantize"),
        (
            vec!["data.max_seq_len=3", "data.overflow=\"drop\""],
            "no example left",
        ),
        (
            vec!["train.optimizer=\"lomo\""],
            "it needs adapter.method = \"full\"",
        ),
        (
            vec![
                "train.optimizer=\"lomo\"",
                "adapter.method=\"full\"",
                "model.quantize=\"none\"",
                "model.compute_dtype=\"f32\"",
                "train.grad_accum=2",
            ],
            "train.grad_accum must be 1",
        ),
        // One step inside the warm-up: the learning rate is 0, nothing moves.
        (
            vec!["train.max_steps=1", "train.warmup_steps=5"],
            "adapter is all zero",
        ),
    ];
    for (extra, want) in cases {
        let e = err(&run_cli(&out, &extra, &[]));
        assert!(e.contains(want), "{extra:?}: {e}");
        assert_eq!(e.trim().lines().count(), 1, "one line: {e}");
    }
    let e = err(&run_cli(&tmp("bad-resume"), &[], &["--resume"]));
    assert!(e.contains("no checkpoint to resume from"), "{e}");

    // `--device gpu` where no GPU opens: one line saying what is missing,
    // before the run writes anything. (Skipped where a GPU does open.)
    let gpu_out = tmp("no-gpu");
    let o = run_cli(&gpu_out, &[], &["--device", "gpu"]);
    if !o.status.success() {
        let e = err(&o);
        assert!(e.contains("GPU") && e.contains("--device cpu"), "{e}");
        assert_eq!(e.trim().lines().count(), 1, "one line: {e}");
        assert!(!gpu_out.exists(), "{} was written", gpu_out.display());
    } else {
        eprintln!("a GPU opened here: `--device gpu` ran");
    }

    // A GRAFT_CPU that is no path, or one this CPU cannot take (when there
    // is one here), stops the run before any work.
    use graft_engine::kernels::gemm::Path as CpuPath;
    let lacking = CpuPath::ALL.into_iter().find(|p| !p.is_supported());
    let mut forced = vec![("sse9", "GRAFT_CPU=sse9 is not one of scalar".to_string())];
    if let Some(p) = lacking {
        let f = p.missing_feature().unwrap();
        forced.push((p.name(), format!("needs the CPU feature {f}")));
    }
    for (name, want) in forced {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_trainer"))
            .args(["run", "--set", "train.max_steps=1"])
            .env("GRAFT_CPU", name)
            .output()
            .unwrap();
        let e = err(&o);
        assert!(e.contains(&want), "GRAFT_CPU={name}: {e}");
        assert_eq!(e.trim().lines().count(), 1, "one line: {e}");
    }
}

/// A configuration file that names no model tunes the embedded default:
/// its settings (messages records, the chatml template) stay the base.
#[test]
fn a_config_file_that_names_no_model_tunes_the_embedded_default() {
    let file = tmp("tune.toml");
    std::fs::write(&file, "[train]\nlr = 1e-3\n").unwrap();
    let out = tmp("tune-run");
    let stdout = ok(&run_cli(&out, &[], &["--config", file.to_str().unwrap()]));
    assert!(
        stdout.contains("step 6/6") && stdout.contains("lr 1.000e-3"),
        "{stdout}"
    );
}

/// What could make a run or a resume silently wrong is refused, one line
/// naming it: a directory holding a finished run's output (its checkpoints
/// deleted), a template whose tokens the tokenizer lacks, a resume on data
/// that changed, a resume past the run's steps, a checkpoint holding NaN.
#[test]
fn runs_and_resumes_refuse_what_would_be_silently_wrong() {
    let one_line = |o: &Output, want: &str| {
        let e = err(o);
        assert!(e.contains(want), "want {want:?}: {e}");
        assert_eq!(e.trim().lines().count(), 1, "one line: {e}");
    };
    let done = tmp("guard-done");
    std::fs::create_dir_all(done.join("adapter")).unwrap();
    std::fs::write(done.join("metrics.jsonl"), "{}\n").unwrap();
    one_line(&run_cli(&done, &[], &[]), "already holds a run's output");
    // A run stopped before its first checkpoint left only its metrics: a
    // new run starts over there.
    let partial = tmp("guard-partial");
    std::fs::create_dir_all(&partial).unwrap();
    std::fs::write(partial.join("metrics.jsonl"), "{}\n").unwrap();
    ok(&run_cli(&partial, &[], &[]));
    // Nor is a folder that only holds a model of its own a run.
    let base = tmp("guard-base");
    std::fs::create_dir_all(base.join("model")).unwrap();
    ok(&run_cli(&base, &[], &[]));
    // But full fine-tuning, which writes OUT/model, refuses to replace it
    // (before training).
    let base = tmp("guard-base-full");
    std::fs::create_dir_all(base.join("model")).unwrap();
    std::fs::write(base.join("model/config.json"), "{}").unwrap();
    let full = [
        "adapter.method=\"full\"",
        "model.quantize=\"none\"",
        "model.compute_dtype=\"f32\"",
    ];
    one_line(
        &run_cli(&base, &full, &[]),
        "full fine-tuning writes its model there",
    );
    assert_eq!(
        std::fs::read_to_string(base.join("model/config.json")).unwrap(),
        "{}"
    );
    let o = run_cli(&tmp("guard-template"), &["data.template=\"llama-3\""], &[]);
    one_line(&o, "`<|begin_of_text|>`");

    // A stopped run on its own copy of the default's data.
    let data = tmp("guard-data.jsonl");
    let full = std::fs::read_to_string(
        graft_trainer::embedded::data_dir()
            .unwrap()
            .join("train.jsonl"),
    )
    .unwrap();
    std::fs::write(&data, &full).unwrap();
    let out = tmp("guard-resume");
    let train = format!("data.train={}", data.display());
    let extra = [train.as_str(), "output.save_steps=2"];
    err(&run_cli(&out, &extra, &["--stop-after", "3"]));
    let half: String = full.lines().take(100).map(|l| format!("{l}\n")).collect();
    std::fs::write(&data, half).unwrap();
    one_line(&run_cli(&out, &extra, &["--resume"]), "other training data");
    std::fs::write(&data, &full).unwrap();
    let fewer = [train.as_str(), "output.save_steps=2", "train.max_steps=1"];
    one_line(
        &run_cli(&out, &fewer, &["--resume"]),
        "past this run's 1 steps",
    );
    // A state file edited to another step, or past the epoch's batches.
    let state = out.join("checkpoint-2").join(checkpoint::STATE);
    let saved = std::fs::read_to_string(&state).unwrap();
    for (key, v, want) in [
        ("step", 7, "says step 7"),
        ("micro", 99999, "says micro-batch 99999"),
        ("optimizer_steps", 3, "says 3 optimizer steps at step 2"),
        ("epoch", 3, "says epoch 3 at step 2"),
        ("micro_step", 5, "says 5 micro-batches done"),
    ] {
        let mut st: Value = serde_json::from_str(&saved).unwrap();
        st[key] = v.into();
        std::fs::write(&state, st.to_string()).unwrap();
        one_line(&run_cli(&out, &extra, &["--resume"]), want);
    }
    std::fs::write(&state, &saved).unwrap();
    // NaN over every value of the checkpoint's optimizer state, then of its
    // adapter (past the safetensors header).
    for (file, tensor) in [
        ("optimizer.safetensors", ".exp_avg"),
        ("adapter_model.safetensors", ".lora_"),
    ] {
        let file = out.join("checkpoint-2").join(file);
        let mut bytes = std::fs::read(&file).unwrap();
        let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        bytes[8 + header..].fill(0xff);
        std::fs::write(&file, bytes).unwrap();
        let e = err(&run_cli(&out, &extra, &["--resume"]));
        assert!(
            e.contains("the checkpoint is damaged") && e.contains(tensor),
            "{e}"
        );
    }
    std::fs::remove_file(&state).unwrap();
    one_line(
        &run_cli(&out, &extra, &["--resume"]),
        "has no trainer_state.json",
    );
}

/// A resume on base-model files that changed under the same path is
/// refused (one weight value is enough); eval data that changed is a note,
/// since the steps stay exact.
#[test]
fn a_resume_refuses_a_changed_base_model_and_notes_changed_eval_data() {
    let (model, data) = (tmp("changed-model"), tmp("changed-data"));
    let copy = |from: &Path, to: &Path| {
        std::fs::create_dir_all(to).unwrap();
        for f in std::fs::read_dir(from).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), to.join(f.file_name())).unwrap();
        }
    };
    copy(&graft_trainer::embedded::model_dir().unwrap(), &model);
    copy(&graft_trainer::embedded::data_dir().unwrap(), &data);
    let sets = [
        format!("model.path={}", model.display()),
        format!("data.train={}", data.join("train.jsonl").display()),
        format!("data.eval={}", data.join("eval.jsonl").display()),
        "data.format=\"messages\"".into(),
        "data.template=\"chatml\"".into(),
        "data.max_seq_len=64".into(),
        "output.save_steps=2".into(),
    ];
    let extra: Vec<&str> = sets.iter().map(String::as_str).collect();
    let out = tmp("changed-run");
    err(&run_cli(&out, &extra, &["--stop-after", "3"]));

    // The eval set loses its last record: the run resumes, with a note.
    let eval = data.join("eval.jsonl");
    let text = std::fs::read_to_string(&eval).unwrap();
    let fewer: Vec<&str> = text.lines().collect();
    std::fs::write(&eval, fewer[..fewer.len() - 1].join("\n")).unwrap();
    let stdout = ok(&run_cli(&out, &extra, &["--resume"]));
    assert!(stdout.contains("note: the eval data differs"), "{stdout}");

    // One byte of the first stored weight changes (a bf16 mantissa bit):
    // resuming the finished run's last checkpoint is refused.
    let weights = model.join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    bytes[8 + header] ^= 1;
    std::fs::write(&weights, bytes).unwrap();
    let e = err(&run_cli(&out, &extra, &["--resume"]));
    assert!(e.contains("made with another base model than"), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "one line: {e}");
}

/// The other subcommands on a freshly trained adapter: eval, generate,
/// merge; and `--help` carrying every configuration key.
#[test]
fn eval_generate_merge_and_help_work_on_a_trained_adapter() {
    let out = tmp("cli-tools");
    ok(&run_cli(
        &out,
        &["train.max_steps=20", "train.lr=5e-3"],
        &[],
    ));
    let adapter = out.join("adapter");
    let a = adapter.to_str().unwrap();
    let stdout = ok(&trainer(&["eval", "--adapter", a]));
    assert!(
        stdout.contains("eval loss") && stdout.contains("exact match"),
        "{stdout}"
    );

    let gen = ok(&trainer(&[
        "generate",
        "--adapter",
        a,
        "--template",
        "chatml",
        "--prompt",
        "What is the opposite of hot ?",
        "--max-new-tokens",
        "4",
    ]));
    assert!(!gen.trim().is_empty(), "generated nothing");
    let e = err(&trainer(&[
        "generate",
        "--prompt",
        "x",
        "--template",
        "nope",
    ]));
    assert!(e.contains("--template"), "{e}");
    // `--device gpu` with f32 compute: where no GPU opens, one error naming
    // the way on, never a silent run on the CPU; where one does, it runs
    // there and says so.
    let o = trainer(&[
        "generate", "--prompt", "x", "--device", "gpu", "--dtype", "f32",
    ]);
    if o.status.success() {
        let said = String::from_utf8_lossy(&o.stderr);
        assert!(said.contains("GPU"), "{said}");
    } else {
        assert!(err(&o).contains("--device cpu"), "{}", err(&o));
    }

    let merged = tmp("cli-merged");
    let model = graft_trainer::embedded::model_dir().unwrap();
    let m = model.to_str().unwrap();
    ok(&trainer(&[
        "merge",
        "--model",
        m,
        "--adapter",
        a,
        "--out",
        merged.to_str().unwrap(),
        "--dtype",
        "f32",
    ]));
    // The merged model alone gives the logits of base + adapter.
    let ids = "2,10,20,30,40,50";
    let (l1, l2) = (tmp("cli-l1.safetensors"), tmp("cli-l2.safetensors"));
    ok(&trainer(&[
        "logits",
        "--model",
        m,
        "--adapter",
        a,
        "--input-ids",
        ids,
        "--out",
        l1.to_str().unwrap(),
    ]));
    ok(&trainer(&[
        "logits",
        "--model",
        merged.to_str().unwrap(),
        "--input-ids",
        ids,
        "--out",
        l2.to_str().unwrap(),
    ]));
    let (x, y) = (
        common::read_f32(&std::fs::read(&l1).unwrap(), "logits"),
        common::read_f32(&std::fs::read(&l2).unwrap(), "logits"),
    );
    let num: f64 = x
        .iter()
        .zip(&y)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum();
    let den: f64 = x.iter().map(|a| (*a as f64).powi(2)).sum();
    assert!((num / den).sqrt() < 1e-5, "merged vs adapter logits");

    let help = ok(&trainer(&["run", "--help"]));
    for key in [
        "max_grad_norm = 0.3",
        "grad_accum = 1",
        "save_total_limit = 2",
        "[adapter]",
    ] {
        assert!(help.contains(key), "--help lacks {key}");
    }
}

/// `adapter.method = "dora"` on the NF4 base: PEFT's DoRA format, a
/// magnitude per output row that training moves, and a falling loss.
#[test]
fn a_dora_run_writes_a_peft_dora_adapter() {
    let out = tmp("run-dora");
    ok(&run_cli(&out, &["adapter.method=\"dora\""], &[]));
    let l = losses(&out);
    let (first, last): (f64, f64) = (l[0].1.parse().unwrap(), l[5].1.parse().unwrap());
    assert!(last < first, "loss {first} -> {last}");
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["use_dora"], true);
    let model_dir = graft_trainer::embedded::model_dir().unwrap();
    let base = CausalLm::load_with(
        &model_dir,
        &graft_models::LoadOptions {
            dtype: graft_engine::ir::DType::F32,
            quantize: Some(64),
        },
    )
    .unwrap();
    let lora = Lora::load(&out.join("adapter"), &base.config).unwrap();
    // The magnitude started at the NF4 weight's row norms and was trained.
    let mut fresh = lora.clone();
    for m in &mut fresh.modules {
        m.b = graft_engine::Tensor::zeros(m.b.shape(), graft_engine::ir::DType::F32);
    }
    fresh.init_magnitudes(&base).unwrap();
    let moved = lora.modules.iter().zip(&fresh.modules).any(|(t, f)| {
        let (t, f) = (t.magnitude.as_ref().unwrap(), f.magnitude.as_ref().unwrap());
        t.as_f32().unwrap() != f.as_f32().unwrap()
    });
    assert!(moved, "training left every magnitude at its initial value");
}

/// Full fine-tuning with LOMO and AdaLomo (two-pass clipping): the loss
/// falls, the model is written as a plain HF checkpoint, and a stopped run
/// resumes to the same bits (AdaLomo's second moments come back from the
/// checkpoint).
#[test]
fn lomo_and_adalomo_full_fine_tuning_train_and_resume_exactly() {
    for (opt, lr) in [("lomo", "0.05"), ("adalomo", "0.01")] {
        let (a, b) = (tmp(&format!("{opt}-whole")), tmp(&format!("{opt}-resumed")));
        let optimizer = format!("train.optimizer=\"{opt}\"");
        let lr = format!("train.lr={lr}");
        let extra = [
            "adapter.method=\"full\"",
            "model.quantize=\"none\"",
            "model.compute_dtype=\"f32\"",
            &optimizer,
            &lr,
            "train.max_grad_norm=1.0",
            "output.save_steps=2",
        ];
        ok(&run_cli(&a, &extra, &[]));
        let l = losses(&a);
        let (first, last): (f64, f64) = (l[0].1.parse().unwrap(), l[5].1.parse().unwrap());
        assert!(last < first, "{opt}: loss {first} -> {last}");
        err(&run_cli(&b, &extra, &["--stop-after", "3"]));
        ok(&run_cli(&b, &extra, &["--resume"]));
        assert_eq!(losses(&a), losses(&b), "{opt}: loss curves differ");
        let weights = |d: &Path| std::fs::read(d.join("model/model.safetensors")).unwrap();
        assert_eq!(weights(&a), weights(&b), "{opt}: models differ");
        CausalLm::load(&a.join("model"), graft_engine::ir::DType::F32).unwrap();
    }
}

/// Every training configuration of the embedded default has a GPU kernel
/// for each node of its step (`trainer plan` says so; checked without a
/// GPU): QLoRA and QDoRA in bf16 and in f32, full fine-tuning with AdamW,
/// LOMO and AdaLomo.
#[cfg(feature = "cuda")]
#[test]
fn every_training_configuration_runs_whole_on_the_gpu() {
    let full = [
        "adapter.method=full",
        "model.quantize=none",
        "model.compute_dtype=f32",
    ];
    let cases: Vec<Vec<&str>> = vec![
        vec![],
        vec!["adapter.method=dora"],
        vec!["model.compute_dtype=f32"],
        vec!["model.compute_dtype=f32", "adapter.method=dora"],
        full.to_vec(),
        [&full[..], &["train.optimizer=lomo"]].concat(),
        [&full[..], &["train.optimizer=adalomo"]].concat(),
    ];
    for sets in cases {
        let mut args = vec!["plan"];
        for s in &sets {
            args.extend(["--set", s]);
        }
        let out = ok(&trainer(&args));
        assert!(
            out.contains("GPU: every node of this run's plan has a kernel"),
            "{sets:?}:\n{out}"
        );
    }
}
