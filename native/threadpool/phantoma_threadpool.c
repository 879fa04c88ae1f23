/*
 * phantoma_threadpool: gives each llama.cpp context a persistent CPU threadpool.
 *
 * Why: node-llama-cpp 3.21 never calls llama_attach_threadpool, so ggml builds a *disposable* threadpool
 * for every graph computation - threads are created and joined for every decoded token. llama-server
 * attaches one persistent pool per context, and on this 2-core machine the difference is the whole
 * short-prompt decode gap (and a 15x collapse for small models with 2 threads).
 *
 * How: loaded into worker processes with LD_PRELOAD. It interposes llama_decode (and llama_set_n_threads,
 * which node-llama-cpp calls when the thread count changes): the first time it sees a context, or a new
 * thread count, it creates a ggml threadpool through the CPU backend's registry (the CPU backend is a
 * dynamically loaded variant, so its functions are looked up the way llama.cpp's own common code does)
 * and attaches it, then calls the real function. It interposes llama_free to forget a context.
 * Anything missing -> it changes nothing and llama.cpp keeps its default behaviour.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <link.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct llama_context;
struct ggml_threadpool;

/* llama.h's llama_batch, passed by value to llama_decode (layout unchanged since 2024). */
struct llama_batch {
    int32_t n_tokens;
    int32_t *token;
    float *embd;
    int32_t *pos;
    int32_t *n_seq_id;
    int32_t **seq_id;
    int8_t *logits;
};
typedef int32_t (*decode_fn)(struct llama_context *, struct llama_batch);
typedef int32_t (*n_threads_fn)(struct llama_context *);
typedef void (*set_n_threads_fn)(struct llama_context *, int32_t, int32_t);
typedef void (*free_fn)(struct llama_context *);
typedef void (*attach_fn)(struct llama_context *, struct ggml_threadpool *, struct ggml_threadpool *);
typedef void (*params_init_fn)(void *params, int n_threads);
typedef struct ggml_threadpool *(*threadpool_new_fn)(void *params);
typedef void *(*dev_by_type_fn)(int type);
typedef void *(*dev_backend_reg_fn)(void *dev);
typedef void *(*reg_get_proc_address_fn)(void *reg, const char *name);

#define GGML_BACKEND_DEVICE_TYPE_CPU 0
#define MAX_CONTEXTS 16
/* ggml_threadpool_params is ~530 bytes (a 512-entry cpumask and a few scalars); ggml fills it. */
#define PARAMS_BYTES 4096

