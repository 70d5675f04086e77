/* The 8-bit AdamW step on CPU, one pass per block (engine/optim.py loads it).

   Per block of `block` values: dequantize both moments from their codes and absmax
   (table lookup), run the fp32 AdamW update of the parameter (decoupled weight decay,
   bias correction; same order of operations as engine/optim.py's torch path), then
   quantize the new moments against their new absmax to the nearest code (a bucket
   table on the float's top bits, then one or two comparisons; no stochastic rounding). Blocks are split over
   `threads` OpenMP threads (torch's pool: the library is loaded after torch). */
#include <math.h>
#include <stdint.h>

#define MAXB 4096

/* Nearest code of a in [0, 1] among vals[0..n) (the code's non-negative values, which
   increase with the code). start[] maps the top 16 bits of a's float to the largest
   code at or below that bucket's first value; a bucket holds at most one code value,
   so a couple of steps up find the pair around a. */
static inline int nearest(float a, const float *vals, int n, const uint8_t *start) {
    union { float f; uint32_t u; } bits = { a };
    int i = start[bits.u >> 16];
    while (i + 1 < n && vals[i + 1] <= a) i++;
    if (i + 1 < n && vals[i + 1] - a < a - vals[i]) i++;
    return i;
}

void adam8bit_step(float *param, const float *grad, uint8_t *m_code, float *m_absmax, uint8_t *v_code,
                   float *v_absmax, int64_t n, int64_t block,
                   const float *m_map, const uint8_t *m_start, const float *v_map, const uint8_t *v_start,
                   float lr, float b1, float b2, float eps, float wd, float step_size, float bc2_sqrt,
                   int threads) {
    const int64_t nb = (n + block - 1) / block;
#pragma omp parallel for num_threads(threads) schedule(static) if (nb >= 4)
    for (int64_t b = 0; b < nb; b++) {
        float m[MAXB], v[MAXB];
        const int64_t lo = b * block, len = (lo + block <= n) ? block : n - lo;
        const float ma = m_absmax[b], va = v_absmax[b];
        float mmax = 0.0f, vmax = 0.0f;
        for (int64_t i = 0; i < len; i++) {
            const float g = grad[lo + i];
            float mi = m_map[m_code[lo + i]] * ma, vi = v_map[v_code[lo + i]] * va;
            mi = mi * b1 + g * (1.0f - b1);
            vi = vi * b2 + g * g * (1.0f - b2);
            float w = param[lo + i];
            if (wd != 0.0f) w *= 1.0f - lr * wd;
            w -= step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
            param[lo + i] = w;
            m[i] = mi;
            v[i] = vi;
            const float am = fabsf(mi);
            mmax = am > mmax ? am : mmax;
            vmax = vi > vmax ? vi : vmax;
        }
        const float mi_inv = mmax > 0.0f ? 1.0f / mmax : 0.0f, vi_inv = vmax > 0.0f ? 1.0f / vmax : 0.0f;
        for (int64_t i = 0; i < len; i++) {
            const float y = m[i] * mi_inv;
            const int c = nearest(fabsf(y), m_map, 128, m_start);     /* signed: magnitude, then the sign bit */
            m_code[lo + i] = (uint8_t)((y < 0.0f && c) ? (c | 0x80) : c);
            v_code[lo + i] = (uint8_t)nearest(v[i] * vi_inv, v_map, 256, v_start);
        }
        m_absmax[b] = mmax;
        v_absmax[b] = vmax;
    }
}
