"""The search's outputs: one row per trial read back from its stages' manifests, the results table
(JSON + CSV, rewritten as each trial ends), pareto.png, and report.md with the choice and the commands
that rebuild it."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from pathlib import Path
from typing import Any, Iterable

from lpcv_depth.errors import LpcvError
from lpcv_depth.files import write_text_atomically
from lpcv_depth.manifest import MANIFEST_NAME, Manifest
from lpcv_depth.report import cell, markdown_table
from lpcv_depth.results import (EvaluateResults, ExportResults, HtpCheckResults, HubResults, PtqResults,
                                QatResults, SearchResults, SearchTrial)
from lpcv_depth.schema import to_json
from lpcv_depth.options import config_to_argv
from lpcv_depth.stage import command_line, display_path
from lpcv_depth.workspace import build_dir

__all__ = ["latency_line", "trial_row", "write_table", "choose", "draw_pareto", "report_markdown", "rebuild_commands",
           "LATENCY", "GMACS"]

LATENCY = "s24_latency_ms"
GMACS = "gmacs"
RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
PARETO = "pareto.png"
REPORT = "report.md"


def _results(folder: Path | None, stage: str, kind: type) -> Any | None:
    """A finished stage's typed results, or None where it has not run (or left no valid output)."""
    if folder is None or not (folder / MANIFEST_NAME).is_file():
        return None
    try:
        return Manifest.read(folder, stage=stage, verify=False).results_as(kind)
    except LpcvError:
        return None


def _fscore(results: EvaluateResults | None) -> float | None:
    from lpcv_depth.track3_metric import FSCORE

    if results is None or not results.overall.scored:
        return None
    return results.overall.metrics[FSCORE]


def trial_row(trial, outcome: dict | None, hub_outcome: dict | None = None) -> SearchTrial:
    """Everything measured about a trial, from its folders; `outcome` is how its last run ended."""
    from lpcv_depth.track3_metric import FSCORE

    export_dir, ptq_dir, int8_step = trial.export.steps[0].folder, trial.local.folder / "ptq", trial.int8_step
    export = _results(export_dir, "export", ExportResults)
    fp32 = _results(trial.export.steps[1].folder, "evaluate", EvaluateResults)
    ptq = _results(ptq_dir, "ptq", PtqResults)
    qat = _results(int8_step.folder, "qat", QatResults) if int8_step.stage == "qat" else None
    int8_model = qat if int8_step.stage == "qat" else ptq  # what eval-int8, htp-check and hub took
    int8 = _results(trial.local.folder / "eval-int8", "evaluate", EvaluateResults)
    htp_dir = trial.local.folder / "htp-check"
    htp = _results(htp_dir, "htp-check", HtpCheckResults) if any(s.name == "htp-check" for s in trial.local.steps) else None
    hub_dir = trial.local.folder / "hub"
    hub = _results(hub_dir, "hub", HubResults) if trial.hub is not None else None
    outcome = outcome or {}
    fscore_fp32, fscore_int8 = _fscore(fp32), _fscore(int8)
    row = SearchTrial(
        trial=trial.name, input_size=f"{trial.size[0]}x{trial.size[1]}", preset=trial.preset,
        calibration_scheme=trial.calibration_scheme, output_tail_bits=trial.output_tail_bits,
        status=outcome.get("status", "pending"), error=outcome.get("error"), failed_step=outcome.get("failed_step"),
        seconds=outcome.get("seconds"), reused=outcome.get("reused", False), worker=outcome.get("worker"),
        gmacs=export.macs / 1e9 if export else None, params_m=export.params / 1e6 if export else None,
        fscore_fp32=fscore_fp32, fscore_int8=fscore_int8,
        fscore_drop=fscore_fp32 - fscore_int8 if fscore_fp32 is not None and fscore_int8 is not None else None,
        abs_rel_int8=int8.overall.metrics.get("abs_rel") if int8 and int8.overall.scored else None,
        sqnr_db=int8_model.int8_vs_fp32.sqnr_db if int8_model else None, int8_stage=int8_step.stage,
        ptq_sqnr_db=ptq.int8_vs_fp32.sqnr_db if ptq and int8_step.stage == "qat" else None,
        htp_full=htp.coverage.full_htp if htp else None, htp_cpu_nodes=htp.coverage.cpu_nodes if htp else None,
        htp_fscore_int8=(htp.ground_truth.overall["int8_htp"][FSCORE]
                         if htp and htp.ground_truth and htp.ground_truth.frames else None),
        export_dir=os.fspath(export_dir), ptq_dir=os.fspath(ptq_dir) if ptq else None,
        qat_dir=os.fspath(int8_step.folder) if qat else None,
        eval_dir=os.fspath(trial.local.folder / "eval-int8") if int8 else None,
        htp_check_dir=os.fspath(htp_dir) if htp else None, log=os.fspath(trial.local.folder / "log.txt"))
    return _with_hub(row, trial, hub, hub_outcome)


