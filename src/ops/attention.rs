//! Decode attention (flash decode): 1 to 8 new query tokens per sequence against a bf16 KV cache,
//! contiguous or paged, with GQA, causal masking among the new tokens, a sliding window and a logit
//! softcap; split-KV over the key range with a log-sum-exp combine. Prefill (up to 8192 new tokens, every
//! head dim) takes the same arguments and runs on tensor cores (mma.sync).
//!
//! Specialisations are template constants: the head dimension D (64, 128, 256, 512). The GQA group (1, 2,
//! 4, 8, 16) and Tq are kernel arguments. Decode runs on tensor cores (`flash_decode_mma_kernel`): one CTA
//! per (sequence, KV head, chunk of 16 rows) and split, rows = the query heads of the KV head's group
//! times the new tokens, padded to one m16 tile, so each K/V tile is read once for 16 rows (group × Tq
//! above 16, e.g. group 8 verifying 4 draft tokens, takes several row chunks); each warp, or at D = 512
//! each pair of warps splitting the output dims, streams its own keys, 16 at a time by two TMA copies
//! through tensor maps of the K and V caches encoded per launch (`cache_tensor_map`). One long sequence at
//! D = 256 (Qwen3.5 ctx 16384 and up) takes the long variant `flash_decode_mma_kernel<256, true>`: two warps
//! per stream, q in registers and three tiles in flight per stream (`Plan::long_split`). Where the grid is at
//! most one CTA per SM, each CTA asks L2 for the tiles it copies first before its PDL wait (`Plan::prefetch`).
//! The split partials are merged by `attention_combine_kernel`, or where a row has few of them (batches) by
//! `attention_combine_rows_kernel`.

use super::{check_dim, check_ptr, overlaps, Backend, Context, Stream};
use crate::error::{Error, Result};
use crate::kernel_name;
use crate::reference::{self, attention as refattn, bf16};
use crate::runtime::name::KernelName;
use crate::runtime::sources::KernelSource;
use crate::runtime::tensor_map::{self, Bf16Tiled5d, TensorMap};
use crate::runtime::DeviceInfo;
use std::sync::atomic::{AtomicBool, Ordering};

pub static DECODE_SOURCE: KernelSource = KernelSource {
    name: "attention_decode",
    path: "attention/decode.cu",
    code: include_str!("../../csrc/cuda/attention/decode.cu"),
    instantiations: decode_instantiations,
};

pub fn kernel_sources() -> Vec<&'static KernelSource> {
    vec![&DECODE_SOURCE]
}

/// Head dimensions with a kernel.
pub const HEAD_DIMS: [usize; 4] = [64, 128, 256, 512];
/// GQA group sizes (query heads per KV head) with a kernel.
pub const GROUPS: [usize; 5] = [1, 2, 4, 8, 16];
/// Most new query tokens per sequence (speculative decoding verifies several).
pub const MAX_Q_LEN: i64 = 8;
/// Smallest and largest page of a paged cache, in tokens (a power of two).
pub const MIN_PAGE_SIZE: i64 = 16;
pub const MAX_PAGE_SIZE: i64 = 256;
/// Largest max_seq_len (2^28 tokens).
pub const MAX_SEQ_LEN: i64 = 1 << 28;
/// Most KV splits of one (sequence, KV head): bounds the workspace; the combine holds one split per thread
/// (COMBINE_MAX_SPLITS).
pub const MAX_SPLITS: usize = 256;
/// Threads per CTA of the prefill kernel (PREFILL_THREADS).
const PREFILL_THREADS: u32 = 128;
/// Threads per CTA of the split combine (COMBINE_THREADS).
const COMBINE_THREADS: u32 = 256;
/// 8-dim vectors per block of the split combine (COMBINE_LANES); head dims are multiples of 32.
const COMBINE_LANES: usize = 4;
/// Threads per block of the combine for rows with few partials (COMBINE_ROWS_THREADS): D / 8 per row.
const COMBINE_ROWS_THREADS: usize = 64;
/// Most partials per row merged by `attention_combine_rows_kernel` (each thread reads all of a row's, in
/// batches of 8); rows with more take `attention_combine_kernel` (one partial per thread, D / 32 blocks per
/// row). Batches leave few partials per row (B = 16 at 1K-32K 24, B = 64 at 4K 6), single sequences many
/// (Qwen3.5 ctx 32768 128). The crossover lies between 32 and 48 on the H100: Qwen3.5 B = 12 at 8K (32
/// partials) took 73.9 µs with this kernel against 76.0 with the other, B = 8 at 8K (48) 54.8 against 53.25
/// (docs/PERF.md, the sweep at 86981fc).
const COMBINE_ROWS_MAX_PARTS: usize = 32;
/// Rows (query heads × new tokens) per CTA of the decode kernel (`flash_decode_mma_kernel`): one m16
/// tile; group × Tq above it is spread over row chunks.
const MMA_ROWS: usize = 16;
/// Keys per warp tile of the tensor-core kernel (DecodeMma::N).
const MMA_TILE_KEYS: usize = 16;
/// Most CTAs per SM the split count of the tensor-core kernel plans for: the 3 that the H100 holds of the
/// ≤ 75 KiB blocks of D = 128 and 256, as measured; D = 64 would fit 4 by shared memory, a plan not measured.
const MAX_CTAS_PER_SM: usize = 3;

/// SMs and decode CTAs of head dim `d` resident on each (by shared memory, 1 to MAX_CTAS_PER_SM) of the
/// device a plan is made for: 3 for D ≤ 256 and 2 for D = 512 on the H100's 228 KiB, 1 on sm_120's 100
/// KiB. The CPU backend runs no kernel (`None`): one SM of one CTA gives it the same (unused) plan as any.
fn decode_slots(device: Option<&DeviceInfo>, d: usize) -> (usize, usize) {
    match device {
        None => (1, 1),
        Some(info) => (info.sm_count.max(1) as usize, resident_ctas(info, decode_mma_shared_bytes(d))),
    }
}

/// Decode CTAs of `need` bytes of shared memory each that one SM of `info` holds, 1 to MAX_CTAS_PER_SM.
fn resident_ctas(info: &DeviceInfo, need: usize) -> usize {
    info.blocks_per_sm_by_shared(need).clamp(1, MAX_CTAS_PER_SM)
}

/// Whether a decode launch spreads its CTAs one per SM on a device that holds several (`Some(dynamic shared
/// memory to request)`, enough that a second CTA does not fit), with the splits planned for one per SM;
/// `None`: the CTAs the SMs hold by shared memory, the splits planned for all of them.
///
/// A grid smaller than the resident slots runs as if the block scheduler stacked its CTAs on some SMs and
/// left others idle (Qwen3.5 ctx 32768 planned for one CTA per SM but launched with three resident took
/// 37.1 µs against 30.9 for three per SM); requesting more shared memory than the kernel needs is what
/// holds it to one. That happens only on devices whose SMs hold several decode CTAs (not sm_120 / sm_121,
/// whose SMs hold one), where the request may exceed the 99 KiB that SHARED_LIMIT keeps the kernel's need to.
/// Fewer, longer CTAs then write fewer partials for the combine and give each stream more than one tile, so
/// that its loads overlap its math: Qwen3.5 ctx 32768 30.8 → 29.3 µs, ctx 4096 10.1 → 9.0 on the H100
/// (docs/PERF.md). Only where no balance or issue rate is lost:
/// - one sequence: a batch's lengths may differ, and fewer splits per sequence left the longest one on few
///   CTAs (B = 16 with lengths 1K–32K: 194 → 273 µs);
/// - one chunk of rows and one warp per stream (D ≤ 256): with two row chunks (Tq = 4) or two warps sharing
///   a stream's scores (D = 512) the tile math per byte doubles, and one CTA's 2–4 warps cannot issue it
///   (Tq = 4 ctx 32768 32.8 → 40.6 µs, Gemma 4 global ctx 32768 51.0 → 52.6);
/// - one CTA per SM still fills nine in ten SMs (the local window's 33 tiles over 8 KV heads make 88 CTAs).
fn decode_spread(
    info: &DeviceInfo,
    d: usize,
    batch: usize,
    hkv: usize,
    row_chunks: usize,
    tiles: usize,
) -> Option<usize> {
    let (sms, ctas_per_sm) = decode_slots(Some(info), d);
    if ctas_per_sm <= 1 || batch != 1 || row_chunks != 1 || mma_slices(d) != 1 {
        return None;
    }
    let (splits, _) = split_plan(tiles, hkv, sms, 1);
    if 10 * hkv * splits < 9 * sms {
        return None;
    }
    info.shared_for_blocks_per_sm(decode_mma_shared_bytes(d), 1)
}

