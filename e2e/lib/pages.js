// What the browser tests share: headless Chromium (Debian's, never downloaded), a page of a run
// opened as a user in a tab of its own, and screenshots in e2e/artifacts/.
import { mkdirSync } from "node:fs";
import path from "node:path";
import { chromium } from "playwright-core";
import { repo } from "./cluster.js";

export const artifacts = path.join(repo, "e2e/artifacts");

export async function launch() {
  mkdirSync(artifacts, { recursive: true });
  return chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
  });
}

/** The run's page on `node`, in a fresh context whose tab knows the user as `user`. */
export async function openRun(browser, node, run, user, viewport = { width: 1100, height: 900 }) {
  const context = await browser.newContext({ viewport });
  await context.addInitScript((u) => sessionStorage.setItem("crdt-user", u), user);
  const page = await context.newPage();
  page.on("pageerror", (e) => console.error(`[${user}] page error:`, e));
  await page.goto(`${node.url}/runs/${run}`);
  return page;
}

export async function shot(page, name) {
  await page.screenshot({ path: path.join(artifacts, `${name}.png`), fullPage: true });
}

/** Closes the browser, the regions' link and the nodes, and removes the nodes' data. */
export async function closeAll(browser, link, nodes) {
  await browser?.close();
  link?.close();
  for (const n of nodes) {
    await n?.stop();
    n?.cleanup();
  }
}
