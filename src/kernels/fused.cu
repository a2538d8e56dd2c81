// Fused kernels of the CUDA path (see fused.rs): each replaces a chain of candle ops, and so
// their launches, allocations and casts, with one kernel that computes what the chain computed.
// Compiled by build.rs with nvcc into PTX for compute_75, which the driver compiles for the GPU
// at load. 16-bit values are read and written through cuda_bf16.h / cuda_fp16.h conversions
// (round to nearest even); all arithmetic is in f32.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
    return __float2bfloat16(x);
}
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }

__device__ __forceinline__ float gelu_tanh(float x) {
    const float k = 0.7978845608028654f; // sqrt(2 / pi)
    return 0.5f * x * (1.0f + tanhf(k * (x + 0.044715f * x * x * x)));
}

__device__ __forceinline__ float silu(float x) { return x / (1.0f + expf(-x)); }

// o = act(g) · u over n elements. act(g) is rounded to T first, as PyTorch's activation of a T
// tensor is, then multiplied in f32 and rounded again, as its product of two T tensors is.
template <typename T, bool SILU>
__device__ void gated(const T *g, const T *u, T *o, unsigned int n) {
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += blockDim.x * gridDim.x) {
        const float x = to_f(g[i]);
        const float a = to_f(from_f<T>(SILU ? silu(x) : gelu_tanh(x)));
        o[i] = from_f<T>(a * to_f(u[i]));
    }
}

#define GATED(T, NAME)                                                                          \
    extern "C" __global__ void gelu_mul_##NAME(const T *g, const T *u, T *o, unsigned int n) {  \
        gated<T, false>(g, u, o, n);                                                            \
    }                                                                                           \
    extern "C" __global__ void silu_mul_##NAME(const T *g, const T *u, T *o, unsigned int n) {  \
        gated<T, true>(g, u, o, n);                                                             \
    }
GATED(float, f32)
GATED(__nv_bfloat16, bf16)
GATED(__half, f16)

// The maximum / sum of v over the block (blockDim.x a multiple of 32, at most 1024), in every
// thread. red: 32 floats of shared memory.
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    return v;
}
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}
__device__ float block_max(float v, float *red) {
    const unsigned int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_max(v);
    __syncthreads(); // red may still be read by the previous reduction
    if (lane == 0) red[warp] = v;
    __syncthreads();
    return warp_max(lane < (blockDim.x >> 5) ? red[lane] : -INFINITY);
}
__device__ float block_sum(float v, float *red) {
    const unsigned int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    return warp_sum(lane < (blockDim.x >> 5) ? red[lane] : 0.0f);
}

// Softmax of each row of t scores x (T) plus an additive f32 mask [n, t] (row r takes mask row
// r % n; none when mask is null), in f32, written as T: what casting the scores to f32, adding
// the mask, a softmax and a cast back compute. One block per row.
template <typename T>
__device__ void softmax_rows(const T *x, const float *mask, T *y, unsigned int t, unsigned int n) {
    __shared__ float red[32];
    const size_t row = blockIdx.x;
    const T *xr = x + row * t;
    T *yr = y + row * t;
    const float *mr = mask ? mask + (row % n) * t : nullptr;
    float m = -INFINITY;
    for (unsigned int c = threadIdx.x; c < t; c += blockDim.x)
        m = fmaxf(m, to_f(xr[c]) + (mr ? mr[c] : 0.0f));
    m = block_max(m, red);
    float s = 0.0f;
    for (unsigned int c = threadIdx.x; c < t; c += blockDim.x)
        s += expf(to_f(xr[c]) + (mr ? mr[c] : 0.0f) - m);
    const float inv = 1.0f / block_sum(s, red);
    for (unsigned int c = threadIdx.x; c < t; c += blockDim.x)
        yr[c] = from_f<T>(expf(to_f(xr[c]) + (mr ? mr[c] : 0.0f) - m) * inv);
}

#define SOFTMAX(T, NAME)                                                                        \
    extern "C" __global__ void softmax_##NAME(const T *x, const float *mask, T *y, unsigned int t, \
                                              unsigned int n) {                                 \
        softmax_rows<T>(x, mask, y, t, n);                                                      \
    }
SOFTMAX(float, f32)
SOFTMAX(__nv_bfloat16, bf16)
SOFTMAX(__half, f16)

