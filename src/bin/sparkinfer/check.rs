//! `sparkinfer check`: every op against its oracle at the shapes of the target models.

use crate::Options;
use sparkinfer::testing::Rng;

pub fn run(o: &Options) -> Result<(), String> {
    let ctx = crate::open_context(o)?;
    let seed = o.seed.unwrap_or_else(Rng::fresh_seed);
    let stream = stream_for(&ctx)?;
    let oracle = if ctx.is_cpu() { "CPU backend vs f64 formulas" } else { "GPU vs CPU reference" };
    println!("sparkinfer check ({oracle}), seed {seed}");
    println!("{:<10} {:<40} {:<24} {:>10} {:>10}  result", "op", "shape", "variant", "rel err", "tolerance");
    let mut failed = 0;
    let checks = sparkinfer::checks::model_checks(ctx.is_cpu());
    for (i, c) in checks.iter().enumerate() {
        let case_seed = seed.wrapping_add((i as u64 + 1).wrapping_mul(0x9E37_79B9));
        let r = (c.run)(&ctx, stream.stream(), case_seed)
            .map_err(|e| format!("{} {} {}: {e}", c.op, c.shape, c.variant))?;
        let worst = r.residual.map_or(r.out.rel_l2, |res| res.rel_l2.max(r.out.rel_l2));
        let ok = r.passes(c.tol);
        failed += usize::from(!ok);
        let verdict = if ok {
            "ok".to_string()
        } else {
            format!("FAIL ({} non-finite, {} stray writes)", r.out.non_finite, r.stray_writes)
        };
        println!("{:<10} {:<40} {:<24} {:>10.2e} {:>10.0e}  {verdict}", c.op, c.shape, c.variant, worst, c.tol);
    }
    if failed == 0 {
        println!("all {} checks passed", checks.len());
        Ok(())
    } else {
        Err(format!("{failed} of {} checks failed (seed {seed})", checks.len()))
    }
}

/// A stream owned by the command: a fresh CUDA stream, or NULL on the CPU backend.
pub struct OwnedStream<'a> {
    ctx: &'a sparkinfer::Context,
    raw: cudarc::driver::sys::CUstream,
}

impl OwnedStream<'_> {
    pub fn stream(&self) -> sparkinfer::ops::Stream {
        // Created below for this context and destroyed only on drop.
        unsafe { sparkinfer::ops::Stream::from_raw(self.raw) }
    }
}

impl Drop for OwnedStream<'_> {
    fn drop(&mut self) {
        if let sparkinfer::ops::Backend::Cuda(d) = self.ctx.backend() {
            let _ = unsafe { d.stream_destroy(self.raw) };
        }
    }
}

pub fn stream_for(ctx: &sparkinfer::Context) -> Result<OwnedStream<'_>, String> {
    let raw = match ctx.backend() {
        sparkinfer::ops::Backend::Cpu => std::ptr::null_mut(),
        sparkinfer::ops::Backend::Cuda(d) => d.stream_create().map_err(|e| e.to_string())?,
    };
    Ok(OwnedStream { ctx, raw })
}
