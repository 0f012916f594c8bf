//! CPU implementations of every op: the oracle of the GPU tests and the CPU backend.
//!
//! Straightforward code over contiguous row-major data, f32 arithmetic with f64 accumulation, rounded
//! to the output type once, as the kernels do.

pub mod attention;
pub mod gemv;
pub mod moe;
pub mod rmsnorm;

pub use half::bf16;

/// bf16 values to f32.
pub fn to_f32(v: &[bf16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

/// f32 values rounded to bf16 (nearest even).
pub fn to_bf16(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

/// ‖a − b‖ / ‖b‖ in f64; infinite when either side holds a NaN or an infinity.
pub fn rel_l2_error(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "compared vectors differ in length");
    let mut num = 0.0f64;
    let mut den = 0.0f64;
    for (&x, &y) in a.iter().zip(b) {
        if !x.is_finite() || !y.is_finite() {
            return f64::INFINITY;
        }
        let d = x as f64 - y as f64;
        num += d * d;
        den += (y as f64) * (y as f64);
    }
    if den == 0.0 {
        if num == 0.0 {
            0.0
        } else {
            f64::INFINITY
        }
    } else {
        (num / den).sqrt()
    }
}
