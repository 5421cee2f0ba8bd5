"""Tests of eval.py: the scoring on models whose answers are known, BLEU-4 by hand, the chart, and the
command line on tiny checkpoints (text-only -> n/a in the vision columns). Fast, CPU."""
import json
import math
import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import eval as ev  # noqa: E402
import tokenizer as tk  # noqa: E402
from common import UserError, make_checkpoint, save_checkpoint  # noqa: E402
from model import Decoder, DecoderConfig, ViTConfig, VLM  # noqa: E402

CORPUS = ["the cat sleeps .", "the cats sleep .", "the dogs run .", "the dog runs .", "a bird sings .",
          "red blue .", "blue red .", "there is a big red circle ."]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one thread is fastest, and it stays fast on a CPU other jobs keep busy."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.model")
    tk.train_tokenizer(CORPUS * 4, path, vocab_size=300)
    return path


@pytest.fixture(scope="module")
def sp(sp_path):
    return tk.load_tokenizer(sp_path)


def tiny_decoder(sp, **kw):
    cfg = dict(vocab_size=sp.get_piece_size(), n_layer=2, n_head=2, d_model=32, max_seq_len=48)
    cfg.update(kw)
    return Decoder(DecoderConfig(**cfg))


def padded_targets(seqs):
    """Teacher-forcing inputs/targets for sequences of ids; -1 (no loss) on padding."""
    T = max(len(s) for s in seqs) - 1
    x = torch.zeros(len(seqs), T, dtype=torch.long)
    y = torch.full((len(seqs), T), -1, dtype=torch.long)
    for i, s in enumerate(seqs):
        x[i, :len(s) - 1] = torch.tensor(s[:-1])
        y[i, :len(s) - 1] = torch.tensor(s[1:])
    return x, y


def train_on(model, step_fn, steps, lr=1e-2):
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = step_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return loss.item()


@pytest.fixture(scope="module")
def text_model(sp):
    """A decoder that has memorised three sentences (and so prefers them to their one-word variants)."""
    torch.manual_seed(0)
    m = tiny_decoder(sp)
    x, y = padded_targets([ev.encode_sentence(sp, s) for s in ["the cat sleeps .", "the dogs run .", "a bird sings ."]])
    loss = train_on(m, lambda: m(x, y)[1], 80)
    assert loss < 0.3
    return m


PAIRS = [  # "agree": the good sentence is the memorised one; "inverted": labels swapped, so bad must win
    {"sentence_good": "the cat sleeps .", "sentence_bad": "the cat sleep .", "UID": "agree"},
    {"sentence_good": "the dogs run .", "sentence_bad": "the dogs runs .", "UID": "agree"},
    {"sentence_good": "a bird sings .", "sentence_bad": "a bird sing .", "UID": "agree"},
    {"sentence_good": "the cat sleep .", "sentence_bad": "the cat sleeps .", "UID": "inverted"},
    {"sentence_good": "the dogs runs .", "sentence_bad": "the dogs run .", "UID": "inverted"},
]


def test_minimal_pairs_known_answers(text_model, sp):
    res = ev.minimal_pairs(text_model, sp, PAIRS)
    assert res["per_paradigm"] == {"agree": 1.0, "inverted": 0.0}
    assert res["macro"] == 0.5 and res["n"] == 5
    # the margins are clear, not a coin flip: memorised sentence >> its variant
    lp, n = ev.sequence_logprobs(text_model, [ev.encode_sentence(sp, s) for s in ("the cat sleeps .", "the cat sleep .")])
    assert lp[0] - lp[1] > 2.0
    assert n == [len(ev.encode_sentence(sp, "the cat sleeps .")) - 1, len(ev.encode_sentence(sp, "the cat sleep .")) - 1]


