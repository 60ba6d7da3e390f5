// Tier-4 browser check, run by test_frontend.py (see README.md). Environment:
//   NC_URL        the ComfyUI server, e.g. http://127.0.0.1:8188
//   NC_WORKFLOW   UI-format workflow JSON (uses the test pack's tiny model; built by test_frontend.py)
//   NC_ARTIFACTS  folder for screenshots, the saved workflows and result.json
//   NC_CHROMIUM   Chromium executable (a system one: no browser is ever downloaded)
//   NC_USER_DATA  a fresh, empty profile folder
//   NC_SELECT_ID, NC_REFINE_ID  node ids of Inversion Stability Select and Refine Noise
//   NC_GUIDERS    {"<CFGGuider id>": <cfg in the workflow>}
// Exits 0 when every check passed, 1 otherwise (the reason on stderr and in result.json).
import { chromium } from "playwright-core";
import fs from "node:fs";
import path from "node:path";

const env = (k) => {
  const v = process.env[k];
  if (!v) throw new Error(`${k} is not set`);
  return v;
};
const URL_ = env("NC_URL");
const ART = env("NC_ARTIFACTS");
const workflow = JSON.parse(fs.readFileSync(env("NC_WORKFLOW"), "utf8"));
const SELECT_ID = Number(env("NC_SELECT_ID"));
const REFINE_ID = Number(env("NC_REFINE_ID"));
const GUIDERS = JSON.parse(env("NC_GUIDERS"));
const t0 = Date.now();
const log = (...a) => console.log(`[${((Date.now() - t0) / 1000).toFixed(1)}s]`, ...a);
const result = { ok: false, checks: [], console_errors: [] };

function check(cond, what, detail) {
  result.checks.push({ what, ok: !!cond, detail });
  log(cond ? "ok  " : "FAIL", what, detail === undefined ? "" : JSON.stringify(detail));
  if (!cond) throw new Error(`check failed: ${what} ${detail === undefined ? "" : JSON.stringify(detail)}`);
}

