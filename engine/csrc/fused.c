/* Fused fp32 elementwise kernels for CPU training (engine/fused.py loads them).

   Each kernel reads its inputs and writes its outputs once, where the same math in
   torch ops makes one full pass over memory per op. These ops are memory-bound, so
   the passes are the time. Plain C, no torch headers: gcc builds this file in about
   a second; rows (or elements) are split over `threads` OpenMP threads.

   rms_norm:  y = w * x * rstd,  rstd = 1 / sqrt(mean(x^2) + eps)     (per row)
   swiglu:    h = silu(g) * u,   silu(g) = g * sigmoid(g)
*/
#include <math.h>
#include <stddef.h>
#include <stdint.h>

typedef void (*range_fn)(void *args, int64_t begin, int64_t end);

/* fn over [0, n) split into `threads` contiguous ranges on OpenMP threads. The
   library links libgomp.so.1 and is loaded after torch, so these are torch's own
   OpenMP threads (one pool, no oversubscription of the cores). */
static void parallel_for(range_fn fn, void *args, int64_t n, int threads, int64_t grain) {
    if (threads > 1 && n / threads < grain) threads = (int)(n / grain);
    if (threads <= 1) {
        fn(args, 0, n);
        return;
    }
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int t = 0; t < threads; t++) {
        const int64_t step = (n + threads - 1) / threads, b = t * step, e = b + step < n ? b + step : n;
        if (b < e) fn(args, b, e);
    }
}

/* ---- RMSNorm ------------------------------------------------------------------ */

typedef struct {
    const float *x, *w;
    float *y, *rstd;
    int64_t cols;
    float eps;
} rms_fwd_t;

static void rms_fwd_rows(void *p, int64_t begin, int64_t end) {
    const rms_fwd_t *a = (const rms_fwd_t *)p;
    const int64_t d = a->cols;
    for (int64_t i = begin; i < end; i++) {
        const float *restrict x = a->x + i * d, *restrict w = a->w;
        float *restrict y = a->y + i * d;
        float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (int64_t j = 0; j < d; j++) ss += x[j] * x[j];
        const float r = 1.0f / sqrtf(ss / (float)d + a->eps);
        a->rstd[i] = r;
#pragma omp simd
        for (int64_t j = 0; j < d; j++) y[j] = w[j] * (x[j] * r);
    }
}

void rms_norm_forward(const float *x, const float *w, float *y, float *rstd, int64_t rows, int64_t cols,
                      float eps, int threads) {
    rms_fwd_t a = {x, w, y, rstd, cols, eps};
    parallel_for(rms_fwd_rows, &a, rows, threads, 8);
}

typedef struct {
    const float *g, *x, *w, *rstd;
    float *dx;
    int64_t cols;
} rms_bwd_t;

/* dx = rstd * (g*w) - x * rstd^3 * mean(g*w*x) */
static void rms_bwd_rows(void *p, int64_t begin, int64_t end) {
    const rms_bwd_t *a = (const rms_bwd_t *)p;
    const int64_t d = a->cols;
    for (int64_t i = begin; i < end; i++) {
        const float *restrict g = a->g + i * d, *restrict x = a->x + i * d, *restrict w = a->w;
        float *restrict dx = a->dx + i * d;
        const float r = a->rstd[i];
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t j = 0; j < d; j++) dot += g[j] * w[j] * x[j];
        const float c = dot * r * r * r / (float)d;
#pragma omp simd
        for (int64_t j = 0; j < d; j++) dx[j] = r * (g[j] * w[j]) - x[j] * c;
    }
}

void rms_norm_backward(const float *g, const float *x, const float *w, const float *rstd, float *dx,
                       int64_t rows, int64_t cols, int threads) {
    rms_bwd_t a = {g, x, w, rstd, dx, cols};
    parallel_for(rms_bwd_rows, &a, rows, threads, 8);
}

