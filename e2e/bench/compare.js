// Compares automerge-repo sync servers under the same load client (bench/automerge-load.js):
// the reference @automerge/automerge-repo-sync-server, then crdt-node's /ws/automerge endpoint.
// Each server is started fresh for every cell (clients × documents), so a cell's CPU, peak RSS
// and after-RSS are its own; a cell that fails prints an error row and the matrix goes on.
//
//   npm run bench:automerge -- [--quick] [--servers reference,crdt] [--rate 200] [--find-max] ...
//   (--help lists every option)
import { execFileSync, spawn } from "node:child_process";
import { randomUUID } from "node:crypto";
import { accessSync, constants, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { Repo } from "@automerge/automerge-repo";
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket";
import { Node, repo as repoDir } from "../lib/cluster.js";
import { LoadClient, RssSampler, automergeUrlOfUuid, machineBusySeconds, memMiB, wsHandshake } from "./automerge-load.js";

const here = path.dirname(fileURLToPath(import.meta.url));
const require = createRequire(import.meta.url);

const { values: opt } = parseArgs({
  options: {
    help: { type: "boolean", default: false },
    quick: { type: "boolean", default: false },
    servers: { type: "string", default: "reference,crdt" },
    clients: { type: "string", default: "10,100,1000" },
    docs: { type: "string", default: "1,100" },
    rate: { type: "string", default: "auto" },
    "delivery-budget": { type: "string", default: "300" },
    "find-max": { type: "boolean", default: false },
    "ramp-steps": { type: "string", default: "5" },
    "min-changes": { type: "string", default: "10" },
    "max-p99": { type: "string", default: "1000" },
    warmup: { type: "string" },
    measure: { type: "string" },
    drain: { type: "string" },
    after: { type: "string" },
    workers: { type: "string", default: "2" },
    observers: { type: "string", default: "4" },
    db: { type: "string", default: "postgres" },
    token: { type: "string", default: "" },
    "idle-env": { type: "string", default: "CRDT_RUN_IDLE_SECS" },
    "idle-secs": { type: "string", default: "5" },
    "crdt-bin": { type: "string", default: process.env.CRDT_NODE_BIN || path.join(repoDir, "target/release/crdt-node") },
    out: { type: "string" },
    "quiet-wait": { type: "string", default: "0" },
  },
});

if (opt.help) {
  console.log(`node bench/compare.js [options]
  --quick               short cells: warm-up 3 s, measure 8 s, drain 3 s, after 10 s
  --servers LIST        reference,crdt (default both, in that order)
  --clients LIST        clients per cell (default 10,100,1000)
  --docs LIST           documents per cell (default 1,100)
  --rate N|auto         total offered changes/s per cell, split evenly over the clients.
                        auto (default): min(200, delivery-budget / (clients per doc - 1)), since
                        every change must reach every other client of its document and the
                        load client (automerge-repo) can apply only so many arrivals per second
  --delivery-budget N   arrivals/s the auto rate aims at (300)
  --find-max            from that rate, double while sustained (or halve until sustained)
  --ramp-steps N        at most N rates with --find-max (5)
  --min-changes N       lengthen a slow cell's measure window to see N changes at least (10)
  --max-p99 MS          a step with a slower p99 is not sustained (1000)
  --warmup/--measure/--drain/--after S   seconds (default 5/15/5/15)
  --workers N           load worker processes at most (2; fewer when a document would have
                        a single client in a process)
  --observers K         latency observers per document and load process (4); 1 samples only
                        the first client of each document in each process
  --db postgres|sqlite  crdt-node's database (postgres: a fresh database per cell on 127.0.0.1)
  --token T             crdt-node API token (Bearer on HTTP, ?token= on the WebSocket)
  --idle-env NAMES      env var(s) that set crdt-node's run idle timeout (CRDT_RUN_IDLE_SECS)
  --idle-secs S         that timeout (5), so runs unload before the after-RSS reading
  --crdt-bin PATH       crdt-node binary (CRDT_NODE_BIN, default target/release/crdt-node)
  --out PATH            JSON results (default e2e/artifacts/automerge-bench-<time>.json)
  --quiet-wait S        before each cell, wait up to S s for the machine to be idle (< 25% of a
                        core busy), on a shared machine (0: do not wait)`);
  process.exit(0);
}

const list = (s) => s.split(",").map((x) => x.trim()).filter(Boolean);
const secs = (v, normal, quick) => Number(v ?? (opt.quick ? quick : normal)) * 1000;
const timing = {
  warmupMs: secs(opt.warmup, 5, 3),
  measureMs: secs(opt.measure, 15, 8),
  drainMs: secs(opt.drain, 5, 3),
  afterMs: secs(opt.after, 15, 10),
};
const log = (...a) => console.error(`[${new Date().toISOString().slice(11, 19)}]`, ...a);
const EMPTY_RUN = () => ({ grafts: [], prunedSteps: {}, flags: {} });

// ---------------------------------------------------------------------------------------------
// Servers

function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.on("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

/** A repo connected to `wsUrl`, resolved once the server has answered the join. */
async function connectedRepo(wsUrl, peerId) {
  const adapter = new WebSocketClientAdapter(wsUrl, 1000);
  const connected = new Promise((resolve) => adapter.once("peer-candidate", resolve));
  const repo = new Repo({ network: [adapter], peerId });
  await withTimeout(connected, 15000, `${wsUrl}: no peer`);
  return repo;
}

function withTimeout(promise, ms, what) {
  let timer;
  return Promise.race([
    promise,
    new Promise((_, reject) => (timer = setTimeout(() => reject(new Error(`timed out: ${what}`)), ms))),
  ]).finally(() => clearTimeout(timer));
}

class ReferenceServer {
  name = "automerge-repo-sync-server";
  static version = JSON.parse(
    readFileSync(path.join(path.dirname(require.resolve("@automerge/automerge-repo-sync-server")), "../package.json"), "utf8"),
  ).version;

  async start() {
    this.dir = mkdtempSync(path.join(os.tmpdir(), "am-sync-server-"));
    const port = await freePort(); // it logs the port it was given, so PORT=0 would not tell
    this.log = [];
    // cwd is the temp dir: the server serves ./public statically.
    this.child = spawn(process.execPath, [require.resolve("@automerge/automerge-repo-sync-server")], {
      cwd: this.dir,
      env: { PATH: process.env.PATH, PORT: String(port), DATA_DIR: path.join(this.dir, "data") },
      stdio: ["ignore", "pipe", "pipe"],
    });
    this.exited = new Promise((resolve) => this.child.once("exit", resolve));
    await new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`sync server did not start: ${this.log.join(" ")}`)), 30000);
      const onData = (chunk) => {
        this.log.push(String(chunk).trim());
        if (this.log.length > 50) this.log.shift();
        if (/Listening on port/.test(chunk)) {
          clearTimeout(timer);
          resolve();
        }
      };
      this.child.stdout.on("data", onData);
      this.child.stderr.on("data", onData);
      this.child.once("exit", (code) => reject(new Error(`sync server exited (${code}): ${this.log.join(" ")}`)));
    });
    this.pid = this.child.pid;
    this.wsUrl = `ws://127.0.0.1:${port}`;
  }

  /** One seed client creates the documents; a second one must then be able to find each. */
  async createDocs(n) {
    const seed = await connectedRepo(this.wsUrl, `bench-seed-${randomUUID().slice(0, 8)}`);
    const urls = Array.from({ length: n }, () => seed.create(EMPTY_RUN()).url);
    let missing = urls;
    const deadline = Date.now() + 60000;
    try {
      while (missing.length > 0) {
        if (Date.now() > deadline) throw new Error(`server never had ${missing.length} seeded documents`);
        // A fresh checker per round: a repo remembers a document it once found unavailable.
        const check = await connectedRepo(this.wsUrl, `bench-check-${randomUUID().slice(0, 8)}`);
        const found = await Promise.all(missing.map((u) => check.find(u).then(() => true, () => false)));
        await check.shutdown();
        missing = missing.filter((_, i) => !found[i]);
        if (missing.length) await new Promise((r) => setTimeout(r, 500));
      }
    } finally {
      await seed.shutdown();
    }
    return urls;
  }

  async stop() {
    if (this.child && this.child.exitCode === null && this.child.signalCode === null) {
      this.child.kill("SIGTERM");
      await withTimeout(this.exited, 10000, "sync server exit").catch(() => this.child.kill("SIGKILL"));
    }
    if (this.dir) rmSync(this.dir, { recursive: true, force: true });
  }
}

