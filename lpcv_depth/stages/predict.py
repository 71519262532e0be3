"""See what a model sees: its depth on your own photos and videos, from any model the pipeline makes.

    lpcv-depth predict photo.jpg --model fastdepth --weights ../shared/weights/fastdepth/fast_depth_224.tflite
    lpcv-depth predict my_photos/ --onnx build/fastdepth/export/model.onnx --ptq build/fastdepth/ptq-w8a8
    lpcv-depth predict 'shots/*.jpg' --ptq build/fastdepth/ptq-w8a8 --htp build/fastdepth/ptq-w8a8
    lpcv-depth predict walk.mp4 --onnx build/fastdepth/export/model.onnx --every 5 --max-frames 100

INPUT: photos, folders of photos, globs, or videos (mp4, mov, avi; the `video` extra). Each photo
and frame is prepared exactly as the stages prepare theirs (images.prepare_contract_image).
Sources, any number (one column each, in this order): --model NAME --weights W (torch), --onnx FILE
(fp32 or QDQ), --ptq DIR (its int8 QDQ model), --htp DIR (a ptq folder's model on the local HTP
emulator; the `qnn` extra), --predictions DIR (saved outputs, e.g. a hub folder's device_outputs/).
Exactly two sources add a column with their absolute difference after median scaling.

Writes OUT/<photo>.png (RGB | each source | difference), OUT/<video>/<frame>.png and OUT/<video>.mp4,
with --save-npy OUT/npy/<source>/<name>.npy, and manifest.json (default OUT: build/predict/<name>).
More: docs/predict.md.
"""

from __future__ import annotations

import functools
import glob
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lpcv_depth.backends.qnn import HTP_ARCHS, run_killable
from lpcv_depth.errors import ConfigError, LpcvError
from lpcv_depth.images import IMAGE_SUFFIXES, list_images, load_contract_image
from lpcv_depth.manifest import config_as_dict, read_manifest, sha256_file, sha256_of_files, write_manifest
from lpcv_depth.options import inherit, option
from lpcv_depth.results import PredictResults, PredictSource, PredictVideo
from lpcv_depth.stage import StageDefinition, StageLog, StagingDir, display_path
from lpcv_depth.stages.evaluate import EvaluateConfig
from lpcv_depth.stages.export import weights_path
from lpcv_depth.stages.htp_check import HtpCheckConfig, _clean_after_kill
from lpcv_depth.stages.predict_sources import Source, check_same_model, identify_sources, open_sources
from lpcv_depth.video import VIDEO_SUFFIXES
from lpcv_depth.workspace import build_dir

__all__ = ["PredictConfig", "PredictOutput", "run_predict", "DEFINITION", "STAGE"]

STAGE = "predict"
NPY_FOLDER = "npy"
# The shared colour range of a row: these percentiles of every source's median-scaled depth, so that
# a few extreme pixels do not wash the picture out; the difference column's top likewise.
COLOUR_PERCENTILES = (2.0, 98.0)
DIFF_PERCENTILE = 99.0
_GLOB_CHARACTERS = frozenset("*?[")


class InputError(LpcvError):
    """An INPUT of predict cannot be used (missing, empty, not a photo or a video)."""


def _paths(values) -> tuple[Path, ...]:
    return tuple(Path(value) for value in values or ())


