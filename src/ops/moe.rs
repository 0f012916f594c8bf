//! Mixture-of-Experts: router GEMM, top-k routing with GPU-resident expert counts, routed expert FFN plus
//! dense/shared FFN, and the whole block on one stream with a caller workspace.
//!
//! Nothing here reads device memory on the host: expert counts and offsets stay on the GPU, grids are
//! sized from host bounds (tokens × top-k) and blocks without work exit early.

use super::{check_dim, check_ptr, Backend, Context, Matrix, Stream};
use crate::error::{Error, Result};
use crate::kernel_name;
use crate::reference::moe::{self as refmoe, Activation, FfnWeights, RouterTransform, Scoring, TopkConfig};
use crate::runtime::name::KernelName;
use crate::runtime::sources::KernelSource;
use crate::runtime::Device;

pub static ROUTER_SOURCE: KernelSource = KernelSource {
    name: "moe_router",
    path: "moe/router.cu",
    code: include_str!("../../csrc/cuda/moe/router.cu"),
    instantiations: router_instantiations,
};

pub static FFN_SOURCE: KernelSource = KernelSource {
    name: "moe_expert_ffn",
    path: "moe/expert_ffn.cu",
    code: include_str!("../../csrc/cuda/moe/expert_ffn.cu"),
    instantiations: ffn_instantiations,
};

pub fn kernel_sources() -> Vec<&'static KernelSource> {
    vec![&ROUTER_SOURCE, &FFN_SOURCE]
}

/// Most experts the top-k kernel holds per token (16 per lane of a warp).
pub const MAX_EXPERTS: i64 = 512;
/// Most experts per token.
pub const MAX_TOP_K: i64 = 16;
/// Most tokens per call.
pub const MAX_TOKENS: i64 = 65536;
/// Largest hidden or intermediate size.
pub const MAX_FFN_DIM: i64 = 65536;

/// Token tiles of the gate/up kernel: 16 tokens of gate and up accumulators spill, so larger groups take
/// several passes over L1-resident rows.
const GATE_UP_TILES: [usize; 4] = [1, 2, 4, 8];
/// Warps per block, as ROUTER_WARPS / TOPK_WARPS / FFN_WARPS in the kernels.
const ROUTER_WARPS: usize = 4;
const ROUTER_MMA_WARPS: usize = 8;
const TOPK_WARPS: usize = 16;
const FFN_WARPS: usize = 4;
/// Intermediate rows per warp of a routed gate/up block with one token per tile (GATE_UP_ROUTED_ROWS_T1).
const GATE_UP_ROUTED_ROWS_T1: usize = 2;
/// Output rows per block and warps per output row of the down kernel (DOWN_ROWS, DOWN_SPLIT).
const DOWN_ROWS: usize = 4;
const DOWN_SPLIT: usize = 2;
/// Vectors of 8 elements per chunk of the single-token down path (DOWN_CHUNK).
const DOWN_CHUNK: usize = 32;

fn token_tile(tokens: usize) -> usize {
    tokens.min(16).next_power_of_two()
}

/// The router kernels: one token on CUDA cores (a GEMV bound by reading the weights once); more on tensor
/// cores with `Mma(mt)` tiles of 16 tokens per block, one up to 64 tokens, then four, so that each load of
/// the router weights serves 64 tokens.
#[derive(Clone, Copy)]
enum RouterKernel {
    Gemv,
    Mma(usize),
}

const ROUTER_KERNELS: [RouterKernel; 3] = [RouterKernel::Gemv, RouterKernel::Mma(1), RouterKernel::Mma(4)];

fn router_kernel(tokens: usize) -> RouterKernel {
    match tokens {
        1 => RouterKernel::Gemv,
        2..=64 => RouterKernel::Mma(1),
        _ => RouterKernel::Mma(4),
    }
}

fn router_name(k: RouterKernel, transform: bool) -> KernelName {
    match k {
        RouterKernel::Gemv => kernel_name!("router_gemv_kernel<{transform}>"),
        RouterKernel::Mma(mt) => kernel_name!("router_mma_kernel<{mt}, {transform}>"),
    }
}

/// The top-k kernel for `experts` (1 to MAX_EXPERTS): the smallest power of two of experts per lane that
/// holds them, as select_top_k picks in common/routing.cuh (one selection compiled per instantiation).
fn topk_name(experts: usize) -> KernelName {
    topk_name_for(experts.div_ceil(32).next_power_of_two())
}

fn topk_name_for(per_lane: usize) -> KernelName {
    kernel_name!("topk_router_kernel<{per_lane}>")
}

fn router_instantiations() -> Vec<String> {
    let mut v: Vec<String> = ROUTER_KERNELS
        .iter()
        .flat_map(|&k| [router_name(k, false), router_name(k, true)])
        .map(|n| n.to_string())
        .collect();
    v.extend([1, 2, 4, 8, 16].iter().map(|n| topk_name_for(*n).to_string()));
    v.push("expert_index_kernel".into());
    v
}

fn act_code(a: Activation) -> i32 {
    match a {
        Activation::Silu => 0,
        Activation::GeluTanh => 1,
    }
}

fn gate_up_name(act: Activation, mt: usize) -> KernelName {
    kernel_name!("expert_gate_up_kernel<{}, {mt}>", act_code(act))
}

fn grouped_gate_up_name(act: Activation, bm: usize) -> KernelName {
    kernel_name!("grouped_gate_up_kernel<{}, {bm}>", act_code(act))
}

fn grouped_down_name(bm: usize) -> KernelName {
    kernel_name!("grouped_down_kernel<{bm}>")
}

/// Dynamic shared memory of a grouped kernel with `bm` tile rows, as GroupedShared: GG_STAGES stages of bm
/// A rows and 2·GG_BN B rows of GG_BK + 8 bf16, three row-pointer arrays, two ints.
fn grouped_shared_bytes(bm: usize) -> usize {
    let stages = GG_STAGES * (bm + 2 * GG_BN) * (GG_BK + 8) * 2;
    let pointers = (bm + 2 * GG_BN + bm) * 8;
    (stages + pointers + 8).next_multiple_of(8)
}

/// Tile rows of the grouped kernels for `tokens` tokens (GG_BM_CHOICES). With a mean of more than 48 and
/// at most 96 slots per expert, about half the experts (at a mean of 64) would spill out of a 64-row
/// tile into a second, nearly empty one, which streams the expert's weights through L2 and the SM again
/// and repeats the MMA work; 96 rows hold them in one tile for the same MMA work. Elsewhere 64 wastes
/// fewer rows. The dense FFN's tiles (every token) use the same size.
fn grouped_rows(c: &FfnChecked, tokens: usize) -> usize {
    c.routed.as_ref().map_or(64, |r| grouped_rows_for(tokens * r.top_k, r.experts))
}

/// grouped_rows for `slots` routed slots over `experts` experts.
fn grouped_rows_for(slots: usize, experts: usize) -> usize {
    if experts > 0 && (48 * experts + 1..=96 * experts).contains(&slots) {
        96
    } else {
        64
    }
}

/// From this many tokens on, the FFN runs as grouped GEMMs on tensor cores plus a combine; below, the
/// decode kernels take every token in one pass (lane m of a down warp accumulates token m).
const GROUPED_MIN_TOKENS: usize = 33;
/// Tiles of the grouped kernels: BM rows (one of GG_BM_CHOICES, see grouped_rows), GG_BN gate and GG_BN up
/// columns (gate/up) or GD_BN output columns (down), GG_THREADS threads (GG_BN / 2 and GG_BN in the
/// kernels).
const GG_BM_CHOICES: [usize; 2] = [64, 96];
const GG_BN: usize = 64;
const GD_BN: usize = 128;
const GG_STAGES: usize = 3;
const GG_BK: usize = 64;
const GG_THREADS: usize = 128;
/// Threads per block of the combine, 4 columns each (FFN_COMBINE_THREADS).
const COMBINE_THREADS: usize = 128;

