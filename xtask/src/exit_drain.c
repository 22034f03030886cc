/* Preloaded into llama-completion by `cargo xtask` (Linux only).
 *
 * llama.cpp's common logger prints from a worker thread and is never flushed
 * at exit (the singleton is leaked on purpose), so a process that returns from
 * main() while the worker lags loses the tail of its output: the generated
 * text and the timings (about 3 runs in 10 on a 2-core box). This destructor
 * runs inside exit(), before the process ends, and gives the worker time to
 * drain its queue. It changes nothing else: no symbol is interposed. */
#include <time.h>

__attribute__((destructor)) static void xtask_exit_drain(void) {
    struct timespec t = {0, 200 * 1000 * 1000};
    nanosleep(&t, 0);
}
