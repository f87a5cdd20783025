//! NF4 quantization is bit-exact with bitsandbytes: packed codes, absmax
//! codes, nested scales, offset and dequantized values, against fixtures made
//! by tests/oracle/make_nf4_fixtures.py.

mod common;

use common::fixture_dir;
use graft::engine::Tensor;
use graft::kernels::nf4::{dynamic_map_signed, quantize, torch_mean};
use safetensors::SafeTensors;

fn f32s(st: &SafeTensors, name: &str) -> Vec<f32> {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
    t.data()
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn bytes(st: &SafeTensors, name: &str) -> Vec<u8> {
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::U8, "{name}");
    t.data().to_vec()
}

/// Bit patterns, so -0.0 vs 0.0 and every last bit count.
fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn quantization_and_dequantization_are_bit_exact() {
    let dir = fixture_dir("nf4");
    let mut cases = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        if path.extension().is_none_or(|e| e != "safetensors")
            || name == "dynamic_map"
            || name == "torch_mean"
        {
            continue;
        }
        let data = std::fs::read(&path).unwrap();
        let (_, meta) = SafeTensors::read_metadata(&data).unwrap();
        let meta = meta.metadata().clone().unwrap();
        let block: usize = meta["blocksize"].parse().unwrap();
        let shape: Vec<usize> = serde_json::from_str(&meta["shape"]).unwrap();
        let st = SafeTensors::deserialize(&data).unwrap();

        let p = quantize(&f32s(&st, "input"), block).unwrap();
        assert_eq!(p.packed, bytes(&st, "packed"), "{name}: packed codes");
        assert_eq!(p.absmax, bytes(&st, "absmax"), "{name}: absmax codes");
        assert_eq!(
            bits(&p.nested_scales),
            bits(&f32s(&st, "nested_absmax")),
            "{name}: nested scales"
        );
        assert_eq!(
            p.offset.to_bits(),
            f32s(&st, "offset")[0].to_bits(),
            "{name}: offset"
        );
        assert_eq!(
            bits(&p.nested_map),
            bits(&f32s(&st, "nested_quant_map")),
            "{name}: nested map"
        );

        let t = Tensor::from_nf4(&shape, &p).unwrap();
        assert_eq!(
            bits(&t.to_f32_vec().unwrap()),
            bits(&f32s(&st, "dequant")),
            "{name}: dequantized"
        );
        cases += 1;
    }
    assert!(cases >= 10, "only {cases} fixture cases found");
}

#[test]
fn dynamic_map_is_bitsandbytes_map() {
    let data = std::fs::read(fixture_dir("nf4").join("dynamic_map.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&data).unwrap();
    assert_eq!(bits(&dynamic_map_signed()), bits(&f32s(&st, "dynamic_map")));
}

#[test]
fn offset_is_torch_mean_to_the_bit() {
    let data = std::fs::read(fixture_dir("nf4").join("torch_mean.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&data).unwrap();
    for n in [1, 3, 7, 8, 15, 64, 100, 131, 455, 1000, 4097, 5000, 12345] {
        let x = f32s(&st, &format!("x{n}"));
        let want = f32s(&st, &format!("mean{n}"))[0];
        assert_eq!(
            torch_mean(&x).to_bits(),
            want.to_bits(),
            "n = {n}: {} vs {want}",
            torch_mean(&x)
        );
    }
}

#[test]
fn storage_is_about_4_127_bits_per_parameter() {
    let (n, k) = (4096, 4096);
    let l = graft::ir::Nf4Layout::new(n * k, 64);
    // 4 + 8/64 + 32/(64·256) = 4.127, plus the 256-entry map and the offset.
    let bits = l.bits_per_param();
    assert!((bits - 4.127).abs() < 0.001, "{bits}");
}

#[test]
fn bad_inputs_are_refused_with_the_position() {
    let e = quantize(&[0.0, 1.0, f32::NAN], 64).unwrap_err().to_string();
    assert!(e.contains("flat index 2") && e.contains("NaN"), "{e}");
    let e = quantize(&[f32::INFINITY], 64).unwrap_err().to_string();
    assert!(e.contains("flat index 0") && e.contains("inf"), "{e}");
    assert!(quantize(&[1.0; 100], 48)
        .unwrap_err()
        .to_string()
        .contains("block size 48"));
    assert!(quantize(&[1.0; 100], 8192).is_err());
}
