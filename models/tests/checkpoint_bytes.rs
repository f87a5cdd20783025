//! The safetensors parser on arbitrary and mutated bytes: an error or a
//! valid index, never a panic (the fuzz target's property, run in CI).

use graft_models::checkpoint::parse_safetensors;
use proptest::prelude::*;
use std::path::Path;

fn valid_file() -> Vec<u8> {
    let header = br#"{"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},"b":{"dtype":"BF16","shape":[4],"data_offsets":[24,32]}}"#;
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header);
    out.extend(std::iter::repeat_n(7u8, 32));
    out
}

fn accepted_ranges_are_inside(bytes: &[u8]) {
    if let Ok(t) = parse_safetensors(bytes, Path::new("x.safetensors")) {
        for e in t.values() {
            assert!(e.range.start <= e.range.end && e.range.end <= bytes.len());
        }
    }
}

#[test]
fn the_valid_file_parses() {
    let t = parse_safetensors(&valid_file(), Path::new("x.safetensors")).unwrap();
    assert_eq!(t["a"].shape, [2, 3]);
    assert_eq!(t["b"].range.len(), 8);
}

#[test]
fn a_huge_header_length_is_refused_without_allocating() {
    let mut bytes = u64::MAX.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    let e = parse_safetensors(&bytes, Path::new("x.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("x.safetensors: "), "{e}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    #[test]
    fn arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        accepted_ranges_are_inside(&bytes);
    }

    #[test]
    fn mutated_valid_files(flips in proptest::collection::vec((0usize..200, any::<u8>()), 1..6), cut in 0usize..200) {
        let mut bytes = valid_file();
        for (i, b) in flips {
            let n = bytes.len();
            bytes[i % n] = b;
        }
        let n = bytes.len();
        bytes.truncate(n - cut % n);
        accepted_ranges_are_inside(&bytes);
    }
}
