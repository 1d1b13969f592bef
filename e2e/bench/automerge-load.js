// The load client of the automerge-repo sync benchmark, and its per-cell measurement.
//
// Every simulated client is a real automerge-repo 2.x Repo with one WebSocketClientAdapter and
// no storage. The clients live in a few forked child processes ("load workers") so that a
// 1000-client cell is not bound to one event loop; the parent (`LoadClient`) only schedules
// windows and reads /proc.
//
// Propagation time is sampled by up to `observers` designated observers per (document, load
// worker): clients of that document in that worker at evenly spaced positions of its list (so
// not only the first ones a server might serve first), the sender itself excluded. Sender and
// observers thus share a process and `performance.now()`. A change counts as seen when one of
// its observers (another client of the same document) has it; each (change, observer) arrival
// is one latency sample.
//
// Run on its own it drives an already running server:
//   node bench/automerge-load.js --ws ws://127.0.0.1:3030 --doc automerge:... [--doc ...]
//        [--clients 100] [--rate 200] [--pid SERVER_PID] [--warmup 5] [--measure 15]
import { fork, execFileSync } from "node:child_process";
import { randomBytes, randomUUID } from "node:crypto";
import { readFileSync } from "node:fs";
import http from "node:http";
import { performance } from "node:perf_hooks";
import { fileURLToPath } from "node:url";

const self = fileURLToPath(import.meta.url);

// ---------------------------------------------------------------------------------------------
// /proc readings

const CLK_TCK = (() => {
  try {
    return Number(execFileSync("getconf", ["CLK_TCK"], { encoding: "utf8" }).trim()) || 100;
  } catch {
    return 100;
  }
})();

/** CPU seconds (user + system, all threads) a process has used so far. */
export function cpuSeconds(pid) {
  const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
  // The command name may hold spaces; fields after it start at state (field 3).
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return (Number(fields[14 - 3]) + Number(fields[15 - 3])) / CLK_TCK;
}

/** CPU seconds all cores of the machine have been busy (not idle or iowait) so far. */
export function machineBusySeconds() {
  const cpu = readFileSync("/proc/stat", "utf8").split("\n")[0].trim().split(/\s+/).slice(1).map(Number);
  const total = cpu.slice(0, 8).reduce((a, b) => a + b, 0); // user..steal; guest is inside user
  return (total - cpu[3] - cpu[4]) / CLK_TCK;
}

/** A memory figure of /proc/PID/status (VmRSS, VmHWM) in MiB, or NaN once the process is gone. */
export function memMiB(pid, key = "VmRSS") {
  try {
    const status = readFileSync(`/proc/${pid}/status`, "utf8");
    const m = status.match(new RegExp(`^${key}:\\s+(\\d+) kB`, "m"));
    return m ? Number(m[1]) / 1024 : NaN;
  } catch {
    return NaN;
  }
}

/** Samples VmRSS every `ms` and keeps the peak. */
export class RssSampler {
  constructor(pid, ms = 200) {
    this.pid = pid;
    this.peak = 0;
    this.last = NaN;
    this.sample();
    this.timer = setInterval(() => this.sample(), ms);
  }
  sample() {
    this.last = memMiB(this.pid);
    if (this.last > this.peak) this.peak = this.last;
    return this.last;
  }
  stop() {
    clearInterval(this.timer);
    return this.peak;
  }
}

export function percentile(sorted, p) {
  if (sorted.length === 0) return NaN;
  const i = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[i];
}

// ---------------------------------------------------------------------------------------------
// Plan: which client opens which documents, and which worker hosts it

/**
 * Every client opens k documents, k chosen so that each document has at least two clients (a
 * change needs another client to be seen by): client i opens documents (i*k + j) mod docs.
 * Clients go to workers in contiguous blocks; fewer workers are used when a block would hold a
 * document with a single client (its changes would have no observer in the same process).
 */
export function plan(clients, docs, maxWorkers) {
  if (clients < 2) throw new Error("at least 2 clients are needed");
  const k = Math.min(docs, Math.max(1, Math.ceil((2 * docs) / clients)));
  const specs = Array.from({ length: clients }, (_, i) => ({
    index: i,
    name: `bench-${i}`,
    docs: Array.from({ length: k }, (_, j) => (i * k + j) % docs),
  }));
  for (let w = Math.max(1, Math.min(maxWorkers, clients)); w >= 1; w--) {
    const size = Math.ceil(clients / w);
    const groups = [];
    for (let i = 0; i < clients; i += size) groups.push(specs.slice(i, i + size));
    const ok = groups.every((g) => {
      const count = new Map();
      for (const c of g) for (const d of c.docs) count.set(d, (count.get(d) || 0) + 1);
      return [...count.values()].every((n) => n >= 2);
    });
    if (ok) return { docsPerClient: k, groups };
  }
  throw new Error(`no client layout gives every document two clients (${clients} clients, ${docs} docs)`);
}