@dataclass(frozen=True)
class PredictConfig:
    """What to run (INPUT photos or videos) through which sources, and where the pictures go."""

    input: tuple[Path, ...] = option(help="photos, folders of photos, globs ('shots/*.jpg') or videos (mp4, mov, "
                                          "avi)", positional=True, metavar="INPUT")
    model: str | None = inherit(EvaluateConfig, "model")
    weights: str | None = inherit(EvaluateConfig, "weights")
    output: str = inherit(EvaluateConfig, "output")
    onnx: tuple[Path, ...] = option((), help="source: an ONNX file (fp32 or int8 QDQ), run with ONNX Runtime; "
                                             "repeat for several", repeatable=True, metavar="FILE")
    ptq: tuple[Path, ...] = option((), help="source: a ptq stage folder (its int8 model_qdq.onnx, checked against its "
                                            "manifest), run with ONNX Runtime; repeatable", repeatable=True,
                                   metavar="DIR")
    htp: tuple[Path, ...] = option((), help="source: a ptq stage folder whose int8 model runs on the local HTP "
                                            "emulator (the qnn extra; host emulation, slow); repeatable",
                                   repeatable=True, metavar="DIR")
    predictions: tuple[Path, ...] = option((), help="source: saved outputs, <photo name>.npy of shape (1,1,480,640) "
                                                    "(a hub stage folder: its device_outputs/); repeatable",
                                           repeatable=True, metavar="DIR")
    every: int = option(1, help="videos: every N-th frame")
    max_frames: int | None = option(None, help="videos: at most N frames of each (after --every)")
    save_npy: bool = option(False, help="also save each source's raw (1,1,480,640) output as .npy")
    soc_model: str = inherit(HtpCheckConfig, "soc_model")
    htp_arch: str = inherit(HtpCheckConfig, "htp_arch")
    threads: int | None = inherit(EvaluateConfig, "threads",
                                  help="CPU threads of the torch and ONNX Runtime sources (default: all cores)")
    name: str | None = option(None, help="output folder name under build/predict/ (default: the first input's name)")
    out: Path | None = option(None, help="output folder (default: build/predict/<name> in the workspace)")

    def __post_init__(self):
        for name in ("input", "onnx", "ptq", "htp", "predictions"):
            object.__setattr__(self, name, _paths(getattr(self, name)))
        if not self.input:
            raise ConfigError("no INPUT given", hint="pass photos, folders, globs or videos: lpcv-depth predict IMG...")
        if self.source_count == 0:
            raise ConfigError("no source given: nothing to predict with",
                              hint="pass --model NAME --weights W, --onnx FILE, --ptq DIR, --htp DIR or --predictions DIR")
        if self.every < 1:
            raise ConfigError(f"every must be >= 1, got {self.every}", hint="pass --every 1 for every frame")
        if self.max_frames is not None and self.max_frames < 1:
            raise ConfigError(f"max_frames must be >= 1, got {self.max_frames}",
                              hint="leave --max-frames out for every frame")
        if self.htp_arch not in HTP_ARCHS:
            raise ConfigError(f"htp_arch must be one of {HTP_ARCHS}, got {self.htp_arch!r}",
                              hint="the Snapdragon 8 Gen 3 (Galaxy S24) is 75")
        if self.name is not None and (not self.name or "/" in self.name or self.name in (".", "..")):
            raise ConfigError(f"name must be a plain folder name, got {self.name!r}", hint="use --out for a path")
        if self.model is not None:
            from lpcv_depth.models import canonical_model  # imports torch: only for a torch source

            object.__setattr__(self, "model", canonical_model(self.model))

    @property
    def source_count(self) -> int:
        return (self.model is not None) + len(self.onnx) + len(self.ptq) + len(self.htp) + len(self.predictions)

    @property
    def weights_file(self) -> Path | None:
        """The local weights file, when --model runs with one (--out must never replace it)."""
        return weights_path(self.weights) if self.model is not None else None

    @property
    def destination(self) -> Path:
        if self.out is not None:
            return Path(self.out)
        first = Path(self.input[0])
        name = self.name or (first.stem if first.suffix else first.name) or "predict"
        if any(c in name for c in _GLOB_CHARACTERS):
            name = Path(first.parent).name or "glob"
        return build_dir("predict", name)

    def as_dict(self) -> dict:
        return config_as_dict(self)


@dataclass(frozen=True)
class PredictOutput:
    out_dir: Path
    results: PredictResults
    manifest: dict
    config: PredictConfig


# ---------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class _Item:
    """One photo or one video of INPUT; `key` names its outputs (a photo's path below its folder)."""

    kind: str  # photo | video
    path: Path
    key: str
    root: Path  # the folder it was found in (photos hash relative to it)


