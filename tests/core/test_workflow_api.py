"""UI-format -> API-format conversion, ``--set`` and workflow files, without ComfyUI (tier 1).

The converter runs on the shipped example workflows with ``data/object_info_examples.json``: the parts of a
real server's ``/object_info`` the converter reads, for the node types of the examples (written and checked
against the server by ``tests/e2e/test_run_graph.py``). Variants of the examples cover muted, bypassed,
reroute and primitive nodes, converted widgets, list values and subgraphs.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from noisecraft.workflow_api import WorkflowError, apply_sets, parse_set, parse_value, read_workflow, ui_to_api

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "example_workflows").glob("*.json"))
OBJECT_INFO = json.loads((Path(__file__).parent / "data" / "object_info_examples.json").read_text())


def load(name: str) -> dict:
    return json.loads((REPO / "example_workflows" / f"{name}.json").read_text())


def node(ui: dict, node_id: int) -> dict:
    return next(n for n in ui["nodes"] if n["id"] == node_id)


def add_link(ui: dict, src: int, slot: int, dst: int, input_name: str, typ: str) -> None:
    """Link ``src``'s output ``slot`` to ``dst``'s input ``input_name`` (added as a socket if it is a widget)."""
    link_id = max(lk[0] for lk in ui["links"]) + 1
    ui["links"].append([link_id, src, slot, dst, 0, typ])
    target = node(ui, dst)
    inp = next((i for i in target.get("inputs", []) if i["name"] == input_name), None)
    if inp is None:
        inp = {"name": input_name, "type": typ, "widget": {"name": input_name}}
        target.setdefault("inputs", []).append(inp)
    inp["link"] = link_id


# -- conversion --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_example_converts_with_every_node_link_and_title(path):
    ui = json.loads(path.read_text())
    api = ui_to_api(ui, OBJECT_INFO)
    runs = [n for n in ui["nodes"] if n["type"] not in ("Note", "MarkdownNote")]
    assert sorted(api) == sorted(str(n["id"]) for n in runs)
    for n in runs:
        entry = api[str(n["id"])]
        assert entry["class_type"] == n["type"]
        assert entry["_meta"]["title"] == (n.get("title") or OBJECT_INFO[n["type"]]["display_name"] or n["type"])
        info = OBJECT_INFO[n["type"]]
        assert set(info["input_order"]["required"]) <= set(entry["inputs"]), n["type"]
        for inp in n.get("inputs", []):
            if inp.get("link") is not None:
                src = next(lk for lk in ui["links"] if lk[0] == inp["link"])
                assert entry["inputs"][inp["name"]] == [str(src[1]), src[2]]


def test_widget_values_map_to_names_past_the_seed_control_value():
    api = ui_to_api(load("noise_to_latent"), OBJECT_INFO)
    ks = api["7"]["inputs"]  # ["disable", 0, "fixed", 20, 7.0, "euler", "normal", 0, 10000, "disable"]
    assert {k: ks[k] for k in ("add_noise", "noise_seed", "steps", "cfg", "sampler_name", "scheduler",
                               "start_at_step", "end_at_step", "return_with_leftover_noise")} == {
        "add_noise": "disable", "noise_seed": 0, "steps": 20, "cfg": 7.0, "sampler_name": "euler",
        "scheduler": "normal", "start_at_step": 0, "end_at_step": 10000, "return_with_leftover_noise": "disable"}
    sel = api["5"]["inputs"]  # [0, "fixed", 8, 4, 7.0, ...]: seed, its control value, candidates, score_steps
    assert (sel["seed"], sel["candidates"], sel["score_steps"], sel["cfg"]) == (0, 8, 4, 7.0)


def test_an_int_named_seed_has_the_control_value_unless_its_input_says_false():
    """The frontend's old convention (useIntWidget): `control_after_generate ?? name in (seed, noise_seed)`."""
    ui = load("collect_npnet_pairs")
    spec = OBJECT_INFO["NC_TrainNPNet"]["input"]["required"]["seed"]
    assert spec[0] == "INT" and "control_after_generate" not in (spec[1:] or [{}])[0]
    assert node(ui, 6)["widgets_values"] == [100, 0.001, 16, 0, "fixed", "small"]
    inputs = ui_to_api(ui, OBJECT_INFO)["6"]["inputs"]
    assert (inputs["seed"], inputs["size"]) == (0, "small")
    info = copy.deepcopy(OBJECT_INFO)
    info["NC_TrainNPNet"]["input"]["required"]["seed"] = ["INT", {"control_after_generate": False}]
    node(ui, 6)["widgets_values"] = [100, 0.001, 16, 0, "official"]
    assert ui_to_api(ui, info)["6"]["inputs"]["size"] == "official"


