"""Prompt sets from files: the one reader behind the CLI's ``--prompts`` and the Load Prompts node.

Formats, chosen by the extension (``format`` overrides it): ``txt`` (one prompt per line, blank lines
skipped), ``csv`` / ``tsv`` (one named column; the header row is never a prompt), ``json`` (a list of
strings or of objects), ``jsonl`` (one string or object per line) and ``parquet`` (needs pyarrow). The
layouts people already have read as they are: MS-COCO caption annotations (``captions_*.json``:
``{"annotations": [{"caption": ...}]}``), Pick-a-Pic exports (a ``caption`` column), and the official
Golden-Noise data files (xie-lab-ml/Golden-Noise-for-Diffusion-Models: ``train_60000.json`` and
``pickscore_train_prompts.json`` are JSON Lines of ``{"caption": ...}`` objects under a ``.json`` name,
``pickscore.csv`` has a ``caption`` column, DrawBench's ``drawbench.csv`` a ``Prompts`` column).

Every prompt is stripped; empty ones are skipped (and counted). A bad file raises
:class:`PromptFileError` (a ``ValueError``): one line naming the file, the line / record / row, and the
fix. Control characters (Unicode category Cc: C0, DEL and C1) are refused except tab, so a binary file
passed as prompts never trains.

:func:`read_prompts` applies the options in this order: ``dedupe`` (exact, after the strip; the first
occurrence is kept), the held-out ``validation`` split (a count, or a fraction of the prompts; chosen by
a permutation from a ``torch.Generator`` seeded with ``shuffle_seed``, or 0 without one, so it is a pure
function of the prompts and the seed, independent of ``limit``), ``shuffle`` of the training prompts
(same permutation; without a seed the file order is kept), then ``limit`` on the training prompts. The
global random state is never touched.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Union

__all__ = ["FORMATS", "EXTENSIONS", "DEFAULT_COLUMNS", "PromptFileError", "PromptSet", "detect_format",
           "read_prompt_file", "split_prompts", "read_prompts", "prompts_digest"]

log = logging.getLogger(__name__)

FORMATS = ("txt", "csv", "tsv", "json", "jsonl", "parquet")
EXTENSIONS = {".txt": "txt", ".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl",
              ".parquet": "parquet"}
# the prompt column / key when none is named (compared case-insensitively; DrawBench's column is "Prompts")
DEFAULT_COLUMNS = ("prompt", "prompts", "caption", "captions", "text")
# how each host names the options in its messages (the CLI passes its flags)
OPTION_NAMES = {"column": "the column option", "format": "the format option", "validation": "validation"}

_BOM = b"\xef\xbb\xbf"
_NEWLINES = re.compile(r"\r\n|\r|\n")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")  # Unicode category Cc (C0, DEL, C1) but tab


class PromptFileError(ValueError):
    """A prompt file that cannot be read as prompts: ``str()`` is one line, ``<file>[ <where>]: <problem>: <fix>``."""

    def __init__(self, path, where: str, problem: str, fix: str):
        self.path, self.where, self.problem, self.fix = str(path), where, problem, fix
        super().__init__(f"{self.path}{' ' + where if where else ''}: {problem}: {fix}")


@dataclass(frozen=True)
class PromptSet:
    """Prompts read from a file: ``train`` and the held-out ``validation`` prompts (disjoint as text),
    ``source`` (the file, resolved) and ``record`` (file, format, column, counts, options and the sha256 of
    each list, for a cache to record where its prompts came from)."""

    train: list[str]
    validation: list[str]
    source: str
    record: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.train)

    def describe(self) -> str:
        """One line: how many prompts, from which file, format and column."""
        r = self.record
        column = f", column {r['column']!r}" if r.get("column") else ""
        val = f" + {len(self.validation)} held out for validation" if self.validation else ""
        n = len(self.train)
        return f"{n} training prompt{'' if n == 1 else 's'}{val} from {self.source} ({r.get('format')}{column})"


def prompts_digest(prompts: Iterable[str]) -> str:
    """sha256 of the prompts one per line (each followed by a newline): equal to ``sha256sum`` of the text
    file that holds them (no prompt holds a line break)."""
    h = hashlib.sha256()
    for p in prompts:
        h.update(p.encode("utf-8") + b"\n")
    return h.hexdigest()


# -- detection and checks -----------------------------------------------------------------------------


def _names(option_names: Optional[Mapping[str, str]]) -> dict:
    return {**OPTION_NAMES, **(option_names or {})}


def detect_format(path, format: Optional[str] = None, option_names: Optional[Mapping[str, str]] = None) -> str:
    """``format`` when given (one of :data:`FORMATS`; ``"auto"`` and None detect), else the format of
    the file's extension; an unknown one raises :class:`PromptFileError` listing the supported ones."""
    names = _names(option_names)
    if format not in (None, "", "auto"):
        fmt = str(format).lower().lstrip(".")
        if fmt not in FORMATS:
            raise PromptFileError(path, "", f"{names['format']} {format!r} is not a prompt file format",
                                  f"choose one of {', '.join(FORMATS)} (or auto: from the extension)")
        return fmt
    suffix = Path(path).suffix.lower()
    if suffix not in EXTENSIONS:
        raise PromptFileError(path, "", f"unknown prompt file extension {suffix or '(none)'!r}",
                              f"expected one of {', '.join(EXTENSIONS)}, or name the format with "
                              f"{names['format']} ({', '.join(FORMATS)})")
    return EXTENSIONS[suffix]


