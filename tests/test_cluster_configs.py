"""Every file in ``cluster/``: validity against Ray's and KubeRay's own rules, and policy.

- The Ray cluster launcher configs (``aws.yaml``, ``gcp.yaml``) are validated against the
  JSON schema that ships inside the ray package (``ray/autoscaler/ray-schema.json``), both as
  written and after Ray merges them with its provider defaults (what ``ray up`` does:
  ``prepare_config`` then ``validate_config``).
- The KubeRay manifests are checked against the required fields and enums of the
  ``ray.io/v1`` CRDs (KubeRay v1.7.0, ``ray-operator/config/crd/bases``), the Kubernetes core
  fields they embed, and the operator's admission rules that apply to them
  (``ray-operator/controllers/ray/utils/validation.go``); the RayJob's runtime env is checked
  by Ray's own ``RuntimeEnv``.
- Policy, in every file: token authentication on, no secret values (Kubernetes Secret
  references only), no dashboard reachable from outside (no ``0.0.0.0`` dashboard host, no
  LoadBalancer / NodePort / Ingress, no world-open security group rule), GPU workers that
  scale from zero with spot and on-demand types, shared storage configured, and the
  versions in the configs equal to the pins in ``pyproject.toml``.
"""

from __future__ import annotations

import copy
import json
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHER_CONFIGS = {"aws": CLUSTER / "aws.yaml", "gcp": CLUSTER / "gcp.yaml"}
RAYCLUSTER = CLUSTER / "kuberay" / "raycluster.yaml"
RAYJOB = CLUSTER / "kuberay" / "rayjob.yaml"
ALL_FILES = sorted(p for p in CLUSTER.rglob("*") if p.is_file())
STORAGE_SCHEME = {"aws": "s3", "gcp": "gs"}


