/* Fused fp32 elementwise kernels for CPU training (engine/fused.py loads them).

   Each kernel reads its inputs and writes its outputs once, where the same math in
   torch ops makes one full pass over memory per op. These ops are memory-bound, so
   the passes are the time. Plain C, no torch headers: gcc builds this file in about
   a second. Rows (or elements) are split over `threads` OpenMP threads; the library
   links libgomp.so.1 and is loaded after torch, so these are torch's own OpenMP
   threads (one pool, no oversubscription of the cores). A loop shorter than a few
   grains runs on the calling thread.

   rms_norm:  y = w * x * rstd,  rstd = 1 / sqrt(mean(x^2) + eps)     (per row)
   swiglu:    h = silu(g) * u,   silu(g) = g * sigmoid(g)
*/
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#define PRAGMA(x) _Pragma(#x)
#define PARALLEL(n, grain) PRAGMA(omp parallel for num_threads(threads) schedule(static) if ((n) >= 2 * (grain)))

/* exp(x) in a form the compiler vectorizes (libm's expf is a scalar call):
   x = n ln2 + r with n an integer and |r| <= ln2/2, exp(r) by Cephes' degree-6
   polynomial for expf (relative error ~1e-7), 2^n by writing the exponent bits.
   Inputs are clamped to +-88, where exp is still finite in fp32; NaN stays NaN. */
static inline float exp_vec(float x) {
    x = x > 88.0f ? 88.0f : x;
    x = x < -88.0f ? -88.0f : x;
    /* round to nearest by adding and removing 1.5 * 2^23 (no libm call, so it vectorizes) */
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t i; float f; } scale;
    scale.i = ((int32_t)n + 127) << 23;
    return p * scale.f;
}

static inline float sigmoidf_(float v) { return 1.0f / (1.0f + exp_vec(-v)); }

/* ---- RMSNorm ------------------------------------------------------------------ */

void rms_norm_forward(const float *restrict x, const float *restrict w, float *restrict y, float *restrict rstd,
                      int64_t rows, int64_t d, float eps, int threads) {
    PARALLEL(rows, 8)
    for (int64_t i = 0; i < rows; i++) {
        const float *restrict xi = x + i * d;
        float *restrict yi = y + i * d;
        float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (int64_t j = 0; j < d; j++) ss += xi[j] * xi[j];
        const float r = 1.0f / sqrtf(ss / (float)d + eps);
        rstd[i] = r;
#pragma omp simd
        for (int64_t j = 0; j < d; j++) yi[j] = w[j] * (xi[j] * r);
    }
}

/* dx = rstd * (g*w) - x * rstd^3 * mean(g*w*x) */
void rms_norm_backward(const float *restrict g, const float *restrict x, const float *restrict w,
                       const float *restrict rstd, float *restrict dx, int64_t rows, int64_t d, int threads) {
    PARALLEL(rows, 8)
    for (int64_t i = 0; i < rows; i++) {
        const float *restrict gi = g + i * d, *restrict xi = x + i * d;
        float *restrict dxi = dx + i * d;
        const float r = rstd[i];
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t j = 0; j < d; j++) dot += gi[j] * w[j] * xi[j];
        const float c = dot * r * r * r / (float)d;
#pragma omp simd
        for (int64_t j = 0; j < d; j++) dxi[j] = r * (gi[j] * w[j]) - xi[j] * c;
    }
}

/* ---- SwiGLU product ------------------------------------------------------------- */

void swiglu_forward(const float *restrict g, const float *restrict u, float *restrict h, int64_t n, int threads) {
    PARALLEL(n, 4096)
    for (int64_t i = 0; i < n; i++) h[i] = g[i] * sigmoidf_(g[i]) * u[i];
}

/* d/dg silu(g) = s * (1 + g * (1 - s)), s = sigmoid(g); dg or du may be NULL */
void swiglu_backward(const float *restrict dh, const float *restrict g, const float *restrict u,
                     float *restrict dg, float *restrict du, int64_t n, int threads) {
    if (dg && du) {
        PARALLEL(n, 4096)
        for (int64_t i = 0; i < n; i++) {
            const float s = sigmoidf_(g[i]);
            du[i] = dh[i] * g[i] * s;
            dg[i] = dh[i] * u[i] * s * (1.0f + g[i] * (1.0f - s));
        }
    } else if (dg) {
        PARALLEL(n, 4096)
        for (int64_t i = 0; i < n; i++) {
            const float s = sigmoidf_(g[i]);
            dg[i] = dh[i] * u[i] * s * (1.0f + g[i] * (1.0f - s));
        }
    } else if (du) {
        PARALLEL(n, 4096)
        for (int64_t i = 0; i < n; i++) du[i] = dh[i] * g[i] * sigmoidf_(g[i]);
    }
}

