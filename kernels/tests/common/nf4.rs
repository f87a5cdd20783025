//! Random NF4 weights for the tests of the products that read them.

use super::Gen;
use graft_kernels::nf4::{dynamic_map_signed, Nf4, NF4_CODE};

/// Random NF4 parts (every code, absmax code and scale drawn at random).
pub struct Parts {
    rows: usize,
    cols: usize,
    block: usize,
    packed: Vec<u8>,
    absmax: Vec<u8>,
    scales: Vec<f32>,
    map: Vec<f32>,
    offset: f32,
}

impl Parts {
    pub fn random(rows: usize, cols: usize, block: usize, seed: u64) -> Parts {
        let mut r = Gen::new(seed);
        let n = rows * cols;
        let blocks = n.div_ceil(block);
        Parts {
            rows,
            cols,
            block,
            packed: (0..n.div_ceil(2)).map(|_| r.below(256) as u8).collect(),
            absmax: (0..blocks).map(|_| r.below(256) as u8).collect(),
            scales: (0..blocks.div_ceil(256))
                .map(|_| r.uniform(0.01, 0.1))
                .collect(),
            map: dynamic_map_signed().to_vec(),
            offset: r.uniform(0.05, 0.2),
        }
    }
    pub fn view(&self) -> Nf4<'_> {
        Nf4 {
            rows: self.rows,
            cols: self.cols,
            block: self.block,
            packed: &self.packed,
            absmax: &self.absmax,
            nested_scales: &self.scales,
            nested_map: &self.map,
            offset: self.offset,
        }
    }
    /// The whole weight, written out from the format's definition.
    pub fn dequantized(&self) -> Vec<f32> {
        (0..self.rows * self.cols)
            .map(|i| {
                let q = if i % 2 == 0 {
                    self.packed[i / 2] >> 4
                } else {
                    self.packed[i / 2] & 15
                };
                let b = i / self.block;
                let absmax = self.map[self.absmax[b] as usize] * self.scales[b / 256] + self.offset;
                NF4_CODE[q as usize] * absmax
            })
            .collect()
    }
}
