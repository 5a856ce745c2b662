/*
 * backward.h - what the backward's work items (lib/backward.c) and its schedule of spans, turns
 * and buffer slots (lib/backward_turns.c) share. Not installed.
 */
#ifndef DMATTN_BACKWARD_H
#define DMATTN_BACKWARD_H

#include <stdatomic.h>

#include "internal.h"

/* Rows (heads x tile rows) of a work item at most, paired tiles included. */
#define BWD_ROWS (DMA_HEADS_PER_ITEM * DMA_TILE)

typedef struct bwd {
    dma_attn a;
    const dma_tensor *dout, *dq, *dk, *dv, *dbias;
    bool per_row_bias;
    const dma_item *items;
} bwd;

/* The private buffers of an item: dk and dv [count_pad][ld], then dbias [nbh][rows][count_pad]
 * (rows = the tile's rows for a per-row bias, else 1); they live in the thread's scratch. */
typedef struct item_grads {
    float *dk, *dv, *dbias;
    int64_t floats;         /* size of all three */
    int64_t count_pad, nbh; /* union rounded up to DMA_CHUNK; bias heads the item touches */
} item_grads;

/* Sizes of an item's private buffers (the caller sets their pointers). */
void dma_bwd_item_layout(const bwd *w, const dma_item_view *iv, item_grads *g);

/* Add positions [u0, u1) of an item's private buffers into dk, dv and dbias. */
void dma_bwd_reduce_range(const bwd *w, const dma_item *it, const dma_item_view *iv,
                          const item_grads *g, int64_t u0, int64_t u1);

/* The spans (one tile, or a pair) threads take, their streams and turns (backward_turns.c). */
typedef struct grad_slot grad_slot;

typedef struct turn_plan {
    int64_t nspans;
    int64_t *span_item;       /* [span] its first item; a pair's second is the next item */
    int8_t *span_pair;        /* [span] 1 for a pair of tiles */
    int64_t *order;           /* the spans in the order threads take them */
    int64_t *stream;          /* [span] */
    int64_t *turn;            /* [span] rank within its stream */
    int64_t *next_in_stream;  /* [span] the stream's next span, or -1 */
    _Atomic int64_t *done;    /* [stream] spans of the stream that have added */
    _Atomic int *state;       /* [span] SPAN_OPEN, SPAN_PARKED or SPAN_CLAIMED */
    grad_slot **parked;       /* [span] the slot of a parked span */
    int64_t nstreams;
    int64_t tile_keys;        /* the largest union of any tile (sizes the merge scratch) */
    int64_t grads_floats;     /* the largest private buffers of any span (dma_bwd_item_layout) */
} turn_plan;

/* Buffer slots per thread at most, and the memory they may take (see dma_backward). */
#define MAX_SLOTS 3
#define SLOT_BYTES ((size_t)32 << 20)

/* A span's private buffers and the merge scratch a pair's merged view points into
 * (dma_bwd_reduce_range reads its keys), so both last until the span has added; with the view,
 * the buffers' layout and the prefix left to add, for whoever commits the span. */
struct grad_slot {
    _Atomic int busy;  /* holds a parked span */
    dma_item_view iv;
    item_grads g;
    int64_t deferred;  /* positions [0, deferred) are still to add */
    int32_t *merge_keys;
    uint64_t *merge_bits;
    float *grads;      /* room for the largest span's buffers */
};

/* Spans, streams and turns of the nitems work items, and the order `threads` threads take
 * them in; false when out of memory (free p then). */
bool dma_bwd_plan_turns(const bwd *w, int64_t nitems, int threads, turn_plan *p);
void dma_bwd_plan_free(turn_plan *p);

/* Whether span x's turn has come (the stream's earlier spans have all added). */
static inline bool dma_bwd_my_turn(const turn_plan *p, int64_t x)
{
    return atomic_load_explicit(&p->done[p->stream[x]], memory_order_acquire) == p->turn[x];
}

/* A thread's free buffer slot, or NULL once no span is left to take ("Parking" in
 * backward_turns.c). */
grad_slot *dma_bwd_take_slot(grad_slot *slots, int nslots, _Atomic int64_t *next,
                             int64_t nspans);
/* Add span x, whose turn has come, from `slot`, and the parked spans its turn passes to. */
void dma_bwd_commit(const bwd *w, turn_plan *p, int64_t x, grad_slot *slot);
/* Park span x in `slot` until its turn; false when the turn came meanwhile (commit it then). */
bool dma_bwd_park(turn_plan *p, int64_t x, grad_slot *slot);

#endif