def test_a_widget_added_after_the_workflow_was_saved_gets_its_default():
    ui = load("train_refiner")
    assert len(node(ui, 8)["widgets_values"]) == 8  # seven widgets and the seed's control value, saved before
    inputs = ui_to_api(ui, OBJECT_INFO)["8"]["inputs"]  # Train Refiner had its optional inputs
    assert (inputs["steps"], inputs["rank"], inputs["alpha"], inputs["seed"]) == (200, 16, 0.0, 0)
    optional = {name: spec for name, spec in OBJECT_INFO["NC_TrainRefiner"]["input"]["optional"].items()
                if len(spec) > 1 and "default" in spec[1]}  # the widgets (sockets such as a VAE stay unset)
    assert optional and {name: inputs[name] for name in optional} == {
        name: spec[1]["default"] for name, spec in optional.items()}
    assert "vae" not in inputs


def test_a_converted_widget_takes_its_link_and_the_other_values_stay_in_place():
    ui = load("noise_to_latent")
    add_link(ui, 5, 1, 7, "noise_seed", "INT")  # Inversion-Stability Select's best_seed -> noise_seed
    ks = ui_to_api(ui, OBJECT_INFO)["7"]["inputs"]
    assert ks["noise_seed"] == ["5", 1] and ks["steps"] == 20 and ks["cfg"] == 7.0


def test_a_primitive_node_gives_its_value_and_is_not_sent():
    ui = load("npnet_golden_noise")
    ui["nodes"].append({"id": 50, "type": "PrimitiveNode", "mode": 0, "inputs": [],
                        "outputs": [{"name": "INT", "type": "INT", "links": []}], "widgets_values": [7, "fixed"]})
    add_link(ui, 50, 0, 10, "steps", "INT")
    api = ui_to_api(ui, OBJECT_INFO)
    assert "50" not in api and api["10"]["inputs"]["steps"] == 7


def test_a_reroute_is_followed_to_its_source():
    ui = load("npnet_golden_noise")
    vae_link = next(i["link"] for i in node(ui, 12)["inputs"] if i["name"] == "vae")
    origin = next(lk for lk in ui["links"] if lk[0] == vae_link)
    ui["nodes"].append({"id": 60, "type": "Reroute", "mode": 0, "inputs": [{"name": "", "type": "*", "link": 90}],
                        "outputs": [{"name": "", "type": "VAE", "links": [vae_link]}]})
    ui["links"].append([90, origin[1], origin[2], 60, 0, "VAE"])
    origin[1], origin[2] = 60, 0
    api = ui_to_api(ui, OBJECT_INFO)
    assert "60" not in api and api["12"]["inputs"]["vae"] == ["1", 2]


def test_a_bypassed_node_passes_its_input_of_the_same_type_through():
    ui = load("refined_guidance_free")
    node(ui, 7)["mode"] = 4  # Refine Noise bypassed: the samplers get RandomNoise's NOISE
    api = ui_to_api(ui, OBJECT_INFO)
    assert "7" not in api and api["11"]["inputs"]["noise"] == ["5", 0]
    ui = load("train_refiner_pag")
    node(ui, 10)["mode"] = 4  # PAG bypassed: the teacher samples the checkpoint's own MODEL
    api = ui_to_api(ui, OBJECT_INFO)
    assert "10" not in api and api["7"]["inputs"]["model"] == ["1", 0]


