"""Torch -> ONNX: bytes for latency trials, and the final simplified, checked, self-describing model.

The search exports every trial with `onnx_bytes` (fast, no simplification) so the device measures
exactly what `torch` traced. The final model goes through `export_final`: simplify with onnxsim,
attach metadata, run the ONNX checker, write atomically, and prove parity with torch at two sizes.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import hashlib
import io
import json
import logging
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

import autoseg
from autoseg.errors import AutosegError, InputError
from autoseg.rundir import for_target

log = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
_DYNAMIC_AXES = {INPUT_NAME: {0: "N", 2: "H", 3: "W"}, OUTPUT_NAME: {0: "N", 2: "H", 3: "W"}}
# Keys every final model carries; callers are expected to pass these (they are not derivable here).
RECOMMENDED_KEYS = ("classes", "mean", "std", "arch")


@dataclass(frozen=True)
class ExportInfo:
    path: Path
    size_bytes: int
    opset: int
    parity_max_abs_diff: float
    nodes_before: int
    nodes_after: int
    simplified: bool

    def to_dict(self) -> dict:
        return _json_ready(self)


def _json_ready(info: object) -> dict:
    """asdict with paths as strings."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(info).items()}  # type: ignore[call-overload]


def _cpu_eval_copy(model: torch.nn.Module) -> torch.nn.Module:
    """An eval-mode CPU model, leaving the caller's model (device, train flag) untouched."""
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    m = model if on_cpu and not model.training else copy.deepcopy(model).cpu()
    return m.eval()


def onnx_bytes(model: torch.nn.Module, in_channels: int, size: int, opset: int = 17) -> bytes:
    """Trace `model` on a (1, C, size, size) input; N, H and W stay dynamic in the graph."""
    m = _cpu_eval_copy(model)
    buf = io.BytesIO()
    dummy = torch.zeros(1, in_channels, size, size)
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter is deprecated; the dynamo one needs onnxscript (not a dependency).
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            m,
            (dummy,),
            buf,
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes=_DYNAMIC_AXES,
            opset_version=opset,
            do_constant_folding=True,
        )
    return buf.getvalue()


def _strip(graph: onnx.GraphProto) -> None:
    graph.name = ""
    graph.doc_string = ""
    for node in graph.node:
        node.doc_string = ""
        del node.metadata_props[:]
        for attr in node.attribute:  # If/Loop/Scan bodies
            if attr.HasField("g"):
                _strip(attr.g)
            for g in attr.graphs:
                _strip(g)


def graph_hash(model_bytes: bytes) -> str:
    """sha256 of the computation: producer, doc strings, graph name and metadata are cleared first,
    so two exports of the same weights hash equal whatever tool version or model card they carry."""
    proto = onnx.load_from_string(model_bytes)
    proto.producer_name = ""
    proto.producer_version = ""
    proto.doc_string = ""
    del proto.metadata_props[:]
    _strip(proto.graph)
    for fn in proto.functions:
        fn.doc_string = ""
        for node in fn.node:
            node.doc_string = ""
    return hashlib.sha256(proto.SerializeToString(deterministic=True)).hexdigest()


def op_counts(model: onnx.ModelProto | bytes) -> dict[str, int]:
    """Node count per op type of the main graph (as onnxruntime's quantization tests count them)."""
    proto = onnx.load_from_string(model) if isinstance(model, bytes) else model
    return dict(collections.Counter(n.op_type for n in proto.graph.node))


def _simplify(proto: onnx.ModelProto, in_channels: int, tile: int) -> tuple[onnx.ModelProto, bool]:
    import onnxsim  # heavy import, only needed for the final export

    try:
        # onnxsim prints its check progress to stdout; library code must not.
        with contextlib.redirect_stdout(io.StringIO()):
            simp, ok = onnxsim.simplify(
                proto,
                check_n=2,
                test_input_shapes={INPUT_NAME: [1, in_channels, tile, tile]},
                certify=False,
            )
    except Exception as e:  # onnxsim raises many kinds; any failure means "keep the traced graph"
        log.warning("onnxsim failed (%s: %s); keeping the unsimplified model", type(e).__name__, e)
        return proto, False
    if not ok:
        log.warning("onnxsim's output check failed; keeping the unsimplified model")
        return proto, False
    # onnxsim records its provenance in metadata_props; our model card lives there, keep it clean.
    keep = [p for p in simp.metadata_props if not p.key.startswith("onnxsim.")]
    del simp.metadata_props[:]
    simp.metadata_props.extend(keep)
    return simp, True