/// Dynamic shared memory for a decode grid of `ctas` CTAs of a kernel that needs `need` bytes: where the grid
/// is smaller than the CTAs the SMs hold, enough that an SM holds at most ceil(ctas / SMs) of them, so that
/// the block scheduler cannot stack them on some SMs and leave others idle (a grid planned for one CTA per SM
/// ran as if stacked without a hold, see decode_spread; a spread grid, at most one CTA per SM, gets its
/// request from here too); what the kernel needs otherwise. On the H100 the local window's 264 CTAs held to
/// two per SM took 7.75 µs against 8.1, Tq = 4 at ctx 4096 (256 CTAs) 10.97 against 11.25; generic ctx 4096
/// (256) did not move (docs/PERF.md). sm_120 / sm_121 hold one.
fn decode_hold(info: &DeviceInfo, need: usize, ctas: usize) -> usize {
    let per_sm = ctas.div_ceil(info.sm_count.max(1) as usize).max(1);
    if per_sm >= resident_ctas(info, need) {
        return need;
    }
    info.shared_for_blocks_per_sm(need, per_sm).unwrap_or(need)
}

/// Splits of the key range of each of `units` (sequence, KV head, row chunk) units and tiles per split,
/// for a key range of `tiles` tiles (a tile: MMA_TILE_KEYS keys per stream of a CTA), on `sms` SMs that
/// each hold `ctas_per_sm` decode CTAs.
///
/// As many splits as fill every resident slot in one wave, rounded down (at B = 64, 4K a fourth split
/// made 1.29 waves, and the 0.29 ran as a tail at a fraction of the bandwidth), at most one per tile and
/// MAX_SPLITS; the tiles are then spread evenly. Planning fewer CTAs than the SMs hold measured slower
/// (256 CTAs instead of 342 at Qwen3.5 ctx 32768 no faster; the generic shape and the batched rows 4-10%
/// slower, docs/PERF.md): they then run as if placed unevenly. Where fewer, longer CTAs pay, the launch
/// holds them to one per SM instead (decode_spread); a grid that falls short of the slots anyway (fewer
/// tiles than splits wanted) is held to its share of the SMs (decode_hold).
fn split_plan(tiles: usize, units: usize, sms: usize, ctas_per_sm: usize) -> (usize, usize) {
    let (tiles, units) = (tiles.max(1), units.max(1));
    let wanted = ((ctas_per_sm * sms) / units).clamp(1, tiles.min(MAX_SPLITS));
    let chunk = tiles.div_ceil(wanted);
    (tiles.div_ceil(chunk), chunk)
}

/// Shared memory a block may use on sm_120 / sm_121; every decode variant stays below it.
const SHARED_LIMIT: usize = 99 * 1024;

/// Warps, warps per KV stream (each owning D / slices output dims) and ring stages per stream of
/// `flash_decode_mma_kernel<D>` (DecodeMma::WARPS, DecodeMma::SLICES, DecodeMma::STAGES).
fn mma_warps(d: usize) -> usize {
    if d >= 256 {
        2
    } else {
        4
    }
}

fn mma_slices(d: usize) -> usize {
    if d >= 512 {
        2
    } else {
        1
    }
}

/// KV streams of one CTA of `flash_decode_mma_kernel<D>` (DecodeMma::STREAMS).
fn mma_streams(d: usize) -> usize {
    mma_warps(d) / mma_slices(d)
}

fn mma_stages(d: usize) -> usize {
    if d <= 64 {
        3
    } else {
        2
    }
}

/// Alignment the decode kernel gives its rings inside dynamic shared memory (SWIZZLE_ALIGN: the repeat of
/// the 128-byte swizzle); it may skip up to this many bytes to reach it.
const SWIZZLE_ALIGN: usize = 1024;

/// `sizeof(DecodeMmaShared<D>)` and the SWIZZLE_ALIGN bytes the kernel may skip before it: the union of
/// the streams' K/V rings (bf16 tiles of 16 keys × D, unpadded: swizzled) and the merge area (fp32 O, m
/// and l of every stream), then q [16][D + 8] bf16 and one 8-byte mbarrier per ring stage.
pub fn decode_mma_shared_bytes(d: usize) -> usize {
    mma_shared_bytes(d, mma_streams(d), mma_stages(d), MMA_ROWS)
}

/// The same for `streams` streams of `stages` stages and `q_rows` rows of q in shared memory.
fn mma_shared_bytes(d: usize, streams: usize, stages: usize, q_rows: usize) -> usize {
    let ring = streams * stages * 2 * MMA_TILE_KEYS * d * 2;
    let merge = streams * MMA_ROWS * d * 4 + 2 * streams * MMA_ROWS * 4;
    let bytes = ring.max(merge) + q_rows * (d + 8) * 2 + streams * stages * 8;
    bytes.div_ceil(8) * 8 + SWIZZLE_ALIGN
}

/// `decode_mma_shared_bytes` of the long variant: two streams of three stages, q in registers (one unused
/// row of it in shared memory).
fn decode_long_shared_bytes() -> usize {
    mma_shared_bytes(LONG_HEAD_DIM, LONG_STREAMS, LONG_STAGES, 1)
}

fn decode_mma_name(d: usize) -> KernelName {
    kernel_name!("flash_decode_mma_kernel<{d}>")
}

/// Head dim of the long variant of the decode kernel (`flash_decode_mma_kernel<D, true>`).
const LONG_HEAD_DIM: usize = 256;
/// KV streams, ring stages per stream and warps of the long variant (DecodeMma<256, true>): two warps per
/// stream, each owning half the output dims.
const LONG_STREAMS: usize = 2;
const LONG_STAGES: usize = 3;
const LONG_WARPS: usize = 2 * LONG_STREAMS;
/// Fewest tiles per stream of a split that take the long variant without being forced: a stream keeps all
/// its stages in flight from the first tile, which pays only where it has many (ctx 16384 and up on the
/// H100's one-CTA-per-SM plan for Qwen3.5; at ctx 4096, two tiles per stream, refilling each stage once
/// consumed measured 0.6 µs slower, docs/PERF.md).
const LONG_MIN_TILES: usize = 8;

fn decode_long_name() -> KernelName {
    kernel_name!("flash_decode_mma_kernel<{LONG_HEAD_DIM}, true>")
}

fn combine_name(d: usize) -> KernelName {
    kernel_name!("attention_combine_kernel<{d}>")
}

fn combine_rows_name(d: usize) -> KernelName {
    kernel_name!("attention_combine_rows_kernel<{d}>")
}

fn decode_instantiations() -> Vec<String> {
    let mut names = Vec::new();
    for d in HEAD_DIMS {
        names.push(decode_mma_name(d).to_string());
        if d == LONG_HEAD_DIM {
            names.push(decode_long_name().to_string());
        }
        names.push(combine_name(d).to_string());
        names.push(combine_rows_name(d).to_string());
    }
    names.extend(PREFILL_HEAD_DIMS.iter().map(|&d| prefill_name(d).to_string()));
    names
}

/// Head dimensions with a prefill kernel (all of them; at 512 two warps share each 16 rows).
pub const PREFILL_HEAD_DIMS: [usize; 4] = [64, 128, 256, 512];
/// Most query tokens of one prefill call.
pub const MAX_PREFILL_LEN: i64 = 8192;
/// Keys per prefill tile (PREFILL_N).
const PREFILL_N: usize = 32;

/// Query rows per prefill CTA (PrefillTile::M): 16 per warp, 16 per warp pair at D = 512.
fn prefill_m(d: usize) -> usize {
    if d >= 512 {
        32
    } else {
        64
    }
}

fn prefill_name(d: usize) -> KernelName {
    kernel_name!("attention_prefill_kernel<{d}>")
}

/// `sizeof(PrefillShared<D>)`: Q, one K and one V tile, rows padded by 8 elements.
pub fn prefill_shared_bytes(d: usize) -> usize {
    (prefill_m(d) + 2 * PREFILL_N) * (d + 8) * 2
}

/// Where the K and V caches keep a sequence's tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheLayout {
    /// Sequence b, token j, KV head h at `b·stride_seq + j·stride_token + h·stride_head` (elements), for
    /// `max_seq_len` tokens per sequence.
    Contiguous,
    /// Token j of sequence b in page `page_table[b·page_table_stride + j / page_size]`, at
    /// `page·stride_seq + (j mod page_size)·stride_token + h·stride_head`.
    Paged { page_table: u64, page_table_stride: i64, page_size: i64, num_pages: i64 },
}

