"""Quantize stage: one variant per recipe, each in its own folder that says where it came from."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx

from tasks._io import atomic_dir, read_json, write_json
from tasks.backends import onnx as onnx_backend
from tasks.calibrate import table_path
from tasks.conformance import assert_conforms, tensorrt_readiness
from tasks.targets import get_target
from vitq.recipes import Recipe, get_recipe

log = logging.getLogger("vitq.quantize")


@dataclass(frozen=True)
class VariantArtifact:
    name: str
    recipe: dict  # the Recipe, as a dict
    artifact: str  # file the target's runtime serves, inside the variant folder
    qdq_artifact: str  # the portable Q/DQ ONNX (what TensorRT builds from)
    size_mb: float
    int8_weight_fraction: float  # share of linear/conv/matmul weight elements stored as int8
    op_counts: dict[str, int]
    calibration_table: str | None
    tensorrt_ready: bool  # valid for TensorRT explicit quantization (conformance-checked Q/DQ)
    tensorrt_note: str | None  # why not, when it is not
    # Torch module names of the Linear/Conv layers left in float (what the Core ML target skips too),
    # the attention matmuls left in float (`<attn>#qk` / `#av`), and the share of Linear/Conv MACs in INT8.
    float_layers: list[str] = field(default_factory=list)
    float_attention: list[str] = field(default_factory=list)
    int8_mac_fraction: float | None = None


def variant_dir(variants_dir: Path, name: str) -> Path:
    return Path(variants_dir) / name


def quantize_variant(
    recipe_name: str, prep_onnx: Path, calibration_dir: Path, variants_dir: Path, recovery_inputs=None
) -> VariantArtifact:
    """Quantize the FP32 model with one ONNX-graph recipe (OnnxDynamicConfig, OnnxStaticConfig and
    TensorRTStaticConfig) into `variants_dir/<recipe>/`; the layers its `float_layers` globs name stay float.
    Recovery recipes (`recipe.recovery`) also read the model, data and params: `recovery_inputs`
    (a `tasks.recovery.variants.Inputs`)."""
    from tasks.recovery import layers as layer_map, variants as recovery

    recipe: Recipe = get_recipe(recipe_name)
    if recipe.recovery and recovery_inputs is None:
        raise ValueError(f"recipe {recipe.name!r} needs the model, data and params: pass recovery_inputs")
    table = table_path(calibration_dir, *recipe.table()) if recipe.table() else None
    if table is not None and not table.is_file():
        raise FileNotFoundError(f"calibration table {table} is missing; rerun the calibrate stage")
    layers = None if recipe.recovery else layer_map.quantizable_layers(Path(prep_onnx).with_name("model.onnx"), prep_onnx)
    # The recipe's float_layers globs, resolved before anything is written (a pattern matching nothing: ConfigError).
    keep_float = layer_map.match_layers(recipe.float_layers, [layer.name for layer in layers if layer.weighted]) \
        if layers is not None else []
    start = time.perf_counter()
    out = variant_dir(variants_dir, recipe.name)
    with atomic_dir(out) as tmp:
        if recipe.recovery:
            with recovery.scratch_dir(tmp.parent) as scratch:
                decision = recovery.build(recipe, recovery_inputs, tmp, Path(scratch))
            layers = decision.layers
        else:
            onnx_backend.quantize(recipe, prep_onnx, tmp / "model.onnx", table, layer_map.nodes_of(layers, keep_float))
        onnx.checker.check_model(str(tmp / "model.onnx"))
        quantized = onnx.load(str(tmp / "model.onnx"))
        assert_conforms(quantized)  # a violation fails the variant, naming the node
        trt_note = tensorrt_readiness(quantized)
        artifact_name = get_target(recipe.target).serve_graph(recipe, tmp, quantized, variants_dir)
        fp32_weights = onnx_backend.linear_weight_elements(onnx.load(str(prep_onnx)))
        artifact = VariantArtifact(
            name=recipe.name,
            recipe=asdict(recipe),
            artifact=artifact_name,
            qdq_artifact="model.onnx",
            size_mb=(tmp / artifact_name).stat().st_size / 2**20,
            int8_weight_fraction=min(1.0, onnx_backend.int8_weight_elements(quantized) / max(fp32_weights, 1)),
            op_counts=onnx_backend.op_counts(quantized),
            calibration_table=table.name if table else None,
            tensorrt_ready=trt_note is None,
            tensorrt_note=trt_note,
            **recovery.layer_precision(layers, quantized),
        )
        write_json(tmp / "variant.json", asdict(artifact))
    log.info(
        "quantize: %s -> %.2f MB, int8 weights %.0f%%, int8 MACs %.1f%%, %d float layer(s) (%.1fs)",
        recipe.name, artifact.size_mb, 100 * artifact.int8_weight_fraction, 100 * artifact.int8_mac_fraction,
        len(artifact.float_layers), time.perf_counter() - start,
    )
    return artifact


def load_variant(variants_dir: Path, name: str) -> VariantArtifact:
    return VariantArtifact(**read_json(variant_dir(variants_dir, name) / "variant.json"))
