//! The GPU executor: runs a plan's schedule on one NVIDIA GPU, its values at
//! the memory plan's offsets in one device arena (the CPU executor's layout),
//! with the kernels of `graft_kernels::cuda` and cuBLAS for dense products.
//! Leaves stay on the device by name and are copied again only when their
//! host contents change (`Tensor::stamp`), so a base model is uploaded
//! once; the plan's outputs come back, and `run` also copies back the
//! tensors a plan updates in place. Trained tensors can be the device's
//! instead (`train_step`, `run_resident`): copied up once, fetched back on
//! demand.
//!
//! Which ops run here is decided before anything is launched
//! ([`gpu_unsupported`], which needs no GPU): a plan with any other op is
//! refused whole, naming the node.

use crate::executor::{act, adalomo_hyper, attn_shape, check_feeds, Feeds};
use crate::optim::AdamWConfig;
use crate::plan::Plan;
use crate::profile::OpProfile;
use crate::tensor::Tensor;
use crate::EngineError;
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaFunction, CudaSlice, PinnedHostSlice};
use graft_ir::{DType, Epilogue, NodeId, Op, Source, ValueId};
use graft_kernels::bf16;
use graft_kernels::cuda::{
    device_addr, AttentionKernels, Borrowed, DeviceIds, DeviceNf4, DeviceSegments, DoraKernels,
    ElementwiseKernels, EmbeddingKernels, Gpu, GpuError, Ids, LossKernels, Nf4Gemm, RowKernels,
    UpdateKernels, ATTENTION_HEAD_DIMS, DORA_MAX_RANK, NF4_GEMV_MAX_M,
};
use graft_kernels::update::AdamWStep;
use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::time::Instant;

/// Scratch ranges are carved at this alignment (cuBLAS and the kernels'
/// 16-byte loads need less).
const ALIGN: usize = 256;

/// Runs `$body` with `$t` the element type of float dtype `$d`: f32, or
/// bf16 (`gpu_unsupported` lets no other float through).
macro_rules! by_float {
    ($d:expr, $t:ident => $body:expr) => {
        match $d {
            DType::F32 => {
                type $t = f32;
                $body
            }
            _ => {
                type $t = bf16;
                $body
            }
        }
    };
}

fn gpu_err(e: GpuError) -> EngineError {
    EngineError::Gpu(e.to_string())
}

/// A leaf kept on the device between runs, by leaf name: the same name is
/// the same tensor in every plan of a model (a training and an eval plan
/// share the base), while value ids differ from plan to plan.
struct Resident {
    /// The stamp of the host tensor it was copied from
    /// ([`Tensor::stamp`]): uploaded again when that changes.
    stamp: u64,
    dtype: DType,
    bytes: usize,
    data: Leaf,
}

enum Leaf {
    Bytes(CudaSlice<u8>),
    Nf4(DeviceNf4),
}

/// The compiled kernels of one GPU.
struct Kernels {
    blas: CudaBlas,
    nf4: Nf4Gemm,
    rows: RowKernels,
    attn: AttentionKernels,
    emb: EmbeddingKernels,
    loss: LossKernels,
    ew: ElementwiseKernels,
    dora: DoraKernels,
    update: UpdateKernels,
}

/// Runs plans on a GPU. Keeps its arena, scratch and frozen weights between
/// runs, so a training loop allocates once and uploads the base model once.
pub struct GpuExecutor {
    gpu: Gpu,
    k: Kernels,
    arena: Option<CudaSlice<u8>>,
    scratch: Option<CudaSlice<u8>>,
    leaves: HashMap<String, Resident>,
    profile: Option<OpProfile>,
    phases: RunPhases,
    /// Page-locked staging for the outputs: copies from pageable memory
    /// run several times slower (160 MB of a 7B step's LoRA gradients took
    /// 157 ms on an H200).
    staging: Option<PinnedHostSlice<u8>>,
    /// Leaves the device owns (`train_step`'s adapters, `run_resident`'s
    /// updated tensors), by name: never copied from the host again until
    /// `disown`.
    device_owned: HashSet<String>,
    /// Their gradients summed over a step's micro-batches, by name.
    grads: HashMap<String, CudaSlice<f32>>,
    /// Compiled elementwise chains, by kernel name (the source's hash).
    chains: HashMap<String, CudaFunction>,
    /// Attention's segments by leaf name, with the stamp of the host tensor
    /// they came from.
    segments: HashMap<String, (u64, DeviceSegments)>,
    /// Token ids grouped by id for the embedding's gradient, likewise.
    grouped_ids: HashMap<String, (u64, DeviceIds)>,
    /// RoPE's inverse frequencies, by their bits.
    inv_freq: HashMap<Vec<u32>, CudaSlice<f32>>,
}

/// AdamW on the GPU for [`GpuExecutor::train_step`]: the same update as the
/// engine's `AdamW` (`UpdateKernels::adamw`, bit for bit), its moments on
/// the device.
pub struct DeviceAdamW {
    pub config: AdamWConfig,
    /// Steps taken (the bias corrections' exponent).
    pub step: u64,
    /// By parameter name.
    moments: HashMap<String, (CudaSlice<f32>, CudaSlice<f32>)>,
}

impl DeviceAdamW {
    pub fn new(config: AdamWConfig) -> DeviceAdamW {
        DeviceAdamW {
            config,
            step: 0,
            moments: HashMap::new(),
        }
    }

    /// Device bytes of the moments.
    pub fn device_bytes(&self) -> usize {
        self.moments
            .values()
            .map(|(m, v)| 4 * (m.len() + v.len()))
            .sum()
    }

    /// The moments `(m, v)` of parameter `name` (of `n` values), copied to
    /// the host: zeros before its first step, as the host's AdamW starts.
    pub fn moments(
        &self,
        gpu: &Gpu,
        name: &str,
        n: usize,
    ) -> Result<(Vec<f32>, Vec<f32>), EngineError> {
        let Some((m, v)) = self.moments.get(name) else {
            return Ok((vec![0.0; n], vec![0.0; n]));
        };
        let down = |d: &CudaSlice<f32>| -> Result<Vec<f32>, EngineError> {
            if d.len() != n {
                return Err(EngineError::Gpu(format!(
                    "AdamW's moments of `{name}` hold {} values, not {n}",
                    d.len()
                )));
            }
            gpu.stream()
                .clone_dtoh(d)
                .map_err(|e| EngineError::Gpu(e.to_string()))
        };
        Ok((down(m)?, down(v)?))
    }

    /// Sets the moments of parameter `name` (a resumed run's).
    pub fn set_moments(
        &mut self,
        gpu: &Gpu,
        name: &str,
        m: &[f32],
        v: &[f32],
    ) -> Result<(), EngineError> {
        let up = |h: &[f32]| {
            gpu.stream()
                .clone_htod(h)
                .map_err(|e| oom("AdamW's moments", 4 * h.len(), e))
        };
        self.moments.insert(name.to_string(), (up(m)?, up(v)?));
        Ok(())
    }
}

/// Where the last run's wall time went, in seconds.
#[derive(Clone, Copy, Debug, Default)]
pub struct RunPhases {
    /// Copying inputs and changed parameters to the device.
    pub upload: f64,
    /// Launching every node and waiting for the GPU to finish them.
    pub compute: f64,
    /// Copying the outputs back.
    pub download: f64,
}

