"""Kubernetes manifests (docker/k8s): raw YAML always, rendered with `kubectl kustomize` when kubectl is installed."""
from __future__ import annotations

import os

import pytest
from deploy_helpers import K8S, PENDING_FLAGS, UID, by_kind, kustomize, load_yaml_docs, serve_env_names

yaml = pytest.importorskip("yaml")


# ------------------------------------------------------------------------------------------------ Kubernetes
def test_k8s_raw_yaml():
    """Without rendering: every manifest parses, and the kustomizations name files that exist."""
    files = sorted(K8S.rglob("*.yaml"))
    assert files
    for f in files:
        docs = load_yaml_docs(f.read_text())
        assert docs, f
        for d in docs:
            assert "kind" in d and "apiVersion" in d, f
    for kfile in K8S.rglob("kustomization.yaml"):
        k = yaml.safe_load(kfile.read_text())
        for res in k.get("resources", []) + [p["path"] for p in k.get("patches", [])]:
            assert (kfile.parent / res).exists(), f"{kfile}: {res}"
        for gen in k.get("configMapGenerator", []):
            for env_file in gen.get("envs", []):
                for line in (kfile.parent / env_file).read_text().splitlines():
                    if line.strip() and not line.startswith("#"):
                        key, sep, value = line.partition("=")
                        assert sep and value.strip(), f"{env_file}: {line!r} (an empty value is not unset)"
    dep = load_yaml_docs((K8S / "base" / "deployment.yaml").read_text())[0]
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert "startupProbe" in c


def _deployment_checks(docs: list[dict], gpu: bool) -> None:
    (dep,) = by_kind(docs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    port = next(p for p in c["ports"] if p["name"] == "http")
    assert port["containerPort"] == 8000
    # probes
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    sp = c["startupProbe"]
    budget = sp["failureThreshold"] * sp["periodSeconds"]
    assert budget >= (1800 if gpu else 300), f"startup budget {budget}s too short for a model load"
    # config: a generated ConfigMap, real flags only, no empty values
    cm_name = c["envFrom"][0]["configMapRef"]["name"]
    (cm,) = [m for m in by_kind(docs, "ConfigMap") if m["metadata"]["name"] == cm_name]
    cfg = cm["data"]
    unknown = set(cfg) - serve_env_names() - PENDING_FLAGS
    assert not unknown, f"ConfigMap sets names that are not serve flags: {unknown}"
    assert all(str(v) != "" for v in cfg.values())
    # drain: grace period > drain timeout + preStop sleep
    pre = c["lifecycle"]["preStop"]["exec"]["command"]
    sleep_s = int(pre[1]) if pre[0] == "sleep" else 0
    assert pod["terminationGracePeriodSeconds"] > int(cfg.get("LORAMUX_DRAIN_TIMEOUT", 30)) + sleep_s
    # non-root
    psc, csc = pod["securityContext"], c["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] == UID and psc["runAsGroup"] != 0
    assert psc["fsGroup"] == UID and psc["seccompProfile"]["type"] == "RuntimeDefault"
    assert csc["allowPrivilegeEscalation"] is False and csc["readOnlyRootFilesystem"] is True
    assert csc["capabilities"]["drop"] == ["ALL"] and csc["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    # resources
    res = c["resources"]
    assert res["requests"]["cpu"] and res["requests"]["memory"] and res["limits"]["memory"]
    if gpu:
        assert str(res["limits"]["nvidia.com/gpu"]) == "1" and str(res["requests"]["nvidia.com/gpu"]) == "1"
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
        assert cfg["LORAMUX_DEVICE"] == "cuda" and cfg["LORAMUX_MODEL"].startswith("/models/")
    else:
        assert "nvidia.com/gpu" not in res.get("limits", {})
    # volumes and mounts
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in pod["volumes"]}
    assert mounts["/models"]["readOnly"] is True
    assert not mounts["/adapters"].get("readOnly", False)
    assert "/cache" in mounts and "/tmp" in mounts, "writable paths for a read-only root filesystem"
    adapters = vols[mounts["/adapters"]["name"]]["persistentVolumeClaim"]["claimName"]
    assert adapters in {p["metadata"]["name"] for p in by_kind(docs, "PersistentVolumeClaim")}
    shm = vols[mounts["/dev/shm"]["name"]]["emptyDir"]
    assert shm["medium"] == "Memory"
    secret_mount = next(m for m in mounts.values() if "secret" in vols[m["name"]])
    assert secret_mount["readOnly"] is True
    secret = vols[secret_mount["name"]]["secret"]
    assert secret["secretName"] == "loramux-api-keys"
    keys_path = cfg["LORAMUX_API_KEYS"]
    assert keys_path == f"{secret_mount['mountPath']}/{secret['items'][0]['path']}"
    models = vols[mounts["/models"]["name"]]
    if gpu:
        assert set(models) == {"name", "persistentVolumeClaim"} and models["persistentVolumeClaim"]["readOnly"]
    # Service
    (svc,) = by_kind(docs, "Service")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    assert svc["spec"]["ports"][0]["targetPort"] == "http"


def test_k8s_base_renders():
    docs = kustomize(K8S / "base")
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "ConfigMap", "PersistentVolumeClaim",
                                          "ServiceAccount"}
    assert not by_kind(docs, "Secret"), "no key material in the base"
    _deployment_checks(docs, gpu=False)


def test_k8s_gpu_overlay_renders():
    _deployment_checks(kustomize(K8S / "overlays" / "gpu"), gpu=True)


def test_k8s_servicemonitor_component(tmp_path):
    """The optional component, added the way docs/deploy.md says (kustomize wants relative paths)."""
    rel = lambda p: os.path.relpath(p, tmp_path)  # noqa: E731
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [rel(K8S / "overlays" / "gpu")],
        "components": [rel(K8S / "components" / "servicemonitor")]}))
    docs = kustomize(tmp_path)
    (sm,) = by_kind(docs, "ServiceMonitor")
    (svc,) = by_kind(docs, "Service")
    assert all(svc["metadata"]["labels"].get(k) == v for k, v in sm["spec"]["selector"]["matchLabels"].items())
    assert sm["spec"]["endpoints"][0]["port"] == "http" and sm["spec"]["endpoints"][0]["path"] == "/metrics"


# ------------------------------------------------------------------------------------------------ smoke test
