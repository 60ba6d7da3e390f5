// Tier-4 reference for run-graph's converter, run by test_graph_to_prompt.py. Loads each UI-format workflow
// into the real ComfyUI frontend and writes what the frontend itself would send: app.graphToPrompt().output.
// Environment:
//   NC_URL        the ComfyUI server, e.g. http://127.0.0.1:8188
//   NC_WORKFLOWS  JSON file {name: UI-format workflow}
//   NC_OUT        JSON file to write {name: API-format prompt}
//   NC_CHROMIUM   Chromium executable (a system one: no browser is ever downloaded)
//   NC_USER_DATA  a fresh, empty profile folder
import { chromium } from "playwright-core";
import fs from "node:fs";

const env = (k) => {
  const v = process.env[k];
  if (!v) throw new Error(`${k} is not set`);
  return v;
};
const workflows = JSON.parse(fs.readFileSync(env("NC_WORKFLOWS"), "utf8"));
const context = await chromium.launchPersistentContext(env("NC_USER_DATA"), {
  executablePath: env("NC_CHROMIUM"),
  headless: true,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
let exitCode = 1;
try {
  const page = context.pages()[0] ?? (await context.newPage());
  page.on("pageerror", (e) => console.error("pageerror:", e.message));
  await page.goto(env("NC_URL") + "/", { waitUntil: "domcontentloaded" });
  await page.waitForFunction(() => window.app?.graph && window.LiteGraph?.registered_node_types?.NC_RefineNoise,
    null, { timeout: 120000 });
  const out = {};
  for (const [name, wf] of Object.entries(workflows)) {
    out[name] = await page.evaluate(async (wf) => {
      await window.app.loadGraphData(wf);
      return (await window.app.graphToPrompt()).output;
    }, wf);
    console.log(`${name}: ${Object.keys(out[name]).length} nodes`);
  }
  fs.writeFileSync(env("NC_OUT"), JSON.stringify(out, null, 1));
  exitCode = 0;
} catch (e) {
  console.error(e.stack ?? String(e));
} finally {
  await context.close();
}
process.exit(exitCode);
