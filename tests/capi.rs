//! Every error path of the C API, exercised on the CPU backend (and on the driver's absence where this
//! machine has none), plus the CPU backend's ops through the C functions.

use sparkinfer::capi::sparkinfer_status::*;
use sparkinfer::capi::*;
use sparkinfer::reference::{self, bf16};
use sparkinfer::testing::Rng;
use std::ffi::{c_void, CStr};
use std::ptr::{null, null_mut};

fn last_error() -> String {
    unsafe { CStr::from_ptr(sparkinfer_last_error()) }.to_string_lossy().into_owned()
}

/// Asserts the status and that the last error mentions `needle`.
fn expect(status: sparkinfer_status, want: sparkinfer_status, needle: &str) {
    assert_eq!(status, want, "message: {}", last_error());
    let msg = last_error();
    assert!(msg.contains(needle), "expected {needle:?} in the message, got {msg:?}");
}

struct Cpu(*mut sparkinfer_context);

impl Cpu {
    fn new() -> Self {
        let mut ctx = null_mut();
        assert_eq!(sparkinfer_context_create(SPARKINFER_DEVICE_CPU, &mut ctx), SPARKINFER_STATUS_SUCCESS);
        assert!(!ctx.is_null());
        Cpu(ctx)
    }
}

impl Drop for Cpu {
    fn drop(&mut self) {
        sparkinfer_context_destroy(self.0);
    }
}

/// A 64-byte aligned host buffer of bf16 values.
struct Host {
    data: Vec<u128>,
}

impl Host {
    fn bf16(values: &[bf16]) -> Self {
        let mut data = vec![0u128; values.len().div_ceil(8) + 1];
        unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), data.as_mut_ptr() as *mut bf16, values.len()) };
        Host { data }
    }
    fn zeros(bytes: usize) -> Self {
        Host { data: vec![0u128; bytes.div_ceil(16) + 1] }
    }
    fn ptr(&mut self) -> *mut c_void {
        self.data.as_mut_ptr() as *mut c_void
    }
    fn read_bf16(&self, n: usize) -> Vec<bf16> {
        unsafe { std::slice::from_raw_parts(self.data.as_ptr() as *const bf16, n) }.to_vec()
    }
    fn read_f32(&self, n: usize) -> Vec<f32> {
        unsafe { std::slice::from_raw_parts(self.data.as_ptr() as *const f32, n) }.to_vec()
    }
}

fn rmsnorm_params(x: &mut Host, w: &mut Host, out: &mut Host, rows: i64, dim: i64) -> sparkinfer_rmsnorm_params {
    sparkinfer_rmsnorm_params {
        x: x.ptr(),
        x_row_stride: 0,
        residual: null_mut(),
        residual_row_stride: 0,
        weight: w.ptr(),
        out: out.ptr(),
        out_row_stride: 0,
        rows,
        dim,
        eps: 1e-6,
        weight_style: SPARKINFER_WEIGHT_STYLE_PLAIN,
    }
}

#[test]
fn status_strings_and_version() {
    let name = |s: i32| unsafe { CStr::from_ptr(sparkinfer_status_string(s)) }.to_str().unwrap().to_string();
    assert_eq!(name(0), "SUCCESS");
    assert_eq!(name(1), "INVALID_ARGUMENT");
    assert_eq!(name(4), "COMPILER_UNAVAILABLE");
    assert_eq!(name(8), "INTERNAL");
    assert_eq!(name(9), "UNKNOWN_STATUS");
    assert_eq!(name(-1), "UNKNOWN_STATUS");
    let v = unsafe { CStr::from_ptr(sparkinfer_version()) }.to_str().unwrap();
    assert_eq!(v, env!("CARGO_PKG_VERSION"));
    assert_eq!(sparkinfer_abi_version(), SPARKINFER_ABI_VERSION);
}

