/* int8 fast kernels: depthwise, 1x1 and im2col convolutions and dense layers. Each reads its
 * per output channel table `ch` (bias and requantization, packed or in pairs) and requantizes
 * inside its loop; see onnxc_int8.h for the number formats. Portable C99, with the inner loops
 * in DSP-extension instructions (SXTB16, SMLAD) on a Cortex-M4: the same integer sums. */
#include <string.h>

#include "onnxc_int8.h"

#ifdef __GNUC__
#define ONNXC_NOINLINE __attribute__((noinline))
#define ONNXC_INLINE inline __attribute__((always_inline))
#else
#define ONNXC_NOINLINE
#define ONNXC_INLINE inline
#endif

#if defined(__ARM_FEATURE_DSP) && defined(__GNUC__)
#include <arm_acle.h>
#define ONNXC_SIMD 1
#if defined(__OPTIMIZE__) && defined(ONNXC_FP_RQ) /* (without optimization the depthwise pairs' 13 registers may not be free) */
#define ONNXC_DW_ASM 1
#endif
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

/* ---- per output channel parameters ------------------------------------------------------- */
typedef struct {
    int32_t pk_bias, pk_delta, pk_mant, pk_exp; /* the table's form (onnxc_int8.h) */
    int32_t zp, lo, hi, sat;                    /* output zero point and clamp; sat: clamp is [-128, 127] */
} chan_fmt;

static inline chan_fmt fmt_of(int32_t pk_bias, int32_t pk_delta, int32_t pk_mant, int32_t pk_exp, int32_t zp,
                              int32_t lo, int32_t hi)
{
    chan_fmt f;
    f.pk_bias = pk_bias, f.pk_delta = pk_delta, f.pk_mant = pk_mant, f.pk_exp = pk_exp;
    f.zp = zp, f.lo = lo, f.hi = hi, f.sat = lo == -128 && hi == 127;
    return f;
}

static inline int32_t ch_bias(const int32_t *ch, int32_t c, const chan_fmt *f)
{
    return f->pk_bias ? ch[c] >> (32 - f->pk_bias) : ch[2 * c];
}

static inline float ch_scale(const int32_t *ch, int32_t c, const chan_fmt *f)
{
    uint32_t bits;
    float s;
    if (f->pk_bias) {
        const uint32_t w = (uint32_t)ch[c];
        bits = ((uint32_t)(f->pk_exp + (int32_t)(w & ((1u << f->pk_delta) - 1u))) << 23)
               | (((w << f->pk_bias) >> (32 - f->pk_mant)) << (23 - f->pk_mant));
    } else {
        bits = (uint32_t)ch[2 * c + 1];
    }
    memcpy(&s, &bits, 4);
    return s;
}

/* One output, any clamp. */
static inline int8_t out8(int32_t acc, float s, const chan_fmt *f)
{
    return (int8_t)onnxc_requant(acc, s, f->zp, f->lo, f->hi);
}

/* One output with the clamp [-128, 127]: on the Cortex-M4 VCVTR's int32, QADD of the zero point
 * and SSAT. */
static inline int8_t out8_sat(int32_t acc, float s, int32_t zp)
{
#if defined(ONNXC_FP_RQ) && defined(ONNXC_SIMD)
    return (int8_t)__ssat(__qadd(onnxc_rq_round(acc, s), zp), 8);
#else
    return (int8_t)onnxc_requant(acc, s, zp, -128, 127);
#endif
}

/* ---- depthwise ----------------------------------------------------------------------------- */
/* The input plane's rows copied into the padded plane `pad` (whose border onnxc_qconv_dw filled
 * once with the input zero point, the real value 0), so that every window is whole and the zero
 * point folds into the bias. Rows are copied a word at a time, unaligned (a memcpy call per row
 * costs more than a short row, and copies the padded plane's unaligned rows a byte at a time). */
static void pad_plane(const int8_t *xp, int8_t *pad, int32_t HP, int32_t WP, const onnxc_qconv_p *p)
{
    const int32_t H = p->h, W = p->w, n = WP - p->pl < W ? WP - p->pl : W;
    const int32_t rows = HP - p->pt < H ? HP - p->pt : H;
    int32_t r, i;
    int8_t *row = pad + p->pt * WP + p->pl;
    if (n <= 0) return;
    for (r = 0; r < rows; r++, row += WP, xp += W) {
        for (i = 0; i + 8 <= n; i += 8) memcpy(row + i, xp + i, 4), memcpy(row + i + 4, xp + i + 4, 4);
        for (; i + 4 <= n; i += 4) memcpy(row + i, xp + i, 4);
        for (; i < n; i++) row[i] = xp[i];
    }
}

#ifdef ONNXC_SIMD
/* Two outputs of a 3x3 stride-1 window row pair: x0 x2 | x1 x3 of each input row as int16 pairs
 * (SXTB16), weights packed as (w0, w2), (w3, w5), (w6, w8), (w1, w4) and w7. */
