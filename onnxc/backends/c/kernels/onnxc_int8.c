/* int8 kernels: quantize/dequantize, the generic convolution and matrix product (weight zero
 * points, raw int32 sums) with int32 accumulators and onnxruntime's requantization, pooling and
 * Add/Mul. The fast convolutions and dense layers are in onnxc_qconv.c; see onnxc_int8.h for the
 * number formats. */
#include <string.h>

#include "onnxc_int8.h"

#if defined(__ARM_FEATURE_DSP) && defined(__GNUC__)
#include <arm_acle.h>
#define ONNXC_SIMD 1
#endif

/* ---- QuantizeLinear / DequantizeLinear ------------------------------------------------- */
void onnxc_quantize(const float *x, int8_t *y, const onnxc_quant_p *p)
{
    /* the parameters in locals: the int8 stores may alias them, which would reload each one per element */
    const int32_t outer = p->outer, len = p->len, inner = p->inner, lo = p->lo, hi = p->hi;
    int32_t o, c, i;
    for (o = 0; o < outer; o++) {
        for (c = 0; c < len; c++) {
            const float s = p->scale[c];
            const int32_t zp = p->zp[c];
            for (i = 0; i < inner; i++) *y++ = onnxc_clamp8(onnxc_round_s32(*x++ / s) + zp, lo, hi);
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
    return (int8_t)onnxc_requant(acc, p->scale[m], p->y_zp, p->lo, p->hi);
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
                    y[base + i * p->n + j] = (int8_t)onnxc_requant(acc, p->scale[j], p->y_zp, p->lo, p->hi);
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

/* The sum of n int8 values. With the DSP extension, 8 at a time: a word with its sign bits flipped
 * holds the values plus 128 as unsigned bytes, which USADA8 adds to the sum in one instruction
 * (exact: the same integer as the plain loop). */
static int32_t sum_s8(const int8_t *x, int32_t n)
{
    int32_t s = 0, i = 0;
#ifdef ONNXC_SIMD
    uint32_t u = 0, a, b;
    for (; i + 8 <= n; i += 8) {
        memcpy(&a, x + i, 4);
        memcpy(&b, x + i + 4, 4);
        u = __usada8(a ^ 0x80808080u, 0, u);
        u = __usada8(b ^ 0x80808080u, 0, u);
    }
    s = (int32_t)u - 128 * i;
#else
    for (; i + 4 <= n; i += 4) s += x[i] + x[i + 1] + x[i + 2] + x[i + 3];
#endif
    for (; i < n; i++) s += x[i];
    return s;
}

void onnxc_qglobal_pool(const int8_t *x, int8_t *y, int32_t planes, int32_t len, int32_t is_max,
                        const onnxc_qrescale_p *q)
{
    int32_t plane, i;
    for (plane = 0; plane < planes; plane++) {
        const int8_t *xp = x + plane * len;
        int32_t acc = -128;
        if (!is_max) { /* as QLinearGlobalAveragePool: the integer sum times x_scale / (y_scale * len) */
            y[plane] = (int8_t)onnxc_requant(sum_s8(xp, len) - len * q->x_zp, q->scale, q->y_zp, q->lo, q->hi);
            continue;
        }
        for (i = 0; i < len; i++) {
            if (xp[i] > acc) acc = xp[i];
        }
        y[plane] = rescale((float)(acc - q->x_zp), q);
    }
}

void onnxc_qbinary(const int8_t *a, const int8_t *b, int8_t *y, const onnxc_qbinary_p *p)
{
    int32_t idx[ONNXC_MAXDIM] = {0};
    int32_t last = p->rank - 1, inner = p->dims[last], sa = p->sa[last], sb = p->sb[last];
    int32_t outer = 1, o, d, i;
    /* the parameters in locals: the int8 stores may alias them, which would reload each one per element */
    const int32_t mul = p->op == ONNXC_BIN_MUL, AZ = p->a_zp, BZ = p->b_zp, YZ = p->y_zp, LO = p->lo, HI = p->hi;
    const float AS = p->a_scale, BS = p->b_scale;
    for (d = 0; d < last; d++) outer *= p->dims[d];
    for (o = 0; o < outer; o++) {
        int32_t oa = 0, ob = 0;
        for (d = 0; d < last; d++) {
            oa += idx[d] * p->sa[d];
            ob += idx[d] * p->sb[d];
        }
        const int8_t *ap = a + oa, *bp = b + ob;
        if (mul) {
            for (i = 0; i < inner; i++, ap += sa, bp += sb) {
                float u = (float)((int32_t)*ap - AZ), v = (float)((int32_t)*bp - BZ);
                *y++ = onnxc_clamp8(onnxc_round_s32(u * v * AS) + YZ, LO, HI);
            }
        } else {
            for (i = 0; i < inner; i++, ap += sa, bp += sb) {
                float u = (float)((int32_t)*ap - AZ), v = (float)((int32_t)*bp - BZ);
                *y++ = onnxc_clamp8(onnxc_round_s32(u * AS + v * BS) + YZ, LO, HI);
            }
        }
        for (d = last - 1; d >= 0; d--) { /* odometer over the outer dims */
            if (++idx[d] < p->dims[d]) break;
            idx[d] = 0;
        }
    }
}