impl GpuExecutor {
    /// Opens GPU `ordinal` and compiles the kernels (NVRTC, cached on disk).
    pub fn new(ordinal: usize) -> Result<GpuExecutor, EngineError> {
        let gpu = Gpu::open(ordinal).map_err(gpu_err)?;
        let blas = gpu.cublas().map_err(gpu_err)?;
        let k = Kernels {
            blas,
            nf4: Nf4Gemm::new(&gpu).map_err(gpu_err)?,
            rows: RowKernels::new(&gpu).map_err(gpu_err)?,
            attn: AttentionKernels::new(&gpu).map_err(gpu_err)?,
            emb: EmbeddingKernels::new(&gpu).map_err(gpu_err)?,
            loss: LossKernels::new(&gpu).map_err(gpu_err)?,
            ew: ElementwiseKernels::new(&gpu).map_err(gpu_err)?,
            dora: DoraKernels::new(&gpu).map_err(gpu_err)?,
            update: UpdateKernels::new(&gpu).map_err(gpu_err)?,
        };
        Ok(GpuExecutor {
            gpu,
            k,
            arena: None,
            scratch: None,
            leaves: HashMap::new(),
            profile: None,
            phases: RunPhases::default(),
            staging: None,
            device_owned: Default::default(),
            grads: HashMap::new(),
            chains: HashMap::new(),
            segments: HashMap::new(),
            grouped_ids: HashMap::new(),
            inv_freq: HashMap::new(),
        })
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// Fails unless `plan` fits in the device memory free now beside what
    /// this executor holds ([`device_bytes_needed`], with a margin for the
    /// driver and cuBLAS), naming both sizes and what to change: checked
    /// before a run starts, so a step too large for the GPU is one clear
    /// error, not an allocation failure at its first step. Meant for a
    /// fresh executor (what it holds is counted as reusable, an optimizer's
    /// moments not at all).
    pub fn check_fits(&self, plan: &Plan) -> Result<(), EngineError> {
        let need = device_bytes_needed(plan);
        let (free, total) = self.gpu.memory_free_total().map_err(gpu_err)?;
        // Held buffers are reused or replaced by the plan's own.
        let have = free + self.device_bytes();
        // cuBLAS's workspace, page-locked staging's bookkeeping, fragmentation.
        let margin = 512 << 20;
        if need + margin > have {
            let gb = |b: usize| b as f64 / 1e9;
            return Err(EngineError::Gpu(format!(
                "the step needs about {:.2} GB of GPU memory (arena {:.2}, weights and inputs, adapters' state) and {} has {:.2} GB free of {:.2}; turn on train.gradient_checkpointing, lower train.micro_batch_size or data.max_seq_len, or use --device cpu",
                gb(need + margin),
                gb(plan.peak_bytes()),
                self.gpu.name(),
                gb(have),
                gb(total)
            )));
        }
        Ok(())
    }

    /// Starts (or, with `false`, stops) timing every node by kind; each node
    /// then waits for the GPU, so a profiled run is slower.
    pub fn profile_ops(&mut self, on: bool) {
        self.profile = on.then(OpProfile::default);
    }

    pub fn op_profile(&self) -> Option<&OpProfile> {
        self.profile.as_ref()
    }

    /// Where the last run's time went.
    pub fn last_run_phases(&self) -> RunPhases {
        self.phases
    }

    /// Device bytes this executor holds: arena, scratch, resident leaves and
    /// summed gradients (an optimizer's moments are its own).
    pub fn device_bytes(&self) -> usize {
        let leaves: usize = self
            .leaves
            .values()
            .map(|r| match &r.data {
                Leaf::Bytes(b) => b.len(),
                Leaf::Nf4(w) => w.device_bytes(),
            })
            .sum();
        let grads: usize = self.grads.values().map(|g| 4 * g.len()).sum();
        self.arena.as_ref().map_or(0, |a| a.len())
            + self.scratch.as_ref().map_or(0, |s| s.len())
            + leaves
            + grads
    }

    /// Waits for every launch so far (a run returns once its outputs are
    /// back, so this is for timing only).
    pub fn synchronize(&self) -> Result<(), EngineError> {
        self.gpu
            .stream()
            .synchronize()
            .map_err(|e| EngineError::Gpu(e.to_string()))
    }

    /// Runs `plan` and returns its outputs as host tensors, in plan order.
    /// Tensors the plan updates in place (bound with `Feeds::bind_mut`) are
    /// copied to the device for the run and back after it, as the CPU
    /// leaves them; [`Self::run_resident`] keeps them on the device instead.
    /// A tensor the device owns is not copied up: its device copy is run
    /// and copied back over the binding.
    pub fn run(&mut self, plan: &Plan, feeds: &Feeds) -> Result<Vec<Tensor>, EngineError> {
        self.execute(plan, feeds)?;
        let out = self.download(plan, plan.outputs())?;
        let g = plan.graph();
        let s = self.gpu.stream();
        for v in plan.leaves() {
            let Some((.., ptr, len, true)) = feeds.view(v) else {
                continue;
            };
            let name = leaf_key(g, v);
            let Some(Resident {
                data: Leaf::Bytes(buf),
                ..
            }) = self.leaves.get(&name)
            else {
                return Err(EngineError::Gpu(format!("`{name}` is not on the device")));
            };
            if len > 0 {
                // SAFETY: the tensor lent exclusively to `feeds` for the
                // plan to update; nothing else reads or writes it meanwhile.
                let host = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
                s.memcpy_dtoh(&buf.slice(..len), host)
                    .map_err(|e| EngineError::Gpu(format!("copying `{name}` back: {e}")))?;
            }
        }
        Ok(out)
    }

    /// [`Self::run`] for a plan that updates tensors in place (LOMO,
    /// AdaLomo and their state) that are the device's: each is copied from
    /// its binding at the first such run, then never read from the host
    /// again nor copied back ([`Self::download_owned`] does that, for
    /// checkpoints and evaluation on the host). Plans run later read the
    /// device's copies by name.
    pub fn run_resident(&mut self, plan: &Plan, feeds: &Feeds) -> Result<Vec<Tensor>, EngineError> {
        let g = plan.graph();
        for &n in plan.schedule() {
            let node = g.node(n);
            for &i in node.op.in_place_inputs() {
                self.own(&leaf_key(g, node.inputs[i]));
            }
        }
        self.execute(plan, feeds)?;
        self.download(plan, plan.outputs())
    }

    /// Makes leaf `name` the device's: copied from its binding at the next
    /// run (whatever an earlier run left resident), never again after.
    fn own(&mut self, name: &str) {
        if self.device_owned.insert(name.to_string()) {
            self.leaves.remove(name);
        }
    }

    /// Gives the device's copies of `plan`'s leaves `vs` back to the host:
    /// the next run copies them from their bindings again (a resumed
    /// optimizer state, for one).
    pub fn disown(&mut self, plan: &Plan, vs: &[ValueId]) {
        for &v in vs {
            let name = leaf_key(plan.graph(), v);
            if self.device_owned.remove(&name) {
                self.leaves.remove(&name);
            }
        }
    }

    /// One training step that stays on the GPU: runs the training `plan`
    /// (outputs `[loss, gradients..]`), then `opt` at `lr` on every
    /// trainable parameter, and returns the loss alone. The parameters are
    /// uploaded from `feeds` at their first step and are the device's from
    /// then on: later bindings are not read, and [`Self::download_params`]
    /// copies them back. [`Self::accumulate`], [`Self::grad_norm`] and
    /// [`Self::adamw_step`] are its parts, for gradient accumulation and
    /// clipping.
    pub fn train_step(
        &mut self,
        plan: &Plan,
        feeds: &Feeds,
        opt: &mut DeviceAdamW,
        lr: f64,
    ) -> Result<f32, EngineError> {
        let loss = self.accumulate(plan, feeds, 1.0, true)?;
        self.adamw_step(plan, opt, lr, 1.0, 0.0)?;
        Ok(loss)
    }

    /// Runs the training `plan` on one micro-batch and adds `weight` times
    /// its gradients to the step's sums on the device (replacing them when
    /// `first`), as the trainer's host loop weighs micro-batches by their
    /// share of the counted tokens. Makes the trainable parameters the
    /// device's (see [`Self::train_step`]). Returns the loss.
    pub fn accumulate(
        &mut self,
        plan: &Plan,
        feeds: &Feeds,
        weight: f32,
        first: bool,
    ) -> Result<f32, EngineError> {
        let g = plan.graph();
        if let Some(&(p, _)) = plan
            .grads()
            .iter()
            .find(|&&(p, gv)| g.dtype(p) != DType::F32 || g.dtype(gv) != DType::F32)
        {
            return Err(EngineError::Gpu(format!(
                "`{}`: training on the GPU takes f32 parameters, not {}",
                g.leaf_name(p).unwrap_or("?"),
                g.dtype(p)
            )));
        }
        for &(p, _) in plan.grads() {
            self.own(&leaf_key(g, p));
        }
        self.execute(plan, feeds)?;
        let s = self.gpu.stream().clone();
        let arena = device_addr(self.arena.as_ref().expect("execute allocated it"));
        for &(p, gv) in plan.grads() {
            let n = g.ty(p).numel();
            let name = leaf_key(g, p);
            let acc = match self.grads.entry(name) {
                Entry::Occupied(e) => e.into_mut(),
                Entry::Vacant(e) => e.insert(
                    s.alloc_zeros::<f32>(n)
                        .map_err(|err| oom("a summed gradient", 4 * n, err))?,
                ),
            };
            let off = plan.memory().offset(gv).ok_or_else(|| {
                EngineError::Gpu(format!(
                    "the gradient of `{}` is not computed by the plan",
                    leaf_key(g, p)
                ))
            })?;
            // SAFETY: the gradient's arena range of n f32, alive until the
            // kernel has run (the stream orders it before any later use).
            let gw = unsafe { self.gpu.borrow::<f32>(arena + off as u64, n) };
            self.k
                .update
                .accumulate(acc, &gw, weight, first)
                .map_err(gpu_err)?;
        }
        let loss = self.download(plan, &plan.outputs()[..1])?;
        Ok(loss[0].as_f32()?[0])
    }

    /// The global L2 norm of the gradients [`Self::accumulate`] summed for
    /// `plan`'s parameters (f64 sums, as `optim::clip_grad_norm`).
    pub fn grad_norm(&self, plan: &Plan) -> Result<f64, EngineError> {
        let gs = self.summed_grads(plan)?;
        let sq = self.k.update.squared_norm(&gs).map_err(gpu_err)?;
        Ok(sq.sqrt())
    }

    fn summed_grads(&self, plan: &Plan) -> Result<Vec<&CudaSlice<f32>>, EngineError> {
        let g = plan.graph();
        plan.grads()
            .iter()
            .map(|&(p, _)| {
                let name = leaf_key(g, p);
                self.grads.get(&name).ok_or_else(|| {
                    EngineError::Gpu(format!("no gradient of `{name}` was accumulated"))
                })
            })
            .collect()
    }

    /// AdamW at `lr` on every trainable parameter of `plan` from its summed
    /// gradient, first scaled by `coef` where that is below 1 (global-norm
    /// clipping: `optim::clip_coef`) and clamped to `±max_value` where that
    /// is positive.
    pub fn adamw_step(
        &mut self,
        plan: &Plan,
        opt: &mut DeviceAdamW,
        lr: f64,
        coef: f32,
        max_value: f32,
    ) -> Result<(), EngineError> {
        let g = plan.graph();
        let t = opt.step + 1;
        let c = opt.config;
        let st = AdamWStep::new(lr, c.beta1, c.beta2, c.eps, c.weight_decay, t as i32);
        let s = self.gpu.stream().clone();
        for &(p, _) in plan.grads() {
            let n = g.ty(p).numel();
            let name = leaf_key(g, p);
            let (m, v) = match opt.moments.entry(name.clone()) {
                Entry::Occupied(e) => e.into_mut(),
                Entry::Vacant(e) => e.insert((
                    s.alloc_zeros::<f32>(n)
                        .map_err(|e| oom("AdamW's first moment", 4 * n, e))?,
                    s.alloc_zeros::<f32>(n)
                        .map_err(|e| oom("AdamW's second moment", 4 * n, e))?,
                )),
            };
            let Some(Resident {
                data: Leaf::Bytes(buf),
                bytes,
                ..
            }) = self.leaves.get(&name)
            else {
                return Err(EngineError::Gpu(format!("`{name}` is not on the device")));
            };
            if *bytes != 4 * n {
                return Err(EngineError::Gpu(format!(
                    "`{name}` on the device holds {bytes} bytes, not {n} f32"
                )));
            }
            let Some(grad) = self.grads.get_mut(&name) else {
                return Err(EngineError::Gpu(format!(
                    "no gradient of `{name}` was accumulated"
                )));
            };
            self.k.update.clip(grad, coef, max_value).map_err(gpu_err)?;
            // SAFETY: the parameter's own buffer of n f32, alive until the
            // kernel has run (the stream orders it before any later use).
            let mut pw = unsafe { self.gpu.borrow::<f32>(device_addr(buf), n) };
            self.k
                .update
                .adamw(&mut pw, grad, m, v, &st)
                .map_err(gpu_err)?;
        }
        opt.step = t;
        Ok(())
    }

    /// The trainable parameters of `plan` that [`Self::train_step`] holds on
    /// the device, copied back as host tensors (checkpoints, evaluation).
    pub fn download_params(&self, plan: &Plan) -> Result<Vec<(String, Tensor)>, EngineError> {
        let params: Vec<ValueId> = plan.grads().iter().map(|&(p, _)| p).collect();
        self.download_owned(plan, &params)
    }

    /// Those of `plan`'s leaves `vs` that the device owns ([`Self::train_step`],
    /// [`Self::run_resident`]), copied back as host tensors named as the plan
    /// names them; the host's tensors of the others are current.
    pub fn download_owned(
        &self,
        plan: &Plan,
        vs: &[ValueId],
    ) -> Result<Vec<(String, Tensor)>, EngineError> {
        let g = plan.graph();
        let s = self.gpu.stream();
        vs.iter()
            .filter(|&&v| self.device_owned.contains(&leaf_key(g, v)))
            .map(|&v| {
                let name = leaf_key(g, v);
                let Some(Resident {
                    data: Leaf::Bytes(buf),
                    bytes: held,
                    ..
                }) = self.leaves.get(&name)
                else {
                    return Err(EngineError::Gpu(format!("`{name}` was never uploaded")));
                };
                // The value's own bytes (a buffer holds at least one).
                let n = g.ty(v).bytes();
                if *held != n {
                    return Err(EngineError::Gpu(format!(
                        "`{name}` on the device holds {held} bytes, not {n}"
                    )));
                }
                let mut bytes = vec![0u8; n];
                if n > 0 {
                    s.memcpy_dtoh(&buf.slice(..n), &mut bytes)
                        .map_err(|e| EngineError::Gpu(e.to_string()))?;
                }
                Ok((name, Tensor::from_bytes(g.shape(v), g.dtype(v), &bytes)?))
            })
            .collect()
    }

    /// Uploads what changed and runs every node of `plan`, waiting for the
    /// GPU: its values are then in the arena.
    fn execute(&mut self, plan: &Plan, feeds: &Feeds) -> Result<(), EngineError> {
        if let Some((n, why)) = gpu_unsupported(plan).into_iter().next() {
            let op = plan.graph().node(n).op.name();
            return Err(EngineError::Gpu(format!(
                "node %{} ({op}) cannot run on the GPU yet: {why}; use --device cpu",
                n.0
            )));
        }
        check_feeds(plan, feeds)?;
        let t0 = Instant::now();
        self.upload_leaves(plan, feeds)?;
        let s = self.gpu.stream().clone();
        let drv = |e: cudarc::driver::DriverError| EngineError::Gpu(e.to_string());
        let need = plan.peak_bytes().max(1);
        if self.arena.as_ref().is_none_or(|a| a.len() < need) {
            self.arena = None;
            self.arena = Some(
                s.alloc_zeros::<u8>(need)
                    .map_err(|e| oom("arena", need, e))?,
            );
        }
        let scratch = scratch_bytes(plan).max(1);
        if self.scratch.as_ref().is_none_or(|a| a.len() < scratch) {
            self.scratch = None;
            self.scratch = Some(
                s.alloc_zeros::<u8>(scratch)
                    .map_err(|e| oom("scratch", scratch, e))?,
            );
        }
        // The plan's elementwise chains: generated, compiled once each.
        let g = plan.graph();
        let mut chain_fns = HashMap::new();
        for &n in plan.schedule() {
            if let Op::Elementwise(p) = &g.node(n).op {
                let dtypes: Vec<DType> = g.node(n).inputs.iter().map(|&i| g.dtype(i)).collect();
                let (name, src) =
                    crate::chain::kernel_name(p, &dtypes).map_err(EngineError::Gpu)?;
                let f = match self.chains.get(&name) {
                    Some(f) => f.clone(),
                    None => {
                        let f = self.gpu.generated_kernel(&name, &src).map_err(gpu_err)?;
                        self.chains.insert(name, f.clone());
                        f
                    }
                };
                chain_fns.insert(n, f);
            }
        }
        // Attention's segments and RoPE's frequencies, kept between runs
        // (no allocation in a training loop): segments refreshed in place
        // when their host tensor changes (once a run), frequencies by their
        // values.
        let mut seen = HashSet::new();
        for &n in plan.schedule() {
            match &g.node(n).op {
                Op::Attention(_) | Op::AttentionGrad(_) => {
                    let v = g.node(n).inputs[3];
                    if !seen.insert(v) {
                        continue;
                    }
                    let t = feeds
                        .get(v)
                        .ok_or_else(|| EngineError::Gpu(format!("segments %{} unbound", v.0)))?;
                    let (host, stamp) = (t.as_i32()?, t.stamp());
                    let seg_err = |e: GpuError| EngineError::Gpu(format!("segments: {e}"));
                    match self.segments.entry(leaf_key(g, v)) {
                        Entry::Occupied(mut e) => {
                            let (held, seg) = e.get_mut();
                            if stamp == 0 || *held != stamp {
                                seg.update(&self.gpu, host).map_err(seg_err)?;
                                *held = stamp;
                            }
                        }
                        Entry::Vacant(e) => {
                            let seg = DeviceSegments::upload(&self.gpu, host).map_err(seg_err)?;
                            e.insert((stamp, seg));
                        }
                    }
                }
                Op::EmbeddingGrad { .. } => {
                    let v = g.node(n).inputs[1];
                    if !seen.insert(v) {
                        continue;
                    }
                    let t = feeds
                        .get(v)
                        .ok_or_else(|| EngineError::Gpu(format!("ids %{} unbound", v.0)))?;
                    let (host, stamp) = (t.as_i32()?, t.stamp());
                    let ids_err = |e: GpuError| EngineError::Gpu(format!("ids: {e}"));
                    match self.grouped_ids.entry(leaf_key(g, v)) {
                        Entry::Occupied(mut e) => {
                            let (held, ids) = e.get_mut();
                            if stamp == 0 || *held != stamp {
                                ids.update(&self.gpu, host).map_err(ids_err)?;
                                *held = stamp;
                            }
                        }
                        Entry::Vacant(e) => {
                            let ids = DeviceIds::upload(&self.gpu, host).map_err(ids_err)?;
                            e.insert((stamp, ids));
                        }
                    }
                }
                Op::Rope { spec, .. }
                | Op::MatMulSum {
                    epilogue: Some(Epilogue::Rope(spec)),
                    ..
                } => {
                    let bits: Vec<u32> = spec.inv_freq.iter().map(|f| f.to_bits()).collect();
                    if let Entry::Vacant(e) = self.inv_freq.entry(bits) {
                        e.insert(s.clone_htod(&spec.inv_freq[..]).map_err(drv)?);
                    }
                }
                _ => {}
            }
        }
        let run = Run {
            gpu: &self.gpu,
            k: &self.k,
            chains: chain_fns,
            plan,
            feeds,
            leaves: &self.leaves,
            arena: device_addr(self.arena.as_ref().expect("allocated above")),
            scratch: device_addr(self.scratch.as_ref().expect("allocated above")),
            scratch_len: self.scratch.as_ref().map_or(0, |b| b.len()),
            segments: &self.segments,
            grouped_ids: &self.grouped_ids,
            inv_freq: &self.inv_freq,
            nf4_f32: nf4_f32_weights(g),
        };
        let t1 = Instant::now();
        for &n in plan.schedule() {
            let t0 = Instant::now();
            if let Err(msg) = run.node(n) {
                return Err(EngineError::Kernel {
                    op: g.node(n).op.name(),
                    msg,
                });
            }
            if let Some(p) = &mut self.profile {
                s.synchronize().map_err(drv)?;
                p.record(g, g.node(n), t0.elapsed());
            }
        }
        s.synchronize().map_err(drv)?;
        self.phases.upload = (t1 - t0).as_secs_f64();
        self.phases.compute = t1.elapsed().as_secs_f64();
        Ok(())
    }

    /// Copies values `outs` of the last run back through page-locked staging.
    fn download(&mut self, plan: &Plan, outs: &[ValueId]) -> Result<Vec<Tensor>, EngineError> {
        let t2 = Instant::now();
        let g = plan.graph();
        let s = self.gpu.stream().clone();
        let drv = |e: cudarc::driver::DriverError| EngineError::Gpu(e.to_string());
        let arena = device_addr(self.arena.as_ref().expect("execute allocated it"));
        let spans: Vec<(usize, usize)> = outs
            .iter()
            .scan(0, |off, &o| {
                let (at, n) = (*off, g.ty(o).bytes());
                *off += n.div_ceil(64) * 64;
                Some((at, n))
            })
            .collect();
        let total = spans.last().map_or(0, |&(at, n)| at + n);
        if self.staging.as_ref().is_none_or(|p| p.len() < total) {
            self.staging = None;
            self.staging = Some(self.gpu.pinned(total).map_err(gpu_err)?);
        }
        let staged = self
            .staging
            .as_mut()
            .expect("allocated above")
            .as_mut_slice()
            .map_err(drv)?;
        for (&o, &(at, n)) in outs.iter().zip(&spans) {
            let addr = value_addr(plan, &self.leaves, arena, o).map_err(EngineError::Gpu)?;
            // SAFETY: the value's n bytes, in the arena or its leaf's buffer.
            let src = unsafe { self.gpu.borrow::<u8>(addr, n) };
            s.memcpy_dtoh(&*src, &mut staged[at..at + n]).map_err(drv)?;
        }
        s.synchronize().map_err(drv)?;
        let out = outs
            .iter()
            .zip(&spans)
            .map(|(&o, &(at, n))| Tensor::from_bytes(g.shape(o), g.dtype(o), &staged[at..at + n]))
            .collect();
        self.phases.download = t2.elapsed().as_secs_f64();
        out
    }

    /// Copies the plan's leaves to the device, each only when its host
    /// contents changed since it was last copied (a new stamp); leaves the
    /// device owns never again.
    fn upload_leaves(&mut self, plan: &Plan, feeds: &Feeds) -> Result<(), EngineError> {
        let g = plan.graph();
        let s = self.gpu.stream().clone();
        for v in plan.leaves() {
            let name = leaf_key(g, v);
            let (shape, dtype, ptr, len, _) = feeds
                .view(v)
                .ok_or_else(|| EngineError::Unbound(name.clone()))?;
            // SAFETY: the bound tensor's bytes, lent to `feeds` (exclusively,
            // for a tensor updated in place) and only read here.
            let bytes = unsafe { std::slice::from_raw_parts(ptr as *const u8, len) };
            // A tensor lent for in-place updates has no stamp (volatile):
            // copied at every run unless the device owns it.
            let (stamp, last_write) = feeds
                .get(v)
                .map_or((0, None), |t| (t.stamp(), t.last_write()));
            let same = |r: &Resident| r.dtype == dtype && r.bytes == bytes.len();
            match self.leaves.get_mut(&name) {
                Some(r) if self.device_owned.contains(&name) => {
                    if same(r) {
                        continue;
                    }
                    // Replacing it would drop what was trained there.
                    return Err(EngineError::Gpu(format!(
                        "`{name}` is held on the device ({} bytes of {}, trained there) but bound as {} bytes of {dtype}: copy it back (download_owned) and disown it first",
                        r.bytes,
                        r.dtype,
                        bytes.len()
                    )));
                }
                Some(r) if same(r) && stamp != 0 && r.stamp == stamp => continue,
                // Only a range changed since this copy was made (a KV
                // cache's new rows): copy those bytes alone.
                Some(Resident {
                    stamp: held,
                    data: Leaf::Bytes(buf),
                    ..
                }) if last_write
                    .as_ref()
                    .is_some_and(|(before, _)| *before == *held) =>
                {
                    let range = last_write.expect("matched above").1;
                    let mut dst = buf.slice_mut(range.clone());
                    s.memcpy_htod(&bytes[range], &mut dst)
                        .map_err(|e| EngineError::Gpu(format!("uploading `{name}`: {e}")))?;
                    *held = stamp;
                    continue;
                }
                _ => {}
            }
            let data = match (dtype, self.leaves.remove(&name)) {
                (DType::Nf4 { block }, _) => {
                    let w = crate::nf4::nf4_view(bytes, shape, block as usize)?;
                    Leaf::Nf4(
                        DeviceNf4::upload(&self.gpu, &w)
                            .map_err(|e| EngineError::Gpu(format!("uploading `{name}`: {e}")))?,
                    )
                }
                (
                    _,
                    Some(Resident {
                        data: Leaf::Bytes(mut buf),
                        bytes: n,
                        ..
                    }),
                ) if n == bytes.len() && !bytes.is_empty() => {
                    s.memcpy_htod(bytes, &mut buf)
                        .map_err(|e| EngineError::Gpu(format!("uploading `{name}`: {e}")))?;
                    Leaf::Bytes(buf)
                }
                // A zero-byte tensor still gets an address.
                _ if bytes.is_empty() => {
                    Leaf::Bytes(s.alloc_zeros::<u8>(1).map_err(|e| oom(&name, 1, e))?)
                }
                _ => Leaf::Bytes(
                    s.clone_htod(bytes)
                        .map_err(|e| oom(&name, bytes.len(), e))?,
                ),
            };
            let r = Resident {
                stamp,
                dtype,
                bytes: bytes.len(),
                data,
            };
            self.leaves.insert(name, r);
        }
        Ok(())
    }
}

/// The key of a leaf's device copy: its name (the same tensor in every
/// plan of a model), or its value id where a graph left it unnamed.
fn leaf_key(g: &graft_ir::Graph, v: ValueId) -> String {
    match g.leaf_name(v) {
        Some(name) => name.to_string(),
        None => format!("%{}", v.0),
    }
}

fn oom(what: &str, bytes: usize, e: cudarc::driver::DriverError) -> EngineError {
    EngineError::Gpu(format!(
        "allocating {what} ({:.1} MiB) on the GPU: {e}; use a smaller batch, activation recomputation, or --device cpu",
        bytes as f64 / (1 << 20) as f64
    ))
}

/// The nodes of `plan` the GPU executor cannot run, each with the reason
/// (empty: it runs whole). Needs no GPU.
pub fn gpu_unsupported(plan: &Plan) -> Vec<(NodeId, String)> {
    let g = plan.graph();
    let mut out = Vec::new();
    for &n in plan.schedule() {
        let node = g.node(n);
        let dt = |i: usize| g.dtype(node.inputs[i]);
        let float = |d: DType| matches!(d, DType::F32 | DType::BF16);
        let same_float =
            |idx: &[usize]| float(dt(idx[0])) && idx.iter().all(|&i| dt(i) == dt(idx[0]));
        // Whether input i is fed to the plan (a value the host holds).
        let fed = |i: usize| matches!(g.value(node.inputs[i]).source, Source::Input { .. });
        let why: Option<String> = match &node.op {
            Op::Fill { dtype, .. } => (!float(*dtype)).then(|| format!("fills {dtype}")),
            Op::Cast(_) => {
                let (from, to) = (dt(0), g.dtype(node.outputs[0]));
                (!(float(from) && float(to))).then(|| format!("casts {from} to {to}"))
            }
            Op::Dropout { .. }
            | Op::Add
            | Op::Mul
            | Op::Scale(_)
            | Op::ScaleBy
            | Op::MulCols
            | Op::SumRows
            | Op::DoraCombine => (!float(dt(0))).then(|| format!("on {}", dt(0))),
            Op::Elementwise(p) => {
                let f16 = |d: &DType| *d == DType::F16;
                let dtypes: Vec<DType> = node.inputs.iter().map(|&i| g.dtype(i)).collect();
                let rounds_f16 = p
                    .code
                    .iter()
                    .any(|i| matches!(i, graft_ir::Instr::Round(_, DType::F16)));
                (dtypes.iter().any(f16) || f16(&p.out) || rounds_f16)
                    .then(|| "f16 values (the GPU's chains take f32 and bf16)".into())
            }
            Op::DoraInvNorm { .. } => {
                let rank = g.shape(node.inputs[0])[0];
                match dt(2) {
                    _ if rank > DORA_MAX_RANK => Some(format!(
                        "rank {rank} (the kernel takes up to {DORA_MAX_RANK})"
                    )),
                    DType::Nf4 { .. } => nf4_unsupported(g, node.inputs[2]),
                    d if float(d) => None,
                    d => Some(format!("a {d} weight")),
                }
            }
            Op::Embedding => (!float(dt(0))).then(|| format!("a {} table", dt(0))),
            // Row kernels: f32 or bf16, every operand of one type.
            Op::RmsNorm { .. } | Op::GatedAct(_) => (!same_float(&[0, 1])).then(|| {
                format!(
                    "{} and {} (the kernels take f32 or bf16 alike)",
                    dt(0),
                    dt(1)
                )
            }),
            Op::RmsNormGradWeight { .. } => (!same_float(&[0, 1])).then(|| {
                format!(
                    "{} and {} (the kernel takes f32 or bf16 alike)",
                    dt(0),
                    dt(1)
                )
            }),
            Op::RmsNormGradInput { .. } | Op::GatedActGrad(_) => {
                (!same_float(&[0, 1, 2])).then(|| {
                    format!(
                        "{}, {} and {} (the kernels take f32 or bf16 alike)",
                        dt(0),
                        dt(1),
                        dt(2)
                    )
                })
            }
            Op::Rope { spec, .. } => (!same_float(&[0]) || spec.head_dim % 2 != 0)
                .then(|| "not f32 or bf16 with an even head dim".into()),
            Op::Attention(spec) | Op::AttentionGrad(spec) | Op::AttentionCached(spec) => {
                let cached = matches!(node.op, Op::AttentionCached(_));
                // f32 rows on the CUDA cores, bf16 ones on the tensor cores
                // (generation's on the CUDA cores, either type); q, k, v
                // and the caches of one type.
                let operands: &[usize] = if cached { &[0, 1, 2, 3, 4] } else { &[0, 1, 2] };
                if !same_float(operands) {
                    let types: Vec<String> = operands.iter().map(|&i| dt(i).to_string()).collect();
                    Some(format!(
                        "q, k, v{} of {} (the kernels take f32 or bf16 alike)",
                        if cached { " and the caches" } else { "" },
                        types.join(", ")
                    ))
                } else if !ATTENTION_HEAD_DIMS.contains(&spec.head_dim) {
                    Some(format!(
                        "head dim {} (kernels for {ATTENTION_HEAD_DIMS:?})",
                        spec.head_dim
                    ))
                } else if cached && !fed(5) {
                    Some(
                        "a cache start computed in the plan (the GPU reads it from an input)"
                            .into(),
                    )
                } else {
                    None
                }
            }
            Op::MatMul { .. } => {
                let ok = dt(0) == dt(1) && float(dt(0));
                (!ok).then(|| format!("{} by {}", dt(0), dt(1)))
            }
            // The weight dequantized to the compute type, then cuBLAS.
            Op::Nf4MatMul { compute, .. } => match (*compute, dt(0)) {
                (DType::BF16, DType::BF16) | (DType::F32, DType::F32) => {
                    nf4_unsupported(g, node.inputs[1])
                }
                (c, x) => Some(format!(
                    "{x} activations under {c} compute (the GPU takes bf16 or f32 alike)"
                )),
            },
            Op::MatMulSum {
                terms,
                addend,
                compute,
                out,
                ..
            } => matmul_sum_unsupported(g, node, terms, *addend, *compute, *out),
            Op::CrossEntropy { .. } => (!float(dt(0))).then(|| format!("{} logits", dt(0))),
            // The ids are grouped on the host: an input; the table's
            // gradient is f32 (a trained table is).
            Op::EmbeddingGrad { .. } => {
                let out = g.dtype(node.outputs[0]);
                match (float(dt(0)), out == DType::F32, fed(1)) {
                    (true, true, true) => None,
                    (_, false, _) => {
                        Some(format!("a {out} table gradient (the kernel sums into f32)"))
                    }
                    (false, ..) => Some(format!("{} gradients", dt(0))),
                    _ => {
                        Some("ids computed in the plan (the GPU groups them from an input)".into())
                    }
                }
            }
            // The labels are checked (and counted) on the host: an input.
            Op::CrossEntropyGrad { .. } => match (float(dt(0)), fed(1)) {
                (false, _) => Some(format!("{} logits", dt(0))),
                (_, false) => {
                    Some("labels computed in the plan (the GPU reads them from an input)".into())
                }
                _ => None,
            },
            Op::LinearCrossEntropy { .. } => (!same_float(&[0, 1])).then(|| {
                format!(
                    "{} hidden states and a {} weight (f32 or bf16 alike)",
                    dt(0),
                    dt(1)
                )
            }),
            // In place on a leaf's device copy: f32 throughout.
            Op::SgdUpdate { .. } | Op::AdaLomoUpdate(_) => node
                .inputs
                .iter()
                .find(|&&v| g.dtype(v) != DType::F32)
                .map(|&v| format!("a {} operand (the updates take f32)", g.dtype(v))),
            other => Some(format!("no GPU kernel for {} yet", other.name())),
        };
        if let Some(w) = why {
            out.push((n, w));
        }
    }
    out
}

/// Why a `matmul_sum` group cannot run on the GPU, if it cannot.
fn matmul_sum_unsupported(
    g: &graft_ir::Graph,
    node: &graft_ir::Node,
    terms: &[graft_ir::Product],
    addend: bool,
    compute: DType,
    out: DType,
) -> Option<String> {
    let dt = |i: usize| g.dtype(node.inputs[i]);
    if addend && dt(2 * terms.len()) != out {
        return Some("an addend of another dtype than the output".into());
    }
    // cuBLAS: bf16 operands write f32 or bf16, f32 ones only f32; NF4
    // weights are dequantized to the compute type.
    let outs: &[DType] = match compute {
        DType::BF16 => &[DType::F32, DType::BF16],
        DType::F32 => &[DType::F32],
        _ => &[],
    };
    if !outs.contains(&out) {
        return Some(format!("{compute} compute writing {out}"));
    }
    // NF4 products: x·op(W) through cuBLAS, x of the compute type; dense
    // ones: f32 or bf16 operands, cast to the compute type.
    for (i, t) in terms.iter().enumerate() {
        if t.nf4 && (dt(2 * i) != compute || t.ta) {
            return Some(format!("NF4 term {i} is not {compute} x·op(W)"));
        }
        if let Some(why) = t
            .nf4
            .then(|| nf4_unsupported(g, node.inputs[2 * i + 1]))
            .flatten()
        {
            return Some(why);
        }
        let dense = if t.nf4 {
            vec![2 * i]
        } else {
            vec![2 * i, 2 * i + 1]
        };
        if let Some(&j) = dense
            .iter()
            .find(|&&j| !matches!(dt(j), DType::F32 | DType::BF16))
        {
            return Some(format!("operand {j} is {}", dt(j)));
        }
    }
    None
}

/// Why an NF4 weight cannot go to the GPU, if it cannot: the device copy
/// takes bitsandbytes' block 64 and rows of whole blocks.
fn nf4_unsupported(g: &graft_ir::Graph, w: ValueId) -> Option<String> {
    let (ty, name) = (g.ty(w), leaf_key(g, w));
    match (ty.dtype, ty.shape.last()) {
        (DType::Nf4 { block: 64 }, Some(cols)) if cols % 64 == 0 => None,
        (dtype, cols) => Some(format!(
            "`{name}` is {dtype} with rows of {cols:?}: the GPU takes NF4 block 64 and rows of a multiple of 64"
        )),
    }
}

/// Scratch bytes of an NF4 group's largest dequantized weight: the dense
/// terms' casts go after it.
fn nf4_scratch(g: &graft_ir::Graph, node: &graft_ir::Node, terms: &[graft_ir::Product]) -> usize {
    // Dequantized to the type of x (the compute type).
    (0..terms.len())
        .filter(|&i| terms[i].nf4)
        .map(|i| {
            let bytes = g.dtype(node.inputs[2 * i]).bytes(1);
            (g.ty(node.inputs[2 * i + 1]).numel() * bytes).div_ceil(ALIGN) * ALIGN
        })
        .max()
        .unwrap_or(0)
}

/// Whether an NF4 product into `y` (`tb`: x·Wᵀ) takes the GEMV (a few
/// rows: generation's) rather than a dequantized copy and cuBLAS.
fn uses_gemv(g: &graft_ir::Graph, y: ValueId, tb: bool) -> bool {
    tb && g.shape(y)[0] <= NF4_GEMV_MAX_M
}

/// The NF4 weights a product of the graph multiplies under f32 compute:
/// DoRA's norm dequantizes these to f32 (as the CPU's norm always widens
/// them), the others to bf16 (half the scratch, the bf16 products' weights).
fn nf4_f32_weights(g: &graft_ir::Graph) -> HashSet<ValueId> {
    let mut out = HashSet::new();
    for node in g.nodes() {
        match &node.op {
            Op::Nf4MatMul {
                compute: DType::F32,
                ..
            } => {
                out.insert(node.inputs[1]);
            }
            Op::MatMulSum {
                terms,
                compute: DType::F32,
                ..
            } => out.extend(
                (0..terms.len())
                    .filter(|&i| terms[i].nf4)
                    .map(|i| node.inputs[2 * i + 1]),
            ),
            _ => {}
        }
    }
    out
}

/// Device bytes running `plan` on a fresh executor takes: its arena and
/// scratch, every leaf (NF4 weights at their packed size), and for a
/// training plan each trainable parameter's summed gradient and AdamW's two
/// moments (the device-resident step's). Needs no GPU; the driver's own
/// context and cuBLAS's workspace come on top.
pub fn device_bytes_needed(plan: &Plan) -> usize {
    let g = plan.graph();
    let leaves: usize = plan.leaves().iter().map(|&v| g.ty(v).bytes()).sum();
    let state: usize = plan
        .grads()
        .iter()
        .map(|&(p, _)| 3 * 4 * g.ty(p).numel())
        .sum();
    plan.peak_bytes() + scratch_bytes(plan) + leaves + state
}

/// Scratch bytes the plan needs beside its arena (the largest of any node).
fn scratch_bytes(plan: &Plan) -> usize {
    let g = plan.graph();
    let up = |b: usize| b.div_ceil(ALIGN) * ALIGN;
    let nf4_f32 = nf4_f32_weights(g);
    plan.schedule()
        .iter()
        .map(|&n| {
            let node = g.node(n);
            match &node.op {
                Op::AttentionGrad(spec) => up(g.shape(node.inputs[0])[0] * spec.n_heads * 4),
                // Each row's rsqrt factor.
                Op::RmsNormGradWeight { .. } => up(g.shape(node.inputs[0])[0] * 4),
                Op::Nf4MatMul { compute, .. } => {
                    up(g.ty(node.inputs[1]).numel() * compute.bytes(1))
                }
                // An NF4 weight dequantized to bf16, or f32 where an f32
                // product multiplies it.
                Op::DoraInvNorm { .. } => match g.dtype(node.inputs[2]) {
                    DType::Nf4 { .. } => {
                        let bytes = if nf4_f32.contains(&node.inputs[2]) {
                            4
                        } else {
                            2
                        };
                        up(g.ty(node.inputs[2]).numel() * bytes)
                    }
                    _ => 0,
                },
                Op::CrossEntropy { .. } => up(g.shape(node.inputs[0])[0] * 4),
                Op::LinearCrossEntropy { chunk, .. } => {
                    let (t, v) = (g.shape(node.inputs[0])[0], g.shape(node.inputs[1])[0]);
                    let c = (*chunk).clamp(1, t.max(1));
                    let bytes = g.dtype(node.inputs[0]).bytes(1);
                    2 * up(c * v * bytes) + up(t * 4)
                }
                // Operands cast to the compute type: at most 4 bytes each.
                Op::MatMulSum { terms, .. } => {
                    nf4_scratch(g, node, terms)
                        + (0..terms.len())
                            .filter(|&i| !terms[i].nf4)
                            .flat_map(|i| [node.inputs[2 * i], node.inputs[2 * i + 1]])
                            .map(|v| up(g.ty(v).numel() * 4))
                            .sum::<usize>()
                }
                _ => 0,
            }
        })
        .max()
        .unwrap_or(0)
}

/// One run's view of the device: where every value lives.
struct Run<'a> {
    gpu: &'a Gpu,
    k: &'a Kernels,
    /// The compiled kernel of each elementwise chain of the plan.
    chains: HashMap<NodeId, CudaFunction>,
    plan: &'a Plan,
    feeds: &'a Feeds<'a>,
    leaves: &'a HashMap<String, Resident>,
    arena: u64,
    scratch: u64,
    scratch_len: usize,
    /// Each segments leaf's run starts, by leaf name.
    segments: &'a HashMap<String, (u64, DeviceSegments)>,
    /// Each embedding gradient's ids, grouped, by leaf name.
    grouped_ids: &'a HashMap<String, (u64, DeviceIds)>,
    /// RoPE's inverse frequencies on the device, by their bits.
    inv_freq: &'a HashMap<Vec<u32>, CudaSlice<f32>>,
    /// NF4 weights of f32 products ([`nf4_f32_weights`]).
    nf4_f32: HashSet<ValueId>,
}

