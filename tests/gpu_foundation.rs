//! RMSNorm and GEMV on the GPU against the CPU reference, the C surface on a CUDA context, and graph
//! capture. Needs a CUDA GPU: run with `cargo test --release -- --include-ignored` on a GPU machine.

use sparkinfer::capi::sparkinfer_status::*;
use sparkinfer::capi::*;
use sparkinfer::checks::foundation::{check_gemv, check_rmsnorm, GemvCase, RmsNormCase};
use sparkinfer::ops::gemv::OutType;
use sparkinfer::ops::{Context, Stream};
use sparkinfer::reference::{self, bf16, rmsnorm::WeightStyle};
use sparkinfer::testing::{Comparison, Rng, BF16_TOL, F32_TOL};
use std::ffi::{c_void, CStr};
use std::ptr::null_mut;

fn gpu() -> Context {
    Context::new(0).expect("these tests need CUDA device 0")
}

fn seed() -> u64 {
    let s = Rng::fresh_seed();
    eprintln!("seed {s}");
    s
}

/// Under compute-sanitizer (SPARKINFER_TEST_SMALL set) the shape lists shrink to their odd and boundary
/// members, which keep every code path but run in minutes instead of hours.
fn small() -> bool {
    std::env::var_os("SPARKINFER_TEST_SMALL").is_some()
}

fn last_error() -> String {
    unsafe { CStr::from_ptr(sparkinfer_last_error()) }.to_string_lossy().into_owned()
}

/// A stream of the context, destroyed at the end of the test.
struct OwnStream<'a>(&'a Context, Stream);

impl<'a> OwnStream<'a> {
    fn new(ctx: &'a Context) -> Self {
        let raw = ctx.device("test").unwrap().stream_create().unwrap();
        OwnStream(ctx, unsafe { Stream::from_raw(raw) })
    }
}

