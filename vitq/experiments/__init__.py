"""The experiment commands: one module each, named for what it measures.

- `latency.py`: `vitq latency` (alias `vitq bench`): FP32 vs dynamic vs static INT8 latency on this CPU.
- `coreml_coverage.py`: `vitq coreml-coverage` (alias `vitq coreml-bench`): Core ML sizes and int8 coverage.
- `recovery_accuracy.py`: `vitq recovery-accuracy` (alias `vitq recovery`): plain INT8 vs the recovery
  recipes, accuracy per case (times nothing).
- `peers.py`: `vitq peers`: ONNX Runtime's, NNCF's and ModelOpt's INT8 beside vitq's recipes on
  recovery-accuracy's cases; `quantize_peer` / `qdq_placement` per model (ModelOpt in its own venv and process:
  `modelopt_runner.py`).
- `zoo.py` + `zoo_cell.py`: `vitq zoo`: 42 vision transformers through every target form and the peers, each
  model and target in its own process.

They run the pipeline's stage functions on models named on the command line (`_models.resolve_model`);
the pipeline itself (`tasks/`, `flows/`) does not import them.
"""
