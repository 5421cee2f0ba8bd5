"""Keeping earlier skills and comparing over seeds: phase 2's task replayed in phases 3 and 4 (image prefix on,
loss on caption tokens only), phase 3's arms that differ only in the text they read, and the paired bootstrap
and --compare of eval.py on constructed cases. Fast, CPU."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import eval as ev
import phase3_synth as P3
from data.images import caption_batches, caption_replay_step
from tokenizer import BOS, EOS, PAD

RUN = SimpleNamespace(rank=0, world_size=1, ddp=False, device="cpu", device_type="cpu",
                      autocast=torch.autocast("cpu", enabled=False))


def caption_data(n=6):
    """Images whose pixels name their row, captions of different lengths, a relational caption on even rows."""
    images = np.stack([np.full((8, 8, 3), i, np.uint8) for i in range(n)])
    captions = [[[BOS] + [10 + i] * (2 + i) + [EOS], [BOS, 99, EOS]] for i in range(n)]
    relations = [[BOS, 50 + i, 51, EOS] if i % 2 == 0 else None for i in range(n)]
    return SimpleNamespace(images=images, captions=captions, relations=relations)


def test_replay_batches_carry_the_image_prefix_and_learn_caption_tokens_only():
    data = caption_data()
    seen = []

    def loss_fn(imgs, x, y):
        seen.append((imgs, x, y))
        return (x.float().sum() * 0 + 1.0).requires_grad_()
    loss, counts = caption_replay_step(loss_fn, data, 16, torch.Generator().manual_seed(0), RUN, relation_frac=0.5)
    imgs, x, y = seen[0]
    assert imgs.shape == (16, 8, 8, 3) and imgs.dtype == torch.uint8   # the images go in: the prefix is on
    n_rel = 0
    for b in range(16):
        row = int(imgs[b, 0, 0, 0])   # which image this row shows
        targets = [t for t in y[b].tolist() if t >= 0]
        inputs = x[b, :len(targets)].tolist()
        canonical, relational = data.captions[row][0], data.relations[row]
        assert targets in (canonical[1:], (relational or [])[1:]), (row, targets)   # this image's own caption
        assert inputs == (canonical if targets == canonical[1:] else relational)[:-1]
        assert all(t == -1 for t in y[b, len(targets):].tolist())     # no loss on padding
        assert all(t == PAD for t in x[b, len(targets):].tolist())
        n_rel += targets != canonical[1:]
    assert 0 < n_rel < 16 and counts["tokens"] == int((y >= 0).sum()) and counts["images"] == 16


def test_replay_loss_reaches_the_decoder_through_image_tokens():
    """Phase 3's replay: vision frozen, image tokens computed without a gradient, the decoder learns to read them."""
    from model import DecoderConfig, ViTConfig, VLM
    torch.manual_seed(0)
    model = VLM(DecoderConfig(vocab_size=128, n_layer=1, n_head=2, d_model=16, max_seq_len=64),
                ViTConfig(image_size=8, patch_size=4, n_layer=1, n_head=2, d_model=16, merge=1))

    def caption_loss(imgs, x, y):
        with torch.no_grad():
            prefix = model.encode_images(imgs)
        return model.decoder(x, y, prefix=prefix)[1]
    caption_replay_step(caption_loss, caption_data(), 8, torch.Generator().manual_seed(0), RUN)
    assert all(p.grad is None for p in model.vit.parameters())
    assert model.decoder.tok_emb.weight.grad is not None and model.decoder.tok_emb.weight.grad.abs().sum() > 0