// A residual add between two RMS norms, per row of dim values (one block per row):
//   h' = h + (w1 ? rmsnorm(x) · w1 : x)        then, with scale, h' · scale[0]; to out_h
//   y  = rmsnorm(h') · w2                      written to out_y (when w2 is not null)
// with the roundings of candle's chain: each norm in f32 (x · rsqrt(mean(x²) + eps) · w),
// rounded to T, the sum rounded to T, the product rounded to T.
template <typename T>
__device__ float row_sum_sq(const T *x, unsigned int dim, float *red) {
    float s = 0.0f;
    for (unsigned int c = threadIdx.x; c < dim; c += blockDim.x) {
        const float v = to_f(x[c]);
        s += v * v;
    }
    return block_sum(s, red);
}

template <typename T>
__device__ void residual_norm(const T *h, const T *x, const T *w1, const T *w2, const T *scale,
                              T *out_h, T *out_y, unsigned int dim, float eps1, float eps2) {
    __shared__ float red[32];
    const size_t row = blockIdx.x;
    h += row * dim;
    x += row * dim;
    out_h += row * dim;
    const float r1 = w1 ? rsqrtf(row_sum_sq(x, dim, red) / dim + eps1) : 1.0f;
    for (unsigned int c = threadIdx.x; c < dim; c += blockDim.x) {
        const float n = w1 ? to_f(from_f<T>(r1 * to_f(x[c]) * to_f(w1[c]))) : to_f(x[c]);
        const T sum = from_f<T>(to_f(h[c]) + n);
        out_h[c] = scale ? from_f<T>(to_f(sum) * to_f(scale[0])) : sum;
    }
    if (!w2) return;
    __syncthreads(); // out_h's row complete (each thread reads back others' columns)
    out_y += row * dim;
    const float r2 = rsqrtf(row_sum_sq(out_h, dim, red) / dim + eps2);
    for (unsigned int c = threadIdx.x; c < dim; c += blockDim.x)
        out_y[c] = from_f<T>(r2 * to_f(out_h[c]) * to_f(w2[c]));
}

#define RESIDUAL_NORM(T, NAME)                                                                  \
    extern "C" __global__ void residual_norm_##NAME(                                            \
        const T *h, const T *x, const T *w1, const T *w2, const T *scale, T *out_h, T *out_y,   \
        unsigned int dim, float eps1, float eps2) {                                             \
        residual_norm<T>(h, x, w1, w2, scale, out_h, out_y, dim, eps1, eps2);                   \
    }
RESIDUAL_NORM(float, f32)
RESIDUAL_NORM(__nv_bfloat16, bf16)
RESIDUAL_NORM(__half, f16)

// Attention of a few query rows over a few keys (decode; fused.rs says how few), one block per
// query row, with the roundings of candle's chain (q·kᵀ rounded to T, scaled in T unless the
// scale is 1, the f32 mask added, softmax in f32, the probabilities rounded to T, their product
// with the values summed in f32 and rounded to T):
//   q [bh·rows, d] (bh = batch·kv heads; a KV head's query rows consecutive), k / v rows of d / dv
//   contiguous values at k + b·k_bs + h·k_hs + j·d (v likewise), mask [n, t] f32 (row r of a
//   head takes mask row r % n; none when null), out [bh·rows, dv], scratch [bh·rows, t] f32.
template <typename T>
__device__ void attend_rows(const T *q, const T *k, const T *v, const float *mask, T *out,
                            float *scratch, unsigned int rows, unsigned int t, unsigned int d,
                            unsigned int dv, unsigned int n, unsigned int heads,
                            unsigned long long k_bs, unsigned long long k_hs,
                            unsigned long long v_bs, unsigned long long v_hs, float scale,
                            int scaled) {
    __shared__ float red[32];
    const size_t row = blockIdx.x;
    const size_t bh = row / rows, b = bh / heads, h = bh % heads;
    const unsigned int r = row % rows;
    const T *qr = q + row * d;
    const T *kh = k + b * k_bs + h * k_hs;
    const T *vh = v + b * v_bs + h * v_hs;
    const float *mr = mask ? mask + (size_t)(r % n) * t : nullptr;
    float *s = scratch + row * t;
    const unsigned int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    // 1. Scores, one key per warp at a time; the row's maximum.
    float m = -INFINITY;
    for (unsigned int j = warp; j < t; j += warps) {
        const T *kj = kh + (size_t)j * d;
        float dot = 0.0f;
        for (unsigned int c = lane; c < d; c += 32) dot += to_f(qr[c]) * to_f(kj[c]);
        dot = warp_sum(dot);
        float x = to_f(from_f<T>(dot));
        if (scaled) x = to_f(from_f<T>(x * scale));
        x += mr ? mr[j] : 0.0f;
        if (lane == 0) s[j] = x;
        m = fmaxf(m, x);
    }
    m = block_max(m, red); // its barrier also makes every s[j] visible to the block
    // 2. The softmax's sum.
    float sum = 0.0f;
    for (unsigned int j = threadIdx.x; j < t; j += blockDim.x) sum += expf(s[j] - m);
    const float inv = 1.0f / block_sum(sum, red);
    // 3. The probabilities, rounded to T, in place of the scores.
    for (unsigned int j = threadIdx.x; j < t; j += blockDim.x)
        s[j] = to_f(from_f<T>(expf(s[j] - m) * inv));
    __syncthreads();
    // 4. Their product with the values, one output column per thread.
    for (unsigned int c = threadIdx.x; c < dv; c += blockDim.x) {
        float acc = 0.0f;
        for (unsigned int j = 0; j < t; ++j) acc += s[j] * to_f(vh[(size_t)j * dv + c]);
        out[row * dv + c] = from_f<T>(acc);
    }
}

