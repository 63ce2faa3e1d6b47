/* Pointwise activations: each formula and its derivative, written once.
 *
 * Shared by the CPU kernels (Cython: kernels/cpu/*.pyx include it through
 * act.pxi) and the CUDA kernels (kernels/cuda/*.cu include it; PyCUDA
 * compiles them with kernels/common on the include path). The standalone
 * activation kernels, the bias/residual epilogue of conv2d / fc / affine /
 * add on both backends, and the backward kernels all call mdnn_act and
 * mdnn_act_grad, so the CPU and the GPU compute the same function.
 *
 * An activation is data: a code (MDNN_ACT_*) and one float parameter p
 * (alpha, ceiling or beta; ignored by the others). The codes are part of
 * the Python side's contract: minidnn/layers/activations.py gives each
 * activation layer the code below with the same name (MDNN_ACT_<KIND>), and
 * tests/test_activations.py checks that the two lists agree.
 *
 * Everything is branch-free arithmetic (selects, no libm calls, no float-to-int
 * conversions), so a loop over mdnn_act with a constant code vectorises (GCC -O3
 * -fno-trapping-math, which CMakeLists.txt sets; check with -fopt-info-vec); exp and erf
 * are our own polynomials (Cephes-style expf, ~1-2 ulp; erfc with a relative
 * error below 1.2e-7), so every activation keeps its relative accuracy in its tails.
 * NaN passes through every activation (as numpy's maximum does for relu).
 *
 *   code                 y = f(x)                                    df/dx (from x and y = f(x))
 *   IDENTITY    0        x                                           1
 *   RELU        1        max(x, 0)                                   y > 0
 *   LEAKY_RELU  2        x > 0 ? x : p x          (p = alpha)        x > 0 ? 1 : p
 *   PRELU       3        as LEAKY_RELU with p = the learned scalar   as LEAKY_RELU
 *   SIG         4        1 / (1 + e^-x)                              y (1 - y)
 *   HTAN        5        tanh x                                      1 - y^2
 *   ELU         6        x > 0 ? x : p (e^x - 1)  (p = alpha)        x > 0 ? 1 : y + p
 *   GELU        7        x Phi(x) = x/2 (1 + erf(x/sqrt 2))         Phi(x) + x phi(x)
 *   MISH        8        x tanh(ln(1 + e^x))                         dlib's e omega / delta^2
 *   SILU        9        x / (1 + e^-x)                              s + x s (1 - s), s = sigmoid x
 *   CLIPPED_RELU 10      min(max(x, 0), p)        (p = ceiling)      0 < x < p
 *   SMELU       11       x >= p ? x : x <= -p ? 0 : (x + p)^2/(4p)   x >= p ? 1 : x <= -p ? 0 : (x + p)/(2p)
 *                        (p = beta; dlib's code, not its doc)
 */
#ifndef MINIDNN_ACTIVATIONS_H
#define MINIDNN_ACTIVATIONS_H

#ifdef __CUDACC__
#define MDNN_ACT_FN static __device__ __forceinline__
#else
#define MDNN_ACT_FN static inline
#endif

#define MDNN_ACT_IDENTITY 0
#define MDNN_ACT_RELU 1
#define MDNN_ACT_LEAKY_RELU 2
#define MDNN_ACT_PRELU 3
#define MDNN_ACT_SIG 4
#define MDNN_ACT_HTAN 5
#define MDNN_ACT_ELU 6
#define MDNN_ACT_GELU 7
#define MDNN_ACT_MISH 8
#define MDNN_ACT_SILU 9
#define MDNN_ACT_CLIPPED_RELU 10
#define MDNN_ACT_SMELU 11
#define MDNN_ACT_COUNT 12

/* ------------------------------------------------------------ building blocks */

/* the float whose bits are i, and the bits of f (unions: they vectorise, and nvcc
 * takes them too) */
MDNN_ACT_FN float mdnn_bits_f(int i) { union { int i; float f; } u; u.i = i; return u.f; }
MDNN_ACT_FN int mdnn_f_bits(float f) { union { int i; float f; } u; u.f = f; return u.i; }

