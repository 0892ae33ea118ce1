"""`vitq peers` on the tiny trained workspace: ONNX Runtime's default quantize_static (and NNCF's, where the
optional extra is installed, and ModelOpt's, where `make modelopt` built its venv) beside a vitq recipe, one
table with every row and field; a missing NNCF is one line and exit code 2 with nothing written."""

import importlib.util
import json
import sys

import onnx
import pytest

from conftest import tiny_params, workspace_copy
from vitq import cli
from vitq.params import parse_params
from vitq.experiments import peers

FIELDS = ("case", "variant", "top1", "top1_drop", "sqnr_db", "int8_mac_fraction", "quantize_seconds", "passed")


@pytest.fixture(scope="module")
def ws(staged_workspace, tmp_path_factory):
    return workspace_copy(staged_workspace, tmp_path_factory, "peers")  # writes the case's folders


def test_peers_table_has_vitq_and_every_peer_on_the_same_case(ws):
    names = (["ort"] + (["nncf", "nncf-ac"] if importlib.util.find_spec("nncf") else [])
             + (["modelopt"] if peers.modelopt_python() else []))  # ModelOpt: where `make modelopt` built its venv
    out = ws.root / "reports" / "peers.json"
    result = peers.run_peers(ws, parse_params(tiny_params()), ["digits"], peers.check_peers(names),
                             ["onnx-w8a8-minmax"], out)
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(result))
    rows = {r["variant"]: r for r in written["records"]}
    assert list(rows) == ["fp32", "onnx-w8a8-minmax", *(f"peer-{n}" for n in names)], list(rows)
    for name, r in rows.items():
        assert r["case"] == "digits"
        if name != "fp32":
            assert all(k in r for k in FIELDS), (name, sorted(r))
            assert r["top1"] is not None and r["sqnr_db"] is not None and r["quantize_seconds"] >= 0, r
    ort = rows["peer-ort"]
    assert ort["tool"].startswith("onnxruntime.quantization.quantize_static") and ort["eight_bit"], ort
    assert ort["int8_mac_fraction"] == 1.0, f"ORT's defaults quantize every MatMul/Gemm: {ort['int8_mac_fraction']}"
    assert ort["sqnr_db"] > 10.0, f"ORT default INT8 logits SQNR {ort['sqnr_db']:.1f} dB on the tiny ViT"
    if "modelopt" in names:  # its own placement: Q/DQ on every MatMul, the head (Gemm) left float
        mo = rows["peer-modelopt"]
        assert mo["tool"].startswith("modelopt.onnx.quantization.quantize") and mo["eight_bit"], mo
        assert 0.9 < mo["int8_mac_fraction"] < 1.0 and mo["sqnr_db"] > 10.0, mo
        assert "nvidia-modelopt" in written["versions"], written["versions"]
    qdq = onnx.load(str(ws.root / "artifacts" / "recovery" / "digits" / "variants" / "peer-ort" / "model.onnx"))
    assert any(n.op_type == "QuantizeLinear" for n in qdq.graph.node), "the peer's own Q/DQ graph is kept"
    table = (ws.root / "reports" / "peers.md").read_text()
    for name in rows:
        assert f"| {name} |" in table, (name, table)
    assert f"{written['machine']['cpu']} ({written['machine']['cores']} cores)" in table


def test_missing_nncf_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "nncf", None)  # `import nncf` fails, find_spec says not installed
    rc = cli.main(["peers", "--workdir", str(tmp_path), "--peers", "ort,nncf-ac"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, (rc, err)
    assert "nncf-ac" in err and "pip install -e '.[nncf]'" in err, err
    assert not any(tmp_path.iterdir()), "nothing written"
    # ONNX Runtime's peer needs no extra: the command goes on (and fails here only for want of a workspace)
    rc = cli.main(["peers", "--workdir", str(tmp_path), "--peers", "ort"])
    err = capsys.readouterr().err
    assert rc == 2 and "not installed" not in err and "params" in err, err


def test_unknown_peer_names_the_allowed_ones(tmp_path, capsys):
    assert cli.main(["peers", "--workdir", str(tmp_path), "--peers", "ort,tflite"]) == 2
    err = capsys.readouterr().err
    assert "'tflite'" in err and "ort, nncf, nncf-ac" in err, err
