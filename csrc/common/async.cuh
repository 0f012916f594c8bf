// cp.async wrappers (sm_80 and later, sm_120 included): global -> shared copies that bypass registers, so a
// kernel can fetch the next tile while it computes on the current one.
#pragma once
#include "common/common.cuh"

// 32-bit shared-window address of a generic pointer into shared memory, as cp.async wants it.
SPK_DEVICE unsigned shared_address(const void* p) {
    unsigned a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

// Copies 16 bytes from global to shared memory, or writes 16 zero bytes when `valid` is false (the source
// is then not read, but must still be a valid address). Both addresses 16-byte aligned. L1 is bypassed:
// the KV cache is streamed once.
SPK_DEVICE void cp_async_16(void* dst_shared, const void* src_global, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(shared_address(dst_shared)),
                 "l"(src_global), "r"(valid ? 16 : 0)
                 : "memory");
}

// As cp_async_16, and L2 fetches the whole aligned 256-byte block around the source: a row read in 128-byte
// pieces, one k tile after another, then reaches DRAM as 256-byte requests.
SPK_DEVICE void cp_async_16_l2_256(void* dst_shared, const void* src_global, bool valid) {
    asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;" ::"r"(shared_address(dst_shared)),
                 "l"(src_global), "r"(valid ? 16 : 0)
                 : "memory");
}

SPK_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }

// Waits until at most N committed groups of this thread are still in flight.
template <int N> SPK_DEVICE void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

// Bytes of dynamic shared memory the block was launched with.
SPK_DEVICE unsigned dynamic_shared_bytes() {
    unsigned r;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(r));
    return r;
}

// ---------------------------------------------------------------------------------------------------------
// mbarriers for the TMA unit's copies (sm_90 and later, sm_120 included), which complete on an mbarrier by
// byte count. Protocol of one stage: one thread calls mbar_arrive_expect_tx(bar, total bytes) (the barrier
// was initialised with count 1), any threads issue copies of those bytes completing on bar (see
// tensor_copy_5d_g2s below), and the readers call mbar_wait(bar, parity) with parity = (use of this
// barrier, counting from 0) & 1.
// ---------------------------------------------------------------------------------------------------------
SPK_DEVICE void mbar_init(unsigned long long* bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(shared_address(bar)), "r"(count) : "memory");
}

// Makes initialised barriers (and generic writes to shared memory) visible to the async proxy, where TMA
// copies complete; also needed before a TMA copy overwrites shared memory that generic code read or wrote.
SPK_DEVICE void fence_proxy_async_shared() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

SPK_DEVICE void mbar_arrive_expect_tx(unsigned long long* bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(shared_address(bar)), "r"(bytes)
                 : "memory");
}

SPK_DEVICE void mbar_wait(unsigned long long* bar, unsigned parity) {
    const unsigned a = shared_address(bar);
    unsigned done = 0;
    while (!done) {
        asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                     : "=r"(done)
                     : "r"(a), "r"(parity)
                     : "memory");
    }
}

// ---------------------------------------------------------------------------------------------------------
// Tensor copies (cp.async.bulk.tensor, sm_90 and later, sm_120 included): one instruction moves a whole box
// of a tensor of up to 5 dimensions, described by a tensor map, from global to shared memory and completes
// on an mbarrier (protocol above). The map (CUtensorMap, encoded on the host by cuTensorMapEncodeTiled) is
// read by the TMA unit at its generic address: it must sit in kernel parameter space (a `const
// __grid_constant__` parameter, so that its address is that of the parameter itself), constant or global
// memory, 64-byte aligned. Every byte of the box counts towards the transaction, including elements out of
// the tensor's bounds, which land as zeros. With a swizzled map the destination is aligned to the swizzle
// pattern's repeat (1024 bytes for the 128-byte swizzle), because the pattern follows address bits.
// ---------------------------------------------------------------------------------------------------------
struct alignas(64) TensorMap {
    unsigned long long opaque[16];
};

// Fetches a tensor map into the TMA unit's descriptor cache ahead of its first copy.
SPK_DEVICE void prefetch_tensor_map(const TensorMap* map) {
    asm volatile("prefetch.tensormap [%0];" ::"l"(map) : "memory");
}

// The box at coordinates (c0, ..., c4) (innermost first, in elements) of a 5-d tensor map into shared memory
// at `dst_shared` (a shared-window address, see shared_address), completing on `bar`, with an L2 access
// policy (l2_evict_first_policy for data streamed once, so that it does not push out what later kernels
// read, such as the split partials of decode attention).
SPK_DEVICE void tensor_copy_5d_g2s(unsigned dst_shared, const TensorMap* map, int c0, int c1, int c2, int c3, int c4,
                                   unsigned long long* bar, unsigned long long policy) {
    asm volatile(
        "cp.async.bulk.tensor.5d.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1, {%2, "
        "%3, %4, %5, %6}], [%7], %8;" ::"r"(dst_shared),
        "l"(map), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(c4), "r"(shared_address(bar)), "l"(policy)
        : "memory");
}
