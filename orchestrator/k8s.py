"""Kubernetes manifests (KubeRay v1), generated from one place so they cannot drift apart.

`k8s/` holds them rendered (`python -m orchestrator.k8s k8s/`, checked by a test), and
`ldm k8s CONFIG` renders the RayJob of one experiment: a ConfigMap with the resolved config
plus a RayJob whose entrypoint is the same `ldm` command a user runs locally.

Every pod runs as a non-root user with no privilege escalation, all capabilities dropped
and the RuntimeDefault seccomp profile, with resource requests and limits. The Ray dashboard
and MLflow are ClusterIP services only, and NetworkPolicies admit nothing from outside the
project's pods. Ray token auth is on; the token, like S3 credentials, comes from Secrets.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import yaml

from core.config import STAGES, ExperimentConfig
from core.errors import LdmError
from core.loader import load_config
from orchestrator.jobs import stop_wait_env

API = "ray.io/v1"
IMAGE = "ldm:0.1.0"  # built from the repository's Dockerfile; push it where the cluster pulls
RAY_VERSION = "2.60.0"
RANK_RESTARTS = 3  # `max_failures` of a rendered stage, at least
RESOURCE_WAIT_S = 900.0  # how long a RayJob's stage waits for its GPU nodes
JOB_RETRIES = 3  # RayJob backoffLimit: reruns of a job that a preemption stopped
PART_OF = {"app.kubernetes.io/part-of": "ldm"}
SHARED_PVC = "ldm-shared"
SHARED_MOUNT = "/shared"
RAY_TOKEN_SECRET = "ldm-ray-token"  # key `auth_token`: `ray get-auth-token --generate`
S3_SECRET = "ldm-s3"  # keys AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (optional)
UID = 1000
TMP_LIMIT = "50Gi"
# Per container: the /tmp volume's limit plus room for its logs and writable layer.
EPHEMERAL = {"requests": "10Gi", "limits": "60Gi"}


# What pods and containers share: a fixed non-root identity and the default seccomp profile.
_IDENTITY = {
    "runAsNonRoot": True,
    "runAsUser": UID,
    "runAsGroup": UID,
    "seccompProfile": {"type": "RuntimeDefault"},
}


def container_security() -> dict[str, Any]:
    return {**_IDENTITY, "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def pod_security() -> dict[str, Any]:
    return {**_IDENTITY, "fsGroup": UID}


def _env(mlflow: bool = True) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "LDM_CACHE_DIR", "value": f"{SHARED_MOUNT}/.cache"},
        {"name": "HF_HUB_OFFLINE", "value": "1"},
        {"name": "RAY_USAGE_STATS_ENABLED", "value": "0"},
        {"name": "MLFLOW_DISABLE_TELEMETRY", "value": "true"},
    ]
    if mlflow:
        env.append({"name": "MLFLOW_TRACKING_URI", "value": "http://ldm-mlflow:5000"})
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        env.append(
            {
                "name": key,
                "valueFrom": {"secretKeyRef": {"name": S3_SECRET, "key": key, "optional": True}},
            }
        )
    return env


def _volumes(extra: list[dict] = ()) -> list[dict[str, Any]]:
    return [
        {"name": "shared", "persistentVolumeClaim": {"claimName": SHARED_PVC}},
        # Ray's object store and DataLoader workers need more than the default 64 MiB /dev/shm.
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}},
        # Ray's session logs and spilled objects: bounded, so a runaway log cannot fill
        # the node's disk (the containers request and limit ephemeral storage to match).
        {"name": "tmp", "emptyDir": {"sizeLimit": TMP_LIMIT}},
        *extra,
    ]


def _mounts(extra: list[dict] = ()) -> list[dict[str, Any]]:
    return [
        {"name": "shared", "mountPath": SHARED_MOUNT},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "tmp", "mountPath": "/tmp"},
        *extra,
    ]


def _pod(container: dict[str, Any], grace_s: int, extra_volumes: list[dict] = ()) -> dict[str, Any]:
    return {
        "metadata": {"labels": dict(PART_OF)},
        "spec": {
            "securityContext": pod_security(),
            # Longer than a stage's preempt_grace_s: the checkpoint on SIGTERM must finish.
            "terminationGracePeriodSeconds": grace_s,
            "automountServiceAccountToken": False,
            "containers": [container],
            "volumes": _volumes(extra_volumes),
        },
    }


def _ray_container(
    name: str, resources: dict, preempt_grace_s: int, mounts: list[dict] = ()
) -> dict[str, Any]:
    return {
        "name": name,
        "image": IMAGE,
        "imagePullPolicy": "IfNotPresent",
        # Ray, DeepSpeed and every stage write only to /tmp (an emptyDir), /dev/shm and the
        # shared volume (caches): checked by running every stage, Ray's included, in a mount
        # namespace whose root is read-only and whose /tmp is a fresh tmpfs, HOME in /tmp.
        "securityContext": {**container_security(), "readOnlyRootFilesystem": True},
        "resources": {
            side: {**values, "ephemeral-storage": EPHEMERAL[side]}
            for side, values in resources.items()
        },
        "env": [*_env(), {"name": "HOME", "value": "/tmp"}],
        "volumeMounts": _mounts(mounts),
        # The pod's SIGTERM reaches only the shell running `ray start`: hand it to the ldm
        # drivers and Ray Train workers here, which save a checkpoint and stop.
        "lifecycle": {
            "preStop": {"exec": {"command": ["ldm", "drain", "--grace", str(preempt_grace_s)]}}
        },
        "ports": [
            {"name": "gcs", "containerPort": 6379},
            {"name": "dashboard", "containerPort": 8265},
        ]
        if name == "ray-head"
        else [],
    }


def _preempt_grace(config: ExperimentConfig | None) -> int:
    """The longest checkpoint-on-SIGTERM of a stage, in whole seconds."""
    preempt = (
        max(config.train.preempt_grace_s, config.autoencoder.preempt_grace_s) if config else 60.0
    )
    return math.ceil(preempt)


def _grace(config: ExperimentConfig | None) -> int:
    """The pods' grace period: a minute past the longest checkpoint-on-SIGTERM of a stage."""
    return _preempt_grace(config) + 60


