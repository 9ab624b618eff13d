"""cluster/: launcher configs pass Ray's own validation; KubeRay manifests have what KubeRay
requires; token auth is on everywhere."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
LAUNCHER = sorted((CLUSTER / "launcher").glob("*.yaml"))
KUBERAY = sorted((CLUSTER / "kuberay").glob("*.yaml"))


def ray_validate(config: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_config_passes_rays_validation(path):
    config = yaml.safe_load(path.read_text())
    ray_validate(config)
    # the validation is real: a misspelt key is rejected
    broken = {**config, "max_worker": 3}
    with pytest.raises(Exception, match="max_worker"):
        ray_validate(broken)


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_config_turns_token_auth_on_for_every_node(path):
    config = yaml.safe_load(path.read_text())
    assert config["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts)


def test_launcher_configs_have_the_two_shapes():
    shapes = {}
    for path in LAUNCHER:
        config = yaml.safe_load(path.read_text())
        workers = {
            name: t["resources"].get("GPU", 0)
            for name, t in config["available_node_types"].items()
            if name != config["head_node_type"]
        }
        shapes[path.name] = set(workers.values())
    assert shapes == {"qlora-1gpu.yaml": {1}, "zero3-8gpu.yaml": {8}}


# Required fields from KubeRay's CRDs (ray.io/v1, v1.5.1 and later, config/crd/bases) and the
# controller's own validation (utils/validation.go).
GROUP_REQUIRED = {
    "head": ["template"],
    "worker": ["groupName", "template", "minReplicas", "maxReplicas"],
}


def check_pod_template(template: dict, where: str) -> list[str]:
    problems = []
    containers = template.get("spec", {}).get("containers") or []
    if not containers:
        problems.append(f"{where}.template.spec.containers: at least one container")
    problems += [
        f"{where}.template.spec.containers[{i}].name: required"
        for i, c in enumerate(containers)
        if not c.get("name")
    ]
    problems += [
        f"{where}.template.spec.containers[{i}].image: required to run"
        for i, c in enumerate(containers)
        if not c.get("image")
    ]
    return problems


def check_cluster_spec(spec: dict, where: str) -> list[str]:
    problems = []
    head = spec.get("headGroupSpec")
    if head is None:
        return [f"{where}.headGroupSpec: required"]
    problems += [
        f"{where}.headGroupSpec.{k}: required" for k in GROUP_REQUIRED["head"] if k not in head
    ]
    problems += check_pod_template(head.get("template", {}), f"{where}.headGroupSpec")
    for i, group in enumerate(spec.get("workerGroupSpecs", [])):
        at = f"{where}.workerGroupSpecs[{i}]"
        problems += [f"{at}.{k}: required" for k in GROUP_REQUIRED["worker"] if k not in group]
        problems += check_pod_template(group.get("template", {}), at)
        if group.get("minReplicas", 0) > group.get("maxReplicas", 0):
            problems.append(f"{at}: minReplicas > maxReplicas")
    auth = spec.get("authOptions", {})
    if auth.get("mode") != "token":
        problems.append(f"{where}.authOptions.mode: must be 'token'")
    version = tuple(int(x) for x in str(spec.get("rayVersion", "0")).split(".")[:2])
    if version < (2, 52):
        problems.append(f"{where}.rayVersion: token auth needs Ray >= 2.52")
    return problems


def check_manifest(doc: dict) -> list[str]:
    if doc.get("apiVersion") != "ray.io/v1":
        return ["apiVersion: must be ray.io/v1"]
    if not doc.get("metadata", {}).get("name"):
        return ["metadata.name: required"]
    if doc["kind"] == "RayCluster":
        return check_cluster_spec(doc.get("spec", {}), "spec")
    if doc["kind"] == "RayJob":
        spec = doc.get("spec", {})
        problems = [] if spec.get("entrypoint") else ["spec.entrypoint: required to run a job"]
        if "rayClusterSpec" not in spec and "clusterSelector" not in spec:
            return [*problems, "spec: rayClusterSpec or clusterSelector required"]
        if "rayClusterSpec" in spec:
            problems += check_cluster_spec(spec["rayClusterSpec"], "spec.rayClusterSpec")
        return problems
    if doc["kind"] == "RayService":
        spec = doc.get("spec", {})
        problems = [] if spec.get("serveConfigV2") else ["spec.serveConfigV2: required"]
        if "rayClusterConfig" not in spec:
            return [*problems, "spec.rayClusterConfig: required"]
        return problems + check_cluster_spec(spec["rayClusterConfig"], "spec.rayClusterConfig")
    return [f"kind: unexpected {doc['kind']}"]


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifest_has_the_required_fields(path):
    [doc] = list(yaml.safe_load_all(path.read_text()))
    assert check_manifest(doc) == []


def test_kuberay_checker_catches_missing_fields():
    [doc] = list(yaml.safe_load_all((CLUSTER / "kuberay" / "raycluster.yaml").read_text()))
    broken = copy.deepcopy(doc)
    del broken["spec"]["workerGroupSpecs"][0]["groupName"]
    broken["spec"]["authOptions"] = {}
    broken["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].pop("name")
    assert check_manifest(broken) == [
        "spec.headGroupSpec.template.spec.containers[0].name: required",
        "spec.workerGroupSpecs[0].groupName: required",
        "spec.authOptions.mode: must be 'token'",
    ]


def test_kuberay_has_both_kinds_and_gpu_groups():
    kinds = {yaml.safe_load(p.read_text())["kind"] for p in KUBERAY}
    assert kinds == {"RayCluster", "RayJob", "RayService"}
    cluster = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    gpus = {
        g["groupName"]: g["template"]["spec"]["containers"][0]["resources"]["limits"][
            "nvidia.com/gpu"
        ]
        for g in cluster["spec"]["workerGroupSpecs"]
    }
    assert gpus == {"gpu8": "8", "gpu1": "1"}


def test_rayservice_runs_our_app_builder_with_a_valid_serve_config_and_spec():
    """serveConfigV2 passes Serve's own schema, its import path is our builder, and its args
    are a valid serve spec (the builder gets them as a ServeSpec)."""
    import importlib
    import inspect

    from ray.serve.schema import ServeDeploySchema

    from ftservice.serve.spec import ServeSpec

    doc = yaml.safe_load((CLUSTER / "kuberay" / "rayservice.yaml").read_text())
    config = ServeDeploySchema.model_validate(yaml.safe_load(doc["spec"]["serveConfigV2"]))
    [app] = config.applications
    module, _, attr = app.import_path.partition(":")
    builder = getattr(importlib.import_module(module), attr)
    [param] = inspect.signature(builder).parameters.values()
    assert param.annotation is ServeSpec
    spec = ServeSpec.model_validate(app.args)
    assert spec.replicas.gpus == 1 and spec.store.url.startswith("postgresql+psycopg://")
    assert spec.limits.request_timeout_s < config.http_options.request_timeout_s
    broken = {**app.args, "replica": {}}  # a misspelt key is refused, as in spec files
    with pytest.raises(ValueError, match="replica"):
        ServeSpec.model_validate(broken)
