"""Where task records come from: the toy generator, a local file, or the Hugging Face hub.

A *record* is ``{"prompt": str, "output": str, "references": [str, ...]}`` plus whatever
metadata the source keeps (the toy task keeps its ``family``). Every source yields the three
splits ``train`` / ``valid`` / ``test``.

A bad row (malformed JSON, non-UTF-8 bytes, a missing field, an empty prompt or response) is
an error naming its file and line, or, with ``data.on_error=skip``, dropped and counted in one
warning per file.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdexp.data import toy
from kdexp.data.templates import TEMPLATES
from kdexp.errors import UserError

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
ON_ERROR = ("fail", "skip")
Record = dict[str, Any]


class BadRow(UserError):
    """One row that cannot become a record; ``data.on_error`` decides whether that stops the run."""


@dataclass
class BadRows:
    """The bad rows of one file under ``data.on_error``: ``fail`` raises at the first, ``skip``
    counts them (and keeps the first, to show in the warning)."""

    source: str
    on_error: str = "fail"
    n: int = 0
    first: str = ""

    def add(self, err: BadRow) -> None:
        if self.on_error != "skip":
            raise UserError(f"{err}; fix the line or set data.on_error=skip") from None
        self.n, self.first = self.n + 1, self.first or str(err)

    def warn(self) -> None:
        if self.n:
            log.warning("data: skipped %d bad rows of %s (first: %s)", self.n, self.source, self.first)

    def why_empty(self) -> str:
        """Why no record came from this source (when none did)."""
        if not self.n:
            return f"{self.source} holds no records"
        return (f"all {self.n} rows of {self.source} were skipped as bad (data.on_error=skip); "
                f"the first: {self.first}")


def on_error_policy(cfg: Mapping[str, Any]) -> str:
    """``data.on_error``, checked; ``fail`` for configs written before the key existed."""
    policy = cfg.get("on_error") or "fail"
    if policy not in ON_ERROR:
        raise UserError(f"data.on_error must be fail or skip, got '{policy}'")
    return policy


def load_splits(cfg: Mapping[str, Any]) -> dict[str, list[Record]]:
    """The ``train`` / ``valid`` / ``test`` records described by a ``data`` config."""
    on_error_policy(cfg)
    if cfg["source"] == "toy":
        splits = _toy_splits(cfg)
    elif cfg["source"] == "file":
        splits = _file_splits(cfg)
    elif cfg["source"] == "markov":
        splits = _markov_splits(cfg)
    else:
        raise UserError(f"data.source must be 'toy', 'file' or 'markov', got '{cfg['source']}'")
    for name in SPLITS:
        if not splits[name]:  # one file per split is checked as it is read: here a size was 0
            size = (f"data.{cfg['source']}.n_{name}" if cfg["source"] in ("toy", "markov")
                    else f"data.split.{name}")
            raise UserError(f"data '{cfg['name']}': the {name} split is empty: {size} is 0")
    return splits


def load_test_split(cfg: Mapping[str, Any]) -> list[Record]:
    """The records to evaluate on: the test split, or the whole of ``data.files.test`` when the
    data is an evaluation set (only ``files.test`` given: Self-Instruct, Vicuna, S-NI, ...)."""
    files = cfg.get("files") or {}
    if cfg["source"] == "file" and files.get("test") and not files.get("train") and not files.get("valid"):
        records = _file_records(files["test"], cfg, "test")
        cap = (cfg.get("split") or {}).get("test")
        return records[:cap] if cap else records
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


def markov_chain(cfg: Mapping[str, Any]):
    """The known chain of ``data=markov``, read from ``data.markov.teacher``'s config.json."""
    from kdexp.known.chain import Chain
    folder = Path(str(cfg["markov"]["teacher"]))
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    if config.get("model_type") != "kdexp-markov" or config.get("chain_seed") is None:
        raise UserError(f"data=markov samples its teacher's chain, but '{folder}' is not a known "
                        f"chain (a kdexp-markov config with chain_seed); use teacher=markov or set "
                        f"data.markov.teacher to such a directory")
    chain = Chain.from_config(config)
    lengths = (chain.prompt_length, chain.prompt_length + chain.max_response, chain.max_response)
    if (cfg["max_prompt_length"], cfg["max_length"], cfg.get("max_new_tokens", chain.max_response)) != lengths:
        raise UserError(f"data=markov: the chain's prompts have {chain.prompt_length} tokens and its responses "
                        f"at most {chain.max_response}; set data.max_prompt_length={lengths[0]} "
                        f"data.max_length={lengths[1]} data.max_new_tokens={lengths[2]}")
    return chain


def _markov_splits(cfg: Mapping[str, Any]) -> dict[str, list[Record]]:
    from kdexp.known.chain import records
    m, chain = cfg["markov"], markov_chain(cfg)
    return {name: records(chain, int(m[f"n_{name}"]), seed=f"{m['seed']}-{name}") for name in SPLITS}


def _file_splits(cfg: Mapping[str, Any]) -> dict[str, list[Record]]:
    files = cfg.get("files") or {}
    if any(files.get(s) for s in SPLITS):
        missing = [s for s in SPLITS if not files.get(s)]
        if missing:
            raise UserError(f"data.files sets some splits but not {missing}; give all three, "
                            f"or data.path alone for a seeded split")
        return {s: _file_records(files[s], cfg, s) for s in SPLITS}
    if cfg.get("path"):
        records = _file_records(cfg["path"], cfg)
    elif cfg.get("hub_id"):
        rows = _hub_rows(cfg["hub_id"], cfg.get("hub_split") or "train")
        records = _records(rows, cfg, BadRows(str(cfg["hub_id"]), on_error_policy(cfg)))
    else:
        raise UserError(f"data '{cfg['name']}' needs a file: set data.path=FILE.jsonl "
                        f"(or data.hub_id=NAME when the Hugging Face hub is reachable)")
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