struct entry {
    struct llama_context *ctx;
    int32_t n_threads;
    int32_t n_threads_batch;
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct entry entries[MAX_CONTEXTS];
static void *libllama;
static int verbose = -1;

static void note(const char *what) {
    if (verbose < 0) verbose = getenv("PHANTOMA_THREADPOOL_DEBUG") != NULL;
    if (verbose) fprintf(stderr, "phantoma_threadpool: %s\n", what);
}

/* libllama is loaded by a Node addon with RTLD_LOCAL, so RTLD_NEXT cannot see it: find it by name. */
static int find_libllama(struct dl_phdr_info *info, size_t size, void *data) {
    (void)size;
    if (info->dlpi_name && strstr(info->dlpi_name, "/libllama")) {
        *(void **)data = dlopen(info->dlpi_name, RTLD_LAZY | RTLD_NOLOAD);
        return *(void **)data != NULL;
    }
    return 0;
}

static void *llama_symbol(const char *name) {
    if (!libllama) dl_iterate_phdr(find_libllama, &libllama);
    /* dlsym on libllama's handle also searches its dependencies (libggml, libggml-base). */
    return libllama ? dlsym(libllama, name) : NULL;
}

static struct ggml_threadpool *new_threadpool(int32_t n_threads) {
    params_init_fn params_init = (params_init_fn)llama_symbol("ggml_threadpool_params_init");
    dev_by_type_fn dev_by_type = (dev_by_type_fn)llama_symbol("ggml_backend_dev_by_type");
    dev_backend_reg_fn dev_reg = (dev_backend_reg_fn)llama_symbol("ggml_backend_dev_backend_reg");
    reg_get_proc_address_fn get_proc = (reg_get_proc_address_fn)llama_symbol("ggml_backend_reg_get_proc_address");
    if (!params_init || !dev_by_type || !dev_reg || !get_proc) return NULL;
    void *dev = dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    void *reg = dev ? dev_reg(dev) : NULL;
    threadpool_new_fn tp_new = reg ? (threadpool_new_fn)get_proc(reg, "ggml_threadpool_new") : NULL;
    if (!tp_new) return NULL;
    static _Alignas(64) unsigned char params[PARAMS_BYTES];
    memset(params, 0, sizeof params);
    params_init(params, n_threads);
    return tp_new(params);
}

static void attach_once(struct llama_context *ctx, int32_t n_threads, int32_t n_threads_batch) {
    struct entry *slot = NULL;
    for (int i = 0; i < MAX_CONTEXTS; i++) {
        if (entries[i].ctx == ctx) {
            if (entries[i].n_threads == n_threads && entries[i].n_threads_batch == n_threads_batch) return;
            slot = &entries[i];
            break;
        }
        if (!slot && entries[i].ctx == NULL) slot = &entries[i];
    }
    if (!slot) return; /* more contexts than we track: leave llama.cpp's default */
    attach_fn attach = (attach_fn)llama_symbol("llama_attach_threadpool");
    if (!attach) {
        note("llama_attach_threadpool not found; leaving the default");
        return;
    }
    struct ggml_threadpool *tp = new_threadpool(n_threads);
    struct ggml_threadpool *tp_batch = n_threads_batch == n_threads ? tp : new_threadpool(n_threads_batch);
    if (!tp || !tp_batch) {
        note("could not create a threadpool; leaving the default");
        return;
    }
    /* Pools are not freed when a count changes: a worker process is one-shot and exits soon. */
    attach(ctx, tp, tp_batch);
    slot->ctx = ctx;
    slot->n_threads = n_threads;
    slot->n_threads_batch = n_threads_batch;
    note("attached a persistent threadpool");
}

void llama_set_n_threads(struct llama_context *ctx, int32_t n_threads, int32_t n_threads_batch) {
    static set_n_threads_fn real;
    pthread_mutex_lock(&lock);
    if (!real) real = (set_n_threads_fn)llama_symbol("llama_set_n_threads");
    pthread_mutex_unlock(&lock);
    if (!real) return; /* cannot happen while libllama calls us; be safe */
    real(ctx, n_threads, n_threads_batch);
    pthread_mutex_lock(&lock);
    attach_once(ctx, n_threads, n_threads_batch);
    pthread_mutex_unlock(&lock);
}

int32_t llama_decode(struct llama_context *ctx, struct llama_batch batch) {
    static decode_fn real;
    static n_threads_fn n_threads, n_threads_batch;
    pthread_mutex_lock(&lock);
    if (!real) {
        real = (decode_fn)llama_symbol("llama_decode");
        n_threads = (n_threads_fn)llama_symbol("llama_n_threads");
        n_threads_batch = (n_threads_fn)llama_symbol("llama_n_threads_batch");
    }
    if (real && n_threads && n_threads_batch) attach_once(ctx, n_threads(ctx), n_threads_batch(ctx));
    pthread_mutex_unlock(&lock);
    return real ? real(ctx, batch) : -1;
}

void llama_free(struct llama_context *ctx) {
    static free_fn real;
    pthread_mutex_lock(&lock);
    if (!real) real = (free_fn)llama_symbol("llama_free");
    for (int i = 0; i < MAX_CONTEXTS; i++)
        if (entries[i].ctx == ctx) entries[i].ctx = NULL;
    pthread_mutex_unlock(&lock);
    if (real) real(ctx);
}
