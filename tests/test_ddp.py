"""Issue 8: two DDP processes on CPU (gloo, launched by torchrun) train phase 1 exactly like one process with the
same global batch: the same loss curve and the same weights, up to float summation order."""
import os
import re
import subprocess
import sys

import torch

from conftest import P1_STEPS, ROOT, TIMEOUT, TINY_P1, load, script_env, show, tensors


def losses(stdout):
    """{step: training loss} from the `step N | loss X` log lines."""
    return {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"^step (\d+) \| loss ([-\d.naif]+)", stdout, re.M)}


def test_two_process_ddp_matches_one_process(tmp_path, world, phase1_dir):
    d = str(tmp_path / "ddp")
    os.makedirs(d)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "phase1_text.py"), "--device", "cpu", "--quiet", "--world_dir", world,
           "--out_dir", "out", *TINY_P1]  # --batch_size 8 is the global batch: 4 rows per process
    r = subprocess.run(cmd, cwd=d, env=script_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, show(r)
    assert "device cpu x2" in r.stdout, r.stdout
    assert r.stdout.count("done: best val loss") == 1  # only rank 0 prints

    with open(os.path.join(phase1_dir, "stdout.txt")) as f:
        single = f.read()  # the one-process run of the same command (conftest's phase1_dir)
    a, b = losses(r.stdout), losses(single)
    assert sorted(a) == sorted(b) == list(range(1, P1_STEPS + 1))
    for step in a:  # logged with 4 decimals: equal up to rounding of nearly equal floats
        assert abs(a[step] - b[step]) <= 2e-4, (step, a[step], b[step])
    val_a = re.findall(r"^step (\d+) \| val loss ([\d.]+)", r.stdout, re.M)
    val_b = re.findall(r"^step (\d+) \| val loss ([\d.]+)", single, re.M)
    assert len(val_a) == len(val_b) > 1
    for (sa, la), (sb, lb) in zip(val_a, val_b):
        assert sa == sb and abs(float(la) - float(lb)) <= 2e-4, (sa, la, lb)

    ddp, one = load(os.path.join(d, "out", "phase1", "last.pt")), load(os.path.join(phase1_dir, "out", "phase1", "last.pt"))
    assert ddp["step"] == one["step"] == P1_STEPS
    ta, tb = tensors(ddp["model"]), tensors(one["model"])
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.allclose(ta[k], tb[k], rtol=1e-4, atol=1e-5), (k, (ta[k] - tb[k]).abs().max().item())
