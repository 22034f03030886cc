// A test double of llama.cpp's Metal backend as it behaves on Apple Silicon, so that the ANE
// plugin's rules for Metal's buffers (crates/ggml/src/view/residence.rs) run end to end through
// llama.cpp on Linux: registry `MTL`, one GPU device `MTL0`, and Metal's buffer types
// (ggml/src/ggml-metal/ggml-metal.cpp):
//
//   MTL0         shared: host memory, but is_host = false; the device's default buffer type
//                (compute buffers, KV cache, and the weights when mmap is off).
//   MTL0_Mapped  is_host = false; made only by buffer_from_host_ptr, wrapping the caller's pointer
//                (llama.cpp's mmapped model file) in place, as Metal's newBufferWithBytesNoCopy.
//   MTL0_Private exists for supports_buft only (never allocated here: it is not host memory).
//
// supports_buft accepts exactly these three, buffer get/set/cpy are plain memcpy with no wait
// (ggml-metal-device.m), and compute is asynchronous like a Metal command queue: graph_compute
// only records the graph, which runs (on a CPU backend instance, the buffers being host memory)
// when the backend is synchronized, gets or sets a tensor asynchronously, or computes its next
// graph. So anything that reads this device's memory without synchronizing first reads stale
// data and changes the text, as it would on a Mac.
//
// Then the llama API loads a model with the devices of `--device ANE,MTL0 -ts 0,1 -ngl 99`
// (mode `ane`), `MTL0` alone (`gpu`) or none (`cpu`), mmap on unless --no-mmap, runs a greedy
// prefill of a prompt of more than 64 tokens and STEPS greedy decode steps, and prints:
//
//   weights: <buft> buffers=<n> tensors=<n> bytes=<n>   per buffer type of this device holding
//                                                      weights (usage WEIGHTS)
//   mtl0: graphs=<n> nodes=<n> weight_mul_mat_batched=<n> weight_mul_mat_small=<n>
//                                                      what MTL0 computed (weight MUL_MATs with
//                                                      >= 64 src1 columns, and fewer)
//   prompt_tokens: <n>
//   tokens: <id> <id> ...                               the generated ids
//
// Built and run by `cargo xtask test` (step `metal`).
//
// usage: fake_metal MODEL.gguf BACKEND_DIR ane|gpu|cpu [--no-mmap] [--steps N] [--eager]
// (the plugin comes from GGML_BACKEND_PATH; --eager computes at graph_compute, for debugging)

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ggml-backend-impl.h"
#include "ggml-backend.h"
#include "ggml.h"
#include "llama.h"

#define MAX_TOKENS 1024
#define MAX_BUFFERS 1024
// Weight MUL_MATs with at least this many src1 columns are prefill-sized: the plugin's default
// GGML_ANE_MIN_BATCH.
#define BATCHED 64

static const char *PROMPT =
    "Once upon a time, in a small village by the sea, there lived an old fisherman who told "
    "stories about the stars to anyone who would listen. Every evening the children gathered on "
    "the pier, and he pointed at the sky and named the bright ones, one by one, while the boats "
    "rocked in the harbour and the lamps of the houses went out. He said the sailors of old had "
    "found their way home by them, across storms and long dark nights, and that anyone who "
    "learned their names would never be lost at sea.";

static bool eager = false;

// ------------------------------------------------------------------------------ buffers

struct fake_buffer {
    void *base;
    size_t size;
    bool owned;        // allocated here (MTL0), or wrapping the caller's memory (MTL0_Mapped)
    int tensors;       // tensors allocated in it (views excluded)
};

// Every buffer made, for the report of where the weights went.
static ggml_backend_buffer_t buffers[MAX_BUFFERS];
static int n_buffers = 0;

static void track(ggml_backend_buffer_t b) {
    if (n_buffers < MAX_BUFFERS) buffers[n_buffers++] = b;
}

static void untrack(ggml_backend_buffer_t b) {
    for (int i = 0; i < n_buffers; i++) {
        if (buffers[i] == b) buffers[i] = NULL;
    }
}

