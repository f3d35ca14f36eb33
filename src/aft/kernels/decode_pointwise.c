/* The element-wise work of a bfloat16 decode step between its matrix products, one pass per row each.

   In PyTorch each of these is several operators (an RMS norm is a conversion to float32, a square, a mean,
   an rsqrt, two products and a conversion back), each a pass over the rows and a dispatch of its own: at
   a decode step's sizes (a few hundred rows of 576) that was about a quarter of a bfloat16 step of
   SmolLM2-135M. The arithmetic is PyTorch's, in its order, with its roundings to bfloat16 between the
   operators (so the rotary embedding and the residual adds give the same bits; the norm's sum and SiLU's
   exp may round differently in the last float32 place). Tensors are bfloat16, (rows, width) with a row
   stride; rows are split over PyTorch's OpenMP threads. */

#include <math.h>
#include <omp.h>
#include <stdint.h>

#include "bf16.h"

/* h += delta (where delta is not NULL; h is then the new residual stream), then
   out = weight * bf16(h * 1 / sqrt(mean(h^2) + eps)): transformers' LlamaRMSNorm on h in float32. */
void add_rms_norm(uint16_t *h, const uint16_t *delta, const uint16_t *weight, uint16_t *out, int64_t rows,
                  int64_t width, float eps, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        uint16_t *x = h + r * width, *y = out + r * width;
        const uint16_t *dx = delta == NULL ? NULL : delta + r * width;
        float sum = 0.f;
        int64_t i = 0;
#ifdef AFT_AVX512
        __m512 squares = _mm512_setzero_ps();
        for (; i + 16 <= width; i += 16) {
            __m512 v = load_bf16x16(x + i);
            if (dx != NULL) {
                v = round_bf16x16(_mm512_add_ps(v, load_bf16x16(dx + i)));
                store_bf16x16(x + i, v);
            }
            squares = _mm512_fmadd_ps(v, v, squares);
        }
        sum = _mm512_reduce_add_ps(squares);
#endif
        for (; i < width; i++) {
            if (dx != NULL) x[i] = to_bf16(from_bf16(x[i]) + from_bf16(dx[i]));
            sum += from_bf16(x[i]) * from_bf16(x[i]);
        }
        const float inverse = 1.f / sqrtf(sum / (float)width + eps);
        i = 0;
#ifdef AFT_AVX512
        for (; i + 16 <= width; i += 16) {
            const __m512 normed = round_bf16x16(_mm512_mul_ps(load_bf16x16(x + i), _mm512_set1_ps(inverse)));
            store_bf16x16(y + i, round_bf16x16(_mm512_mul_ps(load_bf16x16(weight + i), normed)));
        }
#endif
        for (; i < width; i++)
            y[i] = to_bf16(from_bf16(weight[i]) * from_bf16(to_bf16(from_bf16(x[i]) * inverse)));
    }
}

/* out = bf16(silu(gate)) * up, silu(x) = x / (1 + exp(-x)) in float32 (PyTorch's F.silu(gate) * up). */
void silu_mul(const uint16_t *gate, const uint16_t *up, int64_t in_stride, uint16_t *out, int64_t rows,
              int64_t width, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *g = gate + r * in_stride, *u = up + r * in_stride;
        uint16_t *y = out + r * width;
        int64_t i = 0;
#ifdef AFT_AVX512
        for (; i + 16 <= width; i += 16) {
            const __m512 x = load_bf16x16(g + i);
            const __m512 silu = round_bf16x16(
                _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.f), exp_poly16(negate16(x)))));
            store_bf16x16(y + i, round_bf16x16(_mm512_mul_ps(silu, load_bf16x16(u + i))));
        }
#endif
        for (; i < width; i++) {
            const float x = from_bf16(g[i]);
            y[i] = to_bf16(from_bf16(to_bf16(x / (1.f + exp_poly(-x)))) * from_bf16(u[i]));
        }
    }
}

/* The rotary embedding of `heads` heads of dimension d of each row (x at a row stride of in_stride, out
   contiguous): out = bf16(bf16(x * cos) + bf16(rotate_half(x) * sin)), rotate_half(x) = (-x2, x1) of its
   halves, cos and sin (rows, d): transformers' apply_rotary_pos_emb in bfloat16. */
void rotary(const uint16_t *x, int64_t in_stride, const uint16_t *cos, const uint16_t *sin, uint16_t *out,
            int64_t rows, int64_t heads, int64_t d, int threads) {
    const int64_t half = d / 2;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *c = cos + r * d, *s = sin + r * d;
        for (int64_t h = 0; h < heads; h++) {
            const uint16_t *a = x + r * in_stride + h * d;
            uint16_t *y = out + (r * heads + h) * d;
            int64_t i = 0;
#ifdef AFT_AVX512
            if (half % 16 == 0) /* 16 columns at a time never straddle the halves */
                for (; i < d; i += 16) {
                    const __m512 turned = i < half ? negate16(load_bf16x16(a + i + half)) : load_bf16x16(a + i - half);
                    const __m512 first = round_bf16x16(_mm512_mul_ps(load_bf16x16(a + i), load_bf16x16(c + i)));
                    const __m512 second = round_bf16x16(_mm512_mul_ps(turned, load_bf16x16(s + i)));
                    store_bf16x16(y + i, round_bf16x16(_mm512_add_ps(first, second)));
                }
#endif
            for (; i < d; i++) {
                const float turned = i < half ? -from_bf16(a[i + half]) : from_bf16(a[i - half]);
                y[i] = to_bf16(from_bf16(to_bf16(from_bf16(a[i]) * from_bf16(c[i])))
                               + from_bf16(to_bf16(turned * from_bf16(s[i]))));
            }
        }
    }
}
