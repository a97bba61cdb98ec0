/* 2-D convolution (1-D runs with h = kh = 1), grouped and depthwise, with a fused activation.
 *
 * Loop order suits a cache-less MCU: one output plane at a time, weight-stationary. For each
 * (input channel, kernel tap) one weight is fetched (from flash, dense or clustered) and
 * multiply-added over the range of output pixels whose input is in bounds, computed once per
 * tap, so the inner loop has no padding tests and streams through SRAM. */
#include "onnxc_kernels.h"

/* Output index range [lo, hi) whose input coordinate o * s - pad + off lies in [0, in). */
static void valid_range(int32_t in, int32_t out, int32_t s, int32_t pad, int32_t off, int32_t *lo, int32_t *hi)
{
    int32_t first = pad - off;          /* need o * s >= first */
    int32_t last = in - 1 + pad - off;  /* need o * s <= last */
    *lo = first <= 0 ? 0 : (first + s - 1) / s;
    *hi = last < 0 ? 0 : last / s + 1;
    if (*hi > out) *hi = out;
    if (*lo > *hi) *lo = *hi;
}

/* Accumulate one input plane's contribution to one output plane. */
static void accumulate_plane(const float *xp, const onnxc_weight *w, int32_t m, int32_t wbase, float *yp,
                             const onnxc_conv_p *p)
{
    int32_t kh, kw, oh, ow;
    for (kh = 0; kh < p->kh; kh++) {
        int32_t oh_lo, oh_hi;
        valid_range(p->h, p->oh, p->sh, p->pt, kh * p->dh, &oh_lo, &oh_hi);
        for (kw = 0; kw < p->kw; kw++) {
            int32_t ow_lo, ow_hi;
            float wv = onnxc_weight_at(w, m, wbase + kh * p->kw + kw);
            valid_range(p->w, p->ow, p->sw, p->pl, kw * p->dw, &ow_lo, &ow_hi);
            for (oh = oh_lo; oh < oh_hi; oh++) {
                const float *xr = xp + (oh * p->sh - p->pt + kh * p->dh) * p->w - p->pl + kw * p->dw;
                float *yr = yp + oh * p->ow;
                if (p->sw == 1) {
                    for (ow = ow_lo; ow < ow_hi; ow++) yr[ow] += wv * xr[ow];
                } else {
                    for (ow = ow_lo; ow < ow_hi; ow++) yr[ow] += wv * xr[ow * p->sw];
                }
            }
        }
    }
}

/* The same for four output planes at once (output channels m..m+3 of one group): each input
 * value is loaded once for four multiply-adds. */
static void accumulate_plane4(const float *xp, const onnxc_weight *w, int32_t m, int32_t wbase, int32_t wstride,
                              float *yp, int32_t ystride, const onnxc_conv_p *p)
{
    int32_t kh, kw, oh, ow;
    for (kh = 0; kh < p->kh; kh++) {
        int32_t oh_lo, oh_hi;
        valid_range(p->h, p->oh, p->sh, p->pt, kh * p->dh, &oh_lo, &oh_hi);
        for (kw = 0; kw < p->kw; kw++) {
            int32_t ow_lo, ow_hi, tap = wbase + kh * p->kw + kw;
            float w0 = onnxc_weight_at(w, m, tap);
            float w1 = onnxc_weight_at(w, m + 1, tap + wstride);
            float w2 = onnxc_weight_at(w, m + 2, tap + 2 * wstride);
            float w3 = onnxc_weight_at(w, m + 3, tap + 3 * wstride);
            valid_range(p->w, p->ow, p->sw, p->pl, kw * p->dw, &ow_lo, &ow_hi);
            for (oh = oh_lo; oh < oh_hi; oh++) {
                const float *xr = xp + (oh * p->sh - p->pt + kh * p->dh) * p->w - p->pl + kw * p->dw;
                float *y0 = yp + oh * p->ow, *y1 = y0 + ystride, *y2 = y1 + ystride, *y3 = y2 + ystride;
                for (ow = ow_lo; ow < ow_hi; ow++) {
                    float v = xr[ow * p->sw];
                    y0[ow] += w0 * v;
                    y1[ow] += w1 * v;
                    y2[ow] += w2 * v;
                    y3[ow] += w3 * v;
                }
            }
        }
    }
}

