/* bfloat16 <-> float32 and exp in float32 arithmetic: what the kernels of aft.kernels share. */
#ifndef AFT_BF16_H
#define AFT_BF16_H

#include <stdint.h>
#include <string.h>

static inline float from_bf16(uint16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Rounded to nearest, ties to even (as PyTorch rounds float32 to bfloat16). */
static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* exp(x) in float32 arithmetic the compiler vectorises (a call of expf per score had been a quarter of the
   attention's time): x = n ln2 + r with |r| <= ln2 / 2, exp(r) by its Taylor series to r^6 (relative error
   below 2e-7), times 2^n made in the exponent bits. Below -87: 0; above 88.7: infinity; NaN stays NaN. */
static inline float exp_poly(float x) {
    float t = x < -87.f ? -87.f : x; /* one select a line: nested ones keep gcc from vectorising */
    t = t > 88.f ? 88.f : t;
    const float n = __builtin_floorf(t * 1.44269504f + 0.5f);
    const float r = (t - n * 0.693145752f) - n * 1.42860677e-6f; /* ln 2 in two parts: r exact enough */
    float p = 1.f / 720.f;
    p = p * r + 1.f / 120.f;
    p = p * r + 1.f / 24.f;
    p = p * r + 1.f / 6.f;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, 4);
    float e = x < -87.f ? 0.f : p * two_n;
    e = x > 88.72f ? __builtin_inff() : e;
    return e;
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
/* The same, 16 floats at a time (AVX-512), the same arithmetic: the kernels' loops run these and finish a
   row's last width % 16 elements with the scalar forms above. */
#include <immintrin.h>
#define AFT_AVX512 1

static inline __m512 load_bf16x16(const uint16_t *p) {
    const __m256i x = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(x), 16));
}

/* x rounded to bfloat16 (as to_bf16), kept as a float. */
static inline __m512 round_bf16x16(__m512 x) {
    const __m512i u = _mm512_castps_si512(x), high = _mm512_set1_epi32((int)0xffff0000u);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_and_si512(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd)), high);
    const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    r = _mm512_mask_or_epi32(r, nan, _mm512_and_si512(u, high), _mm512_set1_epi32(0x00400000));
    return _mm512_castsi512_ps(r);
}

/* x, already rounded to bfloat16, stored as 16 bfloat16 values. */
static inline void store_bf16x16(uint16_t *p, __m512 x) {
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(x), 16)));
}

/* exp_poly of 16 floats. */
static inline __m512 exp_poly16(__m512 x) {
    /* max / min return their second operand where one is NaN: NaN goes through as NaN */
    const __m512 t = _mm512_min_ps(_mm512_set1_ps(88.f), _mm512_max_ps(_mm512_set1_ps(-87.f), x));
    const __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(t, _mm512_set1_ps(1.44269504f), _mm512_set1_ps(0.5f)),
                                          _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f),
                                      _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), t));
    __m512 p = _mm512_set1_ps(1.f / 720.f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    __m512 e = _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
    e = _mm512_mask_mov_ps(e, _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.f), _CMP_LT_OQ), _mm512_setzero_ps());
    return _mm512_mask_mov_ps(e, _mm512_cmp_ps_mask(x, _mm512_set1_ps(88.72f), _CMP_GT_OQ),
                              _mm512_set1_ps(__builtin_inff()));
}

static inline __m512 negate16(__m512 x) {
    return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(x), _mm512_set1_epi32((int)0x80000000u)));
}
#endif

#endif
