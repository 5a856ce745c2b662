/*
 * fuzz_checkpoint.c - libFuzzer target: checkpoint_load (examples/common) on any file. Half of
 * the inputs are loaded as they are; in the other half the last 8 bytes are first replaced by
 * the file's correct FNV-1a hash, so that the fuzzer also reaches what is checked after the
 * hash (the caller's section, the parameter values, the model's creation). Loading must succeed
 * (the model is then destroyed) or fail with a message; a crash, a sanitizer report, a message
 * left empty, or an output written on failure is a finding.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "checkpoint.h"

static uint64_t fnv1a(const uint8_t *p, size_t n)
{
    uint64_t h = 14695981039346656037ull;
    for (size_t i = 0; i < n; i++)
        h = (h ^ p[i]) * 1099511628211ull;
    return h;
}

static char path[64];

static void remove_file(void) { unlink(path); }

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!path[0]) {
        snprintf(path, sizeof path, "/tmp/dmattn-fuzz-ckpt-%d", (int)getpid());
        atexit(remove_file);
    }
    uint8_t *copy = malloc(size ? size : 1);
    if (!copy)
        return 0;
    memcpy(copy, data, size);
    if (size >= 16 && (data[size / 2] & 1)) {
        uint64_t h = fnv1a(copy, size - 8);
        for (int i = 0; i < 8; i++)
            copy[size - 8 + i] = (uint8_t)(h >> (8 * i));
    }
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(copy, 1, size, f) != size || fclose(f) != 0)
        abort();
    free(copy);

    model *m = (model *)&path; /* must stay as it is when loading fails */
    adamw_config opt, untouched;
    memset(&opt, 0xA5, sizeof opt);
    memcpy(&untouched, &opt, sizeof opt);
    char user[256], err[512] = "";
    uint32_t user_bytes = 12345;
    if (checkpoint_load(path, 1, 1, &m, &opt, user, sizeof user, &user_bytes, err, sizeof err)) {
        if (!err[0] || m != (model *)&path || user_bytes != 12345 ||
            memcmp(&opt, &untouched, sizeof opt) != 0)
            abort();
    } else {
        model_destroy(m);
    }
    return 0;
}
