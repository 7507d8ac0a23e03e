"""Standalone stdlib-only server scripts that the cluster runs by path inside pod namespaces."""

from pathlib import Path

PROGRAMS_DIR = Path(__file__).resolve().parent
UDP_ECHO = PROGRAMS_DIR / "udp_echo.py"
WHOAMI = PROGRAMS_DIR / "whoami.py"