def ray_cluster_spec(
    config: ExperimentConfig | None = None,
    max_gpu_workers: int = 8,
    extra_volumes: list[dict] = (),
    extra_mounts: list[dict] = (),
) -> dict[str, Any]:
    """A head (CPU, runs the job driver) and an autoscaled group of 1-GPU workers."""
    grace = _grace(config)
    head = _ray_container(
        "ray-head",
        {
            "requests": {"cpu": "4", "memory": "16Gi"},
            "limits": {"cpu": "8", "memory": "32Gi"},
        },
        _preempt_grace(config),
        extra_mounts,
    )
    worker = _ray_container(
        "ray-worker",
        {
            "requests": {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "1"},
            "limits": {"cpu": "16", "memory": "96Gi", "nvidia.com/gpu": "1"},
        },
        _preempt_grace(config),
        extra_mounts,
    )
    workers = config.train.num_workers if config else 2
    return {
        "rayVersion": RAY_VERSION,
        "enableInTreeAutoscaling": True,
        "authOptions": {"mode": "token", "secretName": RAY_TOKEN_SECRET},
        "headGroupSpec": {
            "serviceType": "ClusterIP",
            # The head schedules no work of its own: drivers only.
            "rayStartParams": {"num-cpus": "0"},
            "template": _pod(head, grace, extra_volumes),
        },
        "workerGroupSpecs": [
            {
                "groupName": "gpu",
                "replicas": workers,
                "minReplicas": 0,
                "maxReplicas": max(max_gpu_workers, workers),
                "rayStartParams": {},
                "template": {
                    **_pod(worker, grace, extra_volumes),
                    "spec": {
                        **_pod(worker, grace, extra_volumes)["spec"],
                        "tolerations": [
                            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
                        ],
                    },
                },
            }
        ],
    }


def ray_cluster(name: str = "ldm") -> dict[str, Any]:
    """A long-lived cluster for `ldm submit --address http://ldm-head-svc:8265`."""
    return {
        "apiVersion": API,
        "kind": "RayCluster",
        "metadata": {"name": name, "labels": dict(PART_OF)},
        "spec": ray_cluster_spec(),
    }


