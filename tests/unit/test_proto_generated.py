"""The generated gRPC code in ebpflb/api/ is what `make proto` makes from proto/ today."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


def test_generated_code_is_not_stale(tmp_path: Path) -> None:
    subprocess.run(
        ["bash", str(REPO / "scripts/genproto.sh"), str(tmp_path)], check=True, capture_output=True
    )
    committed = REPO / "ebpflb/api/v1"
    fresh = tmp_path / "v1"
    names = sorted(p.name for p in fresh.iterdir() if p.suffix in (".py", ".pyi"))
    assert names == sorted(p.name for p in committed.iterdir() if p.suffix in (".py", ".pyi"))
    for name in names:
        assert (fresh / name).read_text() == (committed / name).read_text(), (
            f"ebpflb/api/v1/{name} is stale: run `make proto` and commit the result"
        )
