"""Issue #22's figures: every hardening case it names, run as the tests that prove it, counted per category.

    python -m benchmarks.bench_reliability [--memory] [--only CATEGORY ...] [--out FILE]

CASES maps each case, in the issue's words (sections 1-6, and what its introduction says held), to the
pytest node ids that prove it (`file::test` selects every parameter of a test, `file::test[id]` one).
All of them run in one pytest process (`-m ''`: slow and ssh tests too; `-p no:cacheprovider`; results
read from a --junitxml file). A case is handled when each of its selectors matched at least one test and
every matched test passed; a skip counts as not handled. Categories: security, bad input, memory (the
band-by-band tests; the peak RSS itself is a benchmark), kill point, SSH fault, hostile agent request.

Predict's peak RSS by image size: with --memory `python -m benchmarks.bench_memory` is run again (after
the tests, into a temporary file) and its table quoted; without, the table of benchmarks/results/memory.md
is quoted, with the date of its last commit.

Targets: every case handled; predict's peak RSS flat across sizes (bench_memory's targets). Exit code 1
if a case is not handled, or, with --memory, if bench_memory misses a target. The report goes to
benchmarks/results/reliability.md (the full run, with --memory, to results/full/reliability.md).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from benchmarks import cpu_and_ram

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
MEMORY_MD = RESULTS / "memory.md"

SECURITY, BAD, MEMORY, KILL, SSH, HOSTILE = (
    "security", "bad input", "memory", "kill point", "SSH fault", "hostile agent request")
CATEGORIES = (SECURITY, BAD, MEMORY, KILL, SSH, HOSTILE)


@dataclass(frozen=True)
class Case:
    category: str
    section: str  # where the issue names it: "1".."6", or "intro" (held in the attack: a regression guard)
    text: str  # the words
    tests: tuple[str, ...]  # pytest selectors


def _t(file: str, *names: str) -> tuple[str, ...]:
    return tuple(f"tests/{file}.py::{n}" for n in names)


CASES: list[Case] = [
    # -- 1. security
    Case(SECURITY, "1", "a `model.pt` holding a pickle whose `__reduce__` calls `os.system` ran its payload "
         "under `autoseg export RUN`",
         _t("test_checkpoint", "test_export_of_a_malicious_run_folder_runs_no_code",
            "test_a_pickle_with_code_is_refused_and_its_payload_never_runs")),
    Case(SECURITY, "1", "... and under a rerun of `autoseg search … --out RUN` (a resume state that fails to "
         "load as data is ignored with a warning)",
         _t("test_checkpoint", "test_a_pickle_with_code_is_refused_and_its_payload_never_runs",
            "test_round_trip_of_a_training_state", "test_a_search_rerun_over_a_malicious_resume_state_runs_no_code")),
    Case(SECURITY, "1", "a file that fails to load as plain data is reported in one line (exit 2)",
         _t("test_checkpoint", "test_damaged_or_foreign_files_give_one_line")),
    # -- 5. bad inputs (and section 2's pixel limit)
    Case(BAD, "5", "non-UTF-8 file names (`write_manifest`)",
         _t("test_reps", "test_outputs_name_files_whose_names_are_not_utf8")
         + _t("test_data", "test_names_that_are_not_utf8_are_refused_at_the_door[image]",
              "test_names_that_are_not_utf8_are_refused_at_the_door[mask]")
         + _t("test_predict", "test_names_that_are_not_utf8_are_kept_as_the_os_gives_them")),
    Case(BAD, "5", "a non-UTF-8 data folder: the whole search ran, then the report failed, and `autoseg "
         "report` keeps failing for that run",
         _t("test_data", "test_names_that_are_not_utf8_are_refused_at_the_door[folder]")
         + _t("test_report", "test_a_run_that_names_files_whose_names_are_not_utf8_is_reported")),
    Case(BAD, "5", "a non-UTF-8 config file",
         _t("test_config", "test_a_config_that_is_not_utf8_is_one_line")),
    Case(BAD, "5", "`--seed -1`", _t("test_config", "test_seed_must_be_an_unsigned_32_bit_integer")),
    Case(BAD, "5", "model metadata `tile=0` in predict (and the family: bad or missing metadata)",
         _t("test_predict", "test_cli_exits_2_with_one_line_on_tile_0",
            "test_bad_metadata_is_one_line_naming_the_model_and_the_key", "test_missing_metadata_keys_are_named",
            "test_normalisation_for_other_channels_than_the_net_takes_is_named")),
    Case(BAD, "5", "an ONNX file with external data pointing outside its folder (and any model onnxruntime "
         "cannot load)",
         _t("test_cli", "test_eval_of_a_model_whose_external_data_lies_outside_its_folder_is_one_line_exit_2")
         + _t("test_predict", "test_a_model_onnxruntime_cannot_load_is_one_line")),
    Case(BAD, "5", "a corrupt, 0-byte or keyless `best/model.pt` in export",
         _t("test_cli", "test_export_of_a_damaged_checkpoint_is_one_line_exit_2")),
    Case(BAD, "5", "masks that are all zeros (refuse: one class only, name the folder)",
         _t("test_data", "test_masks_of_one_class_only_are_refused_naming_the_folder",
            "test_one_class_is_refused_even_when_a_class_file_declares_more")),
    Case(BAD, "5", "a `study.db` that is 0 bytes, random bytes or a directory",
         _t("test_report", "test_a_study_db_that_is_no_optuna_study_is_one_line_exit_2")
         + _t("test_search", "test_a_study_db_that_is_no_optuna_study_is_refused_in_one_line")),
    Case(BAD, "5", "a dangling symlink image, silently dropped, with a warning that blames the mask",
         _t("test_data", "test_a_dangling_symlink_image_is_named_not_blamed_on_its_mask")
         + _t("test_predict", "test_a_dangling_symlink_or_an_oversized_image_is_one_line")),
    Case(BAD, "5", "an identity file that is not a key says \"check the device is on\"",
         _t("test_agent_ssh", "test_an_identity_file_that_is_not_a_private_key_is_input_error")
         + _t("test_ssh_search", "test_an_identity_file_that_is_not_a_key_is_one_line_exit_2")),
    Case(BAD, "5", "`--known-hosts` pointing at a directory says \"check the device is on\"",
         _t("test_agent_ssh", "test_known_hosts_that_is_a_directory_is_input_error")),
    Case(BAD, "5", "`u@h:22:33` and `pi@[::1` are taken as host names (exit 3 instead of 2)",
         _t("test_latency", "test_parse_target_forms")),
    Case(BAD, "5", "`--to` as a directory names a temp file (`.E07dir.30445.tmp`) and blames free space",
         _t("test_cli", "test_export_to_a_directory_or_an_unwritable_place_is_one_line_exit_2")
         + _t("test_export", "test_a_target_that_cannot_be_written_is_named_not_the_temp_file_beside_it")),
    Case(BAD, "2", "images above a configurable pixel limit get one clear line, never a Pillow "
         "DecompressionBomb warning",
         _t("test_data", "test_images_over_the_pixel_limit_get_one_line_not_a_decompression_bomb")
         + _t("test_predict", "test_a_dangling_symlink_or_an_oversized_image_is_one_line")),
    Case(BAD, "2", "legitimate big images up to the limit just work",
         _t("test_data", "test_an_image_bigger_than_pillows_own_limit_reads_without_a_warning")),
    # -- 2. memory: what make test checks; the peak RSS is the benchmark quoted below
    Case(MEMORY, "2", "keep the Gaussian blending exact at band seams, and test that against the whole-image "
         "result",
         _t("test_infer", "test_bands_of_rows_equal_one_whole_accumulator",
            "test_labels_from_the_uint8_image_a_band_at_a_time_equal_the_whole_path")
         + _t("test_predict", "test_streamed_masks_equal_the_whole_image_labels",
              "test_png_rows_match_pillow_and_compress_as_well")
         + _t("test_data", "test_big_images_are_read_a_band_at_a_time_to_the_same_pixels")),
    Case(MEMORY, "2", "`autoseg predict` on one 6000×4000 image with a 24-class net peaked at 5.1 GB (peak "
         "bounded by window × band × classes)",
         _t("test_infer", "test_labelling_holds_a_band_of_logits_not_classes_x_h_x_w")
         + _t("test_predict", "test_predict_holds_the_image_and_a_band_not_classes_x_h_x_w")
         + _t("test_data", "test_class_ids_in_a_compact_type_a_band_at_a_time")),
    Case(MEMORY, "2", "a 10000×10000 test image pushed evaluation past 10.5 GB, even in `--eval-mode window`",
         _t("test_infer", "test_evaluation_scores_a_band_at_a_time",
            "test_auto_runs_whole_images_only_while_the_pass_is_small")),
    # -- 6 and the introduction: kill -9 points (the issue does not list its 7; these are the suite's)
    Case(KILL, "6", "a kill -9 while trial 1 ran, then the same command: the rerun must propose the nets an "
         "uninterrupted run does",
         _t("test_search", "test_a_search_killed_in_trial_1_resumes_as_the_same_search",
            "test_killed_trial_is_run_again_with_its_params")
         + _t("test_report", "test_a_trial_a_resumed_search_ran_again_says_so")),
    Case(KILL, "intro", "kill -9 between trials: no kill point lost data (finished trials kept, not redone)",
         _t("test_cli", "test_kill_9_then_rerun_resumes")),
    Case(KILL, "intro", "kill -9 in the final retrain (on the representatives): the rerun goes on from its "
         "last epoch",
         _t("test_cli", "test_kill_9_in_the_final_retrain_then_rerun_goes_on_from_its_last_epoch")
         + _t("test_train", "test_an_interrupted_training_goes_on_to_the_same_net")),
    Case(KILL, "intro", "kill -9 in the final training on all images: the rerun gives the same net, bit for bit",
         _t("test_final_train", "test_kill_9_mid_training_then_the_rerun_gives_the_same_net")),
    Case(KILL, "intro", "kill -9 of a search with worker processes: the workers go down, finished trials kept",
         _t("test_workers", "test_kill_9_takes_the_workers_down_and_a_rerun_resumes")),
    Case(KILL, "intro", "kill -9 while the study is created (an empty `study.db`): the rerun fills it in",
         _t("test_search", "test_a_study_db_that_is_no_optuna_study_is_refused_in_one_line[empty]")),
    Case(KILL, "intro", "the agent killed on the device mid-measurement: the model is measured again in full",
         _t("test_latency", "test_agent_killed_mid_measurement_is_measured_again")),
    # -- 3 (the device never hangs), sshd stopped (5), shell noise (4), what held (intro)
    Case(SSH, "5", "sshd stopped mid-search: exit 3 is right, but Optuna's logger prints a full traceback first",
         _t("test_cli", "test_a_device_lost_mid_search_is_one_line_exit_3_without_optunas_traceback",
            "test_optunas_trial_failed_traceback_is_dropped_for_our_errors_and_kept_for_bugs")),
    Case(SSH, "3", "the measurement lock is in a world-writable directory: put it in the agent's own per-user "
         "directory (mode 0700)",
         _t("test_agent_hardening", "test_default_lock_is_in_a_private_directory_of_the_user",
            "test_a_lock_that_others_could_hold_is_refused_not_waited_for[shared_dir]")),
    Case(SSH, "3", "a FIFO at the lock's path left the agent stuck in `open()` for good (a FIFO or symlink is "
         "refused)",
         _t("test_agent_hardening", "test_a_lock_that_others_could_hold_is_refused_not_waited_for[fifo]",
            "test_a_lock_that_others_could_hold_is_refused_not_waited_for[symlink]")),
    Case(SSH, "3", "a held lock stalled all measurements silently, 150 s with no output (wait with a timeout "
         "and a progress line)",
         _t("test_agent_hardening", "test_a_held_lock_is_waited_for_with_progress_lines_then_refused")
         + _t("test_agent_ssh", "test_a_busy_device_says_so_and_gives_up_after_the_timeout")
         + _t("test_edge_agent", "test_two_agents_on_one_device_never_time_at_once")),
    Case(SSH, "3", "the agent was orphaned (it exits when its SSH channel closes)",
         _t("test_agent_hardening", "test_agent_exits_when_the_host_goes_away_while_waiting")
         + _t("test_agent_ssh", "test_the_agent_exits_when_its_channel_closes_while_waiting")
         + _t("test_edge_agent", "test_eof_exits_cleanly", "test_sigterm_deletes_models")),
    Case(SSH, "3", "a model file left by a killed agent is never removed",
         _t("test_agent_hardening", "test_files_left_by_a_killed_agent_are_removed_at_the_next_start")),
    Case(SSH, "3", "two agents sharing one cache directory delete each other's model file (1 of 50 loads "
         "failed `not_found`)",
         _t("test_agent_hardening", "test_two_agents_on_one_cache_dir_keep_their_own_files")
         + _t("test_agent_ssh", "test_two_hosts_on_one_device_keep_their_model_files")),
    Case(SSH, "4", "a device whose `.bashrc` prints a line makes the agent \"unusable: malformed line\" (skip "
         "lines before a unique hello marker, and say so in the log)",
         _t("test_agent_ssh", "test_a_shell_rc_that_prints_is_skipped_and_logged")),
    Case(SSH, "intro", "no bogus latency was ever recorded (a lost device loses the numbers, not the run; a "
         "busy machine is measured again, not cached)",
         _t("test_latency", "test_measure_each_keeps_the_run_when_the_device_is_lost",
            "test_busy_machine_is_measured_again_and_not_cached",
            "test_stopped_sshd_is_unreachable_or_falls_back")
         + _t("test_ssh_search", "test_device_check_on_stopped_server_exits_3")),
    # -- 4: hostile lines, both directions; what held (intro)
    Case(HOSTILE, "4", "`b\"[\" * 200000 + b\"\\n\"` sent to `python -m edge_agent serve` kills the agent with "
         "`RecursionError`",
         _t("test_agent_hardening", "test_deeply_nested_lines_are_refused_before_parsing",
            "test_decode_bounds_depth_but_not_brackets_inside_strings")),
    Case(HOSTILE, "4", "... and the host fails the same way on such a reply",
         _t("test_agent_ssh", "test_an_agent_outside_the_protocol_is_named_not_a_crash[deep-nested deeper than]")
         + _t("test_agent_hardening", "test_replies_are_checked_against_one_schema")),
    Case(HOSTILE, "4", "an agent `hello` without `fingerprint` crashes the host with `KeyError` (validate "
         "every reply against one schema)",
         _t("test_agent_ssh",
            "test_an_agent_outside_the_protocol_is_named_not_a_crash[no_fingerprint-'fingerprint' is missing]")
         + _t("test_agent_hardening", "test_replies_are_checked_against_one_schema")),
    Case(HOSTILE, "intro", "the agent survived non-JSON",
         _t("test_edge_agent", "test_malformed_requests")
         + _t("test_latency", "test_malformed_requests_are_answered_with_errors")),
    Case(HOSTILE, "intro", "the agent survived 100 MiB lines (refused past 1 MiB, before parsing)",
         _t("test_edge_agent", "test_malformed_requests")
         + _t("test_agent_hardening", "test_decode_bounds_depth_but_not_brackets_inside_strings")),
    Case(HOSTILE, "intro", "the agent survived path tricks",
         _t("test_edge_agent", "test_refuses_paths_outside_cache")),
    Case(HOSTILE, "intro", "the agent survived wrong hashes (and models too large or not ONNX)",
         _t("test_edge_agent", "test_refuses_bad_models", "test_too_large")
         + _t("test_latency", "test_agent_refuses_wrong_hash", "test_oversized_model_is_refused")),
]


# -- running the tests


def selectors(cases: list[Case]) -> list[str]:
    """The node ids to hand pytest: each once, and no parameter whose whole test is selected anyway."""
    wanted = dict.fromkeys(s for c in cases for s in c.tests)
    nodes = [s for s in wanted if "[" not in s or s.split("[", 1)[0] not in wanted]
    return sorted(nodes, key=lambda s: s.split("::", 1)[0])  # by file: module fixtures are set up once


def node_id(classname: str, name: str) -> str:
    """junit's classname ("tests.test_x" or "tests.test_x.TestClass") and name, as a pytest node id."""
    parts = classname.split(".")
    for i in range(len(parts), 0, -1):
        path = "/".join(parts[:i]) + ".py"
        if (ROOT / path).is_file():
            return "::".join([path, *parts[i:], name])
    return "::".join([classname.replace(".", "/"), name])


