/*
 * backward_turns.c - the backward's schedule: which spans of work items threads take, in what
 * order, and how each span's private buffers are added into dk, dv and dbias in its turn
 * (lib/backward.c computes the spans).
 *
 * Streams and turns. Work items (spans of one or two tiles) whose private buffers add into the
 * same elements of dk/dv (same batch and kv head) form a stream, and add in reverse natural
 * order (last tile first): an item adds at its turn, i.e. once the stream's previous item has
 * added. Every element therefore receives its contributions in the same order whatever the
 * thread count. A dbias that an item of another stream also adds into (a bias broadcast over the
 * batch, or over more than one kv head) makes one stream of all.
 * Why reverse: threads take a stream's spans in turn order, and under a causal mask the last
 * tiles are the largest (a full window) and the first the smallest (a triangle). Largest first
 * leaves small spans for the end of the call, where a thread that finishes early has nothing
 * left to take.
 * Streams are taken a group at a time, about two threads to a stream (see the end of
 * dma_bwd_plan_turns): neighbouring tiles share most of their keys, so the rows they gather and
 * add into are still in cache.
 */
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "backward.h"

/* Pairs (lib/tile_pairs.c): tiles t, t + 1 of the same heads as one work item over their merged
 * union, when its rows fit BWD_ROWS and it costs at most PAIR_GROWTH times the products of the
 * two tiles apart. */
#define PAIR_GROWTH 1.04

void dma_bwd_plan_free(turn_plan *p)
{
    free(p->span_item);
    free(p->span_pair);
    free(p->order);
    free(p->stream);
    free(p->turn);
    free(p->next_in_stream);
    free((void *)p->done);
    free((void *)p->state);
    free(p->parked);
}

/* Whether items x and x + 1 pair up (A is item x's view; B receives item x + 1's, *count
 * their merged union's size). */
static bool pair_up(const bwd *w, int64_t x, int64_t nitems, const dma_item_view *A,
                    dma_item_view *B, int64_t *count)
{
    if (x + 1 >= nitems || !dma_items_adjacent(&w->items[x], &w->items[x + 1]))
        return false;
    dma_item_view_init(&w->a, &w->items[x + 1], B);
    return dma_views_pair(A, B, BWD_ROWS, PAIR_GROWTH, count);
}

/* dst = src[0..n) (0..n-1 where src is NULL), stably sorted on keys[x] / div, which lies in
 * [0, nkeys); start has room for nkeys + 1 counts. */
static void counting_sort(const int64_t *src, int64_t n, const int64_t *keys, int64_t div,
                          int64_t nkeys, int64_t *start, int64_t *dst)
{
    memset(start, 0, sizeof(int64_t) * (size_t)(nkeys + 1));
    for (int64_t i = 0; i < n; i++)
        start[keys[src ? src[i] : i] / div + 1]++;
    for (int64_t k = 0; k < nkeys; k++)
        start[k + 1] += start[k];
    for (int64_t i = 0; i < n; i++) {
        const int64_t x = src ? src[i] : i;
        dst[start[keys[x] / div]++] = x;
    }
}

bool dma_bwd_plan_turns(const bwd *w, int64_t nitems, int threads, turn_plan *p)
{
    const dma_attn *a = &w->a;
    bool one_stream = w->dbias && ((w->dbias->shape[0] == 1 && a->B > 1) ||
                                   w->dbias->shape[1] < a->Hkv);
    p->nstreams = one_stream ? 1 : a->B * a->Hkv;
    size_t n = (size_t)nitems + 1;
    p->span_item = malloc(sizeof(int64_t) * n);
    p->span_pair = malloc(sizeof(int8_t) * n);
    p->order = malloc(sizeof(int64_t) * n);
    p->stream = malloc(sizeof(int64_t) * n);
    p->turn = malloc(sizeof(int64_t) * n);
    p->next_in_stream = malloc(sizeof(int64_t) * n);
    p->done = calloc((size_t)p->nstreams, sizeof(_Atomic int64_t));
    p->state = calloc(n, sizeof(_Atomic int));
    p->parked = calloc(n, sizeof(grad_slot *));
    int64_t *count = calloc((size_t)p->nstreams, sizeof(int64_t));
    int64_t *last = malloc(sizeof(int64_t) * (size_t)p->nstreams); /* [stream] its last span */
    if (!p->span_item || !p->span_pair || !p->order || !p->stream || !p->turn ||
        !p->next_in_stream || !p->done || !p->state || !p->parked || !count || !last) {
        free(count);
        free(last);
        return false;
    }
    for (int64_t s = 0; s < p->nstreams; s++)
        last[s] = -1;
    /* Items are in natural order: spans are made in it, and take their turns in reverse. */
    p->nspans = 0;
    p->tile_keys = p->grads_floats = 0;
    int64_t longest = 0;
    for (int64_t x = 0; x < nitems; x++) {
        dma_item_view iv, next;
        dma_item_view_init(a, &w->items[x], &iv);
        int64_t sx = p->nspans++, merged = 0;
        p->span_item[sx] = x;
        p->span_pair[sx] = pair_up(w, x, nitems, &iv, &next, &merged);
        p->tile_keys = dma_max64(p->tile_keys, iv.count);
        if (p->span_pair[sx]) { /* the span's size: the merged union over both tiles' rows */
            p->tile_keys = dma_max64(p->tile_keys, next.count);
            iv.count = (int32_t)merged;
            iv.nrows += next.nrows;
        }
        item_grads g;
        dma_bwd_item_layout(w, &iv, &g);
        p->grads_floats = dma_max64(p->grads_floats, g.floats);
        p->stream[sx] = one_stream ? 0 : w->items[x].b * a->Hkv + iv.hkv;
        x += p->span_pair[sx];
    }
    for (int64_t sx = p->nspans - 1; sx >= 0; sx--) {
        const int64_t s = p->stream[sx];
        p->turn[sx] = count[s]++;
        p->next_in_stream[sx] = -1;
        if (last[s] >= 0)
            p->next_in_stream[last[s]] = sx;
        last[s] = sx;
        longest = dma_max64(longest, count[s]);
    }
    free(count);
    free(last);
    /* Take spans a group of streams at a time, turn by turn within a group: counting sorts on
     * the turn, then (stably) on the group. A group holds ceil(threads / 2) streams, so that
     * about two threads work on a stream at once, on neighbouring tiles: their unions hold
     * nearly the same keys, so the K and V rows both gather and the dk and dv rows both add
     * into stay in cache (an MHA backward at D 64, window 4096, 4K, on 2 threads: 13-20%
     * faster than taking every stream's turn t before any turn t + 1). The second thread parks
     * what it finishes before its turn. */
    const int64_t per_group = dma_max64(1, (threads + 1) / 2);
    const int64_t ngroups = dma_div_up(p->nstreams, per_group);
    int64_t *start = malloc(sizeof(int64_t) * ((size_t)dma_max64(longest, ngroups) + 1));
    int64_t *by_turn = malloc(sizeof(int64_t) * n);
    if (!start || !by_turn) {
        free(start);
        free(by_turn);
        return false;
    }
    counting_sort(NULL, p->nspans, p->turn, 1, longest, start, by_turn);
    counting_sort(by_turn, p->nspans, p->stream, per_group, ngroups, start, p->order);
    free(start);
    free(by_turn);
    return true;
}