def _expand(value: Path) -> list[_Item]:
    text = os.fspath(value)
    if not value.exists() and _GLOB_CHARACTERS & set(text):
        matches = sorted(Path(p) for p in glob.glob(text, recursive=True))
        files = [p for p in matches if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES]
        if not files:
            raise InputError(f"the pattern {text!r} matches no photo or video",
                             hint="check the pattern (quote it so the shell leaves it to predict), e.g. 'shots/*.jpg'")
        return [_file_item(p, p.parent) for p in files]
    if value.is_dir():
        files = list_images(value)
        if not files:
            raise InputError(f"the folder {value} holds no JPG/PNG photo",
                             hint="pass a folder with .jpg/.png photos (subfolders count), or the files themselves")
        return [_Item("photo", p, p.relative_to(value).with_suffix("").as_posix(), value) for p in files]
    if value.is_file():
        return [_file_item(value, value.parent)]
    raise InputError(f"INPUT not found: {value}", hint="pass existing photos, folders, globs or videos")


def _file_item(path: Path, root: Path) -> _Item:
    suffix = path.suffix.lower()
    if suffix in VIDEO_SUFFIXES:
        return _Item("video", path, path.stem, root)
    if suffix not in IMAGE_SUFFIXES:
        raise InputError(f"{path} is neither a photo ({', '.join(sorted(IMAGE_SUFFIXES))}) nor a video "
                         f"({', '.join(sorted(VIDEO_SUFFIXES))})", hint="convert it, or leave it out")
    return _Item("photo", path, path.stem, root)


def _discover(config: PredictConfig, log: StageLog) -> list[_Item]:
    with log.step("inputs") as step:
        items = [item for value in config.input for item in _expand(Path(value))]
        keys = [item.key for item in items]
        clashing = sorted({key for key in keys if keys.count(key) > 1})
        if clashing:
            raise InputError(f"two inputs would write the same output name: {', '.join(clashing[:5])}",
                             hint="pass their common folder instead (names then keep their subfolders), or rename one")
        photos = sum(item.kind == "photo" for item in items)
        step.detail = f"{photos} photo(s), {len(items) - photos} video(s)"
    return items


def _probe_videos(items: list[_Item], log: StageLog) -> dict[Path, object]:
    """Each video's codec and frame rate, checked before any source loads (an unsupported codec is refused)."""
    videos = [item for item in items if item.kind == "video"]
    if not videos:
        return {}
    from lpcv_depth.video import probe_video

    with log.step("probe-videos") as step:
        infos = {item.path: probe_video(item.path) for item in videos}
        step.detail = "; ".join(f"{p.name}: {i.codec} {i.width}x{i.height} {float(i.fps):.3g} fps"
                                for p, i in infos.items())
    return infos


def _inputs_record(items: list[_Item], sources: list[Source]) -> dict:
    photos = [item for item in items if item.kind == "photo"]
    return {"photos": {"files": [os.fspath(item.path) for item in photos],
                       "sha256": sha256_of_files([item.path for item in photos])} if photos else None,
            "videos": {os.fspath(item.path): sha256_file(item.path) for item in items if item.kind == "video"},
            "sources": [source.describe() for source in sources]}


# ---------------------------------------------------------------------------------------------
# The run


def run_predict(config: PredictConfig, log: StageLog | None = None) -> PredictOutput:
    """Every input through every source, one picture per photo or frame. With --htp the whole run goes
    to a child process that Ctrl+C kills at once (the emulator's native calls run for seconds)."""
    log = log or StageLog(STAGE)
    if config.htp:
        return run_killable(_predict, log, config, on_kill=functools.partial(_clean_after_kill, config.destination))
    return _predict(config, log)


