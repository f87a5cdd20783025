//! Schedules and clipping against transformers' and torch's definitions,
//! computed by hand.

use graft_engine::optim::clip_grad_norm;
use graft_trainer::config::Scheduler;
use graft_trainer::schedule::lr_at;

#[test]
fn schedules_follow_transformers() {
    let lr = |k, s| lr_at(k, 1.0, s, 10, 110);
    for k in [Scheduler::Constant, Scheduler::Linear, Scheduler::Cosine] {
        assert_eq!(lr(k, 0), 0.0, "warm-up starts at 0");
        assert!((lr(k, 5) - 0.5).abs() < 1e-12);
        assert_eq!(lr(k, 10), 1.0, "warm-up ends at the base rate");
    }
    assert_eq!(lr(Scheduler::Constant, 100), 1.0);
    assert!((lr(Scheduler::Linear, 60) - 0.5).abs() < 1e-12);
    assert_eq!(lr(Scheduler::Linear, 110), 0.0);
    assert!((lr(Scheduler::Cosine, 60) - 0.5).abs() < 1e-12);
    assert!(
        (lr(Scheduler::Cosine, 35) - 0.5 * (1.0 + (std::f64::consts::PI * 0.25).cos())).abs()
            < 1e-12
    );
    assert_eq!(
        lr(Scheduler::Cosine, 200),
        0.0,
        "never negative past the end"
    );
}

#[test]
fn clipping_scales_to_the_max_norm_and_leaves_small_gradients_alone() {
    let (mut a, mut b) = (vec![3.0f32, 0.0], vec![4.0f32]);
    let norm = clip_grad_norm(&mut [&mut a, &mut b], 1.0);
    assert!((norm - 5.0).abs() < 1e-9);
    let after = (a.iter().chain(&b).map(|x| x * x).sum::<f32>()).sqrt();
    assert!((after - 1.0).abs() < 1e-5, "{after}");
    let mut c = vec![0.1f32, 0.2];
    let before = c.clone();
    clip_grad_norm(&mut [&mut c], 1.0);
    assert_eq!(c, before);
}
