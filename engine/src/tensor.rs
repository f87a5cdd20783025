//! Tensors: a shape, a dtype and bytes that are either owned or a zero-copy
//! view into a memory-mapped file.

use crate::EngineError;
use graft_ir::DType;
use graft_kernels::{bf16, f16};
use memmap2::Mmap;
use std::ops::Range;
use std::sync::Arc;

/// Where a tensor's bytes live.
#[derive(Clone, Debug)]
pub enum Storage {
    /// Heap bytes, 8-byte aligned (backed by u64 words).
    Owned { words: Vec<u64>, len: usize },
    /// A range of a shared read-only file mapping.
    Mapped { map: Arc<Mmap>, range: Range<usize> },
}

#[derive(Clone, Debug)]
pub struct Tensor {
    shape: Vec<usize>,
    dtype: DType,
    storage: Storage,
    /// Names these contents: unique to a tensor's creation and renewed by
    /// every mutable borrow (a clone keeps it: same contents), so a device
    /// copy tagged with it is current while the stamps match. 0: contents
    /// may change behind the tensor's back (lent for in-place updates).
    stamp: u64,
    /// The last change when it was [`Tensor::write_at`]: the stamp before
    /// it and the bytes it wrote.
    last_write: Option<(u64, Range<usize>)>,
}

/// A stamp no tensor has had (see [`Tensor::stamp`]).
fn next_stamp() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn owned_from_bytes(bytes: &[u8]) -> Storage {
    let mut words = vec![0u64; bytes.len().div_ceil(8)];
    bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..bytes.len()].copy_from_slice(bytes);
    Storage::Owned {
        words,
        len: bytes.len(),
    }
}

impl Tensor {
    fn check_len(shape: &[usize], dtype: DType, len: usize) -> Result<(), EngineError> {
        let want = dtype.bytes(shape.iter().product::<usize>());
        if want != len {
            return Err(EngineError::Tensor(format!(
                "{len} bytes do not hold a {dtype} tensor of shape {shape:?} ({want} bytes)"
            )));
        }
        Ok(())
    }

    /// Copies `bytes` into a new owned tensor.
    pub fn from_bytes(shape: &[usize], dtype: DType, bytes: &[u8]) -> Result<Self, EngineError> {
        Self::check_len(shape, dtype, bytes.len())?;
        Ok(Tensor {
            shape: shape.to_vec(),
            dtype,
            storage: owned_from_bytes(bytes),
            stamp: next_stamp(),
            last_write: None,
        })
    }

    /// A view of `range` in `map`: zero-copy when the bytes are aligned for
    /// `dtype`, else copied.
    pub fn mapped(
        map: Arc<Mmap>,
        range: Range<usize>,
        shape: &[usize],
        dtype: DType,
    ) -> Result<Self, EngineError> {
        Self::check_len(shape, dtype, range.len())?;
        if range.end > map.len() {
            return Err(EngineError::Tensor(format!(
                "range {range:?} lies past the mapping ({} bytes)",
                map.len()
            )));
        }
        let aligned = (map.as_ptr() as usize + range.start).is_multiple_of(dtype.align());
        if aligned {
            Ok(Tensor {
                shape: shape.to_vec(),
                dtype,
                storage: Storage::Mapped { map, range },
                stamp: next_stamp(),
                last_write: None,
            })
        } else {
            Self::from_bytes(shape, dtype, &map[range])
        }
    }

    pub fn from_f32(shape: &[usize], data: &[f32]) -> Result<Self, EngineError> {
        Self::from_bytes(shape, DType::F32, bytemuck::cast_slice(data))
    }

    pub fn from_i32(shape: &[usize], data: &[i32]) -> Result<Self, EngineError> {
        Self::from_bytes(shape, DType::I32, bytemuck::cast_slice(data))
    }

    pub fn from_u32(shape: &[usize], data: &[u32]) -> Result<Self, EngineError> {
        Self::from_bytes(shape, DType::U32, bytemuck::cast_slice(data))
    }