/* e^x: x clamped to [-87.3, 88.3] (e^88.3 ~ 2.2e38), 0 below -87.3 (what would be
 * subnormal), NaN -> NaN. Cephes expf: x = n ln2 + r, |r| <= ln2/2, a degree-6
 * polynomial for e^r, 2^n from the exponent bits. n = round(x log2 e) comes from
 * adding 1.5 * 2^23 (its low mantissa bits then hold n): no float-to-int
 * conversion, which keeps the loops over it vectorisable. */
MDNN_ACT_FN float mdnn_expf(float x)
{
    float c = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
    float t = c * 1.44269504088896341f + 12582912.0f;
    float n = t - 12582912.0f;
    int ni = mdnn_f_bits(t) - 0x4B400000;
    float r = c - n * 0.693359375f + n * 2.12194440e-4f;
    float r2 = r * r, p;
    p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r2 + r + 1.0f;
    p = p * mdnn_bits_f((ni + 127) << 23);
    p = x < -87.3f ? 0.0f : p;
    return x != x ? x : p;
}

/* e^x - 1, accurate near 0 (a Taylor polynomial for |x| < 0.35, where
 * e^x - 1 would cancel), >= -1 everywhere */
MDNN_ACT_FN float mdnn_expm1f(float x)
{
    float t = x * (1.0f + x * (0.5f + x * (1.0f / 6 + x * (1.0f / 24 + x * (1.0f / 120
              + x * (1.0f / 720 + x * (1.0f / 5040)))))));
    float e = mdnn_expf(x) - 1.0f;
    float ax = x < 0.0f ? -x : x;
    return ax < 0.35f ? t : e;
}

/* e^(-x^2/2) with the relative accuracy of one expf: x = xh + xl with xh holding
 * 12 significant bits, so -xh^2/2 is exact and the rest is a small correction */
MDNN_ACT_FN float mdnn_exp_halfsq(float x)
{
    float xh = mdnn_bits_f(mdnn_f_bits(x) & ~0xFFF), xl = x - xh;
    return mdnn_expf(-0.5f * xh * xh) * mdnn_expf(-xl * (xh + 0.5f * xl));
}

/* Phi(x), the standard normal CDF = erfc(-x / sqrt 2) / 2, with a relative error
 * of a few 1e-7 in both tails: the Chebyshev fit of Numerical Recipes' erfcc
 * (fractional error < 1.2e-7), erfc(z) = t exp(-z^2 + P(t)), with e^(-z^2) =
 * e^(-x^2/2) computed without losing digits (mdnn_exp_halfsq) */
MDNN_ACT_FN float mdnn_normal_cdf(float x)
{
    float z = (x < 0.0f ? -x : x) * 0.70710678118654752f;
    float t = 1.0f / (1.0f + 0.5f * z);
    float q = -1.26551223f + t * (1.00002368f + t * (0.37409196f + t * (0.09678418f
              + t * (-0.18628806f + t * (0.27886807f + t * (-1.13520398f + t * (1.48851587f
              + t * (-0.82215223f + t * 0.17087277f))))))));
    float h = 0.5f * t * mdnn_exp_halfsq(x) * mdnn_expf(q);
    return x < 0.0f ? h : 1.0f - h;
}

/* ------------------------------------------------------------ the activations */

MDNN_ACT_FN float mdnn_act_relu(float x) { return x < 0.0f ? 0.0f : x; }
MDNN_ACT_FN float mdnn_act_leaky(float x, float p) { return x > 0.0f ? x : p * x; }
MDNN_ACT_FN float mdnn_act_sigmoid(float x) { return 1.0f / (1.0f + mdnn_expf(-x)); }

MDNN_ACT_FN float mdnn_act_tanh(float x)
{
    /* expm1(2x) / (expm1(2x) + 2), 2x clamped so that it never overflows */
    float c = x > 44.0f ? 44.0f : x;
    float e = mdnn_expm1f(2.0f * c);
    return e / (e + 2.0f);
}

MDNN_ACT_FN float mdnn_act_elu(float x, float p) { return x > 0.0f ? x : p * mdnn_expm1f(x); }

MDNN_ACT_FN float mdnn_act_gelu(float x) { return x * mdnn_normal_cdf(x); }

MDNN_ACT_FN float mdnn_act_mish(float x)
{
    /* tanh(ln(1 + e)) = n / (n + 2) with n = e (e + 2): no cancellation for
     * x << 0; for x > 20 it is 1 in float */
    float e = mdnn_expf(x > 20.0f ? 20.0f : x);
    float n = e * (e + 2.0f);
    return x * (n / (n + 2.0f));
}

