"""A latency predictor learned from the device's own measurements (issue #26).

Pure functions and small models: `kernels` lists the ops a net runs (each conv, depthwise and pointwise conv,
pool, resize, transposed conv and concat, with its channels, kernel and output size); `features` sums a net at
an input size into quantities a reader can check against autoseg.unet (per-level MACs, parameters and activation
bytes, the conv and upsampling kinds, the level count and the input pixels); `LatencyPredictor` learns median
latency from measured records of ONE device fingerprint, settings and precision, and says how far to trust itself
(cross-validated error and spread).

Reading the measurements from the latency cache is autoseg.latency_history's job; using the prediction in the
search is autoseg.search's.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from autoseg.unet import KERNELS, MAX_LEVELS, Arch, _double_conv_macs

MIN_MEASUREMENTS = 15  # below this the cross-validation says nothing: measure as before
USABLE_WITHIN = 0.8  # cross-validated share within ±10 % needed before a prediction may drop a net
CV_FOLDS = 5
# The uncertainty band is the spread of the cross-validated log residuals between these quantiles: a net is
# dropped only when even the low end of its band is over the budget, so about 2.5 % of the nets dropped would
# have measured under it, if the residuals of new nets look like those of the nets held out.
LO_Q, HI_Q = 0.025, 0.975
BYTES_PER_VALUE = 4  # fp32 activations; for int8 the factor is a constant of the fit, absorbed by the model


def feature_names() -> list[str]:
    names = []
    for i in range(MAX_LEVELS):
        names += [f"macs_l{i}", f"params_l{i}", f"act_bytes_l{i}"]
    names += ["separable", "bilinear", "levels", "input_pixels", "macs", "macs_depthwise", "params", "act_bytes",
              "ops"]
    return names


def _conv_params(cin: int, cout: int, k: int, conv: str) -> int:
    """Weights of one double conv plus its two BatchNorms (scale and shift after folding)."""
    total = 0
    for c in (cin, cout):
        total += c * k * k + c * cout if conv == "separable" else c * cout * k * k
    return total + 2 * 2 * cout


def _double_conv_acts(cin: int, cout: int, conv: str) -> tuple[int, int]:
    """Values written per output pixel by one double conv, and its conv ops (depthwise counted apart)."""
    if conv == "separable":
        return cin + cout + cout + cout, 4
    return 2 * cout, 2


def features(arch: Arch, tile_hw: int | tuple[int, int], in_channels: int = 3, num_classes: int = 2) -> np.ndarray:
    """The net timed on a (1, in_channels, h, w) input, as a vector named by feature_names().

    Level i holds the encoder's double conv there (after the max-pool), the decoder's upsampling into it, the
    concat and the decoder's double conv (and the head at level 0). MACs sum to unet.count_macs."""
    h, w = (tile_hw, tile_hw) if isinstance(tile_hw, int) else tile_hw
    c, k, n = arch.channels, arch.kernels, arch.levels
    sep = arch.conv == "separable"
    px = [(h >> i) * (w >> i) for i in range(n)]
    macs, params, acts = [0.0] * MAX_LEVELS, [0.0] * MAX_LEVELS, [0.0] * MAX_LEVELS
    ops = 0
    dw_macs = 0.0
    prev = in_channels
    for i in range(n):
        if i:
            acts[i] += prev * px[i]  # max-pool output
            ops += 1
        macs[i] += px[i] * _double_conv_macs(prev, c[i], k[i], arch.conv)
        params[i] += _conv_params(prev, c[i], k[i], arch.conv)
        a, o = _double_conv_acts(prev, c[i], arch.conv)
        acts[i] += a * px[i]
        ops += o
        if sep:
            dw_macs += px[i] * (prev + c[i]) * k[i] * k[i]
        prev = c[i]
    for i in range(n - 1):
        if arch.upsample == "transpose":
            macs[i] += px[i] * c[i + 1] * c[i]
            params[i] += 4 * c[i + 1] * c[i] + c[i]
            acts[i] += c[i] * px[i]
            ops += 1
        else:  # 1x1 conv at the coarse level, then the resize
            macs[i] += px[i + 1] * c[i + 1] * c[i]
            params[i] += c[i + 1] * c[i] + c[i]
            acts[i] += c[i] * (px[i + 1] + px[i])
            ops += 2
        acts[i] += 2 * c[i] * px[i]  # concat
        ops += 1
        macs[i] += px[i] * _double_conv_macs(2 * c[i], c[i], k[i], arch.conv)
        params[i] += _conv_params(2 * c[i], c[i], k[i], arch.conv)
        a, o = _double_conv_acts(2 * c[i], c[i], arch.conv)
        acts[i] += a * px[i]
        ops += o
        if sep:
            dw_macs += px[i] * 3 * c[i] * k[i] * k[i]
    macs[0] += px[0] * c[0] * num_classes
    params[0] += c[0] * num_classes + num_classes
    acts[0] += num_classes * px[0]
    ops += 1
    acts = [a * BYTES_PER_VALUE for a in acts]
    row: list[float] = []
    for i in range(MAX_LEVELS):
        row += [macs[i], params[i], acts[i]]
    row += [float(sep), float(arch.upsample == "bilinear"), float(n), float(h * w), sum(macs), dw_macs,
            sum(params), sum(acts), float(ops)]
    return np.asarray(row, dtype=np.float64)


