#!/usr/bin/env bash
# Validates the deploy files that can be validated without a cluster:
# every YAML and JSON file parses, Prometheus accepts the config and the
# alert rules, every metric they and the dashboard use exists in
# src/telemetry.rs, and every ghz call names an RPC in proto/.
# Run by deploy/test.sh; alone: ./deploy/check.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
ensure_check_tools
cd "$ROOT/deploy"

log "deploy files parse"
python3 - <<'PY'
import glob, json, sys, yaml
for path in sorted(glob.glob("**/*.yaml", recursive=True) + glob.glob("**/*.yml", recursive=True)):
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    assert docs, f"{path}: empty"
    for d in docs:
        if "apiVersion" in str(d)[:200] and isinstance(d, dict):
            assert "kind" in d and "metadata" in d, f"{path}: a manifest without kind/metadata"
for path in sorted(glob.glob("**/*.json", recursive=True)):
    with open(path) as f:
        json.load(f)
print("yaml and json: ok")
PY

log "promtool"
promtool check config prometheus.yml
promtool check rules alerts.yml

log "metric names and ghz calls match the source"
python3 - "$ROOT" <<'PY'
import glob, json, re, sys
root = sys.argv[1]
telemetry = open(f"{root}/src/telemetry.rs").read()
known = set(re.findall(r'"(holdfast_[a-z_]+)"', telemetry))
used = set()
for path in ["alerts.yml", "grafana/holdfast.json"]:
    used |= set(re.findall(r"holdfast_[a-z_]+", open(path).read()))
def base(name):
    for suffix in ("_bucket", "_count", "_sum"):
        if name.endswith(suffix) and name[: -len(suffix)] in known:
            return name[: -len(suffix)]
    return name
unknown = sorted(n for n in used if base(n) not in known)
assert not unknown, f"metrics not defined in src/telemetry.rs: {unknown}"
protos = "".join(open(p).read() for p in glob.glob(f"{root}/proto/holdfast/v1/*.proto"))
services = {}
for svc, body in re.findall(r"service (\w+) \{(.*?)\n\}", protos, re.S):
    services[svc] = set(re.findall(r"rpc (\w+)\(", body))
for path in sorted(glob.glob("ghz/*.json")):
    call = json.load(open(path))["call"]
    pkg, svc, rpc = call.rsplit(".", 2)
    if pkg == "grpc.health.v1":
        continue
    assert pkg == "holdfast.v1" and rpc in services.get(svc, ()), f"{path}: {call} is not in proto/"
print(f"{len(used)} metric names, {len(glob.glob('ghz/*.json'))} ghz calls: ok")
PY