def test_length_sorted_scoring_and_blimp_loader(text_model, sp, tmp_path):
    # the CLI's path: BLiMP files (UID from the row, else the file name), sorted by length, capped per paradigm
    (tmp_path / "agree.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PAIRS[:3]))
    rows = [{k: v for k, v in p.items() if k != "UID"} for p in PAIRS[3:]]
    (tmp_path / "inverted.jsonl").write_text("".join(json.dumps(p) + "\n" for p in rows))
    pairs = ev.load_blimp(str(tmp_path))
    assert [p["UID"] for p in pairs] == ["agree"] * 3 + ["inverted"] * 2
    res = ev.score_pairs(text_model, sp, pairs, "cpu")
    assert res["per_paradigm"] == {"agree": 1.0, "inverted": 0.0} and res["skipped_too_long"] == 0
    assert len(ev.load_blimp(str(tmp_path), max_per_paradigm=1)) == 2
    assert len(ev.load_blimp(str(tmp_path / "agree.jsonl"))) == 3
    with pytest.raises(UserError):
        ev.load_blimp(str(tmp_path / "nope"))


def two_color_images():
    """img 0: red left half, blue right half; img 1: the mirror image. (2, 8, 8, 3) uint8."""
    red, blue = np.array([230, 20, 20], np.uint8), np.array([20, 20, 230], np.uint8)
    imgs = np.zeros((2, 8, 8, 3), np.uint8)
    imgs[0, :, :4], imgs[0, :, 4:] = red, blue
    imgs[1, :, :4], imgs[1, :, 4:] = blue, red
    return imgs


def test_winoground_scores_on_overfit_vlm(sp):
    torch.manual_seed(0)
    vlm = VLM(DecoderConfig(vocab_size=sp.get_piece_size(), n_layer=2, n_head=2, d_model=32, max_seq_len=48),
              ViTConfig(image_size=8, patch_size=4, n_layer=1, n_head=2, d_model=16, merge=1))
    imgs = two_color_images()
    x, y = padded_targets([ev.encode_sentence(sp, c) for c in ("red blue .", "blue red .")])
    images = torch.from_numpy(imgs)
    loss = train_on(vlm, lambda: vlm(images, x, y)[1], 200, lr=3e-3)
    assert loss < 0.05
    right = {"image_0": 0, "image_1": 1, "caption_0": "red blue .", "caption_1": "blue red ."}
    swapped = {"image_0": 0, "image_1": 1, "caption_0": "blue red .", "caption_1": "red blue ."}
    assert ev.winoground(vlm, sp, [right], imgs) == {"text": 1.0, "image": 1.0, "group": 1.0, "right": [1]}
    assert ev.winoground(vlm, sp, [swapped], imgs) == {"text": 0.0, "image": 0.0, "group": 0.0, "right": [0]}
    assert ev.winoground(vlm, sp, [right, swapped, right, right], imgs) == {"text": 0.75, "image": 0.75, "group": 0.75,
                                                                             "right": [1, 0, 1, 1]}


def test_bleu4_hand_cases():
    assert ev.bleu4(["a big red circle on the left ."], [["a big red circle on the left ."]]) == pytest.approx(1.0)
    assert ev.bleu4(["one two three four"], [["five six seven eight"]]) == 0.0
    # one word of five wrong at the end: precisions 4/5, 3/4, 2/3, 1/2, same length (no penalty)
    assert ev.bleu4(["a b c d e"], [["a b c d f"]]) == pytest.approx((4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25)
    # a correct but short hypothesis: precisions 1, brevity penalty exp(1 - 6/4)
    assert ev.bleu4(["a b c d"], [["a b c d e f"]]) == pytest.approx(math.exp(1 - 6 / 4))


def bar_heights(img, color):
    """Heights of the bars drawn in color: the tallest column of each contiguous run of columns."""
    a = np.asarray(img.convert("RGB"))
    cols = (a == np.array(color, np.uint8)).all(-1).sum(0)
    runs, cur = [], 0
    for c in list(cols) + [0]:
        if c:
            cur = max(cur, c)
        elif cur:
            runs.append(int(cur))
            cur = 0
    return runs


def test_chart_is_a_valid_png(tmp_path):
    from PIL import Image
    rows = [{"name": "phase1", "metrics": {"language_avg": 1.0, "vl_avg": None}},
            {"name": "phase2", "metrics": {"language_avg": 0.5, "vl_avg": 0.25}},
            {"name": "phase4", "metrics": {"language_avg": 0.0, "vl_avg": 0.75}}]
    path = str(tmp_path / "sub" / "chart.png")
    ev.draw_chart(rows, path, width=640, height=360)
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (640, 360)
        img.load()
        a = np.asarray(img.convert("RGB"))
        assert len(np.unique(a.reshape(-1, 3), axis=0)) > 10  # not a blank canvas
        lang = bar_heights(img, (52, 101, 164))
        vl = bar_heights(img, (230, 126, 34))
    legend = 12  # a 13 x 13 swatch of each colour in the legend
    lang = [h for h in lang if h > legend + 1]
    vl = [h for h in vl if h > legend + 1]
    assert len(lang) == 2 and lang[1] == pytest.approx(lang[0] / 2, abs=2)  # 1.0 and 0.5; 0.0 draws nothing
    assert len(vl) == 2 and vl[1] == pytest.approx(3 * vl[0], abs=3)  # 0.25 and 0.75; n/a draws nothing


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    from data.world import build
    path = str(tmp_path_factory.mktemp("world") / "world")
    build(path, seed=0, scale=0.005, size=16, progress=False)
    return path


def save_tiny(model, out_dir, phase, sp_path):
    path = os.path.join(out_dir, phase, "best.pt")
    save_checkpoint(make_checkpoint(model, phase, sp_path, 0, float("nan"), float("nan"), SimpleNamespace(seed=0)), path)
    return path


@pytest.mark.slow
def test_cli_text_only_checkpoint_is_na_for_vision(sp, sp_path, tiny_world, tmp_path, capsys):
    out = str(tmp_path / "out")
    torch.manual_seed(0)
    save_tiny(tiny_decoder(sp, max_seq_len=256), out, "phase1", sp_path)
    vlm = VLM(DecoderConfig(vocab_size=sp.get_piece_size(), n_layer=1, n_head=2, d_model=32, max_seq_len=256),
              ViTConfig(image_size=16, patch_size=4, n_layer=1, n_head=2, d_model=16, merge=2))
    save_tiny(vlm, out, "phase2", sp_path)
    ev.main(["--out_dir", out, "--world_dir", tiny_world, "--device", "cpu", "--quiet", "--n_caption", "3", "--n_vqa", "6"])
    printed = capsys.readouterr().out
    res = json.load(open(os.path.join(out, "eval.json")))
    (p1, p2), cols = res["results"], res["columns"]
    assert [p1["name"], p2["name"]] == ["phase1", "phase2"] and not p1["vision"] and p2["vision"]
    for key in ("wino_group", "caption_exact", "vqa_ranked", "vl_avg"):
        assert p1["metrics"][key] is None and p2["metrics"][key] is not None, key
    assert p2["metrics"]["vqa_gen"] is None   # only phase 4 learned the answer format
    for key in ("existence", "relation", "syntax", "gap_s", "gap_u", "u_said", "f_said", "grammatical", "bpb",
                "language_avg"):
        assert p1["metrics"][key] is not None and p2["metrics"][key] is not None, key
    m = p1["metrics"]
    assert m["language_avg"] == pytest.approx((m["existence"] + m["relation"] + m["syntax"]) / 3)
    m = p2["metrics"]
    assert m["vl_avg"] == pytest.approx((m["caption_exact"] + m["wino_group"] + m["vqa_ranked"]) / 3)
    assert len(p2["detail"]["items"]["vqa_ranked"]) == 6 and len(p2["detail"]["items"]["caption_exact"]) == 3
    assert "blimp" not in cols and "coco_bleu4" not in cols and "vl_avg" in cols
    row1 = next(l for l in printed.splitlines() if l.startswith("| phase1 "))
    assert row1.count("n/a") == 6  # caption exact, U naming, Winoground group, VQA ranked and generated, VL avg
    assert os.path.getsize(os.path.join(out, "eval.png")) > 0


@pytest.mark.slow
def test_cli_blimp_on_text_only_out_dir(text_model, sp_path, tmp_path, capsys):
    out, blimp = str(tmp_path / "out"), tmp_path / "blimp"
    blimp.mkdir()
    for uid in ("agree", "inverted"):
        (blimp / f"{uid}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PAIRS if p["UID"] == uid))
    save_tiny(text_model, out, "phase1", sp_path)
    ev.main(["--out_dir", out, "--blimp", str(blimp), "--no_world", "--device", "cpu", "--quiet"])
    printed = capsys.readouterr().out
    r = json.load(open(os.path.join(out, "eval.json")))["results"][0]
    assert r["metrics"]["blimp"] == 0.5 and r["metrics"]["language_avg"] == 0.5 and r["metrics"]["vl_avg"] is None
    assert r["detail"]["blimp"]["per_paradigm"] == {"agree": 1.0, "inverted": 0.0}
    assert "| agree | 1.000 |" in printed and "| inverted | 0.000 |" in printed


@pytest.mark.slow
def test_cli_errors(sp, sp_path, tmp_path):
    with pytest.raises(UserError, match="phase1_text.py"):
        ev.main(["--out_dir", str(tmp_path / "empty"), "--no_world"])
    with pytest.raises(UserError, match="not found"):
        ev.main(["--ckpt", str(tmp_path / "missing.pt"), "--no_world"])
    if not torch.cuda.is_available():
        path = save_tiny(tiny_decoder(sp), str(tmp_path / "out"), "phase1", sp_path)
        with pytest.raises(UserError, match="CUDA"):
            ev.main(["--ckpt", path, "--no_world", "--device", "cuda"])


def test_chart_draws_a_tiny_value(tmp_path):
    # 0.001 rounds to the zero line: it used to make PIL raise "y1 must be greater than or equal to y0"
    rows = [{"name": "phase4", "metrics": {"language_avg": 0.001, "vl_avg": 1e-9}}]
    path = str(tmp_path / "chart.png")
    ev.draw_chart(rows, path, width=640, height=360)
    from PIL import Image
    with Image.open(path) as img:
        assert img.size == (640, 360)
        assert max(bar_heights(img, (52, 101, 164))) >= 1


# --- the world's language probes and fair vision-language scores -------------------------------------------------------
def world_meta():
    from data import world as W
    return {"colors": list(W.COLORS), "shapes": list(W.SHAPES), "sizes": list(W.SIZES),
            "heldout_combos": [f"{c} {s}" for c, s in sorted(W.HELDOUT_COMBOS)],
            "unseen_combos": [f"{c} {s}" for c, s in sorted(W.UNSEEN_COMBOS)],
            "foil_combos": [f"{c} {s}" for c, s in sorted(W.FOIL_COMBOS)]}


@pytest.fixture(scope="module")
def pair_models(tmp_path_factory):
    """Two tiny decoders on `there is a <size> <colour> <shape> .`: one read the seen pairs only, one the U pairs
    too. -> (tokenizer, decoder that never heard U, decoder that did)."""
    from data import world as W
    from data.talk import noun_phrase
    seen = [(c, s) for c in W.COLORS for s in W.SHAPES if (c, s) not in W.PHASE1_NEVER]
    say = lambda pairs: [f"there is {noun_phrase('a', z, c, s)} ." for c, s in pairs for z in W.SIZES]  # noqa: E731
    path = str(tmp_path_factory.mktemp("pairs") / "tokenizer.model")
    sp = tk.train_tokenizer(say(seen + sorted(W.UNSEEN_COMBOS | W.HELDOUT_COMBOS | W.FOIL_COMBOS)) * 4, path,
                            vocab_size=300)
    models = []
    for lines in (say(seen), say(seen + sorted(W.UNSEEN_COMBOS))):
        torch.manual_seed(0)
        dec = tiny_decoder(sp)
        x, y = padded_targets([ev.encode_sentence(sp, l) for l in lines])
        train_on(dec, lambda: dec(x, y)[1], 150, lr=1e-2)
        models.append(dec)
    return sp, models[0], models[1]


def test_surprisal_gap_sees_which_pairs_a_decoder_heard(pair_models):
    sp, never, heard = pair_models
    g0, g1 = ev.surprisal_gaps(never, sp, world_meta(), "cpu"), ev.surprisal_gaps(heard, sp, world_meta(), "cpu")
    assert g0["gap_u"] > 1.0 and g0["gap_s"] > 1.0   # bits: a shape never said after its colour is a surprise
    assert abs(g1["gap_u"]) < 0.5 and g1["gap_s"] > 1.0   # heard U, not S
    # by hand: -log2 p(shape | "there is a <size> <colour>") from the next-token distribution, U minus seen
    from data import world as W
    from tokenizer import BOS

    def bits(color, shape):
        out = []
        for size in W.SIZES:
            prompt, shape_ids = [BOS] + sp.encode(f"there is a {size} {color}"), sp.encode(shape)
            logp = torch.log_softmax(never.all_logits(torch.tensor([prompt + shape_ids]))[0], -1)
            out.append(-sum(logp[len(prompt) - 1 + k, t].item() for k, t in enumerate(shape_ids)) / math.log(2))
        return out
    seen = [b for c in W.COLORS for s in W.SHAPES if (c, s) not in W.PHASE1_NEVER for b in bits(c, s)]
    unseen = [b for c, s in W.UNSEEN_COMBOS for b in bits(c, s)]
    assert g0["gap_u"] == pytest.approx(np.mean(unseen) - np.mean(seen), abs=1e-4)


def test_productive_vocabulary_counts_the_u_pairs_a_decoder_says(pair_models):
    sp, never, heard = pair_models
    p0 = ev.productive_vocabulary(never, sp, world_meta(), n=200, seed=0)
    p1 = ev.productive_vocabulary(heard, sp, world_meta(), n=200, seed=0)
    assert p0["u_said"] == 0 and p0["u_pairs_named"] == 0 and p0["f_said"] < 0.05
    assert p1["u_pairs_named"] > 0.5 and p1["u_said"] > 0.05
    assert p0["grammatical"] > 0.8 and p1["grammatical"] > 0.8


def test_u_naming_counts_u_objects_named_by_colour_and_shape():
    obj = lambda c, s: {"color": c, "shape": s, "size": "big", "x": 0.5, "y": 0.5}  # noqa: E731
    scenes = [{"objects": [obj("red", "circle"), obj("green", "square")]},   # red circle is a U pair
              {"objects": [obj("red", "circle"), obj("white", "triangle")]},  # two U objects
              {"objects": [obj("green", "square")]}]                          # none
    caps = ["two objects : a big red circle and a big green square .", "there are two red circles .",
            "a red circle ."]
    unseen = world_meta()["unseen_combos"]
    assert ev.u_naming(caps, scenes, unseen) == pytest.approx(2 / 3)  # the white triangle is not named
    assert ev.u_naming(caps[2:], scenes[2:], unseen) is None   # no U object: n/a, not 0


class FixedLM(torch.nn.Module):
    """A stand-in VLM whose next-token distribution is the same everywhere: p(token) = probs[token]."""
    def __init__(self, probs):
        super().__init__()
        self.logits = torch.log(torch.tensor(probs))

    def encode_images(self, images):  # no image tokens: the answer's probability ignores the image
        return torch.zeros(images.size(0), 0, 1)

    def all_logits(self, idx, prefix=None):
        return self.logits.expand(idx.size(0), idx.size(1), -1)


def test_ranking_by_mean_log_prob_picks_a_longer_right_answer_the_sum_misses(sp):
    right, wrong = "the red circle", "no"
    r_ids, w_ids = ev.vqa_answer_ids(sp, right), ev.vqa_answer_ids(sp, wrong)
    V = sp.get_piece_size()
    probs = np.full(V, 1e-3)
    probs[list(set(r_ids))] = 0.3    # every token of the right answer (and EOS) is likely ...
    probs[[t for t in w_ids if t not in r_ids]] = 0.05   # ... the wrong answer's own token less so
    probs /= probs.sum()
    model = FixedLM(probs)
    images = np.zeros((1, 8, 8, 3), np.uint8)
    summed = ev.vqa_rank(model, sp, images, ["what is it ?"], [[wrong, right]], per_token=False)
    mean = ev.vqa_rank(model, sp, images, ["what is it ?"], [[wrong, right]])
    assert len(r_ids) > len(w_ids) and summed == [wrong]   # the premise: the sum favours the short answer
    assert mean == [right]