def _with_hub(row: SearchTrial, trial, hub: HubResults | None, outcome: dict | None) -> SearchTrial:
    if trial.hub is None:
        return row
    hub_dir = trial.local.folder / "hub"
    jobs = _recorded_jobs(hub_dir)
    changes: dict[str, Any] = {"hub_compile_job": jobs.get("compile"), "hub_profile_job": jobs.get("profile"),
                               "hub_dir": os.fspath(hub_dir) if hub_dir.is_dir() else None}
    if outcome and outcome.get("status") == "failed":
        changes["hub_error"] = outcome.get("error")
    if hub is not None and hub.profile is not None:
        units = hub.profile.compute_units
        peak = hub.profile.peak_memory_bytes
        changes.update(s24_latency_ms=hub.profile.estimated_inference_time_ms, s24_npu_layers=units.get("NPU", 0),
                       s24_gpu_layers=units.get("GPU", 0), s24_cpu_layers=units.get("CPU", 0),
                       s24_peak_memory_mb=max(peak) / 2**20 if peak else None)
    return dataclasses.replace(row, **changes)


def _recorded_jobs(hub_dir: Path) -> dict[str, str]:
    """Job ids as hub_jobs.json holds them the moment they are submitted (also while a job runs)."""
    from lpcv_depth.stages.hub import STATE_NAME

    try:
        jobs = json.loads((hub_dir / STATE_NAME).read_text()).get("jobs", {})
    except (OSError, ValueError):
        return {}
    return {kind: record.get("job_id") for kind, record in jobs.items() if isinstance(record, dict)}


# --- the table ---------------------------------------------------------------------------------------

def write_table(root: Path, results: SearchResults) -> list[Path]:
    """results.json and results.csv, each replaced in one rename so a reader never sees half a table."""
    rows = [to_json(row) for row in results.trials]
    text = json.dumps(to_json(results), indent=2, allow_nan=False) + "\n"
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[f.name for f in dataclasses.fields(SearchTrial)])
    writer.writeheader()
    writer.writerows({key: "" if value is None else value for key, value in row.items()} for row in rows)
    return [write_text_atomically(root / RESULTS_JSON, text), write_text_atomically(root / RESULTS_CSV, buffer.getvalue())]


def latency_line(row) -> str:
    """A trial's S24 profile in one line of the search's log."""
    if row.s24_latency_ms is None:
        return "no profile"
    return (f"{row.s24_latency_ms:.1f} ms on the S24, layers NPU {row.s24_npu_layers} / GPU {row.s24_gpu_layers} / "
            f"CPU {row.s24_cpu_layers}, profile job {row.hub_profile_job}")


# --- the choice --------------------------------------------------------------------------------------

def latency_axis(rows: Iterable[SearchTrial]) -> str:
    """S24 latency where every finished trial has one, else GMACs for all: two axes are never mixed."""
    done = [r for r in rows if r.status == "done"]
    return LATENCY if done and all(r.s24_latency_ms is not None for r in done) else GMACS


def fully_on_npu(row: SearchTrial) -> bool | None:
    """Measured wherever possible: the S24 profile's layers, else the local HTP compile; None: unknown."""
    if row.s24_latency_ms is not None:
        return row.s24_cpu_layers == 0 and row.s24_gpu_layers == 0 and row.htp_full is not False
    return row.htp_full