def test_arms_read_the_same_real_rows_and_differ_only_in_their_synthetic_text():
    """dream, oracle and continued: the same rows of real text, the same rows of synthetic text at the same
    offsets, the same tokens per step; only what the synthetic stream holds differs."""
    real = np.arange(50_000, dtype=np.uint16) % 300
    streams = [np.full(20_000 + k * 3_000, 400 + k, dtype=np.uint16) for k in range(3)]   # different lengths too
    batches = []
    for synth in streams:
        gen = torch.Generator().manual_seed(1337)
        batches.append([P3.mixed_batch(real, synth, 16, 32, 0.5, gen, RUN) for _ in range(5)])
    for steps in zip(*batches):
        (x0, _, n0), *others = steps
        syn0 = x0[:, 0] >= 400
        for k, (x, _, n) in enumerate(others, 1):
            assert n == n0 and x.shape == x0.shape
            assert torch.equal(x[~syn0], x0[~syn0])                 # the real text is the same
            assert torch.equal(x[:, 0] >= 400, syn0) and bool((x[syn0] == 400 + k).all())


def test_bootstrap_interval_covers_a_known_difference():
    rng = np.random.default_rng(0)
    a = (rng.random((3, 2000)) < 0.70).astype(float)   # three seeds, 2000 items; true difference 0.10
    b = (rng.random((3, 2000)) < 0.60).astype(float)
    point, lo, hi = ev.bootstrap_diff(a, b)
    assert lo < 0.10 < hi and lo > 0 and hi - lo < 0.06
    assert point == pytest.approx(a.mean() - b.mean())
    same = ev.bootstrap_diff(a, (rng.random((3, 2000)) < 0.70).astype(float))   # the same quality: it holds 0
    assert same[1] < 0 < same[2]
    groups = ["x"] * 1000 + ["y"] * 1000          # macro over paradigms: each paradigm weighs the same
    c = np.concatenate([np.ones((1, 1000)), np.zeros((1, 1000))], axis=1)
    assert ev.bootstrap_diff(c, np.zeros((1, 2000)), groups)[0] == pytest.approx(0.5)


def fake_eval(path, rows, groups):
    path.write_text(json.dumps({"results": [{"name": n, "metrics": m, "detail": {"items": it}} for n, m, it in rows],
                                "item_groups": groups}))
    return str(path)


def test_compare_prints_means_and_intervals_and_writes_seeds_json(tmp_path, capsys):
    rng = np.random.default_rng(1)
    keys = ev.PROBE_KEYS + ev.VL_KEYS

    def row(name, p):
        items = {k: (rng.random(400) < p).astype(int).tolist() for k in keys}
        metrics = {k: float(np.mean(v)) for k, v in items.items()}
        metrics.update(language_avg=np.mean([metrics[k] for k in ev.PROBE_KEYS]),
                       vl_avg=np.mean([metrics[k] for k in ev.VL_KEYS]))
        return name, metrics, items
    groups = {k: ["a", "b"] * 200 for k in ev.PROBE_KEYS}
    base = fake_eval(tmp_path / "base.json", [row("phase2", 0.5)], groups)
    seeds = [fake_eval(tmp_path / f"s{s}.json", [row("phase3", 0.8), row("phase3_control", 0.5)], groups)
             for s in range(3)]
    ev.main(["--compare", base, *seeds, "--json", str(tmp_path / "seeds.json"), "--chart", str(tmp_path / "seeds.png")])
    out = capsys.readouterr().out
    assert "Means ± sd over seeds" in out and "| phase3 - phase3_control |" in out
    saved = json.loads((tmp_path / "seeds.json").read_text())
    assert saved["summary"]["phase3"]["seeds"] == 3 and saved["summary"]["phase2"]["seeds"] == 1
    for contrast in ("phase3 - phase2", "phase3 - phase3_control"):
        for k in keys + ("language_avg", "vl_avg"):
            point, lo, hi = saved["contrasts"][contrast][k]
            assert lo < 0.3 < hi and lo > 0.15, (contrast, k)
    assert (tmp_path / "seeds.png").stat().st_size > 1000


