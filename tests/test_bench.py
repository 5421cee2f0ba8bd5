"""bench.py end to end on the tiny config (seconds)."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.mark.slow
def test_bench_tiny_writes_sane_json(tmp_path):
    out = tmp_path / "bench.json"
    t0 = time.time()
    proc = subprocess.run([sys.executable, "bench.py", "--config", "tiny", "--device", "cpu", "--steps", "2",
                           "--skip_hf", "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    elapsed = time.time() - t0
    assert proc.returncode == 0, proc.stderr
    assert elapsed < 60, f"tiny bench took {elapsed:.1f}s"  # seconds normally; generous for a busy machine
    res = json.loads(out.read_text())
    train = res["train_ours"]
    assert train["tok_s"] > 0 and train["steps_timed"] == 2
    assert 0 < train["mfu"] <= 1
    assert res["peak_mem_mib"] > 0
    assert "train_hf" not in res and res["hf"].startswith("skipped")
    for batch, r in res["gen"]["by_batch"].items():
        assert r["cached_tok_s"] > 0 and r["uncached_tok_s"] > 0, batch
        assert r["cached_vs_uncached_match"] == 1.0  # greedy: the cache must not change a single token
    assert "train ours" in proc.stdout  # the table was printed


@pytest.mark.slow
def test_bench_plain_too_times_the_plain_model_side_by_side(tmp_path):
    """--plain_too trains and generates with a copy of our model on model.py's plain path, interleaved:
    same weights, data and optimizer, so the losses agree to float rounding."""
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "bench.py", "--config", "tiny", "--device", "cpu", "--steps", "2",
                           "--skip_hf", "--plain_too", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    assert res["train_ours_plain"]["steps_timed"] == 2 and res["fast_cpu_train_speedup"] > 0
    assert res["fast_cpu_loss_diff"] < 1e-4
    assert all(r["fast_cpu_gen_speedup"] > 0 for r in res["gen"]["by_batch"].values())
    assert "train ours, plain model.py" in proc.stdout
    bad = subprocess.run([sys.executable, "bench.py", "--config", "tiny", "--device", "cpu", "--plain_too", "--compile"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--plain_too" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_bench_gemm_compares_the_two_cpu_matmul_libraries(tmp_path):
    import fast_cpu
    if not fast_cpu.ONEDNN:
        pytest.skip("this torch build has no oneDNN linear op: nothing to compare")
    out = tmp_path / "gemm.json"
    proc = subprocess.run([sys.executable, "bench.py", "--config", "tiny", "--device", "cpu", "--gemm",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["gemm"]
    # 5 layers x forward/input grad x (training rows, 64 decoding rows)
    assert len(rows) == 20 and {r["rows"] for r in rows} == {4 * 32, 64}
    assert all(r["mkl_gflops"] > 0 and r["onednn_gflops"] > 0 for r in rows)
    assert "oneDNN" in proc.stdout and "(128 x 64) @ (64 x 192)" in proc.stdout  # tiny: d=64, qkv 3*64


@pytest.mark.slow
def test_bench_rejects_bad_flags():
    proc = subprocess.run([sys.executable, "bench.py", "--config", "tiny", "--device=cpu", "--steps", "0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--steps=0" in proc.stderr
