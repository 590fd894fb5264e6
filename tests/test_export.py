"""ONNX export: parity with torch, metadata, dynamic shapes, stable graph hash, simplification."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from autoseg.errors import AutosegError, InputError
from autoseg.export import (
    ExportInfo,
    annotate,
    export_final,
    graph_hash,
    int8_bytes,
    model_metadata,
    onnx_bytes,
    op_counts,
    quantize_int8,
    read_metadata,
    upsample_as_conv,
)
from autoseg.unet import Arch, build_unet

META = {
    "classes": json.dumps(["bg", "a", "b", "c", "d"]),
    "mean": "[0.5, 0.5, 0.5]",
    "std": "[0.25, 0.25, 0.25]",
}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny nets: one thread is as fast, and immune to OpenMP stalls when the machine is busy."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


class TinyFCN(nn.Module):
    """Fully convolutional, one down/up level: the ops a U-Net exports (conv, BN, pool, convT, concat)."""

    def __init__(self, cin: int = 3, k: int = 5):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(cin, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.head = nn.Conv2d(16, k, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a(x)
        return self.head(torch.cat([a, self.up(self.b(a))], 1))


class Drifting(nn.Module):
    """Adds a call counter: tracing freezes it, so torch and ONNX disagree (parity must fail)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.conv(x) + float(self.calls)


def _tiny() -> nn.Module:
    return TinyFCN()


def _unet() -> nn.Module:
    return build_unet(Arch((3, 3), (16, 64)), 3, 5)


def _unet_bilinear() -> nn.Module:
    return build_unet(Arch((3, 3, 3), (8, 8, 16), "separable", "bilinear"), 3, 5)


FACTORIES = {"tiny": _tiny, "unet": _unet, "unet_bilinear": _unet_bilinear}


def _model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = FACTORIES[name]()
    # Non-trivial BN statistics, so folding BN into conv is actually exercised.
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    return m.eval()


@pytest.fixture(scope="module", params=list(FACTORIES))
def exported(request, tmp_path_factory) -> tuple[nn.Module, ExportInfo]:
    model = _model(request.param)
    path = tmp_path_factory.mktemp(request.param) / "model.onnx"
    return model, export_final(model, path, in_channels=3, tile=32, metadata=META)


def test_parity_and_file(exported):
    _, info = exported
    assert info.path.is_file() and info.path.stat().st_size == info.size_bytes
    assert info.parity_max_abs_diff <= 1e-4
    assert info.opset == 17
    onnx.checker.check_model(str(info.path))
    assert not list(info.path.parent.glob(".*.tmp"))  # atomic write leaves nothing behind
    assert json.loads(json.dumps(info.to_dict()))["path"] == str(info.path)


def test_metadata_round_trip(exported):
    model, info = exported
    meta = read_metadata(info.path)
    for k, v in META.items():
        assert meta[k] == v
    assert json.loads(meta["classes"])[0] == "bg"
    assert meta["tile"] == "32" and meta["in_channels"] == "3" and meta["num_classes"] == "5"
    assert meta["opset"] == "17" and meta["autoseg_version"]
    assert not any(k.startswith("onnxsim.") for k in meta)
    if hasattr(model, "arch"):
        assert Arch.from_dict(json.loads(meta["arch"])) == model.arch


