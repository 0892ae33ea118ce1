"""Model stage: resolve the FP32 model through its source (tasks/sources.py: train the embedded default, or
load a timm / torchvision / Python-factory model, or check an FP32 ONNX file) and save it.

`model.pt` holds the state dict (`model.onnx` the checked file, for an ONNX source); `model.json` says how to
rebuild it (`build`: the source and what it needs, `create_kwargs`), its input contract (size, mean, std) and
its accuracy.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from vitq.tasks import zoo  # noqa: F401  (registers vitq's models with timm)
from vitq.tasks._io import atomic_dir, read_json, write_json
from vitq.tasks._progress import Progress
from vitq.tasks.data import load_data_result, load_split, model_inputs
from vitq.tasks.sources import Inputs, check_model_section, get_source
from vitq.config import ModelConfig, TrainConfig
from vitq.errors import ModelError

log = logging.getLogger("vitq.model")


ONNX_FILE = "model.onnx"  # in the model dir, for an ONNX source: the checked FP32 file, as given
SINGLE_OUTPUT = "logits"  # the name of a model's one output (the export names it so)


@dataclass(frozen=True)
class ModelSpec:
    name: str  # the model's name (timm / torchvision registry name, or the factory's / file's)
    create_kwargs: dict  # passed to the source's builder (timm.create_model, get_model, the factory)
    input_size: list[int]  # (C, H, W)
    mean: list[float]
    std: list[float]
    num_classes: int  # output channels: classes (N, classes), or maps (N, K, H, W)
    classes: list[str]
    top1: float | None  # FP32 top-1 on the validation split (None when labels do not apply)
    source: str
    train: dict = field(default_factory=dict)  # epochs, final loss (source == train)
    versions: dict = field(default_factory=dict)
    # What rebuilds the model in another process: {"source": <vitq.tasks.sources entry>, ...} (the factory file and
    # its sha256, the ONNX file, where the weights came from). model.json files written before model sources
    # existed have none: they were all timm.create_model(name, **create_kwargs).
    build: dict = field(default_factory=lambda: {"source": "timm"})
    input_contract: str = ""  # where input_size / mean / std came from
    # The model's outputs, name -> per-image shape, in the order it returns them: one tensor is `logits`; a tuple
    # `output_0`, `output_1`, ...; a dict its keys; an ONNX file its graph outputs. Empty (model.json files
    # written before several outputs existed): one output, `logits`.
    outputs: dict = field(default_factory=dict)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(self.outputs) or (SINGLE_OUTPUT,)

    @property
    def torch_model(self) -> bool:
        """False for an ONNX source: no torch module (load_model refuses; the export stage uses model.onnx)."""
        return get_source(self.build.get("source", "timm")).torch_model


def check_model_config(cfg: ModelConfig, root: Path | None = None) -> None:
    """Fail fast on what the model stage would refuse: an unknown name, a missing or unreadable checkpoint
    (headers only, no weights), a missing factory file or function, an ONNX file that is not FP32.
    `root`: the workspace relative paths start from (default: the current directory)."""
    try:
        cfg = check_model_section(cfg)  # done already where params.yaml was read (vitq.params); not for a bare config
    except ValueError as err:
        raise ModelError(str(err)) from None
    get_source(cfg.source).check(cfg, Path(root) if root is not None else Path.cwd())


def resolve_model(cfg: ModelConfig, data_dir: Path, out_dir: Path, seed: int, root: Path | None = None) -> ModelSpec:
    """Build, train or load the FP32 model through its source and write `model.pt` (or `model.onnx`) +
    `model.json` to `out_dir`. `root`: the workspace relative paths in `cfg` start from (default: cwd)."""
    data = load_data_result(data_dir)
    root = Path(root) if root is not None else Path.cwd()
    source = get_source(cfg.source)
    source.check(cfg, root)
    torch.manual_seed(seed)  # random init (the train source) and a factory's own init are reproducible
    loaded = source.load(cfg, Inputs(root, data.channels, data.image_size, len(data.classes) or None, seed))
    c, h, w = loaded.contract.input_size
    if c != data.channels:
        raise ModelError(
            f"model {loaded.name!r} takes {c}-channel input but data.channels is {data.channels}; set data.channels: {c}"
        )
    if (h, w) != (data.image_size, data.image_size):
        raise ModelError(f"model {loaded.name!r} takes {h}x{w} input but data.image_size is {data.image_size}; "
                         f"set data.image_size: {h}")
    mean, std = list(loaded.contract.mean), list(loaded.contract.std)
    if len(mean) != c:
        raise ModelError(f"model {loaded.name!r} takes {c}-channel input but its mean/std have {len(mean)} values; "
                         f"set model.mean / model.std, one per channel")
    validation = load_split(data_dir, "validation")
    x = model_inputs(validation.images, mean, std)
    train_stats: dict = {}
    if loaded.model is None:
        outputs = predict_onnx_outputs(loaded.onnx_file, x, f"model.path {cfg.path!r}")
    else:
        model = loaded.model
        _check_forward(model, x[:2], loaded.name)
        if cfg.source == "train":
            train_stats = train_classifier(model, data_dir, cfg.train, mean, std, seed)
        model.eval()
        outputs = predict_outputs(model, x)
    logits = next(iter(outputs.values()))  # the first output: classes (N, classes) or maps (N, K, H, W)
    top1 = None
    labels = np.asarray(validation.labels)
    if len(outputs) == 1 and logits.ndim == 2 and logits.shape[1] == len(data.classes) and len(labels) \
            and (labels >= 0).all():
        top1 = float((logits.argmax(1) == labels).mean())
    spec = ModelSpec(
        name=loaded.name,
        create_kwargs=dict(loaded.create_kwargs),
        input_size=[c, h, w],
        mean=mean,
        std=std,
        num_classes=int(logits.shape[1]),
        classes=data.classes,
        top1=top1,
        source=cfg.source,
        train=train_stats,
        versions={"torch": torch.__version__, **loaded.versions},
        build=loaded.build,
        input_contract=loaded.contract.origin,
        outputs={name: list(out.shape[1:]) for name, out in outputs.items()},
    )
    with atomic_dir(out_dir) as tmp:
        if loaded.model is None:
            shutil.copyfile(loaded.onnx_file, tmp / ONNX_FILE)
        else:
            torch.save(loaded.model.state_dict(), tmp / "model.pt")
        write_json(tmp / "model.json", asdict(spec))
    log.info("model: %s (%s, %s), FP32 top-1 %s", loaded.name, cfg.source, loaded.build.get("weights", "ONNX file"),
             "n/a" if top1 is None else f"{top1:.4f}")
    return spec


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _check_forward(model: torch.nn.Module, x: np.ndarray, name: str) -> None:
    """One forward pass on 2 images: a model that fails on the data's shape, or returns something other than
    a tensor, a tuple of tensors or a dict of them (`named_outputs`), is one line here rather than a traceback
    stages later."""
    model.eval()
    try:
        with torch.inference_mode():
            out = model(torch.from_numpy(x))
    except Exception as exc:  # the model's own code
        raise ModelError(f"model {name!r} fails on input of shape {list(x.shape)} ({type(exc).__name__}: "
                         f"{_first_line(exc)}); check data.channels / data.image_size and model.arch") from None
    named_outputs(out, f"model {name!r}")


def named_outputs(out, shown: str = "the model") -> dict[str, torch.Tensor]:
    """A forward pass's result by output name: one output (a tensor, or a tuple / dict of one) is `logits`; a
    tuple / list of tensors `output_0`, `output_1`, ...; a dict of tensors its keys (in order). Anything else
    (nested, not float tensors) is a ModelError."""
    if isinstance(out, torch.Tensor):
        return {SINGLE_OUTPUT: out}
    if isinstance(out, (tuple, list)):
        items = [(f"output_{i}", v) for i, v in enumerate(out)]
    elif isinstance(out, dict):
        items = list(out.items())
    else:
        items = None
    bad = None if items else type(out).__name__
    for k, v in items or ():
        if not isinstance(k, str) or not k:
            bad = f"a dict with key {k!r}"
        elif not isinstance(v, torch.Tensor) or not v.is_floating_point() or v.ndim < 1:
            bad = f"output {k!r} that is a {type(v).__name__}" + (
                f" of dtype {v.dtype} and shape {list(v.shape)}" if isinstance(v, torch.Tensor) else "")
        if bad:
            break
    if bad:
        raise ModelError(f"{shown} returns {bad}; vitq compares float tensors (N, ...): one tensor, a tuple of "
                         "them or a dict of them by name")
    return {SINGLE_OUTPUT: items[0][1]} if len(items) == 1 else dict(items)


def output_names(model: torch.nn.Module, x: np.ndarray) -> tuple[str, ...]:
    """The names of `model`'s outputs (`named_outputs`), from one forward pass on the first 2 rows of `x`."""
    with torch.inference_mode():
        return tuple(named_outputs(model(torch.from_numpy(x[:2]))))


