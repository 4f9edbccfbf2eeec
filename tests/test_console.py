"""The console a stage shows: ldm's lines (live on a terminal), everything else in the log."""

import subprocess
import sys
import textwrap
from pathlib import Path

from orchestrator.console import ConsoleFilter
from tests.conftest import ROOT

RAY_LINE = "\x1b[36m(RayTrainWorker pid=10478)\x1b[0m train: worker rank 0 on node ab pid 10478\n"


def test_only_ldm_lines_reach_the_console_wherever_ray_printed_them():
    lines = ConsoleFilter(tty=False)
    shown = [
        lines.render(line)
        for line in [
            RAY_LINE,
            "\x1b[36m(TrainController pid=10374)\x1b[0m Requesting resources: {'CPU': 1.0} * 2\n",
            "2026-12-06 06:25:02,309\tINFO streaming_executor.py:215 -- Starting execution\n",
            "/x/site-packages/mlflow/data/registry.py:148: UserWarning: ambiguous source\n",
            "Loading weights: 100%|██████████| 103/103\n",
            "(RayTrainWorker pid=7) train: step 20/1000 loss 0.4496, 55.4 samples/s, ETA 0:09:40\n",
            "precompute: wrote 00001.tar (256 samples, 0 bad)\n",
            "(RayTrainWorker pid=7) tracking: MLflow at http://h:5000 is unreachable (x)\n",
            "ldm train: error: stopped by SIGTERM: the checkpoint was saved\n",
            "=== train: 642.8 s ===\n",
        ]
    ]
    assert shown == [
        "train: worker rank 0 on node ab pid 10478\n",
        "",
        "",
        "",
        "",
        "train: step 20/1000 loss 0.4496, 55.4 samples/s, ETA 0:09:40\n",
        "precompute: wrote 00001.tar (256 samples, 0 bad)\n",
        "tracking: MLflow at http://h:5000 is unreachable (x)\n",
        "ldm train: error: stopped by SIGTERM: the checkpoint was saved\n",
        "=== train: 642.8 s ===\n",
    ]


def test_a_terminal_gets_one_live_progress_line_and_a_crash_shows_everything():
    lines = ConsoleFilter(tty=True)
    first = lines.render("train: step 20/100 loss 0.5, 50.0 samples/s, ETA 0:00:10\n")
    second = lines.render("train: step 40/100 loss 0.4, 50.0 samples/s, ETA 0:00:08\n")
    assert first.startswith("\r") and not first.endswith("\n")  # rewritten in place
    assert second.startswith("\r") and "step 40/100" in second
    assert lines.render("train: step 50: eval/fd=338.8\n") == "\ntrain: step 50: eval/fd=338.8\n"
    # A worker's traceback is Ray's to report; the command's own shows in full.
    assert lines.render("(RayTrainWorker pid=7) Traceback (most recent call last):\n") == ""
    assert lines.render("Traceback (most recent call last):\n").startswith("Traceback")
    assert (
        lines.render('  File "x.py", line 1, in <module>\n')
        == '  File "x.py", line 1, in <module>\n'
    )


def test_a_stage_console_logs_every_byte_and_shows_ldm_lines(tmp_path: Path):
    """In a process of its own: Python prints, raw writes to fds 1 and 2, and a child's
    output all reach the log; only ldm's lines the console."""
    log = tmp_path / "logs" / "train.log"
    script = textwrap.dedent(
        f"""
        import os, subprocess, sys
        from pathlib import Path
        from orchestrator.console import stage_console
        with stage_console(Path({str(log)!r}), "train"):
            print("train: step 1/2 loss 0.5, 1.0 samples/s, ETA 0:00:01")
            print("a warning nobody acts on", file=sys.stderr)
            os.write(1, b"[2026 E core_worker.cc:1] from C++\\n")
            subprocess.run([sys.executable, "-c", "print('train: from a child'); print('noise')"])
            print("train: done")
        print("after: back on the console")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"train: full log (Ray, DeepSpeed, warnings) in {log}",
        "train: step 1/2 loss 0.5, 1.0 samples/s, ETA 0:00:01",
        "train: from a child",
        "train: done",
        "after: back on the console",
    ]
    logged = log.read_text()
    for text in ("a warning nobody acts on", "from C++", "noise", "train: from a child"):
        assert text in logged
