/* Separable interpolation (Resize linear / cubic, antialiased or not, any coordinate mode):
 * output element (i_0 .. i_r) = sum over tap combinations of prod_d wt[d][i_d][t_d] times the
 * input at sum_d off[d][i_d][t_d]. The per-dim tap tables are computed at export time, so the
 * kernel knows nothing of coordinate transformations. */
#include "onnxc_kernels.h"

void onnxc_resize(const float *x, float *y, const onnxc_resize_p *p)
{
    int32_t idx[ONNXC_MAXDIM] = {0}, t[ONNXC_MAXDIM];
    int32_t total = 1, e, d;
    for (d = 0; d < p->rank; d++) total *= p->dims[d];
    for (e = 0; e < total; e++) {
        float acc = 0.0f;
        int32_t fill = 0;
        for (d = 0; d < p->rank; d++) {
            if (p->off[d][idx[d] * p->taps[d]] < 0) fill = 1;
            t[d] = 0;
        }
        while (!fill) {
            int32_t o = 0;
            float w = 1.0f;
            for (d = 0; d < p->rank; d++) {
                int32_t k = idx[d] * p->taps[d] + t[d];
                o += p->off[d][k];
                w *= p->wt[d][k];
            }
            acc += w * x[o];
            for (d = p->rank - 1; d >= 0; d--) { /* next tap combination */
                if (++t[d] < p->taps[d]) break;
                t[d] = 0;
            }
            if (d < 0) break;
        }
        *y++ = fill ? p->fill : acc;
        for (d = p->rank - 1; d >= 0; d--) { /* next output element */
            if (++idx[d] < p->dims[d]) break;
            idx[d] = 0;
        }
    }
}
