"""The Q/DQ conformance check on hand-built graphs: a valid one passes, each broken one names its rule and node."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from vitq.tasks.conformance import QdqConformanceError, assert_conforms, check_qdq, tensorrt_readiness

K, N = 8, 4


def _graph(act_zp=0, act_zp_type=np.int8, w_axis=1, w_scales=N, orphan_q=False, softmax_after_dq=False):
    """x -Q-DQ-> MatMul(W via DQ, per-channel) -> y ; optional breakages."""
    inits = [
        numpy_helper.from_array(np.array(0.1, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(act_zp, act_zp_type), "x_zp"),
        numpy_helper.from_array(np.ones((K, N), np.int8), "w_q"),
        numpy_helper.from_array(np.full(w_scales, 0.02, np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(w_scales, np.int8), "w_zp"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"], name="x_Q"),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"], name="x_DQ"),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w"], name="w_DQ", axis=w_axis),
        helper.make_node("MatMul", ["x_dq", "w"], ["y"], name="matmul"),
    ]
    if orphan_q:
        nodes.append(helper.make_node("QuantizeLinear", ["y", "x_scale", "x_zp"], ["y_q"], name="lonely_Q"))
        nodes.append(helper.make_node("Relu", ["y_q"], ["y_relu"], name="relu"))
    if softmax_after_dq:
        nodes += [
            helper.make_node("QuantizeLinear", ["y", "x_scale", "x_zp"], ["y_q2"], name="y_Q"),
            helper.make_node("DequantizeLinear", ["y_q2", "x_scale", "x_zp"], ["y_dq"], name="y_DQ"),
            helper.make_node("Softmax", ["y_dq"], ["probs"], name="softmax"),
        ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, N])]
    if softmax_after_dq:
        outputs.append(helper.make_tensor_value_info("probs", TensorProto.FLOAT, [2, N]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, K])], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def test_valid_graph_conforms_and_is_tensorrt_ready():
    model = _graph()
    onnx.checker.check_model(model)
    assert check_qdq(model) == []
    assert tensorrt_readiness(model) is None


@pytest.mark.parametrize(
    "kwargs, rule, node",
    [
        ({"act_zp": 3}, "symmetric-int8", "x_Q"),
        ({"act_zp": 128, "act_zp_type": np.uint8}, "symmetric-int8", "x_Q"),
        ({"w_axis": 0, "w_scales": K}, "per-channel-axis", "w_DQ"),
        ({"w_scales": N + 1}, "per-channel-axis", "w_DQ"),
        ({"orphan_q": True}, "orphan-q", "lonely_Q"),
        ({"softmax_after_dq": True}, "float-only-consumer", "y_DQ"),
    ],
)
def test_broken_graph_names_rule_and_node(kwargs, rule, node):
    model = _graph(**kwargs)
    with pytest.raises(QdqConformanceError) as exc:
        assert_conforms(model)
    found = [(v.rule, v.node) for v in exc.value.violations]
    assert (rule, node) in found, found
    assert {r for r, _ in found} == {rule}, found  # each graph breaks one rule; nothing else is reported
    assert f"{rule} at node {node!r}" in str(exc.value), str(exc.value)  # the message names it too


def test_dynamic_quantization_is_not_tensorrt_ready():
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "s", "z"], name="dql")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("xq", TensorProto.UINT8, [2])])
    assert "DynamicQuantizeLinear" in tensorrt_readiness(helper.make_model(graph))
