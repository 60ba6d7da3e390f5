// Tier-4 browser check of Train Refiner's validation, run by test_training_frontend.py. Environment:
//   NC_URL, NC_WORKFLOW, NC_ARTIFACTS, NC_CHROMIUM, NC_USER_DATA  as for frontend_check.mjs
//   NC_TRAIN_ID   node id of Train Refiner;  NC_CKPT_ID  node id of the checkpoint loader (its VAE output: 2)
// Loads the training workflow, sets validate_every / validation_seeds and connects the VAE in the page (as a
// user would), queues it, and checks that the node shows the validation grid (its image) and both curves
// (the chart extension's loss line and gap-closed points). Exits 0 when every check passed.
import { chromium } from "playwright-core";
import fs from "node:fs";
import path from "node:path";

const env = (k) => {
  const v = process.env[k];
  if (!v) throw new Error(`${k} is not set`);
  return v;
};
const ART = env("NC_ARTIFACTS");
const workflow = JSON.parse(fs.readFileSync(env("NC_WORKFLOW"), "utf8"));
const TRAIN_ID = Number(env("NC_TRAIN_ID"));
const CKPT_ID = Number(env("NC_CKPT_ID"));
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
page.on("console", (m) => { if (m.type() === "error") result.console_errors.push(m.text()); });
page.on("pageerror", (e) => { result.console_errors.push(`pageerror: ${e.message}`); });

// pixels of the gap-closed colour (#5fb3f3) on the graph canvas
const gapPixels = () => page.evaluate(() => {
  const c = window.app.canvas.canvas;
  const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
  let n = 0;
  for (let i = 0; i < d.length; i += 4) {
    if (Math.abs(d[i] - 95) < 8 && Math.abs(d[i + 1] - 179) < 8 && Math.abs(d[i + 2] - 243) < 8) n++;
  }
  return n;
});

let exitCode = 1;
try {
  await page.goto(env("NC_URL") + "/", { waitUntil: "domcontentloaded" });
  await page.waitForFunction(() => window.app?.graph && window.app?.canvas
    && window.LiteGraph?.registered_node_types?.NC_TrainRefiner, null, { timeout: 120000 });
  await page.waitForTimeout(1500);
  await page.keyboard.press("Escape");
  await page.evaluate(async (wf) => { await window.app.loadGraphData(wf); }, workflow);
  await page.waitForTimeout(500);
  const set = await page.evaluate(({ trainId, ckptId }) => {
    const g = window.app.graph;
    const train = g.getNodeById(trainId);
    const ckpt = g.getNodeById(ckptId);
    const w = (name) => train.widgets.find((x) => x.name === name);
    w("validate_every").value = 2;
    w("validation_seeds").value = 1;
    ckpt.connect(2, train, train.inputs.findIndex((i) => i.name === "vae"));
    train.setSize([Math.max(train.size[0], 420), Math.max(train.size[1], 640)]);
    const c = window.app.canvas;
    c.ds.scale = 0.75; // the whole node (widgets, curves, grid) in the 1600 x 1000 view
    c.ds.offset[0] = -train.pos[0] + 80;
    c.ds.offset[1] = -train.pos[1] + 60;
    c.setDirty(true, true);
    return { every: w("validate_every").value, seeds: w("validation_seeds").value,
      vae: train.inputs.find((i) => i.name === "vae")?.link != null };
  }, { trainId: TRAIN_ID, ckptId: CKPT_ID });
  check(set.every === 2 && set.seeds === 1 && set.vae, "validation set on Train Refiner (every 2 steps, VAE connected)",
    set);
  const before = await gapPixels();
  await page.evaluate(() => window.app.queuePrompt(0));
  const end = Date.now() + 300000;
  let status = null;
  while (Date.now() < end && !status) {
    const h = await page.evaluate(async () => (await fetch("/history")).json());
    status = Object.values(h).map((e) => e.status).find((s) => s?.completed !== undefined && s?.status_str) ?? null;
    if (!status) await page.waitForTimeout(500);
  }
  check(status?.status_str === "success", "the training workflow ran", status);
  await page.waitForFunction((id) => window.app.graph.getNodeById(id).noisecraftChart
    && window.app.graph.getNodeById(id).imgs?.[0]?.complete, TRAIN_ID, { timeout: 30000 });
  // the last grid replaces the previews sent while training (ComfyUI's /view of the node's output image)
  await page.waitForFunction((id) => /noisecraft_validation_/.test(window.app.graph.getNodeById(id).imgs?.[0]?.src ?? "")
    && window.app.graph.getNodeById(id).imgs[0].complete, TRAIN_ID, { timeout: 15000 }).catch(() => null);
  const seen = await page.evaluate((id) => {
    const n = window.app.graph.getNodeById(id);
    const img = n.imgs[0];
    const out = window.app.nodeOutputs?.[String(id)]?.images ?? n.images ?? [];
    return { chart: n.noisecraftChart, img: img.src, w: img.naturalWidth, h: img.naturalHeight,
      output: out.map((o) => o.filename) };
  }, TRAIN_ID);
  check(seen.chart.kind === "train" && seen.chart.losses.length === 6, "the loss curve's data (6 steps)", seen.chart.losses);
  check(JSON.stringify(seen.chart.gaps.map(([s]) => s)) === "[0,2,4,6]" && seen.chart.gaps[0][1] === 0,
    "the gap-closed curve's data (steps 0, 2, 4, 6; 0 at step 0)", seen.chart.gaps);
  check(seen.output.some((f) => f.startsWith("noisecraft_validation_")), "the node's output image is the last grid",
    seen.output);
  check(seen.w > 100 && seen.h > 50, "the node shows the validation grid", { img: seen.img, w: seen.w, h: seen.h });
  await page.evaluate(() => window.app.canvas.draw(true, true));
  await page.waitForTimeout(300);
  const after = await gapPixels();
  check(after > before + 20, "the gap-closed points are drawn on the canvas", { before, after });
  await page.screenshot({ path: path.join(ART, "5_training_validation.png") });
  const box = await page.evaluate((id) => {
    const n = window.app.graph.getNodeById(id);
    const [x, y] = window.app.canvas.ds.convertOffsetToCanvas(n.pos);
    const r = window.app.canvas.canvas.getBoundingClientRect();
    return { x: r.left + x - 10, y: r.top + y - 40, w: n.size[0] + 20, h: n.size[1] + 50 };
  }, TRAIN_ID);
  await page.screenshot({ path: path.join(ART, "5b_train_refiner_node.png"),
    clip: { x: Math.max(0, box.x), y: Math.max(0, box.y), width: box.w, height: box.h } });
  const ours = result.console_errors.filter((t) => /noisecraft/i.test(t));
  check(ours.length === 0, "no console errors from the pack", ours);
  result.ok = true;
  exitCode = 0;
} catch (e) {
  result.error = String(e?.stack ?? e);
  console.error(result.error);
  try { await page.screenshot({ path: path.join(ART, "training_failure.png") }); } catch {}
} finally {
  result.seconds = (Date.now() - t0) / 1000;
  fs.writeFileSync(path.join(ART, "training_result.json"), JSON.stringify(result, null, 1));
  await context.close();
}
process.exit(exitCode);
