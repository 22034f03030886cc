// Two llama contexts on one model, decoding at the same time from two threads, with the ANE
// plugin loaded (GGML_BACKEND_PATH): each thread's last-token logits, after a prefill the plugin
// takes and a few greedy decode steps, must equal those of a run with a single context.
//
// Built and run by `cargo xtask test` (step `contexts`); part of the plugin's thread-safety
// checks (issue 6): one device state shared by several backend instances used concurrently.
//
// usage: two_contexts MODEL.gguf ROUNDS BACKEND_DIR (where libggml-cpu is; the plugin comes from
// GGML_BACKEND_PATH)

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ggml-backend.h"
#include "llama.h"

#define MAX_TOKENS 512
#define STEPS 4

static const char *PROMPT =
    "Once upon a time, in a small village by the sea, there lived an old fisherman who told "
    "stories about the stars to anyone who would listen.";

struct job {
    struct llama_model *model;
    int n_vocab;
    float *logits; // STEPS+1 rows of n_vocab
    int ok;
};

static int argmax(const float *v, int n) {
    int best = 0;
    for (int i = 1; i < n; i++) {
        if (v[i] > v[best]) best = i;
    }
    return best;
}

static void *run(void *arg) {
    struct job *j = arg;
    j->ok = 0;
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 1024;
    cp.n_batch = 512;
    cp.n_ubatch = 512;
    cp.n_threads = 1;
    cp.n_threads_batch = 1;
    cp.no_perf = true;
    struct llama_context *ctx = llama_init_from_model(j->model, cp);
    if (!ctx) return NULL;
    const struct llama_vocab *vocab = llama_model_get_vocab(j->model);
    llama_token toks[MAX_TOKENS];
    int n = llama_tokenize(vocab, PROMPT, (int)strlen(PROMPT), toks, MAX_TOKENS, true, false);
    if (n <= 0) goto done;
    if (llama_decode(ctx, llama_batch_get_one(toks, n)) != 0) goto done;
    for (int s = 0; s <= STEPS; s++) {
        const float *l = llama_get_logits_ith(ctx, -1);
        if (!l) goto done;
        memcpy(j->logits + (size_t)s * j->n_vocab, l, sizeof(float) * j->n_vocab);
        if (s == STEPS) break;
        llama_token next = argmax(l, j->n_vocab);
        if (llama_decode(ctx, llama_batch_get_one(&next, 1)) != 0) goto done;
    }
    j->ok = 1;
done:
    llama_free(ctx);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s MODEL.gguf ROUNDS BACKEND_DIR\n", argv[0]);
        return 2;
    }
    int rounds = atoi(argv[2]);
    ggml_backend_load_all_from_path(argv[3]);
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    struct llama_model *model = llama_model_load_from_file(argv[1], mp);
    if (!model) {
        fprintf(stderr, "cannot load %s\n", argv[1]);
        return 1;
    }
    int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    size_t rows = (size_t)(STEPS + 1) * n_vocab;

    struct job ref = {model, n_vocab, calloc(rows, sizeof(float)), 0};
    run(&ref);
    if (!ref.ok) {
        fprintf(stderr, "single-context run failed\n");
        return 1;
    }
    int mismatches = 0;
    for (int r = 0; r < rounds; r++) {
        struct job a = {model, n_vocab, calloc(rows, sizeof(float)), 0};
        struct job b = {model, n_vocab, calloc(rows, sizeof(float)), 0};
        pthread_t ta, tb;
        pthread_create(&ta, NULL, run, &a);
        pthread_create(&tb, NULL, run, &b);
        pthread_join(ta, NULL);
        pthread_join(tb, NULL);
        if (!a.ok || !b.ok) {
            fprintf(stderr, "round %d: a context failed (a %d, b %d)\n", r, a.ok, b.ok);
            return 1;
        }
        if (memcmp(a.logits, ref.logits, rows * sizeof(float)) != 0) mismatches++;
        if (memcmp(b.logits, ref.logits, rows * sizeof(float)) != 0) mismatches++;
        free(a.logits);
        free(b.logits);
    }
    printf("two_contexts: %d rounds x 2 concurrent contexts, %d logit mismatches against one context\n",
           rounds, mismatches);
    llama_model_free(model);
    free(ref.logits);
    return mismatches == 0 ? 0 : 1;
}
