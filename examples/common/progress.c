/* progress.c - see progress.h. */
#include "progress.h"

#include <unistd.h>

#include <omp.h>

void progress_format_seconds(char *buf, size_t len, double s)
{
    if (!(s >= 0.0))
        snprintf(buf, len, "?");
    else if (s < 60.0)
        snprintf(buf, len, "%.1fs", s);
    else if (s < 3600.0)
        snprintf(buf, len, "%dm%02ds", (int)(s / 60.0), (int)s % 60);
    else
        snprintf(buf, len, "%dh%02dm", (int)(s / 3600.0), ((int)s % 3600) / 60);
}

void progress_begin(progress *p, FILE *f, const char *label, int64_t first, int64_t total)
{
    p->f = f;
    p->tty = isatty(fileno(f));
    p->first = first;
    p->total = total;
    p->t0 = p->last_print = omp_get_wtime();
    p->interval = 10.0;
    p->label = label ? label : "train";
}

void progress_step(progress *p, int64_t done, double loss, double accuracy, double tokens_per_s)
{
    double now = omp_get_wtime();
    int last = done >= p->total;
    /* a terminal gets up to 10 updates a second; a log a line every `interval` seconds */
    if (!last && now - p->last_print < (p->tty ? 0.1 : p->interval))
        return;
    p->last_print = now;
    double rate = (double)(done - p->first) / (now - p->t0);
    char eta[32];
    progress_format_seconds(eta, sizeof eta, rate > 0.0 ? (double)(p->total - done) / rate : -1);
    fprintf(p->f, "%s%s step %lld/%lld  loss %.4f  acc %5.1f%%  %.0f tok/s  ETA %s%s",
            p->tty ? "\r" : "", p->label, (long long)done, (long long)p->total, loss,
            100.0 * accuracy, tokens_per_s, eta, p->tty ? "\033[K" : "\n");
    fflush(p->f);
}

void progress_end(progress *p)
{
    if (p->tty)
        fputc('\n', p->f);
    fflush(p->f);
}
