"""Prompt sets from files (:mod:`noisecraft.prompts`): every format and layout, every bad file, the options,
and the CLI's --prompts.

Table-driven: ``GOOD`` rows are files and the prompts they must give; ``BAD`` rows are files and the one-line
message they must give (the file named, the line / record / row named where there is one). Layouts follow the
real files: MS-COCO ``captions_*.json``; the official Golden-Noise data (xie-lab-ml/Golden-Noise-for-Diffusion-
Models ``data/``: ``pickscore.csv`` with columns 序号,caption,caption_zh,备注 and an empty row; DrawBench's
``Prompts,Category``; ``train_60000.json`` and ``pickscore_train_prompts.json``, JSON Lines of
``{"index", "seed", "caption", ...}`` under a ``.json`` name); Pick-a-Pic's Parquet (a ``caption`` column next
to image bytes, each caption repeated over its pairs).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import pytest
import torch

from noisecraft.prompts import (DEFAULT_COLUMNS, EXTENSIONS, FORMATS, PromptFileError, PromptSet, prompts_digest,
                                read_prompts, split_prompts)

REPO = Path(__file__).resolve().parents[2]

PICKSCORE_CSV = ("序号,caption,caption_zh,备注\n"
                 "0,A curious cat exploring a haunted mansion,一只好奇的猫探索闹鬼的豪宅,\n"
                 '2,"Portrait of a 26yr white woman, hyper-detailed, soft skin",一位 26 岁白人女性的肖像,\n'
                 "87,,,\n"
                 '26,"The word ""grenade""",手榴弹,\n')
PICKSCORE_PROMPTS = ["A curious cat exploring a haunted mansion",
                     "Portrait of a 26yr white woman, hyper-detailed, soft skin", 'The word "grenade"']
GOLDEN_JSONL = "".join(json.dumps({"index": i, "seed": 100 + i, "caption": c, "original_score_list": [0.25],
                                   "optimized_score_list": [0.26]}) + "\n" for i, c in enumerate(["a fox", "a owl"]))
COCO = {"info": {"year": 2017}, "images": [{"id": 1, "file_name": "1.jpg"}],
        "annotations": [{"image_id": 1, "id": 10, "caption": "A man riding a bike.\n"},
                        {"image_id": 1, "id": 11, "caption": " Two dogs on a beach "}]}


def _parquet(columns: dict) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        pq.write_table(pa.table(columns), path)

    return write


def _with_pyarrow(data: bytes) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        pytest.importorskip("pyarrow")
        path.write_bytes(data)

    return write


@dataclass
class Good:
    id: str
    name: str
    content: Union[str, bytes, Callable[[Path], None]]
    prompts: list[str]
    format: str
    column: Optional[str] = None
    kw: dict = field(default_factory=dict)


