"""The environment ``make venv`` builds is exactly the committed lock: every pinned version is installed."""

from __future__ import annotations

import re
from importlib import metadata

import pytest

from tests.helpers import ROOT

LOCK = ROOT / "requirements.lock"
PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins() -> dict[str, str]:
    out = {}
    for line in LOCK.read_text(encoding="utf-8").splitlines():
        m = PIN.match(line.strip())
        if m:
            out[canonical(m.group(1))] = m.group(2)
    return out


def test_lock_pins_the_frameworks_and_leaves_torch_to_torch_spec():
    locked = pins()
    for name in ("transformers", "peft", "deepspeed", "datasets", "accelerate", "pytest"):
        assert name in locked, f"{name} is missing from requirements.lock; run make lock"
    assert "torch" not in locked  # installed first from TORCH_SPEC (CPU here, CUDA on a GPU box)


@pytest.mark.lockfile
def test_installed_versions_equal_the_lock():
    installed: dict[str, str] = {}
    for dist in metadata.distributions():  # the first on sys.path is the one `import` finds: once setuptools is
        installed.setdefault(canonical(dist.metadata["Name"]), dist.version)  # imported, its _vendor copies follow
    wrong = {name: (version, installed.get(name)) for name, version in pins().items()
             if installed.get(name) != version}
    assert not wrong, (f"installed versions differ from requirements.lock (locked, installed): {wrong}; "
                       "rebuild the environment with `rm -rf .venv && make venv`")
