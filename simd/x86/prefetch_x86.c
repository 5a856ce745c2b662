/*
 * prefetch_x86.c - prefetch_write of lib/kernels.h with PREFETCHW (the PRFCHW extension), which
 * asks for each line in the state a store needs. Baseline x86-64 lacks it, so only this function
 * is compiled for PRFCHW (in the AVX2 library), and the context installs it, with the AVX2 or
 * AVX-512 table, only on CPUs whose cpuid reports it.
 */
#include <stdint.h>

#include "kernels.h"

__attribute__((target("prfchw"))) void dma_x86_prefetch_write(const void *p, int64_t bytes)
{
    dma_prefetch_lines(p, bytes); /* inlined here, its prefetch becomes PREFETCHW */
}
