/* Data movement: copies, strided copies (Transpose, Slice, Expand, non-contiguous Split) and
 * table-driven gathers (Pad in every mode, nearest Resize): per output dim a small int32 table
 * gives the input offset of each output index, -1 meaning "use the fill value". */
#include "onnxc_kernels.h"

void onnxc_copy(const float *x, float *y, int32_t n)
{
    int32_t i;
    if (x == y) return;
    for (i = 0; i < n; i++) y[i] = x[i];
}

void onnxc_copy2d(const float *x, float *y, int32_t rows, int32_t cols, int32_t x_stride, int32_t y_stride)
{
    int32_t r, i;
    for (r = 0; r < rows; r++) {
        const float *xr = x + r * x_stride;
        float *yr = y + r * y_stride;
        for (i = 0; i < cols; i++) yr[i] = xr[i];
    }
}

void onnxc_strided_copy(const float *x, float *y, const onnxc_strided_p *p)
{
    int32_t idx[ONNXC_MAXDIM] = {0};
    int32_t last = p->rank - 1, inner = p->dims[last], step = p->strides[last];
    int32_t outer = 1, o, d, i;
    for (d = 0; d < last; d++) outer *= p->dims[d];
    for (o = 0; o < outer; o++) {
        const float *xr = x + p->base;
        for (d = 0; d < last; d++) xr += idx[d] * p->strides[d];
        for (i = 0; i < inner; i++) *y++ = xr[i * step];
        for (d = last - 1; d >= 0; d--) {
            if (++idx[d] < p->dims[d]) break;
            idx[d] = 0;
        }
    }
}

void onnxc_gather_copy(const float *x, float *y, const onnxc_gather_p *p)
{
    int32_t idx[ONNXC_MAXDIM] = {0};
    int32_t last = p->rank - 1, inner = p->dims[last];
    const int32_t *tl = p->tab[last];
    int32_t outer = 1, o, d, i;
    for (d = 0; d < last; d++) outer *= p->dims[d];
    for (o = 0; o < outer; o++) {
        int32_t base = 0, fill = 0;
        for (d = 0; d < last; d++) {
            int32_t t = p->tab[d][idx[d]];
            if (t < 0) fill = 1;
            base += t;
        }
        for (i = 0; i < inner; i++) *y++ = (fill || tl[i] < 0) ? p->fill : x[base + tl[i]];
        for (d = last - 1; d >= 0; d--) {
            if (++idx[d] < p->dims[d]) break;
            idx[d] = 0;
        }
    }
}