// ---------------------------------------------------------------------------------------------
// Helpers for the servers' side of a cell

/** Resolves when `url` answers a WebSocket handshake with 101; rejects with the status otherwise. */
export function wsHandshake(url, ms = 5000) {
  return new Promise((resolve, reject) => {
    const req = http.request(url.replace(/^ws/, "http"), {
      headers: {
        Connection: "Upgrade",
        Upgrade: "websocket",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": randomBytes(16).toString("base64"),
      },
      timeout: ms,
    });
    req.on("upgrade", (res, socket) => {
      socket.destroy();
      resolve();
    });
    req.on("response", (res) => {
      res.resume();
      reject(new Error(`${url} answered the WebSocket handshake with HTTP ${res.statusCode}`));
    });
    req.on("timeout", () => req.destroy(new Error(`${url}: handshake timed out`)));
    req.on("error", reject);
    req.end();
  });
}

/** An automerge URL for a 16-byte document id given as a UUID (how crdt-node names runs). */
export async function automergeUrlOfUuid(uuid) {
  const { stringifyAutomergeUrl } = await import("@automerge/automerge-repo");
  return stringifyAutomergeUrl({ documentId: Uint8Array.from(Buffer.from(uuid.replace(/-/g, ""), "hex")) });
}

// ---------------------------------------------------------------------------------------------
// Parent side

/**
 * The clients of one cell: `setup()` forks the workers and connects every client to its
 * documents, `window()` offers load for one warm-up + measure period, `close()` disconnects.
 */
export class LoadClient {
  constructor({ wsUrl, docUrls, clients, maxWorkers = 2, observers = 4, serverPid, retryMs = 2000, setupTimeoutMs = 120000, batch = 50 }) {
    this.opts = { wsUrl, docUrls, retryMs, setupTimeoutMs, batch, observers };
    this.serverPid = serverPid;
    this.layout = plan(clients, docUrls.length, maxWorkers);
    this.clients = clients;
    this.workers = [];
    this.logLines = 0; // error lines the client library printed
    this.logSamples = [];
  }

  get workerCount() {
    return this.layout.groups.length;
  }

  async setup() {
    const t0 = performance.now();
    this.workers = this.layout.groups.map((group) => {
      // automerge-repo logs its own errors (e.g. sending on a closing socket) with console.log:
      // count those lines and keep a few rather than flood the terminal.
      const child = fork(self, ["--worker"], { stdio: ["ignore", "pipe", "pipe", "ipc"] });
      const w = { child, group, waiters: [], tail: [] };
      const onLog = (chunk) => {
        for (const raw of String(chunk).split("\n")) {
          const line = raw.trim();
          if (line) w.tail = [...w.tail.slice(-4), line.slice(0, 200)];
          if (/^error\b/i.test(line)) this.logLines++; // one per logged error
          const sample = /^err: |^[A-Za-z]*Error\b/.test(line) && line.replace(/^err: /, "").slice(0, 160);
          if (sample && this.logSamples.length < 5 && !this.logSamples.includes(sample)) this.logSamples.push(sample);
        }
      };
      child.stdout.on("data", onLog);
      child.stderr.on("data", onLog);
      child.on("message", (m) => {
        const waiter = w.waiters.find((x) => x.type === m.type || m.type === "fatal");
        if (waiter) {
          w.waiters.splice(w.waiters.indexOf(waiter), 1);
          if (m.type === "fatal") waiter.reject(new Error(m.message));
          else waiter.resolve(m);
        }
      });
      child.on("exit", (code) => {
        for (const x of w.waiters.splice(0)) x.reject(new Error(`load worker exited (${code}): ${w.tail.join(" / ")}`));
      });
      return w;
    });
    const ready = await Promise.all(
      this.workers.map((w) => {
        const p = this.#expect(w, "ready", this.opts.setupTimeoutMs);
        w.child.send({ type: "setup", ...this.opts, clients: w.group });
        return p;
      }),
    );
    return { setupMs: performance.now() - t0, findMs: Math.max(...ready.map((r) => r.setupMs)) };
  }

