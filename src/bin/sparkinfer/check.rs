//! `sparkinfer check`: every op against its oracle at the shapes of the target models.

use crate::Options;
use sparkinfer::checks::{self, GemvCase, RmsNormCase};
use sparkinfer::ops::gemv::OutType;
use sparkinfer::reference::rmsnorm::WeightStyle;
use sparkinfer::testing::{Rng, BF16_TOL, F32_TOL};

/// (label, rows, dim, style): hidden states and per-head q/k norms of Qwen3.5-35B-A3B and Gemma 4 26B-A4B.
const RMSNORM_SHAPES: &[(&str, usize, usize, WeightStyle)] = &[
    ("qwen3.5 hidden", 1, 2048, WeightStyle::OffsetOne),
    ("qwen3.5 hidden", 64, 2048, WeightStyle::OffsetOne),
    ("qwen3.5 q-norm (16 heads x 256)", 16, 256, WeightStyle::OffsetOne),
    ("gemma4 hidden", 1, 2816, WeightStyle::Plain),
    ("gemma4 hidden", 7, 2816, WeightStyle::Plain),
    ("gemma4 global q-norm (hd 512)", 16, 512, WeightStyle::Plain),
    ("largest dim", 3, 16384, WeightStyle::Plain),
];

/// (label, n, k, out): projections of the two models at decode.
const GEMV_SHAPES: &[(&str, usize, usize, OutType)] = &[
    ("qwen3.5 router 256x2048", 256, 2048, OutType::F32),
    ("qwen3.5 q+gate 8192x2048", 8192, 2048, OutType::Bf16),
    ("qwen3.5 o_proj 2048x4096", 2048, 4096, OutType::Bf16),
    ("lm-head slice 31040x2048", 31040, 2048, OutType::Bf16),
    ("gemma4 router 128x2816", 128, 2816, OutType::F32),
    ("gemma4 q_proj 4096x2816", 4096, 2816, OutType::Bf16),
    ("gemma4 dense up 2112x2816", 2112, 2816, OutType::Bf16),
];

pub fn run(o: &Options) -> Result<(), String> {
    let ctx = crate::open_context(o)?;
    let seed = o.seed.unwrap_or_else(Rng::fresh_seed);
    let stream = stream_for(&ctx)?;
    let backend =
        if ctx.is_cpu() { "CPU backend vs f64 formulas".to_string() } else { "GPU vs CPU reference".to_string() };
    println!("sparkinfer check ({backend}), seed {seed}");
    println!("{:<8} {:<36} {:<22} {:>10} {:>10}  result", "op", "shape", "variant", "rel err", "tolerance");
    let mut failed = 0;
    let mut case_seed = seed;
    let mut next_seed = || {
        case_seed = case_seed.wrapping_add(0x9E37_79B9);
        case_seed
    };

    for &(label, rows, dim, style) in RMSNORM_SHAPES {
        for residual in [false, true] {
            let case = RmsNormCase { rows, dim, style, residual, pad: 0, in_place: false };
            let r = checks::check_rmsnorm(&ctx, stream.stream(), &case, next_seed()).map_err(|e| e.to_string())?;
            let worst = r.residual.map_or(r.out.rel_l2, |res| res.rel_l2.max(r.out.rel_l2));
            let ok = r.passes(BF16_TOL);
            failed += usize::from(!ok);
            let variant = format!("{:?}{}", style, if residual { "+residual" } else { "" });
            println!(
                "{:<8} {:<36} {:<22} {:>10.2e} {:>10.0e}  {}",
                "rmsnorm",
                format!("{label} [{rows}x{dim}]"),
                variant,
                worst,
                BF16_TOL,
                verdict(ok, r.out.non_finite, r.stray_writes)
            );
        }
    }
    let ms: &[usize] = if ctx.is_cpu() { &[1, 3] } else { &[1, 2, 7, 16] };
    for &(label, n, k, out_type) in GEMV_SHAPES {
        for &m in ms {
            let case = GemvCase { m, n, k, out_type, pad: 0 };
            let r = checks::check_gemv(&ctx, stream.stream(), &case, next_seed()).map_err(|e| e.to_string())?;
            let tol = if out_type == OutType::F32 { F32_TOL } else { BF16_TOL };
            let ok = r.passes(tol);
            failed += usize::from(!ok);
            println!(
                "{:<8} {:<36} {:<22} {:>10.2e} {:>10.0e}  {}",
                "gemv",
                label,
                format!("M={m} {:?} out", out_type),
                r.out.rel_l2,
                tol,
                verdict(ok, r.out.non_finite, r.stray_writes)
            );
        }
    }
    if failed == 0 {
        println!("all checks passed");
        Ok(())
    } else {
        Err(format!("{failed} check(s) failed (seed {seed})"))
    }
}

fn verdict(ok: bool, non_finite: usize, stray: usize) -> String {
    if ok {
        "ok".into()
    } else {
        format!("FAIL ({non_finite} non-finite, {stray} stray writes)")
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