def _file_records(path: str | Path, cfg: Mapping[str, Any], split: str | None = None) -> list[Record]:
    path = Path(path).expanduser()
    bad = BadRows(str(path), on_error_policy(cfg))
    return _records(_read_rows(path, bad), cfg, bad, split)


def _records(rows: Iterable[tuple[int, Mapping[str, Any]]], cfg: Mapping[str, Any], bad: BadRows,
             split: str | None = None) -> list[Record]:
    """The records of one source's rows, its bad rows handled under ``data.on_error``; never empty."""
    records = []
    for line, row in rows:
        try:
            records.append(to_record(row, cfg, f"{bad.source}:{line}"))
        except BadRow as err:
            bad.add(err)
    bad.warn()
    if not records:
        empty = f" the {split} split is empty:" if split else ""
        raise UserError(f"data '{cfg['name']}':{empty} {bad.why_empty()}")
    return records


def read_rows(path: str | Path, on_error: str = "fail") -> list[tuple[int, dict[str, Any]]]:
    """``(line or row number, row)`` pairs from a .jsonl, .json (a list of objects) or .csv file.

    A .jsonl line that is not UTF-8, not JSON or not an object is a bad row: an error naming
    the file and line (``on_error="fail"``), or dropped and counted in a warning (``"skip"``).
    A .json or .csv file that is not UTF-8 is an error naming the line of the first bad byte.
    """
    path = Path(path).expanduser()
    bad = BadRows(str(path), on_error)
    rows = _read_rows(path, bad)
    bad.warn()
    return rows


def _read_rows(path: Path, bad: BadRows) -> list[tuple[int, dict[str, Any]]]:
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    raw = path.read_bytes().removeprefix(codecs.BOM_UTF8)  # a leading byte-order mark is harmless
    if path.suffix in (".csv", ".json"):  # a row may span lines: the file is decoded as a whole
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            line = raw.count(b"\n", 0, err.start) + 1
            raise UserError(f"{path}:{line}: not UTF-8 ({err.reason}, byte 0x{raw[err.start]:02x}); "
                            f"save the file as UTF-8") from None
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
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        try:
            row = _json_line(line, f"{path}:{lineno}")
        except BadRow as err:
            bad.add(err)
            continue
        if row is not None:
            rows.append((lineno, row))
    return rows


def _json_line(line: bytes, where: str) -> dict[str, Any] | None:
    """The object on one .jsonl line, None for a blank line; a BadRow when it is neither."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadRow(f"{where}: not UTF-8 ({err.reason}, byte 0x{line[err.start]:02x} "
                     f"at column {err.start + 1})") from None
    if not text.strip():
        return None
    try:
        row = json.loads(text)
    except json.JSONDecodeError as err:
        at = "" if err.msg.endswith(" at") else " at"  # "Unterminated string starting at": no "at at"
        raise BadRow(f"{where}: malformed JSON ({err.msg}{at} column {err.colno})") from None
    if not isinstance(row, dict):
        raise BadRow(f"{where}: expected a JSON object, got {type(row).__name__}")
    return row


def _hub_rows(hub_id: str, split: str) -> list[tuple[int, dict[str, Any]]]:
    try:
        import datasets
    except ImportError:
        raise UserError(f"loading '{hub_id}' from the hub needs the datasets package: "
                        f"pip install 'kdexp[hub]', or download the file and set data.path") from None
    from kdexp import hub
    offline = hub.unreachable()
    if offline:
        hub.go_offline()   # the local cache only: fails at once rather than after retries
    try:
        ds = datasets.load_dataset(hub_id, split=split)
    except Exception as err:  # the hub raises many types: connection, missing repo, auth
        where = ("the local cache (the Hugging Face hub is not reachable or HF_HUB_OFFLINE is set)" if offline
                 else "the Hugging Face hub")
        raise UserError(f"could not load dataset '{hub_id}' (split {split}) from {where}: "
                        f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}; "
                        f"download it and set data.path=FILE") from None
    return list(enumerate(ds, start=1))


def to_record(row: Mapping[str, Any], cfg: Mapping[str, Any], where: str) -> Record:
    """A record from one raw row, following ``data.fields`` and ``data.template``.

    A row without a required field, or whose output, prompt or instruction is empty (or only
    whitespace), raises ``BadRow`` naming ``where`` (``FILE:LINE``).
    """
    fields = cfg["fields"]

    def get(role: str, required: bool) -> Any:
        key = fields.get(role)
        if key is None:
            return None
        if key not in row:
            if not required:
                return None
            raise BadRow(f"{where}: missing field '{key}' (data.fields.{role}); the row has "
                         f"{sorted(row)}; set data.fields.{role}=NAME")
        return row[key]

    def not_blank(value: Any, role: str) -> Any:
        if value is None or not str(value).strip():
            raise BadRow(f"{where}: the {role} is empty (field '{fields[role]}')")
        return value

    output = get("output", required=True)
    references = get("references", required=False)
    if isinstance(output, list):  # several answers (MiniLLM's processed S-NI, Vicuna, ...)
        if not output:
            raise BadRow(f"{where}: the output list is empty (field '{fields['output']}')")
        output, references = output[0], references or output
    not_blank(output, "output")
    if fields.get("prompt"):
        prompt = not_blank(get("prompt", required=True), "prompt")
    else:
        instruction = not_blank(get("instruction", required=True), "instruction")
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
