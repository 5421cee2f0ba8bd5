"""Phase 3 (self-synthesis): the synthetic corpus round-trips, the mix ratio holds, vision stays frozen,
and the script runs end to end (synthesis + training, and the real-text-only control)."""
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import assert_ok, load, run_script, tensors

import phase3_synth as P3

TINY_P3 = ["--n_images", "24", "--gen_batch", "12", "--max_caption_tokens", "30", "--batch_size", "8",
           "--seq_len", "32", "--max_steps", "6", "--eval_interval", "3", "--eval_iters", "2", "--log_interval", "1"]


def test_synthetic_jsonl_round_trips(tmp_path):
    rows = [{"image": 0, "caption": "one object : a big red circle on the left .", "logprob": -0.1234},
            {"image": 1, "caption": "look , a star ! \"quoted\" é", "logprob": -2.5},
            {"image": 7, "caption": "", "logprob": -9.0}]
    path = str(tmp_path / "synthetic.jsonl")
    P3.write_synthetic(rows, path)
    assert P3.read_synthetic(path) == rows
    with open(path, encoding="utf-8") as f:  # readable: one JSON object per line
        assert [json.loads(l) for l in f] == rows


def test_filter_by_confidence_and_dedup():
    rows = [{"image": i, "caption": c, "logprob": lp} for i, (c, lp) in
            enumerate([("a .", -0.1), ("a .", -0.2), ("b .", -3.0), ("", -0.01), ("c .", -0.5)])]
    assert [r["caption"] for r in P3.filter_synthetic(rows, -1.0, False)] == ["a .", "a .", "c ."]
    assert [r["caption"] for r in P3.filter_synthetic(rows, -1.0, True)] == ["a .", "c ."]
    assert [r["image"] for r in P3.filter_synthetic(rows, float("-inf"), True)] == [0, 2, 4]


def test_mix_ratio_is_respected():
    # two streams that cannot be confused: real tokens are all 5, synthetic all 9
    real = np.full(10_000, 5, dtype=np.uint16)
    synth = np.full(10_000, 9, dtype=np.uint16)
    run = SimpleNamespace(rank=0, world_size=1, device="cpu", device_type="cpu")
    gen = torch.Generator().manual_seed(0)
    for frac in (0.0, 0.25, 0.5, 0.8, 1.0):
        n_syn_rows = 0
        for _ in range(20):
            x, y, n_syn = P3.mixed_batch(real, synth, 16, 32, frac, gen, run)
            rows_syn = int((x[:, 0] == 9).sum())
            assert rows_syn == n_syn == round(frac * 16)  # exact in every batch
            assert torch.equal(x[:, 1:], y[:, :-1])  # next-token targets
            n_syn_rows += rows_syn
        assert abs(n_syn_rows / (20 * 16) - frac) < 0.05


@pytest.mark.slow
def test_phase3_end_to_end_vision_frozen_and_control(world, pipeline, copy_run):
    d = copy_run(pipeline)
    r = run_script("phase3_synth.py", "--world_dir", world, "--out_dir", "out", *TINY_P3, cwd=d)
    assert_ok(r)
    out = os.path.join(d, "out", "phase3")
    rows = P3.read_synthetic(os.path.join(out, "synthetic.jsonl"))
    assert len(rows) == 24 and all(isinstance(x["caption"], str) and x["logprob"] <= 0 for x in rows)
    assert os.path.exists(os.path.join(out, "synthetic_sheet.png"))
    assert "captions/s" in r.stdout
    # the vision tower and projector are exactly phase 2's; the decoder did learn
    p2 = tensors(load(os.path.join(d, "out", "phase2", "best.pt"))["model"])
    p3 = tensors(load(os.path.join(out, "last.pt"))["model"])
    assert p3.keys() == p2.keys()
    for k in p2:
        if k.startswith(("vit.", "projector.")):
            assert torch.equal(p2[k], p3[k]), k
    assert any(not torch.equal(p2[k], p3[k]) for k in p2 if k.startswith("decoder."))
    res = json.load(open(os.path.join(out, "results.json")))
    assert all(0 <= res[k] <= 1 for k in ("existence", "relation", "syntax")) and res["gap_u"] == res["gap_u"]
    # the control: same steps, real text only, no synthesis, its own folder
    r = run_script("phase3_synth.py", "--world_dir", world, "--out_dir", "out", *TINY_P3, "--synthetic_frac", "0", cwd=d)
    assert_ok(r)
    ctrl = os.path.join(d, "out", "phase3_control")
    assert os.path.exists(os.path.join(ctrl, "best.pt"))
    assert not os.path.exists(os.path.join(ctrl, "synthetic.jsonl"))
    assert load(os.path.join(ctrl, "last.pt"))["step"] == load(os.path.join(out, "last.pt"))["step"] == 6
    # the oracle: the world's true canonical captions of the same unlabeled images, its own folder
    r = run_script("phase3_synth.py", "--world_dir", world, "--out_dir", "out", *TINY_P3, "--arm", "oracle", cwd=d)
    assert_ok(r)
    oracle = P3.read_synthetic(os.path.join(d, "out", "phase3_oracle", "synthetic.jsonl"))
    with open(os.path.join(world, "unlabeled.jsonl")) as f:
        truth = [json.loads(l) for l in f][:24]
    assert [x["caption"] for x in oracle] == [t["captions"][0] for t in truth]
    assert load(os.path.join(d, "out", "phase3_oracle", "last.pt"))["step"] == 6
    # phase 4 starts from this phase 3 checkpoint and replays phase 1 text on every 2nd step
    r = run_script("phase4_vqa.py", "--world_dir", world, "--out_dir", "out", "--batch_size", "8", "--max_steps", "4",
                   "--text_frac", "0.5", "--eval_interval", "2", "--eval_batches", "1", "--n_test", "20",
                   "--log_interval", "1", cwd=d)
    assert_ok(r)
    assert "1 step in 2 replays a batch of phase 1 text" in r.stdout and "from out/phase3/best.pt" in r.stdout
    p4 = load(os.path.join(d, "out", "phase4", "last.pt"))
    assert p4["step"] == 4 and p4["phase"] == "phase4"
