"""The coreml target: its Target (target.py) and its backend (backend.py)."""
