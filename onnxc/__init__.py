"""onnxc: compress trained ONNX models with verified rewrites, lower them to onnxruntime or C."""
__version__ = "0.1.0"
