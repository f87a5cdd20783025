//! The GPU side of the kernels: CUDA C++ sources under `kernels/cuda/`,
//! compiled at run time by NVRTC for the device's architecture and cached on
//! disk, launched through cudarc. Nothing here panics when the driver or
//! NVRTC is missing: every entry point returns a [`GpuError`] saying what is
//! missing and how to proceed.

mod attention;
mod dora;
mod elementwise;
mod embedding;
mod ids;
mod loss;
mod nf4;
mod rows;
mod update;

pub use attention::{AttentionKernels, DeviceSegments, HEAD_DIMS as ATTENTION_HEAD_DIMS};
pub use dora::{DoraKernels, DORA_MAX_RANK};
pub use elementwise::{DeviceElem, ElementwiseKernels};
pub use embedding::EmbeddingKernels;
pub use ids::{DeviceIds, Ids};
pub use loss::LossKernels;
pub use nf4::{DeviceNf4, LoraTerm, Nf4Epilogue, Nf4Gemm, NF4_GEMV_MAX_M};
pub use rows::RowKernels;
pub use update::UpdateKernels;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, LaunchConfig, PinnedHostSlice,
    PushKernelArg,
};
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// The CUDA sources, by name. Every one is compiled in CI for [`ARCHS`].
pub const SOURCES: [(&str, &str); 8] = [
    ("nf4_gemm", include_str!("../../cuda/nf4_gemm.cu")),
    ("rows", include_str!("../../cuda/rows.cu")),
    ("loss", include_str!("../../cuda/loss.cu")),
    ("embedding", include_str!("../../cuda/embedding.cu")),
    ("update", include_str!("../../cuda/update.cu")),
    ("attention", include_str!("../../cuda/attention.cu")),
    ("elementwise", include_str!("../../cuda/elementwise.cu")),
    ("dora", include_str!("../../cuda/dora.cu")),
];

/// Definitions every source shares, prepended before compiling.
const COMMON: &str = include_str!("../../cuda/common.cuh");

/// Architectures the sources must compile for (Ampere and Hopper).
pub const ARCHS: [&str; 2] = ["sm_80", "sm_90"];

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("no CUDA driver (libcuda.so) could be loaded: run on the CPU (--device cpu) or install the NVIDIA driver")]
    NoDriver,
    #[error("cuBLAS (libcublas.so) could not be loaded: install the CUDA toolkit or `pip install nvidia-cublas` and put its lib folder on LD_LIBRARY_PATH, or run on the CPU (--device cpu)")]
    NoCublas,
    #[error("NVRTC (libnvrtc.so) could not be loaded: install the CUDA toolkit or `pip install nvidia-cuda-nvrtc` and put its lib folder on LD_LIBRARY_PATH, or run on the CPU (--device cpu)")]
    NoNvrtc,
    #[error("GPU {name} is sm_{major}{minor}; Graft needs sm_80 or newer (use --device cpu)")]
    TooOld {
        name: String,
        major: i32,
        minor: i32,
    },
    #[error("NVRTC failed to compile `{source_name}` for {arch}:\n{log}")]
    Compile {
        source_name: String,
        arch: String,
        log: String,
    },
    #[error("CUDA: {0}")]
    Driver(String),
    #[error("{0}")]
    Shape(String),
}

fn driver(e: cudarc::driver::DriverError) -> GpuError {
    GpuError::Driver(e.to_string())
}

/// Threads per block of the non-GEMM kernels (a multiple of 32, as the
/// block reductions of common.cuh need).
const THREADS: u32 = 256;

/// Fails unless a buffer holds the `want` values its shape needs.
fn check(what: &str, got: usize, want: usize) -> Result<(), GpuError> {
    if got != want {
        return Err(GpuError::Shape(format!(
            "{what}: {got} values, the shape needs {want}"
        )));
    }
    Ok(())
}

/// A grid-stride launch over `n` elements, at most `max_blocks` blocks (and
/// at least one, so a kernel that also reduces runs for `n = 0`).
fn grid_stride(n: usize, max_blocks: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (
            n.div_ceil(THREADS as usize).clamp(1, max_blocks) as u32,
            1,
            1,
        ),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A grid-stride launch over `n` elements.
fn elementwise(n: usize) -> LaunchConfig {
    grid_stride(n, 65_535)
}

/// One block per row.
fn per_row(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One block, for the last step of a reduction.
fn one_block() -> LaunchConfig {
    per_row(1)
}

/// A count passed to a kernel as `int`.
fn int(what: &str, n: usize) -> Result<i32, GpuError> {
    i32::try_from(n)
        .map_err(|_| GpuError::Shape(format!("{what}: {n} is over the kernels' 2^31-1")))
}

/// Runs a cudarc call that may panic when a library cannot be loaded.
fn guarded<T>(missing: GpuError, f: impl FnOnce() -> T) -> Result<T, GpuError> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = catch_unwind(AssertUnwindSafe(f));
    std::panic::set_hook(hook);
    r.map_err(|_| missing)
}

/// The NVRTC version, if NVRTC can be loaded.
pub fn nvrtc_version() -> Result<(i32, i32), GpuError> {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: plain out-parameters.
    let rc = guarded(GpuError::NoNvrtc, || unsafe {
        cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor)
    })?;
    if rc != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(GpuError::NoNvrtc);
    }
    Ok((major, minor))
}

