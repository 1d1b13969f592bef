import { Repo, ImmutableString } from "@automerge/automerge-repo";
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket";
const url = process.argv[2]; const n = Number(process.argv[3]||2); const rate = Number(process.argv[4]||2);
const stats = {sent:0, recv:0, sentBytes:0, recvBytes:0, types:{}};
const hs = [];
for (let i=0;i<n;i++){
  const a = new WebSocketClientAdapter("ws://127.0.0.1:3931", 1000);
  const os = a.send.bind(a); a.send = (m)=>{stats.sent++; stats.sentBytes += m.data?.byteLength||0; stats.types['out '+m.type]=(stats.types['out '+m.type]||0)+1; return os(m)};
  a.on("message", m=>{stats.recv++; stats.recvBytes += m.data?.byteLength||0; stats.types['in '+m.type]=(stats.types['in '+m.type]||0)+1;});
  const c = new Promise(r=>a.once("peer-candidate", r));
  const r = new Repo({network:[a], peerId:"diag-"+i+"-"+Math.random()});
  await c; hs.push(await r.find(url));
}
const t0=performance.now(); let k=0;
const cpu0 = process.cpuUsage();
const timer = setInterval(()=>{ const h = hs[k%n]; k++; h.change(d=>d.grafts.push({id:new ImmutableString(String(k)), lamport:k})); }, 1000/rate);
setTimeout(()=>{ clearInterval(timer); const c=process.cpuUsage(cpu0); console.log(JSON.stringify(stats), 'changes', k, 'cpu ms', (c.user+c.system)/1000, 'len', hs[0].doc().grafts.length); process.exit(0)}, 5000);
