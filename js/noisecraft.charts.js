// NoiseCraft: small charts on the stability nodes.
//
// NC_InversionStabilitySelect: one bar per candidate seed (batch item 0), the chosen seed highlighted.
// NC_OptimizeNoise: stability per optimization step, one line per batch item (up to 4).
// The data comes from the node's UI output (see nodes/nodes_stability.py):
//   Select:   noisecraft_scores [[K floats] per item], noisecraft_seeds [[K ints]], noisecraft_best_seeds [int per item]
//   Optimize: noisecraft_history [[steps+1 floats] per item], noisecraft_best [float per item]
// Nothing is drawn until the node has run. No external libraries.
import { app } from "../../scripts/app.js";

const SELECT = "NC_InversionStabilitySelect";
const OPTIMIZE = "NC_OptimizeNoise";
const CHART_H = 110; // chart height in canvas units, below the widgets
const PAD = 8;
const MAX_LINES = 4;
const LINE_COLORS = ["#5fb3f3", "#f3a35f", "#8fd37a", "#d77ad3"];

function finiteList(v) {
  return Array.isArray(v) ? v.map(Number).filter((x) => Number.isFinite(x)) : [];
}

// message -> {kind, ...} or null when the message holds nothing to draw
function selectChart(message) {
  const scores = finiteList(message?.noisecraft_scores?.[0]);
  if (!scores.length) return null;
  const seeds = Array.isArray(message.noisecraft_seeds?.[0]) ? message.noisecraft_seeds[0] : [];
  const bestSeed = message.noisecraft_best_seeds?.[0];
  let best = seeds.indexOf(bestSeed);
  if (best < 0) best = scores.indexOf(Math.max(...scores));
  const items = Array.isArray(message.noisecraft_scores) ? message.noisecraft_scores.length : 1;
  return { kind: "bars", scores, seeds, best, bestSeed, items };
}

function optimizeChart(message) {
  const history = (Array.isArray(message?.noisecraft_history) ? message.noisecraft_history : [])
    .map(finiteList)
    .filter((h) => h.length);
  if (!history.length) return null;
  return { kind: "lines", history: history.slice(0, MAX_LINES), items: history.length };
}

function range(values) {
  let lo = Math.min(...values);
  let hi = Math.max(...values);
  if (!(hi > lo)) {
    const d = Math.abs(hi) * 0.05 || 1;
    lo -= d;
    hi += d;
  }
  return [lo, hi];
}

function fmt(x) {
  return Math.abs(x) >= 100 || (Math.abs(x) < 0.01 && x !== 0) ? x.toExponential(2) : x.toFixed(4);
}

function drawFrame(ctx, x, y, w, h, title, lo, hi) {
  ctx.fillStyle = "rgba(0,0,0,0.25)";
  ctx.fillRect(x, y, w, h);
  ctx.strokeStyle = "rgba(255,255,255,0.15)";
  ctx.strokeRect(x + 0.5, y + 0.5, w - 1, h - 1);
  ctx.font = "10px sans-serif";
  ctx.fillStyle = "#bbb";
  ctx.textAlign = "left";
  ctx.textBaseline = "top";
  ctx.fillText(title, x + 4, y + 3);
  ctx.textAlign = "right";
  ctx.fillText(fmt(hi), x + w - 4, y + 3);
  ctx.textBaseline = "bottom";
  ctx.fillText(fmt(lo), x + w - 4, y + h - 2);
}

function drawBars(ctx, c, x, y, w, h) {
  const [lo0, hi] = range(c.scores);
  const lo = lo0 - (hi - lo0) * 0.1; // the worst candidate keeps a visible bar
  const title = `stability of ${c.scores.length} seeds` + (c.items > 1 ? ` (item 1 of ${c.items})` : "")
    + (c.bestSeed !== undefined ? ` - best ${c.bestSeed}` : "");
  drawFrame(ctx, x, y, w, h, title, lo0, hi);
  const top = y + 16;
  const bh = h - 16 - 12;
  const n = c.scores.length;
  const slot = (w - 8) / n;
  const bw = Math.max(1, slot * 0.8);
  for (let i = 0; i < n; i++) {
    const f = (c.scores[i] - lo) / (hi - lo);
    const hh = Math.max(1, f * bh);
    ctx.fillStyle = i === c.best ? "#f5c542" : "#4a7fb5";
    ctx.fillRect(x + 4 + i * slot + (slot - bw) / 2, top + bh - hh, bw, hh);
  }
}

function drawLines(ctx, c, x, y, w, h) {
  const all = c.history.flat();
  const [lo, hi] = range(all);
  const steps = Math.max(...c.history.map((hs) => hs.length)) - 1;
  const first = c.history[0][0];
  const bestV = Math.max(...c.history[0]);
  const title = `stability per step (${steps} steps)` + (c.items > 1 ? `, ${c.items} items` : "")
    + ` ${fmt(first)} -> ${fmt(bestV)}`;
  drawFrame(ctx, x, y, w, h, title, lo, hi);
  const left = x + 6;
  const top = y + 16;
  const pw = w - 12;
  const ph = h - 16 - 12;
  const px = (i) => left + (steps > 0 ? (i / steps) * pw : pw / 2);
  const py = (v) => top + ph - ((v - lo) / (hi - lo)) * ph;
  c.history.forEach((hs, k) => {
    ctx.strokeStyle = LINE_COLORS[k % LINE_COLORS.length];
    ctx.fillStyle = ctx.strokeStyle;
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    hs.forEach((v, i) => (i ? ctx.lineTo(px(i), py(v)) : ctx.moveTo(px(i), py(v))));
    ctx.stroke();
    if (hs.length === 1) ctx.fillRect(px(0) - 2, py(hs[0]) - 2, 4, 4);
    const b = hs.indexOf(Math.max(...hs)); // the returned noise is the best iterate
    ctx.beginPath();
    ctx.arc(px(b), py(hs[b]), 3, 0, Math.PI * 2);
    ctx.fill();
  });
  ctx.lineWidth = 1;
}

app.registerExtension({
  name: "noisecraft.charts",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== SELECT && nodeData?.name !== OPTIMIZE) return;
    const toChart = nodeData.name === SELECT ? selectChart : optimizeChart;

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const r = onExecuted?.apply(this, arguments);
      const chart = toChart(message);
      this.noisecraftChart = chart;
      if (chart) {
        // room for the chart below the widgets; never shrink what the user sized
        const need = this.computeSize()[1] + CHART_H + PAD;
        if (this.size[1] < need) this.setSize([Math.max(this.size[0], 240), need]);
      }
      this.setDirtyCanvas?.(true, true);
      return r;
    };

    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      const r = onDrawForeground?.apply(this, arguments);
      const chart = this.noisecraftChart;
      if (!chart || this.flags?.collapsed) return r;
      const x = PAD;
      const w = this.size[0] - 2 * PAD;
      const y = this.size[1] - CHART_H - PAD / 2;
      if (w < 40) return r;
      ctx.save();
      try {
        if (chart.kind === "bars") drawBars(ctx, chart, x, y, w, CHART_H);
        else drawLines(ctx, chart, x, y, w, CHART_H);
      } finally {
        ctx.restore();
      }
      return r;
    };
  },
});
