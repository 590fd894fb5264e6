"""What the model card says beyond the numbers finalize collects, and the summary lines `autoseg search` and
`autoseg export` print from it."""

from __future__ import annotations

import math
from typing import Any

from autoseg.devices import unreliable_note


def training_summary(training: dict[str, Any] | None) -> dict[str, Any] | None:
    """The model card's view of the final training: everything but the curve (best/training.json has it)."""
    return None if training is None else {k: v for k, v in training.items() if k != "curve"}


def int8_comparison(q: dict[str, Any]) -> str:
    """'X ms vs Y ms float', plain only when both figures are clean; else with why it is unreliable."""
    flags = [*q.get("latency_flags", ()), *q.get("fp32_latency_flags", ())]
    return (f"{fmt(q.get('latency_ms'), '.2f')} ms vs {fmt(q.get('fp32_latency_ms'), '.2f')} ms float"
            f"{unreliable_note(flags)}")


def card_test_metrics(metrics: dict[str, Any] | None) -> dict[str, Any]:
    """The model card's plain test-metric keys (None without test images)."""
    if not metrics:
        return dict.fromkeys(("test_miou", "test_dice", "test_pixel_acc", "test_per_class"))
    mean = metrics["mean"]
    return {
        "test_miou": mean["miou"],
        "test_dice": mean["macro_dice"],
        "test_pixel_acc": mean["pixel_acc"],
        "test_per_class": metrics["per_class"],
    }


def fmt(v: Any, spec: str = ".3f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def summary_lines(card: dict[str, Any]) -> list[str]:
    return [
        f"best architecture: {card['arch']} (trial {card['trial']}, tile {card['tile']})",
        f"  CV mIoU:   {fmt(card['cv_score'], '.3f')} ± {fmt(card['cv_std'], '.3f')}",
        f"  test mIoU: {fmt(card['test_miou'], '.3f')} on {card['test_images']} image(s)",
        f"  latency:   {fmt(card['latency_ms'], '.2f')} ms median"
        + (" in int8" if card.get("precision") == "int8" else "")
        + (f" at {size}x{size} px" if (size := card.get("measure_size")) else "")
        + f" on {card['device']} ({card['latency_source']})"
        + unreliable_note(card.get("latency_flags") or ()),
        f"  size:      {card['params']:,} params, {card['macs'] / 1e6:.1f}M MACs, "
        f"ONNX {card['onnx']['size_bytes'] / 1e3:.1f} kB",
        *_second_stage_lines(card.get("second_stage")),
        *_training_lines(card.get("training")),
        *_int8_summary(card.get("int8")),
        *_trials_summary(card.get("trials")),
    ]


def _second_stage_lines(s: dict[str, Any] | None) -> list[str]:
    if not s:
        return []
    won = next(n for n in s["nets"] if n["trial"] == s["chosen"])
    return [f"  chosen:    by the second stage, of the top {len(s['nets'])} by CV (rank {won['search_rank']}), "
            f"validation mIoU {fmt(won['val_miou'])} after {s['tiles']:,} crops of all training images"]


def _training_lines(t: dict[str, Any] | None) -> list[str]:
    if not t:
        return []
    if t["data"] == "reps":
        return [f"  trained:   {t['epochs']} epochs on {t['tiles']} representative tiles"]
    val = (f", best validation mIoU {fmt(t['best_val_miou'])} on {len(t['val_images'])} image(s) at "
           f"{t['best_step']:,} steps" if t.get("best_val_miou") is not None else ", no validation split")
    return [f"  trained:   {t['tile_passes']:,} crops of {t['crop']} px from {t['images']} training images "
            f"({t['stopped'].replace('_', ' ')}, {t['seconds'] / 60:.1f} min){val}"]


def _trials_summary(n: dict[str, int] | None) -> list[str]:
    if not n:
        return []
    repeats = f"; {n['repeats']} repeated proposal(s) reused" if n["repeats"] else ""
    failed = f"; {n['unmeasured']} the device could not measure" if n.get("unmeasured") else ""
    guessed = f" ({n['predicted_over_budget']} predicted, not measured)" if n.get("predicted_over_budget") else ""
    return [f"  searched:  {n['distinct']} distinct nets ({n['completed']} trained, {n['over_budget']} over the "
            f"latency budget{guessed}, {n['distinct'] - n['completed'] - n['over_budget']} pruned otherwise)"
            f"{repeats}{failed}"]


def predictor_card(study: Any) -> dict[str, Any] | None:
    """The model card's account of the latency predictor (issue #26): nets measured and predicted, and its error
    on the nets it predicted before they were measured; None when no predictor was fitted."""
    from autoseg.report.collect import _trial_row
    from autoseg.report.predicted import predictor_summary

    s = predictor_summary([_trial_row(t) for t in study.get_trials(deepcopy=False)])
    return None if s is None else {k: v for k, v in s.items() if k != "pairs"}


def _int8_summary(q: dict[str, Any] | None) -> list[str]:
    if not q:
        return []
    if "error" in q:
        return [f"  int8:      not exported: {q['error']}"]
    return [
        f"  int8:      test mIoU {fmt(q['test_miou'], '.3f')}, {int8_comparison(q)}, "
        f"ONNX {q['size_bytes'] / 1e3:.1f} kB: {q['path']}"
    ]
