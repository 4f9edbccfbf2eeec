"""Ray connection (`orchestrator.cluster`) and the Jobs API side (`orchestrator.jobs`).

The slow tests share one real two-node cluster with token auth (tests/ray_cluster.py),
started once for the module.
"""

import os
import re
import shutil
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

import core
import orchestrator
from core.config import ClusterConfig
from core.errors import LdmError
from orchestrator import jobs
from orchestrator.cluster import check_resources, ray_session
from tests.conftest import ldm, one_line_error
from tests.ray_cluster import free_ports, local_ray_cluster

HELLO = "python -c \"print('hello from job')\""


def _enter(session) -> None:
    with session:
        pass


def _one_line(err: pytest.ExceptionInfo, *fragments: str) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    for fragment in fragments:
        assert fragment in text, text
    return text


@pytest.fixture(autouse=True)
def no_ray_here(no_ray):
    """Every test here starts, or connects to, a Ray of its own from this process."""


@pytest.fixture
def no_auth_env(monkeypatch, tmp_path):
    """A client with no token anywhere (HOME hides any ~/.ray/auth_token)."""
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))


@pytest.fixture(scope="module")
def cluster():
    with local_ray_cluster() as running:  # raises on exit if any of its processes survive
        print(f"test cluster up in {running.startup_s:.1f} s")
        yield running
    assert not running.leftover_processes()


@pytest.fixture
def authed(cluster, no_auth_env, monkeypatch):
    """Client environment holding the test cluster's token."""
    for key, value in cluster.client_env.items():
        monkeypatch.setenv(key, value)
    return cluster


def _fake_project(root: Path) -> Path:
    """A project whose `orchestrator.cli` reports what the job sees instead of training."""
    (root / "orchestrator").mkdir(parents=True)
    for name in ("__init__.py", "cluster.py"):
        shutil.copy(Path(orchestrator.__file__).parent / name, root / "orchestrator" / name)
    (root / "core").mkdir()
    for name in ("__init__.py", "errors.py", "signals.py"):  # what cluster.py imports
        shutil.copy(Path(core.__file__).parent / name, root / "core" / name)
    (root / "orchestrator" / "cli.py").write_text(
        textwrap.dedent(
            """\
            import os, sys
            import ray  # the driver's python has the project's dependencies
            from orchestrator.cluster import ray_session
            print("entries:", ",".join(sorted(os.listdir("."))))
            print("argv:", ",".join(sys.argv[1:]))
            print("config:", open(sys.argv[2]).read().strip())
            print("cache:", os.environ["TORCH_EXTENSIONS_DIR"])
            print("cli file:", os.path.relpath(__file__))
            print("commit:", os.environ["LDM_SOURCE_COMMIT"])
            # Inside a job the job's cluster wins over any address, and runtime_env keys
            # the job already set are left alone instead of failing the merge.
            env = {"TORCH_EXTENSIONS_DIR": "/elsewhere", "LDM_EXTRA": "yes"}
            with ray_session("127.0.0.1:1", runtime_env={"env_vars": env}) as session:
                env_of = ray.remote(lambda keys: [os.environ[k] for k in keys])
                extra, ext = ray.get(env_of.remote(["LDM_EXTRA", "TORCH_EXTENSIONS_DIR"]))
                print("session:", len(ray.nodes()), session.embedded, extra, ext == "/elsewhere")
            """
        )
    )
    (root / "orchestrator" / "__pycache__").mkdir()
    (root / "orchestrator" / "__pycache__" / "cli.cpython-311.pyc").write_bytes(b"x")
    for package in ("models", "data_pipeline", "training"):
        (root / package).mkdir()
        (root / package / "__init__.py").write_text("")
    (root / "configs").mkdir()
    (root / "configs" / "demo.yaml").write_text("preset: tiny\n")
    for junk in (".venv", "runs", "data", ".git", ".cache"):
        (root / junk).mkdir()
        (root / junk / "big.bin").write_bytes(b"0" * 1024)
    return root


