"""Export that does not give up (issue 29 item 2): the dynamo exporter first, the TorchScript exporter when it
fails; both failing is one ModelError line naming each exporter's cause; export.json and variant.json record
which exporter produced the graph."""

from __future__ import annotations

import contextlib
import json
import logging
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vitq.config import ExportConfig
from vitq.errors import ModelError
from vitq.tasks import export
from vitq.tasks.export import ExportMismatch, export_model, load_export_result


class Attention5D(torch.nn.Module):
    """Attention over 5-D q/k/v (twins / hiera style): torch 2.14's dynamo exporter asserts "only 4D query, key,
    and value are supported" in its aten_scaled_dot_product_attention; the TorchScript exporter writes it."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(8, 24)
        self.head = torch.nn.Linear(96, 5)

    def forward(self, x):
        q, k, v = self.qkv(x.unsqueeze(1)).chunk(3, -1)  # (N, 1, 3, 4, 8) each
        return self.head(F.scaled_dot_product_attention(q, k, v).flatten(1))


class Inverse(torch.nn.Module):
    """torch.linalg.inv: no ONNX function in the dynamo exporter (aten.linalg_inv_ex), no symbolic in the
    TorchScript exporter (aten::linalg_inv)."""

    def forward(self, x):
        m = x.flatten(1)[:, :16].reshape(-1, 4, 4) + 4 * torch.eye(4)
        return torch.linalg.inv(m).flatten(1)


class Plain(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(96, 5)

    def forward(self, x):
        return self.fc(x.flatten(1))


def _x(n: int = 6) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, 3, 4, 8)).astype(np.float32)


@contextlib.contextmanager
def _quiet(capfd):
    """Nothing an exporter prints reaches fd 1 / 2 (no banner, no IR dump) and no warning gets out."""
    with warnings.catch_warnings(record=True) as leaked:
        warnings.simplefilter("always")
        yield
    out, err = capfd.readouterr()
    for needle in ("[torch.onnx]", "Torch IR graph", "Warning", "\x1b["):
        assert needle not in out + err, (out + err)[:2000]
    assert not leaked, [str(w.message)[:200] for w in leaked]


def test_a_module_the_dynamo_exporter_rejects_is_exported_by_torchscript(tmp_path, capfd):
    import onnxruntime as ort

    from vitq.tasks.recovery.layers import quantizable_layers

    with _quiet(capfd):
        result = export_model(Attention5D().eval(), _x(), ExportConfig(), tmp_path / "export")
    assert result.exporter == "torchscript"
    reason = result.fallback_reason
    assert reason and "scaled_dot_product_attention" in reason and "only 4D" in reason, reason
    assert "\n" not in reason and "\x1b[" not in reason, reason
    assert result.opset == min(ExportConfig().opset, 20) and result.max_abs_diff < 1e-5
    saved = load_export_result(tmp_path / "export")
    assert (saved.exporter, saved.fallback_reason) == ("torchscript", reason)
    assert json.loads((tmp_path / "export" / "export.json").read_text())["exporter"] == "torchscript"
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["export.json", "model.onnx", "model.prep.onnx"]
    # the batch axis is dynamic, on the input and the output
    sess = ort.InferenceSession(str(tmp_path / "export" / "model.prep.onnx"), providers=["CPUExecutionProvider"])
    assert sess.run(["logits"], {"input": _x(3)})[0].shape == (3, 5)
    # the layers are named by torch module, as from a dynamo graph
    names = {layer.name for layer in quantizable_layers(tmp_path / "export" / "model.onnx",
                                                         tmp_path / "export" / "model.prep.onnx") if layer.weighted}
    assert names == {"qkv", "head"}, names


def test_a_module_both_exporters_reject_is_one_model_error_line(tmp_path, capfd, caplog):
    caplog.set_level(logging.DEBUG, logger="vitq.export")
    with _quiet(capfd), pytest.raises(ModelError) as info:
        export_model(Inverse().eval(), _x(), ExportConfig(), tmp_path / "export")
    message = str(info.value)
    assert "\n" not in message and "\x1b[" not in message and len(message) < 800, message
    assert "Inverse" in message, message
    assert "dynamo exporter fails (" in message and "aten.linalg_inv" in message, message  # dynamo's cause
    assert "TorchScript exporter (" in message and "aten::linalg_inv" in message, message  # TorchScript's cause
    assert "model.source: onnx" in message, message
    assert not (tmp_path / "export").exists()
    # what the exporters printed and warned is in the log (DEBUG, vitq.export), not on the console
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name == "vitq.export")
    assert "Torch IR graph at exception" in logged and "legacy TorchScript-based ONNX export" in logged, logged[-3000:]


def test_a_module_the_dynamo_exporter_takes_is_exported_by_dynamo(tmp_path):
    result = export_model(Plain().eval(), _x(), ExportConfig(), tmp_path / "export")
    assert (result.exporter, result.fallback_reason) == ("dynamo", None)
    assert load_export_result(tmp_path / "export").exporter == "dynamo"


def test_a_mismatch_of_the_fallback_graph_is_an_export_mismatch(tmp_path, monkeypatch):
    real = export.predict_outputs
    monkeypatch.setattr(export, "predict_outputs", lambda model, x: {k: v + 1 for k, v in real(model, x).items()})
    with pytest.raises(ExportMismatch, match="TorchScript exporter, used because the dynamo exporter failed"):
        export_model(Attention5D().eval(), _x(), ExportConfig(), tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_torchscript_graph_names_layers_as_the_dynamo_graph_does(tmp_path):
    """A small timm ViT through each exporter: the same torch module names for every layer."""
    timm = pytest.importorskip("timm")
    from vitq.tasks.recovery.layers import quantizable_layers

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              embed_dim=32, num_heads=2, num_classes=10).eval()
    example = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    names = {}
    for exporter in export.EXPORTERS:
        path = tmp_path / exporter / "model.onnx"
        path.parent.mkdir()
        export._EXPORT[exporter](model, example, ("logits",), 20, path)
        names[exporter] = sorted(layer.name for layer in quantizable_layers(path, path))
    assert names["torchscript"] == names["dynamo"], names
    assert "blocks.1.attn.qkv" in names["dynamo"] and not any(n.startswith("onnx:") for n in names["dynamo"]), names


class ZeroBiasAttention5D(torch.nn.Module):
    """A patch Conv and 5-D attention with every bias zero, as fresh timm weights have them: the TorchScript
    exporter merges equal initializers into one tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = torch.nn.Conv2d(3, 8, 4, stride=4)
        self.qkv = torch.nn.Linear(8, 24)
        self.proj = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(32, 8)
        for m in (self.patch, self.qkv, self.proj, self.head):
            torch.nn.init.zeros_(m.bias)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)  # (N, 4, 8)
        q, k, v = self.qkv(t[:, None, None]).chunk(3, -1)  # (N, 1, 1, 4, 8) each
        return self.head(self.proj(F.scaled_dot_product_attention(q, k, v)).flatten(1))


