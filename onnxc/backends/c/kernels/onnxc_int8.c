/* int8 kernels: quantize/dequantize, convolutions (any, depthwise, 1x1), dense and matrix
 * products with int32 accumulators and fixed-point requantization, pooling and Add/Mul.
 * See onnxc_int8.h for the number formats. */
#include <string.h>

#include "onnxc_int8.h"

#ifdef __GNUC__
#define ONNXC_NOINLINE __attribute__((noinline))
#else
#define ONNXC_NOINLINE
#endif

/* onnxc_requant for shifts up to 32 (multipliers of 1/4 and more: rare), out of line so that the
 * common path stays small in the inner loops. */
static ONNXC_NOINLINE int32_t requant_wide(int32_t acc, int32_t rq)
{
    int32_t shift = rq & 63;
    int64_t v = (int64_t)acc * (rq - shift);
    return (int32_t)((v + ((int64_t)1 << (shift - 1)) - 1 + ((v >> shift) & 1)) >> shift);
}

/* round(acc * mult / 2^shift), ties to even, where rq packs a Q31 multiplier (its 25 high
 * bits) and the right shift in [1, 62] (its 6 low bits): one word per output channel. */
static inline int32_t onnxc_requant(int32_t acc, int32_t rq)
{
    int32_t shift = rq & 63, t, h, r;
    int64_t v;
    if (shift <= 32) return requant_wide(acc, rq);
    /* In 32-bit words (SMULL, then no 64-bit shifts): with half = 2^(shift - 1) a multiple of
     * 2^32 only the high word h of v + half changes; floor((v + half) / 2^shift) is h >> t, and a
     * tie (the low word and h's t low bits all zero) rounds down to even. */
    v = (int64_t)acc * (rq - shift);
    t = shift - 32, h = (int32_t)(v >> 32) + (1 << (t - 1)), r = h >> t;
    if ((((uint32_t)h << (32 - t)) | (uint32_t)v) == 0) r &= ~1;
    return r;
}

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
/* With the DSP extension (Cortex-M4) the inner loops multiply int16 pairs with SMLAD. */
#if defined(__ARM_FEATURE_DSP) && defined(__GNUC__)
#include <arm_acle.h>
#define ONNXC_SIMD 1
typedef uint32_t __attribute__((may_alias)) onnxc_word;
static inline uint32_t ld32(const void *q)
{
    uint32_t v;
    memcpy(&v, q, 4);
    return v;
}

static inline int32_t sxtb16_ror8(uint32_t v)
{
    int32_t r;
    __asm__("sxtb16 %0, %1, ror #8" : "=r"(r) : "r"(v));
    return r;
}

/* (lo, hi) as the two int16 halves of a word */
static inline int32_t pack16(int32_t lo, int32_t hi)
{
    return (int32_t)(((uint32_t)hi << 16) | ((uint32_t)lo & 0xFFFFu));
}
#endif

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

/* onnxc_requant with the word decoded once (per output channel) for the outputs that share it. */
typedef struct {
    int32_t rq, mult, t, half, lsh;
} rq_t;

static inline rq_t rq_decode(int32_t rq)
{
    rq_t q;
    int32_t shift = rq & 63;
    q.rq = rq, q.mult = rq - shift, q.t = shift - 32;
    q.half = q.t > 0 ? 1 << (q.t - 1) : 0, q.lsh = 32 - q.t;
    return q;
}

/* The common path (shift > 32, q.t > 0). */
static inline int32_t rq_fast(int32_t acc, rq_t q)
{
    int64_t v = (int64_t)acc * q.mult;
    int32_t h = (int32_t)(v >> 32) + q.half, r = h >> q.t;
    if ((((uint32_t)h << q.lsh) | (uint32_t)v) == 0) r &= ~1;
    return r;
}

/* y[i] = clamp(y_zp + requant(acc[i])) for the n outputs of one channel. */
static void requant_run(const int32_t *acc, int8_t *y, int32_t n, int32_t rq, const onnxc_qconv_p *p)
{
    const rq_t q = rq_decode(rq);
    const int32_t YZ = p->y_zp, LO = p->lo, HI = p->hi;
    int32_t i;
    if (q.t <= 0) {
        for (i = 0; i < n; i++) y[i] = onnxc_clamp8(requant_wide(acc[i], rq) + YZ, LO, HI);
        return;
    }
#ifdef ONNXC_SIMD
    if (LO == -128 && HI == 127) { /* saturation only: SSAT */
        for (i = 0; i < n; i++) y[i] = (int8_t)__ssat(rq_fast(acc[i], q) + YZ, 8);
        return;
    }
#endif
    for (i = 0; i < n; i++) y[i] = onnxc_clamp8(rq_fast(acc[i], q) + YZ, LO, HI);
}