/* ---- rotary position embedding ---------------------------------------------------
   x: [tokens, heads, dim] (the projection's output before the head transpose),
   cos, sin: [cos_rows, dim], token t using row t % cos_rows (cos_rows = seq when one
   cos serves the whole batch). With x = (x1, x2) the two halves of a head,
   out = x * cos + (-x2, x1) * sin, as transformers' rotate_half computes it. The
   backward applies the transposed rotation: dx = g * cos + (g2 * sin2, -g1 * sin1). */

void rope_apply(const float *restrict x, const float *restrict cos, const float *restrict sin, float *restrict out,
                int64_t tokens, int64_t heads, int64_t d, int64_t cos_rows, int transpose, int threads) {
    const int64_t half = d / 2;
    PARALLEL(tokens, 4)
    for (int64_t t = 0; t < tokens; t++) {
        const float *restrict c = cos + (t % cos_rows) * d, *restrict s = sin + (t % cos_rows) * d;
        for (int64_t h = 0; h < heads; h++) {
            const float *restrict xh = x + (t * heads + h) * d;
            float *restrict o = out + (t * heads + h) * d;
            if (!transpose) {
#pragma omp simd
                for (int64_t j = 0; j < half; j++) {
                    o[j] = xh[j] * c[j] - xh[j + half] * s[j];
                    o[j + half] = xh[j + half] * c[j + half] + xh[j] * s[j + half];
                }
            } else {
#pragma omp simd
                for (int64_t j = 0; j < half; j++) {
                    o[j] = xh[j] * c[j] + xh[j + half] * s[j + half];
                    o[j + half] = xh[j + half] * c[j + half] - xh[j] * s[j];
                }
            }
        }
    }
}

/* ---- softmax cross-entropy, gradient in place --------------------------------------
   logits: [rows, vocab], one row at a time (a row of a 50k vocabulary fits in L2, so
   its three sweeps cost about one trip to memory): loss[i] = logsumexp(x) - x[y];
   with `grad`, x becomes (softmax(x) - onehot(y)) * scale. */

void softmax_xent(float *logits, const int64_t *target, float *loss, int64_t rows, int64_t v, float scale,
                  int grad, int threads) {
    PARALLEL(rows, 1)
    for (int64_t i = 0; i < rows; i++) {
        float *restrict x = logits + i * v;
        float m = -INFINITY;
#pragma omp simd reduction(max : m)
        for (int64_t j = 0; j < v; j++) m = x[j] > m ? x[j] : m;
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int64_t j = 0; j < v; j++) s += exp_vec(x[j] - m);
        const int64_t y = target[i];
        loss[i] = m + logf(s) - x[y];
        if (grad) {
            const float k = scale / s;
#pragma omp simd
            for (int64_t j = 0; j < v; j++) x[j] = exp_vec(x[j] - m) * k;
            x[y] -= scale;
        }
    }
}

/* ---- NF4 dequantization ------------------------------------------------------------
   packed[j] holds the 4-bit codes of elements 2j (high nibble) and 2j+1 (low);
   out[i] = code[nibble(i)] * absmax[i / block]. One pass writing the fp32 weight,
   where torch ops make an int64 index tensor, a gathered copy and a scaled copy. */

void nf4_dequantize(const uint8_t *restrict packed, const float *restrict code, const float *restrict absmax,
                    float *restrict out, int64_t numel, int64_t block, int threads) {
    const int64_t blocks = (numel + block - 1) / block;
    PARALLEL(blocks, 64)
    for (int64_t b = 0; b < blocks; b++) {
        const float s = absmax[b];
        const int64_t start = b * block, stop = start + block < numel ? start + block : numel;
        for (int64_t i = start; i < stop; i++) {
            const uint8_t byte = packed[i >> 1];
            out[i] = code[(i & 1) ? (byte & 0x0F) : (byte >> 4)] * s;
        }
    }
}
