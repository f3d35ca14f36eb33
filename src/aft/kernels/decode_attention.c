/* Attention of one new token per row over that row's own cache columns, bfloat16 in, float32 inside.

   The decode step of aft.decode on a CPU: q is (rows, kv_heads, G, D), the G query heads that share a
   key/value head packed together; keys and values are the pre-allocated cache of aft.generation,
   (pool, kv_heads, capacity, D) with any row and head strides. Row r reads columns [start[r], stop[r]) only
   (its prompt and what it has generated: contiguous), so the columns of the rows beside it and the padding
   before its prompt are not read at all. Per (row, head):

       s[g, c] = scale * q[g] . k[c],   p = softmax_c(s),   out[g] = sum_c p[g, c] v[c]

   in float32 (exp of s - max s by a polynomial, bf16.h), the output rounded to bfloat16 (nearest,
   ties to even).

   G and D are compile-time constants (-DG=.. -DD=..) so that the loops over D vectorise; aft.kernels
   compiles this file once per (G, D) and machine, with OpenMP. Threads: rows are cut into one slice per
   thread, of about equal columns read; each row's arithmetic is the same whichever slice it is in. */

#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

/* Columns read ahead of the one in use. The pass over the keys prefetches the key and the value columns
   AHEAD ahead, and the pass over the values the next head's first AHEAD key columns, so memory is read
   while the arithmetic runs (on an AMX Xeon a cold cache row was read 1.5x faster with a key prefetch 16
   columns ahead than with none, and 1.1x faster again with all three at 32). Reading past a row's last
   column only prefetches, which never faults. */
#define AHEAD 32

typedef struct {
    const uint16_t *q, *k, *v;
    uint16_t *out;
    const int64_t *start, *stop, *order, *source, *shared;
    int64_t kv_heads, k_row, k_head, k_col, v_row, v_head, v_col;
    float scale;
    int64_t first, last; /* this slice: order[first] ... order[last - 1] */
} Job;

/* Column c of a row's span: its first m columns from the sibling row's copy (`from`), the rest its own. */
static inline const uint16_t *column(const uint16_t *from, const uint16_t *own, int64_t m, int64_t c, int64_t stride) {
    return (c < m ? from : own) + c * stride;
}

/* The first key column of row r's head h, where the row reads it (its source row's copy, if shared). */
static inline const uint16_t *first_key(const Job *j, int64_t r, int64_t h) {
    const int64_t from = j->source && j->shared[r] > 0 ? j->source[r] : r;
    return j->k + from * j->k_row + h * j->k_head + j->start[r] * j->k_col;
}

/* Row r's head h; `next`: the first key column of the head visited after it (NULL: none), prefetched. */
static void one_head(const Job *j, int64_t r, int64_t h, float *s, const uint16_t *next) {
    const int64_t a = j->start[r], n = j->stop[r] - a, src = j->source ? j->source[r] : r;
    const int64_t m = j->shared ? (j->shared[r] < n ? j->shared[r] : n) : 0;
    const uint16_t *q = j->q + (r * j->kv_heads + h) * G * D;
    const uint16_t *k = j->k + r * j->k_row + h * j->k_head + a * j->k_col;
    const uint16_t *v = j->v + r * j->v_row + h * j->v_head + a * j->v_col;
    const uint16_t *k_from = j->k + src * j->k_row + h * j->k_head + a * j->k_col;
    const uint16_t *v_from = j->v + src * j->v_row + h * j->v_head + a * j->v_col;
    uint16_t *out = j->out + (r * j->kv_heads + h) * G * D;
    float qf[G][D], row[D], acc[G][D], best[G], total[G];
    for (int g = 0; g < G; g++)
        for (int i = 0; i < D; i++) qf[g][i] = from_bf16(q[g * D + i]) * j->scale;
    for (int64_t c = 0; c < n; c++) {
        const uint16_t *ahead = column(k_from, k, m, c + AHEAD, j->k_col), *kc = column(k_from, k, m, c, j->k_col);
        const uint16_t *v_ahead = column(v_from, v, m, c + AHEAD, j->v_col);
        for (int i = 0; i < D; i += 32) { /* 64-byte lines */
            __builtin_prefetch(ahead + i);
            __builtin_prefetch(v_ahead + i);
        }
        for (int i = 0; i < D; i++) row[i] = from_bf16(kc[i]);
        for (int g = 0; g < G; g++) {
            float dot = 0.f;
            for (int i = 0; i < D; i++) dot += qf[g][i] * row[i];
            s[g * n + c] = dot;
            best[g] = c == 0 || dot > best[g] ? dot : best[g]; /* n >= 1: a row reads at least its new column */
        }
    }
    for (int g = 0; g < G; g++) {
        float sum = 0.f;
        for (int64_t c = 0; c < n; c++) {
            float e = exp_poly(s[g * n + c] - best[g]);
            s[g * n + c] = e;
            sum += e;
        }
        total[g] = sum;
        for (int i = 0; i < D; i++) acc[g][i] = 0.f;
    }
    for (int64_t c = 0; c < n; c++) {
        const uint16_t *vc = column(v_from, v, m, c, j->v_col);
        if (next != NULL && c < AHEAD)
            for (int i = 0; i < D; i += 32) __builtin_prefetch(next + c * j->k_col + i);
        for (int i = 0; i < D; i++) row[i] = from_bf16(vc[i]);
        for (int g = 0; g < G; g++) {
            const float p = s[g * n + c];
            for (int i = 0; i < D; i++) acc[g][i] += p * row[i];
        }
    }
    for (int g = 0; g < G; g++)
        for (int i = 0; i < D; i++) out[g * D + i] = to_bf16(acc[g][i] / total[g]);
}

