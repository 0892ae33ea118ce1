"""Model sources: where the FP32 model comes from (`model.source` in params.yaml), one registry entry each.

- `train`: the embedded default, a timm model (`model.name`, `model.arch`) trained here on the training split
- `timm`: `timm.create_model(name, **arch)`, weights from `model.checkpoint` (or timm's hub with `pretrained`)
- `torchvision`: `torchvision.models.get_model(name, weights=None, **arch)`, weights from `model.checkpoint`
- `python`: a factory `path/to/file.py:function` (relative to the workspace) or `package.module:function`,
  called with `model.arch` as keyword arguments; weights from `model.checkpoint` or the factory's own
- `onnx`: an FP32 ONNX file (`model.path`): no torch model, so ONNX Runtime and TensorRT recipes only

Each yields the FP32 model (None for `onnx`) and its input contract: (C, H, W), mean, std from the model's
library where it has one (timm's data config, torchvision's weights transforms), else from `model.mean` /
`model.std` and the data's shape. `model.json` records what rebuilds the model in another process
(`ModelSpec.build`: the source and, e.g., the factory file and its digest); `tasks/model.py` writes and reads it.
Heavy libraries are imported inside the entry that needs them.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitq.tasks._io import file_digest
from vitq.errors import ModelError

if TYPE_CHECKING:
    import onnx
    import torch

    from vitq.config import ModelConfig

# Every ModelConfig key a source may read besides `source` and `train` (train's settings are always present).
_KEYS = ("name", "pretrained", "checkpoint", "factory", "path", "num_classes", "mean", "std", "arch")


@dataclass(frozen=True)
class InputContract:
    """What the model takes: (C, H, W) and the per-channel normalisation (x / 255 - mean) / std."""

    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    origin: str  # where the contract came from, for the record: "timm data config", "params.yaml", ...


@dataclass
class SourceModel:
    """One source's result: the FP32 model (eval mode, weights loaded; None for an ONNX file) and what
    rebuilds it."""

    model: torch.nn.Module | None
    contract: InputContract
    name: str  # the model's name in reports and MLflow
    create_kwargs: dict  # keyword arguments the builder takes (timm / torchvision / the factory)
    build: dict  # ModelSpec.build: {"source": <entry>, ...what rebuilding needs besides create_kwargs}
    versions: dict
    onnx_file: Path | None = None  # the `onnx` source's checked file


@dataclass(frozen=True)
class Inputs:
    """What a source reads besides the config: the workspace root (relative paths) and the data's shape."""

    root: Path  # the workspace (the folder holding params.yaml): relative paths in params.yaml start here
    channels: int  # data.channels
    image_size: int  # data.image_size (square)
    num_classes: int | None  # the data's class count (the train source's head), None without labels
    seed: int


@dataclass(frozen=True)
class ModelSource:
    """A registry entry. `keys`: the ModelConfig keys it reads (others written in params.yaml are refused),
    `required`: those it needs. Subclasses implement `load` (and `rebuild` where there is a torch model)."""

    name: str
    description: str
    keys: tuple[str, ...]
    required: tuple[str, ...] = ()
    torch_model: bool = True  # False: no torch module (Core ML and recovery recipes need one)

    def check_config(self, cfg: ModelConfig) -> None:
        """Which keys apply (ValueError naming the key): called when params.yaml is parsed."""
        for key in self.required:
            if getattr(cfg, key) in (None, {}, ()):
                raise ValueError(f"model.{key} is required when model.source is {self.name!r} ({self.description})")
        for key in _KEYS:
            if key not in self.keys and key in cfg.model_fields_set and getattr(cfg, key) not in (None, False, {}):
                users = ", ".join(repr(s.name) for s in SOURCES.values() if key in s.keys)
                raise ValueError(f"model.{key} does not apply to model.source {self.name!r}; it is read by {users}")

    def check(self, cfg: ModelConfig, root: Path) -> None:
        """Cheap checks before any stage runs (names, files): a `VitqError` naming the bad value."""

    def load(self, cfg: ModelConfig, inputs: Inputs) -> SourceModel:
        raise NotImplementedError

    def rebuild(self, spec) -> torch.nn.Module:
        """The architecture of a saved `ModelSpec` (random weights: `vitq.tasks.model.load_model` loads model.pt)."""
        raise ModelError(f"model.source {self.name!r} has no torch model to rebuild")

    def refuses(self, recipe, from_torch: bool) -> str | None:
        """Why a recipe cannot take this source's model (None: it can); `from_torch`: its target converts the
        torch model (`Target.from_torch`)."""
        return None

    def default_name(self, raw: dict) -> str | None:
        """model.name when params.yaml leaves it out (`raw`: the model section as written); None: required."""
        return None


