"""Checkpoint files: a state dict from torch.save or *.safetensors, read without unpickling anything but tensors
and plain containers, checked cheaply before the model stage (`check_checkpoint_file`), and loaded strictly
(`load_strict`: every key and shape must fit, or one line naming the mismatch and the params.yaml key to change)."""

from __future__ import annotations

import argparse
import pickle
import re
import warnings
import logging
import zipfile
from pathlib import Path

import torch

from vitq.errors import ModelError

log = logging.getLogger("vitq.model")


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


