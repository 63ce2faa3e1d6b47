/* The activations of kernels/common/activations.h on 8 floats at a time (AVX2 + FMA),
 * CPU only.
 *
 * Every function here is the scalar formula of activations.h written with intrinsics,
 * operation for operation: the same constants, the same order, the same selects (the
 * clamp of expf as max/min, equal for every input but NaN, whose lanes end as x), and
 * an FMA exactly where GCC contracts the scalar code (CMakeLists.txt builds with
 * -ffp-contract=fast: a product whose only use is an add or a subtract becomes one
 * fused operation). Divisions stay divisions (no reciprocal estimate). So the results
 * are bit-identical to the scalar mdnn_act as this project compiles it (NaN payloads
 * aside): tests/test_activations.py checks cpu.activation against the element-by-element
 * mdnn_act loop (_cpu_eltwise._activation_scalar) over the whole range and every tail
 * length, and it was checked against main's build on 1.1 M inputs per activation.
 *
 * Why: GCC vectorises the scalar loops of mdnn_act_array, but these run 1.1-1.5x faster
 * (one thread, (1, 96, 112, 112), min of interleaved runs: sig 1.01 -> 0.82 ms, htan
 * 1.48 -> 1.29, elu 1.44 -> 0.98, gelu 3.80 -> 3.54, mish 1.33 -> 0.96, silu 1.06 ->
 * 0.84). They stay far from a copy's speed: the formulas are compute-bound (gelu: three
 * expf, a division and a degree-9 polynomial: ~70 cycles per 8 floats at ~3 GHz). mdnn_act_array
 * uses mdnn_act_array_avx2 when this header is compiled with AVX2 + FMA (so do the GEMM
 * epilogue's tiles, gemm_avx2.h); the depthwise route applies mdnn_act8 to its
 * accumulators before storing them.
 *
 *   mdnn_act8(act, v, p)                   f(v) for 8 floats
 *   mdnn_act_array_avx2(act, p, x, y, n)   y[i] = f(x[i]), i < n (y may be x)
 */
#ifndef MINIDNN_ACT_AVX2_H
#define MINIDNN_ACT_AVX2_H
#if defined(__AVX2__) && defined(__FMA__) && !defined(__CUDACC__)
#include <immintrin.h>
#include <string.h>
#define MDNN_ACT_HAVE_AVX2 1

#define MDNN_AI static inline __attribute__((always_inline))
#define MDNN_S1 _mm256_set1_ps

/* x < a ? b : c, lane by lane (cmp LT ordered: NaN -> c) */
MDNN_AI __m256 mdnn_sel_lt(__m256 x, __m256 a, __m256 b, __m256 c)
{
    return _mm256_blendv_ps(c, b, _mm256_cmp_ps(x, a, _CMP_LT_OQ));
}
MDNN_AI __m256 mdnn_sel_gt(__m256 x, __m256 a, __m256 b, __m256 c)
{
    return _mm256_blendv_ps(c, b, _mm256_cmp_ps(x, a, _CMP_GT_OQ));
}
MDNN_AI __m256 mdnn_abs8(__m256 x)   /* x < 0 ? -x : x (-0 stays -0: only compared) */
{
    return _mm256_andnot_ps(MDNN_S1(-0.0f), x);
}

