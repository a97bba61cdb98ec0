"""onnxc: compress trained ONNX models with verified rewrites, lower them to onnxruntime or C.

    import onnxc
    result = onnxc.optimize("model.onnx", passes=["prune:ratio=0.5"], calibration="calib.npz",
                            output="small.onnx")
    print(result.report.fidelity)
"""

__version__ = "0.1.0"

from onnxc.api import OptimizeResult, compare, export, inspect, optimize  # noqa: E402
from onnxc.compiler.canonical import canonicalize  # noqa: E402
from onnxc.compiler.model import load, save  # noqa: E402
from onnxc.compiler.passes import Pass, PassContext, PassResult, register  # noqa: E402
from onnxc.compiler.recipe import Recipe  # noqa: E402
from onnxc.errors import OnnxcError, UsageError, VerificationError  # noqa: E402

__all__ = ["OptimizeResult", "compare", "export", "inspect", "optimize", "canonicalize", "load", "save", "Pass",
           "PassContext", "PassResult", "register", "Recipe", "OnnxcError", "UsageError", "VerificationError"]
