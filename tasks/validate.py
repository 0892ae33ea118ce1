"""Validate stage: each variant against the FP32 model on the validation split, judged by the task
(tasks/task_kinds.py: classification or dense) against the budget in params.yaml's `validate` section.

Classification (logits (N, classes)): top1 (with labels), top1_drop (points), agreement (arg-max vs
FP32), cosine (per image), sqnr_db = 10 log10(sum ref^2 / sum (ref - out)^2).
Dense (maps (N, K, H, W)): sqnr_db, psnr_db (peak = FP32's value range), cosine, mask_iou (the variant's
masks vs FP32's), miou / miou_drop (against ground-truth masks, when the data has them); agreement is per pixel.
The FP32 reference record says which task (and user metric) judged it; every variant is judged the same way.

A model with several outputs (SAM: masks and IoU predictions; a detector: boxes and scores): `task.outputs` names
the judged one(s) (the task's metrics and budget; the first judged output's metrics are the headline ones) and
every other output is still checked against FP32 (SQNR, cosine, optional floors), each recorded under `outputs`.
FP32's outputs are saved one file each (`fp32.<name>.npy`; a single output: `fp32.npy`, as ever); variant outputs
are read a batch at a time, and only the outputs a whole-set metric needs (the judged ones, those with their own
`metric`) are held whole, as the one output is for a single-output model.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from vitq.tasks._io import read_json, write_json
from vitq.tasks.targets.onnx import backend as onnx_backend
from vitq.tasks.data import load_split, model_inputs
from vitq.tasks.model import load_model_spec
from vitq.tasks.model import SINGLE_OUTPUT
from vitq.tasks.task_kinds import (Budget, Classification, Dense, Fidelity, OutputMetrics, Task, extra_metrics,
                                   get_task, user_metric)
from vitq.config import OutputConfig, TaskConfig, ValidateConfig
from vitq.errors import ConfigError, DataError, VitqError

log = logging.getLogger("vitq.validate")

REFERENCE = "fp32"
MASK_THRESHOLD = 0.0  # dense outputs: a pixel is "in the mask" where the map exceeds this (mask logits)


@dataclass(frozen=True)
class ValidationResult:
    name: str
    images: int
    metrics: OutputMetrics
    passed: bool
    reasons: list[str]  # why it failed the budget (empty when passed)
    runtime: str = "onnxruntime"  # what produced the outputs that were compared
    not_measured: dict[str, str] = field(default_factory=dict)  # check -> why it could not run here
    details: dict = field(default_factory=dict)  # e.g. the torch counterpart's metrics beside Core ML's
    # A model with several outputs: name -> {"judged", "sqnr_db", "cosine", the task's metrics (judged), "metrics"
    # (the output's own metric), "passed"}; empty for a single-output model (its metrics are `metrics`).
    outputs: dict[str, dict] = field(default_factory=dict)


def compare_outputs(ref: np.ndarray, out: np.ndarray, labels: np.ndarray | None, ref_top1: float | None) -> OutputMetrics:
    """Compare variant outputs `out` with FP32's `ref`: logits (N, classes) as classification, maps
    (N, C, H, W) as dense (threshold 0) without ground truth. The stages judge through `evaluate` and the task."""
    if ref.ndim == 4:
        return Dense().compare(ref, out, None, None)
    reference = OutputMetrics(top1=ref_top1, top1_drop=None, agreement=1.0, cosine=1.0, sqnr_db=float("inf"))
    return Classification().compare(ref, out, labels, reference if ref_top1 is not None else None)


def budget_reasons(m: OutputMetrics, max_top1_drop: float, min_sqnr_db: float | None) -> list[str]:
    """Why classification metrics `m` miss the budget (empty: they meet it). Without labels the top-1 budget
    applies to the disagreement with FP32, in points."""
    return Classification().reasons(m, Budget("validate", max_top1_drop, min_sqnr_db))


@dataclass(frozen=True)
class Judge:
    """How outputs are judged: the task, its user metric and the ground truth of the validation split; for a
    model with several outputs, task.outputs (`outputs`) and each output's own metric function."""

    task: Task
    truth: np.ndarray | None
    metric: Callable | None = None
    outputs: dict[str, OutputConfig] = field(default_factory=dict)  # task.outputs
    output_metrics: dict[str, Callable] = field(default_factory=dict)  # task.outputs.<name>.metric, loaded

    def evaluate(self, ref: np.ndarray, out: np.ndarray, reference: OutputMetrics | None) -> OutputMetrics:
        m = self.task.compare(ref, out, self.truth, reference)
        extra = extra_metrics(self.metric, ref, out, self.truth)
        return replace(m, extra=extra) if extra else m

    def reasons(self, m: OutputMetrics, budget: Budget) -> list[str]:
        return self.task.reasons(m, budget)

    def plan(self, names: tuple[str, ...]) -> dict[str, OutputConfig]:
        """Every output of the model (`names`, in its order) with how it is judged (`output_plan`)."""
        return output_plan(self.outputs, names)

    @property
    def headline(self) -> str | None:
        """The output whose metrics are the variant's headline numbers (None: the model's one output)."""
        return next((n for n, o in self.outputs.items() if o.judged), None)


