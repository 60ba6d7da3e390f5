"""ComfyUI workflows as the server runs them: UI format -> API format, and ``--set`` overrides.

A workflow saved from ComfyUI (File > Save; the UI or "litegraph" format) lists nodes with their
widget values *by position* (``widgets_values``) and links as ``[id, from node, from slot, to node,
to slot, type]``; the server's ``POST /prompt`` takes only the API format, ``{node id: {"class_type",
"inputs": {name: value or [from node, from slot]}}}``. :func:`ui_to_api` converts the first to the
second with the server's ``/object_info``, which gives every node type's inputs in widget order.

Why our own converter. The ComfyUI server has none (``/prompt`` takes the API format only; ComfyUI
issue #2275 asks for one and is open; checked in v0.3.64 and 0.38.1). The frontend package
(``comfyui-frontend-package``) has ``graphToPrompt`` only as JavaScript in its browser bundle: it
serializes live LiteGraph widget objects, so running it needs a browser. comfy-cli 1.23 ships
``comfy_cli.workflow_to_api.convert_ui_to_api`` (what ``comfy run --workflow`` uses), itself a hand-written port
of a third-party converter, in an internal module of a CLI application with 23 dependencies (uv, ruff, two
telemetry SDKs, cookiecutter, GitPython, an ffmpeg binary) that would all land in ComfyUI's environment for one
function with no stable API.
So this module maps widget values to input names from ``/object_info`` as the frontend does (tested equal to
the frontend's ``graphToPrompt`` in a real browser on every example workflow: tests/js/test_graph_to_prompt.py):

- widgets are the inputs of a widget type (INT, FLOAT, STRING, BOOLEAN, COMBO or an option list) without
  ``forceInput``, in ``input_order`` (required, then optional); an input with ``control_after_generate``
  (and, by the frontend's old convention, an INT named seed or noise_seed that does not say
  ``control_after_generate: False``) is followed by one extra value ("fixed", "randomize", ...) that is not
  an input, and an input with an ``*_upload`` option (Load Image) by the upload button's value; a value
  missing at the end (a widget added to the node after the workflow was saved) takes the input's default;
- a linked input (also a widget converted to an input) takes the link; a list value is sent as
  ``{"__value__": [...]}`` so that the server does not read it as a link;
- muted nodes (mode 2) are left out, and inputs fed by them are dropped; bypassed nodes (mode 4) are left
  out and a link from one is followed to its first input of the link's type (the same slot first, as
  the frontend does); ``Reroute`` nodes are followed; a ``PrimitiveNode`` gives its value to the inputs it
  feeds; ``Note`` and ``MarkdownNote`` are skipped; groups are layout only and ignored.

Not converted (a :class:`WorkflowError` says what to do): subgraphs and legacy group nodes (unpack them
in ComfyUI, or export with File > Export (API)); node types the server does not know. Not reproduced: the
browser's random pick for ``{a|b}`` choices in a dynamic-prompt text (the text is sent as written).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Optional, Union

WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
MUTED, BYPASSED = 2, 4
NOTE_TYPES = frozenset({"Note", "MarkdownNote"})
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.IGNORECASE)
_EXPORT_API = "or open it in ComfyUI and save it with File > Export (API)"


class WorkflowError(ValueError):
    """A workflow file or a ``--set`` that cannot be used: the message says what and the fix (one line)."""


# -- reading -------------------------------------------------------------------------------------------


def is_ui_format(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("nodes"), list) and isinstance(data.get("links"), list)


def is_api_format(data: Any) -> bool:
    return isinstance(data, dict) and bool(data) and all(
        isinstance(v, dict) and "class_type" in v for v in data.values())


def read_workflow(path: Union[str, Path]) -> tuple[dict, bool]:
    """``(workflow, is_ui)`` from a JSON file in UI or API format (also a ``{"prompt": <API>}`` body)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise WorkflowError(f"{path}: no such file; expected a workflow saved from ComfyUI (.json)") from None
    except IsADirectoryError:
        raise WorkflowError(f"{path} is a folder; expected a workflow file saved from ComfyUI (.json)") from None
    except UnicodeDecodeError:
        raise WorkflowError(f"{path} is not a text file; expected a workflow saved from ComfyUI (.json)") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise WorkflowError(f"{path} is not JSON ({err.msg} at line {err.lineno}, column {err.colno}); expected a "
                            f"workflow saved from ComfyUI (File > Save, or File > Export (API))") from None
    if isinstance(data, dict) and is_api_format(data.get("prompt")):
        data = data["prompt"]
    if is_ui_format(data):
        return data, True
    if is_api_format(data):
        for key, node in data.items():
            if not isinstance(node.get("class_type"), str) or not isinstance(node.get("inputs", {}), dict):
                raise WorkflowError(f"{path}: node {key} has no class_type name or no inputs object; expected "
                                    f"API format {{id: {{'class_type': str, 'inputs': {{...}}}}}}: re-export it "
                                    f"from ComfyUI")
        return data, False
    if isinstance(data, dict):
        got = f"an object with keys {', '.join(map(repr, list(data)[:6])) or '(none)'}"
    else:
        got = f"a JSON {type(data).__name__}"
    raise WorkflowError(f"{path} is not a ComfyUI workflow: expected the UI format (an object with 'nodes' and "
                        f"'links' lists) or the API format ({{node id: {{'class_type', 'inputs'}}}}), got {got}")


