/* Recurrent layers: ONNX LSTM and GRU (layout 0: X [seq][batch][input], Y [seq][dirs][batch][hidden],
 * states [dirs][batch][hidden]; layout 1: batch first everywhere), forward, reverse or both directions, default activations (sigmoid gates, tanh cell), optional
 * initial states, per-batch sequence lengths and LSTM peepholes.
 *
 * Weights are used as ONNX stores them, one gate row after another ([dirs][gates*hidden][input]
 * and [dirs][gates*hidden][hidden]), so each gate pre-activation is two sequential dot products.
 * The running state lives in the Y_h / Y_c outputs (the caller provides them even when the model
 * does not read them); `work` holds one time step's gate pre-activations. */
#include <math.h>

#include "onnxc_kernels.h"

static float dot(const float *a, const float *b, int32_t n)
{
    float acc = 0.0f;
    int32_t k;
    for (k = 0; k < n; k++) acc += a[k] * b[k];
    return acc;
}

static float sigmoid(float v) { return 1.0f / (1.0f + expf(-v)); }

static float clipped(float v, float clip)
{
    if (clip > 0.0f) {
        if (v > clip) return clip;
        if (v < -clip) return -clip;
    }
    return v;
}

/* Time step `t` of the pass (0, 1, ...) as the index into X and Y, or -1 past the sequence's end. */
static int32_t step_index(const onnxc_rnn_p *p, int32_t dir, int32_t b, int32_t t)
{
    int32_t len = p->lens ? p->lens[b] : p->seq;
    int32_t reverse = p->dirs == 2 ? dir == 1 : p->reverse;
    if (t >= len) return -1;
    return reverse ? len - 1 - t : t;
}

static int32_t x_row(const onnxc_rnn_p *p, int32_t t, int32_t b)
{
    return p->layout ? b * p->seq + t : t * p->batch + b;
}

static int32_t y_row(const onnxc_rnn_p *p, int32_t t, int32_t dir, int32_t b)
{
    return p->layout ? (b * p->seq + t) * p->dirs + dir : (t * p->dirs + dir) * p->batch + b;
}

static int32_t state_row(const onnxc_rnn_p *p, int32_t dir, int32_t b)
{
    return p->layout ? b * p->dirs + dir : dir * p->batch + b;
}

static void init_state(float *s, const float *s0, int32_t n)
{
    int32_t i;
    for (i = 0; i < n; i++) s[i] = s0 ? s0[i] : 0.0f;
}

/* Y rows past a sequence's end are zero. */
static void zero_row(float *y, const onnxc_rnn_p *p, int32_t t, int32_t dir, int32_t b)
{
    int32_t j;
    if (!y) return;
    y += y_row(p, t, dir, b) * p->hidden;
    for (j = 0; j < p->hidden; j++) y[j] = 0.0f;
}

void onnxc_lstm(const float *x, const float *h0, const float *c0, float *y, float *yh, float *yc, float *work,
                const onnxc_rnn_p *p)
{
    int32_t H = p->hidden, I = p->input, B = p->batch, dir, b, t, g, j;
    init_state(yh, h0, p->dirs * B * H);
    init_state(yc, c0, p->dirs * B * H);
    for (dir = 0; dir < p->dirs; dir++) {
        const float *W = p->w + dir * 4 * H * I, *R = p->r + dir * 4 * H * H;
        const float *bias = p->b ? p->b + dir * 8 * H : 0, *peep = p->peep ? p->peep + dir * 3 * H : 0;
        for (t = 0; t < p->seq; t++) {
            for (b = 0; b < B; b++) {
                int32_t tt = step_index(p, dir, b, t);
                float *h = yh + state_row(p, dir, b) * H, *c = yc + state_row(p, dir, b) * H;
                const float *xt;
                if (tt < 0) {
                    zero_row(y, p, t, dir, b);
                    continue;
                }
                xt = x + x_row(p, tt, b) * I;
                for (g = 0; g < 4 * H; g++) {  /* gates i, o, f, c */
                    float v = dot(W + g * I, xt, I) + dot(R + g * H, h, H);
                    if (bias) v += bias[g] + bias[4 * H + g];
                    work[g] = v;
                }
                for (j = 0; j < H; j++) {
                    float gi = work[j], go = work[H + j], gf = work[2 * H + j], gc = work[3 * H + j], cn;
                    if (peep) {
                        gi += peep[j] * c[j];
                        gf += peep[2 * H + j] * c[j];
                    }
                    gi = sigmoid(clipped(gi, p->clip));
                    gf = sigmoid(clipped(gf, p->clip));
                    gc = tanhf(clipped(gc, p->clip));
                    cn = gf * c[j] + gi * gc;
                    if (peep) go += peep[H + j] * cn;
                    go = sigmoid(clipped(go, p->clip));
                    c[j] = cn;
                    work[j] = go * tanhf(cn); /* gate i is no longer needed: the new h */
                }
                for (j = 0; j < H; j++) h[j] = work[j];
                if (y) {
                    float *yr = y + y_row(p, tt, dir, b) * H;
                    for (j = 0; j < H; j++) yr[j] = h[j];
                }
            }
        }
    }
}

void onnxc_gru(const float *x, const float *h0, float *y, float *yh, float *work, const onnxc_rnn_p *p)
{
    int32_t H = p->hidden, I = p->input, B = p->batch, dir, b, t, g, j;
    float *rh = work + 3 * H; /* r * h (linear_before_reset = 0) or R_h h + Rb_h (= 1) */
    init_state(yh, h0, p->dirs * B * H);
    for (dir = 0; dir < p->dirs; dir++) {
        const float *W = p->w + dir * 3 * H * I, *R = p->r + dir * 3 * H * H;
        const float *bias = p->b ? p->b + dir * 6 * H : 0;
        for (t = 0; t < p->seq; t++) {
            for (b = 0; b < B; b++) {
                int32_t tt = step_index(p, dir, b, t);
                float *h = yh + state_row(p, dir, b) * H;
                const float *xt;
                if (tt < 0) {
                    zero_row(y, p, t, dir, b);
                    continue;
                }
                xt = x + x_row(p, tt, b) * I;
                for (g = 0; g < 2 * H; g++) {  /* gates z, r */
                    float v = dot(W + g * I, xt, I) + dot(R + g * H, h, H);
                    if (bias) v += bias[g] + bias[3 * H + g];
                    work[g] = sigmoid(clipped(v, p->clip));
                }
                for (j = 0; j < H; j++) {  /* the candidate's input part */
                    work[2 * H + j] = dot(W + (2 * H + j) * I, xt, I) + (bias ? bias[2 * H + j] : 0.0f);
                }
                if (p->linear_before_reset) {
                    for (j = 0; j < H; j++) {
                        float v = dot(R + (2 * H + j) * H, h, H) + (bias ? bias[5 * H + j] : 0.0f);
                        rh[j] = work[H + j] * v;
                    }
                } else {
                    for (j = 0; j < H; j++) rh[j] = work[H + j] * h[j];
                    for (j = 0; j < H; j++) work[H + j] = dot(R + (2 * H + j) * H, rh, H) + (bias ? bias[5 * H + j] : 0.0f);
                    for (j = 0; j < H; j++) rh[j] = work[H + j];
                }
                for (j = 0; j < H; j++) {
                    float hc = tanhf(clipped(work[2 * H + j] + rh[j], p->clip)), z = work[j];
                    h[j] = (1.0f - z) * hc + z * h[j];
                }
                if (y) {
                    float *yr = y + y_row(p, tt, dir, b) * H;
                    for (j = 0; j < H; j++) yr[j] = h[j];
                }
            }
        }
    }
}
