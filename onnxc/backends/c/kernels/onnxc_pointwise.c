/* 1x1 convolution (stride 1, no padding, one group): a matrix product
 * Y[m][px] = bias[m] + sum_c W[m][c] X[c][px] over the pixels of each image.
 *
 * Register blocking: a tile of 4 output channels x 4 pixels lives in 16 accumulators while the
 * input channels stream past; each step loads 4 weights (one per row, sequential) and 4
 * neighbouring pixels, 8 loads for 16 multiply-adds, with no index arithmetic in the inner loop.
 * Tiles at the edges (fewer than 4 channels or pixels) take a plain loop. A clustered weight is
 * decoded CHUNK input channels of 4 rows at a time into a small stack buffer, and the tiles
 * accumulate chunk after chunk. */
#include "onnxc_kernels.h"

#define CHUNK 32

/* Rows m..m+mc-1, input channels c0..c0+kc-1 of the weight: a pointer into the dense array
 * (row stride c) or the rows decoded into buf (row stride CHUNK). */
static const float *weight_rows(const onnxc_weight *w, int32_t m, int32_t mc, int32_t c, int32_t c0, int32_t kc,
                                float *buf, int32_t *stride)
{
    int32_t i, k;
    if (w->dense) {
        *stride = c;
        return w->dense + m * c + c0;
    }
    for (i = 0; i < mc; i++) {
        const float *cb = w->codebook + (w->row_base ? w->row_base[m + i] : 0);
        int32_t start = (m + i) * c + c0;
        float *out = buf + i * CHUNK;
        if (w->bits == 4) {
            for (k = 0; k < kc; k++, start++) out[k] = cb[(w->codes[start >> 1] >> ((start & 1) << 2)) & 15];
        } else {
            for (k = 0; k < kc; k++) out[k] = cb[w->codes[start + k]];
        }
    }
    *stride = CHUNK;
    return buf;
}

/* One tile of mc <= 4 channels by pc <= 4 pixels over kc input channels: y[i * ys + j] for
 * i < mc, j < pc, accumulated onto what y holds (the bias, or earlier chunks), the activation
 * applied when `last`. */
static void tile(const float *w, int32_t ws, int32_t kc, const float *x, int32_t xs, float *y, int32_t ys,
                 int32_t mc, int32_t pc, int32_t last, const onnxc_conv_p *p)
{
    int32_t i, j, k;
    if (mc == 4 && pc == 4) {
        const float *w0 = w, *w1 = w0 + ws, *w2 = w1 + ws, *w3 = w2 + ws;
        float *y0 = y, *y1 = y0 + ys, *y2 = y1 + ys, *y3 = y2 + ys;
        float a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, a30, a31, a32, a33;
        a00 = y0[0]; a01 = y0[1]; a02 = y0[2]; a03 = y0[3];
        a10 = y1[0]; a11 = y1[1]; a12 = y1[2]; a13 = y1[3];
        a20 = y2[0]; a21 = y2[1]; a22 = y2[2]; a23 = y2[3];
        a30 = y3[0]; a31 = y3[1]; a32 = y3[2]; a33 = y3[3];
        for (k = 0; k < kc; k++, x += xs) {
            float x0 = x[0], x1 = x[1], x2 = x[2], x3 = x[3], v;
            v = *w0++;
            a00 += v * x0; a01 += v * x1; a02 += v * x2; a03 += v * x3;
            v = *w1++;
            a10 += v * x0; a11 += v * x1; a12 += v * x2; a13 += v * x3;
            v = *w2++;
            a20 += v * x0; a21 += v * x1; a22 += v * x2; a23 += v * x3;
            v = *w3++;
            a30 += v * x0; a31 += v * x1; a32 += v * x2; a33 += v * x3;
        }
        y0[0] = a00; y0[1] = a01; y0[2] = a02; y0[3] = a03;
        y1[0] = a10; y1[1] = a11; y1[2] = a12; y1[3] = a13;
        y2[0] = a20; y2[1] = a21; y2[2] = a22; y2[3] = a23;
        y3[0] = a30; y3[1] = a31; y3[2] = a32; y3[3] = a33;
    } else if (mc == 4) {  /* fewer pixels: 4 channels of one pixel at a time */
        for (j = 0; j < pc; j++) {
            const float *w0 = w, *w1 = w0 + ws, *w2 = w1 + ws, *w3 = w2 + ws, *xp = x + j;
            float a0 = y[j], a1 = y[ys + j], a2 = y[2 * ys + j], a3 = y[3 * ys + j];
            for (k = 0; k < kc; k++, xp += xs) {
                float v = *xp;
                a0 += *w0++ * v; a1 += *w1++ * v; a2 += *w2++ * v; a3 += *w3++ * v;
            }
            y[j] = a0; y[ys + j] = a1; y[2 * ys + j] = a2; y[3 * ys + j] = a3;
        }
    } else {
        for (i = 0; i < mc; i++) {
            for (j = 0; j < pc; j++) {
                const float *wr = w + i * ws, *xp = x + j;
                float acc = y[i * ys + j];
                for (k = 0; k < kc; k++, xp += xs) acc += wr[k] * *xp;
                y[i * ys + j] = acc;
            }
        }
    }
    if (last && p->act != ONNXC_OP_NONE) {
        for (i = 0; i < mc; i++) {
            for (j = 0; j < pc; j++) y[i * ys + j] = onnxc_act(y[i * ys + j], p->act, p->act_a, p->act_b);
        }
    }
}

