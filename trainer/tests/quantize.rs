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