def _as_text(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def model_metadata(
    classes: list[str], mean: list[float], std: list[float], tile: int, arch: str, input_multiple: int,
    class_map: dict | None = None,
) -> dict[str, str]:
    """What a model's user needs beside its graph (autoseg predict and edge_agent read it): class names, the
    normalisation, the tile, the architecture and the side every input must be a multiple of, and how masks
    encode the classes (class_map: gray values or the palette's colours)."""
    meta = {"classes": json.dumps(list(classes)), "tile": str(tile), "mean": json.dumps(list(mean)),
            "std": json.dumps(list(std)), "arch": arch, "input_multiple": str(input_multiple)}
    if class_map is not None:
        meta["class_map"] = json.dumps(class_map)
    return meta


def _props(metadata: dict[str, object], tile: int, in_channels: int, num_classes: int, opset: int,
           simplified: bool, trained: bool) -> dict[str, str]:
    """metadata_props as every file autoseg writes carries them: `metadata` and what the export knows.
    trained: false for the nets timed during the search (seeded weights, for their latency only)."""
    props = {k: _as_text(v) for k, v in metadata.items()}
    props.update(
        tile=str(tile),
        in_channels=str(in_channels),
        num_classes=str(num_classes),
        opset=str(opset),
        autoseg_version=autoseg.__version__,
        simplified=json.dumps(simplified),
        trained=json.dumps(trained),
    )
    return props


def _set_props(proto: onnx.ModelProto, props: dict[str, str]) -> None:
    del proto.metadata_props[:]
    for k, v in sorted(props.items()):
        proto.metadata_props.add(key=k, value=v)


def annotate(model: bytes, metadata: dict[str, object], tile: int, in_channels: int, num_classes: int) -> bytes:
    """`model` (a trial's timed net, as onnx_bytes or int8_bytes gave it) with the metadata_props of a final
    model, so a trial's file is described like the shipped one. Its weights are untrained: trained=false."""
    proto = onnx.load_from_string(model)
    props = _props(metadata, tile, in_channels, num_classes, _opset(proto), simplified=False, trained=False)
    if any(n.op_type == "QuantizeLinear" for n in proto.graph.node):  # timed quantized: --precision int8
        props["quantization"] = "int8-qdq" if _opset(proto) >= 13 else "int8-qdq-per-tensor"
    _set_props(proto, props)
    return proto.SerializeToString()


def _torch_logits(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def _parity(model: torch.nn.Module, path: Path, in_channels: int, tile: int) -> float:
    """Max |onnxruntime - torch| over seeded random inputs at tile and 2*tile (batch 2 then 1)."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    worst = 0.0
    for n, size in ((2, tile), (1, 2 * tile)):
        x = rng.standard_normal((n, in_channels, size, size), dtype=np.float32)
        got = sess.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
        ref = _torch_logits(model, x)
        if got.shape != ref.shape:
            raise AutosegError(
                f"{path}: ONNX output shape {got.shape} != torch {ref.shape} at input {x.shape}"
            )
        worst = max(worst, float(np.max(np.abs(got - ref))))
    return worst


def export_final(
    model: torch.nn.Module,
    path: Path,
    in_channels: int,
    tile: int,
    metadata: dict[str, str],
    opset: int = 17,
    simplify: bool = True,
    atol: float = 1e-4,
) -> ExportInfo:
    """Export, simplify, annotate, check and write `path`; raise AutosegError if parity > atol.

    `metadata` should carry classes (names, JSON), mean, std and arch; non-string values are
    JSON-encoded. tile, in_channels, num_classes, opset and autoseg_version are added here.
    The file appears at `path` only after it passed the checker and the parity test.
    """
    path = Path(path)
    m = _cpu_eval_copy(model)
    raw = onnx_bytes(m, in_channels, tile, opset)
    proto = onnx.load_from_string(raw)
    before = op_counts(proto)
    simplified = False
    if simplify:
        proto, simplified = _simplify(proto, in_channels, tile)
    after = op_counts(proto)
    log.debug("ONNX nodes %d -> %d (simplified=%s); before %s, after %s",
             sum(before.values()), sum(after.values()), simplified, before, after)

    num_classes = _torch_logits(m, np.zeros((1, in_channels, tile, tile), np.float32)).shape[1]
    props = _props(metadata, tile, in_channels, num_classes, opset, simplified, trained=True)
    arch = getattr(model, "arch", None)  # autoseg.unet.UNet carries its Arch
    if "arch" not in props and hasattr(arch, "to_dict"):
        props["arch"] = json.dumps(arch.to_dict())
    missing = [k for k in RECOMMENDED_KEYS if k not in props]
    if missing:
        log.warning("ONNX metadata lacks %s; consumers of %s will not find them", missing, path.name)
    _set_props(proto, props)
    onnx.checker.check_model(proto, full_check=True)

    data = proto.SerializeToString()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        _write(tmp, data, path)
        diff = _parity(m, tmp, in_channels, tile)
        if not diff <= atol:  # also catches NaN
            raise AutosegError(
                f"{path}: ONNX parity failed: max |onnxruntime - torch| = {diff:.3g} > atol {atol:g}; "
                "export without simplification or raise export.parity_atol"
            )
        _replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    log.debug("wrote %s (%d bytes, parity %.2g)", path, len(data), diff)
    return ExportInfo(
        path=path,
        size_bytes=len(data),
        opset=opset,
        parity_max_abs_diff=diff,
        nodes_before=sum(before.values()),
        nodes_after=sum(after.values()),
        simplified=simplified,
    )


def _write(tmp: Path, data: bytes, path: Path) -> None:
    try:
        tmp.write_bytes(data)
    except OSError as e:  # a full disk is the output's problem: name it, not the temp file beside it
        raise for_target(e, path) from e


def _replace(tmp: Path, path: Path) -> None:
    try:
        os.replace(tmp, path)
    except OSError as e:  # a directory in the way, say
        raise for_target(e, path) from e


def check_loads(path: Path, fix: str) -> None:
    """InputError (one line, ending in `fix`) when onnxruntime refuses the ONNX file at `path`: damaged, or
    with external data outside its folder (which onnxruntime will not read), rather than its traceback."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: not found; {fix}")
    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own types (Fail, InvalidGraph, InvalidProtobuf, ...)
        reason = " ".join(str(e).split())[:240] or type(e).__name__
        raise InputError(f"{path}: onnxruntime cannot load it ({reason}); {fix}") from None


def read_metadata(path: Path) -> dict[str, str]:
    """The metadata_props of an ONNX file (weights are not loaded)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such ONNX file; pass the model.onnx written by `autoseg export`")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise InputError(f"{path}: not a readable ONNX model ({e}); re-export it") from e
    return {p.key: p.value for p in proto.metadata_props}


# ---------------------------------------------------------------- int8


@dataclass(frozen=True)
class Int8Info:
    path: Path
    size_bytes: int
    calibration_tiles: int
    # Share of calibration pixels whose argmax class the int8 model keeps (fp32 model = reference).
    argmax_agreement: float
    per_channel: bool = True  # weight scales per output channel (opset >= 13), else one per tensor

    def to_dict(self) -> dict:
        return _json_ready(self)


def _attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _opset(proto: onnx.ModelProto) -> int:
    return max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)


def upsample_as_conv(proto: onnx.ModelProto) -> int:
    """Rewrite each 2x2, stride-2 ConvTranspose in place as a 1x1 Conv to 4x the channels and a pixel
    shuffle written in channels-last order; returns how many were rewritten.

    The two compute the same function, but onnxruntime's CPU provider has an integer kernel for Conv and
    none for ConvTranspose (onnxruntime#8988): quantized as it is, the decoder's upsampling runs in
    float between a DequantizeLinear and a QuantizeLinear. Only for int8; in float32 ConvTranspose is
    the faster of the two.

    The shuffle is not a DepthToSpace: onnxruntime runs integer convs channels-last (NHWC) and has no
    NHWC DepthToSpace, so it would wrap one in transposes and block the Concat that follows from
    staying NHWC. Written as Transpose-Reshape-Transpose-Reshape-Transpose, the outer transposes cancel
    against onnxruntime's own, and the one left moves blocks of 2C bytes (its fast path).
    """
    if _opset(proto) < 11:  # Slice with inputs; Reshape's copied (0) dims
        return 0
    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    nodes: list[onnx.NodeProto] = []
    done = 0
    for node in g.node:
        w = inits.get(node.input[1]) if node.op_type == "ConvTranspose" and len(node.input) > 1 else None
        b = inits.get(node.input[2]) if w is not None and len(node.input) > 2 and node.input[2] else None
        plain = (
            w is not None
            and _attr(node, "strides") == [2, 2]
            and _attr(node, "kernel_shape", [2, 2]) == [2, 2]
            and not any(_attr(node, "pads", [0]))
            and not any(_attr(node, "output_padding", [0]))
            and all(d == 1 for d in _attr(node, "dilations", [1]))
            and _attr(node, "group", 1) == 1
            and _attr(node, "auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")
            and _attr(node, "output_shape") is None
            and (len(node.input) < 3 or not node.input[2] or b is not None)
        )
        wa = onnx.numpy_helper.to_array(w) if plain else None
        if wa is None or wa.shape[2:] != (2, 2):
            nodes.append(node)
            continue
        cin, cout = wa.shape[:2]
        stem = node.name or node.output[0]
        # out[c, 2i+a, 2j+b] = sum_k x[k, i, j] W[k, c, a, b]; the conv's channel (a*2 + b)*cout + c holds it
        const = {
            "W": np.ascontiguousarray(wa.transpose(2, 3, 1, 0).reshape(cout * 4, cin, 1, 1)),
            "rows": np.array([0, 0, 0, 2, 2 * cout], np.int64),  # NHWC (N, H, W, a, b*C)
            "two": np.array([2], np.int64),
            "four": np.array([4], np.int64),
            "copy_n": np.array([0], np.int64),
            "c": np.array([cout], np.int64),
        }
        if b is not None:
            const["B"] = np.tile(onnx.numpy_helper.to_array(b), 4)
        name = {k: f"{stem}/as_conv/{k}" for k in const}
        g.initializer.extend(onnx.numpy_helper.from_array(v, name[k]) for k, v in const.items())
        t = f"{stem}/as_conv/"
        conv_in = [node.input[0], name["W"], *([name["B"]] if b is not None else [])]
        make = onnx.helper.make_node
        nodes += [
            make("Conv", conv_in, [t + "out"], name=t + "conv", kernel_shape=[1, 1]),
            make("Transpose", [t + "out"], [t + "nhwc"], name=t + "to_nhwc", perm=[0, 2, 3, 1]),
            make("Reshape", [t + "nhwc", name["rows"]], [t + "split"], name=t + "split_rows"),
            make("Transpose", [t + "split"], [t + "shuffled"], name=t + "shuffle", perm=[0, 1, 3, 2, 4]),
            make("Shape", [node.input[0]], [t + "in_shape"], name=t + "in_shape"),
            make("Slice", [t + "in_shape", name["two"], name["four"]], [t + "hw"], name=t + "hw"),
            make("Mul", [t + "hw", name["two"]], [t + "hw2"], name=t + "hw2"),
            make("Concat", [name["copy_n"], t + "hw2", name["c"]], [t + "out_shape"], name=t + "out_shape", axis=0),
            make("Reshape", [t + "shuffled", t + "out_shape"], [t + "up"], name=t + "merge"),
            make("Transpose", [t + "up"], [node.output[0]], name=t + "to_nchw", perm=[0, 3, 1, 2]),
        ]
        done += 1
    if done:
        used = {i for n in nodes for i in n.input}
        keep = [t for t in g.initializer if t.name in used]
        del g.node[:]
        g.node.extend(nodes)
        del g.initializer[:]
        g.initializer.extend(keep)
    return done


def shape_of_quantized(proto: onnx.ModelProto) -> int:
    """Let each Shape that reads a DequantizeLinear read its quantized input instead (the same shape),
    and drop DequantizeLinears left unused; returns how many Shapes moved.

    Otherwise onnxruntime gives the Shape a DequantizeLinear of its own and runs it: a whole feature map
    converted to float just to read its size."""
    g = proto.graph
    dq = {n.output[0]: n for n in g.node if n.op_type == "DequantizeLinear"}
    moved = 0
    for n in g.node:
        if n.op_type == "Shape" and n.input[0] in dq:
            n.input[0] = dq[n.input[0]].input[0]
            moved += 1
    if moved:
        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        keep = [n for n in g.node if n.op_type != "DequantizeLinear" or n.output[0] in used]
        del g.node[:]
        g.node.extend(keep)
    return moved


def _calibration(calib: np.ndarray) -> np.ndarray:
    calib = np.ascontiguousarray(calib, dtype=np.float32)
    if calib.ndim != 4 or len(calib) == 0:
        raise ValueError(f"calibration tiles must be a non-empty (N, C, H, W) array, got shape {calib.shape}")
    return calib


def _quantize(src: Path, dst: Path, calib: np.ndarray, batch: int) -> tuple[onnx.ModelProto, bool]:
    """quantize_static from the float model at `src` (its output file is `dst`, scratch for the caller);
    returns the quantized model, after shape_of_quantized, and whether weights are per channel.

    QDQ format, int8 weights and uint8 activations: the form onnxruntime's CPU provider fuses into integer
    kernels on x86 and ARM (TensorRT would want symmetric int8 activations). Weights get a scale per output
    channel, or one per tensor below opset 13, where DequantizeLinear has no axis. Min/max calibration on
    `calib` (from _calibration). A bilinear Resize stays in float between its DequantizeLinear and
    QuantizeLinear: with onnxruntime's uint8 Resize instead, whole nets ran up to 1.7x slower (tried).
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(calib[i : i + batch] for i in range(0, len(calib), batch))

        def get_next(self) -> dict[str, np.ndarray] | None:
            b = next(self._batches, None)
            return None if b is None else {INPUT_NAME: b}

    proto = onnx.load(str(src))
    per_channel = _opset(proto) >= 13
    float_tmp = dst.with_name(f"{dst.name}.float")
    qlog = logging.getLogger()  # the quantizer logs its "consider pre-processing" hint on the root logger
    level = qlog.level
    try:
        qlog.setLevel(max(level, logging.ERROR))
        if upsample_as_conv(proto):
            onnx.save(proto, str(float_tmp))  # quantize_static takes a ModelProto only from onnxruntime 1.18
        quantize_static(
            str(float_tmp if float_tmp.exists() else src), str(dst), _Reader(), quant_format=QuantFormat.QDQ,
            per_channel=per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        )
        quantized = onnx.load(str(dst))
        shape_of_quantized(quantized)
    finally:
        qlog.setLevel(level)
        float_tmp.unlink(missing_ok=True)
    return quantized, per_channel


def quantize_int8(fp32_path: Path, path: Path, calib: np.ndarray, batch: int = 8) -> Int8Info:
    """Static int8 quantization of an exported model, calibrated on `calib` (N, C, H, W normalised tiles),
    the representative tiles, which were chosen to cover the data.

    The file appears at `path` only once it loads and has been checked against the fp32 model on the
    calibration tiles; the metadata of the fp32 model is carried over.
    """
    fp32_path, path, calib = Path(fp32_path), Path(path), _calibration(calib)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        proto, per_channel = _quantize(fp32_path, tmp, calib, batch)
        meta = {p.key: p.value for p in onnx.load(str(fp32_path), load_external_data=False).metadata_props}
        meta["quantization"] = "int8-qdq" if per_channel else "int8-qdq-per-tensor"
        _set_props(proto, meta)
        data = proto.SerializeToString()
        _write(tmp, data, path)
        agree = _argmax_agreement(fp32_path, tmp, calib, batch)
        _replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    log.debug("wrote %s (%d bytes, argmax agreement with fp32 %.4f)", path, len(data), agree)
    return Int8Info(path=path, size_bytes=len(data), calibration_tiles=len(calib), argmax_agreement=agree,
                    per_channel=per_channel)


def int8_bytes(model: bytes, calib: np.ndarray) -> bytes:
    """A float model's int8 form, quantized as quantize_int8 does: what the device runs when the net ships
    as int8, for timing candidates. Unchecked against the float model (a candidate's weights are untrained)."""
    with tempfile.TemporaryDirectory(prefix="autoseg-int8-") as d:
        src, dst = Path(d) / "model.onnx", Path(d) / "model.int8.onnx"
        src.write_bytes(model)
        return _quantize(src, dst, _calibration(calib), batch=8)[0].SerializeToString()


def _argmax_agreement(ref_path: Path, path: Path, x: np.ndarray, batch: int) -> float:
    ref = ort.InferenceSession(str(ref_path), providers=["CPUExecutionProvider"])
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    same = 0
    for i in range(0, len(x), batch):
        b = x[i : i + batch]
        a = ref.run([OUTPUT_NAME], {INPUT_NAME: b})[0].argmax(1)
        q = sess.run([OUTPUT_NAME], {INPUT_NAME: b})[0].argmax(1)
        same += int((a == q).sum())
    return same / (len(x) * x.shape[2] * x.shape[3])
