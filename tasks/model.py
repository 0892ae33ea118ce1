"""Model stage: resolve the FP32 model through its source (tasks/sources.py: train the embedded default, or
load a timm / torchvision / Python-factory model, or check an FP32 ONNX file) and save it.

`model.pt` holds the state dict (`model.onnx` the checked file, for an ONNX source); `model.json` says how to
rebuild it (`build`: the source and what it needs, `create_kwargs`), its input contract (size, mean, std) and
its accuracy.
"""

from __future__ import annotations

import argparse
import logging
import math
import pickle
import re
import shutil
import time
import warnings
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from tasks import zoo  # noqa: F401  (registers vitq's models with timm)
from tasks._io import atomic_dir, read_json, write_json
from tasks.data import load_data_result, load_split, model_inputs
from tasks.sources import Inputs, get_source
from vitq.config import ModelConfig, TrainConfig
from vitq.errors import ModelError

log = logging.getLogger("vitq.model")


ONNX_FILE = "model.onnx"  # in the model dir, for an ONNX source: the checked FP32 file, as given


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
    # What rebuilds the model in another process: {"source": <tasks.sources entry>, ...} (the factory file and
    # its sha256, the ONNX file, where the weights came from). model.json files written before model sources
    # existed have none: they were all timm.create_model(name, **create_kwargs).
    build: dict = field(default_factory=lambda: {"source": "timm"})
    input_contract: str = ""  # where input_size / mean / std came from

    @property
    def torch_model(self) -> bool:
        """False for an ONNX source: no torch module (load_model refuses; the export stage uses model.onnx)."""
        return get_source(self.build.get("source", "timm")).torch_model


def check_model_config(cfg: ModelConfig, root: Path | None = None) -> None:
    """Fail fast on what the model stage would refuse: an unknown name, a missing or unreadable checkpoint
    (headers only, no weights), a missing factory file or function, an ONNX file that is not FP32.
    `root`: the workspace relative paths start from (default: the current directory)."""
    get_source(cfg.source).check(cfg, Path(root) if root is not None else Path.cwd())


# Accepted checkpoint files: what torch.save writes (a zip archive; a pickle for torch < 1.6), read with
# weights_only=True, and .safetensors. Both may hold the state dict itself or wrap it (below).
_SAVE_HINT = (
    "write it with torch.save(model.state_dict(), path), or safetensors.torch.save_file to a *.safetensors path"
)
# Wrapper keys, in timm's order of preference (timm.models.load_state_dict: EMA weights first).
_STATE_DICT_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")


def _count(items: list, noun: str) -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _unsafe_globals_refused(shown: str, names: list[str]) -> ModelError:
    return ModelError(
        f"{shown} holds pickled objects other than tensors ({', '.join(names[:5])}); refused without unpickling "
        f"them (weights_only loading): {_SAVE_HINT}"
    )