def _load(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    assert len(docs) == 1, f"{path.name}: expected one YAML document, got {len(docs)}"
    return docs[0]


def _pins() -> dict[str, str]:
    """``name -> version`` for the ``name==version`` dependencies of pyproject.toml."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = {}
    for dep in project["dependencies"]:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^;,\s]+)", dep.strip())
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins


def _python_tag() -> str:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    m = re.search(r">=\s*3\.(\d+)", project["requires-python"])
    assert m, "requires-python names no minimum 3.x"
    return f"py3{m.group(1)}"


# =========================================================================== cluster launcher


def _ray_schema() -> dict[str, Any]:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def _prepared(path: Path) -> dict[str, Any]:
    """The config as ``ray up`` sees it: merged with the provider's defaults, validated."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(_load(path)))
    validate_config(prepared)
    return prepared


def _worker_types(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}


def _market(provider: str, node_config: dict[str, Any]) -> str:
    if provider == "aws":
        spot = node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    else:
        scheduling = node_config.get("scheduling", {})
        spot = scheduling.get("provisioningModel") == "SPOT" or scheduling.get("preemptible")
    return "spot" if spot else "on-demand"


def _ray_start_commands(cfg: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for cmd in cfg[key]:
            if "ray start" in cmd:
                yield key, cmd


@pytest.mark.parametrize("provider", sorted(LAUNCHER_CONFIGS))
def test_launcher_config_matches_rays_schema(provider: str) -> None:
    path = LAUNCHER_CONFIGS[provider]
    jsonschema.validate(_load(path), _ray_schema())  # as written
    prepared = _prepared(path)  # as `ray up` sees it (raises on any violation)
    assert prepared["provider"]["type"] == provider


def test_ray_schema_validation_rejects_mistakes() -> None:
    """The schema check is real: typical slips in these files are rejected."""
    schema = _ray_schema()
    good = _load(LAUNCHER_CONFIGS["aws"])
    typo = {**copy.deepcopy(good), "max_wokers": 4}
    gpu_as_string = copy.deepcopy(good)
    gpu_as_string["available_node_types"]["gpu.p5.spot"]["resources"]["GPU"] = "8"
    stray_key = copy.deepcopy(good)
    stray_key["available_node_types"]["gpu.p5.spot"]["min_worker"] = 0
    for bad in (typo, gpu_as_string, stray_key):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


@pytest.mark.parametrize("provider", sorted(LAUNCHER_CONFIGS))
def test_launcher_gpu_workers_autoscale_from_zero_on_spot_and_on_demand(provider: str) -> None:
    cfg = _prepared(LAUNCHER_CONFIGS[provider])
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    workers = _worker_types(cfg)
    assert workers and all(t["min_workers"] == 0 for t in workers.values()), (
        "every worker type scales from zero"
    )
    assert all(t["max_workers"] > 0 for t in workers.values())
    gpu = {k: t for k, t in workers.items() if t["resources"].get("GPU", 0) > 0}
    markets = {_market(provider, t["node_config"]) for t in gpu.values()}
    assert markets == {"spot", "on-demand"}, f"GPU worker markets: {markets}"
    for name, t in gpu.items():  # spot preferred where both fit the request
        expected = 10 if _market(provider, t["node_config"]) == "spot" else 1
        assert t.get("priority") == expected, f"{name}: priority"


@pytest.mark.parametrize("provider", sorted(LAUNCHER_CONFIGS))
def test_launcher_token_auth_on_every_node_and_dashboard_local(provider: str) -> None:
    cfg = _prepared(LAUNCHER_CONFIGS[provider])
    starts = list(_ray_start_commands(cfg))
    assert {k for k, _ in starts} == {"head_start_ray_commands", "worker_start_ray_commands"}
    for key, cmd in starts:
        before_start = cmd[: cmd.index("ray start")]
        assert re.search(r"\bRAY_AUTH_MODE=token\b", before_start), f"{key}: no token auth"
    # Ray's provider defaults bind the dashboard to 0.0.0.0: the head must override that.
    head_start = next(c for k, c in starts if k == "head_start_ray_commands")
    hosts = re.findall(r"--dashboard-host[= ](\S+)", head_start)
    assert hosts and all(h in ("127.0.0.1", "localhost") for h in hosts), hosts
    # The token reaches every node from the submitter's token file, never from this file.
    assert cfg["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"


@pytest.mark.parametrize("provider", sorted(LAUNCHER_CONFIGS))
def test_launcher_storage_and_shared_run_dir(provider: str) -> None:
    cfg = _prepared(LAUNCHER_CONFIGS[provider])
    roots = {
        re.search(r"SOLAR_RAY_STORAGE_PATH=(\S+?);?(\s|$)", cmd).group(1)  # type: ignore[union-attr]
        for _, cmd in _ray_start_commands(cfg)
    }
    assert len(roots) == 1, f"head and workers disagree on the storage root: {roots}"
    assert roots.pop().startswith(f"{STORAGE_SCHEME[provider]}://")
    # the run directory: mounted on the host, passed into the container at the same path
    assert any("/mnt/solar-ray" in c and "mount" in c for c in cfg["initialization_commands"])
    assert "-v /mnt/solar-ray:/mnt/solar-ray" in cfg["docker"]["run_options"]


@pytest.mark.parametrize("provider", sorted(LAUNCHER_CONFIGS))
def test_launcher_installs_this_project_at_the_pinned_versions(provider: str) -> None:
    cfg = _prepared(LAUNCHER_CONFIGS[provider])
    pins = _pins()
    image = cfg["docker"]["image"]
    m = re.fullmatch(r"rayproject/ray:([\d.]+)-(py3\d+)(-\w+)?", image)
    assert m, f"unexpected image {image}"
    assert m.group(1) == pins["ray"], "the image's Ray must be the Ray pinned in pyproject"
    assert m.group(2) == _python_tag()
    setup = "\n".join(cfg["setup_commands"])
    for name in ("torch", "deepspeed"):
        assert f"{name}=={pins[name]}" in setup, f"{name} is not installed at its pin"
    assert cfg["file_mounts"].get("~/solar-ray") == "."
    assert re.search(r"pip install .*~/solar-ray", setup), "the project is not installed"


def test_aws_security_group_opens_nothing_to_the_world() -> None:
    cfg = _load(LAUNCHER_CONFIGS["aws"])
    rules = cfg["provider"]["security_group"]["IpPermissions"]
    for rule in rules:
        cidrs = [r["CidrIp"] for r in rule.get("IpRanges", [])]
        cidrs += [r["CidrIpv6"] for r in rule.get("Ipv6Ranges", [])]
        assert not {"0.0.0.0/0", "::/0"} & set(cidrs), f"world-open rule: {rule}"
        assert not rule["FromPort"] <= 8265 <= rule["ToPort"], "the dashboard port is open"


# =========================================================================== KubeRay

#: required fields of RayClusterSpec (KubeRay v1.7.0 CRD) and of the core types it embeds;
#: ``[]`` descends into every item of a list. Paths are relative to the RayCluster spec.
RAYCLUSTER_SPEC_REQUIRED: dict[str, tuple[str, ...]] = {
    "": ("headGroupSpec",),
    "headGroupSpec": ("template",),
    "headGroupSpec.template": ("spec",),
    "headGroupSpec.template.spec": ("containers",),
    "workerGroupSpecs[]": ("groupName", "minReplicas", "maxReplicas", "template"),
    "workerGroupSpecs[].template": ("spec",),
    "workerGroupSpecs[].template.spec": ("containers",),
}
#: required fields of a core/v1 PodSpec's parts, relative to a pod template's ``spec``
POD_SPEC_REQUIRED: dict[str, tuple[str, ...]] = {
    "containers[]": ("name", "image"),
    "containers[].env[]": ("name",),
    "containers[].env[].valueFrom.secretKeyRef": ("name", "key"),
    "containers[].envFrom[].secretRef": ("name",),
    "containers[].ports[]": ("containerPort",),
    "containers[].volumeMounts[]": ("name", "mountPath"),
    "volumes[]": ("name",),
    "volumes[].persistentVolumeClaim": ("claimName",),
    "tolerations[]": ("key",),
}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
_DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_SECRET_NAME = re.compile(r"(?i)(TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|API_?KEY|ACCESS_KEY)")


def _at(obj: Any, path: str) -> list[Any]:
    """Every value at a dotted ``path`` (``[]`` descends into list items); absent: none."""
    found = [obj]
    for part in [p for p in path.split(".") if p]:
        each = part.endswith("[]")
        key = part[:-2] if each else part
        step = [x[key] for x in found if isinstance(x, dict) and key in x]
        found = [y for x in step for y in x] if each else step
    return found


def _missing(obj: Any, required: dict[str, tuple[str, ...]], where: str) -> list[str]:
    problems = []
    for path, fields in required.items():
        for node in _at(obj, path):
            for name in fields:
                if not isinstance(node, dict) or node.get(name) in (None, "", [], {}):
                    problems.append(f"{where}.{path}: missing {name}")
    return problems


def _pod_specs(cluster_spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    groups = [("head", cluster_spec.get("headGroupSpec", {}))]
    groups += [(g.get("groupName", "?"), g) for g in cluster_spec.get("workerGroupSpecs", [])]
    for name, group in groups:
        pod = group.get("template", {}).get("spec")
        if isinstance(pod, dict):
            yield name, pod


def _cluster_spec_problems(spec: dict[str, Any], where: str) -> list[str]:
    problems = _missing(spec, RAYCLUSTER_SPEC_REQUIRED, where)
    for name, pod in _pod_specs(spec):
        problems += _missing(pod, POD_SPEC_REQUIRED, f"{where}[{name}]")
    groups = [g.get("groupName") for g in spec.get("workerGroupSpecs", [])]
    if len(groups) != len(set(groups)):
        problems.append(f"{where}: worker group names repeat: {groups}")
    for g in spec.get("workerGroupSpecs", []):
        low, high = g.get("minReplicas", 0), g.get("maxReplicas", 2**31 - 1)
        if not 0 <= low <= high:
            problems.append(f"{where}[{g.get('groupName')}]: need 0 <= minReplicas <= maxReplicas")
    all_params = _at(spec, "headGroupSpec.rayStartParams")
    all_params += _at(spec, "workerGroupSpecs[].rayStartParams")
    for params in all_params:
        bad = {k: v for k, v in params.items() if not isinstance(v, str)}
        if bad:  # map[string]string in the CRD: `num-gpus: 8` is rejected by the API server
            problems.append(f"{where}: rayStartParams values must be strings: {bad}")
    auth = spec.get("authOptions", {})
    if auth.get("mode", "token") not in ("disabled", "token"):
        problems.append(f"{where}.authOptions.mode: {auth.get('mode')!r}")
    return problems


def _manifests() -> dict[str, dict[str, Any]]:
    return {"RayCluster": _load(RAYCLUSTER), "RayJob": _load(RAYJOB)}


def _cluster_spec(kind: str, manifest: dict[str, Any]) -> dict[str, Any]:
    return manifest["spec"] if kind == "RayCluster" else manifest["spec"]["rayClusterSpec"]


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_kuberay_manifest_has_the_required_fields_of_its_kind(kind: str) -> None:
    manifest = _manifests()[kind]
    assert manifest.get("apiVersion") == "ray.io/v1"
    assert manifest.get("kind") == kind
    name = manifest.get("metadata", {}).get("name", "")
    max_len = 53 if kind == "RayCluster" else 47
    assert _DNS1035.fullmatch(name) and len(name) <= max_len, f"metadata.name {name!r}"
    spec = manifest.get("spec")
    assert isinstance(spec, dict), "spec missing"
    problems = []
    if kind == "RayJob":
        if ("rayClusterSpec" in spec) == ("clusterSelector" in spec):
            problems.append("spec: set exactly one of rayClusterSpec or clusterSelector")
        mode = spec.get("submissionMode", "K8sJobMode")
        if mode not in SUBMISSION_MODES:
            problems.append(f"spec.submissionMode: {mode!r}")
        if mode != "InteractiveMode" and not spec.get("entrypoint"):
            problems.append("spec.entrypoint: required unless InteractiveMode")
        if spec.get("ttlSecondsAfterFinished", 0) < 0:
            problems.append("spec.ttlSecondsAfterFinished: must be >= 0")
        if "backoffLimit" in spec and spec["backoffLimit"] < 0:
            problems.append("spec.backoffLimit: must be >= 0")
    problems += _cluster_spec_problems(_cluster_spec(kind, manifest), f"{kind}.spec")
    assert not problems, "\n".join(problems)


def test_required_field_checks_reject_mistakes() -> None:
    """The KubeRay checks are real: typical slips are reported."""
    spec = copy.deepcopy(_manifests()["RayCluster"]["spec"])
    del spec["workerGroupSpecs"][0]["maxReplicas"]
    spec["workerGroupSpecs"][1]["rayStartParams"] = {"num-gpus": 8}
    spec["headGroupSpec"]["template"]["spec"]["containers"][0].pop("image")
    problems = "\n".join(_cluster_spec_problems(spec, "spec"))
    assert "missing maxReplicas" in problems
    assert "must be strings" in problems
    assert "missing image" in problems


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_kuberay_policy(kind: str) -> None:
    spec = _cluster_spec(kind, _manifests()[kind])
    pins = _pins()
    assert spec["rayVersion"] == pins["ray"], "rayVersion must be the Ray pinned in pyproject"
    assert spec["authOptions"]["mode"] == "token"  # needs rayVersion >= 2.52
    assert spec.get("enableInTreeAutoscaling") is True
    assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    assert spec["headGroupSpec"].get("enableIngress") is not True
    gpu_groups = {}
    for g in spec["workerGroupSpecs"]:
        assert g["minReplicas"] == 0 and g.get("replicas", 0) == 0, g["groupName"]
        limits = [c["resources"]["limits"] for c in g["template"]["spec"]["containers"]]
        if any(int(lim.get("nvidia.com/gpu", 0)) > 0 for lim in limits):
            gpu_groups[g["groupName"]] = g["template"]["spec"]
    spot = {n for n, pod in gpu_groups.items() if _k8s_spot(pod) == "spot"}
    on_demand = {n for n, pod in gpu_groups.items() if _k8s_spot(pod) == "on-demand"}
    assert spot and on_demand, f"GPU groups: spot {spot}, on-demand {on_demand}"
    for name, pod in _pod_specs(spec):
        for c in pod["containers"]:
            for env in c.get("env", []):
                if _SECRET_NAME.search(env["name"]):
                    assert "value" not in env, f"{name}: {env['name']} has a literal value"
                    assert "secretKeyRef" in env.get("valueFrom", {}), f"{name}: {env['name']}"
            image = c["image"]
            assert not image.endswith(":latest") and ":" in image, f"{name}: pin the image"


def _k8s_spot(pod: dict[str, Any]) -> str:
    """spot / on-demand / either, from node selectors and affinity (GKE and Karpenter)."""
    selector = pod.get("nodeSelector", {})
    if selector.get("cloud.google.com/gke-spot") == "true":
        return "spot"
    if selector.get("karpenter.sh/capacity-type") in ("spot", "on-demand"):
        return selector["karpenter.sh/capacity-type"]
    required = "affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
    for e in _at(pod, f"{required}.nodeSelectorTerms[].matchExpressions[]"):
        if e.get("key") == "cloud.google.com/gke-spot" and e.get("operator") == "DoesNotExist":
            return "on-demand"
    return "either"


def test_rayjob_runs_the_recipe_and_cleans_up() -> None:
    from ray.runtime_env import RuntimeEnv

    job = _manifests()["RayJob"]["spec"]
    argv = job["entrypoint"].split()
    assert argv[:3] == ["solar-ray", "run", "jobs/solar-10.7b.yaml"], job["entrypoint"]
    assert job["shutdownAfterJobFinishes"] is True
    runtime_env = yaml.safe_load(job["runtimeEnvYAML"])
    assert isinstance(runtime_env, dict)
    # working_dir is this repository as baked into the image; Ray checks the rest.
    RuntimeEnv(**{**runtime_env, "working_dir": str(REPO)})
    # --out is on the shared run volume, mounted at the same path in every pod
    out = argv[argv.index("--out") + 1]
    for name, pod in _pod_specs(job["rayClusterSpec"]):
        mounts = [m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])]
        assert any(out.startswith(m.rstrip("/") + "/") for m in mounts), f"{name}: {out}"


def test_rayjob_cluster_is_the_raycluster() -> None:
    """One cluster definition: the RayJob's cluster is exactly raycluster.yaml's spec."""
    manifests = _manifests()
    assert manifests["RayJob"]["spec"]["rayClusterSpec"] == manifests["RayCluster"]["spec"]


def test_rayjob_recipe_plans_for_the_clusters_gpus() -> None:
    """The recipe the RayJob runs exists, plans (every stage config valid), and trains on
    the GPU workers the cluster provides."""
    from solar_ray.pipeline import load_recipe, plan_recipe
    from solar_ray.stages import TRAINING_KINDS

    argv = _manifests()["RayJob"]["spec"]["entrypoint"].split()
    recipe = load_recipe(REPO / argv[2])
    plans = plan_recipe(recipe, Path(argv[argv.index("--out") + 1]))
    training = [p for p in plans if p.kind in TRAINING_KINDS]
    assert training, f"{argv[2]} trains nothing"
    for plan in training:
        assert plan.config().use_gpu, f"{argv[2]}: stage {plan.name} trains on CPU"
    # continued pretraining rides the spot groups elastically: it survives a reclaimed node
    pretrain = [p.config() for p in training if p.kind == "pretrain"]
    assert pretrain and all(c.elastic and c.min_workers < c.max_workers for c in pretrain)


# =========================================================================== every file

SECRET_PATTERNS: dict[str, re.Pattern[str]] = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS secret access key": re.compile(
        r"(?i)aws_secret_access_key\s*[:=]\s*['\"]?[A-Za-z0-9/+=]{40}"
    ),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "GCP service account key": re.compile(r"\"private_key(_id)?\"\s*:"),
    "Hugging Face token": re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"),
    "GitHub token": re.compile(r"\b(gh[pousr]|github_pat)_[A-Za-z0-9_]{30,}\b"),
    "Google API key": re.compile(r"\bAIza[0-9A-Za-z_\-]{35}\b"),
    "Slack token": re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"),
    "long hex secret": re.compile(r"\b[0-9a-fA-F]{32,}\b"),
    "token assigned a literal": re.compile(
        r"(?i)\b(RAY_AUTH_TOKEN|HF_TOKEN|HUGGING_FACE_HUB_TOKEN|AWS_SECRET_ACCESS_KEY|"
        r"AWS_SESSION_TOKEN|auth_token)\s*[=:]\s*['\"]?(?![$<{])[A-Za-z0-9_\-/+=.]{12,}"
    ),
    "env var with a literal secret value": re.compile(
        r"(?im)^\s*-\s*name:\s*\S*(TOKEN|SECRET|PASSWORD|ACCESS_KEY)\S*\s*\n\s*value:"
    ),
    "a Kubernetes Secret object": re.compile(r"(?m)^\s*kind:\s*Secret\b"),
}
PUBLIC_DASHBOARD_PATTERNS: dict[str, re.Pattern[str]] = {
    "dashboard bound to all interfaces": re.compile(
        r"(?i)dashboard[-_]host[\"']?\s*[=:]?\s*[\"']?(0\.0\.0\.0|::|\[::\])(?![\d.])"
    ),
    "LoadBalancer / NodePort service": re.compile(
        r"(?m)^\s*(serviceType|type):\s*[\"']?(LoadBalancer|NodePort)\b"
    ),
    "Ingress": re.compile(r"(?m)^\s*(enableIngress:\s*true|kind:\s*Ingress\b)"),
    "world-open address range": re.compile(r"(0\.0\.0\.0/0|::/0)"),
    "port-forward on all interfaces": re.compile(r"--address[= ](0\.0\.0\.0|::)"),
}