static void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Spin briefly (another thread is usually about to hand over what we wait for), then yield the
 * CPU so that an oversubscribed machine still makes progress. */
static void backoff(int spins)
{
    if (spins < 4096)
        cpu_relax();
    else
        sched_yield();
}

/*
 * Parking. Each thread has a few buffer slots. It takes a free slot before it takes a span,
 * computes the span into the slot and, if the span's turn has not come by then, parks it there
 * and goes on to another span. Whoever passes the turn to a parked span adds it in its owner's
 * stead (dma_bwd_commit), so no thread waits for a turn; a thread waits only while all its slots
 * hold parked spans.
 * No deadlock: a stream's spans are taken in turn order, and a thread takes a span only once it
 * has a slot, so a thread waiting for a slot holds no unstarted span. The earliest uncommitted
 * span of every stream with a taken span is therefore taken, with all its predecessors
 * committed: it is being computed (which waits on nothing) or committed, or it is parked, in
 * which case the commit of its predecessor or its own parking found its turn (see
 * dma_bwd_park) and commits it.
 */
enum { SPAN_OPEN, SPAN_PARKED, SPAN_CLAIMED };

/* The first free slot of a thread's (a thread that never parks keeps using one), or NULL once
 * no span is left to take (`next` reached `nspans`): the thread's parked spans need it no more. */
grad_slot *dma_bwd_take_slot(grad_slot *slots, int nslots, _Atomic int64_t *next,
                             int64_t nspans)
{
    for (int spins = 0;; spins++) {
        for (int i = 0; i < nslots; i++) /* acquire: its committer is done reading it */
            if (!atomic_load_explicit(&slots[i].busy, memory_order_acquire))
                return &slots[i];
        if (atomic_load_explicit(next, memory_order_relaxed) >= nspans)
            return NULL;
        backoff(spins);
    }
}

/* Add span x, whose turn has come, from `slot` and pass the turn on; then add each following
 * span of the stream that is parked, until one is not. */
void dma_bwd_commit(const bwd *w, turn_plan *p, int64_t x, grad_slot *slot)
{
    for (;;) {
        if (slot->deferred > 0)
            dma_bwd_reduce_range(w, &w->items[p->span_item[x]], &slot->iv, &slot->g, 0,
                                 slot->deferred);
        atomic_store_explicit(&p->done[p->stream[x]], p->turn[x] + 1, memory_order_seq_cst);
        atomic_store_explicit(&slot->busy, 0, memory_order_release);
        x = p->next_in_stream[x];
        int parked = SPAN_PARKED;
        if (x < 0 || !atomic_compare_exchange_strong_explicit(&p->state[x], &parked, SPAN_CLAIMED,
                                                              memory_order_seq_cst,
                                                              memory_order_seq_cst))
            return;
        slot = p->parked[x];
    }
}

/*
 * Span x, computed into `slot`, found its turn not yet come: park it. Returns false when its
 * turn came meanwhile and it is the caller's to commit after all.
 * The parker stores PARKED then loads `done`; the committer of x's predecessor stores `done`
 * then reads the state (its CAS). Both seq_cst: in their single total order one of the two
 * stores comes first, so at least one side sees the other's (with weaker orders both could
 * miss, and x would stay parked for ever). If both do, the CAS picks who commits.
 */
bool dma_bwd_park(turn_plan *p, int64_t x, grad_slot *slot)
{
    p->parked[x] = slot;
    atomic_store_explicit(&slot->busy, 1, memory_order_relaxed);
    atomic_store_explicit(&p->state[x], SPAN_PARKED, memory_order_seq_cst);
    int parked = SPAN_PARKED;
    return !(atomic_load_explicit(&p->done[p->stream[x]], memory_order_seq_cst) == p->turn[x] &&
             atomic_compare_exchange_strong_explicit(&p->state[x], &parked, SPAN_CLAIMED,
                                                     memory_order_seq_cst, memory_order_seq_cst));
}
