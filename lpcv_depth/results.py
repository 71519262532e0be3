"""Typed, versioned stage results: the `results` of each stage's manifest.json.

Each stage writes one of these dataclasses (`write_manifest(results=...)`) and every reader takes
them back through `Manifest.read(folder, stage=...).results_as(Type)`, never through raw dict paths.
The figures other stages read are typed fields; stage-internal detail (op histograms, per-layer
tables) stays a plain `dict` field. docs/results.md describes every field; bump
`manifest.SCHEMA_VERSION` when one changes shape.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

__all__ = ["Metrics", "ExportResults", "Fidelity", "GroundTruthPair", "HostLatency", "PtqSizes", "PtqResults", "QatEpoch", "QatTraining", "QatResults", "INT8_STAGES", "int8_results_type", "Coverage",
           "ContextBinary", "OutputComparison", "EmulationTime", "Fp16Baseline", "HtpGroundTruth", "HtpCheckResults", "HubInput", "HubJobRecord", "HubShare", "HubContract", "HubCompile",
           "HubProfile", "HubHostFidelity", "HubGroundTruth", "HubInference", "HubResults", "EvaluateGroup", "SkippedFrame", "MetricTime", "EvaluateResults", "CompareColumn", "CompareFidelity", "ComparePanel", "CompareResults",
           "SearchTrial", "SearchResults", "PredictSource", "PredictVideo", "PredictResults"]

# Metric name -> value, as track3_metric names them ("fscore@0.1", "abs_rel", ...).
Metrics = dict[str, float]


@dataclass(frozen=True)
class ExportResults:
    """What the export stage measured: `results` of its manifest."""

    params: int
    macs: int
    weights: dict
    gelu_modules: int
    model: dict
    spec: dict
    check_images: dict
    nodes_exported: int
    nodes_simplified: int
    op_histogram: dict[str, int]
    contract: dict
    parity: dict
    onnx_bytes: int
    gelu_tanh_vs_exact: dict | None = None


@dataclass(frozen=True)
class Fidelity:
    """int8 against fp32 (both ONNX Runtime) on the held-out calibration images."""

    sqnr_db: float
    sqnr_db_scale_aligned: float
    max_abs_diff: float
    fscore_vs_fp32: float
    fscore_vs_fp32_per_image: list[float]
    holdout_images: int


@dataclass(frozen=True)
class GroundTruthPair:
    """fp32 and int8 scored against real ground truth by the evaluate stage."""

    fp32: Metrics
    int8: Metrics
    frames: int
    skipped: int
    fscore_drop: float


@dataclass(frozen=True)
class HostLatency:
    """ONNX Runtime on the host: a sanity figure, never the phone's latency."""

    fp32: float
    int8_qdq: float
    runs: int
    note: str


@dataclass(frozen=True)
class PtqSizes:
    fp32_onnx: int
    qdq_onnx: int
    aimet_onnx: int
    aimet_encodings: int


@dataclass(frozen=True)
class PtqResults:
    """What the ptq stage measured: `results` of its manifest (and the body of its report.json).

    techniques: what each float/rounding technique did, by name (the model's own rewrite, e.g.
    {"layer_scale_fold": {"folded": 24}}, then bn_fold, cle, output_tail, weights_kept_8bit, seq_mse when they ran).
    ablation (AdaRound/SeqMSE against nearest rounding) and mixed_precision (the mixed preset's
    per-layer sensitivity) are None when those did not run; ground_truth without --eval-data.
    backend: which AIMET route quantized the model (ptq --backend, resolved).
    device: where ptq's calibration, AdaRound and SeqMSE ran (ptq --device, resolved: cpu or cuda); a qat
    folder carries its ptq folder's (qat's own is training.device)."""

    model: str
    preset: str
    techniques: dict
    fp32_contract: dict
    calibration_analyzers: dict[str, int]
    preparation: dict
    qdq_vs_aimet_sim: dict
    int8_vs_fp32: Fidelity
    sizes_bytes: PtqSizes
    host_latency_ms: HostLatency | None  # None: not measured (--latency-runs 0)
    ground_truth: GroundTruthPair | None = None
    ablation: dict | None = None
    mixed_precision: dict | None = None
    # aimet-torch (a torch export), onnx2torch (an ONNX-file export through aimet-torch) or aimet-onnx.
    backend: str = "aimet-torch"
    # A folder written before ptq had --device ran on the CPU.
    device: str = "cpu"