static void buffer_free(ggml_backend_buffer_t buffer) {
    struct fake_buffer *ctx = buffer->context;
    untrack(buffer);
    if (ctx->owned) free(ctx->base);
    free(ctx);
}

static void *buffer_get_base(ggml_backend_buffer_t buffer) {
    return ((struct fake_buffer *)buffer->context)->base;
}

static enum ggml_status buffer_init_tensor(ggml_backend_buffer_t buffer, struct ggml_tensor *t) {
    if (t->view_src == NULL) ((struct fake_buffer *)buffer->context)->tensors++;
    return GGML_STATUS_SUCCESS;
}

static void buffer_memset_tensor(ggml_backend_buffer_t buffer, struct ggml_tensor *t,
                                 uint8_t value, size_t offset, size_t size) {
    memset((char *)t->data + offset, value, size);
}

// Metal's shared set/get: a plain memcpy, no wait on the command queue (ggml-metal-device.m).
static void buffer_set_tensor(ggml_backend_buffer_t buffer, struct ggml_tensor *t,
                              const void *data, size_t offset, size_t size) {
    memcpy((char *)t->data + offset, data, size);
}

static void buffer_get_tensor(ggml_backend_buffer_t buffer, const struct ggml_tensor *t,
                              void *data, size_t offset, size_t size) {
    memcpy(data, (const char *)t->data + offset, size);
}

static bool buffer_is_fake(ggml_backend_buffer_t b);

// Metal copies only from its own buffers.
static bool buffer_cpy_tensor(ggml_backend_buffer_t buffer, const struct ggml_tensor *src,
                              struct ggml_tensor *dst) {
    if (src->buffer == NULL || !buffer_is_fake(src->buffer)) return false;
    memcpy(dst->data, src->data, ggml_nbytes(src));
    return true;
}

static void buffer_clear(ggml_backend_buffer_t buffer, uint8_t value) {
    struct fake_buffer *ctx = buffer->context;
    memset(ctx->base, value, ctx->size);
}

static const struct ggml_backend_buffer_i buffer_i = {
    /* .free_buffer   = */ buffer_free,
    /* .get_base      = */ buffer_get_base,
    /* .init_tensor   = */ buffer_init_tensor,
    /* .memset_tensor = */ buffer_memset_tensor,
    /* .set_tensor    = */ buffer_set_tensor,
    /* .get_tensor    = */ buffer_get_tensor,
    /* .set_tensor_2d = */ NULL,
    /* .get_tensor_2d = */ NULL,
    /* .cpy_tensor    = */ buffer_cpy_tensor,
    /* .clear         = */ buffer_clear,
    /* .reset         = */ NULL,
};

static bool buffer_is_fake(ggml_backend_buffer_t b) {
    return b->iface.free_buffer == buffer_free;
}

// ------------------------------------------------------------------------------ buffer types

static struct ggml_backend_device device;

static const char *buft_get_name(ggml_backend_buffer_type_t buft) {
    return buft->context;
}

static ggml_backend_buffer_t new_buffer(ggml_backend_buffer_type_t buft, void *base, size_t size,
                                        bool owned) {
    struct fake_buffer *ctx = calloc(1, sizeof(*ctx));
    ctx->base = base;
    ctx->size = size;
    ctx->owned = owned;
    ggml_backend_buffer_t b = ggml_backend_buffer_init(buft, buffer_i, ctx, size);
    track(b);
    return b;
}

// Shared memory, page-aligned as Metal's vm_allocate (ggml-metal-device.m).
static ggml_backend_buffer_t buft_alloc_buffer(ggml_backend_buffer_type_t buft, size_t size) {
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    void *p = NULL;
    if (posix_memalign(&p, page, (size + page - 1) / page * page) != 0) {
        fprintf(stderr, "fake_metal: cannot allocate %zu bytes\n", size);
        return NULL;
    }
    return new_buffer(buft, p, size, true);
}