#[test]
fn context_arguments() {
    expect(sparkinfer_context_create(SPARKINFER_DEVICE_CPU, null_mut()), SPARKINFER_STATUS_INVALID_ARGUMENT, "out");
    let mut ctx = null_mut();
    expect(sparkinfer_context_create(-7, &mut ctx), SPARKINFER_STATUS_INVALID_ARGUMENT, "device");
    assert!(ctx.is_null());
    sparkinfer_context_destroy(null_mut());
    sparkinfer_graph_destroy(null_mut());

    let cpu = Cpu::new();
    let mut info: sparkinfer_device_info = unsafe { std::mem::zeroed() };
    assert_eq!(sparkinfer_context_device_info(cpu.0, &mut info), SPARKINFER_STATUS_SUCCESS);
    assert_eq!(info.backend, sparkinfer_backend::SPARKINFER_BACKEND_CPU);
    assert_eq!(info.ordinal, -1);
    let name = unsafe { CStr::from_ptr(info.name.as_ptr()) }.to_str().unwrap();
    assert!(name.contains("CPU"));
    expect(sparkinfer_context_device_info(null(), &mut info), SPARKINFER_STATUS_INVALID_ARGUMENT, "ctx");
    expect(sparkinfer_context_device_info(cpu.0, null_mut()), SPARKINFER_STATUS_INVALID_ARGUMENT, "info");
}

#[test]
fn missing_driver_is_cuda_unavailable() {
    if unsafe { cudarc::driver::sys::is_culib_present() } {
        eprintln!("a CUDA driver is installed here: the no-driver path is not reachable");
        return;
    }
    let mut ctx = null_mut();
    expect(sparkinfer_context_create(0, &mut ctx), SPARKINFER_STATUS_CUDA_UNAVAILABLE, "driver");
    assert!(ctx.is_null());
    let mut n = 0;
    expect(sparkinfer_device_count(&mut n), SPARKINFER_STATUS_CUDA_UNAVAILABLE, "driver");
}

#[test]
fn memory_and_stream_utilities_on_cpu() {
    let cpu = Cpu::new();
    let mut p = null_mut();
    expect(sparkinfer_malloc(cpu.0, 0, &mut p), SPARKINFER_STATUS_INVALID_ARGUMENT, "bytes");
    expect(sparkinfer_malloc(cpu.0, 64, null_mut()), SPARKINFER_STATUS_INVALID_ARGUMENT, "out");
    expect(sparkinfer_malloc(null(), 64, &mut p), SPARKINFER_STATUS_INVALID_ARGUMENT, "ctx");
    assert_eq!(sparkinfer_malloc(cpu.0, 64, &mut p), SPARKINFER_STATUS_SUCCESS);
    assert_eq!(p as usize % 64, 0);
    let src = [7u8; 64];
    assert_eq!(sparkinfer_memcpy(cpu.0, p, src.as_ptr() as *const c_void, 64), SPARKINFER_STATUS_SUCCESS);
    let mut back = [0u8; 64];
    assert_eq!(sparkinfer_memcpy(cpu.0, back.as_mut_ptr() as *mut c_void, p, 64), SPARKINFER_STATUS_SUCCESS);
    assert_eq!(back, src);
    expect(sparkinfer_memcpy(cpu.0, null_mut(), p, 64), SPARKINFER_STATUS_INVALID_ARGUMENT, "dst");
    expect(sparkinfer_memcpy(cpu.0, p, null(), 64), SPARKINFER_STATUS_INVALID_ARGUMENT, "src");
    assert_eq!(sparkinfer_free(cpu.0, p), SPARKINFER_STATUS_SUCCESS);
    assert_eq!(sparkinfer_free(cpu.0, null_mut()), SPARKINFER_STATUS_SUCCESS);

    let mut s: sparkinfer_stream = 1usize as sparkinfer_stream;
    assert_eq!(sparkinfer_stream_create(cpu.0, &mut s), SPARKINFER_STATUS_SUCCESS);
    assert!(s.is_null(), "the CPU backend's stream is NULL");
    assert_eq!(sparkinfer_stream_synchronize(cpu.0, null_mut()), SPARKINFER_STATUS_SUCCESS);
    expect(
        sparkinfer_stream_synchronize(cpu.0, 8usize as sparkinfer_stream),
        SPARKINFER_STATUS_INVALID_ARGUMENT,
        "stream",
    );
}

