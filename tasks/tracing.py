"""One lock around graph capture (`torch.export`, `torch.onnx.export(dynamo=True)`, PT2E, `ct.convert`).

Graph capture keeps process-wide state (the dispatch-mode stack, the fake-tensor tracer), so two
threads tracing at once corrupt each other ("Trying to pop empty mode stack", untracked SymInts).
The flow runs variants in threads; every capture in `tasks/` takes this lock, so variants still
overlap in their calibration, quantization and validation work but never trace concurrently.
"""

from __future__ import annotations

import threading

TRACE_LOCK = threading.RLock()
