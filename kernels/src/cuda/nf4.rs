//! The NF4 GEMM on tensor cores (kernels/cuda/nf4_gemm.cu): forward
//! `x·dequant(W)ᵀ` and input gradient `dy·dequant(W)`, bf16 in and out, f32
//! accumulation, with LoRA's term, an addend and DoRA's column scale in its
//! epilogue; the CPU twin is [`crate::gemm::gemm_sum`] in bf16 (and, without
//! an epilogue, [`crate::nf4::nf4_matmul`] with bf16 compute). Also the
//! dequantization alone (the executor's path: then cuBLAS) and a GEMV for
//! generation's few rows.

use super::{check, driver, int, DeviceElem, Gpu, GpuError};
use crate::bf16;
use crate::nf4::Nf4;
use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use std::sync::Arc;

/// An NF4 weight in device memory.
pub struct DeviceNf4 {
    pub rows: usize,
    pub cols: usize,
    packed: CudaSlice<u8>,
    absmax: CudaSlice<u8>,
    nested_scales: CudaSlice<f32>,
    nested_map: CudaSlice<f32>,
    offset: f32,
}

impl DeviceNf4 {
    /// Device bytes of the codes and their scales.
    pub fn device_bytes(&self) -> usize {
        self.packed.len()
            + self.absmax.len()
            + 4 * (self.nested_scales.len() + self.nested_map.len())
    }

    /// Uploads `w`. The kernel needs block 64, a row length that is a
    /// multiple of 64 (true of every Llama-family linear) and the 256-entry
    /// nested map of double quantization (it copies all of it to shared
    /// memory).
    pub fn upload(gpu: &Gpu, w: &Nf4) -> Result<DeviceNf4, GpuError> {
        if w.block != 64 || !w.cols.is_multiple_of(64) {
            return Err(GpuError::Shape(format!(
                "the GPU NF4 GEMM needs block 64 and in_features a multiple of 64; got block {} with {} columns",
                w.block, w.cols
            )));
        }
        if w.nested_map.len() != 256 {
            return Err(GpuError::Shape(format!(
                "the GPU NF4 GEMM needs a 256-entry nested quant map; got {}",
                w.nested_map.len()
            )));
        }
        let s = gpu.stream();
        Ok(DeviceNf4 {
            rows: w.rows,
            cols: w.cols,
            packed: s.clone_htod(w.packed).map_err(driver)?,
            absmax: s.clone_htod(w.absmax).map_err(driver)?,
            nested_scales: s.clone_htod(w.nested_scales).map_err(driver)?,
            nested_map: s.clone_htod(w.nested_map).map_err(driver)?,
            offset: w.offset,
        })
    }
}

/// LoRA's term in the NF4 GEMM's epilogue: `scale·a·op(b)`, `a [m, r]`,
/// with `b` stored `[width, r]` in the forward (lora_B in
/// `s·(x·A_lᵀ)·B_lᵀ`) and `[r, width]` in the input gradient (lora_A in
/// `s·(dy·B_l)·A_l`). f32, rounded to bf16 after the scale, as the CPU's
/// bf16 GEMM rounds its operands.
#[derive(Clone, Copy)]
pub struct LoraTerm<'a> {
    pub a: &'a CudaSlice<f32>,
    pub b: &'a CudaSlice<f32>,
    pub r: usize,
    pub scale: f32,
}

/// What the NF4 GEMM does to its `[m, width]` product before rounding it,
/// each piece optional: `y = col_scale ⊙ (x·op(W) + lora + addend)` (the
/// fusion pass's NF4 + LoRA + DoRA group; the addend is a residual or
/// another product's sum).
#[derive(Clone, Copy, Default)]
pub struct Nf4Epilogue<'a> {
    pub lora: Option<LoraTerm<'a>>,
    pub addend: Option<&'a CudaSlice<bf16>>,
    pub col_scale: Option<&'a CudaSlice<f32>>,
}

/// The compiled NF4 GEMM kernels of one GPU.
pub struct Nf4Gemm {
    fwd: CudaFunction,
    dgrad: CudaFunction,
    /// `nf4_dequantize{_f32,}`, by [`DeviceElem::INDEX`].
    dequant: [CudaFunction; 2],
    /// `nf4_gemv_{f32,bf16}` (bf16 x), by y's [`DeviceElem::INDEX`].
    gemv: [CudaFunction; 2],
    /// `nf4_gemv_f32x`: f32 x and y (f32 compute).
    gemv_f32x: CudaFunction,
    stream: Arc<CudaStream>,
}

/// The most rows of x [`Nf4Gemm::gemv`] takes (NF4_GEMV_MAX_M in
/// nf4_gemm.cu).
pub const NF4_GEMV_MAX_M: usize = 8;

