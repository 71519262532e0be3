"""The best Track 3 submission under a latency budget, searched over a grid on Ray: `lpcv-depth search`. Every option: `python quantize/search.py --help` or docs/search.md."""

import sys

from lpcv_depth.cli import script_main

if __name__ == "__main__":
    sys.exit(script_main("search", __file__))