  #expect(w, type, ms) {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`load worker: no ${type} after ${ms} ms`)), ms);
      w.waiters.push({
        type,
        resolve: (m) => (clearTimeout(timer), resolve(m)),
        reject: (e) => (clearTimeout(timer), reject(e)),
      });
    });
  }

  /**
   * Offers `rate` changes/s in total (split evenly over the clients) for warm-up + measure,
   * then waits `drainMs` for late arrivals of the measured changes.
   */
  async window({ rate, warmupMs, measureMs, drainMs }) {
    const perClient = rate / this.clients;
    const startAt = Date.now() + 200;
    const measureAt = startAt + warmupMs;
    const pids = this.workers.map((w) => w.child.pid);
    const safe = (f) => {
      try {
        return f();
      } catch {
        return NaN; // the process is gone
      }
    };
    const cpu = () => ({
      server: this.serverPid ? safe(() => cpuSeconds(this.serverPid)) : NaN,
      client: pids.reduce((s, pid) => s + safe(() => cpuSeconds(pid)), 0) + cpuOfSelf(),
      machine: machineBusySeconds(),
      at: performance.now(),
    });
    let before, after;
    const reads = [
      sleepUntil(measureAt).then(() => (before = cpu())),
      sleepUntil(measureAt + measureMs).then(() => (after = cpu())),
    ];
    const results = await Promise.all(
      this.workers.map((w) => {
        const p = this.#expect(w, "result", warmupMs + measureMs + drainMs + 60000);
        w.child.send({ type: "window", perClient, startAt, warmupMs, measureMs, drainMs });
        return p;
      }),
    );
    await Promise.all(reads);
    const secs = measureMs / 1000;
    const elapsed = (after.at - before.at) / 1000;
    const latencies = results.flatMap((r) => r.latencies).sort((a, b) => a - b);
    const sum = (k) => results.reduce((s, r) => s + r[k], 0);
    return {
      offeredPerSec: rate,
      sentPerSec: sum("sentInWindow") / secs,
      seenPerSec: sum("seen") / secs,
      samples: latencies.length,
      sentInWindow: sum("sentInWindow"),
      seen: sum("seen"),
      unseen: sum("sentInWindow") - sum("seen"),
      skipped: sum("skipped"),
      p50Ms: percentile(latencies, 50),
      p99Ms: percentile(latencies, 99),
      maxMs: latencies.length ? latencies[latencies.length - 1] : NaN,
      serverCpuPct: ((after.server - before.server) / elapsed) * 100,
      clientCpuPct: ((after.client - before.client) / elapsed) * 100,
      // Everything else on the machine (a compiler, say): a reader can discount a noisy cell.
      otherCpuPct: Math.max(0, ((after.machine - before.machine - (after.server - before.server) - (after.client - before.client)) / elapsed) * 100),
      disconnects: sum("disconnects"),
      clientMsgsInPerSec: sum("msgsIn") / secs,
      clientMsgsOutPerSec: sum("msgsOut") / secs,
      clientErrors: results.flatMap((r) => r.errors).slice(0, 5),
      clientLogErrors: this.logLines,
      clientLogSamples: this.logSamples.slice(),
    };
  }

  /** Shuts every client's Repo down (closing its socket) and waits for the workers to exit. */
  async close() {
    await Promise.all(
      this.workers.map(async (w) => {
        if (w.child.exitCode !== null || w.child.signalCode !== null) return;
        const exited = new Promise((resolve) => w.child.once("exit", resolve));
        try {
          w.child.send({ type: "stop" });
        } catch {
          /* already gone */
        }
        const timer = setTimeout(() => w.child.kill("SIGKILL"), 15000);
        await exited;
        clearTimeout(timer);
      }),
    );
  }
}

function cpuOfSelf() {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1e6;
}

function sleepUntil(epochMs) {
  return new Promise((resolve) => setTimeout(resolve, Math.max(0, epochMs - Date.now())));
}

// ---------------------------------------------------------------------------------------------
// Worker side

