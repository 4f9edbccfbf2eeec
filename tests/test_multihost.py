"""ldm's cluster on hosts of their own (tests/hosts.py): host A runs the Ray head (token auth)
and the MLflow server, host B a Ray worker node, host C the S3-compatible server, the only
storage the hosts share. Each host has its own address and /tmp; they reach each other only
by address, through the switch. What listens where is printed for every host.

On it, from A with `ldm submit`: precompute with its actors on both hosts (the same cache
bytes as the one-machine pipeline's), then a 2-worker training job (one rank per host) from
the cache on S3, checkpointing to S3 and logging to MLflow on A: it loses host B (every
process SIGKILLed; a replacement joins), then B's cable (a partition longer than the
collective timeout), then its MLflow server hangs for a while, and still ends in the
uninterrupted run's weights, bit for bit, with every step in MLflow."""

from __future__ import annotations

import collections
import hashlib
import json
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from safetensors.torch import load_file

from orchestrator.cluster import ray_env
from orchestrator.jobs import source_commit
from tests.conftest import REFERENCE_STEPS, ROOT
from tests.hosts import Host, hosts, unavailable
from tests.test_precompute import reference_cache

why = unavailable()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(why is not None, reason=why or "")]

BIN = Path(sys.executable).parent
GCS_PORT, DASHBOARD_PORT, MLFLOW_PORT, S3_PORT = 6379, 8265, 5000, 9000


# One CPU per host, so that a training rank there runs one torch thread, as each of the
# reference run's two ranks does on this 2-core machine: the same floating-point sums.
NODE = ["--num-cpus=1", "--num-gpus=0", "--disable-usage-stats", "--block"]
QUIET = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}


