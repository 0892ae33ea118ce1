"""vitq: INT8 quantization pipeline for vision transformers (ONNX Runtime / TensorRT, Core ML)."""

__version__ = "0.1.0"
