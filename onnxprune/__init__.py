"""onnxprune: data-informed block-sparse attention for portable ONNX models."""

__version__ = "0.1.0"