def predict_onnx(path: Path, x: np.ndarray, shown: str) -> np.ndarray:
    """FP32 outputs of a single-output ONNX file, at its own batch size where it has a fixed one."""
    return next(iter(predict_onnx_outputs(path, x, shown).values()))


def predict_onnx_outputs(path: Path, x: np.ndarray, shown: str) -> dict[str, np.ndarray]:
    """FP32 outputs of an ONNX file by graph output name (a single output: `logits`), at its own batch size
    where it has a fixed one."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    names = [o.name for o in sess.get_outputs()]
    batch = inp.shape[0] if isinstance(inp.shape[0], int) else 64
    try:
        batches = [_run_padded(sess, inp.name, x[i : i + batch], batch) for i in range(0, len(x), batch)]
    except Exception as exc:  # onnxruntime's Fail / InvalidArgument / RuntimeException
        raise ModelError(f"{shown} does not run on the data (N, {', '.join(map(str, x.shape[1:]))}) in ONNX Runtime: "
                         f"{_first_line(exc)}") from None
    keys = [SINGLE_OUTPUT] if len(names) == 1 else names
    return {k: np.concatenate([b[j] for b in batches]) for j, k in enumerate(keys)}


def _run_padded(sess, name: str, xb: np.ndarray, batch: int) -> list[np.ndarray]:
    """One batch, every output; a last short batch of a fixed-batch model is padded by repeating its last image."""
    n = len(xb)
    if n < batch and batch > 0:
        xb = np.concatenate([xb, np.repeat(xb[-1:], batch - n, axis=0)])
    return [o[:n] for o in sess.run(None, {name: xb})]


def load_model_spec(model_dir: Path) -> ModelSpec:
    return ModelSpec(**read_json(Path(model_dir) / "model.json"))


def load_model(model_dir: Path) -> tuple[torch.nn.Module, ModelSpec]:
    """Rebuild the saved FP32 model (eval mode) through its source, and its spec. An ONNX source has no
    torch model: a `ModelError` (params validation keeps the recipes that need one away from it)."""
    spec = load_model_spec(model_dir)
    source = get_source(spec.build.get("source", "timm"))
    if not source.torch_model:
        raise ModelError(f"the model in {model_dir} is an ONNX file (model.source {source.name!r}): there is no torch "
                         "model to load; Core ML and recovery recipes need one")
    model = source.rebuild(spec)
    model.load_state_dict(torch.load(Path(model_dir) / "model.pt", map_location="cpu", weights_only=True))
    return model.eval(), spec


@torch.inference_mode()
def predict(model: torch.nn.Module, x: np.ndarray, batch_size: int = 128) -> np.ndarray:
    """Outputs of a single-output model on `x` (N, C, H, W); `predict_outputs` for a model with several."""
    out = [model(torch.from_numpy(x[i : i + batch_size])).float().numpy() for i in range(0, len(x), batch_size)]
    return np.concatenate(out)


@torch.inference_mode()
def predict_outputs(model: torch.nn.Module, x: np.ndarray, batch_size: int = 128) -> dict[str, np.ndarray]:
    """Every output of `model` on `x` (N, C, H, W), by name (`named_outputs`)."""
    batches = [{k: v.float().numpy() for k, v in named_outputs(model(torch.from_numpy(x[i : i + batch_size]))).items()}
               for i in range(0, len(x), batch_size)]
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def train_classifier(
    model: torch.nn.Module, data_dir: Path, cfg: TrainConfig, mean, std, seed: int
) -> dict:
    """Deterministic AdamW + one-cycle training on the training split; logs progress (and validation top-1) every
    tenth of the epochs."""
    import torch.nn.functional as F

    train = load_split(data_dir, "train")
    validation = load_split(data_dir, "validation")
    if len(train.labels) == 0:
        raise ModelError("model.source is 'train' but the training split is empty")
    torch.manual_seed(seed)
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    x = torch.from_numpy(model_inputs(train.images, mean, std))
    y = torch.from_numpy(train.labels)
    xv = model_inputs(validation.images, mean, std)
    pad_value = float(x.min())  # background after normalisation
    steps_per_epoch = math.ceil(len(y) / cfg.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    loss = torch.tensor(float("nan"))
    s = cfg.max_shift_px
    progress, reported = Progress(log, "train: epoch", cfg.epochs, every_s=0.0), 0
    for epoch in range(cfg.epochs):
        model.train()
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            xb = x[idx]
            if s:
                dy, dx = torch.randint(-s, s + 1, (2,), generator=gen).tolist()
                xb = torch.roll(F.pad(xb, (s, s, s, s), value=pad_value), (dy, dx), (2, 3))[..., s:-s, s:-s]
            loss = F.cross_entropy(model(xb), y[idx], label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if (epoch + 1) % max(1, cfg.epochs // 10) == 0 or epoch + 1 == cfg.epochs:
            model.eval()
            acc = float((predict(model, xv).argmax(1) == validation.labels).mean())
            progress.step(f"loss {loss.item():.3f} val top-1 {acc:.4f}", n=epoch + 1 - reported)
            reported = epoch + 1
    torch.use_deterministic_algorithms(False)
    log.info("train: %d epochs in %.0fs", cfg.epochs, time.perf_counter() - start)
    return {"epochs": cfg.epochs, "final_loss": round(loss.item(), 4)}