/* mdnn_expf */
MDNN_AI __m256 mdnn_expf8(__m256 x)
{
    const __m256 lo = MDNN_S1(-87.3f), hi = MDNN_S1(88.3f), big = MDNN_S1(12582912.0f);
    /* x < lo ? lo : (x > hi ? hi : x) for every x but NaN (NaN lanes end as x below) */
    __m256 c = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
    __m256 t = _mm256_fmadd_ps(c, MDNN_S1(1.44269504088896341f), big);
    __m256 n = _mm256_sub_ps(t, big);
    __m256i ni = _mm256_sub_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(0x4B400000));
    __m256 r = _mm256_fmadd_ps(n, MDNN_S1(2.12194440e-4f), _mm256_fnmadd_ps(n, MDNN_S1(0.693359375f), c));
    __m256 r2 = _mm256_mul_ps(r, r), p;
    p = _mm256_fmadd_ps(MDNN_S1(1.9875691500e-4f), r, MDNN_S1(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, MDNN_S1(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, MDNN_S1(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, MDNN_S1(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, MDNN_S1(5.0000001201e-1f));
    p = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), MDNN_S1(1.0f));
    p = _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(
                             _mm256_add_epi32(ni, _mm256_set1_epi32(127)), 23)));
    p = _mm256_andnot_ps(_mm256_cmp_ps(x, lo, _CMP_LT_OQ), p);      /* x < lo ? 0 : p */
    return _mm256_blendv_ps(p, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

/* mdnn_expm1f */
MDNN_AI __m256 mdnn_expm1f8(__m256 x)
{
    __m256 t = _mm256_fmadd_ps(x, MDNN_S1(1.0f / 5040), MDNN_S1(1.0f / 720));
    __m256 e;
    t = _mm256_fmadd_ps(x, t, MDNN_S1(1.0f / 120));
    t = _mm256_fmadd_ps(x, t, MDNN_S1(1.0f / 24));
    t = _mm256_fmadd_ps(x, t, MDNN_S1(1.0f / 6));
    t = _mm256_fmadd_ps(x, t, MDNN_S1(0.5f));
    t = _mm256_fmadd_ps(x, t, MDNN_S1(1.0f));
    t = _mm256_mul_ps(x, t);
    e = _mm256_sub_ps(mdnn_expf8(x), MDNN_S1(1.0f));
    return mdnn_sel_lt(mdnn_abs8(x), MDNN_S1(0.35f), t, e);
}

/* mdnn_exp_halfsq */
MDNN_AI __m256 mdnn_exp_halfsq8(__m256 x)
{
    __m256 xh = _mm256_and_ps(x, _mm256_castsi256_ps(_mm256_set1_epi32(~0xFFF)));
    __m256 xl = _mm256_sub_ps(x, xh);
    __m256 a = _mm256_mul_ps(_mm256_mul_ps(MDNN_S1(-0.5f), xh), xh);
    __m256 b = _mm256_mul_ps(_mm256_xor_ps(xl, MDNN_S1(-0.0f)), _mm256_fmadd_ps(MDNN_S1(0.5f), xl, xh));
    return _mm256_mul_ps(mdnn_expf8(a), mdnn_expf8(b));
}

/* mdnn_normal_cdf */
MDNN_AI __m256 mdnn_normal_cdf8(__m256 x)
{
    __m256 z = _mm256_mul_ps(mdnn_abs8(x), MDNN_S1(0.70710678118654752f));
    __m256 t = _mm256_div_ps(MDNN_S1(1.0f), _mm256_fmadd_ps(MDNN_S1(0.5f), z, MDNN_S1(1.0f)));
    __m256 q = _mm256_fmadd_ps(t, MDNN_S1(0.17087277f), MDNN_S1(-0.82215223f)), h;
    q = _mm256_fmadd_ps(t, q, MDNN_S1(1.48851587f));
    q = _mm256_fmadd_ps(t, q, MDNN_S1(-1.13520398f));
    q = _mm256_fmadd_ps(t, q, MDNN_S1(0.27886807f));
    q = _mm256_fmadd_ps(t, q, MDNN_S1(-0.18628806f));
    q = _mm256_fmadd_ps(t, q, MDNN_S1(0.09678418f));
    q = _mm256_fmadd_ps(t, q, MDNN_S1(0.37409196f));
    q = _mm256_fmadd_ps(t, q, MDNN_S1(1.00002368f));
    q = _mm256_fmadd_ps(t, q, MDNN_S1(-1.26551223f));
    h = _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(MDNN_S1(0.5f), t), mdnn_exp_halfsq8(x)), mdnn_expf8(q));
    return mdnn_sel_lt(x, _mm256_setzero_ps(), h, _mm256_sub_ps(MDNN_S1(1.0f), h));
}

MDNN_AI __m256 mdnn_sigmoid8(__m256 x)
{
    __m256 e = mdnn_expf8(_mm256_xor_ps(x, MDNN_S1(-0.0f)));
    return _mm256_div_ps(MDNN_S1(1.0f), _mm256_add_ps(MDNN_S1(1.0f), e));
}