const context = await chromium.launchPersistentContext(env("NC_USER_DATA"), {
  executablePath: env("NC_CHROMIUM"),
  headless: true,
  viewport: { width: 1600, height: 1000 },
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const page = context.pages()[0] ?? (await context.newPage());
page.on("console", (m) => {
  if (m.type() === "error") result.console_errors.push(m.text());
  if (/noisecraft/i.test(m.text())) log("console:", m.type(), m.text());
});
page.on("pageerror", (e) => { result.console_errors.push(`pageerror: ${e.message}`); log("pageerror:", e.stack ?? e.message); });
const shot = async (name) => {
  await page.evaluate(() => window.app.canvas.draw(true, true));
  await page.screenshot({ path: path.join(ART, name) });
  log("screenshot", name);
};

// widgets' values, the refine node's toggle state and properties, in the page
const state = (ids) => page.evaluate(({ ids, refineId }) => {
  const g = window.app.graph;
  const cfg = {};
  for (const id of ids) cfg[id] = g.getNodeById(Number(id))?.widgets?.find((w) => w.name === "cfg")?.value;
  const r = g.getNodeById(refineId);
  const w = r?.widgets?.find((x) => x.name === "guidance off");
  return { cfg, toggle: w?.value, properties: JSON.parse(JSON.stringify(r?.properties ?? {})) };
}, { ids, refineId: REFINE_ID });

const setToggle = (value) => page.evaluate(({ refineId, value }) => {
  const node = window.app.graph.getNodeById(refineId);
  const w = node.widgets.find((x) => x.name === "guidance off");
  w.value = value;
  w.callback?.(w.value, window.app.canvas, node);
}, { refineId: REFINE_ID, value });

// queue the current graph through the frontend, wait until the server's history holds `count` entries
async function queueAndWait(count, timeoutMs = 240000) {
  await page.evaluate(() => window.app.queuePrompt(0));
  const end = Date.now() + timeoutMs;
  while (Date.now() < end) {
    const h = await page.evaluate(async () => (await fetch("/history")).json());
    const done = Object.values(h).filter((e) => e.status?.completed !== undefined && e.status?.status_str);
    if (done.length >= count) {
      const last = done.map((e) => e.status).filter((s) => s.status_str !== "success");
      return { entries: done.length, failed: last };
    }
    await page.waitForTimeout(500);
  }
  throw new Error(`the prompt did not finish in ${timeoutMs / 1000} s`);
}

// pixels of the chart's highlight colour (#f5c542, the chosen seed's bar) on the graph canvas
const highlightPixels = () => page.evaluate(() => {
  const c = window.app.canvas.canvas;
  const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
  let n = 0;
  for (let i = 0; i < d.length; i += 4) {
    if (Math.abs(d[i] - 245) < 6 && Math.abs(d[i + 1] - 197) < 6 && Math.abs(d[i + 2] - 66) < 6) n++;
  }
  return n;
});

let exitCode = 1;
try {
  await page.goto(URL_ + "/", { waitUntil: "domcontentloaded" });
  await page.waitForFunction(() => window.app?.graph && window.app?.canvas && window.LiteGraph?.registered_node_types?.NC_RefineNoise,
    null, { timeout: 120000 });
  // let the first-run dialogs (templates browser etc.) appear, then close them
  await page.waitForTimeout(1500);
  await page.keyboard.press("Escape");
  result.frontend_version = await page.evaluate(() => window.__COMFYUI_FRONTEND_VERSION__ ?? null);
  log("frontend version", result.frontend_version);
  const exts = await page.evaluate(() => window.app.extensions.map((e) => e.name));
  check(exts.includes("noisecraft.charts") && exts.includes("noisecraft.guidance"), "the pack's extensions are loaded",
    exts.filter((n) => n.startsWith("noisecraft")));

  await page.evaluate(async (wf) => { await window.app.loadGraphData(wf); }, workflow);
  await page.waitForTimeout(500);
  const ids = Object.keys(GUIDERS);
  const types = await page.evaluate(() => window.app.graph._nodes.map((n) => n.type));
  check(types.length === workflow.nodes.length, "the workflow loaded with every node", types.length);
  // the select node in view, so the chart is on the canvas after the run
  await page.evaluate((id) => {
    const c = window.app.canvas;
    const n = window.app.graph.getNodeById(id);
    c.ds.scale = 1;
    c.ds.offset[0] = -n.pos[0] + 60;
    c.ds.offset[1] = -n.pos[1] + 80;
    c.setDirty(true, true);
  }, SELECT_ID);
  const s0 = await state(ids);
  check(ids.every((id) => s0.cfg[id] === GUIDERS[id]), "cfg as in the workflow", s0.cfg);
  check(s0.toggle === false && s0.properties.noisecraft_guidance_off === false, "the toggle starts off", s0);
  await shot("1_loaded.png");
  const before = await highlightPixels();
  const chartBefore = await page.evaluate((id) => window.app.graph.getNodeById(id).noisecraftChart ?? null, SELECT_ID);
  check(chartBefore === null, "no chart before the run");

  // run it
  const run1 = await queueAndWait(1);
  check(run1.failed.length === 0, "the workflow ran successfully", run1);
  await page.waitForFunction((id) => window.app.graph.getNodeById(id).noisecraftChart, SELECT_ID, { timeout: 30000 });
  const chart = await page.evaluate((id) => window.app.graph.getNodeById(id).noisecraftChart, SELECT_ID);
  check(chart.kind === "bars" && chart.scores.length === 4 && chart.seeds.length === 4, "chart data of 4 candidates",
    chart);
  check(chart.seeds.includes(chart.bestSeed) && chart.seeds[chart.best] === chart.bestSeed, "the best seed is highlighted",
    { best: chart.best, bestSeed: chart.bestSeed });
  await page.waitForTimeout(300);
  await shot("2_executed_chart.png");
  const after = await highlightPixels();
  check(after > before + 20, "the highlighted bar is drawn on the canvas", { before, after });
  const nodeShot = await page.evaluate((id) => {
    const n = window.app.graph.getNodeById(id);
    const [x, y] = window.app.canvas.ds.convertOffsetToCanvas(n.pos);
    const r = window.app.canvas.canvas.getBoundingClientRect();
    return { x: r.left + x - 10, y: r.top + y - 40, w: n.size[0] + 20, h: n.size[1] + 50 };
  }, SELECT_ID);
  await page.screenshot({ path: path.join(ART, "2b_select_node.png"),
    clip: { x: Math.max(0, nodeShot.x), y: Math.max(0, nodeShot.y), width: nodeShot.w, height: nodeShot.h } });

  // guidance off: only the guider of the refined branch goes to 1.0
  await page.evaluate((id) => {
    const c = window.app.canvas;
    const n = window.app.graph.getNodeById(id);
    c.ds.offset[0] = -n.pos[0] + 60;
    c.ds.offset[1] = -n.pos[1] + 80;
    c.setDirty(true, true);
  }, REFINE_ID);
  await setToggle(true);
  const s1 = await state(ids);
  const changed = ids.filter((id) => GUIDERS[id] !== 1.0 && s1.cfg[id] === 1.0);
  const refinedGuider = ids.find((id) => GUIDERS[id] !== 7.0);
  const otherGuider = ids.find((id) => id !== refinedGuider);
  check(s1.cfg[refinedGuider] === 1.0, "guidance off sets the refined branch's cfg to 1.0", s1.cfg);
  check(s1.cfg[otherGuider] === GUIDERS[otherGuider], "the cfg branch not fed by Refine Noise keeps its cfg", s1.cfg);
  check(changed.length === 1 && s1.properties.noisecraft_guidance_off === true
    && s1.properties.noisecraft_saved_cfg?.[refinedGuider] === GUIDERS[refinedGuider], "the previous cfg is remembered",
  s1.properties);
  await shot("3_guidance_off.png");

  // the prompt the frontend sends has no toggle input, and the server runs it at cfg 1
  const prompt = await page.evaluate(async (id) => (await window.app.graphToPrompt()).output[String(id)], REFINE_ID);
  check(!("guidance off" in prompt.inputs), "the toggle is not sent to the server", Object.keys(prompt.inputs));
  const run2 = await queueAndWait(2);
  check(run2.failed.length === 0, "the workflow runs with guidance off", run2);

  // save and reload: the state survives
  const saved = await page.evaluate(() => JSON.parse(JSON.stringify(window.app.graph.serialize())));
  fs.writeFileSync(path.join(ART, "workflow_guidance_off.json"), JSON.stringify(saved, null, 1));
  const savedRefine = saved.nodes.find((n) => n.id === REFINE_ID);
  // widgets_values holds the server's widgets only (strength, guidance), never the toggle's boolean
  check(savedRefine.properties.noisecraft_guidance_off === true && savedRefine.widgets_values.length === 2
    && savedRefine.widgets_values.every((v) => typeof v === "number"),
    "the saved workflow keeps the state in properties, not in widgets_values",
    { properties: savedRefine.properties, widgets_values: savedRefine.widgets_values });
  await page.evaluate(async () => { await window.app.loadGraphData({ nodes: [], links: [], version: 0.4 }); });
  const empty = await page.evaluate(() => window.app.graph._nodes.length);
  check(empty === 0, "the graph was cleared before reloading");
  await page.evaluate(async (wf) => { await window.app.loadGraphData(wf); }, saved);
  await page.waitForTimeout(300);
  const s2 = await state(ids);
  check(s2.toggle === true && s2.cfg[refinedGuider] === 1.0 && s2.properties.noisecraft_guidance_off === true,
    "after reloading: the toggle is on and cfg is still 1.0", s2);

  // guidance back on: the previous cfg is restored
  await setToggle(false);
  const s3 = await state(ids);
  check(ids.every((id) => s3.cfg[id] === GUIDERS[id]), "toggling back restores the previous cfg", s3.cfg);
  check(s3.properties.noisecraft_guidance_off === false && Object.keys(s3.properties.noisecraft_saved_cfg).length === 0,
    "the remembered values are cleared", s3.properties);
  await shot("4_reloaded_restored.png");
  const ours = result.console_errors.filter((t) => /noisecraft/i.test(t));
  check(ours.length === 0, "no console errors from the pack", ours);
  result.ok = true;
  exitCode = 0;
} catch (e) {
  result.error = String(e?.stack ?? e);
  console.error(result.error);
  try { await page.screenshot({ path: path.join(ART, "failure.png") }); } catch {}
} finally {
  result.seconds = (Date.now() - t0) / 1000;
  fs.writeFileSync(path.join(ART, "result.json"), JSON.stringify(result, null, 1));
  await context.close();
}
process.exit(exitCode);