def _predict(config: PredictConfig, log: StageLog) -> PredictOutput:
    items = _discover(config, log)
    with log.step("sources") as step:
        sources = identify_sources(config)
        check_same_model(sources)
        step.detail = ", ".join(source.label for source in sources)
    videos = _probe_videos(items, log)
    open_sources(sources, config, log)
    # The folders given as INPUT too: an --out inside one would land among the photos.
    folders = [Path(value) for value in config.input if Path(value).is_dir()]
    inputs = [*folders, *(item.path for item in items), *(source.path for source in sources), config.weights_file]
    with StagingDir(config.destination, stage=STAGE, inputs=inputs) as staging:
        writer = _RowWriter(config, sources, staging.path)
        with log.step("predict") as step:
            written_videos = _run_items(items, videos, writer, config)
            step.detail = writer.speed_line()
        results = writer.results(items, written_videos)
        write_manifest(staging.path, stage=STAGE, config=config.as_dict(), inputs=_inputs_record(items, sources),
                       outputs=writer.outputs, timings=log.timings, results=results)
    out = config.destination
    log.info(f"{results.frames} picture(s) -> {display_path(out)}; host {results.host_fps:.2f} frames/s end to end, "
             f"sources {results.model_fps:.2f} frames/s (this CPU{', HTP emulation' if config.htp else ''}; "
             "not device latency)")
    return PredictOutput(out, results, read_manifest(out), config)


def _progress(total: int | None):
    from tqdm import tqdm

    return tqdm(total=total, desc=STAGE, unit="frame", file=sys.stderr)


def _run_items(items: list[_Item], videos: dict, writer: "_RowWriter", config: PredictConfig) -> list[PredictVideo]:
    written = []
    total = sum(1 for item in items if item.kind == "photo") + sum(
        _expected_frames(info, config) or 0 for info in videos.values())
    with _progress(total or None) as bar:
        for item in items:
            if item.kind == "photo":
                writer.row(load_contract_image(item.path), item.key, f"{item.key}.png")
                bar.update()
            else:
                written.append(_run_video(item, videos[item.path], writer, config, bar))
    return written


def _expected_frames(info, config: PredictConfig) -> int | None:
    if info.frames is None:
        return config.max_frames
    count = -(-info.frames // config.every)
    return min(count, config.max_frames) if config.max_frames else count


def _run_video(item: _Item, info, writer: "_RowWriter", config: PredictConfig, bar) -> PredictVideo:
    from lpcv_depth.images import prepare_contract_image
    from lpcv_depth.video import VideoWriter, read_frames

    mp4 = writer.folder / f"{item.key}.mp4"
    frames = 0
    fps = info.fps / config.every
    with VideoWriter(mp4, fps) as video:
        for index, picture in read_frames(item.path, every=config.every, max_frames=config.max_frames):
            image = prepare_contract_image(picture, f"{item.path} frame {index}")
            video.write(writer.row(image, f"{item.key}/{index:06d}", f"{item.key}/{index:06d}.png"))
            frames += 1
            bar.update()
    if not frames:
        raise InputError(f"the video {item.path} yielded no frame", hint="pass a video with at least one frame")
    writer.outputs.append(mp4)
    return PredictVideo(source=os.fspath(item.path), codec=info.codec, frames=frames, fps=float(fps),
                        mp4=mp4.relative_to(writer.folder).as_posix())


@dataclass
class _RowWriter:
    """Runs every source on one prepared image and writes its picture (and .npy files)."""

    config: PredictConfig
    sources: list[Source]
    folder: Path
    outputs: list[Path] = field(default_factory=list)
    frames: int = 0
    model_s: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    def row(self, image: np.ndarray, key: str, png: str) -> np.ndarray:
        """The row's picture as (H, W, 3) uint8, saved as `png` under the output folder."""
        from lpcv_depth.visualize import sources_panel

        start = time.perf_counter()
        outputs = [source.predict(image, key) for source in self.sources]
        self.model_s += time.perf_counter() - start
        if self.config.save_npy:
            self._save_npy(outputs, key)
        columns, low, high, difference = row_maps([s.label for s in self.sources], outputs)
        panel = sources_panel(image, columns, low, high, difference, title=key)
        path = self.folder / png
        path.parent.mkdir(parents=True, exist_ok=True)
        panel.save(path)
        self.outputs.append(path)
        self.frames += 1
        return np.asarray(panel)

    def _save_npy(self, outputs: list[np.ndarray], key: str) -> None:
        for slug, output in zip(self.npy_folders, outputs):
            path = self.folder / NPY_FOLDER / slug / f"{key.replace('/', '__')}.npy"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, output)
            self.outputs.append(path)

    @functools.cached_property
    def npy_folders(self) -> list[str]:
        """One folder per source, named after its kind (onnx, onnx-2, ptq, ...): each is a --predictions DIR."""
        names: list[str] = []
        for source in self.sources:
            names.append(source.kind if source.kind not in names else
                         f"{source.kind}-{sum(n.split('-')[0] == source.kind for n in names) + 1}")
        return names

    @property
    def host_fps(self) -> float:
        return self.frames / max(time.perf_counter() - self.started, 1e-9)

    @property
    def model_fps(self) -> float:
        return self.frames / max(self.model_s, 1e-9)

    def speed_line(self) -> str:
        return (f"{self.frames} frame(s), host {self.host_fps:.2f} frames/s end to end, sources "
                f"{self.model_fps:.2f} frames/s")

    def results(self, items: list[_Item], videos: list[PredictVideo]) -> PredictResults:
        from lpcv_depth.visualize import SOURCES_COLORMAP

        npy = self.npy_folders if self.config.save_npy else [None] * len(self.sources)
        return PredictResults(
            sources=[PredictSource(label=s.label, kind=s.kind, model=s.model,
                                   npy=f"{NPY_FOLDER}/{folder}" if folder else None)
                     for s, folder in zip(self.sources, npy)],
            photos=sum(item.kind == "photo" for item in items), frames=self.frames,
            pngs=sum(path.suffix == ".png" for path in self.outputs), difference=len(self.sources) == 2,
            colormap=SOURCES_COLORMAP, host_fps=self.host_fps, model_fps=self.model_fps, videos=videos)


