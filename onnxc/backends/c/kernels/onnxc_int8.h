/* onnxc int8 kernels (onnxc_int8.c): plain C99, no allocation, no I/O.
 *
 * Activations are int8 with a zero point (real = scale * (q - zero_point)); an ONNX uint8 tensor
 * is stored as int8 q - 128 with zero point - 128, which is exact. Weights are int8 with one scale
 * per output channel; accumulators are int32.
 *
 * Every quantized layer requantizes as onnxruntime's integer kernels do (MLAS
 * MlasRequantizeOutput; onnxc/backends/c/requant.py): y = clamp(zero_point +
 * round_half_even(float(acc) * scale)), the product in single precision, with one float32 scale per
 * output channel ((x_scale * w_scale) / y_scale, computed in float32 by the exporter), so that the
 * outputs are bit for bit those of onnxruntime's int8 model. On a Cortex-M4 with its FPU that is
 * VCVT, VMUL and VCVTR (round to nearest even), elsewhere float arithmetic in C99.
 *
 * The fast kernels (depthwise, 1x1, im2col, dense) read one table `ch` of per output channel
 * bias and scale, in one of two forms the exporter chooses per layer:
 * - packed (pk_bias > 0): one word per channel holding, from the top, the int32 bias in pk_bias
 *   bits (signed), the scale's mantissa's pk_mant high bits (the rest are zero), and in the
 *   pk_delta low bits its biased exponent minus pk_exp;
 * - pairs (pk_bias == 0): {bias, scale} per channel, the scale as the bits of a float32.
 * The bias is the layer's own (raw): the input zero point is taken off each input value (GEMM
 * columns, coded dense rows) or folded per channel at run time (depthwise); dense layers in int8
 * carry it in their bias (-x_zp * sum of the row).
 * The generic kernels (onnxc_qconv2d, onnxc_qmatmul) read an int32 bias and a float32 scale array.
 *
 * Convolutions run as GEMMs over four gathered pixels at a time (1x1 directly, others through
 * im2col), one output channel's row of weights against the four columns, with weights laid out
 * by the exporter in the order the loop reads them ("GEMM layout": rows of k padded to kp, a
 * multiple of 4, with zero weights). Pixels are gathered as int16 columns minus the input zero
 * point, each group of 4 k as k0 k2 k1 k3, so that the DSP extension (Cortex-M4: SXTB16 splits a
 * weight word into the pairs (w0, w2) and (w1, w3), SMLAD, as CMSIS-NN) does two
 * multiply-accumulates per instruction; elsewhere the same loop runs in portable C99 with the
 * same integer sums. Depthwise runs direct over a zero-point-padded plane (3x3 unrolled).
 * Requantization is fused into each kernel's loop.
 *
 * Weights whose rows hold at most 16 distinct int8 values (clustered layers) may come as codes:
 * 4 bits a weight, two a byte (low nibble first), in the order of the dense layout, with 16 int8
 * values per output channel in `codebook` (onnxc/backends/c/qcodes.py); the GEMM kernels decode
 * one row at a time into scratch (kp bytes more), the dense kernel as it reads.
 */
#ifndef ONNXC_INT8_H
#define ONNXC_INT8_H

#include <stdint.h>

#include "onnxc_kernels.h"

static inline int8_t onnxc_clamp8(int32_t v, int32_t lo, int32_t hi)
{
    return (int8_t)(v < lo ? lo : (v > hi ? hi : v));
}

/* Nearest integer, ties to even (as nearbyintf in the default rounding mode), saturated to
 * +-2^22 (NaN to -2^22): 1.5 * 2^23 added and subtracted in float32 leaves the rounded value; with
 * a single-precision FPU, VCVTR converts in the same rounding mode in one instruction. */
static inline int32_t onnxc_round_s32(float v)
{
#if defined(__GNUC__) && defined(__ARM_FP) && (__ARM_FP & 4) && !defined(__aarch64__)
    union {
        float f;
        int32_t i;
    } r;
    if (!(v >= -4194304.0f)) return -4194304; /* (NaN too) */
    if (v > 4194304.0f) return 4194304;
    __asm__("vcvtr.s32.f32 %0, %1" : "=t"(r.f) : "t"(v));
    return r.i;
#else
    if (!(v >= -4194304.0f)) v = -4194304.0f; /* (NaN too) */
    if (v > 4194304.0f) v = 4194304.0f;
    return (int32_t)((v + 12582912.0f) - 12582912.0f);
#endif
}

