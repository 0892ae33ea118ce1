"""Accuracy recovery when plain INT8 breaks a transformer.

One vocabulary for every target: a layer is named by its torch module qualified name
(`blocks.3.mlp.fc1`; attention's two activation matmuls are `blocks.3.attn#qk` and
`blocks.3.attn#av`). The ONNX backend maps those names to node names through the torch scope the
dynamo exporter stores in each node (`layers.onnx_layer_nodes`); the Core ML target reads the same
names (`float_layers`) to leave the same modules unquantized.

- `sensitivity`: per-layer metric drop (only this layer quantized / only this layer float,
  weight vs activation), ranked, as CSV + bar plot.
- `mixed_precision`: layers back to float in sensitivity order until the validate budget holds.
- `smoothquant`: LayerNorm -> Linear activation-scale migration, alpha searched on calibration data.
- `calib_search`: per-tensor choice among minmax / percentiles / entropy / MSE by layer output error.
- `qat`: short quantization-aware fine-tune (fake quant, straight-through gradients).
- `outliers`: the function-preserving outlier transform that makes plain W8A8 break.
- `variants`: what the quantize stage calls for the recovery recipes.
- `bench`: `vitq recovery`, the side-by-side table in `reports/recovery.json`.
"""

from __future__ import annotations

from pathlib import Path


def float_layers(variant_folder: Path, include_attention: bool = False) -> frozenset[str]:
    """Torch module names a variant leaves in float (its `variant.json` `float_layers`).

    The Core ML target quantizes every Linear/Conv whose qualified name is not in this set, so both
    targets carry the same decision. `include_attention` adds `<attn>#qk` / `<attn>#av` for the
    activation matmuls the recipe keeps in float (all of them unless it sets `quantize_attention`).
    """
    from vitq.tasks._io import read_json

    record = read_json(Path(variant_folder) / "variant.json")
    names = set(record.get("float_layers", []))
    if include_attention:
        names |= set(record.get("float_attention", []))
    return frozenset(names)


def recovered_model_dir(variant_folder: Path) -> Path | None:
    """The model dir (`model.pt` + `model.json`, load with `vitq.tasks.model.load_model`) of a variant whose
    recipe changed the FP32 weights (SmoothQuant, QAT), else None: convert these weights, not the
    original's, to carry the same recovery to another target."""
    folder = Path(variant_folder) / "torch"
    return folder if (folder / "model.pt").is_file() else None
