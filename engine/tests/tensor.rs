//! Tensors: owned and memory-mapped storage, byte round trips, dtype
//! conversion.

use graft_engine::ir::{DType, Graph};
use graft_engine::kernels::bf16;
use graft_engine::{compile, CpuExecutor, EngineError, Feeds, Tensor};
use memmap2::Mmap;
use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// A file under the temp dir, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn with(bytes: &[u8]) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let name = format!(
            "graft-engine-tensor-{}-{nanos}-{}.bin",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let path = std::env::temp_dir().join(name);
        File::create(&path).unwrap().write_all(bytes).unwrap();
        TempFile(path)
    }
    fn map(&self) -> Arc<Mmap> {
        let file = File::open(&self.0).unwrap();
        // SAFETY: the file is private to this test and not modified while mapped.
        Arc::new(unsafe { Mmap::map(&file) }.unwrap())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn values(n: usize) -> Vec<f32> {
    (0..n).map(|i| (i as f32 - 5.5) * 0.731).collect()
}

/// `[pad bytes of 0xAB][data as f32]`.
fn file_with_f32_at(pad: usize, data: &[f32]) -> TempFile {
    let mut bytes = vec![0xABu8; pad];
    bytes.extend_from_slice(bytemuck::cast_slice(data));
    TempFile::with(&bytes)
}

#[test]
fn aligned_ranges_are_mapped_without_a_copy() {
    let data = values(12);
    for pad in [0usize, 4, 8, 64] {
        let file = file_with_f32_at(pad, &data);
        let map = file.map();
        let t = Tensor::mapped(map.clone(), pad..pad + 48, &[3, 4], DType::F32).unwrap();
        assert!(t.is_mapped(), "offset {pad} is 4-aligned");
        assert_eq!(
            t.bytes().as_ptr(),
            map[pad..].as_ptr(),
            "a mapped tensor reads the mapping itself"
        );
        assert_eq!(t.as_f32().unwrap(), data.as_slice());
        assert_eq!(
            (t.shape(), t.dtype(), t.numel()),
            (&[3usize, 4][..], DType::F32, 12)
        );
    }
}

#[test]
fn unaligned_ranges_are_copied() {
    let data = values(12);
    for pad in [1usize, 2, 3, 5] {
        let file = file_with_f32_at(pad, &data);
        let map = file.map();
        let t = Tensor::mapped(map.clone(), pad..pad + 48, &[12], DType::F32).unwrap();
        assert!(
            !t.is_mapped(),
            "offset {pad} is not 4-aligned: the bytes must be copied"
        );
        assert_eq!(t.bytes(), &map[pad..pad + 48]);
        assert_eq!(t.as_f32().unwrap(), data.as_slice());
    }
    // Alignment is per dtype: offset 2 is fine for bf16.
    let file = TempFile::with(&[0u8; 10]);
    let t = Tensor::mapped(file.map(), 2..10, &[4], DType::BF16).unwrap();
    assert!(t.is_mapped());
    let t = Tensor::mapped(file.map(), 1..9, &[4], DType::BF16).unwrap();
    assert!(!t.is_mapped());
}

#[test]
fn mapped_ranges_are_checked() {
    let file = file_with_f32_at(0, &values(4));
    let map = file.map();
    assert!(matches!(
        Tensor::mapped(map.clone(), 0..16, &[5], DType::F32),
        Err(EngineError::Tensor(_))
    ));
    assert!(matches!(
        Tensor::mapped(map.clone(), 8..24, &[4], DType::F32),
        Err(EngineError::Tensor(_))
    ));
    assert!(matches!(Tensor::mapped(map, 0..16, &[4], DType::F32), Ok(t) if t.is_mapped()));
}

#[test]
fn writing_to_a_mapped_tensor_copies_it_first() {
    let data = values(6);
    let file = file_with_f32_at(0, &data);
    let map = file.map();
    let mut t = Tensor::mapped(map.clone(), 0..24, &[6], DType::F32).unwrap();
    let view = t.clone();
    t.as_f32_mut().unwrap()[0] = 42.0;
    assert!(!t.is_mapped());
    assert_eq!(t.as_f32().unwrap()[0], 42.0);
    assert_eq!(&t.as_f32().unwrap()[1..], &data[1..]);
    // The mapping and other views of it are untouched.
    assert!(view.is_mapped());
    assert_eq!(view.as_f32().unwrap(), data.as_slice());
    assert_eq!(&map[..4], bytemuck::bytes_of(&data[0]));
    assert_eq!(
        std::fs::read(&file.0).unwrap(),
        bytemuck::cast_slice::<f32, u8>(&data)
    );
}

#[test]
fn a_mapped_weight_runs_like_an_owned_one() {
    let w_data = values(12);
    let file = file_with_f32_at(16, &w_data);
    let mapped = Tensor::mapped(file.map(), 16..64, &[3, 4], DType::F32).unwrap();
    assert!(mapped.is_mapped());
    let owned = Tensor::from_f32(&[3, 4], &w_data).unwrap();

    let mut g = Graph::new();
    let x = g.input("x", &[2, 4], DType::F32);
    let w = g.param("w", &[3, 4], DType::F32, false);
    let y = g.linear(x, w, None).unwrap();
    let plan = compile(g, &[y]).unwrap();
    let xt = Tensor::from_f32(&[2, 4], &[1.0, 2.0, 3.0, 4.0, -1.0, 0.5, 0.0, 2.0]).unwrap();
    let mut ex = CpuExecutor::new();
    let mut feeds = Feeds::new();
    feeds.bind(x, &xt).bind(w, &mapped);
    let a = ex.run(&plan, &feeds).unwrap();
    feeds.bind(w, &owned);
    let b = ex.run(&plan, &feeds).unwrap();
    assert_eq!(a[0].bytes(), b[0].bytes());
    let want0: f32 = (0..4).map(|k| xt.as_f32().unwrap()[k] * w_data[k]).sum();
    assert!((a[0].as_f32().unwrap()[0] - want0).abs() < 1e-5);
}

#[test]
fn bytes_round_trip() {
    let data = values(7);
    let t = Tensor::from_f32(&[7], &data).unwrap();
    assert!(!t.is_mapped());
    assert_eq!(t.bytes(), bytemuck::cast_slice::<f32, u8>(&data));
    let u = Tensor::from_bytes(&[7], DType::F32, t.bytes()).unwrap();
    assert_eq!(u.as_f32().unwrap(), data.as_slice());

    // Odd byte counts (bf16 of odd length) survive the u64-word storage.
    let raw: Vec<u8> = (0u8..6).collect();
    let b = Tensor::from_bytes(&[3], DType::BF16, &raw).unwrap();
    assert_eq!(b.bytes(), raw.as_slice());

    let i = Tensor::from_i32(&[2, 2], &[1, -2, 3, i32::MIN]).unwrap();
    assert_eq!(i.as_i32().unwrap(), &[1, -2, 3, i32::MIN]);
    let s = Tensor::from_u32(&[1], &[u32::MAX]).unwrap();
    assert_eq!(s.bytes(), &u32::MAX.to_ne_bytes());

    let z = Tensor::zeros(&[3, 5], DType::F16);
    assert_eq!(z.bytes(), &[0u8; 30]);
    assert_eq!(Tensor::zeros(&[0], DType::F32).bytes().len(), 0);

    assert!(matches!(
        Tensor::from_bytes(&[2], DType::F32, &[0u8; 7]),
        Err(EngineError::Tensor(_))
    ));
    assert!(matches!(
        Tensor::from_f32(&[2, 2], &[1.0; 3]),
        Err(EngineError::Tensor(_))
    ));
    assert!(matches!(t.as_i32(), Err(EngineError::Tensor(_))));
    assert!(matches!(b.as_f32(), Err(EngineError::Tensor(_))));
}

#[test]
fn bf16_and_f16_round_trips_lose_little() {
    let data: Vec<f32> = (0..200)
        .map(|i| ((i as f32) * 0.917).sin() * 10f32.powi(i % 7 - 3))
        .collect();
    let t = Tensor::from_f32(&[10, 20], &data).unwrap();
    for (dtype, rel) in [(DType::BF16, 1.0 / 256.0), (DType::F16, 1.0 / 2048.0)] {
        let low = t.to_dtype(dtype).unwrap();
        assert_eq!((low.dtype(), low.shape()), (dtype, t.shape()));
        assert_eq!(low.bytes().len(), 400);
        let back = low.to_dtype(DType::F32).unwrap();
        assert_eq!(back.shape(), t.shape());
        let mut changed = 0;
        for (a, b) in data.iter().zip(back.as_f32().unwrap()) {
            // f16 has a narrow range: only check normal values there.
            if dtype == DType::F16 && a.abs() < 1e-4 {
                continue;
            }
            assert!((a - b).abs() <= rel * a.abs(), "{dtype}: {a} -> {b}");
            changed += (a != b) as usize;
        }
        assert!(changed > 0, "{dtype}: the round trip must actually round");
        assert_eq!(low.to_f32_vec().unwrap(), back.as_f32().unwrap());
    }
    // bf16 conversion matches the half crate's rounding exactly.
    let low = t.to_dtype(DType::BF16).unwrap();
    let want: Vec<bf16> = data.iter().map(|v| bf16::from_f32(*v)).collect();
    assert_eq!(low.bytes(), bytemuck::cast_slice::<bf16, u8>(&want));

    assert_eq!(t.to_dtype(DType::F32).unwrap().bytes(), t.bytes());
    assert!(matches!(
        t.to_dtype(DType::I32),
        Err(EngineError::Tensor(_))
    ));
    let ids = Tensor::from_i32(&[2], &[1, 2]).unwrap();
    assert!(matches!(
        ids.to_dtype(DType::F32),
        Err(EngineError::Tensor(_))
    ));
    assert!(matches!(ids.to_f32_vec(), Err(EngineError::Tensor(_))));
}