fn ffn_instantiations() -> Vec<String> {
    let mut v: Vec<String> = [Activation::Silu, Activation::GeluTanh]
        .iter()
        .flat_map(|&a| GATE_UP_TILES.iter().map(move |&mt| gate_up_name(a, mt).to_string()))
        .collect();
    v.extend([0, 4, 5].map(|g| down_name(g).to_string()));
    for bm in GG_BM_CHOICES {
        v.extend([Activation::Silu, Activation::GeluTanh].map(|a| grouped_gate_up_name(a, bm).to_string()));
        v.push(grouped_down_name(bm).to_string());
    }
    v.push("ffn_combine_kernel".into());
    v
}

// ---------------------------------------------------------------------------------------------------------
// Host-memory helpers of the CPU backend.
// ---------------------------------------------------------------------------------------------------------

/// # Safety
/// `ptr` must be valid for reading `n` values of `T`.
unsafe fn host_read<T: Copy>(ptr: u64, n: usize) -> Vec<T> {
    std::slice::from_raw_parts(ptr as *const T, n).to_vec()
}

/// # Safety
/// `ptr` must be valid for writing `data.len()` values of `T`.
unsafe fn host_write<T: Copy>(ptr: u64, data: &[T]) {
    std::ptr::copy_nonoverlapping(data.as_ptr(), ptr as *mut T, data.len());
}

/// A contiguous 1-D extent of `elems` elements of `elem_bytes`, aligned to `align` bytes.
fn vector(name: &str, ptr: u64, elems: usize, elem_bytes: usize, align: u64) -> Result<Matrix> {
    check_ptr(name, ptr, align)?;
    Matrix::new(name, ptr, 1, elems, 0, elem_bytes, 1)
}

/// A buffer of an op with the argument name that error messages use.
type Named<'a> = (&'static str, &'a Matrix);

fn check_distinct<'a>(outputs: &[Named<'a>], inputs: impl IntoIterator<Item = Named<'a>> + Clone) -> Result<()> {
    for (i, (name, m)) in outputs.iter().enumerate() {
        for (other, o) in outputs[i + 1..].iter().copied().chain(inputs.clone()) {
            if m.overlaps(o) {
                return Err(Error::invalid(format!("{name}: overlaps {other}")));
            }
        }
    }
    Ok(())
}

fn check_all_on_device<'a>(device: &Device, ms: impl IntoIterator<Item = Named<'a>>) -> Result<()> {
    ms.into_iter().try_for_each(|(name, m)| m.check_on_device(device, name))
}

// ---------------------------------------------------------------------------------------------------------
// Router GEMM
// ---------------------------------------------------------------------------------------------------------

/// Arguments of [`router_gemm`]: addresses in the context's memory, strides in elements (0 = dense).
#[derive(Clone, Copy, Debug)]
pub struct RouterGemmArgs {
    /// bf16 [tokens, hidden].
    pub x: u64,
    pub x_row_stride: i64,
    /// bf16 [experts, hidden].
    pub weight: u64,
    /// bf16 [hidden] for Gemma 4's input transform, 0 for none.
    pub input_scale: u64,
    pub eps: f32,
    /// fp32 [tokens, experts].
    pub logits: u64,
    pub logits_row_stride: i64,
    pub tokens: i64,
    pub hidden: i64,
    pub experts: i64,
}

struct RouterChecked {
    x: Matrix,
    weight: Matrix,
    scale: Option<Matrix>,
    logits: Matrix,
    eps: f32,
}

fn check_hidden(name: &str, hidden: i64) -> Result<usize> {
    let h = check_dim(name, hidden, MAX_FFN_DIM)?;
    if h % 8 != 0 {
        return Err(Error::invalid(format!("{name}: {h} is not a multiple of 8")));
    }
    Ok(h)
}

fn check_experts(experts: i64) -> Result<usize> {
    check_dim("experts", experts, MAX_EXPERTS)
}

fn validate_router(a: &RouterGemmArgs) -> Result<RouterChecked> {
    let t = check_dim("tokens", a.tokens, MAX_TOKENS)?;
    let h = check_hidden("hidden", a.hidden)?;
    let e = check_experts(a.experts)?;
    check_ptr("x", a.x, 16)?;
    check_ptr("weight", a.weight, 16)?;
    check_ptr("logits", a.logits, 4)?;
    let x = Matrix::new("x", a.x, t, h, a.x_row_stride, 2, 8)?;
    let weight = Matrix::new("weight", a.weight, e, h, 0, 2, 8)?;
    let logits = Matrix::new("logits", a.logits, t, e, a.logits_row_stride, 4, 1)?;
    let scale = if a.input_scale == 0 {
        None
    } else {
        if !a.eps.is_finite() || a.eps < 0.0 {
            return Err(Error::invalid(format!("eps: {} must be finite and non-negative", a.eps)));
        }
        Some(vector("input_scale", a.input_scale, h, 2, 16)?)
    };
    let inputs = [("x", &x), ("weight", &weight)].into_iter().chain(scale.as_ref().map(|s| ("input_scale", s)));
    check_distinct(&[("logits", &logits)], inputs)?;
    Ok(RouterChecked { x, weight, scale, logits, eps: a.eps })
}

/// # Safety
/// As [`router_gemm`]; `c` validated.
/// `in_block`: the MoE block call, whose gate/up kernel starts its dense column without waiting (see
/// moe_forward).
unsafe fn launch_router(device: &Device, c: &RouterChecked, in_block: bool, stream: Stream) -> Result<()> {
    let tokens = c.x.rows;
    let which = router_kernel(tokens);
    let kernel = device.kernel(&ROUTER_SOURCE, &router_name(which, c.scale.is_some()))?;
    let mut x = c.x.ptr;
    let mut xs = c.x.row_stride as i64;
    let mut w = c.weight.ptr;
    let mut scale = c.scale.map_or(0, |s| s.ptr);
    let mut eps = c.eps;
    let mut logits = c.logits.ptr;
    let mut ls = c.logits.row_stride as i64;
    let mut t = tokens as i32;
    let mut e = c.weight.rows as i32;
    let mut h = c.x.cols as i32;
    let mut trigger_first = i32::from(!in_block);
    let experts = c.weight.rows;
    // The tensor-core router takes the same arguments but the last (it has no trigger choice).
    let mut all_args = crate::kernel_args![x, xs, w, scale, eps, logits, ls, t, e, h, trigger_first];
    let (grid, block, args) = match which {
        RouterKernel::Gemv => {
            ((experts.div_ceil(ROUTER_WARPS) as u32, tokens as u32, 1), ROUTER_WARPS * 32, &mut all_args[..])
        }
        RouterKernel::Mma(mt) => {
            let n = all_args.len() - 1;
            (
                (experts.div_ceil(16) as u32, tokens.div_ceil(16 * mt) as u32, 1),
                ROUTER_MMA_WARPS * 32,
                &mut all_args[..n],
            )
        }
    };
    // Programmatic dependent launch: the kernel brings its weight rows into L2, then waits for the kernel
    // before it. In the MoE block the dense column of the gate/up kernel reads x without waiting, so there
    // the single-token router lets the next launch in only after its wait, and the tensor-core router (whose
    // top-k kernel lets the gate/up launch in at once) runs in stream order: launched as a dependent with the
    // late trigger, it made the T = 8 blocks 3.5 µs (Qwen3.5) and 7.3 µs (Gemma 4) slower on the H100.
    if !in_block || matches!(which, RouterKernel::Gemv) {
        device.launch_dependent(&kernel, grid, (block as u32, 1, 1), 0, stream.raw(), args)
    } else {
        device.launch(&kernel, grid, (block as u32, 1, 1), 0, stream.raw(), args)
    }
}

fn cpu_router(c: &RouterChecked) {
    unsafe {
        let x = c.x.read_host_bf16();
        let w = c.weight.read_host_bf16();
        let scale = c.scale.map(|s| s.read_host_bf16());
        let transform = scale.as_deref().map(|s| RouterTransform { scale: s, eps: c.eps });
        let logits = refmoe::router_logits(&x, c.x.rows, c.x.cols, &w, c.weight.rows, transform);
        super::MatrixMut(c.logits).write_host(&logits);
    }
}

