"""Target backends: one module per runtime (onnx = ONNX Runtime / TensorRT-ready Q/DQ ONNX)."""
