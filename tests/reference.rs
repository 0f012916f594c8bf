//! The CPU reference against independent f64 formulas written from the definitions.

use sparkinfer::reference::{self, bf16, rmsnorm::WeightStyle};
use sparkinfer::testing::{naive, Rng};

/// Largest relative difference allowed between a bf16 result and the exact value: one rounding of the
/// output (2⁻⁸ relative) plus f32 arithmetic.
const BF16_ELEMENT_TOL: f64 = 1.0 / 128.0;

fn close(got: f64, want: f64, tol: f64) -> bool {
    (got - want).abs() <= tol * want.abs().max(1e-3)
}

#[test]
fn rmsnorm_matches_the_definition() {
    let mut rng = Rng::new(11);
    for &(rows, dim, style) in &[
        (1, 8, WeightStyle::Plain),
        (3, 2048, WeightStyle::OffsetOne),
        (2, 2816, WeightStyle::Plain),
        (5, 16384, WeightStyle::OffsetOne),
    ] {
        let x = rng.bf16_normal(rows * dim, 2.0);
        let w = rng.bf16_normal(dim, 0.7);
        let mut out = vec![bf16::ZERO; rows * dim];
        reference::rmsnorm::rmsnorm(&x, None, &w, &mut out, dim, 1e-6, style);
        let wf: Vec<f64> = w.iter().map(|v| v.to_f64()).collect();
        for r in 0..rows {
            let row: Vec<f64> = x[r * dim..(r + 1) * dim].iter().map(|v| v.to_f64()).collect();
            let want = naive::rmsnorm_row(&row, &wf, 1e-6, style.offset() as f64);
            for i in 0..dim {
                let got = out[r * dim + i].to_f64();
                assert!(close(got, want[i], BF16_ELEMENT_TOL), "row {r} col {i}: {got} vs {}", want[i]);
            }
        }
    }
}

#[test]
fn rmsnorm_residual_is_rounded_sum_and_normalised() {
    let mut rng = Rng::new(12);
    let (rows, dim) = (4, 256);
    let x = rng.bf16_normal(rows * dim, 1.0);
    let r0 = rng.bf16_normal(rows * dim, 1.0);
    let w = rng.bf16_normal(dim, 0.5);
    let mut res = r0.clone();
    let mut out = vec![bf16::ZERO; rows * dim];
    reference::rmsnorm::rmsnorm(&x, Some(&mut res), &w, &mut out, dim, 1e-6, WeightStyle::OffsetOne);
    let wf: Vec<f64> = w.iter().map(|v| v.to_f64()).collect();
    for r in 0..rows {
        let sum: Vec<f64> =
            (0..dim).map(|i| bf16::from_f64(x[r * dim + i].to_f64() + r0[r * dim + i].to_f64()).to_f64()).collect();
        for i in 0..dim {
            assert_eq!(res[r * dim + i].to_f64(), sum[i], "residual row {r} col {i}");
        }
        let want = naive::rmsnorm_row(&sum, &wf, 1e-6, 1.0);
        for i in 0..dim {
            assert!(close(out[r * dim + i].to_f64(), want[i], BF16_ELEMENT_TOL));
        }
    }
}

#[test]
fn rmsnorm_of_a_constant_row_is_the_weight() {
    // mean(c²) = c², so the normalised row is sign(c) up to eps: out = w exactly (in bf16).
    let dim = 64;
    let x = vec![bf16::from_f32(3.0); dim];
    let w: Vec<bf16> = (0..dim).map(|i| bf16::from_f32(i as f32 * 0.25 - 4.0)).collect();
    let mut out = vec![bf16::ZERO; dim];
    reference::rmsnorm::rmsnorm(&x, None, &w, &mut out, dim, 0.0, WeightStyle::Plain);
    assert_eq!(out, w);
}

#[test]
fn gemv_matches_the_definition() {
    let mut rng = Rng::new(13);
    for &(m, n, k) in &[(1, 8, 8), (3, 40, 96), (16, 24, 2048)] {
        let x = rng.bf16_normal(m * k, 1.0);
        let w = rng.bf16_normal(n * k, 1.0);
        let got = reference::gemv::gemv(&x, &w, m, n, k);
        let xf: Vec<f64> = x.iter().map(|v| v.to_f64()).collect();
        let wf: Vec<f64> = w.iter().map(|v| v.to_f64()).collect();
        let want = naive::matmul_nt(&xf, &wf, m, n, k);
        for i in 0..m * n {
            // f64 accumulation rounded once to f32.
            assert!((got[i] as f64 - want[i]).abs() <= 1e-6 * want[i].abs().max(1.0), "{i}: {} vs {}", got[i], want[i]);
        }
    }
}

#[test]
fn gemv_identity_weight_copies_x() {
    let k = 16;
    let x: Vec<bf16> = (0..k).map(|i| bf16::from_f32(i as f32 - 7.5)).collect();
    let w: Vec<bf16> = (0..k * k).map(|i| bf16::from_f32(if i / k == i % k { 1.0 } else { 0.0 })).collect();
    let y = reference::gemv::gemv(&x, &w, 1, k, k);
    assert_eq!(y, reference::to_f32(&x));
}

#[test]
fn rel_l2_error_flags_nan() {
    assert_eq!(reference::rel_l2_error(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
    assert!(reference::rel_l2_error(&[f32::NAN, 2.0], &[1.0, 2.0]).is_infinite());
    assert!((reference::rel_l2_error(&[1.1, 0.0], &[1.0, 0.0]) - 0.1).abs() < 1e-6);
}
