"""A toy target as a plugin, outside vitq: its "variant" is the FP32 ONNX itself; validation and timing
are inherited from the ONNX-graph target (ONNX Runtime). Loaded by `VITQ_PLUGINS=vitq_identity` (on PYTHONPATH)."""

import shutil
from dataclasses import asdict, dataclass

from vitq.tasks._io import atomic_dir, size_mb, write_json
from vitq.tasks.targets.onnx.target import OnnxGraphTarget
from vitq.tasks.targets.registry import register_target
from vitq.tasks.variant import VariantArtifact, variant_dir
from vitq.recipes import RecipeConfig, get_recipe, register_recipe


@dataclass(frozen=True)
class IdentityTarget(OnnxGraphTarget):
    def quantize(self, ws, name, p=None):
        with atomic_dir(variant_dir(ws.variants_dir, name)) as tmp:
            shutil.copyfile(ws.export_dir / "model.onnx", tmp / "model.onnx")
            art = VariantArtifact(
                name=name, recipe=asdict(get_recipe(name)), artifact="model.onnx", qdq_artifact="model.onnx",
                size_mb=size_mb(tmp / "model.onnx"), int8_weight_fraction=0.0, op_counts={},
                calibration_table=None, tensorrt_ready=False, tensorrt_note="identity target: no Q/DQ",
            )
            write_json(tmp / "variant.json", asdict(art))
        return art


TARGET = register_target(IdentityTarget("identity", "cpu", ("onnxruntime",)))
# A target of its own: the common recipe config (vitq.recipes.RecipeConfig), no target-specific fields.
RECIPE = register_recipe(RecipeConfig(name="identity-fp32", target="identity", scheme="float",
                                      description="the FP32 ONNX, unchanged"))