/// One cache (K or V): address, strides in elements and the number of elements the caller owns there.
#[derive(Clone, Copy, Debug)]
pub struct CacheTensor {
    pub ptr: u64,
    /// Sequence stride (contiguous) or page stride (paged).
    pub stride_seq: i64,
    pub stride_token: i64,
    pub stride_head: i64,
    /// Elements from `ptr` that may be read; every address the strides can form must lie below it.
    pub elems: i64,
}

/// Arguments of [`decode`]: addresses in the context's memory, strides in elements, 0 meaning dense.
#[derive(Clone, Copy, Debug)]
pub struct DecodeArgs {
    /// bf16 [batch, q_len, num_q_heads, head_dim], strides (batch, token, head).
    pub q: u64,
    pub q_strides: [i64; 3],
    pub k: CacheTensor,
    pub v: CacheTensor,
    pub layout: CacheLayout,
    /// int32 [batch]: tokens in the cache per sequence, the q_len new ones included (read on the GPU,
    /// clamped to [0, max_seq_len]).
    pub seq_lens: u64,
    /// bf16 [batch, q_len, num_q_heads, head_dim], strides (batch, token, head).
    pub out: u64,
    pub out_strides: [i64; 3],
    /// fp32 [batch, q_len, num_q_heads] dense, natural log of the softmax denominator of the scaled
    /// (softcapped) logits; 0 for none.
    pub lse: u64,
    pub workspace: u64,
    pub workspace_bytes: u64,
    pub batch: i64,
    pub q_len: i64,
    pub num_q_heads: i64,
    pub num_kv_heads: i64,
    pub head_dim: i64,
    /// Host-known bound on every sequence length: sizes the split-KV grid and the cache extent.
    pub max_seq_len: i64,
    /// Attend only the last `window` positions up to each query's; None for full attention.
    pub window: Option<i64>,
    pub causal: bool,
    pub scale: f32,
    /// `cap · tanh(logit / cap)` when set.
    pub softcap: Option<f32>,
}

static SKEW_LENGTH_HINT: AtomicBool = AtomicBool::new(false);
static FORCE_LONG: AtomicBool = AtomicBool::new(false);

/// Tests only: while on, decode launches made from then on read a wrong length hint (DECODE_SKEW_HINT), so
/// that a GPU test can check that the windowed first tiles are issued again from the real length. Graphs
/// keep the setting they were captured with.
#[doc(hidden)]
pub fn skew_length_hint(on: bool) {
    SKEW_LENGTH_HINT.store(on, Ordering::Relaxed);
}

/// Tests only: while on, decode plans made from then on take the long variant of the kernel wherever it
/// can run (head dim 256, no window, one partial per stream), whatever the batch and the tiles per stream,
/// so that a GPU test can check it on short lengths, batches and every cache layout. Graphs keep the kernel
/// they were captured with.
#[doc(hidden)]
pub fn force_long_decode(on: bool) {
    FORCE_LONG.store(on, Ordering::Relaxed);
}

/// The validated problem and its launch plan.
#[derive(Clone, Copy, Debug)]
struct Plan {
    batch: usize,
    q_len: usize,
    hq: usize,
    hkv: usize,
    d: usize,
    group: usize,
    max_len: usize,
    /// CTAs per (sequence, KV head), MMA_ROWS rows each.
    row_chunks: usize,
    splits: usize,
    chunk_keys: usize,
    /// Dynamic shared memory the decode kernel is launched with: what it needs, or more where the grid is
    /// smaller than the resident slots, to hold it to its share of the SMs (decode_hold; one per SM where
    /// the plan spreads the CTAs, decode_spread).
    shared_bytes: usize,
    /// q is copied before the first tiles (DECODE_Q_FIRST): on the spread plan at head dim 256, where it
    /// measured 0.25–0.35 µs faster on the H100; at head dim 128 (spread) it measured 0.25 µs slower.
    q_first: bool,
    /// The long variant of the kernel runs (`flash_decode_mma_kernel<256, true>`, see long_split).
    long: bool,
    /// Each CTA asks L2 for the lines of its first tiles before the PDL wait (DECODE_PREFETCH), while the
    /// kernel before ends and DRAM is otherwise idle: where the grid is at most one CTA per SM, so that every
    /// CTA is resident from the start (a CTA of a later wave would start after the wait and ask for lines its
    /// copies fetch at once). On the H100 that took Qwen3.5 ctx 32768 from 27.2 to 26.2 µs and the generic
    /// shape's from 48.3 to 47.5. Grids of two or three CTAs per SM measured slower with it (Gemma 4 local,
    /// hd512 ctx 4096, Tq = 4: 0.5–0.8 µs; docs/PERF.md), so those go without.
    prefetch: bool,
    q_strides: [usize; 3],
    out_strides: [usize; 3],
}

impl Plan {
    fn rows_total(&self) -> usize {
        self.group * self.q_len
    }
    fn output_rows(&self) -> usize {
        self.batch * self.q_len * self.hq
    }
    /// Partial outputs per output row that the combine merges: one per split, or with several streams per
    /// CTA one per stream of each split (DECODE_STREAM_PARTIALS: the streams skip their merge through
    /// shared memory), as long as the combine takes that many (MAX_SPLITS) and a CTA holds at most 8 rows.
    /// The partials written and read grow with the rows and the merge saved does not: on the H100, 8 rows
    /// (Qwen3.5, Tq = 1) gained 0.35 µs at ctx 4096, 16 rows (Tq = 4) lost 1.3–1.5 µs (docs/PERF.md).
    fn parts(&self) -> usize {
        let streams = mma_streams(self.d);
        let rows = self.rows_total().min(MMA_ROWS);
        if self.splits > 1 && streams > 1 && rows <= MMA_ROWS / 2 && self.splits * streams <= MAX_SPLITS {
            self.splits * streams
        } else {
            self.splits
        }
    }
    /// Whether this plan takes the long variant of the decode kernel: head dim 256 without a window and with
    /// one partial per stream (the variant writes no other), one sequence and at least LONG_MIN_TILES tiles
    /// per stream, or any of those where `forced`. On the H100 it took Qwen3.5 ctx 32768 from 27.62 to 27.13
    /// µs, and its third stage the paged (page 64) row from 28.47 to 27.95; as a runtime switch it was 13%
    /// slower at B = 16 with lengths 1K–32K, which it does not take (docs/PERF.md).
    fn long_split(&self, window: bool, forced: bool) -> bool {
        let tiles = self.chunk_keys / (mma_streams(self.d) * MMA_TILE_KEYS);
        self.d == LONG_HEAD_DIM
            && !window
            && self.parts() > self.splits
            && (forced || (self.batch == 1 && tiles >= LONG_MIN_TILES))
    }
    /// Kernel and threads per CTA of the decode launch.
    fn decode_kernel(&self) -> (KernelName, u32) {
        if self.long {
            (decode_long_name(), (LONG_WARPS * 32) as u32)
        } else {
            (decode_mma_name(self.d), (mma_warps(self.d) * 32) as u32)
        }
    }
    /// Shared memory the decode kernel of this plan needs.
    fn kernel_shared_bytes(&self) -> usize {
        if self.long {
            decode_long_shared_bytes()
        } else {
            decode_mma_shared_bytes(self.d)
        }
    }
    /// Bytes of split partials: fp32 outputs [rows][parts][D] then fp32 lse [rows][parts].
    fn workspace_bytes(&self) -> usize {
        if self.splits <= 1 {
            0
        } else {
            self.output_rows() * self.parts() * (self.d + 1) * 4
        }
    }
}

/// Resolves the (batch, token, head) strides of a [B, Tq, H, D] tensor (0 = dense) and returns them with
/// the extent in elements.
fn activation_strides(name: &str, s: [i64; 3], b: usize, t: usize, h: usize, d: usize) -> Result<([usize; 3], u64)> {
    let dense = [t * h * d, h * d, d];
    let mut out = [0usize; 3];
    for (i, what) in ["batch", "token", "head"].iter().enumerate() {
        if s[i] < 0 {
            return Err(Error::invalid(format!("{name}: {what} stride {} is negative", s[i])));
        }
        out[i] = if s[i] == 0 { dense[i] } else { s[i] as usize };
        if out[i] % 8 != 0 {
            return Err(Error::invalid(format!(
                "{name}: {what} stride {} must be a multiple of 8 elements for 16-byte vector access",
                out[i]
            )));
        }
    }
    if out[2] < d {
        return Err(Error::invalid(format!("{name}: head stride {} is smaller than head_dim {d}", out[2])));
    }
    let extent = extent_elems(&[(b, out[0]), (t, out[1]), (h, out[2])], d)
        .ok_or_else(|| Error::invalid(format!("{name}: size overflows")))?;
    Ok((out, extent))
}

