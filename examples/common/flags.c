/* flags.c - see flags.h. */
#include "flags.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

void flags_usage(FILE *f, const char *program, const char *synopsis, const flag *flags,
                 int nflags)
{
    fprintf(f, "usage: %s [flags]\n%s\n\nflags (default in brackets):\n", program, synopsis);
    for (int i = 0; i < nflags; i++) {
        const flag *g = &flags[i];
        char def[64] = "";
        switch (g->kind) {
        case FLAG_INT: snprintf(def, sizeof def, "%d", *(int *)g->value); break;
        case FLAG_FLOAT: snprintf(def, sizeof def, "%g", (double)*(float *)g->value); break;
        case FLAG_STRING:
            snprintf(def, sizeof def, "%s", *(const char **)g->value ? *(const char **)g->value
                                                                      : "none");
            break;
        case FLAG_SWITCH: snprintf(def, sizeof def, "off"); break;
        }
        fprintf(f, "  %-18s %s [%s]\n", g->name, g->help, def);
    }
}

static int bad(const char *program, const char *synopsis, const flag *flags, int nflags,
               const char *msg, const char *arg)
{
    fprintf(stderr, "%s: %s%s\n\n", program, msg, arg ? arg : "");
    flags_usage(stderr, program, synopsis, flags, nflags);
    return -1;
}

int flags_parse(int argc, char **argv, const char *program, const char *synopsis,
                const flag *flags, int nflags)
{
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            flags_usage(stdout, program, synopsis, flags, nflags);
            return 1;
        }
        const flag *g = NULL;
        for (int k = 0; k < nflags && !g; k++)
            if (!strcmp(a, flags[k].name))
                g = &flags[k];
        if (!g)
            return bad(program, synopsis, flags, nflags, "unknown flag: ", a);
        if (g->kind == FLAG_SWITCH) {
            *(int *)g->value = 1;
            continue;
        }
        if (i + 1 >= argc)
            return bad(program, synopsis, flags, nflags, "missing value after ", a);
        const char *s = argv[++i];
        if (g->kind == FLAG_STRING) {
            *(const char **)g->value = s;
            continue;
        }
        char *end;
        errno = 0;
        double v = strtod(s, &end);
        if (*s == '\0' || *end != '\0' || errno || !isfinite(v) || v < g->lo || v > g->hi ||
            (g->kind == FLAG_INT && v != floor(v))) {
            char msg[256];
            if (g->kind == FLAG_INT)
                snprintf(msg, sizeof msg, "%s needs an integer in [%.0f, %.0f], got ", a, g->lo,
                         g->hi);
            else
                snprintf(msg, sizeof msg, "%s needs a number in [%g, %g], got ", a, g->lo, g->hi);
            return bad(program, synopsis, flags, nflags, msg, s);
        }
        if (g->kind == FLAG_INT)
            *(int *)g->value = (int)v;
        else
            *(float *)g->value = (float)v;
    }
    return 0;
}

int flags_int_list(const char *s, const char *what, long lo, long hi, int *out, int max,
                   char *err, size_t errlen)
{
    int n = 0;
    for (const char *at = s; *at;) {
        char *end;
        errno = 0;
        long v = strtol(at, &end, 10);
        if (end == at || errno || v < lo || v > hi || n == max || (*end && *end != ',')) {
            snprintf(err, errlen, "%s is a comma-separated list of up to %d integers %ld .. %ld, "
                     "not \"%s\"", what, max, lo, hi, s);
            return -1;
        }
        out[n++] = (int)v;
        at = *end ? end + 1 : end;
    }
    if (n == 0)
        snprintf(err, errlen, "%s is empty", what);
    return n ? n : -1;
}
