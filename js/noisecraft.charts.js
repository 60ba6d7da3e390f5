// NoiseCraft: small charts on the stability nodes.
//
// NC_InversionStabilitySelect: one bar per candidate seed (batch item 0), the chosen seed highlighted.
// NC_OptimizeNoise: stability per optimization step, one line per batch item (up to 4).
// NC_TrainRefiner: the MSD loss per step (log scale, left) and, with validate_every, the held-out share of the
//   unguided -> teacher latent-MSE gap closed (0..100%, right, blue points); the grid is the node's image.
// The data comes from the node's UI output (see nodes/nodes_stability.py):
//   Select:   noisecraft_scores [[K floats] per item], noisecraft_seeds [[K ints]], noisecraft_best_seeds [int per item]
//   Optimize: noisecraft_history [[steps+1 floats] per item], noisecraft_best [float per item]
//   Train:    noisecraft_losses [float per step], noisecraft_validation [[step, gap closed] per validation]
// Nothing is drawn until the node has run. No external libraries.
import { app } from "../../scripts/app.js";

const SELECT = "NC_InversionStabilitySelect";
const OPTIMIZE = "NC_OptimizeNoise";
const TRAIN = "NC_TrainRefiner";
const GAP_COLOR = "#5fb3f3";
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

function trainChart(message) {
  const losses = finiteList(message?.noisecraft_losses).filter((v) => v > 0);
  if (!losses.length) return null;
  const gaps = (Array.isArray(message.noisecraft_validation) ? message.noisecraft_validation : [])
    .map((p) => [Number(p?.[0]), Number(p?.[1])])
    .filter(([s, g]) => Number.isFinite(s) && Number.isFinite(g));
  return { kind: "train", losses, gaps };
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

function drawTrain(ctx, c, x, y, w, h) {
  const logs = c.losses.map((v) => Math.log10(v));
  const [lo, hi] = range(logs);
  const n = c.losses.length;
  const last = c.gaps.length ? c.gaps[c.gaps.length - 1][1] : null;
  const title = `MSD loss, ${n} steps` + (last !== null ? ` - held-out gap closed ${(100 * last).toFixed(1)}%` : "");
  drawFrame(ctx, x, y, w, h, title, 10 ** lo, 10 ** hi);
  const left = x + 6;
  const top = y + 16;
  const pw = w - 12;
  const ph = h - 16 - 12;
  const steps = Math.max(n, ...c.gaps.map(([s]) => s));
  const px = (s) => left + (steps > 0 ? (s / steps) * pw : pw / 2);
  ctx.strokeStyle = "#ddd";
  ctx.lineWidth = 1.2;
  ctx.beginPath();
  logs.forEach((v, i) => {
    const yy = top + ph - ((v - lo) / (hi - lo)) * ph;
    if (i) ctx.lineTo(px(i + 1), yy);
    else ctx.moveTo(px(i + 1), yy);
  });
  ctx.stroke();
  if (!c.gaps.length) return;
  const gy = (g) => top + ph - Math.min(1, Math.max(0, g)) * ph; // 0% at the bottom, 100% at the top
  ctx.strokeStyle = GAP_COLOR;
  ctx.fillStyle = GAP_COLOR;
  ctx.lineWidth = 2;
  ctx.beginPath();
  c.gaps.forEach(([s, g], i) => (i ? ctx.lineTo(px(s), gy(g)) : ctx.moveTo(px(s), gy(g))));
  ctx.stroke();
  c.gaps.forEach(([s, g]) => {
    ctx.beginPath();
    ctx.arc(px(s), gy(g), 3, 0, Math.PI * 2);
    ctx.fill();
  });
  ctx.font = "10px sans-serif";
  ctx.textAlign = "left";
  ctx.textBaseline = "bottom";
  ctx.fillText("gap closed 0-100%", x + 4, y + h - 2);
  ctx.lineWidth = 1;
}

// Train Refiner's chart is a widget (drawn in the widget pass, not serialized) placed before ComfyUI's image
// preview, which fills the node down to its bottom: the validation grid then sits below the curves.
const CHART_WIDGET = "noisecraft_train_chart";

function placeChartWidget(node) {
  let w = node.widgets?.find((x) => x.name === CHART_WIDGET);
  if (!w) {
    w = node.addCustomWidget({
      name: CHART_WIDGET,
      type: "noisecraft_chart",
      value: "",
      serialize: false,
      options: { serialize: false },
      computeSize: (width) => [width, CHART_H + PAD],
      draw(ctx, n, width, y) {
        if (!n.noisecraftChart) return;
        ctx.save();
        try {
          drawTrain(ctx, n.noisecraftChart, PAD, y + PAD / 2, width - 2 * PAD, CHART_H);
        } finally {
          ctx.restore();
        }
      },
    });
    w.serialize = false;
  }
  const i = node.widgets.indexOf(w);
  const preview = node.widgets.findIndex((x) => typeof x.name === "string" && x.name.startsWith("$$"));
  if (preview >= 0 && preview < i) {
    node.widgets.splice(i, 1);
    node.widgets.splice(preview, 0, w);
  }
}

app.registerExtension({
  name: "noisecraft.charts",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const charts = { [SELECT]: selectChart, [OPTIMIZE]: optimizeChart, [TRAIN]: trainChart };
    const toChart = charts[nodeData?.name];
    if (!toChart) return;

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const r = onExecuted?.apply(this, arguments);
      const chart = toChart(message);
      this.noisecraftChart = chart;
      if (chart?.kind === "train") {
        placeChartWidget(this);
        const need = this.computeSize()[1] + 240; // the curves, and room for the grid below them
        if (this.size[1] < need) this.setSize([Math.max(this.size[0], 360), need]);
      } else if (chart) {
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
      if (chart?.kind === "train") {
        placeChartWidget(this); // (the image preview widget may have been added since)
        return r;
      }
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