/// Elements from the first to one past the last: `Σ (size_i − 1)·stride_i + d`.
fn extent_elems(dims: &[(usize, usize)], d: usize) -> Option<u64> {
    let mut e = d as u64;
    for &(n, s) in dims {
        e = e.checked_add((n as u64).checked_sub(1)?.checked_mul(s as u64)?)?;
    }
    Some(e)
}

fn check_cache(
    name: &str,
    c: &CacheTensor,
    layout: &CacheLayout,
    batch: usize,
    max_len: usize,
    hkv: usize,
    d: usize,
) -> Result<()> {
    check_ptr(name, c.ptr, 16)?;
    for (what, s) in [("stride_seq", c.stride_seq), ("stride_token", c.stride_token), ("stride_head", c.stride_head)] {
        if s <= 0 {
            return Err(Error::invalid(format!("{name}: {what} must be positive, got {s}")));
        }
        if s % 8 != 0 {
            return Err(Error::invalid(format!(
                "{name}: {what} {s} must be a multiple of 8 elements for 16-byte vector access"
            )));
        }
    }
    let (slots, tokens) = match *layout {
        CacheLayout::Contiguous => (batch, max_len),
        CacheLayout::Paged { num_pages, page_size, .. } => (num_pages as usize, page_size as usize),
    };
    // Decode reads the cache through a tensor map, whose byte strides stay below 2^40 (the stride of a
    // dimension of one element is never applied, and is not passed on).
    for (what, s, n) in [
        ("stride_seq", c.stride_seq, slots),
        ("stride_token", c.stride_token, tokens),
        ("stride_head", c.stride_head, hkv),
    ] {
        if n > 1 && s as u64 * 2 >= tensor_map::MAX_STRIDE_BYTES {
            return Err(Error::unsupported(format!(
                "{name}: {what} {s} elements is 2^40 bytes or more, more than a TMA tensor map can stride"
            )));
        }
    }
    let need = extent_elems(
        &[(slots, c.stride_seq as usize), (tokens, c.stride_token as usize), (hkv, c.stride_head as usize)],
        d,
    )
    .ok_or_else(|| Error::invalid(format!("{name}: size overflows")))?;
    if c.elems <= 0 || need > c.elems as u64 {
        return Err(Error::invalid(format!(
            "{name}: the strides reach {need} elements but the cache holds {} (cache_elems)",
            c.elems
        )));
    }
    if c.ptr.checked_add(need * 2).is_none() {
        return Err(Error::invalid(format!("{name}: the cache overflows the address space")));
    }
    Ok(())
}

fn validate(a: &DecodeArgs, device: Option<&DeviceInfo>, max_q_len: i64) -> Result<Plan> {
    let d = a.head_dim;
    if !HEAD_DIMS.contains(&(d as usize)) || d <= 0 {
        return Err(Error::unsupported(format!("head_dim: {d} has no kernel; supported: 64, 128, 256, 512")));
    }
    let d = d as usize;
    let batch = check_dim("batch", a.batch, i32::MAX as i64 / 65536)?;
    let q_len = check_dim("q_len", a.q_len, max_q_len)?;
    let hkv = check_dim("num_kv_heads", a.num_kv_heads, 1024)?;
    let hq = check_dim("num_q_heads", a.num_q_heads, 16 * 1024)?;
    if hq % hkv != 0 {
        return Err(Error::invalid(format!("num_q_heads: {hq} is not a multiple of num_kv_heads {hkv}")));
    }
    let group = hq / hkv;
    if !GROUPS.contains(&group) {
        return Err(Error::unsupported(format!(
            "num_q_heads: GQA group {hq}/{hkv} = {group} has no kernel; supported: 1, 2, 4, 8, 16"
        )));
    }
    // Positions are int32 in the kernel; this bound keeps every sum of a position, a window and a split
    // offset below 2^31.
    let max_len = check_dim("max_seq_len", a.max_seq_len, MAX_SEQ_LEN)?;
    if let Some(w) = a.window {
        if w <= 0 {
            return Err(Error::invalid(format!("window: {w} must be positive (or no window)")));
        }
    }
    if !a.scale.is_finite() {
        return Err(Error::invalid(format!("scale: {} is not finite", a.scale)));
    }
    if let Some(cap) = a.softcap {
        if !(cap.is_finite() && cap > 0.0) {
            return Err(Error::invalid(format!("softcap: {cap} must be finite and positive (or off)")));
        }
    }
    if let CacheLayout::Paged { page_table, page_table_stride, page_size, num_pages } = a.layout {
        if page_table == 0 {
            return Err(Error::invalid("page_table: NULL pointer in paged mode"));
        }
        check_ptr("page_table", page_table, 4)?;
        if !(MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&page_size) || page_size.count_ones() != 1 {
            return Err(Error::invalid(format!("page_size: {page_size} is not a power of two from 16 to 256")));
        }
        check_dim("num_pages", num_pages, i32::MAX as i64)?;
        let pages = max_len.div_ceil(page_size as usize);
        if page_table_stride < 0 || (page_table_stride != 0 && (page_table_stride as usize) < pages) {
            return Err(Error::invalid(format!(
                "page_table_stride: {page_table_stride} is smaller than the {pages} pages max_seq_len needs"
            )));
        }
    }
    check_cache("k_cache", &a.k, &a.layout, batch, max_len, hkv, d)?;
    check_cache("v_cache", &a.v, &a.layout, batch, max_len, hkv, d)?;
    check_ptr("q", a.q, 16)?;
    check_ptr("out", a.out, 16)?;
    check_ptr("seq_lens", a.seq_lens, 4)?;
    if a.lse != 0 {
        check_ptr("lse", a.lse, 4)?;
    }
    let (q_strides, q_extent) = activation_strides("q", a.q_strides, batch, q_len, hq, d)?;
    let (out_strides, out_extent) = activation_strides("out", a.out_strides, batch, q_len, hq, d)?;
    let out_bytes = out_extent * 2;
    let caches = [
        ("q", a.q, q_extent * 2),
        ("k_cache", a.k.ptr, a.k.elems as u64 * 2),
        ("v_cache", a.v.ptr, a.v.elems as u64 * 2),
    ];
    for (what, ptr, bytes) in caches {
        if overlaps(a.out, out_bytes, ptr, bytes) {
            return Err(Error::invalid(format!("out: overlaps {what}")));
        }
    }

    let rows_total = group * q_len;
    let row_chunks = rows_total.div_ceil(MMA_ROWS);
    // Split the key range a sequence can have over one wave of CTAs (split_plan), of one CTA per SM where
    // the launch spreads them (decode_spread) and of every CTA the SMs hold otherwise; a split holds at least
    // one tile per stream (so that a short context is fetched in one round trip) and whole tiles. With a
    // window the range is the window of the first new token and the last, and starts at the first visible
    // key rounded down to a tile (up to MMA_TILE_KEYS - 1 keys more).
    let keys = mma_streams(d) * MMA_TILE_KEYS;
    let span = match a.window {
        Some(w) => max_len.min(w as usize + q_len - 1 + MMA_TILE_KEYS - 1),
        None => max_len,
    };
    let tiles = span.div_ceil(keys);
    let units = batch * hkv * row_chunks;
    let (sms, ctas_per_sm) = decode_slots(device, d);
    let spread = device.and_then(|info| decode_spread(info, d, batch, hkv, row_chunks, tiles));
    let (splits, chunk_tiles) = split_plan(tiles, units, sms, if spread.is_some() { 1 } else { ctas_per_sm });
    let mut plan = Plan {
        batch,
        q_len,
        hq,
        hkv,
        d,
        group,
        max_len,
        row_chunks,
        splits,
        chunk_keys: chunk_tiles * keys,
        shared_bytes: 0,
        q_first: spread.is_some() && d == 256,
        long: false,
        prefetch: device.is_some() && units * splits <= sms,
        q_strides,
        out_strides,
    };
    plan.long = plan.long_split(a.window.is_some(), FORCE_LONG.load(Ordering::Relaxed));
    // Spread or not, the grid's CTAs per SM follow from its size and the kernel it launches (a spread grid's
    // request is decode_spread's).
    let need = plan.kernel_shared_bytes();
    plan.shared_bytes = device.map_or(need, |info| decode_hold(info, need, units * splits));
    if units > i32::MAX as usize {
        return Err(Error::unsupported(format!(
            "batch: {batch} sequences × {hkv} KV heads × {row_chunks} row chunks exceed one launch's grid"
        )));
    }
    if let Some(bytes) = (a.lse != 0).then_some(plan.output_rows() as u64 * 4) {
        if overlaps(a.out, out_bytes, a.lse, bytes) {
            return Err(Error::invalid("lse: overlaps out"));
        }
    }
    Ok(plan)
}

