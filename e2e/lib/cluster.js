// Real crdt-node processes for the browser tests: each with its own SQLite database, meshed
// through a TCP proxy the test can cut.
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
export const repo = path.resolve(here, "../..");
const bin = process.env.CRDT_NODE_BIN || path.join(repo, "target/debug/crdt-node");
export const SECRET = "e2e-mesh-secret";

/**
 * A node process; `start()` again after `stop()` brings it back on the same port and data.
 * `options.bin` picks another binary (the benchmarks run the release build).
 */
export class Node {
  constructor(name, region, env = {}, options = {}) {
    this.name = name;
    this.region = region;
    this.env = env;
    this.bin = options.bin || bin;
    this.dir = mkdtempSync(path.join(os.tmpdir(), `crdt-e2e-${name}-`));
    this.port = 0;
    this.log = [];
  }

  get url() {
    return `http://127.0.0.1:${this.port}`;
  }

  async start() {
    const env = {
      PATH: process.env.PATH,
      CRDT_CONFIG: path.join(repo, "config/application.yml"),
      DATABASE_URL: `sqlite://${path.join(this.dir, "node.db")}`,
      REGION: this.region,
      NODE_ID: this.name,
      PORT: String(this.port),
      RUST_LOG: "info,automerge=warn",
      CRDT_MESH_SECRET: SECRET,
      CRDT_MESH_HEARTBEAT_MS: "300",
      CRDT_MESH_PEER_TIMEOUT_MS: "2000",
      CRDT_MESH_RECONNECT_MIN_MS: "100",
      CRDT_MESH_RECONNECT_MAX_MS: "500",
      ...this.env,
    };
    this.child = spawn(this.bin, [], { env, stdio: ["ignore", "ignore", "pipe"] });
    this.exited = new Promise((resolve) => this.child.once("exit", resolve));
    const listening = new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`${this.name} did not start:\n${this.log.join("\n")}`)), 60000);
      let buffered = "";
      this.child.stderr.on("data", (chunk) => {
        buffered += chunk;
        const lines = buffered.split("\n");
        buffered = lines.pop();
        for (const line of lines) {
          this.log.push(line);
          const m = line.match(/listening on http:\/\/[\d.]+:(\d+)/);
          if (m) {
            clearTimeout(timer);
            resolve(Number(m[1]));
          }
        }
      });
      this.child.once("exit", (code) => reject(new Error(`${this.name} exited (${code}):\n${this.log.join("\n")}`)));
    });
    this.port = await listening;
  }

  /** SIGKILL (a crash: nothing is flushed or snapshotted), and wait for the exit. */
  async kill() {
    if (!this.child || this.child.exitCode !== null) return;
    this.child.kill("SIGKILL");
    await this.exited;
  }

  /** SIGTERM, and wait for the exit. */
  async stop() {
    if (!this.child || this.child.exitCode !== null) return;
    this.child.kill("SIGTERM");
    await this.exited;
  }

  async api(p, init = {}) {
    const res = await fetch(this.url + p, {
      ...init,
      headers: { "content-type": "application/json", ...(init.headers || {}) },
    });
    return { status: res.status, body: await res.json() };
  }

  cleanup() {
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/** A TCP proxy to `target()` that the test can cut (drop every connection, refuse new ones). */
export class Proxy {
  constructor(target) {
    this.target = target;
    this.sockets = new Set();
    this.open = true;
    this.server = net.createServer((client) => {
      if (!this.open) return client.destroy();
      const upstream = net.connect(this.target(), "127.0.0.1");
      for (const s of [client, upstream]) {
        this.sockets.add(s);
        s.on("close", () => this.sockets.delete(s));
        s.on("error", () => {});
      }
      client.pipe(upstream).pipe(client);
      client.on("close", () => upstream.destroy());
      upstream.on("close", () => client.destroy());
    });
  }

  async listen() {
    await new Promise((resolve) => this.server.listen(0, "127.0.0.1", resolve));
    this.port = this.server.address().port;
    return `ws://127.0.0.1:${this.port}/ws`;
  }

  cut() {
    this.open = false;
    for (const s of this.sockets) s.destroy();
  }

  heal() {
    this.open = true;
  }

  close() {
    this.cut();
    this.server.close();
  }
}

/**
 * Two regions: eu-central-1 (`west`) and us-east-1 (`east`), which dials west through a
 * `Proxy` the test can cut (`link`); resolves once each lists the other as connected. `env` for
 * both nodes; `headers` for the mesh status when the nodes ask for a token.
 */
export async function meshedPair([westName, eastName], env = {}, headers = {}) {
  const west = new Node(westName, "eu-central-1", env);
  await west.start();
  const link = new Proxy(() => west.port);
  const peer = await link.listen();
  const east = new Node(eastName, "us-east-1", { ...env, CRDT_MESH_PEERS: peer });
  await east.start();
  for (const n of [east, west]) {
    await until(`${n.name} meshed`, async () =>
      (await n.api("/api/crdt/mesh/status", { headers })).body.connectedPeers === 1);
  }
  return { west, east, link };
}

/** Polls `f` until it returns a truthy value, or fails after `ms`. */
export async function until(what, f, ms = 20000) {
  const deadline = Date.now() + ms;
  let last;
  while (Date.now() < deadline) {
    try {
      last = await f();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`timed out waiting for ${what} (last: ${last})`);
}
