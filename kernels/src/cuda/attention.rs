//! Launchers of attention.cu: causal self-attention on bf16 with GQA, packed
//! segments and an optional sliding window, forward and backward, flash
//! style (nothing `[t, t]` is stored). The CPU twin is
//! [`crate::attention::attention`] with [`crate::attention::attention_grad`];
//! every shape is checked on the host, and a bad one is a [`GpuError`] naming
//! it, with nothing launched.

use super::{check, driver, grid_stride, int, DeviceElem, Gpu, GpuError};
use crate::attention::AttnShape;
use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use std::collections::HashSet;
use std::sync::Arc;

/// Queries per forward / dq block, keys per tile and per dkdv block
/// (ATT_ROWS in attention.cu); queries per dkdv step (ATT_BQ); the shared
/// tiles' row padding in elements (ATT_PAD); threads per block.
const ROWS: usize = 64;
const BQ: usize = 32;
const PAD: usize = 8;
const THREADS: u32 = 128;

/// The head dims that have kernels (`attn_*_32`, `attn_*_64`, `attn_*_128`).
pub const HEAD_DIMS: [usize; 3] = [32, 64, 128];

#[derive(Clone, Copy)]
enum Kernel {
    Fwd,
    Dq,
    Dkdv,
}

/// Dynamic shared memory of each kernel: attn_smem_bytes in attention.cu
/// (the kernel traps when given less). Over 48 KiB for d = 128, so the
/// functions' limits are raised once; the largest (dkdv, d = 128: 70,400
/// B) fits every sm_80+ GPU.
fn smem_bytes(kernel: Kernel, d: usize) -> u32 {
    let row = (d + PAD) * 2;
    let bytes = match kernel {
        Kernel::Fwd => 3 * ROWS * row,
        Kernel::Dq => 4 * ROWS * row,
        Kernel::Dkdv => (2 * ROWS + 4 * BQ) * row + 6 * BQ * 4,
    };
    bytes as u32
}

/// Segment (document) ids on the device, as the position where each token's
/// run starts: the first key its segment lets it see (the CPU's
/// `key_starts` without the window).
pub struct DeviceSegments {
    run_start: CudaSlice<i32>,
    len: usize,
}

/// Where each token's run of equal ids starts (one entry at least: device
/// buffers are never empty); an id that comes back after another is an
/// error naming its position.
fn run_starts(seg: &[i32]) -> Result<Vec<i32>, GpuError> {
    int("attention segments", seg.len())?;
    let mut seen = HashSet::new();
    let mut run_start: Vec<i32> = Vec::with_capacity(seg.len().max(1));
    for (i, &id) in seg.iter().enumerate() {
        if i > 0 && id == seg[i - 1] {
            run_start.push(run_start[i - 1]);
            continue;
        }
        if !seen.insert(id) {
            return Err(GpuError::Shape(format!(
                "attention segments: id {id} at position {i} comes back after another id \
                 (segments must be contiguous runs)"
            )));
        }
        run_start.push(i as i32);
    }
    if run_start.is_empty() {
        run_start.push(0);
    }
    Ok(run_start)
}

impl DeviceSegments {
    /// Uploads one id per token. Segments must be contiguous runs (as the
    /// attention op documents): an id that comes back after another is
    /// refused, naming its position.
    pub fn upload(gpu: &Gpu, seg: &[i32]) -> Result<DeviceSegments, GpuError> {
        Ok(DeviceSegments {
            run_start: gpu.stream().clone_htod(&run_starts(seg)?).map_err(driver)?,
            len: seg.len(),
        })
    }

