"""The whole pipeline in one command: export -> ptq [-> qat] -> htp-check -> hub -> compare.

    lpcv-depth run --model fastdepth --weights default
    lpcv-depth run --model depth_anything_v2_vits --eval-data ../shared/data/rgbd --preset w8a16
    lpcv-depth run --model fastdepth --weights default --ptq-args "--holdout 4 --no-cle" --force ptq
    lpcv-depth run --onnx my_net.onnx --wrap --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225
    lpcv-depth run --model fastdepth --weights default --qat --qat-args "--epochs 3"

htp-check runs where the qnn extra is installed, hub where an AI Hub token is configured (both
can be forced on or off); with --qat, the ptq model is fine-tuned and the later stages take the qat
folder. A stage whose output is up to date (same config, same inputs, outputs
intact) is skipped; `--force STAGE` redoes it and everything after it. Any stage option can be
passed on with --<stage>-args "...". Writes under OUT (default build/<model>/), with
`pipeline.json` recording what each stage was run from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lpcv_depth.errors import ConfigError
from lpcv_depth.files import write_text_atomically
from lpcv_depth.manifest import Manifest, config_as_dict
from lpcv_depth.options import inherit, option
from lpcv_depth.report import markdown_table
from lpcv_depth.results import INT8_STAGES, int8_results_type
from lpcv_depth.runner import (AUTO_ON_OFF, PassedOnArgs, Step, backend_wanted, check_input_folders, check_qat_args,
                               check_stage_args, command_inputs, check_steps, check_output_root, create_output_root,
                               qat_step, run_step, stage_args_option)
from lpcv_depth.stage import StageDefinition, StageLog, command_line, display_path
from lpcv_depth.stages.evaluate import EvaluateConfig
from lpcv_depth.stages.export import ExportConfig, OnnxFileOptions
from lpcv_depth.stages.ptq import PtqConfig
from lpcv_depth.workspace import build_dir, in_workspace

__all__ = ["RunConfig", "RunOutput", "StageOutcome", "run_pipeline", "plan_steps", "PIPELINE_STAGES"]

STAGE = "run"
PIPELINE_STAGES = ("export", "ptq", "qat", "htp-check", "hub", "compare")
STATE_NAME = "pipeline.json"


@dataclass(frozen=True)
class RunConfig(PassedOnArgs, OnnxFileOptions):
    model: str = inherit(ExportConfig, "model")
    weights: str | None = inherit(ExportConfig, "weights")
    input_size: tuple[int, int] | None = inherit(ExportConfig, "input_size")
    calib: Path = inherit(PtqConfig, "calib")
    preset: str = inherit(PtqConfig, "preset")
    eval_data: Path | None = inherit(PtqConfig, "eval_data",
                                     help="RGB-D set(s): F-scores against ground truth in ptq, htp-check and hub")
    median: str = inherit(EvaluateConfig, "median")
    htp_check: str = option("auto", choices=AUTO_ON_OFF,
                            help="run the local HTP check: auto = where the qnn extra is installed")
    hub: str = option("auto", choices=AUTO_ON_OFF, help="run on AI Hub: auto = where an API token is configured")
    max_frames: int | None = option(None, help="at most N frames for the HTP emulation and the phone")
    qat: bool = option(False, help="fine-tune the int8 model with the qat stage; htp-check, hub and compare then take "
                                   "the qat folder")
    qat_args: str = stage_args_option("qat")
    force: tuple[str, ...] = option((), choices=(*PIPELINE_STAGES, "all"), repeatable=True,
                                    help="redo STAGE (and what follows) even if up to date; repeatable")
    out: Path | None = option(None, help="output folder (default: build/<model>)")

    def __post_init__(self):
        export = self.export_config(model=self.model, weights=self.weights, input_size=self.input_size)
        object.__setattr__(self, "model", export.model)  # a file reference, with its path made absolute
        object.__setattr__(self, "onnx", export.onnx)
        check_input_folders(self.calib, self.eval_data)
        if self.max_frames is not None and self.max_frames < 1:
            raise ConfigError(f"max_frames must be >= 1, got {self.max_frames}",
                              hint="leave --max-frames out to use every frame")
        check_stage_args(self)
        check_qat_args(self)

    @property
    def destination(self) -> Path:
        return Path(self.out) if self.out is not None else build_dir(self.model_folder(self.model))

    def forced(self, stage: str) -> bool:
        return "all" in self.force or stage in self.force

    def as_dict(self) -> dict:
        return config_as_dict(self)


@dataclass(frozen=True)
class StageOutcome:
    stage: str
    status: str  # "ran", "up to date", "skipped"
    folder: Path | None
    seconds: float = 0.0
    reason: str = ""


@dataclass(frozen=True)
class RunOutput:
    """What a finished run of lpcv-depth run hands back: where its output folder is, and what it found."""

    out_dir: Path
    outcomes: list[StageOutcome]
    summary: str

    def outcome(self, stage: str) -> StageOutcome:
        return next(o for o in self.outcomes if o.stage == stage)


def run_pipeline(config: RunConfig, log: StageLog | None = None) -> RunOutput:
    """Check everything, then each stage in turn: skipped when up to date, run otherwise; then the summary."""
    log = log or StageLog(STAGE)
    skipped = _skipped_stages(config)
    root = config.destination.absolute()
    check_output_root(root, command=STAGE, marker=STATE_NAME, model=config.model, inputs=command_inputs(config))
    plan = plan_steps(config, root, skipped)
    check_steps(plan)
    create_output_root(root, command=STAGE, marker=STATE_NAME, model=config.model)
    outcomes, redo = [], False
    planned = {step.stage: step for step in plan}
    stages = [stage for stage in PIPELINE_STAGES if stage != "qat" or config.qat]
    for index, stage in enumerate(stages, 1):
        prefix = f"[{index}/{len(stages)}] {stage}"
        if stage in skipped:
            outcomes.append(StageOutcome(stage, "skipped", None, reason=skipped[stage]))
            log.info(f"{prefix} skipped: {skipped[stage]}")
            continue
        step = planned[stage]
        redo = redo or config.forced(stage)  # a redone stage redoes everything after it
        start = log.total_seconds
        status = run_step(step, root / STATE_NAME, StageLog(stage), force=redo,
                          on_start=lambda: log.info(f"{prefix} running ..."))
        if status == "up to date":
            log.info(f"{prefix} up to date, skipped -> {display_path(step.folder)}")
            outcomes.append(StageOutcome(stage, status, step.folder))
            continue
        seconds = log.total_seconds - start
        log.info(f"{prefix} ok {seconds:.1f}s -> {display_path(step.folder)}")
        outcomes.append(StageOutcome(stage, status, step.folder, seconds))
        redo = True
    summary = summarize(config, outcomes)
    write_text_atomically(root / "summary.md", summary)
    log.info(f"ok {log.total_seconds:.1f}s -> {display_path(root)}")
    for line in summary.splitlines():
        log.info(line)
    return RunOutput(root, outcomes, summary)


def _skipped_stages(config: RunConfig) -> dict[str, str]:
    """The stages this run leaves out, and why: decided before anything runs."""
    skipped = {}
    for stage, mode in (("htp-check", config.htp_check), ("hub", config.hub)):
        wanted, reason = backend_wanted(stage, mode)
        if not wanted:
            skipped[stage] = reason if mode == "off" else f"{reason}; --{stage} on to insist"
    return skipped


def plan_steps(config: RunConfig, root: Path, skipped: dict[str, str] | None = None) -> list[Step]:
    """The stages this run chains under `root`, each with the options `run` sets itself."""
    skipped = skipped or {}
    c = config
    eval_data = in_workspace(c.eval_data) if c.eval_data else None
    export = Step("export", "export", root / "export", {
        "model": c.model, "weights": c.weights, "input_size": c.input_size, "check_images": in_workspace(c.calib),
        **c.onnx_options()}, c.export_args)
    ptq = Step("ptq", "ptq", root / f"ptq-{c.preset}", {
        "calib": in_workspace(c.calib), "fp32": export.folder, "preset": c.preset, "eval_data": eval_data,
        "median": c.median}, c.ptq_args, {"export": export.folder})
    steps = [export, ptq]
    chained = {"export": export.folder, "ptq": ptq.folder}
    qat = qat_step(c, ptq, root / f"qat-{c.preset}")
    int8 = qat or ptq
    if qat is not None:
        steps.append(qat)
        chained["qat"] = qat.folder
    if "htp-check" not in skipped:
        htp = Step("htp-check", "htp-check", int8.folder / "htp-check", {
            "ptq": int8.folder, "eval_data": eval_data, "median": c.median, "max_frames": c.max_frames},
            c.htp_check_args, {int8.stage: int8.folder})
        steps.append(htp)
        chained["htp-check"] = htp.folder
    if "hub" not in skipped:
        hub = Step("hub", "hub", root / f"hub-{int8.stage}-{c.preset}", {
            "artifact": int8.folder, "eval_data": eval_data, "median": c.median, "max_frames": c.max_frames},
            c.hub_args, {int8.stage: int8.folder})
        steps.append(hub)
        chained["hub"] = hub.folder
    steps.append(Step("compare", "compare", root / "compare", {
        "fp32": export.folder, "int8": int8.folder, "htp_check": chained.get("htp-check"),
        "int8_hub": chained.get("hub")}, "", chained))
    return steps


def summarize(config: RunConfig, outcomes: list[StageOutcome]) -> str:
    """Where everything is, and the figures that decide a submission, from the typed results."""
    rows = [[o.stage, o.status + (f" ({o.seconds:.0f}s)" if o.status == "ran" else ""),
             display_path(o.folder) if o.folder else o.reason, _headline(o)] for o in outcomes]
    table = markdown_table(["stage", "status", "where", "figures"], rows)
    compare = next((o.folder for o in outcomes if o.stage == "compare"), None)
    tail = f"\nReport: {display_path(compare / 'compare.md')}\n" if compare else ""
    return f"# lpcv-depth run: {config.model}\n\n{table}{tail}"


def _headline(outcome: StageOutcome) -> str:
    if outcome.folder is None:
        return ""
    from lpcv_depth import results as r

    manifest = Manifest.read(outcome.folder, stage=outcome.stage, verify=False)
    if outcome.stage == "export":
        figures = manifest.results_as(r.ExportResults)
        return f"{figures.params / 1e6:.1f}M params, {figures.macs / 1e9:.2f} GMACs"
    if outcome.stage in INT8_STAGES:
        ptq = manifest.results_as(int8_results_type(outcome.stage))
        text = (f"int8 vs fp32 SQNR {ptq.int8_vs_fp32.sqnr_db:.1f} dB "
                f"({ptq.int8_vs_fp32.sqnr_db_scale_aligned:.1f} scale-aligned)")
        if ptq.ground_truth is not None:
            text += (f", F-score fp32 {ptq.ground_truth.fp32['fscore@0.1']:.2f} / "
                     f"int8 {ptq.ground_truth.int8['fscore@0.1']:.2f}")
        return text
    if outcome.stage == "htp-check":
        htp = manifest.results_as(r.HtpCheckResults)
        coverage = "fully on the HTP" if htp.coverage.full_htp else f"{htp.coverage.cpu_nodes} nodes on the CPU"
        return f"{coverage} (emulation)"
    if outcome.stage == "hub":
        hub = manifest.results_as(r.HubResults)
        return f"{hub.profile.estimated_inference_time_ms:.1f} ms on {hub.device}" if hub.profile else ""
    return ""


def _next_hint(result: RunOutput) -> str | None:
    ptq = next((o.folder for o in reversed(result.outcomes) if o.stage in INT8_STAGES and o.folder), None)
    hub = next((o for o in result.outcomes if o.stage == "hub"), None)
    if ptq is not None and hub is not None and hub.status == "skipped":
        return command_line("hub", display_path(ptq)) + "   (on a Galaxy S24, after qai-hub configure)"
    return None


DEFINITION = StageDefinition(name=STAGE, config=RunConfig, run=run_pipeline, description=__doc__,
                             next_hint=_next_hint)