# -- UI -> API -----------------------------------------------------------------------------------------


def _opts(spec) -> dict:
    return spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}


def _is_widget(spec) -> bool:
    if not isinstance(spec, (list, tuple)) or not spec:
        return False
    kind = spec[0]
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not _opts(spec).get("forceInput", False)


def _extra_values(name: str, spec) -> int:
    """Values the UI stores after this widget's own: the seed's control mode, an upload button. Like the frontend
    (``useIntWidget``: ``control_after_generate ?? ['seed', 'noise_seed'].includes(name)``), an INT named seed
    or noise_seed has the control unless its input says ``control_after_generate: False``."""
    opts = _opts(spec)
    legacy_seed = spec[0] == "INT" and name in ("seed", "noise_seed")
    extra = 1 if opts.get("control_after_generate", legacy_seed) else 0
    return extra + sum(1 for k, v in opts.items() if k.endswith("_upload") and v is True)


def _wrap(value):
    return {"__value__": value} if isinstance(value, list) else value


def _links(ui: dict) -> dict:
    out = {}
    for link in ui.get("links") or []:
        if isinstance(link, dict):  # schema version 1
            out[link["id"]] = (link["origin_id"], link["origin_slot"], link.get("type"))
        elif isinstance(link, list) and len(link) >= 6:
            out[link[0]] = (link[1], link[2], link[5])
    return out


def _describe(node: dict) -> str:
    title = node.get("title")
    return f"node {node.get('id')} ({node.get('type')}{f' {title!r}' if title else ''})"


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """The API-format prompt for UI-format workflow ``ui``, given the server's ``/object_info``.

    Returns ``{str(node id): {"class_type", "inputs", "_meta": {"title"}}}`` for every node that runs.
    Raises :class:`WorkflowError` for what cannot be converted (see the module docstring)."""
    nodes = {n.get("id"): n for n in ui["nodes"] if isinstance(n, dict)}
    subgraphs = (ui.get("definitions") or {}).get("subgraphs") or []
    for n in nodes.values():
        kind = str(n.get("type", ""))
        if _UUID.match(kind) or any(isinstance(s, dict) and s.get("id") == kind for s in subgraphs):
            raise WorkflowError(f"{_describe(n)} is a subgraph, which run-graph does not convert: unpack it in "
                                f"ComfyUI (right-click > Unpack Subgraph) and save again, {_EXPORT_API}")
        if kind.startswith(("workflow>", "workflow/")):
            raise WorkflowError(f"{_describe(n)} is a legacy group node, which run-graph does not convert: convert it "
                                f"to nodes in ComfyUI and save again, {_EXPORT_API}")
    links = _links(ui)

    def source(link_id, depth: int = 0):
        """("link", [id, slot]), ("value", v), or (None, why) for the node output behind ``link_id``."""
        if link_id not in links or depth > len(nodes):
            return None, f"link {link_id} is missing from the workflow's links"
        from_id, slot, typ = links[link_id]
        src = nodes.get(from_id)
        if src is None:
            return None, f"its source node {from_id} is missing from the workflow"
        kind, mode = src.get("type"), src.get("mode", 0)
        if mode == MUTED:
            return None, f"its source, {_describe(src)}, is muted"
        if kind == "PrimitiveNode":
            values = src.get("widgets_values") or []
            return ("value", values[0]) if values else (None, f"its source, {_describe(src)}, has no value")
        inputs = [i for i in src.get("inputs") or [] if isinstance(i, dict)]
        if kind == "Reroute":
            linked = [i["link"] for i in inputs if i.get("link") is not None]
            return source(linked[0], depth + 1) if linked else (None, f"its source, {_describe(src)}, is unconnected")
        if mode == BYPASSED:
            same = [inputs[slot]] if isinstance(slot, int) and slot < len(inputs) else []
            match = next((i for i in same + inputs if i.get("type") == typ), None)  # the frontend's choice
            if match is not None and match.get("link") is not None:
                return source(match["link"], depth + 1)
            return None, f"its source, {_describe(src)}, is bypassed and has no connected {typ} input to pass on"
        if kind in NOTE_TYPES:
            return None, f"its source, {_describe(src)}, is a note"
        return "link", [str(from_id), slot]

    api = {}
    for n in nodes.values():
        kind = n.get("type")
        if kind in NOTE_TYPES or kind in ("Reroute", "PrimitiveNode") or n.get("mode", 0) in (MUTED, BYPASSED):
            continue
        info = object_info.get(kind)
        if info is None:
            raise WorkflowError(f"{_describe(n)}: the server has no node type {kind!r}; install the custom node pack "
                                f"that provides it on the server and restart it (or remove the node)")
        req = info.get("input", {}).get("required") or {}
        opt = info.get("input", {}).get("optional") or {}
        order = info.get("input_order") or {"required": list(req), "optional": list(opt)}
        stored = n.get("widgets_values")
        inputs: dict = {}
        pos = 0
        for name in list(order.get("required") or []) + list(order.get("optional") or []):
            spec = req.get(name, opt.get(name))
            if not _is_widget(spec):
                continue
            if isinstance(stored, dict):
                if name in stored:
                    inputs[name] = _wrap(stored[name])
            elif isinstance(stored, list) and pos < len(stored):
                inputs[name] = _wrap(stored[pos])
            elif "default" in _opts(spec):
                inputs[name] = _wrap(_opts(spec)["default"])
            pos += 1 + _extra_values(name, spec)
        missing = {}
        for inp in n.get("inputs") or []:
            if not isinstance(inp, dict) or inp.get("link") is None:
                continue
            what, value = source(inp["link"])
            if what is None:
                inputs.pop(inp.get("name"), None)
                missing[inp.get("name")] = value
            else:
                inputs[inp.get("name")] = _wrap(value) if what == "value" else value
        for name in order.get("required") or []:
            if name not in inputs:
                why = missing.get(name, "it is not connected")
                raise WorkflowError(f"{_describe(n)} has no value for its required input {name!r}: {why}; connect "
                                    f"it in ComfyUI (or give it with --set {n.get('id')}.{name}=VALUE)")
        title = n.get("title") or info.get("display_name") or kind
        api[str(n.get("id"))] = {"class_type": kind, "inputs": inputs, "_meta": {"title": title}}
    if not api:
        raise WorkflowError("the workflow has no node that runs (all are notes, muted or bypassed)")
    return api


