/*
 * prefetch_x86.c - prefetch_write of lib/kernels.h with PREFETCHW (the PRFCHW extension), which
 * asks for each line in the state a store needs. Baseline x86-64 lacks it, so it is compiled for
 * PRFCHW alone and installed by the context only on CPUs whose cpuid reports it.
 */
#include <stdint.h>

#include "kernels.h"

__attribute__((target("prfchw"))) void dma_x86_prefetch_write(const void *p, int64_t bytes)
{
    const uintptr_t end = (uintptr_t)p + (uintptr_t)(bytes > 0 ? bytes : 0);
    for (uintptr_t line = (uintptr_t)p & ~(uintptr_t)63; line < end; line += 64)
        __builtin_prefetch((const void *)line, 1, 3);
}