def read_junit(path: Path) -> dict[str, tuple[str, float, str]]:
    """node id -> (passed | failed | error | skipped, seconds, first line of the reason)."""
    order = {"passed": 0, "skipped": 1, "failed": 2, "error": 3}
    results: dict[str, tuple[str, float, str]] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        nid = node_id(case.get("classname", ""), case.get("name", ""))
        outcome, why = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                kind = {"failure": "failed"}.get(child.tag, child.tag)
                if order[kind] > order[outcome]:
                    outcome, why = kind, (child.get("message") or child.text or "").strip().splitlines()[:1]
                    why = why[0] if why else ""
        seconds = float(case.get("time") or 0)
        if nid in results:  # a setup or teardown error reported apart
            old = results[nid]
            outcome = max(old[0], outcome, key=order.__getitem__)
            why = old[2] or why
            seconds += old[1]
        results[nid] = (outcome, seconds, why)
    return results


def run_pytest(nodes: list[str], junit: Path, log: Path) -> tuple[int, float]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "", "-rfEs",
           f"--junitxml={junit}", *nodes]
    # Children that run elsewhere (cwd a temp folder) import this checkout too, not the editable install's.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    return code, time.perf_counter() - t0


def matched(selector: str, results: dict[str, tuple[str, float, str]]) -> list[str]:
    return [n for n in results if n == selector or n.startswith(selector + "[")]