SOURCES: dict[str, ModelSource] = {}


def register_source(source: ModelSource) -> ModelSource:
    """Add a model source to the registry (`model.source: <source.name>`); returns it."""
    SOURCES[source.name] = source
    return source


def get_source(name: str) -> ModelSource:
    try:
        return SOURCES[name]
    except KeyError:
        raise ModelError(f"unknown model source {name!r}; allowed: {', '.join(SOURCES)}") from None


def resolve_path(value: str, root: Path) -> Path:
    """A path from params.yaml: absolute, or relative to the workspace."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else Path(root) / path


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _contract(cfg: ModelConfig, size: tuple[int, int, int], mean, std, origin: str) -> InputContract:
    """The library's contract, with model.mean / model.std where params.yaml sets them."""
    if cfg.mean is not None:
        mean, std, origin = cfg.mean, cfg.std, f"{origin}; mean/std from params.yaml"
    return InputContract(tuple(int(v) for v in size), tuple(float(v) for v in mean), tuple(float(v) for v in std),
                         origin)


def _params_contract(cfg: ModelConfig, inputs: Inputs) -> InputContract:
    """python / onnx: the data's shape and model.mean / model.std (required by check_config)."""
    return InputContract((inputs.channels, inputs.image_size, inputs.image_size), tuple(cfg.mean), tuple(cfg.std),
                         "params.yaml (model.mean, model.std; data.channels, data.image_size)")


def _checkpoint(cfg: ModelConfig, root: Path) -> tuple[Path, str] | None:
    if not cfg.checkpoint:
        return None
    return resolve_path(cfg.checkpoint, root), f"model.checkpoint {cfg.checkpoint!r}"


def _check_checkpoint(cfg: ModelConfig, root: Path) -> None:
    from vitq.tasks.checkpoints import check_checkpoint_file

    ckpt = _checkpoint(cfg, root)
    if ckpt is None:
        return
    path, shown = ckpt
    if not path.is_file():
        raise ModelError(f"{shown} does not exist; give the path to a local weights file")
    check_checkpoint_file(path, shown)


def _load_checkpoint(model: torch.nn.Module, cfg: ModelConfig, root: Path, name: str) -> str:
    """Load model.checkpoint strictly (vitq.tasks.checkpoints.load_strict); returns where the weights came from."""
    from vitq.tasks.checkpoints import load_strict, read_state_dict

    path, shown = _checkpoint(cfg, root)
    load_strict(model, read_state_dict(path, shown), shown, name)
    return f"checkpoint {cfg.checkpoint}"


# --- timm (and the embedded default, trained from timm's registry) -------------------------------------------