/* The input plane's rows copied into the padded plane `pad` (whose border onnxc_qconv_dw filled
 * once with the input zero point, the real value 0), so that every window is whole and the zero
 * point folds into the bias. */
static void pad_plane(const int8_t *xp, int8_t *pad, int32_t HP, int32_t WP, const onnxc_qconv_p *p)
{
    const int32_t H = p->h, W = p->w, n = WP - p->pl < W ? WP - p->pl : W;
    const int32_t rows = HP - p->pt < H ? HP - p->pt : H;
    int32_t r;
    int8_t *row = pad + p->pt * WP + p->pl;
    if (n <= 0) return;
    for (r = 0; r < rows; r++, row += WP, xp += W) memcpy(row, xp, (size_t)n);
}

/* One depthwise output plane over the padded copy: the accumulators first (acc, oh * ow int32;
 * 3x3 windows of dilation 1 with the nine weights in locals and no bounds checks), then their
 * requantization in one tight loop. */
static void dw_plane(const int8_t *xp, const int8_t *wp, int32_t b, int8_t *yp, int8_t *pad, int32_t *acc,
                     const onnxc_qconv_p *p, int32_t m)
{
    const int32_t OH = p->oh, OW = p->ow, KH = p->kh, KW = p->kw, SH = p->sh, SW = p->sw;
    const int32_t DH = p->dh, DW = p->dw;
    const int32_t HP = (OH - 1) * SH + (KH - 1) * DH + 1, WP = (OW - 1) * SW + (KW - 1) * DW + 1;
    int32_t oh, ow, kh, kw, wsum = 0, base, *out = acc;
    pad_plane(xp, pad, HP, WP, p);
    for (kh = 0; kh < KH * KW; kh++) wsum += wp[kh];
    base = b - p->x_zp * wsum;
    if (KH == 3 && KW == 3 && DH == 1 && DW == 1) {
        const int32_t w0 = wp[0], w1 = wp[1], w2 = wp[2], w3 = wp[3], w4 = wp[4], w5 = wp[5], w6 = wp[6];
        const int32_t w7 = wp[7], w8 = wp[8];
        for (oh = 0; oh < OH; oh++) {
            const int8_t *x0 = pad + oh * SH * WP, *x1 = x0 + WP, *x2 = x1 + WP;
            ow = 0;
#ifdef ONNXC_SIMD
            if (SW == 1) { /* two outputs a row: x0 x2 | x1 x3 of each input row as int16 pairs */
                const int32_t e0 = pack16(w0, w2), e1 = pack16(w3, w5), e2 = pack16(w6, w8), m01 = pack16(w1, w4);
                for (; ow + 2 <= OW; ow += 2, x0 += 2, x1 += 2, x2 += 2, out += 2) {
                    uint32_t v = ld32(x0);
                    int32_t e = __sxtb16(v), o = sxtb16_ror8(v), a, c;
                    a = __smlabb(o, m01, __smlad(e, e0, base)), c = __smlatb(e, m01, __smlad(o, e0, base));
                    v = ld32(x1), e = __sxtb16(v), o = sxtb16_ror8(v);
                    a = __smlabt(o, m01, __smlad(e, e1, a)), c = __smlatt(e, m01, __smlad(o, e1, c));
                    v = ld32(x2), e = __sxtb16(v), o = sxtb16_ror8(v);
                    out[0] = __smlad(e, e2, a) + x2[1] * w7, out[1] = __smlad(o, e2, c) + x2[2] * w7;
                }
            }
#endif
            for (; ow < OW; ow++, x0 += SW, x1 += SW, x2 += SW) {
                *out++ = base + x0[0] * w0 + x0[1] * w1 + x0[2] * w2 + x1[0] * w3 + x1[1] * w4 + x1[2] * w5
                       + x2[0] * w6 + x2[1] * w7 + x2[2] * w8;
            }
        }
    } else {
        for (oh = 0; oh < OH; oh++) {
            const int8_t *xo = pad + oh * SH * WP;
            for (ow = 0; ow < OW; ow++, xo += SW) {
                int32_t a = base;
                for (kh = 0; kh < KH; kh++) {
                    const int8_t *xr = xo + kh * DH * WP, *wr = wp + kh * KW;
                    for (kw = 0; kw < KW; kw++) a += xr[kw * DW] * wr[kw];
                }
                *out++ = a;
            }
        }
    }
    requant_run(acc, yp, OH * OW, p->rq[m], p);
}

