/* The sampler's candidates (aft.generation.gumbel_max): each row's k largest bfloat16 logits, and the
   log-sum-exp of the rest of the vocabulary at temperature T, in one call.

   In PyTorch the top-k pass, and the rest's log-sum-exp (a float32 copy of the rows, a division, a scatter
   and the reduction) were a tenth of `aft sample`'s time on SmolLM2-135M (256 rows of 49,152 logits a
   step). Here a row is read twice: once for its top k, held in a heap whose lowest is skipped past 16
   logits at a time, and once for the rest's sum. The order is the value, then the lower token id first: of
   logits equal to the k-th value, the lowest ids are taken.

   rest = m / T + log(sum over the rest of exp((x - m) / T)), m the k-th value: every term is at most 1; a
   rest whose sum underflows (all of it more than 87 T below the k-th value) is -inf: it cannot win. NaN
   logits are neither candidates nor in the rest. */

#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "bf16.h"

typedef struct {
    float value;
    int64_t id;
} Item;

/* a below b in the order: a smaller value, or the same value and a higher id */
static inline int below(Item a, Item b) { return a.value < b.value || (a.value == b.value && a.id > b.id); }

static void sift_down(Item *heap, int64_t k, int64_t at) { /* a min-heap: heap[0] the lowest of the k */
    for (;;) {
        const int64_t left = 2 * at + 1, right = left + 1;
        int64_t low = at;
        if (left < k && below(heap[left], heap[low])) low = left;
        if (right < k && below(heap[right], heap[low])) low = right;
        if (low == at) return;
        const Item t = heap[at];
        heap[at] = heap[low];
        heap[low] = t;
        at = low;
    }
}

static inline void offer(Item *heap, int64_t k, float value, int64_t id) {
    const Item x = {value, id};
    if (below(heap[0], x)) {
        heap[0] = x;
        sift_down(heap, k, 0);
    }
}

static int by_id(const void *a, const void *b) {
    const int64_t x = ((const Item *)a)->id, y = ((const Item *)b)->id;
    return (x > y) - (x < y);
}

/* values (rows, k) float32 and ids (rows, k) int64, each row's k in increasing id; rest (rows) float64.
   Returns 0, or 1 where a thread's heap could not be allocated. */
int top_candidates(const uint16_t *logits, int64_t rows, int64_t vocab, int64_t stride, int64_t k, float temperature,
                   float *values, int64_t *ids, double *rest, int threads) {
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        Item *heap = (Item *)malloc(sizeof(Item) * (size_t)k);
        if (heap == NULL) failed = 1;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            if (heap == NULL) continue;
            const uint16_t *x = logits + r * stride;
            for (int64_t i = 0; i < k; i++) heap[i] = (Item){from_bf16(x[i]), i};
            for (int64_t i = k / 2 - 1; i >= 0; i--) sift_down(heap, k, i);
            int64_t i = k;
#ifdef AFT_AVX512
            for (; i < vocab && i % 16; i++) offer(heap, k, from_bf16(x[i]), i);
            for (; i + 16 <= vocab; i += 16) { /* most blocks hold nothing at or above the lowest kept */
                __mmask16 above = _mm512_cmp_ps_mask(load_bf16x16(x + i), _mm512_set1_ps(heap[0].value), _CMP_GE_OQ);
                while (above) {
                    const int lane = __builtin_ctz(above);
                    offer(heap, k, from_bf16(x[i + lane]), i + lane);
                    above &= above - 1;
                }
            }
#endif
            for (; i < vocab; i++) offer(heap, k, from_bf16(x[i]), i);
            const Item last = heap[0]; /* the k-th: the rest is below it in the order */
            const float ref = last.value / temperature, inverse = 1.f / temperature;
            float sum = 0.f;
            i = 0;
#ifdef AFT_AVX512
            __m512 sums = _mm512_setzero_ps();
            for (; i + 16 <= vocab; i += 16) {
                const __m512 v = load_bf16x16(x + i);
                const __mmask16 lower = _mm512_cmp_ps_mask(v, _mm512_set1_ps(last.value), _CMP_LT_OQ);
                const __m512 e = exp_poly16(_mm512_mul_ps(_mm512_sub_ps(v, _mm512_set1_ps(last.value)),
                                                          _mm512_set1_ps(inverse)));
                sums = _mm512_mask_add_ps(sums, lower, sums, e);
                __mmask16 same = _mm512_cmp_ps_mask(v, _mm512_set1_ps(last.value), _CMP_EQ_OQ);
                while (same) { /* ties with the k-th: the rest where their id is higher */
                    const int lane = __builtin_ctz(same);
                    if (i + lane > last.id) sum += 1.f;
                    same &= same - 1;
                }
            }
            sum += _mm512_reduce_add_ps(sums);
#endif
            for (; i < vocab; i++) {
                const float v = from_bf16(x[i]);
                if (v < last.value || (v == last.value && i > last.id)) sum += exp_poly((v - last.value) * inverse);
            }
            rest[r] = sum > 0.f ? (double)ref + log((double)sum) : -INFINITY;
            qsort(heap, (size_t)k, sizeof(Item), by_id);
            for (int64_t j = 0; j < k; j++) {
                values[r * k + j] = heap[j].value;
                ids[r * k + j] = heap[j].id;
            }
        }
        free(heap);
    }
    return failed;
}