@dataclass(frozen=True)
class Kernel:
    """One op the net runs: `kind` is conv, dw (depthwise), pw (1x1), pool, resize, convT or concat; `first`
    marks the op that reads the raw input. Channels are the op's input and output channels; h, w its output."""

    kind: str
    cin: int
    cout: int
    k: int
    h: int
    w: int
    first: bool = False


def kernels(arch: Arch, tile_hw: int | tuple[int, int], in_channels: int = 3, num_classes: int = 2) -> list[Kernel]:
    """The ops of build_unet(arch) on a (1, in_channels, h, w) input, as onnxruntime runs them once BatchNorm
    and ReLU are folded into the convs: encoder down, decoder up, head last."""
    h, w = (tile_hw, tile_hw) if isinstance(tile_hw, int) else tile_hw
    c, k, n = arch.channels, arch.kernels, arch.levels
    out: list[Kernel] = []

    def double_conv(cin: int, cout: int, kk: int, hh: int, ww: int, first: bool) -> None:
        for j, ci in enumerate((cin, cout)):
            if arch.conv == "separable":
                out.append(Kernel("dw", ci, ci, kk, hh, ww, first and j == 0))
                out.append(Kernel("pw", ci, cout, 1, hh, ww, first and j == 0))
            else:
                out.append(Kernel("conv", ci, cout, kk, hh, ww, first and j == 0))

    prev = in_channels
    for i in range(n):
        if i:
            out.append(Kernel("pool", prev, prev, 2, h >> i, w >> i))
        double_conv(prev, c[i], k[i], h >> i, w >> i, i == 0)
        prev = c[i]
    for i in reversed(range(n - 1)):
        hh, ww = h >> i, w >> i
        if arch.upsample == "transpose":
            out.append(Kernel("convT", c[i + 1], c[i], 2, hh, ww))
        else:  # 1x1 conv at the coarse level, then the resize (unet.up_block)
            out.append(Kernel("pw", c[i + 1], c[i], 1, h >> (i + 1), w >> (i + 1)))
            out.append(Kernel("resize", c[i], c[i], 2, hh, ww))
        out.append(Kernel("concat", 2 * c[i], 2 * c[i], 1, hh, ww))
        double_conv(2 * c[i], c[i], k[i], hh, ww, False)
    out.append(Kernel("pw", c[0], num_classes, 1, h, w))
    return out