/// The device address of value `v` of `plan`: its offset in the arena at
/// `arena`, or its leaf's own buffer.
fn value_addr(
    plan: &Plan,
    leaves: &HashMap<String, Resident>,
    arena: u64,
    v: ValueId,
) -> Result<u64, String> {
    let g = plan.graph();
    match g.value(v).source {
        Source::Node { .. } => plan
            .memory()
            .offset(v)
            .map(|off| arena + off as u64)
            .ok_or_else(|| format!("%{} has no place in the memory plan", v.0)),
        _ => match leaves.get(&leaf_key(g, v)).map(|r| &r.data) {
            Some(Leaf::Bytes(b)) => Ok(device_addr(b)),
            Some(Leaf::Nf4(_)) => Err(format!(
                "`{}` is NF4: only an NF4 product reads it",
                leaf_key(g, v)
            )),
            None => Err(format!("`{}` is not on the device", leaf_key(g, v))),
        },
    }
}

/// cuBLAS's name of a dtype.
fn blas_type(d: DType) -> Result<cudaDataType, String> {
    match d {
        DType::F32 => Ok(cudaDataType::CUDA_R_32F),
        DType::BF16 => Ok(cudaDataType::CUDA_R_16BF),
        other => Err(format!("cuBLAS does not take {other} here")),
    }
}