/* The row visited i-th: order[i], or i where no order is given. */
static inline int64_t visited(const int64_t *order, int64_t i) { return order ? order[i] : i; }

static int run_slice(const Job *j) {
    int64_t longest = 1;
    for (int64_t i = j->first; i < j->last; i++) {
        const int64_t r = visited(j->order, i);
        if (j->stop[r] - j->start[r] > longest) longest = j->stop[r] - j->start[r];
    }
    float *s = (float *)malloc(sizeof(float) * G * longest);
    if (s == NULL) return 1;
    for (int64_t i = j->first; i < j->last; i++) {
        const int64_t r = visited(j->order, i), after = i + 1 < j->last ? visited(j->order, i + 1) : -1;
        for (int64_t h = 0; h < j->kv_heads; h++) {
            const uint16_t *next = h + 1 < j->kv_heads ? first_key(j, r, h + 1) : after >= 0 ? first_key(j, after, 0) : NULL;
            one_head(j, r, h, s, next);
        }
    }
    free(s);
    return 0;
}

/* Rows are visited in `order` (NULL: 0, 1, ...). With `source` and `shared` (NULL: none), row r reads the
   first shared[r] columns of its span from row source[r], which holds the same keys and values there (the k
   samples of one prompt: aft.generation writes the prompt's once into each of its rows): visited one after
   the other, a prompt's samples read its columns from memory once and then from the core's cache.
   Returns 0, or 1 where a slice's scratch memory could not be had (the output is then incomplete). */
int decode_attention(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *out,
                     const int64_t *start, const int64_t *stop, const int64_t *order, const int64_t *source,
                     const int64_t *shared, int64_t rows, int64_t kv_heads, int64_t k_row, int64_t k_head,
                     int64_t k_col, int64_t v_row, int64_t v_head, int64_t v_col, float scale, int threads) {
    if (threads < 1) threads = 1;
    int64_t work = 0;
    for (int64_t i = 0; i < rows; i++) work += stop[i] - start[i] + 1;
    int failed = 0;
    /* PyTorch's own OpenMP threads (the process's libgomp is the one torch loaded): threads of our own
       would compete with its workers, which spin for a while after each of its ops. */
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        const int t = omp_get_thread_num(), n = omp_get_num_threads();
        Job j = {q, k, v, out, start, stop, order, source, shared, kv_heads, k_row, k_head, k_col, v_row, v_head,
                 v_col, scale, 0, 0};
        int64_t done = 0, i = 0; /* slice t: the rows (in order) after the first t shares of the columns */
        for (; i < rows && done < work * t / n; i++) done += stop[visited(order, i)] - start[visited(order, i)] + 1;
        j.first = i;
        for (; i < rows && done < work * (t + 1) / n; i++) done += stop[visited(order, i)] - start[visited(order, i)] + 1;
        j.last = t == n - 1 ? rows : i;
        failed |= run_slice(&j);
    }
    return failed;
}