def median_scaled(reference: np.ndarray, other: np.ndarray) -> tuple[np.ndarray, float]:
    """`other` times median(reference) / median(other): the scale the Track 3 scorer applies against GT,
    here against the first source, so that a per-image scale does not read as a difference."""
    denominator = float(np.median(other))
    scale = float(np.median(reference)) / denominator if denominator > 0 else 1.0
    return other * scale, scale


def row_maps(labels: list[str], outputs: list[np.ndarray]) -> tuple[list[tuple[str, np.ndarray]], float, float,
                                                                   tuple[str, np.ndarray, float] | None]:
    """The row's depth columns (each median-scaled to the first source), their shared colour range, and
    with exactly two sources the |first - second| column with the top of its range."""
    maps = [output.reshape(output.shape[-2:]).astype(np.float64) for output in outputs]
    reference = maps[0]
    columns, scales = [], []
    for label, depth in zip(labels, maps):
        scaled, scale = median_scaled(reference, depth)
        scales.append(scale)
        columns.append((label if abs(scale - 1) < 5e-3 else f"{label} x{scale:.3g}", scaled))
    values = np.concatenate([depth.ravel() for _, depth in columns])
    low, high = (float(v) for v in np.percentile(values, COLOUR_PERCENTILES))
    if high <= low:
        low, high = float(values.min()), float(values.max()) + 1e-6
    difference = None
    if len(columns) == 2:
        diff = np.abs(columns[0][1] - columns[1][1])
        top = float(np.percentile(diff, DIFF_PERCENTILE)) or float(diff.max()) or 1e-6
        difference = ("|difference| after median scaling", diff, top)
    return columns, low, high, difference


def _next_hint(result: PredictOutput) -> str | None:
    first = next(iter(sorted(result.out_dir.rglob("*.png"))), None)
    return f"open {display_path(first)}" if first else None


DEFINITION = StageDefinition(name=STAGE, config=PredictConfig, run=run_predict, description=__doc__,
                             next_hint=_next_hint)
