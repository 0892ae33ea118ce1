import numpy as np
import pytest
import torch

from conftest import tiny_params
from tasks.data import load_split, model_inputs
from tasks.model import load_model, predict, resolve_model
from tasks.export import load_export_result
from tasks.layout import Workspace
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
