"""Standalone stdlib-only scripts that the cluster runs by path inside its namespaces."""

import sys
from pathlib import Path

PROGRAMS_DIR = Path(__file__).resolve().parent
PYTHON = sys.executable or "/usr/bin/python3"
"""The interpreter that runs them."""
UDP_ECHO = PROGRAMS_DIR / "udp_echo.py"
WHOAMI = PROGRAMS_DIR / "whoami.py"
SOCKET_MAKER = PROGRAMS_DIR / "socket_maker.py"