/// `logits = f(x) · Wrᵀ` in fp32, with `f` Gemma 4's transform when `input_scale` is set
/// (`RMSNorm-without-weight(x) · scale · hidden^-0.5`).
///
/// # Safety
/// Every address must point to memory of the context's kind holding the extent its shape describes.
pub unsafe fn router_gemm(ctx: &Context, a: &RouterGemmArgs, stream: Stream) -> Result<()> {
    ctx.check_stream(stream)?;
    let c = validate_router(a)?;
    match ctx.backend() {
        Backend::Cpu => {
            cpu_router(&c);
            Ok(())
        }
        Backend::Cuda(device) => {
            let scale = c.scale.as_ref().map(|s| ("input_scale", s));
            check_all_on_device(
                device,
                [("x", &c.x), ("weight", &c.weight), ("logits", &c.logits)].into_iter().chain(scale),
            )?;
            launch_router(device, &c, false, stream)
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Top-k router
// ---------------------------------------------------------------------------------------------------------

/// Arguments of [`topk_router`]. Outputs: `topk_ids` int32 [tokens, top_k], `topk_weights` fp32
/// [tokens, top_k], `expert_counts` int32 [experts], `expert_offsets` int32 [experts + 1], `sorted_slots`
/// int32 [tokens · top_k] (slot = token · top_k + j, grouped by ascending expert, ascending slot within).
#[derive(Clone, Copy, Debug)]
pub struct TopkArgs {
    /// fp32 [tokens, experts].
    pub logits: u64,
    pub logits_row_stride: i64,
    pub tokens: i64,
    pub experts: i64,
    pub top_k: i64,
    pub scoring: Scoring,
    pub renormalize: bool,
    /// fp32 [experts], 0 for none.
    pub expert_scale: u64,
    pub topk_ids: u64,
    pub topk_weights: u64,
    pub expert_counts: u64,
    pub expert_offsets: u64,
    pub sorted_slots: u64,
}

struct TopkChecked {
    logits: Matrix,
    top_k: usize,
    scoring: Scoring,
    renormalize: bool,
    scale: Option<Matrix>,
    ids: Matrix,
    weights: Matrix,
    counts: Matrix,
    offsets: Matrix,
    sorted: Matrix,
}

fn check_top_k(top_k: i64, experts: usize) -> Result<usize> {
    let k = check_dim("top_k", top_k, MAX_TOP_K)?;
    if k > experts {
        return Err(Error::invalid(format!("top_k: {k} exceeds the number of experts {experts}")));
    }
    Ok(k)
}

fn validate_topk(a: &TopkArgs) -> Result<TopkChecked> {
    let t = check_dim("tokens", a.tokens, MAX_TOKENS)?;
    let e = check_experts(a.experts)?;
    let k = check_top_k(a.top_k, e)?;
    check_ptr("logits", a.logits, 4)?;
    let logits = Matrix::new("logits", a.logits, t, e, a.logits_row_stride, 4, 1)?;
    let scale = if a.expert_scale == 0 { None } else { Some(vector("expert_scale", a.expert_scale, e, 4, 4)?) };
    let ids = vector("topk_ids", a.topk_ids, t * k, 4, 4)?;
    let weights = vector("topk_weights", a.topk_weights, t * k, 4, 4)?;
    let counts = vector("expert_counts", a.expert_counts, e, 4, 4)?;
    let offsets = vector("expert_offsets", a.expert_offsets, e + 1, 4, 4)?;
    let sorted = vector("sorted_slots", a.sorted_slots, t * k, 4, 4)?;
    let inputs = [("logits", &logits)].into_iter().chain(scale.as_ref().map(|s| ("expert_scale", s)));
    check_distinct(
        &[
            ("topk_ids", &ids),
            ("topk_weights", &weights),
            ("expert_counts", &counts),
            ("expert_offsets", &offsets),
            ("sorted_slots", &sorted),
        ],
        inputs,
    )?;
    Ok(TopkChecked {
        logits,
        top_k: k,
        scoring: a.scoring,
        renormalize: a.renormalize,
        scale,
        ids,
        weights,
        counts,
        offsets,
        sorted,
    })
}

fn scoring_code(s: Scoring) -> i32 {
    match s {
        Scoring::Softmax => 0,
        Scoring::Sigmoid => 1,
    }
}

/// # Safety
/// As [`topk_router`]; `c` validated.
unsafe fn launch_topk(device: &Device, c: &TopkChecked, stream: Stream) -> Result<()> {
    let tokens = c.logits.rows;
    let blocks = tokens.div_ceil(TOPK_WARPS);
    let kernel = device.kernel(&ROUTER_SOURCE, &topk_name(c.logits.cols))?;
    let mut logits = c.logits.ptr;
    let mut ls = c.logits.row_stride as i64;
    let mut t = tokens as i32;
    let mut e = c.logits.cols as i32;
    let mut k = c.top_k as i32;
    let mut scoring = scoring_code(c.scoring);
    let mut renorm = i32::from(c.renormalize);
    let mut scale = c.scale.map_or(0, |s| s.ptr);
    let mut ids = c.ids.ptr;
    let mut weights = c.weights.ptr;
    let mut counts = c.counts.ptr;
    let mut offsets = c.offsets.ptr;
    let mut sorted = c.sorted.ptr;
    // One block (decode) builds the index in the same launch; otherwise a second, single-block launch.
    let mut fused = i32::from(blocks == 1);
    let mut args =
        crate::kernel_args![logits, ls, t, e, k, scoring, renorm, scale, ids, weights, counts, offsets, sorted, fused];
    let block = ((TOPK_WARPS * 32) as u32, 1, 1);
    // Decode: one warp per token (at least four, which share the index's per-expert loop); one token: warp
    // 0 for the token, and a thread per expert for the index (up to TOPK_WARPS warps in all), built while
    // warp 0 scores.
    let warps = if tokens == 1 { (1 + c.logits.cols.div_ceil(32)).min(TOPK_WARPS) } else { tokens.max(4) };
    let topk_block = if blocks == 1 { ((32 * warps) as u32, 1, 1) } else { block };
    device.launch_dependent(&kernel, (blocks as u32, 1, 1), topk_block, 0, stream.raw(), &mut args)?;
    if blocks > 1 {
        let kernel = device.kernel(&ROUTER_SOURCE, "expert_index_kernel")?;
        let mut slots = (tokens * c.top_k) as i32;
        let mut args = crate::kernel_args![ids, slots, e, counts, offsets, sorted];
        device.launch_dependent(&kernel, (1, 1, 1), block, 0, stream.raw(), &mut args)?;
    }
    Ok(())
}

fn cpu_topk(c: &TopkChecked) {
    unsafe {
        let (t, e) = (c.logits.rows, c.logits.cols);
        let mut logits = Vec::with_capacity(t * e);
        for r in 0..t {
            logits.extend(host_read::<f32>(c.logits.ptr + (r * c.logits.row_stride * 4) as u64, e));
        }
        let scale = c.scale.map(|s| host_read::<f32>(s.ptr, e));
        let cfg = TopkConfig {
            top_k: c.top_k,
            scoring: c.scoring,
            renormalize: c.renormalize,
            expert_scale: scale.as_deref(),
        };
        let r = refmoe::topk_router(&logits, t, e, &cfg);
        host_write(c.ids.ptr, &r.ids);
        host_write(c.weights.ptr, &r.weights);
        host_write(c.counts.ptr, &r.counts);
        host_write(c.offsets.ptr, &r.offsets);
        host_write(c.sorted.ptr, &r.sorted_slots);
    }
}

/// Scores (softmax over all experts, or sigmoid), selects the top k per token (ties to the lower index;
/// NaN ranks lowest), optionally renormalises them to sum 1 and multiplies a per-expert scale; builds
/// the expert counts, offsets and the expert-grouped slot order, all in the context's memory.
///
/// # Safety
/// Every address must point to memory of the context's kind holding the extent its shape describes.
pub unsafe fn topk_router(ctx: &Context, a: &TopkArgs, stream: Stream) -> Result<()> {
    ctx.check_stream(stream)?;
    let c = validate_topk(a)?;
    match ctx.backend() {
        Backend::Cpu => {
            cpu_topk(&c);
            Ok(())
        }
        Backend::Cuda(device) => {
            let ms = [
                ("logits", &c.logits),
                ("topk_ids", &c.ids),
                ("topk_weights", &c.weights),
                ("expert_counts", &c.counts),
                ("expert_offsets", &c.offsets),
                ("sorted_slots", &c.sorted),
            ];
            check_all_on_device(device, ms.into_iter().chain(c.scale.as_ref().map(|s| ("expert_scale", s))))?;
            launch_topk(device, &c, stream)
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Expert FFN (+ dense FFN)
// ---------------------------------------------------------------------------------------------------------

/// The routed experts of [`expert_ffn`]: stacked weights and the routing from [`topk_router`].
#[derive(Clone, Copy, Debug)]
pub struct RoutedExperts {
    /// bf16 [experts, 2·inter, hidden], gate rows first.
    pub gate_up: u64,
    /// bf16 [experts, hidden, inter].
    pub down: u64,
    pub experts: i64,
    pub inter: i64,
    pub top_k: i64,
    /// int32 [tokens, top_k], each in [0, experts).
    pub topk_ids: u64,
    /// fp32 [tokens, top_k].
    pub topk_weights: u64,
    /// int32 [experts + 1].
    pub expert_offsets: u64,
    /// int32 [tokens · top_k].
    pub sorted_slots: u64,
}

/// The dense FFN (Gemma 4) or shared expert (Qwen3.5) of [`expert_ffn`].
#[derive(Clone, Copy, Debug)]
pub struct DenseFfn {
    /// bf16 [2·inter, hidden], gate rows first.
    pub gate_up: u64,
    /// bf16 [hidden, inter].
    pub down: u64,
    pub inter: i64,
    /// bf16 [hidden]: output × sigmoid(x · gate_weight); 0 for an ungated FFN.
    pub gate_weight: u64,
}

/// Arguments of [`expert_ffn`].
#[derive(Clone, Copy, Debug)]
pub struct ExpertFfnArgs {
    /// bf16 [tokens, hidden].
    pub x: u64,
    pub x_row_stride: i64,
    /// bf16 [tokens, hidden].
    pub out: u64,
    pub out_row_stride: i64,
    /// Add into the existing contents of `out` (before the single rounding).
    pub accumulate: bool,
    pub tokens: i64,
    pub hidden: i64,
    pub activation: Activation,
    pub routed: Option<RoutedExperts>,
    pub dense: Option<DenseFfn>,
    pub workspace: u64,
    pub workspace_bytes: usize,
}

const REGION_ALIGN: usize = 256;

/// Byte offsets of the workspace regions.
#[derive(Clone, Copy, Debug, Default)]
struct FfnLayout {
    h_routed: usize,
    h_dense: usize,
    dense_gate: usize,
    /// fp32 [T·k + T_dense, hidden]: the down projection's rows per slot (and per token of the dense
    /// FFN) before the combine; empty below GROUPED_MIN_TOKENS.
    y: usize,
    total: usize,
}

struct Regions(usize);

impl Regions {
    fn take(&mut self, bytes: usize) -> usize {
        let at = self.0;
        self.0 += bytes.div_ceil(REGION_ALIGN) * REGION_ALIGN;
        at
    }
}

/// The FFN's shape as the workspace sees it: `top_k` and `inter` 0 without routed experts, `dense_inter`
/// 0 without a dense FFN.
#[derive(Clone, Copy, Debug)]
struct FfnDims {
    tokens: usize,
    hidden: usize,
    top_k: usize,
    inter: usize,
    dense_inter: usize,
}

fn ffn_layout(d: FfnDims, r: &mut Regions) -> FfnLayout {
    let h_routed = r.take(d.tokens * d.top_k * d.inter * 2);
    let h_dense = r.take(d.tokens * d.dense_inter * 2);
    let dense_gate = r.take(d.tokens * 4);
    let y_rows = if d.tokens >= GROUPED_MIN_TOKENS {
        let routed = if d.inter > 0 { d.tokens * d.top_k } else { 0 };
        routed + if d.dense_inter > 0 { d.tokens } else { 0 }
    } else {
        0
    };
    let y = r.take(y_rows * d.hidden * 4);
    FfnLayout { h_routed, h_dense, dense_gate, y, total: r.0 }
}

/// Workspace bytes of [`expert_ffn`]: `top_k` and `inter` are 0 without routed experts, `dense_inter`
/// 0 without a dense FFN. Each region is rounded up to 256 bytes:
/// `r(T·k·I·2) + r(T·I_dense·2) + r(T·4) + r(R·hidden·4)`, where R, the fp32 rows of the prefill path's
/// down projection, is 0 for T ≤ 32 and T·k (+ T with a dense FFN) above.
pub fn expert_ffn_workspace_size(tokens: i64, hidden: i64, top_k: i64, inter: i64, dense_inter: i64) -> Result<usize> {
    let t = check_dim("tokens", tokens, MAX_TOKENS)?;
    let h = check_hidden("hidden", hidden)?;
    let k = if top_k == 0 { 0 } else { check_dim("top_k", top_k, MAX_TOP_K)? };
    let i = if inter == 0 { 0 } else { check_dim("inter", inter, MAX_FFN_DIM)? };
    let di = if dense_inter == 0 { 0 } else { check_dim("dense_inter", dense_inter, MAX_FFN_DIM)? };
    let dims = FfnDims { tokens: t, hidden: h, top_k: k, inter: i, dense_inter: di };
    Ok(ffn_layout(dims, &mut Regions(0)).total)
}

struct RoutedChecked {
    gate_up: Matrix,
    down: Matrix,
    experts: usize,
    inter: usize,
    top_k: usize,
    ids: Matrix,
    weights: Matrix,
    offsets: Matrix,
    sorted: Matrix,
}

struct DenseChecked {
    gate_up: Matrix,
    down: Matrix,
    inter: usize,
    gate: Option<Matrix>,
}

struct FfnChecked {
    x: Matrix,
    out: Matrix,
    accumulate: bool,
    act: Activation,
    routed: Option<RoutedChecked>,
    dense: Option<DenseChecked>,
    /// The workspace: a byte vector of layout.total bytes (at least 1).
    ws: Matrix,
    layout: FfnLayout,
}

impl FfnChecked {
    /// Every buffer the FFN reads or uses as scratch (all but `out`); the routing arrays only when the
    /// caller passed them (`routing`).
    fn inputs(&self, routing: bool) -> impl Iterator<Item = Named<'_>> + Clone {
        let r = self.routed.as_ref();
        let d = self.dense.as_ref();
        let routing_arrays = r.filter(|_| routing).map(|r| {
            [
                ("topk_ids", &r.ids),
                ("topk_weights", &r.weights),
                ("expert_offsets", &r.offsets),
                ("sorted_slots", &r.sorted),
            ]
        });
        [("x", &self.x), ("workspace", &self.ws)]
            .into_iter()
            .chain(r.map(|r| [("gate_up", &r.gate_up), ("down", &r.down)]).into_iter().flatten())
            .chain(routing_arrays.into_iter().flatten())
            .chain(d.map(|d| [("dense_gate_up", &d.gate_up), ("dense_down", &d.down)]).into_iter().flatten())
            .chain(d.and_then(|d| d.gate.as_ref()).map(|g| ("dense_gate_weight", g)))
    }
}

fn check_inter(name: &str, inter: i64) -> Result<usize> {
    check_hidden(name, inter)
}

/// Validates the routed experts; the routing arrays only when `routing` (the block call places them in
/// its own workspace).
fn validate_routed(r: &RoutedExperts, tokens: usize, hidden: usize, routing: bool) -> Result<RoutedChecked> {
    let e = check_experts(r.experts)?;
    let i = check_inter("inter", r.inter)?;
    let k = check_top_k(r.top_k, e)?;
    check_ptr("gate_up", r.gate_up, 16)?;
    check_ptr("down", r.down, 16)?;
    let gate_up = Matrix::new("gate_up", r.gate_up, e * 2 * i, hidden, 0, 2, 8)?;
    let down = Matrix::new("down", r.down, e * hidden, i, 0, 2, 8)?;
    let slots = tokens * k;
    let (ids, weights, offsets, sorted) = if routing {
        (
            vector("topk_ids", r.topk_ids, slots, 4, 4)?,
            vector("topk_weights", r.topk_weights, slots, 4, 4)?,
            vector("expert_offsets", r.expert_offsets, e + 1, 4, 4)?,
            vector("sorted_slots", r.sorted_slots, slots, 4, 4)?,
        )
    } else {
        let empty = Matrix { ptr: 0, rows: 0, cols: 0, row_stride: 0, elem_bytes: 4 };
        (empty, empty, empty, empty)
    };
    Ok(RoutedChecked { gate_up, down, experts: e, inter: i, top_k: k, ids, weights, offsets, sorted })
}

fn validate_dense(d: &DenseFfn, hidden: usize) -> Result<DenseChecked> {
    let i = check_inter("dense_inter", d.inter)?;
    check_ptr("dense_gate_up", d.gate_up, 16)?;
    check_ptr("dense_down", d.down, 16)?;
    let gate_up = Matrix::new("dense_gate_up", d.gate_up, 2 * i, hidden, 0, 2, 8)?;
    let down = Matrix::new("dense_down", d.down, hidden, i, 0, 2, 8)?;
    let gate = if d.gate_weight == 0 { None } else { Some(vector("dense_gate_weight", d.gate_weight, hidden, 2, 16)?) };
    Ok(DenseChecked { gate_up, down, inter: i, gate })
}

fn validate_ffn(a: &ExpertFfnArgs, routing: bool, regions: &mut Regions) -> Result<FfnChecked> {
    let t = check_dim("tokens", a.tokens, MAX_TOKENS)?;
    let h = check_hidden("hidden", a.hidden)?;
    check_ptr("x", a.x, 16)?;
    check_ptr("out", a.out, 2)?;
    let x = Matrix::new("x", a.x, t, h, a.x_row_stride, 2, 8)?;
    let out = Matrix::new("out", a.out, t, h, a.out_row_stride, 2, 1)?;
    if a.routed.is_none() && a.dense.is_none() {
        return Err(Error::invalid("routed: neither routed experts nor a dense FFN given; nothing to compute"));
    }
    let routed = a.routed.as_ref().map(|r| validate_routed(r, t, h, routing)).transpose()?;
    let dense = a.dense.as_ref().map(|d| validate_dense(d, h)).transpose()?;
    let dims = FfnDims {
        tokens: t,
        hidden: h,
        top_k: routed.as_ref().map_or(0, |r| r.top_k),
        inter: routed.as_ref().map_or(0, |r| r.inter),
        dense_inter: dense.as_ref().map_or(0, |d| d.inter),
    };
    let layout = ffn_layout(dims, regions);
    check_ptr("workspace", a.workspace, 16)?;
    if a.workspace_bytes < layout.total {
        return Err(Error::invalid(format!(
            "workspace_bytes: {} bytes given, the call needs {} (see the *_workspace_size function)",
            a.workspace_bytes, layout.total
        )));
    }
    let ws = vector("workspace", a.workspace, layout.total.max(1), 1, 1)?;
    let c = FfnChecked { x, out, accumulate: a.accumulate, act: a.activation, routed, dense, ws, layout };
    check_distinct(&[("out", &c.out)], c.inputs(routing))?;
    if routing {
        if let Some(r) = &c.routed {
            check_distinct(
                &[("workspace", &c.ws)],
                [("topk_ids", &r.ids), ("topk_weights", &r.weights), ("sorted_slots", &r.sorted)],
            )?;
        }
    }
    Ok(c)
}

fn ffn_device_check(device: &Device, c: &FfnChecked, routing: bool) -> Result<()> {
    // x, out, then the rest: the order in which a bad buffer is named.
    let mut inputs = c.inputs(routing);
    let x = inputs.next();
    check_all_on_device(device, x.into_iter().chain([("out", &c.out)]).chain(inputs))
}

/// The routing of a single token computed inside the decode gate/up kernel (`FusedRouting` in
/// expert_ffn.cu): the MoE block call at T = 1 passes its logits, and the outputs the gate/up kernel does
/// not otherwise take, instead of launching the top-k kernel; the ids, offsets and sorted slots go to the
/// FFN's routing pointers, as when the top-k kernel writes them. `logits == 0`: the routing is given.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FusedRouting {
    logits: u64,
    expert_scale: u64,
    topk_weights: u64,
    expert_counts: u64,
    experts: i32,
    scoring: i32,
    renormalize: i32,
    pad: i32,
}

const _: () = assert!(std::mem::size_of::<FusedRouting>() == 48);
/// Most experts the gate/up kernel routes itself (32 × FUSED_ROUTING_PER_LANE in expert_ffn.cu); above it
/// the top-k kernel runs.
const FUSED_ROUTING_MAX_EXPERTS: usize = 256;

impl FusedRouting {
    fn of(c: &TopkChecked) -> FusedRouting {
        FusedRouting {
            logits: c.logits.ptr,
            expert_scale: c.scale.map_or(0, |s| s.ptr),
            topk_weights: c.weights.ptr,
            expert_counts: c.counts.ptr,
            experts: c.logits.cols as i32,
            scoring: scoring_code(c.scoring),
            renormalize: i32::from(c.renormalize),
            pad: 0,
        }
    }
}

/// # Safety
/// As [`expert_ffn`]; `c` validated, its routing pointers set. `early_dense`: the dense FFN may start
/// before the routing is written (see moe_forward). `route`: single-token routing inside the gate/up
/// kernel (decode path only).
unsafe fn launch_ffn(
    device: &Device,
    c: &FfnChecked,
    early_dense: bool,
    route: FusedRouting,
    stream: Stream,
) -> Result<()> {
    let tokens = c.x.rows;
    if route.logits != 0 && tokens != 1 {
        return Err(Error::internal("expert FFN: fused routing is for a single token"));
    }
    let hidden = c.x.cols;
    let ws = c.ws.ptr;
    let (r_inter, r_top_k, num_slots) = c.routed.as_ref().map_or((0, 0, 0), |r| (r.inter, r.top_k, tokens * r.top_k));
    let d_inter = c.dense.as_ref().map_or(0, |d| d.inter);
    let mt = token_tile(tokens).min(8);
    // Tile rows of the grouped gate/up and down (T >= GROUPED_MIN_TOKENS).
    let bm = grouped_rows(c, tokens);

    let mut x = c.x.ptr;
    let mut xs = c.x.row_stride as i64;
    let mut top_k = r_top_k as i32;
    let mut h = hidden as i32;
    let mut gate_up = c.routed.as_ref().map_or(0, |r| r.gate_up.ptr);
    let mut inter = r_inter as i32;
    let mut ids = c.routed.as_ref().map_or(0, |r| r.ids.ptr);
    let mut offsets = c.routed.as_ref().map_or(0, |r| r.offsets.ptr);
    let mut sorted = c.routed.as_ref().map_or(0, |r| r.sorted.ptr);
    let mut slots = num_slots as i32;
    let mut h_routed = ws + c.layout.h_routed as u64;
    let mut t = tokens as i32;
    let mut d_gate_up = c.dense.as_ref().map_or(0, |d| d.gate_up.ptr);
    let mut d_inter_arg = d_inter as i32;
    let mut d_gate_w = c.dense.as_ref().and_then(|d| d.gate).map_or(0, |g| g.ptr);
    let mut h_dense = ws + c.layout.h_dense as u64;
    let mut d_gate = ws + c.layout.dense_gate as u64;
    if tokens >= GROUPED_MIN_TOKENS {
        let kernel = device.kernel(&FFN_SOURCE, &grouped_gate_up_name(c.act, bm))?;
        let shared = grouped_shared_bytes(bm);
        kernel.set_max_dynamic_shared(shared as u32)?;
        let mut experts = c.routed.as_ref().map_or(0, |r| r.experts) as i32;
        let mut args = crate::kernel_args![
            x,
            xs,
            top_k,
            h,
            gate_up,
            inter,
            offsets,
            sorted,
            experts,
            h_routed,
            t,
            d_gate_up,
            d_inter_arg,
            d_gate_w,
            h_dense,
            d_gate
        ];
        let grid = (grouped_tiles(c, tokens, bm) as u32, r_inter.max(d_inter).div_ceil(GG_BN) as u32, 1);
        device.launch_dependent(&kernel, grid, (GG_THREADS as u32, 1, 1), shared as u32, stream.raw(), &mut args)?;
    } else {
        let kernel = device.kernel(&FFN_SOURCE, &gate_up_name(c.act, mt))?;
        let mut down = c.routed.as_ref().map_or(0, |r| r.down.ptr);
        let mut d_down = c.dense.as_ref().map_or(0, |d| d.down.ptr);
        let routed_prefetch = down_prefetch_rows(device, tokens, c);
        let mut prefetch_rows = routed_prefetch as i32;
        let mut dense_prefetch_rows = dense_down_prefetch_rows(device, c, routed_prefetch, early_dense) as i32;
        let mut early = i32::from(early_dense);
        let mut route = route;
        let mut args = crate::kernel_args![
            x,
            xs,
            top_k,
            h,
            gate_up,
            inter,
            ids,
            offsets,
            sorted,
            slots,
            h_routed,
            t,
            d_gate_up,
            d_inter_arg,
            d_gate_w,
            h_dense,
            d_gate,
            down,
            d_down,
            prefetch_rows,
            dense_prefetch_rows,
            early,
            route
        ];
        let grid_x = num_slots + usize::from(c.dense.is_some());
        // Rows of a block: FFN_WARPS dense, FFN_WARPS * GATE_UP_ROUTED_ROWS_T1 routed with one token per
        // tile (see expert_gate_up_kernel).
        let routed_rows = if mt == 1 { GATE_UP_ROUTED_ROWS_T1 } else { 1 };
        let grid_y = r_inter.div_ceil(FFN_WARPS * routed_rows).max(d_inter.div_ceil(FFN_WARPS));
        let block = ((FFN_WARPS * 32) as u32, 1, 1);
        device.launch_dependent(&kernel, (grid_x as u32, grid_y as u32, 1), block, 0, stream.raw(), &mut args)?;
    }

    let mut down = c.routed.as_ref().map_or(0, |r| r.down.ptr);
    let mut weights = c.routed.as_ref().map_or(0, |r| r.weights.ptr);
    let mut d_down = c.dense.as_ref().map_or(0, |d| d.down.ptr);
    let mut d_gate_read = if d_gate_w == 0 { 0 } else { d_gate };
    let mut out = c.out.ptr;
    let mut os = c.out.row_stride as i64;
    let mut accumulate = i32::from(c.accumulate);
    if tokens >= GROUPED_MIN_TOKENS {
        // Down projection per slot into fp32 rows, then the fixed-order top-k sum.
        let kernel = device.kernel(&FFN_SOURCE, &grouped_down_name(bm))?;
        let shared = grouped_shared_bytes(bm);
        kernel.set_max_dynamic_shared(shared as u32)?;
        let mut experts = c.routed.as_ref().map_or(0, |r| r.experts) as i32;
        let mut y = ws + c.layout.y as u64;
        let mut args = crate::kernel_args![
            h,
            down,
            inter,
            offsets,
            sorted,
            experts,
            slots,
            h_routed,
            t,
            d_down,
            d_inter_arg,
            h_dense,
            y
        ];
        let grid = (grouped_tiles(c, tokens, bm) as u32, hidden.div_ceil(GD_BN) as u32, 1);
        device.launch_dependent(&kernel, grid, (GG_THREADS as u32, 1, 1), shared as u32, stream.raw(), &mut args)?;

        let kernel = device.kernel(&FFN_SOURCE, "ffn_combine_kernel")?;
        let mut dense = i32::from(c.dense.is_some());
        let mut args = crate::kernel_args![h, top_k, slots, weights, dense, d_gate_read, y, out, os, accumulate];
        let grid = (tokens as u32, hidden.div_ceil(4 * COMBINE_THREADS) as u32, 1);
        return device.launch_dependent(&kernel, grid, (COMBINE_THREADS as u32, 1, 1), 0, stream.raw(), &mut args);
    }

    // A single token takes the chunked path with four blocks per SM.
    let group = if tokens == 1 { down_single_group(c) } else { 0 };
    let kernel = device.kernel(&FFN_SOURCE, &down_name(group))?;
    let mut args = crate::kernel_args![
        t,
        top_k,
        h,
        down,
        inter,
        ids,
        weights,
        sorted,
        slots,
        h_routed,
        d_down,
        d_inter_arg,
        h_dense,
        d_gate_read,
        out,
        os,
        accumulate
    ];
    let grid = (hidden.div_ceil(DOWN_ROWS) as u32, 1, 1);
    let block = ((DOWN_ROWS * DOWN_SPLIT * 32) as u32, 1, 1);
    device.launch_dependent(&kernel, grid, block, 0, stream.raw(), &mut args)
}

/// The down kernel's instantiation: `group` 0 for the general path, else the single-token path with that
/// many chunks in flight per warp.
fn down_name(group: usize) -> KernelName {
    kernel_name!("expert_down_kernel<{group}>")
}

/// Chunks in flight per warp of the single-token down path (expert_down_kernel): 5 where that finishes a
/// warp's part of an output row in two rounds of loads instead of three, else 4. Qwen3.5 (9 chunks of 512
/// bytes per part) ran 0.5 µs faster with 5; Gemma 4 (17 chunks, four rounds instead of five) 1.5 µs
/// slower (docs/PERF.md).
fn down_single_group(c: &FfnChecked) -> usize {
    let routed = c.routed.as_ref().map_or(0, |r| r.top_k * r.inter.div_ceil(8 * DOWN_CHUNK));
    let dense = c.dense.as_ref().map_or(0, |d| d.inter.div_ceil(8 * DOWN_CHUNK));
    group_for_chunks(routed + dense)
}

/// down_single_group's rule for a row of `chunks` chunks, cut into DOWN_SPLIT parts.
fn group_for_chunks(chunks: usize) -> usize {
    let per_part = chunks.div_ceil(DOWN_SPLIT);
    if per_part.div_ceil(5) <= 2 && per_part.div_ceil(4) > 2 {
        5
    } else {
        4
    }
}

/// Rows of the down projection's weights (per selected expert and of the dense FFN, the same count for
/// each) that the decode gate/up kernel brings into L2, evict-last, for the down kernel: as many as fit in
/// an eighth of the L2 across every expert that may be selected. On the H100 (50 MB L2) an eighth beat a
/// quarter and a half at both models' T = 1 and T = 8: a larger share held qwen3.5 T = 1 about level and
/// cost gemma4 T = 1 (44 MB of down weights) 3 µs of FFN time (docs/PERF.md).
fn down_prefetch_rows(device: &Device, tokens: usize, c: &FfnChecked) -> usize {
    let hidden = c.x.cols;
    let routed_row = c.routed.as_ref().map_or(0, |r| (tokens * r.top_k).min(r.experts) * r.inter);
    let dense_row = c.dense.as_ref().map_or(0, |d| d.inter);
    let row_bytes = 2 * (routed_row + dense_row);
    let budget = device.info.l2_bytes.max(0) as usize / 8;
    budget.checked_div(row_bytes).unwrap_or(0).min(hidden)
}

/// Rows of the dense FFN's down weights that the decode gate/up kernel's dense column brings into L2:
/// `routed_rows` (down_prefetch_rows), or, when the column runs ahead of the routing (the block call,
/// `early_dense`), all of them if they fit in a sixteenth of the L2. The dense column then streams while the
/// routed blocks wait for the router, when DRAM has room to spare; where it waits with them (the expert FFN
/// op), the larger prefetch only competed with the gate/up rows (docs/PERF.md).
fn dense_down_prefetch_rows(device: &Device, c: &FfnChecked, routed_rows: usize, early_dense: bool) -> usize {
    let Some(d) = c.dense.as_ref().filter(|_| early_dense) else { return routed_rows };
    let budget = device.info.l2_bytes.max(0) as usize / 16;
    let own = budget.checked_div(2 * d.inter).unwrap_or(0).min(c.x.cols);
    routed_rows.max(own)
}

/// Blocks of a grouped kernel's grid along x, from host bounds: every expert's tiles fit in
/// ceil(T k / BM) + E, then the dense FFN's ceil(T / BM); blocks past the real tiles exit.
fn grouped_tiles(c: &FfnChecked, tokens: usize, bm: usize) -> usize {
    let routed = c.routed.as_ref().map_or(0, |r| (tokens * r.top_k).div_ceil(bm) + r.experts);
    let dense = if c.dense.is_some() { tokens.div_ceil(bm) } else { 0 };
    routed + dense
}

/// Reads the input side of an FFN call from host memory and computes the f64 result parts.
///
/// # Safety
/// The checked matrices must be valid host memory.
unsafe fn cpu_ffn_parts(c: &FfnChecked, ids: &[i32], weights: &[f32]) -> Result<Vec<Vec<f64>>> {
    let x = c.x.read_host_bf16();
    let hidden = c.x.cols;
    let mut parts = Vec::new();
    if let Some(r) = &c.routed {
        if let Some((s, &e)) = ids.iter().enumerate().find(|(_, &e)| e < 0 || e as usize >= r.experts) {
            return Err(Error::invalid(format!("topk_ids: slot {s} holds expert {e}, outside [0, {})", r.experts)));
        }
        let gate_up = r.gate_up.read_host_bf16();
        let down = r.down.read_host_bf16();
        parts.push(refmoe::expert_ffn(&x, hidden, &gate_up, &down, r.inter, ids, weights, r.top_k, c.act));
    }
    if let Some(d) = &c.dense {
        let gate_up = d.gate_up.read_host_bf16();
        let down = d.down.read_host_bf16();
        let gate = d.gate.map(|g| g.read_host_bf16());
        let w = FfnWeights { gate_up: &gate_up, down: &down, inter: d.inter };
        parts.push(refmoe::dense_ffn(&x, hidden, &w, gate.as_deref(), c.act));
    }
    Ok(parts)
}

/// # Safety
/// The checked matrices must be valid host memory.
unsafe fn cpu_write_out(c: &FfnChecked, parts: &[Vec<f64>]) {
    let existing = c.accumulate.then(|| c.out.read_host_bf16());
    let refs: Vec<&[f64]> = parts.iter().map(|p| p.as_slice()).collect();
    let out = refmoe::combine(&refs, existing.as_deref());
    super::MatrixMut(c.out).write_host(&out);
}

/// `out = Σ_j w_j · Down_e(act(Gate_e · x) ⊙ (Up_e · x)) + gate · Dense(x) [+ out]` with fp32 accumulation
/// and one rounding; the intermediates live in the workspace.
///
/// # Safety
/// Every address must point to memory of the context's kind holding the extent its shape describes;
/// `topk_ids` must hold experts in [0, experts) and the offsets/slots must be those [`topk_router`] built
/// for them.
pub unsafe fn expert_ffn(ctx: &Context, a: &ExpertFfnArgs, stream: Stream) -> Result<()> {
    ctx.check_stream(stream)?;
    let c = validate_ffn(a, true, &mut Regions(0))?;
    match ctx.backend() {
        Backend::Cpu => {
            let slots = c.routed.as_ref().map_or(0, |r| r.ids.cols);
            let (ids, weights) = match &c.routed {
                Some(r) => (host_read::<i32>(r.ids.ptr, slots), host_read::<f32>(r.weights.ptr, slots)),
                None => (Vec::new(), Vec::new()),
            };
            let parts = cpu_ffn_parts(&c, &ids, &weights)?;
            cpu_write_out(&c, &parts);
            Ok(())
        }
        Backend::Cuda(device) => {
            ffn_device_check(device, &c, true)?;
            launch_ffn(device, &c, false, FusedRouting::default(), stream)
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// The whole block
// ---------------------------------------------------------------------------------------------------------

/// Arguments of [`moe_forward`]: the router, the routed experts (their routing fields are ignored: the
/// block builds the routing in its workspace) and the optional dense FFN.
#[derive(Clone, Copy, Debug)]
pub struct MoeForwardArgs {
    pub ffn: ExpertFfnArgs,
    /// bf16 [experts, hidden].
    pub router_weight: u64,
    /// bf16 [hidden], 0 for no input transform.
    pub router_input_scale: u64,
    pub router_eps: f32,
    pub scoring: Scoring,
    pub renormalize: bool,
    /// fp32 [experts], 0 for none.
    pub expert_scale: u64,
}

/// Byte offsets of the routing that [`moe_forward`] leaves in its workspace (valid after the call; the
/// tests read it to check the block's routing exactly).
#[derive(Clone, Copy, Debug)]
pub struct BlockLayout {
    /// fp32 [T, E].
    pub logits: usize,
    /// int32 [T, k].
    pub ids: usize,
    /// fp32 [T, k].
    pub weights: usize,
    /// int32 [E].
    pub counts: usize,
    /// int32 [E + 1].
    pub offsets: usize,
    /// int32 [T·k].
    pub sorted: usize,
    ffn: FfnLayout,
}

impl BlockLayout {
    pub fn total(&self) -> usize {
        self.ffn.total
    }
}

fn block_layout(experts: usize, d: FfnDims) -> BlockLayout {
    let mut r = Regions(0);
    let logits = r.take(d.tokens * experts * 4);
    let ids = r.take(d.tokens * d.top_k * 4);
    let weights = r.take(d.tokens * d.top_k * 4);
    let counts = r.take(experts * 4);
    let offsets = r.take((experts + 1) * 4);
    let sorted = r.take(d.tokens * d.top_k * 4);
    let ffn = ffn_layout(d, &mut r);
    BlockLayout { logits, ids, weights, counts, offsets, sorted, ffn }
}

/// Workspace bytes of [`moe_forward`] (`dense_inter` 0 without a dense FFN). Each region rounded up to
/// 256 bytes: `r(T·E·4) + 2·r(T·k·4) + r(E·4) + r((E+1)·4) + r(T·k·4)` for the routing, then the
/// regions of [`expert_ffn_workspace_size`].
pub fn moe_forward_workspace_size(
    tokens: i64,
    hidden: i64,
    experts: i64,
    top_k: i64,
    inter: i64,
    dense_inter: i64,
) -> Result<usize> {
    Ok(moe_forward_layout(tokens, hidden, experts, top_k, inter, dense_inter)?.total())
}

/// Where [`moe_forward`] places its routing in the workspace.
pub fn moe_forward_layout(
    tokens: i64,
    hidden: i64,
    experts: i64,
    top_k: i64,
    inter: i64,
    dense_inter: i64,
) -> Result<BlockLayout> {
    let t = check_dim("tokens", tokens, MAX_TOKENS)?;
    let h = check_hidden("hidden", hidden)?;
    let e = check_experts(experts)?;
    let k = check_top_k(top_k, e)?;
    let i = check_inter("inter", inter)?;
    let di = if dense_inter == 0 { 0 } else { check_inter("dense_inter", dense_inter)? };
    Ok(block_layout(e, FfnDims { tokens: t, hidden: h, top_k: k, inter: i, dense_inter: di }))
}

/// The MoE block: router GEMM → top-k + expert index → routed experts + dense FFN, on `stream`, with no
/// host synchronisation (capturable in a CUDA graph). Scratch lives in `ffn.workspace`, of at least
/// [`moe_forward_workspace_size`] bytes.
///
/// # Safety
/// Every address must point to memory of the context's kind holding the extent its shape describes.
pub unsafe fn moe_forward(ctx: &Context, a: &MoeForwardArgs, stream: Stream) -> Result<()> {
    ctx.check_stream(stream)?;
    let routed =
        a.ffn.routed.ok_or_else(|| Error::invalid("routed: the MoE block needs its routed experts' weights"))?;
    let t = check_dim("tokens", a.ffn.tokens, MAX_TOKENS)?;
    let h = check_hidden("hidden", a.ffn.hidden)?;
    let e = check_experts(routed.experts)?;
    let k = check_top_k(routed.top_k, e)?;
    let i = check_inter("inter", routed.inter)?;
    let di = match &a.ffn.dense {
        Some(d) => check_inter("dense_inter", d.inter)?,
        None => 0,
    };
    let layout = block_layout(e, FfnDims { tokens: t, hidden: h, top_k: k, inter: i, dense_inter: di });
    let mut regions = Regions(layout.ffn.h_routed);
    let mut ffn = validate_ffn(&a.ffn, false, &mut regions)?;
    let ws = a.ffn.workspace;
    let at = |off: usize| ws + off as u64;
    let router_args = RouterGemmArgs {
        x: a.ffn.x,
        x_row_stride: a.ffn.x_row_stride,
        weight: a.router_weight,
        input_scale: a.router_input_scale,
        eps: a.router_eps,
        logits: at(layout.logits),
        logits_row_stride: 0,
        tokens: a.ffn.tokens,
        hidden: a.ffn.hidden,
        experts: routed.experts,
    };
    let router = validate_router(&router_args).map_err(rename_router_error)?;
    let topk_args = TopkArgs {
        logits: at(layout.logits),
        logits_row_stride: 0,
        tokens: a.ffn.tokens,
        experts: routed.experts,
        top_k: routed.top_k,
        scoring: a.scoring,
        renormalize: a.renormalize,
        expert_scale: a.expert_scale,
        topk_ids: at(layout.ids),
        topk_weights: at(layout.weights),
        expert_counts: at(layout.counts),
        expert_offsets: at(layout.offsets),
        sorted_slots: at(layout.sorted),
    };
    let topk = validate_topk(&topk_args)?;
    if let Some(r) = ffn.routed.as_mut() {
        r.ids = topk.ids;
        r.weights = topk.weights;
        r.offsets = topk.offsets;
        r.sorted = topk.sorted;
    }
    let ws_matrix = vector("workspace", ws, layout.ffn.total, 1, 1)?;
    if ws_matrix.overlaps(&router.weight) || router.scale.is_some_and(|s| ws_matrix.overlaps(&s)) {
        return Err(Error::invalid("workspace: overlaps the router weights"));
    }
    if topk.scale.is_some_and(|s| ws_matrix.overlaps(&s)) {
        return Err(Error::invalid("workspace: overlaps expert_scale"));
    }
    match ctx.backend() {
        Backend::Cpu => {
            let x = ffn.x.read_host_bf16();
            let w = router.weight.read_host_bf16();
            let scale = router.scale.map(|s| s.read_host_bf16());
            let transform = scale.as_deref().map(|s| RouterTransform { scale: s, eps: router.eps });
            let logits = refmoe::router_logits(&x, t, ffn.x.cols, &w, e, transform);
            let expert_scale = topk.scale.map(|s| host_read::<f32>(s.ptr, e));
            let cfg = TopkConfig {
                top_k: k,
                scoring: a.scoring,
                renormalize: a.renormalize,
                expert_scale: expert_scale.as_deref(),
            };
            let routing = refmoe::topk_router(&logits, t, e, &cfg);
            // The routing is left in the workspace as on the GPU.
            host_write(at(layout.logits), &logits);
            host_write(at(layout.ids), &routing.ids);
            host_write(at(layout.weights), &routing.weights);
            host_write(at(layout.counts), &routing.counts);
            host_write(at(layout.offsets), &routing.offsets);
            host_write(at(layout.sorted), &routing.sorted_slots);
            let parts = cpu_ffn_parts(&ffn, &routing.ids, &routing.weights)?;
            cpu_write_out(&ffn, &parts);
            Ok(())
        }
        Backend::Cuda(device) => {
            let ms = [("router_weight", &router.weight)]
                .into_iter()
                .chain(router.scale.as_ref().map(|s| ("router_input_scale", s)))
                .chain(topk.scale.as_ref().map(|s| ("expert_scale", s)));
            check_all_on_device(device, ms)?;
            ffn_device_check(device, &ffn, false)?;
            launch_router(device, &router, true, stream)?;
            // One token: the gate/up kernel routes it (saving the top-k launch), else the top-k kernel.
            let route = if t == 1 && e <= FUSED_ROUTING_MAX_EXPERTS {
                FusedRouting::of(&topk)
            } else {
                launch_topk(device, &topk, stream)?;
                FusedRouting::default()
            };
            // The dense column may start before the routing is ready: the router lets the launches after it
            // start only once the kernel before it is complete (x written, the workspace read), and the
            // workspace is this call's.
            launch_ffn(device, &ffn, true, route, stream)
        }
    }
}

/// The router's own argument names become the block's (`weight` → `router_weight`).
fn rename_router_error(err: Error) -> Error {
    let message = if let Some(rest) = err.message.strip_prefix("weight:") {
        format!("router_weight:{rest}")
    } else if let Some(rest) = err.message.strip_prefix("input_scale:") {
        format!("router_input_scale:{rest}")
    } else if let Some(rest) = err.message.strip_prefix("eps:") {
        format!("router_eps:{rest}")
    } else {
        err.message
    };
    Error::new(err.status, message)
}

/// Distinct experts' bytes a decode call must read at least: used by the benchmarks' byte floors.
pub fn expert_bytes(hidden: usize, inter: usize) -> usize {
    3 * hidden * inter * 2
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each expert count gets the smallest top-k instantiation that holds it (select_top_k's rule).
    #[test]
    fn topk_kernel_per_lane_holds_the_experts() {
        for (experts, per_lane) in
            [(1, 1), (32, 1), (33, 2), (64, 2), (65, 4), (128, 4), (129, 8), (256, 8), (257, 16), (512, 16)]
        {
            assert_eq!(&*topk_name(experts), &*topk_name_for(per_lane), "{experts} experts");
        }
    }

    /// 96 tile rows exactly where experts average more than 48 and at most 96 slots, and every choice fits
    /// a block's shared memory on sm_120.
    #[test]
    fn grouped_tile_rows_follow_the_slots_per_expert() {
        // Qwen3.5 (256 experts, top-8) at T = 64, 1536, 1537, 2048, 3072, 3073, 4096; Gemma 4 (128) at 1024.
        for (tokens, experts, rows) in
            [(64, 256, 64), (1536, 256, 64), (1537, 256, 96), (2048, 256, 96), (3072, 256, 96), (3073, 256, 64)]
                .into_iter()
                .chain([(4096, 256, 64), (1024, 128, 96), (2048, 128, 64)])
        {
            assert_eq!(grouped_rows_for(tokens * 8, experts), rows, "T={tokens} E={experts}");
        }
        assert_eq!(grouped_rows_for(0, 0), 64);
        // Every choice fits the shared memory of a block on sm_120 / sm_121.
        for bm in GG_BM_CHOICES {
            assert!(grouped_shared_bytes(bm) <= 99 * 1024, "BM={bm}: {} bytes", grouped_shared_bytes(bm));
        }
    }

    /// Five chunks in flight only where they finish a row part in two rounds of loads instead of three:
    /// Qwen3.5's row (8 experts of 2 chunks, the shared expert's 2) yes, Gemma 4's (8 of 3, dense 9) no.
    #[test]
    fn single_token_down_group_follows_the_rounds() {
        for (chunks, group) in [(18, 5), (33, 4), (8, 4), (16, 4), (17, 5), (20, 5), (21, 4), (1, 4)] {
            assert_eq!(group_for_chunks(chunks), group, "{chunks} chunks");
        }
    }
}