static size_t buft_get_alignment(ggml_backend_buffer_type_t buft) {
    return 32;
}

// Metal says false for all three, host memory or not (ggml-metal.cpp:285, :363, :441).
static bool buft_is_host(ggml_backend_buffer_type_t buft) {
    return false;
}

// A macro, not a const object: C needs constant expressions in static initializers.
#define BUFT_I                                                                                     \
    {                                                                                              \
        /* .get_name         = */ buft_get_name,                                                  \
        /* .alloc_buffer     = */ buft_alloc_buffer,                                              \
        /* .alloc_buffer_n   = */ NULL,                                                           \
        /* .get_alignment    = */ buft_get_alignment,                                             \
        /* .get_max_size     = */ NULL,                                                           \
        /* .get_alloc_size   = */ NULL,                                                           \
        /* .get_alloc_size_n = */ NULL,                                                           \
        /* .is_host          = */ buft_is_host,                                                   \
    }

static struct ggml_backend_buffer_type buft_shared = {BUFT_I, &device, "MTL0"};
// Metal's mapped type allocates shared memory too when asked (ggml-metal.cpp:396-399).
static struct ggml_backend_buffer_type buft_mapped = {BUFT_I, &device, "MTL0_Mapped"};
static struct ggml_backend_buffer_type buft_private = {BUFT_I, &device, "MTL0_Private"};

// ------------------------------------------------------------------------------ backend

struct fake_backend {
    ggml_backend_t cpu;
    ggml_backend_set_n_threads_t cpu_set_n_threads;
    // The recorded graph: its nodes, with each node's op and data as recorded, to catch a graph
    // rebuilt under it before it ran (a limit of this double, not of Metal, which encodes at once).
    int n_pending;
    int cap_pending;
    struct ggml_tensor **nodes;
    int *ops;
    void **data;
};

static int64_t stat_graphs = 0, stat_nodes = 0, stat_w_batched = 0, stat_w_small = 0;

static bool is_weight(const struct ggml_tensor *t) {
    const struct ggml_tensor *base = t->view_src ? t->view_src : t;
    return base->buffer != NULL &&
           ggml_backend_buffer_get_usage(base->buffer) == GGML_BACKEND_BUFFER_USAGE_WEIGHTS;
}

static void run(struct fake_backend *ctx, struct ggml_cgraph *g) {
    int n = ggml_graph_n_nodes(g);
    stat_graphs++;
    stat_nodes += n;
    for (int i = 0; i < n; i++) {
        struct ggml_tensor *t = ggml_graph_node(g, i);
        if (t->op == GGML_OP_MUL_MAT && is_weight(t->src[0])) {
            if (t->src[1]->ne[1] >= BATCHED) {
                stat_w_batched++;
            } else {
                stat_w_small++;
            }
        }
    }
    if (ggml_backend_graph_compute(ctx->cpu, g) != GGML_STATUS_SUCCESS) {
        fprintf(stderr, "fake_metal: the CPU backend failed a graph of %d nodes\n", n);
        exit(3);
    }
}

// Runs the recorded graph, if any: the command queue drained.
static void flush(struct fake_backend *ctx) {
    int n = ctx->n_pending;
    if (n == 0) return;
    ctx->n_pending = 0;
    for (int i = 0; i < n; i++) {
        if ((int)ctx->nodes[i]->op != ctx->ops[i] || ctx->nodes[i]->data != ctx->data[i]) {
            fprintf(stderr,
                    "fake_metal: node %d (%s) of a recorded graph changed before the graph ran: "
                    "the host rebuilt its graph without synchronizing MTL0 (rerun with --eager)\n",
                    i, ctx->nodes[i]->name);
            exit(3);
        }
    }
    struct ggml_init_params ip = {ggml_graph_overhead_custom(n, false), NULL, true};
    struct ggml_context *gctx = ggml_init(ip);
    struct ggml_cgraph *g = ggml_new_graph_custom(gctx, n, false);
    for (int i = 0; i < n; i++) ggml_graph_add_node(g, ctx->nodes[i]);
    run(ctx, g);
    ggml_free(gctx);
}

