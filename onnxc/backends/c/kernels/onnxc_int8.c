/* int8 kernels: quantize/dequantize, convolutions (any, depthwise, 1x1), dense and matrix
 * products with int32 accumulators and fixed-point requantization, pooling and Add/Mul.
 * See onnxc_int8.h for the number formats. */
#include "onnxc_int8.h"

/* ---- QuantizeLinear / DequantizeLinear ------------------------------------------------- */
void onnxc_quantize(const float *x, int8_t *y, const onnxc_quant_p *p)
{
    int32_t o, c, i;
    for (o = 0; o < p->outer; o++) {
        for (c = 0; c < p->len; c++) {
            float s = p->scale[c];
            int32_t zp = p->zp[c];
            for (i = 0; i < p->inner; i++) {
                *y++ = onnxc_clamp8(onnxc_round_s32(*x++ / s) + zp, p->lo, p->hi);
            }
        }
    }
}

void onnxc_dequantize(const int8_t *x, float *y, const onnxc_quant_p *p)
{
    int32_t o, c, i;
    for (o = 0; o < p->outer; o++) {
        for (c = 0; c < p->len; c++) {
            float s = p->scale[c];
            int32_t zp = p->zp[c];
            for (i = 0; i < p->inner; i++) *y++ = (float)((int32_t)*x++ - zp) * s;
        }
    }
}

void onnxc_dequantize_i32(const int32_t *x, float *y, const onnxc_quant_p *p)
{
    int32_t o, c, i;
    for (o = 0; o < p->outer; o++) {
        for (c = 0; c < p->len; c++) {
            float s = p->scale[c];
            int32_t zp = p->zp[c];
            for (i = 0; i < p->inner; i++) *y++ = (float)(*x++ - zp) * s;
        }
    }
}

void onnxc_u8_to_s8(const uint8_t *x, int8_t *y, int32_t n)
{
    int32_t i;
    for (i = 0; i < n; i++) y[i] = (int8_t)((int32_t)x[i] - 128);
}

void onnxc_s8_to_u8(const int8_t *x, uint8_t *y, int32_t n)
{
    int32_t i;
    for (i = 0; i < n; i++) y[i] = (uint8_t)((int32_t)x[i] + 128);
}

/* ---- convolution ----------------------------------------------------------------------- */

/* Taps t in [lo, hi) of a kernel of k taps (dilation d) whose input coordinate o0 + t * d lies
 * in [0, in). */
static void tap_range(int32_t o0, int32_t k, int32_t d, int32_t in, int32_t *lo, int32_t *hi)
{
    int32_t a = o0 < 0 ? (-o0 + d - 1) / d : 0;
    int32_t b = in - o0 <= 0 ? 0 : (in - o0 + d - 1) / d;
    if (b > k) b = k;
    if (a > b) a = b;
    *lo = a;
    *hi = b;
}

static int8_t requant_out(int32_t acc, const onnxc_qconv_p *p, int32_t m)
{
    return onnxc_clamp8(onnxc_requant(acc, p->rq[m]) + p->y_zp, p->lo, p->hi);
}