impl Drop for OwnStream<'_> {
    fn drop(&mut self) {
        let _ = unsafe { self.0.device("test").unwrap().stream_destroy(self.1.raw()) };
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn rmsnorm_matches_reference_on_odd_and_boundary_shapes() {
    let ctx = gpu();
    let stream = OwnStream::new(&ctx);
    let mut s = seed();
    let (dims, rows): (&[usize], &[usize]) = if small() {
        (&[8, 264, 2056, 16384], &[1, 3, 257])
    } else {
        (&[8, 24, 256, 264, 2048, 2056, 2816, 4096, 8200, 16384], &[1, 3, 64, 257])
    };
    let mut failures = Vec::new();
    for &dim in dims {
        for &r in rows {
            for (style, residual, pad, in_place) in [
                (WeightStyle::Plain, false, 0, false),
                (WeightStyle::OffsetOne, true, 8, false),
                (WeightStyle::Plain, true, 0, true),
            ] {
                s = s.wrapping_add(1);
                let case = RmsNormCase { rows: r, dim, style, residual, pad, in_place };
                let res = check_rmsnorm(&ctx, stream.1, &case, s).unwrap();
                if !res.passes(BF16_TOL) {
                    failures.push(format!("{case:?} seed {s}: {res:?}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} failing cases:\n{}", failures.len(), failures.join("\n"));
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gemv_matches_reference_on_odd_and_boundary_shapes() {
    let ctx = gpu();
    let stream = OwnStream::new(&ctx);
    let mut s = seed();
    let mut failures = Vec::new();
    for &(n, k) in
        &[(8, 8), (24, 40), (256, 2048), (1000, 2056), (8192, 2048), (2048, 4096), (31040, 2048), (72, 16384)]
    {
        for m in [1, 2, 3, 5, 8, 13, 16] {
            for (out_type, pad, weights_static) in
                [(OutType::Bf16, 0, false), (OutType::F32, 8, false), (OutType::Bf16, 8, true)]
            {
                s = s.wrapping_add(1);
                let case = GemvCase { m, n, k, out_type, weights_static, pad };
                let res = check_gemv(&ctx, stream.1, &case, s).unwrap();
                let tol = if out_type == OutType::F32 { F32_TOL } else { BF16_TOL };
                if !res.passes(tol) {
                    failures.push(format!("{case:?} seed {s}: {res:?}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} failing cases:\n{}", failures.len(), failures.join("\n"));
}

/// Device memory through the C API, freed on drop.
struct DevBuf {
    ctx: *mut sparkinfer_context,
    ptr: *mut c_void,
}

impl DevBuf {
    fn new(ctx: *mut sparkinfer_context, bytes: usize) -> Self {
        let mut ptr = null_mut();
        assert_eq!(sparkinfer_malloc(ctx, bytes, &mut ptr), SPARKINFER_STATUS_SUCCESS, "{}", last_error());
        DevBuf { ctx, ptr }
    }
    fn upload<T: Copy>(&self, data: &[T]) {
        let st = sparkinfer_memcpy(self.ctx, self.ptr, data.as_ptr() as *const c_void, std::mem::size_of_val(data));
        assert_eq!(st, SPARKINFER_STATUS_SUCCESS, "{}", last_error());
    }
    fn download<T: Copy + Default>(&self, n: usize) -> Vec<T> {
        let mut v = vec![T::default(); n];
        let st =
            sparkinfer_memcpy(self.ctx, v.as_mut_ptr() as *mut c_void, self.ptr, std::mem::size_of_val(v.as_slice()));
        assert_eq!(st, SPARKINFER_STATUS_SUCCESS, "{}", last_error());
        v
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        sparkinfer_free(self.ctx, self.ptr);
    }
}

struct CContext(*mut sparkinfer_context);

impl Drop for CContext {
    fn drop(&mut self) {
        sparkinfer_context_destroy(self.0);
    }
}

fn c_gpu() -> CContext {
    let mut ctx = null_mut();
    assert_eq!(sparkinfer_context_create(0, &mut ctx), SPARKINFER_STATUS_SUCCESS, "{}", last_error());
    CContext(ctx)
}

/// RMSNorm (fused residual) followed by GEMV, captured once in global mode and replayed on new inputs.
#[test]
#[ignore = "needs a CUDA GPU"]
fn rmsnorm_then_gemv_captured_in_a_graph_replays_on_new_inputs() {
    let ctx = c_gpu();
    let c = ctx.0;
    let (rows, dim, n) = (4usize, 2048usize, 8192usize);
    let mut rng = Rng::new(seed());
    let x = DevBuf::new(c, rows * dim * 2);
    let residual = DevBuf::new(c, rows * dim * 2);
    let weight = DevBuf::new(c, dim * 2);
    let normed = DevBuf::new(c, rows * dim * 2);
    let w = DevBuf::new(c, n * dim * 2);
    let y = DevBuf::new(c, rows * n * 4);
    let norm_w = rng.bf16_normal(dim, 0.3);
    let proj = rng.bf16_normal(n * dim, 1.0 / (dim as f32).sqrt());
    weight.upload(&norm_w);
    w.upload(&proj);

    let mut stream: sparkinfer_stream = null_mut();
    assert_eq!(sparkinfer_stream_create(c, &mut stream), SPARKINFER_STATUS_SUCCESS);
    let norm = sparkinfer_rmsnorm_params {
        x: x.ptr,
        x_row_stride: 0,
        residual: residual.ptr,
        residual_row_stride: 0,
        weight: weight.ptr,
        out: normed.ptr,
        out_row_stride: 0,
        rows: rows as i64,
        dim: dim as i64,
        eps: 1e-6,
        weight_style: SPARKINFER_WEIGHT_STYLE_OFFSET_ONE,
    };
    let gemv = sparkinfer_gemv_params {
        x: normed.ptr,
        x_row_stride: 0,
        w: w.ptr,
        w_row_stride: 0,
        y: y.ptr,
        y_row_stride: 0,
        m: rows as i64,
        n: n as i64,
        k: dim as i64,
        y_dtype: SPARKINFER_DTYPE_F32,
        flags: SPARKINFER_GEMV_WEIGHTS_STATIC,
    };

    // The first use of both kernels happens inside the capture: compiling and loading must not break it.
    assert_eq!(sparkinfer_graph_begin_capture(c, stream), SPARKINFER_STATUS_SUCCESS, "{}", last_error());
    assert_eq!(sparkinfer_rmsnorm(c, &norm, stream), SPARKINFER_STATUS_SUCCESS, "{}", last_error());
    assert_eq!(sparkinfer_gemv(c, &gemv, stream), SPARKINFER_STATUS_SUCCESS, "{}", last_error());
    let mut graph = null_mut();
    assert_eq!(sparkinfer_graph_end_capture(c, stream, &mut graph), SPARKINFER_STATUS_SUCCESS, "{}", last_error());

    for replay in 0..4 {
        let xv = rng.bf16_normal(rows * dim, 1.0);
        let rv = rng.bf16_normal(rows * dim, 1.0);
        x.upload(&xv);
        residual.upload(&rv);
        // Poison the outputs so that a replay that wrote nothing cannot pass on the last replay's values.
        normed.upload(&vec![0xffffu16; rows * dim]);
        y.upload(&vec![u32::MAX; rows * n]);
        assert_eq!(sparkinfer_graph_launch(c, graph, stream), SPARKINFER_STATUS_SUCCESS, "{}", last_error());
        assert_eq!(sparkinfer_stream_synchronize(c, stream), SPARKINFER_STATUS_SUCCESS, "{}", last_error());

        let mut want_res = rv.clone();
        let mut want_norm = vec![bf16::ZERO; rows * dim];
        reference::rmsnorm::rmsnorm(
            &xv,
            Some(&mut want_res),
            &norm_w,
            &mut want_norm,
            dim,
            1e-6,
            WeightStyle::OffsetOne,
        );
        let got_res: Vec<bf16> = residual.download(rows * dim);
        assert_eq!(got_res, want_res, "replay {replay}: residual");
        let got_norm: Vec<bf16> = normed.download(rows * dim);
        // Each op is held to the reference on the inputs it actually saw: a one-ulp difference in the
        // normalised bf16 row is within RMSNorm's tolerance but would move the fp32 GEMV output by more
        // than the GEMV's own.
        let want_y = reference::gemv::gemv(&got_norm, &proj, rows, n, dim);
        let cmp = Comparison::new(&reference::to_f32(&got_norm), &reference::to_f32(&want_norm));
        assert!(cmp.passes(BF16_TOL), "replay {replay}: rmsnorm {cmp:?}");
        let got_y: Vec<f32> = y.download(rows * n);
        let cmp = Comparison::new(&got_y, &want_y);
        assert!(cmp.passes(F32_TOL), "replay {replay}: gemv {cmp:?}");
    }
    sparkinfer_graph_destroy(graph);
    assert_eq!(sparkinfer_stream_destroy(c, stream), SPARKINFER_STATUS_SUCCESS);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_context_rejects_bad_pointers_and_null_capture_stream() {
    let ctx = c_gpu();
    let c = ctx.0;
    let mut info: sparkinfer_device_info = unsafe { std::mem::zeroed() };
    assert_eq!(sparkinfer_context_device_info(c, &mut info), SPARKINFER_STATUS_SUCCESS);
    assert_eq!(info.backend, sparkinfer_backend::SPARKINFER_BACKEND_CUDA);
    assert!(info.sm_count > 0 && info.total_memory_bytes > 0 && info.compute_capability_major >= 8);

    let dim = 256usize;
    let x = DevBuf::new(c, dim * 2);
    let w = DevBuf::new(c, dim * 2);
    let out = DevBuf::new(c, dim * 2);
    let host = vec![0u128; dim];
    let good = sparkinfer_rmsnorm_params {
        x: x.ptr,
        x_row_stride: 0,
        residual: null_mut(),
        residual_row_stride: 0,
        weight: w.ptr,
        out: out.ptr,
        out_row_stride: 0,
        rows: 1,
        dim: dim as i64,
        eps: 1e-6,
        weight_style: SPARKINFER_WEIGHT_STYLE_PLAIN,
    };
    assert_eq!(sparkinfer_rmsnorm(c, &good, null_mut()), SPARKINFER_STATUS_SUCCESS, "{}", last_error());
    let host_x = sparkinfer_rmsnorm_params { x: host.as_ptr() as *const c_void, ..good };
    assert_eq!(sparkinfer_rmsnorm(c, &host_x, null_mut()), SPARKINFER_STATUS_INVALID_ARGUMENT);
    assert!(last_error().contains("x:") && last_error().contains("not device memory"), "{}", last_error());
    // Two rows of a one-row allocation: the extent runs past the end.
    let too_long = sparkinfer_rmsnorm_params { rows: 2, ..good };
    assert_eq!(sparkinfer_rmsnorm(c, &too_long, null_mut()), SPARKINFER_STATUS_INVALID_ARGUMENT);
    assert!(last_error().contains("past the end"), "{}", last_error());

    assert_eq!(sparkinfer_graph_begin_capture(c, null_mut()), SPARKINFER_STATUS_INVALID_ARGUMENT);
    assert!(last_error().contains("stream"), "{}", last_error());
    let mut g = null_mut();
    assert_eq!(sparkinfer_graph_end_capture(c, null_mut(), &mut g), SPARKINFER_STATUS_INVALID_ARGUMENT);
    assert!(g.is_null());
    assert_eq!(sparkinfer_context_create(1 << 20, &mut null_mut()), SPARKINFER_STATUS_INVALID_ARGUMENT);
}