class CrdtServer {
  name = "crdt-node";

  async start() {
    const bin = opt["crdt-bin"];
    try {
      accessSync(bin, constants.X_OK);
    } catch {
      throw new Error(`${bin} not found (cargo build --release, or set CRDT_NODE_BIN / --crdt-bin)`);
    }
    const env = {
      RUST_LOG: process.env.RUST_LOG || "warn,crdt_node::node=info", // the "listening" line is info
      PORT: "0",
    };
    for (const name of list(opt["idle-env"])) env[name] = opt["idle-secs"];
    if (opt.token) env.CRDT_API_TOKEN = opt.token;
    // Settings to compare (say, CRDT_AUTOMERGE_PUSH_DELAY_MS) pass through from the caller.
    for (const [k, v] of Object.entries(process.env)) if (k.startsWith("CRDT_AUTOMERGE_")) env[k] = v;
    this.node = new Node("bench-node", "bench", env, { bin });
    if (opt.db === "postgres") {
      this.db = `crdt_bench_${process.pid}_${Date.now()}`;
      execFileSync("psql", ["-h", "127.0.0.1", "-U", "postgres", "-qc", `create database ${this.db}`], { stdio: "pipe" });
      env.DATABASE_URL = `postgres://postgres@127.0.0.1:5432/${this.db}`;
    } else if (opt.db === "sqlite") {
      env.DATABASE_URL = `sqlite://${path.join(this.node.dir, "node.db")}`;
    } else {
      throw new Error(`--db ${opt.db}: postgres or sqlite`);
    }
    await this.node.start();
    this.pid = this.node.child.pid;
    this.http = this.node.url;
    this.wsUrl = `ws://127.0.0.1:${this.node.port}/ws/automerge${opt.token ? `?token=${encodeURIComponent(opt.token)}` : ""}`;
  }