/// Bytes of workspace [`decode`] needs for these arguments on this context (0 on the CPU backend and
/// whenever one split suffices). Pointers in `a` are not looked at.
pub fn decode_workspace_size(ctx: &Context, a: &DecodeArgs) -> Result<usize> {
    match ctx.backend() {
        // Checked all the same, so that a bad shape fails here as it would on a GPU.
        Backend::Cpu => validate_shape_only(a, None).map(|_| 0),
        Backend::Cuda(device) => Ok(validate_shape_only(a, Some(&device.info))?.workspace_bytes()),
    }
}

/// The plan of `a` from its sizes alone: placeholder aligned addresses stand in for the pointers, so a
/// caller may ask for the workspace before allocating anything.
fn validate_shape_only(a: &DecodeArgs, device: Option<&DeviceInfo>) -> Result<Plan> {
    let mut probe = *a;
    // Distinct, aligned, non-overlapping stand-ins far apart in the address space.
    let base = 1u64 << 40;
    probe.q = base;
    probe.k.ptr = base * 2;
    probe.v.ptr = base * 3;
    probe.seq_lens = base * 4;
    probe.out = base * 5;
    probe.lse = if a.lse != 0 { base * 6 } else { 0 };
    if let CacheLayout::Paged { page_table, .. } = &mut probe.layout {
        *page_table = base * 7;
    }
    validate(&probe, device, MAX_Q_LEN)
}

/// Mirror of `DecodeParams` in decode.cu, passed by value as the kernel's one argument.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct KernelParams {
    /// Decode only ([`TensorMap::NONE`] for prefill): the caches as the tensor maps of [`cache_tensor_map`].
    k_map: TensorMap,
    v_map: TensorMap,
    q: u64,
    q_stride_batch: i64,
    q_stride_token: i64,
    q_stride_head: i64,
    k: u64,
    k_stride_seq: i64,
    k_stride_token: i64,
    k_stride_head: i64,
    v: u64,
    v_stride_seq: i64,
    v_stride_token: i64,
    v_stride_head: i64,
    seq_lens: u64,
    page_table: u64,
    page_table_stride: i64,
    out: u64,
    out_stride_batch: i64,
    out_stride_token: i64,
    out_stride_head: i64,
    lse: u64,
    part_o: u64,
    part_lse: u64,
    batch: i32,
    tq: i32,
    hq: i32,
    hkv: i32,
    group: i32,
    rows_total: i32,
    row_chunks: i32,
    max_len: i32,
    window: i32,
    causal: i32,
    num_splits: i32,
    chunk_keys: i32,
    page_shift: i32,
    num_pages: i32,
    scale: f32,
    softcap: f32,
    flags: i32,
}

// The size and alignment decode.cu asserts for DecodeParams, and where each group of fields starts.
const _: () = {
    assert!(std::mem::size_of::<KernelParams>() == 512);
    assert!(std::mem::align_of::<KernelParams>() == 64);
    assert!(std::mem::offset_of!(KernelParams, v_map) == 128);
    assert!(std::mem::offset_of!(KernelParams, q) == 256);
    assert!(std::mem::offset_of!(KernelParams, batch) == 432);
    assert!(std::mem::offset_of!(KernelParams, softcap) == 492);
};

/// The tensor map through which the decode kernel reads one cache: 5-d, innermost first (64 elements =
/// 128 bytes of a head row, token, 64-element chunk of the row, KV head, sequence or page), with the
/// cache's strides, read in boxes of one tile (64, MMA_TILE_KEYS, D / 64, 1, 1) that land 128-byte
/// swizzled. Tokens run to max_seq_len (contiguous) or page_size (paged): keys past them, and pages
/// outside [0, num_pages), read as zeros.
fn cache_tensor_map(
    device: &crate::runtime::Device,
    name: &str,
    c: &CacheTensor,
    layout: &CacheLayout,
    plan: &Plan,
) -> Result<TensorMap> {
    let (tokens, slots) = match *layout {
        CacheLayout::Contiguous => (plan.max_len as u64, plan.batch as u64),
        CacheLayout::Paged { page_size, num_pages, .. } => (page_size as u64, num_pages as u64),
    };
    let dims = [64, tokens, (plan.d / 64) as u64, plan.hkv as u64, slots];
    let mut strides = [c.stride_token as u64 * 2, 128, c.stride_head as u64 * 2, c.stride_seq as u64 * 2];
    // A dimension of one element is only read at coordinate 0: any valid stride will do for it (check_cache
    // lets an oversized one through there).
    for (stride, &dim) in strides.iter_mut().zip(&dims[1..]) {
        if dim == 1 {
            *stride = (*stride).min(tensor_map::MAX_STRIDE_BYTES - 16);
        }
    }
    let boxes = [64, MMA_TILE_KEYS as u32, (plan.d / 64) as u32, 1, 1];
    Bf16Tiled5d { address: c.ptr, dims, strides, boxes }.encode(device, name)
}

/// Checks the device buffers of `a` and builds the kernel's parameters (no split partials).
fn device_params(device: &crate::runtime::Device, a: &DecodeArgs, plan: &Plan) -> Result<KernelParams> {
    let q_extent = extent_elems(
        &[(plan.batch, plan.q_strides[0]), (plan.q_len, plan.q_strides[1]), (plan.hq, plan.q_strides[2])],
        plan.d,
    )
    .unwrap_or(0);
    let out_extent = extent_elems(
        &[(plan.batch, plan.out_strides[0]), (plan.q_len, plan.out_strides[1]), (plan.hq, plan.out_strides[2])],
        plan.d,
    )
    .unwrap_or(0);
    device.check_buffer("q", a.q, q_extent * 2)?;
    device.check_buffer("out", a.out, out_extent * 2)?;
    device.check_buffer("k_cache", a.k.ptr, a.k.elems as u64 * 2)?;
    device.check_buffer("v_cache", a.v.ptr, a.v.elems as u64 * 2)?;
    device.check_buffer("seq_lens", a.seq_lens, plan.batch as u64 * 4)?;
    if a.lse != 0 {
        device.check_buffer("lse", a.lse, plan.output_rows() as u64 * 4)?;
    }
    let (page_table, page_table_stride, page_shift, num_pages) = match a.layout {
        CacheLayout::Contiguous => (0, 0, 0, 0),
        CacheLayout::Paged { page_table, page_table_stride, page_size, num_pages } => {
            let pages = plan.max_len.div_ceil(page_size as usize);
            let stride = if page_table_stride == 0 { pages } else { page_table_stride as usize };
            device.check_buffer("page_table", page_table, (((plan.batch - 1) * stride + pages) * 4) as u64)?;
            (page_table, stride as i64, page_size.trailing_zeros() as i32, num_pages as i32)
        }
    };
    Ok(KernelParams {
        k_map: TensorMap::NONE,
        v_map: TensorMap::NONE,
        q: a.q,
        q_stride_batch: plan.q_strides[0] as i64,
        q_stride_token: plan.q_strides[1] as i64,
        q_stride_head: plan.q_strides[2] as i64,
        k: a.k.ptr,
        k_stride_seq: a.k.stride_seq,
        k_stride_token: a.k.stride_token,
        k_stride_head: a.k.stride_head,
        v: a.v.ptr,
        v_stride_seq: a.v.stride_seq,
        v_stride_token: a.v.stride_token,
        v_stride_head: a.v.stride_head,
        seq_lens: a.seq_lens,
        page_table,
        page_table_stride,
        out: a.out,
        out_stride_batch: plan.out_strides[0] as i64,
        out_stride_token: plan.out_strides[1] as i64,
        out_stride_head: plan.out_strides[2] as i64,
        lse: a.lse,
        part_o: 0,
        part_lse: 0,
        batch: plan.batch as i32,
        tq: plan.q_len as i32,
        hq: plan.hq as i32,
        hkv: plan.hkv as i32,
        group: plan.group as i32,
        rows_total: plan.rows_total() as i32,
        row_chunks: plan.row_chunks as i32,
        max_len: plan.max_len as i32,
        // A window longer than every position is no window; the clamp keeps `pos - window` in range.
        window: a.window.map_or(0, |w| w.min((plan.max_len + plan.q_len) as i64) as i32),
        causal: a.causal as i32,
        num_splits: plan.parts() as i32,
        chunk_keys: plan.chunk_keys as i32,
        page_shift,
        num_pages,
        scale: a.scale,
        softcap: a.softcap.unwrap_or(0.0),
        // DECODE_STREAM_PARTIALS | DECODE_Q_FIRST | DECODE_SKEW_HINT | DECODE_PREFETCH
        flags: i32::from(plan.parts() > plan.splits)
            | i32::from(plan.q_first) << 1
            | i32::from(SKEW_LENGTH_HINT.load(Ordering::Relaxed)) << 2
            | i32::from(plan.prefetch) << 3,
    })
}