def _clean(path, where: str, value: str) -> str:
    """``value`` stripped, after refusing its control characters (tab allowed; an outer line break too)."""
    text = value.strip(" \t\r\n")
    bad = _CONTROL.search(text)
    if bad:
        ch = bad.group()
        if ch in "\r\n":
            raise PromptFileError(path, where, f"a line break ({ascii(ch)[1:-1]}) inside the prompt",
                                  "a prompt is one line of text: join its lines")
        raise PromptFileError(path, where, f"control character {ascii(ch)[1:-1]} in the prompt",
                              "prompts are plain text: remove it (or check that this is a prompt file, not a "
                              "binary one)")
    return text.strip()


def _kind(value: Any) -> str:
    kind = {type(None): "null", bool: "true/false", int: "a number", float: "a number", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)
    shown = "" if value is None or isinstance(value, (list, dict)) else f" ({json.dumps(value)[:40]})"
    return kind + shown


def _not_text(path, where: str, value: Any) -> PromptFileError:
    return PromptFileError(path, where, f"the prompt is {_kind(value)}, not text",
                           "every prompt must be a string: fix or remove that record")


def _decode(path, data: bytes) -> str:
    if data.startswith(_BOM):
        data = data[len(_BOM):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        hint = (" (it starts with a UTF-16 byte-order mark)" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else "")
        raise PromptFileError(path, f"line {line}", f"not UTF-8 text: byte 0x{data[exc.start]:02x} at offset "
                              f"{exc.start}{hint}", "save the file as UTF-8 (is this really a prompt file?)") from None


def _pick_column(path, where: str, found: list[str], column: Optional[str], names: dict, what: str = "column",
                 single: bool = True) -> str:
    """The prompt column (or key) of ``found``: ``column`` if given, else the first of DEFAULT_COLUMNS
    present (case-insensitive), else the only one (``single``)."""
    lower = {}
    for name in found:
        lower.setdefault(str(name).strip().lower(), name)
    if column:
        if column in found:
            return column
        if column.strip().lower() in lower:
            return lower[column.strip().lower()]
        raise PromptFileError(path, where, f"no {what} named {column!r} ({what}s found: {_listed(found)})",
                              f"give one of them with {names['column']}")
    for want in DEFAULT_COLUMNS:
        if want in lower:
            return lower[want]
    if single and len(found) == 1:
        return found[0]
    raise PromptFileError(path, where, f"no {what} named {' / '.join(DEFAULT_COLUMNS)} ({what}s found: "
                          f"{_listed(found)})", f"name the prompt {what} with {names['column']}")


def _listed(found) -> str:
    shown = [repr(str(n)) for n in list(found)[:20]]
    return (", ".join(shown) + (f", ... ({len(found)} in all)" if len(found) > 20 else "")) if shown else "none"


# -- the formats ---------------------------------------------------------------------------------------
# Each reader yields (where, raw value) pairs; :func:`read_prompt_file` cleans and counts them.


def _txt(path, text: str, column, names, info) -> Iterator[tuple[str, Any]]:
    lines = _NEWLINES.split(text)
    if lines[-1] == "":
        lines.pop()  # the last line's terminator, not an empty line
    for i, line in enumerate(lines, 1):
        yield f"line {i}", line


def _csv(path, text: str, column, names, info, delimiter: str = ",") -> Iterator[tuple[str, Any]]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header, index = None, None
    try:
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # a blank line
            where = f"line {reader.line_num}"
            if header is None:
                header = [h.strip() for h in row]
                name = _pick_column(path, where, header, column, names)
                index, info["column"] = header.index(name), name
                continue
            if len(row) > len(header):
                raise PromptFileError(path, where, f"{len(row)} fields, but the header has {len(header)} columns",
                                      "quote the fields that hold the delimiter (or fix the row)")
            yield where, row[index] if index < len(row) else ""
    except csv.Error as exc:
        raise PromptFileError(path, f"line {reader.line_num}", f"not valid CSV ({exc})",
                              "fix the quoting on that line") from None


def _json_error(path, exc: json.JSONDecodeError) -> PromptFileError:
    return PromptFileError(path, f"line {exc.lineno} column {exc.colno}", f"invalid JSON ({exc.msg})",
                           "fix the JSON there (a list of prompts, or one JSON value per line for .jsonl)")


def _records(path, items, where_of, column, names, info) -> Iterator[tuple[str, Any]]:
    """Strings, or objects whose prompt key (``column``, else the first default key of the first object, else its
    only key) holds one."""
    key = None
    for i, item in enumerate(items, 1):
        where = where_of(i)
        if isinstance(item, dict):
            if key is None:
                key = _pick_column(path, where, list(item), column, names, what="key")
                info["column"] = key
            if key not in item:
                raise PromptFileError(path, where, f"no key {key!r} (keys: {_listed(list(item))})",
                                      f"give every record a {key!r}, or name the key with {names['column']}")
            item = item[key]
        if not isinstance(item, str):
            raise _not_text(path, where, item)
        yield where, item


def _first_line_is_record(text: str) -> bool:
    first = next((line for line in _NEWLINES.split(text) if line.strip()), "")
    try:
        return isinstance(json.loads(first), (dict, str))
    except json.JSONDecodeError:
        return False


def _json(path, text: str, column, names, info) -> Iterator[tuple[str, Any]]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and _first_line_is_record(text):  # JSON Lines under a .json name (Golden-Noise)
            info["layout"] = "json lines"
            yield from _jsonl(path, text, column, names, info)
            return
        raise _json_error(path, exc) from None
    if isinstance(doc, dict):
        keys = list(doc)
        if isinstance(doc.get("annotations"), list) and not (column and column in doc):  # MS-COCO captions
            info["layout"] = "coco captions"
            yield from _records(path, doc["annotations"], lambda i: f"annotation {i}", column or "caption", names,
                                info)
            return
        try:
            key = _pick_column(path, "", keys, column, names, what="key", single=False)
        except PromptFileError as exc:
            raise PromptFileError(path, "", exc.problem.replace("no key", "a JSON object with no key", 1),
                                  "expected a list of prompts, COCO caption annotations ('annotations'), or an "
                                  f"object with the prompt key (name it with {names['column']})") from None
        value = doc[key]
        if isinstance(value, list):  # {"prompts": [...]}
            info["layout"], info["column"], where_of = f"list under {key!r}", key, (lambda i: f"{key} record {i}")
            yield from _records(path, value, where_of, None, names, info)
            return
        info["column"] = key  # a single record
        doc = [doc]
    if not isinstance(doc, list):
        raise PromptFileError(path, "", f"the JSON holds {_kind(doc)}",
                              "expected a list of prompts (strings, or objects with a 'prompt' / 'caption' / 'text' "
                              "key), or COCO caption annotations")
    yield from _records(path, doc, lambda i: f"record {i}", column, names, info)


def _jsonl(path, text: str, column, names, info) -> Iterator[tuple[str, Any]]:
    lines = [(i, line) for i, line in enumerate(_NEWLINES.split(text), 1) if line.strip()]

    def values():
        for i, line in lines:
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise PromptFileError(path, f"line {i} column {exc.colno}", f"invalid JSON ({exc.msg})",
                                      "each line must be one JSON string or object") from None

    yield from _records(path, values(), lambda n: f"line {lines[n - 1][0]}", column, names, info)


def _parquet(path, column, names, info) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise PromptFileError(path, "", "reading Parquet needs pyarrow, which is not installed",
                              "pip install pyarrow (into the Python that runs NoiseCraft), or save the prompts as "
                              "CSV / JSON Lines") from None
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as exc:
        raise PromptFileError(path, "", f"not a Parquet file ({exc})",
                              "check the file (a .parquet file starts and ends with PAR1)") from None
    name = _pick_column(path, "", list(schema.names), column, names)
    info["column"] = name
    kind = schema.field(name).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or getattr(pa.types, "is_string_view", lambda _: False)(kind)):
        raise PromptFileError(path, "", f"column {name!r} holds {kind}, not text",
                              f"name the text column with {names['column']}")
    try:
        values = pq.read_table(path, columns=[name]).column(name).to_pylist()
    except (pa.ArrowException, OSError) as exc:
        raise PromptFileError(path, "", f"the Parquet file could not be read ({exc})", "check the file") from None
    for i, value in enumerate(values, 1):
        if value is None:
            raise _not_text(path, f"row {i}", value)
        yield f"row {i}", value