def output_plan(outputs: dict[str, OutputConfig], names: tuple[str, ...]) -> dict[str, OutputConfig]:
    """Every output of a model (`names`, in its order) with how it is judged: task.outputs' entries, the others
    checked against FP32. A name task.outputs gives that the model lacks, or a model of several outputs without
    task.outputs, is one ConfigError line naming the outputs there are."""
    allowed = ", ".join(names)
    for name in outputs:
        if name not in names:
            raise ConfigError(f"task.outputs names {name!r}, which the model does not return; its outputs: {allowed}")
    if not outputs:
        if len(names) > 1:
            raise ConfigError(f"the model returns {len(names)} outputs ({allowed}): name the judged one(s) in "
                              f"task.outputs (params.yaml, or Variant.validate(task=...)), e.g. task.outputs: "
                              f"{{{names[0]}: {{judged: true}}}}")
        return {names[0]: OutputConfig(judged=True)}
    return {n: outputs.get(n, OutputConfig()) for n in names}


def task_record(task: TaskConfig) -> dict:
    # a single-output task is recorded as it was before task.outputs existed
    return task.model_dump(mode="json", exclude=set() if task.outputs else {"outputs"})


def load_task(reference_dir: Path) -> TaskConfig:
    """The task the FP32 reference was judged with (recorded by the reference stage)."""
    d = load_validation(reference_dir, REFERENCE).details.get("task")
    return TaskConfig(**d) if d else TaskConfig()


def judge_for(task: TaskConfig, split, root: Path | None = None) -> Judge:
    """The Judge of `task` on a data split (its labels or masks)."""
    kind = get_task(task)
    own = {n: user_metric(o.metric, root) for n, o in task.outputs.items() if o.metric}
    return Judge(kind, kind.truth(split), user_metric(task.metric, root), dict(task.outputs), own)


def validation_judge(model_dir: Path, data_dir: Path, task: TaskConfig, split_name: str = "validation",
                     index: np.ndarray | None = None) -> tuple[np.ndarray, Judge]:
    """Model inputs (N, C, H, W) of a split (or its rows `index`) and the Judge with its ground truth. Labels
    count only when the model's classes are the data's (a 1000-class model on 10 folders: agreement only)."""
    spec = load_model_spec(model_dir)
    split = load_split(data_dir, split_name)
    if index is not None:
        split = split.subset(index)
    judge = judge_for(task, split)
    classes = spec.num_classes
    if judge.headline is not None and (spec.outputs.get(judge.headline) or [None])[0] is not None:
        classes = spec.outputs[judge.headline][0]  # several outputs: the judged one's
    if task.kind == "classification" and classes != len(spec.classes):
        judge = replace(judge, truth=None)
    return model_inputs(split.images, spec.mean, spec.std), judge


def _labels(model_dir: Path, data_dir: Path) -> tuple[np.ndarray, np.ndarray | None]:
    x, judge = validation_judge(model_dir, data_dir, TaskConfig())
    return x, judge.truth


def reference_files(names: tuple[str, ...], single: bool) -> dict[str, str]:
    """The file FP32's outputs are saved in, by output name: `fp32.npy` for a single-output model (as ever),
    else `fp32.<name>.npy` (characters other than letters, digits, `_ - .` replaced, the index added on a clash)."""
    if single:
        return {names[0]: f"{REFERENCE}.npy"}
    files: dict[str, str] = {}
    for i, name in enumerate(names):
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
        files[name] = f"{REFERENCE}.{stem}.npy" if f"{REFERENCE}.{stem}.npy" not in files.values() \
            else f"{REFERENCE}.{stem}-{i}.npy"
    return files


def _single(judge: Judge, names: tuple[str, ...]) -> bool:
    """A single-output model judged as before task.outputs existed: one output, no task.outputs."""
    return not judge.outputs and len(names) == 1


