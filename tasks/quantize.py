"""Q/DQ ONNX variants: one per ONNX-graph recipe (onnx-*, tensorrt-*), each in its own folder that says where it
came from. The target that serves the graph (vitq.tasks.targets.onnx / .tensorrt) passes how it serves it."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import onnx

from vitq.tasks._io import atomic_dir, write_json
from vitq.tasks.targets.onnx import backend as onnx_backend
from vitq.tasks.calibrate import table_path
from vitq.tasks.conformance import assert_conforms, tensorrt_readiness
from vitq.tasks.variant import VariantArtifact, variant_dir
from vitq.recipes import Recipe, get_recipe

log = logging.getLogger("vitq.quantize")


# How a target serves a checked Q/DQ graph: (recipe, variant folder, the graph loaded, variants dir) -> the
# name of the file it serves, written into the folder (`Target.serve_graph`).
ServeGraph = Callable[[Recipe, Path, onnx.ModelProto, Path], str]


def quantize_variant(
    recipe_name: str, prep_onnx: Path, calibration_dir: Path, variants_dir: Path, serve: ServeGraph,
    recovery_inputs=None,
) -> VariantArtifact:
    """Quantize the FP32 model with one ONNX-graph recipe (OnnxDynamicConfig, OnnxStaticConfig and
    TensorRTStaticConfig) into `variants_dir/<recipe>/`; the layers its `float_layers` globs name stay float.
    Recovery recipes (`recipe.recovery`) also read the model, data and params: `recovery_inputs`
    (a `vitq.tasks.recovery.variants.Inputs`)."""
    from vitq.tasks.recovery import layers as layer_map, variants as recovery

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
        artifact_name = serve(recipe, tmp, quantized, variants_dir)
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
            exporter=VariantArtifact.exporter_beside(prep_onnx),
        )
        write_json(tmp / "variant.json", asdict(artifact))
    log.info(
        "quantize: %s -> %.2f MB, int8 weights %.0f%%, int8 MACs %.1f%%, %d float layer(s) (%.1fs)",
        recipe.name, artifact.size_mb, 100 * artifact.int8_weight_fraction, 100 * artifact.int8_mac_fraction,
        len(artifact.float_layers), time.perf_counter() - start,
    )
    return artifact