/// A dense operand for cuBLAS: device address and dtype.
#[derive(Clone, Copy)]
struct Mat {
    addr: u64,
    dtype: DType,
}

impl<'a> Run<'a> {
    fn graph(&self) -> &'a graft_ir::Graph {
        self.plan.graph()
    }

    /// The device address of value `v`.
    fn addr(&self, v: ValueId) -> Result<u64, String> {
        value_addr(self.plan, self.leaves, self.arena, v)
    }

    /// Value `v` as `len` elements of `T` (its numel, or its byte count as
    /// u8), no more than the value holds.
    fn view<T>(&self, v: ValueId, len: usize) -> Result<Borrowed<T>, String> {
        let have = self.graph().ty(v).bytes();
        if len * std::mem::size_of::<T>() > have {
            return Err(format!("%{}: {len} elements past its {have} bytes", v.0));
        }
        // SAFETY: the arena holds every computed value at its offset and
        // each leaf has its own buffer of at least the value's size; the
        // window is no longer (checked above). The window is not moved out
        // of (see `Gpu::borrow`).
        Ok(unsafe { self.gpu.borrow(self.addr(v)?, len) })
    }

    /// Value `v` as its own elements of `T`.
    fn val<T>(&self, v: ValueId) -> Result<Borrowed<T>, String> {
        let n = self.graph().ty(v).bytes() / std::mem::size_of::<T>();
        self.view(v, n)
    }

    /// `len` elements of `T` at byte `off` of the scratch buffer.
    fn scratch<T>(&self, off: usize, len: usize) -> Result<Borrowed<T>, String> {
        if off + len * std::mem::size_of::<T>() > self.scratch_len {
            return Err(format!(
                "scratch: {} bytes at {off} past its {} (a sizing bug)",
                len * std::mem::size_of::<T>(),
                self.scratch_len
            ));
        }
        // SAFETY: inside the scratch buffer (checked above), which lives
        // as long as the run.
        Ok(unsafe { self.gpu.borrow(self.scratch + off as u64, len) })
    }

    fn nf4(&self, v: ValueId) -> Result<&'a DeviceNf4, String> {
        let name = leaf_key(self.graph(), v);
        match self.leaves.get(&name).map(|r| &r.data) {
            Some(Leaf::Nf4(w)) => Ok(w),
            _ => Err(format!("`{name}` is not an NF4 weight bound as a leaf")),
        }
    }

    /// The host data of an i32 leaf (token ids, labels, segments).
    fn host_i32(&self, v: ValueId) -> Result<&'a [i32], String> {
        self.feeds
            .get(v)
            .ok_or_else(|| format!("%{} must be a bound i32 input", v.0))?
            .as_i32()
            .map_err(|e| e.to_string())
    }

    /// Elements `start..start + len` of the i32 leaf `v` (token ids,
    /// labels): its host copy, to check, and a window into its resident
    /// device copy, to read: lent as they are, nothing uploaded again.
    fn ids(
        &self,
        v: ValueId,
        start: usize,
        len: usize,
    ) -> Result<(&'a [i32], Borrowed<i32>), String> {
        let host = self.host_i32(v)?;
        let part = host
            .get(start..start + len)
            .ok_or_else(|| format!("%{}: rows {start}..{} of {}", v.0, start + len, host.len()))?;
        // SAFETY: the leaf's own buffer holds all of `host` (uploaded from
        // it), so the window lies inside it; it lives as long as the run.
        let dev = unsafe { self.gpu.borrow(self.addr(v)? + 4 * start as u64, len) };
        Ok((part, dev))
    }

    fn segments(&self, v: ValueId) -> Result<&'a DeviceSegments, String> {
        self.segments
            .get(&leaf_key(self.graph(), v))
            .map(|(_, seg)| seg)
            .ok_or_else(|| format!("segments %{} were not uploaded", v.0))
    }

    /// Row-major `c[m,n] = alpha·op(a)·op(b) + beta·c` through cuBLAS
    /// (column-major, so it computes cᵀ = op(b)ᵀ·op(a)ᵀ), f32 accumulation.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        a: Mat,
        b: Mat,
        c: Mat,
        (m, k, n): (usize, usize, usize),
        (ta, tb): (bool, bool),
        alpha: f32,
        beta: f32,
    ) -> Result<(), String> {
        let op = |t: bool| match t {
            true => cublasOperation_t::CUBLAS_OP_T,
            false => cublasOperation_t::CUBLAS_OP_N,
        };
        let dim = |x: usize| i32::try_from(x).map_err(|_| format!("{x} is over cuBLAS's int"));
        let (lda, ldb) = (if tb { k } else { n }, if ta { m } else { k });
        // SAFETY: the addresses hold op(a) [m,k], op(b) [k,n] and c [m,n] in
        // the dtypes given (checked by `gpu_unsupported` and the plan's
        // types); alpha and beta are f32 as CUBLAS_COMPUTE_32F takes them.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.k.blas.handle(),
                op(tb),
                op(ta),
                dim(n)?,
                dim(m)?,
                dim(k)?,
                (&alpha as *const f32).cast(),
                b.addr as *const _,
                blas_type(b.dtype)?,
                dim(lda)?,
                a.addr as *const _,
                blas_type(a.dtype)?,
                dim(ldb)?,
                (&beta as *const f32).cast(),
                c.addr as *mut _,
                blas_type(c.dtype)?,
                dim(n)?,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| format!("cuBLAS: {e}"))
    }

    fn mat(&self, v: ValueId) -> Result<Mat, String> {
        Ok(Mat {
            addr: self.addr(v)?,
            dtype: self.graph().dtype(v),
        })
    }

    /// Runs node `n`.
    fn node(&self, n: NodeId) -> Result<(), String> {
        let g = self.graph();
        let node = g.node(n);
        let (ins, outs) = (&node.inputs, &node.outputs);
        let e = |err: GpuError| err.to_string();
        let k = self.k;
        let shape = |v: ValueId| g.shape(v);
        match &node.op {
            Op::Fill { value, dtype, .. } => {
                by_float!(dtype, T => k.ew.fill(&mut *self.val::<T>(outs[0])?, *value)).map_err(e)
            }
            Op::Cast(_) => {
                let (from, to) = (g.dtype(ins[0]), g.dtype(outs[0]));
                match (from, to) {
                    (DType::F32, DType::BF16) => {
                        k.ew.to_bf16(&*self.val::<f32>(ins[0])?, &mut *self.val::<bf16>(outs[0])?)
                            .map_err(e)
                    }
                    (DType::BF16, DType::F32) => {
                        k.ew.to_f32(&*self.val::<bf16>(ins[0])?, &mut *self.val::<f32>(outs[0])?)
                            .map_err(e)
                    }
                    _ => {
                        let bytes = g.ty(ins[0]).bytes();
                        self.gpu
                            .stream()
                            .memcpy_dtod(
                                &*self.view::<u8>(ins[0], bytes)?,
                                &mut *self.view::<u8>(outs[0], bytes)?,
                            )
                            .map_err(|e| e.to_string())
                    }
                }
            }
            Op::Dropout { p } => by_float!(g.dtype(ins[0]), T => k.ew.dropout::<T>(
                &*self.val(ins[0])?,
                &*self.val::<u32>(ins[1])?,
                *p,
                &mut *self.val(outs[0])?,
            ))
            .map_err(e),
            Op::Add | Op::Mul => by_float!(g.dtype(ins[0]), T => {
                let (a, b) = (self.val::<T>(ins[0])?, self.val::<T>(ins[1])?);
                let mut y = self.val::<T>(outs[0])?;
                match node.op {
                    Op::Add => k.ew.add(&a, &b, &mut y),
                    _ => k.ew.mul(&a, &b, &mut y),
                }
            })
            .map_err(e),
            Op::Scale(c) => by_float!(g.dtype(ins[0]), T => k.ew.scale::<T>(
                &*self.val(ins[0])?,
                *c,
                &mut *self.val(outs[0])?,
            ))
            .map_err(e),
            Op::ScaleBy => by_float!(g.dtype(ins[0]), T => k.ew.scale_by::<T>(
                &*self.val(ins[0])?,
                &*self.val::<f32>(ins[1])?,
                &mut *self.val(outs[0])?,
            ))
            .map_err(e),
            Op::MulCols => by_float!(g.dtype(ins[0]), T => k.ew.mul_cols::<T, T>(
                &*self.val(ins[0])?,
                &*self.val(ins[1])?,
                &mut *self.val(outs[0])?,
            ))
            .map_err(e),
            Op::SumRows => by_float!(g.dtype(ins[0]), T => k.ew.sum_rows::<T>(
                &*self.val(ins[0])?,
                &mut *self.val(outs[0])?,
            ))
            .map_err(e),
            Op::DoraCombine => by_float!(g.dtype(ins[0]), T => k.dora.combine::<T>(
                &*self.val(ins[0])?,
                &*self.val::<f32>(ins[1])?,
                &*self.val::<f32>(ins[2])?,
                &mut *self.val(outs[0])?,
            ))
            .map_err(e),
            Op::DoraInvNorm { scaling } => self.dora_inv_norm(ins, *scaling, outs[0]),
            Op::Elementwise(_) => {
                let f = &self.chains[&n];
                let inputs = ins
                    .iter()
                    .map(|&i| self.val::<u8>(i))
                    .collect::<Result<Vec<_>, _>>()?;
                let refs: Vec<&CudaSlice<u8>> = inputs.iter().map(|b| &**b).collect();
                let y = outs[0];
                let cols = shape(y).last().copied().unwrap_or(1).max(1);
                self.gpu
                    .launch_elementwise(f, &refs, &mut *self.val::<u8>(y)?, g.ty(y).numel(), cols)
                    .map_err(e)
            }
            Op::Embedding => {
                let n = g.ty(ins[1]).numel();
                let (host, dev) = self.ids(ins[1], 0, n)?;
                let ids = Ids::new(host, &dev).map_err(e)?;
                by_float!(g.dtype(ins[0]), T => k.emb.embedding(
                    &*self.val::<T>(ins[0])?,
                    ids,
                    shape(ins[0])[1],
                    &mut *self.val::<T>(outs[0])?,
                ))
                .map_err(e)
            }
            Op::RmsNorm { eps, unit_offset } => by_float!(g.dtype(ins[0]), T => k.rows.rms_norm(
                &*self.val::<T>(ins[0])?,
                &*self.val::<T>(ins[1])?,
                *eps,
                *unit_offset,
                &mut *self.val::<T>(outs[0])?,
            ))
            .map_err(e),
            Op::RmsNormGradInput { eps, unit_offset } => {
                by_float!(g.dtype(ins[0]), T => k.rows.rms_norm_grad_input(
                    &*self.val::<T>(ins[0])?,
                    &*self.val::<T>(ins[1])?,
                    &*self.val::<T>(ins[2])?,
                    *eps,
                    *unit_offset,
                    &mut *self.val::<T>(outs[0])?,
                ))
                .map_err(e)
            }
            Op::RmsNormGradWeight { eps } => {
                let rows = shape(ins[0])[0];
                let mut r_rows = self.scratch::<f32>(0, rows)?;
                by_float!(g.dtype(ins[0]), T => k.rows.rms_norm_grad_weight(
                    &*self.val::<T>(ins[0])?,
                    &*self.val::<T>(ins[1])?,
                    *eps,
                    &mut r_rows,
                    &mut *self.val::<T>(outs[0])?,
                ))
                .map_err(e)
            }
            Op::Rope { spec, inverse } => self.rope(ins[0], ins[1], spec, *inverse, outs[0]),
            Op::GatedAct(a) => by_float!(g.dtype(ins[0]), T => k.rows.gated_act(
                act(*a),
                &*self.val::<T>(ins[0])?,
                &*self.val::<T>(ins[1])?,
                &mut *self.val::<T>(outs[0])?,
            ))
            .map_err(e),
            Op::GatedActGrad(a) => by_float!(g.dtype(ins[0]), T => k.rows.gated_act_grad(
                act(*a),
                &*self.val::<T>(ins[0])?,
                &*self.val::<T>(ins[1])?,
                &*self.val::<T>(ins[2])?,
                &mut *self.val::<T>(outs[0])?,
                &mut *self.val::<T>(outs[1])?,
            ))
            .map_err(e),
            Op::Attention(spec) => {
                let s = attn_shape(spec, shape(ins[0])[0]);
                let mut lse = self.val::<f32>(outs[1])?;
                let seg = self.segments(ins[3])?;
                by_float!(g.dtype(ins[0]), T => {
                    let (q, kk, v) = (self.val::<T>(ins[0])?, self.val::<T>(ins[1])?, self.val::<T>(ins[2])?);
                    k.attn.forward(&q, &kk, &v, seg, s, &mut *self.val::<T>(outs[0])?, &mut lse)
                })
                .map_err(e)
            }
            Op::AttentionCached(spec) => {
                let s = attn_shape(spec, shape(ins[0])[0]);
                // The cache's fill, read on the host (an input leaf).
                let start = self
                    .feeds
                    .get(ins[5])
                    .ok_or("the cache start is not bound as an input")?
                    .as_i32()
                    .map_err(|e| e.to_string())?[0];
                let rows = shape(ins[3])[0];
                if start < 0 || start as usize + s.tokens > rows {
                    return Err(format!(
                        "start {start} + {} new tokens exceed the cache of {rows} rows",
                        s.tokens
                    ));
                }
                by_float!(g.dtype(ins[0]), T => {
                    let vals = (0..5)
                        .map(|i| self.val::<T>(ins[i]))
                        .collect::<Result<Vec<_>, _>>()?;
                    k.attn.cached(
                        &vals[0],
                        &vals[1],
                        &vals[2],
                        &vals[3],
                        &vals[4],
                        start as usize,
                        s,
                        &mut *self.val::<T>(outs[0])?,
                    )
                })
                .map_err(e)
            }
            Op::AttentionGrad(spec) => {
                let s = attn_shape(spec, shape(ins[0])[0]);
                let lse = self.val::<f32>(ins[5])?;
                let mut delta = self.scratch::<f32>(0, s.tokens * s.n_heads)?;
                let seg = self.segments(ins[3])?;
                by_float!(g.dtype(ins[0]), T => {
                    let vals = [0, 1, 2, 4, 6]
                        .iter()
                        .map(|&i| self.val::<T>(ins[i]))
                        .collect::<Result<Vec<_>, _>>()?;
                    let (mut dq, mut dk, mut dv) =
                        (self.val::<T>(outs[0])?, self.val::<T>(outs[1])?, self.val::<T>(outs[2])?);
                    k.attn.backward(
                        &vals[0], &vals[1], &vals[2], seg, &vals[3], &lse, &vals[4], s, &mut delta,
                        &mut dq, &mut dk, &mut dv,
                    )
                })
                .map_err(e)
            }
            Op::MatMul { ta, tb } => {
                let (a, b) = (shape(ins[0]), shape(ins[1]));
                let (m, kk) = if *ta { (a[1], a[0]) } else { (a[0], a[1]) };
                let nn = if *tb { b[0] } else { b[1] };
                let (ma, mb, mc) = (self.mat(ins[0])?, self.mat(ins[1])?, self.mat(outs[0])?);
                self.gemm(ma, mb, mc, (m, kk, nn), (*ta, *tb), 1.0, 0.0)
            }
            Op::Nf4MatMul { tb, .. } => self.nf4_product(ins[0], ins[1], outs[0], *tb, 1.0, 0.0),
            Op::MatMulSum {
                terms,
                addend,
                compute,
                epilogue,
                ..
            } => self.matmul_sum(
                node,
                terms,
                *addend,
                *compute == DType::BF16,
                epilogue.as_ref(),
            ),
            Op::LinearCrossEntropy {
                ignore_index,
                chunk,
            } => self.linear_cross_entropy(node, *ignore_index, *chunk),
            Op::CrossEntropy { ignore_index } => {
                let n = g.ty(ins[1]).numel();
                let (host, dev) = self.ids(ins[1], 0, n)?;
                let ids = Ids::new(host, &dev).map_err(e)?;
                let mut rows = self.scratch::<f32>(0, ids.len())?;
                let mut loss = self.val::<f32>(outs[0])?;
                match g.dtype(ins[0]) {
                    DType::F32 => k.loss.loss_only::<f32>(
                        &*self.val(ins[0])?,
                        ids,
                        *ignore_index,
                        &mut rows,
                        &mut loss,
                    ),
                    _ => k.loss.loss_only::<bf16>(
                        &*self.val::<bf16>(ins[0])?,
                        ids,
                        *ignore_index,
                        &mut rows,
                        &mut loss,
                    ),
                }
                .map_err(e)
            }
            Op::EmbeddingGrad { .. } => {
                let ids = self
                    .grouped_ids
                    .get(&leaf_key(g, ins[1]))
                    .map(|(_, ids)| ids)
                    .ok_or_else(|| format!("ids %{} were not grouped", ins[1].0))?;
                by_float!(g.dtype(ins[0]), T => k.emb.embedding_grad(
                    &*self.val::<T>(ins[0])?,
                    ids,
                    shape(ins[0])[1],
                    &mut *self.val::<f32>(outs[0])?,
                ))
                .map_err(e)
            }
            Op::CrossEntropyGrad { ignore_index } => {
                let n = g.ty(ins[1]).numel();
                let (host, dev) = self.ids(ins[1], 0, n)?;
                let ids = Ids::new(host, &dev).map_err(e)?;
                let dloss = self.val::<f32>(ins[2])?;
                by_float!(g.dtype(ins[0]), T => k.loss.grad(
                    &*self.val::<T>(ins[0])?,
                    ids,
                    *ignore_index,
                    &dloss,
                    &mut *self.val::<T>(outs[0])?,
                ))
                .map_err(e)
            }
            Op::SgdUpdate {
                weight_decay,
                clip_value,
            } => k
                .update
                .sgd(
                    &mut *self.val::<f32>(ins[0])?,
                    &*self.val::<f32>(ins[1])?,
                    &*self.val::<f32>(ins[2])?,
                    &*self.val::<f32>(ins[3])?,
                    *weight_decay,
                    *clip_value,
                    &mut *self.val::<f32>(outs[0])?,
                )
                .map_err(e),
            Op::AdaLomoUpdate(h) => {
                let factored = match shape(ins[0]) {
                    &[r, c] => Some((r, c)),
                    _ => None,
                };
                let (lr, coef, step) = (
                    self.val::<f32>(ins[2])?,
                    self.val::<f32>(ins[3])?,
                    self.val::<f32>(ins[4])?,
                );
                k.update
                    .adalomo(
                        &mut *self.val::<f32>(ins[0])?,
                        &*self.val::<f32>(ins[1])?,
                        &mut *self.val::<f32>(ins[5])?,
                        &mut *self.val::<f32>(ins[6])?,
                        factored,
                        (&lr, &coef, &step),
                        &adalomo_hyper(h),
                        &mut *self.val::<f32>(outs[0])?,
                    )
                    .map_err(e)
            }
            other => Err(format!("no GPU kernel for {}", other.name())),
        }
    }

    /// DoRA's `1/‖w + s·(b·a)‖` per output row; an NF4 weight is
    /// dequantized to bf16 in scratch first (the CPU widens it to f32: the
    /// norm differs by that rounding, averaged over the row).
    fn dora_inv_norm(&self, ins: &[ValueId], s: f32, y: ValueId) -> Result<(), String> {
        let g = self.graph();
        let (a, b) = (self.val::<f32>(ins[0])?, self.val::<f32>(ins[1])?);
        let mut y = self.val::<f32>(y)?;
        let dora = &self.k.dora;
        match g.dtype(ins[2]) {
            DType::Nf4 { .. } => {
                let w = self.nf4(ins[2])?;
                let t = match self.nf4_f32.contains(&ins[2]) {
                    true => DType::F32,
                    false => DType::BF16,
                };
                by_float!(t, T => {
                    let mut wd = self.scratch::<T>(0, w.rows * w.cols)?;
                    self.k
                        .nf4
                        .dequantize(w, &mut wd)
                        .map_err(|e| e.to_string())?;
                    dora.inv_norm(&a, &b, &*wd, s, &mut y)
                })
            }
            d => by_float!(d, T => dora.inv_norm::<T>(&a, &b, &*self.val(ins[2])?, s, &mut y)),
        }
        .map_err(|e| e.to_string())
    }

    fn rope(
        &self,
        x: ValueId,
        positions: ValueId,
        spec: &graft_ir::RopeSpec,
        inverse: bool,
        y: ValueId,
    ) -> Result<(), String> {
        let bits: Vec<u32> = spec.inv_freq.iter().map(|f| f.to_bits()).collect();
        let inv = self
            .inv_freq
            .get(&bits)
            .ok_or("RoPE's frequencies were not uploaded")?;
        by_float!(self.graph().dtype(x), T => self.k.rows.rope(
            &*self.val::<T>(x)?,
            &*self.val::<i32>(positions)?,
            inv,
            spec.n_heads,
            inverse,
            &mut *self.val::<T>(y)?,
        ))
        .map_err(|e| e.to_string())
    }

    /// A fusion group `epilogue([addend +] dense terms + Σ x·op(W))`: the
    /// addend copied into the output, the dense (LoRA) terms by cuBLAS, then
    /// each NF4 weight dequantized to bf16 in scratch (bit for bit the fused
    /// GEMM's values) and multiplied by cuBLAS, every product summed into
    /// the output (beta = 1); the epilogue last (RoPE, or DoRA's column
    /// scale). A bf16 output rounds the running sum at each product, so the
    /// small dense terms go first: their roundings are of small values.
    /// Where the CPU differs: it rounds the sum once, applies the epilogue
    /// before that rounding, and rounds a term's `scale·a` (here the scale
    /// is cuBLAS's alpha on the rounded `a`: the same for LoRA's
    /// power-of-two scales, not for rsLoRA's). On an H200 the NF4 products
    /// beat the fused NF4 GEMM 2-3.5x at every training shape measured
    /// (docs/GPU.md).
    fn matmul_sum(
        &self,
        node: &graft_ir::Node,
        terms: &[graft_ir::Product],
        addend: bool,
        bf16_compute: bool,
        epilogue: Option<&Epilogue>,
    ) -> Result<(), String> {
        let g = self.graph();
        let (ins, y) = (&node.inputs, node.outputs[0]);
        // Whether the output already holds part of the sum.
        let mut started = addend;
        if addend {
            let bytes = g.ty(y).bytes();
            self.gpu
                .stream()
                .memcpy_dtod(
                    &*self.view::<u8>(ins[2 * terms.len()], bytes)?,
                    &mut *self.view::<u8>(y, bytes)?,
                )
                .map_err(|e| e.to_string())?;
        }
        let dense: Vec<usize> = (0..terms.len()).filter(|&i| !terms[i].nf4).collect();
        if !dense.is_empty() {
            let off = nf4_scratch(g, node, terms);
            self.dense_terms(node, terms, &dense, started, bf16_compute, off)?;
            started = true;
        }
        for (i, t) in terms.iter().enumerate().filter(|(_, t)| t.nf4) {
            let beta = if started { 1.0 } else { 0.0 };
            self.nf4_product(ins[2 * i], ins[2 * i + 1], y, t.tb, t.scale, beta)?;
            started = true;
        }
        let last = *ins.last().expect("a group has inputs");
        match epilogue {
            Some(Epilogue::Rope(spec)) => self.rope(y, last, spec, false, y)?,
            // In place: each element is read, then written, by one thread.
            Some(Epilogue::ScaleCols) => by_float!(g.dtype(y), T => self.k.ew.mul_cols::<T, f32>(
                &*self.val(y)?,
                &*self.val(last)?,
                &mut *self.val(y)?,
            ))
            .map_err(|e| e.to_string())?,
            None => {}
        }
        Ok(())
    }

    /// `Σ scale·op(a)·op(b)` over the dense terms `idx` into the node's
    /// output, added to what it holds when `accumulate`: cuBLAS, one product per term
    /// summed in (beta = 1), f32 operands rounded to bf16 first under bf16
    /// compute (as the CPU's bf16 GEMM rounds them) into scratch from byte
    /// `off`.
    fn dense_terms(
        &self,
        node: &graft_ir::Node,
        terms: &[graft_ir::Product],
        idx: &[usize],
        accumulate: bool,
        bf16_compute: bool,
        off: usize,
    ) -> Result<(), String> {
        let g = self.graph();
        let (ins, y) = (&node.inputs, node.outputs[0]);
        let c = self.mat(y)?;
        let mut beta = if accumulate { 1.0 } else { 0.0 };
        // cuBLAS takes one input type: bf16 under bf16 compute, else f32.
        let want = if bf16_compute {
            DType::BF16
        } else {
            DType::F32
        };
        let mut off = off;
        let mut operand = |v: ValueId| -> Result<Mat, String> {
            let m = self.mat(v)?;
            if m.dtype == want {
                return Ok(m);
            }
            let n = g.ty(v).numel();
            let cast = match want {
                DType::BF16 => self
                    .k
                    .ew
                    .to_bf16(&*self.val::<f32>(v)?, &mut *self.scratch::<bf16>(off, n)?),
                _ => self
                    .k
                    .ew
                    .to_f32(&*self.val::<bf16>(v)?, &mut *self.scratch::<f32>(off, n)?),
            };
            cast.map_err(|e| e.to_string())?;
            let addr = self.scratch + off as u64;
            off += (n * want.bytes(1)).div_ceil(ALIGN) * ALIGN;
            Ok(Mat { addr, dtype: want })
        };
        for &i in idx {
            let t = &terms[i];
            let (a, b) = (operand(ins[2 * i])?, operand(ins[2 * i + 1])?);
            let (sa, sb) = (g.shape(ins[2 * i]), g.shape(ins[2 * i + 1]));
            let (m, k) = if t.ta { (sa[1], sa[0]) } else { (sa[0], sa[1]) };
            let n = if t.tb { sb[0] } else { sb[1] };
            self.gemm(a, b, c, (m, k, n), (t.ta, t.tb), t.scale, beta)?;
            beta = 1.0;
        }
        Ok(())
    }

    /// `y = scale·x·op(W) + beta·y` with NF4 `W`: dequantized to x's type
    /// (the compute type, f32 or bf16) at the start of scratch, then cuBLAS.
    fn nf4_product(
        &self,
        x: ValueId,
        w: ValueId,
        y: ValueId,
        tb: bool,
        scale: f32,
        beta: f32,
    ) -> Result<(), String> {
        let w = self.nf4(w)?;
        let m = self.graph().shape(y)[0];
        let compute = self.graph().dtype(x);
        // Generation's few rows: the codes read once, no dequantized copy
        // (f32 compute: x and y f32, as `gpu_unsupported` checks).
        if uses_gemv(self.graph(), y, tb) {
            let out = self.graph().dtype(y);
            return by_float!(compute, X => by_float!(out, T => self.k.nf4.gemv::<X, T>(
                &*self.val::<X>(x)?,
                w,
                m,
                scale,
                beta,
                &mut *self.val::<T>(y)?,
            )))
            .map_err(|e| e.to_string());
        }
        let (inner, width) = if tb {
            (w.cols, w.rows)
        } else {
            (w.rows, w.cols)
        };
        let (product, x, y) = ((m, inner, width), self.mat(x)?, self.mat(y)?);
        by_float!(compute, T => self
            .k
            .nf4
            .dequantize(w, &mut *self.scratch::<T>(0, w.rows * w.cols)?))
        .map_err(|e| e.to_string())?;
        let b = Mat {
            addr: self.scratch,
            dtype: compute,
        };
        self.gemm(x, b, y, product, (false, tb), scale, beta)
    }

    /// The loss and `dh` (for dloss = 1) of `softmax(h·Wᵀ)` against the
    /// labels, chunk rows at a time: cuBLAS logits (in h's type, f32 or
    /// bf16), the fused cross-entropy kernel, cuBLAS `dh = dlogits·W`.
    fn linear_cross_entropy(
        &self,
        node: &graft_ir::Node,
        ignore: i32,
        chunk: usize,
    ) -> Result<(), String> {
        let g = self.graph();
        let (h, w, labels) = (node.inputs[0], node.inputs[1], node.inputs[2]);
        let (loss, dh) = (node.outputs[0], node.outputs[1]);
        let (t, d, v) = (g.shape(h)[0], g.shape(h)[1], g.shape(w)[0]);
        let dtype = g.dtype(h);
        let elem = dtype.bytes(1);
        let host = self.host_i32(labels)?;
        let counted =
            graft_kernels::loss::check_labels(host, v, ignore).map_err(|e| e.to_string())?;
        let c = chunk.clamp(1, t.max(1));
        let up = |b: usize| b.div_ceil(ALIGN) * ALIGN;
        let (logits_off, dlogits_off, rows_off) = (0, up(c * v * elem), 2 * up(c * v * elem));
        let (hm, wm, dhm) = (self.mat(h)?, self.mat(w)?, self.mat(dh)?);
        let scale = 1.0 / counted.max(1) as f32;
        for start in (0..t).step_by(c) {
            let rows = c.min(t - start);
            let at = |m: Mat, row: usize| Mat {
                addr: m.addr + (row * d * elem) as u64,
                dtype,
            };
            let logits = Mat {
                addr: self.scratch + logits_off as u64,
                dtype,
            };
            let dlogits = Mat {
                addr: self.scratch + dlogits_off as u64,
                dtype,
            };
            self.gemm(
                at(hm, start),
                wm,
                logits,
                (rows, d, v),
                (false, true),
                1.0,
                0.0,
            )?;
            let (part, dev) = self.ids(labels, start, rows)?;
            let ids = Ids::new(part, &dev).map_err(|e| e.to_string())?;
            by_float!(dtype, T => self.k.loss.rows(
                &*self.scratch::<T>(logits_off, rows * v)?,
                ids,
                ignore,
                scale,
                &mut *self.scratch::<T>(dlogits_off, rows * v)?,
                &mut *self.scratch::<f32>(rows_off + start * 4, rows)?,
            ))
            .map_err(|e| e.to_string())?;
            self.gemm(
                dlogits,
                wm,
                at(dhm, start),
                (rows, v, d),
                (false, false),
                1.0,
                0.0,
            )?;
        }
        self.k
            .loss
            .mean(
                &*self.scratch::<f32>(rows_off, t)?,
                counted,
                &mut *self.val::<f32>(loss)?,
            )
            .map_err(|e| e.to_string())
    }
}
