import argparse
import os
import pickle

import numpy as np
import pytest
import torch

from conftest import make_workspace, tiny_params, vitq
from vitq.tasks.data import load_split, model_inputs
from vitq.tasks.checkpoints import read_state_dict
from vitq.tasks.model import load_model, predict, resolve_model
from vitq.tasks.export import load_export_result
from vitq.tasks.layout import Workspace
from vitq.config import ModelConfig
from vitq.errors import ModelError


def test_trained_model_learns_and_export_matches_torch(staged_workspace):
    ws = Workspace(staged_workspace)
    _, spec = load_model(ws.model_dir)
    assert spec.top1 is not None and spec.top1 > 0.5, f"tiny model top-1 {spec.top1}"
    exp = load_export_result(ws.export_dir)
    assert exp.opset >= 17 and exp.max_abs_diff < 1e-4, exp.max_abs_diff


def test_timm_model_from_a_local_checkpoint_reproduces_its_outputs(staged_workspace, tmp_path):
    ws = Workspace(staged_workspace)
    trained, spec = load_model(ws.model_dir)
    ckpt = tmp_path / "weights.pth"
    torch.save(trained.state_dict(), ckpt)
    cfg = ModelConfig(source="timm", name=spec.name, checkpoint=str(ckpt), num_classes=10,
                      arch=tiny_params()["model"]["arch"])
    loaded = resolve_model(cfg, ws.data_dir, tmp_path / "model", seed=1)
    assert loaded.top1 == spec.top1
    x = model_inputs(load_split(ws.data_dir, "validation").images[:8], spec.mean, spec.std)
    again, _ = load_model(tmp_path / "model")
    np.testing.assert_allclose(predict(again, x), predict(trained, x), atol=1e-6)


@pytest.mark.parametrize(
    "cfg, needle",
    [
        (ModelConfig(source="timm", name="vit_tiny_patch16_224x"), "unknown timm model 'vit_tiny_patch16_224x'"),
        (ModelConfig(source="timm", name="vit_digits_patch4_32", checkpoint="/nonexistent/w.pth"), "does not exist"),
        (ModelConfig(source="timm", name="vit_tiny_patch16_224"), "takes 3-channel input but data.channels is 1"),
    ],
)
def test_bad_model_is_one_clear_error_and_writes_nothing(staged_workspace, tmp_path, cfg, needle):
    ws = Workspace(staged_workspace)
    with pytest.raises(ModelError, match=needle):
        resolve_model(cfg, ws.data_dir, tmp_path / "model", seed=0)
    assert not (tmp_path / "model").exists()


# --- model.checkpoint: every fault is one ModelError naming the file, and nothing is written ---------------------

def _checkpoint_cfg(path, num_classes=10) -> ModelConfig:
    return ModelConfig(source="timm", name="vit_digits_patch4_32", checkpoint=str(path), num_classes=num_classes,
                       arch=tiny_params()["model"]["arch"])


def _assert_refused(ws: Workspace, cfg: ModelConfig, out_dir, *needles) -> str:
    with pytest.raises(ModelError) as info:
        resolve_model(cfg, ws.data_dir, out_dir, seed=0)
    message = str(info.value)
    assert "\n" not in message and f"model.checkpoint {cfg.checkpoint!r}" in message, message
    for needle in needles:
        assert needle in message, message
    assert not out_dir.exists()
    return message


def _trained_state_dict(ws: Workspace) -> dict:
    return load_model(ws.model_dir)[0].state_dict()


def _assert_reproduces_trained(ws: Workspace, cfg: ModelConfig, out_dir) -> None:
    trained, spec = load_model(ws.model_dir)
    loaded = resolve_model(cfg, ws.data_dir, out_dir, seed=1)  # another seed: no weight may come from the RNG
    assert loaded.top1 == spec.top1
    x = model_inputs(load_split(ws.data_dir, "validation").images[:8], spec.mean, spec.std)
    np.testing.assert_allclose(predict(load_model(out_dir)[0], x), predict(trained, x), atol=1e-6)


def test_truncated_checkpoint_is_refused(staged_workspace, tmp_path):
    ws = Workspace(staged_workspace)
    torch.save(_trained_state_dict(ws), tmp_path / "w.pth")
    data = (tmp_path / "w.pth").read_bytes()
    (tmp_path / "w.pth").write_bytes(data[: len(data) // 2])
    _assert_refused(ws, _checkpoint_cfg(tmp_path / "w.pth"), tmp_path / "model", "truncated or damaged")


def test_text_file_is_not_a_checkpoint(staged_workspace, tmp_path):
    ws = Workspace(staged_workspace)
    (tmp_path / "w.pth").write_text("these are not the weights you are looking for\n")
    _assert_refused(ws, _checkpoint_cfg(tmp_path / "w.pth"), tmp_path / "model", "is not a PyTorch checkpoint")


class _RunsAShellCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"echo pwned > {self.marker}",)


@pytest.mark.parametrize("writer", ["pickle.dump", "torch.save", "torch.save legacy"])
def test_pickled_code_is_refused_and_never_run(staged_workspace, tmp_path, writer):
    ws = Workspace(staged_workspace)
    marker, path = tmp_path / "pwned", tmp_path / "w.pth"
    payload = {**_trained_state_dict(ws), "evil": _RunsAShellCommand(marker)}
    if writer == "pickle.dump":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=writer == "torch.save")
    system = f"{os.system.__module__}.{os.system.__name__}"  # posix.system on Linux and macOS
    message = _assert_refused(ws, _checkpoint_cfg(path), tmp_path / "model", "holds pickled objects other than tensors")
    assert system in message.split("tensors (", 1)[1].split(")")[0], message  # named among the refused globals
    with pytest.raises(ModelError, match=f"other than tensors \\(.*{system}"):  # the loader itself, past the preflight
        read_state_dict(path)
    assert not marker.exists(), "the pickled command ran"


