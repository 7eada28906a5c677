"""What several test modules share: the repository's paths."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository: scripts and configs are named relative to it
FIXTURES = ROOT / "tests" / "fixtures"  # stored copies of official files, so no test downloads anything