def judge(case: Case, results: dict[str, tuple[str, float, str]]) -> tuple[bool, list[str], list[str]]:
    """(handled, one cell per selector, problems)."""
    cells, problems, ok = [], [], True
    for sel in case.tests:
        nodes = matched(sel, results)
        short = sel.removeprefix("tests/")
        if not nodes:
            ok = False
            cells.append(f"`{short}`: **not run**")
            problems.append(f"{short}: no such test ran")
            continue
        outcomes = [results[n][0] for n in nodes]
        passed = outcomes.count("passed")
        ok = ok and passed == len(nodes)
        mark = "pass" if passed == len(nodes) else "**" + ", ".join(
            f"{outcomes.count(o)} {o}" for o in ("failed", "error", "skipped") if o in outcomes) + "**"
        count = f" ({passed}/{len(nodes)})" if len(nodes) > 1 or passed != len(nodes) else ""
        cells.append(f"`{short}` {mark}{count}")
        problems += [f"{n}: {results[n][0]}: {results[n][2]}" for n in nodes if results[n][0] != "passed"]
    return ok, cells, problems


# -- the memory table


def memory_table(rerun: bool, tmp: Path) -> tuple[list[str], bool | None, str]:
    """(markdown lines, bench_memory's targets met (None: not judged here), the source line)."""
    if rerun:
        out = tmp / "memory.md"
        print("\n=== python -m benchmarks.bench_memory", flush=True)
        t0 = time.perf_counter()
        code = subprocess.call([sys.executable, "-m", "benchmarks.bench_memory", "--out", str(out)], cwd=ROOT)
        took = time.perf_counter() - t0
        if not out.exists():
            return [f"bench_memory could not run (exit {code})."], False, "rerun now"
        source = (f"rerun now by `python -m benchmarks.bench_memory` ({took / 60:.1f} min, exit {code}; "
                  "its own machine line below)")
        return _quote(out.read_text()), code == 0, source
    if not MEMORY_MD.exists():
        return [f"{MEMORY_MD.relative_to(ROOT)} is missing: run with --memory."], None, "missing"
    date = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%h, %cd", "--date=format:%Y-%m-%d %H:%M",
                           "--", str(MEMORY_MD.relative_to(ROOT))], capture_output=True, text=True).stdout.strip()
    when = f"committed {date}" if date else "not committed, file dated " + time.strftime(
        "%Y-%m-%d %H:%M", time.localtime(MEMORY_MD.stat().st_mtime))
    return _quote(MEMORY_MD.read_text()), None, f"quoted from `benchmarks/results/memory.md` ({when})"