async function worker() {
  const { Repo, ImmutableString } = await import("@automerge/automerge-repo");
  const { WebSocketClientAdapter } = await import("@automerge/automerge-repo-network-websocket");
  const S = (s) => new ImmutableString(s); // the run schema wants scalar strings, not text

  const clients = []; // {index, name, repo, slots: [{doc, handle, maxLamport}], next}
  const errors = [];
  let disconnects = 0;
  const msgs = { in: 0, out: 0 }; // messages the clients received and sent (server chattiness)
  // The WebSocket adapter rethrows socket errors other than ECONNREFUSED from an event handler;
  // count them rather than lose the worker (the adapter reconnects by itself).
  process.on("uncaughtException", (e) => {
    if (errors.length < 20) errors.push(String(e?.message || e));
  });
  process.on("unhandledRejection", (e) => {
    if (errors.length < 20) errors.push(String(e?.message || e));
  });

  // Sent changes awaiting their observers: graft id → {t, observers (client indexes), measured, seen}.
  const pending = new Map();
  let win = null; // the current window's counters

  function onPatches(client, slot, patches) {
    for (const p of patches) {
      if (p.action !== "put" || p.path.length !== 3 || p.path[0] !== "grafts") continue;
      if (p.path[2] === "lamport") {
        if (typeof p.value === "number" && p.value > slot.maxLamport) slot.maxLamport = p.value;
      } else if (p.path[2] === "id" && slot.observes) {
        const id = typeof p.value === "string" ? p.value : p.value?.val;
        const sent = pending.get(id);
        const i = sent ? sent.observers.indexOf(client.index) : -1;
        if (i >= 0) {
          if (sent.measured && win) {
            if (!sent.seen) win.seen++;
            win.latencies.push(performance.now() - sent.t);
          }
          sent.seen = true;
          sent.observers = sent.observers.filter((_, j) => j !== i);
          if (sent.observers.length === 0) pending.delete(id);
        }
      }
    }
  }

  async function setup({ wsUrl, docUrls, clients: specs, retryMs, batch, observers }) {
    const t0 = performance.now();
    for (let i = 0; i < specs.length; i += batch) {
      await Promise.all(specs.slice(i, i + batch).map((spec) => connect(spec)));
    }
    // Designated observers: per document, up to `observers` of this worker's clients holding
    // it, evenly spaced over them; a sender among them is left out (or, if it was the only
    // one, replaced by the next holder).
    const holders = new Map();
    for (const c of clients) for (const s of c.slots) {
      if (!holders.has(s.doc)) holders.set(s.doc, []);
      holders.get(s.doc).push([c, s]);
    }
    const picked = new Map();
    for (const [doc, list] of holders) {
      const k = Math.min(Math.max(1, observers), list.length);
      const at = [...new Set(Array.from({ length: k }, (_, j) => Math.floor((j * list.length) / k)))];
      picked.set(doc, at.map((p) => list[p]));
      for (const [, s] of picked.get(doc)) s.observes = true;
    }
    for (const [doc, list] of holders) {
      list.forEach(([c, s], pos) => {
        s.observers = picked.get(doc).filter(([o]) => o !== c).map(([o]) => o.index);
        if (s.observers.length === 0) {
          const [next, nextSlot] = list[(pos + 1) % list.length];
          nextSlot.observes = true;
          s.observers = [next.index];
        }
      });
    }
    return performance.now() - t0;

    async function connect(spec) {
      const adapter = new WebSocketClientAdapter(wsUrl, retryMs);
      const connected = new Promise((resolve) => adapter.once("peer-candidate", resolve));
      adapter.on("peer-disconnected", () => disconnects++);
      adapter.on("message", () => msgs.in++);
      const send = adapter.send.bind(adapter);
      adapter.send = (m) => {
        msgs.out++;
        return send(m);
      };
      const repo = new Repo({ network: [adapter], peerId: spec.name });
      const client = { index: spec.index, name: spec.name, repo, slots: [], next: 0 };
      clients.push(client);
      // find() gives up as "unavailable" if no peer has answered within the adapter's 1 s grace,
      // so ask only once the server has said hello.
      await connected;
      for (const doc of spec.docs) {
        const handle = await repo.find(docUrls[doc]);
        const grafts = handle.doc().grafts || [];
        let maxLamport = 0;
        for (const g of grafts) if (typeof g.lamport === "number" && g.lamport > maxLamport) maxLamport = g.lamport;
        const slot = { doc, handle, maxLamport, observes: false, observers: [] };
        handle.on("change", ({ patches }) => onPatches(client, slot, patches));
        client.slots.push(slot);
      }
    }
  }

  function change(client, t, measured) {
    const slot = client.slots[client.next++ % client.slots.length];
    const id = randomUUID();
    pending.set(id, { t, observers: slot.observers, measured, seen: false });
    slot.handle.change((d) => {
      d.grafts.push({
        id: S(id),
        agent: S("bench"),
        afterStep: S("step-1"),
        user: S(client.name),
        region: S("bench"),
        lamport: slot.maxLamport + 1,
        createdAt: new Date(),
      });
    });
  }

  async function runWindow({ perClient, startAt, warmupMs, measureMs, drainMs }) {
    // Changes go round-robin over this worker's clients, so each makes `perClient` per second.
    const rate = perClient * clients.length;
    const tStart = performance.now() + (startAt - Date.now());
    const tMeasure = tStart + warmupMs;
    const tEnd = tMeasure + measureMs;
    win = { seen: 0, latencies: [], sentInWindow: 0, skipped: 0, disconnects0: disconnects };
    let msgs0; // counts over the measure window
    let n = 0;
    await new Promise((resolve) => {
      const timer = setInterval(() => {
        const now = performance.now();
        if (now >= tMeasure && !msgs0) msgs0 = { ...msgs };
        if (now >= tEnd) {
          win.msgsIn = msgs.in - (msgs0?.in ?? 0);
          win.msgsOut = msgs.out - (msgs0?.out ?? 0);
          clearInterval(timer);
          return resolve();
        }
        if (now < tStart) return;
        const due = Math.floor(((now - tStart) * rate) / 1000);
        // Behind by more than half a second of changes: this process is saturated (its event
        // loop was blocked); catch up on half a second's worth at most, count the rest as skipped.
        const burst = Math.ceil(rate / 2);
        if (due - n > burst) {
          win.skipped += due - n - burst;
          n = due - burst;
        }
        while (n < due) {
          const t = performance.now();
          const measured = t >= tMeasure && t < tEnd;
          if (measured) win.sentInWindow++;
          change(clients[n % clients.length], t, measured);
          n++;
        }
      }, 5);
    });
    await new Promise((resolve) => setTimeout(resolve, drainMs));
    const result = {
      type: "result",
      seen: win.seen,
      sentInWindow: win.sentInWindow,
      skipped: win.skipped,
      latencies: win.latencies,
      disconnects: disconnects - win.disconnects0,
      msgsIn: win.msgsIn,
      msgsOut: win.msgsOut,
      errors: errors.splice(0),
    };
    pending.clear();
    win = null;
    return result;
  }

  process.on("disconnect", () => process.exit(0)); // the parent is gone
  process.on("message", async (m) => {
    try {
      if (m.type === "setup") process.send({ type: "ready", setupMs: await setup(m) });
      else if (m.type === "window") process.send(await runWindow(m));
      else if (m.type === "stop") {
        await Promise.race([
          Promise.all(clients.map((c) => c.repo.shutdown().catch(() => {}))),
          new Promise((r) => setTimeout(r, 10000)),
        ]);
        process.exit(0);
      }
    } catch (e) {
      process.send({ type: "fatal", message: String(e?.stack || e) });
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Stand-alone use against a running server

function option(argv, name, fallback) {
  const i = argv.indexOf(name);
  return i >= 0 ? argv[i + 1] : fallback;
}

async function standalone(argv) {
  const docUrls = argv.flatMap((a, i) => (a === "--doc" ? [argv[i + 1]] : []));
  const wsUrl = option(argv, "--ws");
  if (!wsUrl || docUrls.length === 0) {
    console.error("usage: node bench/automerge-load.js --ws URL --doc AUTOMERGE_URL [--doc ...] [--clients N] [--rate R] [--pid SERVER_PID] [--warmup S] [--measure S] [--drain S] [--workers N] [--observers K]");
    process.exit(2);
  }
  const load = new LoadClient({
    wsUrl,
    docUrls,
    clients: Number(option(argv, "--clients", 10)),
    maxWorkers: Number(option(argv, "--workers", 2)),
    observers: Number(option(argv, "--observers", 4)),
    serverPid: option(argv, "--pid") ? Number(option(argv, "--pid")) : undefined,
  });
  try {
    console.log(await load.setup());
    console.log(
      await load.window({
        rate: Number(option(argv, "--rate", 200)),
        warmupMs: Number(option(argv, "--warmup", 5)) * 1000,
        measureMs: Number(option(argv, "--measure", 15)) * 1000,
        drainMs: Number(option(argv, "--drain", 5)) * 1000,
      }),
    );
  } finally {
    await load.close();
  }
}

if (process.argv[1] === self) {
  if (process.argv[2] === "--worker") worker();
  else standalone(process.argv.slice(2)).catch((e) => {
    console.error(e);
    process.exit(1);
  });
}
