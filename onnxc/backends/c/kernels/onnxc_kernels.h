/* onnxc kernels: plain C99, no allocation, no I/O.
 *
 * Every tensor is float32 in NCHW order. Each kernel family lives in its own file
 * (onnxc_conv.c, onnxc_dense.c, onnxc_eltwise.c, onnxc_pool.c, onnxc_norm.c, onnxc_layout.c);
 * generated code passes pointers into one static arena plus a `static const` parameter struct
 * that the compiler places in flash.
 */
#ifndef ONNXC_KERNELS_H
#define ONNXC_KERNELS_H

#include <stdint.h>

#define ONNXC_MAXDIM 6

/* int8 constant arrays start on a word, for kernels that read two words at once (LDRD). */
#ifdef __GNUC__
#define ONNXC_WORD_ALIGNED __attribute__((aligned(4)))
#else
#define ONNXC_WORD_ALIGNED
#endif

/* Unary operations; also used as the fused activation (`act`) of compute kernels. */
enum {
    ONNXC_OP_NONE = 0,
    ONNXC_OP_RELU,
    ONNXC_OP_CLIP,        /* a = min, b = max */
    ONNXC_OP_LEAKY_RELU,  /* a = alpha */
    ONNXC_OP_SIGMOID,
    ONNXC_OP_HARD_SIGMOID,/* a = alpha, b = beta */
    ONNXC_OP_HARD_SWISH,
    ONNXC_OP_TANH,
    ONNXC_OP_ELU,         /* a = alpha */
    ONNXC_OP_SELU,        /* a = alpha, b = gamma */
    ONNXC_OP_SOFTPLUS,
    ONNXC_OP_SOFTSIGN,
    ONNXC_OP_ABS,
    ONNXC_OP_NEG,
    ONNXC_OP_EXP,
    ONNXC_OP_LOG,
    ONNXC_OP_SQRT,
    ONNXC_OP_RECIPROCAL,
    ONNXC_OP_FLOOR,
    ONNXC_OP_CEIL,
    /* onnxc_math.c (onnxc_unary_math): functions most models never use, kept apart so that
     * their libm code is linked only when a model needs it */
    ONNXC_OP_ERF = 32,
    ONNXC_OP_GELU,
    ONNXC_OP_GELU_TANH,
    ONNXC_OP_MISH,
    ONNXC_OP_SIN,
    ONNXC_OP_COS,
    ONNXC_OP_TAN,
    ONNXC_OP_ASIN,
    ONNXC_OP_ACOS,
    ONNXC_OP_ATAN,
    ONNXC_OP_SINH,
    ONNXC_OP_COSH,
    ONNXC_OP_ASINH,
    ONNXC_OP_ACOSH,
    ONNXC_OP_ATANH,
    ONNXC_OP_SIGN,
    ONNXC_OP_ROUND,
    ONNXC_OP_THRESHOLDED_RELU, /* a = alpha */
    ONNXC_OP_SHRINK,           /* a = lambd, b = bias */
    ONNXC_OP_CELU,             /* a = alpha */
    ONNXC_OP_SWISH             /* a = alpha */
};

/* The activations compute kernels fuse (ReLU, Clip, LeakyReLU): no libm. Other activations
 * run as a separate in-place onnxc_unary call on the kernel's output. */
static inline float onnxc_act(float v, int32_t act, float a, float b)
{
    switch (act) {
    case ONNXC_OP_RELU: return v > 0.0f ? v : 0.0f;
    case ONNXC_OP_CLIP: v = v < a ? a : v; return v > b ? b : v;
    case ONNXC_OP_LEAKY_RELU: return v < 0.0f ? v * a : v;
    default: return v;
    }
}

static inline void onnxc_act_apply(float *y, int32_t n, int32_t act, float a, float b)
{
    int32_t i;
    if (act == ONNXC_OP_NONE) return;
    for (i = 0; i < n; i++) y[i] = onnxc_act(y[i], act, a, b);
}