void onnxc_qconv2d(const int8_t *x, const int8_t *w, const int32_t *bias, int8_t *y, int32_t *y32,
                   const onnxc_qconv_p *p)
{
    int32_t cg = p->c / p->group, mg = p->m / p->group, ksize = p->kh * p->kw;
    int32_t in_plane = p->h * p->w, out_plane = p->oh * p->ow, wstride = cg * ksize;
    int32_t n, m, i, oh, ow, cc, kh, kw;
    for (n = 0; n < p->n; n++) {
        for (m = 0; m < p->m;) {
            int32_t g = m / mg, block = (m % mg + 4 <= mg) ? 4 : 1; /* 4 channels of one group at a time */
            const int8_t *xg = x + (n * p->c + g * cg) * in_plane;
            for (oh = 0; oh < p->oh; oh++) {
                int32_t ih0 = oh * p->sh - p->pt, kh_lo, kh_hi;
                tap_range(ih0, p->kh, p->dh, p->h, &kh_lo, &kh_hi);
                for (ow = 0; ow < p->ow; ow++) {
                    int32_t iw0 = ow * p->sw - p->pl, kw_lo, kw_hi, xsum = 0, out = oh * p->ow + ow;
                    int32_t acc[4] = {0, 0, 0, 0};
                    tap_range(iw0, p->kw, p->dw, p->w, &kw_lo, &kw_hi);
                    for (cc = 0; cc < cg; cc++) {
                        const int8_t *xp = xg + cc * in_plane + ih0 * p->w + iw0;
                        const int8_t *wp = w + (m * cg + cc) * ksize;
                        for (kh = kh_lo; kh < kh_hi; kh++) {
                            const int8_t *xr = xp + kh * p->dh * p->w;
                            const int8_t *wr = wp + kh * p->kw;
                            if (block == 4) {
                                for (kw = kw_lo; kw < kw_hi; kw++) {
                                    int32_t v = (int32_t)xr[kw * p->dw] - p->x_zp;
                                    xsum += v;
                                    acc[0] += v * wr[kw];
                                    acc[1] += v * wr[kw + wstride];
                                    acc[2] += v * wr[kw + 2 * wstride];
                                    acc[3] += v * wr[kw + 3 * wstride];
                                }
                            } else {
                                for (kw = kw_lo; kw < kw_hi; kw++) {
                                    int32_t v = (int32_t)xr[kw * p->dw] - p->x_zp;
                                    xsum += v;
                                    acc[0] += v * wr[kw];
                                }
                            }
                        }
                    }
                    for (i = 0; i < block; i++) {
                        int32_t a = acc[i] + (bias ? bias[m + i] : 0) - (p->w_zp ? p->w_zp[m + i] * xsum : 0);
                        if (y32) {
                            y32[(n * p->m + m + i) * out_plane + out] = a;
                        } else {
                            y[(n * p->m + m + i) * out_plane + out] = requant_out(a, p, m + i);
                        }
                    }
                }
            }
            m += block;
        }
    }
}

/* One depthwise output plane from one input plane. Interior pixels (every tap in bounds) fold
 * the input zero point into the bias; border pixels subtract it tap by tap. */
static void dw_plane(const int8_t *xp, const int8_t *wp, int32_t b, int8_t *yp, const onnxc_qconv_p *p, int32_t m)
{
    int32_t oh, ow, kh, kw, wsum = 0, ksize = p->kh * p->kw;
    for (kh = 0; kh < ksize; kh++) wsum += wp[kh];
    for (oh = 0; oh < p->oh; oh++) {
        int32_t ih0 = oh * p->sh - p->pt, kh_lo, kh_hi;
        tap_range(ih0, p->kh, p->dh, p->h, &kh_lo, &kh_hi);
        for (ow = 0; ow < p->ow; ow++) {
            int32_t iw0 = ow * p->sw - p->pl, kw_lo, kw_hi, acc = b;
            const int8_t *xo = xp + ih0 * p->w + iw0;
            tap_range(iw0, p->kw, p->dw, p->w, &kw_lo, &kw_hi);
            if (kh_hi - kh_lo == p->kh && kw_hi - kw_lo == p->kw) {
                acc -= p->x_zp * wsum;
                for (kh = 0; kh < p->kh; kh++) {
                    const int8_t *xr = xo + kh * p->dh * p->w, *wr = wp + kh * p->kw;
                    for (kw = 0; kw < p->kw; kw++) acc += xr[kw * p->dw] * wr[kw];
                }
            } else {
                for (kh = kh_lo; kh < kh_hi; kh++) {
                    const int8_t *xr = xo + kh * p->dh * p->w, *wr = wp + kh * p->kw;
                    for (kw = kw_lo; kw < kw_hi; kw++) acc += ((int32_t)xr[kw * p->dw] - p->x_zp) * wr[kw];
                }
            }
            *yp++ = requant_out(acc, p, m);
        }
    }
}

void onnxc_qconv_dw(const int8_t *x, const int8_t *w, const int32_t *bias, int8_t *y, const onnxc_qconv_p *p)
{
    int32_t plane, in_plane = p->h * p->w, out_plane = p->oh * p->ow, ksize = p->kh * p->kw;
    for (plane = 0; plane < p->n * p->c; plane++) {
        int32_t m = plane % p->c;
        dw_plane(x + plane * in_plane, w + m * ksize, bias ? bias[m] : 0, y + plane * out_plane, p, m);
    }
}

