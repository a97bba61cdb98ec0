/* Elementwise kernels: unary activations and broadcasting binary operations.
 * All of them may run in place (y == x, or y == a / y == b when that input has y's shape):
 * each element is read before the same index is written. */
#include <math.h>

#include "onnxc_kernels.h"

float onnxc_unary_scalar(float v, int32_t op, float a, float b)
{
    switch (op) {
    case ONNXC_OP_RELU: return v > 0.0f ? v : 0.0f;
    case ONNXC_OP_CLIP: v = v < a ? a : v; return v > b ? b : v; /* min > max gives max */
    case ONNXC_OP_LEAKY_RELU: return v < 0.0f ? v * a : v;
    case ONNXC_OP_SIGMOID: return 1.0f / (1.0f + expf(-v));
    case ONNXC_OP_HARD_SIGMOID: {
        float t = a * v + b;
        return t < 0.0f ? 0.0f : (t > 1.0f ? 1.0f : t);
    }
    case ONNXC_OP_HARD_SWISH: {
        float t = v / 6.0f + 0.5f;
        return v * (t < 0.0f ? 0.0f : (t > 1.0f ? 1.0f : t));
    }
    case ONNXC_OP_TANH: return tanhf(v);
    case ONNXC_OP_ELU: return v < 0.0f ? a * (expf(v) - 1.0f) : v;
    case ONNXC_OP_SELU: return v <= 0.0f ? b * (a * expf(v) - a) : b * v;
    case ONNXC_OP_SOFTPLUS: return v > 20.0f ? v : log1pf(expf(v));
    case ONNXC_OP_SOFTSIGN: return v / (1.0f + fabsf(v));
    case ONNXC_OP_ABS: return fabsf(v);
    case ONNXC_OP_NEG: return -v;
    case ONNXC_OP_EXP: return expf(v);
    case ONNXC_OP_LOG: return logf(v);
    case ONNXC_OP_SQRT: return sqrtf(v);
    case ONNXC_OP_RECIPROCAL: return 1.0f / v;
    case ONNXC_OP_FLOOR: return floorf(v);
    case ONNXC_OP_CEIL: return ceilf(v);
    default: return v;
    }
}

void onnxc_unary(const float *x, float *y, int32_t n, int32_t op, float a, float b)
{
    int32_t i;
    switch (op) {
    case ONNXC_OP_NONE:
        if (x != y) {
            for (i = 0; i < n; i++) y[i] = x[i];
        }
        break;
    case ONNXC_OP_RELU: /* the hot activations get their own loops */
        for (i = 0; i < n; i++) y[i] = x[i] > 0.0f ? x[i] : 0.0f;
        break;
    case ONNXC_OP_CLIP:
        for (i = 0; i < n; i++) {
            float v = x[i] < a ? a : x[i];
            y[i] = v > b ? b : v;
        }
        break;
    default:
        for (i = 0; i < n; i++) y[i] = onnxc_unary_scalar(x[i], op, a, b);
        break;
    }
}

static void binary_row(int32_t op, const float *a, int32_t sa, const float *b, int32_t sb, float *y, int32_t n)
{
    int32_t i;
    switch (op) {
    case ONNXC_BIN_ADD: for (i = 0; i < n; i++) y[i] = a[i * sa] + b[i * sb]; break;
    case ONNXC_BIN_SUB: for (i = 0; i < n; i++) y[i] = a[i * sa] - b[i * sb]; break;
    case ONNXC_BIN_MUL: for (i = 0; i < n; i++) y[i] = a[i * sa] * b[i * sb]; break;
    case ONNXC_BIN_DIV: for (i = 0; i < n; i++) y[i] = a[i * sa] / b[i * sb]; break;
    case ONNXC_BIN_MAX:
        for (i = 0; i < n; i++) {
            float u = a[i * sa], v = b[i * sb];
            y[i] = (u != u || u > v) ? u : v; /* NaN propagates like numpy.maximum */
        }
        break;
    case ONNXC_BIN_MIN:
        for (i = 0; i < n; i++) {
            float u = a[i * sa], v = b[i * sb];
            y[i] = (u != u || u < v) ? u : v;
        }
        break;
    case ONNXC_BIN_PRELU:
        for (i = 0; i < n; i++) {
            float u = a[i * sa];
            y[i] = u < 0.0f ? u * b[i * sb] : u;
        }
        break;
    case ONNXC_BIN_POW: for (i = 0; i < n; i++) y[i] = powf(a[i * sa], b[i * sb]); break;
    default: break;
    }
}

void onnxc_binary(const float *a, const float *b, float *y, const onnxc_binary_p *p)
{
    int32_t idx[ONNXC_MAXDIM] = {0};
    int32_t last = p->rank - 1, inner = p->dims[last];
    int32_t outer = 1, o, d, total;
    for (d = 0; d < last; d++) outer *= p->dims[d];
    for (o = 0; o < outer; o++) {
        int32_t oa = 0, ob = 0;
        for (d = 0; d < last; d++) {
            oa += idx[d] * p->sa[d];
            ob += idx[d] * p->sb[d];
        }
        binary_row(p->op, a + oa, p->sa[last], b + ob, p->sb[last], y + (int32_t)o * inner, inner);
        for (d = last - 1; d >= 0; d--) { /* odometer over the outer dims */
            if (++idx[d] < p->dims[d]) break;
            idx[d] = 0;
        }
    }
    total = outer * inner;
    onnxc_act_apply(y, total, p->act, p->act_a, p->act_b);
}