/* Binary operations with numpy broadcasting. */
enum {
    ONNXC_BIN_ADD = 0,
    ONNXC_BIN_SUB,
    ONNXC_BIN_MUL,
    ONNXC_BIN_DIV,
    ONNXC_BIN_MAX,
    ONNXC_BIN_MIN,
    ONNXC_BIN_PRELU,      /* a < 0 ? a * b : a */
    ONNXC_BIN_POW
};

/* A constant weight in flash: dense floats, or k-means codes with a codebook.
 * Codes are read in place: 4-bit codes are packed two per byte (element i in the low nibble of
 * byte i/2 when i is even), 8-bit codes one per byte. Output row r reads its codebook from
 * codebook + row_base[r] (row_base NULL: one shared codebook). */
typedef struct {
    const float *dense;
    const uint8_t *codes;
    const float *codebook;
    const int32_t *row_base;
    int32_t bits;
} onnxc_weight;

static inline float onnxc_weight_at(const onnxc_weight *w, int32_t row, int32_t i)
{
    uint32_t code;
    if (w->dense) {
        return w->dense[i];
    }
    if (w->bits == 4) {
        code = (uint32_t)(w->codes[i >> 1] >> ((i & 1) << 2)) & 15u;
    } else {
        code = w->codes[i];
    }
    return w->codebook[(w->row_base ? w->row_base[row] : 0) + (int32_t)code];
}

/* acc + dot product of x[0..n) with weight elements [start, start + n) of output row `row`:
 * the inner loop of dense layers and 1x1 convolutions, reading 4-bit codes a byte (two weights)
 * at a time. */
static inline float onnxc_weight_dot(const onnxc_weight *w, int32_t row, int32_t start, const float *x, int32_t n,
                                     float acc)
{
    int32_t k = 0;
    const float *cb;
    if (w->dense) {
        const float *wr = w->dense + start;
        for (; k < n; k++) acc += x[k] * wr[k];
        return acc;
    }
    cb = w->codebook + (w->row_base ? w->row_base[row] : 0);
    if (w->bits == 4) {
        const uint8_t *c;
        if (n > 0 && (start & 1)) { /* odd start: high nibble of the first byte */
            acc += x[0] * cb[w->codes[start >> 1] >> 4];
            k = 1;
        }
        c = w->codes + ((start + k) >> 1);
        for (; k + 1 < n; k += 2, c++) {
            acc += x[k] * cb[*c & 15];
            acc += x[k + 1] * cb[*c >> 4];
        }
        if (k < n) acc += x[k] * cb[*c & 15];
    } else {
        const uint8_t *c = w->codes + start;
        for (; k < n; k++) acc += x[k] * cb[c[k]];
    }
    return acc;
}

/* ---- onnxc_eltwise.c ---------------------------------------------------------------- */
float onnxc_unary_scalar(float v, int32_t op, float a, float b);
void onnxc_unary(const float *x, float *y, int32_t n, int32_t op, float a, float b);

typedef struct {
    int32_t op;
    int32_t rank;                  /* dims collapsed at export time; innermost last */
    int32_t dims[ONNXC_MAXDIM];
    int32_t sa[ONNXC_MAXDIM];      /* element strides of a and b (0 where broadcast) */
    int32_t sb[ONNXC_MAXDIM];
    int32_t act;
    float act_a, act_b;
} onnxc_binary_p;
void onnxc_binary(const float *a, const float *b, float *y, const onnxc_binary_p *p);

/* ---- onnxc_conv.c ------------------------------------------------------------------- */
typedef struct {
    int32_t n, c, h, w;            /* input */
    int32_t m, oh, ow;             /* output channels and size */
    int32_t kh, kw, sh, sw, dh, dw;
    int32_t pt, pl;                /* padding before (the end padding follows from oh, ow) */
    int32_t group;
    int32_t act;
    float act_a, act_b;
} onnxc_conv_p;
void onnxc_conv2d(const float *x, const onnxc_weight *w, const float *bias, float *y, const onnxc_conv_p *p);
/* Transposed convolution: input pixel (ih, iw) scatters into output (ih*sh - pt + kh*dh, ...);
 * w is laid out like a Conv weight, [m][c/group][kh][kw]. */