@pytest.mark.parametrize("shape", [(1, 3, 32, 32), (3, 3, 48, 80), (1, 3, 128, 64)])
def test_dynamic_shapes(exported, shape):
    model, info = exported
    sess = ort.InferenceSession(str(info.path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input"]
    assert [o.name for o in sess.get_outputs()] == ["logits"]
    x = np.random.default_rng(1).standard_normal(shape, dtype=np.float32)
    got = sess.run(["logits"], {"input": x})[0]
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert got.shape == (shape[0], 5, *shape[2:])
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def test_simplification_reduces_nodes(exported):
    _, info = exported
    assert info.simplified
    assert info.nodes_after <= info.nodes_before
    counts = op_counts(info.path.read_bytes())
    assert sum(counts.values()) == info.nodes_after
    assert "Identity" not in counts  # the exporter's Identity nodes are what onnxsim removes here


def test_simplification_removes_identities_of_unet(tmp_path):
    # A freshly built net (as exported for latency trials) has BN folded into identical zero biases,
    # which the exporter shares through Identity nodes; onnxsim removes them.
    torch.manual_seed(0)
    model = _unet().eval()
    before = op_counts(onnx_bytes(model, 3, 32))
    info = export_final(model, tmp_path / "m.onnx", 3, 32, META)
    after = op_counts(info.path.read_bytes())
    assert before.get("Identity", 0) > 0 and after.get("Identity", 0) == 0
    assert info.nodes_after < info.nodes_before
    assert after["Conv"] == before["Conv"]  # the computation itself is unchanged


def test_unsimplified_export(tmp_path):
    info = export_final(_model("tiny"), tmp_path / "raw.onnx", 3, 16, META, simplify=False)
    assert not info.simplified and info.nodes_after == info.nodes_before
    assert read_metadata(info.path)["simplified"] == "false"


def test_graph_hash_stable_and_weight_sensitive():
    a1 = onnx_bytes(_model("unet", seed=0), 3, 32)
    a2 = onnx_bytes(_model("unet", seed=0), 3, 64)  # a re-export (other trace size) of the same weights
    b = onnx_bytes(_model("unet", seed=1), 3, 32)
    assert graph_hash(a1) == graph_hash(a2)
    assert graph_hash(a1) != graph_hash(b)
    # Producer, doc strings, graph name and metadata do not change the hash.
    proto = onnx.load_from_string(a1)
    proto.producer_name, proto.producer_version, proto.graph.name = "other", "9.9", "renamed"
    proto.doc_string = proto.graph.node[0].doc_string = "notes"
    proto.metadata_props.add(key="k", value="v")
    assert graph_hash(proto.SerializeToString()) == graph_hash(a1)
    assert len(graph_hash(a1)) == 64


def test_export_leaves_training_model_untouched():
    model = _model("tiny").train()
    onnx_bytes(model, 3, 16)
    assert model.training


def test_parity_failure_raises_and_writes_nothing(tmp_path):
    path = tmp_path / "bad.onnx"
    with pytest.raises(AutosegError, match=r"parity failed: max \|onnxruntime - torch\| = \d"):
        export_final(Drifting(), path, 3, 8, META, simplify=False)
    assert not path.exists() and not list(tmp_path.iterdir())


def test_read_metadata_errors(tmp_path):
    with pytest.raises(InputError, match="no such ONNX file"):
        read_metadata(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(InputError, match="not a readable ONNX model"):
        read_metadata(junk)


def test_export_info_path_type(exported):
    assert isinstance(exported[1].path, Path)


def test_quantize_int8_keeps_the_float_answer_and_metadata(tmp_path):
    model = _model("unet")
    fp32 = export_final(model, tmp_path / "model.onnx", in_channels=3, tile=32, metadata=META).path
    calib = np.random.default_rng(0).standard_normal((12, 3, 32, 32), dtype=np.float32)
    info = quantize_int8(fp32, tmp_path / "model.int8.onnx", calib, batch=5)

    assert info.path.is_file() and info.path.stat().st_size == info.size_bytes
    assert info.size_bytes < 0.5 * fp32.stat().st_size  # int8 weights
    assert info.calibration_tiles == 12 and info.per_channel
    ops = op_counts(onnx.load(str(info.path)))
    assert ops.get("QuantizeLinear", 0) >= 3 and ops.get("DequantizeLinear", 0) >= 3
    assert "ConvTranspose" not in ops  # the upsampling is quantized too
    meta = read_metadata(info.path)
    assert meta["quantization"] == "int8-qdq" and meta["classes"] == META["classes"]
    assert not list(tmp_path.glob(".*.tmp"))

    # Recompute the agreement independently, on fresh inputs too: int8 keeps nearly every pixel's class.
    ref = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
    q = ort.InferenceSession(str(info.path), providers=["CPUExecutionProvider"])
    same = np.mean(ref.run(None, {"input": calib})[0].argmax(1) == q.run(None, {"input": calib})[0].argmax(1))
    assert info.argmax_agreement == pytest.approx(same)
    assert info.argmax_agreement > 0.9
    x = np.random.default_rng(1).standard_normal((1, 3, 64, 96), dtype=np.float32)  # dynamic H, W kept
    a, b = ref.run(None, {"input": x})[0], q.run(None, {"input": x})[0]
    assert b.shape == a.shape
    assert np.abs(a - b).max() < 0.1 * (a.max() - a.min())


def test_int8_net_runs_in_integers_channels_last_from_input_to_output(tmp_path):
    fp32 = export_final(_model("unet"), tmp_path / "model.onnx", in_channels=3, tile=32, metadata=META).path
    calib = np.random.default_rng(0).standard_normal((8, 3, 32, 32), dtype=np.float32)
    info = quantize_int8(fp32, tmp_path / "model.int8.onnx", calib)
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(info.path), opts, providers=["CPUExecutionProvider"])
    ran = op_counts(onnx.load(opts.optimized_model_filepath))
    # One conversion in, one out: upsampling, concat and the shape read all stay integer.
    assert ran["QuantizeLinear"] == 1 and ran["DequantizeLinear"] == 1 and ran["QLinearConcat"] == 1
    assert "Conv" not in ran and "DepthToSpace" not in ran
    # NHWC throughout: the input's and the output's transposes, and the pixel shuffle's one.
    assert ran["Transpose"] <= 3


@pytest.mark.parametrize("bias", [True, False])
def test_upsample_as_conv_computes_the_same(bias):
    torch.manual_seed(0)
    model = TinyFCN().eval()
    if not bias:
        model.up = nn.ConvTranspose2d(16, 8, 2, stride=2, bias=False).eval()
    proto = onnx.load_from_string(onnx_bytes(model, 3, 32))
    before = op_counts(proto)
    assert upsample_as_conv(proto) == 1
    onnx.checker.check_model(proto, full_check=True)
    after = op_counts(proto)
    assert "ConvTranspose" not in after and after["Conv"] == before["Conv"] + 1
    assert after["Transpose"] == 3 and after["Reshape"] == 2
    used = {i for n in proto.graph.node for i in n.input}
    assert all(t.name in used for t in proto.graph.initializer)  # the ConvTranspose's weights are gone
    x = np.random.default_rng(0).standard_normal((2, 3, 48, 40), dtype=np.float32)
    ref = ort.InferenceSession(onnx_bytes(model, 3, 32), providers=["CPUExecutionProvider"])
    new = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(new.run(None, {"input": x})[0], ref.run(None, {"input": x})[0], atol=1e-5)


def test_upsample_as_conv_leaves_other_upsampling_alone():
    for model in (_model("unet_bilinear"), nn.Sequential(nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1))):
        proto = onnx.load_from_string(onnx_bytes(model, 3, 32))
        before = proto.SerializeToString()
        assert upsample_as_conv(proto) == 0
        assert proto.SerializeToString() == before


@pytest.mark.parametrize("name", ["unet", "unet_bilinear"])
def test_int8_bytes_quantizes_and_keeps_dynamic_shapes(name):
    blob = onnx_bytes(_model(name), 3, 32)
    rng = np.random.default_rng(0)
    q = int8_bytes(blob, rng.standard_normal((8, 3, 32, 32), dtype=np.float32))
    assert "QuantizeLinear" in op_counts(q) and "ConvTranspose" not in op_counts(q)
    sess = ort.InferenceSession(q, providers=["CPUExecutionProvider"])
    x = rng.standard_normal((2, 3, 24, 40), dtype=np.float32)
    assert sess.run(None, {"input": x})[0].shape == (2, 5, 24, 40)


@pytest.mark.parametrize("opset", [11, 12])
def test_quantize_int8_below_opset_13_uses_one_scale_per_tensor(tmp_path, opset):
    # DequantizeLinear has no axis before opset 13: per-channel weights would make an invalid model.
    fp32 = tmp_path / "model.onnx"
    fp32.write_bytes(onnx_bytes(_model("unet"), 3, 32, opset=opset))
    calib = np.random.default_rng(0).standard_normal((4, 3, 32, 32), dtype=np.float32)
    info = quantize_int8(fp32, tmp_path / "model.int8.onnx", calib)
    assert not info.per_channel and info.argmax_agreement > 0.9
    proto = onnx.load(str(info.path))
    assert "ConvTranspose" not in op_counts(proto)
    assert read_metadata(info.path)["quantization"] == "int8-qdq-per-tensor"
    ort.InferenceSession(str(info.path), providers=["CPUExecutionProvider"])


def test_quantize_int8_refuses_bad_calibration_and_writes_nothing(tmp_path):
    fp32 = export_final(_model("tiny"), tmp_path / "model.onnx", in_channels=3, tile=32, metadata=META).path
    with pytest.raises(ValueError, match="calibration"):
        quantize_int8(fp32, tmp_path / "model.int8.onnx", np.zeros((0, 3, 32, 32), np.float32))
    assert not (tmp_path / "model.int8.onnx").exists() and not list(tmp_path.glob(".*.tmp"))


def test_a_target_that_cannot_be_written_is_named_not_the_temp_file_beside_it(tmp_path):
    from autoseg.rundir import write_bytes_atomic

    target = tmp_path / "E07dir"
    target.mkdir()
    with pytest.raises(IsADirectoryError) as e:
        export_final(_tiny(), target, 3, 16, META)
    assert e.value.filename == str(target)
    with pytest.raises(IsADirectoryError) as e:
        write_bytes_atomic(target, b"data")
    assert e.value.filename == str(target)
    assert list(target.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["E07dir"]  # no temp left


@pytest.mark.parametrize("int8", [False, True])
def test_a_trials_timed_net_carries_the_final_models_metadata(tmp_path, int8):
    """What the search writes to trials/N/model.onnx is described like best/model.onnx (edge_agent reads it)."""
    arch = Arch((3, 3), (4, 8))
    model = build_unet(arch, 3, 5).eval()
    meta = model_metadata(["bg", "a", "b", "c", "d"], [0.5] * 3, [0.25] * 3, 32, arch.key(), arch.multiple,
                          {"kind": "values", "names": ["bg", "a", "b", "c", "d"], "values": [0, 1, 2, 3, 4]})
    final = read_metadata(export_final(model, tmp_path / "model.onnx", 3, 32, meta).path)
    blob = onnx_bytes(model, 3, 48)  # timed at another size than the tile
    if int8:
        blob = int8_bytes(blob, np.random.default_rng(0).standard_normal((2, 3, 32, 32), dtype=np.float32))
    (tmp_path / "trial.onnx").write_bytes(annotate(blob, meta, 32, 3, 5))
    trial = read_metadata(tmp_path / "trial.onnx")
    assert set(trial) == set(final) | ({"quantization"} if int8 else set())
    for key in ("classes", "mean", "std", "tile", "arch", "input_multiple", "class_map", "in_channels",
                "num_classes", "opset"):
        assert trial[key] == final[key], key
    assert final["trained"] == "true" and trial["trained"] == "false" and trial["simplified"] == "false"
    assert trial.get("quantization") == ("int8-qdq" if int8 else None)
    assert graph_hash(annotate(blob, meta, 32, 3, 5)) == graph_hash(blob)  # the latency cache's key is unchanged