/* ---- SwiGLU product ------------------------------------------------------------- */

typedef struct {
    const float *g, *u, *dh;
    float *h, *dg, *du;
} swiglu_t;

/* exp(x) in a form the compiler vectorizes (libm's expf is a scalar call):
   x = n ln2 + r with n an integer and |r| <= ln2/2, exp(r) by Cephes' degree-6 polynomial for expf
   (relative error ~1e-7), 2^n by writing the exponent bits. Inputs are clamped to
   +-88, where exp is still finite in fp32; NaN stays NaN. */
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

static void swiglu_fwd_range(void *p, int64_t begin, int64_t end) {
    const swiglu_t *a = (const swiglu_t *)p;
    const float *restrict g = a->g, *restrict u = a->u;
    float *restrict h = a->h;
#pragma omp simd
    for (int64_t i = begin; i < end; i++) h[i] = g[i] * sigmoidf_(g[i]) * u[i];
}

void swiglu_forward(const float *g, const float *u, float *h, int64_t n, int threads) {
    swiglu_t a = {g, u, NULL, h, NULL, NULL};
    parallel_for(swiglu_fwd_range, &a, n, threads, 4096);
}

/* d/dg silu(g) = s * (1 + g * (1 - s)), s = sigmoid(g); dg or du may be NULL */
static void swiglu_bwd_range(void *p, int64_t begin, int64_t end) {
    const swiglu_t *a = (const swiglu_t *)p;
    const float *restrict g = a->g, *restrict u = a->u, *restrict dh = a->dh;
    float *restrict dg = a->dg, *restrict du = a->du;
    if (dg && du) {
#pragma omp simd
        for (int64_t i = begin; i < end; i++) {
            const float s = sigmoidf_(g[i]);
            du[i] = dh[i] * g[i] * s;
            dg[i] = dh[i] * u[i] * s * (1.0f + g[i] * (1.0f - s));
        }
    } else if (dg) {
#pragma omp simd
        for (int64_t i = begin; i < end; i++) {
            const float s = sigmoidf_(g[i]);
            dg[i] = dh[i] * u[i] * s * (1.0f + g[i] * (1.0f - s));
        }
    } else if (du) {
#pragma omp simd
        for (int64_t i = begin; i < end; i++) du[i] = dh[i] * g[i] * sigmoidf_(g[i]);
    }
}

void swiglu_backward(const float *dh, const float *g, const float *u, float *dg, float *du, int64_t n,
                     int threads) {
    swiglu_t a = {g, u, dh, NULL, dg, du};
    parallel_for(swiglu_bwd_range, &a, n, threads, 4096);
}

/* ---- rotary position embedding ---------------------------------------------------
   x: [tokens, heads, dim] (the projection's output before the head transpose),
   cos, sin: [cos_rows, dim], token t using row t % cos_rows (cos_rows = seq when one
   cos serves the whole batch). With x = (x1, x2) the two halves of a head,
   out = x * cos + (-x2, x1) * sin, as transformers' rotate_half computes it. The
   backward applies the transposed rotation: dx = g * cos + (g2 * sin2, -g1 * sin1). */

typedef struct {
    const float *x, *cos, *sin;
    float *out;
    int64_t heads, dim, cos_rows;
    int transpose;
} rope_t;

static void rope_rows(void *p, int64_t begin, int64_t end) {
    const rope_t *a = (const rope_t *)p;
    const int64_t d = a->dim, half = d / 2;
    for (int64_t t = begin; t < end; t++) {
        const int64_t row = t % a->cos_rows;
        const float *restrict c = a->cos + row * d, *restrict s = a->sin + row * d;
        for (int64_t h = 0; h < a->heads; h++) {
            const float *restrict x = a->x + (t * a->heads + h) * d;
            float *restrict o = a->out + (t * a->heads + h) * d;
            if (!a->transpose) {
#pragma omp simd
                for (int64_t j = 0; j < half; j++) {
                    o[j] = x[j] * c[j] - x[j + half] * s[j];
                    o[j + half] = x[j + half] * c[j + half] + x[j] * s[j + half];
                }
            } else {
#pragma omp simd
                for (int64_t j = 0; j < half; j++) {
                    o[j] = x[j] * c[j] + x[j + half] * s[j + half];
                    o[j + half] = x[j + half] * c[j + half] - x[j] * s[j];
                }
            }
        }
    }
}

