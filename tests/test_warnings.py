"""Warnings a user must not miss: a phase whose validation never improved hands on its starting point
(common.Run.finish says so), and a COCO folder's images counted as missing (listed, not there) apart from
unreadable (there, not an image). Fast, in-process, CPU."""
import json
import os
import sys
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import Run  # noqa: E402
from data.images import load_coco  # noqa: E402
from model import Decoder, DecoderConfig  # noqa: E402


def run_args(tmp_path, **kw):
    a = dict(device="cpu", seed=0, batch_size=2, out_dir=str(tmp_path / "out"), resume=False,
             max_steps=4, eval_interval=2, log_interval=1, quiet=True, lr=3e-3)
    a.update(kw)
    return SimpleNamespace(**a)


def train_run(tmp_path, val_losses, **kw):
    """A Run driven as a phase drives it, with these val losses at steps 0, 2, 4 (every eval_interval) and a
    model that never learns."""
    run = Run(run_args(tmp_path, **kw), "phase1")
    model = Decoder(DecoderConfig(vocab_size=16, n_layer=1, n_head=2, d_model=8, max_seq_len=8))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    run.start(model, opt, "tokenizer.model", run.last_checkpoint())
    losses = iter(val_losses)
    while True:
        if run.eval_due(run.args.eval_interval, run.args.max_steps):
            run.evaluated(next(losses))
        if run.step >= run.args.max_steps:
            break
        run.stepped(torch.tensor(1.0))
    return run.finish()


def test_warns_when_validation_never_improved(tmp_path, capsys):
    best = train_run(tmp_path, [2.0, 2.5, 2.2])
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if "never improved" in l]
    assert len(lines) == 1, err
    assert lines[0].startswith("warning: phase1's validation never improved on its starting point (step 0: 2.0000")
    for what in (best, "more data", "fewer steps", "lower learning rate (--lr)"):
        assert what in lines[0]
    assert torch.load(best, weights_only=True)["step"] == 0


def test_warns_after_a_resume_when_best_pt_is_still_step_0(tmp_path, capsys):
    train_run(tmp_path, [2.0, 2.5, 2.2])
    capsys.readouterr()
    train_run(tmp_path, [2.3, 2.1], resume=True, max_steps=8, eval_interval=4)  # evaluates at steps 4 and 8
    err = capsys.readouterr().err
    assert "warning: phase1's validation never improved on its starting point (step 0: 2.0000, step 8: 2.1000)" in err


def test_no_warning_when_validation_improved(tmp_path, capsys):
    train_run(tmp_path, [2.0, 1.5, 1.7])
    assert "never improved" not in capsys.readouterr().err


def test_warning_names_each_phases_learning_rate_flags(tmp_path, capsys):
    args = {k: v for k, v in vars(run_args(tmp_path)).items() if k != "lr"}
    run = Run(SimpleNamespace(**args, lr_new=1e-3, lr_decoder=1e-3), "phase2")
    run.start(Decoder(DecoderConfig(vocab_size=16, n_layer=1, n_head=2, d_model=8, max_seq_len=8)),
              torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0), "tokenizer.model")
    run.evaluated(1.0)
    run.stepped(torch.tensor(1.0))
    run.evaluated(1.0)
    run.finish()
    assert "lower learning rate (--lr_new/--lr_decoder)" in capsys.readouterr().err


def test_coco_missing_and_unreadable_images_are_counted_apart(tmp_path, capsys):
    root = tmp_path / "coco"
    (root / "train2017").mkdir(parents=True)
    images, anns = [], []
    for i in range(6):
        name = f"{i:012d}.jpg"
        if i < 3:  # three good photos of different sizes
            Image.fromarray(np.full((20 + i, 30, 3), 40 * i, np.uint8)).save(root / "train2017" / name)
        elif i == 3:  # there, but not an image
            (root / "train2017" / name).write_bytes(b"not a jpeg\n" * 10)
        # 4 and 5: listed, never copied
        images.append({"id": i, "file_name": name})
        anns.append({"id": i, "image_id": i, "caption": f"picture number {i}"})
    (root / "captions_train2017.json").write_text(json.dumps({"images": images, "annotations": anns}))
    arr, rows = load_coco(str(root), 16, str(tmp_path / "cache"))
    assert arr.shape == (3, 16, 16, 3) and [r["id"] for r in rows] == [0, 1, 2]
    err = capsys.readouterr().err
    assert "warning: 2 of the 6 images listed" in err and "are missing from" in err, err
    assert "skipped 1 unreadable image(s)" in err, err
