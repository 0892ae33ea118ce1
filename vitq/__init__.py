"""vitq: INT8 quantization pipeline for vision transformers (ONNX Runtime / TensorRT, Core ML).

The Python API (`vitq.quantize`, `vitq.Variant`, in vitq/api.py) is imported on first use, so that
`import vitq` and the CLI do not pay for torch.
"""

__version__ = "0.1.0"

__all__ = ["Variant", "__version__", "quantize"]


def __getattr__(name: str):
    if name in ("quantize", "Variant"):
        from vitq import api

        return getattr(api, name)
    raise AttributeError(f"module 'vitq' has no attribute {name!r}")