void rope_apply(const float *x, const float *cos, const float *sin, float *out, int64_t tokens, int64_t heads,
                int64_t dim, int64_t cos_rows, int transpose, int threads) {
    rope_t a = {x, cos, sin, out, heads, dim, cos_rows, transpose};
    parallel_for(rope_rows, &a, tokens, threads, 4);
}

/* ---- softmax cross-entropy, gradient in place --------------------------------------
   logits: [rows, vocab], one row at a time (a row of a 50k vocabulary fits in L2, so
   its three sweeps cost about one trip to memory): loss[i] = logsumexp(x) - x[y];
   with `grad`, x becomes (softmax(x) - onehot(y)) * scale. */

typedef struct {
    float *logits;
    const int64_t *target;
    float *loss;
    int64_t vocab;
    float scale;
    int grad;
} xent_t;

static void xent_rows(void *p, int64_t begin, int64_t end) {
    const xent_t *a = (const xent_t *)p;
    const int64_t v = a->vocab;
    for (int64_t i = begin; i < end; i++) {
        float *restrict x = a->logits + i * v;
        float m = -INFINITY;
#pragma omp simd reduction(max : m)
        for (int64_t j = 0; j < v; j++) m = x[j] > m ? x[j] : m;
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int64_t j = 0; j < v; j++) s += exp_vec(x[j] - m);
        const int64_t y = a->target[i];
        a->loss[i] = m + logf(s) - x[y];
        if (a->grad) {
            const float k = a->scale / s;
#pragma omp simd
            for (int64_t j = 0; j < v; j++) x[j] = exp_vec(x[j] - m) * k;
            x[y] -= a->scale;
        }
    }
}

void softmax_xent(float *logits, const int64_t *target, float *loss, int64_t rows, int64_t vocab, float scale,
                  int grad, int threads) {
    xent_t a = {logits, target, loss, vocab, scale, grad};
    parallel_for(xent_rows, &a, rows, threads, 1);
}

/* ---- NF4 dequantization ------------------------------------------------------------
   packed[j] holds the 4-bit codes of elements 2j (high nibble) and 2j+1 (low);
   out[i] = code[nibble(i)] * absmax[i / block]. One pass writing the fp32 weight,
   where torch ops make an int64 index tensor, a gathered copy and a scaled copy. */

typedef struct {
    const uint8_t *packed;
    const float *code, *absmax;
    float *out;
    int64_t numel, block;
} nf4_t;

static void nf4_blocks(void *p, int64_t begin, int64_t end) {
    const nf4_t *a = (const nf4_t *)p;
    float table[16];
    for (int k = 0; k < 16; k++) table[k] = a->code[k];
    for (int64_t b = begin; b < end; b++) {
        const float s = a->absmax[b];
        const int64_t start = b * a->block, stop = start + a->block < a->numel ? start + a->block : a->numel;
        for (int64_t i = start; i < stop; i++) {
            const uint8_t byte = a->packed[i >> 1];
            a->out[i] = table[(i & 1) ? (byte & 0x0F) : (byte >> 4)] * s;
        }
    }
}

void nf4_dequantize(const uint8_t *packed, const float *code, const float *absmax, float *out, int64_t numel,
                    int64_t block, int threads) {
    nf4_t a = {packed, code, absmax, out, numel, block};
    parallel_for(nf4_blocks, &a, (numel + block - 1) / block, threads, 64);
}
