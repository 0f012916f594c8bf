// What reading a buffer costs on this GPU when each read is a kernel in a chain, as a decode attention call
// is: the floor against which the decode's B = 1 rows are judged (docs/PERF.md). bench/read_floor.py does
// the same with Triton; this program adds what Triton cannot express: programmatic dependent launch between
// the calls, and reads through the TMA unit's bulk copies into a ring of shared-memory stages (the decode's
// way), with a per-tile delay that stands for the decode's math, and with the decode's split partials stored
// at the end under three L2 policies.
//
// Every case is timed as `sparkinfer bench` times a row: L launches captured into one CUDA graph, each
// reading the next of enough copies of the buffer that the working set is at least four times the L2, the
// graph replayed 7 times after two warm-up replays, the median replay divided by L. Each launch carries the
// programmatic-stream-serialisation attribute and its kernel begins with griddepcontrol.wait, as the
// decode's does, and lets the next launch in after its reads. The copy bandwidth is measured as the bench
// measures it: lone 1 GiB device-to-device copies between two events, bytes read plus written.
//
// Built and run on the GPU machine (it needs nvcc, which only that machine has):
//   nvcc -O3 -std=c++17 -arch=sm_90 -Icsrc -o /tmp/read_floor bench/read_floor.cu && /tmp/read_floor 67.108864 8.388608
// Arguments: buffer sizes in MB (1e6 bytes), rounded down to a multiple of 32 KiB.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "common/common.cuh"
#include "common/async.cuh"

#define CHECK(x)                                                                                  \
    do {                                                                                          \
        cudaError_t e_ = (x);                                                                     \
        if (e_ != cudaSuccess) {                                                                  \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
            exit(1);                                                                              \
        }                                                                                         \
    } while (0)

// One bulk copy (cp.async.bulk, no tensor map) of `bytes` contiguous bytes into shared memory, completing
// on `bar`, with an L2 policy.
SPK_DEVICE void bulk_g2s(unsigned dst, const void* src, unsigned bytes, unsigned long long* bar,
                         unsigned long long policy) {
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], "
        "%4;" ::"r"(dst),
        "l"(src), "r"(bytes), "r"(shared_address(bar)), "l"(policy)
        : "memory");
}

// A coherent 16-byte load with an L2 policy; common.cuh's load_u128_stream is the same through the
// non-coherent path (.nc). The figures in docs/PERF.md were taken with this one.
SPK_DEVICE uint4 load_streaming(const uint4* p, unsigned long long policy) {
    uint4 v;
    asm volatile("ld.global.L1::no_allocate.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%4], %5;"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p), "l"(policy));
    return v;
}

struct BulkArgs {
    const char* base;
    long long bytes;
    int tile;        // bytes per copy
    int stages;      // ring stages per stream
    int streams;     // warps per CTA, each with its own ring
    int interleave;  // 0: each stream a contiguous range of tiles; 1: tile u + i U for stream u of U
    int refill_end;  // 0: tile i + S - 1 issued right after the wait for tile i (the decode's order); 1: tile
                     // i + S issued into tile i's stage once tile i is consumed
    int spin;        // cycles each tile is held after its wait, standing for the decode's math
    unsigned* sink;
    float* out;       // with store_bytes > 0: each stream then writes store_bytes / (gridDim.x streams) bytes,
    long long store_bytes;  // as 8 rows a whole row of all streams' apart (the decode's split partials)
    int store_policy;       // 0: plain stores; 1: L2 evict_last; 2: L2 evict_first
};