static ONNXC_INLINE void dw3x3_pair(const int8_t *x0, int32_t WP, int32_t base, int32_t e0, int32_t e1, int32_t e2,
                                    int32_t m01, int32_t w7, int32_t *pa, int32_t *pb)
{
    uint32_t v = ld32(x0);
    int32_t e = __sxtb16(v), o = sxtb16_ror8(v), a, b;
    a = __smlabb(o, m01, __smlad(e, e0, base)), b = __smlatb(e, m01, __smlad(o, e0, base));
    v = ld32(x0 + WP), e = __sxtb16(v), o = sxtb16_ror8(v);
    a = __smlabt(o, m01, __smlad(e, e1, a)), b = __smlatt(e, m01, __smlad(o, e1, b));
    v = ld32(x0 + 2 * WP), e = __sxtb16(v), o = sxtb16_ror8(v);
    *pa = __smlabb(o, w7, __smlad(e, e2, a)), *pb = __smlatb(e, w7, __smlad(o, e2, b));
}

/* One output row of a 3x3 stride-1 depthwise layer, two outputs a step; an odd last output is
 * the second of a pair one to the left. sat: the clamp is [-128, 127] (a constant where inlined). */
#ifdef ONNXC_DW_ASM
/* The bias, requantization and end of a row of dw3x3_pairs_sat, read from memory in its loop. */
typedef struct {
    int32_t base, zp;
    float scale;
    const int8_t *yend;
} dw_row_prm;

/* The pairs of a row (at least one) with the clamp [-128, 127], in 41 instructions a pair: the
 * nine weights and the row pointers in twelve registers (which compiled C would spill), the scale
 * in an FPU register, the rest from `r` on the stack. */
static ONNXC_INLINE void dw3x3_pairs_sat(const int8_t *x, int32_t wp, int8_t *y, const dw_row_prm *r, int32_t e0,
                                          int32_t e1, int32_t e2, int32_t m01, int32_t w7)
{
    int32_t a, b, v, e;
    __asm__ volatile("1:\n\t"
                     "ldr %[a], %[base]\n\t"
                     "mov %[b], %[a]\n\t"
                     "ldr %[v], [%[x]]\n\t"
                     "sxtb16 %[e], %[v]\n\t"
                     "sxtb16 %[v], %[v], ror #8\n\t"
                     "smlad %[a], %[e], %[e0], %[a]\n\t"
                     "smlabb %[a], %[v], %[m01], %[a]\n\t"
                     "smlad %[b], %[v], %[e0], %[b]\n\t"
                     "smlatb %[b], %[e], %[m01], %[b]\n\t"
                     "ldr %[v], [%[x], %[wp]]\n\t"
                     "sxtb16 %[e], %[v]\n\t"
                     "sxtb16 %[v], %[v], ror #8\n\t"
                     "smlad %[a], %[e], %[e1], %[a]\n\t"
                     "smlabt %[a], %[v], %[m01], %[a]\n\t"
                     "smlad %[b], %[v], %[e1], %[b]\n\t"
                     "smlatt %[b], %[e], %[m01], %[b]\n\t"
                     "ldr %[v], [%[x], %[wp], lsl #1]\n\t"
                     "sxtb16 %[e], %[v]\n\t"
                     "sxtb16 %[v], %[v], ror #8\n\t"
                     "smlad %[a], %[e], %[e2], %[a]\n\t"
                     "smlabb %[a], %[v], %[w7], %[a]\n\t"
                     "smlad %[b], %[v], %[e2], %[b]\n\t"
                     "smlatb %[b], %[e], %[w7], %[b]\n\t"
                     "vmov s14, s15, %[a], %[b]\n\t"
                     "vcvt.f32.s32 s14, s14\n\t"
                     "vcvt.f32.s32 s15, s15\n\t"
                     "vmul.f32 s14, s14, %[sc]\n\t"
                     "vmul.f32 s15, s15, %[sc]\n\t"
                     "vcvtr.s32.f32 s14, s14\n\t"
                     "vcvtr.s32.f32 s15, s15\n\t"
                     "vmov %[a], %[b], s14, s15\n\t"
                     "ldr %[v], %[zp]\n\t"
                     "qadd %[a], %[a], %[v]\n\t"
                     "qadd %[b], %[b], %[v]\n\t"
                     "ssat %[a], #8, %[a]\n\t"
                     "ssat %[b], #8, %[b]\n\t"
                     "strb %[a], [%[y]], #1\n\t"
                     "strb %[b], [%[y]], #1\n\t"
                     "adds %[x], %[x], #2\n\t"
                     "ldr %[v], %[yend]\n\t"
                     "cmp %[y], %[v]\n\t"
                     "bne 1b\n\t"
                     : [x] "+r"(x), [y] "+r"(y), [a] "=&r"(a), [b] "=&r"(b), [v] "=&r"(v), [e] "=&r"(e)
                     : [wp] "r"(wp), [e0] "r"(e0), [e1] "r"(e1), [e2] "r"(e2), [m01] "r"(m01), [w7] "r"(w7),
                       [sc] "t"(r->scale), [base] "m"(r->base), [zp] "m"(r->zp), [yend] "m"(r->yend)
                     : "cc", "memory", "s14", "s15");
}
#endif

