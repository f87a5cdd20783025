//! Token ids and labels on the device, with the host copy that launchers
//! check them against before any kernel reads them (an id out of range is a
//! [`GpuError::Shape`] naming it, never an out-of-bounds access), and their
//! grouping by id for the embedding gradient.

use super::{driver, Gpu, GpuError};
use crate::IndexError;
use cudarc::driver::CudaSlice;

/// `ids` uploaded once per step: the device copy, and the same values on the
/// host (the device copy is never written after the upload, so both agree).
pub struct DeviceIds {
    host: Vec<i32>,
    dev: CudaSlice<i32>,
    /// Positions `0..len` sorted stably by id: each id's tokens in increasing
    /// order, as the CPU's embedding gradient adds them.
    order: CudaSlice<i32>,
    /// Where each distinct id's run starts in `order`, and `len` at the end.
    starts: CudaSlice<i32>,
    groups: usize,
}

impl DeviceIds {
    pub fn upload(gpu: &Gpu, ids: &[i32]) -> Result<DeviceIds, GpuError> {
        super::int("ids", ids.len())?;
        let (order, starts, groups) = grouped(ids);
        // Device buffers are never empty (no zero-byte allocation); the
        // length is the host copy's. `starts` has room for every id distinct,
        // so `update` can refill it for any batch of the same length.
        let padded = |v: &[i32]| if v.is_empty() { vec![0] } else { v.to_vec() };
        let s = gpu.stream();
        let mut room = starts.clone();
        room.resize(ids.len() + 1, 0);
        Ok(DeviceIds {
            dev: s.clone_htod(&padded(ids)).map_err(driver)?,
            order: s.clone_htod(&padded(&order)).map_err(driver)?,
            starts: s.clone_htod(&room).map_err(driver)?,
            host: ids.to_vec(),
            groups,
        })
    }

    /// Replaces the ids by `ids`: in place when they are as many (a training
    /// loop's batches: no allocation), else uploaded anew.
    pub fn update(&mut self, gpu: &Gpu, ids: &[i32]) -> Result<(), GpuError> {
        if ids.len() != self.host.len() || ids.is_empty() {
            *self = DeviceIds::upload(gpu, ids)?;
            return Ok(());
        }
        let (order, starts, groups) = grouped(ids);
        let s = gpu.stream();
        s.memcpy_htod(ids, &mut self.dev).map_err(driver)?;
        s.memcpy_htod(&order, &mut self.order).map_err(driver)?;
        s.memcpy_htod(&starts, &mut self.starts.slice_mut(0..starts.len()))
            .map_err(driver)?;
        self.host.copy_from_slice(ids);
        self.groups = groups;
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.host.len()
    }
    pub fn is_empty(&self) -> bool {
        self.host.is_empty()
    }
    pub fn host(&self) -> &[i32] {
        &self.host
    }
    pub(crate) fn device(&self) -> &CudaSlice<i32> {
        &self.dev
    }
    /// The ids lent to a launcher.
    pub fn view(&self) -> Ids<'_> {
        Ids {
            host: &self.host,
            dev: &self.dev,
        }
    }
    /// The grouping for the embedding gradient: `order`, `starts` and the
    /// number of distinct ids.
    pub(crate) fn groups(&self) -> (&CudaSlice<i32>, &CudaSlice<i32>, usize) {
        (&self.order, &self.starts, self.groups)
    }
}

/// Positions sorted stably by id, where each distinct id's run starts (and
/// the length at the end), and how many distinct ids there are.
fn grouped(ids: &[i32]) -> (Vec<i32>, Vec<i32>, usize) {
    let mut order: Vec<i32> = (0..ids.len() as i32).collect();
    order.sort_by_key(|&t| ids[t as usize]);
    let mut starts: Vec<i32> = (0..order.len())
        .filter(|&k| k == 0 || ids[order[k] as usize] != ids[order[k - 1] as usize])
        .map(|k| k as i32)
        .collect();
    let groups = starts.len();
    starts.push(ids.len() as i32);
    (order, starts, groups)
}

/// Ids on the device with their host copy, borrowed: what the embedding
/// and loss launchers read. A plan's token ids and labels are leaves
/// already resident on the device, so a step lends them as they are (no
/// copy, no allocation); [`DeviceIds::view`] lends an uploaded set.
#[derive(Clone, Copy)]
pub struct Ids<'a> {
    host: &'a [i32],
    dev: &'a CudaSlice<i32>,
}

impl<'a> Ids<'a> {
    /// `dev` must hold the same values as `host` (at least as many).
    pub fn new(host: &'a [i32], dev: &'a CudaSlice<i32>) -> Result<Ids<'a>, GpuError> {
        if dev.len() < host.len() {
            return Err(GpuError::Shape(format!(
                "ids: {} on the device for {} on the host",
                dev.len(),
                host.len()
            )));
        }
        super::int("ids", host.len())?;
        Ok(Ids { host, dev })
    }
    pub fn len(&self) -> usize {
        self.host.len()
    }
    pub fn is_empty(&self) -> bool {
        self.host.is_empty()
    }
    pub fn host(&self) -> &'a [i32] {
        self.host
    }
    pub(crate) fn device(&self) -> &'a CudaSlice<i32> {
        self.dev
    }
}

/// The CPU kernels' index errors, as the GPU launchers report them.
pub(crate) fn index_error(e: IndexError) -> GpuError {
    GpuError::Shape(e.to_string())
}
