"""Files written whole or not at all.

    write_atomic(path, text)    # a reader (another job, a resumed run) sees the old file or the new one
"""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file of this process, then rename it:
    concurrent writers (the jobs of a multirun) and readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)