static ONNXC_INLINE void dw3x3_row(const int8_t *x0, int32_t WP, int8_t *yr, int32_t OW, int32_t base, int32_t e0,
                                   int32_t e1, int32_t e2, int32_t m01, int32_t w7, float s, const chan_fmt *f,
                                   const int32_t sat)
{
    const int8_t *end = x0 + (OW & ~1);
    int32_t a, b;
    for (; x0 != end; x0 += 2, yr += 2) {
        dw3x3_pair(x0, WP, base, e0, e1, e2, m01, w7, &a, &b);
        if (sat) {
            yr[0] = out8_sat(a, s, f->zp), yr[1] = out8_sat(b, s, f->zp);
        } else {
            yr[0] = out8(a, s, f), yr[1] = out8(b, s, f);
        }
    }
    if (OW & 1) {
        dw3x3_pair(x0 - 1, WP, base, e0, e1, e2, m01, w7, &a, &b);
        yr[0] = sat ? out8_sat(b, s, f->zp) : out8(b, s, f);
    }
}
#endif

#ifdef ONNXC_DW_ASM
/* All rows of a 3x3 stride-1 plane with the clamp [-128, 127] (OW >= 2): the pairs in assembly,
 * an odd last output as the second of a pair one to the left. */
static ONNXC_NOINLINE void dw3x3_plane_sat(const int8_t *x0, int32_t WP, int8_t *yr, int32_t OH, int32_t OW,
                                           const dw_row_prm *prm, int32_t e0, int32_t e1, int32_t e2, int32_t m01,
                                           int32_t w7)
{
    const int32_t even = OW & ~1;
    int32_t oh, a, b;
    dw_row_prm r = *prm; /* on the stack: the loop reads it sp-relative */
    for (oh = 0; oh < OH; oh++, x0 += WP, yr += OW) {
        r.yend = yr + even;
        dw3x3_pairs_sat(x0, WP, yr, &r, e0, e1, e2, m01, w7);
        if (OW & 1) {
            dw3x3_pair(x0 + even - 1, WP, r.base, e0, e1, e2, m01, w7, &a, &b);
            yr[even] = out8_sat(b, r.scale, r.zp);
        }
    }
}
#endif

/* One depthwise output plane (channel c) over the padded copy: 3x3 windows of dilation 1 with
 * the nine weights in locals, no bounds checks, with the DSP extension two outputs per step at
 * stride 1, one (three words of three SXTB16 pairs) at stride 2; each output requantized as it is
 * made. */
static void dw_plane(const int8_t *xp, const int8_t *wp, const int32_t *ch, int32_t c, int8_t *yp, int8_t *pad,
                     const onnxc_qconv_p *p, const chan_fmt *f)
{
    const int32_t OH = p->oh, OW = p->ow, KH = p->kh, KW = p->kw, SH = p->sh, SW = p->sw;
    const int32_t DH = p->dh, DW = p->dw;
    const int32_t HP = (OH - 1) * SH + (KH - 1) * DH + 1, WP = (OW - 1) * SW + (KW - 1) * DW + 1;
    const float s = ch_scale(ch, c, f);
    int32_t oh, ow, kh, kw, wsum = 0, base;
    pad_plane(xp, pad, HP, WP, p);
    for (kh = 0; kh < KH * KW; kh++) wsum += wp[kh];
    base = ch_bias(ch, c, f) - p->x_zp * wsum;
    if (KH == 3 && KW == 3 && DH == 1 && DW == 1) {
        const int32_t w0 = wp[0], w1 = wp[1], w2 = wp[2], w3 = wp[3], w4 = wp[4], w5 = wp[5], w6 = wp[6];
        const int32_t w7 = wp[7], w8 = wp[8];
#ifdef ONNXC_SIMD
        if (SW == 1 && OW >= 2) {
            const int32_t e0 = pack16(w0, w2), e1 = pack16(w3, w5), e2 = pack16(w6, w8), m01 = pack16(w1, w4);
#ifdef ONNXC_DW_ASM
            if (f->sat) {
                dw_row_prm prm;
                prm.base = base, prm.zp = f->zp, prm.scale = s;
                dw3x3_plane_sat(pad, WP, yp, OH, OW, &prm, e0, e1, e2, m01, w7);
                return;
            }
#endif
            for (oh = 0; oh < OH; oh++) {
                if (f->sat) {
                    dw3x3_row(pad + oh * SH * WP, WP, yp + oh * OW, OW, base, e0, e1, e2, m01, w7, s, f, 1);
                } else {
                    dw3x3_row(pad + oh * SH * WP, WP, yp + oh * OW, OW, base, e0, e1, e2, m01, w7, s, f, 0);
                }
            }
            return;
        }
        if (SW == 2) { /* one output a step; the last of a row below (its word would pass the row) */
            const int32_t e0 = pack16(w0, w2), e1 = pack16(w3, w5), e2 = pack16(w6, w8), m01 = pack16(w1, w4);
            for (oh = 0; oh < OH; oh++) {
                const int8_t *x0 = pad + oh * SH * WP, *end = x0 + 2 * (OW - 1);
                int8_t *yr = yp + oh * OW;
                for (; x0 != end; x0 += 2) {
                    uint32_t v = ld32(x0);
                    int32_t a = __smlabb(sxtb16_ror8(v), m01, __smlad(__sxtb16(v), e0, base));
                    v = ld32(x0 + WP);
                    a = __smlabt(sxtb16_ror8(v), m01, __smlad(__sxtb16(v), e1, a));
                    v = ld32(x0 + 2 * WP);
                    a = __smlabb(sxtb16_ror8(v), w7, __smlad(__sxtb16(v), e2, a));
                    *yr++ = f->sat ? out8_sat(a, s, f->zp) : out8(a, s, f);
                }
                *yr = out8(base + x0[0] * w0 + x0[1] * w1 + x0[2] * w2 + x0[WP] * w3 + x0[WP + 1] * w4
                           + x0[WP + 2] * w5 + x0[2 * WP] * w6 + x0[2 * WP + 1] * w7 + x0[2 * WP + 2] * w8, s, f);
            }
            return;
        }
#endif
        for (oh = 0; oh < OH; oh++) {
            const int8_t *x0 = pad + oh * SH * WP, *x1 = x0 + WP, *x2 = x1 + WP;
            for (ow = 0; ow < OW; ow++, x0 += SW, x1 += SW, x2 += SW) {
                *yp++ = out8(base + x0[0] * w0 + x0[1] * w1 + x0[2] * w2 + x1[0] * w3 + x1[1] * w4 + x1[2] * w5
                             + x2[0] * w6 + x2[1] * w7 + x2[2] * w8, s, f);
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
                *yp++ = out8(a, s, f);
            }
        }
    }
}