/// The kernel's block tile (BM x BN in nf4_gemm.cu): rows of x, output columns.
const TILE_M: usize = 256;
const TILE_N: usize = 128;
/// The kernel's dynamic shared memory (SMEM_BYTES in nf4_gemm.cu; it traps
/// when launched with less). Over the 48 KiB default, so each function's
/// limit is raised once; it fits every sm_80+ GPU (99 KiB and up per block).
const SMEM_BYTES: u32 = 91200;

impl Nf4Gemm {
    pub fn new(gpu: &Gpu) -> Result<Nf4Gemm, GpuError> {
        let m = gpu.module("nf4_gemm")?;
        let fwd = m.load_function("nf4_gemm_fwd").map_err(driver)?;
        let dgrad = m.load_function("nf4_gemm_dgrad").map_err(driver)?;
        for f in [&fwd, &dgrad] {
            f.set_attribute(
                CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                SMEM_BYTES as i32,
            )
            .map_err(driver)?;
        }
        Ok(Nf4Gemm {
            fwd,
            dgrad,
            dequant: [
                m.load_function("nf4_dequantize_f32").map_err(driver)?,
                m.load_function("nf4_dequantize").map_err(driver)?,
            ],
            gemv: [
                m.load_function("nf4_gemv_f32").map_err(driver)?,
                m.load_function("nf4_gemv_bf16").map_err(driver)?,
            ],
            gemv_f32x: m.load_function("nf4_gemv_f32x").map_err(driver)?,
            stream: gpu.stream().clone(),
        })
    }

    /// `out = dequant(W)` as `[rows, cols]`: in bf16, bit for bit the
    /// values the GEMM multiplies (for a product through cuBLAS instead); in
    /// f32, bit for bit the CPU's `dequantize_into` (f32 compute).
    pub fn dequantize<T: DeviceElem>(
        &self,
        w: &DeviceNf4,
        out: &mut CudaSlice<T>,
    ) -> Result<(), GpuError> {
        let n = w.rows * w.cols;
        check("nf4 dequantize out", out.len(), n)?;
        // `upload` took whole 64-blocks: n is a multiple of 8.
        let n8 = (n / 8) as i64;
        let mut l = self.stream.launch_builder(&self.dequant[T::INDEX]);
        l.arg(&w.packed)
            .arg(&w.absmax)
            .arg(&w.nested_scales)
            .arg(&w.nested_map)
            .arg(&w.offset)
            .arg(out)
            .arg(&n8);
        // SAFETY: the arguments match the kernel; out holds the n values the
        // grid-stride loop writes, 8 per word of the n/2 code bytes.
        unsafe { l.launch(super::elementwise(n / 8)) }.map_err(driver)?;
        Ok(())
    }

