"""Deployment files (docker/, .dockerignore): Dockerfile, Compose + Prometheus + Grafana (Kubernetes: test_deploy_k8s.py).

Static checks only (no image is built; docker/smoke-test.sh does that). The Kubernetes manifests are rendered
with `kubectl kustomize` when kubectl is installed; without it the raw YAML is still checked with pyyaml.
Prometheus files are checked with `promtool` when it is installed. The dashboard's metric names are checked
against what the live demo server's /metrics really exports.
"""
from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import tomllib

import httpx
import pytest

from deploy_helpers import DASHBOARD, DOCKER, ROOT, UID, env_pairs, serve_env_names

yaml = pytest.importorskip("yaml")


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for raw in (DOCKER / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in dockerfile_instructions():
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result




def dashboard_exprs() -> list[str]:
    exprs: list[str] = []

    def walk(o):
        if isinstance(o, dict):
            for k, v in o.items():
                if k == "expr":
                    exprs.append(v)
                else:
                    walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)

    walk(json.loads(DASHBOARD.read_text()))
    return exprs


def dashboard_metric_names() -> set[str]:
    names = set()
    for e in dashboard_exprs():
        names.update(re.findall(r"\b((?:vllm|loramux)[:_][A-Za-z0-9_:]+)", e))
    return {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}


# ----------------------------------------------------------------------------------------------- Dockerfile
def test_dockerfile_multistage_wheel_and_base():
    st = stages()
    assert len(st) >= 3, "base, builder and runtime stages expected"
    pre_from = [a for (i, a) in dockerfile_instructions()[:1] if i == "ARG"]
    assert pre_from and pre_from[0].startswith("BASE_IMAGE="), "first line must be ARG BASE_IMAGE=<default>"
    base = pre_from[0].split("=", 1)[1]
    m = re.fullmatch(r"pytorch/pytorch:(\d+)\.(\d+)\.(\d+)-cuda[\d.]+-cudnn\d+-runtime", base)
    assert m, f"default BASE_IMAGE {base!r} should be an official PyTorch CUDA runtime image"
    assert (int(m[1]), int(m[2])) >= (2, 4), "pyproject requires torch>=2.4"
    assert st[0][0] == ("FROM", "${BASE_IMAGE} AS base")
    builder = next(s for s in st if s[0][1].endswith("AS builder"))
    assert any(i == "RUN" and "pip wheel" in a for i, a in builder)
    final = st[-1]
    assert any(i == "COPY" and a.startswith("--from=builder") for i, a in final)
    assert any(i == "RUN" and re.search(r"pip install \S*\.whl", a) for i, a in final)
    assert any(i == "ARG" and a.startswith("PIP_CERT") for i, a in dockerfile_instructions())


def test_dockerfile_runtime_user_entrypoint_healthcheck():
    final = stages()[-1]
    users = [a for i, a in final if i == "USER"]
    assert users, "the runtime stage must set USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) == UID, f"numeric non-root USER expected, got {users[-1]!r}"
    assert not gid or (gid.isdigit() and int(gid) != 0)
    entry = [a for i, a in final if i == "ENTRYPOINT"]
    assert len(entry) == 1 and json.loads(entry[0]) == ["loramux", "serve"], "exec-form ENTRYPOINT expected"
    hc = [a for i, a in final if i == "HEALTHCHECK"]
    assert len(hc) == 1 and "/health" in hc[0]
    cmd = hc[0][hc[0].index("CMD") + 3:].strip()
    assert isinstance(json.loads(cmd), list), "HEALTHCHECK CMD in exec form (no shell needed)"
    assert re.search(r"--start-period=\d+", hc[0])
    assert ("EXPOSE", "8000") in final
    assert ("STOPSIGNAL", "SIGTERM") in final


def test_dockerfile_env_is_real_serve_flags():
    final = stages()[-1]
    env: dict[str, str] = {}
    for i, a in final:
        if i == "ENV":
            env.update(env_pairs(a))
    assert env["LORAMUX_HOST"] == "0.0.0.0"
    assert env["LORAMUX_PORT"] == "8000"
    assert env["LORAMUX_ADAPTER_DIR"] == "/adapters"
    assert env["LORAMUX_CACHE_DIR"] == "/cache"
    flags = serve_env_names()
    unknown = {k for k in env if k.startswith("LORAMUX_")} - flags
    assert not unknown, f"ENV sets LORAMUX_* names that are not `loramux serve` flags: {unknown}"
    volumes = [a for i, a in final if i == "VOLUME"]
    assert volumes and set(json.loads(volumes[0])) == {"/adapters", "/cache"}
    run = " ".join(a for i, a in final if i == "RUN")
    assert f"chown {UID}:{UID} /adapters /cache" in run


def test_dockerignore_keeps_packages_and_drops_local_state():
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    for must in (".git", ".venv", "tests"):
        assert must in patterns

    def ignored(rel: str) -> bool:
        verdict = False
        for p in patterns:
            neg = p.startswith("!")
            pat = p[1:] if neg else p
            if fnmatch.fnmatch(rel, pat) or fnmatch.fnmatch(rel, pat.replace("**/", "")):
                verdict = not neg
        return verdict

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {"pyproject.toml", "README.md"}
    needed |= {v.split("/")[0] for v in pyproject["tool"]["setuptools"].get("package-dir", {}).values()}
    for rel in sorted(needed):
        assert (ROOT / rel).exists(), rel
        assert not ignored(rel), f".dockerignore drops {rel}, which the wheel build needs"