GOOD = [
    Good("txt", "p.txt", "a cat\r\n\r\n  a dog\t on grass \n\n", ["a cat", "a dog\t on grass"], "txt"),
    Good("txt-old-mac-breaks", "p.txt", "one\rtwo\r", ["one", "two"], "txt"),
    Good("txt-bom-unicode", "p.txt", "\ufeffein Hund\n一只猫\n", ["ein Hund", "一只猫"], "txt"),
    Good("txt-column-ignored", "p.txt", "x\n", ["x"], "txt", kw={"column": "caption"}),
    Good("csv-prompt", "p.csv", "id,prompt\n1,a red car\n2, a blue car \n", ["a red car", "a blue car"], "csv",
         "prompt"),
    Good("golden-pickscore-csv", "pickscore.csv", PICKSCORE_CSV, PICKSCORE_PROMPTS, "csv", "caption"),
    Good("golden-drawbench-csv", "drawbench.csv", "Prompts,Category\nA red colored car.,Colors\n"
         "A black colored banana.,Colors\n", ["A red colored car.", "A black colored banana."], "csv", "Prompts"),
    Good("csv-one-column-header-not-a-prompt", "p.csv", "my prompts\nfirst\nsecond\n", ["first", "second"], "csv",
         "my prompts"),
    Good("csv-column-option", "pickscore.csv", PICKSCORE_CSV, ["一只好奇的猫探索闹鬼的豪宅", "一位 26 岁白人女性的肖像", "手榴弹"],
         "csv", "caption_zh", kw={"column": "caption_zh"}),
    Good("csv-column-option-any-case", "p.csv", "ID,Caption\n1,x\n", ["x"], "csv", "Caption", kw={"column": "CAPTION"}),
    Good("csv-short-row-is-empty", "p.csv", "id,text,note\n1,a\n2\n3,b,c\n", ["a", "b"], "csv", "text"),
    Good("tsv", "p.tsv", "caption\tscore\na, b\t1\nc\t2\n", ["a, b", "c"], "tsv", "caption"),
    Good("json-strings", "p.json", '["a", " b ", ""]', ["a", "b"], "json"),
    Good("json-objects", "p.json", '[{"text": "a", "n": 1}, {"text": "b"}]', ["a", "b"], "json", "text"),
    Good("json-one-key-objects", "p.json", '[{"en": "a"}, {"en": "b"}]', ["a", "b"], "json", "en"),
    Good("json-objects-column", "p.json", '[{"en": "a", "de": "x"}, {"en": "b", "de": "y"}]', ["x", "y"], "json",
         "de", kw={"column": "de"}),
    Good("json-list-under-key", "p.json", '{"name": "set", "prompts": ["a", "b"]}', ["a", "b"], "json", "prompts"),
    Good("json-one-object", "p.json", '{"prompt": "only one"}', ["only one"], "json", "prompt"),
    Good("coco-captions", "captions_val2017.json", json.dumps(COCO), ["A man riding a bike.", "Two dogs on a beach"],
         "json", "caption"),
    Good("jsonl-strings", "p.jsonl", '"a"\n\n"b"\n', ["a", "b"], "jsonl"),
    Good("ndjson-objects", "p.ndjson", '{"caption": "a"}\n{"caption": "b"}\n', ["a", "b"], "jsonl", "caption"),
    Good("golden-train-60000-json-lines", "train_60000.json", GOLDEN_JSONL, ["a fox", "a owl"], "jsonl", "caption"),
    Good("golden-pickscore-train-prompts", "pickscore_train_prompts.json",
         '{"caption": "x", "seed": 1}\n{"caption": "y", "seed": 2}\n', ["x", "y"], "jsonl", "caption"),
    Good("format-override", "prompts.dat", "prompt\na\n", ["a"], "csv", "prompt", kw={"format": "csv"}),
    Good("pickapic-parquet", "pickapic.parquet",
         _parquet({"caption": ["a cat", "a cat", "a dog"], "jpg_0": [b"\x89PNG", b"\x89PNG", b"\xff\xd8"],
                   "label_0": [1.0, 0.0, 0.5]}), ["a cat", "a cat", "a dog"], "parquet", "caption"),
    Good("parquet-column", "p.parquet", _parquet({"id": [1, 2], "en": ["a", "b"]}), ["a", "b"], "parquet", "en",
         kw={"column": "en"}),
]


def _write(tmp: Path, name: str, content) -> Path:
    path = tmp / name
    if callable(content):
        content(path)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_bytes(content.encode("utf-8"))
    return path


@pytest.mark.parametrize("case", GOOD, ids=lambda c: c.id)
def test_reads(case: Good, tmp_path: Path):
    path = _write(tmp_path, case.name, case.content)
    got = read_prompts(path, **case.kw)
    assert got.train == case.prompts and got.validation == []
    assert got.record["format"] == case.format and got.record["column"] == case.column
    assert got.source == str(path.resolve()) == got.record["file"]
    assert got.record["train_sha256"] == hashlib.sha256("".join(p + "\n" for p in case.prompts).encode()).hexdigest()


@dataclass
class Bad:
    id: str
    name: Optional[str]  # None: the path is a folder
    content: Union[str, bytes, Callable[[Path], None], None]
    message: list[str]  # substrings of the message
    where: str = ""  # the line / record / row named in it
    kw: dict = field(default_factory=dict)


