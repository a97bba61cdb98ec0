/* 1x1 convolution (stride 1, no padding, one group) with a dense weight: a matrix product
 * Y[m][px] = bias[m] + sum_c W[m][c] X[c][px] over the pixels of each image.
 *
 * Register blocking: a tile of 4 output channels x 4 pixels lives in 16 accumulators while the
 * input channels stream past; each step loads 4 weights (one per row, sequential) and 4
 * neighbouring pixels, 8 loads for 16 multiply-adds, with no index arithmetic in the inner loop.
 * Tiles at the edges (fewer than 4 channels or pixels) take a plain loop. */
#include "onnxc_kernels.h"

/* One tile of mc <= 4 channels by pc <= 4 pixels: y[i * ys + j] for i < mc, j < pc. */
static void tile(const float *w, int32_t c, const float *x, int32_t xs, const float *bias, float *y, int32_t ys,
                 int32_t mc, int32_t pc, const onnxc_conv_p *p)
{
    int32_t i, j, k;
    if (mc == 4 && pc == 4) {
        const float *w0 = w, *w1 = w0 + c, *w2 = w1 + c, *w3 = w2 + c;
        float a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, a30, a31, a32, a33;
        a00 = a01 = a02 = a03 = bias ? bias[0] : 0.0f;
        a10 = a11 = a12 = a13 = bias ? bias[1] : 0.0f;
        a20 = a21 = a22 = a23 = bias ? bias[2] : 0.0f;
        a30 = a31 = a32 = a33 = bias ? bias[3] : 0.0f;
        for (k = 0; k < c; k++, x += xs) {
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
        y[0] = a00; y[1] = a01; y[2] = a02; y[3] = a03; y += ys;
        y[0] = a10; y[1] = a11; y[2] = a12; y[3] = a13; y += ys;
        y[0] = a20; y[1] = a21; y[2] = a22; y[3] = a23; y += ys;
        y[0] = a30; y[1] = a31; y[2] = a32; y[3] = a33;
        y -= 3 * ys;
    } else {
        for (i = 0; i < mc; i++) {
            for (j = 0; j < pc; j++) {
                const float *wr = w + i * c, *xp = x + j;
                float acc = bias ? bias[i] : 0.0f;
                for (k = 0; k < c; k++, xp += xs) acc += wr[k] * *xp;
                y[i * ys + j] = acc;
            }
        }
    }
    if (p->act != ONNXC_OP_NONE) {
        for (i = 0; i < mc; i++) {
            for (j = 0; j < pc; j++) y[i * ys + j] = onnxc_act(y[i * ys + j], p->act, p->act_a, p->act_b);
        }
    }
}

void onnxc_conv1x1(const float *x, const onnxc_weight *w, const float *bias, float *y, const onnxc_conv_p *p)
{
    int32_t hw = p->h * p->w, n, m, px;
    for (n = 0; n < p->n; n++) {
        const float *xn = x + n * p->c * hw;
        float *yn = y + n * p->m * hw;
        for (m = 0; m < p->m; m += 4) {
            int32_t mc = p->m - m < 4 ? p->m - m : 4;
            for (px = 0; px < hw; px += 4) {
                int32_t pc = hw - px < 4 ? hw - px : 4;
                tile(w->dense + m * p->c, p->c, xn + px, hw, bias ? bias + m : bias, yn + m * hw + px, hw, mc, pc, p);
            }
        }
    }
}

void onnxc_conv1x1_tiled_inplace(float *xy, const onnxc_weight *w, const float *bias, float *scratch,
                                 const onnxc_conv_p *p)
{
    /* Four pixels at a time: their m <= c outputs go to scratch ([m][4]) while their inputs are
     * read, then to their slots. Output slot (m, px) of image n is an input slot of an earlier
     * image or input (m', px) of this image, m' <= m: only these four pixels' inputs, all read. */
    int32_t hw = p->h * p->w, n, m, px, j;
    for (n = 0; n < p->n; n++) {
        const float *xn = xy + n * p->c * hw;
        float *yn = xy + n * p->m * hw;
        for (px = 0; px < hw; px += 4) {
            int32_t pc = hw - px < 4 ? hw - px : 4;
            for (m = 0; m < p->m; m += 4) {
                int32_t mc = p->m - m < 4 ? p->m - m : 4;
                tile(w->dense + m * p->c, p->c, xn + px, hw, bias ? bias + m : bias, scratch + m * 4, 4, mc, pc, p);
            }
            for (m = 0; m < p->m; m++) {
                for (j = 0; j < pc; j++) yn[m * hw + px + j] = scratch[m * 4 + j];
            }
        }
    }
}

/* Depthwise convolution in place: each input plane is copied, zero-padded, to scratch (the
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
        const float *xp = xy + plane * in_plane, *wm = w->dense + m * ksize;
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
            float w0 = wm[0], w1 = wm[1], w2 = wm[2], w3 = wm[3], w4 = wm[4], w5 = wm[5], w6 = wm[6], w7 = wm[7],
                  w8 = wm[8];
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
                        for (kw = 0; kw < p->kw; kw++) acc += wm[kh * p->kw + kw] * x0[kh * p->dh * pw + kw * p->dw];
                    }
                    yp[oh * p->ow + ow] = acc;
                }
            }
        }
        onnxc_act_apply(yp, out_plane, p->act, p->act_a, p->act_b);
    }
}
