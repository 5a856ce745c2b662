/*
 * flags.h - the command-line flags of the example programs: a table of "--name value" flags
 * (integers, floats, strings, switches), each with its range and help, parsed in one call and
 * printed as the usage text.
 */
#ifndef DMTRAIN_FLAGS_H
#define DMTRAIN_FLAGS_H

#include <stdio.h>

typedef enum flag_kind { FLAG_INT, FLAG_FLOAT, FLAG_STRING, FLAG_SWITCH } flag_kind;

typedef struct flag {
    const char *name;   /* "--steps" */
    flag_kind kind;
    void *value;        /* int *, float *, const char **, int * (switch: set to 1) */
    double lo, hi;      /* accepted range of numbers */
    const char *help;
} flag;

/** Parse argv against the table. 0 on success; 1 when --help was asked (the usage is printed
 *  to stdout); -1 on a bad flag or value (a sentence and the usage go to stderr). */
int flags_parse(int argc, char **argv, const char *program, const char *synopsis,
                const flag *flags, int nflags);

/** The usage text: the synopsis, then every flag with its default (the value it holds now). */
void flags_usage(FILE *f, const char *program, const char *synopsis, const flag *flags,
                 int nflags);

/** Parse a comma-separated list of integers in [lo, hi] ("1024,2048") into out (at most max).
 *  The count, or -1 with a sentence (naming `what`) in err when the list is empty, too long,
 *  or has a bad or out-of-range entry. */
int flags_int_list(const char *s, const char *what, long lo, long hi, int *out, int max,
                   char *err, size_t errlen);

#endif /* DMTRAIN_FLAGS_H */
