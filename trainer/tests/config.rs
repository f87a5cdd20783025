//! The run configuration: defaults, files, --set overrides, and one clear
//! error per mistake naming the key (and the nearest valid one).

mod common;

use common::tmp;
use graft_trainer::config::{
    Config, OptimizerName, Quantize, TargetModules, TemplateName, DEFAULTS,
};

fn file(tag: &str, text: &str) -> std::path::PathBuf {
    let p = tmp(tag).with_extension("toml");
    std::fs::write(&p, text).unwrap();
    p
}

fn err(file_text: Option<&str>, sets: &[&str]) -> String {
    // Tests run in parallel: one file per call.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = file_text.map(|t| file(&format!("err{n}"), t));
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    let e = Config::load(path.as_deref(), &sets)
        .unwrap_err()
        .to_string();
    eprintln!("{e}");
    e
}

#[test]
fn defaults_are_qlora_and_documented() {
    let c = Config::load(None, &[]).unwrap();
    assert_eq!(c.model.quantize, Quantize::Nf4);
    assert_eq!(
        c.adapter.target_modules,
        TargetModules::One("all-linear".into())
    );
    assert_eq!((c.adapter.r, c.train.optimizer), (16, OptimizerName::Adamw));
    // Every key of every section appears in the reference text with its default.
    for key in [
        "path",
        "quantize",
        "compute_dtype",
        "method",
        "r",
        "alpha",
        "dropout",
        "target_modules",
        "use_rslora",
        "train",
        "eval",
        "format",
        "template",
        "max_seq_len",
        "packing",
        "train_on_inputs",
        "optimizer",
        "lr",
        "scheduler",
        "warmup_steps",
        "weight_decay",
        "max_grad_norm",
        "epochs",
        "max_steps",
        "micro_batch_size",
        "grad_accum",
        "seed",
        "gradient_checkpointing",
        "device",
        "dir",
        "log_steps",
        "eval_steps",
        "save_steps",
        "save_total_limit",
    ] {
        assert!(
            DEFAULTS
                .lines()
                .any(|l| l.starts_with(&format!("{key} = "))),
            "{key}"
        );
    }
}

#[test]
fn file_then_overrides() {
    let f = file(
        "ok",
        "[train]\nlr = 1e-3\nepochs = 3\n[data]\ntemplate = \"chatml\"\n",
    );
    let sets = [
        "train.lr=5e-4".to_string(),
        "data.template=llama-3".into(),
        "adapter.target_modules=[\"q_proj\", \"v_proj\"]".into(),
    ];
    let c = Config::load(Some(&f), &sets).unwrap();
    assert_eq!((c.train.lr, c.train.epochs), (5e-4, 3));
    assert_eq!(c.data.template, TemplateName::Llama3);
    assert_eq!(
        c.adapter.target_modules,
        TargetModules::List(vec!["q_proj".into(), "v_proj".into()])
    );
}

#[test]
fn unknown_keys_name_themselves_and_the_nearest_valid_key() {
    let e = err(Some("[train]\nepoch = 2\n"), &[]);
    assert!(
        e.contains(".toml") && e.contains("`train.epoch`") && e.contains("`train.epochs`"),
        "{e}"
    );
    let e = err(Some("[trian]\nlr = 1.0\n"), &[]);
    assert!(e.contains("[trian]") && e.contains("[train]"), "{e}");
    let e = err(None, &["adapter.rank=8"]);
    assert!(
        e.starts_with("--set") && e.contains("`adapter.rank`") && e.contains("`adapter.r`"),
        "{e}"
    );
}

#[test]
fn wrong_types_and_values_name_the_key() {
    let e = err(Some("[train]\nepochs = \"two\"\n"), &[]);
    assert!(e.contains("epochs"), "{e}");
    let e = err(None, &["model.quantize=nf5"]);
    assert!(e.contains("nf5") && e.contains("nf4"), "{e}");
    let e = err(None, &["adapter.dropout=1.5"]);
    assert!(e.contains("`adapter.dropout`"), "{e}");
    let e = err(None, &["adapter.target_modules=everything"]);
    assert!(e.contains("`adapter.target_modules`"), "{e}");
    let e = err(None, &["train.lr"]);
    assert!(e.contains("section.key=value"), "{e}");
    let e = err(None, &["train.device=tpu"]);
    assert!(
        e.contains("`train.device`") && e.contains("cpu, gpu or auto"),
        "{e}"
    );
    // A bad value from `--set` is blamed on the `--set`, not the file.
    let e = err(Some("[train]\nlr = 1e-4\n"), &["train.lr=abc"]);
    assert!(e.starts_with("--set train.lr=abc"), "{e}");
    // A key outside any section names the section it belongs to.
    let e = err(Some("lr = 1e-4\n"), &[]);
    assert!(e.contains("put it under [train]"), "{e}");
    // NaN passes every comparison: each of these is refused by name.
    for (set, key) in [
        ("train.max_grad_norm=nan", "`train.max_grad_norm`"),
        ("train.max_grad_value=-1", "`train.max_grad_value`"),
        ("train.weight_decay=nan", "`train.weight_decay`"),
        ("train.weight_decay=-0.1", "`train.weight_decay`"),
        ("train.adam_epsilon=0", "`train.adam_epsilon`"),
        ("train.adam_epsilon=inf", "`train.adam_epsilon`"),
        ("adapter.alpha=0", "`adapter.alpha`"),
        ("adapter.alpha=nan", "`adapter.alpha`"),
        ("output.dir=", "`output.dir`"),
        ("data.max_seq_len=1000000000000", "`data.max_seq_len`"),
        (
            "train.micro_batch_size=4611686018427387904",
            "`data.max_seq_len`",
        ),
    ] {
        let e = err(None, &[set]);
        assert!(e.contains(key), "{set}: {e}");
    }
}