    pub fn zeros(shape: &[usize], dtype: DType) -> Self {
        let len = dtype.bytes(shape.iter().product::<usize>());
        Tensor {
            shape: shape.to_vec(),
            dtype,
            storage: Storage::Owned {
                words: vec![0; len.div_ceil(8)],
                len,
            },
            stamp: next_stamp(),
            last_write: None,
        }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn storage(&self) -> &Storage {
        &self.storage
    }
    pub fn is_mapped(&self) -> bool {
        matches!(self.storage, Storage::Mapped { .. })
    }

    pub fn bytes(&self) -> &[u8] {
        match &self.storage {
            Storage::Owned { words, len } => &bytemuck::cast_slice(words)[..*len],
            Storage::Mapped { map, range } => &map[range.clone()],
        }
    }

    /// Identifies the current contents: two tensors (or one at two times)
    /// with the same non-zero stamp hold the same bytes. What a device keeps
    /// a copy by (the GPU executor uploads a leaf again when it changes).
    pub fn stamp(&self) -> u64 {
        self.stamp
    }

    /// Lent for in-place updates through a raw pointer: its contents may
    /// change without a new stamp, so none is trusted until the next
    /// mutable borrow.
    pub(crate) fn mark_volatile(&mut self) {
        self.stamp = 0;
        self.last_write = None;
    }

    /// Writes `src` at byte `offset` (a KV cache's new rows, say). Like any
    /// change it renews the stamp, but it is remembered, so a device copy of
    /// the previous contents can take just these bytes (see
    /// [`Tensor::last_write`]).
    pub fn write_at(&mut self, offset: usize, src: &[u8]) -> Result<(), EngineError> {
        let len = self.bytes().len();
        if offset.checked_add(src.len()).is_none_or(|end| end > len) {
            return Err(EngineError::Tensor(format!(
                "writing {} bytes at {offset} of a {len}-byte tensor",
                src.len()
            )));
        }
        let before = self.stamp;
        self.bytes_mut()[offset..offset + src.len()].copy_from_slice(src);
        // Contents that were volatile are no known state to update from.
        self.last_write = (before != 0).then(|| (before, offset..offset + src.len()));
        Ok(())
    }

    /// The stamp before the last change and the bytes it wrote, when that
    /// change was a [`Tensor::write_at`]: a copy made at that stamp is
    /// current once it takes those bytes.
    pub fn last_write(&self) -> Option<(u64, Range<usize>)> {
        self.last_write.clone()
    }

    /// Mutable bytes, copying a mapped tensor into owned memory first.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        self.stamp = next_stamp();
        self.last_write = None;
        if let Storage::Mapped { .. } = self.storage {
            self.storage = owned_from_bytes(self.bytes());
        }
        match &mut self.storage {
            Storage::Owned { words, len } => &mut bytemuck::cast_slice_mut(words)[..*len],
            Storage::Mapped { .. } => unreachable!("converted to owned above"),
        }
    }

    /// The elements as `f32` (the tensor must be f32).
    pub fn as_f32(&self) -> Result<&[f32], EngineError> {
        self.expect(DType::F32)?;
        Ok(bytemuck::cast_slice(self.bytes()))
    }

    pub fn as_f32_mut(&mut self) -> Result<&mut [f32], EngineError> {
        self.expect(DType::F32)?;
        Ok(bytemuck::cast_slice_mut(self.bytes_mut()))
    }

    pub fn as_i32(&self) -> Result<&[i32], EngineError> {
        self.expect(DType::I32)?;
        Ok(bytemuck::cast_slice(self.bytes()))
    }

    fn expect(&self, dtype: DType) -> Result<(), EngineError> {
        if self.dtype != dtype {
            return Err(EngineError::Tensor(format!(
                "expected a {dtype} tensor, got {}",
                self.dtype
            )));
        }
        Ok(())
    }