void onnxc_qconv_dw(const int8_t *x, const int8_t *w, const int32_t *ch, int8_t *y, int8_t *scratch,
                    const onnxc_qconv_p *p)
{
    const chan_fmt f = fmt_of(p->pk_bias, p->pk_delta, p->pk_mant, p->pk_exp, p->y_zp, p->lo, p->hi);
    int32_t plane, in_plane = p->h * p->w, out_plane = p->oh * p->ow, ksize = p->kh * p->kw;
    int32_t HP = (p->oh - 1) * p->sh + (p->kh - 1) * p->dh + 1, WP = (p->ow - 1) * p->sw + (p->kw - 1) * p->dw + 1;
    memset(scratch, p->x_zp, (size_t)(HP * WP)); /* the border; rows are copied per plane */
    for (plane = 0; plane < p->n * p->c; plane++) {
        int32_t m = plane % p->c;
        dw_plane(x + plane * in_plane, w + m * ksize, ch, m, y + plane * out_plane, scratch, p, &f);
    }
}

void onnxc_qconv_dw_inplace(int8_t *xy, const int8_t *w, const int32_t *ch, int8_t *scratch,
                            const onnxc_qconv_p *p)
{
    /* Output plane i ends where input plane i + 1 starts or before (oh * ow <= h * w): it only
     * overwrites consumed input planes and plane i, copied to scratch first. */
    onnxc_qconv_dw(xy, w, ch, xy, scratch, p);
}

/* ---- the GEMM core of the 1x1 and im2col convolutions ----------------------------------------
 * Four output pixels at a time: their k input values are gathered as int16 minus the input zero
 * point into four columns, interleaved by groups of 4 k ([kp/4][4 columns][k0 k2 k1 k3], k padded
 * to kp, a multiple of 4, with zeros), then each output channel's row of weights ([m][kp], in k
 * order) is multiplied by the four columns. With the DSP extension, SXTB16 makes the pairs
 * (k0, k2) and (k1, k3) of a weight word, as it makes them of an input word (im2col widens its
 * windows so), and each SMLAD does two multiply-accumulates with a column word: a weight word
 * serves four pixels (17 instructions for 16 multiply-accumulates). */

/* Position of k index i in column 0 (column j: 4 * j further): k0 k2 k1 k3 in each group. */
static inline int32_t col_pos(int32_t i)
{
    return (i & ~3) * 4 + ((i & 1) << 1) + ((i >> 1) & 1);
}

/* One row of weights (w, kq groups of 4) times the four columns, added to s[0..3]. */
static inline void dot1x4(const int16_t *c, const int8_t *w, int32_t kq, int32_t *s)
{
#ifdef ONNXC_SIMD
    int32_t s0 = s[0], s1 = s[1], s2 = s[2], s3 = s[3];
    uint32_t xa, xb, u, o;
    if (kq <= 0) return;
    __asm__ volatile("1:\n\t"
                     "ldr %[u], [%[w]], #4\n\t"
                     "sxtb16 %[o], %[u], ror #8\n\t"
                     "sxtb16 %[u], %[u]\n\t"
                     "ldrd %[xa], %[xb], [%[c]], #8\n\t"
                     "smlad %[s0], %[xa], %[u], %[s0]\n\t"
                     "smlad %[s0], %[xb], %[o], %[s0]\n\t"
                     "ldrd %[xa], %[xb], [%[c]], #8\n\t"
                     "smlad %[s1], %[xa], %[u], %[s1]\n\t"
                     "smlad %[s1], %[xb], %[o], %[s1]\n\t"
                     "ldrd %[xa], %[xb], [%[c]], #8\n\t"
                     "smlad %[s2], %[xa], %[u], %[s2]\n\t"
                     "smlad %[s2], %[xb], %[o], %[s2]\n\t"
                     "ldrd %[xa], %[xb], [%[c]], #8\n\t"
                     "smlad %[s3], %[xa], %[u], %[s3]\n\t"
                     "smlad %[s3], %[xb], %[o], %[s3]\n\t"
                     "subs %[n], %[n], #1\n\t"
                     "bne 1b\n\t"
                     : [s0] "+r"(s0), [s1] "+r"(s1), [s2] "+r"(s2), [s3] "+r"(s3), [c] "+r"(c), [w] "+r"(w),
                       [n] "+r"(kq), [xa] "=&r"(xa), [xb] "=&r"(xb), [u] "=&r"(u), [o] "=&r"(o)
                     :
                     : "cc", "memory");
    s[0] = s0, s[1] = s1, s[2] = s2, s[3] = s3;
#else
    int32_t s0 = s[0], s1 = s[1], s2 = s[2], s3 = s[3];
    for (; kq > 0; kq--, c += 16, w += 4) {
#define ONNXC_DOT4(x, q) ((x)[0] * (q)[0] + (x)[1] * (q)[2] + (x)[2] * (q)[1] + (x)[3] * (q)[3])
        s0 += ONNXC_DOT4(c, w), s1 += ONNXC_DOT4(c + 4, w), s2 += ONNXC_DOT4(c + 8, w), s3 += ONNXC_DOT4(c + 12, w);
#undef ONNXC_DOT4
    }
    s[0] = s0, s[1] = s1, s[2] = s2, s[3] = s3;
#endif
}