void onnxc_qconv_dw(const int8_t *x, const int8_t *w, const int32_t *bias, int8_t *y, int8_t *scratch,
                    const onnxc_qconv_p *p)
{
    int32_t plane, in_plane = p->h * p->w, out_plane = p->oh * p->ow, ksize = p->kh * p->kw;
    int32_t HP = (p->oh - 1) * p->sh + (p->kh - 1) * p->dh + 1, WP = (p->ow - 1) * p->sw + (p->kw - 1) * p->dw + 1;
    int32_t *acc = (int32_t *)(void *)(scratch + ((HP * WP + 3) & ~3));
    memset(scratch, p->x_zp, (size_t)(HP * WP)); /* the border; rows are copied per plane */
    for (plane = 0; plane < p->n * p->c; plane++) {
        int32_t m = plane % p->c;
        dw_plane(x + plane * in_plane, w + m * ksize, bias[m], y + plane * out_plane, scratch, acc, p, m);
    }
}

void onnxc_qconv_dw_inplace(int8_t *xy, const int8_t *w, const int32_t *bias, int8_t *scratch,
                            const onnxc_qconv_p *p)
{
    /* Output plane i ends where input plane i + 1 starts or before (oh * ow <= h * w): it only
     * overwrites consumed input planes and plane i, copied to scratch first. */
    onnxc_qconv_dw(xy, w, bias, xy, scratch, p);
}

/* ---- the GEMM core of the 1x1 and im2col convolutions ----------------------------------------
 * k is padded to kp (a multiple of 4) with zero weights. Weights: blocks of 4 rows as
 * [kp/4][4 rows][4 k] (one 32-bit word per row and 4 k), the m % 4 last rows plain [kp]. Two
 * columns (pixels) are gathered as int16, 4 k of one then 4 k of the other ([kp/4][2][4]), each
 * group in the order x0 x2 x1 x3: the pairs that SXTB16 makes of a weight word ((w0, w2) and,
 * rotated, (w1, w3)), so that with the DSP extension (Cortex-M4) each SMLAD does two
 * multiply-accumulates. */

/* Position of k index i within its group of 4 (see above): 1 and 2 swap. */
static inline int32_t col_pos(int32_t i)
{
    return (i & ~3) * 2 + ((i ^ (((i ^ (i >> 1)) & 1) * 3)) & 3);
}

/* Rows 0 and 1 of a block of 4 (w: 4 bytes apart, groups of 4 k every 16 bytes) x two columns
 * over kq groups: acc = {row 0 col 0, row 0 col 1, row 1 col 0, row 1 col 1}. */
static void dot2x2(const int16_t *c, const int8_t *w, int32_t kq, int32_t *acc)
{
    int32_t a0 = acc[0], a1 = acc[1], b0 = acc[2], b1 = acc[3];
    const int16_t *end = c + 8 * kq;
    for (; c != end; c += 8, w += 16) {
#ifdef ONNXC_SIMD
        const onnxc_word *cw = (const onnxc_word *)(const void *)c; /* 8-byte groups, word aligned */
        uint32_t x0a = cw[0], x0b = cw[1], x1a = cw[2], x1b = cw[3], u = ld32(w);
        int32_t e = __sxtb16(u), o = sxtb16_ror8(u);
        a0 = __smlad(x0b, o, __smlad(x0a, e, a0)), a1 = __smlad(x1b, o, __smlad(x1a, e, a1));
        u = ld32(w + 4), e = __sxtb16(u), o = sxtb16_ror8(u);
        b0 = __smlad(x0b, o, __smlad(x0a, e, b0)), b1 = __smlad(x1b, o, __smlad(x1a, e, b1));
#else
#define ONNXC_DOT4(x, q) ((x)[0] * (q)[0] + (x)[1] * (q)[2] + (x)[2] * (q)[1] + (x)[3] * (q)[3])
        a0 += ONNXC_DOT4(c, w), a1 += ONNXC_DOT4(c + 4, w);
        b0 += ONNXC_DOT4(c, w + 4), b1 += ONNXC_DOT4(c + 4, w + 4);
#undef ONNXC_DOT4
#endif
    }
    acc[0] = a0, acc[1] = a1, acc[2] = b0, acc[3] = b1;
}

