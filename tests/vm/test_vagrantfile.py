"""`vagrant validate` of the Vagrantfile, where Debian's vagrant is installed (no VM is started)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.vm.target import REPO

pytestmark = pytest.mark.unit

# Settings of the developer's that would validate another Vagrantfile, keep
# state in the repo, or ask for a provider this machine may not have.
_DROPPED = (
    "VAGRANT_CWD",
    "VAGRANT_VAGRANTFILE",
    "VAGRANT_DOTFILE_PATH",
    "VAGRANT_DEFAULT_PROVIDER",
)


def vagrant(args: list[str], tmp_path: Path, provider: str | None = None) -> str:
    """Run vagrant on the repo's Vagrantfile, its state (.vagrant/) in tmp_path, offline."""
    if shutil.which("vagrant") is None:
        pytest.skip(
            "vagrant is not installed (Debian: apt-get install --no-install-recommends vagrant)"
        )
    env = {k: v for k, v in os.environ.items() if k not in _DROPPED}
    env.update(
        VAGRANT_CWD=str(REPO),
        VAGRANT_DOTFILE_PATH=str(tmp_path / "dot-vagrant"),
        VAGRANT_CHECKPOINT_DISABLE="1",  # no version check over the network
    )
    if provider:
        env["VAGRANT_DEFAULT_PROVIDER"] = provider
    done = subprocess.run(
        ["vagrant", *args, "--no-color", "--no-tty"],
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, f"vagrant {' '.join(args)}:\n{done.stdout}{done.stderr}"
    return done.stdout


def test_vagrantfile_validates_without_a_provider(tmp_path: Path) -> None:
    """Boxes, networks, synced folders, provisioners (their scripts must exist), everything
    but the provider blocks: works with Debian's vagrant alone, where no provider is usable."""
    out = vagrant(["validate", "--ignore-provider"], tmp_path)
    assert "validated successfully" in out
    assert (tmp_path / "dot-vagrant").is_dir(), "vagrant kept its state somewhere else"


def _provider_missing(provider: str, tmp_path: Path) -> str | None:
    if provider == "virtualbox":
        return None if shutil.which("VBoxManage") else "VirtualBox is not installed"
    plugins = vagrant(["plugin", "list"], tmp_path)
    if "vagrant-libvirt" not in plugins:
        return "the vagrant-libvirt plugin is not installed (Debian: vagrant-libvirt)"
    return None


@pytest.mark.parametrize("provider", ["libvirt", "virtualbox"])
def test_vagrantfile_validates_for_provider(provider: str, tmp_path: Path) -> None:
    """The provider block too (a misspelt `lv.memroy` fails here), where the provider is there."""
    if reason := _provider_missing(provider, tmp_path):
        pytest.skip(reason)
    out = vagrant(["validate"], tmp_path, provider=provider)
    assert "validated successfully" in out