static void init_plane(float *yp, int32_t size, const float *bias, int32_t m)
{
    int32_t i;
    float b = bias ? bias[m] : 0.0f;
    for (i = 0; i < size; i++) yp[i] = b;
}

void onnxc_conv2d(const float *x, const onnxc_weight *w, const float *bias, float *y, const onnxc_conv_p *p)
{
    int32_t cg = p->c / p->group, mg = p->m / p->group, ksize = p->kh * p->kw;
    int32_t in_plane = p->h * p->w, out_plane = p->oh * p->ow;
    int32_t n, m, cc, i;
    for (n = 0; n < p->n; n++) {
        for (m = 0; m < p->m;) {
            int32_t g = m / mg, block = (m % mg + 4 <= mg) ? 4 : 1; /* 4 channels of one group at a time */
            float *yp = y + (n * p->m + m) * out_plane;
            for (i = 0; i < block; i++) init_plane(yp + i * out_plane, out_plane, bias, m + i);
            for (cc = 0; cc < cg; cc++) {
                const float *xp = x + (n * p->c + g * cg + cc) * in_plane;
                if (block == 4) {
                    accumulate_plane4(xp, w, m, (m * cg + cc) * ksize, cg * ksize, yp, out_plane, p);
                } else {
                    accumulate_plane(xp, w, m, (m * cg + cc) * ksize, yp, p);
                }
            }
            onnxc_act_apply(yp, block * out_plane, p->act, p->act_a, p->act_b);
            m += block;
        }
    }
}

void onnxc_conv_transpose2d(const float *x, const onnxc_weight *w, const float *bias, float *y,
                            const onnxc_conv_p *p)
{
    int32_t cg = p->c / p->group, mg = p->m / p->group, ksize = p->kh * p->kw;
    int32_t in_plane = p->h * p->w, out_plane = p->oh * p->ow;
    int32_t n, m, cc, kh, kw, ih, iw;
    for (n = 0; n < p->n; n++) {
        for (m = 0; m < p->m; m++) {
            int32_t g = m / mg;
            float *yp = y + (n * p->m + m) * out_plane;
            init_plane(yp, out_plane, bias, m);
            for (cc = 0; cc < cg; cc++) {
                const float *xp = x + (n * p->c + g * cg + cc) * in_plane;
                for (kh = 0; kh < p->kh; kh++) {
                    int32_t ih_lo, ih_hi;
                    valid_range(p->oh, p->h, p->sh, p->pt, kh * p->dh, &ih_lo, &ih_hi);
                    for (kw = 0; kw < p->kw; kw++) {
                        int32_t iw_lo, iw_hi;
                        float wv = onnxc_weight_at(w, m, (m * cg + cc) * ksize + kh * p->kw + kw);
                        valid_range(p->ow, p->w, p->sw, p->pl, kw * p->dw, &iw_lo, &iw_hi);
                        for (ih = ih_lo; ih < ih_hi; ih++) {
                            float *yr = yp + (ih * p->sh - p->pt + kh * p->dh) * p->ow - p->pl + kw * p->dw;
                            const float *xr = xp + ih * p->w;
                            for (iw = iw_lo; iw < iw_hi; iw++) yr[iw * p->sw] += wv * xr[iw];
                        }
                    }
                }
            }
            onnxc_act_apply(yp, out_plane, p->act, p->act_a, p->act_b);
        }
    }
}

void onnxc_conv1x1_inplace(float *xy, const onnxc_weight *w, const float *bias, float *scratch,
                           const onnxc_conv_p *p)
{
    /* Pixel by pixel: gather the pixel's c inputs, then write its m <= c outputs. Output slot
     * (m, pixel) is input slot (m, pixel) of the same image or of an earlier one, all consumed. */
    int32_t hw = p->h * p->w, n, px, c, m;
    for (n = 0; n < p->n; n++) {
        const float *xin = xy + n * p->c * hw;
        float *yout = xy + n * p->m * hw;
        for (px = 0; px < hw; px++) {
            for (c = 0; c < p->c; c++) scratch[c] = xin[c * hw + px];
            for (m = 0; m < p->m; m++) {
                float acc = onnxc_weight_dot(w, m, m * p->c, scratch, p->c, bias ? bias[m] : 0.0f);
                yout[m * hw + px] = onnxc_act(acc, p->act, p->act_a, p->act_b);
            }
        }
    }
}