@pytest.mark.slow
def test_experiments_sh_runs_every_arm_and_compares_them(world, pipeline, copy_run):
    """One seed on the tiny pipeline: phase 3 and its three controls, phase 4 from phase 3 and from the control,
    their evals and the comparison; the arms take the same steps and phase 4 keeps captioning (caption replay)."""
    import os
    import subprocess
    from conftest import ROOT, load, script_env, show
    from test_phase3 import TINY_P3
    d = copy_run(pipeline)
    env = dict(script_env(), P3_ARGS=" ".join(TINY_P3),
               P4_ARGS="--batch_size 8 --max_steps 8 --eval_interval 4 --eval_batches 1 --n_test 10 --log_interval 1",
               EVAL_ARGS="--n_samples 40 --n_vqa 40")
    cmd = ["bash", os.path.join(ROOT, "experiments.sh"), "--seeds", "1", "--base", "out", "--root", "seeds",
           "--device", "cpu", "--quiet", "--world_dir", world]
    r = subprocess.run(cmd, cwd=d, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, show(r)
    seed = os.path.join(d, "seeds", "seed_1337")
    steps = {arm: load(os.path.join(seed, arm, "last.pt"))["step"]
             for arm in ("phase3", "phase3_control", "phase3_continued", "phase3_oracle")}
    assert set(steps.values()) == {6}, steps
    assert load(os.path.join(seed, "phase4_control", "last.pt"))["step"] == 8
    saved = json.load(open(os.path.join(d, "seeds", "seeds.json")))
    for c in ("phase3 - phase2", "phase3 - phase3_control", "phase3 - phase3_continued", "phase3 - phase3_oracle",
              "phase4 - phase4_control"):
        assert "existence" in saved["contrasts"][c], c
    assert "Paired differences" in r.stdout
    # rerun: everything is done, nothing is trained again
    r = subprocess.run(cmd, cwd=d, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "==> phase" not in r.stdout and r.stdout.count("skip (done)") >= 7, show(r)


@pytest.mark.slow
def test_image_conditioned_dreaming_trains_the_decoder_on_images_and_keeps_vision(world, pipeline, copy_run):
    import os
    from conftest import assert_ok, load, run_script, tensors
    from test_phase3 import TINY_P3
    d = copy_run(pipeline)
    r = run_script("phase3_synth.py", "--world_dir", world, "--out_dir", "out", *TINY_P3, "--dream", "image",
                   "--out_name", "phase3_image", cwd=d)
    assert_ok(r)
    assert "replays phase 2's captions" in r.stdout
    p2 = tensors(load(os.path.join(d, "out", "phase2", "best.pt"))["model"])
    p3 = tensors(load(os.path.join(d, "out", "phase3_image", "last.pt"))["model"])
    assert all(torch.equal(p2[k], p3[k]) for k in p2 if k.startswith(("vit.", "projector.")))
    assert any(not torch.equal(p2[k], p3[k]) for k in p2 if k.startswith("decoder."))


def test_compare_skips_a_benchmark_scored_on_other_items(tmp_path, capsys):
    keys = ev.PROBE_KEYS + ev.VL_KEYS
    row = lambda name, n: (name, {k: 0.5 for k in keys}, {k: [1, 0] * (n // 2) for k in keys})  # noqa: E731
    a = fake_eval(tmp_path / "a.json", [row("phase2", 100)], {})
    b = fake_eval(tmp_path / "b.json", [(lambda r: (r[0], r[1], dict(r[2], vqa_ranked=[1, 0] * 25)))(row("phase3", 100))], {})
    ev.main(["--compare", a, b, "--json", str(tmp_path / "s.json"), "--chart", str(tmp_path / "s.png")])
    assert "vqa_ranked: phase3 was scored on 50 items, phase2 on 100; not compared" in capsys.readouterr().out
    saved = json.loads((tmp_path / "s.json").read_text())["contrasts"]["phase3 - phase2"]
    assert "vqa_ranked" not in saved and "existence" in saved