#[test]
fn graphs_need_a_cuda_context() {
    let cpu = Cpu::new();
    expect(sparkinfer_graph_begin_capture(cpu.0, null_mut()), SPARKINFER_STATUS_UNSUPPORTED, "CUDA context");
    let mut g = null_mut();
    expect(sparkinfer_graph_end_capture(cpu.0, null_mut(), &mut g), SPARKINFER_STATUS_UNSUPPORTED, "CUDA context");
    expect(sparkinfer_graph_end_capture(cpu.0, null_mut(), null_mut()), SPARKINFER_STATUS_INVALID_ARGUMENT, "out");
    expect(sparkinfer_graph_launch(cpu.0, null(), null_mut()), SPARKINFER_STATUS_INVALID_ARGUMENT, "graph");
    expect(sparkinfer_graph_begin_capture(null(), null_mut()), SPARKINFER_STATUS_INVALID_ARGUMENT, "ctx");
}

#[test]
fn rmsnorm_bad_arguments() {
    let cpu = Cpu::new();
    let (rows, dim) = (2i64, 64i64);
    let mut x = Host::zeros((rows * dim * 2) as usize);
    let mut w = Host::zeros((dim * 2) as usize);
    let mut out = Host::zeros((rows * dim * 2) as usize);
    let good = rmsnorm_params(&mut x, &mut w, &mut out, rows, dim);
    assert_eq!(sparkinfer_rmsnorm(cpu.0, &good, null_mut()), SPARKINFER_STATUS_SUCCESS, "{}", last_error());

    let run = |p: sparkinfer_rmsnorm_params| sparkinfer_rmsnorm(cpu.0, &p, null_mut());
    use SPARKINFER_STATUS_INVALID_ARGUMENT as INVALID;
    expect(sparkinfer_rmsnorm(null(), &good, null_mut()), INVALID, "ctx");
    expect(sparkinfer_rmsnorm(cpu.0, null(), null_mut()), INVALID, "params");
    expect(sparkinfer_rmsnorm(cpu.0, &good, 16usize as sparkinfer_stream), INVALID, "stream");
    expect(run(sparkinfer_rmsnorm_params { x: null(), ..good }), INVALID, "x: NULL");
    expect(run(sparkinfer_rmsnorm_params { weight: null(), ..good }), INVALID, "weight: NULL");
    expect(run(sparkinfer_rmsnorm_params { out: null_mut(), ..good }), INVALID, "out: NULL");
    expect(run(sparkinfer_rmsnorm_params { rows: 0, ..good }), INVALID, "rows");
    expect(run(sparkinfer_rmsnorm_params { rows: -3, ..good }), INVALID, "rows");
    expect(run(sparkinfer_rmsnorm_params { rows: 1 << 40, ..good }), INVALID, "rows");
    expect(run(sparkinfer_rmsnorm_params { dim: 0, ..good }), INVALID, "dim");
    expect(run(sparkinfer_rmsnorm_params { dim: 12, ..good }), INVALID, "dim: 12 is not a multiple of 8");
    expect(run(sparkinfer_rmsnorm_params { dim: 16392, ..good }), INVALID, "dim");
    expect(run(sparkinfer_rmsnorm_params { eps: f32::NAN, ..good }), INVALID, "eps");
    expect(run(sparkinfer_rmsnorm_params { eps: -1.0, ..good }), INVALID, "eps");
    expect(run(sparkinfer_rmsnorm_params { weight_style: 2, ..good }), INVALID, "weight_style");
    expect(
        run(sparkinfer_rmsnorm_params { x: (x.ptr() as usize + 2) as *const c_void, ..good }),
        INVALID,
        "x: address",
    );
    expect(
        run(sparkinfer_rmsnorm_params { out: (out.ptr() as usize + 8) as *mut c_void, ..good }),
        INVALID,
        "out: address",
    );
    expect(run(sparkinfer_rmsnorm_params { x_row_stride: 32, ..good }), INVALID, "x: row stride 32 is smaller");
    expect(run(sparkinfer_rmsnorm_params { x_row_stride: 68, ..good }), INVALID, "multiple of 8");
    expect(run(sparkinfer_rmsnorm_params { out_row_stride: -8, ..good }), INVALID, "negative");
    expect(run(sparkinfer_rmsnorm_params { x_row_stride: i64::MAX / 2, ..good }), INVALID, "x:");
    // Partial overlap of the output with its input.
    expect(
        run(sparkinfer_rmsnorm_params { out: (x.ptr() as usize + 16) as *mut c_void, ..good }),
        INVALID,
        "out: overlaps x",
    );
    expect(run(sparkinfer_rmsnorm_params { residual: x.ptr(), ..good }), INVALID, "residual: overlaps");
}

