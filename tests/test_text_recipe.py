"""Tests of phase 1's real-text recipe: per-corpus defaults (the world's stay as they were), a budget in
passes (--epochs), sentence-level samples (windows from utterance starts) and dropout. Fast, CPU, no files."""
import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import phase1_text as P1  # noqa: E402
from common import UserError  # noqa: E402
from data.text import get_batch, utterance_starts  # noqa: E402
from model import Decoder, DecoderConfig  # noqa: E402
from tokenizer import BOS, EOS  # noqa: E402

RUN = SimpleNamespace(rank=0, world_size=1, device_type="cpu", device="cpu")

# the world's phase 1 defaults before the real-text recipe: its results must not move
WORLD = dict(vocab_size=0, n_layer=4, n_head=4, d_model=192, seq_len=128, batch_size=32, max_steps=400, lr=3e-3,
             warmup=60, min_lr_frac=0.1, weight_decay=0.1, eval_interval=100, epochs=0.0, dropout=0.0,
             sentence_starts=False, untied=False)


def test_world_defaults_unchanged():
    args = vars(P1.parse_args([]))
    assert {k: args[k] for k in WORLD} == WORLD


def test_data_dir_gets_text_defaults_and_flags_still_win():
    args = vars(P1.parse_args(["--data_dir", "somewhere"]))
    assert {k: args[k] for k in P1.TEXT_DEFAULTS} == P1.TEXT_DEFAULTS
    args = P1.parse_args(["--data_dir", "somewhere", "--max_steps", "7", "--dropout", "0", "--no-sentence_starts",
                          "--d_model", "64"])
    assert (args.max_steps, args.dropout, args.sentence_starts, args.d_model) == (7, 0.0, False, 64)
    assert args.vocab_size == P1.TEXT_DEFAULTS["vocab_size"]  # the flags not given keep the text defaults


@pytest.mark.parametrize("argv", [["--max_steps", "0"], ["--dropout", "1"], ["--epochs", "-1"]])
def test_bad_budget_or_dropout_is_one_line(argv):
    with pytest.raises(UserError):
        P1.parse_args(argv)


def test_steps_for_epochs():
    assert P1.steps_for_epochs(1.0, 1000, 100) == 10
    assert P1.steps_for_epochs(2.5, 1000, 300) == 9  # rounded up: never fewer passes than asked
    assert P1.steps_for_epochs(0.001, 1000, 100) == 1


def stream_of(lengths):
    """A packed stream of utterances [BOS, ids..., EOS] with the given numbers of ids."""
    parts = [[BOS] + [10 + i] * n + [EOS] for i, n in enumerate(lengths)]
    return np.array([t for p in parts for t in p], dtype=np.uint16), np.cumsum([0] + [n + 2 for n in lengths])[:-1]


def test_utterance_starts_are_bos_with_a_whole_window():
    stream, offsets = stream_of([3, 5, 1, 8, 2, 4])
    seq_len = 6
    starts = utterance_starts(stream, seq_len)
    assert list(starts) == [o for o in offsets if o + seq_len + 1 <= len(stream)]
    assert (stream[starts] == BOS).all()


def test_sentence_level_batches_start_at_bos():
    stream, _ = stream_of([3, 5, 1, 8, 2, 4] * 20)
    starts = utterance_starts(stream, 8)
    x, y = get_batch(stream, 16, 8, torch.Generator().manual_seed(0), RUN, starts)
    assert x.shape == y.shape == (16, 8)
    assert (x[:, 0] == BOS).all()
    assert torch.equal(x[:, 1:], y[:, :-1])  # still next-token targets


def test_random_windows_unchanged_without_starts():
    """No starts = the draw the world has always used (same generator calls, same windows)."""
    stream = np.arange(1000, dtype=np.uint16)
    x, _ = get_batch(stream, 4, 16, torch.Generator().manual_seed(3), RUN)
    first = torch.randint(1000 - 16 - 1, (4,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(x[:, 0], first)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    cfg = DecoderConfig(vocab_size=64, n_layer=2, n_head=2, d_model=32, max_seq_len=16)
    plain, dropped = Decoder(cfg), Decoder(cfg)
    dropped.load_state_dict(plain.state_dict())
    P1.add_dropout(dropped, 0.5)
    x = torch.randint(64, (2, 16))
    plain.eval(), dropped.eval()
    assert torch.equal(plain.all_logits(x), dropped.all_logits(x))  # eval: no dropout, the same model
    plain.train(), dropped.train()
    assert not torch.allclose(plain.all_logits(x), dropped.all_logits(x))
    assert set(dropped.state_dict()) == set(plain.state_dict())  # checkpoints keep their keys


def test_short_windows_still_leave_room_for_later_phases(tmp_path):
    # phase 2 puts 16 image tokens before a caption of up to 64: a real-text phase 1 on 64-token windows
    # must not leave a 64-position decoder behind (COCO phase 2 once stopped with "exceed max_seq_len 64")
    data = tmp_path / "babylm"
    data.mkdir()
    (data / "a.train").write_text("the cat sat on the mat .\nwhere is the ball ?\nlook at the dog !\n" * 200)
    out = str(tmp_path / "out")
    P1.main(["--data_dir", str(data), "--out_dir", out, "--vocab_size", "300", "--seq_len", "16", "--max_steps", "2",
             "--batch_size", "2", "--d_model", "32", "--n_layer", "1", "--n_head", "2", "--eval_iters", "1",
             "--device", "cpu", "--quiet"])
    ck = torch.load(os.path.join(out, "phase1", "best.pt"), weights_only=True)
    assert ck["decoder_config"]["max_seq_len"] == 128
