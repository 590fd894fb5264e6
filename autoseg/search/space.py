"""The candidate space: the nets search.space allows, decoding a trial's params into an `Arch` and a tile, and
the cost-ordered start (the params of TPE's first trials, cheapest net first)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna

from autoseg.config import Config, SpaceConfig
from autoseg.errors import InputError
from autoseg.unet import Arch, count_macs, depthwise_macs, validate_arch

# How many places up the sorted channel list each deeper level moves: with the default list, up to x4 (8 -> 32)
# or x2.7 (24 -> 64) per level.
CHANNEL_STEPS = (0, 1, 2, 3)
START_POOL = 256  # random nets of the space that search.startup "cost" picks the first trials from
START_TOP_QUANTILE = 0.75  # the dearest of them sits at this MACs quantile: never the space's costly corner
START_NOMINAL_CLASSES = 8  # MACs that order the start must not depend on the data, only on the config
# What a depthwise MAC weighs in start_cost. A depthwise MAC trains some 30x slower than a dense one on a CPU, but
# weighing them so (the start ordered by training time) found worse nets: at 12 trials over 5 seeds its searches
# ended 26 % sooner at 81 % of each seed's best CV, against 100 % for MACs alone (benchmarks/results/full/
# clock_start.md). By MACs, the start tries 32-64 channel separable nets early, the objective's best trade-offs.
START_DEPTHWISE_WEIGHT = 1.0


@dataclass(frozen=True)
class Candidate:
    arch: Arch
    tile: int


def trial_candidate(attrs: dict[str, Any]) -> Candidate:
    """The net a trial looked at, from its user attributes (arch_dict and tile)."""
    return Candidate(Arch.from_dict(attrs["arch_dict"]), int(attrs["tile"]))


def tile_choices(cfg: Config) -> list[int]:
    return sorted(set(cfg.search.space.tile_sizes) or {cfg.tiles.size})


def check_space(space: SpaceConfig, tiles: Sequence[int]) -> None:
    """Refuse a space in which no architecture is valid, and say why."""
    for tile in tiles:
        for levels in space.levels:
            arch = Arch(tuple([min(space.kernels)] * levels), tuple([min(space.channels)] * levels))
            try:
                validate_arch(arch, tile)
                return
            except ValueError:
                continue
    deepest = 2 ** (min(space.levels) - 1)
    raise InputError(
        f"search.space: no valid architecture: every tile size in {sorted(tiles)} must be divisible by "
        f"2^(levels-1) = {deepest} for the shallowest level count {min(space.levels)}; "
        "allow fewer levels or use a tile size that is a multiple of it"
    )


def sample_candidate(trial: optuna.Trial, space: SpaceConfig, tiles: Sequence[int]) -> Candidate:
    """Sample with fixed distributions per name (Optuna needs that), monotone channels by construction."""
    levels = trial.suggest_categorical("levels", sorted(set(space.levels)))
    tile = trial.suggest_categorical("tile", list(tiles)) if len(tiles) > 1 else tiles[0]
    channels = sorted(set(space.channels))
    kernels = sorted(set(space.kernels))
    idx = channels.index(trial.suggest_categorical("c0", channels))
    ks, cs = [], []
    for i in range(levels):
        if i > 0:
            step = trial.suggest_categorical(f"cstep{i}", list(CHANNEL_STEPS))
            idx = min(idx + step, len(channels) - 1)
        cs.append(channels[idx])
        ks.append(trial.suggest_categorical(f"k{i}", kernels))
    conv = trial.suggest_categorical("conv", list(dict.fromkeys(space.conv)))
    ups = list(dict.fromkeys(space.upsample))
    upsample = trial.suggest_categorical("upsample", ups)
    if levels == 1:  # no decoder: both choices are the same net, which should be trained once
        upsample = ups[0]
    return Candidate(Arch(tuple(ks), tuple(cs), conv, upsample), tile)


def arch_attrs(cand: Candidate) -> dict[str, int | str]:
    """The decoded net as flat user attributes (one scalar each, so optuna-dashboard can plot and sort them):
    depth, per level kernel_l{i} and channels_l{i} (real channel counts, not the sampled steps), and conv and
    upsample, which are one choice for the whole net (the trial's "tile" attribute is the fifth part)."""
    a = cand.arch
    out: dict[str, int | str] = {"depth": a.levels}
    for i, (k, c) in enumerate(zip(a.kernels, a.channels, strict=True)):
        out[f"kernel_l{i}"] = int(k)
        out[f"channels_l{i}"] = int(c)
    out["conv"] = a.conv
    out["upsample"] = a.upsample
    return out


def startup_trials(cfg: Config) -> int:
    """TPE's start: trials before it models the results."""
    return max(3, min(10, cfg.search.trials // 3))


def space_pool(cfg: Config, n: int = START_POOL) -> list[tuple[Candidate, dict[str, Any]]]:
    """Distinct valid nets drawn at random from the space (seeded by cfg.seed), each with the params that
    give it; the draws are uniform over each parameter's choices, as a random start's are."""
    space, tiles = cfg.search.space, tile_choices(cfg)
    choices: dict[str, list[Any]] = {"levels": sorted(set(space.levels))}
    if len(tiles) > 1:
        choices["tile"] = list(tiles)
    choices["c0"] = sorted(set(space.channels))
    for i in range(max(space.levels)):
        if i:
            choices[f"cstep{i}"] = list(CHANNEL_STEPS)
        choices[f"k{i}"] = sorted(set(space.kernels))
    choices["conv"] = list(dict.fromkeys(space.conv))
    choices["upsample"] = list(dict.fromkeys(space.upsample))
    rng = np.random.default_rng([cfg.seed, 0xC057])
    seen: set[tuple[str, int]] = set()
    pool = []
    for _ in range(n):
        trial = optuna.trial.FixedTrial({k: v[int(rng.integers(len(v)))] for k, v in choices.items()})
        cand = sample_candidate(trial, space, tiles)
        if (cand.arch.key(), cand.tile) in seen:
            continue
        try:
            validate_arch(cand.arch, cand.tile)
        except ValueError:
            continue
        seen.add((cand.arch.key(), cand.tile))
        pool.append((cand, dict(trial.params)))
    return pool


def tile_macs(cand: Candidate, in_channels: int = 3, num_classes: int = START_NOMINAL_CLASSES) -> int:
    """MACs of one forward pass on one training tile: what a training step costs, per tile."""
    return count_macs(cand.arch, in_channels, num_classes, cand.tile, cand.tile)


def start_cost(cand: Candidate) -> float:
    """What orders the start: a net's MACs on one tile (depthwise ones weighed START_DEPTHWISE_WEIGHT times)."""
    return tile_macs(cand) + (START_DEPTHWISE_WEIGHT - 1.0) * depthwise_macs(cand.arch, 3, cand.tile, cand.tile)


def startup_plan(cfg: Config) -> list[dict[str, Any]]:
    """With search.startup "cost" (and TPE): the params of TPE's first trials, nets at evenly spaced MACs
    quantiles of the space (start_cost) from its cheapest up to START_TOP_QUANTILE, cheapest first.

    A random first draw can be the space's dearest corner (1.9 GMACs a 64 px tile, 40 minutes a fold on
    2 cores); this way the first answers come in minutes and TPE still sees the space's range of cost.
    It depends on the config alone, so a resumed search and parallel workers follow the same plan."""
    if cfg.search.startup != "cost" or cfg.search.sampler != "tpe":
        return []
    pool = sorted(space_pool(cfg), key=lambda cp: (start_cost(cp[0]), cp[0].arch.key(), cp[0].tile))
    k = min(startup_trials(cfg), len(pool))
    picks: list[int] = []
    for i in range(k):
        j = round(START_TOP_QUANTILE * i / max(k - 1, 1) * (len(pool) - 1))
        while j in picks and j + 1 < len(pool):
            j += 1
        if j not in picks:
            picks.append(j)
    return [pool[j][1] for j in picks]


def space_corners(cfg: Config, macs: Callable[[Candidate], int]) -> tuple[Candidate, Candidate]:
    """The space's smallest and largest nets by `macs`: narrowest and widest kernels and channels at each
    level count, tile, conv and upsample."""
    sp = cfg.search.space
    ups = list(dict.fromkeys(sp.upsample))
    nets = []
    for levels in sorted(set(sp.levels)):
        for tile in tile_choices(cfg):
            for conv in dict.fromkeys(sp.conv):
                for up in ups[:1] if levels == 1 else ups:
                    for k, c in ((min(sp.kernels), min(sp.channels)), (max(sp.kernels), max(sp.channels))):
                        cand = Candidate(Arch((k,) * levels, (c,) * levels, conv, up), tile)
                        try:
                            validate_arch(cand.arch, cand.tile)
                        except ValueError:
                            continue
                        nets.append(cand)
    order = sorted(nets, key=lambda c: (macs(c), c.arch.key(), c.tile))
    return order[0], order[-1]
