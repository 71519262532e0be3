"""The int8 model on the local QNN HTP emulator: NPU coverage and numerics: `lpcv-depth htp-check`. Every option: `python quantize/htp_check.py --help` or docs/htp-check.md."""

import sys

from lpcv_depth.cli import script_main

if __name__ == "__main__":
    sys.exit(script_main("htp-check", __file__))
