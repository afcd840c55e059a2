"""The original Video-Infinity entry point: ``python inference.py --config examples/config.json``."""

import sys

try:
    from video_infinity.cli import main
except ImportError:  # run from a checkout that was not pip-installed
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))
    from video_infinity.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