void onnxc_qconv_dw_inplace(int8_t *xy, const int8_t *w, const int32_t *bias, int8_t *scratch,
                            const onnxc_qconv_p *p)
{
    /* Output plane i ends where input plane i + 1 starts or before (oh * ow <= h * w): it only
     * overwrites consumed input planes and plane i, copied to scratch first. */
    int32_t plane, i, in_plane = p->h * p->w, out_plane = p->oh * p->ow, ksize = p->kh * p->kw;
    for (plane = 0; plane < p->n * p->c; plane++) {
        int32_t m = plane % p->c;
        const int8_t *xp = xy + plane * in_plane;
        for (i = 0; i < in_plane; i++) scratch[i] = xp[i];
        dw_plane(scratch, w + m * ksize, bias ? bias[m] : 0, xy + plane * out_plane, p, m);
    }
}

/* Dot products over k of 4 interleaved weight rows (w[k][4]) with two input columns x0[k * xs]
 * and x1[k * xs] (x1 == x0 + 1): acc[r] for column 0, acc[4 + r] for column 1. This is the
 * block a SIMD variant replaces. */
static void dot4x2(const int8_t *x, int32_t xs, const int8_t *w, int32_t k, int32_t *acc)
{
    int32_t a0 = acc[0], a1 = acc[1], a2 = acc[2], a3 = acc[3];
    int32_t b0 = acc[4], b1 = acc[5], b2 = acc[6], b3 = acc[7];
    const int8_t *end = w + 4 * k;
    while (w < end) {
        int32_t x0 = x[0], x1 = x[1], v;
        x += xs;
        v = w[0];
        a0 += x0 * v;
        b0 += x1 * v;
        v = w[1];
        a1 += x0 * v;
        b1 += x1 * v;
        v = w[2];
        a2 += x0 * v;
        b2 += x1 * v;
        v = w[3];
        a3 += x0 * v;
        b3 += x1 * v;
        w += 4;
    }
    acc[0] = a0, acc[1] = a1, acc[2] = a2, acc[3] = a3;
    acc[4] = b0, acc[5] = b1, acc[6] = b2, acc[7] = b3;
}

static void dot4x1(const int8_t *x, int32_t xs, const int8_t *w, int32_t k, int32_t *acc)
{
    int32_t a0 = acc[0], a1 = acc[1], a2 = acc[2], a3 = acc[3];
    const int8_t *end = w + 4 * k;
    while (w < end) {
        int32_t x0 = *x;
        x += xs;
        a0 += x0 * w[0];
        a1 += x0 * w[1];
        a2 += x0 * w[2];
        a3 += x0 * w[3];
        w += 4;
    }
    acc[0] = a0, acc[1] = a1, acc[2] = a2, acc[3] = a3;
}

static int32_t dot1(const int8_t *x, int32_t xs, const int8_t *w, int32_t k, int32_t acc)
{
    int32_t i;
    for (i = 0; i < k; i++) acc += x[i * xs] * w[i];
    return acc;
}

/* All m outputs of `cols` (1 or 2) adjacent pixels whose channels are x[c * xs] (+1): written
 * to y[m * ys] (+1). */
static void pointwise_cols(const int8_t *x, int32_t xs, int32_t cols, const int8_t *w, const int32_t *bias,
                           int8_t *y, int32_t ys, const onnxc_qconv_p *p)
{
    int32_t m, r;
    for (m = 0; m + 4 <= p->m; m += 4) {
        int32_t acc[8];
        const int8_t *wb = w + m * p->c;
        for (r = 0; r < 4; r++) acc[r] = acc[4 + r] = bias ? bias[m + r] : 0;
        if (cols == 2) {
            dot4x2(x, xs, wb, p->c, acc);
        } else {
            dot4x1(x, xs, wb, p->c, acc);
        }
        for (r = 0; r < 4; r++) {
            y[(m + r) * ys] = requant_out(acc[r], p, m + r);
            if (cols == 2) y[(m + r) * ys + 1] = requant_out(acc[4 + r], p, m + r);
        }
    }
    for (; m < p->m; m++) {
        const int8_t *wr = w + m * p->c;
        int32_t b = bias ? bias[m] : 0;
        for (r = 0; r < cols; r++) y[m * ys + r] = requant_out(dot1(x + r, xs, wr, p->c, b), p, m);
    }
}

