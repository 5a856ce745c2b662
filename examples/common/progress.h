/*
 * progress.h - the progress output of training runs: one live line (step, loss, accuracy,
 * tokens/s, ETA) rewritten in place when the stream is a terminal, and plain lines every few
 * seconds when it is not (a log file, CI).
 */
#ifndef DMTRAIN_PROGRESS_H
#define DMTRAIN_PROGRESS_H

#include <stdint.h>
#include <stdio.h>

typedef struct progress {
    FILE *f;
    int tty;
    int64_t first, total;   /* steps */
    double t0, last_print;
    double interval;        /* seconds between plain lines */
    const char *label;
} progress;

/** Start at step `first` of `total` (a resumed run starts past 0). `label` prefixes every line. */
void progress_begin(progress *p, FILE *f, const char *label, int64_t first, int64_t total);
/** After step `done` (1-based count of steps finished). Prints when it is time to. */
void progress_step(progress *p, int64_t done, double loss, double accuracy, double tokens_per_s);
/** Ends the live line (a newline on a terminal). */
void progress_end(progress *p);
/** "1h02m", "3m05s", "12.3s" */
void progress_format_seconds(char *buf, size_t len, double s);

#endif /* DMTRAIN_PROGRESS_H */
