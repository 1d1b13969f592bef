import { Repo, ImmutableString } from "@automerge/automerge-repo";
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket";
const url = process.argv[2]; const n = Number(process.argv[3]||2); const rate = Number(process.argv[4]||2);
const hs = [];
for (let i=0;i<n;i++){
  const a = new WebSocketClientAdapter("ws://127.0.0.1:3931", 1000);
  const c = new Promise(r=>a.once("peer-candidate", r));
  const r = new Repo({network:[a], peerId:"lat-"+i+"-"+Math.random()});
  await c; hs.push(await r.find(url));
}
const sent = new Map(); const lat=[];
hs[1].on("change", ({patches}) => { for (const p of patches) if (p.action==="put" && p.path[2]==="id") { const t = sent.get(p.value.val ?? p.value); if (t!==undefined) { lat.push(performance.now()-t); sent.delete(p.value.val); } } });
let k=0;
const timer = setInterval(()=>{ const h = hs[(k%n)===1?0:k%n]; k++; const id=String(k)+Math.random(); sent.set(id, performance.now()); h.change(d=>d.grafts.push({id:new ImmutableString(id), lamport:k})); }, 1000/rate);
setTimeout(()=>{ clearInterval(timer); lat.sort((a,b)=>a-b); console.log('n',lat.length,'p50',lat[lat.length>>1]?.toFixed(1),'max',lat.at(-1)?.toFixed(1), lat.map(x=>x.toFixed(0)).join(' ')); process.exit(0)}, 6000);