def test_a_muted_node_is_left_out_and_a_required_input_it_fed_is_an_error():
    ui = load("refined_guidance_free")
    node(ui, 17)["mode"] = 2  # the second Save Image muted: it and nothing else disappears
    api = ui_to_api(ui, OBJECT_INFO)
    assert "17" not in api and "16" in api
    node(ui, 6)["mode"] = 2  # Load Refiner muted: Refine Noise has no refiner
    with pytest.raises(WorkflowError, match=r"node 7 \(NC_RefineNoise 'Refine Noise'\) has no value for its required "
                                            r"input 'refiner': its source, node 6 \(NC_LoadRefiner 'Load Refiner'\), "
                                            r"is muted; connect it"):
        ui_to_api(ui, OBJECT_INFO)


def test_list_values_are_wrapped_so_the_server_does_not_read_them_as_links():
    ui = load("refined_guidance_free")
    node(ui, 2)["widgets_values"] = [["a", "b"]]
    assert ui_to_api(ui, OBJECT_INFO)["2"]["inputs"]["text"] == {"__value__": ["a", "b"]}


def test_widget_values_stored_by_name_are_read_by_name():
    ui = load("refined_guidance_free")
    node(ui, 10)["widgets_values"] = {"steps": 9, "scheduler": "karras", "denoise": 0.5}
    assert ui_to_api(ui, OBJECT_INFO)["10"]["inputs"] | {"model": None} == {
        "steps": 9, "scheduler": "karras", "denoise": 0.5, "model": None}


@pytest.mark.parametrize("change, message", [
    (lambda ui: node(ui, 7).update(type="NC_NotInstalled"),
     r"node 7 \(NC_NotInstalled 'Refine Noise'\): the server has no node type 'NC_NotInstalled'; install the custom "
     r"node pack that provides it"),
    (lambda ui: node(ui, 7).update(type="2f0e3e2c-9a8b-4c1d-8e7f-0a1b2c3d4e5f"),
     r"node 7 \(2f0e3e2c-.*\) is a subgraph, which run-graph does not convert: unpack it in ComfyUI"),
    (lambda ui: node(ui, 7).update(type="workflow>my group"),
     r"is a legacy group node, which run-graph does not convert"),
    (lambda ui: [n.update(mode=2) for n in ui["nodes"]], r"the workflow has no node that runs"),
])
def test_what_cannot_be_converted_is_one_clear_error(change, message):
    ui = copy.deepcopy(load("refined_guidance_free"))
    change(ui)
    with pytest.raises(WorkflowError, match=message):
        ui_to_api(ui, OBJECT_INFO)


# -- --set ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, value", [
    ("10", 10), ("1e-4", 1e-4), ("true", True), ('"7"', "7"), ("[1, 2]", [1, 2]), ("null", None),
    ("euler", "euler"), ("a red fox", "a red fox"), ("", ""), ("NaN", "NaN"), ("-Infinity", "-Infinity"),
])
def test_set_values_are_json_when_they_parse_else_strings(text, value):
    assert parse_value(text) == value


def test_set_splits_node_and_input_at_the_last_dot_before_the_first_equals():
    assert parse_set("5.steps=10") == ("5", "steps", 10)
    assert parse_set("CFGGuider (cfg 1.0).cfg=1.5") == ("CFGGuider (cfg 1.0)", "cfg", 1.5)
    assert parse_set("Positive.text=a=b") == ("Positive", "text", "a=b")


