//! RMSNorm with an optional fused residual add.

use super::bf16;

/// How the weight scales the normalised row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightStyle {
    /// `x̂ · w` (Gemma 4).
    Plain,
    /// `x̂ · (1 + w)` (Qwen3.5).
    OffsetOne,
}

impl WeightStyle {
    pub fn offset(self) -> f32 {
        match self {
            WeightStyle::Plain => 0.0,
            WeightStyle::OffsetOne => 1.0,
        }
    }
}

/// RMSNorm of `rows` contiguous rows of `dim` values.
///
/// With `residual`, each row first becomes `r' = bf16(x + r)`, which is written back into `residual`
/// and normalised (the rounded value, as an unfused add followed by RMSNorm would see it).
pub fn rmsnorm(
    x: &[bf16],
    residual: Option<&mut [bf16]>,
    weight: &[bf16],
    out: &mut [bf16],
    dim: usize,
    eps: f32,
    style: WeightStyle,
) {
    assert!(dim > 0 && x.len().is_multiple_of(dim) && out.len() == x.len() && weight.len() == dim);
    let mut residual = residual;
    let offset = style.offset();
    let mut row = vec![0f32; dim];
    for (r, (x_row, out_row)) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)).enumerate() {
        for (v, xv) in row.iter_mut().zip(x_row) {
            *v = xv.to_f32();
        }
        if let Some(res) = residual.as_deref_mut() {
            let res_row = &mut res[r * dim..(r + 1) * dim];
            for (v, rv) in row.iter_mut().zip(res_row.iter_mut()) {
                let sum = bf16::from_f32(*v + rv.to_f32());
                *rv = sum;
                *v = sum.to_f32();
            }
        }
        let sum_sq: f64 = row.iter().map(|&v| (v as f64) * (v as f64)).sum();
        let inv_rms = (1.0 / (sum_sq / dim as f64 + eps as f64).sqrt()) as f32;
        for ((o, &v), w) in out_row.iter_mut().zip(&row).zip(weight) {
            *o = bf16::from_f32(v * inv_rms * (w.to_f32() + offset));
        }
    }
}
