//! GEMV / skinny GEMM: `y[M, N] = x[M, K] · W[N, K]ᵀ`.

use super::bf16;

/// Returns `y` as f32 (row-major `[m, n]`), accumulated in f64 and rounded once.
pub fn gemv(x: &[bf16], w: &[bf16], m: usize, n: usize, k: usize) -> Vec<f32> {
    assert!(x.len() == m * k && w.len() == n * k);
    let xf: Vec<f64> = x.iter().map(|v| v.to_f64()).collect();
    let mut y = vec![0f32; m * n];
    for (j, w_row) in w.chunks_exact(k).enumerate() {
        let wf: Vec<f64> = w_row.iter().map(|v| v.to_f64()).collect();
        for i in 0..m {
            let acc: f64 = xf[i * k..(i + 1) * k].iter().zip(&wf).map(|(a, b)| a * b).sum();
            y[i * n + j] = acc as f32;
        }
    }
    y
}