    /// Replaces the ids with `seg`'s (the next batch's), in the same
    /// device buffer when the length is the same: no allocation in a
    /// training loop of fixed-shape batches.
    pub fn update(&mut self, gpu: &Gpu, seg: &[i32]) -> Result<(), GpuError> {
        let starts = run_starts(seg)?;
        if starts.len() == self.run_start.len() {
            gpu.stream()
                .memcpy_htod(&starts, &mut self.run_start)
                .map_err(driver)?;
            self.len = seg.len();
            Ok(())
        } else {
            *self = DeviceSegments::upload(gpu, seg)?;
            Ok(())
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The kernels for one head dim; the training passes by
/// [`DeviceElem::INDEX`]: f32 on the CUDA cores (`attn_f32_*`), bf16 on
/// the tensor cores.
struct PerDim {
    fwd: [CudaFunction; 2],
    dq: [CudaFunction; 2],
    dkdv: [CudaFunction; 2],
    cached: [CudaFunction; 2],
}

pub struct AttentionKernels {
    dims: Vec<PerDim>,
    /// `attn_delta_f32`, `attn_delta`.
    delta: [CudaFunction; 2],
    stream: Arc<CudaStream>,
}

/// A checked shape: the kernels' index and scalar arguments.
struct Launch {
    dim: usize,
    t: usize,
    d: usize,
    heads: usize,
    kv_heads: usize,
    args: (i32, i32, i32, i32, f32),
}

impl Launch {
    /// The grid of `kernel` on elements `elem` ([`DeviceElem::INDEX`]): the
    /// tiled kernels take 64 rows a block, the f32 ones one.
    fn grid(&self, kernel: Kernel, elem: usize) -> LaunchConfig {
        let heads = match kernel {
            Kernel::Dkdv => self.kv_heads,
            _ => self.heads,
        };
        let (blocks, smem) = match elem {
            F32 => (self.t, 0),
            _ => (self.t.div_ceil(ROWS), smem_bytes(kernel, self.d)),
        };
        LaunchConfig {
            grid_dim: (blocks as u32, heads as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: smem,
        }
    }
}

/// [`DeviceElem::INDEX`] of f32.
const F32: usize = <f32 as DeviceElem>::INDEX;

impl AttentionKernels {
    pub fn new(gpu: &Gpu) -> Result<AttentionKernels, GpuError> {
        let m = gpu.module("attention")?;
        let f = |name: String, kernel: Kernel, d: usize| -> Result<CudaFunction, GpuError> {
            let f = m.load_function(&name).map_err(driver)?;
            f.set_attribute(
                CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem_bytes(kernel, d) as i32,
            )
            .map_err(driver)?;
            Ok(f)
        };
        let plain = |name: String| m.load_function(&name).map_err(driver);
        let dims = HEAD_DIMS
            .iter()
            .map(|&d| {
                Ok(PerDim {
                    fwd: [
                        plain(format!("attn_f32_fwd_{d}"))?,
                        f(format!("attn_fwd_{d}"), Kernel::Fwd, d)?,
                    ],
                    dq: [
                        plain(format!("attn_f32_dq_{d}"))?,
                        f(format!("attn_dq_{d}"), Kernel::Dq, d)?,
                    ],
                    dkdv: [
                        plain(format!("attn_f32_dkdv_{d}"))?,
                        f(format!("attn_dkdv_{d}"), Kernel::Dkdv, d)?,
                    ],
                    cached: [
                        plain(format!("attn_f32_cached_{d}"))?,
                        plain(format!("attn_cached_{d}"))?,
                    ],
                })
            })
            .collect::<Result<_, GpuError>>()?;
        Ok(AttentionKernels {
            dims,
            delta: [plain("attn_delta_f32".into())?, plain("attn_delta".into())?],
            stream: gpu.stream().clone(),
        })
    }

    /// Checks the shape and the segments (where there are any) against each
    /// other; `span` is the positions a window can reach back over.
    fn launch(
        &self,
        s: &AttnShape,
        seg: Option<&DeviceSegments>,
        span: usize,
    ) -> Result<Launch, GpuError> {
        let (t, d, heads, kv_heads) = (s.tokens, s.head_dim, s.n_heads, s.n_kv_heads);
        let dim = HEAD_DIMS.iter().position(|&x| x == d).ok_or_else(|| {
            GpuError::Shape(format!(
                "attention head_dim: {d} has no GPU kernel (kernels for {HEAD_DIMS:?})"
            ))
        })?;
        if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(GpuError::Shape(format!(
                "attention heads: {heads} query heads do not split into groups over {kv_heads} kv heads"
            )));
        }
        if heads > 65_535 {
            return Err(GpuError::Shape(format!(
                "attention n_heads: {heads} is over the grid's 65535"
            )));
        }
        // A window that reaches back past the first token is no window.
        let window = match s.window {
            Some(0) => {
                return Err(GpuError::Shape(
                    "attention window: 0 would let a query see no key".into(),
                ))
            }
            Some(w) => int("attention window", w.min(span))?,
            None => 0,
        };
        if let Some(seg) = seg {
            check("attention segments", seg.len(), t)?;
        }
        // Offsets into lse and Δ are `int`s in the kernels.
        int("attention tokens × heads", t * heads)?;
        let args = (
            int("attention tokens", t)?,
            heads as i32,
            (heads / kv_heads) as i32,
            window,
            s.scale,
        );
        Ok(Launch {
            dim,
            t,
            d,
            heads,
            kv_heads,
            args,
        })
    }

    /// `out[t, n_heads·d]` and the f32 log-sum-exp of the scaled scores
    /// `lse[t, n_heads]`, as [`crate::attention::attention`]; bf16 rows on
    /// the tensor cores, f32 ones on the CUDA cores.
    #[allow(clippy::too_many_arguments)]
    pub fn forward<T: DeviceElem>(
        &self,
        q: &CudaSlice<T>,
        k: &CudaSlice<T>,
        v: &CudaSlice<T>,
        seg: &DeviceSegments,
        s: AttnShape,
        out: &mut CudaSlice<T>,
        lse: &mut CudaSlice<f32>,
    ) -> Result<(), GpuError> {
        let l = self.launch(&s, Some(seg), s.tokens)?;
        let (qn, kn) = (l.t * l.heads * l.d, l.t * l.kv_heads * l.d);
        check("attention q", q.len(), qn)?;
        check("attention k", k.len(), kn)?;
        check("attention v", v.len(), kn)?;
        check("attention out", out.len(), qn)?;
        check("attention lse", lse.len(), l.t * l.heads)?;
        if l.t == 0 {
            return Ok(());
        }
        let (t, heads, group, window, scale) = l.args;
        let mut b = self.stream.launch_builder(&self.dims[l.dim].fwd[T::INDEX]);
        b.arg(q)
            .arg(k)
            .arg(v)
            .arg(out)
            .arg(lse)
            .arg(&seg.run_start)
            .arg(&t)
            .arg(&heads)
            .arg(&group)
            .arg(&window)
            .arg(&scale);
        // SAFETY: arguments match the kernel; every buffer's length was
        // checked against the shape, the grid covers the t rows of each head
        // and the shared memory is the kernel's own size (the f32 kernels'
        // is static).
        unsafe { b.launch(l.grid(Kernel::Fwd, T::INDEX)) }.map_err(driver)?;
        Ok(())
    }

    /// `dq`, `dk`, `dv` from the forward's saved `out` and `lse` and the
    /// output gradient `dout`, as [`crate::attention::attention_grad`];
    /// `delta[t, n_heads]` is scratch for `Δᵢ = doutᵢ·outᵢ`. Deterministic:
    /// every output element is summed by one thread in a fixed order.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<T: DeviceElem>(
        &self,
        q: &CudaSlice<T>,
        k: &CudaSlice<T>,
        v: &CudaSlice<T>,
        seg: &DeviceSegments,
        out: &CudaSlice<T>,
        lse: &CudaSlice<f32>,
        dout: &CudaSlice<T>,
        s: AttnShape,
        delta: &mut CudaSlice<f32>,
        dq: &mut CudaSlice<T>,
        dk: &mut CudaSlice<T>,
        dv: &mut CudaSlice<T>,
    ) -> Result<(), GpuError> {
        let l = self.launch(&s, Some(seg), s.tokens)?;
        let (qn, kn, rows) = (l.t * l.heads * l.d, l.t * l.kv_heads * l.d, l.t * l.heads);
        for (what, got, want) in [
            ("q", q.len(), qn),
            ("k", k.len(), kn),
            ("v", v.len(), kn),
            ("out", out.len(), qn),
            ("lse", lse.len(), rows),
            ("dout", dout.len(), qn),
            ("delta", delta.len(), rows),
            ("dq", dq.len(), qn),
            ("dk", dk.len(), kn),
            ("dv", dv.len(), kn),
        ] {
            check(&format!("attention_grad {what}"), got, want)?;
        }
        if l.t == 0 {
            return Ok(());
        }
        let (t, heads, group, window, scale) = l.args;
        let (rows_i, d_i) = (rows as i32, l.d as i32);
        let mut b = self.stream.launch_builder(&self.delta[T::INDEX]);
        b.arg(out).arg(dout).arg(&mut *delta).arg(&rows_i).arg(&d_i);
        // SAFETY: arguments match; one warp per row of d values, rows and d
        // checked above (32 threads a row).
        unsafe { b.launch(grid_stride(rows * 32, 65_535)) }.map_err(driver)?;

        let per = &self.dims[l.dim];
        let mut b = self.stream.launch_builder(&per.dq[T::INDEX]);
        b.arg(q)
            .arg(k)
            .arg(v)
            .arg(dout)
            .arg(lse)
            .arg(&*delta)
            .arg(dq)
            .arg(&seg.run_start)
            .arg(&t)
            .arg(&heads)
            .arg(&group)
            .arg(&window)
            .arg(&scale);
        // SAFETY: as the forward; lse and delta hold t·n_heads values.
        unsafe { b.launch(l.grid(Kernel::Dq, T::INDEX)) }.map_err(driver)?;

        let mut b = self.stream.launch_builder(&per.dkdv[T::INDEX]);
        b.arg(q)
            .arg(k)
            .arg(v)
            .arg(dout)
            .arg(lse)
            .arg(&*delta)
            .arg(dk)
            .arg(dv)
            .arg(&seg.run_start)
            .arg(&t)
            .arg(&heads)
            .arg(&group)
            .arg(&window)
            .arg(&scale);
        // SAFETY: as the forward, one block per 64 keys (f32: per key) of
        // each kv head.
        unsafe { b.launch(l.grid(Kernel::Dkdv, T::INDEX)) }.map_err(driver)?;
        Ok(())
    }

    /// Generation's attention, as [`crate::attention::attention_cached`]:
    /// `s.tokens` new queries at positions `start..`, the keys and values of
    /// earlier positions from `k_cache`/`v_cache` (at least `start` rows),
    /// the new ones from `k`/`v`.
    #[allow(clippy::too_many_arguments)]
    pub fn cached<T: DeviceElem>(
        &self,
        q: &CudaSlice<T>,
        k: &CudaSlice<T>,
        v: &CudaSlice<T>,
        k_cache: &CudaSlice<T>,
        v_cache: &CudaSlice<T>,
        start: usize,
        s: AttnShape,
        out: &mut CudaSlice<T>,
    ) -> Result<(), GpuError> {
        let l = self.launch(&s, None, start + s.tokens)?;
        let (qn, kn, kw) = (
            l.t * l.heads * l.d,
            l.t * l.kv_heads * l.d,
            l.kv_heads * l.d,
        );
        check("attention_cached q", q.len(), qn)?;
        check("attention_cached k", k.len(), kn)?;
        check("attention_cached v", v.len(), kn)?;
        check("attention_cached out", out.len(), qn)?;
        for (what, cache) in [("k_cache", k_cache), ("v_cache", v_cache)] {
            if cache.len() < start * kw {
                return Err(GpuError::Shape(format!(
                    "attention_cached {what}: {} values hold fewer than the {start} cached rows of {kw}",
                    cache.len()
                )));
            }
        }
        if l.t == 0 {
            return Ok(());
        }
        // Row offsets are `long long` in the kernel; positions are `int`.
        let start_i = int("attention_cached start + tokens", start + l.t).map(|_| start as i32)?;
        let (_, heads, group, window, scale) = l.args;
        let mut b = self
            .stream
            .launch_builder(&self.dims[l.dim].cached[T::INDEX]);
        b.arg(q)
            .arg(k)
            .arg(v)
            .arg(k_cache)
            .arg(v_cache)
            .arg(out)
            .arg(&start_i)
            .arg(&heads)
            .arg(&group)
            .arg(&window)
            .arg(&scale);
        let cfg = LaunchConfig {
            grid_dim: (int("attention_cached tokens", l.t)? as u32, heads as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: arguments match the kernel; q, k, v and out hold the
        // shape's rows, the caches at least `start` rows; one block per
        // (new token, head).
        unsafe { b.launch(cfg) }.map_err(driver)?;
        Ok(())
    }
}
