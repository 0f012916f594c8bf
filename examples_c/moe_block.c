/*
 * A Qwen3.5-shaped and a Gemma 4-shaped MoE block through the C API.
 *
 * The CPU backend always runs the block. When a CUDA device is usable, the block is also captured in a
 * CUDA graph on the GPU, replayed twice with new inputs, and each replay's output is checked against the
 * CPU backend. Hidden size, intermediate sizes and top-k are the models'; the expert count is cut to 32
 * (the CPU backend's memory and time) unless the first argument is "--full".
 *
 * Build: cc moe_block.c $(pkg-config --cflags --libs sparkinfer) -lm
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <sparkinfer/sparkinfer.h>

#define CHECK(call)                                                                                  \
    do {                                                                                             \
        enum sparkinfer_status s_ = (call);                                                          \
        if (s_ != SPARKINFER_STATUS_SUCCESS) {                                                       \
            fprintf(stderr, "%s:%d: %s failed: %s: %s\n", __FILE__, __LINE__, #call,                  \
                    sparkinfer_status_string(s_), sparkinfer_last_error());                          \
            exit(1);                                                                                 \
        }                                                                                            \
    } while (0)

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static float uniform(void) { /* xorshift64*, uniform in [-1, 1) */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (float)((rng_state * 0x2545F4914F6CDD1Dull) >> 40) / (float)(1 << 23) - 1.0f;
}

