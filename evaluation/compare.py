"""fp32 against int8, side by side: `lpcv-depth compare`. Every option: `python evaluation/compare.py --help` or docs/compare.md."""

import sys

from lpcv_depth.cli import script_main

if __name__ == "__main__":
    sys.exit(script_main("compare", __file__))
