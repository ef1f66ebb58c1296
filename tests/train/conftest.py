"""Put this folder on sys.path so tests (and their subprocesses) share resume_worker."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = str(Path(__file__).parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)