@dataclass(frozen=True)
class QatEpoch:
    """One QAT epoch: its mean training loss and the AIMET sim's held-out SQNR vs fp32 after it,
    scale-aligned (what early stopping compares: the scorer ignores a per-image scale) and plain."""

    epoch: int
    loss: float
    holdout_sqnr_db: float
    holdout_sqnr_db_plain: float
    seconds: float


@dataclass(frozen=True)
class QatTraining:
    """How the qat stage fine-tuned: epoch 0 is the ptq start (no training), `best_epoch` the one kept;
    the held-out SQNRs are scale-aligned (QatEpoch)."""

    loss: str
    epochs_planned: int
    epochs_done: int
    best_epoch: int
    stopped_early: bool
    learned_encodings: bool
    device: str
    train_images: int
    lr: float
    batch_size: int
    start_holdout_sqnr_db: float
    best_holdout_sqnr_db: float
    history: list[QatEpoch]
    peak_rss_mb: float | None = None
    lr_schedule: str = "constant"
    augment: str = "none"
    photos: int | None = None  # before augmentation (train_images counts the mirrored copies too)
    ground_truth_frames: int = 0  # --train-data frames, trained on with their measured depth
    ground_truth_weight: float = 0.0


@dataclass(frozen=True)
class QatResults(PtqResults):
    """What the qat stage measured: ptq's results for the fine-tuned model (the same checks, so every
    stage that reads a ptq folder reads a qat folder), plus `ptq_int8_vs_fp32` (the ptq folder's own
    figures, the start), `training`, and `partial` (True when Ctrl+C stopped training: the folder
    holds the best checkpoint of the epochs done)."""

    ptq_int8_vs_fp32: Fidelity | None = None
    ptq_ground_truth: GroundTruthPair | None = None
    training: QatTraining | None = None
    partial: bool = False


# The stages whose folder holds an int8 model (QDQ ONNX + <model>.aimet/): htp-check, hub, compare and
# run take either.
INT8_STAGES = ("ptq", "qat")


def int8_results_type(stage: str) -> type:
    """The results type of an int8 stage's folder (ptq or qat): QatResults is a PtqResults."""
    return QatResults if stage == "qat" else PtqResults


@dataclass(frozen=True)
class Coverage:
    """Which nodes the HTP took (compiled with CPU fallback disabled, then enabled if refused)."""

    full_htp: bool
    htp_partitions: int
    htp_nodes: int
    htp_op_types: dict[str, int]
    cpu_nodes: int
    cpu_op_types: dict[str, int]
    cpu_node_names: list[str]
    refused: list[dict]
    no_fallback_error: str | None
    build_s: float


@dataclass(frozen=True)
class ContextBinary:
    onnx: str
    path: str
    bytes: int
    onnx_bytes: int
    sha256: str
    build_s: float
    reload_s: float
    htp_arch: str
    soc_model: str
    qnn_sdk_version: str
    full_htp: bool
    htp_partitions: int
    io: str
    build_note: str
    ai_hub: str


@dataclass(frozen=True)
class OutputComparison:
    """One output against a reference: SQNR, max abs diff and the Track 3 F-score with the reference
    as pseudo ground truth."""

    sqnr_db: float
    max_abs_diff: float
    fscore: float
    sqnr_db_scale_aligned: float | None = None
    frames: int | None = None
    fscore_per_image: list[float] | None = None


@dataclass(frozen=True)
class EmulationTime:
    """Seconds per frame of the HTP emulated on the host CPU: never the phone's latency."""

    frames: int
    mean_s_per_frame: float | None
    median_s_per_frame: float | None
    note: str


@dataclass(frozen=True)
class Fp16Baseline:
    """The fp32 model on the HTP in fp16: the float model the NPU would run."""

    full_htp: bool
    build_s: float
    vs_fp32: OutputComparison | None = None


@dataclass(frozen=True)
class HtpGroundTruth:
    """fp32 (CPU), int8 (CPU QDQ) and int8 (HTP) scored against RGB-D ground truth by the evaluate
    stage; `sets` maps a set to its frame count and each label's F-score."""

    frames_selected: int
    frames_total: int
    frames: int
    overall: dict[str, Metrics]
    sets: dict[str, dict]
    htp_minus_cpu_int8: float
    emulation_s_per_frame: float
    fscore_drop: float | None = None


@dataclass(frozen=True)
class HtpCheckResults:
    """The local HTP check: `target` (soc_model, htp_arch, device), `qnn` (versions), `model` (op
    counts of the QDQ graph); `numerics` maps "htp_vs_<reference>" (and "int8_cpu_vs_fp32") to a
    comparison on the held-out images; `emulation_time` maps "int8" / "fp16" to host seconds."""

    target: dict
    emulation_note: str
    warnings: list[str]
    qnn: dict
    model: dict
    coverage: Coverage
    emulation_time: dict[str, EmulationTime]
    numerics: dict[str, OutputComparison]
    context_binary: ContextBinary | None = None
    fp16_baseline: Fp16Baseline | None = None
    ground_truth: HtpGroundTruth | None = None


