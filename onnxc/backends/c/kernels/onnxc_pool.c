/* Max and average pooling over 1 to 3 spatial dims (missing dims have size 1), with padding,
 * dilation and ceil-mode outputs, plus global pooling. Semantics follow onnxruntime: an average
 * divides by the in-bounds count, or with count_include_pad by the window clipped to the padded
 * input. */
#include "onnxc_kernels.h"

/* Number of window taps t in [0, k) whose coordinate start + t * d falls in [lo, hi). */
static int32_t taps_in(int32_t start, int32_t k, int32_t d, int32_t lo, int32_t hi)
{
    int32_t t, count = 0;
    for (t = 0; t < k; t++) {
        int32_t v = start + t * d;
        if (v >= lo && v < hi) count++;
    }
    return count;
}

void onnxc_pool(const float *x, float *y, const onnxc_pool_p *p)
{
    int32_t plane, od, oh, ow, td, th, tw;
    int32_t in_plane = p->id * p->ih * p->iw;
    for (plane = 0; plane < p->planes; plane++) {
        const float *xp = x + plane * in_plane;
        for (od = 0; od < p->od; od++) {
            int32_t d0 = od * p->sd - p->pd;
            for (oh = 0; oh < p->oh; oh++) {
                int32_t h0 = oh * p->sh - p->ph;
                for (ow = 0; ow < p->ow; ow++) {
                    int32_t w0 = ow * p->sw - p->pw, count = 0;
                    float acc = p->is_max ? -3.402823466e+38f : 0.0f;
                    for (td = 0; td < p->kd; td++) {
                        int32_t d = d0 + td * p->dd;
                        if (d < 0 || d >= p->id) continue;
                        for (th = 0; th < p->kh; th++) {
                            int32_t h = h0 + th * p->dh;
                            const float *xr;
                            if (h < 0 || h >= p->ih) continue;
                            xr = xp + (d * p->ih + h) * p->iw;
                            for (tw = 0; tw < p->kw; tw++) {
                                int32_t w = w0 + tw * p->dw;
                                float v;
                                if (w < 0 || w >= p->iw) continue;
                                v = xr[w];
                                if (p->is_max) {
                                    if (v > acc || v != v) acc = v;
                                } else {
                                    acc += v;
                                }
                                count++;
                            }
                        }
                    }
                    if (!p->is_max) {
                        if (p->count_include_pad) {
                            count = taps_in(d0, p->kd, p->dd, -p->pd, p->id + p->ed)
                                  * taps_in(h0, p->kh, p->dh, -p->ph, p->ih + p->eh)
                                  * taps_in(w0, p->kw, p->dw, -p->pw, p->iw + p->ew);
                        }
                        acc = count > 0 ? acc / (float)count : 0.0f;
                    }
                    *y++ = acc;
                }
            }
        }
    }
}

void onnxc_global_pool(const float *x, float *y, int32_t planes, int32_t len, int32_t is_max)
{
    int32_t plane, i;
    for (plane = 0; plane < planes; plane++) {
        const float *xp = x + plane * len;
        float acc = is_max ? xp[0] : 0.0f;
        for (i = 0; i < len; i++) {
            if (is_max) {
                if (xp[i] > acc || xp[i] != xp[i]) acc = xp[i];
            } else {
                acc += xp[i];
            }
        }
        y[plane] = is_max ? acc : acc / (float)len;
    }
}