static const char *backend_get_name(ggml_backend_t backend) {
    return "MTL0";
}

static void backend_free(ggml_backend_t backend) {
    struct fake_backend *ctx = backend->context;
    flush(ctx);
    ggml_backend_free(ctx->cpu);
    free(ctx->nodes);
    free(ctx->ops);
    free(ctx->data);
    free(ctx);
    free(backend);
}

// Metal's async get/set are ordered after the queued work: the same as draining it first.
static void backend_set_tensor_async(ggml_backend_t backend, struct ggml_tensor *t,
                                     const void *data, size_t offset, size_t size) {
    flush(backend->context);
    ggml_backend_tensor_set(t, data, offset, size);
}

static void backend_get_tensor_async(ggml_backend_t backend, const struct ggml_tensor *t,
                                     void *data, size_t offset, size_t size) {
    flush(backend->context);
    ggml_backend_tensor_get(t, data, offset, size);
}

static void backend_synchronize(ggml_backend_t backend) {
    flush(backend->context);
}

static enum ggml_status backend_graph_compute(ggml_backend_t backend, struct ggml_cgraph *g) {
    struct fake_backend *ctx = backend->context;
    flush(ctx);
    if (eager) {
        run(ctx, g);
        return GGML_STATUS_SUCCESS;
    }
    int n = ggml_graph_n_nodes(g);
    if (n > ctx->cap_pending) {
        ctx->cap_pending = n;
        ctx->nodes = realloc(ctx->nodes, sizeof(*ctx->nodes) * n);
        ctx->ops = realloc(ctx->ops, sizeof(*ctx->ops) * n);
        ctx->data = realloc(ctx->data, sizeof(*ctx->data) * n);
    }
    for (int i = 0; i < n; i++) {
        struct ggml_tensor *t = ggml_graph_node(g, i);
        ctx->nodes[i] = t;
        ctx->ops[i] = t->op;
        ctx->data[i] = t->data;
    }
    ctx->n_pending = n;
    return GGML_STATUS_SUCCESS;
}

static const struct ggml_backend_i backend_i = {
    /* .get_name            = */ backend_get_name,
    /* .free                = */ backend_free,
    /* .set_tensor_async    = */ backend_set_tensor_async,
    /* .get_tensor_async    = */ backend_get_tensor_async,
    /* .set_tensor_2d_async = */ NULL,
    /* .get_tensor_2d_async = */ NULL,
    /* .cpy_tensor_async    = */ NULL, // Metal's copies Metal<->Metal only
    /* .synchronize         = */ backend_synchronize,
    /* .graph_plan_create   = */ NULL,
    /* .graph_plan_free     = */ NULL,
    /* .graph_plan_update   = */ NULL,
    /* .graph_plan_compute  = */ NULL,
    /* .graph_compute       = */ backend_graph_compute,
    /* .event_record        = */ NULL,
    /* .event_wait          = */ NULL,
    /* .graph_optimize      = */ NULL,
};

static ggml_guid guid = {0x6d, 0x74, 0x6c, 0x30, 0x66, 0x61, 0x6b, 0x65,
                         0x2d, 0x6d, 0x65, 0x74, 0x61, 0x6c, 0x21, 0x00};

// ------------------------------------------------------------------------------ device

static ggml_backend_dev_t cpu_device(void) {
    ggml_backend_dev_t cpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    if (cpu == NULL) {
        fprintf(stderr, "fake_metal: no CPU device registered\n");
        exit(3);
    }
    return cpu;
}

static const char *dev_get_name(ggml_backend_dev_t dev) {
    return "MTL0";
}

static const char *dev_get_description(ggml_backend_dev_t dev) {
    return "fake Metal GPU (host memory, CPU compute)";
}

// Unified memory: the host's.
static void dev_get_memory(ggml_backend_dev_t dev, size_t *free_mem, size_t *total) {
    size_t bytes = (size_t)sysconf(_SC_PHYS_PAGES) * (size_t)sysconf(_SC_PAGESIZE);
    *free_mem = bytes;
    *total = bytes;
}

