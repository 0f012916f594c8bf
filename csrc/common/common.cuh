// Shared device helpers for every sparkinfer kernel.
//
// Kernels are compiled by NVRTC at run time and may include only the headers in csrc/common: no CUDA
// toolkit header is available there, so bf16 is carried as its raw 16-bit pattern and converted with PTX.
#pragma once

typedef unsigned short bf16_t;
typedef long long i64;

#define SPK_DEVICE __device__ __forceinline__

// ---------------------------------------------------------------------------------------------------------
// bf16 <-> f32
// ---------------------------------------------------------------------------------------------------------
SPK_DEVICE float bf16_to_f32(bf16_t v) { return __uint_as_float(((unsigned int)v) << 16); }

// Round to nearest even, as torch does; NaN stays NaN.
SPK_DEVICE bf16_t f32_to_bf16(float f) {
    unsigned short r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
}

// Packs two floats into one 32-bit word of two bf16 values, `lo` in the low half.
SPK_DEVICE unsigned int pack_bf16x2(float lo, float hi) {
    unsigned int r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

SPK_DEVICE void unpack_bf16x2(unsigned int w, float& lo, float& hi) {
    lo = __uint_as_float(w << 16);
    hi = __uint_as_float(w & 0xffff0000u);
}

// Eight bf16 values in one 16-byte word <-> eight floats.
SPK_DEVICE void bf16x8_to_f32(const uint4& v, float (&f)[8]) {
    unpack_bf16x2(v.x, f[0], f[1]);
    unpack_bf16x2(v.y, f[2], f[3]);
    unpack_bf16x2(v.z, f[4], f[5]);
    unpack_bf16x2(v.w, f[6], f[7]);
}

SPK_DEVICE uint4 f32_to_bf16x8(const float (&f)[8]) {
    uint4 v;
    v.x = pack_bf16x2(f[0], f[1]);
    v.y = pack_bf16x2(f[2], f[3]);
    v.z = pack_bf16x2(f[4], f[5]);
    v.w = pack_bf16x2(f[6], f[7]);
    return v;
}

// ---------------------------------------------------------------------------------------------------------
// Vector memory access
// ---------------------------------------------------------------------------------------------------------
// Read-only data (weights, activations that the kernel does not write) through the non-coherent path.
SPK_DEVICE uint4 load_u128_ro(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

// Streamed once (weights): skip L1 so that it keeps the reused activations.
SPK_DEVICE uint4 load_u128_stream(const void* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

// An L2 access policy that marks the lines it touches evict-first: for weights streamed once per call, so that
// they do not push out data that a later kernel of the same call will read (see prefetch_l2_part).
SPK_DEVICE unsigned long long l2_evict_first_policy() {
    unsigned long long policy;
    asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
    return policy;
}

// An L2 access policy that marks the lines it touches evict-last: for data written by one kernel and read by
// the next while other data streams through L2 (the split partials of decode attention).
SPK_DEVICE unsigned long long l2_evict_last_policy() {
    unsigned long long policy;
    asm("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(policy));
    return policy;
}

// Stores of one and two floats with an L2 policy (l2_evict_first_policy, l2_evict_last_policy).
SPK_DEVICE void store_f32(float* p, float v, unsigned long long policy) {
    asm volatile("st.global.L2::cache_hint.f32 [%0], %1, %2;" ::"l"(p), "f"(v), "l"(policy) : "memory");
}

SPK_DEVICE void store_f32x2(float* p, float a, float b, unsigned long long policy) {
    asm volatile("st.global.L2::cache_hint.v2.f32 [%0], {%1, %2}, %3;" ::"l"(p), "f"(a), "f"(b), "l"(policy)
                 : "memory");
}

// load_u128_stream with an L2 policy from l2_evict_first_policy().
SPK_DEVICE uint4 load_u128_stream(const void* p, unsigned long long policy) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%4], %5;"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p), "l"(policy));
    return v;
}

// Asks L2 to fetch [p, p + bytes), 128-byte line `index`, index + count, ... by this thread: data this kernel
// reads once the previous one is done (a prefetch may be issued before pdl_wait(): L2 is where that
// kernel's writes land, so a line fetched early is never stale).
SPK_DEVICE void prefetch_l2_lines(const void* p, i64 bytes, int index, int count) {
    const char* c = static_cast<const char*>(p);
    for (i64 off = (i64)index * 128; off < bytes; off += (i64)count * 128)
        asm volatile("prefetch.global.L2 [%0];" ::"l"(c + off));
}

// Asks L2 to fetch piece `part` of `parts` equal pieces of [p, p + bytes), one 128-byte line per thread
// of the block and step: data that a later kernel reads, brought in while this one streams other data.
// Evict-last keeps the lines ahead of the evict-normal and evict-first lines streamed meanwhile.
SPK_DEVICE void prefetch_l2_part(const void* p, i64 bytes, int part, int parts) {
    const i64 piece = ((bytes + parts - 1) / parts + 127) & ~(i64)127;
    const i64 begin = piece * part;
    const i64 end = bytes < begin + piece ? bytes : begin + piece;
    const char* c = static_cast<const char*>(p);
    for (i64 off = begin + (i64)threadIdx.x * 128; off < end; off += (i64)blockDim.x * 128)
        asm volatile("prefetch.global.L2::evict_last [%0];" ::"l"(c + off));
}

SPK_DEVICE uint4 load_u128(const void* p) { return *reinterpret_cast<const uint4*>(p); }

SPK_DEVICE void store_u128(void* p, const uint4& v) { *reinterpret_cast<uint4*>(p) = v; }

// ---------------------------------------------------------------------------------------------------------
// Programmatic dependent launch (sm_90 and newer; a no-op before)
// ---------------------------------------------------------------------------------------------------------
// Kernels launched with Device::launch_dependent may start while the previous kernel on the stream is still
// finishing. Such a kernel calls pdl_wait() before its first global memory access (read or write): it
// returns once the previous grid has completed and its writes are visible, so ordering is exactly that of a
// plain stream. (A value read before the wait may be one the previous grid is still changing: it serves
// only as a hint that the kernel checks against the same read after the wait.) pdl_launch_dependents() then
// lets the next kernel's blocks get scheduled early; the next kernel still waits for this one to complete
// before touching memory.
SPK_DEVICE void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

SPK_DEVICE void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// ---------------------------------------------------------------------------------------------------------
// Reductions
// ---------------------------------------------------------------------------------------------------------
SPK_DEVICE float warp_reduce_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

SPK_DEVICE float warp_reduce_max(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

// Sum over the whole block; every thread gets the result. `scratch` holds at least 32 floats and may be
// reused after the call returns. blockDim.x must be a multiple of 32.
SPK_DEVICE float block_reduce_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int num_warps = blockDim.x >> 5;
    v = warp_reduce_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float total = lane < num_warps ? scratch[lane] : 0.0f;
    total = warp_reduce_sum(total);
    __syncthreads();
    return total;
}

// ---------------------------------------------------------------------------------------------------------
// Output element types
// ---------------------------------------------------------------------------------------------------------
template <typename T> struct OutputStore;
template <> struct OutputStore<float> {
    static SPK_DEVICE void store(float* p, float v) { *p = v; }
};
template <> struct OutputStore<bf16_t> {
    static SPK_DEVICE void store(bf16_t* p, float v) { *p = f32_to_bf16(v); }
};
