/* One MUL_MAT (Q4_K weights in a WEIGHTS buffer, f32 activations), timed on a backend of the
 * host's own registry: `cpu` (llama.cpp's CPU backend) or `ane` (the plugin at PLUGIN). Built
 * and run by `cargo xtask bench-fallback`, which sets GGML_ANE_* for the ANE runs.
 *
 * usage: bench_fallback cpu|ane CPU_LIB PLUGIN K M N REPS THREADS
 * prints: `ms <median> <min>` on stdout, or an error on stderr and exit 1. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void set_threads(ggml_backend_reg_t reg, ggml_backend_t be, int n) {
    typedef void (*set_fn)(ggml_backend_t, int);
    set_fn f = (set_fn)ggml_backend_reg_get_proc_address(reg, "ggml_backend_set_n_threads");
    if (f) f(be, n);
}

int main(int argc, char **argv) {
    if (argc != 9) {
        fprintf(stderr, "usage: %s cpu|ane CPU_LIB PLUGIN K M N REPS THREADS\n", argv[0]);
        return 2;
    }
    const int ane = strcmp(argv[1], "ane") == 0;
    const long k = atol(argv[4]), m = atol(argv[5]), n = atol(argv[6]);
    const int reps = atoi(argv[7]), threads = atoi(argv[8]);

    ggml_backend_reg_t cpu_reg = ggml_backend_load(argv[2]);
    if (!cpu_reg) { fprintf(stderr, "cannot load the CPU backend %s\n", argv[2]); return 1; }
    ggml_backend_reg_t reg = cpu_reg;
    if (ane) {
        reg = ggml_backend_load(argv[3]);
        if (!reg) { fprintf(stderr, "cannot load the plugin %s\n", argv[3]); return 1; }
    }
    ggml_backend_dev_t dev = ggml_backend_reg_dev_get(reg, 0);
    ggml_backend_t be = ggml_backend_dev_init(dev, NULL);
    if (!be) { fprintf(stderr, "cannot init %s\n", ggml_backend_dev_name(dev)); return 1; }
    set_threads(reg, be, threads);

    struct ggml_init_params ip = { 8 * ggml_tensor_overhead() + ggml_graph_overhead(), NULL, true };
    struct ggml_context *cw = ggml_init(ip), *cx = ggml_init(ip);
    struct ggml_tensor *w = ggml_new_tensor_2d(cw, GGML_TYPE_Q4_K, k, m);
    struct ggml_tensor *x = ggml_new_tensor_2d(cx, GGML_TYPE_F32, k, n);
    struct ggml_tensor *y = ggml_mul_mat(cx, w, x);
    struct ggml_cgraph *gf = ggml_new_graph(cx);
    ggml_build_forward_expand(gf, y);

    ggml_backend_buffer_type_t host = ggml_backend_dev_buffer_type(ggml_backend_reg_dev_get(cpu_reg, 0));
    ggml_backend_buffer_t bw = ggml_backend_alloc_ctx_tensors_from_buft(cw, host);
    ggml_backend_buffer_t bx = ggml_backend_alloc_ctx_tensors_from_buft(cx, host);
    if (!bw || !bx) { fprintf(stderr, "allocation failed\n"); return 1; }
    ggml_backend_buffer_set_usage(bw, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);

    float *f = malloc(sizeof(float) * k * (m > n ? m : n));
    srand(1);
    for (long i = 0; i < k * m; i++) f[i] = (float)rand() / RAND_MAX * 2.0f - 1.0f;
    ggml_quantize_chunk(GGML_TYPE_Q4_K, f, w->data, 0, m, k, NULL);
    for (long i = 0; i < k * n; i++) f[i] = (float)rand() / RAND_MAX * 2.0f - 1.0f;
    memcpy(x->data, f, sizeof(float) * k * n);
    free(f);

    if (ane && !ggml_backend_supports_op(be, y)) {
        fprintf(stderr, "the ANE backend declines the MUL_MAT\n");
        return 1;
    }
    double *t = malloc(sizeof(double) * reps);
    for (int r = -1; r < reps; r++) {
        double t0 = now_ms();
        if (ggml_backend_graph_compute(be, gf) != GGML_STATUS_SUCCESS) {
            fprintf(stderr, "graph_compute failed\n");
            return 1;
        }
        if (r >= 0) t[r] = now_ms() - t0;
    }
    qsort(t, reps, sizeof(double), cmp);
    printf("ms %.3f %.3f\n", t[reps / 2], t[0]);
    fflush(stdout);
    ggml_backend_free(be);
    return 0;
}
