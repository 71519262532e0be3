"""The LPCVC 2025 Track 3 score of a model, an ONNX file or saved predictions: `lpcv-depth evaluate`. Every option: `python evaluation/score.py --help` or docs/evaluate.md."""

import sys

from lpcv_depth.cli import script_main

if __name__ == "__main__":
    sys.exit(script_main("evaluate", __file__))
