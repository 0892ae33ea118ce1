"""Deployment targets, one folder each, holding its Target and its backend together:

- `onnx/`: ONNX Runtime (`target.py`: the Q/DQ-graph path that onnx and tensorrt share; `backend.py`: ORT
  quantization, serving-form rewrites, sessions),
- `tensorrt/`: TensorRT engines from the Q/DQ graph (`target.py`, `backend.py`, `fp16.py`),
- `coreml/`: Core ML programs converted from the torch model (`target.py`, `backend.py`).

`base.py` is the interface they share; `registry.py` is the one lookup by name (recipes, params.yaml, the CLI,
plugins). Stages call down into a target; a target never imports the stages or the registry. This file imports
nothing, so a low module may use a backend (`vitq.tasks.targets.onnx.backend`) without loading the targets.
"""