static uint16_t to_bf16(float f) { /* round to nearest even */
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7fff + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

static float from_bf16(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static uint16_t* random_bf16(size_t n, float scale) {
    uint16_t* v = malloc(n * 2);
    for (size_t i = 0; i < n; ++i) v[i] = to_bf16(uniform() * scale);
    return v;
}

struct shape {
    const char* name;
    int64_t hidden, experts, top_k, inter, dense_inter;
    int gemma;
};

/* Host copies of every tensor of one block. */
struct block {
    struct shape s;
    int64_t tokens;
    uint16_t *x, *router, *input_scale, *gate_up, *down, *dense_gate_up, *dense_down, *dense_gate;
    float* expert_scale;
};

static size_t bytes_of(const struct block* b, int which) {
    const struct shape* s = &b->s;
    switch (which) {
        case 0: return (size_t)(b->tokens * s->hidden * 2);
        case 1: return (size_t)(s->experts * s->hidden * 2);
        case 2: return (size_t)(s->hidden * 2);
        case 3: return (size_t)(s->experts * 2 * s->inter * s->hidden * 2);
        case 4: return (size_t)(s->experts * s->hidden * s->inter * 2);
        case 5: return (size_t)(2 * s->dense_inter * s->hidden * 2);
        case 6: return (size_t)(s->hidden * s->dense_inter * 2);
        case 7: return (size_t)(s->hidden * 2);
        default: return (size_t)(s->experts * 4);
    }
}

static void* tensor_of(const struct block* b, int which) {
    void* t[9] = {b->x, b->router, b->input_scale, b->gate_up, b->down,
                  b->dense_gate_up, b->dense_down, b->dense_gate, b->expert_scale};
    return t[which];
}

static struct block make_block(struct shape s, int64_t tokens) {
    struct block b = {s, tokens, 0, 0, 0, 0, 0, 0, 0, 0, 0};
    float h = (float)s.hidden;
    b.x = random_bf16((size_t)(tokens * s.hidden), 1.7f);
    b.router = random_bf16((size_t)(s.experts * s.hidden), 6.0f / sqrtf(h));
    b.gate_up = random_bf16((size_t)(s.experts * 2 * s.inter * s.hidden), 1.7f / sqrtf(h));
    b.down = random_bf16((size_t)(s.experts * s.hidden * s.inter), 1.7f / sqrtf((float)s.inter));
    b.dense_gate_up = random_bf16((size_t)(2 * s.dense_inter * s.hidden), 1.7f / sqrtf(h));
    b.dense_down = random_bf16((size_t)(s.hidden * s.dense_inter), 1.7f / sqrtf((float)s.dense_inter));
    if (s.gemma) {
        b.input_scale = malloc((size_t)s.hidden * 2);
        for (int64_t i = 0; i < s.hidden; ++i) b.input_scale[i] = to_bf16(1.0f + 0.5f * uniform());
        b.expert_scale = malloc((size_t)s.experts * 4);
        for (int64_t e = 0; e < s.experts; ++e) b.expert_scale[e] = 1.0f + 0.5f * uniform();
    } else {
        b.dense_gate = random_bf16((size_t)s.hidden, 1.7f / sqrtf(h));
    }
    return b;
}

static void free_block(struct block* b) {
    for (int i = 0; i < 9; ++i) free(tensor_of(b, i));
}

/* Pointers of a block's tensors in one context's memory, and its output and workspace. */
struct placed {
    void* t[9];
    void* out;
    void* workspace;
    size_t workspace_bytes;
};

static struct placed place(const struct sparkinfer_context* ctx, const struct block* b) {
    struct placed p;
    memset(&p, 0, sizeof p);
    for (int i = 0; i < 9; ++i) {
        if (tensor_of(b, i) == NULL) continue;
        CHECK(sparkinfer_malloc(ctx, bytes_of(b, i), &p.t[i]));
        CHECK(sparkinfer_memcpy(ctx, p.t[i], tensor_of(b, i), bytes_of(b, i)));
    }
    CHECK(sparkinfer_malloc(ctx, bytes_of(b, 0), &p.out));
    CHECK(sparkinfer_moe_forward_workspace_size(b->tokens, b->s.hidden, b->s.experts, b->s.top_k, b->s.inter,
                                                b->s.dense_inter, &p.workspace_bytes));
    CHECK(sparkinfer_malloc(ctx, p.workspace_bytes, &p.workspace));
    return p;
}

static void unplace(const struct sparkinfer_context* ctx, struct placed* p) {
    for (int i = 0; i < 9; ++i) CHECK(sparkinfer_free(ctx, p->t[i]));
    CHECK(sparkinfer_free(ctx, p->out));
    CHECK(sparkinfer_free(ctx, p->workspace));
}

static struct sparkinfer_moe_forward_params params_of(const struct block* b, const struct placed* p) {
    struct sparkinfer_moe_forward_params q;
    memset(&q, 0, sizeof q);
    q.x = p->t[0];
    q.out = p->out;
    q.tokens = b->tokens;
    q.hidden = b->s.hidden;
    q.router_weight = p->t[1];
    q.router_input_scale = p->t[2];
    q.router_eps = 1e-6f;
    q.experts = b->s.experts;
    q.top_k = b->s.top_k;
    q.scoring = SPARKINFER_SCORING_SOFTMAX;
    q.renormalize = 1;
    q.expert_scale = p->t[8];
    q.gate_up = p->t[3];
    q.down = p->t[4];
    q.inter = b->s.inter;
    q.activation = b->s.gemma ? SPARKINFER_ACTIVATION_GELU_TANH : SPARKINFER_ACTIVATION_SILU;
    q.dense_gate_up = p->t[5];
    q.dense_down = p->t[6];
    q.dense_inter = b->s.dense_inter;
    q.dense_gate_weight = p->t[7];
    return q;
}

static double rel_err(const uint16_t* got, const uint16_t* want, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; ++i) {
        double g = from_bf16(got[i]), w = from_bf16(want[i]);
        if (!isfinite(g)) return INFINITY;
        num += (g - w) * (g - w);
        den += w * w;
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

/* Runs one block on the CPU backend and, when `gpu` is set, in a graph on the GPU; returns 0 on success. */
static int run_block(struct sparkinfer_context* cpu, struct sparkinfer_context* gpu, struct shape s) {
    const int64_t tokens = 2;
    struct block b = make_block(s, tokens);
    size_t out_bytes = bytes_of(&b, 0);
    uint16_t* want = malloc(out_bytes);
    uint16_t* got = malloc(out_bytes);
    int failed = 0;

    struct placed pc = place(cpu, &b);
    struct sparkinfer_moe_forward_params qc = params_of(&b, &pc);
    CHECK(sparkinfer_moe_forward(cpu, &qc, pc.workspace, pc.workspace_bytes, NULL));
    memcpy(want, pc.out, out_bytes);
    printf("%-8s E=%lld T=%lld: CPU backend out[0..4] = %.4f %.4f %.4f %.4f (workspace %zu bytes)\n", s.name,
           (long long)s.experts, (long long)tokens, from_bf16(want[0]), from_bf16(want[1]), from_bf16(want[2]),
           from_bf16(want[3]), pc.workspace_bytes);

    if (gpu != NULL) {
        struct placed pg = place(gpu, &b);
        struct sparkinfer_moe_forward_params qg = params_of(&b, &pg);
        sparkinfer_stream stream;
        struct sparkinfer_graph* graph;
        CHECK(sparkinfer_stream_create(gpu, &stream));
        CHECK(sparkinfer_graph_begin_capture(gpu, stream));
        CHECK(sparkinfer_moe_forward(gpu, &qg, pg.workspace, pg.workspace_bytes, stream));
        CHECK(sparkinfer_graph_end_capture(gpu, stream, &graph));
        for (int replay = 0; replay < 2; ++replay) {
            if (replay > 0) {
                /* New inputs at the captured address; they route to other experts. */
                for (int64_t i = 0; i < tokens * s.hidden; ++i) b.x[i] = to_bf16(1.7f * uniform());
                CHECK(sparkinfer_memcpy(cpu, pc.t[0], b.x, out_bytes));
                CHECK(sparkinfer_moe_forward(cpu, &qc, pc.workspace, pc.workspace_bytes, NULL));
                memcpy(want, pc.out, out_bytes);
                CHECK(sparkinfer_memcpy(gpu, pg.t[0], b.x, out_bytes));
            }
            CHECK(sparkinfer_graph_launch(gpu, graph, stream));
            CHECK(sparkinfer_stream_synchronize(gpu, stream));
            CHECK(sparkinfer_memcpy(gpu, got, pg.out, out_bytes));
            double err = rel_err(got, want, out_bytes / 2);
            int ok = err <= 1e-2;
            failed |= !ok;
            printf("%-8s GPU graph replay %d vs CPU backend: rel err %.2e %s\n", s.name, replay, err,
                   ok ? "ok" : "FAIL");
        }
        sparkinfer_graph_destroy(graph);
        CHECK(sparkinfer_stream_destroy(gpu, stream));
        unplace(gpu, &pg);
    }
    unplace(cpu, &pc);
    free(want);
    free(got);
    free_block(&b);
    return failed;
}

int main(int argc, char** argv) {
    int full = argc > 1 && strcmp(argv[1], "--full") == 0;
    struct shape qwen = {"qwen3.5", 2048, full ? 256 : 32, 8, 512, 512, 0};
    struct shape gemma = {"gemma4", 2816, full ? 128 : 32, 8, 704, 2112, 1};

    struct sparkinfer_context* cpu = NULL;
    struct sparkinfer_context* gpu = NULL;
    CHECK(sparkinfer_context_create(SPARKINFER_DEVICE_CPU, &cpu));
    int32_t devices = 0;
    if (sparkinfer_device_count(&devices) == SPARKINFER_STATUS_SUCCESS && devices > 0) {
        CHECK(sparkinfer_context_create(0, &gpu));
    } else {
        printf("no CUDA device: CPU backend only\n");
    }
    int failed = run_block(cpu, gpu, qwen) | run_block(cpu, gpu, gemma);
    sparkinfer_context_destroy(gpu);
    sparkinfer_context_destroy(cpu);
    printf(failed ? "moe_block: FAILED\n" : "moe_block: ok\n");
    return failed;
}
