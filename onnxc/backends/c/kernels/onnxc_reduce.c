/* Reductions over any set of axes (ReduceSum/Mean/Max/Min/Prod/SumSquare/L1/L2/LogSum/
 * LogSumExp): for each output element, walk the reduced dims with their input strides. Export
 * time merges dims walked contiguously, so the common cases are a single inner loop. Over an
 * empty set: sum 0, prod 1, max -inf, min +inf, mean NaN, log-sums -inf. */
#include <math.h>

#include "onnxc_kernels.h"

static float reduce_one(const float *x, const onnxc_reduce_p *p, int32_t op, float shift)
{
    int32_t idx[ONNXC_MAXDIM] = {0};
    int32_t last = p->rrank - 1, inner = p->rrank ? p->rdims[last] : 1, step = p->rrank ? p->rstrides[last] : 0;
    int32_t outer = 1, o, d, i;
    float acc = op == ONNXC_RED_PROD ? 1.0f : (op == ONNXC_RED_MAX ? -INFINITY : (op == ONNXC_RED_MIN ? INFINITY : 0.0f));
    for (d = 0; d < last; d++) outer *= p->rdims[d];
    for (o = 0; o < outer; o++) {
        const float *xr = x;
        for (d = 0; d < last; d++) xr += idx[d] * p->rstrides[d];
        for (i = 0; i < inner; i++) {
            float v = xr[i * step];
            switch (op) {
            case ONNXC_RED_MAX: if (v > acc || v != v) acc = v; break;
            case ONNXC_RED_MIN: if (v < acc || v != v) acc = v; break;
            case ONNXC_RED_PROD: acc *= v; break;
            case ONNXC_RED_SUM_SQUARE: case ONNXC_RED_L2: acc += v * v; break;
            case ONNXC_RED_L1: acc += fabsf(v); break;
            case ONNXC_RED_LOG_SUM_EXP: acc += expf(v - shift); break;
            default: acc += v; break;
            }
        }
        for (d = last - 1; d >= 0; d--) {
            if (++idx[d] < p->rdims[d]) break;
            idx[d] = 0;
        }
    }
    return acc;
}

void onnxc_reduce(const float *x, float *y, const onnxc_reduce_p *p)
{
    int32_t idx[ONNXC_MAXDIM] = {0};
    int32_t total = 1, count = 1, e, d;
    for (d = 0; d < p->rank; d++) total *= p->dims[d];
    for (d = 0; d < p->rrank; d++) count *= p->rdims[d];
    for (e = 0; e < total; e++) {
        const float *xb = x;
        float v;
        for (d = 0; d < p->rank; d++) xb += idx[d] * p->strides[d];
        if (p->op == ONNXC_RED_LOG_SUM_EXP) {
            float mx = count ? reduce_one(xb, p, ONNXC_RED_MAX, 0.0f) : -INFINITY;
            if (isinf(mx)) {
                v = mx; /* empty set, or -inf/+inf maximum */
            } else {
                v = mx + logf(reduce_one(xb, p, ONNXC_RED_LOG_SUM_EXP, mx));
            }
        } else {
            v = reduce_one(xb, p, p->op, 0.0f);
            if (p->op == ONNXC_RED_MEAN) v = v / (float)count;
            else if (p->op == ONNXC_RED_L2) v = sqrtf(v);
            else if (p->op == ONNXC_RED_LOG_SUM) v = logf(v);
        }
        *y++ = v;
        for (d = p->rank - 1; d >= 0; d--) {
            if (++idx[d] < p->dims[d]) break;
            idx[d] = 0;
        }
    }
}