/* One output channel of a GEMM layer decoded once per call (scratch): bias and scale. */
typedef struct {
    int32_t bias;
    float scale;
} rq_row;

static void decode_rows(const int32_t *ch, int32_t c0, int32_t m, const chan_fmt *f, rq_row *tab)
{
    int32_t r;
    for (r = 0; r < m; r++) tab[r].bias = ch_bias(ch, c0 + r, f), tab[r].scale = ch_scale(ch, c0 + r, f);
}

/* A row of kp weights from its codes (two a byte, low nibble first) and 16-entry codebook. */
static void decode_row(const uint8_t *codes, const int8_t *cb, int32_t kp, int8_t *out)
{
    const uint8_t *end = codes + kp / 2;
    for (; codes != end; codes++, out += 2) out[0] = cb[*codes & 15], out[1] = cb[*codes >> 4];
}

/* All m outputs (rows of tab) of four columns, to y[row * ys + j] for the ncols first. Weight
 * rows w ([m][kp]), or with cb non-NULL their codes ([m][kp / 2]), decoded into wbuf. */
static void gemm_cols(const int16_t *cols, int32_t ncols, int32_t kp, int32_t m, const int8_t *w, const int8_t *cb,
                      int8_t *wbuf, const rq_row *tab, int8_t *y, int32_t ys, const chan_fmt *f)
{
    const int32_t kq = kp / 4, wstep = cb ? kp / 2 : kp;
    const rq_row *end = tab + m;
    int32_t s[4], j;
#ifdef ONNXC_SIMD
    if (!cb && ncols == 4 && f->sat) { /* the common case, its sums kept in registers */
        const int32_t zp = f->zp;
        for (; tab != end; tab++, w += kp, y += ys) {
            const float sc = tab->scale;
            int32_t r[4];
            r[0] = r[1] = r[2] = r[3] = tab->bias;
            dot1x4(cols, w, kq, r);
            y[0] = out8_sat(r[0], sc, zp), y[1] = out8_sat(r[1], sc, zp);
            y[2] = out8_sat(r[2], sc, zp), y[3] = out8_sat(r[3], sc, zp);
        }
        return;
    }
#endif
    for (; tab != end; tab++, w += wstep, y += ys) {
        s[0] = s[1] = s[2] = s[3] = tab->bias;
        if (cb) {
            decode_row((const uint8_t *)(const void *)w, cb, kp, wbuf);
            cb += 16;
        }
        dot1x4(cols, cb ? wbuf : w, kq, s);
        for (j = 0; j < ncols; j++) y[j] = out8(s[j], tab->scale, f);
    }
}

/* Four pixels at a time: their c channels gathered into scratch (four columns; the last pixel
 * repeated where fewer are left), then all m outputs. In place (m <= c), output slot (m, pixel)
 * is input slot (m, pixel) of the same image or of an earlier one, already gathered. */
