"""The typed configuration tree: loaded from YAML, overridden by CLI flags, validated once.

Everything below the CLI receives a `Config` and trusts it. Each field may carry
`metadata={"check": ...}`: a predicate plus the phrase used when it fails, so
messages read like `tiles.overlap: must be in [0, 1), got 1.5`.

Why not pydantic (issue #24 §9 asked): the generic part here is `_build` and `_coerce`, about 80 lines that
walk any dataclass tree; the rest is the tree itself, which pydantic models would restate field for field.
pydantic would add a compiled dependency (pydantic-core) to drop those 80 lines, and its errors would still have
to be rewritten into this one-line `key: problem` form. Its JSON schema is the one thing we would gain; nobody
has asked for it yet.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from autoseg.errors import InputError

Check = tuple[Callable[[Any], bool], str]


def _range(lo: float, hi: float, closed_hi: bool = True) -> dict:
    bracket = "]" if closed_hi else ")"
    if closed_hi:
        return {"check": (lambda v: lo <= v <= hi, f"must be in [{lo}, {hi}{bracket}")}
    return {"check": (lambda v: lo <= v < hi, f"must be in [{lo}, {hi}{bracket}")}


def _min(lo: float, strict: bool = False) -> dict:
    if strict:
        return {"check": (lambda v: v > lo, f"must be > {lo}")}
    return {"check": (lambda v: v >= lo, f"must be >= {lo}")}


def _all(pred: Callable[[Any], bool], phrase: str) -> dict:
    return {"check": (lambda vs: len(vs) > 0 and all(pred(v) for v in vs), phrase)}


def _storage_url() -> dict:
    # Checked when the tree is built (not as a `check`, which strings skip), and masked wherever it is written out.
    def check(url: str) -> str:
        from autoseg.storage import check_url

        return check_url(url)

    def mask(url: str) -> str:
        from autoseg.storage import mask_url

        return mask_url(url)

    return {"validate": check, "mask": mask}


def _study_name() -> dict:
    def check(name: str) -> str:
        if not name.strip() or name != name.strip():
            raise InputError(f"search.study_name: {name!r} is empty or has spaces at its ends; give a name like "
                             "'drone-2026' (--study NAME)")
        return name

    return {"validate": check}


def _device_targets() -> dict:
    # Checked when the tree is built: a `check` would also refuse the empty list, which means "use device.target".
    def check(targets: list[str]) -> list[str]:
        seen: set[str] = set()
        for i, t in enumerate(targets):
            if not t.strip():
                raise InputError(f"device.targets[{i}]: empty; give each device as user@host[:port] or an ssh Host "
                                 "(--device pi1,pi2,pi3)")
            if t.strip() == "local":
                raise InputError(f"device.targets[{i}]: 'local' cannot be pooled; measure locally with "
                                 "--device local alone")
            if t.strip() in seen:
                raise InputError(f"device.targets[{i}]: {t!r} is listed twice; give each device once")
            seen.add(t.strip())
        return [t.strip() for t in targets]

    return {"validate": check}


@dataclass
class DataConfig:
    images: Path | None = None
    masks: Path | None = None
    test_images: Path | None = None
    test_masks: Path | None = None
    # Mask files may be named `<stem><suffix>.<ext>`; the bare stem always matches.
    mask_suffixes: list[str] = field(default_factory=lambda: ["_mask", "_masks", "_label", "_labels", "_gt"])
    # Class name -> RGB colour, for colour-coded masks. A classes.json beside the masks also works.
    palette: dict[str, list[int]] | None = None
    # Mask value excluded from loss and metrics. Set to null to treat every value as a class.
    ignore_index: int | None = field(default=255, metadata=_range(0, 65535))
    # Share of images held out for testing when no test folders are given (split by image).
    test_fraction: float = field(default=0.2, metadata=_range(0.0, 0.9))


@dataclass
class TilesConfig:
    size: int = field(default=64, metadata=_min(8))
    overlap: float = field(default=0.25, metadata=_range(0.0, 1.0, closed_hi=False))


@dataclass
class RepsConfig:
    num_reps: int = field(default=200, metadata=_min(1))
    # Tiles taken from each cluster: clusters = ceil(num_reps / reps_per_cluster).
    reps_per_cluster: int = field(default=1, metadata=_min(1))
    embedder: Literal["handcrafted", "cnn"] = "handcrafted"
    # Optional local state_dict for the cnn embedder (e.g. a torchvision ResNet-18); random weights if null.
    embedder_weights: Path | None = None
    # Tiles whose feature distance to a kept tile is below this are dropped as near-duplicates.
    dedup_threshold: float = field(default=1e-3, metadata=_min(0.0))
    class_aware: bool = True
    contact_sheet: bool = False
    write_pngs: bool = False


@dataclass
class SpaceConfig:
    levels: list[int] = field(
        default_factory=lambda: [2, 3, 4], metadata=_all(lambda v: 1 <= v <= 6, "must be levels in 1..6")
    )
    kernels: list[int] = field(
        default_factory=lambda: [3, 5], metadata=_all(lambda v: v in (3, 5, 7), "must be kernels from {3, 5, 7}")
    )
    # 24 and 48 matter: on the drone data (23 classes) 24 channels at full resolution instead of 16 took a
    # 2-level net from 89 % to 100 % of the reference's test mIoU, at 7 % of its latency; 32 was over 10 %.
    channels: list[int] = field(
        default_factory=lambda: [8, 16, 24, 32, 48, 64],
        metadata=_all(lambda v: v >= 1, "must be positive channel counts"),
    )
    conv: list[Literal["standard", "separable"]] = field(default_factory=lambda: ["standard", "separable"])
    upsample: list[Literal["transpose", "bilinear"]] = field(default_factory=lambda: ["transpose", "bilinear"])
    # Extra tile sizes to search over; empty means tiles.size only.
    tile_sizes: list[int] = field(default_factory=list)


@dataclass
class SearchConfig:
    trials: int = field(default=20, metadata=_min(1))  # distinct nets; a repeated proposal does not count
    objective: Literal["penalty", "pareto"] = "penalty"
    sampler: Literal["tpe", "nsga2"] = "tpe"
    # How TPE's first trials are chosen. cost: nets spread over the space's cost (MACs quantiles), the
    # cheapest first, so a search starts with answers in minutes; random: TPE's own random draws.
    # NSGA-II always draws its first generation at random.
    startup: Literal["cost", "random"] = "cost"
    # halving: Optuna's SuccessiveHalvingPruner, which judges a trial after its first fold and gives the whole
    # CV only to the best third of the trials judged there; hyperband: Optuna's HyperbandPruner over the same
    # fold steps; median: stop a trial whose objective so far is below the median after a fold; none.
    # Trials are judged on the objective (CV mIoU so far with its latency penalty).
    pruner: Literal["halving", "hyperband", "median", "none"] = "halving"
    latency_budget_ms: float | None = field(default=None, metadata=_min(0.0, strict=True))
    # penalty objective: score - alpha*log10(latency/latency_ref_ms) - beta*log10(macs/macs_ref),
    # latency and MACs both at the measured input size (device.measure_size, else the tile)
    alpha: float = field(default=0.05, metadata=_min(0.0))
    beta: float = field(default=0.0, metadata=_min(0.0))
    latency_ref_ms: float = field(default=10.0, metadata=_min(0.0, strict=True))
    macs_ref: float = field(default=1e8, metadata=_min(0.0, strict=True))
    # Stop the study after this many budget prunes in a row: no candidate fits the budget.
    max_budget_prunes: int = field(default=20, metadata=_min(1))
    # Stop after this many candidates in a row the device could not measure: the device, not the nets,
    # is the problem (an onnxruntime too old for export.opset, say).
    max_measure_failures: int = field(default=3, metadata=_min(1))
    # Wall-clock limit of one run of the search, from its start to the end of its second stage: the trials end
    # early enough for the second stage (a trial running then stops at its next epoch, kept if a fold finished,
    # else left to a rerun), whose nets train on as many crops as fit in the time left; then the run trains the
    # best, within its own budget (train.final_tiles, train.final_minutes). null: no limit.
    max_minutes: float | None = field(default=None, metadata=_min(0.0, strict=True))
    # The second stage: the top refine_top nets by the search's objective, each trained on refine_tiles crops of
    # all training images (the shipped net's own training, shortened) and re-ranked by validation mIoU with the
    # same latency penalty; the winner is the net trained to ship. 0 or 1: off, the search's best ships.
    # null: 4 when the shipped net trains on all data with a validation split (train.final_data all,
    # train.val_fraction > 0), else off. The CV on the representatives cannot see how much a net gains from all
    # the data: on the drone data at the default final budget it ranked 8 nets with Spearman 0.62 and its pick
    # came 3rd; with this stage over its top 4 the search's order ranked them at 0.90 / 0.86 (training seeds 0
    # / 1) and shipped the 2nd / the 1st (benchmarks/results/full/fidelity_full.md).
    refine_top: int | None = field(default=None, metadata=_min(0))
    # null: a quarter of train.final_tiles. At 25,000 crops (an eighth) the top nets' validation scores were
    # closer than a training seed moves them (the 6th of 8 shipped at one seed); at a quarter, see above.
    refine_tiles: int | None = field(default=None, metadata=_min(1))
    # Processes that run trials at once on this machine, each with an equal share of the cores (or
    # train.threads). Small nets use many cores poorly, so on a big machine several look at more nets.
    workers: int = field(default=1, metadata=_min(1))
    # auto: with a latency budget (or the Pareto objective), a net whose latency, predicted from this device's
    # earlier measurements (autoseg.predictor), is over the budget beyond doubt is not measured; off: measure all.
    predict_latency: Literal["auto", "off"] = "auto"
    # Where the Optuna study lives: null is the run directory's study.db (SQLite). Any SQLAlchemy URL that Optuna's
    # RDBStorage takes shares one study between workers on many hosts, PostgreSQL through psycopg 3:
    # postgresql+psycopg://user:password@host:5432/dbname. Saved and shown with the password as ***.
    storage: str | None = field(default=None, repr=False, metadata=_storage_url())  # repr: no password in logs
    # The study's name in that database: one database may hold several studies (`autoseg worker --study NAME`).
    study_name: str = field(default="autoseg", metadata=_study_name())
    space: SpaceConfig = field(default_factory=SpaceConfig)


# Default CV budget: tiles a fold's net trains on, over all its epochs. On the drone data (bench_fidelity:
# 8 nets, 120 representatives, 3 folds) the Spearman correlation of the CV mIoU with the final test mIoU
# was -0.14, 0.43 and 0.74 after 240, 480 and 1040 tiles per fold (3, 6 and 13 epochs). At 1040 the best
# net by 3-seed test mIoU (k3-5_c24-64_separable_bilinear) ranked only 3rd of 4 retrained nets by CV; at 3200
# (40 epochs) it ranked 1st by a clear margin (benchmarks/results/full/fidelity.md, last note).
FOLD_TILE_PASSES = 3000
# Default budget of the shipped net's training on all training images, in crops seen.
FINAL_TILE_PASSES = 200_000
# Nets of the second stage (search.refine_top) when the config leaves it out.
DEFAULT_REFINE_TOP = 4


@dataclass
class TrainConfig:
    folds: int = field(default=3, metadata=_min(2))
    # Epochs per CV fold. null: enough for each fold's net to see about FOLD_TILE_PASSES tiles (at least 3
    # epochs); fewer made the CV ranking of nets worthless on the drone benchmark.
    epochs: int | None = field(default=None, metadata=_min(1))
    # Epochs for the final retrain of the best net on all representatives. A one-off cost, so far more
    # than a fold gets: on the drone benchmark test mIoU still rose 15 -> 60 -> 120 epochs for every net,
    # and by another 13 % from 120 to 240.
    final_epochs: int = field(default=100, metadata=_min(1))
    # What the shipped net trains on: "all" (crops of every training image) or "reps" (the representative
    # tiles, final_epochs epochs). The search ranks nets on the reps, but the net a user deploys should have
    # seen all their labels.
    final_data: Literal["all", "reps"] = "all"
    # Crops the shipped net sees in all (tile passes), and an optional wall-clock cap on that training.
    final_tiles: int = field(default=FINAL_TILE_PASSES, metadata=_min(1))
    final_minutes: float | None = field(default=None, metadata=_min(0.0, strict=True))
    # Side of the training crops; null: the tile size.
    final_crop: int | None = field(default=None, metadata=_min(8))
    # Share of training images held out (by image) to choose the best checkpoint and stop early; 0: none.
    val_fraction: float = field(default=0.1, metadata=_range(0.0, 0.5))
    # Tiles between validations; null: MIN_EVALS validations over the run.
    eval_every: int | None = field(default=None, metadata=_min(1))
    # Validations without improvement before the final training stops; 0: it always uses its whole budget.
    patience: int = field(default=4, metadata=_min(0))
    # Share of crops centred on a pixel of a class drawn with weight 1/sqrt(frequency): rare classes get seen.
    rare_share: float = field(default=0.5, metadata=_range(0.0, 1.0))
    # Crops cut at up to this factor larger or smaller than final_crop, then resized (1: no scale jitter).
    scale_jitter: float = field(default=1.25, metadata=_range(1.0, 4.0))
    # Brightness and contrast jitter, in normalised units (0: none).
    colour_jitter: float = field(default=0.1, metadata=_range(0.0, 1.0))
    # Distillation: soft labels of a bigger net guide the shipped one. "reference": a 4-level U-Net (base 32)
    # trained first by the same final training; or the best/model.pt of another autoseg run. null: none.
    teacher: str | None = None
    distill_weight: float = field(default=0.5, metadata=_min(0.0))
    # Decoded training images kept in memory, per loader process.
    cache_mb: float = field(default=1024.0, metadata=_min(0.0))
    # Processes reading crops; null: none when the decoded images fit cache_mb, else up to 4.
    loader_workers: int | None = field(default=None, metadata=_min(0))
    lr: float = field(default=3e-3, metadata=_min(0.0, strict=True))
    weight_decay: float = field(default=1e-4, metadata=_min(0.0))
    batch_size: int | None = field(default=None, metadata=_min(1))
    dice_weight: float = field(default=1.0, metadata=_min(0.0))
    # "none", "inverse" (inverse sqrt of pixel frequency) or one weight per class.
    class_weights: Literal["none", "inverse"] | list[float] = "none"
    augment: bool = True
    threads: int | None = field(default=None, metadata=_min(1))


@dataclass
class DeviceConfig:
    # "local", "user@host", "user@host:port" or a Host alias from ~/.ssh/config.
    target: str = "local"
    # Several devices of one kind (same SoC, onnxruntime, threads) sharing the measurements (autoseg.devices.pool);
    # when given, replaces target. `--device pi1,pi2,pi3` sets it.
    targets: list[str] = field(default_factory=list, metadata=_device_targets())
    python: str = "python3"
    trust_new_host: bool = False
    fallback: Literal["none", "local"] = "none"
    known_hosts: Path | None = None
    ssh_config: Path | None = None
    identity_file: Path | None = None
    connect_timeout_s: float = field(default=10.0, metadata=_min(0.0, strict=True))
    reconnect_attempts: int = field(default=3, metadata=_min(0))
    threads: int | None = field(default=None, metadata=_min(1))
    providers: list[str] = field(default_factory=lambda: ["CPUExecutionProvider"])
    warmup: int = field(default=5, metadata=_min(0))
    min_runs: int = field(default=20, metadata=_min(1))
    min_seconds: float = field(default=0.5, metadata=_min(0.0))
    cooldown_s: float = field(default=0.0, metadata=_min(0.0))
    max_model_mb: float = field(default=256.0, metadata=_min(0.0, strict=True))
    # Other processes keeping more than this many cores busy make a latency suspect: it is measured again
    # after busy_wait_s, and if still busy kept but not cached. null switches off the load checks, busy and
    # noisy (p90/median or CV too wide) alike; throttling, warming and emulation are flagged regardless.
    max_busy_cores: float | None = field(default=0.5, metadata=_min(0.0))
    busy_wait_s: float = field(default=5.0, metadata=_min(0.0))
    # Input size for latency measurement; null means the tile size.
    measure_size: int | None = field(default=None, metadata=_min(8))
    # The precision the net will run at on the device. int8: each candidate is timed quantized, as
    # export.int8 writes it, so the budget judges what ships (and the int8 model is exported too).
    precision: Literal["fp32", "int8"] = "fp32"


@dataclass
class EvalConfig:
    # auto: whole image while one pass fits about 512 MiB (at most 2048x2048 px), moving window beyond;
    # windows are blended a band of rows at a time, so memory is bounded by a row of windows, not the image.
    mode: Literal["auto", "whole", "window"] = "auto"
    window_overlap: float = field(default=0.5, metadata=_range(0.0, 1.0, closed_hi=False))
    batch: int = field(default=8, metadata=_min(1))
    num_examples: int = field(default=4, metadata=_min(0))


@dataclass
class ExportConfig:
    opset: int = field(default=17, metadata=_range(11, 23))
    simplify: bool = True
    parity_atol: float = field(default=1e-4, metadata=_min(0.0, strict=True))
    # Also write best/model.int8.onnx (static int8, calibrated on the representative tiles), with its
    # test metrics and device latency beside the float model's.
    int8: bool = False


@dataclass
class Config:
    out: Path = Path("runs/autoseg")
    seed: int = field(default=0, metadata=_range(0, 2**32 - 1))  # numpy and torch seeds are unsigned 32-bit
    data: DataConfig = field(default_factory=DataConfig)
    tiles: TilesConfig = field(default_factory=TilesConfig)
    reps: RepsConfig = field(default_factory=RepsConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


# ---------------------------------------------------------------- loading


def load_config(path: Path | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Read YAML (if given), apply dotted-key overrides, validate, and return the tree.

    Relative paths are resolved here, against the working directory: the tree (and the config.yml a run
    saves) names the same files from wherever a later command runs."""
    raw = _read_yaml(path) if path is not None else {}
    _apply(raw, overrides)
    return _settle(_build(Config, raw, ""))