# ------------------------------------------------------------------------------------------------ Compose
def test_compose_services_volumes_and_mounted_files():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) >= {"loramux", "prometheus", "grafana"}
    lm = services["loramux"]
    assert lm["build"]["dockerfile"] == "docker/Dockerfile" and (DOCKER / lm["build"]["context"]).resolve() == ROOT
    assert lm["init"] is True
    assert int(lm["stop_grace_period"].rstrip("s")) > 30, "longer than the server's drain timeout"
    assert any(v.endswith(":/models:ro") for v in lm["volumes"])
    assert "adapters:/adapters" in lm["volumes"]
    for item in lm.get("environment", []):
        assert "=" not in item or item.split("=", 1)[1] != "", f"empty value for {item} (empty is not unset)"
    flags = serve_env_names()
    assert {e for e in lm["environment"] if e.startswith("LORAMUX_")} <= flags
    declared = set(compose["volumes"])
    for svc in services.values():
        for v in svc.get("volumes", []):
            src = v.split(":")[0]
            if src.startswith("./"):
                assert (DOCKER / src).exists(), f"{src} is mounted but missing"
            elif not src.startswith("${"):
                assert src in declared, f"named volume {src} not declared"
    gpu = yaml.safe_load((DOCKER / "compose.gpu.yaml").read_text())
    dev = gpu["services"]["loramux"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert dev["driver"] == "nvidia" and dev["capabilities"] == ["gpu"]


def test_prometheus_scrapes_loramux():
    prom = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "loramux")
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["loramux:8000"]
    promtool = shutil.which("promtool")
    if promtool:
        r = subprocess.run([promtool, "check", "config", str(DOCKER / "prometheus" / "prometheus.yml")],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stdout + r.stderr


def test_grafana_provisioning_matches_compose_and_dashboard():
    ds = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yaml").read_text())["datasources"][0]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    prov = yaml.safe_load((DOCKER / "grafana/provisioning/dashboards/loramux.yaml").read_text())["providers"][0]
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in compose["services"]["grafana"]["volumes"]
                  if v.startswith("./"))
    assert mounts["./grafana/dashboards"] == prov["options"]["path"]
    dash = json.loads(DASHBOARD.read_text())
    var = next(v for v in dash["templating"]["list"] if v["type"] == "datasource")
    assert var["current"]["value"] == ds["uid"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel {p['title']!r} overlaps another"
                cells.add((x, y))


def test_dashboard_covers_the_required_views():
    exprs = "\n".join(dashboard_exprs())
    for needle in ("vllm:e2e_request_latency_seconds_count", "vllm:generation_tokens_total",
                   "vllm:prompt_tokens_total", "vllm:num_requests_running", "vllm:num_requests_waiting",
                   "vllm:kv_cache_usage_perc", "loramux_adapter_slots_in_use", "loramux_adapter_loads_total",
                   "loramux_adapter_evictions_total", "loramux_adapter_hits_total", "loramux_adapter_requests_total",
                   "vllm:lora_requests_info"):
        assert needle in exprs, needle
    for hist in ("vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
                 "vllm:e2e_request_latency_seconds"):
        for q in ("0.5", "0.9", "0.99"):
            assert f"histogram_quantile({q}, sum by (le) (rate({hist}_bucket" in exprs, (hist, q)
    assert "topk(10, sum by (adapter)" in exprs


def test_dashboard_promql_parses(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus provides it)")
    rules = [{"record": f"dashboard:expr_{i}",
              "expr": e.replace("$__rate_interval", "1m").replace("$__range", "1h").replace("$instance", ".*")}
             for i, e in enumerate(dashboard_exprs())]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr


def _scrape(demo_server) -> str:
    base, runtime = demo_server
    adapter = next((m["id"] for m in httpx.get(base + "/v1/models").json()["data"] if m["id"] != runtime.model_name),
                   None)
    for model in (runtime.model_name, adapter):
        if model:
            r = httpx.post(base + "/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 3},
                           timeout=60)
            assert r.status_code == 200, r.text
    r = httpx.get(base + "/metrics")
    if r.status_code == 404:
        pytest.skip("route not present: /metrics")
    assert r.status_code == 200
    return r.text


def test_dashboard_metrics_are_exported(demo_server):
    """Every metric the dashboard (and docker/smoke-test.sh) queries exists on the server's /metrics."""
    text = _scrape(demo_server)
    exported = set(re.findall(r"^# TYPE (\S+) ", text, flags=re.M))
    samples = set(re.findall(r"^([A-Za-z_:][A-Za-z0-9_:]*)[{ ]", text, flags=re.M))
    missing = {n for n in dashboard_metric_names() if n not in exported and n not in samples
               and n.removesuffix("_total") not in exported}
    assert not missing, f"the dashboard queries metrics the server does not export: {sorted(missing)}"


def test_metrics_exposition_is_valid_for_prometheus(demo_server):
    """Prometheus drops a whole scrape whose text declares a metric family twice (second HELP/TYPE line)."""
    text = _scrape(demo_server)
    types = re.findall(r"^# TYPE (\S+) ", text, flags=re.M)
    dups = sorted({t for t in types if types.count(t) > 1})
    assert not dups, f"metric families declared more than once: {dups}"

def test_smoke_test_script_is_valid_bash():
    script = DOCKER / "smoke-test.sh"
    assert script.stat().st_mode & 0o111, "smoke-test.sh should be executable"
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


def test_deploy_docs_cover_every_serve_flag():
    """docs/deploy.md's configuration reference names every `loramux serve` flag's LORAMUX_* variable."""
    doc = (ROOT / "docs" / "deploy.md").read_text()
    missing = sorted(n for n in serve_env_names() if f"`{n}`" not in doc)
    assert not missing, f"add these to the configuration reference in docs/deploy.md: {missing}"