@dataclass(frozen=True)
class HubInput:
    """What the hub stage uploaded, and the host ONNX its device outputs are compared with."""

    kind: str  # export | ptq | onnx | aimet | qnn_context_binary
    upload: str
    precision: str  # fp32 | int8 | unknown
    label: str
    model_name: str | None
    source_dir: str | None  # the export / ptq / htp-check folder it came from
    host_reference: str | None
    sha256: str


@dataclass(frozen=True)
class HubJobRecord:
    job_id: str
    url: str
    status: str


@dataclass(frozen=True)
class HubShare:
    job_id: str
    kind: str
    emails: list[str]
    at: str  # when modify_sharing was called (on the first run that shared it)
    # True when hub_jobs.json showed the job already shared, so this run did not call modify_sharing again.
    already_shared: bool = False


@dataclass(frozen=True)
class HubContract:
    """The compiled model's inputs and outputs (as AI Hub records them) against the Track 3 contract:
    names, shapes, dtypes, and for quantized I/O whether scale and zero point cover the value range."""

    ok: bool
    problems: list[str]
    inputs: list[dict]
    outputs: list[dict]


@dataclass(frozen=True)
class HubCompile:
    job_id: str
    url: str
    # The whole string the compile job got: --target_runtime, the model's own options, the user's.
    options: str
    device: str
    target_model_id: str
    target_model: str
    bytes: int
    sha256: str
    # The part of `options` the model spec asks for (ModelSpec.hub_compile_options).
    model_options: str = ""
    # Whether `options` holds --quantize_io (--quantize-io is not applied to fp32 models).
    quantize_io: bool = False
    contract: HubContract | None = None


@dataclass(frozen=True)
class HubProfile:
    job_id: str
    url: str
    options: str
    estimated_inference_time_ms: float
    fps: float
    meets_target_fps: bool
    target_fps: float
    peak_memory_bytes: list[int] | None
    layers: int
    compute_units: dict[str, int]
    cpu_fallback: bool
    cpu_layer_types: dict[str, int]
    first_load_time_ms: float | None = None
    warm_load_time_ms: float | None = None
    inference_times_ms: dict | None = None


@dataclass(frozen=True)
class HubHostFidelity:
    """On-device outputs against ONNX Runtime on the host, same frames: the reference is pseudo ground
    truth for the F-score."""

    reference: str
    sqnr_db: float
    max_abs_diff: float
    fscore_vs_host: float
    fscore_vs_host_per_frame: list[float]


@dataclass(frozen=True)
class HubGroundTruth:
    """The evaluate stage on the device outputs (and the host outputs, when there is a host reference)."""

    frames: int
    skipped: int
    device: Metrics
    host: Metrics | None = None
    fscore_drop: float | None = None


@dataclass(frozen=True)
class HubInference:
    job_id: str
    url: str
    options: str
    dataset_id: str
    data: dict
    input_dtype: str
    outputs: str
    vs_host: HubHostFidelity | None = None
    ground_truth: HubGroundTruth | None = None
    # Where the input name and dtype the frames were sent in came from (compiled model, graph, hub record).
    io_source: str | None = None


@dataclass(frozen=True)
class HubResults:
    input: HubInput
    device: str
    runtime: str
    target_fps: float
    jobs: dict[str, HubJobRecord] = field(default_factory=dict)
    compile: HubCompile | None = None
    profile: HubProfile | None = None
    inference: HubInference | None = None
    share: HubShare | None = None
    # --qairt_version the profile and inference jobs of a context binary got (the QNN that built it).
    qairt_version: str | None = None


@dataclass(frozen=True)
class EvaluateGroup:
    """Means over the scored frames of one set, or of all sets (every frame counts once)."""

    frames: int
    scored: int
    skipped: int
    # Empty when no frame of the group could be scored.
    metrics: Metrics
    mean_points: float
    # Mean share of invalid GT pixels, and mean F@0.1 of the GT itself (holes filled): the ceiling.
    invalid_share: float | None = None
    ceiling_fscore: float | None = None
    # Scored frames whose prediction breaks the output contract (outside [0, 1], constant).
    out_of_contract: int = 0


@dataclass(frozen=True)
class SkippedFrame:
    set: str
    frame: str
    reason: str


@dataclass(frozen=True)
class MetricTime:
    """Seconds the Track 3 metric took per scored frame (the model's time excluded)."""

    mean: float
    max: float