@dataclass(frozen=True)
class TimmSource(ModelSource):
    def default_name(self, raw: dict) -> str | None:
        return "vit_digits_patch4_32"  # the embedded default (vitq registers it with timm)

    def check(self, cfg: ModelConfig, root: Path) -> None:
        import timm

        from vitq.tasks import zoo  # noqa: F401  (registers vitq's models with timm)

        if not timm.is_model(cfg.name):
            close = difflib.get_close_matches(cfg.name, timm.list_models(), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ModelError(f"unknown timm model {cfg.name!r}{hint}; list names with timm.list_models('*vit*')")
        _check_checkpoint(cfg, root)

    def _kwargs(self, cfg: ModelConfig, inputs: Inputs) -> dict:
        kwargs = dict(cfg.arch)
        if cfg.num_classes is not None:
            kwargs["num_classes"] = cfg.num_classes
        return kwargs

    def load(self, cfg: ModelConfig, inputs: Inputs) -> SourceModel:
        import timm
        from timm.data import resolve_model_data_config

        kwargs = self._kwargs(cfg, inputs)
        # A checkpoint is loaded by us, strictly: timm's pretrained path would drop a head of the wrong size and
        # keep a random one in its place.
        model = _create_timm(cfg.name, pretrained=cfg.pretrained and not cfg.checkpoint, **kwargs)
        weights = "timm hub (pretrained)" if cfg.pretrained and not cfg.checkpoint else "random init"
        if cfg.checkpoint:
            weights = _load_checkpoint(model, cfg, inputs.root, cfg.name)
        data_cfg = resolve_model_data_config(model)
        size, origin = tuple(data_cfg["input_size"]), "timm data config"
        if "img_size" in kwargs or "in_chans" in kwargs:  # timm's config keeps the registered size; the model's own
            side = kwargs.get("img_size", size[1:])
            side = (side, side) if isinstance(side, int) else tuple(side)
            size, origin = (int(kwargs.get("in_chans", size[0])), *side), "timm data config; size from model.arch"
        contract = _contract(cfg, size, data_cfg["mean"], data_cfg["std"], origin)
        return SourceModel(model, contract, cfg.name, kwargs, {"source": self.name, "weights": weights},
                           {"timm": timm.__version__})

    def rebuild(self, spec) -> torch.nn.Module:
        return _create_timm(spec.name, pretrained=False, **spec.create_kwargs)


@dataclass(frozen=True)
class TrainSource(TimmSource):
    def _kwargs(self, cfg: ModelConfig, inputs: Inputs) -> dict:
        kwargs = dict(cfg.arch)
        num_classes = cfg.num_classes or inputs.num_classes
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        kwargs.setdefault("in_chans", inputs.channels)
        return kwargs

    def load(self, cfg: ModelConfig, inputs: Inputs) -> SourceModel:
        loaded = super().load(cfg, inputs)
        loaded.build["weights"] = "trained here (vitq.tasks.model.train_classifier)"
        return loaded


def _create_timm(name: str, **kwargs) -> torch.nn.Module:
    import timm

    from vitq.tasks import zoo  # noqa: F401  (registers vitq's models with timm)

    try:
        return timm.create_model(name, **kwargs)
    except (OSError, ConnectionError) as exc:
        raise ModelError(
            f"could not load pretrained weights for {name!r} ({type(exc).__name__}); nothing can be "
            "downloaded here: set model.checkpoint to a local weights file"
        ) from None
    except TypeError as exc:
        raise ModelError(f"model.arch does not fit {name!r}: {exc}") from None


# --- torchvision --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TorchvisionSource(ModelSource):
    def check(self, cfg: ModelConfig, root: Path) -> None:
        import torchvision

        names = torchvision.models.list_models()
        if cfg.name not in names:
            close = difflib.get_close_matches(cfg.name, names, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ModelError(f"unknown torchvision model {cfg.name!r}{hint}; see torchvision.models.list_models()")
        _check_checkpoint(cfg, root)

    def _create(self, name: str, kwargs: dict) -> torch.nn.Module:
        import torchvision

        try:  # weights=None: nothing downloads; the weights come from model.checkpoint
            return torchvision.models.get_model(name, weights=None, **kwargs)
        except (TypeError, ValueError) as exc:
            raise ModelError(f"model.arch does not fit torchvision {name!r}: {_first_line(exc)}") from None

    def load(self, cfg: ModelConfig, inputs: Inputs) -> SourceModel:
        import torch
        import torchvision

        kwargs = dict(cfg.arch)
        if cfg.num_classes is not None:
            kwargs["num_classes"] = cfg.num_classes
        model = self._create(cfg.name, kwargs)
        weights = _load_checkpoint(model, cfg, inputs.root, cfg.name)
        # The contract of the weights torchvision ships for this architecture (its DEFAULT entry's transforms:
        # mean, std, crop size). The size the model itself is fixed to (a ViT's `image_size`) comes first.
        try:
            transforms = torchvision.models.get_model_weights(cfg.name).DEFAULT.transforms()
        except (ValueError, AttributeError, KeyError):  # an architecture torchvision ships no weights for
            transforms = None
        mean, std = getattr(transforms, "mean", None), getattr(transforms, "std", None)
        if (mean is None or std is None) and cfg.mean is None:
            raise ModelError(f"torchvision's weights for {cfg.name!r} define no mean/std (transforms: "
                             f"{type(transforms).__name__}); set model.mean and model.std")
        convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        channels = convs[0].in_channels if convs else len(mean or cfg.mean)
        crop = getattr(transforms, "crop_size", None)
        side = getattr(model, "image_size", None) or (crop[0] if crop else inputs.image_size)
        origin = (f"torchvision {type(transforms).__name__} transforms of {cfg.name!r}'s DEFAULT weights"
                  if transforms is not None else f"torchvision ships no weights for {cfg.name!r}")
        contract = _contract(cfg, (channels, side, side), mean or cfg.mean, std or cfg.std, origin)
        return SourceModel(model, contract, cfg.name, kwargs, {"source": self.name, "weights": weights},
                           {"torchvision": torchvision.__version__})

    def rebuild(self, spec) -> torch.nn.Module:
        return self._create(spec.name, spec.create_kwargs)


# --- a Python factory ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PythonSource(ModelSource):
    def default_name(self, raw: dict) -> str | None:
        factory = raw.get("factory")
        return factory.rpartition(":")[2] or None if isinstance(factory, str) else None  # the function's name

    def _factory(self, spec: str, root: Path | None):
        from vitq.callables import load_callable

        return load_callable(spec, "model.factory", root)

    def check(self, cfg: ModelConfig, root: Path) -> None:
        self._factory(cfg.factory, root)  # the file, the module and the function exist (imports the file)
        _check_checkpoint(cfg, root)

    def _call(self, factory, shown: str, kwargs: dict) -> torch.nn.Module:
        import torch

        try:
            model = factory(**kwargs)
        except Exception as exc:  # the user's code: any exception is their one-line message
            raise ModelError(f"model.factory {shown!r} raised {type(exc).__name__}: {_first_line(exc)}") from None
        if not isinstance(model, torch.nn.Module):
            raise ModelError(f"model.factory {shown!r} returned a {type(model).__name__}, not a torch.nn.Module")
        return model

    def load(self, cfg: ModelConfig, inputs: Inputs) -> SourceModel:
        import torch

        where, _, function = cfg.factory.rpartition(":")
        build: dict[str, Any] = {"source": self.name, "factory": cfg.factory, "function": function}
        if where.endswith(".py"):  # a file: rebuilt from its absolute path, refused if it changed since
            path = resolve_path(where, inputs.root).resolve()
            build.update(file=str(path), sha256=file_digest(path))
        else:
            build["module"] = where
        model = self._call(self._factory(cfg.factory, inputs.root), cfg.factory, dict(cfg.arch))
        shown = cfg.name or function
        build["weights"] = (_load_checkpoint(model, cfg, inputs.root, shown) if cfg.checkpoint
                            else f"the factory's own (torch seeded with seed {inputs.seed})")
        return SourceModel(model, _params_contract(cfg, inputs), shown, dict(cfg.arch), build,
                           {"torch": torch.__version__})

    def rebuild(self, spec) -> torch.nn.Module:
        b = spec.build
        if "file" in b:
            path = Path(b["file"])
            if not path.is_file():
                raise ModelError(f"model.factory file {str(path)!r} (recorded in model.json) does not exist; "
                                 "rerun the model stage (vitq stage model)")
            if file_digest(path) != b["sha256"]:
                raise ModelError(f"model.factory file {str(path)!r} changed since the model stage saved the "
                                 "weights; rerun it (vitq stage model, or vitq run --force)")
            target = f"{path}:{b['function']}"
        else:
            target = f"{b['module']}:{b['function']}"
        return self._call(self._factory(target, None), b["factory"], dict(spec.create_kwargs))


# --- an FP32 ONNX file --------------------------------------------------------------------------------------

# Recovery recipes that work on the torch model, and what they do with it.
_RECOVERY_NEEDS_TORCH = {
    "auto": "ranks layer sensitivity by simulating INT8 in torch",
    "smoothquant": "rescales the torch model's weights",
    "search": "judges activation ranges on the torch model's layer outputs",
    "qat": "fine-tunes the torch model",
}
# ONNX ops of a model that is already quantized.
_QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
                  "MatMulInteger", "ConvInteger", "QGemm", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"}
MIN_ONNX_OPSET = 13  # per-channel QuantizeLinear / DequantizeLinear (the static recipes' weights)


def check_onnx_file(path: Path, shown: str) -> onnx.ModelProto:
    """The ONNX file, loaded, if it is an FP32 model vitq can quantize: the ONNX checker passes; one input
    (N, C, H, W) and one or more outputs (several: task.outputs says which are judged), all FLOAT; every float
    initializer and constant FLOAT; no quantized op, no cast to a narrower float; default-domain opset >= 13.
    Anything else is one `ModelError` naming it."""
    import onnx
    from onnx import TensorProto

    if not path.is_file():
        raise ModelError(f"{shown} does not exist; give the path to an FP32 ONNX file")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # DecodeError, OSError (external data)
        raise ModelError(f"{shown} is not a readable ONNX file ({type(exc).__name__}: {_first_line(exc)})") from None
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # ValidationError, InferenceError
        raise ModelError(f"{shown} fails the ONNX checker: {_first_line(exc)}") from None
    g = model.graph
    dtype = TensorProto.DataType.Name
    init_names = {i.name for i in g.initializer}
    inputs = [i for i in g.input if i.name not in init_names]
    if len(inputs) != 1 or not g.output:
        raise ModelError(f"{shown} has {len(inputs)} input(s) ({', '.join(i.name for i in inputs)}) and "
                         f"{len(g.output)} output(s) ({', '.join(o.name for o in g.output)}); vitq feeds one image "
                         "tensor (N, C, H, W) and compares the outputs")
    for kind, vi in (("input", inputs[0]), *(("output", o) for o in g.output)):
        if vi.type.tensor_type.elem_type != TensorProto.FLOAT:
            raise ModelError(f"{shown}: {kind} {vi.name!r} is {dtype(vi.type.tensor_type.elem_type)}, not FLOAT: "
                             "give the FP32 model")
    if len(inputs[0].type.tensor_type.shape.dim) != 4:
        raise ModelError(f"{shown}: input {inputs[0].name!r} has rank {len(inputs[0].type.tensor_type.shape.dim)}; "
                         "vitq feeds images (N, C, H, W)")
    for n in g.node:
        if n.op_type in _QUANTIZED_OPS:
            raise ModelError(f"{shown} holds {n.op_type} nodes ({n.name or n.output[0]!r}): it is quantized "
                             "already; give the FP32 model")
        to = next((a.i for a in n.attribute if a.name == "to"), None) if n.op_type == "Cast" else None
        if to in (TensorProto.FLOAT16, TensorProto.BFLOAT16):
            raise ModelError(f"{shown}: node {n.name or n.output[0]!r} casts to {dtype(to)}: not an FP32 model; "
                             "give the FP32 model")
    allowed = {TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32, TensorProto.BOOL}  # weights; shapes, indices
    tensors = [(f"initializer {t.name!r}", t) for t in g.initializer]
    tensors += [(f"constant {n.output[0]!r}", a.t) for n in g.node if n.op_type == "Constant"
                for a in n.attribute if a.name == "value"]
    for what, t in tensors:
        if t.data_type not in allowed:
            raise ModelError(f"{shown}: {what} is {dtype(t.data_type)}: not an FP32 model (FP16 or quantized "
                             "already?); give the FP32 model")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_ONNX_OPSET:
        raise ModelError(f"{shown} has opset {opset}; vitq's Q/DQ recipes need opset >= {MIN_ONNX_OPSET}: "
                         "re-export it with a newer opset_version")
    return model


def onnx_input_output(model: onnx.ModelProto) -> tuple[Any, Any]:
    """The graph input (not an initializer) and first output of a checked model (`onnx_outputs`: all of them)."""
    init_names = {i.name for i in model.graph.initializer}
    return next(i for i in model.graph.input if i.name not in init_names), model.graph.output[0]


def onnx_output_names(model: onnx.ModelProto) -> tuple[str, ...]:
    """The names vitq gives a checked model's outputs: its one output is `logits` (the export renames it so);
    several keep their graph names."""
    names = tuple(o.name for o in model.graph.output)
    return ("logits",) if len(names) == 1 else names


def static_dims(value_info) -> list[int | None]:
    """A value's dims: int where fixed, None where symbolic or unknown."""
    return [d.dim_value if d.HasField("dim_value") else None for d in value_info.type.tensor_type.shape.dim]


@dataclass(frozen=True)
class OnnxSource(ModelSource):
    def default_name(self, raw: dict) -> str | None:
        path = raw.get("path")
        return Path(path).stem or None if isinstance(path, str) else None  # the file's stem

    def check(self, cfg: ModelConfig, root: Path) -> None:
        check_onnx_file(resolve_path(cfg.path, root), f"model.path {cfg.path!r}")

    def load(self, cfg: ModelConfig, inputs: Inputs) -> SourceModel:
        import onnx
        import onnxruntime

        path = resolve_path(cfg.path, inputs.root)
        shown = f"model.path {cfg.path!r}"
        model = check_onnx_file(path, shown)
        contract = _params_contract(cfg, inputs)
        fixed = static_dims(onnx_input_output(model)[0])[1:]
        for dim, (want, key) in zip(fixed, zip(contract.input_size, ("channels", "image_size", "image_size"))):
            if dim is not None and dim != want:
                raise ModelError(f"{shown} takes input (N, {', '.join(str(d or '?') for d in fixed)}) but the data "
                                 f"is (N, {', '.join(map(str, contract.input_size))}); set data.{key}: {dim}")
        name = cfg.name or path.stem
        build = {"source": self.name, "path": cfg.path, "file": str(path.resolve()), "sha256": file_digest(path)}
        return SourceModel(None, contract, name, {}, build,
                           {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}, onnx_file=path)

    def refuses(self, recipe, from_torch: bool) -> str | None:
        if from_torch:
            return (f"recipe {recipe.name!r} converts the torch model (target {recipe.target!r}), and model.source "
                    "'onnx' has none (an ONNX file takes onnx-* and tensorrt-* recipes)")
        if getattr(recipe, "recovery", None) in _RECOVERY_NEEDS_TORCH:
            return (f"recipe {recipe.name!r} {_RECOVERY_NEEDS_TORCH[recipe.recovery]}, and model.source 'onnx' has "
                    "no torch model (an ONNX file takes the non-recovery onnx-* and tensorrt-* recipes)")
        return None


_COMMON = ("mean", "std")
register_source(TrainSource(
    "train", "the embedded default: a timm model trained here on the training split",
    keys=("name", "num_classes", "arch", *_COMMON)))
register_source(TimmSource(
    "timm", "timm.create_model(model.name, **model.arch) + model.checkpoint (or pretrained)",
    keys=("name", "pretrained", "checkpoint", "num_classes", "arch", *_COMMON)))
register_source(TorchvisionSource(
    "torchvision", "torchvision.models.get_model(model.name, **model.arch) + model.checkpoint; nothing downloads",
    keys=("name", "checkpoint", "num_classes", "arch", *_COMMON), required=("name", "checkpoint")))
register_source(PythonSource(
    "python", "model.factory 'file.py:function' or 'package.module:function', called with model.arch",
    keys=("name", "factory", "checkpoint", "arch", *_COMMON), required=("factory", "mean", "std")))
register_source(OnnxSource(
    "onnx", "the FP32 ONNX file model.path; ONNX Runtime and TensorRT recipes only",
    keys=("name", "path", *_COMMON), required=("path", "mean", "std"), torch_model=False))


def source_names() -> tuple[str, ...]:
    return tuple(SOURCES)


def check_model_section(cfg: ModelConfig) -> ModelConfig:
    """params.yaml's model section against its source: a known source, the keys it reads and needs (ValueError
    naming the key); returns it with model.name filled in where the source has a default."""
    if cfg.source not in SOURCES:
        raise ValueError(f"model.source: unknown model source {cfg.source!r}; allowed: {', '.join(SOURCES)}")
    source = SOURCES[cfg.source]
    source.check_config(cfg)
    if cfg.name is None:
        name = source.default_name(cfg.model_dump(exclude_unset=True))
        if name:
            return cfg.model_copy(update={"name": name})
    return cfg
