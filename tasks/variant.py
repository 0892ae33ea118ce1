"""A variant's record: what each variant folder's `variant.json` holds, and where the folder is."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vitq.tasks._io import read_json


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
    # What exported the FP32 graph it was quantized from ("dynamo" / "torchscript" / "onnx": export.json's
    # `exporter`); None: not recorded (a variant.json written before the field, or no export.json beside it).
    exporter: str | None = None

    @staticmethod
    def exporter_beside(prep_onnx: Path) -> str | None:
        """The `exporter` of the export.json beside the FP32 graph `prep_onnx` (one without the field: "dynamo",
        what wrote it then); None without an export.json."""
        path = Path(prep_onnx).with_name("export.json")
        return read_json(path).get("exporter", "dynamo") if path.is_file() else None


def variant_dir(variants_dir: Path, name: str) -> Path:
    return Path(variants_dir) / name


def load_variant(variants_dir: Path, name: str) -> VariantArtifact:
    return VariantArtifact(**read_json(variant_dir(variants_dir, name) / "variant.json"))
