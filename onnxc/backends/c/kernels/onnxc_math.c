/* Less common elementwise functions (trigonometric, erf-based GELU, Mish, rounding...), apart
 * from onnxc_unary so that a model links their libm code only when it uses them. In place
 * is fine. */
#include <math.h>

#include "onnxc_kernels.h"

static float math_scalar(float v, int32_t op, float a, float b)
{
    switch (op) {
    case ONNXC_OP_ERF: return erff(v);
    case ONNXC_OP_GELU: return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    case ONNXC_OP_GELU_TANH:
        return 0.5f * v * (1.0f + tanhf(0.79788456080286536f * (v + 0.044715f * v * v * v)));
    case ONNXC_OP_MISH: return v * tanhf(v > 20.0f ? v : log1pf(expf(v)));
    case ONNXC_OP_SIN: return sinf(v);
    case ONNXC_OP_COS: return cosf(v);
    case ONNXC_OP_TAN: return tanf(v);
    case ONNXC_OP_ASIN: return asinf(v);
    case ONNXC_OP_ACOS: return acosf(v);
    case ONNXC_OP_ATAN: return atanf(v);
    case ONNXC_OP_SINH: return sinhf(v);
    case ONNXC_OP_COSH: return coshf(v);
    case ONNXC_OP_ASINH: return asinhf(v);
    case ONNXC_OP_ACOSH: return acoshf(v);
    case ONNXC_OP_ATANH: return atanhf(v);
    case ONNXC_OP_SIGN: return v > 0.0f ? 1.0f : (v < 0.0f ? -1.0f : v);
    case ONNXC_OP_ROUND: return rintf(v); /* default rounding: half to even, as ONNX Round */
    case ONNXC_OP_THRESHOLDED_RELU: return v > a ? v : 0.0f;
    case ONNXC_OP_SHRINK: return v < -a ? v + b : (v > a ? v - b : 0.0f);
    case ONNXC_OP_CELU: return (v > 0.0f ? v : 0.0f) + (a * expm1f((v < 0.0f ? v : 0.0f) / a));
    case ONNXC_OP_SWISH: return v / (1.0f + expf(-a * v));
    default: return v;
    }
}

void onnxc_unary_math(const float *x, float *y, int32_t n, int32_t op, float a, float b)
{
    int32_t i;
    for (i = 0; i < n; i++) y[i] = math_scalar(x[i], op, a, b);
}
