// Tensor-core wrappers that run on every target (sm_80 and later, sm_120 included): ldmatrix and
// mma.sync m16n8k16 with bf16 inputs and fp32 accumulators.
//
// Fragment layouts (g = lane / 4, c = lane % 4), as the PTX ISA defines them for m16n8k16:
//   A 16x16 row-major, 4 registers of 2 bf16: (g, 2c..2c+1), (g+8, 2c..), (g, 2c+8..), (g+8, 2c+8..)
//   B 16x8 ("col"), 2 registers: (k 2c..2c+1, n g), (k 2c+8..2c+9, n g)
//   C/D 16x8 fp32, 4 floats: (g, 2c), (g, 2c+1), (g+8, 2c), (g+8, 2c+1)
#pragma once
#include "common/async.cuh"

// Four 8x8 bf16 matrices from shared memory; lane i gives the shared-window address (see shared_address) of
// row i % 8 of matrix i / 8. This form serves layouts whose addresses are offsets from a tile's base.
SPK_DEVICE void ldmatrix_x4(unsigned (&r)[4], unsigned a) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a)
                 : "memory");
}

// As ldmatrix_x4, each matrix delivered transposed.
SPK_DEVICE void ldmatrix_x4_trans(unsigned (&r)[4], unsigned a) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a)
                 : "memory");
}

// The same from a generic pointer into shared memory.
SPK_DEVICE void ldmatrix_x4(unsigned (&r)[4], const void* p) { ldmatrix_x4(r, shared_address(p)); }

SPK_DEVICE void ldmatrix_x4_trans(unsigned (&r)[4], const void* p) { ldmatrix_x4_trans(r, shared_address(p)); }

// d += a . b for one 16x8x16 tile.
SPK_DEVICE void mma_bf16_16816(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