#[test]
fn gemv_bad_arguments() {
    let cpu = Cpu::new();
    let (m, n, k) = (2i64, 16i64, 32i64);
    let mut x = Host::zeros((m * k * 2) as usize);
    let mut w = Host::zeros((n * k * 2) as usize);
    let mut y = Host::zeros((m * n * 4) as usize);
    let good = sparkinfer_gemv_params {
        x: x.ptr(),
        x_row_stride: 0,
        w: w.ptr(),
        w_row_stride: 0,
        y: y.ptr(),
        y_row_stride: 0,
        m,
        n,
        k,
        y_dtype: SPARKINFER_DTYPE_F32,
        flags: 0,
    };
    assert_eq!(sparkinfer_gemv(cpu.0, &good, null_mut()), SPARKINFER_STATUS_SUCCESS, "{}", last_error());
    let run = |p: sparkinfer_gemv_params| sparkinfer_gemv(cpu.0, &p, null_mut());
    use SPARKINFER_STATUS_INVALID_ARGUMENT as INVALID;
    expect(sparkinfer_gemv(null(), &good, null_mut()), INVALID, "ctx");
    expect(sparkinfer_gemv(cpu.0, null(), null_mut()), INVALID, "params");
    expect(run(sparkinfer_gemv_params { x: null(), ..good }), INVALID, "x: NULL");
    expect(run(sparkinfer_gemv_params { w: null(), ..good }), INVALID, "w: NULL");
    expect(run(sparkinfer_gemv_params { y: null_mut(), ..good }), INVALID, "y: NULL");
    expect(run(sparkinfer_gemv_params { m: 0, ..good }), INVALID, "m:");
    expect(run(sparkinfer_gemv_params { m: 17, ..good }), SPARKINFER_STATUS_UNSUPPORTED, "m: 17");
    expect(run(sparkinfer_gemv_params { n: -8, ..good }), INVALID, "n:");
    expect(run(sparkinfer_gemv_params { n: 12, ..good }), INVALID, "n: 12 is not a multiple of 8");
    expect(run(sparkinfer_gemv_params { k: 36, ..good }), INVALID, "k: 36 is not a multiple of 8");
    expect(run(sparkinfer_gemv_params { k: 1 << 40, ..good }), INVALID, "k:");
    expect(run(sparkinfer_gemv_params { y_dtype: 5, ..good }), INVALID, "y_dtype");
    expect(run(sparkinfer_gemv_params { flags: 6, ..good }), INVALID, "flags");
    assert_eq!(
        run(sparkinfer_gemv_params { flags: SPARKINFER_GEMV_WEIGHTS_STATIC, ..good }),
        SPARKINFER_STATUS_SUCCESS
    );
    expect(run(sparkinfer_gemv_params { w: (w.ptr() as usize + 4) as *const c_void, ..good }), INVALID, "w: address");
    expect(run(sparkinfer_gemv_params { y: (y.ptr() as usize + 2) as *mut c_void, ..good }), INVALID, "y: address");
    expect(run(sparkinfer_gemv_params { w_row_stride: 36, ..good }), INVALID, "w: row stride");
    expect(run(sparkinfer_gemv_params { y_row_stride: 8, ..good }), INVALID, "y: row stride 8 is smaller");
    expect(run(sparkinfer_gemv_params { n: 1 << 30, w_row_stride: 1 << 33, ..good }), INVALID, "w:");
    expect(run(sparkinfer_gemv_params { y: x.ptr(), ..good }), INVALID, "y: overlaps");
}