MDNN_ACT_FN float mdnn_act_silu(float x) { return x * mdnn_act_sigmoid(x); }

MDNN_ACT_FN float mdnn_act_clipped(float x, float p)
{
    float y = x < 0.0f ? 0.0f : x;
    return y > p ? p : y;
}

MDNN_ACT_FN float mdnn_act_smelu(float x, float p)
{
    float q = (x + p) * (x + p) / (4.0f * p);
    return x >= p ? x : (x <= -p ? 0.0f : q);
}

/* which of x and y = f(x) the derivative of `act` reads */
MDNN_ACT_FN int mdnn_act_reads_y(int act)
{
    return act == MDNN_ACT_RELU || act == MDNN_ACT_SIG || act == MDNN_ACT_HTAN
           || act == MDNN_ACT_ELU;
}
MDNN_ACT_FN int mdnn_act_reads_x(int act)
{
    return act != MDNN_ACT_IDENTITY && act != MDNN_ACT_RELU && act != MDNN_ACT_SIG
           && act != MDNN_ACT_HTAN;
}

/* y = f(x) for activation code `act` with parameter p */
MDNN_ACT_FN float mdnn_act(int act, float x, float p)
{
    switch (act) {
    case MDNN_ACT_RELU: return mdnn_act_relu(x);
    case MDNN_ACT_LEAKY_RELU:
    case MDNN_ACT_PRELU: return mdnn_act_leaky(x, p);
    case MDNN_ACT_SIG: return mdnn_act_sigmoid(x);
    case MDNN_ACT_HTAN: return mdnn_act_tanh(x);
    case MDNN_ACT_ELU: return mdnn_act_elu(x, p);
    case MDNN_ACT_GELU: return mdnn_act_gelu(x);
    case MDNN_ACT_MISH: return mdnn_act_mish(x);
    case MDNN_ACT_SILU: return mdnn_act_silu(x);
    case MDNN_ACT_CLIPPED_RELU: return mdnn_act_clipped(x, p);
    case MDNN_ACT_SMELU: return mdnn_act_smelu(x, p);
    default: return x;
    }
}

/* df/dx at x, given also y = f(x) (the derivatives of relu, sigmoid, tanh and
 * elu are cheapest from y, as in dlib) */
MDNN_ACT_FN float mdnn_act_grad(int act, float x, float y, float p)
{
    switch (act) {
    case MDNN_ACT_RELU: return y > 0.0f ? 1.0f : 0.0f;
    case MDNN_ACT_LEAKY_RELU:
    case MDNN_ACT_PRELU: return x > 0.0f ? 1.0f : p;
    case MDNN_ACT_SIG: return y * (1.0f - y);
    case MDNN_ACT_HTAN: return 1.0f - y * y;
    case MDNN_ACT_ELU: return x > 0.0f ? 1.0f : y + p;
    case MDNN_ACT_GELU:
        return mdnn_normal_cdf(x) + x * 0.39894228040143268f * mdnn_exp_halfsq(x);
    case MDNN_ACT_MISH: {
        /* dlib: e omega / delta^2, delta = 2e + e^2 + 2,
         * omega = 4(x + 1) + 4e^2 + e^3 + e(4x + 6); 1 in float for x > 20 */
        float c = x > 20.0f ? 20.0f : x;
        float e = mdnn_expf(c);
        float delta = 2.0f * e + e * e + 2.0f;
        float omega = 4.0f * (c + 1.0f) + 4.0f * e * e + e * e * e + e * (4.0f * c + 6.0f);
        return x > 20.0f ? 1.0f : e * omega / (delta * delta);
    }
    case MDNN_ACT_SILU: {
        float s = mdnn_act_sigmoid(x);
        return s + x * s * (1.0f - s);
    }
    case MDNN_ACT_CLIPPED_RELU: return ((x > 0.0f) & (x < p)) ? 1.0f : 0.0f;
    case MDNN_ACT_SMELU: return x >= p ? 1.0f : (x <= -p ? 0.0f : (x + p) / (2.0f * p));
    default: return 1.0f;
    }
}