def config_from_dict(raw: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> Config:
    """The tree from its dict form (config_to_dict's, as a study records it), with `overrides` on top."""
    import copy

    tree = copy.deepcopy(dict(raw))
    _apply(tree, overrides)
    return _settle(_build(Config, tree, ""))


# The paths a run's later commands (eval, export --trial) read again.
DATA_PATHS = ("images", "masks", "test_images", "test_masks")


def load_run_config(root: Path, overrides: Mapping[str, Any] | None = None) -> Config:
    """The config a run saved in `root`/config.yml, with `overrides` (this command's flags) on top.

    A run is a folder that may be copied or moved: `out` becomes `root`, and a data folder that lay inside
    the run when it was made (as the demo's does) is read from inside `root`, where it now is. Runs made
    before paths were resolved hold them relative to where the search started; inside the run, they are
    found the same way."""
    root = Path(root)
    raw = _read_yaml(root / "config.yml")
    data = raw.get("data")
    out = raw.get("out")
    if isinstance(data, dict) and isinstance(out, str):
        for key in DATA_PATHS:
            if isinstance(data.get(key), str):
                data[key] = _inside_run(data[key], out, root)
    raw["out"] = str(root)
    _apply(raw, overrides)
    return _settle(_build(Config, raw, ""))


def _inside_run(path: str, out: str, root: Path) -> str:
    """`path` moved with the run, when it lay in the run folder (`out` as saved) and is there now."""
    p, o = Path(path).expanduser(), Path(out).expanduser()
    if p.is_absolute() != o.is_absolute():
        return path
    try:
        moved = root / p.relative_to(o)
    except ValueError:
        return path
    return str(moved) if moved.exists() else path


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(f"{path}: cannot read config ({e.strerror}); check the --config path") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: is not UTF-8 text (byte {e.start}); save the config as UTF-8 YAML") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise InputError(f"{path}:{where} is not valid YAML; fix the syntax") from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise InputError(f"{path}: top level must be a mapping of sections, got {type(loaded).__name__}")
    return loaded


def _apply(raw: dict[str, Any], overrides: Mapping[str, Any] | None) -> None:
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = raw
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise InputError(f"{dotted}: cannot override, {p} is not a section")
        node[leaf] = value


def _settle(cfg: Config) -> Config:
    """What every config goes through once built: input paths made absolute, and one device given as a list made
    that device (device.target), so that below the door device.targets always means a pool of several."""
    _absolute(cfg)
    if cfg.search.refine_top is None:
        on = cfg.train.final_data == "all" and cfg.train.val_fraction > 0
        cfg.search.refine_top = DEFAULT_REFINE_TOP if on else 0
    if cfg.search.refine_tiles is None:
        cfg.search.refine_tiles = max(1, cfg.train.final_tiles // 4)
    if cfg.search.refine_top > 1 and cfg.train.val_fraction == 0:
        raise InputError("search.refine_top: the second stage ranks nets on validation images, and "
                         "train.val_fraction is 0; set train.val_fraction (e.g. 0.1) or search.refine_top: 0")
    if len(cfg.device.targets) == 1:
        cfg.device.target, cfg.device.targets = cfg.device.targets[0], []
    return cfg


def _absolute(cfg: Config) -> Config:
    """Input paths resolved against the working directory (symbolic links followed), so that a saved config
    means the same files from any directory. `out` stays as given: it is where this command writes."""
    for key in DATA_PATHS:
        value = getattr(cfg.data, key)
        if value is not None:
            setattr(cfg.data, key, value.resolve())
    if cfg.reps.embedder_weights is not None:
        cfg.reps.embedder_weights = cfg.reps.embedder_weights.resolve()
    if cfg.train.teacher not in (None, "reference"):
        cfg.train.teacher = str(Path(cfg.train.teacher).expanduser().resolve())
    return cfg


def config_to_dict(cfg: Any) -> Any:
    """Plain YAML/JSON-ready form of the tree (paths become strings)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: _masked(f, config_to_dict(getattr(cfg, f.name))) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, Path):
        return str(cfg)
    if isinstance(cfg, list | tuple):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    return cfg


def _masked(f: dataclasses.Field, value: Any) -> Any:
    """A secret (the storage URL's password) as *** in every written or printed form of the tree."""
    mask = f.metadata.get("mask")
    return mask(value) if mask is not None and isinstance(value, str) else value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "config"
    if not isinstance(raw, dict):
        raise InputError(f"{where}: must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise InputError(f"{prefix}{unknown[0]}: unknown key; known keys here are {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in raw.items():
        key = f"{prefix}{name}"
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key + ".")
            continue
        v = _coerce(tp, value, key)
        check: Check | None = fields[name].metadata.get("check")
        if check is not None and v is not None and not isinstance(v, str) and not check[0](v):
            raise InputError(f"{key}: {check[1]}, got {_show(value)}")
        validate = fields[name].metadata.get("validate")
        if validate is not None and v is not None:
            v = validate(v)  # raises InputError naming the key
        kwargs[name] = v
    return cls(**kwargs)


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in (a for a in args if a is not type(None)):
            try:
                return _coerce(a, value, key)
            except InputError as e:
                errors.append(str(e))
        raise InputError(errors[-1] if len(errors) == 1 else f"{key}: {_expected(tp)}, got {_show(value)}")
    if origin is Literal:
        if value not in args:
            raise InputError(f"{key}: must be one of {', '.join(map(str, args))}, got {_show(value)}")
        return value
    if origin is list:
        if not isinstance(value, list | tuple):
            raise InputError(f"{key}: must be a list, got {_show(value)}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise InputError(f"{key}: must be a mapping, got {_show(value)}")
        return {_coerce(args[0], k, key): _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise InputError(f"{key}: must be true or false, got {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{key}: must be an integer, got {_show(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InputError(f"{key}: must be a number, got {_show(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise InputError(f"{key}: must be a string, got {_show(value)}")
        return value
    if tp is Path:
        if not isinstance(value, str | Path):
            raise InputError(f"{key}: must be a path, got {_show(value)}")
        return Path(value).expanduser()
    raise TypeError(f"unsupported config type {tp!r} at {key}")  # a bug in this file, not user input


def _expected(tp: Any) -> str:
    names = [getattr(a, "__name__", str(a)) for a in typing.get_args(tp) if a is not type(None)]
    return "must be " + " or ".join(names)
