/*
 * Decode attention through the C API at the three attention layers of the target models (Qwen3.5 full
 * attention, Gemma 4 local and global), on the CPU backend, checked against a naive softmax in double.
 *
 * Build: cc decode_attention.c $(pkg-config --cflags --libs sparkinfer) -lm
 * Exit status 0 when every shape matches.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <sparkinfer/sparkinfer.h>

typedef unsigned short bf16;

static float bf16_to_float(bf16 v) {
    unsigned int bits = (unsigned int)v << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static bf16 float_to_bf16(float f) {
    unsigned int bits;
    memcpy(&bits, &f, sizeof bits);
    bits += 0x7fff + ((bits >> 16) & 1); /* round to nearest even */
    return (bf16)(bits >> 16);
}

static unsigned long long rng_state = 88172645463325252ull;
static float uniform_pm1(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (float)((rng_state >> 40) & 0xffffff) / 8388608.0f - 1.0f;
}

/* 64-byte aligned memory; aligned_alloc wants a size that is a multiple of the alignment. */
static void *alloc64(size_t bytes) { return aligned_alloc(64, (bytes + 63) / 64 * 64); }

struct shape {
    const char *name;
    int hq, hkv, d, window, q_len, seq_len;
    float scale;
};

#define CHECK(call)                                                                                                    \
    do {                                                                                                               \
        sparkinfer_status s_ = (call);                                                                                 \
        if (s_ != SPARKINFER_STATUS_SUCCESS) {                                                                         \
            fprintf(stderr, "%s failed: %s: %s\n", #call, sparkinfer_status_string(s_), sparkinfer_last_error());      \
            return 1;                                                                                                  \
        }                                                                                                              \
    } while (0)

/* Runs one shape with a [seq_len, hkv, d] cache (one sequence) and compares with the naive formula. */
static int run_shape(const sparkinfer_context *ctx, const struct shape *s) {
    const int group = s->hq / s->hkv, rows = s->q_len * s->hq;
    const size_t cache_elems = (size_t)s->seq_len * s->hkv * s->d;
    bf16 *q = alloc64((size_t)rows * s->d * 2);
    bf16 *k = alloc64(cache_elems * 2);
    bf16 *v = alloc64(cache_elems * 2);
    bf16 *out = alloc64((size_t)rows * s->d * 2);
    float *lse = alloc64((size_t)rows * 4);
    double *scores = malloc((size_t)s->seq_len * sizeof(double));
    int32_t seq_len = s->seq_len;
    if (!q || !k || !v || !out || !lse || !scores) return 1;
    /* Logits of a few units: q scaled against the attention scale. */
    const float q_scale = 2.0f / (s->scale * sqrtf((float)s->d));
    for (int i = 0; i < rows * s->d; ++i) q[i] = float_to_bf16(uniform_pm1() * q_scale * 1.7f);
    for (size_t i = 0; i < cache_elems; ++i) k[i] = float_to_bf16(uniform_pm1() * 1.7f);
    for (size_t i = 0; i < cache_elems; ++i) v[i] = float_to_bf16(uniform_pm1() * 1.7f);

    sparkinfer_attention_decode_params p;
    memset(&p, 0, sizeof p);
    p.q = q;
    p.k_cache.data = k;
    p.k_cache.stride_seq = (int64_t)cache_elems;
    p.k_cache.stride_token = (int64_t)s->hkv * s->d;
    p.k_cache.stride_head = s->d;
    p.k_cache.elems = (int64_t)cache_elems;
    p.v_cache = p.k_cache;
    p.v_cache.data = v;
    p.cache_layout = SPARKINFER_KV_CACHE_CONTIGUOUS;
    p.seq_lens = &seq_len;
    p.out = out;
    p.lse = lse;
    p.batch = 1;
    p.q_len = s->q_len;
    p.num_q_heads = s->hq;
    p.num_kv_heads = s->hkv;
    p.head_dim = s->d;
    p.max_seq_len = s->seq_len;
    p.window = s->window > 0 ? s->window : SPARKINFER_ATTENTION_NO_WINDOW;
    p.causal = 1;
    p.scale = s->scale;

    size_t workspace = 1;
    CHECK(sparkinfer_attention_decode_workspace_size(ctx, &p, &workspace));
    if (workspace != 0) {
        fprintf(stderr, "%s: the CPU backend should need no workspace, got %zu bytes\n", s->name, workspace);
        return 1;
    }
    CHECK(sparkinfer_attention_decode(ctx, &p, NULL));

    double max_err = 0.0;
    for (int t = 0; t < s->q_len; ++t) {
        const int pos = s->seq_len - s->q_len + t;
        for (int h = 0; h < s->hq; ++h) {
            const int row = t * s->hq + h, kv = h / group;
            double mx = -INFINITY, total = 0.0;
            for (int j = 0; j < s->seq_len; ++j) {
                scores[j] = -INFINITY;
                if (j > pos || (s->window > 0 && j <= pos - s->window)) continue;
                double dot = 0.0;
                for (int e = 0; e < s->d; ++e)
                    dot += (double)bf16_to_float(q[row * s->d + e]) *
                           bf16_to_float(k[((size_t)j * s->hkv + kv) * s->d + e]);
                scores[j] = dot * s->scale;
                if (scores[j] > mx) mx = scores[j];
            }
            for (int j = 0; j < s->seq_len; ++j) total += exp(scores[j] - mx);
            for (int e = 0; e < s->d; ++e) {
                double want = 0.0;
                for (int j = 0; j < s->seq_len; ++j)
                    want += exp(scores[j] - mx) / total * bf16_to_float(v[((size_t)j * s->hkv + kv) * s->d + e]);
                const double err = fabs(bf16_to_float(out[row * s->d + e]) - want);
                if (err > max_err) max_err = err;
            }
            const double lse_err = fabs(lse[row] - (mx + log(total)));
            if (lse_err > 1e-3 * fmax(1.0, fabs(mx))) {
                fprintf(stderr, "%s: row %d lse %f, want %f\n", s->name, row, lse[row], mx + log(total));
                return 1;
            }
        }
    }
    printf("%-28s heads %2d/%d head_dim %3d window %4d q_len %d len %4d: max |error| %.2e\n", s->name, s->hq, s->hkv,
           s->d, s->window, s->q_len, s->seq_len, max_err);
    free(q);
    free(k);
    free(v);
    free(out);
    free(lse);
    free(scores);
    /* The values are within [-1.7, 1.7]: a bf16 rounding of the output is below 1e-2. */
    return max_err < 1e-2 ? 0 : 1;
}

int main(void) {
    const struct shape shapes[] = {
        {"qwen3.5 full attention", 16, 2, 256, 0, 1, 300, 1.0f / 16.0f},
        {"gemma4 local (window 1024)", 16, 8, 256, 1024, 1, 1100, 1.0f},
        {"gemma4 global", 16, 2, 512, 0, 2, 200, 1.0f},
    };
    sparkinfer_context *ctx = NULL;
    CHECK(sparkinfer_context_create(SPARKINFER_DEVICE_CPU, &ctx));
    int failed = 0;
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; ++i) {
        if (run_shape(ctx, &shapes[i]) != 0) {
            fprintf(stderr, "%s: FAILED\n", shapes[i].name);
            failed = 1;
        }
    }
    sparkinfer_context_destroy(ctx);
    return failed;
}
