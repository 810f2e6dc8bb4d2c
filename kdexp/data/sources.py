"""Where task records come from: the toy generator, a local file, or the Hugging Face hub.

A *record* is ``{"prompt": str, "output": str, "references": [str, ...]}`` plus whatever
metadata the source keeps (the toy task keeps its ``family``). Every source yields the three
splits ``train`` / ``valid`` / ``test``.
"""

from __future__ import annotations

import csv
import io
import json
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kdexp.data import toy
from kdexp.data.templates import TEMPLATES
from kdexp.errors import UserError

SPLITS = ("train", "valid", "test")
Record = dict[str, Any]


def load_splits(cfg: Mapping[str, Any]) -> dict[str, list[Record]]:
    """The ``train`` / ``valid`` / ``test`` records described by a ``data`` config."""
    if cfg["source"] == "toy":
        splits = _toy_splits(cfg)
    elif cfg["source"] == "file":
        splits = _file_splits(cfg)
    else:
        raise UserError(f"data.source must be 'toy' or 'file', got '{cfg['source']}'")
    for name in SPLITS:
        if not splits[name]:
            raise UserError(f"data '{cfg['name']}': the {name} split is empty; "
                            f"check the file and data.split.valid / data.split.test")
    return splits


def load_test_split(cfg: Mapping[str, Any]) -> list[Record]:
    """The records to evaluate on: the test split, or the whole of ``data.files.test`` when the
    data is an evaluation set (only ``files.test`` given: Self-Instruct, Vicuna, S-NI, ...)."""
    files = cfg.get("files") or {}
    if cfg["source"] == "file" and files.get("test") and not files.get("train") and not files.get("valid"):
        records = [to_record(r, cfg, f"{files['test']}:{i}") for i, r in read_rows(files["test"])]
        cap = (cfg.get("split") or {}).get("test")
        records = records[:cap] if cap else records
        if not records:
            raise UserError(f"data '{cfg['name']}': {files['test']} holds no records")
        return records
    return load_splits(cfg)["test"]


def _toy_splits(cfg: Mapping[str, Any]) -> dict[str, list[Record]]:
    t = cfg["toy"]
    template = TEMPLATES.get(cfg["template"])
    try:
        raw = toy.make_splits(seed=t["seed"], n_train=t["n_train"], n_valid=t["n_valid"],
                              n_test=t["n_test"], families=t.get("families"))
    except ValueError as err:
        raise UserError(f"data.toy: {err}") from None
    return {
        name: [{"prompt": template(ex.instruction, ex.input), "output": ex.output,
                "references": [ex.output], "family": ex.family} for ex in examples]
        for name, examples in raw.items()
    }


def _file_splits(cfg: Mapping[str, Any]) -> dict[str, list[Record]]:
    files = cfg.get("files") or {}
    if any(files.get(s) for s in SPLITS):
        missing = [s for s in SPLITS if not files.get(s)]
        if missing:
            raise UserError(f"data.files sets some splits but not {missing}; give all three, "
                            f"or data.path alone for a seeded split")
        return {s: [to_record(r, cfg, f"{files[s]}:{i}") for i, r in read_rows(files[s])]
                for s in SPLITS}
    if cfg.get("path"):
        rows = read_rows(cfg["path"])
        where = str(cfg["path"])
    elif cfg.get("hub_id"):
        rows = _hub_rows(cfg["hub_id"], cfg.get("hub_split") or "train")
        where = str(cfg["hub_id"])
    else:
        raise UserError(f"data '{cfg['name']}' needs a file: set data.path=FILE.jsonl "
                        f"(or data.hub_id=NAME when the Hugging Face hub is reachable)")
    if not rows:
        raise UserError(f"data '{cfg['name']}': {where} holds no records")
    records = [to_record(r, cfg, f"{where}:{i}") for i, r in rows]
    return seeded_split(records, seed=cfg["split"]["seed"], n_valid=cfg["split"]["valid"],
                        n_test=cfg["split"]["test"])


def seeded_split(records: list[Record], seed: int, n_valid: int, n_test: int,
                 ) -> dict[str, list[Record]]:
    """Shuffle with ``seed``; the first ``n_test`` are test, the next ``n_valid`` validation."""
    if n_valid + n_test >= len(records):
        raise UserError(f"the dataset has {len(records)} records, not enough for "
                        f"{n_test} test + {n_valid} validation + a training split; "
                        f"lower data.split.test / data.split.valid")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    shuffled = [records[i] for i in order]
    return {"test": shuffled[:n_test], "valid": shuffled[n_test:n_test + n_valid],
            "train": shuffled[n_test + n_valid:]}


def read_rows(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """``(line or row number, row)`` pairs from a .jsonl, .json (a list of objects) or .csv file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a leading byte-order mark is harmless
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))  # quoted fields may hold newlines
        return [(i, row) for i, row in enumerate(reader, start=2)]
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise UserError(f"{path}: a .json data file must hold a list of objects")
        return list(enumerate(data, start=1))
    rows = []
    # Split on "\n" only: JSON strings may hold U+2028 and friends, which splitlines() breaks on.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{lineno}: malformed JSON line ({err.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append((lineno, row))
    return rows


def _hub_rows(hub_id: str, split: str) -> list[tuple[int, dict[str, Any]]]:
    try:
        import datasets
    except ImportError:
        raise UserError(f"loading '{hub_id}' from the hub needs the datasets package: "
                        f"pip install 'kdexp[hub]', or download the file and set data.path") from None
    try:
        ds = datasets.load_dataset(hub_id, split=split)
    except Exception as err:  # the hub raises many types: connection, missing repo, auth
        raise UserError(f"could not load dataset '{hub_id}' (split {split}) from the Hugging Face "
                        f"hub: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}; "
                        f"download it and set data.path=FILE") from None
    return list(enumerate(ds, start=1))


def to_record(row: Mapping[str, Any], cfg: Mapping[str, Any], where: str) -> Record:
    """A record from one raw row, following ``data.fields`` and ``data.template``."""
    fields = cfg["fields"]

    def get(role: str, required: bool) -> Any:
        key = fields.get(role)
        if key is None:
            return None
        if key not in row:
            if not required:
                return None
            raise UserError(f"{where}: missing field '{key}' (data.fields.{role}); the row has "
                            f"{sorted(row)}; set data.fields.{role}=NAME")
        return row[key]

    output = get("output", required=True)
    references = get("references", required=False)
    if isinstance(output, list):  # several answers (MiniLLM's processed S-NI, Vicuna, ...)
        if not output:
            raise UserError(f"{where}: the output list is empty (data.fields.output)")
        output, references = output[0], references or output
    if fields.get("prompt"):
        prompt = get("prompt", required=True)
    else:
        instruction = get("instruction", required=True)
        prompt = TEMPLATES.get(cfg["template"])(str(instruction), str(get("input", False) or ""))
    references = references or [output]
    if isinstance(references, str):
        references = [references]
    record = {"prompt": str(prompt), "output": str(output), "references": [str(r) for r in references]}
    marker = cfg.get("newline_marker")
    if marker:  # MiniLLM's processed files write newlines as "<n>"
        record = {k: (v.replace(marker, "\n") if isinstance(v, str) else [r.replace(marker, "\n") for r in v])
                  for k, v in record.items()}
    return record