static enum ggml_backend_dev_type dev_get_type(ggml_backend_dev_t dev) {
    return GGML_BACKEND_DEVICE_TYPE_GPU;
}

static void dev_get_props(ggml_backend_dev_t dev, struct ggml_backend_dev_props *props) {
    props->name = dev_get_name(dev);
    props->description = dev_get_description(dev);
    props->type = dev_get_type(dev);
    props->device_id = NULL;
    dev_get_memory(dev, &props->memory_free, &props->memory_total);
    // Metal's caps (ggml-metal.cpp), but without events: they would only matter to pipeline
    // parallelism, which the ANE (no events) keeps off anyway.
    props->caps.async = true;
    props->caps.host_buffer = false;
    props->caps.buffer_from_host_ptr = true;
    props->caps.events = false;
    props->caps.mmap_support = true;
}

static ggml_backend_t dev_init_backend(ggml_backend_dev_t dev, const char *params) {
    ggml_backend_dev_t cpu = cpu_device();
    struct fake_backend *ctx = calloc(1, sizeof(*ctx));
    ctx->cpu = ggml_backend_dev_init(cpu, NULL);
    if (ctx->cpu == NULL) {
        free(ctx);
        return NULL;
    }
    ctx->cpu_set_n_threads = (ggml_backend_set_n_threads_t)ggml_backend_reg_get_proc_address(
        ggml_backend_dev_backend_reg(cpu), "ggml_backend_set_n_threads");
    ggml_backend_t b = malloc(sizeof(*b));
    b->guid = &guid;
    b->iface = backend_i;
    b->device = dev;
    b->context = ctx;
    return b;
}

static ggml_backend_buffer_type_t dev_get_buffer_type(ggml_backend_dev_t dev) {
    return &buft_shared;
}

// Metal wraps the pointer in place (ggml_metal_buffer_map: base = ptr, size = size).
static ggml_backend_buffer_t dev_buffer_from_host_ptr(ggml_backend_dev_t dev, void *ptr,
                                                      size_t size, size_t max_tensor_size) {
    return new_buffer(&buft_mapped, ptr, size, false);
}

static bool is_own_buft(ggml_backend_buffer_type_t buft) {
    return buft == &buft_shared || buft == &buft_mapped || buft == &buft_private;
}

// The CPU's answer, for tensors in this device's buffers or in host memory.
static bool dev_supports_op(ggml_backend_dev_t dev, const struct ggml_tensor *op) {
    const struct ggml_tensor *ts[GGML_MAX_SRC + 1];
    ts[0] = op;
    for (int i = 0; i < GGML_MAX_SRC; i++) ts[i + 1] = op->src[i];
    for (int i = 0; i <= GGML_MAX_SRC; i++) {
        if (ts[i] == NULL || ts[i]->buffer == NULL) continue;
        ggml_backend_buffer_type_t bt = ggml_backend_buffer_get_type(ts[i]->buffer);
        if (!is_own_buft(bt) && !ggml_backend_buft_is_host(bt)) return false;
    }
    return ggml_backend_dev_supports_op(cpu_device(), op);
}

// Only its own three kinds (ggml-metal.cpp:759-767).
static bool dev_supports_buft(ggml_backend_dev_t dev, ggml_backend_buffer_type_t buft) {
    return buft->device == dev && is_own_buft(buft);
}

// Metal offloads big matmuls whose weights are in host memory (op_offload_min_batch_size 32).
static bool dev_offload_op(ggml_backend_dev_t dev, const struct ggml_tensor *op) {
    return (op->op == GGML_OP_MUL_MAT && op->ne[1] >= 32) ||
           (op->op == GGML_OP_MUL_MAT_ID && op->ne[2] >= 32);
}