/// Flash decode: `out[b, t, h] = softmax_j(mask(softcap(scale · q[b, t, h] · k[b, j, h / group])))ᵀ · v`.
/// See [`DecodeArgs`] and the kernel for the masking rules.
///
/// # Safety
/// Every address in `a` must point to memory of the context's kind (device memory of its device, or host
/// memory for the CPU backend) holding the extent its shape and strides describe; `seq_lens` and the page
/// table hold `batch` (rows of) int32 values. Device extents are checked against their allocations.
pub unsafe fn decode(ctx: &Context, a: &DecodeArgs, stream: Stream) -> Result<()> {
    ctx.check_stream(stream)?;
    match ctx.backend() {
        Backend::Cpu => {
            let plan = validate(a, None, MAX_Q_LEN)?;
            unsafe { decode_cpu(a, &plan) };
            Ok(())
        }
        Backend::Cuda(device) => {
            let plan = validate(a, Some(&device.info), MAX_Q_LEN)?;
            let need = plan.workspace_bytes();
            if need > 0 {
                if a.workspace == 0 || (a.workspace_bytes as usize) < need {
                    return Err(Error::invalid(format!(
                        "workspace: {} bytes given, {need} needed for {} splits (ask the workspace-size function)",
                        a.workspace_bytes, plan.splits
                    )));
                }
                check_ptr("workspace", a.workspace, 16)?;
                device.check_buffer("workspace", a.workspace, need as u64)?;
            }
            let mut params = device_params(device, a, &plan)?;
            params.k_map = cache_tensor_map(device, "k_cache", &a.k, &a.layout, &plan)?;
            params.v_map = cache_tensor_map(device, "v_cache", &a.v, &a.layout, &plan)?;
            if plan.splits > 1 {
                params.part_o = a.workspace;
                params.part_lse = a.workspace + (plan.output_rows() * plan.parts() * plan.d * 4) as u64;
            }
            let split = plan.splits > 1;
            let ((name, threads), need) = (plan.decode_kernel(), plan.kernel_shared_bytes());
            // Every variant fits (see the tests below); this guards the tables against a future edit.
            if need > SHARED_LIMIT {
                return Err(Error::internal(format!("{name} needs {need} bytes of shared memory")));
            }
            let shared = plan.shared_bytes;
            let kernel = device.kernel(&DECODE_SOURCE, &name)?;
            kernel.set_max_dynamic_shared(shared as u32)?;
            let grid = ((plan.batch * plan.hkv * plan.row_chunks) as u32, plan.splits as u32, 1);
            let mut args = crate::kernel_args![params];
            // Programmatic dependent launch: the kernels wait (griddepcontrol.wait) before reading anything,
            // so only their launch overlaps the kernel before them.
            unsafe { device.launch_dependent(&kernel, grid, (threads, 1, 1), shared as u32, stream.raw(), &mut args)? };
            if split {
                // Programmatic dependent launch: the kernel waits for the decode grid before reading.
                let (name, grid, threads) = combine_launch(&plan);
                let combine = device.kernel(&DECODE_SOURCE, &name)?;
                let mut args = crate::kernel_args![params];
                unsafe { device.launch_dependent(&combine, grid, (threads, 1, 1), 0, stream.raw(), &mut args)? };
            }
            Ok(())
        }
    }
}

/// The split combine of `plan`: kernel, grid and threads per block. Rows with at most COMBINE_ROWS_MAX_PARTS
/// partials take `attention_combine_rows_kernel`, COMBINE_ROWS_THREADS / (D / 8) rows per block; others
/// `attention_combine_kernel`, one block per row and chunk of COMBINE_LANES · 8 dims.
fn combine_launch(plan: &Plan) -> (KernelName, (u32, u32, u32), u32) {
    if plan.parts() <= COMBINE_ROWS_MAX_PARTS {
        let blocks = plan.output_rows().div_ceil(COMBINE_ROWS_THREADS / (plan.d / 8));
        (combine_rows_name(plan.d), (blocks as u32, 1, 1), COMBINE_ROWS_THREADS as u32)
    } else {
        let grid = (plan.output_rows() as u32, (plan.d / (COMBINE_LANES * 8)) as u32, 1);
        (combine_name(plan.d), grid, COMBINE_THREADS)
    }
}

/// Prefill: the same attention as [`decode`] for a chunk of `q_len` = 1 to 8192 new tokens (the last
/// `q_len` of each sequence's cache), on tensor cores. Every head dimension of [`decode`]; no workspace.
///
/// # Safety
/// As [`decode`].
pub unsafe fn prefill(ctx: &Context, a: &DecodeArgs, stream: Stream) -> Result<()> {
    ctx.check_stream(stream)?;
    match ctx.backend() {
        Backend::Cpu => {
            let plan = validate(a, None, MAX_PREFILL_LEN)?;
            unsafe { decode_cpu(a, &plan) };
            Ok(())
        }
        Backend::Cuda(device) => {
            let plan = validate(a, Some(&device.info), MAX_PREFILL_LEN)?;
            if plan.batch > 65535 {
                return Err(Error::unsupported(format!("batch: {} exceeds the prefill grid's 65535", plan.batch)));
            }
            let mut params = device_params(device, a, &plan)?;
            let shared = prefill_shared_bytes(plan.d);
            if shared > SHARED_LIMIT {
                return Err(Error::internal(format!(
                    "prefill kernel D={} needs {shared} bytes of shared memory",
                    plan.d
                )));
            }
            let kernel = device.kernel(&DECODE_SOURCE, &prefill_name(plan.d))?;
            kernel.set_max_dynamic_shared(shared as u32)?;
            // Query heads along x, row blocks along y (the kernel takes them from the last: under causal
            // masking those see the most keys, so they go first).
            let grid = (plan.hq as u32, plan.q_len.div_ceil(prefill_m(plan.d)) as u32, plan.batch as u32);
            let mut args = crate::kernel_args![params];
            unsafe { device.launch(&kernel, grid, (PREFILL_THREADS, 1, 1), shared as u32, stream.raw(), &mut args) }
        }
    }
}

