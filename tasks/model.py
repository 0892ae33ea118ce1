"""Model stage: resolve the FP32 model (train the embedded default, or load a timm model) and save it.

`model.pt` holds the state dict; `model.json` says how to rebuild it (`timm.create_model(name,
**create_kwargs)`), its input contract (size, mean, std from timm's data config) and its accuracy.
"""

from __future__ import annotations

import difflib
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from tasks import zoo  # noqa: F401  (registers vitq's models with timm)
from tasks._io import atomic_dir, read_json, write_json
from tasks.data import load_data_result, load_split, model_inputs
from vitq.config import ModelConfig, TrainConfig
from vitq.errors import ModelError

log = logging.getLogger("vitq.model")


@dataclass(frozen=True)
class ModelSpec:
    name: str  # timm model name
    create_kwargs: dict  # passed to timm.create_model to rebuild the architecture
    input_size: list[int]  # (C, H, W)
    mean: list[float]
    std: list[float]
    num_classes: int
    classes: list[str]
    top1: float | None  # FP32 torch top-1 on the validation split (None when labels do not apply)
    source: str
    train: dict = field(default_factory=dict)  # epochs, final loss (source == train)
    versions: dict = field(default_factory=dict)


def check_model_config(cfg: ModelConfig) -> None:
    """Fail fast on an unknown model name or a missing checkpoint (no weights are loaded)."""
    import timm

    if not timm.is_model(cfg.name):
        close = difflib.get_close_matches(cfg.name, timm.list_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ModelError(f"unknown timm model {cfg.name!r}{hint}; list names with timm.list_models('*vit*')")
    if cfg.checkpoint and not Path(cfg.checkpoint).is_file():
        raise ModelError(f"model.checkpoint {cfg.checkpoint!r} does not exist; give the path to a local weights file")


def _create(name: str, **kwargs) -> torch.nn.Module:
    import timm

    try:
        return timm.create_model(name, **kwargs)
    except (OSError, ConnectionError) as exc:
        raise ModelError(
            f"could not load pretrained weights for {name!r} ({type(exc).__name__}); nothing can be "
            "downloaded here: set model.checkpoint to a local weights file"
        ) from None
    except TypeError as exc:
        raise ModelError(f"model.arch does not fit {name!r}: {exc}") from None


def resolve_model(cfg: ModelConfig, data_dir: Path, out_dir: Path, seed: int) -> ModelSpec:
    """Build, train or load the FP32 model and write `model.pt` + `model.json` to `out_dir`."""
    import timm
    from timm.data import resolve_model_data_config

    data = load_data_result(data_dir)
    num_classes = cfg.num_classes or (len(data.classes) if cfg.source == "train" else None)
    kwargs: dict = dict(cfg.arch)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if cfg.source == "train":
        kwargs.setdefault("in_chans", data.channels)
    check_model_config(cfg)
    torch.manual_seed(seed)
    model = _create(cfg.name, pretrained=cfg.pretrained or bool(cfg.checkpoint), **_weights(cfg), **kwargs)
    data_cfg = resolve_model_data_config(model)
    c, h, w = data_cfg["input_size"]
    if c != data.channels:
        raise ModelError(
            f"model {cfg.name!r} takes {c}-channel input but data.channels is {data.channels}; set data.channels: {c}"
        )
    if (h, w) != (data.image_size, data.image_size):
        raise ModelError(
            f"model {cfg.name!r} takes {h}x{w} input but data.image_size is {data.image_size}; set data.image_size: {h}"
        )
    mean, std = list(data_cfg["mean"]), list(data_cfg["std"])
    train_stats: dict = {}
    if cfg.source == "train":
        train_stats = train_classifier(model, data_dir, cfg.train, mean, std, seed)
    model.eval()
    validation = load_split(data_dir, "validation")
    logits = predict(model, model_inputs(validation.images, mean, std))
    model_classes = logits.shape[1]
    top1 = None
    if model_classes == len(data.classes):
        top1 = float((logits.argmax(1) == validation.labels).mean())
    spec = ModelSpec(
        name=cfg.name,
        create_kwargs={k: v for k, v in kwargs.items()},
        input_size=[c, h, w],
        mean=mean,
        std=std,
        num_classes=model_classes,
        classes=data.classes,
        top1=top1,
        source=cfg.source,
        train=train_stats,
        versions={"torch": torch.__version__, "timm": timm.__version__},
    )
    with atomic_dir(out_dir) as tmp:
        torch.save(model.state_dict(), tmp / "model.pt")
        write_json(tmp / "model.json", asdict(spec))
    log.info("model: %s, FP32 top-1 %s", cfg.name, "n/a" if top1 is None else f"{top1:.4f}")
    return spec


def _weights(cfg: ModelConfig) -> dict:
    if cfg.checkpoint:
        # timm loads a local file through the pretrained-weights path (same filtering/adaptation as the hub).
        return {"pretrained_cfg_overlay": {"file": str(Path(cfg.checkpoint).resolve())}}
    return {}


def load_model_spec(model_dir: Path) -> ModelSpec:
    return ModelSpec(**read_json(Path(model_dir) / "model.json"))


def load_model(model_dir: Path) -> tuple[torch.nn.Module, ModelSpec]:
    """Rebuild the saved FP32 model (eval mode) and its spec."""
    spec = load_model_spec(model_dir)
    model = _create(spec.name, pretrained=False, **spec.create_kwargs)
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