HEADER_ONLY = "prompt,score\n"
BAD = [
    Bad("missing-file", "nope.txt", None, ["no such file", "check the path"]),
    Bad("folder", None, None, ["is a folder", "expected a prompt file"]),
    Bad("empty-file", "p.txt", b"", ["the file is empty (0 bytes)"]),
    Bad("txt-blank-lines-only", "p.txt", "\n  \n\t\n", ["the file has no prompts", "put one prompt per line"]),
    Bad("txt-not-utf8", "p.txt", b"a\nb\n\xff\xfec\n", ["not UTF-8 text: byte 0xff at offset 4", "save the file as UTF-8"],
        "line 3"),
    Bad("txt-utf16", "p.txt", "a cat\n".encode("utf-16"), ["not UTF-8", "UTF-16 byte-order mark"], "line 1"),
    Bad("binary-png-as-txt", "p.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", ["byte 0x89 at offset 0"], "line 1"),
    Bad("txt-nul", "p.txt", b"a cat\na\x00dog\n", ["control character \\x00", "not a binary one"], "line 2"),
    Bad("txt-escape", "p.txt", "\x1b[31mred\n", ["control character \\x1b"], "line 1"),
    Bad("txt-del", "p.txt", "a\nb\nc\x7f\n", ["control character \\x7f"], "line 3"),
    Bad("txt-c1-nel", "p.txt", "a\u0085b\n", ["control character \\x85"], "line 1"),
    Bad("txt-vertical-tab", "p.txt", "x\n\ny\x0bz\n", ["control character \\x0b"], "line 3"),
    Bad("txt-form-feed", "p.txt", "x\x0c\n", ["control character \\x0c"], "line 1"),
    Bad("unknown-extension", "p.docx", "a\n", ["unknown prompt file extension '.docx'", ".txt, .csv, .tsv", "format"]),
    Bad("no-extension", "prompts", "a\n", ["unknown prompt file extension '(none)'"]),
    Bad("unknown-format-option", "p.txt", "a\n", ["format option 'xml' is not a prompt file format", "txt, csv"],
        kw={"format": "xml"}),
    Bad("csv-no-prompt-column", "p.csv", "id,en,score\n1,a,2\n",
        ["no column named prompt / prompts / caption / captions / text", "'id', 'en', 'score'", "column option"],
        "line 1"),
    Bad("csv-named-column-missing", "pickscore.csv", PICKSCORE_CSV, ["no column named 'prompt'", "'caption_zh'"],
        "line 1", kw={"column": "prompt"}),
    Bad("csv-header-only", "p.csv", HEADER_ONLY, ["the file has no prompts in column 'prompt'"]),
    Bad("csv-empty-column", "p.csv", "prompt,score\n,1\n  ,2\n", ["no prompts in column 'prompt' (2 empty)"]),
    Bad("csv-ragged-row", "p.csv", "id,prompt\n1,a\n2,a, b, c\n", ["4 fields, but the header has 2 columns", "quote"],
        "line 3"),
    Bad("csv-nul", "p.csv", "id,prompt\n1,a\n2,b\x00\n", ["control character \\x00"], "line 3"),
    Bad("csv-line-break-in-prompt", "p.csv", 'id,prompt\n1,"two\nlines"\n', ["a line break (\\n) inside the prompt",
                                                                            "join its lines"], "line 3"),
    Bad("tsv-no-column", "p.tsv", "a\tb\n1\t2\n", ["no column named prompt", "'a', 'b'"], "line 1"),
    Bad("json-invalid", "p.json", '[\n  "a",\n  b\n]', ["invalid JSON (Expecting value)"], "line 3 column 3"),
    Bad("json-number-record", "p.json", '["a", 7]', ["the prompt is a number (7), not text"], "record 2"),
    Bad("json-null-record", "p.json", '[null]', ["the prompt is null, not text"], "record 1"),
    Bad("json-list-record", "p.json", '["a", "b", ["c"]]', ["the prompt is a list, not text"], "record 3"),
    Bad("json-bool-record", "p.json", '[true]', ["the prompt is true/false (true), not text"], "record 1"),
    Bad("json-object-missing-key", "p.json", '[{"prompt": "a"}, {"caption": "b", "n": 1}]',
        ["no key 'prompt' (keys: 'caption', 'n')"], "record 2"),
    Bad("json-object-number-value", "p.json", '[{"text": 3.5}]', ["the prompt is a number (3.5), not text"],
        "record 1"),
    Bad("json-top-level-number", "p.json", "42", ["the JSON holds a number (42)", "expected a list of prompts"]),
    Bad("json-object-unknown-keys", "p.json", '{"images": [], "info": {}}',
        ["a JSON object with no key named prompt", "'images', 'info'", "COCO caption annotations"]),
    Bad("json-empty-list", "p.json", "[]", ["the file has no prompts"]),
    Bad("json-control-character", "p.json", '["ok", "bell\\u0007"]', ["control character \\x07"], "record 2"),
    Bad("jsonl-invalid-line", "p.jsonl", '"a"\n"b"\n{"caption": \n', ["invalid JSON (Expecting value)"], "line 3 column 13"),
    Bad("jsonl-number", "p.jsonl", '"a"\n12\n', ["the prompt is a number (12), not text"], "line 2"),
    Bad("jsonl-missing-key", "train_60000.json", '{"caption": "a"}\n\n{"index": 1, "seed": 2}\n',
        ["no key 'caption' (keys: 'index', 'seed')"], "line 3"),
    Bad("coco-missing-caption", "captions_train2017.json",
        json.dumps({"annotations": [{"caption": "a"}, {"image_id": 1, "id": 2}]}), ["no key 'caption'"],
        "annotation 2"),
    Bad("coco-null-caption", "captions_val2014.json", json.dumps({"annotations": [{"caption": None}]}),
        ["the prompt is null, not text"], "annotation 1"),
    Bad("coco-line-break-inside", "captions_val2014.json", json.dumps({"annotations": [{"caption": "A\nB"}]}),
        ["a line break (\\n) inside the prompt"], "annotation 1"),
    Bad("parquet-no-column", "p.parquet", _parquet({"id": [1], "url": ["u"]}),
        ["no column named prompt / prompts", "'id', 'url'"]),
    Bad("parquet-number-column", "p.parquet", _parquet({"prompt": [1, 2]}), ["column 'prompt' holds int64, not text"]),
    Bad("parquet-null", "p.parquet", _parquet({"caption": ["a", None]}), ["the prompt is null, not text"], "row 2"),
    Bad("parquet-control-character", "p.parquet", _parquet({"caption": ["a\x00"]}), ["control character \\x00"],
        "row 1"),
    Bad("parquet-not-parquet", "p.parquet", _with_pyarrow(b"<html>not found</html>"), ["not a Parquet file"]),
]