def _findings(text: str, patterns: dict[str, re.Pattern[str]]) -> list[str]:
    found = []
    for what, pattern in patterns.items():
        for m in pattern.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            found.append(f"line {line}: {what}: {m.group(0)[:60]!r}")
    return found


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: str(p.relative_to(CLUSTER)))
def test_no_secrets_in_cluster_files(path: Path) -> None:
    assert not _findings(path.read_text(encoding="utf-8"), SECRET_PATTERNS)


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: str(p.relative_to(CLUSTER)))
def test_no_public_dashboard_in_cluster_files(path: Path) -> None:
    assert not _findings(path.read_text(encoding="utf-8"), PUBLIC_DASHBOARD_PATTERNS)


def test_cluster_files_are_all_checked() -> None:
    names = {str(p.relative_to(CLUSTER)) for p in ALL_FILES}
    expected = {"aws.yaml", "gcp.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml"}
    assert expected | {"README.md"} <= names
    unknown = {n for n in names if n.endswith((".yaml", ".yml"))} - expected
    assert not unknown, f"new cluster configs need checks here: {unknown}"


@pytest.mark.parametrize(
    "text",
    [
        "aws_access_key_id: AKIAIOSFODNN7EXAMPLE",
        "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "-----BEGIN RSA PRIVATE KEY-----",
        "HF_TOKEN=hf_abcdefghijklmnopqrstuvwxyzABCDEF",
        "export RAY_AUTH_TOKEN=3f8a1c2b9d7e4f60a5b1c2d3e4f5a6b7",
        "        - name: HF_TOKEN\n          value: hunter2",
        "apiVersion: v1\nkind: Secret\ndata: {}",
    ],
)
def test_secret_scan_catches_planted_secrets(text: str) -> None:
    assert _findings(text, SECRET_PATTERNS)