/* One plain row (groups of 4 k every 4 bytes) x two columns. */
static void dot1x2(const int16_t *c, const int8_t *w, int32_t kq, int32_t *acc)
{
    int32_t a0 = acc[0], a1 = acc[1];
    for (; kq > 0; kq--, c += 8, w += 4) {
        a0 += c[0] * w[0] + c[1] * w[2] + c[2] * w[1] + c[3] * w[3];
        a1 += c[4] * w[0] + c[5] * w[2] + c[6] * w[1] + c[7] * w[3];
    }
    acc[0] = a0, acc[1] = a1;
}

/* All m outputs of two columns: their sums into acc ([m][2] int32), then requantized row by row
 * to y[row * ys] and y[row * ys + 1] (ncols 1: the first only). */
static void gemm_cols(const int16_t *cols, int32_t ncols, int32_t kp, int32_t m, const int8_t *w,
                      const int32_t *bias, const int32_t *rq, int8_t *y, int32_t ys, int32_t *acc,
                      const onnxc_qconv_p *p)
{
    const int32_t kq = kp / 4, YZ = p->y_zp, LO = p->lo, HI = p->hi;
    int32_t row;
    for (row = 0; row < (m & ~3); row += 2) {
        int32_t *a = acc + 2 * row;
        a[0] = a[1] = bias[row], a[2] = a[3] = bias[row + 1];
        dot2x2(cols, w + (row & ~3) * kp + (row & 3) * 4, kq, a);
    }
    for (; row < m; row++) {
        int32_t *a = acc + 2 * row;
        a[0] = a[1] = bias[row];
        dot1x2(cols, w + row * kp, kq, a);
    }
#ifdef ONNXC_SIMD
    if (LO == -128 && HI == 127) { /* saturation only: SSAT */
        for (row = 0; row < m; row++, y += ys, acc += 2) {
            const rq_t q = rq_decode(rq[row]);
            if (q.t <= 0) {
                y[0] = (int8_t)__ssat(requant_wide(acc[0], q.rq) + YZ, 8);
                if (ncols == 2) y[1] = (int8_t)__ssat(requant_wide(acc[1], q.rq) + YZ, 8);
            } else {
                y[0] = (int8_t)__ssat(rq_fast(acc[0], q) + YZ, 8);
                if (ncols == 2) y[1] = (int8_t)__ssat(rq_fast(acc[1], q) + YZ, 8);
            }
        }
        return;
    }
#endif
    for (row = 0; row < m; row++, y += ys, acc += 2) {
        y[0] = onnxc_clamp8(onnxc_requant(acc[0], rq[row]) + YZ, LO, HI);
        if (ncols == 2) y[1] = onnxc_clamp8(onnxc_requant(acc[1], rq[row]) + YZ, LO, HI);
    }
}

/* Two pixels at a time: their c channels gathered into scratch (two columns), then all m
 * outputs. In place (m <= c), output slot (m, pixel) is input slot (m, pixel) of the same image
 * or of an earlier one, already gathered. */
static void pointwise(const int8_t *x, const int8_t *w, const int32_t *bias, int8_t *y, int8_t *scratch,
                      const onnxc_qconv_p *p)
{
    const int32_t hw = p->h * p->w, C = p->c, M = p->m, kp = (C + 3) & ~3;
    int16_t *cols = (int16_t *)(void *)scratch;
    int32_t *acc = (int32_t *)(void *)(cols + 2 * kp);
    int32_t n, px, c;
    for (c = C; c < kp; c++) cols[col_pos(c)] = cols[col_pos(c) + 4] = 0;
    for (n = 0; n < p->n; n++) {
        const int8_t *xin = x + n * C * hw;
        int8_t *yout = y + n * M * hw;
        for (px = 0; px < hw; px += 2) {
            int32_t ncols = px + 1 < hw ? 2 : 1;
            const int8_t *xc = xin + px;
            int16_t *col = cols;
            if (ncols == 2) {
                for (c = 0; c + 4 <= C; c += 4, xc += 4 * hw, col += 8) {
                    col[0] = xc[0], col[1] = xc[2 * hw], col[2] = xc[hw], col[3] = xc[3 * hw];
                    col[4] = xc[1], col[5] = xc[2 * hw + 1], col[6] = xc[hw + 1], col[7] = xc[3 * hw + 1];
                }
            } else {
                for (c = 0; c + 4 <= C; c += 4, xc += 4 * hw, col += 8) {
                    col[0] = xc[0], col[1] = xc[2 * hw], col[2] = xc[hw], col[3] = xc[3 * hw];
                }
            }
            for (; c < C; c++, xc += hw) {
                cols[col_pos(c)] = xc[0];
                if (ncols == 2) cols[col_pos(c) + 4] = xc[1];
            }
            gemm_cols(cols, ncols, kp, M, w, bias, p->rq, yout + px, hw, acc, p);
        }
    }
}