static const struct ggml_backend_device_i device_i = {
    /* .get_name             = */ dev_get_name,
    /* .get_description      = */ dev_get_description,
    /* .get_memory           = */ dev_get_memory,
    /* .get_type             = */ dev_get_type,
    /* .get_props            = */ dev_get_props,
    /* .init_backend         = */ dev_init_backend,
    /* .get_buffer_type      = */ dev_get_buffer_type,
    /* .get_host_buffer_type = */ NULL,
    /* .buffer_from_host_ptr = */ dev_buffer_from_host_ptr,
    /* .supports_op          = */ dev_supports_op,
    /* .supports_buft        = */ dev_supports_buft,
    /* .offload_op           = */ dev_offload_op,
    /* .event_new            = */ NULL,
    /* .event_free           = */ NULL,
    /* .event_synchronize    = */ NULL,
};

// ------------------------------------------------------------------------------ registry

static struct ggml_backend_reg reg;

static const char *reg_get_name(ggml_backend_reg_t r) {
    return "MTL";
}

static size_t reg_get_device_count(ggml_backend_reg_t r) {
    return 1;
}

static ggml_backend_dev_t reg_get_device(ggml_backend_reg_t r, size_t index) {
    return index == 0 ? &device : NULL;
}

// llama.cpp sets every backend's threads through its registry; the CPU instance does the work.
static void set_n_threads(ggml_backend_t backend, int n_threads) {
    struct fake_backend *ctx = backend->context;
    if (ctx->cpu_set_n_threads) ctx->cpu_set_n_threads(ctx->cpu, n_threads);
}

static void *reg_get_proc_address(ggml_backend_reg_t r, const char *name) {
    if (strcmp(name, "ggml_backend_set_n_threads") == 0) return (void *)set_n_threads;
    return NULL;
}

static const struct ggml_backend_reg_i reg_i = {
    /* .get_name         = */ reg_get_name,
    /* .get_device_count = */ reg_get_device_count,
    /* .get_device       = */ reg_get_device,
    /* .get_proc_address = */ reg_get_proc_address,
};

// ------------------------------------------------------------------------------ main

// One line per buffer type of this device that holds weights.
static void report_weights(void) {
    ggml_backend_buffer_type_t types[] = {&buft_mapped, &buft_shared, &buft_private};
    for (int k = 0; k < 3; k++) {
        int n = 0, tensors = 0;
        size_t bytes = 0;
        for (int i = 0; i < n_buffers; i++) {
            ggml_backend_buffer_t b = buffers[i];
            if (b == NULL || ggml_backend_buffer_get_type(b) != types[k]) continue;
            if (ggml_backend_buffer_get_usage(b) != GGML_BACKEND_BUFFER_USAGE_WEIGHTS) continue;
            n++;
            tensors += ((struct fake_buffer *)b->context)->tensors;
            bytes += ggml_backend_buffer_get_size(b);
        }
        if (n > 0) {
            printf("weights: %s buffers=%d tensors=%d bytes=%zu\n", ggml_backend_buft_name(types[k]),
                   n, tensors, bytes);
        }
    }
}