  /** A run per document, created by its first graft; its automerge URL is bs58check(UUID bytes). */
  async createDocs(n) {
    const ids = Array.from({ length: n }, () => randomUUID());
    const headers = { "content-type": "application/json" };
    if (opt.token) headers.authorization = `Bearer ${opt.token}`;
    for (let i = 0; i < ids.length; i += 8) {
      await Promise.all(
        ids.slice(i, i + 8).map(async (id) => {
          const res = await fetch(`${this.http}/api/crdt/runs/${id}/grafts`, {
            method: "POST",
            headers,
            body: JSON.stringify({ agent: "seed", afterStep: "step-0", user: "seed" }),
          });
          if (res.status !== 201) throw new Error(`POST runs/${id}/grafts: HTTP ${res.status} ${await res.text()}`);
        }),
      );
    }
    this.runIds = ids;
    return Promise.all(ids.map(automergeUrlOfUuid));
  }

  /** Gauges that explain the memory figures: runs still in memory, connections still open. */
  async gauges() {
    const headers = opt.token ? { authorization: `Bearer ${opt.token}` } : {};
    const text = await (await fetch(`${this.http}/actuator/prometheus`, { headers })).text();
    const gauge = (name) => Number(text.match(new RegExp(`^${name}(?:\\{[^}]*\\})? (\\S+)$`, "m"))?.[1]);
    return { runsLoaded: gauge("crdt_runs_loaded"), connections: gauge("crdt_automerge_repo_connections") };
  }