@pytest.mark.parametrize("text", ["5steps=10", "5.steps", ".steps=1", "5.=1", "=1"])
def test_a_malformed_set_says_the_expected_form(text):
    with pytest.raises(WorkflowError, match=r"expected NODE\.INPUT=VALUE \(NODE a node id or title"):
        parse_set(text)


def test_set_addresses_a_node_by_id_title_display_name_or_unique_type():
    api = ui_to_api(load("refined_guidance_free"), OBJECT_INFO)
    apply_sets(api, ["4.width=128", "Positive.text=a boat", "Load Refiner.refiner_name=mine.safetensors",
                     "Empty Latent Image.height=96", "BasicScheduler.steps=4", "4.width=64"], OBJECT_INFO)
    assert (api["4"]["inputs"]["width"], api["4"]["inputs"]["height"]) == (64, 96)  # a later --set wins
    assert api["2"]["inputs"]["text"] == "a boat" and api["10"]["inputs"]["steps"] == 4
    assert api["6"]["inputs"]["refiner_name"] == "mine.safetensors"


@pytest.mark.parametrize("flag, message", [
    ("Nowhere.steps=3", r"no node with the id, title or type 'Nowhere' in the graph that runs .*; its nodes: 1 "),
    ("99.steps=3", r"no node with the id, title or type '99'"),
    ("SamplerCustomAdvanced.noise=1", r"2 nodes have the type 'SamplerCustomAdvanced' \(ids 11, 15\); name the node "
                                      r"by its id instead"),
    ("10.stepz=3", r"node 10 \(BasicScheduler\) has no input 'stepz'; its inputs: model, scheduler, steps, denoise"),
])
def test_a_bad_set_is_one_clear_error(flag, message):
    api = ui_to_api(load("refined_guidance_free"), OBJECT_INFO)
    with pytest.raises(WorkflowError, match=message):
        apply_sets(api, [flag], OBJECT_INFO)


def test_an_ambiguous_title_asks_for_the_id():
    api = ui_to_api(load("refined_guidance_free"), OBJECT_INFO)
    api["3"]["_meta"]["title"] = "Positive"
    with pytest.raises(WorkflowError, match=r"2 nodes have the title 'Positive' \(ids 2, 3\)"):
        apply_sets(api, ["Positive.text=x"], OBJECT_INFO)


# -- workflow files ---------------------------------------------------------------------------------------


def test_read_workflow_tells_ui_from_api_format(tmp_path):
    ui = load("stability_select")
    api = ui_to_api(ui, OBJECT_INFO)
    for name, data, is_ui in (("ui.json", ui, True), ("api.json", api, False), ("body.json", {"prompt": api}, False)):
        (tmp_path / name).write_text(json.dumps(data))
        assert read_workflow(tmp_path / name) == (api if not is_ui else ui, is_ui)


@pytest.mark.parametrize("content, message", [
    ("{not json", r"is not JSON \(Expecting property name .* at line 1, column 2\); expected a workflow saved from "
                  r"ComfyUI"),
    ("[1, 2]", r"is not a ComfyUI workflow: expected the UI format .* got a JSON list"),
    ('{"nodes": 3, "version": 0.4}', r"is not a ComfyUI workflow: .* got an object with keys 'nodes', 'version'"),
    ('{"1": {"class_type": 5, "inputs": {}}}', r"node 1 has no class_type name or no inputs object"),
    ("", r"is not JSON \(Expecting value at line 1, column 1\)"),
])
def test_a_bad_workflow_file_is_one_clear_error(tmp_path, content, message):
    path = tmp_path / "w.json"
    path.write_text(content)
    with pytest.raises(WorkflowError, match=message):
        read_workflow(path)


def test_a_missing_file_and_a_folder_are_clear_errors(tmp_path):
    with pytest.raises(WorkflowError, match=r"no such file; expected a workflow saved from ComfyUI"):
        read_workflow(tmp_path / "missing.json")
    with pytest.raises(WorkflowError, match=r"is a folder; expected a workflow file"):
        read_workflow(tmp_path)
