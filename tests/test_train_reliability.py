"""Training reliability on the real input pipeline (grain, the shapes TFDS set, the tiny
model), each run a separate process as a user's would be: the same batches on 1 and 2
hosts, resume across host counts, kill -9 at random moments, SIGTERM to one of two
processes, a NaN at a step that is not logged, torn checkpoints."""

import json
import os
import random
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from m2det_jax import load_config
from m2det_jax.checkpoints.fingerprint import config_fingerprint, model_signature
from m2det_jax.checkpoints.training import TrainCheckpoints
from m2det_jax.checkpoints.variables import load_variables
from tests.helpers import (
    ROOT,
    config_path,
    run_worker,
    run_worker_processes,
    start_worker_processes,
    worker_command,
    worker_env,
)
from tests.train_worker import CONFIG, real_overrides

pytestmark = pytest.mark.slow


def _rows(workdir) -> dict[int, dict]:
    """metrics.jsonl train rows by step; a step run twice (after a kill) keeps its last."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: r for r in rows if "loss" in r}


def _losses(workdir) -> dict[int, float]:
    return {s: r["loss"] for s, r in _rows(workdir).items()}


def _steps(workdir) -> list[int]:
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _params(workdir):
    cfg = load_config(CONFIG, real_overrides("unused"))
    return jax.tree.map(np.asarray, load_variables(workdir, cfg))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shapes):
    """6 steps of the shapes pipeline (global batch 8, a checkpoint every 2 steps) by one
    process with 2 devices and by two processes with 1 each: the same program, so any
    difference is the data."""
    env = worker_env()
    root, data_dir = tmp_path_factory.mktemp("runs"), str(shapes[0])
    one, two = root / "one", root / "two"
    run_worker(["train", one, 6, "--data", data_dir, "--devices", 2], env)
    run_worker_processes(["train", two, 6, "--data", data_dir], 2, env)
    return {"one": one, "two": two, "data": data_dir, "env": env}


def test_one_and_two_processes_train_on_the_same_batches(runs):
    one, two = _losses(runs["one"]), _losses(runs["two"])
    assert sorted(one) == list(range(1, 7))
    assert one == two  # bit for bit: batch k is a function of (seed, k) only
    # The checkpointed iterator state is global: one small state, the same for any host.
    for run in (runs["one"], runs["two"]):
        data = json.loads((run / "checkpoints" / "6" / "data" / "metadata").read_text())
        assert data["position"] == 48 and data["global_batch"] == 8
        assert data["stats"]["examples"] == 48


# The input configuration of an accelerator host: grain worker processes and batches
# placed on the devices ahead of the step (the CPU default is neither).
ACCELERATOR_INPUT = ["--set", "data.num_workers=2", "--set", "data.prefetch=2"]


@pytest.mark.parametrize("src,nproc,feed", [("two", 1, "cpu"), ("one", 2, "cpu"),
                                            ("two", 1, "accelerator"),
                                            ("one", 2, "accelerator")])  # fmt: skip
def test_resume_on_another_number_of_processes(runs, tmp_path, src, nproc, feed):
    """A run checkpointed at step 4 resumes on the other number of processes (and, for
    "accelerator", with 2 grain workers and 2 batches prefetched per process) to the same
    losses as the uninterrupted run."""
    wd = tmp_path / f"{src}_to_{nproc}"
    shutil.copytree(runs[src], wd)
    shutil.rmtree(wd / "checkpoints" / "6")  # as if stopped after the step-4 checkpoint
    args = ["train", wd, 6, "--data", runs["data"]] + (ACCELERATOR_INPUT if feed != "cpu" else [])
    if nproc == 1:
        out = run_worker(args + ["--devices", 2], runs["env"]).stdout
    else:
        out = run_worker_processes(args, 2, runs["env"])[0]
    assert "at step 4" in out
    want, got = _losses(runs[src]), _losses(wd)
    assert {s: got[s] for s in (5, 6)} == {s: want[s] for s in (5, 6)}


def _wait(predicate, proc, timeout=300.0) -> bool:
    """Polls predicate() until True (-> True) or the process ends or time runs out."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("feed", ["cpu", "accelerator"])
