"""The bundled tiny models and tokenizer: ``asset_path("tiny-teacher")`` (no torch needed)."""

from __future__ import annotations

from pathlib import Path

from kdexp.errors import unknown_choice

ASSETS = Path(__file__).parent


def asset_path(name: str) -> str:
    """The directory of a bundled model (``tiny-teacher``, ``tiny-student``)."""
    path = ASSETS / name
    if not path.is_dir():
        raise unknown_choice("bundled model", name, [p.name for p in ASSETS.iterdir() if p.is_dir()])
    return str(path)