void onnxc_qconv1x1(const int8_t *x, const int8_t *w, const int32_t *bias, int8_t *y, const onnxc_qconv_p *p)
{
    int32_t hw = p->h * p->w, n, px;
    for (n = 0; n < p->n; n++) {
        const int8_t *xn = x + n * p->c * hw;
        int8_t *yn = y + n * p->m * hw;
        for (px = 0; px < hw; px += 2) {
            pointwise_cols(xn + px, hw, px + 1 < hw ? 2 : 1, w, bias, yn + px, hw, p);
        }
    }
}

void onnxc_qconv1x1_inplace(int8_t *xy, const int8_t *w, const int32_t *bias, int8_t *scratch,
                            const onnxc_qconv_p *p)
{
    /* Two pixels at a time: gather their c inputs (interleaved), then write their m <= c
     * outputs, into slots whose inputs are already gathered (see onnxc_conv1x1_inplace). */
    int32_t hw = p->h * p->w, n, px, c;
    for (n = 0; n < p->n; n++) {
        const int8_t *xin = xy + n * p->c * hw;
        int8_t *yout = xy + n * p->m * hw;
        for (px = 0; px < hw; px += 2) {
            int32_t cols = px + 1 < hw ? 2 : 1;
            for (c = 0; c < p->c; c++) {
                scratch[2 * c] = xin[c * hw + px];
                scratch[2 * c + 1] = cols == 2 ? xin[c * hw + px + 1] : 0;
            }
            pointwise_cols(scratch, 2, cols, w, bias, yout + px, hw, p);
        }
    }
}

/* ---- matrix products ------------------------------------------------------------------- */
void onnxc_qdense(const int8_t *x, const int8_t *w, const int32_t *bias, int8_t *y, const onnxc_qdense_p *p)
{
    int32_t i, j, r;
    for (i = 0; i < p->m; i++) {
        const int8_t *xi = x + i * p->k;
        int8_t *yi = y + i * p->n;
        for (j = 0; j + 4 <= p->n; j += 4) {
            int32_t acc[4];
            for (r = 0; r < 4; r++) acc[r] = bias ? bias[j + r] : 0;
            dot4x1(xi, 1, w + j * p->k, p->k, acc);
            for (r = 0; r < 4; r++) {
                yi[j + r] = onnxc_clamp8(onnxc_requant(acc[r], p->rq[j + r]) + p->y_zp, p->lo,
                                         p->hi);
            }
        }
        for (; j < p->n; j++) {
            int32_t acc = dot1(xi, 1, w + j * p->k, p->k, bias ? bias[j] : 0);
            yi[j] = onnxc_clamp8(onnxc_requant(acc, p->rq[j]) + p->y_zp, p->lo, p->hi);
        }
    }
}

void onnxc_qmatmul(const int8_t *a, const int8_t *b, int8_t *y, int32_t *y32, const onnxc_qmatmul_p *p)
{
    int32_t bi, i, j, k;
    for (bi = 0; bi < p->batch; bi++) {
        const int8_t *ab = a + (p->a_off ? p->a_off[bi] : 0);
        const int8_t *bb = b + (p->b_off ? p->b_off[bi] : 0);
        int32_t base = bi * p->m * p->n;
        for (i = 0; i < p->m; i++) {
            for (j = 0; j < p->n; j++) {
                int32_t acc = 0;
                for (k = 0; k < p->k; k++) {
                    acc += ((int32_t)ab[i * p->k + k] - p->a_zp) * ((int32_t)bb[k * p->n + j] - p->b_zp);
                }
                if (y32) {
                    y32[base + i * p->n + j] = acc;
                } else {
                    y[base + i * p->n + j] =
                        onnxc_clamp8(onnxc_requant(acc, p->rq[j]) + p->y_zp, p->lo, p->hi);
                }
            }
        }
    }
}

/* ---- pooling and elementwise ----------------------------------------------------------- */
static int8_t rescale(float v, const onnxc_qrescale_p *q)
{
    return onnxc_clamp8(onnxc_round_s32(v * q->scale) + q->y_zp, q->lo, q->hi);
}

static int32_t taps_in(int32_t start, int32_t k, int32_t d, int32_t lo, int32_t hi)
{
    int32_t t, count = 0;
    for (t = 0; t < k; t++) {
        int32_t v = start + t * d;
        if (v >= lo && v < hi) count++;
    }
    return count;
}

