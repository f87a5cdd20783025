//! The checkpoint loader fed arbitrary bytes must return an error (or a
//! valid index), never panic or allocate beyond the input's size.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    if let Ok(tensors) = graft_models::checkpoint::parse_safetensors(data, Path::new("fuzz.safetensors")) {
        for entry in tensors.values() {
            assert!(entry.range.end <= data.len(), "an accepted range lies inside the buffer");
        }
    }
});