def test_enough_rows():
    assert len(BAD) >= 30 and len(GOOD) >= 20
    assert {c.id for c in BAD}.isdisjoint({c.id for c in GOOD}) and len({c.id for c in BAD}) == len(BAD)


@pytest.mark.parametrize("case", BAD, ids=lambda c: c.id)
def test_bad_file_is_one_line_naming_file_and_place(case: Bad, tmp_path: Path):
    if case.name is None:
        path = tmp_path / "folder"
        path.mkdir()
    elif case.content is None:
        path = tmp_path / case.name
    else:
        path = _write(tmp_path, case.name, case.content)
    with pytest.raises(PromptFileError) as info:
        read_prompts(str(path), **case.kw)
    msg = str(info.value)
    assert isinstance(info.value, ValueError) and "\n" not in msg and "\r" not in msg
    head = f"{path} {case.where}:" if case.where else f"{path}:"
    assert msg.startswith(head), msg
    for part in case.message:
        assert part in msg, msg


def test_parquet_without_pyarrow_names_the_install(tmp_path: Path, monkeypatch):
    path = _write(tmp_path, "p.parquet", b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # Python's own marker for "this module cannot be imported"
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(PromptFileError, match=r"p\.parquet: reading Parquet needs pyarrow.*pip install pyarrow"):
        read_prompts(path)


def test_option_names_come_from_the_host(tmp_path: Path):
    path = _write(tmp_path, "p.csv", "a,b\n1,2\n")
    with pytest.raises(PromptFileError, match="name the prompt column with --prompt-column$"):
        read_prompts(path, option_names={"column": "--prompt-column"})


def test_supported_extensions_and_default_columns():
    assert set(EXTENSIONS.values()) == set(FORMATS) and DEFAULT_COLUMNS[0] == "prompt"


# -- options ---------------------------------------------------------------------------------------------

PROMPTS = [f"prompt {i:02d}" for i in range(50)]


@pytest.fixture
def fifty(tmp_path: Path) -> Path:
    return _write(tmp_path, "p.txt", "".join(p + "\n" for p in PROMPTS))


def test_limit_keeps_the_first_in_file_order(fifty: Path):
    assert read_prompts(fifty, limit=7).train == PROMPTS[:7]
    assert read_prompts(fifty, limit=0).train == PROMPTS == read_prompts(fifty, limit=500).train


def _rng_states():
    return torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()


def test_shuffle_is_the_seeded_permutation_and_leaves_the_global_rng_alone(fifty: Path):
    before = _rng_states()
    a, b, c = (read_prompts(fifty, shuffle_seed=s).train for s in (3, 3, 4))
    after = _rng_states()
    assert torch.equal(before[0], after[0]) and before[1] == after[1] and np.array_equal(before[2], after[2])
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(3)).tolist()
    assert a == b == [PROMPTS[i] for i in perm]
    assert a != c and sorted(a) == sorted(c) == PROMPTS  # a permutation; two seeds agree with chance 1/50!
    assert read_prompts(fifty, shuffle_seed=3, limit=5).train == a[:5]  # the limit comes after the shuffle


