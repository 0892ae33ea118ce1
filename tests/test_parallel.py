"""tasks/parallel.py: max_workers from the machine, and each variant's share of the cores for ONNX Runtime and
torch while variants run side by side (issue 32 item 4)."""

from __future__ import annotations

import onnx
import psutil
import torch
from onnx import TensorProto, helper

from vitq.tasks import parallel
from vitq.tasks.targets.onnx import backend


def _tiny_model() -> bytes:
    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def test_workers_follow_cores_and_memory_unless_set(monkeypatch):
    assert parallel.workers(3) == 3  # as set
    monkeypatch.setattr(parallel, "cores", lambda: 16)
    gb = 1 << 30

    class Mem:
        available = 64 * gb

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Mem)
    assert parallel.workers(None) == parallel.MAX_AUTO == 4 and parallel.threads_per_worker(4) == 4
    Mem.available = 9 * gb  # two workers' worth of memory
    assert parallel.workers(None) == 2
    Mem.available = 1 * gb  # less than one worker's: still one
    assert parallel.workers(None) == 1
    monkeypatch.setattr(parallel, "cores", lambda: 2)
    Mem.available = 20 * gb
    assert parallel.workers(None) == 2 and parallel.threads_per_worker(2) == 1 and parallel.threads_per_worker(1) == 2


def test_the_variant_phase_gives_each_session_and_torch_its_share(monkeypatch):
    monkeypatch.setattr(parallel, "cores", lambda: 4)
    before = torch.get_num_threads()
    outside = backend.session(_tiny_model())
    assert outside.get_session_options().intra_op_num_threads == 0  # alone: ORT's default
    with parallel.variant_phase(2) as threads:
        assert threads == 2 and torch.get_num_threads() == 2 and parallel.session_threads() == 2
        inside = backend.session(_tiny_model())
        assert inside.get_session_options().intra_op_num_threads == 2
        assert backend.session(_tiny_model(), threads=1).get_session_options().intra_op_num_threads == 1  # as asked
    assert torch.get_num_threads() == before and parallel.session_threads() == 0
    onnx.checker.check_model(onnx.load_from_string(_tiny_model()))