/* Output channels m..m+mc-1 of pixels px0..px1-1 of one image (x, y: the image's planes, pixel
 * stride 1, plane stride hw for x and ys for y). */
static void channel_block(const float *x, const onnxc_weight *w, const float *bias, float *y, int32_t ys,
                          int32_t m, int32_t mc, int32_t px0, int32_t px1, int32_t hw, const onnxc_conv_p *p)
{
    float buf[4 * CHUNK];
    int32_t c0 = 0, kc = p->c, px, ws, i;
    if (!w->dense && kc > CHUNK) kc = CHUNK;
    for (i = 0; i < mc; i++) {
        for (px = px0; px < px1; px++) y[(m + i) * ys + px] = bias ? bias[m + i] : 0.0f;
    }
    do {
        const float *wr = weight_rows(w, m, mc, p->c, c0, kc, buf, &ws);
        for (px = px0; px < px1; px += 4) {
            int32_t pc = px1 - px < 4 ? px1 - px : 4;
            tile(wr, ws, kc, x + c0 * hw + px, hw, y + m * ys + px, ys, mc, pc, c0 + kc == p->c, p);
        }
        c0 += kc;
        if (c0 + kc > p->c) kc = p->c - c0;
    } while (c0 < p->c);
}

void onnxc_conv1x1(const float *x, const onnxc_weight *w, const float *bias, float *y, const onnxc_conv_p *p)
{
    int32_t hw = p->h * p->w, n, m;
    for (n = 0; n < p->n; n++) {
        for (m = 0; m < p->m; m += 4) {
            channel_block(x + n * p->c * hw, w, bias, y + n * p->m * hw, hw, m, p->m - m < 4 ? p->m - m : 4, 0, hw,
                          hw, p);
        }
    }
}

void onnxc_conv1x1_tiled_inplace(float *xy, const onnxc_weight *w, const float *bias, float *scratch,
                                 const onnxc_conv_p *p)
{
    /* Four pixels at a time: their m <= c outputs go to scratch ([m][4]) while their inputs are
     * read, then to their slots. Output slot (m, px) of image n is an input slot of an earlier
     * image or input (m', px) of this image, m' <= m: only these four pixels' inputs, all read. */
    int32_t hw = p->h * p->w, block = 4, n, m, px, j;
    for (n = 0; n < p->n; n++) {
        const float *xn = xy + n * p->c * hw;
        float *yn = xy + n * p->m * hw;
        for (px = 0; px < hw; px += block) {
            int32_t pc = hw - px < block ? hw - px : block;
            for (m = 0; m < p->m; m += 4) {
                channel_block(xn + px, w, bias, scratch, block, m, p->m - m < 4 ? p->m - m : 4, 0, pc, hw, p);
            }
            for (m = 0; m < p->m; m++) {
                for (j = 0; j < pc; j++) yn[m * hw + px + j] = scratch[m * block + j];
            }
        }
    }
}