def read_prompt_file(path, *, format: Optional[str] = None, column: Optional[str] = None,
                     option_names: Optional[Mapping[str, str]] = None) -> tuple[list[str], dict]:
    """Every prompt of ``path`` in file order (stripped, empty ones skipped) and what was read:
    ``{"file", "format", "column", "read", "empty_skipped"}`` (+ ``"layout"`` for a COCO file or JSON
    Lines under a ``.json`` name). ``option_names`` maps ``column`` / ``format`` to the host's names for
    those options in messages (e.g. ``--prompt-column``)."""
    names = _names(option_names)
    p = Path(path)
    if not p.exists():
        raise PromptFileError(path, "", "no such file", "expected a prompt file (.txt one per line, .csv, .tsv, "
                              ".json, .jsonl, .parquet); check the path")
    if p.is_dir():
        raise PromptFileError(path, "", "is a folder", "expected a prompt file (.txt one per line, .csv, .tsv, "
                              ".json, .jsonl, .parquet) inside it")
    fmt = detect_format(path, format, option_names)
    info: dict = {"file": str(p.resolve()), "format": fmt, "column": None, "size": p.stat().st_size}
    if info["size"] == 0:
        raise PromptFileError(path, "", "the file is empty (0 bytes)", "put prompts in it")
    if fmt == "parquet":
        items = _parquet(path, column, names, info)
    else:
        try:
            data = p.read_bytes()
        except OSError as exc:
            raise PromptFileError(path, "", f"cannot be read ({exc.strerror or exc})", "check its permissions") from None
        text = _decode(path, data)
        reader = {"txt": _txt, "csv": _csv, "json": _json, "jsonl": _jsonl}.get(fmt)
        items = (reader(path, text, column, names, info) if reader
                 else _csv(path, text, column, names, info, delimiter="\t"))
        if column and fmt == "txt":
            log.info("%s: a text file has no columns; %s %r ignored", path, names["column"], column)
    prompts, empty = [], 0
    for where, value in items:
        prompt = _clean(path, where, value)
        if prompt:
            prompts.append(prompt)
        else:
            empty += 1
    if fmt == "jsonl" or info.get("layout") == "json lines":
        info["format"] = "jsonl"
    info.update(read=len(prompts), empty_skipped=empty)
    if not prompts:
        where = f" in column {info['column']!r}" if info["column"] else ""
        raise PromptFileError(path, "", f"the file has no prompts{where} ({empty} empty)",
                              "put one prompt per line" if fmt == "txt" else
                              f"fill it, or name another column with {names['column']}")
    return prompts, info


