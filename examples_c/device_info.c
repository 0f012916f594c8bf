/* Prints the library version, the CUDA devices and what a context reports about them.
 * Build: cc device_info.c $(pkg-config --cflags --libs sparkinfer) -o device_info */
#include <sparkinfer/sparkinfer.h>
#include <stdio.h>

static int print_context(int32_t device) {
    sparkinfer_context *ctx = NULL;
    sparkinfer_status st = sparkinfer_context_create(device, &ctx);
    if (st != SPARKINFER_STATUS_SUCCESS) {
        fprintf(stderr, "context_create(%d): %s: %s\n", device, sparkinfer_status_string(st), sparkinfer_last_error());
        return 1;
    }
    sparkinfer_device_info info;
    st = sparkinfer_context_device_info(ctx, &info);
    if (st != SPARKINFER_STATUS_SUCCESS) {
        fprintf(stderr, "device_info: %s: %s\n", sparkinfer_status_string(st), sparkinfer_last_error());
        sparkinfer_context_destroy(ctx);
        return 1;
    }
    if (info.backend == SPARKINFER_BACKEND_CPU) {
        printf("  %s\n", info.name);
    } else {
        printf("  [%d] %s, sm_%d%d, %d SMs, %.1f GiB, L2 %d MiB, %d KiB shared memory per block\n", info.ordinal,
               info.name, info.compute_capability_major, info.compute_capability_minor, info.sm_count,
               (double)info.total_memory_bytes / (1u << 30), info.l2_cache_bytes >> 20,
               info.max_shared_memory_per_block >> 10);
    }
    sparkinfer_context_destroy(ctx);
    return 0;
}

int main(void) {
    printf("sparkinfer %s (header %s), ABI %u\n", sparkinfer_version(), SPARKINFER_VERSION_STRING,
           sparkinfer_abi_version());
    if (sparkinfer_abi_version() != SPARKINFER_ABI_VERSION) {
        fprintf(stderr, "ABI mismatch: library %u, header %u\n", sparkinfer_abi_version(), SPARKINFER_ABI_VERSION);
        return 1;
    }
    int32_t count = 0;
    sparkinfer_status st = sparkinfer_device_count(&count);
    int failed = 0;
    if (st == SPARKINFER_STATUS_SUCCESS && count > 0) {
        printf("%d CUDA device(s):\n", count);
        for (int32_t d = 0; d < count; ++d) failed |= print_context(d);
    } else {
        printf("no CUDA device (%s: %s)\n", sparkinfer_status_string(st),
               st == SPARKINFER_STATUS_SUCCESS ? "count is 0" : sparkinfer_last_error());
    }
    printf("CPU backend:\n");
    failed |= print_context(SPARKINFER_DEVICE_CPU);
    return failed;
}
