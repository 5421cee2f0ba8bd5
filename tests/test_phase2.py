"""Phase 2 end to end: the phase 1 decoder arrives untouched, and the script runs on a real COCO-format sample."""
import json
import os

import pytest
import torch

from conftest import ROOT, TINY_P2, assert_ok, load, run_script, train_losses

COCO_MINI = os.path.join(os.path.dirname(ROOT), "shared", "data", "coco_mini")


class Captured(Exception):
    pass


@pytest.mark.slow
def test_decoder_from_phase1_is_bit_identical_before_the_first_step(world, phase1_dir, monkeypatch):
    import phase2_caption
    seen = {}

    def capture(model, run, compile_):
        # wrap_model is the last thing before the training loop: nothing has stepped yet
        seen["decoder"] = {k: v.detach().clone() for k, v in model.decoder.state_dict().items()}
        seen["vit"] = sum(p.numel() for p in model.vit.parameters())
        raise Captured

    monkeypatch.chdir(phase1_dir)
    monkeypatch.setattr(phase2_caption, "wrap_model", capture)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(Captured):
            phase2_caption.main(["--device", "cpu", "--quiet", "--world_dir", world, "--out_dir", "out", *TINY_P2])
    finally:
        torch.set_num_threads(threads)
    phase1 = load(os.path.join(phase1_dir, "out", "phase1", "best.pt"))["model"]
    assert seen["vit"] > 0
    assert set(seen["decoder"]) == set(phase1)
    for k, v in phase1.items():
        assert seen["decoder"][k].dtype == v.dtype and torch.equal(seen["decoder"][k], v), k


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(COCO_MINI), reason="../shared/data/coco_mini not present")
def test_runs_on_the_coco_format_sample(world, phase1_dir, copy_run):
    d = copy_run(phase1_dir)
    r = run_script("phase2_caption.py", "--coco_dir", COCO_MINI, "--out_dir", "out", *TINY_P2,
                   "--max_steps", "10", "--eval_interval", "5", "--n_test", "4", cwd=d)
    assert_ok(r)
    assert "BLEU-4" in r.stdout, r.stdout[-2000:]
    with open(os.path.join(d, "out", "phase2", "results.json")) as f:
        res = json.load(f)
    assert 0.0 <= res["bleu4"] <= 1.0 and res["n_test"] == 4
    # photos were pre-resized once to a uint8 array, reused by the next run
    cache = os.path.join(d, "out", "cache")
    assert any(f.endswith(".npy") for f in os.listdir(cache)), os.listdir(cache)
    ckpt = load(os.path.join(d, "out", "phase2", "best.pt"))
    assert ckpt["phase"] == "phase2" and ckpt["vit_config"]["image_size"] == 32


@pytest.mark.slow
def test_frozen_decoder_stays_bit_identical(world, phase1_dir, copy_run):
    """--freeze_decoder trains only the ViT + projector (and skips text replay: nothing to learn from it)."""
    d = copy_run(phase1_dir)
    r = run_script("phase2_caption.py", "--world_dir", world, "--out_dir", "out", *TINY_P2, "--max_steps", "12",
                   "--eval_interval", "6", "--n_test", "0", "--freeze_decoder", "--text_frac", "0.5", cwd=d)
    assert_ok(r)
    phase1 = load(os.path.join(d, "out", "phase1", "best.pt"))["model"]
    last = load(os.path.join(d, "out", "phase2", "last.pt"))
    assert last["step"] == 12
    for k, v in phase1.items():
        assert torch.equal(last["model"][f"decoder.{k}"], v), k
    fresh = [k for k in last["model"] if k.startswith("vit.")]
    opt = last["optimizer"]  # Muon for the ViT's and projector's matrices, AdamW for the rest
    assert fresh and opt["muon"]["state"] and opt["adamw"]["state"], "the ViT + projector should have trained"


@pytest.mark.slow
def test_length_groups_give_the_same_loss_curve(world, phase1_dir, copy_run):
    """Sorting a batch by caption length into micro-batches only removes padding: same losses, same weights."""
    runs = []
    for groups in (1, 3):
        d = copy_run(phase1_dir)
        r = run_script("phase2_caption.py", "--world_dir", world, "--out_dir", "out", *TINY_P2, "--max_steps", "12",
                       "--eval_interval", "6", "--n_test", "0", "--length_groups", groups, cwd=d)
        assert_ok(r)
        runs.append((list(train_losses(r.stdout).values()), load(os.path.join(d, "out", "phase2", "last.pt"))["model"]))
    (l1, m1), (l3, m3) = runs
    assert len(l1) == 12 and l1 == pytest.approx(l3, rel=1e-4, abs=1e-5)
    for k in m1:
        torch.testing.assert_close(m1[k], m3[k], rtol=1e-3, atol=1e-5, msg=k)