def test_kill_9_at_random_moments_resumes_to_the_same_run(runs, tmp_path, feed):
    """Four SIGKILLs: mid-step, mid-async-save, mid-evaluation and one at random; each
    restart resumes from the newest complete checkpoint, and the end equals an
    uninterrupted run's (losses of every step, parameters). "accelerator": every life of
    the killed run has 2 grain workers and 2 batches prefetched (the checkpointed input
    position is the consumed one, not the read-ahead one); the reference has neither."""
    env, steps = runs["env"], 12
    args = ["train", None, steps, "--data", runs["data"], "--eval",
            "--set", "train.checkpoint_every=1", "--set", "train.eval_every=4",
            "--set", "postprocess.keep_per_class=5",
            "--set", "postprocess.candidates_per_class=50"]  # fmt: skip
    ref, wd = tmp_path / "ref", tmp_path / "killed"
    run_worker([a if a is not None else ref for a in args], env)
    args += ACCELERATOR_INPUT if feed != "cpu" else []
    cmd = worker_command(*[a if a is not None else wd for a in args], "--slow", 0.15)
    ckpt_dir = wd / "checkpoints"

    def saving():
        return ckpt_dir.is_dir() and any("tmp" in p.name for p in ckpt_dir.iterdir())

    rng = random.Random(0)
    moments = ["step", "save", "eval", "random"]
    for moment in moments:
        before = len(_rows(wd))
        complete = _steps(wd)
        p = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
        assert _wait(lambda b=before: len(_rows(wd)) > b, p), p.communicate()[1][-3000:]
        if moment == "step":
            time.sleep(0.1)
        elif moment == "save":
            assert _wait(saving, p, 60)
        elif moment == "eval":  # the evaluation runs right after an eval step's row
            assert _wait(lambda: max(_rows(wd)) % 4 == 0, p, 120)
            time.sleep(0.5)
        else:
            time.sleep(rng.uniform(0.0, 1.5))
        assert p.poll() is None, f"finished before the {moment} kill"
        p.send_signal(signal.SIGKILL)
        # Returns once every holder of its output pipes is gone: its grain workers too.
        out, _ = p.communicate(timeout=60)
        if complete:  # this life resumed from the newest complete checkpoint of the last
            assert f"at step {complete[-1]}" in out, (complete, out[-2000:])
    p = run_worker([a if a is not None else wd for a in args], env)
    assert f"DONE {steps} False" in p.stdout
    assert _losses(wd) == _losses(ref)
    for a, b in zip(jax.tree.leaves(_params(wd)), jax.tree.leaves(_params(ref)), strict=True):
        np.testing.assert_array_equal(a, b)


def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(runs, tmp_path):
    wd = tmp_path / "sigterm"
    procs = start_worker_processes(["train", wd, 1000, "--data", runs["data"], "--slow", 0.2],
                                   2, runs["env"])  # fmt: skip
    assert _wait(lambda: len(_rows(wd)) >= 2, procs[0]), procs[0].communicate()[1][-3000:]
    procs[1].send_signal(signal.SIGTERM)  # only the second process is told
    done = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        done.append([line for line in out.splitlines() if line.startswith("DONE")])
    assert done[0] == done[1] and done[0][0].endswith("True"), done
    step = int(done[0][0].split()[1])
    assert 2 <= step < 1000 and _steps(wd)[-1] == step == max(_losses(wd))


def test_nan_at_a_step_that_is_not_logged(runs, tmp_path):
    """log_every 4, checkpoints at 2, 4, 6, NaN in batch 3: the run stops at its next sync,
    names step 3 and keeps only the step-2 checkpoint (nothing non-finite is saved)."""
    wd = tmp_path / "nan"
    p = subprocess.run(worker_command("train", wd, 6, "--data", runs["data"], "--nan-at", 3,
                                      "--set", "train.log_every=4"),
                       env=runs["env"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)  # fmt: skip
    assert p.returncode != 0
    assert "NonFiniteLossError" in p.stderr and "at step 3" in p.stderr, p.stderr[-3000:]
    assert "Last good checkpoint: step 2" in p.stderr
    assert _steps(wd) == [2]
    # train.skip_nonfinite_steps: the same NaN batch is skipped, and training goes on.
    wd = tmp_path / "skip"
    out = run_worker(["train", wd, 6, "--data", runs["data"], "--nan-at", 3,
                      "--set", "train.skip_nonfinite_steps=True"], runs["env"]).stdout
    assert "DONE 6 False" in out
    rows = _rows(wd)
    assert "skipped_steps" not in rows[2] and rows[3]["skipped_steps"] == 1
    assert all(np.isfinite(rows[s]["loss"]) for s in (4, 5, 6))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(_params(wd)))


def test_torn_checkpoints_are_skipped_with_a_warning(tmp_path, caplog):
    cfg = load_config(config_path("tiny"))
    state = {"w": np.arange(1000, dtype=np.float32), "step": np.int32(0)}
    ckpts = TrainCheckpoints(tmp_path / "checkpoints", keep=5)
    meta = {"model": model_signature(cfg), "fingerprint": config_fingerprint(cfg)}
    for step in (1, 2):
        ckpts.save(step, {**state, "step": np.int32(step)}, {"position": step}, meta)
    ckpts.close()
    for f in (tmp_path / "checkpoints" / "2" / "state").rglob("*"):  # a truncated write
        if f.is_file():
            f.write_bytes(f.read_bytes()[:7])
    (tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp-123").mkdir()  # killed mid-save
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype),
                          state)  # fmt: skip
    step, restored, data = TrainCheckpoints(tmp_path / "checkpoints", 5).restore_latest(target, cfg)
    assert step == 1 and int(restored["step"]) == 1 and data == {"position": 1}
    err = caplog.text
    assert "3.orbax-checkpoint-tmp-123: a save that never finished" in err
    assert f"checkpoint {tmp_path / 'checkpoints' / '2'} does not restore" in err


def test_loading_a_workdir_falls_back_past_a_truncated_checkpoint(runs, tmp_path, caplog):
    """`m2det eval/detect/export` on a training workdir whose newest checkpoint is damaged
    load the one before, with a warning, as resuming does; the run used 2 devices and this
    process has 1 (the state restores onto whatever devices load it)."""
    torn, older = tmp_path / "torn", tmp_path / "older"
    shutil.copytree(runs["one"], torn)
    shutil.copytree(runs["one"], older)
    shutil.rmtree(older / "checkpoints" / "6")
    for f in (torn / "checkpoints" / "6" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 100:
            f.write_bytes(f.read_bytes()[:7])
    got, want = _params(torn), _params(older)
    assert f"checkpoint {torn / 'checkpoints' / '6'} does not restore" in caplog.text
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)