def test_dedupe_is_exact_after_the_strip(tmp_path: Path):
    path = _write(tmp_path, "p.txt", "a cat\n a cat \nA cat\nb\na cat\n")
    got = read_prompts(path, dedupe=True)
    assert got.train == ["a cat", "A cat", "b"] and got.record["counts"]["duplicates_dropped"] == 2
    assert read_prompts(path).train == ["a cat", "a cat", "A cat", "b", "a cat"]


@pytest.mark.parametrize("validation, held", [(5, 5), (0.1, 5), (0.001, 1), (49, 49)])
def test_validation_is_disjoint_deterministic_and_independent_of_limit(fifty: Path, validation, held):
    one = read_prompts(fifty, validation=validation)
    assert len(one.validation) == held and len(one.train) == 50 - held
    assert set(one.train).isdisjoint(one.validation) and sorted(one.train + one.validation) == PROMPTS
    assert one.train == [p for p in PROMPTS if p not in one.validation]  # no shuffle: the file order stays
    assert read_prompts(fifty, validation=validation) == one
    limited = read_prompts(fifty, validation=validation, limit=3)
    assert limited.validation == one.validation and limited.train == one.train[:3]
    seeded = read_prompts(fifty, validation=validation, shuffle_seed=0)  # seed 0 = the split without a shuffle
    assert sorted(seeded.validation) == one.validation and set(seeded.train) == set(one.train)
    other = read_prompts(fifty, validation=validation, shuffle_seed=1)
    assert held == 49 or set(other.validation) != set(one.validation)  # equal with chance 1 / C(50, held)


def test_validation_keeps_copies_out_of_training(tmp_path: Path):
    path = _write(tmp_path, "p.txt", "a\nb\na\nc\na\nd\n")
    for seed in range(6):
        got = split_prompts(["a", "b", "a", "c", "a", "d"], validation=2, shuffle_seed=seed)
        assert set(got[0]).isdisjoint(got[1]) and len(got[1]) == 2
    got = read_prompts(path, validation=1, shuffle_seed=None)
    assert set(got.train).isdisjoint(got.validation)
    counts = got.record["counts"]
    assert counts["train"] + counts["validation"] + counts["validation_copies_dropped"] == 6


