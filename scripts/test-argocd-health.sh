#!/usr/bin/env bash
# The chart's Argo CD health check (charts/medmerge/argocd/health.lua) against every sample
# status in health_test.yaml, run by a real Lua 5.1 interpreter (the dialect of Argo CD's
# gopher-lua; Debian's lua5.1, installed once, with python3-yaml to read the samples). Fails
# naming the sample and both health values.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=charts/medmerge/argocd
# Debian's own python3, where python3-yaml installs (make test puts the torch venv's python first).
PY=/usr/bin/python3
if ! command -v lua5.1 >/dev/null || ! "$PY" -c 'import yaml' 2>/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq lua5.1 python3-yaml >/dev/null) >&2
fi
"$PY" - "$DIR" <<'PY'
import subprocess, sys, yaml

def lua(value):
    """A YAML value as a Lua literal (maps and lists as tables, as Argo CD hands them over)."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return "\"" + value.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n") + "\""
    if isinstance(value, list):
        return "{" + ", ".join(lua(v) for v in value) + "}"
    return "{" + ", ".join(f"[{lua(str(k))}] = {lua(v)}" for k, v in value.items()) + "}"

folder = sys.argv[1]
cases = yaml.safe_load(open(f"{folder}/health_test.yaml"))["tests"]
failures = 0
for case in cases:
    obj = yaml.safe_load(open(f"{folder}/{case['inputPath']}"))
    program = f"obj = {lua(obj)}\nlocal hs = dofile({lua(folder + '/health.lua')})\nio.write(hs.status, '\\n', hs.message or '', '\\n')\n"
    run = subprocess.run(["lua5.1", "-"], input=program, capture_output=True, text=True)
    got = run.stdout.split("\n")[:2] if run.returncode == 0 else ["error", run.stderr.strip()]
    want = [case["healthStatus"]["status"], case["healthStatus"].get("message", "")]
    if got != want:
        failures += 1
        print(f"argocd health: {case['inputPath']}: got {got}, want {want}", file=sys.stderr)
print(f"argocd health: {len(cases) - failures} of {len(cases)} sample statuses as expected", file=sys.stderr)
sys.exit(1 if failures else 0)
PY