def ray_job(
    config: ExperimentConfig, stage: str, name: str | None = None, image: str | None = None
) -> list[dict]:
    """A ConfigMap with the resolved config, and a RayJob that runs `ldm STAGE` on it."""
    name = name or f"ldm-{config.run.name.lower().replace('_', '-').replace('.', '-')}-{stage}"
    if image:
        return _with_image(ray_job(config, stage, name), image)
    config = config.model_copy(deep=True)
    _refuse_local_paths(config)
    # Paths resolve on the shared volume, whatever they were on the machine that rendered it.
    config.run.root = f"{SHARED_MOUNT}/runs"
    if "://" not in config.data.shards:
        config.data.shards = f"{SHARED_MOUNT}/data/{Path(config.data.shards).name}"
    config.cluster.use_gpu = True
    config.cluster.address = None
    config.cluster.shared_filesystem = True  # every pod mounts the shared volume
    # A worker lost without warning (node failure, OOM kill): Ray Train restarts the ranks
    # from the newest committed tag within the job.
    config.train.max_failures = max(config.train.max_failures, RANK_RESTARTS)
    config.autoencoder.max_failures = max(config.autoencoder.max_failures, RANK_RESTARTS)
    # GPU nodes take minutes to be provisioned (the worker group autoscales from zero).
    config.cluster.resource_wait_s = max(config.cluster.resource_wait_s, RESOURCE_WAIT_S)
    mounts = [{"name": "experiment", "mountPath": "/etc/ldm", "readOnly": True}]
    volumes = [{"name": "experiment", "configMap": {"name": f"{name}-config"}}]
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{name}-config", "labels": dict(PART_OF)},
        "data": {"experiment.yaml": config.to_yaml()},
    }
    job = {
        "apiVersion": API,
        "kind": "RayJob",
        "metadata": {"name": name, "labels": {**PART_OF, "ldm/stage": stage}},
        "spec": {
            "entrypoint": f"ldm {stage} /etc/ldm/experiment.yaml",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 3600,
            # A job stopped by a preemption (exit 143, every rank's checkpoint saved) runs
            # again on a new cluster, and the same command continues from that checkpoint.
            "backoffLimit": JOB_RETRIES,
            # `kubectl delete`/suspend stops the job through Ray's supervisor: wait out the
            # checkpoint instead of its 3 s before SIGKILL.
            "runtimeEnvYAML": yaml.safe_dump(
                {"env_vars": stop_wait_env(_preempt_grace(config))}, sort_keys=True
            ),
            "submitterPodTemplate": _pod(
                {
                    "name": "submitter",
                    "image": IMAGE,
                    "securityContext": container_security(),
                    "resources": {
                        "requests": {"cpu": "200m", "memory": "256Mi"},
                        "limits": {"cpu": "1", "memory": "1Gi"},
                    },
                    "env": [
                        {
                            "name": "RAY_AUTH_TOKEN",
                            "valueFrom": {
                                "secretKeyRef": {"name": RAY_TOKEN_SECRET, "key": "auth_token"}
                            },
                        },
                        {"name": "RAY_AUTH_MODE", "value": "token"},
                    ],
                },
                30,
            )
            | {"metadata": {"labels": dict(PART_OF)}},
            "rayClusterSpec": ray_cluster_spec(config, extra_volumes=volumes, extra_mounts=mounts),
        },
    }
    return [config_map, job]


def _refuse_local_paths(config: ExperimentConfig) -> None:
    """Pods see the shared volume and object stores, not the disk `ldm k8s` runs on: a
    path of this machine in the config would be a FileNotFoundError in a pod."""
    keys = {
        "autoencoder.pretrained": config.autoencoder.pretrained,
        "autoencoder.lpips_path": config.autoencoder.lpips_path,
        "precompute.cache_dir": config.precompute.cache_dir,
        "run.storage": config.run.storage,
    }
    for key, value in keys.items():
        if value is None or "://" in value or Path(value).is_relative_to(SHARED_MOUNT):
            continue
        raise LdmError(
            f"{key}={value} is a path on this machine, which the pods cannot see: copy it "
            f"to the shared volume and set {key}={SHARED_MOUNT}/..., or use an s3:// URI"
        )


def _with_image(documents: list[dict], image: str) -> list[dict]:
    def swap(node):
        if isinstance(node, dict):
            return {k: (image if k == "image" else swap(v)) for k, v in node.items()}
        if isinstance(node, list):
            return [swap(v) for v in node]
        return node

    return [swap(d) for d in documents]


MLFLOW_HOSTS = tuple(
    f"{name}{port}"
    for name in (
        "ldm-mlflow",
        "ldm-mlflow.*.svc",
        "ldm-mlflow.*.svc.cluster.local",
        "localhost",
        "127.0.0.1",
    )
    for port in ("", ":*")
)