@pytest.mark.parametrize("file_classes", [3, 10])
def test_head_of_another_size_is_refused_not_reinitialised(staged_workspace, tmp_path, file_classes):
    import timm

    ws = Workspace(staged_workspace)
    other = timm.create_model("vit_digits_patch4_32", num_classes=file_classes, **tiny_params()["model"]["arch"])
    torch.save(other.state_dict(), tmp_path / "w.pth")
    _assert_refused(
        ws, _checkpoint_cfg(tmp_path / "w.pth", num_classes=5), tmp_path / "model",
        f"head.weight has shape [{file_classes}, 32] in the file but the model expects [5, 32] (and 1 more parameter "
        f"of another shape); set model.num_classes: {file_classes}",
    )


def test_missing_and_unexpected_keys_are_listed(staged_workspace, tmp_path):
    import timm

    ws = Workspace(staged_workspace)
    state_dict = _trained_state_dict(ws)
    del state_dict["fc_norm.weight"], state_dict["fc_norm.bias"]
    state_dict["extra.weight"] = torch.zeros(2)
    torch.save(state_dict, tmp_path / "w.pth")
    _assert_refused(
        ws, _checkpoint_cfg(tmp_path / "w.pth"), tmp_path / "model",
        "2 model keys missing from the file (fc_norm.weight, fc_norm.bias) and 1 unexpected key in the file "
        "(extra.weight)",
    )
    deeper = timm.create_model("vit_digits_patch4_32", **{**tiny_params()["model"]["arch"], "depth": 2})
    torch.save(deeper.state_dict(), tmp_path / "deeper.pth")
    _assert_refused(
        ws, _checkpoint_cfg(tmp_path / "deeper.pth"), tmp_path / "model",
        "12 unexpected keys in the file (blocks.1.norm1.weight, blocks.1.norm1.bias, blocks.1.attn.qkv.weight, "
        "blocks.1.attn.qkv.bias, ...)",
    )


def test_safetensors_checkpoint_reproduces_outputs_and_a_damaged_one_is_refused(staged_workspace, tmp_path):
    from safetensors.torch import save_file

    ws = Workspace(staged_workspace)
    save_file(_trained_state_dict(ws), tmp_path / "w.safetensors")
    _assert_reproduces_trained(ws, _checkpoint_cfg(tmp_path / "w.safetensors"), tmp_path / "model")
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    _assert_refused(ws, _checkpoint_cfg(tmp_path / "cut.safetensors"), tmp_path / "model2",
                    "is not a readable safetensors file")


@pytest.mark.parametrize("wrap", ["state_dict+args", "model", "state_dict_ema", "module."])
def test_wrapped_checkpoint_loads(staged_workspace, tmp_path, wrap):
    ws = Workspace(staged_workspace)
    sd = _trained_state_dict(ws)
    zeros = {k: torch.zeros_like(v) for k, v in sd.items()}
    checkpoint = {
        # what timm's train.py saves: its arguments in an argparse.Namespace beside the weights
        "state_dict+args": {"state_dict": sd, "epoch": 7, "args": argparse.Namespace(lr=0.1), "optimizer": {}},
        "model": {"model": sd},
        "state_dict_ema": {"state_dict": zeros, "state_dict_ema": sd},  # EMA weights first, as timm does
        "module.": {f"module.{k}": v for k, v in sd.items()},  # DistributedDataParallel
    }[wrap]
    torch.save(checkpoint, tmp_path / "w.pth")
    _assert_reproduces_trained(ws, _checkpoint_cfg(tmp_path / "w.pth"), tmp_path / "model")


def test_dict_without_a_state_dict_is_refused(staged_workspace, tmp_path):
    ws = Workspace(staged_workspace)
    torch.save({"weights": _trained_state_dict(ws), "epoch": 3}, tmp_path / "w.pth")
    _assert_refused(ws, _checkpoint_cfg(tmp_path / "w.pth"), tmp_path / "model",
                    "holds no state dict: a dict with keys weights, epoch")


def test_cli_head_mismatch_is_one_line_exit_2_and_writes_nothing(tmp_path):
    import timm

    arch = tiny_params()["model"]["arch"]
    torch.save(timm.create_model("vit_digits_patch4_32", num_classes=3, **arch).state_dict(), tmp_path / "w3.pth")
    params = tiny_params(model={"source": "timm", "checkpoint": str(tmp_path / "w3.pth"), "num_classes": 5})
    ws = make_workspace(tmp_path / "ws", params, dvc=False)
    assert vitq(["stage", "data"], ws).returncode == 0
    proc = vitq(["stage", "model"], ws)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("vitq: error: model.checkpoint") and "set model.num_classes: 3" in lines[0], lines[0]
    assert not Workspace(ws).model_dir.exists()