def test_the_variant_records_the_torchscript_export_and_its_qdq_graph_conforms(tmp_path):
    import vitq

    x = torch.from_numpy(np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32))
    variant = vitq.quantize(ZeroBiasAttention5D().eval(), "onnx-w8a8-percentile", calibration=x, workdir=tmp_path)
    assert variant.artifact.exporter == "torchscript"  # and quantize_variant's conformance check passed
    assert json.loads((variant.path / "variant.json").read_text())["exporter"] == "torchscript"
    assert {"patch", "qkv", "proj", "head"} <= set(variant.artifact.float_layers) | _int8_layers(variant), \
        variant.artifact
    assert np.isfinite(variant.validate(x).metrics.sqnr_db)


def _int8_layers(variant) -> set[str]:
    from vitq.tasks.recovery.layers import quantizable_layers

    fp32 = variant.fp32_onnx
    return {layer.name for layer in quantizable_layers(fp32, fp32.with_name("model.prep.onnx")) if layer.weighted}


def test_export_json_and_variant_json_without_the_exporter_still_load(tmp_path):
    from dataclasses import asdict

    from vitq.tasks.variant import VariantArtifact, load_variant

    old = {"onnx_path": "model.onnx", "prep_path": "model.prep.onnx", "opset": 20, "max_abs_diff": 1e-6,
           "verified_images": 64, "size_mb": 1.0, "versions": {}, "outputs": ["logits"]}
    (tmp_path / "export.json").write_text(json.dumps(old))
    loaded = load_export_result(tmp_path)
    assert (loaded.exporter, loaded.fallback_reason) == ("dynamo", None)
    assert VariantArtifact.exporter_beside(tmp_path / "model.prep.onnx") == "dynamo"
    assert VariantArtifact.exporter_beside(tmp_path / "elsewhere" / "model.prep.onnx") is None
    art = VariantArtifact(name="v", recipe={}, artifact="model.onnx", qdq_artifact="model.onnx", size_mb=1.0,
                          int8_weight_fraction=1.0, op_counts={}, calibration_table=None, tensorrt_ready=True,
                          tensorrt_note=None)
    record = asdict(art)
    record.pop("exporter")
    (tmp_path / "variants" / "v").mkdir(parents=True)
    (tmp_path / "variants" / "v" / "variant.json").write_text(json.dumps(record))
    assert load_variant(tmp_path / "variants", "v").exporter is None


@pytest.mark.slow
def test_a_timm_model_the_dynamo_exporter_rejects_is_quantized(tmp_path):
    """timm twins_svt_small (random weights): the dynamo exporter rejects its 5-D attention; the variant is
    quantized from the TorchScript graph and says so."""
    timm = pytest.importorskip("timm")
    import vitq

    model = timm.create_model("twins_svt_small", pretrained=False).eval()
    x = torch.randn(4, 3, 224, 224)
    variant = vitq.quantize(model, "onnx-w8a8-percentile", calibration=x)
    assert variant.artifact.exporter == "torchscript"
    sqnr = variant.validate(x).metrics.sqnr_db
    assert np.isfinite(sqnr), sqnr
