"""Checks deploy/k8s manifests against what Ferry's binaries accept.

    check_k8s.py MANIFEST BIN_DIR

Beyond the schema (kubernetes-validate does that): every flag a container
passes is one its binary's --help lists; the ports its --listen,
--health-listen and --metrics-listen name are the container's grpc, health
and metrics ports; probes ask the health port (readiness "", liveness
"liveness"); the Prometheus annotation names the metrics port; every peer URL
names a Service of the manifest on its port; every Secret item is a file
`ferry certs init` writes, and every TLS file a flag names is mounted; each
StatefulSet is governed by a headless Service selecting its pods; Services,
the PodDisruptionBudget and the NetworkPolicies select pods that exist, and
policies allow egress only to ports those pods serve. Prints each problem and
exits 1 if there is one.
"""

import os
import re
import subprocess
import sys
import tempfile
from urllib.parse import urlparse

import yaml

problems = []


def problem(message):
    problems.append(message)


def selects(selector, labels):
    return all(labels.get(k) == v for k, v in (selector or {}).items())


def port_of(address):
    return int(address.rsplit(":", 1)[1])


def main(manifest, bin_dir):
    docs = [d for d in yaml.safe_load_all(open(manifest)) if d]
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    services = {s["metadata"]["name"]: s for s in by_kind.get("Service", [])}
    sets = by_kind.get("StatefulSet", [])
    if not sets:
        problem("no StatefulSet")

    # What `ferry certs init` writes, for the Secret's items.
    with tempfile.TemporaryDirectory() as pki:
        subprocess.run(
            [os.path.join(bin_dir, "ferry"), "certs", "init", os.path.join(pki, "p")],
            check=True,
            capture_output=True,
        )
        cert_files = set(os.listdir(os.path.join(pki, "p")))

    helps = {}
    pods = []  # (labels, {port name: number})
    for st in sets:
        name = st["metadata"]["name"]
        template = st["spec"]["template"]
        labels = template["metadata"].get("labels", {})
        annotations = template["metadata"].get("annotations", {})
        if not selects(st["spec"]["selector"]["matchLabels"], labels):
            problem(f"{name}: its selector does not select its own pods")
        governing = services.get(st["spec"].get("serviceName"))
        if governing is None:
            problem(f"{name}: serviceName {st['spec'].get('serviceName')!r} is no Service here")
        elif governing["spec"].get("clusterIP") != "None":
            problem(f"{name}: its governing Service {governing['metadata']['name']} is not headless")
        elif not selects(governing["spec"]["selector"], labels):
            problem(f"{name}: its governing Service does not select its pods")
        claims = {c["metadata"]["name"] for c in st["spec"].get("volumeClaimTemplates", [])}
        spec = template["spec"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec["containers"]:
            binary = c["command"][0]
            path = os.path.join(bin_dir, binary)
            if not os.access(path, os.X_OK):
                problem(f"{name}: command {binary!r} is not one of Ferry's binaries")
                continue
            if binary not in helps:
                out = subprocess.run([path, "--help"], capture_output=True, text=True)
                helps[binary] = set(re.findall(r"--[a-z][a-z0-9-]*", out.stdout))
            flags = {}
            for arg in c.get("args", []):
                if not arg.startswith("--"):
                    problem(f"{name}: argument {arg!r} is not --flag=value (write each flag with =)")
                    continue
                flag, _, value = arg.partition("=")
                if flag not in helps[binary]:
                    problem(f"{name}: {binary} has no flag {flag}")
                flags[flag] = value
            ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
            pods.append((labels, ports))
            for flag, port_name in [
                ("--listen", "grpc"),
                ("--health-listen", "health"),
                ("--metrics-listen", "metrics"),
            ]:
                if flag not in flags:
                    problem(f"{name}: no {flag}")
                elif ports.get(port_name) != port_of(flags[flag]):
                    problem(f"{name}: {flag} {flags[flag]} is not its {port_name} port {ports.get(port_name)}")
            if annotations.get("prometheus.io/port") != str(ports.get("metrics")):
                problem(f"{name}: prometheus.io/port is not its metrics port")
            for probe, service in [("readinessProbe", ""), ("livenessProbe", "liveness")]:
                grpc = c.get(probe, {}).get("grpc")
                if grpc is None:
                    problem(f"{name}: {probe} is not a gRPC probe")
                elif grpc.get("port") != ports.get("health") or grpc.get("service", "") != service:
                    problem(f"{name}: {probe} does not ask the health port for {service!r}")
            for flag in ["--registry", "--cache", "--processor"]:
                if flag in flags:
                    url = urlparse(flags[flag])
                    short = url.hostname.split(".")[0]
                    target = services.get(short)
                    if target is None or url.hostname not in (
                        short,
                        f"{short}.ferry.svc.cluster.local",
                        f"{short}.ferry.svc",
                    ):
                        problem(f"{name}: {flag} {flags[flag]} names no Service here")
                    elif url.port not in [p["port"] for p in target["spec"]["ports"]]:
                        problem(f"{name}: {flag} {flags[flag]}: Service {short} has no port {url.port}")
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            for m in mounts.values():
                if m not in volumes and m not in claims:
                    problem(f"{name}: volume {m} is mounted but not defined")
            for flag in ["--tls-cert", "--tls-key", "--tls-ca"]:
                path = flags.get(flag)
                if path is None:
                    problem(f"{name}: no {flag}")
                    continue
                directory, file = os.path.split(path)
                volume = volumes.get(mounts.get(directory))
                items = {i["path"]: i["key"] for i in ((volume or {}).get("secret") or {}).get("items", [])}
                if file not in items:
                    problem(f"{name}: {flag} {path} is not a mounted Secret item")
                elif items[file] not in cert_files:
                    problem(f"{name}: Secret key {items[file]} is not a file `ferry certs init` writes")

    def pods_of(selector):
        return [ports for labels, ports in pods if selects(selector, labels)]

    for s in services.values():
        selected = pods_of(s["spec"]["selector"])
        if not selected:
            problem(f"Service {s['metadata']['name']} selects no pod")
        for p in s["spec"]["ports"]:
            target = p.get("targetPort", p["port"])
            for ports in selected:
                if target not in ports and target not in ports.values():
                    problem(f"Service {s['metadata']['name']}: no container port {target}")
    for pdb in by_kind.get("PodDisruptionBudget", []):
        if len(pods_of(pdb["spec"]["selector"]["matchLabels"])) < len(sets):
            problem(f"PodDisruptionBudget {pdb['metadata']['name']} does not cover every StatefulSet")
    for np in by_kind.get("NetworkPolicy", []):
        selector = np["spec"]["podSelector"].get("matchLabels")
        if selector and not pods_of(selector):
            problem(f"NetworkPolicy {np['metadata']['name']} selects no pod")
        for rule in np["spec"].get("egress", []):
            for to in rule.get("to", []):
                if "namespaceSelector" in to:
                    continue
                targets = pods_of(to.get("podSelector", {}).get("matchLabels"))
                if not targets:
                    problem(f"NetworkPolicy {np['metadata']['name']}: egress to no pod")
                for p in rule.get("ports", []):
                    if not any(p["port"] in t.values() for t in targets):
                        problem(f"NetworkPolicy {np['metadata']['name']}: egress port {p['port']} is served by none of its pods")

    for p in problems:
        print(p)
    if problems:
        sys.exit(1)
    print(f"{manifest}: {len(sets)} StatefulSets, {len(services)} Services checked against the binaries")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