static void pointwise(const int8_t *x, const int8_t *w, const int32_t *ch, int8_t *y, int8_t *scratch,
                      const onnxc_qconv_p *p)
{
    const chan_fmt f = fmt_of(p->pk_bias, p->pk_delta, p->pk_mant, p->pk_exp, p->y_zp, p->lo, p->hi);
    const int32_t hw = p->h * p->w, C = p->c, M = p->m, kp = (C + 3) & ~3, XZ = p->x_zp;
    int16_t *cols = (int16_t *)(void *)scratch;
    rq_row *tab = (rq_row *)(void *)(cols + 4 * kp);
    int8_t *wbuf = (int8_t *)(void *)(tab + M);
    int32_t n, px, c, j;
    decode_rows(ch, 0, M, &f, tab);
    for (c = C; c < kp; c++) {
        for (j = 0; j < 4; j++) cols[col_pos(c) + 4 * j] = 0;
    }
    for (n = 0; n < p->n; n++) {
        const int8_t *xin = x + n * C * hw;
        int8_t *yout = y + n * M * hw;
        for (px = 0; px < hw; px += 4) {
            const int32_t ncols = hw - px < 4 ? hw - px : 4;
            const int32_t o1 = ncols > 1 ? 1 : 0, o2 = ncols > 2 ? 2 : o1, o3 = ncols > 3 ? 3 : o2;
            const int8_t *xc = xin + px;
            int16_t *col = cols;
            for (c = 0; c + 4 <= C; c += 4, xc += 4 * hw, col += 16) {
                const int8_t *r2 = xc + hw, *r1 = r2 + hw, *r3 = r1 + hw; /* channels c, c + 2, c + 1, c + 3 */
                col[0] = (int16_t)(xc[0] - XZ), col[1] = (int16_t)(r1[0] - XZ);
                col[2] = (int16_t)(r2[0] - XZ), col[3] = (int16_t)(r3[0] - XZ);
                col[4] = (int16_t)(xc[o1] - XZ), col[5] = (int16_t)(r1[o1] - XZ);
                col[6] = (int16_t)(r2[o1] - XZ), col[7] = (int16_t)(r3[o1] - XZ);
                col[8] = (int16_t)(xc[o2] - XZ), col[9] = (int16_t)(r1[o2] - XZ);
                col[10] = (int16_t)(r2[o2] - XZ), col[11] = (int16_t)(r3[o2] - XZ);
                col[12] = (int16_t)(xc[o3] - XZ), col[13] = (int16_t)(r1[o3] - XZ);
                col[14] = (int16_t)(r2[o3] - XZ), col[15] = (int16_t)(r3[o3] - XZ);
            }
            for (; c < C; c++, xc += hw) {
                cols[col_pos(c)] = (int16_t)(xc[0] - XZ), cols[col_pos(c) + 4] = (int16_t)(xc[o1] - XZ);
                cols[col_pos(c) + 8] = (int16_t)(xc[o2] - XZ), cols[col_pos(c) + 12] = (int16_t)(xc[o3] - XZ);
            }
            gemm_cols(cols, ncols, kp, M, w, p->codebook, wbuf, tab, yout + px, hw, &f);
        }
    }
}

void onnxc_qconv1x1(const int8_t *x, const int8_t *w, const int32_t *ch, int8_t *y, int8_t *scratch,
                    const onnxc_qconv_p *p)
{
    pointwise(x, w, ch, y, scratch, p);
}

void onnxc_qconv1x1_inplace(int8_t *xy, const int8_t *w, const int32_t *ch, int8_t *scratch,
                            const onnxc_qconv_p *p)
{
    pointwise(xy, w, ch, xy, scratch, p);
}

/* One output pixel's window (c/g channels from xg, taps in c, kh, kw order) as bytes into `row`:
 * the input, and its zero point (the real value 0) where the window leaves the input. */
static void gather_window(const int8_t *xg, int32_t o, int8_t *row, const onnxc_qconv_p *p)
{
    const int32_t H = p->h, W = p->w, KH = p->kh, KW = p->kw, DH = p->dh, DW = p->dw;
    const int8_t XZ = (int8_t)p->x_zp;
    const int32_t cg = p->c / p->group, ih0 = o / p->ow * p->sh - p->pt, iw0 = o % p->ow * p->sw - p->pl;
    const int32_t inside = iw0 >= 0 && iw0 + (KW - 1) * DW < W;
    int32_t cc, kh, kw;
    if (inside && ih0 >= 0 && ih0 + (KH - 1) * DH < H) { /* the whole window: no checks */
        const int8_t *xc = xg + ih0 * W + iw0;
        if (KH == 3 && KW == 3 && DH == 1 && DW == 1) {
            for (cc = 0; cc < cg; cc++, xc += H * W, row += 9) {
                const int8_t *r1 = xc + W, *r2 = r1 + W;
                row[0] = xc[0], row[1] = xc[1], row[2] = xc[2], row[3] = r1[0], row[4] = r1[1], row[5] = r1[2];
                row[6] = r2[0], row[7] = r2[1], row[8] = r2[2];
            }
            return;
        }
        for (cc = 0; cc < cg; cc++, xc += H * W) {
            for (kh = 0; kh < KH; kh++, row += KW) {
                const int8_t *xr = xc + kh * DH * W;
                for (kw = 0; kw < KW; kw++) row[kw] = xr[kw * DW];
            }
        }
        return;
    }
    for (cc = 0; cc < cg; cc++) {
        const int8_t *xc = xg + cc * H * W;
        for (kh = 0; kh < KH; kh++, row += KW) {
            const int32_t ih = ih0 + kh * DH;
            const int8_t *xr = xc + ih * W + iw0;
            if (ih < 0 || ih >= H) {
                for (kw = 0; kw < KW; kw++) row[kw] = XZ;
            } else if (inside && DW == 1 && KW == 3) {
                row[0] = xr[0], row[1] = xr[1], row[2] = xr[2];
            } else if (inside && DW == 1 && KW == 4) {
                memcpy(row, xr, 4);
            } else if (inside) {
                for (kw = 0; kw < KW; kw++) row[kw] = xr[kw * DW];
            } else {
                for (kw = 0; kw < KW; kw++) {
                    const int32_t iw = iw0 + kw * DW;
                    row[kw] = iw >= 0 && iw < W ? xr[kw * DW] : XZ;
                }
            }
        }
    }
}

/* A window of kp bytes into column `col` (of four) as int16 minus the zero point: SXTB16 of an
 * input word gives (k0, k2) and (k1, k3), SSUB16 takes the zero point off both halves. */