// Streams of one warp each read their tiles through their own ring; lane 0 issues the copies.
__global__ void bulk_read(const __grid_constant__ BulkArgs a) {
    extern __shared__ uint4 smem_raw[];
    unsigned char* smem = reinterpret_cast<unsigned char*>(smem_raw);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int S = a.stages;
    unsigned long long* bar =
        reinterpret_cast<unsigned long long*>(smem + (size_t)a.streams * S * a.tile) + warp * S;
    unsigned char* ring = smem + (size_t)warp * S * a.tile;
    if (lane == 0) {
        for (int st = 0; st < S; ++st) mbar_init(&bar[st], 1);
        fence_proxy_async_shared();
    }
    __syncwarp();
    pdl_wait();
    const long long tiles = a.bytes / a.tile;
    const long long U = (long long)gridDim.x * a.streams, u = (long long)blockIdx.x * a.streams + warp;
    long long first, step, count;
    if (a.interleave) {
        first = u;
        step = U;
        count = u < tiles ? (tiles - u + U - 1) / U : 0;
    } else {
        const long long per = (tiles + U - 1) / U;
        first = u * per;
        step = 1;
        count = first < tiles ? (per < tiles - first ? per : tiles - first) : 0;
    }
    const unsigned long long policy = l2_evict_first_policy();
    auto issue = [&](long long i) {
        if (lane != 0) return;
        const int st = (int)(i % S);
        fence_proxy_async_shared();
        mbar_arrive_expect_tx(&bar[st], a.tile);
        bulk_g2s(shared_address(ring + (size_t)st * a.tile), a.base + (first + i * step) * a.tile, a.tile, &bar[st],
                 policy);
    };
    const int ahead = a.refill_end ? S : S - 1;
    for (long long i = 0; i < ahead && i < count; ++i) issue(i);
    unsigned acc = 0;
    for (long long i = 0; i < count; ++i) {
        const int st = (int)(i % S);
        mbar_wait(&bar[st], (unsigned)(i / S) & 1u);
        if (!a.refill_end && i + S - 1 < count) issue(i + S - 1);
        acc ^= reinterpret_cast<const unsigned*>(ring + (size_t)st * a.tile)[lane];
        if (a.spin > 0) {
            const long long t0 = clock64();
            while (clock64() - t0 < a.spin) {
            }
        }
        __syncwarp();
        if (a.refill_end && i + S < count) issue(i + S);
    }
    pdl_launch_dependents();
    if (a.store_bytes > 0) {
        const long long row_bytes = a.store_bytes / U / 8;
        for (int r = 0; r < 8; ++r) {
            char* dst = reinterpret_cast<char*>(a.out) + (r * U + u) * row_bytes;
            for (long long o = lane * 8; o < row_bytes; o += 256) {
                float* f = reinterpret_cast<float*>(dst + o);
                if (a.store_policy == 0)
                    *reinterpret_cast<float2*>(f) = make_float2((float)acc, 1.0f);
                else
                    store_f32x2(f, (float)acc, 1.0f,
                                a.store_policy == 1 ? l2_evict_last_policy() : l2_evict_first_policy());
            }
        }
    }
    if (acc == 0x9e3779b9u) a.sink[0] = acc;
}

// Plain vector loads, U in flight per thread: each block a contiguous chunk, or block-interleaved.
template <int U>
__global__ void ldg_read(const uint4* p, long long nvec, int interleave, unsigned* sink) {
    pdl_wait();
    const unsigned long long policy = l2_evict_first_policy();
    unsigned acc = 0;
    const long long span = (long long)blockDim.x * U;
    long long begin, end, stride;
    if (interleave) {
        begin = (long long)blockIdx.x * span;
        end = nvec;
        stride = (long long)gridDim.x * span;
    } else {
        const long long per = ((nvec + gridDim.x - 1) / gridDim.x + span - 1) / span * span;
        begin = (long long)blockIdx.x * per;
        end = begin + per < nvec ? begin + per : nvec;
        stride = span;
    }
    for (long long i = begin + threadIdx.x; i + (U - 1) * (long long)blockDim.x < end; i += stride) {
        uint4 v[U];
#pragma unroll
        for (int k = 0; k < U; ++k) v[k] = load_streaming(p + i + k * (long long)blockDim.x, policy);
#pragma unroll
        for (int k = 0; k < U; ++k) acc ^= v[k].x ^ v[k].y ^ v[k].z ^ v[k].w;
    }
    pdl_launch_dependents();
    if (acc == 0x9e3779b9u) sink[0] = acc;
}

struct Result {
    std::string name;
    double us;
};