def mlflow_server() -> list[dict]:
    """MLflow with SQLite and artifacts on its own volume, served inside the cluster only."""
    labels = {**PART_OF, "app.kubernetes.io/name": "ldm-mlflow"}
    container = {
        "name": "mlflow",
        "image": IMAGE,
        "command": ["mlflow", "server"],
        "args": [
            "--host=$(POD_IP)",  # the pod's own address, which the Service routes to
            "--port=5000",
            "--backend-store-uri=sqlite:////mlflow/mlflow.db",
            "--artifacts-destination=/mlflow/artifacts",
            "--workers=2",
            # MLflow refuses requests whose Host header it does not know (DNS rebinding):
            # the Service's names as pods call it, and localhost for `kubectl port-forward`.
            f"--allowed-hosts={','.join(MLFLOW_HOSTS)}",
            "--cors-allowed-origins=http://localhost:*,http://127.0.0.1:*",
        ],
        "env": [
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "value": "false"},
            {"name": "MLFLOW_DISABLE_TELEMETRY", "value": "true"},
        ],
        "ports": [{"name": "http", "containerPort": 5000}],
        # It writes only to its volume and /tmp.
        "securityContext": {**container_security(), "readOnlyRootFilesystem": True},
        "resources": {
            "requests": {"cpu": "500m", "memory": "1Gi", "ephemeral-storage": "1Gi"},
            "limits": {"cpu": "2", "memory": "4Gi", "ephemeral-storage": "10Gi"},
        },
        "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10},
        "volumeMounts": [
            {"name": "mlflow", "mountPath": "/mlflow"},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    return [
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": "ldm-mlflow", "labels": dict(PART_OF)},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": "50Gi"}},
            },
        },
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "ldm-mlflow", "labels": labels},
            "spec": {
                "replicas": 1,  # SQLite: one writer
                "strategy": {"type": "Recreate"},
                "selector": {"matchLabels": {"app.kubernetes.io/name": "ldm-mlflow"}},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "securityContext": pod_security(),
                        "automountServiceAccountToken": False,
                        "containers": [container],
                        "volumes": [
                            {
                                "name": "mlflow",
                                "persistentVolumeClaim": {"claimName": "ldm-mlflow"},
                            },
                            {"name": "tmp", "emptyDir": {"sizeLimit": "8Gi"}},
                        ],
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "ldm-mlflow", "labels": labels},
            "spec": {
                "type": "ClusterIP",
                "selector": {"app.kubernetes.io/name": "ldm-mlflow"},
                "ports": [{"name": "http", "port": 5000, "targetPort": "http"}],
            },
        },
    ]


def shared_storage(size: str = "1Ti") -> list[dict]:
    """The volume every pod mounts at /shared: data, caches, checkpoints (ReadWriteMany)."""
    return [
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": SHARED_PVC, "labels": dict(PART_OF)},
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "resources": {"requests": {"storage": size}},
            },
        }
    ]


# How KubeRay's Helm chart labels its operator pod (any namespace): it calls the head's
# dashboard to submit RayJobs and follow them.
KUBERAY_OPERATOR = {"app.kubernetes.io/name": "kuberay-operator"}


def network_policies() -> list[dict]:
    """Ingress to the project's pods only from each other (dashboard, GCS, MLflow) and from
    the KubeRay operator (the dashboard); egress only to each other, DNS, and HTTPS (object
    stores). A client pod (`ldm submit`, `ldm runs`) needs the label part-of: ldm."""
    project = {"podSelector": {"matchLabels": dict(PART_OF)}}
    operator = {"namespaceSelector": {}, "podSelector": {"matchLabels": dict(KUBERAY_OPERATOR)}}
    dns = [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]
    return [
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "ldm-internal-only", "labels": dict(PART_OF)},
            "spec": {
                "podSelector": {"matchLabels": dict(PART_OF)},
                "policyTypes": ["Ingress", "Egress"],
                "ingress": [
                    {"from": [project]},
                    {"from": [operator], "ports": [{"protocol": "TCP", "port": 8265}]},
                ],
                "egress": [
                    {"to": [project]},
                    {"to": [{"namespaceSelector": {}}], "ports": dns},
                    {"ports": [{"protocol": "TCP", "port": 443}]},
                ],
            },
        }
    ]


def documents_for_folder(demo: ExperimentConfig) -> dict[str, list[dict]]:
    """What `k8s/` holds: file name -> documents."""
    files = {
        "storage.yaml": shared_storage(),
        "network-policy.yaml": network_policies(),
        "mlflow.yaml": mlflow_server(),
        "ray-cluster.yaml": [ray_cluster()],
    }
    for stage in STAGES:
        files[f"rayjob-{stage}.yaml"] = ray_job(demo, stage)
    return files


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the embedded experiment YAML) as readable literal blocks."""


_Dumper.add_representer(
    str,
    lambda dumper, text: dumper.represent_scalar(
        "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None
    ),
)


def dump(documents: list[dict]) -> str:
    return yaml.dump_all(documents, Dumper=_Dumper, sort_keys=False, width=100)


HEADER = "# Generated by `python -m orchestrator.k8s k8s/` from orchestrator/k8s.py; do not edit.\n"


def write_folder(folder: Path) -> list[Path]:

    demo = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    written = []
    for name, documents in documents_for_folder(demo).items():
        path = folder / name
        path.write_text(HEADER + dump(documents))
        written.append(path)
    return written


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="render the manifests of k8s/")
    parser.add_argument("folder", type=Path)
    for written in write_folder(parser.parse_args().folder):
        print(written)