    /// `y[m, rows] = scale·x[m, cols]·Wᵀ + beta·y` for `m` up to
    /// [`NF4_GEMV_MAX_M`] (generation's products): reads the 4-bit codes
    /// once, a warp per row of W, instead of a dequantized copy; the
    /// weights are those [`Nf4Gemm::dequantize`] gives in x's type, the
    /// sums f32. bf16 x writes f32 or bf16 y; f32 x (f32 compute), f32 y.
    /// `beta = 0` does not read `y`.
    pub fn gemv<X: DeviceElem, T: DeviceElem>(
        &self,
        x: &CudaSlice<X>,
        w: &DeviceNf4,
        m: usize,
        scale: f32,
        beta: f32,
        y: &mut CudaSlice<T>,
    ) -> Result<(), GpuError> {
        let f = match (X::INDEX, T::INDEX) {
            (0, 0) => &self.gemv_f32x,
            (0, _) => {
                return Err(GpuError::Shape(
                    "nf4 gemv: f32 x writes f32 y (f32 compute), not bf16".into(),
                ))
            }
            (_, o) => &self.gemv[o],
        };
        if m > NF4_GEMV_MAX_M {
            return Err(GpuError::Shape(format!(
                "nf4 gemv: {m} rows of x, the kernel takes up to {NF4_GEMV_MAX_M}"
            )));
        }
        check("nf4 gemv x", x.len(), m * w.cols)?;
        check("nf4 gemv y", y.len(), m * w.rows)?;
        if m == 0 || w.rows == 0 {
            return Ok(());
        }
        let (m_i, k_i, n_i) = (
            m as i32,
            int("nf4 gemv cols", w.cols)?,
            int("nf4 gemv rows", w.rows)?,
        );
        let mut l = self.stream.launch_builder(f);
        l.arg(x)
            .arg(&m_i)
            .arg(&k_i)
            .arg(&w.packed)
            .arg(&w.absmax)
            .arg(&w.nested_scales)
            .arg(&w.nested_map)
            .arg(&w.offset)
            .arg(y)
            .arg(&n_i)
            .arg(&scale)
            .arg(&beta);
        // A warp per row of W: 8 rows a block of 256 threads.
        let cfg = LaunchConfig {
            grid_dim: (w.rows.div_ceil(8) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match the kernel; x holds m rows of cols
        // (a multiple of 64: `upload`), y m rows of rows; one warp per row.
        unsafe { l.launch(cfg) }.map_err(driver)?;
        Ok(())
    }

    /// `y[m, rows] = x[m, cols]·Wᵀ` when `tb`, else `y[m, cols] = x[m, rows]·W`.
    /// Enqueued on the GPU's stream; does not wait.
    pub fn run(
        &self,
        x: &CudaSlice<bf16>,
        w: &DeviceNf4,
        m: usize,
        tb: bool,
        y: &mut CudaSlice<bf16>,
    ) -> Result<(), GpuError> {
        self.run_fused(x, w, m, tb, &Nf4Epilogue::default(), y)
    }

    /// [`Self::run`] with `epi` applied to the product before it is rounded.
    pub fn run_fused(
        &self,
        x: &CudaSlice<bf16>,
        w: &DeviceNf4,
        m: usize,
        tb: bool,
        epi: &Nf4Epilogue,
        y: &mut CudaSlice<bf16>,
    ) -> Result<(), GpuError> {
        let (inner, width) = if tb {
            (w.cols, w.rows)
        } else {
            (w.rows, w.cols)
        };
        if x.len() != m * inner || y.len() != m * width {
            return Err(GpuError::Shape(format!(
                "nf4 gemm: x has {} values and y {}, but m={m} with W [{}, {}] (tb={tb}) needs {} and {}",
                x.len(),
                y.len(),
                w.rows,
                w.cols,
                m * inner,
                m * width
            )));
        }
        if let Some(l) = &epi.lora {
            if l.r == 0 {
                return Err(GpuError::Shape("nf4 gemm: a LoRA term of rank 0".into()));
            }
            check("nf4 gemm LoRA a", l.a.len(), m * l.r)?;
            check("nf4 gemm LoRA b", l.b.len(), width * l.r)?;
        }
        if let Some(a) = epi.addend {
            check("nf4 gemm addend", a.len(), m * width)?;
        }
        if let Some(c) = epi.col_scale {
            check("nf4 gemm column scales", c.len(), width)?;
        }
        // b's strides by output column and by rank: [width, r] or [r, width].
        let (r, lb_n, lb_r, scale) = match &epi.lora {
            Some(l) if tb => (l.r, l.r, 1, l.scale),
            Some(l) => (l.r, 1, width, l.scale),
            None => (0, 0, 0, 0.0),
        };
        let (r, lb_n, lb_r) = (
            int("nf4 gemm LoRA rank", r)?,
            int("nf4 gemm LoRA stride", lb_n)?,
            int("nf4 gemm LoRA stride", lb_r)?,
        );
        let (mi, ni, ki) = (
            int("nf4 gemm rows", m)?,
            int("nf4 gemm weight rows", w.rows)?,
            int("nf4 gemm weight columns", w.cols)?,
        );
        if m == 0 || width == 0 {
            return Ok(()); // nothing to write; a grid of zero blocks is no launch
        }
        let cfg = LaunchConfig {
            grid_dim: (width.div_ceil(TILE_N) as u32, m.div_ceil(TILE_M) as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: SMEM_BYTES,
        };
        let f = if tb { &self.fwd } else { &self.dgrad };
        // An absent piece is a null pointer, which the kernel skips.
        let null = 0u64;
        let mut l = self.stream.launch_builder(f);
        l.arg(x)
            .arg(&w.packed)
            .arg(&w.absmax)
            .arg(&w.nested_scales)
            .arg(&w.nested_map)
            .arg(&w.offset);
        match &epi.lora {
            Some(lora) => l.arg(lora.a).arg(lora.b),
            None => l.arg(&null).arg(&null),
        };
        l.arg(&r).arg(&lb_n).arg(&lb_r).arg(&scale);
        match epi.addend {
            Some(a) => l.arg(a),
            None => l.arg(&null),
        };
        match epi.col_scale {
            Some(c) => l.arg(c),
            None => l.arg(&null),
        };
        l.arg(y).arg(&mi).arg(&ni).arg(&ki);
        // SAFETY: the argument list matches the kernel's signature (EPI_PARAMS
        // between the weight and y), every buffer's length was checked
        // above, and the grid covers y exactly.
        unsafe { l.launch(cfg) }.map_err(driver)?;
        Ok(())
    }
}