@dataclass(frozen=True)
class EvaluateResults:
    """The evaluate stage's scores: `results` of its manifest, and the body of its summary.json."""

    overall: EvaluateGroup
    sets: dict[str, EvaluateGroup]
    skipped: list[SkippedFrame]
    metric_time_s: MetricTime
    median: str = "all"
    warnings: list[str] = field(default_factory=list)
    out_of_contract: list[SkippedFrame] = field(default_factory=list)


@dataclass(frozen=True)
class CompareColumn:
    """One model's figures in the comparison; None wherever nothing measured it."""

    source: str
    hub_run: str | None = None
    runtime: str | None = None
    compile_job_id: str | None = None
    profile_job_id: str | None = None
    device_latency_ms: float | None = None
    fps: float | None = None
    meets_target_fps: bool | None = None
    peak_memory_mb: list[float] | None = None
    layers: int | None = None
    npu_layers: int | None = None
    gpu_layers: int | None = None
    cpu_layers: int | None = None
    cpu_fallback: bool | None = None
    host_latency_ms: float | None = None
    onnx_bytes: int | None = None
    compiled_bytes: int | None = None
    aimet_bytes: int | None = None
    fscore_gt_host: float | None = None
    abs_rel_gt_host: float | None = None
    fscore_gt_device: float | None = None
    abs_rel_gt_device: float | None = None
    gt_frames_device: int | None = None
    device_vs_host_sqnr_db: float | None = None
    # From the local HTP check (emulation on this host, not the phone), when there is one. fp32:
    # the float model on the HTP in fp16 (coverage) and on ONNX Runtime's CPU (F-score vs GT).
    htp_full: bool | None = None
    htp_nodes: int | None = None
    htp_cpu_nodes: int | None = None
    htp_fscore_gt: float | None = None
    htp_gt_frames: int | None = None
    htp_fscore_vs_fp32: float | None = None
    context_binary_bytes: int | None = None


@dataclass(frozen=True)
class CompareFidelity:
    """int8 against fp32: on the host (the ptq stage's held-out images), on the phone (both hub runs'
    saved outputs) and through the local HTP emulation."""

    host_sqnr_db: float | None = None
    host_sqnr_db_scale_aligned: float | None = None
    host_fscore_vs_fp32: float | None = None
    host_holdout_images: int | None = None
    device: dict | None = None
    device_speedup: float | None = None
    htp_sqnr_db: float | None = None
    htp_fscore_vs_fp32: float | None = None


@dataclass(frozen=True)
class ComparePanel:
    """One panel of compare.png: bars (label -> value, measured ones only) and an optional target line."""

    title: str
    bars: dict[str, float]
    fmt: str = "{:.1f}"
    line: float | None = None
    line_label: str | None = None


@dataclass(frozen=True)
class CompareResults:
    model: str
    target_fps: float
    host_only: bool
    missing_hub_runs: list[str]
    models: dict[str, CompareColumn]
    int8_vs_fp32: CompareFidelity
    chart: list[ComparePanel] = field(default_factory=list)
    htp_check: str | None = None
    htp_check_note: str | None = None


@dataclass(frozen=True)
class SearchTrial:
    """One row of the search's results table (results.json / results.csv); None wherever that figure
    was not measured. `status`: done, failed or pending; `worker`: the Ray node and process (or
    "this process") of the trial's last run; the *_dir fields are the trial's stage folders.
    `int8_stage`: the stage whose model the int8 figures (F-score, SQNR, HTP, S24) are of: ptq, or qat
    with --qat, whose ptq start keeps its SQNR in `ptq_sqnr_db`."""

    trial: str
    input_size: str
    preset: str
    calibration_scheme: str
    output_tail_bits: int
    status: str
    error: str | None = None
    failed_step: str | None = None
    seconds: float | None = None
    reused: bool = False
    worker: str | None = None
    gmacs: float | None = None
    params_m: float | None = None
    fscore_fp32: float | None = None
    fscore_int8: float | None = None
    fscore_drop: float | None = None
    abs_rel_int8: float | None = None
    sqnr_db: float | None = None
    int8_stage: str = "ptq"
    ptq_sqnr_db: float | None = None
    htp_full: bool | None = None
    htp_cpu_nodes: int | None = None
    htp_fscore_int8: float | None = None
    s24_latency_ms: float | None = None
    s24_npu_layers: int | None = None
    s24_gpu_layers: int | None = None
    s24_cpu_layers: int | None = None
    s24_peak_memory_mb: float | None = None
    hub_compile_job: str | None = None
    hub_profile_job: str | None = None
    hub_error: str | None = None
    export_dir: str | None = None
    ptq_dir: str | None = None
    qat_dir: str | None = None
    eval_dir: str | None = None
    htp_check_dir: str | None = None
    hub_dir: str | None = None
    log: str | None = None