// Median time per launch of a graph of `launches` calls of launch(copy index).
template <class F> double time_graph(cudaStream_t s, int copies, F launch) {
    const int launches = copies * ((24 + copies - 1) / copies);
    cudaGraph_t g;
    CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
    for (int i = 0; i < launches; ++i) launch(i % copies);
    CHECK(cudaStreamEndCapture(s, &g));
    cudaGraphExec_t ge;
    CHECK(cudaGraphInstantiate(&ge, g, 0));
    cudaEvent_t e0, e1;
    CHECK(cudaEventCreate(&e0));
    CHECK(cudaEventCreate(&e1));
    for (int i = 0; i < 2; ++i) CHECK(cudaGraphLaunch(ge, s));
    std::vector<float> t;
    for (int i = 0; i < 7; ++i) {
        CHECK(cudaEventRecord(e0, s));
        CHECK(cudaGraphLaunch(ge, s));
        CHECK(cudaEventRecord(e1, s));
        CHECK(cudaEventSynchronize(e1));
        float ms;
        CHECK(cudaEventElapsedTime(&ms, e0, e1));
        t.push_back(ms);
    }
    std::sort(t.begin(), t.end());
    CHECK(cudaGraphExecDestroy(ge));
    CHECK(cudaGraphDestroy(g));
    CHECK(cudaEventDestroy(e0));
    CHECK(cudaEventDestroy(e1));
    return t[3] * 1e3 / launches;
}

template <class K, class... Args>
void launch_pdl(cudaStream_t s, K kernel, int grid, int block, size_t smem, Args... args) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(grid);
    cfg.blockDim = dim3(block);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = s;
    cudaLaunchAttribute attr;
    attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr.val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = &attr;
    cfg.numAttrs = 1;
    CHECK(cudaLaunchKernelEx(&cfg, kernel, args...));
}

