/* A decode-style step through the C API: y = W . rmsnorm(x + residual), checked against a plain C
 * computation. Runs on CUDA device 0 when there is one, else on the CPU backend.
 * Build: cc rmsnorm_gemv.c $(pkg-config --cflags --libs sparkinfer) -lm -o rmsnorm_gemv */
#include <sparkinfer/sparkinfer.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHECK(call)                                                                                     \
    do {                                                                                                \
        sparkinfer_status st_ = (call);                                                                 \
        if (st_ != SPARKINFER_STATUS_SUCCESS) {                                                         \
            fprintf(stderr, "%s failed: %s: %s\n", #call, sparkinfer_status_string(st_), sparkinfer_last_error()); \
            exit(1);                                                                                    \
        }                                                                                               \
    } while (0)

static float bf16_to_float(uint16_t b) {
    uint32_t bits = (uint32_t)b << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* Round to nearest even, as the library does. */
static uint16_t float_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

static float uniform(unsigned *state) {
    *state = *state * 1664525u + 1013904223u;
    return (float)(*state >> 8) / (float)(1u << 24) * 2.0f - 1.0f;
}

int main(void) {
    enum { ROWS = 2, DIM = 2048, N = 512 };
    int32_t count = 0;
    int32_t device = (sparkinfer_device_count(&count) == SPARKINFER_STATUS_SUCCESS && count > 0) ? 0 : SPARKINFER_DEVICE_CPU;
    sparkinfer_context *ctx = NULL;
    CHECK(sparkinfer_context_create(device, &ctx));
    printf("running on %s\n", device == SPARKINFER_DEVICE_CPU ? "the CPU backend" : "CUDA device 0");

    static uint16_t x[ROWS * DIM], res[ROWS * DIM], w_norm[DIM], w[N * DIM], res_out[ROWS * DIM];
    static float y[ROWS * N];
    unsigned seed = 12345u;
    for (int i = 0; i < ROWS * DIM; ++i) x[i] = float_to_bf16(uniform(&seed));
    for (int i = 0; i < ROWS * DIM; ++i) res[i] = float_to_bf16(uniform(&seed));
    for (int i = 0; i < DIM; ++i) w_norm[i] = float_to_bf16(0.2f * uniform(&seed));
    for (int i = 0; i < N * DIM; ++i) w[i] = float_to_bf16(uniform(&seed) / 45.0f);

    void *d_x, *d_res, *d_wn, *d_normed, *d_w, *d_y;
    CHECK(sparkinfer_malloc(ctx, sizeof x, &d_x));
    CHECK(sparkinfer_malloc(ctx, sizeof res, &d_res));
    CHECK(sparkinfer_malloc(ctx, sizeof w_norm, &d_wn));
    CHECK(sparkinfer_malloc(ctx, sizeof x, &d_normed));
    CHECK(sparkinfer_malloc(ctx, sizeof w, &d_w));
    CHECK(sparkinfer_malloc(ctx, sizeof y, &d_y));
    CHECK(sparkinfer_memcpy(ctx, d_x, x, sizeof x));
    CHECK(sparkinfer_memcpy(ctx, d_res, res, sizeof res));
    CHECK(sparkinfer_memcpy(ctx, d_wn, w_norm, sizeof w_norm));
    CHECK(sparkinfer_memcpy(ctx, d_w, w, sizeof w));

    sparkinfer_stream stream = NULL;
    CHECK(sparkinfer_stream_create(ctx, &stream));
    sparkinfer_rmsnorm_params norm = {0};
    norm.x = d_x;
    norm.residual = d_res;
    norm.weight = d_wn;
    norm.out = d_normed;
    norm.rows = ROWS;
    norm.dim = DIM;
    norm.eps = 1e-6f;
    norm.weight_style = SPARKINFER_WEIGHT_STYLE_OFFSET_ONE;
    sparkinfer_gemv_params proj = {0};
    proj.x = d_normed;
    proj.w = d_w;
    proj.y = d_y;
    proj.m = ROWS;
    proj.n = N;
    proj.k = DIM;
    proj.y_dtype = SPARKINFER_DTYPE_F32;
    proj.flags = SPARKINFER_GEMV_WEIGHTS_STATIC; /* model weights: never written during decode */
    CHECK(sparkinfer_rmsnorm(ctx, &norm, stream));
    CHECK(sparkinfer_gemv(ctx, &proj, stream));
    CHECK(sparkinfer_stream_synchronize(ctx, stream));
    CHECK(sparkinfer_memcpy(ctx, y, d_y, sizeof y));
    CHECK(sparkinfer_memcpy(ctx, res_out, d_res, sizeof res_out));

    /* The same computation in plain C: the residual sum is rounded to bf16 before the norm, the normalised
     * row is rounded to bf16 before the projection, sums in double. */
    double err2 = 0.0, ref2 = 0.0;
    int residual_mismatches = 0;
    static float normed[DIM];
    for (int r = 0; r < ROWS; ++r) {
        double ss = 0.0;
        for (int i = 0; i < DIM; ++i) {
            uint16_t s = float_to_bf16(bf16_to_float(x[r * DIM + i]) + bf16_to_float(res[r * DIM + i]));
            residual_mismatches += s != res_out[r * DIM + i];
            normed[i] = bf16_to_float(s);
            ss += (double)normed[i] * normed[i];
        }
        float inv = (float)(1.0 / sqrt(ss / DIM + 1e-6));
        for (int i = 0; i < DIM; ++i) normed[i] = bf16_to_float(float_to_bf16(normed[i] * inv * (1.0f + bf16_to_float(w_norm[i]))));
        for (int j = 0; j < N; ++j) {
            double acc = 0.0;
            for (int i = 0; i < DIM; ++i) acc += (double)normed[i] * bf16_to_float(w[j * DIM + i]);
            double d = y[r * N + j] - acc;
            if (!(fabs(d) < 1e30)) d = 1e30; /* NaN or Inf fails the check below */
            err2 += d * d;
            ref2 += acc * acc;
        }
    }
    double rel = sqrt(err2 / ref2);
    printf("rmsnorm+residual -> gemv: relative L2 error %.2e, residual mismatches %d\n", rel, residual_mismatches);

    sparkinfer_free(ctx, d_x);
    sparkinfer_free(ctx, d_res);
    sparkinfer_free(ctx, d_wn);
    sparkinfer_free(ctx, d_normed);
    sparkinfer_free(ctx, d_w);
    sparkinfer_free(ctx, d_y);
    CHECK(sparkinfer_stream_destroy(ctx, stream));
    sparkinfer_context_destroy(ctx);
    if (!(rel <= 1e-2) || residual_mismatches != 0) {
        fprintf(stderr, "FAILED\n");
        return 1;
    }
    printf("ok\n");
    return 0;
}