# -- --set NODE.INPUT=VALUE ----------------------------------------------------------------------------


def parse_value(text: str):
    """``text`` as JSON when it parses to a finite value (``10``, ``1e-4``, ``true``, ``"7"``, ``[1, 2]``), else the
    string itself (``euler``, ``a red fox``)."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    if isinstance(value, float) and not math.isfinite(value):  # json reads NaN and Infinity
        return text
    return value


def parse_set(text: str) -> tuple[str, str, Any]:
    """``"NODE.INPUT=VALUE"`` -> ``(NODE, INPUT, value)``; NODE may itself contain dots (a title): the input name is
    after the last dot before the first ``=``."""
    left, eq, raw = text.partition("=")
    node, dot, name = left.rpartition(".")
    if not eq or not dot or not node.strip() or not name.strip():
        raise WorkflowError(f"--set {text!r}: expected NODE.INPUT=VALUE (NODE a node id or title, INPUT an input "
                            f"name), e.g. --set 5.steps=10 or --set 'Load Refiner.refiner_name=my.safetensors'")
    return node.strip(), name.strip(), parse_value(raw)


def find_node(prompt: dict, ref: str, *, what: str = "--set") -> str:
    """The id of the node ``ref`` names in ``prompt``: its id, else its title, else its class type (each unique)."""
    if ref in prompt:
        return ref
    for label, key in (("title", lambda n: (n.get("_meta") or {}).get("title")), ("type", lambda n: n["class_type"])):
        hits = [k for k, n in prompt.items() if key(n) == ref]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise WorkflowError(f"{what}: {len(hits)} nodes have the {label} {ref!r} (ids {', '.join(hits)}); name the "
                                f"node by its id instead")
    known = ", ".join(f"{k} {(n.get('_meta') or {}).get('title') or n['class_type']!r}" for k, n in prompt.items())
    raise WorkflowError(f"{what}: no node with the id, title or type {ref!r} in the graph that runs (muted and "
                        f"bypassed nodes are not in it); its nodes: {known}")


def apply_sets(prompt: dict, sets: list[str], object_info: Optional[dict] = None) -> dict:
    """``prompt`` with every ``NODE.INPUT=VALUE`` of ``sets`` applied, in order (a later one wins). With
    ``object_info`` the input name is checked against the node type's inputs."""
    for text in sets:
        ref, name, value = parse_set(text)
        key = find_node(prompt, ref, what=f"--set {text!r}")
        node = prompt[key]
        info = (object_info or {}).get(node["class_type"])
        if info is not None:
            spec, order = info.get("input") or {}, info.get("input_order") or {}
            names = [*(order.get("required") or spec.get("required") or {}),
                     *(order.get("optional") or spec.get("optional") or {})]
            if name not in names:
                raise WorkflowError(f"--set {text!r}: node {key} ({node['class_type']}) has no input {name!r}; its "
                                    f"inputs: {', '.join(names) or '(none)'}")
        node.setdefault("inputs", {})[name] = _wrap(value)
    return prompt