/// Compiles one source to PTX for `arch` (e.g. "sm_90"), without a GPU.
pub fn compile_ptx(name: &str, src: &str, arch: &str) -> Result<String, GpuError> {
    nvrtc_version()?;
    let opts = cudarc::nvrtc::CompileOptions {
        // Multiply-then-add as the CPU does, so dequantized weights are
        // bit-identical on both sides.
        fmad: Some(false),
        options: vec![format!("--gpu-architecture={arch}"), "--std=c++17".into()],
        name: Some(format!("{name}.cu")),
        ..Default::default()
    };
    match cudarc::nvrtc::compile_ptx_with_opts(format!("{COMMON}\n{src}"), opts) {
        Ok(ptx) => Ok(ptx.to_src()),
        Err(e) => Err(GpuError::Compile {
            source_name: name.into(),
            arch: arch.into(),
            log: e.to_string(),
        }),
    }
}

/// Where compiled PTX is cached.
fn cache_dir() -> Option<PathBuf> {
    Some(crate::cache::cache_root()?.join("ptx"))
}

/// One GPU: its context, a stream, and the modules compiled for it.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    arch: String,
    modules: Mutex<HashMap<String, Arc<CudaModule>>>,
}

impl Gpu {
    /// Opens GPU `ordinal`, refusing GPUs older than sm_80.
    pub fn open(ordinal: usize) -> Result<Gpu, GpuError> {
        let ctx = guarded(GpuError::NoDriver, || CudaContext::new(ordinal))?.map_err(driver)?;
        let (major, minor) = ctx.compute_capability().map_err(driver)?;
        if major < 8 {
            let name = ctx.name().unwrap_or_default();
            return Err(GpuError::TooOld { name, major, minor });
        }
        // One stream orders every launch and copy, so cudarc's per-buffer
        // events for cross-stream ordering would only cost time; without
        // them a buffer can also be borrowed from raw memory (`borrow`).
        // SAFETY: set before any buffer of this context exists.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        Ok(Gpu {
            ctx,
            stream,
            arch: format!("sm_{major}{minor}"),
            modules: Mutex::new(HashMap::new()),
        })
    }

    pub fn name(&self) -> String {
        self.ctx.name().unwrap_or_default()
    }
    pub fn arch(&self) -> &str {
        &self.arch
    }
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Page-locked host memory for fast copies to and from this GPU
    /// (cacheable, unlike cudarc's write-combined default, which the host
    /// reads slowly). Its bytes start unset.
    pub fn pinned(&self, len: usize) -> Result<PinnedHostSlice<u8>, GpuError> {
        // SAFETY: callers write every byte they read (copies from the device).
        unsafe { self.ctx.alloc_pinned_with_flags::<u8>(len.max(1), 0) }.map_err(driver)
    }

    /// A cuBLAS handle on this GPU's stream (loading cuBLAS the first time:
    /// a missing library is `GpuError::NoCublas`, not a panic).
    pub fn cublas(&self) -> Result<cudarc::cublas::CudaBlas, GpuError> {
        let stream = self.stream.clone();
        guarded(GpuError::NoCublas, || cudarc::cublas::CudaBlas::new(stream))?
            .map_err(|e| GpuError::Driver(format!("cuBLAS: {e}")))
    }

    /// Device memory in use on this GPU, by every process (total - free).
    pub fn memory_in_use(&self) -> Result<usize, GpuError> {
        let (free, total) = self.ctx.mem_get_info().map_err(driver)?;
        Ok(total - free)
    }

    /// Device memory free now and in all, in bytes.
    pub fn memory_free_total(&self) -> Result<(usize, usize), GpuError> {
        self.ctx.mem_get_info().map_err(driver)
    }

    /// A typed window of memory that another allocation owns, which every
    /// launcher takes as it takes an owned buffer (an executor's values in
    /// its one arena). Two windows may overlap: where a kernel allows its
    /// output to alias an input, its launcher says so.
    ///
    /// # Safety
    /// `ptr .. ptr + len·size_of::<T>()` must lie inside a live allocation
    /// of this GPU that outlives the window, aligned for `T`; and the
    /// `CudaSlice` the window derefs to must never be moved out of it
    /// (`mem::replace`, `mem::swap`): dropped elsewhere, it would free
    /// memory its owner still holds.
    pub unsafe fn borrow<T>(&self, ptr: u64, len: usize) -> Borrowed<T> {
        Borrowed(Some(self.stream.upgrade_device_ptr(ptr, len)))
    }
}