#if defined(__GNUC__) && defined(__ARM_FP) && (__ARM_FP & 4) && !defined(__aarch64__)
#define ONNXC_FP_RQ 1
/* round_half_even(float(acc) * s) saturated to the int32 range: VCVT, VMUL, VCVTR. */
static inline int32_t onnxc_rq_round(int32_t acc, float s)
{
    union {
        float f;
        int32_t i;
    } r;
    const float v = (float)acc * s;
    __asm__("vcvtr.s32.f32 %0, %1" : "=t"(r.f) : "t"(v));
    return r.i;
}
#endif

/* zero_point + round_half_even(float(acc) * s) clamped to [lo, hi] (see above). */
static inline int32_t onnxc_requant(int32_t acc, float s, int32_t zp, int32_t lo, int32_t hi)
{
#ifdef ONNXC_FP_RQ
    const int32_t v = onnxc_rq_round(acc, s);
    return v < lo - zp ? lo : (v > hi - zp ? hi : v + zp);
#else
    /* clamped first (as MLAS does: the bounds are integers, so it is the same), then 1.5 * 2^23 added
     * and subtracted: the float32 sum has no fraction bits left, so it rounds v to nearest even */
    const float a = (float)(lo - zp), b = (float)(hi - zp);
    float v = (float)acc * s;
    v = v < a ? a : (v > b ? b : v);
    return (int32_t)((v + 12582912.0f) - 12582912.0f) + zp;
#endif
}

/* ---- QuantizeLinear / DequantizeLinear ------------------------------------------------- */
typedef struct {
    int32_t outer, len, inner;     /* the tensor as [outer][len][inner]; len 1: per tensor */
    const float *scale;            /* [len] */
    const int32_t *zp;             /* [len], int8 domain */
    int32_t lo, hi;                /* quantize: output range (int8 domain) */
} onnxc_quant_p;
void onnxc_quantize(const float *x, int8_t *y, const onnxc_quant_p *p);
void onnxc_dequantize(const int8_t *x, float *y, const onnxc_quant_p *p);
void onnxc_dequantize_i32(const int32_t *x, float *y, const onnxc_quant_p *p);
/* uint8 graph inputs and outputs <-> int8 storage (q ^ 0x80). */
void onnxc_u8_to_s8(const uint8_t *x, int8_t *y, int32_t n);
void onnxc_s8_to_u8(const int8_t *x, uint8_t *y, int32_t n);

/* ---- convolution ----------------------------------------------------------------------- */
typedef struct {
    int32_t n, c, h, w;            /* input */
    int32_t m, oh, ow;             /* output channels and size */
    int32_t kh, kw, sh, sw, dh, dw;
    int32_t pt, pl;                /* padding before */
    int32_t group;
    int32_t x_zp, y_zp;            /* zero points (int8 domain) */
    int32_t lo, hi;                /* output clamp (int8 domain): saturation and fused ReLU/Clip */
    const float *scale;            /* onnxc_qconv2d: per output channel requantization scale */
    const int32_t *w_zp;           /* onnxc_qconv2d: per output channel weight zero points (NULL: all 0) */
    int32_t pk_bias, pk_delta, pk_mant, pk_exp; /* the fast kernels' `ch` table (see above) */
    const int8_t *codebook;        /* 1x1 and im2col: non-NULL, w holds 4-bit codes (see below) */
} onnxc_qconv_p;
/* Any convolution, for weight zero points or raw int32 sums: weights [m][c/group][kh][kw].
 * With y32 non-NULL the raw sums are written there instead of y (ConvInteger). */
void onnxc_qconv2d(const int8_t *x, const int8_t *w, const int32_t *bias, int8_t *y, int32_t *y32,
                   const onnxc_qconv_p *p);
/* Any convolution through im2col, four output pixels at a time: scratch holds their windows as
 * int16 columns (8 * kp bytes, kp = c/group * kh * kw rounded up to a multiple of 4), one group's
 * channels decoded (12 * m/group bytes) and one window as bytes (kp); weights per group in the
 * GEMM layout. */