def check_checkpoint_file(path: Path, shown: str) -> None:
    """Read what is cheap to read (file header, safetensors header, torch.save's pickle without its tensors)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except Exception as exc:  # safetensors raises its own SafetensorError, and OSError
            raise ModelError(f"{shown} is not a readable safetensors file ({_first_line(exc)})") from None
        return
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise ModelError(f"{shown} cannot be read ({exc.strerror})") from None
    if head == b"PK\x03\x04":  # a zip archive: torch.save's format since torch 1.6
        if not zipfile.is_zipfile(path):
            raise ModelError(f"{shown} is truncated or damaged (its zip archive has no central directory)")
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))  # static: unpickles nothing
        except Exception as exc:  # a damaged archive, or TorchScript instead of torch.save
            raise ModelError(f"{shown} is not a readable torch.save checkpoint ({_first_line(exc)})") from None
        if names:
            raise _unsafe_globals_refused(shown, sorted(names))
    elif not head:
        raise ModelError(f"{shown} is an empty file; {_SAVE_HINT}")
    elif not head.startswith(b"\x80"):  # pickle's PROTO opcode starts torch.save's legacy format
        raise ModelError(
            f"{shown} is not a PyTorch checkpoint (neither torch.save's zip archive nor a pickle: it starts with "
            f"{head!r}); {_SAVE_HINT}"
        )


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
        logits = predict_onnx(loaded.onnx_file, x, f"model.path {cfg.path!r}")
    else:
        model = loaded.model
        _check_forward(model, x[:2], loaded.name)
        if cfg.source == "train":
            train_stats = train_classifier(model, data_dir, cfg.train, mean, std, seed)
        model.eval()
        logits = predict(model, x)
    top1 = None
    labels = np.asarray(validation.labels)
    if logits.ndim == 2 and logits.shape[1] == len(data.classes) and len(labels) and (labels >= 0).all():
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


def _check_forward(model: torch.nn.Module, x: np.ndarray, name: str) -> None:
    """One forward pass on 2 images: a model that fails on the data's shape, or returns something other than
    one tensor, is one line here rather than a traceback stages later."""
    model.eval()
    try:
        with torch.inference_mode():
            out = model(torch.from_numpy(x))
    except Exception as exc:  # the model's own code
        raise ModelError(f"model {name!r} fails on input of shape {list(x.shape)} ({type(exc).__name__}: "
                         f"{_first_line(exc)}); check data.channels / data.image_size and model.arch") from None
    if not isinstance(out, torch.Tensor):
        raise ModelError(f"model {name!r} returns a {type(out).__name__}; vitq compares one output tensor "
                         "(N, classes) or (N, K, H, W): wrap it to return that tensor")


def predict_onnx(path: Path, x: np.ndarray, shown: str) -> np.ndarray:
    """FP32 outputs of an ONNX file, at its own batch size where it has a fixed one."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    batch = inp.shape[0] if isinstance(inp.shape[0], int) else 64
    try:
        return np.concatenate([_run_padded(sess, inp.name, x[i : i + batch], batch) for i in range(0, len(x), batch)])
    except Exception as exc:  # onnxruntime's Fail / InvalidArgument / RuntimeException
        raise ModelError(f"{shown} does not run on the data (N, {', '.join(map(str, x.shape[1:]))}) in ONNX Runtime: "
                         f"{_first_line(exc)}") from None


def _run_padded(sess, name: str, xb: np.ndarray, batch: int) -> np.ndarray:
    """One batch; a last short batch of a fixed-batch model is padded by repeating its last image."""
    n = len(xb)
    if n < batch and batch > 0:
        xb = np.concatenate([xb, np.repeat(xb[-1:], batch - n, axis=0)])
    return sess.run(None, {name: xb})[0][:n]


def read_state_dict(path: Path, shown: str = "") -> dict[str, torch.Tensor]:
    """The state dict in a torch.save or .safetensors file, unwrapped ({"state_dict": ...}) and without DDP's
    `module.` prefixes. Nothing but tensors and plain containers is unpickled; every fault is a `ModelError`."""
    from timm.models import clean_state_dict

    shown = shown or f"checkpoint {str(path)!r}"
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return clean_state_dict(load_file(str(path), device="cpu"))
        except Exception as exc:  # SafetensorError, OSError
            raise ModelError(f"{shown} is not a readable safetensors file ({_first_line(exc)})") from None
    try:
        # timm's training checkpoints keep their arguments in an argparse.Namespace (timm allows it too).
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            # a pickle.dump file's protocol draws a warning before the refusal below: keep stderr to one line
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises UnpicklingError, RuntimeError, EOFError, KeyError, ...
        names = _refused_globals(path, str(exc)) if isinstance(exc, pickle.UnpicklingError) else []
        if names:
            raise _unsafe_globals_refused(shown, names) from None
        raise ModelError(
            f"{shown} is not a readable PyTorch checkpoint, truncated or damaged? ({type(exc).__name__}: "
            f"{_first_line(exc)})"
        ) from None
    state_dict, key = obj, None
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        key = next((k for k in _STATE_DICT_KEYS if isinstance(obj.get(k), dict)), None)
        if key is None:
            keys = ", ".join(map(str, list(obj)[:8]))
            raise ModelError(
                f"{shown} holds no state dict: a dict with keys {keys} (expected tensors by parameter name, or "
                f"one of {', '.join(_STATE_DICT_KEYS)} holding them); {_SAVE_HINT}"
            )
        state_dict = obj[key]
    if not isinstance(state_dict, dict):
        raise ModelError(f"{shown} holds a {type(obj).__name__}, not a state dict; {_SAVE_HINT}")
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        where = f"{key}." if key else ""
        raise ModelError(
            f"{shown}: {where}{not_tensors[0]} holds a {type(state_dict[not_tensors[0]]).__name__}, not a tensor "
            f"({len(not_tensors)} such entries); {_SAVE_HINT}"
        )
    if key:
        log.info("model: weights from %r of %s", key, path)
    return clean_state_dict(state_dict)