@pytest.mark.parametrize("kw, message", [
    ({"validation": 50}, "holds out 50 of the 50 prompts and leaves none to train on"),
    ({"validation": 0.9999}, "holds out 50 of the 50 prompts"),
    ({"validation": 1.5}, "validation: expected a count (a whole number >= 0) or a fraction in (0, 1), got 1.5"),
    ({"validation": -1}, "got -1"),
    ({"validation": float("nan")}, "got nan"),
    ({"validation": True}, "got True"),
    ({"limit": -1}, "limit: expected a whole number >= 0 (0 = all prompts), got -1"),
    ({"shuffle_seed": -1}, "shuffle seed: expected a whole number in [0, 2^64)"),
])
def test_bad_options(fifty: Path, kw, message):
    with pytest.raises(ValueError) as info:
        read_prompts(fifty, **kw)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_record_says_where_the_prompts_came_from(fifty: Path):
    got = read_prompts(fifty, limit=10, shuffle_seed=2, dedupe=True, validation=4)
    assert isinstance(got, PromptSet) and len(got) == 10
    r = got.record
    assert r["file"] == str(fifty.resolve()) and r["format"] == "txt" and r["size"] == fifty.stat().st_size
    assert r["options"] == {"limit": 10, "shuffle_seed": 2, "dedupe": True, "validation": 4}
    assert r["counts"] == {"read": 50, "empty_skipped": 0, "duplicates_dropped": 0, "validation_copies_dropped": 0,
                           "train": 10, "validation": 4}
    assert r["train_sha256"] == prompts_digest(got.train) and r["validation_sha256"] == prompts_digest(got.validation)
    assert prompts_digest(PROMPTS) == hashlib.sha256(fifty.read_bytes()).hexdigest()  # = sha256sum of the txt
    json.dumps(r)  # a cache writes it as JSON
    assert got.describe() == f"10 training prompts + 4 held out for validation from {fifty.resolve()} (txt)"


# -- the command line ------------------------------------------------------------------------------------


CLI_CASES = [
    # a bad prompt file is refused before the model folder (which does not exist) is looked at
    (["collect-pairs", "--model", "m", "--prompts", "bin.txt", "--out", "p"], "bin.txt", b"a cat\n\x00\x01\x02\n",
     "--prompts bin.txt line 2: control character \\x00 in the prompt"),
    (["train-refiner", "--model", "m", "--prompts", "p.jsonl", "--out", "r"], "p.jsonl", b'{"caption": "a"}\n5\n',
     "--prompts p.jsonl line 2: the prompt is a number (5), not text"),
    (["train-refiner", "--model", "m", "--prompts", "pickscore.csv", "--prompt-column", "en", "--out", "r"],
     "pickscore.csv", PICKSCORE_CSV.encode(), "--prompts pickscore.csv line 1: no column named 'en'"),
    (["train-refiner", "--model", "m", "--prompts", "p.txt", "--prompts-format", "json", "--out", "r"], "p.txt",
     b"a cat\n", "--prompts p.txt line 1 column 1: invalid JSON"),
    # a good one (COCO, read as captions: not as one JSON-text prompt) gets as far as the model
    (["train-refiner", "--model", "m", "--prompts", "captions_val2017.json", "--out", "r"], "captions_val2017.json",
     json.dumps(COCO).encode(), "m is not a diffusers model folder"),
    (["collect-pairs", "--toy", "--prompts", "p.txt", "--out", "p"], "p.txt", b"a\n",
     "--prompts p.txt: the toy model's prompts are its 10 class labels"),
    (["collect-pairs", "--model", "m", "--prompts", "p.txt", "--prompt-limit", "-1"], "p.txt", b"a\n",
     "--prompt-limit: expected a whole number >= 0, got -1"),
]


@pytest.mark.parametrize("argv, file, content, message", CLI_CASES, ids=lambda v: v if isinstance(v, str) else None)
def test_cli_prompts(argv, file, content, message, tmp_path: Path, monkeypatch, capsys):
    from noisecraft.__main__ import main

    (tmp_path / file).write_bytes(content)
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"noisecraft {argv[0]}: ") and message in err[-1], err
    assert not (tmp_path / argv[-1]).exists()


def test_cli_binary_prompt_file_is_one_line_without_traceback(tmp_path: Path):
    """The real command (a subprocess): a binary file as --prompts is refused (it used to train, rc 0)."""
    (tmp_path / "weights.bin.txt").write_bytes(bytes(range(128)))  # valid UTF-8, binary
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("NOISECRAFT_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "noisecraft", "collect-pairs", "--model", "m", "--prompts",
                           "weights.bin.txt", "--out", "p"], cwd=str(tmp_path), env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == ("noisecraft collect-pairs: --prompts weights.bin.txt line 1: control character \\x00 in "
                           "the prompt: prompts are plain text: remove it (or check that this is a prompt file, not a "
                           "binary one)\n")