def _quote(md: str) -> list[str]:
    """bench_memory's command and machine, its table, floor and targets, as paragraphs."""
    lines = md.splitlines()
    head = [f"{ln}  " for ln in lines if ln.startswith(("`python -m benchmarks.bench_memory", "Machine:"))]
    table = [ln for ln in lines if ln.startswith("|")]
    floor = [ln for ln in lines if ln.startswith("Floor")]
    targets = [ln for ln in lines if ln.startswith(("- PASS", "- FAIL"))]
    out: list[str] = []
    for block in (head, table, floor, targets):
        if block:
            out += [*block, ""]
    return out[:-1]


# -- the report


def machine() -> str:
    cpu, ram = cpu_and_ram()
    versions = []
    for dist in ("torch", "onnxruntime", "optuna", "pytest"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions.append(f"{dist} {metadata.version(dist)}")
    try:
        ssh = subprocess.run(["/usr/sbin/sshd", "-V"], capture_output=True, text=True).stderr.strip().splitlines()
        versions.append(ssh[0].split(",")[0] if ssh else "")
    except OSError:
        versions.append("no sshd")
    return (f"{platform.platform()}, {cpu}, {os.cpu_count()} CPUs, {ram}; Python {platform.python_version()}, "
            + ", ".join(v for v in versions if v))


def git_head() -> str:
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return (head.stdout.strip() or "unknown") + (" with uncommitted changes" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--memory", action="store_true", help="rerun bench_memory (~3 min) instead of quoting it")
    ap.add_argument("--only", action="append", choices=CATEGORIES, help="run these categories only")
    ap.add_argument("--out", type=Path, default=RESULTS / "reliability.md")
    args = ap.parse_args(argv)
    cases = [c for c in CASES if not args.only or c.category in args.only]
    nodes = selectors(cases)
    info, head, load0 = machine(), git_head(), os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M %Z")
    print(f"{info}\ncheckout {head}; load average {load0[0]:.1f} / {load0[1]:.1f} / {load0[2]:.1f}", flush=True)
    print(f"running {len(nodes)} selectors for {len(cases)} cases in one pytest process ...", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench_reliability_") as tmp:
        tmp = Path(tmp)
        code, wall = run_pytest(nodes, tmp / "junit.xml", tmp / "pytest.log")
        log = (tmp / "pytest.log").read_text(errors="replace")
        results = read_junit(tmp / "junit.xml") if (tmp / "junit.xml").exists() else {}
        load1 = os.getloadavg()
        print(log[-3000:], flush=True)
        mem_lines, mem_ok, mem_source = memory_table(args.memory, tmp)

    judged = [(c, *judge(c, results)) for c in cases]
    outcomes = [o for o, _, _ in results.values()]
    lines = [
        "# Reliability: issue #22's hardening cases, run",
        "",
        f"`python -m benchmarks.bench_reliability{' --memory' if args.memory else ''}"
        + "".join(f" --only '{c}'" for c in args.only or []) + "`",
        "",
        f"Machine: {info}; checkout {head}; started {started}; 1/5/15-minute load average "
        f"{load0[0]:.1f} / {load0[1]:.1f} / {load0[2]:.1f} at the start, {load1[0]:.1f} / {load1[1]:.1f} / "
        f"{load1[2]:.1f} after the tests (other jobs share the machine: times are not judged).",
        "",
        f"One pytest process (`-m '' -p no:cacheprovider`, results from its --junitxml), {len(nodes)} selectors: "
        f"{len(results)} tests, {outcomes.count('passed')} passed, {outcomes.count('failed')} failed, "
        f"{outcomes.count('error')} errors, {outcomes.count('skipped')} skipped, in {wall / 60:.1f} min "
        f"(pytest exit {code}). A case is handled when every test listed for it passed (a skip is not a pass).",
        "",
        "## Counts",
        "",
        "| category | cases handled / tried | tests passed / run |",
        "|---|---|---|",
    ]
    for cat in CATEGORIES:
        mine = [(c, ok) for c, ok, _, _ in judged if c.category == cat]
        if not mine:
            continue
        tests = {n for c, _ in mine for s in c.tests for n in matched(s, results)}
        passed = sum(results[n][0] == "passed" for n in tests)
        lines.append(f"| {cat} | {sum(ok for _, ok in mine)} / {len(mine)} | {passed} / {len(tests)} |")
    all_tests = {n for c in cases for s in c.tests for n in matched(s, results)}
    handled = sum(ok for _, ok, _, _ in judged)
    lines += [f"| **all** | **{handled} / {len(judged)}** | "
              f"**{sum(results[n][0] == 'passed' for n in all_tests)} / {len(all_tests)}** |", ""]
    lines += [
        "The issue counted 113 bad inputs, 7 kill points, 25 SSH faults and 30 hostile requests in its attack, "
        "but lists only what failed (sections 1-6) and a few things that held (its introduction). The cases "
        "below are those it names, each with the tests that prove it; a test may serve more than one case. "
        "Section: where the issue names the case (intro = held in the attack, kept as a regression test).",
        "",
    ]
    for cat in CATEGORIES:
        rows = [(c, ok, cells) for c, ok, cells, _ in judged if c.category == cat]
        if not rows:
            continue
        lines += [f"## {cat[0].upper()}{cat[1:]}", "", "| § | case (the issue's words) | handled | tests |",
                  "|---|---|---|---|"]
        lines += [f"| {c.section} | {c.text} | {'yes' if ok else '**NO**'} | {'<br>'.join(cells)} |"
                  for c, ok, cells in rows]
        lines.append("")
    problems = [p for _, ok, _, ps in judged if not ok for p in ps]
    if problems:
        lines += ["## Not handled", "", *(f"- {p}" for p in dict.fromkeys(problems)), ""]
    lines += ["## Peak RSS of `autoseg predict` by image size", "", f"Source: {mem_source}.", "", *mem_lines, ""]
    targets = [(f"every case handled: {handled} / {len(judged)}", handled == len(judged))]
    if mem_ok is not None:
        targets.append(("predict's peak RSS flat across sizes, <= 1 GB (bench_memory's targets, rerun above)",
                        mem_ok))
    lines += ["## Targets", "", *(f"- {'PASS' if ok else 'FAIL'}: {name}" for name, ok in targets)]
    if mem_ok is None:
        lines.append("- predict's peak RSS: judged by the quoted run's own targets above (rerun with --memory)")

    text = "\n".join(lines) + "\n"
    print(text)
    from benchmarks import write_results  # it loads autoseg: after the run, so nothing of it loads while tests run

    write_results(args.out, text)
    print(f"wrote {args.out}")
    return 0 if all(ok for _, ok in targets) else 1


if __name__ == "__main__":
    sys.exit(main())
