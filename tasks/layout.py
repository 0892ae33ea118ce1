"""Where each stage reads and writes inside a workspace (the directory holding params.yaml).

These paths are the stage contracts that dvc.yaml declares as deps/outs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Workspace:
    root: Path

    @property
    def params_file(self) -> Path:
        return self.root / "params.yaml"

    @property
    def data_dir(self) -> Path:  # train/calibration/validation .npz + meta.json
        return self.root / "data" / "prepared"

    @property
    def model_dir(self) -> Path:  # model.pt (state dict) + model.json (how to rebuild it)
        return self.root / "models" / "fp32"

    @property
    def export_dir(self) -> Path:  # model.onnx, model.prep.onnx, export.json
        return self.root / "artifacts" / "export"

    @property
    def calibration_dir(self) -> Path:  # <method>.json tables + calibration.json
        return self.root / "artifacts" / "calibration"

    @property
    def needs_dir(self) -> Path:  # <intermediate>.json: whether a configured recipe reads it (and how it is made)
        return self.root / "artifacts" / "needs"

    @property
    def search_dir(self) -> Path:  # the per-tensor range search: calibration.json + calibration_search.csv + search.json
        return self.root / "artifacts" / "search"

    @property
    def smoothquant_dir(self) -> Path:  # SmoothQuant: torch/ (smoothed weights), export/, calibration/, smoothquant.json
        return self.root / "artifacts" / "smoothquant"

    @property
    def variants_dir(self) -> Path:  # <variant>/model.onnx + variant.json
        return self.root / "artifacts" / "variants"

    @property
    def plan_dir(self) -> Path:  # <variant>.json: what each variant stage reads (recipe, params, table digest)
        return self.root / "artifacts" / "plan"

    @property
    def validation_dir(self) -> Path:  # <variant>/ per variant (its DVC stage's output) + fp32/ (the reference)
        return self.root / "reports" / "validation"

    def validation_for(self, name: str) -> Path:
        """`<variant>/<variant>.json` (+ .errors.csv/.png), `fp32/fp32.json` + `fp32.npy`."""
        return self.validation_dir / name

    def error_report_for(self, name: str, folder: Path | None = None) -> tuple[Path, Path]:
        """The per-tensor error report of variant `name` (csv, png), in `folder` (default: its validation folder)."""
        folder = folder or self.validation_for(name)
        return folder / f"{name}.errors.csv", folder / f"{name}.errors.png"

    @property
    def stage_records_dir(self) -> Path:  # <dvc stage>.json: each stage's wall time and peak RSS (tasks/resources.py)
        return self.root / "reports" / "stages"

    @property
    def benchmark_file(self) -> Path:
        return self.root / "reports" / "benchmark.json"

    @property
    def summary_file(self) -> Path:
        return self.root / "reports" / "summary.json"

    @property
    def report_file(self) -> Path:
        return self.root / "reports" / "report.md"

    @property
    def plots_dir(self) -> Path:  # tradeoff-<target>.png, linked from report.md
        return self.root / "reports" / "plots"