# --- no cluster needed ------------------------------------------------------------------


def test_staging_dir_holds_code_and_config(tmp_path):
    root = _fake_project(tmp_path / "project")
    staged = jobs.build_staging_dir(root, "run:\n  name: x\n", tmp_path / "staged")
    assert sorted(p.name for p in staged.iterdir()) == [
        "configs",
        "core",
        "data_pipeline",
        "job_config.yaml",
        "models",
        "orchestrator",
        "training",
    ]
    assert (staged / "job_config.yaml").read_text() == "run:\n  name: x\n"
    assert (staged / "orchestrator" / "cli.py").is_file()
    assert not list(staged.rglob("__pycache__"))
    with pytest.raises(LdmError) as err:
        jobs.build_staging_dir(tmp_path / "nowhere", "x: 1\n", tmp_path / "s2")
    _one_line(err, "orchestrator/")


def test_stage_entrypoints(tmp_path):
    train = jobs.stage_entrypoint("train")
    assert train.endswith("; exec python -m orchestrator.cli train job_config.yaml")
    assert jobs.stage_entrypoint("precompute", ["a b", "x=1"]).endswith(
        "python -m orchestrator.cli precompute job_config.yaml 'a b' x=1"
    )
    # A head node whose `python` has no Ray: one line that says what to do, exit status 2.
    bare = tmp_path / "bin"
    bare.mkdir()
    (bare / "python").symlink_to(shutil.which("python3", path="/usr/bin:/bin"))
    run = subprocess.run(
        ["sh", "-c", jobs.stage_entrypoint("train")],
        env={"PATH": f"{bare}:/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert "cannot import ray: submit with --python PATH" in run.stderr
    with pytest.raises(LdmError) as err:
        jobs.submit("http://127.0.0.1:9", "sample", "x: 1\n", Path("."))
    _one_line(err, "autoencoder, precompute, train")


def test_dashboard_address_forms(monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    assert jobs.dashboard_url("http://10.0.0.1:8265/") == "http://10.0.0.1:8265"
    assert jobs.dashboard_url("https://ray.example.com") == "https://ray.example.com"
    assert jobs.dashboard_url("10.0.0.1:9000") == "http://10.0.0.1:9000"
    assert jobs.dashboard_url("headnode") == "http://headnode:8265"
    assert jobs.dashboard_url("auto") == "http://127.0.0.1:8265"
    with pytest.raises(LdmError) as err:
        jobs.dashboard_url("ray://10.0.0.1:10001")
    _one_line(err, "dashboard")


def test_unreachable_addresses_fail_fast(no_auth_env):
    (port,) = free_ports(1)
    for call in (
        lambda: jobs.list_jobs(f"http://127.0.0.1:{port}"),
        lambda: jobs.status(f"127.0.0.1:{port}", "raysubmit_x"),
        lambda: _enter(ray_session(f"127.0.0.1:{port}")),
    ):
        start = time.monotonic()
        with pytest.raises(LdmError) as err:
            call()
        assert time.monotonic() - start < 10
        _one_line(err, f"127.0.0.1:{port}", "ray start --head")


@pytest.mark.slow
def test_embedded_session_starts_and_stops(no_auth_env, tmp_path):
    import ray

    with ray_session(None, num_cpus=1) as session:
        assert session.embedded and ray.is_initialized()
        assert ray.cluster_resources()["CPU"] == 1
        assert ray.get(ray.remote(lambda: os.environ["RAY_AUTH_MODE"]).remote()) == "token"
    assert not ray.is_initialized()
    assert not (tmp_path / ".ray").exists(), "the embedded Ray wrote a token into $HOME"
    assert "RAY_AUTH_TOKEN_PATH" not in os.environ


# --- against the two-node test cluster --------------------------------------------------


@pytest.mark.slow
def test_job_runs_streams_and_reports(authed, tmp_path):
    """A job followed while it runs (its lines as they come), then its status, logs and
    listing."""
    url = authed.dashboard_url
    script = (
        "import time\nfor i in range(3):\n    print('tick', i, flush=True)\n    time.sleep(0.5)"
    )
    (tmp_path / "ticks.py").write_text(script)
    entrypoint = f"{HELLO} && python ticks.py"
    job_id = jobs.submit_entrypoint(url, entrypoint, tmp_path)
    seen = list(jobs.logs(url, job_id, follow=True))
    assert "hello from job\n" in seen
    assert [line for line in seen if line.startswith("tick")] == [
        "tick 0\n",
        "tick 1\n",
        "tick 2\n",
    ]
    assert jobs.wait(url, job_id, timeout_s=60) == "SUCCEEDED"
    assert jobs.status(url, job_id) == "SUCCEEDED"
    assert "hello from job\n" in list(jobs.logs(url, job_id))
    assert "hello from job\n" in list(jobs.logs(url, job_id, follow=True))  # ended: returns
    listed = {job["id"]: job for job in jobs.list_jobs(url)}
    assert listed[job_id]["status"] == "SUCCEEDED"
    assert listed[job_id]["entrypoint"] == entrypoint
    assert listed[job_id]["end_time"] >= listed[job_id]["start_time"] > 0


# A stage's driver that, like `ldm train`, needs a while after SIGTERM to save.
SAVES_AFTER_SIGTERM = """\
import signal, sys, time
stop = []
signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(time.monotonic()))
print("training", flush=True)
while not stop:
    time.sleep(0.1)
time.sleep(5)  # every rank saving its part of the checkpoint: longer than Ray's 3 s
print(f"saved {time.monotonic() - stop[0]:.1f} s after SIGTERM", flush=True)
sys.exit(143)
"""


@pytest.mark.slow
def test_stop_leaves_a_stage_its_grace_period(authed, tmp_path):
    """`ldm jobs stop`: Ray's supervisor SIGTERMs the driver and, told by the job `ldm submit`
    made, waits the stage's grace period for it (not its 3 s) before it SIGKILLs."""
    root = tmp_path / "project"
    (root / "orchestrator").mkdir(parents=True)
    (root / "orchestrator" / "__init__.py").write_text("")
    (root / "orchestrator" / "cli.py").write_text(SAVES_AFTER_SIGTERM)
    url = authed.dashboard_url
    job_id = jobs.submit(url, "train", "preset: tiny\n", root, grace_s=10)
    deadline = time.monotonic() + 60
    while "training" not in "".join(jobs.logs(url, job_id)):
        assert jobs.status(url, job_id) in ("PENDING", "RUNNING"), "".join(jobs.logs(url, job_id))
        assert time.monotonic() < deadline, "job never started"
        time.sleep(0.3)
    assert jobs.stop(url, job_id) is True
    assert jobs.wait(url, job_id, timeout_s=60) == "STOPPED"
    assert re.search(r"saved \d\.\d s after SIGTERM", "".join(jobs.logs(url, job_id)))
    assert jobs.stop(url, job_id) is False  # already stopped


@pytest.mark.slow
def test_submit_stage_ships_code_and_config(authed, tmp_path):
    root = _fake_project(tmp_path / "project")
    git = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t"]
    for args in (["init", "-q"], ["add", "orchestrator"], ["commit", "-qm", "code"]):
        subprocess.run([*git, *args], check=True, capture_output=True)
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True)
    with (root / "orchestrator" / "__init__.py").open("a") as changed:
        changed.write("# an uncommitted change\n")
    url = authed.dashboard_url
    job_id = jobs.submit(url, "train", "run:\n  name: shipped\n", root, ["train.num_steps=3"])
    assert jobs.wait(url, job_id, timeout_s=60) == "SUCCEEDED", "".join(jobs.logs(url, job_id))
    text = "".join(jobs.logs(url, job_id))
    assert (
        "entries: configs,core,data_pipeline,job_config.yaml,models,orchestrator,training\n" in text
    )
    assert "argv: train,job_config.yaml,train.num_steps=3\n" in text
    assert "config: run:\n  name: shipped\n" in text
    assert "cli file: orchestrator/cli.py\n" in text  # the staged copy, not an installed one
    # The job's copy has no .git: the submitting checkout's commit (uncommitted files in it:
    # dirty) is what the job reports in its lineage tags.
    assert f"commit: {commit.stdout.strip()}+dirty\n" in text
    assert "cache: " in text and "/.cache" not in text
    assert "session: 2 False yes False\n" in text


@pytest.mark.slow
def test_submit_refuses_workers_the_cluster_cannot_place(authed, tmp_path):
    """Checked before submission, from the dashboard's view of the nodes: no job starts."""
    url = authed.dashboard_url
    nodes = jobs.cluster_nodes(url)
    assert len(nodes) == 2 and all(n["CPU"] > 0 for n in nodes)
    before = {job["id"] for job in jobs.list_jobs(url)}
    config = tmp_path / "exp.yaml"
    config.write_text("preset: tiny\n")
    for overrides, expected in [
        (
            [
                "train.num_workers=4",
                "train.global_batch_size=16",
                "cluster.placement_strategy=STRICT_SPREAD",
            ],
            "STRICT_SPREAD",
        ),
        (["cluster.use_gpu=true"], "need 2 GPUs, the Ray cluster has 0"),
    ]:
        refused = ldm("submit", str(config), *overrides, "--address", url, "--stage", "train")
        one_line_error(refused, expected)
    assert {job["id"] for job in jobs.list_jobs(url)} == before


@pytest.mark.slow
def test_unknown_job_id(authed):
    with pytest.raises(LdmError) as err:
        jobs.status(authed.dashboard_url, "raysubmit_doesnotexist")
    _one_line(err, "no job raysubmit_doesnotexist")
    with pytest.raises(LdmError):
        list(jobs.logs(authed.dashboard_url, "raysubmit_doesnotexist", follow=True))


@pytest.mark.slow
def test_wrong_or_missing_token(cluster, no_auth_env, monkeypatch):
    start = time.monotonic()
    with pytest.raises(LdmError) as err:
        jobs.list_jobs(cluster.dashboard_url)
    _one_line(err, "refused", "needs a token", "RAY_AUTH_TOKEN")
    with pytest.raises(LdmError) as err:
        _enter(ray_session(cluster.gcs_address))
    _one_line(err, "refused", "needs a token")

    monkeypatch.setenv("RAY_AUTH_TOKEN", "0" * 64)
    with pytest.raises(LdmError) as err:
        jobs.list_jobs(cluster.dashboard_url)
    _one_line(err, "refused", "not this cluster's token")
    with pytest.raises(LdmError) as err:
        _enter(ray_session(cluster.gcs_address))
    _one_line(err, cluster.gcs_address, "not this cluster's token")
    assert time.monotonic() - start < 30


@pytest.mark.slow
def test_session_sees_both_nodes_and_spreads(authed):
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    with ray_session(authed.gcs_address, runtime_env={"env_vars": {"LDM_PROBE": "1"}}) as s:
        assert not s.embedded
        alive = [n for n in ray.nodes() if n["Alive"]]
        assert len(alive) == 2
        assert {"node_head", "node_worker"} <= set(ray.cluster_resources())

        @ray.remote(num_cpus=1)
        def where() -> tuple[str, str]:
            return ray.get_runtime_context().get_node_id(), os.environ["LDM_PROBE"]

        # What Ray Train does with placement_strategy="STRICT_SPREAD": one bundle per node.
        pg = placement_group([{"CPU": 1}] * 2, strategy="STRICT_SPREAD")
        ray.get(pg.ready(), timeout=30)
        spots = ray.get(
            [
                where.options(scheduling_strategy=PlacementGroupSchedulingStrategy(pg, i)).remote()
                for i in range(2)
            ]
        )
        assert len({node for node, _ in spots}) == 2
        assert {probe for _, probe in spots} == {"1"}
        # Workers this cluster cannot place are refused with the numbers, not awaited.
        cpus = ray.cluster_resources()["CPU"]
        fits = ClusterConfig(num_cpus_per_worker=1.0, placement_strategy="STRICT_SPREAD")
        check_resources(fits, 2, "train.num_workers")
        for cluster, workers, expected in [
            (ClusterConfig(use_gpu=True), 2, "need 2 GPUs, the Ray cluster has 0"),
            (ClusterConfig(num_cpus_per_worker=1.0), 99, "need 99 CPUs (at most"),
            (ClusterConfig(num_cpus_per_worker=cpus + 1), 1, "on 2 node(s)"),
            (fits, 3, "STRICT_SPREAD puts each of the 3 workers on its own node"),
        ]:
            with pytest.raises(LdmError, match=re.escape(expected)) as err:
                check_resources(cluster, workers, "train.num_workers")
            _one_line(err, expected)
        # On a cluster that may grow (an autoscaler), a bounded wait first.
        started = time.monotonic()
        with pytest.raises(LdmError) as err:
            check_resources(fits, 3, "train.num_workers", wait_s=1.0)
        _one_line(err, "STRICT_SPREAD", "(waited 1 s for it to grow: cluster.resource_wait_s)")
        assert 1.0 <= time.monotonic() - started < 10
    assert not ray.is_initialized()


@pytest.mark.slow
def test_dashboard_port_is_not_a_gcs_address(authed):
    start = time.monotonic()
    with pytest.raises(LdmError) as err:
        _enter(ray_session(authed.dashboard_url.removeprefix("http://")))
    _one_line(err, "not a Ray GCS")
    assert time.monotonic() - start < 20


def test_paths_on_the_submitting_disk_are_refused_for_a_cluster_of_other_hosts(tmp_path):
    """A node on another host cannot read this machine's disk: the keys each stage's nodes
    read are named in one line, before anything starts; object storage, an MLflow server,
    `cluster.shared_filesystem`, or a cluster all on this machine are fine."""
    from core.loader import build_config
    from orchestrator.shared_paths import unshared_paths_problem

    here = {"CPU": 2.0, "node:127.0.0.1": 1.0, "node:__internal_head__": 1.0}
    there = {"CPU": 2.0, "node:169.254.77.2": 1.0}
    local = build_config({"preset": "tiny", "run": {"root": str(tmp_path / "runs")}}, [])
    problem = unshared_paths_problem(local, "train", [here, there])
    assert problem is not None and "\n" not in problem
    for fragment in (
        f"run.root={tmp_path / 'runs'}",
        "tracking.uri=sqlite:///",
        "node(s) at 169.254.77.2 cannot read",
        "cluster.shared_filesystem=true",
    ):
        assert fragment in problem, problem
    assert "data.shards" not in problem  # training reads the cache, not the shards
    assert "data.shards=" in unshared_paths_problem(local, "precompute", [here, there])
    assert unshared_paths_problem(local, "train", [here]) is None  # all on this machine
    shared = local.model_copy(deep=True)
    shared.cluster.shared_filesystem = True
    assert unshared_paths_problem(shared, "train", [here, there]) is None
    remote = build_config(
        {"preset": "tiny", "run": {"root": str(tmp_path / "runs")}},
        [
            "run.storage=s3://b/runs",
            "precompute.cache_dir=s3://b/cache",
            "data.shards=s3://b/shards",
            "tracking.uri=http://169.254.77.1:5000",
        ],
    )
    # run.root still holds each node's own staging and logs: not shared, not needed to be.
    for stage in ("autoencoder", "precompute", "train"):
        assert unshared_paths_problem(remote, stage, [here, there]) is None, stage
    pretrained = build_config(remote.to_dict(), ["autoencoder.pretrained=/models/vae"])
    assert "autoencoder.pretrained=/models/vae" in unshared_paths_problem(
        pretrained, "train", [here, there]
    )
