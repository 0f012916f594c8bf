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

SPK_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }

// Waits until at most N committed groups of this thread are still in flight.
template <int N> SPK_DEVICE void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

// Bytes of dynamic shared memory the block was launched with.
SPK_DEVICE unsigned dynamic_shared_bytes() {
    unsigned r;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(r));
    return r;
}