def reference_outputs(fp32_onnx: Path, model_dir: Path, data_dir: Path, cfg: ValidateConfig, out_dir: Path,
                      task: TaskConfig | None = None) -> ValidationResult:
    """FP32 ONNX Runtime outputs on the validation split, saved once for every variant to compare against, with
    FP32's own metrics (top-1, or mIoU against ground-truth masks) and the task that judges them. Each output is
    written a batch at a time (one file each); a name in task.outputs the model lacks is a ConfigError."""
    task = task or TaskConfig()
    x, judge = validation_judge(model_dir, data_dir, task)
    result = save_reference(onnx_backend.session(fp32_onnx), x, judge, task, cfg.batch_size, Path(out_dir))
    log.info("validate: fp32 %s on %d images", _headline(result.metrics), len(x))
    return result


def save_reference(sess, x: np.ndarray, judge: Judge, task: TaskConfig, batch_size: int,
                   out_dir: Path) -> ValidationResult:
    """FP32's outputs of the ONNX Runtime session `sess` on `x`, written into `out_dir` a batch at a time, and
    FP32 judged against itself (its own top-1 / mIoU, per output), recorded as `fp32.json`."""
    names = tuple(o.name for o in sess.get_outputs())
    judge.plan(names)  # unknown names, or several outputs and no task.outputs: one line, before the run
    single = _single(judge, names)
    files = reference_files(names, single)
    with _Writers(out_dir, files, len(x)) as writers:
        for batch in onnx_backend.run_outputs(sess, x, batch_size):
            writers.write(batch)
    details = {"task": task_record(task)}
    if not single:
        details["output_files"] = files
    judged = _judge(_saved_batches(out_dir, files, batch_size), judge, out_dir, files, None,
                    Budget("validate", None), single)
    result = ValidationResult(name=REFERENCE, images=len(x), metrics=judged.metrics, passed=True, reasons=[],
                              details=details, outputs=judged.outputs)
    write_json(out_dir / f"{REFERENCE}.json", asdict(result))
    return result


def validate_against(name: str, fp32_onnx: Path, outputs: Callable[[np.ndarray, int], object], x: np.ndarray,
                     task: TaskConfig, truth: np.ndarray | None, cfg: ValidateConfig, **extra) -> ValidationResult:
    """The Python API's judgement by a task (several outputs, or a task given): FP32's outputs saved into a
    temporary folder a batch at a time, then the variant's `outputs(x, batch_size)` (one array, or batches of
    `{name: array}`) judged against them as the stages judge."""
    import tempfile

    kind = get_task(task)
    own = {n: user_metric(o.metric) for n, o in task.outputs.items() if o.metric}
    judge = Judge(kind, truth, user_metric(task.metric), dict(task.outputs), own)
    with tempfile.TemporaryDirectory(prefix="vitq-fp32-") as tmp:
        save_reference(onnx_backend.session(fp32_onnx), x, judge, task, cfg.batch_size, Path(tmp))
        return judge_variant(name, outputs(x, cfg.batch_size), judge, Path(tmp), Budget.of(cfg, "validate", task.kind),
                             len(x), **extra)


class _Writers:
    """FP32's outputs written into their .npy files a batch at a time (memory-mapped, each file atomic)."""

    def __init__(self, out_dir: Path, files: dict[str, str], images: int):
        import contextlib

        from vitq.tasks._io import atomic_file

        self._stack = contextlib.ExitStack()
        self._paths = {name: self._stack.enter_context(atomic_file(out_dir / f)) for name, f in files.items()}
        self._images, self._maps, self._row = images, {}, 0

    def __enter__(self):
        self._stack.__enter__()
        return self

    def write(self, batch: dict[str, np.ndarray]) -> None:
        n = len(next(iter(batch.values())))
        for name, path in self._paths.items():
            if name not in self._maps:
                self._maps[name] = np.lib.format.open_memmap(path, mode="w+", dtype=batch[name].dtype,
                                                             shape=(self._images, *batch[name].shape[1:]))
            self._maps[name][self._row : self._row + n] = batch[name]
        self._row += n

    def __exit__(self, *exc):
        for m in self._maps.values():
            m.flush()
        self._maps.clear()  # closes the maps before the files are moved into place
        return self._stack.__exit__(*exc)