void onnxc_conv_transpose2d(const float *x, const onnxc_weight *w, const float *bias, float *y,
                            const onnxc_conv_p *p);
/* In place 1x1 convolution (m <= c): scratch holds one pixel's channels (c floats). */
void onnxc_conv1x1_inplace(float *xy, const onnxc_weight *w, const float *bias, float *scratch,
                           const onnxc_conv_p *p);

/* ---- onnxc_pointwise.c -------------------------------------------------------------- */
/* 1x1 convolution, stride 1, no padding, one group, dense weight [m][c]. */
void onnxc_conv1x1(const float *x, const onnxc_weight *w, const float *bias, float *y, const onnxc_conv_p *p);
/* The same in place (m <= c): scratch holds four pixels' outputs (4 * m floats). */
void onnxc_conv1x1_tiled_inplace(float *xy, const onnxc_weight *w, const float *bias, float *scratch,
                                 const onnxc_conv_p *p);
/* Depthwise (group == c == m) in place, dense weight: scratch holds one zero-padded input plane. */
void onnxc_depthwise_inplace(float *xy, const onnxc_weight *w, const float *bias, float *scratch,
                             const onnxc_conv_p *p);

/* ---- onnxc_rnn.c -------------------------------------------------------------------- */
typedef struct {
    int32_t seq, batch, input, hidden;
    int32_t dirs;                  /* 1 or 2 (bidirectional: direction 1 runs backwards) */
    int32_t reverse;               /* dirs == 1: run backwards */
    int32_t linear_before_reset;   /* GRU */
    int32_t layout;                /* 0: [seq][batch][..], 1: [batch][seq][..] (states [batch][dirs][..]) */
    float clip;                    /* 0: none */
    const float *w, *r, *b;        /* ONNX layouts: [dirs][gates*hidden][input], [..][hidden], [dirs][2*gates*hidden] */
    const float *peep;             /* LSTM peepholes [dirs][3*hidden] or NULL */
    const int32_t *lens;           /* sequence length per batch element, or NULL (all seq) */
} onnxc_rnn_p;
/* Y may be NULL; yh (and yc) hold the running state; work holds 4 * hidden floats. */
void onnxc_lstm(const float *x, const float *h0, const float *c0, float *y, float *yh, float *yc, float *work,
                const onnxc_rnn_p *p);
void onnxc_gru(const float *x, const float *h0, float *y, float *yh, float *work, const onnxc_rnn_p *p);

/* ---- onnxc_dense.c ------------------------------------------------------------------ */
typedef struct {
    int32_t m, n, k;               /* y[m][n] = x[m][k] . w[n][k] + bias[n] */
    int32_t act;
    float act_a, act_b;
} onnxc_dense_p;
void onnxc_dense(const float *x, const onnxc_weight *w, const float *bias, float *y, const onnxc_dense_p *p);

typedef struct {
    int32_t batch, m, n, k;
    int32_t a_rs, a_cs, b_rs, b_cs;  /* a[i][k] = a[i*a_rs + k*a_cs]; b[k][j] = b[k*b_rs + j*b_cs] */
    int32_t c_rs, c_cs;              /* bias c[i][j] = c[i*c_rs + j*c_cs] (0 strides broadcast) */
    const int32_t *a_off, *b_off;    /* per batch element start offsets (NULL: all 0) */
    float alpha, beta;
    int32_t act;
    float act_a, act_b;
} onnxc_matmul_p;
void onnxc_matmul(const float *a, const float *b, const float *c, float *y, const onnxc_matmul_p *p);