int main(int argc, char** argv) {
    std::vector<double> sizes_mb;
    for (int i = 1; i < argc; ++i) sizes_mb.push_back(atof(argv[i]));
    if (sizes_mb.empty()) sizes_mb = {67.108864, 8.388608};
    cudaDeviceProp prop;
    CHECK(cudaGetDeviceProperties(&prop, 0));
    const int sms = prop.multiProcessorCount;
    cudaStream_t s;
    CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    unsigned* sink;
    CHECK(cudaMalloc(&sink, 64));
    CHECK(cudaFuncSetAttribute(bulk_read, cudaFuncAttributeMaxDynamicSharedMemorySize, 99 * 1024));

    double copy_gbs;
    {
        const size_t n = 1ull << 30;
        void *a, *b;
        CHECK(cudaMalloc(&a, n));
        CHECK(cudaMalloc(&b, n));
        CHECK(cudaMemset(a, 1, n));
        cudaEvent_t e0, e1;
        CHECK(cudaEventCreate(&e0));
        CHECK(cudaEventCreate(&e1));
        std::vector<float> t;
        for (int i = 0; i < 6; ++i) {
            CHECK(cudaEventRecord(e0, s));
            CHECK(cudaMemcpyAsync(b, a, n, cudaMemcpyDeviceToDevice, s));
            CHECK(cudaEventRecord(e1, s));
            CHECK(cudaEventSynchronize(e1));
            float ms;
            CHECK(cudaEventElapsedTime(&ms, e0, e1));
            if (i > 0) t.push_back(ms);
        }
        std::sort(t.begin(), t.end());
        copy_gbs = 2.0 * n / (t[2] * 1e-3) / 1e9;
        CHECK(cudaFree(a));
        CHECK(cudaFree(b));
    }
    printf("%s, %d SMs, L2 %d MB; device copy of 1 GiB: %.0f GB/s (read + written)\n", prop.name, sms,
           prop.l2CacheSize >> 20, copy_gbs);

    for (double mb : sizes_mb) {
        long long bytes = (long long)(mb * 1e6);
        bytes -= bytes % 32768;
        const int copies = std::max(2, (int)((4ll * prop.l2CacheSize + bytes - 1) / bytes));
        std::vector<char*> buf(copies);
        for (auto& b : buf) {
            CHECK(cudaMalloc(&b, bytes));
            CHECK(cudaMemset(b, 0x3c, bytes));
        }
        const double floor_us = bytes / (copy_gbs * 1e3);
        printf("\n%.3f MB (%d copies rotated), floor at copy bandwidth %.2f us\n", bytes / 1e6, copies, floor_us);
        std::vector<Result> res;
        auto add = [&](const std::string& name, double us) {
            res.push_back({name, us});
            printf("  %-72s %8.2f us %6.1f%%\n", name.c_str(), us, 100.0 * floor_us / us);
        };
        // Plain loads.
        for (int inter = 0; inter < 2; ++inter)
            for (int block : {256, 512, 1024})
                for (int mult : {1, 2, 4, 8}) {
                    const int grid = sms * mult;
                    const long long nvec = bytes / 16;
                    char name[128];
                    for (int u : {4, 8}) {
                        snprintf(name, sizeof name, "ldg %s grid %d block %d unroll %d",
                                 inter ? "interleaved" : "chunks", grid, block, u);
                        double us = time_graph(s, copies, [&](int c) {
                            const uint4* p = reinterpret_cast<const uint4*>(buf[c]);
                            if (u == 4)
                                launch_pdl(s, ldg_read<4>, grid, block, 0, p, nvec, inter, sink);
                            else
                                launch_pdl(s, ldg_read<8>, grid, block, 0, p, nvec, inter, sink);
                        });
                        add(name, us);
                    }
                }
        // Bulk copies into rings; one CTA per SM (at most 99 KiB, as on sm_120), 128 CTAs as the decode's
        // Qwen3.5 plan (2 KV heads x 64 splits), or two per SM where two fit in 99 KiB each.
        for (int tile : {8192, 16384, 32768})
            for (int stages : {2, 3, 4})
                for (int streams : {1, 2, 4}) {
                    const size_t smem = (size_t)streams * stages * tile + streams * stages * 8;
                    if (smem > 99 * 1024) continue;
                    for (int grid : {128, sms, 2 * sms})
                        for (int inter = 0; inter < 2; ++inter)
                            for (int refill = 0; refill < 2; ++refill)
                                for (int spin : {0, 1000, 2000}) {
                                    if (spin > 0 && (inter || grid != 128)) continue;
                                    BulkArgs a{nullptr, bytes, tile, stages, streams, inter, refill, spin, sink,
                                               nullptr, 0, 0};
                                    char name[160];
                                    snprintf(name, sizeof name,
                                             "bulk %s grid %d streams %d stages %d tile %dK %s spin %d",
                                             inter ? "interleaved" : "chunks", grid, streams, stages, tile / 1024,
                                             refill ? "refill-end" : "refill-wait", spin);
                                    double us = time_graph(s, copies, [&](int c) {
                                        BulkArgs ac = a;
                                        ac.base = buf[c];
                                        launch_pdl(s, bulk_read, grid, streams * 32, smem, ac);
                                    });
                                    add(name, us);
                                }
                }
        // The decode's structure at Qwen3.5 ctx 32768 (128 CTAs of two streams, two 16 KiB stages, the refill
        // after the wait), storing split partials at its end as the decode does (2 MiB at Qwen3.5 ctx 32768):
        // plain stores, or with an L2 policy of evict-last or evict-first.
        {
            float* out;
            CHECK(cudaMalloc(&out, 4 << 20));
            for (int pol = 0; pol < 3; ++pol) {
                for (long long sb : {0ll, 65536ll, 1ll << 20, 2ll << 20}) {
                    if (pol > 0 && sb == 0) continue;
                    BulkArgs a{nullptr, bytes, 16384, 2, 2, 0, 0, 0, sink, out, sb, pol};
                    char name[160];
                    snprintf(name, sizeof name,
                             "bulk chunks grid 128 streams 2 stages 2 tile 16K, then %lld KiB stored%s", sb / 1024,
                             pol == 1 ? " evict_last" : pol == 2 ? " evict_first" : "");
                    double us = time_graph(s, copies, [&](int c) {
                        BulkArgs ac = a;
                        ac.base = buf[c];
                        launch_pdl(s, bulk_read, 128, 64, (size_t)2 * 2 * 16384 + 32, ac);
                    });
                    add(name, us);
                }
            }
            CHECK(cudaFree(out));
        }
        CHECK(cudaGetLastError());
        std::sort(res.begin(), res.end(), [](const Result& x, const Result& y) { return x.us < y.us; });
        printf("\nbest of %zu cases at %.3f MB:\n", res.size(), bytes / 1e6);
        for (size_t i = 0; i < std::min<size_t>(12, res.size()); ++i)
            printf("  %-72s %8.2f us %6.1f%%\n", res[i].name.c_str(), res[i].us, 100.0 * floor_us / res[i].us);
        for (auto& b : buf) CHECK(cudaFree(b));
    }
    CHECK(cudaDeviceSynchronize());
    return 0;
}