  async stop() {
    if (this.node) {
      await withTimeout(this.node.stop(), 30000, "crdt-node exit").catch(() => this.node.child.kill("SIGKILL"));
      this.node.cleanup();
    }
    if (this.db) {
      try {
        execFileSync("psql", ["-h", "127.0.0.1", "-U", "postgres", "-qc", `drop database if exists ${this.db} with (force)`], { stdio: "pipe" });
      } catch (e) {
        log(`could not drop ${this.db}: ${e.message}`);
      }
    }
  }
}

const SERVERS = { reference: ReferenceServer, crdt: CrdtServer };

// ---------------------------------------------------------------------------------------------
// Cells

/** The default offered rate: about `delivery-budget` arrivals/s at the other clients. */
function autoRate(peersPerDoc) {
  const r = Math.min(200, Number(opt["delivery-budget"]) / Math.max(1, peersPerDoc - 1));
  return Number(r.toPrecision(2));
}

/** A step is sustained when the clients sent what was offered and (nearly) all of it was seen in time. */
function sustained(w) {
  return (
    w.sentPerSec >= 0.95 * w.offeredPerSec &&
    w.seen >= 0.99 * w.sentInWindow &&
    !(w.p99Ms > Number(opt["max-p99"]))
  );
}

/** Waits (up to --quiet-wait) for the rest of the machine to go idle; returns its last busy %. */
async function quiet() {
  const deadline = Date.now() + Number(opt["quiet-wait"]) * 1000;
  for (;;) {
    const b0 = machineBusySeconds();
    await new Promise((r) => setTimeout(r, 2000));
    const busy = ((machineBusySeconds() - b0) / 2) * 100;
    if (busy < 25 || Date.now() > deadline) return busy;
  }
}

async function runCell(Server, clients, docs) {
  const server = new Server();
  const row = { server: server.name, clients, docs };
  if (Number(opt["quiet-wait"]) > 0) row.busyBeforePct = await quiet();
  let load, sampler;
  try {
    await server.start();
    row.rssStartMiB = memMiB(server.pid);
    const docUrls = await server.createDocs(docs);
    row.docUrlExample = docUrls[0];
    await wsHandshake(server.wsUrl);
    row.rssIdleMiB = memMiB(server.pid);
    sampler = new RssSampler(server.pid);
    load = new LoadClient({ wsUrl: server.wsUrl, docUrls, clients, maxWorkers: Number(opt.workers), observers: Number(opt.observers), serverPid: server.pid });
    row.workers = load.workerCount;
    row.docsPerClient = load.layout.docsPerClient;
    row.connectSecs = (await load.setup()).setupMs / 1000;
    row.peersPerDoc = (clients * load.layout.docsPerClient) / docs;
    let rate = opt.rate === "auto" ? autoRate(row.peersPerDoc) : Number(opt.rate);
    row.steps = [];
    let factor = 0; // the ramp's direction, once the first step has told it
    for (let i = 0; i < (opt["find-max"] ? Number(opt["ramp-steps"]) : 1); i++) {
      // A fan-out cell offers so few changes/s that the usual window would hold a handful.
      const measureMs = Math.max(timing.measureMs, Math.ceil(Number(opt["min-changes"]) / rate) * 1000);
      const w = await load.window({ rate, ...timing, measureMs });
      w.measureSecs = measureMs / 1000;
      w.sustained = sustained(w);
      row.steps.push(w);
      log(`${server.name} ${clients}×${docs} @${rate}/s: seen ${f(w.seenPerSec, 1)}/s p50 ${f(w.p50Ms, 1)} p99 ${f(w.p99Ms, 1)} ms, server ${f(w.serverCpuPct)}% client ${f(w.clientCpuPct)}% other ${f(w.otherCpuPct)}%${w.sustained ? "" : " (not sustained)"}`);
      if (!factor) factor = w.sustained ? 2 : 0.5;
      if ((factor > 1) !== w.sustained) break;
      rate = rate * factor;
    }
    // The reported step: the fastest sustained one (or the first, if none was).
    const ok = row.steps.filter((s) => s.sustained);
    const best = ok.length ? ok.reduce((a, b) => (b.offeredPerSec > a.offeredPerSec ? b : a)) : row.steps[0];
    Object.assign(row, best, { steps: row.steps });
    row.rssPeakMiB = Math.max(sampler.stop(), 0);
    row.rssHwmMiB = memMiB(server.pid, "VmHWM");
    await load.close();
    load = undefined;
    // Memory after the clients leave: the reading at the end of the wait (the minimum is kept too).
    const after = [];
    for (let t = 0; t < timing.afterMs; t += 1000) {
      await new Promise((r) => setTimeout(r, 1000));
      after.push(memMiB(server.pid));
    }
    row.rssAfterMiB = after[after.length - 1];
    row.rssAfterMinMiB = Math.min(...after);
    if (server.gauges) row.after = await server.gauges().catch((e) => ({ error: e.message }));
  } catch (e) {
    row.error = String(e?.message || e).split("\n")[0];
    log(`${server.name} ${clients}×${docs}: ${row.error}`);
  } finally {
    if (sampler) sampler.stop();
    if (load) await load.close().catch(() => {});
    await server.stop().catch((e) => log(`${server.name} stop: ${e.message}`));
  }
  return row;
}

