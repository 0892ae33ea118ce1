"""`vitq recovery-accuracy` (alias `vitq recovery`): plain INT8 and the recovery recipes side by side,
per case, in accuracy (nothing is timed) -> reports/recovery.json.

Cases (each in `artifacts/recovery/<case>/`, rebuilt on every run; the workspace's pipeline
outputs are read, never written, except that missing data/model/export/calibrate stages are run):
- digits: the workspace's model (the trained digits ViT by default), as the pipeline made it.
- outliers: the same model after `outliers.inject_outliers` (3 channels of blocks.0.norm1 at 100x
  the others, the matching qkv columns divided back: FP32 unchanged), exported and calibrated again.
- outliers_multi: the same transform on every block's attention and MLP input (norm1 -> attn.qkv and
  norm2 -> mlp.fc1 in every block), 4 channels each at 300x.
- outliers_heavy: every block's attention input, 2 channels each at 1000x (seed 1).
- outliers_alternating: attention input of blocks 0, 2, ..., MLP input of blocks 1, 3, ..., 6 channels
  each at 500x (seed 2).
- efficientvit_b0: timm efficientvit_b0 `forward_features` (dense output, random weights: nothing
  can be downloaded here) on crops of scikit-learn's two bundled photos; plumbing for dense metrics.

Each record: case, variant, top1, top1_drop (points), agreement, sqnr_db, psnr_db / mask_iou (dense),
int8_mac_fraction, float_layers, passed (the case's budget), budget, seconds (quantize + validate),
quantize_seconds (the quantize call alone), note.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from vitq.tasks._io import read_json, write_json
from vitq.tasks.layout import Workspace
from vitq.config import Params
from vitq.recipes import get_recipe

log = logging.getLogger("vitq.recovery")

PLAIN = ("onnx-w8a8-minmax", "onnx-w8a8-percentile", "onnx-w8a8-entropy")
RECOVERY = ("onnx-w8a8-auto", "onnx-w8a8-smoothquant", "onnx-w8a8-search", "onnx-w8a8-qat")
# The same decisions on the Core ML target (validated through the torch program each ML program is
# converted from; after the ONNX recipes whose decisions they apply).
COREML = ("coreml-w8a8", "coreml-w8a8-auto", "coreml-w8a8-smoothquant")


@dataclass(frozen=True)
class Outliers:
    """Which LayerNorm -> Linear pairs get outliers: `pairs` by name, or `every`-th of the model's
    SmoothQuant pairs (every block's norm1 -> attn.qkv and norm2 -> mlp.fc1, in block order)."""

    pairs: tuple[tuple[str, str], ...] = ()
    # or, of the model's pairs: "all"; "attention" (every norm1 -> attn.qkv); "alternating" (block 0's attention
    # input, block 1's MLP input, block 2's attention input, ...)
    which: str = ""
    channels: int = 3
    ratio: float = 100.0
    seed: int = 0

    def spec(self, model):
        from vitq.tasks.recovery.outliers import OutlierSpec
        from vitq.tasks.recovery.smoothquant import smoothing_pairs

        found = smoothing_pairs(model)  # per block: (norm1, attn.qkv), (norm2, mlp.fc1)
        keep = {"all": lambda i: True, "attention": lambda i: i % 2 == 0,
                "alternating": lambda i: i % 2 == (i // 2) % 2}
        pairs = self.pairs or tuple(pair for i, pair in enumerate(found) if keep[self.which](i))
        return OutlierSpec(pairs=pairs, channels=self.channels, ratio=self.ratio, seed=self.seed)


@dataclass(frozen=True)
class Case:
    name: str
    variants: tuple[str, ...]
    max_top1_drop: float  # budget, points (disagreement with FP32 without labels)
    min_sqnr_db: float | None = None
    note: str = ""
    outliers: Outliers | None = None  # the outlier transform applied to the workspace's model


CASES: dict[str, Case] = {
    "digits": Case("digits", PLAIN + RECOVERY + COREML, 0.2, note="the workspace's FP32 model"),
    "outliers": Case("outliers", PLAIN + RECOVERY + COREML, 0.5,
                     note="digits ViT with 3 LayerNorm output channels (blocks.0.norm1) scaled to 100x the others "
                          "and the matching attn.qkv input columns divided back: FP32 function unchanged",
                     outliers=Outliers(pairs=(("blocks.0.norm1", "blocks.0.attn.qkv"),))),
    "outliers_multi": Case("outliers_multi", PLAIN + RECOVERY + COREML, 0.5,
                           note="digits ViT with 4 output channels of every block's norm1 and norm2 scaled to 300x "
                                "the others and the matching attn.qkv / mlp.fc1 input columns divided back: FP32 "
                                "function unchanged",
                           outliers=Outliers(which="all", channels=4, ratio=300.0)),
    "outliers_heavy": Case("outliers_heavy", PLAIN + RECOVERY + COREML, 0.5,
                           note="digits ViT with 2 output channels of every block's norm1 scaled to 1000x the others "
                                "and the matching attn.qkv input columns divided back: FP32 function unchanged",
                           outliers=Outliers(which="attention", channels=2, ratio=1000.0, seed=1)),
    "outliers_alternating": Case("outliers_alternating", PLAIN + RECOVERY + COREML, 0.5,
                                 note="digits ViT with 6 output channels at 500x at the attention input of blocks 0, 2 "
                                      "and the MLP input of blocks 1, 3 (norm1 / norm2 scaled, attn.qkv / mlp.fc1 "
                                      "columns divided back): FP32 function unchanged",
                                 outliers=Outliers(which="alternating", channels=6, ratio=500.0, seed=2)),
    "efficientvit_b0": Case("efficientvit_b0", PLAIN + ("onnx-w8a8-search", "onnx-w8a8-auto"), 100.0, 40.0,
                            note="timm efficientvit_b0 forward_features (N,128,7,7), RANDOM weights (no download "
                                 "possible): dense-output plumbing only, numbers say nothing about trained accuracy; "
                                 "budget: feature-map SQNR >= 40 dB"),
}


@dataclass
class CaseDirs:
    model_dir: Path
    data_dir: Path
    export_dir: Path
    calibration_dir: Path
    variants_dir: Path
    validation_dir: Path
    facts: dict = field(default_factory=dict)

    def validation_for(self, name: str) -> Path:  # a case keeps every variant's results, and FP32's, in one folder
        return self.validation_dir

    # A case runs no shared-result stage (tasks/recovery/shared.py): folders that stay empty, so each recovery
    # recipe makes the range search and SmoothQuant of the case's own model in its scratch folder.
    @property
    def search_dir(self) -> Path:
        return self.variants_dir.parent / "search"

    @property
    def smoothquant_dir(self) -> Path:
        return self.variants_dir.parent / "smoothquant"


def ensure_pipeline_outputs(ws: Workspace, p: Params) -> None:
    """Run the data/model/export/calibrate stages whose outputs are missing (the digits model trains here)."""
    from vitq.tasks import stages

    needed = {"data": ws.data_dir / "meta.json", "model": ws.model_dir / "model.json",
              "export": ws.export_dir / "export.json", "calibrate": ws.calibration_dir / "calibration.json"}
    for name, marker in needed.items():
        if not marker.is_file():
            log.info("recovery: running the %s stage (its output is missing)", name)
            stages.STAGES[name](ws, p)


def _case_root(ws: Workspace, case: str) -> Path:
    return ws.root / "artifacts" / "recovery" / case


def _digits(ws: Workspace, p: Params, case: Case) -> CaseDirs:
    root = _case_root(ws, "digits")
    return CaseDirs(ws.model_dir, ws.data_dir, ws.export_dir, ws.calibration_dir, root / "variants", root / "validation")


def _outliers(ws: Workspace, p: Params, case: Case) -> CaseDirs:
    from vitq.tasks._io import atomic_dir
    from vitq.tasks.calibrate import calibrate
    from vitq.tasks.data import load_split, model_inputs
    from vitq.tasks.export import export_onnx
    from vitq.tasks.model import load_model, predict
    from vitq.tasks.recovery.outliers import inject_outliers

    root = _case_root(ws, case.name)
    model, spec = load_model(ws.model_dir)
    x_cal = model_inputs(load_split(ws.data_dir, "calibration").images, spec.mean, spec.std)
    x_val = model_inputs(load_split(ws.data_dir, "validation").images, spec.mean, spec.std)
    before = predict(model, x_val)
    injected = inject_outliers(model, x_cal, case.outliers.spec(model))
    diff = float(np.max(np.abs(predict(model, x_val) - before)))
    log.info("recovery: outliers injected %s; FP32 logits change by %.2e (max abs)", injected.factors, diff)
    with atomic_dir(root / "model") as tmp:
        torch.save(model.state_dict(), tmp / "model.pt")
        meta = read_json(ws.model_dir / "model.json")
        write_json(tmp / "model.json", {**meta, "train": {**meta.get("train", {}), "outliers": asdict(injected)}})
    export_onnx(root / "model", ws.data_dir, p.export, root / "export")
    calibrate(root / "export" / "model.prep.onnx", root / "model", ws.data_dir, p.calibration, root / "calibration")
    return CaseDirs(root / "model", ws.data_dir, root / "export", root / "calibration", root / "variants",
                    root / "validation", {"fp32_logits_max_abs_change": diff, "outlier_factors": injected.factors,
                                          "fp32_logits_max_abs": float(np.max(np.abs(before)))})


def _dense_images(n: int, size: int, seed: int) -> np.ndarray:
    """(n, size, size, 3) uint8 random crops (scale 0.3-1 of the short side) of scikit-learn's bundled photos."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = photos[i % len(photos)]
        h, w = img.shape[:2]
        side = int(min(h, w) * rng.uniform(0.3, 1.0))
        top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = Image.fromarray(img[top : top + side, left : left + side]).resize((size, size), Image.BILINEAR)
        out.append(np.asarray(crop, np.uint8))
    return np.stack(out)


def _efficientvit(ws: Workspace, p: Params, case: Case) -> CaseDirs:
    import timm

    from vitq.tasks._io import atomic_dir
    from vitq.tasks.calibrate import calibrate
    from vitq.tasks.data import Split, hold_out, write_splits
    from vitq.tasks.export import export_onnx
    from vitq.experiments._models import resolve_model

    root = _case_root(ws, "efficientvit_b0")
    features = resolve_model("efficientvit_b0_features", None)  # vitq's zoo: timm efficientvit_b0's forward_features
    _, size, _ = features.input_size  # 224
    with atomic_dir(root / "data") as tmp:
        counts = {"train": 0, "calibration": 32, "validation": 24}
        splits = {name: Split(_dense_images(n, size, p.seed + i) if n else np.zeros((0, size, size, 3), np.uint8),
                              np.full(n, -1, np.int64)) for i, (name, n) in enumerate(counts.items())}
        splits, index = hold_out(splits, p.data.holdout_size, p.seed)  # a third of validation: the searches' images
        write_splits(tmp, splits, index)
        write_json(tmp / "meta.json", {"source": "sklearn-sample-images", "classes": [],
                                      "sizes": {n: len(s.labels) for n, s in splits.items()},
                                      "image_size": size, "channels": 3, "digest": "n/a"})
    torch.manual_seed(p.seed)
    model = features.build().eval()
    cfg = model.pretrained_cfg
    with atomic_dir(root / "model") as tmp:
        torch.save(model.state_dict(), tmp / "model.pt")
        write_json(tmp / "model.json", {
            "name": features.timm_name, "create_kwargs": {}, "input_size": list(features.input_size),
            "mean": list(cfg["mean"]), "std": list(cfg["std"]), "num_classes": 128, "classes": [], "top1": None,
            "source": "timm (random weights, seed %d)" % p.seed, "train": {}, "versions": {"timm": timm.__version__},
        })
    export_onnx(root / "model", root / "data", p.export, root / "export")
    cal = p.calibration.model_copy(update={"batch_size": 8, "num_bins": 512})  # 106 tensors: entropy (KL) is slow
    calibrate(root / "export" / "model.prep.onnx", root / "model", root / "data", cal, root / "calibration")
    return CaseDirs(root / "model", root / "data", root / "export", root / "calibration", root / "variants",
                    root / "validation", {"weights": "random (seeded); dense-output plumbing only"})


def _builder(case: Case):
    return _outliers if case.outliers is not None else {"digits": _digits, "efficientvit_b0": _efficientvit}[case.name]


def _case_params(p: Params, case: Case) -> Params:
    v = p.validate_.model_copy(update={"max_top1_drop": case.max_top1_drop, "min_sqnr_db": case.min_sqnr_db,
                                        "batch_size": 16 if case.name == "efficientvit_b0" else p.validate_.batch_size})
    budget = {"max_top1_drop": case.max_top1_drop, "min_sqnr_db": case.min_sqnr_db}
    r = p.recovery.model_copy(update={**budget, **({"search_images": 16, "sensitivity_images": 8}
                                                   if case.name == "efficientvit_b0" else {})})
    return p.model_copy(update={"validate_": v, "recovery": r})


def prepare_case(ws: Workspace, p: Params, case: Case) -> tuple[CaseDirs, Params, dict]:
    """Build the case's folders (FP32 model, export, calibration; FP32 reference outputs on the validation split):
    the folders, the case's params (its budget) and FP32's record."""
    from vitq.tasks import validate

    start = time.perf_counter()
    dirs = _builder(case)(ws, p, case)
    cp = _case_params(p, case)
    dirs.validation_dir.mkdir(parents=True, exist_ok=True)
    ref = validate.reference_outputs(dirs.export_dir / "model.onnx", dirs.model_dir, dirs.data_dir, cp.validate_,
                                     dirs.validation_dir)
    log.info("recovery: %s ready (%.0fs); FP32 top-1 %s", case.name, time.perf_counter() - start, ref.metrics.top1)
    fp32 = replace(ref.metrics, top1_drop=0.0 if ref.metrics.top1 is not None else None)
    return dirs, cp, _record(case, "fp32", fp32, 0.0, [], True, case_budget(case), 0.0, dirs.facts)


def case_budget(case: Case) -> dict:
    return {"max_top1_drop": case.max_top1_drop, "min_sqnr_db": case.min_sqnr_db}


def run_variant(dirs: CaseDirs, cp: Params, case: Case, name: str) -> dict:
    """Quantize recipe `name` on the case's folders and validate it: its record (`quantize_seconds`: the
    quantize call alone; `seconds`: with validation)."""
    from vitq.tasks.targets.registry import get_target

    t = time.perf_counter()
    # The case's folders stand in for a workspace; the per-tensor error report is the validate stage's, not this table's.
    no_error_report = cp.model_copy(update={"validate_": cp.validate_.model_copy(update={"error_report_images": 0})})
    target = get_target(get_recipe(name).target)
    art = target.quantize(dirs, name, cp)
    quantize_seconds = time.perf_counter() - t
    res = target.validate(dirs, no_error_report, name)
    m = res.metrics
    dense = f"PSNR {m.psnr_db:5.1f} dB IoU {m.mask_iou:.4f}  " if m.psnr_db is not None else ""
    print(f"  {case.name:16s} {name:24s} top1 {_f(m.top1)} drop {_f(m.top1_drop, 2)} agreement {m.agreement:.4f} "
          f"SQNR {m.sqnr_db:5.1f} dB  {dense}int8 MACs {100 * art.int8_mac_fraction:5.1f}%  "
          f"float {art.float_layers or '-'}  {'PASS' if res.passed else 'FAIL'} ({time.perf_counter() - t:.0f}s)",
          flush=True)
    return _record(case, name, m, art.int8_mac_fraction, art.float_layers, res.passed, case_budget(case),
                   time.perf_counter() - t, {}, quantize_seconds=quantize_seconds)


def run_case(ws: Workspace, p: Params, case: Case, variants=None) -> list[dict]:
    dirs, cp, fp32 = prepare_case(ws, p, case)
    records = [fp32]
    names = variants or case.variants
    for i, name in enumerate(names, 1):
        log.info("recovery: [%s %d/%d] %s ...", case.name, i, len(names), name)
        records.append(run_variant(dirs, cp, case, name))
    return records


def _f(v, digits: int = 4) -> str:
    return "  n/a " if v is None else f"{v:.{digits}f}"


def _record(case: Case, variant: str, m, mac_fraction, float_layers, passed, budget, seconds, facts,
            quantize_seconds: float | None = None) -> dict:
    rec = {
        "case": case.name, "variant": variant, "top1": m.top1, "top1_drop": m.top1_drop, "agreement": m.agreement,
        "sqnr_db": m.sqnr_db if np.isfinite(m.sqnr_db) else None,
        "int8_mac_fraction": mac_fraction, "float_layers": list(float_layers), "passed": passed, "budget": budget,
        "seconds": round(seconds, 1), "note": case.note,
    }
    if quantize_seconds is not None:
        rec["quantize_seconds"] = round(quantize_seconds, 1)
    if m.psnr_db is not None:
        rec.update(psnr_db=m.psnr_db if np.isfinite(m.psnr_db) else None, mask_iou=m.mask_iou)
    if facts:
        rec["facts"] = facts
    return rec


def run_recovery(ws: Workspace, p: Params, cases: list[str], out: Path) -> list[dict]:
    """Every case, every variant; writes `out` (a list of records) and returns it."""
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        from vitq.errors import VitqError

        raise VitqError(f"unknown recovery case {unknown[0]!r}; allowed: {', '.join(CASES)}")
    ensure_pipeline_outputs(ws, p)
    records = []
    for name in cases:
        records.extend(run_case(ws, p, CASES[name]))
        write_json(out, records)  # a partial table survives a later failure
    return records


def recovery_table(records: list[dict]) -> str:
    head = ("| case | variant | top1 | top1_drop (pts) | agreement | SQNR dB | PSNR dB / mask IoU | INT8 MACs "
            "| float layers | budget |")
    lines = [head, "|" + "---|" * 10]
    for r in records:
        fl = ", ".join(r["float_layers"]) if r["float_layers"] else "-"
        sq = "inf" if r["sqnr_db"] is None else f"{r['sqnr_db']:.1f}"
        dense = "-"
        if "mask_iou" in r:
            dense = f"{'inf' if r['psnr_db'] is None else format(r['psnr_db'], '.1f')} / {r['mask_iou']:.4f}"
        lines.append(
            f"| {r['case']} | {r['variant']} | {_f(r['top1'])} | {_f(r['top1_drop'], 2)} | {r['agreement']:.4f} | {sq} | "
            f"{dense} | {100 * r['int8_mac_fraction']:.1f}% | {fl} | {'pass' if r['passed'] else 'FAIL'} |"
        )
    return "\n".join(lines)