void onnxc_qpool(const int8_t *x, int8_t *y, const onnxc_pool_p *p, const onnxc_qrescale_p *q)
{
    int32_t plane, od, oh, ow, td, th, tw;
    int32_t in_plane = p->id * p->ih * p->iw;
    for (plane = 0; plane < p->planes; plane++) {
        const int8_t *xp = x + plane * in_plane;
        for (od = 0; od < p->od; od++) {
            int32_t d0 = od * p->sd - p->pd;
            for (oh = 0; oh < p->oh; oh++) {
                int32_t h0 = oh * p->sh - p->ph;
                for (ow = 0; ow < p->ow; ow++) {
                    int32_t w0 = ow * p->sw - p->pw, count = 0, acc = p->is_max ? -128 : 0;
                    for (td = 0; td < p->kd; td++) {
                        int32_t d = d0 + td * p->dd;
                        if (d < 0 || d >= p->id) continue;
                        for (th = 0; th < p->kh; th++) {
                            int32_t h = h0 + th * p->dh;
                            const int8_t *xr;
                            if (h < 0 || h >= p->ih) continue;
                            xr = xp + (d * p->ih + h) * p->iw;
                            for (tw = 0; tw < p->kw; tw++) {
                                int32_t w = w0 + tw * p->dw;
                                if (w < 0 || w >= p->iw) continue;
                                if (p->is_max) {
                                    if (xr[w] > acc) acc = xr[w];
                                } else {
                                    acc += xr[w];
                                }
                                count++;
                            }
                        }
                    }
                    if (p->is_max) {
                        *y++ = rescale((float)(acc - q->x_zp), q);
                    } else {
                        int32_t div = count;
                        if (p->count_include_pad) {
                            div = taps_in(d0, p->kd, p->dd, -p->pd, p->id + p->ed)
                                * taps_in(h0, p->kh, p->dh, -p->ph, p->ih + p->eh)
                                * taps_in(w0, p->kw, p->dw, -p->pw, p->iw + p->ew);
                        }
                        /* padded taps hold the real value 0, i.e. x_zp */
                        *y++ = rescale(div > 0 ? (float)(acc - count * q->x_zp) / (float)div : 0.0f, q);
                    }
                }
            }
        }
    }
}

void onnxc_qglobal_pool(const int8_t *x, int8_t *y, int32_t planes, int32_t len, int32_t is_max,
                        const onnxc_qrescale_p *q)
{
    int32_t plane, i;
    for (plane = 0; plane < planes; plane++) {
        const int8_t *xp = x + plane * len;
        int32_t acc = is_max ? -128 : 0;
        for (i = 0; i < len; i++) {
            if (is_max) {
                if (xp[i] > acc) acc = xp[i];
            } else {
                acc += xp[i];
            }
        }
        y[plane] = rescale(is_max ? (float)(acc - q->x_zp) : (float)(acc - len * q->x_zp) / (float)len, q);
    }
}

void onnxc_qbinary(const int8_t *a, const int8_t *b, int8_t *y, const onnxc_qbinary_p *p)
{
    int32_t idx[ONNXC_MAXDIM] = {0};
    int32_t last = p->rank - 1, inner = p->dims[last], sa = p->sa[last], sb = p->sb[last];
    int32_t outer = 1, o, d, i;
    for (d = 0; d < last; d++) outer *= p->dims[d];
    for (o = 0; o < outer; o++) {
        int32_t oa = 0, ob = 0;
        for (d = 0; d < last; d++) {
            oa += idx[d] * p->sa[d];
            ob += idx[d] * p->sb[d];
        }
        for (i = 0; i < inner; i++) {
            float u = (float)((int32_t)a[oa + i * sa] - p->a_zp), v = (float)((int32_t)b[ob + i * sb] - p->b_zp);
            float r = p->op == ONNXC_BIN_MUL ? u * v * p->a_scale : u * p->a_scale + v * p->b_scale;
            *y++ = onnxc_clamp8(onnxc_round_s32(r) + p->y_zp, p->lo, p->hi);
        }
        for (d = last - 1; d >= 0; d--) { /* odometer over the outer dims */
            if (++idx[d] < p->dims[d]) break;
            idx[d] = 0;
        }
    }
}