// ---------------------------------------------------------------------------------------------
// Output

const f = (x, d = 0) => (typeof x === "number" && Number.isFinite(x) ? x.toFixed(d) : "–");

function table(rows) {
  const head = [
    "server", "clients", "docs", "clients/doc", "offered/s", "sent/s", "seen/s", "seen/sent", "samples", "p50 ms", "p99 ms",
    "server CPU %", "RSS idle MiB", "RSS peak MiB", "RSS after MiB", "client CPU %", "msgs to/from clients /s", "connect s", "notes",
  ];
  const lines = [`| ${head.join(" | ")} |`, `|${head.map(() => "---").join("|")}|`];
  for (const r of rows) {
    if (r.error) {
      lines.push(`| ${r.server} | ${r.clients} | ${r.docs} | ${head.slice(3, -1).map(() => "–").join(" | ")} | error: ${r.error.replace(/\|/g, "/")} |`);
      continue;
    }
    const notes = [];
    if (opt["find-max"]) notes.push(r.sustained ? `max sustained of ${r.steps.length} steps` : "no step sustained");
    if (r.skipped > 0.01 * r.sentInWindow) notes.push(`${r.skipped} changes skipped (load client behind)`);
    if (r.clientCpuPct > 90 * r.workers) notes.push("load client saturated");
    else if (r.serverCpuPct + r.clientCpuPct + r.otherCpuPct > 90 * os.cpus().length) notes.push("machine saturated");
    if (r.after?.runsLoaded > 0) notes.push(`${r.after.runsLoaded} runs still loaded after the wait`);
    if (r.otherCpuPct > 20) notes.push(`other processes used ${f(r.otherCpuPct)}% CPU`);
    if (r.disconnects) notes.push(`${r.disconnects} disconnects`);
    if (r.clientErrors?.length) notes.push(`client errors: ${r.clientErrors[0].replace(/\|/g, "/").slice(0, 80)}`);
    if (r.clientLogErrors) notes.push(`${r.clientLogErrors} errors logged by automerge-repo (${(r.clientLogSamples[0] || "").replace(/\|/g, "/").slice(0, 60)})`);
    lines.push(
      `| ${r.server} | ${r.clients} | ${r.docs} | ${f(r.peersPerDoc)} | ${f(r.offeredPerSec, r.offeredPerSec < 10 ? 1 : 0)} | ${f(r.sentPerSec, 1)} | ${f(r.seenPerSec, 1)} | ${r.seen}/${r.sentInWindow} | ${r.samples} | ${f(r.p50Ms, 1)} | ${f(r.p99Ms, 1)} | ${f(r.serverCpuPct)} | ${f(r.rssIdleMiB)} | ${f(r.rssPeakMiB)} | ${f(r.rssAfterMiB)} | ${f(r.clientCpuPct)} | ${f(r.clientMsgsInPerSec)} / ${f(r.clientMsgsOutPerSec)} | ${f(r.connectSecs, 1)} | ${notes.join("; ")} |`,
    );
  }
  return lines.join("\n");
}

