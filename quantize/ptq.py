"""INT8 post-training quantization with AIMET, verified against the float ONNX: `lpcv-depth ptq`. Every option: `python quantize/ptq.py --help` or docs/ptq.md."""

import sys

from lpcv_depth.cli import script_main

if __name__ == "__main__":
    sys.exit(script_main("ptq", __file__))
