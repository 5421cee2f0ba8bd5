"""bench.py end to end on the tiny config (seconds)."""
import json
import os
import subprocess
import sys
import time

import pytest

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
def test_bench_rejects_bad_flags():
    proc = subprocess.run([sys.executable, "bench.py", "--config", "tiny", "--device=cpu", "--steps", "0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--steps=0" in proc.stderr