def choose(rows: list[SearchTrial], budget_ms: float) -> tuple[SearchTrial | None, str]:
    """The best trial by int8 F-score among the finished, fully-NPU ones (within the budget when
    latency is measured), and why."""
    axis = latency_axis(rows)
    done = [r for r in rows if r.status == "done" and r.fscore_int8 is not None]
    on_npu = [r for r in done if fully_on_npu(r)]
    if axis == LATENCY:
        within = [r for r in on_npu if r.s24_latency_ms <= budget_ms]
        if not within:
            return None, (f"no finished trial runs fully on the NPU within {budget_ms:g} ms "
                          f"({len(on_npu)} fully on the NPU, {len(done)} finished)")
        best = max(within, key=lambda r: (r.fscore_int8, -r.s24_latency_ms))
        return best, (f"the best int8 F-score among the {len(within)} fully-NPU trial(s) within {budget_ms:g} ms "
                      "on the S24 (AI Hub profile)")
    if not on_npu:
        unknown = sum(1 for r in done if fully_on_npu(r) is None)
        why = "NPU coverage was not measured (no qnn extra, no AI Hub)" if unknown == len(done) and done else \
            "no finished trial is known to run fully on the NPU"
        return None, why
    best = max(on_npu, key=lambda r: (r.fscore_int8, -r.gmacs))
    return best, (f"the best int8 F-score among the {len(on_npu)} fully-NPU trial(s). S24 latency was NOT measured "
                  f"(no AI Hub profile), so the --budget-ms {budget_ms:g} ms could not be checked: GMACs rank the "
                  "trials by cost instead, and latency does not follow GMACs exactly (memory traffic, op support). "
                  "Profile the choice on AI Hub before submitting")


# --- pareto.png ---------------------------------------------------------------------------------------

