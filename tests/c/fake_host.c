// A host of a ggml version the plugin does not support: it exports ggml_version() (and
// ggml_op_name) as a libggml-base of that version would, then loads the plugin the way ggml's
// loader does (score, then init). The plugin must score 0, return NULL from init, and say why in
// one line; it must not crash or touch anything else.
//
// Built and run by `cargo xtask test` (step `host2`), linked with -rdynamic so the plugin's
// dlsym(RTLD_DEFAULT, ...) finds these symbols.
//
// usage: fake_host PLUGIN.so GGML_VERSION

#include <dlfcn.h>
#include <stdio.h>

static const char *version = "0.0.0";

const char *ggml_version(void) { return version; }

const char *ggml_op_name(int op) {
    switch (op) {
    case 29: return "MUL_MAT";
    case 30: return "MUL_MAT_ID";
    case 37: return "VIEW";
    default: return "NONE";
    }
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: fake_host PLUGIN.so GGML_VERSION\n");
        return 2;
    }
    version = argv[2];
    void *h = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        fprintf(stderr, "dlopen: %s\n", dlerror());
        return 2;
    }
    int (*score)(void) = (int (*)(void))dlsym(h, "ggml_backend_score");
    void *(*init)(void) = (void *(*)(void))dlsym(h, "ggml_backend_init");
    if (!score || !init) {
        fprintf(stderr, "plugin lacks ggml_backend_score or ggml_backend_init\n");
        return 2;
    }
    int s = score();
    void *reg = init();
    printf("score=%d init=%s\n", s, reg ? "non-null" : "null");
    dlclose(h);
    return 0;
}
