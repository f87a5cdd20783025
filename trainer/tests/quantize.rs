//! `trainer quantize` writes a bitsandbytes NF4 checkpoint that Graft reads
//! back to the same weights quantize-on-load gives.

mod common;

use common::{fixtures, tmp, trainer};
use safetensors::SafeTensors;
use std::path::Path;

/// `trainer quantize --model src --out out` with `extra` flags.
fn quantize(src: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "quantize",
        "--model",
        src.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    trainer(&args)
}

fn logits(model: &Path, extra: &[&str], tag: &str) -> Vec<u8> {
    let out = tmp(tag).with_extension("safetensors");
    let mut args = vec![
        "logits",
        "--model",
        model.to_str().unwrap(),
        "--input-ids",
        "3,1,4,1,5,9,2,6",
    ];
    args.extend_from_slice(extra);
    args.extend(["--out", out.to_str().unwrap()]);
    let res = trainer(&args);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let bytes = std::fs::read(&out).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensor("logits").unwrap().data().to_vec()
}

#[test]
fn quantized_checkpoint_reads_back_as_quantize_on_load() {
    for fixture in ["llama", "qwen2"] {
        let src = fixtures().join(fixture).join("model");
        let out = tmp(fixture);
        let res = quantize(&src, &out, &[]);
        assert!(
            res.status.success(),
            "{}",
            String::from_utf8_lossy(&res.stderr)
        );
        let said = String::from_utf8_lossy(&res.stdout);
        assert!(said.contains("quantized 14 linear weights"), "{said}");

        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        let q = &config["quantization_config"];
        assert_eq!(q["quant_method"], "bitsandbytes");
        assert_eq!(q["bnb_4bit_quant_type"], "nf4");
        assert_eq!(q["bnb_4bit_use_double_quant"], true);
        assert!(
            out.join("generation_config.json").exists(),
            "side files are copied"
        );

        let pre = logits(&out, &[], &format!("{fixture}-pre"));
        let on_load = logits(&src, &["--quantize", "nf4"], &format!("{fixture}-onload"));
        assert_eq!(pre, on_load, "{fixture}: same bits either way");
        let dense = logits(&src, &[], &format!("{fixture}-dense"));
        assert_ne!(pre, dense, "{fixture}: quantization changed the logits");
    }
}

#[test]
fn quantizing_a_quantized_checkpoint_is_an_error() {
    let src = fixtures().join("llama_nf4/model");
    let out = tmp("twice");
    let res = quantize(&src, &out, &[]);
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(
        !res.status.success() && err.contains("already quantized") && err.contains("config.json"),
        "{err}"
    );
}

/// A block size the format cannot take is refused before anything is read
/// or created.
#[test]
fn an_unsupported_block_size_is_refused_before_any_output() {
    let src = fixtures().join("llama_nf4/model");
    for block in ["0", "7", "100000"] {
        let out = tmp(&format!("block-{block}"));
        let res = quantize(&src, &out, &["--block-size", block]);
        let err = String::from_utf8_lossy(&res.stderr);
        assert!(
            !res.status.success() && err.contains("--block-size") && err.contains(block),
            "{err}"
        );
        assert!(!out.exists(), "{} was created", out.display());
    }
}

/// `quantize` and `merge` write their directory whole or not at all: a
/// directory holding files is refused (another model's shards would be
/// read with the new weights), a failure leaves nothing, and weights in
/// other formats are not copied along as side files. A folder with both a
/// single file and shards loads the single file, as transformers does.
#[test]
fn outputs_are_written_whole_or_not_at_all() {
    let src = fixtures().join("llama/model");
    let copy = |to: &Path| {
        std::fs::create_dir_all(to).unwrap();
        for f in std::fs::read_dir(&src).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), to.join(f.file_name())).unwrap();
        }
    };
    let fails = |o: std::process::Output, want: &str| {
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(!o.status.success() && err.contains(want), "{want}: {err}");
    };
    // Into a directory that holds a file: refused, the file untouched.
    let taken = tmp("taken");
    std::fs::create_dir_all(&taken).unwrap();
    std::fs::write(taken.join("model.safetensors.index.json"), "{}").unwrap();
    fails(
        quantize(&src, &taken, &[]),
        "already exists and is not empty",
    );
    let adapter = fixtures().join("llama/adapter");
    let merge = |out: &Path| {
        trainer(&[
            "merge",
            "--model",
            src.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
    };
    fails(merge(&taken), "already exists and is not empty");
    assert_eq!(std::fs::read_dir(&taken).unwrap().count(), 1);

    // A failure half way (config.json names a layer the weights lack):
    // neither the directory nor a temporary is left.
    let broken = tmp("broken-model");
    copy(&broken);
    let config = std::fs::read_to_string(broken.join("config.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&config).unwrap();
    json["num_hidden_layers"] = (json["num_hidden_layers"].as_u64().unwrap() + 1).into();
    std::fs::write(broken.join("config.json"), json.to_string()).unwrap();
    let out = tmp("broken-out");
    fails(
        quantize(&broken, &out, &[]),
        "is missing from the checkpoint",
    );
    assert!(!out.exists());
    let parent = out.parent().unwrap();
    let stem = out.file_name().unwrap().to_string_lossy().into_owned();
    let left = std::fs::read_dir(parent)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains(&stem)
        })
        .count();
    assert_eq!(left, 0, "a temporary of {stem} was left");

    // Weights in another format stay behind; a merged model loads from its
    // single file even beside a shard index.
    let with_bin = tmp("with-bin");
    copy(&with_bin);
    std::fs::write(with_bin.join("pytorch_model.bin"), "stale").unwrap();
    let out = tmp("with-bin-out");
    assert!(quantize(&with_bin, &out, &[]).status.success());
    assert!(!out.join("pytorch_model.bin").exists());
    assert!(out.join("generation_config.json").exists());
    let merged = tmp("merged");
    assert!(merge(&merged).status.success());
    let single = logits(&merged, &[], "merged-single");
    std::fs::write(
        merged.join("model.safetensors.index.json"),
        r#"{"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}"#,
    )
    .unwrap();
    assert_eq!(logits(&merged, &[], "merged-beside-index"), single);
}