static int argmax(const float *v, int n) {
    int best = 0;
    for (int i = 1; i < n; i++) {
        if (v[i] > v[best]) best = i;
    }
    return best;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr,
                "usage: %s MODEL.gguf BACKEND_DIR ane|gpu|cpu [--no-mmap] [--steps N] [--eager]\n",
                argv[0]);
        return 2;
    }
    const char *mode = argv[3];
    bool mmap_on = true;
    int steps = 16;
    for (int i = 4; i < argc; i++) {
        if (strcmp(argv[i], "--no-mmap") == 0) {
            mmap_on = false;
        } else if (strcmp(argv[i], "--eager") == 0) {
            eager = true;
        } else if (strcmp(argv[i], "--steps") == 0 && i + 1 < argc) {
            steps = atoi(argv[++i]);
        } else {
            fprintf(stderr, "unknown argument %s\n", argv[i]);
            return 2;
        }
    }

    // Registered first, as a static Apple build registers Metal before the CPU and the plugin.
    device = (struct ggml_backend_device){device_i, &reg, NULL};
    reg = (struct ggml_backend_reg){GGML_BACKEND_API_VERSION, reg_i, NULL};
    ggml_backend_register(&reg);
    ggml_backend_load_all_from_path(argv[2]);
    llama_backend_init();

    ggml_backend_dev_t mtl = ggml_backend_dev_by_name("MTL0");
    ggml_backend_dev_t ane = ggml_backend_dev_by_name("ANE");
    if (mtl != &device) {
        fprintf(stderr, "fake_metal: MTL0 is not the fake device\n");
        return 1;
    }
    ggml_backend_dev_t devs[3] = {NULL, NULL, NULL};
    float *split = calloc(llama_max_devices(), sizeof(float));
    struct llama_model_params mp = llama_model_default_params();
    if (strcmp(mode, "ane") == 0) {
        if (ane == NULL) {
            fprintf(stderr, "fake_metal: no ANE device (is GGML_BACKEND_PATH the plugin?)\n");
            return 1;
        }
        devs[0] = ane;
        devs[1] = mtl;
        split[1] = 1.0f;
        mp.tensor_split = split;
        mp.n_gpu_layers = 99;
    } else if (strcmp(mode, "gpu") == 0) {
        devs[0] = mtl;
        mp.n_gpu_layers = 99;
    } else if (strcmp(mode, "cpu") == 0) {
        mp.n_gpu_layers = 0;
    } else {
        fprintf(stderr, "unknown mode %s\n", mode);
        return 2;
    }
    mp.devices = devs;
    mp.load_mode = mmap_on ? LLAMA_LOAD_MODE_MMAP : LLAMA_LOAD_MODE_NONE;
    // CPU_REPACK would give the CPU-only run other kernels than the CPU backend behind MTL0.
    mp.use_extra_bufts = false;

    struct llama_model *model = llama_model_load_from_file(argv[1], mp);
    if (!model) {
        fprintf(stderr, "cannot load %s\n", argv[1]);
        return 1;
    }
    report_weights();

    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 512;
    cp.n_batch = 512;
    cp.n_ubatch = 512;
    cp.n_threads = 2;
    cp.n_threads_batch = 2;
    cp.no_perf = true;
    struct llama_context *ctx = llama_init_from_model(model, cp);
    if (!ctx) {
        fprintf(stderr, "cannot create a context\n");
        return 1;
    }
    const struct llama_vocab *vocab = llama_model_get_vocab(model);
    int n_vocab = llama_vocab_n_tokens(vocab);
    llama_token toks[MAX_TOKENS];
    int n = llama_tokenize(vocab, PROMPT, (int)strlen(PROMPT), toks, MAX_TOKENS, true, false);
    printf("prompt_tokens: %d\n", n);
    if (n <= BATCHED || n + steps > (int)cp.n_ctx) {
        fprintf(stderr, "fake_metal: the prompt is %d tokens: not a prefill the ANE takes\n", n);
        return 1;
    }
    if (llama_decode(ctx, llama_batch_get_one(toks, n)) != 0) {
        fprintf(stderr, "prefill failed\n");
        return 1;
    }
    printf("tokens:");
    for (int s = 0; s < steps; s++) {
        const float *l = llama_get_logits_ith(ctx, -1);
        if (!l) {
            fprintf(stderr, "no logits at step %d\n", s);
            return 1;
        }
        llama_token next = argmax(l, n_vocab);
        printf(" %d", next);
        if (s + 1 < steps && llama_decode(ctx, llama_batch_get_one(&next, 1)) != 0) {
            fprintf(stderr, "decode step %d failed\n", s);
            return 1;
        }
    }
    printf("\n");
    llama_free(ctx);
    llama_model_free(model);
    printf("mtl0: graphs=%lld nodes=%lld weight_mul_mat_batched=%lld weight_mul_mat_small=%lld\n",
           (long long)stat_graphs, (long long)stat_nodes, (long long)stat_w_batched,
           (long long)stat_w_small);
    fflush(stdout);
    free(split);
    return 0;
}
