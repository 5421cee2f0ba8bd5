"""The word n-gram baselines that eval.py prints beside every minimal-pair score: smoothed models that sum
to one, a hand-made pair set whose right answers are known per order, and the eval command line showing
them next to a checkpoint (trained on the text its out dir's data.json names). Fast, CPU."""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import eval as ev  # noqa: E402
import tokenizer as tk  # noqa: E402
from common import make_checkpoint, save_checkpoint  # noqa: E402
from model import Decoder, DecoderConfig  # noqa: E402

# "sleeps" is the commoner word, but "cats" is always followed by "sleep"; "the" always comes before "dog"
CORPUS = ["the cat sleeps ."] * 6 + ["the cats sleep ."] * 2 + ["the dog runs ."] * 3 + ["a bird sings ."]
PAIRS = [  # (good, bad, paradigm)
    ("the cats sleep .", "the cats sleeps .", "agreement"),  # unigram: wrong (sleeps is commoner); bigram: right
    ("the dog runs .", "dog the runs .", "order"),            # unigram: a tie (same words), counts half
]


def pairs():
    return [{"sentence_good": g, "sentence_bad": b, "UID": u} for g, b, u in PAIRS]


@pytest.mark.parametrize("n", [1, 2, 3])
def test_ngram_probabilities_sum_to_one(n):
    lm = ev.NGram(CORPUS, n)
    vocab = sorted({w for l in CORPUS for w in ev.ngram_words(l)}) + [ev.EOS_W]
    for history in ([ev.BOS_W, ev.BOS_W], ["the", "cats"], ["a", "dog"], ["never", "seen"]):
        total = sum(lm.prob(w, history) for w in vocab) + lm.prob("zebra", history)  # + the unknown word's share
        assert abs(total - 1) < 1e-9, (n, history, total)


def test_ngram_scores_a_hand_made_pair_set():
    res = {n: ev.ngram_minimal_pairs(ev.NGram(CORPUS, n), pairs()) for n in (1, 2, 3)}
    assert res[1]["per_paradigm"] == {"agreement": 0.0, "order": 0.5}
    assert res[1]["macro"] == 0.25
    for n in (2, 3):
        assert res[n]["per_paradigm"] == {"agreement": 1.0, "order": 1.0} and res[n]["macro"] == 1.0
    assert res[3]["n"] == 2


def test_ngram_words_case_and_punctuation():
    assert ev.ngram_words("Don't, said Mary.") == ["don't", ",", "said", "mary", "."]


def test_eval_prints_baselines_beside_the_model(tmp_path, capsys):
    """eval.py --blimp on a tiny checkpoint whose out dir's data.json names a BabyLM-format folder: the tables
    show unigram, bigram, trigram and chance rows next to the checkpoint, and eval.json keeps them."""
    text = tmp_path / "text"
    text.mkdir()
    (text / "childes.train").write_text(" ".join(f"*MOT: {l}" for l in CORPUS * 3))
    blimp = tmp_path / "pairs.jsonl"
    blimp.write_text("".join(json.dumps({"sentence_good": g, "sentence_bad": b, "UID": u}) + "\n" for g, b, u in PAIRS))
    out = tmp_path / "out"
    (out / "phase1").mkdir(parents=True)
    (out / "data.json").write_text(json.dumps({"source": str(text)}))
    sp = tk.train_tokenizer(CORPUS * 4, str(out / "tokenizer.model"), vocab_size=300)
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=sp.get_piece_size(), n_layer=1, n_head=2, d_model=16, max_seq_len=32))
    args = ev.parse_args(["--out_dir", str(out)])
    save_checkpoint(make_checkpoint(model, "phase1", str(out / "tokenizer.model"), 0, 1.0, 1.0, args),
                    str(out / "phase1" / "best.pt"))
    ev.main(["--out_dir", str(out), "--no_world", "--blimp", str(blimp), "--device", "cpu", "--quiet"])
    printed = capsys.readouterr().out
    for row in ("| phase1 |", "| unigram | 0.250 |", "| bigram | 1.000 |", "| trigram | 1.000 |", "| chance | 0.500 |",
                "| paradigm | phase1 | unigram | bigram | trigram | chance |", "| 0.000 | 1.000 | 1.000 | 0.500 |"):
        assert row in printed, printed
    assert "| **macro** |" in printed and "baselines: word n-gram models" in printed
    saved = json.loads((out / "eval.json").read_text())
    assert [b["name"] for b in saved["baselines"]] == ["unigram", "bigram", "trigram", "chance"]
    assert saved["baselines"][0]["metrics"]["blimp"] == 0.25


def test_eval_world_minimal_pairs_get_baselines_from_the_worlds_text(tmp_path, capsys):
    """A phase 1 on the built-in world (data.json source "world:DIR"): the baselines read DIR/text_train.txt and
    score the world's probes and minimal pairs, in the main table and per paradigm."""
    from data.world import build
    world = str(tmp_path / "world")
    build(world, seed=0, scale=0.005, size=16, progress=False)
    out = tmp_path / "out"
    (out / "phase1").mkdir(parents=True)
    (out / "data.json").write_text(json.dumps({"source": "world:" + world}))
    with open(os.path.join(world, "text_train.txt")) as f:
        sp = tk.train_tokenizer([l.strip() for l in f][:500], str(out / "tokenizer.model"), vocab_size=300)
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=sp.get_piece_size(), n_layer=1, n_head=2, d_model=16, max_seq_len=128))
    save_checkpoint(make_checkpoint(model, "phase1", str(out / "tokenizer.model"), 0, 1.0, 1.0, ev.parse_args([])),
                    str(out / "phase1" / "best.pt"))
    ev.main(["--out_dir", str(out), "--world_dir", world, "--per_paradigm", "--device", "cpu", "--quiet",
             "--n_text", "20"])
    printed = capsys.readouterr().out
    saved = json.loads((out / "eval.json").read_text())
    tri = next(b for b in saved["baselines"] if b["name"] == "trigram")
    assert tri["source"] == "world:" + world
    assert tri["metrics"]["syntax"] > 0.5 and tri["metrics"]["existence"] is not None
    assert tri["metrics"]["relation"] is not None and tri["metrics"]["blimp"] is None and tri["metrics"]["gap_s"] is None
    assert "| trigram |" in printed.split("Results")[1] and "| chance | 0.500 | 0.500 | 0.500 | n/a |" in printed
    assert "World minimal pairs per paradigm" in printed
    assert "| paradigm | phase1 | unigram | bigram | trigram | chance |" in printed.split("World minimal pairs per paradigm")[1]
