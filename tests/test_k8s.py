"""Every manifest in k8s/, and every one `ldm k8s` renders, validated and checked for safety.

KubeRay kinds are validated against the openAPIV3Schema of the KubeRay v1.7.0 CRDs
(vendored in k8s/crds/), made strict: an unknown field anywhere is an error, as the API
server's strict field validation would make it. Core kinds are checked against the
Kubernetes API models of the official Python client, field by field. Then the security
settings: non-root, no privilege escalation, all capabilities dropped, seccomp
RuntimeDefault, requests and limits, ClusterIP only, token auth, a NetworkPolicy, secrets by
reference, and a termination grace period longer than the preemption grace.
"""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import yaml

from core.loader import load_config
from orchestrator import k8s
from orchestrator.cli import parse
from tests.conftest import ROOT, ldm, ok, one_line_error

K8S = ROOT / "k8s"
CRDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}


def _strict(schema: dict) -> dict:
    """A CRD schema as JSON Schema that rejects fields the CRD does not declare."""
    schema = copy.copy(schema)
    if schema.get("x-kubernetes-int-or-string"):
        return {"anyOf": [{"type": "integer"}, {"type": "string"}]}
    if "properties" in schema:
        schema["properties"] = {k: _strict(v) for k, v in schema["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema.setdefault("additionalProperties", False)
    if isinstance(schema.get("additionalProperties"), dict):
        schema["additionalProperties"] = _strict(schema["additionalProperties"])
    if isinstance(schema.get("items"), dict):
        schema["items"] = _strict(schema["items"])
    return schema


@cache
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    # libyaml when present: the CRDs are 2 MB of YAML, seconds for the pure-Python parser.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((K8S / "crds" / CRDS[kind]).read_text(), Loader=loader)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strict(version["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta is checked below
    return jsonschema.Draft7Validator(schema)


def _check_core(kind: str, doc: dict) -> list[str]:
    """Unknown fields in a core object, by the official client's API models."""
    import kubernetes.client as models

    model = {
        "ConfigMap": "V1ConfigMap",
        "Deployment": "V1Deployment",
        "Service": "V1Service",
        "PersistentVolumeClaim": "V1PersistentVolumeClaim",
        "NetworkPolicy": "V1NetworkPolicy",
    }[kind]
    return _walk(models, model, doc, kind)


def _walk(models, model: str, value, where: str) -> list[str]:
    cls = getattr(models, model, None)
    if cls is None:  # a primitive or a map type
        return []
    problems = []
    fields = {json: (name, cls.openapi_types[name]) for name, json in cls.attribute_map.items()}
    for key, item in value.items():
        if key not in fields:
            problems.append(f"{where}.{key}: unknown field of {model}")
            continue
        kind = fields[key][1]
        if kind.startswith("list[") and isinstance(item, list):
            for i, element in enumerate(item):
                if isinstance(element, dict):
                    problems += _walk(models, kind[5:-1], element, f"{where}.{key}[{i}]")
        elif isinstance(item, dict) and not kind.startswith("dict("):
            problems += _walk(models, kind, item, f"{where}.{key}")
    return problems


def validate(doc: dict) -> list[str]:
    kind = doc["kind"]
    if kind in CRDS:
        assert doc["apiVersion"] == "ray.io/v1"
        errors = sorted(crd_validator(kind).iter_errors(doc), key=lambda e: list(e.path))
        problems = [f"{'.'.join(map(str, e.path))}: {e.message[:200]}" for e in errors]
        problems += _walk(
            __import__("kubernetes.client").client, "V1ObjectMeta", doc["metadata"], "metadata"
        )
        return problems
    return _check_core(kind, doc)


def pod_templates(doc: dict) -> list[tuple[str, dict]]:
    """(role, pod template) pairs: `ray` pods run training and must outlive its preemption."""
    spec = doc.get("spec", {})
    if doc["kind"] == "RayCluster":
        cluster = spec
    elif doc["kind"] == "RayJob":
        cluster = spec.get("rayClusterSpec", {})
    elif doc["kind"] == "Deployment":
        return [("server", spec["template"])]
    else:
        return []
    templates = [("ray", cluster["headGroupSpec"]["template"])]
    templates += [("ray", g["template"]) for g in cluster.get("workerGroupSpecs", [])]
    if doc["kind"] == "RayJob" and "submitterPodTemplate" in spec:
        templates.append(("submitter", spec["submitterPodTemplate"]))
    return templates


def security_problems(doc: dict, grace_needed: float) -> list[str]:
    problems = []
    name = f"{doc['kind']}/{doc['metadata']['name']}"
    for role, template in pod_templates(doc):
        pod = template["spec"]
        pod_ctx = pod.get("securityContext", {})
        if pod.get("automountServiceAccountToken") is not False:
            problems.append(f"{name}: pods need no service account token")
        for c in pod["containers"]:
            ctx = {**pod_ctx, **c.get("securityContext", {})}
            where = f"{name} container {c['name']}"
            if ctx.get("runAsNonRoot") is not True or ctx.get("runAsUser", 0) == 0:
                problems.append(f"{where}: must run as non-root")
            if c.get("securityContext", {}).get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allowPrivilegeEscalation must be false")
            if c.get("securityContext", {}).get("capabilities", {}).get("drop") != ["ALL"]:
                problems.append(f"{where}: must drop all capabilities")
            if ctx.get("seccompProfile", {}).get("type") != "RuntimeDefault":
                problems.append(f"{where}: seccomp profile must be RuntimeDefault")
            for side in ("requests", "limits"):
                if not {"cpu", "memory"} <= set(c.get("resources", {}).get(side, {})):
                    problems.append(f"{where}: needs cpu and memory {side}")
            for env in c.get("env", []):
                if any(s in env["name"] for s in ("SECRET", "TOKEN", "PASSWORD", "KEY_ID")):
                    if "value" in env and env["name"] != "RAY_AUTH_MODE":
                        problems.append(f"{where}: {env['name']} must come from a Secret")
        if role == "ray" and pod.get("terminationGracePeriodSeconds", 30) <= grace_needed:
            problems.append(f"{name}: terminationGracePeriodSeconds must exceed {grace_needed}")
    if doc["kind"] == "Service" and doc["spec"].get("type", "ClusterIP") != "ClusterIP":
        problems.append(f"{name}: services must be ClusterIP")
    cluster = (
        doc["spec"]
        if doc["kind"] == "RayCluster"
        else doc["spec"].get("rayClusterSpec")
        if doc["kind"] == "RayJob"
        else None
    )
    if cluster is not None:
        if cluster["headGroupSpec"].get("serviceType", "ClusterIP") != "ClusterIP":
            problems.append(f"{name}: the head service must be ClusterIP")
        if cluster.get("authOptions", {}).get("mode") != "token":
            problems.append(f"{name}: Ray token authentication must be on")
    return problems


def folder_documents() -> list[tuple[str, dict]]:
    return [
        (path.name, doc)
        for path in sorted(K8S.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


def test_the_folder_is_what_the_generator_renders(tmp_path):
    k8s.write_folder(tmp_path)
    for path in sorted(tmp_path.glob("*.yaml")):
        assert (K8S / path.name).read_text() == path.read_text(), (
            f"k8s/{path.name} is stale: run `python -m orchestrator.k8s k8s/`"
        )
    assert {p.name for p in K8S.glob("*.yaml")} == {p.name for p in tmp_path.glob("*.yaml")}


@pytest.mark.parametrize(
    "name,doc", folder_documents(), ids=lambda v: v if isinstance(v, str) else v["kind"]
)
def test_folder_manifests_validate_and_are_locked_down(name, doc):
    assert validate(doc) == []
    assert security_problems(doc, grace_needed=60.0) == []


def test_the_folder_covers_every_piece():
    kinds = {(doc["kind"], doc["metadata"]["name"]) for _, doc in folder_documents()}
    assert ("RayCluster", "ldm") in kinds
    assert {n for k, n in kinds if k == "RayJob"} == {f"ldm-demo-{s}" for s in k8s.STAGES}
    assert {("Deployment", "ldm-mlflow"), ("Service", "ldm-mlflow")} <= kinds
    assert ("PersistentVolumeClaim", "ldm-shared") in kinds
    policies = [d for _, d in folder_documents() if d["kind"] == "NetworkPolicy"]
    assert policies and policies[0]["spec"]["podSelector"]["matchLabels"] == k8s.PART_OF


def test_validation_rejects_an_unknown_field_and_an_unsafe_pod():
    (cluster,) = [d for _, d in folder_documents() if d["kind"] == "RayCluster"]
    typo = copy.deepcopy(cluster)
    typo["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "x"
    assert any("imagePullPolicyy" in p for p in validate(typo))
    root = copy.deepcopy(cluster)
    root["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["securityContext"][
        "allowPrivilegeEscalation"
    ] = True
    assert any("allowPrivilegeEscalation" in p for p in security_problems(root, 60.0))
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "x"},
        "spec": {"type": "LoadBalancer", "portz": []},
    }
    assert any("portz" in p for p in validate(service))
    assert any("ClusterIP" in p for p in security_problems(service, 60.0))


def test_ldm_k8s_renders_a_valid_rayjob_for_an_experiment(tmp_path):
    config = tmp_path / "exp.yaml"
    config.write_text("preset: tiny\nrun:\n  name: My_Run\ntrain:\n  preempt_grace_s: 300\n")
    result = ok(
        ldm(
            "k8s",
            str(config),
            "train.num_workers=4",
            "train.global_batch_size=16",
            "--stage",
            "train",
        )
    )
    documents = list(yaml.safe_load_all(result.stdout))
    config_map, job = documents
    assert (
        job["kind"] == "RayJob"
        and job["spec"]["entrypoint"] == "ldm train /etc/ldm/experiment.yaml"
    )
    experiment = yaml.safe_load(config_map["data"]["experiment.yaml"])
    assert experiment["train"]["num_workers"] == 4 and experiment["cluster"]["use_gpu"] is True
    assert experiment["run"]["root"].startswith(k8s.SHARED_MOUNT)
    assert load_config_text(config_map["data"]["experiment.yaml"], tmp_path).train.num_workers == 4
    for doc in documents:
        assert validate(doc) == [], doc["kind"]
        assert security_problems(doc, grace_needed=300.0) == []
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert workers["replicas"] == 4

    # Preemption: every Ray pod hands its SIGTERM to the ranks (`ldm drain`, a real command,
    # within the pod's grace period); a lost worker restarts the ranks (max_failures); a job
    # a preemption stopped runs again (backoffLimit); a stop waits out the checkpoint.
    for _, template in pod_templates(job):
        pod = template["spec"]
        for container in pod["containers"]:
            if container["name"].startswith("ray-"):
                command = container["lifecycle"]["preStop"]["exec"]["command"]
                assert command == ["ldm", "drain", "--grace", "300"]
                assert parse(command[1:]).func.__name__ == "cmd_drain"
                assert pod["terminationGracePeriodSeconds"] > 300
    assert experiment["train"]["max_failures"] >= 1
    assert experiment["cluster"]["resource_wait_s"] >= 600  # GPU nodes being provisioned
    assert experiment["autoencoder"]["max_failures"] >= 1
    assert job["spec"]["backoffLimit"] >= 1
    wait = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"]
    assert int(wait) > 300


def load_config_text(text: str, folder: Path):
    path = folder / "rendered.yaml"
    path.write_text(text)
    return load_config(path)


def test_the_rendered_mlflow_server_accepts_calls_addressed_to_its_service(tmp_path):
    """The MLflow Deployment's own command line and flags (its pod address, paths and port
    swapped for this machine's): a tracking call sent to `ldm-mlflow:5000`, as pods send it,
    is served; one with a Host header it does not know is still refused (DNS rebinding)."""
    import json
    import urllib.error
    import urllib.request

    from tests.mlflow_server import MlflowServer
    from tests.ray_cluster import free_ports

    (deployment,) = [d for d in k8s.mlflow_server() if d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["mlflow", "server"]
    (port,) = free_ports(1)
    store, artifacts = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "artifacts"
    local = {
        "--host=$(POD_IP)": "--host=127.0.0.1",
        "--port=5000": f"--port={port}",
        "--backend-store-uri=sqlite:////mlflow/mlflow.db": f"--backend-store-uri={store}",
        "--artifacts-destination=/mlflow/artifacts": f"--artifacts-destination={artifacts}",
    }
    args = [local.get(a, a) for a in container["args"]]
    assert sum(a != b for a, b in zip(args, container["args"], strict=True)) == len(local)
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}

    def call(host: str) -> int:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search",
            data=json.dumps({"max_results": 1}).encode(),
            headers={"Host": host, "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as err:
            return err.code

    with MlflowServer(tmp_path, port=port, args=args, env=env):
        assert call("ldm-mlflow:5000") == 200
        assert call("ldm-mlflow.team-a.svc.cluster.local:5000") == 200
        assert call("attacker.example.com") == 403


def test_ldm_k8s_refuses_paths_only_this_machine_has(tmp_path):
    config = tmp_path / "exp.yaml"
    config.write_text("preset: tiny\n")
    for key in ("autoencoder.pretrained", "precompute.cache_dir", "run.storage"):
        refused = ldm("k8s", str(config), f"{key}={tmp_path}/x", "--stage", "train")
        one_line_error(refused, f"{key}={tmp_path}/x is a path on this machine", "/shared")
    shared = ok(
        ldm("k8s", str(config), "autoencoder.pretrained=/shared/ae", "run.storage=s3://b/r")
    )
    assert "pretrained: /shared/ae" in shared.stdout


def test_pods_bound_their_disk_and_the_policy_admits_the_operator():
    for _, doc in folder_documents():
        for _, template in pod_templates(doc):
            for volume in template["spec"].get("volumes", []):
                if "emptyDir" in volume:
                    assert volume["emptyDir"].get("sizeLimit"), (doc["metadata"]["name"], volume)
            for container in template["spec"]["containers"]:
                if container["name"] != "submitter":
                    for side in ("requests", "limits"):
                        assert "ephemeral-storage" in container["resources"][side], container[
                            "name"
                        ]
    (policy,) = [d for _, d in folder_documents() if d["kind"] == "NetworkPolicy"]
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    operator = [r for r in spec["ingress"] if "ports" in r]
    assert operator[0]["from"][0]["podSelector"]["matchLabels"] == k8s.KUBERAY_OPERATOR
    assert operator[0]["ports"] == [{"protocol": "TCP", "port": 8265}]
    (mlflow,) = [d for _, d in folder_documents() if d["kind"] == "Deployment"]
    (server,) = mlflow["spec"]["template"]["spec"]["containers"]
    assert server["securityContext"]["readOnlyRootFilesystem"] is True
    # Ray containers too: they write only to /tmp (an emptyDir, HOME there), /dev/shm and
    # the shared volume.
    for _, doc in folder_documents():
        for _role, template in pod_templates(doc):
            for container in template["spec"]["containers"]:
                if container["name"].startswith("ray-"):
                    assert container["securityContext"]["readOnlyRootFilesystem"] is True
                    mounts = {m["mountPath"] for m in container["volumeMounts"]}
                    assert {"/tmp", "/dev/shm", k8s.SHARED_MOUNT} <= mounts
                    assert {"name": "HOME", "value": "/tmp"} in container["env"]