@dataclass(frozen=True)
class SearchResults:
    """The search: its grid, the axis its choice was made on (s24_latency_ms, or gmacs when latency was
    not measured), the chosen trial (None: no finished trial qualified) and every trial's row."""

    model: str
    grid: dict[str, list]
    budget_ms: float
    axis: str
    chosen: str | None
    trials: list[SearchTrial]


@dataclass(frozen=True)
class PredictSource:
    """One column of predict's rows: its label, kind (model, onnx, ptq, htp, predictions), the model its
    artifacts name (None: they do not say) and, with --save-npy, the folder of its raw outputs."""

    label: str
    kind: str
    model: str | None
    npy: str | None = None


@dataclass(frozen=True)
class PredictVideo:
    """A video predict ran on: frames read (every --every-th, at most --max-frames), the frame rate
    and the MP4 of its rows."""

    source: str
    codec: str
    frames: int
    fps: float
    mp4: str


@dataclass(frozen=True)
class PredictResults:
    """The predict command: its sources in column order, how many photos and video frames, and the
    host's speed: `host_fps` end to end (preparing, every source, drawing, writing), `model_fps` the
    sources' own time (host CPU or HTP emulation, not device latency)."""

    sources: list[PredictSource]
    photos: int
    frames: int
    pngs: int
    difference: bool
    colormap: str
    host_fps: float
    model_fps: float
    videos: list[PredictVideo] = field(default_factory=list)


def schema_markdown() -> str:
    """docs/results.md: every results dataclass with its fields (`python -m lpcv_depth.results`)."""
    import dataclasses
    import inspect
    import typing

    from lpcv_depth.manifest import SCHEMA_VERSION

    lines = ["# Stage results: the manifest schema", "",
             f"Schema version **{SCHEMA_VERSION}**. Every stage folder ends with a `manifest.json`:", "",
             "| key | what |", "|---|---|",
             "| `stage`, `schema_version`, `created` | which stage wrote it, under which schema, when (UTC) |",
             "| `config` | the stage's config: every option under its flag's name, plus `destination` |",
             "| `inputs` | what the stage read, with sha256 hashes |",
             "| `tool_versions` | python, torch, onnx, onnxruntime, aimet-torch, qai-hub, ... and the git commit |",
             "| `timings_s` | seconds per step |",
             "| `outputs` | every output file: `path`, `bytes`, `sha256` (checked by the next stage) |",
             "| `results` | the stage's typed results, below |",
             "| `source` | the lpcv_depth folder and git commit that ran |", "",
             "A stage reads another stage's folder with `Manifest.read(folder, stage=...)` (stage, schema "
             "version and output hashes checked) and its results with `.results_as(Type)`. A missing number "
             "is `null`. This page is generated from `lpcv_depth/results.py` "
             "(`python -m lpcv_depth.results > docs/results.md`); a test keeps them equal.", ""]
    stage_of = {"ExportResults": "export", "EvaluateResults": "evaluate", "PtqResults": "ptq", "QatResults": "qat",
                "HtpCheckResults": "htp-check", "HubResults": "hub", "CompareResults": "compare",
                "SearchResults": "search", "PredictResults": "predict"}
    module = sys.modules[__name__]
    for name in sorted((n for n in dir(module) if dataclasses.is_dataclass(getattr(module, n))
                        and getattr(module, n).__module__ == __name__),
                       key=lambda n: (n not in stage_of, list(stage_of).index(n) if n in stage_of else 0, n)):
        cls = getattr(module, name)
        title = f"## {name}" + (f" (`{stage_of[name]}` stage)" if name in stage_of else "")
        doc = inspect.getdoc(cls) or ""
        lines += [title, ""]
        if doc and not doc.startswith(f"{name}("):
            lines += [doc, ""]
        lines += ["| field | type | default |", "|---|---|---|"]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = ("" if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                       else repr(f.default) if f.default is not dataclasses.MISSING else "empty")
            kind = typing.Any if hints[f.name] is typing.Any else hints[f.name]
            shown = getattr(kind, "__name__", None) if not typing.get_args(kind) else None
            text = shown or str(kind)
            for prefix in ("typing.", f"{__name__}.", "__main__."):
                text = text.replace(prefix, "")
            lines.append(f"| `{f.name}` | `{text}` | {default} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(schema_markdown(), end="")