static void widen(const int8_t *b, int32_t kp, int32_t xz, int16_t *col)
{
    const int8_t *end = b + kp;
#ifdef ONNXC_SIMD
    const int32_t zz = pack16(xz, xz);
    for (; b != end; b += 4, col += 16) {
        const uint32_t v = ld32(b);
        ((onnxc_word *)(void *)col)[0] = (uint32_t)__ssub16(__sxtb16(v), zz);
        ((onnxc_word *)(void *)col)[1] = (uint32_t)__ssub16(sxtb16_ror8(v), zz);
    }
#else
    for (; b != end; b += 4, col += 16) {
        col[0] = (int16_t)(b[0] - xz), col[1] = (int16_t)(b[2] - xz);
        col[2] = (int16_t)(b[1] - xz), col[3] = (int16_t)(b[3] - xz);
    }
#endif
}

/* Any convolution through im2col: for four output pixels at a time, each group's c/g * kh * kw
 * window values are gathered as bytes (gather_window), each widened into its column (widen), then
 * multiplied by the group's weight rows. */
void onnxc_qconv2d_im2col(const int8_t *x, const int8_t *w, const int32_t *ch, int8_t *y, int8_t *scratch,
                          const onnxc_qconv_p *p)
{
    const chan_fmt f = fmt_of(p->pk_bias, p->pk_delta, p->pk_mant, p->pk_exp, p->y_zp, p->lo, p->hi);
    const int32_t cg = p->c / p->group, mg = p->m / p->group;
    const int32_t k = cg * p->kh * p->kw, kp = (k + 3) & ~3, out_plane = p->oh * p->ow;
    int16_t *cols = (int16_t *)(void *)scratch;
    rq_row *tab = (rq_row *)(void *)(cols + 4 * kp);
    int8_t *row = (int8_t *)(void *)(tab + mg), *wbuf = row + kp;
    const int32_t wstep = p->codebook ? kp / 2 : kp;
    int32_t n, g, px, j;
    memset(row, p->x_zp, (size_t)kp); /* the padding past k stays the zero point */
    for (n = 0; n < p->n; n++) {
        for (g = 0; g < p->group; g++) {
            const int8_t *xg = x + (n * p->c + g * cg) * p->h * p->w;
            int8_t *yg = y + (n * p->m + g * mg) * out_plane;
            decode_rows(ch, g * mg, mg, &f, tab);
            for (px = 0; px < out_plane; px += 4) {
                const int32_t ncols = out_plane - px < 4 ? out_plane - px : 4;
                for (j = 0; j < 4; j++) {
                    gather_window(xg, px + (j < ncols ? j : ncols - 1), row, p);
                    widen(row, kp, p->x_zp, cols + 4 * j);
                }
                gemm_cols(cols, ncols, kp, mg, w + g * mg * wstep, p->codebook ? p->codebook + g * mg * 16 : NULL,
                          wbuf, tab, yg + px, out_plane, &f);
            }
        }
    }
}

/* ---- dense ------------------------------------------------------------------------------- */
/* Four rows' dot products with x (stored values: the exporter put the input zero point in the
 * bias), w in blocks of [k/4][4 rows][4 k] words then [k % 4][4 rows] bytes. With the DSP
 * extension, SXTB16 splits an input word and each weight word into the pairs (k0, k2), (k1, k3)
 * and two SMLADs take the four products. */
#ifdef ONNXC_SIMD
/* One group of 4 k for four weight rows: one input word, four weight words, eight SMLADs. */
#define ONNXC_DOT4_GROUP                                                                            \
    "ldr %[xe], [%[x]], #4\n\t"                                                                      \
    "sxtb16 %[xo], %[xe], ror #8\n\t"                                                                \
    "sxtb16 %[xe], %[xe]\n\t"                                                                        \
    "ldrd %[w0], %[w1], [%[w]], #8\n\t"                                                              \
    "sxtb16 %[u], %[w0]\n\t"                                                                         \
    "sxtb16 %[w0], %[w0], ror #8\n\t"                                                                \
    "smlad %[a0], %[xe], %[u], %[a0]\n\t"                                                            \
    "smlad %[a0], %[xo], %[w0], %[a0]\n\t"                                                           \
    "sxtb16 %[u], %[w1]\n\t"                                                                         \
    "sxtb16 %[w1], %[w1], ror #8\n\t"                                                                \
    "smlad %[a1], %[xe], %[u], %[a1]\n\t"                                                            \
    "smlad %[a1], %[xo], %[w1], %[a1]\n\t"                                                           \
    "ldrd %[w0], %[w1], [%[w]], #8\n\t"                                                              \
    "sxtb16 %[u], %[w0]\n\t"                                                                         \
    "sxtb16 %[w0], %[w0], ror #8\n\t"                                                                \
    "smlad %[a2], %[xe], %[u], %[a2]\n\t"                                                            \
    "smlad %[a2], %[xo], %[w0], %[a2]\n\t"                                                           \
    "sxtb16 %[u], %[w1]\n\t"                                                                         \
    "sxtb16 %[w1], %[w1], ror #8\n\t"                                                                \
    "smlad %[a3], %[xe], %[u], %[a3]\n\t"                                                            \
    "smlad %[a3], %[xo], %[w1], %[a3]\n\t"

