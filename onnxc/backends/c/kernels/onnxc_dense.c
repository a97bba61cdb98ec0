/* Matrix products: `onnxc_dense` for a constant weight (Gemm / MatMul with a weight in flash,
 * stored as [n][k] so each output is one sequential dot product over a weight row, dense or
 * read code by code from a clustered weight), and `onnxc_matmul` for two run-time operands
 * (batched, broadcast, transposed through strides). */
#include "onnxc_kernels.h"

void onnxc_dense(const float *x, const onnxc_weight *w, const float *bias, float *y, const onnxc_dense_p *p)
{
    int32_t i, j;
    for (i = 0; i < p->m; i++) {
        const float *xi = x + i * p->k;
        float *yi = y + i * p->n;
        for (j = 0; j < p->n; j++) {
            yi[j] = onnxc_weight_dot(w, j, j * p->k, xi, p->k, bias ? bias[j] : 0.0f);
        }
        onnxc_act_apply(yi, p->n, p->act, p->act_a, p->act_b);
    }
}

void onnxc_matmul(const float *a, const float *b, const float *c, float *y, const onnxc_matmul_p *p)
{
    int32_t bi, i, j, k;
    for (bi = 0; bi < p->batch; bi++) {
        const float *ab = a + (p->a_off ? p->a_off[bi] : 0);
        const float *bb = b + (p->b_off ? p->b_off[bi] : 0);
        float *yb = y + bi * p->m * p->n;
        for (i = 0; i < p->m; i++) {
            for (j = 0; j < p->n; j++) {
                float acc = 0.0f, v;
                const float *ar = ab + i * p->a_rs;
                const float *bc = bb + j * p->b_cs;
                for (k = 0; k < p->k; k++) acc += ar[k * p->a_cs] * bc[k * p->b_rs];
                v = p->alpha * acc;
                if (c) v += p->beta * c[i * p->c_rs + j * p->c_cs];
                yb[i * p->n + j] = v;
            }
        }
        onnxc_act_apply(yb, p->m * p->n, p->act, p->act_a, p->act_b);
    }
}