@pytest.mark.parametrize(
    "text",
    [
        "ray start --head --dashboard-host=0.0.0.0",
        'rayStartParams:\n  dashboard-host: "0.0.0.0"',
        "    serviceType: LoadBalancer",
        "enableIngress: true",
        "IpRanges:\n  - CidrIp: 0.0.0.0/0",
        "kubectl port-forward --address 0.0.0.0 svc/solar-ray-head-svc 8265",
    ],
)
def test_dashboard_scan_catches_public_bindings(text: str) -> None:
    assert _findings(text, PUBLIC_DASHBOARD_PATTERNS)


@pytest.mark.parametrize(
    "text",
    [
        'kubectl create secret generic solar-ray-ray-token --from-literal=auth_token="$(openssl rand -hex 32)"',
        "export RAY_AUTH_TOKEN=$(kubectl get secret solar-ray-ray-token -o jsonpath={.data.auth_token})",
        "ray start --head --dashboard-host=127.0.0.1",
        "      - name: HF_TOKEN\n        valueFrom:\n          secretKeyRef: {name: solar-ray-hf, key: token}",
    ],
)
def test_scans_accept_secret_references(text: str) -> None:
    assert not _findings(text, SECRET_PATTERNS | PUBLIC_DASHBOARD_PATTERNS)
