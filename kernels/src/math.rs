//! Elementary functions written for the kernels' inner loops: inline and
//! branch-free, so that loops over slices vectorize (a call into libm per
//! element cannot), in a fixed order of operations, so that results do not
//! depend on the platform's libm.

/// `e^x` within 2 ulp for normal results: `x = n·ln 2 + r` with `|r| ≤ ln 2 / 2`
/// (Cody–Waite split of ln 2), `e^r` by its degree-7 Taylor polynomial
/// (truncation 6e-9 relative), times `2^n` built in the exponent bits.
/// Inputs below ln(2^-126) give the smallest normal float instead of a
/// subnormal or 0, above ln(f32::MAX) the largest finite one; NaN stays NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding 1.5·2^23 rounds x·log2(e) (|·| < 2^22) to an integer, ties to
    // even, leaving it in the low mantissa bits: `round_ties_even` without
    // SSE4.1 is a call into libm, which stops loops from vectorizing.
    const MAGIC: f32 = 12_582_912.0;
    let x = x.clamp(-87.336_54, 88.722_83);
    let t = x * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0 / 5040.0;
    let p = p * r + 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    let p = p * r + 1.0;
    // n ∈ [-126, 128]; 2^128 is split as 2·2^127 to stay finite.
    let n = t.to_bits() as i32 - MAGIC.to_bits() as i32;
    let half = n >> 1;
    let scale = |e: i32| f32::from_bits(((e + 127) as u32) << 23);
    p * scale(half) * scale(n - half)
}

#[cfg(test)]
mod tests {
    /// Against f64's exp over the whole useful range, and the edges.
    #[test]
    fn exp_is_within_two_ulp() {
        let mut worst = 0f64;
        let mut x = -87.3f32;
        while x < 88.7 {
            let want = (x as f64).exp();
            let got = super::exp(x) as f64;
            let ulp = (want as f32).abs() * f32::EPSILON;
            worst = worst.max((got - want).abs() / ulp as f64);
            x += 0.000_731;
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        assert_eq!(super::exp(0.0), 1.0);
        assert!(super::exp(f32::NAN).is_nan());
        assert!(super::exp(-1e30) < 1.2e-38 && super::exp(-1e30) > 0.0);
        assert!(super::exp(1e30).is_finite());
    }
}