/* f(v) for activation `act` (the codes of activations.h) */
MDNN_AI __m256 mdnn_act8(int act, __m256 v, float p)
{
    const __m256 zero = _mm256_setzero_ps(), pv = MDNN_S1(p);
    switch (act) {
    case MDNN_ACT_RELU:                 /* x < 0 ? 0 : x */
        return _mm256_max_ps(zero, v);
    case MDNN_ACT_LEAKY_RELU:
    case MDNN_ACT_PRELU:                /* x > 0 ? x : p x */
        return mdnn_sel_gt(v, zero, v, _mm256_mul_ps(pv, v));
    case MDNN_ACT_SIG:
        return mdnn_sigmoid8(v);
    case MDNN_ACT_HTAN: {               /* c = min(x, 44); e = expm1(2c); e / (e + 2) */
        __m256 c = mdnn_sel_gt(v, MDNN_S1(44.0f), MDNN_S1(44.0f), v);
        __m256 e = mdnn_expm1f8(_mm256_mul_ps(MDNN_S1(2.0f), c));
        return _mm256_div_ps(e, _mm256_add_ps(e, MDNN_S1(2.0f)));
    }
    case MDNN_ACT_ELU:                  /* x > 0 ? x : p expm1(x) */
        return mdnn_sel_gt(v, zero, v, _mm256_mul_ps(pv, mdnn_expm1f8(v)));
    case MDNN_ACT_GELU:
        return _mm256_mul_ps(v, mdnn_normal_cdf8(v));
    case MDNN_ACT_MISH: {               /* e = exp(min(x, 20)); n = e (e + 2); x n / (n + 2) */
        __m256 e = mdnn_expf8(mdnn_sel_gt(v, MDNN_S1(20.0f), MDNN_S1(20.0f), v));
        __m256 n = _mm256_mul_ps(e, _mm256_add_ps(e, MDNN_S1(2.0f)));
        return _mm256_mul_ps(v, _mm256_div_ps(n, _mm256_add_ps(n, MDNN_S1(2.0f))));
    }
    case MDNN_ACT_SILU:
        return _mm256_mul_ps(v, mdnn_sigmoid8(v));
    case MDNN_ACT_CLIPPED_RELU:         /* y = x < 0 ? 0 : x; y > p ? p : y */
        return _mm256_min_ps(pv, _mm256_max_ps(zero, v));
    case MDNN_ACT_SMELU: {              /* x >= p ? x : (x <= -p ? 0 : (x + p)^2 / (4p)) */
        __m256 s = _mm256_add_ps(v, pv);
        __m256 q = _mm256_div_ps(_mm256_mul_ps(s, s), MDNN_S1(4.0f * p));
        __m256 r = _mm256_blendv_ps(q, zero, _mm256_cmp_ps(v, MDNN_S1(-p), _CMP_LE_OQ));
        return _mm256_blendv_ps(r, v, _mm256_cmp_ps(v, pv, _CMP_GE_OQ));
    }
    default:
        return v;
    }
}

/* y[i] = f(x[i]) for i < n (y may be x): one loop per activation (the switch outside),
 * 2 vectors per step; the last n % 8 go through a zero-padded 8-float buffer (the same
 * arithmetic: every element of y is computed the same way) */
#define MDNN_ACT8_LOOP(A)                                                          \
    for (; i + 16 <= n; i += 16) {                                                 \
        __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8);         \
        _mm256_storeu_ps(y + i, mdnn_act8(A, a, p));                               \
        _mm256_storeu_ps(y + i + 8, mdnn_act8(A, b, p));                           \
    }                                                                              \
    for (; i + 8 <= n; i += 8)                                                     \
        _mm256_storeu_ps(y + i, mdnn_act8(A, _mm256_loadu_ps(x + i), p));          \
    if (i < n) {                                                                   \
        float tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};                                   \
        memcpy(tmp, x + i, (size_t)(n - i) * sizeof(float));                       \
        _mm256_storeu_ps(tmp, mdnn_act8(A, _mm256_loadu_ps(tmp), p));              \
        memcpy(y + i, tmp, (size_t)(n - i) * sizeof(float));                       \
    }                                                                              \
    break;

static inline void mdnn_act_array_avx2(int act, float p, const float* x, float* y, long n)
{
    long i = 0;
    switch (act) {
    case MDNN_ACT_RELU: MDNN_ACT8_LOOP(MDNN_ACT_RELU)
    case MDNN_ACT_LEAKY_RELU:
    case MDNN_ACT_PRELU: MDNN_ACT8_LOOP(MDNN_ACT_LEAKY_RELU)
    case MDNN_ACT_SIG: MDNN_ACT8_LOOP(MDNN_ACT_SIG)
    case MDNN_ACT_HTAN: MDNN_ACT8_LOOP(MDNN_ACT_HTAN)
    case MDNN_ACT_ELU: MDNN_ACT8_LOOP(MDNN_ACT_ELU)
    case MDNN_ACT_GELU: MDNN_ACT8_LOOP(MDNN_ACT_GELU)
    case MDNN_ACT_MISH: MDNN_ACT8_LOOP(MDNN_ACT_MISH)
    case MDNN_ACT_SILU: MDNN_ACT8_LOOP(MDNN_ACT_SILU)
    case MDNN_ACT_CLIPPED_RELU: MDNN_ACT8_LOOP(MDNN_ACT_CLIPPED_RELU)
    case MDNN_ACT_SMELU: MDNN_ACT8_LOOP(MDNN_ACT_SMELU)
    default:
        if (y != x) memmove(y, x, (size_t)n * sizeof(float));
    }
}
#undef MDNN_ACT8_LOOP
#undef MDNN_S1
#undef MDNN_AI
#else
#define MDNN_ACT_HAVE_AVX2 0
#endif
#endif