void onnxc_qconv1x1(const int8_t *x, const int8_t *w, const int32_t *bias, int8_t *y, int8_t *scratch,
                    const onnxc_qconv_p *p)
{
    pointwise(x, w, bias, y, scratch, p);
}

void onnxc_qconv1x1_inplace(int8_t *xy, const int8_t *w, const int32_t *bias, int8_t *scratch,
                            const onnxc_qconv_p *p)
{
    pointwise(xy, w, bias, xy, scratch, p);
}

/* Any convolution through im2col: for two output pixels at a time, each group's c/g * kh * kw
 * window values (the input zero point where the window leaves the input, so that every tap
 * counts and -x_zp * sum(w) folds into the bias) are gathered into two columns, then multiplied
 * by the group's weight rows. */
void onnxc_qconv2d_im2col(const int8_t *x, const int8_t *w, const int32_t *bias, int8_t *y, int8_t *scratch,
                          const onnxc_qconv_p *p)
{
    const int32_t H = p->h, W = p->w, KH = p->kh, KW = p->kw, cg = p->c / p->group, mg = p->m / p->group;
    const int32_t k = cg * KH * KW, kp = (k + 3) & ~3, out_plane = p->oh * p->ow, XZ = p->x_zp;
    int16_t *cols = (int16_t *)(void *)scratch;
    int32_t *acc = (int32_t *)(void *)(cols + 2 * kp);
    int32_t n, g, px, j, i, cc, kh, kw;
    for (j = 0; j < 2; j++) {
        for (i = k; i < kp; i++) cols[4 * j + col_pos(i)] = 0;
    }
    for (n = 0; n < p->n; n++) {
        for (g = 0; g < p->group; g++) {
            const int8_t *xg = x + (n * p->c + g * cg) * H * W;
            int8_t *yg = y + (n * p->m + g * mg) * out_plane;
            for (px = 0; px < out_plane; px += 2) {
                int32_t ncols = px + 1 < out_plane ? 2 : 1;
                for (j = 0; j < ncols; j++) {
                    int32_t o = px + j, oh = o / p->ow, ow = o % p->ow;
                    int32_t ih0 = oh * p->sh - p->pt, iw0 = ow * p->sw - p->pl;
                    int16_t *col = cols + 4 * j;
                    i = 0;
                    for (cc = 0; cc < cg; cc++) {
                        const int8_t *xc = xg + cc * H * W;
                        for (kh = 0; kh < KH; kh++) {
                            int32_t ih = ih0 + kh * p->dh;
                            int32_t row_in = ih >= 0 && ih < H;
                            const int8_t *xr = xc + (row_in ? ih * W : 0);
                            for (kw = 0; kw < KW; kw++, i++) {
                                int32_t iw = iw0 + kw * p->dw;
                                col[col_pos(i)] = (row_in && iw >= 0 && iw < W) ? xr[iw] : XZ;
                            }
                        }
                    }
                }
                gemm_cols(cols, ncols, kp, mg, w + g * mg * kp, bias + g * mg, p->rq + g * mg, yg + px, out_plane,
                          acc, p);
            }
        }
    }
}

/* Dot products of x[k] with 4 interleaved weight rows (w[k][4]), and with one plain row. */
static void dot4x1(const int8_t *x, const int8_t *w, int32_t k, int32_t *acc)
{
    int32_t a0 = acc[0], a1 = acc[1], a2 = acc[2], a3 = acc[3];
    for (; k > 0; k--) {
        int32_t v = *x++;
        a0 += v * w[0];
        a1 += v * w[1];
        a2 += v * w[2];
        a3 += v * w[3];
        w += 4;
    }
    acc[0] = a0, acc[1] = a1, acc[2] = a2, acc[3] = a3;
}

static int32_t dot1(const int8_t *x, const int8_t *w, int32_t k, int32_t acc)
{
    int32_t i;
    for (i = 0; i < k; i++) acc += x[i] * w[i];
    return acc;
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
            dot4x1(xi, w + j * p->k, p->k, acc);
            for (r = 0; r < 4; r++) {
                yi[j + r] = onnxc_clamp8(onnxc_requant(acc[r], p->rq[j + r]) + p->y_zp, p->lo,
                                         p->hi);
            }
        }
        for (; j < p->n; j++) {
            int32_t acc = dot1(xi, w + j * p->k, p->k, bias ? bias[j] : 0);
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