#endif
static void dot4rows(const int8_t *x, const int8_t *w, int32_t k, int32_t *acc)
{
    int32_t a0 = acc[0], a1 = acc[1], a2 = acc[2], a3 = acc[3], kq = k >> 2, t;
#ifdef ONNXC_SIMD
    uint32_t xe, xo, w0, w1, u;
    int32_t pairs = kq >> 1; /* two groups of 4 k a loop: 44 instructions for 32 multiply-accumulates */
    if (pairs > 0) {
        __asm__ volatile("1:\n\t" ONNXC_DOT4_GROUP ONNXC_DOT4_GROUP
                         "subs %[n], %[n], #1\n\t"
                         "bne 1b\n\t"
                         : [a0] "+r"(a0), [a1] "+r"(a1), [a2] "+r"(a2), [a3] "+r"(a3), [x] "+r"(x), [w] "+r"(w),
                           [n] "+r"(pairs), [xe] "=&r"(xe), [xo] "=&r"(xo), [w0] "=&r"(w0), [w1] "=&r"(w1), [u] "=&r"(u)
                         :
                         : "cc", "memory");
    }
    if (kq & 1) {
        __asm__ volatile(ONNXC_DOT4_GROUP
                         : [a0] "+r"(a0), [a1] "+r"(a1), [a2] "+r"(a2), [a3] "+r"(a3), [x] "+r"(x), [w] "+r"(w),
                           [xe] "=&r"(xe), [xo] "=&r"(xo), [w0] "=&r"(w0), [w1] "=&r"(w1), [u] "=&r"(u)
                         :
                         : "memory");
    }
#else
    for (; kq > 0; kq--, x += 4, w += 16) {
        const int32_t x0 = x[0], x1 = x[1], x2 = x[2], x3 = x[3];
        a0 += x0 * w[0] + x1 * w[1] + x2 * w[2] + x3 * w[3];
        a1 += x0 * w[4] + x1 * w[5] + x2 * w[6] + x3 * w[7];
        a2 += x0 * w[8] + x1 * w[9] + x2 * w[10] + x3 * w[11];
        a3 += x0 * w[12] + x1 * w[13] + x2 * w[14] + x3 * w[15];
    }
#endif
    for (t = 0; t < (k & 3); t++, w += 4) {
        const int32_t v = x[t];
        a0 += v * w[0], a1 += v * w[1], a2 += v * w[2], a3 += v * w[3];
    }
    acc[0] = a0, acc[1] = a1, acc[2] = a2, acc[3] = a3;
}

static int32_t dot1(const int8_t *x, const int8_t *w, int32_t k, int32_t xz, int32_t acc)
{
    int32_t i;
    for (i = 0; i < k; i++) acc += (x[i] - xz) * w[i];
    return acc;
}

/* The same from a row's codes and codebook (codes two a byte, low nibble first). */
static int32_t dot1_codes(const int8_t *x, const uint8_t *codes, const int8_t *cb, int32_t k, int32_t xz, int32_t acc)
{
    int32_t i;
    for (i = 0; i + 2 <= k; i += 2, codes++) acc += (x[i] - xz) * cb[*codes & 15] + (x[i + 1] - xz) * cb[*codes >> 4];
    if (k & 1) acc += (x[k - 1] - xz) * cb[*codes & 15];
    return acc;
}

/* The outputs of all blocks of 4 rows for one input row; sat: the clamp is [-128, 127] (a
 * constant where inlined). */
static ONNXC_INLINE void dense_blocks(const int8_t *x, const int8_t *w, const int32_t *ch, int8_t *y, int32_t n,
                                      int32_t k, const chan_fmt *f, const int32_t sat)
{
    int32_t r, j, acc[4];
    for (r = 0; r < (n & ~3); r += 4, w += 4 * k) {
        for (j = 0; j < 4; j++) acc[j] = ch_bias(ch, r + j, f);
        dot4rows(x, w, k, acc);
        for (j = 0; j < 4; j++) {
            const float s = ch_scale(ch, r + j, f);
            y[r + j] = sat ? out8_sat(acc[j], s, f->zp) : out8(acc[j], s, f);
        }
    }
}

void onnxc_qdense(const int8_t *x, const int8_t *w, const int32_t *ch, int8_t *y, const onnxc_qdense_p *p)
{
    const chan_fmt f = fmt_of(p->pk_bias, p->pk_delta, p->pk_mant, p->pk_exp, p->y_zp, p->lo, p->hi);
    int32_t i, j;
    if (p->codebook) {
        const int32_t rb = (p->k + 1) / 2; /* code bytes a row */
        for (i = 0; i < p->m; i++) {
            for (j = 0; j < p->n; j++) {
                const uint8_t *codes = (const uint8_t *)(const void *)(w + j * rb);
                const int32_t acc = dot1_codes(x + i * p->k, codes, p->codebook + 16 * j, p->k, p->x_zp,
                                               ch_bias(ch, j, &f));
                y[i * p->n + j] = out8(acc, ch_scale(ch, j, &f), &f);
            }
        }
        return;
    }
    for (i = 0; i < p->m; i++) {
        const int8_t *xi = x + i * p->k;
        int8_t *yi = y + i * p->n;
        if (f.sat) {
            dense_blocks(xi, w, ch, yi, p->n, p->k, &f, 1);
        } else {
            dense_blocks(xi, w, ch, yi, p->n, p->k, &f, 0);
        }
        for (j = p->n & ~3; j < p->n; j++) {
            yi[j] = out8(dot1(xi, w + j * p->k, p->k, p->x_zp, ch_bias(ch, j, &f)), ch_scale(ch, j, &f), &f);
        }
    }
}
