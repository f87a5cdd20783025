//! `trainer logits` through the binary reproduces the oracle's logits.

mod common;

use common::{fixtures, read_f32, tmp, trainer};
use safetensors::SafeTensors;
use std::path::PathBuf;

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() || a.iter().chain(b).any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

fn expected(name: &str) -> (Vec<u8>, String) {
    let bytes = std::fs::read(fixtures().join(name).join("expected.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let ids = st.tensor("input_ids").unwrap();
    let ids: Vec<String> = ids
        .data()
        .chunks(4)
        .map(|c| i32::from_le_bytes(c.try_into().unwrap()).to_string())
        .collect();
    (bytes.clone(), ids.join(","))
}

fn out_path(tag: &str) -> PathBuf {
    tmp(tag).with_extension("safetensors")
}

#[test]
fn logits_with_and_without_adapter_match_the_oracle() {
    for name in ["llama", "gemma"] {
        let (exp, ids) = expected(name);
        let dir = fixtures().join(name);
        let model = dir.join("model");
        let adapter = dir.join("adapter");
        for (adapter_args, key) in [
            (vec![], "logits_base"),
            (vec!["--adapter", adapter.to_str().unwrap()], "logits"),
        ] {
            let out = out_path(&format!("{name}-{key}"));
            let mut args = vec![
                "logits",
                "--model",
                model.to_str().unwrap(),
                "--input-ids",
                &ids,
            ];
            args.extend(adapter_args);
            args.extend(["--out", out.to_str().unwrap()]);
            let res = trainer(&args);
            assert!(
                res.status.success(),
                "{}",
                String::from_utf8_lossy(&res.stderr)
            );
            let got = read_f32(&std::fs::read(&out).unwrap(), "logits");
            let e = rel_l2(&got, &read_f32(&exp, key));
            assert!(e < 1e-5, "{name} {key}: rel L2 {e:e}");
            std::fs::remove_file(out).unwrap();
        }
    }
}

#[test]
fn bf16_logits_stay_close_to_f32() {
    let (exp, ids) = expected("llama");
    let model = fixtures().join("llama/model");
    let out = out_path("bf16");
    let res = trainer(&[
        "logits",
        "--model",
        model.to_str().unwrap(),
        "--input-ids",
        &ids,
        "--dtype",
        "bf16",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let got = read_f32(&std::fs::read(&out).unwrap(), "logits");
    let e = rel_l2(&got, &read_f32(&exp, "logits_base"));
    // bf16 keeps 8 bits of mantissa: a few parts in a hundred after 2 layers, never exact.
    assert!(e < 5e-2 && e > 0.0, "bf16 rel L2 {e:e}");
    std::fs::remove_file(out).unwrap();
}

#[test]
fn bad_arguments_give_one_clear_line() {
    let model = fixtures().join("llama/model");
    let out = out_path("bad");
    let cases: [(&[&str], &str); 5] = [
        (
            &["--input-ids", "1,x,3"],
            "item 2 (\"x\") is not a token id",
        ),
        (&["--input-ids", ""], "--input-ids is empty"),
        (
            &["--input-ids", "-1"],
            "item 1 (-1) is outside the vocabulary",
        ),
        (
            &["--input-ids", "1,2,256"],
            "item 3 (256) is outside the vocabulary",
        ),
        (
            &["--input-ids", "1", "--adapter", "/nonexistent-adapter"],
            "/nonexistent-adapter/adapter_config.json",
        ),
    ];
    for (extra, want) in cases {
        let mut args = vec![
            "logits",
            "--model",
            model.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let res = trainer(&args);
        let err = String::from_utf8_lossy(&res.stderr);
        assert!(!res.status.success(), "{extra:?} should fail");
        assert!(
            err.starts_with("error: ") && err.contains(want),
            "{extra:?}: got {err:?}"
        );
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err:?}");
        assert!(!out.exists(), "no output written on failure");
    }
    // Never over the weights being read.
    let weights = model.join("model.safetensors");
    let before = std::fs::read(&weights).unwrap();
    let res = trainer(&[
        "logits",
        "--model",
        model.to_str().unwrap(),
        "--input-ids",
        "1,2",
        "--out",
        weights.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(err.contains("which is being read"), "{err}");
    assert_eq!(std::fs::read(&weights).unwrap(), before);
}

/// More ids than the model's max_position_embeddings (128) still run, with
/// a note on stderr; at the limit there is none.
#[test]
fn ids_past_the_trained_positions_get_a_note() {
    let model = fixtures().join("llama/model");
    let out = out_path("positions");
    for (n, noted) in [(128, false), (130, true)] {
        let ids = vec!["1"; n].join(",");
        let res = trainer(&[
            "logits",
            "--model",
            model.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--input-ids",
            &ids,
        ]);
        let err = String::from_utf8_lossy(&res.stderr);
        assert!(res.status.success(), "{err}");
        let note = format!("the {n} tokens of --input-ids reach {n} positions, more than the model's max_position_embeddings (128)");
        assert_eq!(err.contains(&note), noted, "{n} ids: {err:?}");
    }
}