def _padded(c: int, block: int) -> int:
    return -(-c // block) * block


def kernel_cost(kn: Kernel, block: int = 1) -> tuple[float, float]:
    """(MACs, bytes read and written) of one op, its channels rounded up to the device's channel block.

    onnxruntime's x86 CPU kernels run convs in a blocked layout (NCHWc) of 8 or 16 channels, so a 24-channel
    conv costs what a 32-channel one does on a 16-wide machine. A conv reading fewer channels than a block (the
    raw input, or 8 channels on a 16-wide machine) reads them unblocked and unpadded: see reads_unblocked."""
    ci = kn.cin if reads_unblocked(kn, block) else _padded(kn.cin, block)
    co = _padded(kn.cout, block)
    px = kn.h * kn.w
    if kn.kind == "conv":
        return float(px * ci * co * kn.k * kn.k), float(BYTES_PER_VALUE * (ci + co) * px)
    if kn.kind == "dw":
        return float(px * ci * kn.k * kn.k), float(BYTES_PER_VALUE * 2 * ci * px)
    if kn.kind == "pw":
        return float(px * ci * co), float(BYTES_PER_VALUE * (ci + co) * px)
    if kn.kind == "convT":  # 2x2 stride 2: each output pixel reads one input pixel's ci values
        return float(px * ci * co), float(BYTES_PER_VALUE * (ci // 4 + co) * px)
    if kn.kind in ("pool", "resize"):
        return 0.0, float(BYTES_PER_VALUE * (ci * 4 if kn.kind == "pool" else ci // 4 + co) * px)
    return 0.0, float(BYTES_PER_VALUE * 2 * ci * px)  # concat: read and write every value


def reads_unblocked(kn: Kernel, block: int) -> bool:
    """Whether the op reads a plain (NCHW) input: the raw input, or a dense or 1x1 conv with fewer input channels
    than a block. Measured on the benchmark's x86 VM (16-wide): an 8->8 3x3 conv took 91 us at 64², half of a
    16->16 one (171 us), while an 8->8 1x1 conv took 31 us, more than a 16->16 one (22 us): another kernel."""
    return kn.first or (kn.kind in ("conv", "pw") and kn.cin < block)


def kernel_group(kn: Kernel, block: int = 1) -> str:
    """The ops that share one speed: convs by kind and kernel size, those reading a plain input apart."""
    pre = "in_" if reads_unblocked(kn, block) else ""
    if kn.kind in ("conv", "dw"):
        return f"{pre}{kn.kind}{kn.k}"
    return f"{pre}pw" if kn.kind == "pw" else kn.kind


CONV_GROUPS = ([f"{p}{kind}{k}" for p in ("", "in_") for kind in ("conv", "dw") for k in KERNELS]
               + ["in_pw", "pw", "convT"])


@functools.lru_cache(maxsize=8192)  # a refit cross-validates every model on every record: compute each once
def kernel_columns(arch: Arch, tile_hw: int | tuple[int, int], in_channels: int, num_classes: int,
                   block: int) -> np.ndarray:
    """The MACs (millions) of each conv group of CONV_GROUPS, then the bytes (MB) and the count of all ops."""
    col = {g: i for i, g in enumerate(CONV_GROUPS)}
    z = np.zeros(len(CONV_GROUPS) + 2)
    for kn in kernels(arch, tile_hw, in_channels, num_classes):
        m, b = kernel_cost(kn, block)
        if m:
            z[col[kernel_group(kn, block)]] += m / 1e6
        z[-2] += b / 1e6
        z[-1] += 1.0
    return z


@dataclass(frozen=True)
class LatencyRecord:
    """One clean measurement: a net, the input it was timed at, its median latency."""

    arch: Arch
    size: tuple[int, int]  # (h, w) of the timed input
    latency_ms: float
    in_channels: int = 3
    num_classes: int = 2

    def x(self) -> np.ndarray:
        return features(self.arch, self.size, self.in_channels, self.num_classes)


@dataclass(frozen=True)
class Accuracy:
    """Cross-validated accuracy of a fit: share of held-out nets within ±10 %, and their MAPE (%)."""

    n: int
    within_10: float
    mape: float

    def text(self) -> str:
        return f"{self.within_10:.0%} within ±10 %, MAPE {self.mape:.1f} % (cross-validated on {self.n} nets)"


def accuracy(predicted: Sequence[float], measured: Sequence[float]) -> Accuracy:
    p, m = np.asarray(predicted, float), np.asarray(measured, float)
    rel = np.abs(p - m) / m
    return Accuracy(len(m), float(np.mean(rel <= 0.10)) if len(m) else 0.0,
                    float(100 * np.mean(rel)) if len(m) else math.inf)


# Candidate models, the best by cross-validation kept at each fit (each fits in milliseconds on 200 nets):
# - "kernels/bN": nn-Meter's idea on whole-net timings. A net's latency is the sum of its ops' times, and an
#   op's time is a_g*MACs + b*bytes + c, with a_g the speed of its conv group (kernel_group: a 5x5 conv, a
#   depthwise 3x3, a 1x1 ...) and channels rounded up to a block of N (1, 4, 8 or 16: which one the device pads
#   to is learned by the cross-validation, as the blocked layout is a property of the device's CPU).
#   Coefficients >= 0, fitted on relative error. One b and c for all ops rather than per group: as good from
#   120 nets on and much better at 15-30. On the 2-CPU x86 VM of benchmarks/results/full/predictor.md it
#   predicts 98 % of held-out nets within ±10 % (whole-net features: 46 %).
# - "cost": latency = a*dense MACs + b*depthwise MACs + c*activation bytes + d*ops + e, all >= 0, fitted on
#   relative error. Few coefficients, so it holds from 15 points on, where the kernel model has too many.
# - "loglinear": ridge on log features -> log latency, per level.
# All but loglinear are sums of non-negative costs, so they extrapolate to nets larger than any measured (trees
# cannot: they predict a constant past the largest net seen, which is exactly where the budget is). Gradient
# boosting was not used: with 15-60 points its quantile models are too coarse to drop anything safely.
_COST = ("macs", "macs_depthwise", "act_bytes", "ops")
BLOCKS = (1, 4, 8, 16)


def _cost_columns(x: np.ndarray) -> np.ndarray:
    names = feature_names()
    cols = [x[:, names.index(n)] for n in _COST]
    dense = cols[0] - cols[1]
    return np.column_stack([dense, cols[1], cols[2], cols[3]])


def _fit_positive(z: np.ndarray, y: np.ndarray, intercept: bool) -> tuple[np.ndarray, object]:
    from sklearn.linear_model import LinearRegression

    scale = np.maximum(z.max(axis=0), 1e-12)
    return scale, LinearRegression(positive=True, fit_intercept=intercept).fit(z / scale, y, sample_weight=1.0 / y**2)


class _CostModel:
    def fit(self, recs: Sequence[LatencyRecord], y: np.ndarray) -> _CostModel:
        self.scale, self.model = _fit_positive(_cost_columns(_x(recs)), y, True)
        return self

    def predict(self, recs: Sequence[LatencyRecord]) -> np.ndarray:
        return np.maximum(self.model.predict(_cost_columns(_x(recs)) / self.scale), 1e-6)


class _KernelModel:
    def __init__(self, block: int) -> None:
        self.block = block

    def _z(self, recs: Sequence[LatencyRecord]) -> np.ndarray:
        return np.stack([kernel_columns(r.arch, r.size, r.in_channels, r.num_classes, self.block) for r in recs])

    def fit(self, recs: Sequence[LatencyRecord], y: np.ndarray) -> _KernelModel:
        self.scale, self.model = _fit_positive(self._z(recs), y, True)
        return self

    def predict(self, recs: Sequence[LatencyRecord]) -> np.ndarray:
        return np.maximum(self.model.predict(self._z(recs) / self.scale), 1e-6)


class _LogLinear:
    def fit(self, recs: Sequence[LatencyRecord], y: np.ndarray) -> _LogLinear:
        from sklearn.linear_model import RidgeCV
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        self.model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13)))
        self.model.fit(np.log1p(_x(recs)), np.log(y))
        return self

    def predict(self, recs: Sequence[LatencyRecord]) -> np.ndarray:
        return np.exp(self.model.predict(np.log1p(_x(recs))))


def _x(recs: Sequence[LatencyRecord]) -> np.ndarray:
    return np.stack([r.x() for r in recs])


Model = _CostModel | _KernelModel | _LogLinear
MODELS: dict[str, Callable[[], Model]] = {
    "cost": _CostModel, "loglinear": _LogLinear,
    **{f"kernels/b{b}": functools.partial(_KernelModel, b) for b in BLOCKS},
}


def _out_of_fold(kind: str, recs: Sequence[LatencyRecord], y: np.ndarray, folds: int, seed: int) -> np.ndarray:
    from sklearn.model_selection import KFold

    pred = np.empty_like(y)
    for train, test in KFold(min(folds, len(y)), shuffle=True, random_state=seed).split(y):
        pred[test] = MODELS[kind]().fit([recs[i] for i in train], y[train]).predict([recs[i] for i in test])
    return pred


class LatencyPredictor:
    """Median latency (ms) of a net on one device, settings and precision, with a band from cross-validation.

    `fit(records)`; then `predict(arch, size) -> (median_ms, lo_ms, hi_ms)`; `cv` is the held-out accuracy
    and `usable` says whether it is good enough to drop nets on."""

    def __init__(self, min_measurements: int = MIN_MEASUREMENTS, usable_within: float = USABLE_WITHIN,
                 seed: int = 0) -> None:
        self.min_measurements = min_measurements
        self.usable_within = usable_within
        self.seed = seed
        self.n = 0
        self.kind: str | None = None
        self.cv: Accuracy | None = None
        self.band = (0.0, 0.0)  # log-residual quantiles (LO_Q, HI_Q) of the held-out predictions
        self._model: Model | None = None
        self._io = (3, 2)

    def fit(self, records: Sequence[LatencyRecord]) -> LatencyPredictor:
        recs = [r for r in records if r.latency_ms > 0 and math.isfinite(r.latency_ms)]
        self.n = len(recs)
        if self.n < max(3, CV_FOLDS):  # nothing to cross-validate
            self._model, self.cv, self.kind = None, None, None
            return self
        y = np.array([r.latency_ms for r in recs])
        best: tuple[tuple[float, float], str, np.ndarray] | None = None
        for kind in MODELS:
            oof = _out_of_fold(kind, recs, y, CV_FOLDS, self.seed)
            acc = accuracy(oof, y)
            score = (acc.within_10, -acc.mape)
            if best is None or score > best[0]:
                best = (score, kind, oof)
        assert best is not None
        _, self.kind, oof = best
        self.cv = accuracy(oof, y)
        resid = np.log(y) - np.log(oof)
        self.band = (float(np.quantile(resid, LO_Q)), float(np.quantile(resid, HI_Q)))
        self._model = MODELS[self.kind]().fit(recs, y)
        self._io = (recs[-1].in_channels, recs[-1].num_classes)
        return self

    @property
    def fitted(self) -> bool:
        return self._model is not None

    @property
    def usable(self) -> bool:
        """Enough measurements, and cross-validated accurate enough to drop a net on its prediction."""
        return (self.fitted and self.n >= self.min_measurements and self.cv is not None
                and self.cv.within_10 >= self.usable_within)

    def why_not(self) -> str:
        """Why the predictor is not used for dropping ('' when it is)."""
        if self.n < self.min_measurements or not self.fitted:
            return f"{self.n} measurements of this device, settings and precision, {self.min_measurements} needed"
        if self.cv is not None and self.cv.within_10 < self.usable_within:
            return f"its cross-validated accuracy is {self.cv.text()}, under the {self.usable_within:.0%} needed"
        return ""

    def predict(self, arch: Arch, size: int | tuple[int, int], in_channels: int | None = None,
                num_classes: int | None = None) -> tuple[float, float, float]:
        """(median_ms, lo_ms, hi_ms) for `arch` timed at `size` (side, or (h, w))."""
        if self._model is None:
            raise RuntimeError("LatencyPredictor.predict before a fit with enough records")
        ic = self._io[0] if in_channels is None else in_channels
        nc = self._io[1] if num_classes is None else num_classes
        hw = (size, size) if isinstance(size, int) else size
        med = float(self._model.predict([LatencyRecord(arch, hw, 0.0, ic, nc)])[0])
        return med, med * math.exp(min(self.band[0], 0.0)), med * math.exp(max(self.band[1], 0.0))