    /// The elements converted to f32 (floats only).
    pub fn to_f32_vec(&self) -> Result<Vec<f32>, EngineError> {
        let b = self.bytes();
        Ok(match self.dtype {
            DType::F32 => bytemuck::cast_slice::<u8, f32>(b).to_vec(),
            DType::BF16 => bytemuck::cast_slice::<u8, bf16>(b)
                .iter()
                .map(|x| x.to_f32())
                .collect(),
            DType::F16 => bytemuck::cast_slice::<u8, f16>(b)
                .iter()
                .map(|x| x.to_f32())
                .collect(),
            DType::Nf4 { .. } => {
                let mut out = vec![0f32; self.numel()];
                self.nf4()?.dequantize_into(0, &mut out);
                out
            }
            other => {
                return Err(EngineError::Tensor(format!(
                    "cannot read a {other} tensor as f32"
                )))
            }
        })
    }

    /// Converts a float tensor to another float dtype (a copy; shares the
    /// storage when the dtype already matches).
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor, EngineError> {
        if dtype == self.dtype {
            return Ok(self.clone());
        }
        let x = self.to_f32_vec()?;
        let bytes: Vec<u8> = match dtype {
            DType::F32 => bytemuck::cast_slice(&x).to_vec(),
            DType::BF16 => {
                bytemuck::cast_slice(&x.iter().map(|v| bf16::from_f32(*v)).collect::<Vec<_>>())
                    .to_vec()
            }
            DType::F16 => {
                bytemuck::cast_slice(&x.iter().map(|v| f16::from_f32(*v)).collect::<Vec<_>>())
                    .to_vec()
            }
            other => {
                return Err(EngineError::Tensor(format!(
                    "cannot convert floats to {other}"
                )))
            }
        };
        Tensor::from_bytes(&self.shape, dtype, &bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stamps name contents: new for every tensor and every mutable borrow,
    /// kept by a clone, and 0 (unknown) while lent for in-place updates.
    #[test]
    fn stamps_change_with_contents() {
        let mut a = Tensor::from_f32(&[2], &[1.0, 2.0]).unwrap();
        let b = Tensor::from_f32(&[2], &[1.0, 2.0]).unwrap();
        assert_ne!(a.stamp(), b.stamp());
        assert_ne!(a.stamp(), 0);
        let c = a.clone();
        assert_eq!(c.stamp(), a.stamp());
        let before = a.stamp();
        a.as_f32_mut().unwrap()[0] = 3.0;
        assert_ne!(a.stamp(), before);
        assert_ne!(a.stamp(), c.stamp());
        let mut feeds = crate::Feeds::new();
        feeds.bind_mut(graft_ir::ValueId(0), &mut a);
        drop(feeds);
        assert_eq!(a.stamp(), 0);
        a.bytes_mut();
        assert_ne!(a.stamp(), 0);
    }

    /// A `write_at` is remembered with the stamp it replaced and the bytes
    /// it wrote, until the next change of any other kind; a write past the
    /// end is refused.
    #[test]
    fn partial_writes_are_remembered() {
        let mut a = Tensor::zeros(&[4, 2], DType::F32);
        let before = a.stamp();
        a.write_at(8, bytemuck::cast_slice(&[1f32, 2.0])).unwrap();
        assert_ne!(a.stamp(), before);
        assert_eq!(a.last_write(), Some((before, 8..16)));
        assert_eq!(
            a.as_f32().unwrap(),
            &[0.0, 0.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0]
        );
        let after = a.stamp();
        a.write_at(24, bytemuck::cast_slice(&[3f32, 4.0])).unwrap();
        assert_eq!(a.last_write(), Some((after, 24..32)));
        a.bytes_mut();
        assert_eq!(a.last_write(), None);
        let e = a.write_at(28, &[0u8; 8]).unwrap_err().to_string();
        assert!(e.contains("8 bytes at 28 of a 32-byte tensor"), "{e}");
    }
}
