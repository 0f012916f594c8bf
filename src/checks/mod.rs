//! Op-level correctness checks on fresh random inputs: each op runs on the context's backend with its
//! output poisoned first, and is compared with the oracle: `reference` for a CUDA context, the independent
//! f64 formulas of [`crate::testing::naive`] for the CPU backend. Used by `sparkinfer check` and the GPU
//! tests.

pub mod attention;
pub mod foundation;
pub mod moe;

use crate::error::Result;
use crate::ops::{Context, Stream};
use crate::reference::{self, bf16};
use crate::testing::Comparison;

pub fn f32s(v: &[bf16]) -> Vec<f32> {
    reference::to_f32(v)
}

/// Elements of a strided `[rows, stride]` matrix that lie in the padding (columns ≥ cols) and no longer
/// hold the 0xFFFF poison pattern: a kernel wrote outside its output.
pub fn padding_writes(data: &[u16], rows: usize, cols: usize, stride: usize) -> usize {
    (0..rows).flat_map(|r| (cols..stride).map(move |c| r * stride + c)).filter(|&i| data[i] != 0xffff).count()
}

pub fn dense_rows(data: &[bf16], rows: usize, cols: usize, stride: usize) -> Vec<bf16> {
    (0..rows).flat_map(|r| data[r * stride..r * stride + cols].iter().copied()).collect()
}

#[derive(Clone, Copy, Debug)]
pub struct CheckResult {
    pub out: Comparison,
    /// The residual written back, when the case has one.
    pub residual: Option<Comparison>,
    /// Elements written outside the outputs' rows.
    pub stray_writes: usize,
}

impl CheckResult {
    pub fn passes(&self, tol: f64) -> bool {
        self.out.passes(tol) && self.residual.is_none_or(|r| r.passes(tol)) && self.stray_writes == 0
    }
}

/// Runs one check on a context and stream with a seed.
pub type CheckFn = Box<dyn Fn(&Context, Stream, u64) -> Result<CheckResult>>;

/// One named check at a model shape, for `sparkinfer check`.
pub struct ModelCheck {
    pub op: &'static str,
    pub shape: String,
    pub variant: String,
    /// Bound on ‖out − ref‖ / ‖ref‖ for every compared output.
    pub tol: f64,
    pub run: CheckFn,
}

/// Every family's checks at the shapes of MODELS.md. `cpu` trims the list to what the CPU backend
/// finishes in seconds.
pub fn model_checks(cpu: bool) -> Vec<ModelCheck> {
    let mut checks = foundation::model_checks(cpu);
    checks.extend(attention::model_checks(cpu));
    checks.extend(moe::model_checks(cpu));
    checks
}