#ifndef __CUDACC__
/* CPU only: the same formulas on 8 floats at a time with AVX2 + FMA (bit-identical to
 * the scalar ones above as CMakeLists.txt compiles them); mdnn_act_array uses them.
 * Named through a macro, and written "# include", so that the CUDA side never sees it:
 * minidnn/backends/cuda/source.py inlines every quoted include of ours (an installed
 * package has no kernels/cpu), and PyCUDA preprocesses any source whose text still
 * holds an include directive; nvcc skips this whole block (__CUDACC__). */
#define MDNN_ACT_AVX2_HEADER "../cpu/act_avx2.h"
# include MDNN_ACT_AVX2_HEADER

/* y[i] = f(x[i]) for i < n (y may be x): the switch outside the loop, so each
 * case is a loop the compiler vectorises */
#define MDNN_ACT_LOOP(EXPR) for (i = 0; i < n; i++) { float v = x[i]; y[i] = (EXPR); } break;
static inline void mdnn_act_array(int act, float p, const float* x, float* y, long n)
{
    long i;
#if MDNN_ACT_HAVE_AVX2
    if (act != MDNN_ACT_IDENTITY) {
        mdnn_act_array_avx2(act, p, x, y, n);
        return;
    }
#endif
    switch (act) {
    case MDNN_ACT_RELU: MDNN_ACT_LOOP(mdnn_act_relu(v))
    case MDNN_ACT_LEAKY_RELU:
    case MDNN_ACT_PRELU: MDNN_ACT_LOOP(mdnn_act_leaky(v, p))
    case MDNN_ACT_SIG: MDNN_ACT_LOOP(mdnn_act_sigmoid(v))
    case MDNN_ACT_HTAN: MDNN_ACT_LOOP(mdnn_act_tanh(v))
    case MDNN_ACT_ELU: MDNN_ACT_LOOP(mdnn_act_elu(v, p))
    case MDNN_ACT_GELU: MDNN_ACT_LOOP(mdnn_act_gelu(v))
    case MDNN_ACT_MISH: MDNN_ACT_LOOP(mdnn_act_mish(v))
    case MDNN_ACT_SILU: MDNN_ACT_LOOP(mdnn_act_silu(v))
    case MDNN_ACT_CLIPPED_RELU: MDNN_ACT_LOOP(mdnn_act_clipped(v, p))
    case MDNN_ACT_SMELU: MDNN_ACT_LOOP(mdnn_act_smelu(v, p))
    default:
        if (y != x) for (i = 0; i < n; i++) y[i] = x[i];
    }
}
#undef MDNN_ACT_LOOP

/* dx[i] = dy[i] * f'(x[i]) (x or y may be NULL when the activation's
 * derivative does not read it: mdnn_act_reads_x/y; dx may be dy); one loop per
 * activation, as above */
#define MDNN_GRAD_LOOP(A) for (i = 0; i < n; i++) \
        dx[i] = dy[i] * mdnn_act_grad(A, x ? x[i] : 0.0f, y ? y[i] : 0.0f, p); break;
static inline void mdnn_act_grad_array(int act, float p, const float* x, const float* y,
                                       const float* dy, float* dx, long n)
{
    long i;
    switch (act) {
    case MDNN_ACT_RELU: MDNN_GRAD_LOOP(MDNN_ACT_RELU)
    case MDNN_ACT_LEAKY_RELU:
    case MDNN_ACT_PRELU: MDNN_GRAD_LOOP(MDNN_ACT_LEAKY_RELU)
    case MDNN_ACT_SIG: MDNN_GRAD_LOOP(MDNN_ACT_SIG)
    case MDNN_ACT_HTAN: MDNN_GRAD_LOOP(MDNN_ACT_HTAN)
    case MDNN_ACT_ELU: MDNN_GRAD_LOOP(MDNN_ACT_ELU)
    case MDNN_ACT_GELU: MDNN_GRAD_LOOP(MDNN_ACT_GELU)
    case MDNN_ACT_MISH: MDNN_GRAD_LOOP(MDNN_ACT_MISH)
    case MDNN_ACT_SILU: MDNN_GRAD_LOOP(MDNN_ACT_SILU)
    case MDNN_ACT_CLIPPED_RELU: MDNN_GRAD_LOOP(MDNN_ACT_CLIPPED_RELU)
    case MDNN_ACT_SMELU: MDNN_GRAD_LOOP(MDNN_ACT_SMELU)
    default: if (dx != dy) for (i = 0; i < n; i++) dx[i] = dy[i];
    }
}
#undef MDNN_GRAD_LOOP
#endif

#endif
