"""Command line: `python3 -m edge_agent {serve,bench,fingerprint,predict}` (console script `edge-agent`)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

from edge_agent import __version__


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="edge_agent[%(process)d] %(levelname)s %(message)s",
    )
    if args.cmd == "serve":
        from edge_agent.serve import DEFAULT_LOCK, serve

        lock = DEFAULT_LOCK if args.lock is None else (args.lock or None)
        return serve(args.cache_dir, int(args.max_model_mb * 2**20), lock, args.lock_timeout, args.busy_report_s,
                     args.nonce)
    if args.cmd == "fingerprint":
        from edge_agent.fingerprint import fingerprint, fingerprint_id

        fp = fingerprint()
        fp["fingerprint_id"] = fingerprint_id(fp)
        print(json.dumps(fp, indent=2))
        return 0
    if args.cmd == "predict":
        return _predict(args)
    return _bench(args)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-agent", description="autoseg on-device latency agent")
    p.add_argument("--version", action="version", version=f"edge_agent {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging (stderr)")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="answer JSON-line requests on stdin/stdout (used by autoseg over SSH)")
    s.add_argument("--cache-dir", default=os.path.join("~", ".cache", "autoseg-agent", "work"),
                   help="work directory; models are read from <cache-dir>/models/")
    s.add_argument("--max-model-mb", type=_non_negative, default=256.0,
                   help="refuse (and delete) model files larger than this (default 256)")
    s.add_argument("--lock", default=None, help="file locked while a model is timed, so that agents never "
                   "time at once; its folder must be private (default: ~/.cache/autoseg-agent/measure.lock; "
                   "'' for none)")
    s.add_argument("--lock-timeout", type=_non_negative, default=600.0,
                   help="seconds to wait for another measurement before answering 'busy' (default 600)")
    s.add_argument("--busy-report-s", type=_non_negative, default=5.0,
                   help="seconds of waiting before the first 'device busy' progress line (default 5)")
    s.add_argument("--nonce", default="", help="echoed in the first line, which frames the protocol")

    b = sub.add_parser("bench", help="measure one ONNX model and print the statistics")
    b.add_argument("model", help="path to an .onnx file")
    b.add_argument("--shape", type=_shape, default=None,
                   help="input shape N,C,H,W (default: the model's, dynamic dims as 1 / 64)")
    b.add_argument("--threads", type=int, default=None, help="intra-op threads (default: onnxruntime's)")
    b.add_argument("--providers", nargs="+", default=["CPUExecutionProvider"],
                   help="execution providers in order of preference (CPU is always the fallback)")
    b.add_argument("--warmup", type=int, default=5)
    b.add_argument("--min-runs", type=int, default=20)
    b.add_argument("--min-seconds", type=_non_negative, default=0.5)
    b.add_argument("--cooldown", type=_non_negative, default=0.0, help="seconds to sleep before measuring")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--json", action="store_true", help="print one JSON object instead of a table")

    sub.add_parser("fingerprint", help="print a JSON description of this device")

    d = sub.add_parser("predict", help="label a folder of images with a model exported by autoseg",
                       description="Writes OUT/<stem>.png masks (class ids, or the training masks' values with "
                       "--values training); the preprocessing is read from the model's metadata.")
    d.add_argument("model", help="model.onnx (or model.int8.onnx) exported by autoseg")
    d.add_argument("images", help="folder of images (PNG, PGM/PPM; JPEG, TIFF, BMP with Pillow)")
    d.add_argument("out", help="folder for the masks")
    d.add_argument("--mode", choices=["auto", "whole", "window"], default="auto",
                   help="whole image at once, or Gaussian-blended moving windows (auto: whole while it fits "
                   "512 MiB of activations)")
    d.add_argument("--overlap", type=float, default=0.5, help="window overlap in [0, 1) (default 0.5)")
    d.add_argument("--batch", type=int, default=8, help="windows per inference call (default 8)")
    d.add_argument("--values", choices=["ids", "training"], default="ids",
                   help="mask values: class ids (default) or the training masks' gray levels / colours")
    d.add_argument("--overlay", action="store_true", help="also write <stem>_overlay.png")
    d.add_argument("--threads", type=int, default=None, help="intra-op threads (default: onnxruntime's)")
    d.add_argument("--providers", nargs="+", default=["CPUExecutionProvider"],
                   help="execution providers in order of preference; list CPUExecutionProvider too to allow "
                   "running on CPU when the others are missing")
    d.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    return p


def _predict(args: argparse.Namespace) -> int:
    from edge_agent.predict import PredictError, predict_folder

    log = logging.getLogger("edge_agent.predict")
    try:
        summary = predict_folder(args.model, args.images, args.out, mode=args.mode, overlap=args.overlap,
                                 batch=args.batch, values=args.values, write_overlay=args.overlay, threads=args.threads,
                                 providers=args.providers, log=log.info)
    except PredictError as e:
        print(f"edge-agent: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary, separators=(",", ":")))
    else:
        share = sorted(summary["class_share"].items(), key=lambda kv: -kv[1])[:5]
        print(f"{summary['images']} mask(s) in {args.out}: {summary['images_per_s']:.3g} images/s, "
              f"{summary['ms_per_megapixel']:.1f} ms per megapixel ({', '.join(summary['providers_used'])}); "
              f"pixels: {', '.join(f'{c} {100 * s:.1f} %' for c, s in share)}")
    return 0


def _shape(text: str) -> List[int]:
    try:
        dims = [int(d) for d in text.replace("x", ",").split(",") if d.strip()]
    except ValueError:
        dims = []
    if not dims or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers like 1,3,64,64")
    return dims


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number >= 0")
    return value


def _bench(args: argparse.Namespace) -> int:
    from edge_agent.bench import make_session, measure_report
    from edge_agent.fingerprint import fingerprint, fingerprint_id

    if not os.path.isfile(args.model):
        print(f"edge-agent: {args.model}: no such file; give the path of an .onnx model", file=sys.stderr)
        return 2
    try:
        sess = make_session(args.model, args.threads, args.providers)
    except Exception as e:
        print(f"edge-agent: {args.model}: onnxruntime cannot load it: {e}", file=sys.stderr)
        return 2
    inp = sess.get_inputs()[0]
    shape = args.shape or _default_shape(inp.shape)
    fp = fingerprint()
    try:
        body = measure_report(sess, shape, args.warmup, args.min_runs, args.min_seconds,
                              seed=args.seed, cooldown_s=args.cooldown)
    except Exception as e:
        print(f"edge-agent: {args.model}: inference failed on shape {shape}: {e}; check --shape",
              file=sys.stderr)
        return 2
    result = {
        "model": args.model,
        "input": {"name": inp.name, "shape": list(inp.shape), "type": inp.type},
        "shape": shape,
        "threads": args.threads,
        "warmup": args.warmup,
        "fingerprint": fp,
        "fingerprint_id": fingerprint_id(fp),
    }
    result.update(body)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(_table(result))
    return 0


def _default_shape(dims: Sequence[Any]) -> List[int]:
    """Static dims as they are; a dynamic batch becomes 1, dynamic spatial dims 64."""
    return [d if isinstance(d, int) and d > 0 else (1 if k == 0 else 64) for k, d in enumerate(dims)]


def _table(r: Dict[str, Any]) -> str:
    fp = r["fingerprint"]

    def val(x: Any, spec: str = "") -> str:
        return "?" if x is None else format(x, spec)

    inp = r["input"]
    available = ", ".join(fp.get("providers") or [])
    used = ", ".join(r["providers_used"])
    lines = [
        f"device       {val(fp.get('machine'))} ({val(fp.get('arch'))}), {val(fp.get('cpu_model'))}, "
        f"{val(fp.get('cores'))} cores, {val(fp.get('ram_mb'))} MB RAM",
        f"os           {val(fp.get('os'))}",
        f"runtime      python {val(fp.get('python'))}, numpy {val(fp.get('numpy'))}, "
        f"onnxruntime {val(fp.get('onnxruntime'))}",
        f"providers    available {available}; used {used}",
        f"cpu state    governor {val(fp.get('governor'))}, {val(fp.get('cpu_freq_mhz'), '.0f')} MHz, "
        f"{val(r['temp_before_c'], '.1f')} C before -> {val(r['temp_after_c'], '.1f')} C after, "
        f"throttled {val(r['throttled'])}",
        f"fingerprint  {r['fingerprint_id']}",
        f"model        {r['model']}  input {inp['name']} {inp['shape']} {inp['type']}",
        f"measured     shape {r['shape']}, threads {val(r['threads'])}, warm-up {r['warmup']}",
        "",
        f"  {'stat':<8} {'ms':>10}",
    ]
    stats = r["stats"]
    for key in ("min_ms", "median_ms", "mean_ms", "p90_ms", "p99_ms", "std_ms"):
        lines.append(f"  {key[:-3]:<8} {stats[key]:>10.3f}")
    lines.append(f"  {'runs':<8} {stats['count']:>10d}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