class _Inert:
    """Stands in for every global of a pickle being listed: accepts any arguments or state, runs nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


class _ListGlobals(pickle.Unpickler):
    """Records the globals a pickle imports; none is imported or called (Python's "restricting globals")."""

    def __init__(self, file):
        super().__init__(file)
        self.names: list[str] = []

    def find_class(self, module: str, name: str):
        self.names.append(f"{module}.{name}")
        return _Inert

    def persistent_load(self, pid):  # torch's references to tensor storages
        return None


def _refused_globals(path: Path, message: str) -> list[str]:
    """The globals that made weights_only loading refuse `path`, found without unpickling them ([] if none)."""
    if zipfile.is_zipfile(path):
        with torch.serialization.safe_globals([argparse.Namespace]):
            return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    named = re.findall(r"GLOBAL ([\w.]+)", message)  # torch names the first one in its legacy (protocol 2) format
    if named:
        return named
    # A pickle torch's weights-only unpickler cannot parse (pickle.dump, protocol 4+): list its globals and keep
    # those weights_only loading would refuse (the allowlist get_unsafe_globals_in_checkpoint uses).
    names: list[str] = []
    with open(path, "rb") as f:
        for _ in range(4):  # torch.save's legacy format is 4 pickles (magic, protocol, sys info, object)
            scan = _ListGlobals(f)
            try:
                scan.load()
            except Exception:  # damaged, or an object the stand-in cannot take: keep what was read
                names += scan.names
                break
            names += scan.names
    allowed_by_torch = getattr(getattr(torch, "_weights_only_unpickler", None), "_get_allowed_globals", dict)
    allowed = set(allowed_by_torch()) | {"argparse.Namespace"}  # without torch's list: every global is named
    return [n for n in dict.fromkeys(names) if n not in allowed]


def load_strict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], shown: str, name: str) -> None:
    """Load `state_dict` into `model` only if every key and shape matches; otherwise a `ModelError` naming the
    first mismatches, their shapes and the params.yaml key to change."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:

        def first(keys: list[str]) -> str:
            return ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")

        parts = [f"{_count(missing, 'model key')} missing from the file ({first(missing)})"] if missing else []
        parts += [f"{_count(unexpected, 'unexpected key')} in the file ({first(unexpected)})"] if unexpected else []
        raise ModelError(
            f"{shown} does not fit {name!r}: {' and '.join(parts)}; set model.name / model.arch to the "
            "architecture it was saved from"
        )
    wrong = [k for k, v in expected.items() if state_dict[k].shape != v.shape]
    if wrong:
        k, file_shape, model_shape = wrong[0], list(state_dict[wrong[0]].shape), list(expected[wrong[0]].shape)
        classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")  # timm names its head
        if classifier is None:  # torchvision and the rest: the last Linear is the head (fc, heads.head, classifier.3)
            linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
            classifier = linears[-1:] or ["head"]
        classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
        if k.rsplit(".", 1)[0] in classifier and file_shape[1:] == model_shape[1:]:
            fix = f"set model.num_classes: {file_shape[0]}"
        else:
            fix = "set model.name / model.arch to the architecture it was saved from"
        more = f" (and {_count(wrong[1:], 'more parameter')} of another shape)" if len(wrong) > 1 else ""
        raise ModelError(
            f"{shown} does not fit {name!r}: {k} has shape {file_shape} in the file but the model expects "
            f"{model_shape}{more}; {fix}"
        )
    model.load_state_dict(state_dict, strict=True)


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
    out = [model(torch.from_numpy(x[i : i + batch_size])).float().numpy() for i in range(0, len(x), batch_size)]
    return np.concatenate(out)


def train_classifier(
    model: torch.nn.Module, data_dir: Path, cfg: TrainConfig, mean, std, seed: int
) -> dict:
    """Deterministic AdamW + one-cycle training on the training split; logs progress every epoch."""
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
            log.info(
                "train: epoch %d/%d loss %.3f val top-1 %.4f (%.0fs)",
                epoch + 1, cfg.epochs, loss.item(), acc, time.perf_counter() - start,
            )
    torch.use_deterministic_algorithms(False)
    log.info("train: %d epochs in %.0fs", cfg.epochs, time.perf_counter() - start)
    return {"epochs": cfg.epochs, "final_loss": round(loss.item(), 4)}
