"""The Hugging Face hub, asked once and without waiting: is it there, and is a name local?

    hub.looks_local("runs/does_not_exist")   # True: a path, never a hub id
    hub.unreachable()                        # one fast check per process (or HF_HUB_OFFLINE=1)
    hub.go_offline()                         # loads then read the local cache only: no retries

Without network, ``huggingface_hub`` retries every request with back-off (about 30-50 s and
dozens of log lines per name) before it fails. kdexp instead checks once whether the hub's
host answers (``HF_ENDPOINT``, a 3 s connection), honours ``HF_HUB_OFFLINE``, and when the hub
is out of reach switches the libraries to offline mode: a model or dataset already in the local
cache still loads, anything else fails at once with a one-line error saying what to pass.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

TRUE = {"1", "on", "yes", "true"}
TIMEOUT_S = 3.0


_user_offline: bool | None = None  # the user's own HF_HUB_OFFLINE, saved when kdexp forces offline mode


def offline_requested() -> bool:
    """Whether the user asked for offline mode (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``),
    not counting kdexp's own switch (:func:`go_offline`)."""
    if _user_offline is not None:
        return _user_offline
    return any(os.environ.get(k, "").strip().lower() in TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


@functools.cache
def _host_answers(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=TIMEOUT_S).close()
        return True
    except OSError:
        return False


def unreachable() -> bool:
    """Whether the hub cannot be used: ``HF_HUB_OFFLINE`` is set, or its host does not answer
    (checked once per process)."""
    if offline_requested():
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return not _host_answers(url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443))


def go_offline() -> None:
    """Make huggingface_hub, transformers and datasets read their local caches only (no request,
    so no retry), and keep their retry warnings out of the console."""
    global _user_offline
    if _user_offline is None:
        _user_offline = offline_requested()
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    try:
        from huggingface_hub import constants
        constants.HF_HUB_OFFLINE = True
    except ImportError:  # pragma: no cover - transformers depends on it
        pass
    for name in ("huggingface_hub", "huggingface_hub.utils._http", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)


def looks_local(name: str) -> bool:
    """A path rather than a hub id: absolute, starting with ``.`` or ``~``, with more than one
    ``/``, ending with ``/``, or whose first part is an existing local directory
    (``runs/2026-12-04``). A hub id is ``name`` or ``org/name``."""
    text = str(name)
    if text.startswith(("/", ".", "~")) or text.endswith("/") or text.count("/") > 1 or "\\" in text:
        return True
    return "/" in text and Path(text.split("/", 1)[0]).is_dir()


def problem(name: str, key: str) -> str | None:
    """Why model ``name`` (the value of config ``key``) cannot be loaded, found without waiting:
    a missing local path, or a hub id that is neither reachable nor in the local cache; None
    when it can be tried (a hub id out of reach but cached then loads offline)."""
    if Path(str(name)).expanduser().exists():
        return None
    if looks_local(name):
        return f"{key}={name}: no such file or directory (a path, not a hub id); check the path"
    if not unreachable():
        return None
    reason = "HF_HUB_OFFLINE is set" if offline_requested() else "the Hugging Face hub is not reachable"
    go_offline()
    if _in_model_cache(name):
        return None
    return (f"{key}={name}: not a local directory, not in the local cache, and {reason}; set {key} to a "
            f"local model directory, or run where the hub is reachable (HF_HUB_OFFLINE=0)")


def prepare(name: str, key: str) -> None:
    """Before loading model ``name``: :func:`problem` as a one-line error."""
    from kdexp.errors import UserError
    found = problem(name, key)
    if found:
        raise UserError(found)


def config_problems(cfg) -> list[str]:
    """:func:`problem` for the models a training config loads (without torch)."""
    out = []
    for role in ("student", "teacher"):
        spec = cfg.get(role)
        name = spec.get("name_or_path") if spec is not None else None
        if name and not (role == "teacher" and spec.get("source") == "cache"):
            found = problem(str(name), f"{role}.name_or_path")
            if found:
                out.append(found)
    return out


def _in_model_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an invalid repo id, no cache directory
        return False
