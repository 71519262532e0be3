"""Compile, profile and run on a Galaxy S24 through Qualcomm AI Hub: `lpcv-depth hub`. Every option: `python export/aihub.py --help` or docs/hub.md."""

import sys

from lpcv_depth.cli import script_main

if __name__ == "__main__":
    sys.exit(script_main("hub", __file__))