/* Depthwise convolution in place (dense or clustered weight): each input plane is copied, zero-padded, to scratch (the
 * padded plane: ((oh-1)*sh + (kh-1)*dh + 1) x ((ow-1)*sw + (kw-1)*dw + 1) floats), then every
 * output pixel is one multiply-add chain over its window, with no bounds tests; 3x3 windows keep
 * their nine weights in registers. Output plane i ends where input plane i + 1 starts or before,
 * so it only overwrites planes already copied out. */
void onnxc_depthwise_inplace(float *xy, const onnxc_weight *w, const float *bias, float *scratch,
                             const onnxc_conv_p *p)
{
    int32_t ph = (p->oh - 1) * p->sh + (p->kh - 1) * p->dh + 1, pw = (p->ow - 1) * p->sw + (p->kw - 1) * p->dw + 1;
    int32_t in_plane = p->h * p->w, out_plane = p->oh * p->ow, ksize = p->kh * p->kw;
    int32_t lo = p->pl < pw ? p->pl : pw, hi = p->pl + p->w < pw ? p->pl + p->w : pw; /* columns of the input */
    int32_t plane, i, r, oh, ow, kh, kw;
    for (plane = 0; plane < p->n * p->c; plane++) {
        int32_t m = plane % p->c;
        const float *xp = xy + plane * in_plane;
        float *yp = xy + plane * out_plane, b = bias ? bias[m] : 0.0f;
        for (r = 0; r < ph; r++) { /* padded row r is input row r - pt */
            float *sr = scratch + r * pw;
            const float *xr = xp + (r - p->pt) * p->w;
            if (r < p->pt || r - p->pt >= p->h) {
                for (i = 0; i < pw; i++) sr[i] = 0.0f;
                continue;
            }
            for (i = 0; i < lo; i++) sr[i] = 0.0f;
            for (; i < hi; i++) sr[i] = xr[i - p->pl];
            for (; i < pw; i++) sr[i] = 0.0f;
        }
        if (p->kh == 3 && p->kw == 3) {
            int32_t base = m * 9;
            float w0 = onnxc_weight_at(w, m, base), w1 = onnxc_weight_at(w, m, base + 1);
            float w2 = onnxc_weight_at(w, m, base + 2), w3 = onnxc_weight_at(w, m, base + 3);
            float w4 = onnxc_weight_at(w, m, base + 4), w5 = onnxc_weight_at(w, m, base + 5);
            float w6 = onnxc_weight_at(w, m, base + 6), w7 = onnxc_weight_at(w, m, base + 7);
            float w8 = onnxc_weight_at(w, m, base + 8);
            int32_t d = p->dw, d2 = 2 * p->dw;
            for (oh = 0; oh < p->oh; oh++) {
                const float *r0 = scratch + oh * p->sh * pw, *r1 = r0 + p->dh * pw, *r2 = r1 + p->dh * pw;
                float *yr = yp + oh * p->ow;
                for (ow = 0; ow < p->ow; ow++, r0 += p->sw, r1 += p->sw, r2 += p->sw) {
                    yr[ow] = b + w0 * r0[0] + w1 * r0[d] + w2 * r0[d2] + w3 * r1[0] + w4 * r1[d] + w5 * r1[d2]
                             + w6 * r2[0] + w7 * r2[d] + w8 * r2[d2];
                }
            }
        } else {
            for (oh = 0; oh < p->oh; oh++) {
                for (ow = 0; ow < p->ow; ow++) {
                    const float *x0 = scratch + oh * p->sh * pw + ow * p->sw;
                    float acc = b;
                    for (kh = 0; kh < p->kh; kh++) {
                        for (kw = 0; kw < p->kw; kw++) {
                            acc += onnxc_weight_at(w, m, m * ksize + kh * p->kw + kw) * x0[kh * p->dh * pw + kw * p->dw];
                        }
                    }
                    yp[oh * p->ow + ow] = acc;
                }
            }
        }
        onnxc_act_apply(yp, out_plane, p->act, p->act_a, p->act_b);
    }
}
