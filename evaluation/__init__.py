"""Evaluation stage: the LPCVC 2025 Track 3 score of a model, an ONNX file or saved predictions, offline.

The metric itself lives in lpcv_depth.track3_metric and the datasets in lpcv_depth.rgbd, so later
stages (e.g. int8 against fp32) can score without this stage.
"""

from evaluation.score import EvaluateConfig, EvaluateResult, evaluate

__all__ = ["EvaluateConfig", "EvaluateResult", "evaluate"]
