/* The output size of a sliding window, one rule for every kernel (CPU and CUDA)
 * and for the layers (minidnn/layers/common.py out_size computes the same):
 *
 *   out = 1 + (n + 2*pad - span) / stride,  span = dilation*(k - 1) + 1
 *
 * for n inputs padded by pad on both sides and a window of k taps; the caller
 * has checked span <= n + 2*pad (so out >= 1). */
#ifndef MINIDNN_GEOMETRY_H
#define MINIDNN_GEOMETRY_H

#ifdef __CUDACC__
#define MDNN_GEO_FN static __host__ __device__ __forceinline__
#else
#define MDNN_GEO_FN static inline
#endif

MDNN_GEO_FN long mdnn_out_size(long n, long k, long stride, long pad, long dilation)
{
    return 1 + (n + 2 * pad - (dilation * (k - 1) + 1)) / stride;
}

#endif
