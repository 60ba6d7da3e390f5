"""Load Prompts (``NC_LoadPrompts``) inside ComfyUI: files from a temporary input folder set through ComfyUI's own
``folder_paths``, the same PromptSet as the core's reader, and a bad file as one line naming the node and the file.
"""

from __future__ import annotations

import asyncio
import importlib
import json

import pytest

import folder_paths

PICKSCORE_CSV = ("序号,caption,caption_zh,备注\n0,A curious cat exploring a haunted mansion,一只好奇的猫,\n87,,,\n"
                 '2,"Portrait, hyper-detailed",肖像,\n3,zentai,全包紧身衣,\n4,A curious cat exploring a haunted mansion,x,\n')


def pack(nc) -> str:
    return nc.noise.__name__.split(".")[0]


@pytest.fixture(scope="module")
def lp(nc):
    return importlib.import_module(f"{pack(nc)}.nodes.nodes_prompts")


@pytest.fixture(scope="module")
def core(nc):
    return importlib.import_module(f"{pack(nc)}.noisecraft.prompts")


@pytest.fixture
def input_dir(tmp_path):
    """ComfyUI's input folder pointed at a temporary one (restored afterwards), with prompt files and others."""
    saved = folder_paths.get_input_directory()
    root = tmp_path / "input"
    (root / "prompts").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / "pickscore.csv").write_text(PICKSCORE_CSV, encoding="utf-8")
    (root / "prompts" / "coco.json").write_text(json.dumps({"annotations": [{"caption": "A dog."}]}))
    (root / "lines.txt").write_text("one\ntwo\nthree\nfour\nfive\nsix\n")
    (root / "binary.txt").write_bytes(b"a cat\n\x00\x01weights\n")
    (root / "image.png").write_bytes(b"\x89PNG")
    (root / ".hidden" / "secret.txt").write_text("x\n")
    folder_paths.set_input_directory(str(root))
    try:
        yield root
    finally:
        folder_paths.set_input_directory(saved)


def test_schema_lists_the_input_folders_prompt_files(lp, nc, input_dir):
    schema = lp.LoadPrompts.define_schema()
    assert schema.node_id == "NC_LoadPrompts" and schema.category == "noisecraft/train"
    assert all(inp.tooltip and len(inp.tooltip) > 20 for inp in schema.inputs)
    file_input = next(i for i in schema.inputs if i.id == "file")
    assert file_input.options == ["binary.txt", "lines.txt", "pickscore.csv", "prompts/coco.json"]
    assert [o.io_type for o in schema.outputs] == ["NC_PROMPTS", "INT"]
    nodes = importlib.import_module(f"{pack(nc)}.nodes")
    ext = asyncio.run(nodes.comfy_entrypoint())
    assert lp.LoadPrompts in asyncio.run(ext.get_node_list())


@pytest.mark.parametrize("inputs, core_kw", [
    (dict(file="pickscore.csv"), {}),
    (dict(file="pickscore.csv", dedupe=True, column="caption_zh"), dict(dedupe=True, column="caption_zh")),
    (dict(file="lines.txt", limit=2, shuffle_seed=7, validation=2.0), dict(limit=2, shuffle_seed=7, validation=2)),
    (dict(file="lines.txt", validation=0.5), dict(validation=0.5)),
    (dict(file="prompts/coco.json"), {}),
])
def test_same_prompt_set_as_the_core(lp, core, input_dir, inputs, core_kw):
    defaults = dict(path="", column="", limit=0, shuffle_seed=-1, dedupe=False, validation=0.0)
    out = lp.LoadPrompts.execute(**{**defaults, **inputs})
    prompts, count = out.args
    want = core.read_prompts(input_dir / inputs["file"], **core_kw)
    assert isinstance(prompts, lp.NodePrompts) and prompts.prompt_set == want and count == len(want.train)
    assert out.ui["text"] == [want.describe()]


def test_path_input_replaces_the_combo(lp, core, input_dir, tmp_path):
    elsewhere = tmp_path / "elsewhere.jsonl"
    elsewhere.write_text('{"prompt": "x"}\n{"prompt": "y"}\n')
    for path in (str(elsewhere), "lines.txt"):  # absolute, and relative to the input folder
        got = lp.load_prompts("pickscore.csv", path=path)
        want = core.read_prompts(elsewhere if path.startswith("/") else input_dir / path)
        assert got.prompt_set == want


def test_reruns_when_the_file_changes(lp, input_dir):
    before = lp.LoadPrompts.fingerprint_inputs("lines.txt")
    assert lp.LoadPrompts.fingerprint_inputs("lines.txt") == before
    (input_dir / "lines.txt").write_text("changed, and longer than before\n")
    assert lp.LoadPrompts.fingerprint_inputs("lines.txt") != before
    missing = lp.LoadPrompts.fingerprint_inputs("gone.txt")
    assert missing != missing  # NaN: never equal, so the node runs and reports the missing file


@pytest.mark.parametrize("inputs, message", [
    (dict(file="binary.txt"), "binary.txt line 2: control character \\x00 in the prompt"),
    (dict(file="pickscore.csv", column="en"), "pickscore.csv line 1: no column named 'en' (columns found: '序号', "
                                              "'caption', 'caption_zh', '备注'): give one of them with the column input"),
    (dict(file="gone.txt"), "gone.txt: no such file"),
    (dict(file="lines.txt", validation=6.0), "validation 6 holds out 6 of the 6 prompts"),
    (dict(file="lines.txt", validation=2.5), "validation 2.5 is neither a fraction below 1 nor a whole count"),
    (dict(file="lines.txt", shuffle_seed=-2), "shuffle_seed must be an integer in [-1,"),
    (dict(file="lines.txt", format="xml"), "format: expected one of"),
    (dict(file="lines.txt", format="json"), "lines.txt line 1 column 1: invalid JSON"),
    (dict(file="../outside.txt"), "is not inside ComfyUI's input folder"),
    (dict(file=None), "no prompt file chosen"),
])
def test_bad_file_or_input_is_one_line(lp, input_dir, inputs, message):
    with pytest.raises(ValueError) as info:
        lp.load_prompts(**inputs)
    text = str(info.value)
    assert text.startswith("Load Prompts: ") and message in text and "\n" not in text, text