void onnxc_qconv2d_im2col(const int8_t *x, const int8_t *w, const int32_t *ch, int8_t *y, int8_t *scratch,
                          const onnxc_qconv_p *p);
/* Depthwise (group == c == m): weights [c][kh][kw]; scratch holds one padded input plane
 * (((oh - 1) * sh + (kh - 1) * dh + 1) x ((ow - 1) * sw + (kw - 1) * dw + 1) bytes). */
void onnxc_qconv_dw(const int8_t *x, const int8_t *w, const int32_t *ch, int8_t *y, int8_t *scratch,
                    const onnxc_qconv_p *p);
void onnxc_qconv_dw_inplace(int8_t *xy, const int8_t *w, const int32_t *ch, int8_t *scratch,
                            const onnxc_qconv_p *p);
/* 1x1, stride 1, no padding, one group: weights in the GEMM layout (k = c); scratch holds four
 * pixels' channels (8 * kp bytes) and the m channels decoded (12 * m bytes). In place when m <= c. */
void onnxc_qconv1x1(const int8_t *x, const int8_t *w, const int32_t *ch, int8_t *y, int8_t *scratch,
                    const onnxc_qconv_p *p);
void onnxc_qconv1x1_inplace(int8_t *xy, const int8_t *w, const int32_t *ch, int8_t *scratch,
                            const onnxc_qconv_p *p);

/* ---- matrix products ------------------------------------------------------------------- */
typedef struct {
    int32_t m, n, k;               /* y[m][n] = (x[m][k] - x_zp) . w[n][k] + bias[n] */
    int32_t x_zp, y_zp, lo, hi;
    int32_t pk_bias, pk_delta, pk_mant, pk_exp; /* the `ch` table, per output column */
    const int8_t *codebook;        /* non-NULL: w holds 4-bit codes, plain rows of (k + 1) / 2 bytes */
} onnxc_qdense_p;
/* Constant weight in blocks of 4 rows ([k/4][4 rows][4 k], then [k % 4][4 rows]; then plain rows),
 * or codes. The blocks multiply x as stored: with them x_zp must be 0, the exporter folding the
 * input zero point into the bias. */
void onnxc_qdense(const int8_t *x, const int8_t *w, const int32_t *ch, int8_t *y, const onnxc_qdense_p *p);

typedef struct {
    int32_t batch, m, n, k;
    const int32_t *a_off, *b_off;  /* per batch element start offsets (NULL: all 0) */
    int32_t a_zp, b_zp, y_zp, lo, hi;
    const float *scale;            /* per output column */
} onnxc_qmatmul_p;
/* Two run-time operands a[batch][m][k], b[batch][k][n]; y32 non-NULL: raw sums (MatMulInteger). */
void onnxc_qmatmul(const int8_t *a, const int8_t *b, int8_t *y, int32_t *y32, const onnxc_qmatmul_p *p);

/* ---- pooling and elementwise ----------------------------------------------------------- */
typedef struct {
    int32_t x_zp, y_zp, lo, hi;
    float scale;                   /* input scale / output scale; global average: / (output scale * count) */
} onnxc_qrescale_p;
void onnxc_qpool(const int8_t *x, int8_t *y, const onnxc_pool_p *p, const onnxc_qrescale_p *q);
void onnxc_qglobal_pool(const int8_t *x, int8_t *y, int32_t planes, int32_t len, int32_t is_max,
                        const onnxc_qrescale_p *q);

typedef struct {
    int32_t op;                    /* ONNXC_BIN_ADD or ONNXC_BIN_MUL */
    int32_t rank;
    int32_t dims[ONNXC_MAXDIM];
    int32_t sa[ONNXC_MAXDIM];
    int32_t sb[ONNXC_MAXDIM];
    int32_t a_zp, b_zp, y_zp, lo, hi;
    float a_scale, b_scale;        /* add: sa / sy and sb / sy; mul: sa * sb / sy in a_scale */
} onnxc_qbinary_p;
void onnxc_qbinary(const int8_t *a, const int8_t *b, int8_t *y, const onnxc_qbinary_p *p);

#endif /* ONNXC_INT8_H */
