"""`ldm submit` a training job to a real two-node Ray cluster with token auth.

The job runs the same `ldm train` a user runs locally; with STRICT_SPREAD placement its two
DeepSpeed ranks land one on each node. Status and logs come back through `ldm jobs`.
"""

import re
import time

import mlflow
import pytest

from orchestrator import jobs
from tests.conftest import ok, run_ldm
from tests.ray_cluster import client_env, local_ray_cluster

pytestmark = pytest.mark.slow


def test_submitted_training_job_runs_one_worker_per_node(pipeline, record_property):
    work, _, _ = pipeline
    with local_ray_cluster() as cluster, client_env(cluster):
        address = cluster.dashboard_url
        submitted_at = time.time()
        submitted = ok(
            run_ldm(
                "submit",
                str(work / "exp.yaml"),
                "run.name=on-cluster",
                f"autoencoder.pretrained={work}/runs/tiny/autoencoder",
                "train.num_steps=2",
                "train.checkpoint_every=2",
                "train.sample_every=2",
                "train.log_every=1",
                "cluster.placement_strategy=STRICT_SPREAD",
                "--address",
                address,
                "--stage",
                "train",
            )
        )
        job_id = submitted.stdout.strip().splitlines()[-1]
        final = jobs.wait(address, job_id, timeout_s=420)
        logs = ok(run_ldm("jobs", "logs", job_id, "--address", address)).stdout
        assert final == "SUCCEEDED", logs[-4000:]
        assert (
            ok(run_ldm("jobs", "status", job_id, "--address", address)).stdout.strip()
            == "SUCCEEDED"
        )
        listed = ok(run_ldm("jobs", "list", "--address", address)).stdout
        assert job_id in listed
    placements = dict(re.findall(r"worker rank (\d) on node (\w+)", logs))
    assert set(placements) == {"0", "1"} and placements["0"] != placements["1"], logs[-3000:]
    assert "train: done" in logs
    tag = work / "runs" / "on-cluster" / "checkpoints" / "step_00000002"
    assert (tag / "COMMITTED.json").is_file()

    # Reported, not asserted: seconds from `ldm submit` to the first step's logged loss.
    client = mlflow.MlflowClient(f"sqlite:///{work}/mlflow.db")
    (run,) = client.search_runs(
        [client.get_experiment_by_name("ldm").experiment_id],
        "attributes.run_name = 'on-cluster'",
    )
    first_step = min(m.timestamp for m in client.get_metric_history(run.info.run_id, "loss"))
    seconds = first_step / 1000 - submitted_at
    record_property("submit_to_first_step_s", round(seconds, 1))
    print(f"\nldm submit -> first training step: {seconds:.1f} s")
