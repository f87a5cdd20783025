//! The comparison helpers the kernel tests rely on: a NaN or infinity never
//! passes, and the finite-difference gradient is right.

mod common;

use common::*;

#[test]
fn rel_l2_fails_on_nan_and_infinity() {
    let want = [1.0, 2.0, 3.0];
    assert_eq!(rel_l2(&[1.0f32, 2.0, 3.0], &want), 0.0);
    assert_eq!(rel_l2(&[1.0f32, f32::NAN, 3.0], &want), f64::INFINITY);
    assert_eq!(rel_l2(&[1.0f32, f32::INFINITY, 3.0], &want), f64::INFINITY);
    assert_eq!(
        rel_l2(&[1.0f32, 2.0, 3.0], &[1.0, f64::NAN, 3.0]),
        f64::INFINITY
    );
    assert_eq!(rel_l2(&[f32::NAN], &[0.0]), f64::INFINITY);
    // A floor never rescues a NaN.
    assert_eq!(rel_l2_floor(&[f32::NAN], &[0.0], 1e30), f64::INFINITY);
    assert!(check("x", &[f32::NAN], &[1.0], 1e30).is_err());
    assert!(check("x", &[f32::NAN], &[f64::NAN], 1e30).is_err());
    // Nor does a length mismatch pass.
    assert_eq!(rel_l2(&[1.0f32], &[1.0, 0.0]), f64::INFINITY);
}

#[test]
fn rel_l2_is_relative_l2() {
    let err = rel_l2(&[3.0f32, 4.0], &[3.0, 4.5]);
    assert!((err - 0.5 / 4.5f64.hypot(3.0)).abs() < 1e-12);
    // All-zero reference: exact zeros pass, anything else fails any sane bound.
    assert_eq!(rel_l2(&[0.0f32, 0.0], &[0.0, 0.0]), 0.0);
    assert!(rel_l2(&[1e-30f32], &[0.0]) > 1e200);
    assert!(rel_l2_floor(&[1.0f32], &[0.0], 10.0) == 0.1);
    assert!(check("x", &[1.0f32], &[1.01], 1e-3).is_err());
    assert!(check("x", &[1.0f32], &[1.0001], 1e-3).is_ok());
}

#[test]
fn numeric_grad_matches_analytic() {
    let x = [0.3, -1.2, 2.0];
    let g = numeric_grad(&x, |x| x[0] * x[1].sin() + x[2].powi(3));
    let want = [(-1.2f64).sin(), 0.3 * (-1.2f64).cos(), 3.0 * 4.0];
    for (a, b) in g.iter().zip(want) {
        assert!((a - b).abs() < 1e-8, "{a} vs {b}");
    }
}
