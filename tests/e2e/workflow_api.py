"""UI-format (litegraph) workflow -> API-format prompt, using a server's ``/object_info``.

The UI format stores widget values positionally, in the order of the node's widget inputs in
``/object_info``'s ``input_order`` (required, then optional), with one extra value after every
INT/COMBO that has ``control_after_generate`` ("fixed", "randomize", ...). Links are
``[id, from_node, from_slot, to_node, to_slot, type]``. Muted nodes (mode 2) are dropped;
bypassed nodes (mode 4) are passed through to the first input of the same type.

Not supported (the test fails loudly on them): subgraphs and node types unknown to the server.
Frontend-only annotation nodes (Note, MarkdownNote) are skipped.
"""

from __future__ import annotations

from typing import Optional

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY = {"Note", "MarkdownNote"}


class WorkflowError(ValueError):
    pass


def _is_widget(spec) -> bool:
    kind = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not opts.get("forceInput", False)


def _has_control(spec) -> bool:
    return len(spec) > 1 and isinstance(spec[1], dict) and bool(spec[1].get("control_after_generate"))


def to_api(ui: dict, object_info: dict, substitute: Optional[dict] = None, overrides: Optional[dict] = None) -> dict:
    """Convert; ``substitute`` maps node types to stand-ins with the same widgets and outputs,
    ``overrides`` maps a node type to ``{input name: value}`` to force after conversion."""
    substitute = substitute or {}
    overrides = overrides or {}
    if ui.get("definitions", {}).get("subgraphs"):
        raise WorkflowError("subgraphs are not supported by this converter")
    nodes = {n["id"]: n for n in ui["nodes"]}
    links = {l[0]: l for l in ui.get("links", [])}

    def source(link_id):
        _, from_id, from_slot, _, _, typ = links[link_id][:6]
        src = nodes[from_id]
        if src.get("mode", 0) == 4:  # bypassed: follow the first input of the same type
            for inp in src.get("inputs", []):
                if inp.get("link") is not None and inp.get("type") == typ:
                    return source(inp["link"])
            raise WorkflowError(f"bypassed node {from_id} has no input of type {typ} to pass through")
        return [str(from_id), from_slot]

    api = {}
    for n in ui["nodes"]:
        if n["type"] in FRONTEND_ONLY or n.get("mode", 0) in (2, 4):
            continue
        class_type = substitute.get(n["type"], n["type"])
        if class_type not in object_info:
            raise WorkflowError(f"node {n['id']} has type {class_type!r}, which the server does not know")
        info = object_info[class_type]
        req = info["input"].get("required", {})
        opt = info["input"].get("optional", {})
        order = info.get("input_order", {"required": list(req), "optional": list(opt)})
        linked = {i["name"]: i["link"] for i in n.get("inputs", []) if i.get("link") is not None}
        values = list(n.get("widgets_values") or [])
        if isinstance(n.get("widgets_values"), dict):
            raise WorkflowError(f"node {n['id']} ({n['type']}) stores widgets as a dict; not supported")
        pos = 0
        inputs = {}
        for name in order.get("required", []) + order.get("optional", []):
            spec = req.get(name) or opt.get(name)
            if _is_widget(spec):
                if pos < len(values):
                    inputs[name] = values[pos]
                pos += 1 + (1 if _has_control(spec) else 0)
            if name in linked:
                inputs[name] = source(linked[name])
        for name in order.get("required", []):
            if name not in inputs:
                raise WorkflowError(f"node {n['id']} ({class_type}) has no value or link for required input {name!r}")
        inputs.update(overrides.get(n["type"], {}))
        api[str(n["id"])] = {"class_type": class_type, "inputs": inputs, "_meta": {"title": n.get("title", n["type"])}}
    return api
