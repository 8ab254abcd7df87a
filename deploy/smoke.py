"""Smoke check of a running server, from a checkout: `python deploy/smoke.py URL [--api-key K]`.

The check itself lives in the installed package (`clients.python.smoke`), so the same thing runs as
`vita-duplex smoke URL` inside the Docker image.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clients.cli import espeak_speaker
from clients.python.smoke import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:], speaker=espeak_speaker))