/// The CPU backend: gathers each sequence's visible cache rows and runs the reference.
///
/// # Safety
/// As [`decode`], with host memory.
unsafe fn decode_cpu(a: &DecodeArgs, plan: &Plan) {
    let d = plan.d;
    let lens: Vec<usize> = (0..plan.batch)
        .map(|b| unsafe { *(a.seq_lens as *const i32).add(b) }.clamp(0, plan.max_len as i32) as usize)
        .collect();
    let mut q = Vec::with_capacity(plan.output_rows() * d);
    for b in 0..plan.batch {
        for t in 0..plan.q_len {
            for h in 0..plan.hq {
                let off = b * plan.q_strides[0] + t * plan.q_strides[1] + h * plan.q_strides[2];
                q.extend_from_slice(unsafe { std::slice::from_raw_parts((a.q as *const bf16).add(off), d) });
            }
        }
    }
    let zeros = vec![bf16::ZERO; d];
    let row = |c: &CacheTensor, b: usize, j: usize, h: usize| -> &[bf16] {
        let slot_token = match a.layout {
            CacheLayout::Contiguous => b * c.stride_seq as usize + j * c.stride_token as usize,
            CacheLayout::Paged { page_table, page_table_stride, page_size, num_pages } => {
                let ps = page_size as usize;
                let stride =
                    if page_table_stride == 0 { plan.max_len.div_ceil(ps) } else { page_table_stride as usize };
                let page = unsafe { *(page_table as *const i32).add(b * stride + j / ps) };
                // As the GPU kernels: the keys of an out-of-range page id read as zeros.
                if page < 0 || page as i64 >= num_pages {
                    return &zeros;
                }
                page as usize * c.stride_seq as usize + (j % ps) * c.stride_token as usize
            }
        };
        unsafe { std::slice::from_raw_parts((c.ptr as *const bf16).add(slot_token + h * c.stride_head as usize), d) }
    };
    let gather = |c: &CacheTensor| -> Vec<Vec<bf16>> {
        (0..plan.batch)
            .map(|b| {
                let mut seq = Vec::with_capacity(lens[b] * plan.hkv * d);
                for j in 0..lens[b] {
                    for h in 0..plan.hkv {
                        seq.extend_from_slice(row(c, b, j, h));
                    }
                }
                seq
            })
            .collect()
    };
    let (k, v) = (gather(&a.k), gather(&a.v));
    let problem = refattn::DecodeProblem {
        batch: plan.batch,
        q_len: plan.q_len,
        num_q_heads: plan.hq,
        num_kv_heads: plan.hkv,
        head_dim: d,
        window: a.window.map(|w| w as usize),
        causal: a.causal,
        scale: a.scale,
        softcap: a.softcap,
    };
    let mut out = vec![reference::bf16::ZERO; plan.output_rows() * d];
    let mut lse = vec![0f32; plan.output_rows()];
    refattn::decode(&problem, &q, &k, &v, &mut out, &mut lse);
    let mut i = 0;
    for b in 0..plan.batch {
        for t in 0..plan.q_len {
            for h in 0..plan.hq {
                let off = b * plan.out_strides[0] + t * plan.out_strides[1] + h * plan.out_strides[2];
                unsafe { std::ptr::copy_nonoverlapping(out.as_ptr().add(i * d), (a.out as *mut bf16).add(off), d) };
                i += 1;
            }
        }
    }
    if a.lse != 0 {
        unsafe { std::ptr::copy_nonoverlapping(lse.as_ptr(), a.lse as *mut f32, lse.len()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_fits_sm120_shared_memory() {
        for d in PREFILL_HEAD_DIMS {
            assert!(prefill_shared_bytes(d) <= SHARED_LIMIT, "prefill D={d}");
        }
        for d in HEAD_DIMS {
            assert!(decode_mma_shared_bytes(d) <= SHARED_LIMIT, "mma decode D={d}");
            assert_eq!(mma_warps(d) % mma_slices(d), 0, "mma decode D={d}");
        }
        assert!(decode_long_shared_bytes() <= SHARED_LIMIT, "long decode");
        assert_eq!(decode_long_shared_bytes(), 3 * 2 * 2 * 16 * 256 * 2 + 528 + 48 + SWIZZLE_ALIGN);
        assert!(device(170, 100).blocks_per_sm_by_shared(decode_long_shared_bytes()) >= 1);
    }

    /// A device of `sms` SMs with `shared_per_sm` KiB of shared memory each (1 KiB reserved per block, the
    /// rest open to one block).
    fn device(sms: i32, shared_per_sm: i32) -> DeviceInfo {
        DeviceInfo {
            ordinal: 0,
            name: String::new(),
            cc_major: 0,
            cc_minor: 0,
            sm_count: sms,
            total_memory: 0,
            l2_bytes: 0,
            max_shared_per_block_optin: (shared_per_sm - 1) * 1024,
            max_shared_per_sm: shared_per_sm * 1024,
            reserved_shared_per_block: 1024,
        }
    }

    #[test]
    fn ctas_per_sm_follow_shared_memory() {
        let (h100, sm120) = (device(132, 228), device(170, 100));
        assert_eq!([64, 128, 256, 512].map(|d| decode_slots(Some(&h100), d)), [(132, 3), (132, 3), (132, 3), (132, 2)]);
        assert_eq!([64, 128, 256, 512].map(|d| decode_slots(Some(&sm120), d).1), [1, 1, 1, 1]);
        assert_eq!(decode_slots(None, 256), (1, 1));
    }

    #[test]
    fn grids_below_the_resident_slots_are_held_to_their_share() {
        let (h100, sm120) = (device(132, 228), device(170, 100));
        let need = decode_mma_shared_bytes(256);
        // The local window: 8 KV heads × 33 splits = 264 CTAs of 396 slots, two per SM.
        assert_eq!(split_plan(33, 8, 132, 3), (33, 1));
        let held = decode_hold(&h100, need, 264);
        assert!(held > need && held <= SHARED_LIMIT && held.is_multiple_of(16));
        assert_eq!(h100.blocks_per_sm_by_shared(held), 2);
        // One per SM below the SM count; a grid of every slot or more, and sm_120's one slot, keep the need.
        assert_eq!(h100.blocks_per_sm_by_shared(decode_hold(&h100, need, 100)), 1);
        assert_eq!([265, 396, 1000].map(|n| decode_hold(&h100, need, n)), [need; 3]);
        assert_eq!(decode_hold(&sm120, need, 100), need);
        assert_eq!(h100.blocks_per_sm_by_shared(decode_hold(&h100, decode_mma_shared_bytes(512), 100)), 1);
        assert_eq!(decode_hold(&h100, decode_mma_shared_bytes(512), 133), decode_mma_shared_bytes(512));
        // A spread grid (Qwen3.5 ctx 32768: 2 KV heads × 64 splits) gets decode_spread's request.
        assert_eq!(Some(decode_hold(&h100, need, 128)), decode_spread(&h100, 256, 1, 2, 1, 1024));
    }

    #[test]
    fn single_sequences_spread_one_cta_per_sm() {
        let (h100, sm120) = (device(132, 228), device(170, 100));
        // Qwen3.5 (D = 256, 2 KV heads) ctx 32768 and 4096: one CTA per SM, 64 splits each.
        let qwen = decode_spread(&h100, 256, 1, 2, 1, 1024).expect("Qwen3.5 ctx 32768 spreads");
        assert_eq!(decode_spread(&h100, 256, 1, 2, 1, 128), Some(qwen));
        assert_eq!((split_plan(1024, 2, 132, 1), split_plan(128, 2, 132, 1)), ((64, 16), (64, 2)));
        assert!(qwen >= decode_mma_shared_bytes(256) && qwen <= h100.max_shared_per_block_optin as usize);
        assert_eq!((h100.blocks_per_sm_by_shared(qwen), qwen % 16), (1, 0));
        // The generic shape (D = 128, 8 KV heads) ctx 32768: 16 splits, 128 CTAs.
        assert!(decode_spread(&h100, 128, 1, 8, 1, 512).is_some());
        // The local window: 11 splits of 3 tiles would leave 44 SMs idle.
        assert_eq!(decode_spread(&h100, 256, 1, 8, 1, 33), None);
        // D = 512 (two warps per stream), two row chunks (Tq = 4), a batch: as many CTAs as the SMs hold.
        assert_eq!(decode_spread(&h100, 512, 1, 2, 1, 2048), None);
        assert_eq!(decode_spread(&h100, 256, 1, 2, 2, 1024), None);
        assert_eq!(decode_spread(&h100, 256, 16, 2, 1, 1024), None);
        // sm_120 holds one decode CTA per SM anyway.
        assert_eq!(decode_spread(&sm120, 256, 1, 2, 1, 1024), None);
        // A request past what one block may opt in to: no spread.
        let mut capped = device(132, 228);
        capped.max_shared_per_block_optin = 100 * 1024;
        assert_eq!(capped.shared_for_blocks_per_sm(decode_mma_shared_bytes(256), 1), None);
        assert_eq!(decode_spread(&capped, 256, 1, 2, 1, 1024), None);
        assert_eq!(h100.shared_for_blocks_per_sm(150 * 1024, 1), Some(150 * 1024));
    }

    /// A plan of `splits` splits at head dim `d` (one sequence, one token, 16/2 heads).
    fn plan_of(d: usize, splits: usize) -> Plan {
        Plan {
            batch: 1,
            q_len: 1,
            hq: 16,
            hkv: 2,
            d,
            group: 8,
            max_len: 32768,
            row_chunks: 1,
            splits,
            chunk_keys: 32,
            shared_bytes: decode_mma_shared_bytes(d),
            q_first: false,
            long: false,
            prefetch: false,
            q_strides: [0; 3],
            out_strides: [0; 3],
        }
    }

    #[test]
    fn stream_partials_stay_within_what_the_combine_takes() {
        // Qwen3.5 on the H100's spread plan: 64 splits of two streams, 128 partials per row.
        assert_eq!(plan_of(256, 64).parts(), 128);
        // One split: no partials; one stream (D = 512): one per split; past MAX_SPLITS: one per split.
        assert_eq!((plan_of(256, 1).parts(), plan_of(256, 1).workspace_bytes()), (1, 0));
        assert_eq!(plan_of(512, 128).parts(), 128);
        assert_eq!(plan_of(128, 65).parts(), 65);
        // Tq = 4 of Qwen3.5: 32 rows, two CTAs of 16 per KV head, one partial per split.
        let tq4 = Plan { q_len: 4, row_chunks: 2, ..plan_of(256, 64) };
        assert_eq!((tq4.parts(), tq4.workspace_bytes()), (64, 64 * 64 * 257 * 4));
        // Tq = 2 of a group-4 shape: 8 rows, one per stream.
        assert_eq!(Plan { q_len: 2, group: 4, hq: 8, ..plan_of(128, 16) }.parts(), 64);
        for d in HEAD_DIMS {
            for splits in 1..=MAX_SPLITS {
                let plan = plan_of(d, splits);
                let parts = plan.parts();
                assert!(parts <= MAX_SPLITS && parts.is_multiple_of(splits), "D={d} splits={splits}: {parts}");
                assert!(parts == splits || parts == splits * mma_streams(d), "D={d} splits={splits}: {parts}");
                let bytes = if splits > 1 { plan.output_rows() * parts * (d + 1) * 4 } else { 0 };
                assert_eq!(plan.workspace_bytes(), bytes, "D={d} splits={splits}");
            }
        }
    }

    #[test]
    fn only_long_single_sequence_splits_take_the_long_variant() {
        // Qwen3.5 on the H100's spread plan: 64 splits of 16 tiles per stream at ctx 32768, 8 at 16384, 2 at
        // 4096 (a tile: 16 keys per stream, two streams).
        let at = |tiles: usize| Plan { chunk_keys: tiles * 2 * MMA_TILE_KEYS, ..plan_of(256, 64) };
        assert!(at(16).long_split(false, false) && at(8).long_split(false, false));
        assert!(!at(7).long_split(false, false) && !at(2).long_split(false, false));
        // Not with a window, a batch, one partial per CTA (Tq = 4: 32 rows), one split, or another head dim.
        assert!(!at(16).long_split(true, false));
        assert!(!Plan { batch: 16, ..at(16) }.long_split(false, false));
        assert!(!Plan { q_len: 4, row_chunks: 2, ..at(16) }.long_split(false, false));
        assert!(!Plan { splits: 1, ..at(16) }.long_split(false, false));
        assert!(!Plan { d: 128, chunk_keys: 16 * 4 * MMA_TILE_KEYS, ..at(16) }.long_split(false, false));
        // Forced: any batch and length, still only where it can run.
        assert!(Plan { batch: 16, ..at(1) }.long_split(false, true));
        assert!(!at(16).long_split(true, true) && !Plan { splits: 1, ..at(16) }.long_split(false, true));
        let long = Plan { long: true, ..at(16) };
        assert_eq!(long.decode_kernel().1, 128);
        assert_eq!(long.decode_kernel().0.to_string(), "flash_decode_mma_kernel<256, true>");
        assert_eq!(at(16).decode_kernel().1, 64);
        assert!(decode_instantiations().contains(&long.decode_kernel().0.to_string()));
    }

    #[test]
    fn rows_with_few_partials_take_the_row_combine() {
        // B = 64 at 4K (3 splits of two streams): 1024 rows of Qwen3.5, two per block of 64 threads.
        let b64 = Plan { batch: 64, ..plan_of(256, 3) };
        let (name, grid, threads) = combine_launch(&b64);
        assert_eq!(
            (b64.parts(), name.to_string(), grid, threads),
            (6, combine_rows_name(256).to_string(), (512, 1, 1), 64)
        );
        // Head dims 64 and 512, 48 rows: 8 rows per block (6 blocks) and one (48).
        assert_eq!(combine_launch(&Plan { batch: 3, ..plan_of(64, 8) }).1, (6, 1, 1));
        assert_eq!(combine_launch(&Plan { batch: 3, ..plan_of(512, 8) }).1, (48, 1, 1));
        // At most COMBINE_ROWS_MAX_PARTS partials: 16 splits of two streams, or 32 of one.
        assert_eq!(combine_launch(&plan_of(256, 16)).0.to_string(), combine_rows_name(256).to_string());
        assert_eq!(combine_launch(&plan_of(512, 32)).0.to_string(), combine_rows_name(512).to_string());
        // Qwen3.5 ctx 32768 spread (128 partials per row) and 17 splits of two streams: a block per row and
        // 32 dims.
        let (name, grid, threads) = combine_launch(&plan_of(256, 64));
        assert_eq!((name.to_string(), grid, threads), (combine_name(256).to_string(), (16, 8, 1), 256));
        assert_eq!(combine_launch(&plan_of(256, 17)).0.to_string(), combine_name(256).to_string());
    }

    #[test]
    fn splits_fill_one_wave_of_resident_ctas() {
        // H100: Qwen3.5 ctx 32768 (2 units of 1024 tiles of 32 keys), 3 CTAs per SM: 171 splits of 6 tiles.
        assert_eq!(split_plan(1024, 2, 132, 3), (171, 6));
        // Qwen3.5 ctx 4096: one tile per split.
        assert_eq!(split_plan(128, 2, 132, 3), (128, 1));
        // Generic 32/8 ctx 32768 (64-key tiles): 47 splits of 11 tiles, 376 CTAs.
        assert_eq!(split_plan(512, 8, 132, 3), (47, 11));
        // Gemma 4 global ctx 32768, 2 CTAs per SM: 128 splits of 16 tiles.
        assert_eq!(split_plan(2048, 2, 132, 2), (128, 16));
        // The local window (33 tiles, 8 KV heads): a split per tile, 264 CTAs.
        assert_eq!(split_plan(33, 8, 132, 3), (33, 1));
        // B = 64 at 4K: three splits (384 CTAs), not four (1.29 waves).
        assert_eq!(split_plan(128, 128, 132, 3), (3, 43));
        // sm_120 (170 SMs, one decode CTA each): Qwen3.5 ctx 32768 in one wave of 158 CTAs, where three
        // CTAs per SM would have planned 410 (2.4 waves).
        assert_eq!(split_plan(1024, 2, 170, decode_slots(Some(&device(170, 100)), 256).1), (79, 13));
        // More units than one wave holds: no split. Never more splits than tiles, nor than MAX_SPLITS.
        assert_eq!(split_plan(128, 1000, 132, 3), (1, 128));
        assert_eq!(split_plan(5, 1, 132, 3), (5, 1));
        assert_eq!(split_plan(100_000, 1, 132, 3), (256, 391));
        for (tiles, units, sms, per_sm) in [(1024, 2, 170, 1), (77, 3, 132, 3), (1, 1, 1, 1), (4096, 64, 132, 2)] {
            let (splits, chunk) = split_plan(tiles, units, sms, per_sm);
            assert!((1..=MAX_SPLITS).contains(&splits) && splits * chunk >= tiles, "{tiles} {units}");
            assert!((splits - 1) * chunk < tiles, "an empty split: {tiles} {units}");
            assert!(splits == 1 || units * splits <= per_sm * sms, "more than one wave: {tiles} {units}");
        }
    }

    #[test]
    fn only_grids_of_one_cta_per_sm_prefetch_their_first_tiles() {
        // Qwen3.5 shapes (16/2, D = 256) of `batch` sequences of up to `max` tokens, contiguous.
        let qwen = |batch: i64, max: i64| {
            let token = 2 * 256;
            let k = CacheTensor { ptr: 0, stride_seq: max * token, stride_token: token, stride_head: 256, elems: 0 };
            let k = CacheTensor { elems: batch * max * token, ..k };
            let strides = [16 * 256, 16 * 256, 256];
            DecodeArgs {
                q: 0,
                q_strides: strides,
                k,
                v: k,
                layout: CacheLayout::Contiguous,
                seq_lens: 0,
                out: 0,
                out_strides: strides,
                lse: 0,
                workspace: 0,
                workspace_bytes: 0,
                batch,
                q_len: 1,
                num_q_heads: 16,
                num_kv_heads: 2,
                head_dim: 256,
                max_seq_len: max,
                window: None,
                causal: true,
                scale: 0.0625,
                softcap: None,
            }
        };
        let (h100, sm120) = (device(132, 228), device(170, 100));
        let plan = |a: &DecodeArgs, d: &DeviceInfo| validate_shape_only(a, Some(d)).expect("a valid shape");
        // One sequence: spread one CTA per SM on the H100 (128 CTAs), the long variant included, and sm_120's
        // one CTA per SM.
        for a in [qwen(1, 32768), qwen(1, 4096)] {
            assert!(plan(&a, &h100).prefetch && plan(&a, &sm120).prefetch, "B=1 max={}", a.max_seq_len);
        }
        assert!(plan(&qwen(1, 32768), &h100).long);
        // B = 64 at 4K: 384 CTAs, three per SM of the H100, go without; on sm_120 its 128 units take one
        // split each, at most one CTA per SM. There 85 sequences (170 units) fit on 170 SMs and 86 do not.
        assert!(!plan(&qwen(64, 4096), &h100).prefetch && plan(&qwen(64, 4096), &sm120).prefetch);
        assert!(plan(&qwen(85, 4096), &sm120).prefetch && !plan(&qwen(86, 4096), &sm120).prefetch);
        // The CPU backend launches nothing.
        assert!(!validate_shape_only(&qwen(1, 4096), None).expect("a valid shape").prefetch);
    }
}
