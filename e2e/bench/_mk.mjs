import { Repo } from "@automerge/automerge-repo";
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket";
const a = new WebSocketClientAdapter("ws://127.0.0.1:3931");
const r = new Repo({network:[a]});
await new Promise(r=>a.once("peer-candidate", r));
const h = r.create({grafts:[],prunedSteps:{},flags:{}});
await new Promise(r=>setTimeout(r,500));
console.log(h.url);
await r.shutdown();
