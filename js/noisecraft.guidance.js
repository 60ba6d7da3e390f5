// NoiseCraft: "guidance off" toggle on Refine Noise (NC_RefineNoise).
//
// Refined noise is meant to be sampled without guidance (cfg 1, one model pass per step). The toggle
// finds the sampler/guider nodes fed by this node's NOISE output and sets their `cfg` widget to 1.0;
// toggled back, it restores the values it replaced.
//
// Which nodes: starting at the NOISE output, links are followed downstream through non-sampler
// nodes (reroutes, Noise to Latent, ...) until a sampler is reached, i.e. a node with a `cfg` widget
// (KSamplerAdvanced-style) or with a GUIDER input (SamplerCustomAdvanced). A GUIDER input is followed
// upstream to its guider (CFGGuider) and that guider's `cfg` widget is used. Traversal stops at
// samplers, so a second pass further down the graph (hires fix, upscaler) keeps its cfg.
//
// Persistence: the state lives in this node's `properties` (saved in the workflow JSON):
//   noisecraft_guidance_off: bool
//   noisecraft_saved_cfg: { "<node id>": <cfg before switching off> }
// The toggle widget itself is not serialized (neither in widgets_values nor in the prompt), so
// workflows stay loadable without this extension and the server never sees it.
// Restoring leaves a cfg alone if the user changed it away from 1.0 while guidance was off.
import { app } from "../../scripts/app.js";

const NODE = "NC_RefineNoise";
const WIDGET = "guidance off";
const P_OFF = "noisecraft_guidance_off";
const P_SAVED = "noisecraft_saved_cfg";
const CFG_OFF = 1.0;
const MAX_VISIT = 256;

function getLink(graph, id) {
  if (id == null || !graph) return undefined;
  if (typeof graph.getLink === "function") return graph.getLink(id);
  const links = graph.links;
  return links?.get?.(id) ?? links?.[id];
}

function cfgWidget(node) {
  return node?.widgets?.find((w) => w.name === "cfg" && typeof w.value === "number");
}

function outputNodes(graph, node, slotFilter) {
  const out = [];
  (node.outputs || []).forEach((o, i) => {
    if (slotFilter && !slotFilter(o, i)) return;
    for (const id of o.links || []) {
      const link = getLink(graph, id);
      const target = link && graph.getNodeById(link.target_id);
      if (target) out.push(target);
    }
  });
  return out;
}

function guiderNodes(graph, node) {
  const out = [];
  for (const input of node.inputs || []) {
    if (input.type !== "GUIDER" || input.link == null) continue;
    const link = getLink(graph, input.link);
    let src = link && graph.getNodeById(link.origin_id);
    // walk back through reroutes (nodes whose only input carries the guider on)
    for (let hops = 0; src && !cfgWidget(src) && src.inputs?.length === 1 && hops < 16; hops++) {
      const up = getLink(graph, src.inputs[0].link);
      src = up && graph.getNodeById(up.origin_id);
    }
    if (src && cfgWidget(src)) out.push(src);
  }
  return out;
}

/** The nodes whose `cfg` the toggle controls, for a Refine Noise node. */
export function findGuidanceTargets(refineNode) {
  const graph = refineNode.graph ?? app.graph;
  if (!graph) return [];
  const found = new Map();
  const seen = new Set([refineNode.id]);
  const queue = outputNodes(graph, refineNode, (o) => o.type === "NOISE");
  while (queue.length && seen.size < MAX_VISIT) {
    const node = queue.shift();
    if (seen.has(node.id)) continue;
    seen.add(node.id);
    const guiders = guiderNodes(graph, node);
    const own = cfgWidget(node);
    if (own) found.set(node.id, node);
    for (const g of guiders) found.set(g.id, g);
    if (own || node.inputs?.some((i) => i.type === "GUIDER")) continue; // a sampler: stop here
    queue.push(...outputNodes(graph, node));
  }
  return [...found.values()];
}

function setCfg(node, value) {
  const w = cfgWidget(node);
  if (!w) return false;
  w.value = value;
  try {
    w.callback?.(w.value, app.canvas, node);
  } catch (e) {
    console.warn("[NoiseCraft] cfg widget callback failed", e);
  }
  return true;
}

function applyToggle(node, off) {
  const graph = node.graph ?? app.graph;
  node.properties = node.properties || {};
  if (off) {
    const saved = { ...(node.properties[P_SAVED] || {}) };
    const targets = findGuidanceTargets(node);
    for (const t of targets) {
      const w = cfgWidget(t);
      const key = String(t.id);
      if (!(key in saved) && w.value !== CFG_OFF) saved[key] = w.value;
      setCfg(t, CFG_OFF);
    }
    if (!targets.length) console.warn(`[NoiseCraft] ${NODE} #${node.id}: no sampler or guider with a cfg is fed by its NOISE`);
    node.properties[P_SAVED] = saved;
    node.properties[P_OFF] = true;
  } else {
    const saved = node.properties[P_SAVED] || {};
    for (const [key, value] of Object.entries(saved)) {
      const t = graph?.getNodeById(Number(key)) ?? graph?.getNodeById(key);
      const w = cfgWidget(t);
      if (!w) continue; // node removed since
      if (w.value === CFG_OFF) setCfg(t, value);
      else console.info(`[NoiseCraft] cfg of node #${key} was changed to ${w.value} while guidance was off; kept`);
    }
    node.properties[P_SAVED] = {};
    node.properties[P_OFF] = false;
  }
  node.setDirtyCanvas?.(true, true);
  graph?.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "noisecraft.guidance",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE) return;

    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated?.apply(this, arguments);
      this.properties = this.properties || {};
      if (!(P_OFF in this.properties)) this.properties[P_OFF] = false;
      if (!(P_SAVED in this.properties)) this.properties[P_SAVED] = {};
      const node = this;
      const widget = this.addWidget(
        "toggle",
        WIDGET,
        !!this.properties[P_OFF],
        (value) => {
          if (!!value !== !!node.properties[P_OFF]) applyToggle(node, !!value);
        },
        { on: "cfg 1", off: "as set", serialize: false },
      );
      widget.serialize = false; // not in widgets_values: the state is in properties
      widget.tooltip = "Sets cfg to 1.0 on the samplers/guiders fed by this noise (refined noise needs no "
        + "guidance); off restores their previous cfg. Saved with the workflow.";
      this.noisecraftGuidanceWidget = widget;
      return r;
    };

    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function (info) {
      const r = onConfigure?.apply(this, arguments);
      // properties were restored from the workflow JSON: show their state on the toggle
      const w = this.noisecraftGuidanceWidget;
      if (w) w.value = !!this.properties?.[P_OFF];
      return r;
    };
  },
});