#[test]
fn cpu_backend_ops_through_the_c_functions() {
    let cpu = Cpu::new();
    let mut rng = Rng::new(5);
    let (rows, dim) = (3usize, 2048usize);
    let xv = rng.bf16_normal(rows * dim, 1.0);
    let rv = rng.bf16_normal(rows * dim, 1.0);
    let wv = rng.bf16_normal(dim, 0.3);
    let (mut x, mut r, mut w, mut out) =
        (Host::bf16(&xv), Host::bf16(&rv), Host::bf16(&wv), Host::zeros(rows * dim * 2));
    let p = sparkinfer_rmsnorm_params {
        residual: r.ptr(),
        weight_style: SPARKINFER_WEIGHT_STYLE_OFFSET_ONE,
        ..rmsnorm_params(&mut x, &mut w, &mut out, rows as i64, dim as i64)
    };
    assert_eq!(sparkinfer_rmsnorm(cpu.0, &p, null_mut()), SPARKINFER_STATUS_SUCCESS, "{}", last_error());
    let mut want_res = rv.clone();
    let mut want = vec![bf16::ZERO; rows * dim];
    reference::rmsnorm::rmsnorm(
        &xv,
        Some(&mut want_res),
        &wv,
        &mut want,
        dim,
        1e-6,
        reference::rmsnorm::WeightStyle::OffsetOne,
    );
    assert_eq!(out.read_bf16(rows * dim), want);
    assert_eq!(r.read_bf16(rows * dim), want_res);

    // In place: out = x.
    let p_in_place = sparkinfer_rmsnorm_params { out: x.ptr(), residual: null_mut(), ..p };
    assert_eq!(sparkinfer_rmsnorm(cpu.0, &p_in_place, null_mut()), SPARKINFER_STATUS_SUCCESS, "{}", last_error());
    let mut want_in_place = vec![bf16::ZERO; rows * dim];
    reference::rmsnorm::rmsnorm(
        &xv,
        None,
        &wv,
        &mut want_in_place,
        dim,
        1e-6,
        reference::rmsnorm::WeightStyle::OffsetOne,
    );
    assert_eq!(x.read_bf16(rows * dim), want_in_place);

    let (m, n, k) = (2usize, 64usize, 2048usize);
    let xg = rng.bf16_normal(m * k, 1.0);
    let wg = rng.bf16_normal(n * k, 1.0);
    let (mut xb, mut wb, mut yb) = (Host::bf16(&xg), Host::bf16(&wg), Host::zeros(m * n * 4));
    let gp = sparkinfer_gemv_params {
        x: xb.ptr(),
        x_row_stride: 0,
        w: wb.ptr(),
        w_row_stride: 0,
        y: yb.ptr(),
        y_row_stride: 0,
        m: m as i64,
        n: n as i64,
        k: k as i64,
        y_dtype: SPARKINFER_DTYPE_F32,
        flags: 0,
    };
    assert_eq!(sparkinfer_gemv(cpu.0, &gp, null_mut()), SPARKINFER_STATUS_SUCCESS, "{}", last_error());
    assert_eq!(yb.read_f32(m * n), reference::gemv::gemv(&xg, &wg, m, n, k));
}

#[test]
fn missing_nvrtc_is_compiler_unavailable() {
    // A separate process, so that the library search starts from the variable set here.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sparkinfer"))
        .args(["compile", "--arch", "sm_90"])
        .env("SPARKINFER_NVRTC_LIBRARY", "/nonexistent/libnvrtc.so.13")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("could not be loaded") && text.contains("pip install nvidia-cuda-nvrtc"), "{text}");
}
