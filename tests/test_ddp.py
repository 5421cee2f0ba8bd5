"""Issue 8: two DDP processes on CPU (gloo, launched by torchrun) train phases 1, 2 and 4 exactly like one process
with the same global batch: the same loss curve and the same weights, up to float summation order."""
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import (P1_STEPS, ROOT, TIMEOUT, TINY_P1, TINY_P2, load, run_script, script_env, show, tensors,
                      train_losses)


def _torchrun(script, cwd, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, script), "--device", "cpu", "--quiet", *args]
    return subprocess.run(cmd, cwd=cwd, env=script_env(), capture_output=True, text=True, timeout=TIMEOUT)


def _same_run(a_dir, a_out, b_dir, b_out, phase, steps):
    """Same training-loss curve (4 decimals), the same step count and the same final weights."""
    a, b = train_losses(a_out), train_losses(b_out)
    assert sorted(a) == sorted(b) == list(range(1, steps + 1)), (sorted(a), sorted(b))
    for step in a:  # logged with 4 decimals: equal up to rounding of nearly equal floats
        assert abs(a[step] - b[step]) <= 2e-4, (phase, step, a[step], b[step])
    ca, cb = load(os.path.join(a_dir, "out", phase, "last.pt")), load(os.path.join(b_dir, "out", phase, "last.pt"))
    assert ca["step"] == cb["step"] == steps
    ta, tb = tensors(ca["model"]), tensors(cb["model"])
    assert ta.keys() == tb.keys()
    for k in ta:
        # Adam divides by sqrt(v): where a gradient is near zero (a conv bias), the ranks' other summation order
        # moves a weight by ~1e-5 in a few steps; a missing all-reduce moves it by ~lr = 1e-3 per step
        assert torch.allclose(ta[k], tb[k], rtol=1e-4, atol=1e-4), (phase, k, (ta[k] - tb[k]).abs().max().item())


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tmp_path, world, phase1_dir):
    d = str(tmp_path / "ddp")
    os.makedirs(d)
    # --batch_size 8 is the global batch: 4 rows per process
    r = _torchrun("phase1_text.py", d, "--world_dir", world, "--out_dir", "out", *TINY_P1)
    assert r.returncode == 0, show(r)
    assert "device cpu x2" in r.stdout, r.stdout
    assert r.stdout.count("done: best val loss") == 1  # only rank 0 prints

    with open(os.path.join(phase1_dir, "stdout.txt")) as f:
        single = f.read()  # the one-process run of the same command (conftest's phase1_dir)
    val_a = re.findall(r"^step (\d+) \| val loss ([\d.]+)", r.stdout, re.M)
    val_b = re.findall(r"^step (\d+) \| val loss ([\d.]+)", single, re.M)
    assert len(val_a) == len(val_b) > 1
    for (sa, la), (sb, lb) in zip(val_a, val_b):
        assert sa == sb and abs(float(la) - float(lb)) <= 2e-4, (sa, la, lb)
    _same_run(d, r.stdout, phase1_dir, single, "phase1", P1_STEPS)


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_in_phases_2_and_4(tmp_path, world, phase1_dir):
    # Both phases replay phase 1 text through the decoder alone, outside DDP's forward, so DDP does not
    # average those gradients: without the explicit all-reduce the two ranks drift apart at the first
    # replay step. Captions and answers also differ in length between ranks, so each rank's mean loss is
    # weighted by its share of the tokens. --text_frac 0.5: every other step is a replay step.
    import shutil
    steps = 6
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    shutil.copytree(phase1_dir, one)
    shutil.copytree(phase1_dir, two)
    p2 = ["--world_dir", world, "--out_dir", "out", *TINY_P2, "--max_steps", str(steps), "--text_frac", "0.5",
          "--eval_interval", str(steps), "--n_test", "0", "--length_groups", "2"]
    r1 = run_script("phase2_caption.py", *p2, cwd=one)
    r2 = _torchrun("phase2_caption.py", two, *p2)
    assert r1.returncode == 0, show(r1)
    assert r2.returncode == 0 and "device cpu x2" in r2.stdout, show(r2)
    assert "(text replay)" in r2.stdout
    _same_run(two, r2.stdout, one, r1.stdout, "phase2", steps)

    # phase 4 from the same phase 2 weights in both folders
    shutil.copy(os.path.join(one, "out", "phase2", "best.pt"), os.path.join(two, "out", "phase2", "best.pt"))
    p4 = ["--world_dir", world, "--out_dir", "out", "--init", "phase2", "--batch_size", "8", "--max_steps", str(steps),
          "--text_frac", "0.5", "--eval_interval", str(steps), "--eval_batches", "1", "--n_test", "0",
          "--log_interval", "1"]
    r1 = run_script("phase4_vqa.py", *p4, cwd=one)
    r2 = _torchrun("phase4_vqa.py", two, *p4)
    assert r1.returncode == 0, show(r1)
    assert r2.returncode == 0 and "device cpu x2" in r2.stdout, show(r2)
    _same_run(two, r2.stdout, one, r1.stdout, "phase4", steps)


def _stop_worker(rank, init_file, results):
    import signal
    from types import SimpleNamespace
    import torch.distributed as dist
    from common import StopFlag
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    run = SimpleNamespace(ddp=True, device="cpu", world_size=2)
    stop = StopFlag()
    seen = [stop.agreed(run)]  # nobody signalled yet
    if rank == 1:
        signal.raise_signal(signal.SIGTERM)  # only rank 1 gets it, as when one node is told first
    seen.append(stop.agreed(run))
    results[rank] = seen
    dist.destroy_process_group()


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    """Each rank reading only its own flag let one rank leave while the other went on into a collective
    alone and crashed (gloo) or hung (NCCL) before saving its checkpoint."""
    import torch.multiprocessing as mp
    results = mp.Manager().dict()
    mp.spawn(_stop_worker, args=(str(tmp_path / "init"), results), nprocs=2)
    assert dict(results) == {0: [False, True], 1: [False, True]}


def _world_worker(rank, tmp, results):
    from types import SimpleNamespace
    import torch.distributed as dist
    import common
    from data import world as W
    real_build = W.build

    def build(out_dir, seed, scale, size, progress=None):  # note who builds; a tiny world instead of the default one
        results[f"built by {rank}"] = True
        real_build(out_dir, seed=seed, scale=0.03, size=size, progress=False)

    W.build = build
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=2)
    run = SimpleNamespace(ddp=True, master=rank == 0, device="cpu", world_size=2)
    d = common.ensure_world(os.path.join(tmp, "world"), run)
    results[rank] = os.path.exists(os.path.join(d, "meta.json"))
    dist.destroy_process_group()


def test_ranks_wait_for_rank_0_to_build_a_missing_world(tmp_path):
    """Phases 2-4 under torchrun with no world built yet: two ranks building at once would each rewrite
    the files the other is reading. Rank 0 builds it once; rank 1 waits and finds it finished."""
    import torch.multiprocessing as mp
    results = mp.Manager().dict()
    mp.spawn(_world_worker, args=(str(tmp_path), results), nprocs=2)
    assert dict(results) == {"built by 0": True, 0: True, 1: True}