# -- options ---------------------------------------------------------------------------------------------


def _validation_count(validation, n: int, path, names: dict) -> int:
    name = names["validation"]
    if isinstance(validation, bool) or not isinstance(validation, (int, float)):
        raise ValueError(f"{name}: expected a count (a whole number >= 0) or a fraction in (0, 1), "
                         f"got {validation!r}")
    v = float(validation)
    if not (v >= 0 and v == v and v != float("inf")) or (v >= 1 and v != int(v)):
        raise ValueError(f"{name}: expected a count (a whole number >= 0) or a fraction in (0, 1), got {validation!r}")
    k = int(v) if v == 0 or v >= 1 else max(1, round(v * n))
    if k >= n:
        raise PromptFileError(path, "", f"{name} {validation} holds out {k} of the {n} prompts and leaves none to "
                              "train on", f"hold out fewer (at most {n - 1}), or 0 for no validation prompts")
    return k


def split_prompts(prompts: list[str], *, limit: int = 0, shuffle_seed: Optional[int] = None, dedupe: bool = False,
                  validation: Union[int, float] = 0, path="prompts",
                  option_names: Optional[Mapping[str, str]] = None) -> tuple[list[str], list[str], dict]:
    """``(train, validation, counts)`` from ``prompts`` with the options in the module docstring's order.

    ``limit``: at most this many training prompts (0 or None: all). ``shuffle_seed``: None keeps the file
    order, else the training prompts are permuted by a ``torch.Generator`` with that seed. ``validation``: a
    count (whole number) or a fraction in (0, 1) of the prompts (after dedupe; at least one) held out; every
    copy of a held-out prompt leaves the training prompts."""
    import torch

    names = _names(option_names)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit: expected a whole number >= 0 (0 = all prompts), got {limit!r}")
    if shuffle_seed is not None and (isinstance(shuffle_seed, bool) or not isinstance(shuffle_seed, int)
                                     or not 0 <= shuffle_seed < 2 ** 64):
        raise ValueError(f"shuffle seed: expected a whole number in [0, 2^64) (or none for the file order), "
                         f"got {shuffle_seed!r}")
    kept = list(dict.fromkeys(prompts)) if dedupe else list(prompts)
    n = len(kept)
    k = _validation_count(validation, n, path, names)
    perm = list(range(n))
    if k or shuffle_seed is not None:
        gen = torch.Generator().manual_seed(0 if shuffle_seed is None else int(shuffle_seed))
        perm = torch.randperm(n, generator=gen).tolist()
    held = perm[:k] if shuffle_seed is not None else sorted(perm[:k])
    val = [kept[i] for i in held]
    rest = perm[k:] if shuffle_seed is not None else sorted(perm[k:])
    held_text = set(val)
    train = [kept[i] for i in rest if kept[i] not in held_text]
    counts = {"duplicates_dropped": len(prompts) - n, "validation_copies_dropped": n - k - len(train)}
    if limit:
        train = train[:limit]
    counts.update(train=len(train), validation=len(val))
    return train, val, counts