def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (lower cost, higher F-score)."""
    front = []
    for i, (cost, score) in enumerate(points):
        if not any((c <= cost and s >= score) and (c < cost or s > score) for j, (c, s) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def draw_pareto(path: Path, rows: list[SearchTrial], budget_ms: float, model: str) -> Path | None:
    from lpcv_depth.visualize import _matplotlib

    axis = latency_axis(rows)
    plotted = [r for r in rows if r.status == "done" and r.fscore_int8 is not None and getattr(r, axis) is not None]
    if not plotted:
        return None
    _, Figure, FigureCanvasAgg = _matplotlib()
    figure = Figure(figsize=(7, 4.8), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    points = [(getattr(r, axis), r.fscore_int8) for r in plotted]
    for row, (x, y) in zip(plotted, points):
        npu = fully_on_npu(row)
        marker, colour = ("o", "tab:blue") if npu else ("x", "tab:red") if npu is False else ("s", "tab:gray")
        axes.scatter([x], [y], marker=marker, color=colour, s=40)
        axes.annotate(row.trial, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    front = pareto_front(points)
    axes.plot([points[i][0] for i in front], [points[i][1] for i in front], color="tab:blue", alpha=0.5, linewidth=1)
    if axis == LATENCY:
        axes.axvline(budget_ms, color="tab:red", linestyle="--", linewidth=1)
        axes.set_xlabel("S24 latency, ms (AI Hub profile)")
        axes.set_title(f"{model}: int8 F-score vs S24 latency", fontsize=10)
    else:
        axes.set_xlabel("GMACs per frame")
        axes.set_title(f"{model}: int8 F-score vs GMACs (S24 latency NOT measured: no AI Hub profile)", fontsize=10)
    axes.set_ylabel("int8 F-score @0.1 m vs ground truth")
    axes.grid(alpha=0.3)
    legend = [("o", "tab:blue", "fully on the NPU"), ("x", "tab:red", "CPU/GPU layers"), ("s", "tab:gray", "coverage not measured")]
    for marker, colour, label in legend:
        axes.scatter([], [], marker=marker, color=colour, label=label)
    axes.legend(fontsize=7, loc="lower right")
    FigureCanvasAgg(figure).print_png(os.fspath(path))
    return path


# --- report.md ----------------------------------------------------------------------------------------

def report_markdown(results: SearchResults, reason: str, commands: list[str], where: Path) -> str:
    rows = results.trials
    chosen = next((r for r in rows if r.trial == results.chosen), None)
    done = sum(r.status == "done" for r in rows)
    failed = [r for r in rows if r.status == "failed"]
    lines = [f"# lpcv-depth search: {results.model}", "",
             f"{len(rows)} trials: {done} done, {len(failed)} failed. Budget: {results.budget_ms:g} ms per frame "
             f"on the S24. Results: `{RESULTS_JSON}`, `{RESULTS_CSV}`, `{PARETO}` in {display_path(where)}.", ""]
    if chosen is None:
        lines += [f"**No trial chosen**: {reason}.", ""]
    else:
        int8 = "int8 F-score after qat" if chosen.int8_stage == "qat" else "int8 F-score"
        figures = [f"{int8} {chosen.fscore_int8:.2f} (fp32 {cell(chosen.fscore_fp32, '{:.2f}')})"]
        figures.append(f"{chosen.s24_latency_ms:.1f} ms on the S24" if chosen.s24_latency_ms is not None
                       else f"{chosen.gmacs:.2f} GMACs (latency not measured)")
        lines += [f"**Chosen: `{chosen.trial}`**: {', '.join(figures)}. Why: {reason}.", ""]
    lines += ["## Trials", "", _trials_table(rows), ""]
    if failed:
        lines += ["## Failed trials", ""]
        lines += [f"- `{r.trial}` ({r.failed_step or 'trial'}): {r.error.splitlines()[0] if r.error else '?'} "
                  f"(log: {display_path(r.log) if r.log else '-'})" for r in failed]
        lines.append("")
    if commands:
        lines += ["## Rebuild the chosen trial alone", "", "```", *commands, "```", ""]
    return "\n".join(lines)


def _trials_table(rows: list[SearchTrial]) -> str:
    def npu(row: SearchTrial) -> str:
        state = fully_on_npu(row)
        if state is None:
            return "?"
        if state:
            return "yes"
        return f"no ({row.htp_cpu_nodes or row.s24_cpu_layers or 0} CPU)"

    # With --qat, the int8 columns are the qat model's; which stage and the ptq start's SQNR say so.
    qat = any(r.int8_stage == "qat" for r in rows)
    return markdown_table(
        ["trial", "status", "GMACs", "F fp32", "F int8", "drop", "SQNR dB",
         *(["int8 from", "ptq SQNR dB"] if qat else []), "fully NPU", "HTP F int8", "S24 ms", "peak MB"],
        [[r.trial, r.status + (" (reused)" if r.reused else ""), cell(r.gmacs, "{:.2f}"), cell(r.fscore_fp32, "{:.2f}"),
          cell(r.fscore_int8, "{:.2f}"), cell(r.fscore_drop, "{:.2f}"), cell(r.sqnr_db),
          *([r.int8_stage, cell(r.ptq_sqnr_db)] if qat else []), npu(r),
          cell(r.htp_fscore_int8, "{:.2f}"), cell(r.s24_latency_ms), cell(r.s24_peak_memory_mb, "{:.0f}")]
         for r in rows], align="llrrrrr" + ("lr" if qat else "") + "lrrr")


def rebuild_commands(config, trial) -> list[str]:
    """The stage commands that rebuild this one trial by itself, into build/<model folder>/<trial>/: the
    configs the trial ran with, its folders moved there."""
    alone = os.fspath(build_dir(config.model_folder(config.model), trial.name))
    moved = {os.fspath(trial.export.folder): alone, os.fspath(trial.local.folder): alone}

    def shown(arg: str) -> str:
        for old, new in moved.items():
            if arg == old or arg.startswith(old + os.sep):
                arg = new + arg[len(old):]
        return display_path(arg) if os.path.isabs(arg) else arg

    steps = [*trial.export.steps, *trial.local.steps, *(trial.hub.steps if trial.hub else ())]
    return [command_line(step.stage, *[shown(arg) for arg in config_to_argv(step.config)]) for step in steps]