def _saved_batches(reference_dir: Path, files: dict[str, str], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    refs = {n: np.load(Path(reference_dir) / f, mmap_mode="r") for n, f in files.items()}
    images = len(next(iter(refs.values())))
    for i in range(0, images, batch_size):
        yield {n: np.asarray(r[i : i + batch_size]) for n, r in refs.items()}


def _headline(m: OutputMetrics) -> str:
    if m.mask_iou is not None:
        return f"mIoU {'n/a' if m.miou is None else f'{m.miou:.4f}'}"
    return f"top-1 {'n/a' if m.top1 is None else f'{m.top1:.4f}'}"


@dataclass(frozen=True)
class _Judged:
    metrics: OutputMetrics  # the headline output's
    outputs: dict[str, dict]  # per output (empty for a single-output model)
    reasons: list[str]


def _judge(batches: Iterable[dict[str, np.ndarray]], judge: Judge, reference_dir: Path, files: dict[str, str],
           reference: ValidationResult | None, budget: Budget, single: bool) -> _Judged:
    """Judge a variant's outputs (`batches`, in the validation split's order) against FP32's saved ones: the
    judged outputs (and those with a metric of their own) by whole-set metrics, held whole as a single output
    always was; the others by SQNR and cosine, accumulated one batch at a time."""
    names = tuple(files)
    plan = judge.plan(names)
    whole = {n for n, o in plan.items() if o.judged or o.metric}
    held: dict[str, list[np.ndarray]] = {n: [] for n in whole}
    streamed = {n: Fidelity() for n in names if n not in whole}
    refs = {n: np.load(Path(reference_dir) / files[n], mmap_mode="r") for n in streamed}
    row = 0
    for batch in batches:
        missing = [n for n in names if n not in batch]
        if missing:
            raise VitqError(f"the variant's outputs lack {', '.join(map(repr, missing))}; FP32's: {', '.join(names)}")
        n_rows = len(batch[names[0]])
        for name in names:
            if name in held:
                held[name].append(np.asarray(batch[name]))
            else:
                _named(name, single, lambda: streamed[name].add(refs[name][row : row + n_rows], batch[name]))
        row += n_rows
    per_output: dict[str, dict] = {}
    metrics: dict[str, OutputMetrics] = {}
    reasons: dict[str, list[str]] = {}
    for name, cfg in plan.items():
        record: dict = {"judged": cfg.judged}
        why = reasons.setdefault(name, [])
        if name in held:
            ref = np.load(Path(reference_dir) / files[name])
            out = np.concatenate(held.pop(name))
            if cfg.judged:
                own_ref = None
                if reference is not None:
                    own_ref = reference.metrics if single else _metrics_of(reference.outputs.get(name))
                m = _named(name, single, lambda: judge.evaluate(ref, out, own_ref))
                metrics[name] = m
                record.update({k: v for k, v in asdict(m).items() if v is not None and k != "extra"})
                why += judge.reasons(m, budget)
                own = dict(m.extra)
            else:
                f = Fidelity()
                _named(name, single, lambda: f.add(ref, out))
                record.update(sqnr_db=f.sqnr_db, cosine=f.cosine)
                own = {}
            if cfg.metric:
                own.update(extra_metrics(judge.output_metrics[name], ref, out, judge.truth))
                for key, floor in cfg.min_metrics.items():
                    if key not in own:
                        raise DataError(f"task.outputs.{name}.min_metrics names {key!r}, which its metric does not "
                                        f"return; it returns: {', '.join(own) or 'nothing'}")
                    if own[key] < floor:
                        why.append(f"{key} {own[key]:.4f} < task.outputs.{name}.min_metrics.{key} {floor}")
            if own:
                record["metrics"] = own
            del ref, out
        else:
            f = streamed[name]
            record.update(sqnr_db=f.sqnr_db, cosine=f.cosine)
        if cfg.min_sqnr_db is not None and record["sqnr_db"] < cfg.min_sqnr_db:
            why.append(f"SQNR {record['sqnr_db']:.1f} dB < task.outputs.{name}.min_sqnr_db {cfg.min_sqnr_db}")
        record["passed"] = not why
        per_output[name] = record
    headline = judge.headline or names[0]
    flat = [r if single else f"{name}: {r}" for name, rs in reasons.items() for r in rs]
    return _Judged(metrics[headline], {} if single else per_output, flat)


def _named(name: str, single: bool, fn):
    """`fn()`, its DataError naming the output (several outputs) on its one line."""
    try:
        return fn()
    except DataError as err:
        if single:
            raise
        raise DataError(f"output {name!r}: {err}") from None


def _metrics_of(record: dict | None) -> OutputMetrics | None:
    """FP32's own metrics of a judged output, from the reference record's `outputs`."""
    if not record or not record.get("judged"):
        return None
    fields = OutputMetrics.__dataclass_fields__
    return OutputMetrics(**{"top1": None, "top1_drop": None,
                            **{k: v for k, v in record.items() if k in fields and k != "extra"}})


def reference_names(reference_dir: Path) -> tuple[str, ...]:
    """The model's outputs the FP32 reference saved, in order (a single-output model: `logits`)."""
    files = load_validation(reference_dir, REFERENCE).details.get("output_files")
    return tuple(files) if files else (SINGLE_OUTPUT,)


def judge_variant(name: str, outputs, judge: Judge, reference_dir: Path, budget: Budget, images: int,
                  **extra) -> ValidationResult:
    """Judge a variant's outputs against the FP32 reference in `reference_dir` and the budget. `outputs`: one
    array (a single-output model), or its outputs a batch at a time, `{name: array}` each, in the split's order."""
    reference = load_validation(reference_dir, REFERENCE)
    files = reference.details.get("output_files") or {SINGLE_OUTPUT: f"{REFERENCE}.npy"}
    single = "output_files" not in reference.details
    if isinstance(outputs, np.ndarray):
        if len(files) != 1:
            raise VitqError(f"{name}: one output array given; the model has outputs {', '.join(files)}")
        outputs = [{next(iter(files)): outputs}]
    judged = _judge(outputs, judge, reference_dir, files, reference, budget, single)
    return ValidationResult(name=name, images=images, metrics=judged.metrics, passed=not judged.reasons,
                            reasons=judged.reasons, outputs=judged.outputs, **extra)


def variant_batches(path: Path, x: np.ndarray, batch_size: int, predict: Callable | None,
                    names: tuple[str, ...], predict_outputs: Callable | None = None
                    ) -> Iterable[dict[str, np.ndarray]] | np.ndarray:
    """A variant's outputs on `x`: one array from `predict` (its target's runtime) for a single-output model;
    for several outputs, batches of all of them from `predict_outputs(path, x, batch_size)` where its target has
    one, else from ONNX Runtime for an ONNX graph (a served form that is not, e.g. a TensorRT engine, is refused)."""
    if len(names) == 1:
        if predict is None:
            return onnx_backend.run_batched(onnx_backend.session(path), x, batch_size)
        return predict(path, x, batch_size)
    if predict_outputs is not None:
        return predict_outputs(path, x, batch_size)
    if Path(path).suffix != ".onnx":
        raise VitqError(f"{Path(path).name}: the model has several outputs ({', '.join(names)}) and vitq reads "
                        "several outputs from ONNX Runtime and Core ML only; use onnx-* (or coreml-*) recipes")
    return onnx_backend.run_outputs(onnx_backend.session(path), x, batch_size)


def validate_variant(
    name: str, variant_onnx: Path, model_dir: Path, data_dir: Path, cfg: ValidateConfig, out_dir: Path,
    predict: Callable[[Path, np.ndarray, int], np.ndarray] | None = None, reference_dir: Path | None = None,
    predict_outputs: Callable | None = None,
) -> ValidationResult:
    """Run the variant on the validation split and judge it against the budget. `predict(path, x, batch_size)`:
    its target's runtime (default: ONNX Runtime); `predict_outputs`: the same for a model with several outputs
    (batches of {name: array}). `reference_dir`: where the FP32 outputs are (default: out_dir)."""
    reference_dir = reference_dir or out_dir
    task = load_task(reference_dir)
    x, judge = validation_judge(model_dir, data_dir, task)
    outputs = variant_batches(variant_onnx, x, cfg.batch_size, predict, reference_names(reference_dir), predict_outputs)
    result = judge_variant(name, outputs, judge, reference_dir, Budget.of(cfg, "validate", task.kind), len(x))
    write_json(Path(out_dir) / f"{name}.json", asdict(result))
    log.info("validate: %s %s -> %s", name, summary_line(result.metrics), "pass" if result.passed else "FAIL")
    return result


def summary_line(m: OutputMetrics) -> str:
    """One log line of the metrics that matter for the task."""
    if m.mask_iou is not None:
        miou = "" if m.miou is None else f"mIoU {m.miou:.4f} (drop {m.miou_drop} pts), "
        return f"{miou}mask IoU vs FP32 {m.mask_iou:.4f}, SQNR {m.sqnr_db:.1f} dB, PSNR {m.psnr_db:.1f} dB"
    return f"top-1 {m.top1} (drop {m.top1_drop} pts), agreement {m.agreement:.4f}, SQNR {m.sqnr_db:.1f} dB"


def load_reference(reference_dir: Path) -> tuple[np.ndarray, float | None]:
    """The FP32 logits every variant is compared with, and the FP32 top-1."""
    return np.load(Path(reference_dir) / f"{REFERENCE}.npy"), load_validation(reference_dir, REFERENCE).metrics.top1


def load_validation(validation_dir: Path, name: str) -> ValidationResult:
    d = read_json(Path(validation_dir) / f"{name}.json")
    return ValidationResult(**{**d, "metrics": OutputMetrics(**d["metrics"])})
