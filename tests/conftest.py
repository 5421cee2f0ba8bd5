"""Shared fixtures and helpers for the tests that drive the phase scripts as a user would: subprocesses on CPU,
one thread each, tiny models.

  * `world`: a tiny built-in world (scale 0.03), built once per session.
  * `pipeline`: a folder holding `out/` after a tiny phase 1 -> phase 2 run, trained once per session.
    Scripts run with cwd = that folder and `--out_dir out`, so every path a checkpoint records (tokenizer,
    phase 1 token streams) is relative to it; `copy_pipeline` gives a test its own copy to break.
"""
import concurrent.futures
import hashlib
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

WORLD_SCALE = 0.03
# phase 1: long enough to be interrupted mid-run (the kill-and-resume test reuses it as its reference)
P1_STEPS = 150
TINY_P1 = ["--n_layer", "1", "--d_model", "32", "--n_head", "2", "--seq_len", "64", "--batch_size", "8",
           "--max_steps", str(P1_STEPS), "--eval_interval", "40", "--eval_iters", "2", "--log_interval", "1"]
P2_STEPS = 40
TINY_P2 = ["--vit_layers", "1", "--vit_d", "32", "--vit_heads", "2", "--batch_size", "8", "--max_steps", str(P2_STEPS),
           "--n_test", "8", "--max_caption_tokens", "40", "--eval_batches", "1", "--eval_interval", "15",
           "--log_interval", "1"]
TIMEOUT = 120  # no single script run may take longer: a hang fails the test instead of stalling CI


def script_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # never inherit a DDP launch
        env.pop(k, None)
    return env


def script_cmd(script, *args):
    """`python <script> --device cpu --quiet <args>`; later flags win, so args may override --device."""
    return [sys.executable, os.path.join(ROOT, script), "--device", "cpu", "--quiet", *map(str, args)]


def run_script(script, *args, cwd=ROOT, timeout=TIMEOUT):
    return subprocess.run(script_cmd(script, *args), cwd=cwd, env=script_env(), capture_output=True, text=True,
                          timeout=timeout)


def run_many(jobs, workers=2):
    """Run independent (script, args, cwd) jobs two at a time; results in order."""
    with concurrent.futures.ThreadPoolExecutor(workers) as ex:
        return list(ex.map(lambda j: run_script(j[0], *j[1], cwd=j[2] if len(j) > 2 else ROOT), jobs))


def show(r):
    return f"exit {r.returncode}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}"


def assert_ok(r):
    assert r.returncode == 0, show(r)


def assert_user_error(r, *needles):
    """Failed with a one-line message naming the problem, and no Python traceback."""
    assert r.returncode not in (0, None), show(r)
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, show(r)
    last = [l for l in r.stderr.splitlines() if l.strip()][-1:]
    assert last and last[0].startswith("error: "), show(r)
    for n in needles:
        assert n in last[0], f"{n!r} not in the error line\n{show(r)}"


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def hashes(folder):
    """sha256 of every file under folder (relative path -> hash): checkpoints, and the tokenizer, token
    streams, data.json and synthetic corpora they depend on."""
    out = {}
    for d, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, folder)] = sha(p)
    return out


def train_losses(stdout):
    """{step: training loss} from the `step N | loss X` log lines (text-replay steps included)."""
    return {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"^step (\d+) \| loss ([-\d.naif]+)", stdout, re.M)}


def load(path):
    import torch
    return torch.load(path, map_location="cpu", weights_only=True)


def tensors(obj, prefix=""):
    """Every tensor inside a (nested) checkpoint, by dotted key."""
    import torch
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(tensors(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(tensors(v, f"{prefix}.{i}"))
    return out


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    from data import world as W
    path = str(tmp_path_factory.mktemp("tiny_world") / "world")
    W.build(path, seed=0, scale=WORLD_SCALE, size=32, progress=False)
    return path


@pytest.fixture(scope="session")
def phase1_dir(tmp_path_factory, world):
    """A folder with out/ after the tiny phase 1 run (only phase 1)."""
    d = str(tmp_path_factory.mktemp("phase1_run"))
    r = run_script("phase1_text.py", "--world_dir", world, "--out_dir", "out", *TINY_P1, cwd=d)
    assert_ok(r)
    with open(os.path.join(d, "stdout.txt"), "w") as f:  # its loss curve, for the DDP comparison
        f.write(r.stdout)
    return d


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory, world, phase1_dir):
    """A folder with out/ after the tiny phase 1 -> phase 2 runs."""
    d = str(tmp_path_factory.mktemp("pipeline") / "run")
    shutil.copytree(phase1_dir, d)
    assert_ok(run_script("phase2_caption.py", "--world_dir", world, "--out_dir", "out", *TINY_P2, cwd=d))
    return d


@pytest.fixture
def copy_run(tmp_path):
    """copy_run(src_folder) -> a private copy of a run folder, for a test to modify."""
    n = [0]

    def copy(src):
        n[0] += 1
        dst = str(tmp_path / f"run{n[0]}")
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))  # an in-process run's lock stays behind
        return dst
    return copy
