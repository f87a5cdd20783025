//! Where plans run: the CPU, a GPU, or (`Auto`) the GPU for every plan it
//! runs whole and the CPU for the others, so one binary uses a GPU where
//! the driver and NVRTC are present and still runs everywhere else.

use crate::executor::{CpuExecutor, Feeds};
use crate::plan::Plan;
use crate::profile::OpProfile;
use crate::tensor::Tensor;
use crate::EngineError;

/// Which device runs plans.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    /// A GPU, or an error when none is usable; a plan the GPU cannot run
    /// whole runs on the CPU (see [`Executor::require_gpu`] for the plans
    /// that must not).
    Gpu,
    /// The GPU where one is usable and runs a plan whole, else the CPU.
    Auto,
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Device, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "gpu" => Ok(Device::Gpu),
            "auto" => Ok(Device::Auto),
            other => Err(format!("device `{other}`: expected cpu, gpu or auto")),
        }
    }
}

/// Runs plans on the chosen device.
pub struct Executor {
    cpu: CpuExecutor,
    #[cfg(feature = "cuda")]
    gpu: Option<crate::gpu::GpuExecutor>,
    // Read only where a GPU can be present.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    device: Device,
    /// Why `Auto` runs on the CPU, when it does for lack of a usable GPU.
    no_gpu: Option<String>,
}

impl Executor {
    /// An executor for `device`: `Gpu` fails here when no GPU is usable.
    pub fn new(device: Device) -> Result<Executor, EngineError> {
        let mut e = Executor {
            cpu: CpuExecutor::new(),
            #[cfg(feature = "cuda")]
            gpu: None,
            device,
            no_gpu: None,
        };
        if device == Device::Cpu {
            return Ok(e);
        }
        #[cfg(feature = "cuda")]
        match crate::gpu::GpuExecutor::new(0) {
            Ok(g) => e.gpu = Some(g),
            Err(EngineError::Gpu(why)) if device == Device::Auto => e.no_gpu = Some(why),
            Err(err) => return Err(err),
        }
        #[cfg(not(feature = "cuda"))]
        match device {
            Device::Auto => e.no_gpu = Some("built without the `cuda` feature".into()),
            _ => {
                return Err(EngineError::Gpu(
                    "this build has no GPU support (the `cuda` feature): use --device cpu".into(),
                ))
            }
        }
        Ok(e)
    }

    /// Where `plan` would run, in words: the GPU's name, or the CPU and why.
    pub fn placement(&self, plan: &Plan) -> String {
        #[cfg(feature = "cuda")]
        if let Some(g) = &self.gpu {
            let name = format!("GPU {} ({})", g.gpu().name(), g.gpu().arch());
            return match crate::gpu::gpu_unsupported(plan).first() {
                None => name,
                Some((n, why)) => format!(
                    "CPU: {name} has no kernel for node %{} ({}): {why}",
                    n.0,
                    plan.graph().node(*n).op.name()
                ),
            };
        }
        let _ = plan;
        match &self.no_gpu {
            Some(why) => format!("CPU; no usable GPU: {why}"),
            None => "CPU".into(),
        }
    }

    /// Under [`Device::Gpu`], fails unless the GPU runs `plan` whole, naming
    /// the first node it cannot run.
    pub fn require_gpu(&self, plan: &Plan) -> Result<(), EngineError> {
        #[cfg(feature = "cuda")]
        if self.device == Device::Gpu {
            if let Some((n, why)) = crate::gpu::gpu_unsupported(plan).first() {
                return Err(EngineError::Gpu(format!(
                    "node %{} ({}) has no GPU kernel yet: {why}; use --device cpu or auto",
                    n.0,
                    plan.graph().node(*n).op.name()
                )));
            }
        }
        let _ = plan;
        Ok(())
    }

    /// Fails unless `plan` fits where it would run: in the GPU's free
    /// memory, or its arena in the host's available memory. Checked before
    /// a run starts, so a step too large is one clear error, not an
    /// allocation failure (or the OOM killer) at its first step.
    pub fn check_fits(&self, plan: &Plan) -> Result<(), EngineError> {
        #[cfg(feature = "cuda")]
        if let Some(g) = &self.gpu {
            if crate::gpu::gpu_unsupported(plan).is_empty() {
                return g.check_fits(plan);
            }
        }
        let need = plan.peak_bytes();
        match host_available_bytes() {
            Some(have) if need > have => Err(EngineError::Memory(format!(
                "the plan needs {:.2} GB for its activations (its arena) and this machine has {:.2} GB available",
                need as f64 / 1e9,
                have as f64 / 1e9
            ))),
            _ => Ok(()),
        }
    }

    /// Runs `plan` on the GPU if this executor has one and it runs the plan
    /// whole, else on the CPU; outputs are host tensors either way.
    pub fn run(&mut self, plan: &Plan, feeds: &Feeds) -> Result<Vec<Tensor>, EngineError> {
        #[cfg(feature = "cuda")]
        if let Some(g) = &mut self.gpu {
            if crate::gpu::gpu_unsupported(plan).is_empty() {
                return g.run(plan, feeds);
            }
        }
        self.cpu.run(plan, feeds)
    }

    /// The GPU executor, where this executor has one and it runs `plan`
    /// whole (for steps that keep their state on the device).
    #[cfg(feature = "cuda")]
    pub fn gpu_for(&mut self, plan: &Plan) -> Option<&mut crate::gpu::GpuExecutor> {
        self.gpu
            .as_mut()
            .filter(|_| crate::gpu::gpu_unsupported(plan).is_empty())
    }

    /// Times every node on both devices (see [`CpuExecutor::profile_ops`]).
    pub fn profile_ops(&mut self, on: bool) {
        self.cpu.profile_ops(on);
        #[cfg(feature = "cuda")]
        if let Some(g) = &mut self.gpu {
            g.profile_ops(on);
        }
    }

    /// The profile of the device that ran nodes (the GPU's if it ran any).
    pub fn op_profile(&self) -> Option<&OpProfile> {
        #[cfg(feature = "cuda")]
        if let Some(p) = self.gpu.as_ref().and_then(|g| g.op_profile()) {
            if p.seconds() > 0.0 {
                return Some(p);
            }
        }
        self.cpu.op_profile()
    }
}

/// The memory the kernel says new allocations can take without swapping
/// (Linux's `MemAvailable`); `None` where it does not say.
pub fn host_available_bytes() -> Option<usize> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
