"""The onnx target: its Target (target.py) and its backend (backend.py)."""