/* ---- onnxc_pool.c ------------------------------------------------------------------- */
typedef struct {
    int32_t planes;                /* n * c */
    int32_t id, ih, iw, od, oh, ow;
    int32_t kd, kh, kw, sd, sh, sw, dd, dh, dw;
    int32_t pd, ph, pw;            /* padding before */
    int32_t ed, eh, ew;            /* padding after */
    int32_t is_max, count_include_pad;
} onnxc_pool_p;
void onnxc_pool(const float *x, float *y, const onnxc_pool_p *p);
void onnxc_global_pool(const float *x, float *y, int32_t planes, int32_t len, int32_t is_max);

/* ---- onnxc_math.c ------------------------------------------------------------------- */
void onnxc_unary_math(const float *x, float *y, int32_t n, int32_t op, float a, float b);

/* ---- onnxc_reduce.c ----------------------------------------------------------------- */
enum {
    ONNXC_RED_SUM = 0, ONNXC_RED_MEAN, ONNXC_RED_MAX, ONNXC_RED_MIN, ONNXC_RED_PROD, ONNXC_RED_SUM_SQUARE,
    ONNXC_RED_L1, ONNXC_RED_L2, ONNXC_RED_LOG_SUM, ONNXC_RED_LOG_SUM_EXP
};
typedef struct {
    int32_t op;
    int32_t rank;                   /* kept dims (the output, row-major) */
    int32_t dims[ONNXC_MAXDIM];
    int32_t strides[ONNXC_MAXDIM];  /* their input strides */
    int32_t rrank;                  /* reduced dims */
    int32_t rdims[ONNXC_MAXDIM];
    int32_t rstrides[ONNXC_MAXDIM];
} onnxc_reduce_p;
void onnxc_reduce(const float *x, float *y, const onnxc_reduce_p *p);

/* ---- onnxc_norm.c ------------------------------------------------------------------- */
void onnxc_softmax(const float *x, float *y, int32_t outer, int32_t len, int32_t inner, int32_t log);
void onnxc_channel_affine(const float *x, float *y, int32_t n, int32_t c, int32_t inner,
                          const float *scale, const float *shift);
void onnxc_lrn(const float *x, float *y, int32_t n, int32_t c, int32_t inner, int32_t size,
               float alpha, float beta, float bias);

/* ---- onnxc_layout.c ----------------------------------------------------------------- */
void onnxc_copy(const float *x, float *y, int32_t n);
void onnxc_copy2d(const float *x, float *y, int32_t rows, int32_t cols, int32_t x_stride, int32_t y_stride);

typedef struct {
    int32_t rank;
    int32_t dims[ONNXC_MAXDIM];    /* output dims */
    int32_t strides[ONNXC_MAXDIM]; /* input element stride per output dim (may be 0 or negative) */
    int32_t base;                  /* input offset of output element 0 */
} onnxc_strided_p;
void onnxc_strided_copy(const float *x, float *y, const onnxc_strided_p *p);

typedef struct {
    int32_t rank;
    int32_t dims[ONNXC_MAXDIM];    /* output dims */
    const int32_t *tab[ONNXC_MAXDIM]; /* per dim: input offset of each output index, -1: fill */
    float fill;
} onnxc_gather_p;
void onnxc_gather_copy(const float *x, float *y, const onnxc_gather_p *p);

/* ---- onnxc_resize.c ----------------------------------------------------------------- */
typedef struct {
    int32_t rank;
    int32_t dims[ONNXC_MAXDIM];         /* output dims */
    int32_t taps[ONNXC_MAXDIM];         /* input samples per output index, per dim */
    const int32_t *off[ONNXC_MAXDIM];   /* [dims * taps] input offsets (-1: extrapolated, use fill) */
    const float *wt[ONNXC_MAXDIM];      /* [dims * taps] interpolation weights */
    float fill;
} onnxc_resize_p;
void onnxc_resize(const float *x, float *y, const onnxc_resize_p *p);

#endif /* ONNXC_KERNELS_H */