function packageVersion(name) {
  try {
    return JSON.parse(readFileSync(path.join(here, "../node_modules", name, "package.json"), "utf8")).version;
  } catch {
    return undefined;
  }
}

// ---------------------------------------------------------------------------------------------

const servers = list(opt.servers).map((s) => {
  if (!SERVERS[s]) throw new Error(`unknown server ${s} (reference, crdt)`);
  return SERVERS[s];
});
const started = new Date();
const rows = [];
for (const Server of servers) {
  for (const clients of list(opt.clients).map(Number)) {
    for (const docs of list(opt.docs).map(Number)) {
      log(`${new Server().name}: ${clients} clients × ${docs} docs`);
      rows.push(await runCell(Server, clients, docs));
    }
  }
}

const summary = [
  `automerge-repo sync benchmark, ${started.toISOString()}, ${os.cpus().length} cores, node ${process.version}`,
  `clients: @automerge/automerge-repo ${packageVersion("@automerge/automerge-repo")} + WebSocketClientAdapter, no storage; reference: @automerge/automerge-repo-sync-server ${ReferenceServer.version} (NodeFS storage); crdt-node: ${opt["crdt-bin"]} (${opt.db})`,
  `each cell: fresh server, warm-up ${timing.warmupMs / 1000} s, measure ${timing.measureMs / 1000} s (longer to see ${opt["min-changes"]} changes at least), drain ${timing.drainMs / 1000} s, RSS after ${timing.afterMs / 1000} s without clients`,
  `offered: ${opt.rate === "auto" ? `min(200, ${opt["delivery-budget"]} / (clients per doc - 1)) changes/s` : `${opt.rate} changes/s`} per cell in total, split evenly over the clients${opt["find-max"] ? `; --find-max: doubled while sustained (halved until sustained), the fastest sustained step shown (sustained: all sent, ≥ 99% seen, p99 ≤ ${opt["max-p99"]} ms)` : ""}`,
  "seen/s: changes made in the measure window and seen by another client of the same document by the end of the drain, per second; seen/sent: their counts",
  `p50/p99: change → arrival, over (change, observer) pairs; observers: up to ${opt.observers} clients of the document per load process, evenly spaced over that process's clients of it, the sender excluded (same process, same clock); samples: their number`,
  "msgs to/from clients: automerge-repo messages the clients received / sent per second in the measure window (how chatty the server's sync is)",
  "CPU: % of one core over the measure window (utime+stime from /proc); client CPU sums the load processes; the rest of the machine (a compiler, crdt-node's PostgreSQL) is noted when above 20%",
];
console.log(`\n${summary.map((s) => `- ${s}`).join("\n")}\n\n${table(rows)}\n`);

const out = opt.out || path.join(here, "../artifacts", `automerge-bench-${started.toISOString().replace(/[:.]/g, "-")}.json`);
mkdirSync(path.dirname(out), { recursive: true });
writeFileSync(
  out,
  JSON.stringify({ started, options: opt, timing, summary, versions: {
    node: process.version,
    "@automerge/automerge-repo": packageVersion("@automerge/automerge-repo"),
    "@automerge/automerge-repo-network-websocket": packageVersion("@automerge/automerge-repo-network-websocket"),
    "@automerge/automerge-repo-sync-server": ReferenceServer.version,
  }, rows }, null, 2),
);
log(`results: ${out}`);