@dataclass
class Cluster:
    a: Host
    b: Host
    c: Host
    env: dict[str, str]
    """What every process of the cluster and its clients gets (token auth, S3)."""
    mlflow_server: subprocess.Popen | None = None

    @property
    def gcs(self) -> str:
        return f"{self.a.address}:{GCS_PORT}"

    @property
    def mlflow(self) -> str:
        return f"http://{self.a.address}:{MLFLOW_PORT}"

    def start_worker_node(self) -> None:
        """A Ray worker node on host B (again, after B was lost: a replacement host), as an
        autoscaler or KubeRay would start one."""
        self.b.popen(
            [str(BIN / "ray"), "start", f"--address={self.gcs}"]
            + [f"--node-ip-address={self.b.address}", "--resources", '{"host_b": 1}', *NODE],
            self.env,
            **QUIET,
        )

    def start_mlflow(self) -> None:
        """The MLflow server on host A (the cluster's fixture waits for its port)."""
        self.mlflow_server = self.a.popen(
            [str(BIN / "mlflow"), "server", "--host", self.a.address, "--port", str(MLFLOW_PORT)]
            + ["--backend-store-uri", "sqlite:////tmp/mlflow.db"]
            + ["--artifacts-destination", "/tmp/mlflow-artifacts", "--workers", "1"]
            + ["--allowed-hosts", f"{self.a.address}:{MLFLOW_PORT},{self.a.address}"],
            {**self.env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            **QUIET,
        )

    def python(self, host: Host, script: str, timeout: float = 300) -> str:
        """Run a Python script on `host` (the project importable); its output, or the test
        fails with its error."""
        result = host.run(
            [sys.executable, "-c", script], {**self.env, "PYTHONPATH": str(ROOT)}, timeout
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result.stdout

    def ldm(self, host: Host, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """The `ldm` command on `host`."""
        return host.run([str(BIN / "ldm"), *args], self.env, timeout)


def on_host(host: Host, path: str) -> Path:
    """A path of `host`'s private /tmp, as this process sees it (through its anchor)."""
    assert host.anchor is not None and path.startswith("/tmp/")
    return Path(f"/proc/{host.anchor.pid}/root{path}")


def _wait(host: Host, script: str, env: dict[str, str], timeout_s: float = 120) -> str:
    """Run a Python `script` on `host` until it exits 0; its output."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = host.run([sys.executable, "-c", script], env, timeout=60)
        if result.returncode == 0:
            return result.stdout
        if time.monotonic() > deadline:
            raise TimeoutError(result.stdout[-2000:] + result.stderr[-2000:])
        time.sleep(0.5)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with hosts("a", "b", "c") as made:
        a, b, c = made["a"], made["b"], made["c"]
        env = {
            **ray_env(),
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "RAY_USAGE_STATS_ENABLED": "0",
            # The head checks each node every second (Ray's default: 3 s), so a lost node is
            # declared dead after 5 failed checks in ~5 s, not ~15 s; a check's 10 s timeout
            # stays, so a 12 s partition is not taken for a lost node.
            "RAY_health_check_period_ms": "1000",
            "AWS_ENDPOINT_URL": f"http://{c.address}:{S3_PORT}",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "PATH": f"{BIN}:/usr/sbin:/usr/bin:/sbin:/bin",
        }
        c.popen([str(BIN / "moto_server"), "-H", c.address, "-p", str(S3_PORT)], env, **QUIET)
        running = Cluster(a, b, c, env)
        running.start_mlflow()
        a.popen(
            [str(BIN / "ray"), "start", "--head", f"--node-ip-address={a.address}"]
            + [f"--port={GCS_PORT}", "--include-dashboard=true", "--dashboard-host=127.0.0.1"]
            + [f"--dashboard-port={DASHBOARD_PORT}", "--resources", '{"host_a": 1}', *NODE],
            env,
            **QUIET,
        )
        a.wait_for_port(GCS_PORT)
        running.start_worker_node()
        _wait(
            a,
            "import ray\n"
            f"ray.init(address={running.gcs!r}, logging_level='ERROR')\n"
            "assert sum(n['Alive'] for n in ray.nodes()) == 2\n",
            env,
        )
        for host, port in ((a, MLFLOW_PORT), (c, S3_PORT)):
            host.wait_for_port(port)
        yield running


def test_each_host_runs_its_part_and_only_what_others_need_listens_beyond_loopback(cluster):
    a, b, c = cluster.a, cluster.b, cluster.c
    # A driver on host A places one task on each node: each runs on its own host's address.
    out = a.run(
        [
            sys.executable,
            "-c",
            "import json, ray\n"
            f"ray.init(address={cluster.gcs!r}, logging_level='ERROR')\n"
            "where = ray.remote(lambda: ray.util.get_node_ip_address())\n"
            "print(json.dumps({k: ray.get(where.options(resources={k: 0.01}).remote())\n"
            "                  for k in ('host_a', 'host_b')}))\n",
        ],
        cluster.env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {
        "host_a": a.address,
        "host_b": b.address,
    }
    # Host B reaches MLflow on A and S3 on C by their addresses.
    reach = (
        "import urllib.request as u\n"
        f"print(u.urlopen('http://{a.address}:{MLFLOW_PORT}/health', timeout=5).status)\n"
        f"print(u.urlopen('http://{c.address}:{S3_PORT}/', timeout=5).status)\n"
    )
    assert _wait(b, reach, cluster.env).split() == ["200", "200"]

    # What listens where, on every host.
    beyond_loopback: dict[str, list[str]] = {}
    for host in (a, b, c):
        table = host.listening()
        print(f"\n--- host {host.name} ({host.address}) listens on:\n{table}")
        beyond_loopback[host.name] = [
            line for line in table.splitlines() if line.split()[3].rsplit(":", 1)[0] != "127.0.0.1"
        ]
    # Our own services: MLflow on A's address, S3 on C's, the dashboard (clients on A only)
    # on loopback.
    assert any(f"{a.address}:{MLFLOW_PORT}" in line for line in beyond_loopback["a"])
    assert any(f"{c.address}:{S3_PORT}" in line for line in beyond_loopback["c"])
    assert f"127.0.0.1:{DASHBOARD_PORT}" in a.listening()
    assert not any(f":{DASHBOARD_PORT} " in line for line in beyond_loopback["a"])
    assert [line.split()[3] for line in beyond_loopback["c"]] == [f"{c.address}:{S3_PORT}"]


# --- a training job across hosts ------------------------------------------------------------

BUCKET = "ldm"
UPLOAD = """
import pathlib, fsspec
fs = fsspec.filesystem("s3")
fs.mkdir("{bucket}")
for local, prefix in (("/tmp/upload/shards", "shards"), ("/tmp/upload/autoencoder", "autoencoder")):
    for path in sorted(pathlib.Path(local).rglob("*")):
        if path.is_file():
            fs.put_file(str(path), f"{bucket}/{{prefix}}/{{path.relative_to(local).as_posix()}}")
"""
WAIT_FOR = """
import time, fsspec
fs = fsspec.filesystem("s3")
deadline = time.monotonic() + {timeout}
while not fs.exists("{key}"):
    assert time.monotonic() < deadline, "never appeared: {key}"
    time.sleep(0.02)
    fs.invalidate_cache()
"""
TRACKED = """
import json, fsspec, mlflow
client = mlflow.MlflowClient("{uri}")
(run,) = client.search_runs([client.get_experiment_by_name("ldm").experiment_id],
                            "attributes.run_name = '{name}' and tags.`ldm.stage` = 'train'")
run_id, tags = run.info.run_id, run.data.tags
with fsspec.open(tags["ldm.cache_dir"] + "/manifest.json") as manifest:
    spec_digest = json.load(manifest)["spec_digest"]
model = mlflow.artifacts.download_artifacts(
    run_id=run_id, artifact_path="model", dst_path="/tmp/tracked", tracking_uri="{uri}"
)
print(json.dumps({{
    "loss": [(m.step, m.timestamp / 1000, m.value)
             for m in client.get_metric_history(run_id, "loss")],
    "status": run.info.status,
    "tags": tags,
    "metrics": sorted(run.data.metrics),
    "images": [a.path for a in client.list_artifacts(run_id, "images")],
    "datasets": [d.dataset.digest for d in run.inputs.dataset_inputs],
    "spec_digest": spec_digest,
    "model": model,
    "ray_folders": fsspec.filesystem("s3").glob("{bucket}/runs/{name}/ray_*"),
}}))
fsspec.filesystem("s3").get_file("{final}", "/tmp/final.safetensors")
"""
PRECOMPUTED = """
import hashlib, json, fsspec, ray
from ray.util.state import list_actors
ray.init(address="{gcs}", logging_level="ERROR")
where = {{n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}}
fs = fsspec.filesystem("s3")
print(json.dumps({{
    "actors": sorted({{(a["class_name"], where[a["node_id"]])
                      for a in list_actors(detail=True, limit=10000)
                      if "MapWorker" in a["class_name"] and a["node_id"] in where}}),
    "sha256": {{p.rsplit("/", 1)[1]: hashlib.sha256(fs.cat_file(p)).hexdigest()
               for p in fs.find("{prefix}") if p.endswith(".tar")}},
}}))
"""
NEWEST = """
import fsspec
fs = fsspec.filesystem("s3")
print(max(int(p.split("/")[-2][5:]) for p in fs.glob("{prefix}/step_*/COMMITTED.json")))
"""
HANG = (
    WAIT_FOR
    + """
import os, signal
os.killpg({mlflow_pid}, signal.SIGSTOP)  # the MLflow server and its workers hang
print(time.time())
time.sleep({hang_s})  # training goes on, its records wait
os.killpg({mlflow_pid}, signal.SIGCONT)
print(time.time())
"""
)
JOB_WAIT = """
from orchestrator import jobs
print(jobs.wait("http://127.0.0.1:{port}", "{job}", timeout_s={timeout}))
"""


def _sha256(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.glob("*.tar")}


STRAGGLER_S = 2.0


def _recovery(history: list, event_s: float, tag_step: int) -> tuple[float, int]:
    """Seconds from an event (a kill, a cable pulled) to the first step the restarted ranks
    trained, and how many steps past the tag it resumed from had been trained before (redone).
    A step logged within `STRAGGLER_S` of the event was the old ranks' last: no restart is
    that fast."""
    before = {s for s, at, _ in history if at < event_s + STRAGGLER_S and s > tag_step}
    first_after = min(at for _, at, _ in history if at > event_s + STRAGGLER_S)
    return first_after - event_s, len(before)


def test_precompute_and_a_training_job_across_hosts_survive_a_lost_node_and_a_partition(
    cluster, pipeline, reference, record_property
):
    a, b = cluster.a, cluster.b
    work, _, _ = pipeline
    local_cache, _ = reference_cache(work)
    # The pipeline's shards and autoencoder go to S3 on host C, through host A.
    shutil.copytree(work / "shards", on_host(a, "/tmp/upload/shards"))
    shutil.copytree(work / "runs" / "tiny" / "autoencoder", on_host(a, "/tmp/upload/autoencoder"))
    config = "/tmp/exp.yaml"
    on_host(a, config).write_text(
        "preset: tiny\n"
        f"run: {{root: /tmp/runs, storage: 's3://{BUCKET}/runs', name: across}}\n"
        f"data: {{shards: 's3://{BUCKET}/shards'}}\n"
        f"autoencoder: {{pretrained: 's3://{BUCKET}/autoencoder'}}\n"
        # A decoder and an encoder actor, a CPU each: one on each host.
        f"precompute: {{cache_dir: 's3://{BUCKET}/cache'}}\n"
        f"tracking: {{uri: '{cluster.mlflow}', system_metrics_every_s: 1}}\n"
        # One rank per host, each with the one CPU (and torch thread) of the reference run.
        "cluster: {placement_strategy: STRICT_SPREAD, collective_timeout_s: 8}\n"
        "train: {max_failures: 4}\n"
    )
    dashboard = f"http://127.0.0.1:{DASHBOARD_PORT}"

    def submit(stage: str, *overrides: str) -> str:
        done = cluster.ldm(
            a, "submit", config, *overrides, "--address", dashboard, "--stage", stage
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout.strip().splitlines()[-1]

    def wait(job: str, timeout: float = 300) -> str:
        return (
            cluster.python(
                a,
                JOB_WAIT.format(port=DASHBOARD_PORT, job=job, timeout=timeout),
                timeout=timeout + 30,
            )
            .strip()
            .splitlines()[-1]
        )

    def logs(job: str) -> str:
        return cluster.ldm(a, "jobs", "logs", job, "--address", dashboard).stdout

    # A path of host A's disk is refused before submission: host B could not read it.
    # (Asked while the upload runs: it submits nothing.)
    refusing = a.popen(
        [str(BIN / "ldm"), "submit", config, "precompute.cache_dir=/tmp/cache"]
        + ["--address", dashboard, "--stage", "precompute"],
        cluster.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    cluster.python(a, UPLOAD.format(bucket=BUCKET))
    refused = refusing.communicate(timeout=120)[1]
    assert refusing.returncode == 2 and len(refused.strip().splitlines()) == 1, refused
    assert (
        "precompute.cache_dir=/tmp/cache: on this machine's disk, which the Ray cluster's "
        f"node(s) at {b.address} cannot read" in refused
    )

    # Precompute, its actors on both hosts: the same cache bytes as on one machine.
    started = time.monotonic()
    job = submit("precompute")
    assert wait(job) == "SUCCEEDED", logs(job)[-3000:]
    precomputed = json.loads(
        cluster.python(a, PRECOMPUTED.format(gcs=cluster.gcs, prefix=f"{BUCKET}/cache"))
    )
    ran_on = precomputed["actors"]
    assert {address for _, address in ran_on} == {a.address, b.address}, ran_on
    print(f"\nprecompute actors (class, host): {ran_on}")
    cached = precomputed["sha256"]
    assert cached == _sha256(local_cache) and cached, (cached, _sha256(local_cache))

    schedule = (
        f"train.num_steps={REFERENCE_STEPS}",
        # Cadence only (the weights stay the reference run's): a tag every step, so that
        # every event below lands a step or two after the tag that triggers it.
        "train.checkpoint_every=1",
        "train.log_every=1",
        "train.sample_every=10",
    )
    print(f"\nprecompute job: {time.monotonic() - started:.1f} s")
    tags = f"{BUCKET}/runs/across/checkpoints"

    def tag(step: int) -> str:
        return f"{tags}/step_{step:08d}/COMMITTED.json"

    def newest() -> int:
        return int(cluster.python(a, NEWEST.format(prefix=tags)).strip())

    # Training, ranks on A and B, one job. Host B is lost after the first tag (every process
    # SIGKILLed; a replacement node joins); after the restart's first tag, B's cable is out
    # for 1.5 times the collective timeout; once the ranks restarted after that, the MLflow
    # server on A hangs for 5 s (SIGSTOP; half MLflow's request timeout, which ldm sets to 10 s):
    # training goes on meanwhile, rank 0's records waiting until the server answers.
    submitted_at = time.time()
    job = submit("train", *schedule)
    cluster.python(a, WAIT_FOR.format(key=tag(1), timeout=240))
    killed_at = time.time()
    killed = b.kill_all(keep_anchor=True)
    lost_at_tag = newest()  # nothing commits without B's rank: where the restart resumes
    b.run(["rm", "-rf", "/tmp/ray"])  # the replacement starts with a clean disk
    cluster.start_worker_node()
    cluster.python(a, WAIT_FOR.format(key=tag(lost_at_tag + 1), timeout=240))
    listening = {host.name: host.listening() for host in (a, b)}
    b.link(False)
    pulled_at = time.time()
    cut_at_tag = newest()
    assert cut_at_tag + 2 < REFERENCE_STEPS - 2, "too few steps left for the outage"
    time.sleep(max(0.0, pulled_at + 12 - time.time()))  # 1.5 x the collective timeout
    b.link(True)
    # Two tags past the newest at the cut: one the restarted ranks made (see below).
    assert cluster.mlflow_server is not None
    hang = HANG.format(
        key=tag(cut_at_tag + 2), timeout=240, mlflow_pid=cluster.mlflow_server.pid, hang_s=5
    )
    outage_at, back_at = map(float, cluster.python(a, hang).split()[-2:])
    assert wait(job, timeout=300) == "SUCCEEDED", logs(job)[-5000:]
    fetching = a.popen(
        [str(BIN / "ldm"), "jobs", "logs", job, "--address", dashboard],
        cluster.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    final = f"{tags}/step_{REFERENCE_STEPS:08d}/unet.safetensors"  # fetched by TRACKED
    tracked = json.loads(
        cluster.python(
            a, TRACKED.format(uri=cluster.mlflow, name="across", bucket=BUCKET, final=final)
        ).splitlines()[-1]
    )
    text = fetching.communicate(timeout=120)[0]
    print("\n".join(line for line in text.splitlines() if "train: step" not in line))

    # Where everything ran and listened.
    for name, table in listening.items():
        print(f"\n--- host {name} listens on, while training:\n{table}")
    placements: dict[str, str] = {}  # each rank's first placement: where it was when listed
    for rank, address in re.findall(r"train: worker rank (\d) on node \w+ \(([\d.]+)\)", text):
        placements.setdefault(rank, address)
    assert set(placements.values()) == {a.address, b.address}, text[-3000:]
    # Rank 0's torch store listens on its host's address, and every socket a rank (or its
    # loader workers, which inherit them) listens on is on its host's address (the store,
    # gloo's pairs), but for the one gRPC port Ray's core worker opens on all interfaces, in
    # Ray's worker port range (10002-19999).
    rank0 = a if placements["0"] == a.address else b
    assert re.search(rf"{re.escape(rank0.address)}:\d+ .*RayTrainWo", listening[rank0.name]), (
        listening
    )
    for host in (a, b):
        for line in listening[host.name].splitlines():
            if "RayTrainWo" in line:
                address, port = line.split()[3].rsplit(":", 1)
                assert address == host.address or 10002 <= int(port) <= 19999, line

    # After the node loss and the partition the job went on from the newest committed tags
    # (below), into the uninterrupted run's weights.
    weights = load_file(on_host(a, "/tmp/final.safetensors"))
    assert weights.keys() == reference[1].keys()
    assert all(bool((weights[k] == reference[1][k]).all()) for k in weights)

    # MLflow holds one run with everything, through the outage and every restart: each step
    # logged (a step redone after a restart at most once more), sample grids at several
    # steps, the cache on S3 as its dataset input, lineage tags (the commit `ldm submit`
    # shipped), system metrics, and the model artifact, which diffusers loads.
    assert tracked["status"] == "FINISHED"
    history = tracked["loss"]
    counts = collections.Counter(s for s, _, _ in history)
    assert sorted(counts) == list(range(1, REFERENCE_STEPS + 1)) and max(counts.values()) <= 2
    # Steps trained while the server hung: logged then, delivered once it answered.
    during = sorted(s for s, at, _ in history if outage_at <= at <= back_at)
    assert during, (outage_at, back_at, history)
    print(f"\nMLflow hung {back_at - outage_at:.1f} s: steps {during} logged, delivered after")
    grid_steps = {int(g.split("+step+")[1].split("+")[0]) for g in tracked["images"]}
    assert {10, 20} <= grid_steps, tracked["images"]
    assert tracked["datasets"] == [tracked["spec_digest"][:36]]
    run_tags = tracked["tags"]
    assert run_tags["ldm.world_size"] == "2" and run_tags["ldm.zero_stage"] == "2"
    assert run_tags["ldm.git_commit"] == source_commit(ROOT) != "unknown"
    assert run_tags["ldm.cache_dir"].startswith(f"s3://{BUCKET}/cache")
    assert len(run_tags["ldm.cache_manifest_sha256"]) == 64
    assert run_tags["ldm.autoencoder_run_id"] and run_tags["ldm.precompute_run_id"]
    assert any(k.startswith("system/cpu") for k in tracked["metrics"]), tracked["metrics"]
    for key in ("samples_per_s_per_worker", "time/backward_fraction", "model_tflops_per_s"):
        assert key in tracked["metrics"], key
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        on_host(a, tracked["model"]), safety_checker=None
    )
    assert pipe.unet.config.sample_size == 8
    # Ray Train's own folder (in run.storage) holds only pointers to our tags: nothing is
    # left of it.
    assert not tracked["ray_folders"], tracked["ray_folders"]
    print(f"\nldm submit -> first step: {min(at for _, at, _ in history) - submitted_at:.1f} s")
    # Each restart went on from a committed tag: no older than the newest one when the event
    # struck (no committed work lost), no newer than the steps trained (none skipped). (Read
    # from MLflow: after the partition Ray forwards no more of host B's log lines to the
    # job's log, so rank 0's are missing there when it ran on B. Rank 0 logs to MLflow.) A
    # rank 0 on B that was uploading a tag's marker when the cable was pulled may finish it
    # once the cable is back: then the restart resumes one tag later.
    resumed_from = []
    for event_at, tag_step in ((killed_at, lost_at_tag), (pulled_at, cut_at_tag)):
        ordered = sorted(history, key=lambda h: h[1])
        after = [s for s, at, _ in ordered if at > event_at + STRAGGLER_S]
        trained = max(s for s, at, _ in ordered if at <= event_at + STRAGGLER_S)
        assert tag_step <= after[0] - 1 <= trained, (tag_step, trained, history)
        resumed_from.append(after[0] - 1)
    lost_s, lost_redone = _recovery(history, killed_at, resumed_from[0])
    cut_s, cut_redone = _recovery(history, pulled_at, resumed_from[1])
    for key, value in (
        ("node_loss_to_next_step_s", lost_s),
        ("node_loss_steps_redone", lost_redone),
        ("partition_to_next_step_s", cut_s),
        ("partition_steps_redone", cut_redone),
        ("processes_killed_on_b", killed),
    ):
        record_property(key, round(value, 1))
    print(
        f"\nhost B lost ({killed} processes SIGKILLed): next step after {lost_s:.1f} s, "
        f"{lost_redone} steps redone; B's cable out 12 s (collective timeout 8 s): next step "
        f"{cut_s:.1f} s after it was pulled, {cut_redone} steps redone"
    )
