"""Tiny ONNX models for tests, importable by name (tests/e2e has a conftest of its own, so a test importing
`from conftest import ...` could get that one)."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper


def conv_relu_onnx(cin: int = 3, cout: int = 8, k: int = 3, seed: int = 0, graph_name: str = "g") -> bytes:
    """Conv + Relu with dynamic N, H, W; input "input", output "logits" (like export.onnx_bytes)."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((cout, cin, k, k)).astype(np.float32), "w")
    b = numpy_helper.from_array(np.zeros(cout, np.float32), "b")
    pad = k // 2
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w", "b"], ["c"], pads=[pad] * 4),
         helper.make_node("Relu", ["c"], ["logits"])],
        graph_name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", cin, "H", "W"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", cout, "H", "W"])],
        [w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tests")
    model.ir_version = 8  # readable by any onnxruntime >= 1.10
    return model.SerializeToString()