def read_prompts(path, *, format: Optional[str] = None, column: Optional[str] = None, limit: int = 0,
                 shuffle_seed: Optional[int] = None, dedupe: bool = False, validation: Union[int, float] = 0,
                 option_names: Optional[Mapping[str, str]] = None) -> PromptSet:
    """The :class:`PromptSet` of a prompt file (:func:`read_prompt_file`, then :func:`split_prompts`).

    Raises :class:`PromptFileError` for a bad file (one line: file, line / record, fix) and ``ValueError``
    for a bad option."""
    prompts, info = read_prompt_file(path, format=format, column=column, option_names=option_names)
    train, val, counts = split_prompts(prompts, limit=limit, shuffle_seed=shuffle_seed, dedupe=dedupe,
                                       validation=validation, path=path, option_names=option_names)
    record = {**{k: info[k] for k in ("file", "format", "column", "size")},
              **({"layout": info["layout"]} if "layout" in info else {}),
              "counts": {"read": info["read"], "empty_skipped": info["empty_skipped"], **counts},
              "options": {"limit": int(limit or 0), "shuffle_seed": shuffle_seed, "dedupe": bool(dedupe),
                          "validation": validation},
              "train_sha256": prompts_digest(train), "validation_sha256": prompts_digest(val)}
    out = PromptSet(train=train, validation=val, source=info["file"], record=record)
    log.info("prompts: %s", out.describe())
    return out