#define ATTEND(T, NAME)                                                                         \
    extern "C" __global__ void attend_rows_##NAME(                                              \
        const T *q, const T *k, const T *v, const float *mask, T *out, float *scratch,          \
        unsigned int rows, unsigned int t, unsigned int d, unsigned int dv, unsigned int n,     \
        unsigned int heads, unsigned long long k_bs, unsigned long long k_hs,                   \
        unsigned long long v_bs, unsigned long long v_hs, float scale, int scaled) {            \
        attend_rows<T>(q, k, v, mask, out, scratch, rows, t, d, dv, n, heads, k_bs, k_hs, v_bs, \
                       v_hs, scale, scaled);                                                    \
    }
ATTEND(float, f32)
ATTEND(__nv_bfloat16, bf16)
ATTEND(__half, f16)

// Per-head RMS norm (scale w; none when w is null) then RoPE over the first r dims (pairs c and
// c + r/2, cos / sin [n, r/2] in T), the heads moved before the positions: x [b, n, h, d] →
// out [b, h, n, d], one block per head row. The roundings of candle's chain: the norm rounded to
// T, each product of the rotation rounded to T, their sum or difference rounded to T.
template <typename T>
__device__ void norm_rope(const T *x, const T *w, const T *cos, const T *sin, T *out,
                          unsigned int n, unsigned int h, unsigned int d, unsigned int r,
                          float eps) {
    __shared__ float red[32];
    const size_t row = blockIdx.x;
    const size_t b = row / ((size_t)n * h), p = (row / h) % n, hd = row % h;
    const T *xr = x + row * d;
    T *o = out + ((b * h + hd) * n + p) * d;
    const float rs = w ? rsqrtf(row_sum_sq(xr, d, red) / d + eps) : 1.0f;
    const unsigned int half = r / 2;
    const T *cr = cos + p * half;
    const T *sr = sin + p * half;
#define NORMED(c) (w ? to_f(from_f<T>(rs * to_f(xr[c]) * to_f(w[c]))) : to_f(xr[c]))
    for (unsigned int c = threadIdx.x; c < d; c += blockDim.x) {
        if (c < half) {
            const float y1 = NORMED(c), y2 = NORMED(c + half);
            const float cs = to_f(cr[c]), sn = to_f(sr[c]);
            const float a = to_f(from_f<T>(y1 * cs)), b2 = to_f(from_f<T>(y2 * sn));
            const float a2 = to_f(from_f<T>(y1 * sn)), b3 = to_f(from_f<T>(y2 * cs));
            o[c] = from_f<T>(a - b2);
            o[c + half] = from_f<T>(a2 + b3);
        } else if (c >= r) {
            o[c] = from_f<T>(NORMED(c));
        }
    }
#undef NORMED
}

#define NORM_ROPE(T, NAME)                                                                      \
    extern "C" __global__ void norm_rope_##NAME(const T *x, const T *w, const T *cos,           \
                                                const T *sin, T *out, unsigned int n,           \
                                                unsigned int h, unsigned int d, unsigned int r, \
                                                float eps) {                                    \
        norm_rope<T>(x, w, cos, sin, out, n, h, d, r, eps);                                     \
    }
NORM_ROPE(float, f32)
NORM_ROPE(__nv_bfloat16, bf16)
NORM_ROPE(__half, f16)
