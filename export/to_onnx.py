"""Export a registered depth model, or your own ONNX file (--onnx), to a simplified, verified Track 3 ONNX: `lpcv-depth export`. Every option: `python export/to_onnx.py --help` or docs/export.md."""

import sys

from lpcv_depth.cli import script_main

if __name__ == "__main__":
    sys.exit(script_main("export", __file__))
