/* Normalizations: softmax / log-softmax along one axis, per-channel affine (a standalone
 * BatchNormalization, folded to scale and shift at export time) and local response
 * normalization across channels. */
#include <math.h>

#include "onnxc_kernels.h"

void onnxc_softmax(const float *x, float *y, int32_t outer, int32_t len, int32_t inner, int32_t log)
{
    /* In place is fine: every pass reads x[k] before (or without) writing y[k]. */
    int32_t o, i, k;
    for (o = 0; o < outer; o++) {
        for (i = 0; i < inner; i++) {
            const float *xr = x + o * len * inner + i;
            float *yr = y + o * len * inner + i;
            float mx = xr[0], sum = 0.0f;
            for (k = 1; k < len; k++) {
                if (xr[k * inner] > mx) mx = xr[k * inner];
            }
            if (log) {
                float ls;
                for (k = 0; k < len; k++) sum += expf(xr[k * inner] - mx);
                ls = logf(sum);
                for (k = 0; k < len; k++) yr[k * inner] = (xr[k * inner] - mx) - ls;
            } else {
                for (k = 0; k < len; k++) {
                    float e = expf(xr[k * inner] - mx);
                    yr[k * inner] = e;
                    sum += e;
                }
                for (k = 0; k < len; k++) yr[k * inner] /= sum;
            }
        }
    }
}

void onnxc_channel_affine(const float *x, float *y, int32_t n, int32_t c, int32_t inner,
                          const float *scale, const float *shift)
{
    int32_t b, ch, i;
    for (b = 0; b < n; b++) {
        for (ch = 0; ch < c; ch++) {
            const float *xp = x + (b * c + ch) * inner;
            float *yp = y + (b * c + ch) * inner;
            float s = scale[ch], t = shift[ch];
            for (i = 0; i < inner; i++) yp[i] = xp[i] * s + t;
        }
    }
}

void onnxc_lrn(const float *x, float *y, int32_t n, int32_t c, int32_t inner, int32_t size,
               float alpha, float beta, float bias)
{
    /* y = x / (bias + alpha / size * sum of x^2 over channels [ch - (size-1)/2, ch + size/2])^beta */
    int32_t b, ch, i, j;
    int32_t before = (size - 1) / 2, after = size / 2;
    for (b = 0; b < n; b++) {
        const float *xb = x + b * c * inner;
        float *yb = y + b * c * inner;
        for (ch = 0; ch < c; ch++) {
            int32_t lo = ch - before < 0 ? 0 : ch - before;
            int32_t hi = ch + after >= c ? c - 1 : ch + after;
            for (i = 0; i < inner; i++) {
                float sq = 0.0f;
                for (j = lo; j <= hi; j++) sq += xb[j * inner + i] * xb[j * inner + i];
                yb[ch * inner + i] = xb[ch * inner + i] / powf(bias + alpha / (float)size * sq, beta);
            }
        }
    }
}