/// See [`Gpu::borrow`]: a buffer that is never freed.
pub struct Borrowed<T>(Option<CudaSlice<T>>);

impl<T> std::ops::Deref for Borrowed<T> {
    type Target = CudaSlice<T>;
    fn deref(&self) -> &CudaSlice<T> {
        self.0.as_ref().expect("a window is live until dropped")
    }
}

impl<T> std::ops::DerefMut for Borrowed<T> {
    fn deref_mut(&mut self) -> &mut CudaSlice<T> {
        self.0.as_mut().expect("a window is live until dropped")
    }
}

impl<T> Drop for Borrowed<T> {
    fn drop(&mut self) {
        // Lets go of the pointer without freeing what another owner holds.
        if let Some(s) = self.0.take() {
            s.leak();
        }
    }
}

/// The device address of a buffer (for windows into it: [`Gpu::borrow`]).
pub fn device_addr<T>(s: &CudaSlice<T>) -> u64 {
    use cudarc::driver::DevicePtr;
    s.device_ptr(s.stream()).0
}

impl Gpu {
    /// The module of source `name`, compiled for this GPU (memory, then the
    /// disk cache keyed by source hash, architecture and NVRTC version, then
    /// NVRTC).
    pub fn module(&self, name: &str) -> Result<Arc<CudaModule>, GpuError> {
        let src = SOURCES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, s)| *s)
            .ok_or_else(|| GpuError::Shape(format!("no CUDA source named `{name}`")))?;
        self.module_of(name, src)
    }

    /// Kernel `name` of a generated source `src` (an elementwise chain's:
    /// the engine writes it), compiled through the same caches; `name` must
    /// identify `src` (the engine names chains by their source's hash).
    pub fn generated_kernel(&self, name: &str, src: &str) -> Result<CudaFunction, GpuError> {
        self.module_of(name, src)?
            .load_function(name)
            .map_err(driver)
    }

    /// Launches a generated elementwise kernel (`generated_kernel`) over
    /// `n` output elements in rows of `cols`: its parameters are the inputs'
    /// addresses, the output's, then `n` and `cols`.
    pub fn launch_elementwise(
        &self,
        f: &CudaFunction,
        ins: &[&CudaSlice<u8>],
        out: &mut CudaSlice<u8>,
        n: usize,
        cols: usize,
    ) -> Result<(), GpuError> {
        if n == 0 {
            return Ok(());
        }
        let mut l = self.stream.launch_builder(f);
        for i in ins {
            l.arg(*i);
        }
        l.arg(out).arg(&n).arg(&cols);
        // SAFETY: the caller's kernel takes exactly these parameters (the
        // engine generates both); its grid-stride loop stays within n, and
        // each input holds n, cols or 1 elements as its program reads it.
        unsafe { l.launch(elementwise(n)) }.map_err(driver)?;
        Ok(())
    }

    fn module_of(&self, name: &str, src: &str) -> Result<Arc<CudaModule>, GpuError> {
        if let Some(m) = self.modules.lock().expect("module cache lock").get(name) {
            return Ok(m.clone());
        }
        let (vmaj, vmin) = nvrtc_version()?;
        let key = crate::cache::fnv1a(&[
            COMMON.as_bytes(),
            src.as_bytes(),
            self.arch.as_bytes(),
            format!("{vmaj}.{vmin}").as_bytes(),
        ]);
        let cached = cache_dir().map(|d| d.join(format!("{name}-{}-{key:016x}.ptx", self.arch)));
        let ptx = match cached
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
        {
            Some(ptx) => ptx,
            None => {
                let ptx = compile_ptx(name, src, &self.arch)?;
                if let Some(p) = &cached {
                    // A cache that cannot be written only costs a recompile.
                    let _ = std::fs::create_dir_all(p.parent().expect("cache files have a folder"));
                    let tmp = p.with_extension(format!("tmp{}", std::process::id()));
                    if std::fs::write(&tmp, &ptx).is_ok() {
                        let _ = std::fs::rename(&tmp, p);
                    }
                }
                ptx
            }
        };
        let module = self
            .ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
            .map_err(driver)?;
        self.modules
            .lock()
            .expect("module cache lock")
            .insert(name.to_string(), module.clone());
        Ok(module)
    }
}
