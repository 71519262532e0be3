"""Label-free quantization-aware training of a ptq folder's int8 model: `lpcv-depth qat`. Every option: `python quantize/qat.py --help` or docs/qat.md."""

import sys

from lpcv_depth.cli import script_main

if __name__ == "__main__":
    sys.exit(script_main("qat", __file__))
