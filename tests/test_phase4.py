"""Tests of phase 4 (VQA): the answer-only loss mask, the prompt format, the VQA accuracy metric, the VQAv2
loader on a hand-made fixture, answer ranking, and the script end to end on a tiny world (fast, CPU)."""
import json
import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import phase4_vqa as P4  # noqa: E402
from common import UserError, make_checkpoint, read_jsonl, save_checkpoint  # noqa: E402
from data import vqa as V  # noqa: E402
from data import world as W  # noqa: E402
from eval import normalize_answer, vqa_accuracy, vqa_answer_ids, vqa_generate, vqa_prompt, vqa_rank  # noqa: E402
from model import VLM, DecoderConfig, ViTConfig  # noqa: E402
from tokenizer import BOS, EOS, PAD, decode, train_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny built world (scale 0.02: 200 VQA train images) and a tokenizer trained on its text."""
    root = tmp_path_factory.mktemp("p4")
    wdir = str(root / "world")
    W.build(wdir, seed=0, scale=0.02, size=32, progress=False)
    lines = open(os.path.join(wdir, "text_train.txt")).read().splitlines()
    for split in ("train", "val", "test"):
        for r in read_jsonl(os.path.join(wdir, f"vqa_{split}.jsonl")):
            lines.append(f"question : {r['question']} answer : {r['answer']}")
    sp = train_tokenizer(lines, str(root / "tokenizer.model"), 320)
    return {"root": root, "dir": wdir, "sp": sp, "tok": str(root / "tokenizer.model")}


# ---- prompt format and loss mask

@pytest.mark.slow
def test_prompt_format_is_stable(world):
    sp = world["sp"]
    ids = vqa_prompt(sp, "is there a red circle ?")
    assert ids[0] == BOS and EOS not in ids
    assert decode(sp, ids) == "question : is there a red circle ? answer :"
    ans = vqa_answer_ids(sp, "yes")
    assert ans[-1] == EOS and decode(sp, ans) == "yes"
    # the full training sequence decodes to prompt + answer: no stray space or piece at the seam
    assert decode(sp, ids + ans) == "question : is there a red circle ? answer : yes"


@pytest.mark.slow
def test_batch_targets_only_on_answer_tokens(world):
    sp = world["sp"]
    images = np.arange(3 * 32 * 32 * 3, dtype=np.int64).reshape(3, 32, 32, 3).astype(np.uint8)
    rows = [{"image": 2, "question": "is there a red circle ?", "answer": "yes", "answers": ["yes"], "type": "existence"},
            {"image": 0, "question": "which is bigger , the big blue square or the small star ?",
             "answer": "the big blue square", "answers": ["the big blue square"], "type": "comparison"},
            {"image": 1, "question": "how many objects are there ?", "answer": "three", "answers": ["three"],
             "type": "count"}]
    data = P4.pack(images, rows, sp, max_answer_tokens=32, max_len=100)
    idx = np.array([1, 0, 2, 0])
    imgs, x, y = P4.vqa_batch(data, idx)
    assert torch.equal(imgs, torch.from_numpy(images[[0, 2, 1, 2]]))  # each row its own question's image
    for r, i in enumerate(idx):
        prompt = vqa_prompt(sp, rows[i]["question"])
        answer = vqa_answer_ids(sp, rows[i]["answer"])
        n, L = len(prompt), len(prompt) + len(answer)
        # inputs: the exact prompt generation uses, then the answer (without its EOS), then padding
        assert x[r, :L - 1].tolist() == (prompt + answer)[:-1]
        assert (x[r, L - 1:] == PAD).all()
        # targets: -1 on every prompt position and on padding, the answer ids + EOS where they are predicted
        assert (y[r, :n - 1] == -1).all()
        assert y[r, n - 1:L - 1].tolist() == answer and answer[-1] == EOS
        assert (y[r, L - 1:] == -1).all()
        assert int((y[r] >= 0).sum()) == len(answer)


@pytest.mark.slow
def test_pack_cuts_answers_and_skips_too_long(world, capsys):
    sp = world["sp"]
    rows = [{"image": 0, "question": "what color is the circle ?", "answer": "red " * 20, "answers": ["red"],
             "type": "color"},
            {"image": 0, "question": "what " * 60 + "?", "answer": "red", "answers": ["red"], "type": "color"}]
    data = P4.pack(np.zeros((1, 32, 32, 3), np.uint8), rows, sp, max_answer_tokens=3, max_len=40)
    assert len(data.rows) == 1 and "1 question(s) too long" in capsys.readouterr().err
    assert len(data.answers[0]) == 4 and data.answers[0][-1] == EOS


# ---- the metric

def test_vqa_accuracy_hand_made():
    ten = ["two"] * 2 + ["three"] * 8
    assert vqa_accuracy("two", ten) == pytest.approx(2 / 3)
    assert vqa_accuracy("three", ten) == 1.0
    assert vqa_accuracy("four", ten) == 0.0
    assert vqa_accuracy("2", ["two", "2", "Two.", "one"] + ["one"] * 6) == 1.0  # 3 humans after normalisation
    assert vqa_accuracy("one", ["one"] + ["zero"] * 9) == pytest.approx(1 / 3)
    assert normalize_answer("Two.") == normalize_answer("two") == normalize_answer("2") == "two"
    assert vqa_accuracy(" Yes!", ["yes"]) == 1.0 and vqa_accuracy("no", ["yes"]) == 0.0  # one reference: exact match


# ---- candidates and majority

def test_candidates_and_majority():
    rows = [{"question": "q", "answer": a, "type": t} for a, t in
            [("yes", "existence"), ("no", "existence"), ("yes", "existence"), ("left", "spatial"), ("no", "spatial"),
             ("no", "spatial"), ("the circle", "comparison")]]
    ranked, counts = V.answers_by_type(rows)
    assert ranked["existence"] == ["yes", "no"] and ranked["spatial"] == ["no", "left"]
    assert counts["spatial"] == {"no": 2, "left": 1}
    q = {"question": "which is smaller , the big red circle or the square on the left ?", "answer": "the square on the left",
         "type": "comparison"}
    assert V.world_candidates(q, ranked) == ["the big red circle", "the square on the left"]
    assert V.world_candidates({"question": "where is it ?", "answer": "top", "type": "spatial"}, ranked) == \
        ["no", "left", "top"]
    vq = {"answer": "blue", "type": "other"}
    ranked = {"other": ["white", "blue"] + [f"a{k}" for k in range(10)]}
    c = V.vqav2_candidates(vq, ranked)
    assert len(c) == 8 and "blue" in c and c.count("blue") == 1 and "white" in c and "a6" not in c


# ---- VQAv2 loader

def _fixture(tmp_path, world_dir):
    """Five world images as COCO-named JPEGs (one corrupt, one listed but missing), and VQAv2 JSONs."""
    imgs = np.load(os.path.join(world_dir, "vqa_train_images.npy"))[:4]
    folder = tmp_path / "images"
    folder.mkdir()
    ids = [9, 42, 123456, 7]
    for i, im in zip(ids[:3], imgs):
        Image.fromarray(np.kron(im, np.ones((2, 2, 1), np.uint8))).save(folder / f"COCO_train2014_{i:012d}.jpg",
                                                                         quality=95)
    (folder / f"COCO_train2014_{ids[3]:012d}.jpg").write_bytes(b"not a jpeg at all")
    (folder / "notes.txt").write_text("not an image")
    questions, anns = [], []
    qa = [(9, "what color is the circle ?", "red", "other"), (42, "how many stars are there ?", "2", "number"),
          (42, "is there a square ?", "yes", "yes/no"), (123456, "is it big ?", "no", "yes/no"),
          (7, "what is this ?", "junk", "other"), (5, "where is it ?", "left", "other")]
    for q, (i, text, a, t) in enumerate(qa):
        questions.append({"image_id": i, "question": text, "question_id": 1000 + q})
        anns.append({"question_id": 1000 + q, "image_id": i, "answer_type": t, "question_type": "what",
                     "multiple_choice_answer": a,
                     "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k in range(7)] +
                                [{"answer": "something", "answer_confidence": "maybe", "answer_id": k + 8}
                                 for k in range(3)]})
    qp, ap = tmp_path / "questions.json", tmp_path / "annotations.json"
    qp.write_text(json.dumps({"questions": questions}))
    ap.write_text(json.dumps({"annotations": anns}))
    return str(qp), str(ap), str(folder), imgs, ids


def test_image_id_of():
    assert V.image_id_of("COCO_train2014_000000123456.jpg") == 123456
    assert V.image_id_of("COCO_val2014_000000000042.jpg") == 42
    assert V.image_id_of("17.png") == 17
    assert V.image_id_of("cat.jpg") is None


@pytest.mark.slow
def test_vqav2_loader(tmp_path, world, capsys):
    qp, ap, folder, src, ids = _fixture(tmp_path, world["dir"])
    cache = str(tmp_path / "cache")
    images, rows = V.load_vqav2(qp, ap, folder, 32, cache)
    err = capsys.readouterr().err
    assert "skipped 2 missing or unreadable" in err  # image 7 is corrupt, image 5 has no file
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
    assert [r["question"] for r in rows] == ["what color is the circle ?", "how many stars are there ?",
                                            "is there a square ?", "is it big ?"]
    assert [r["type"] for r in rows] == ["other", "number", "yes/no", "yes/no"]
    assert len(rows[0]["answers"]) == 10 and rows[1]["answer"] == "2"
    # each question points at its own image: the decoded JPEG is closest to its source world image
    for r in rows:
        want = ids.index(r["image_id"])
        dists = [np.abs(images[r["image"]].astype(int) - s.astype(int)).mean() for s in src[:3]]
        assert int(np.argmin(dists)) == want and dists[want] < 8
    # VQA accuracy against the 10 human answers: 7 humans said the target
    assert vqa_accuracy(rows[1]["answer"], rows[1]["answers"]) == 1.0
    assert vqa_accuracy("something", rows[1]["answers"]) == 1.0
    # decoded once: a second load reads the cache even with the images gone
    for f in os.listdir(folder):
        os.remove(os.path.join(folder, f))
    images2, rows2 = V.load_vqav2(qp, ap, folder, 32, cache)
    assert np.array_equal(np.asarray(images2), np.asarray(images)) and rows2 == rows
    # no readable image at all -> one-line error
    with pytest.raises(UserError, match="none of the"):
        V.load_vqav2(qp, ap, folder, 32, str(tmp_path / "cache2"))
    # an image that had no file when the cache was made is read once it is there (the cache is rebuilt)
    Image.fromarray(src[3]).save(os.path.join(folder, f"COCO_train2014_{5:012d}.jpg"))
    images3, rows3 = V.load_vqav2(qp, ap, folder, 32, cache)
    assert len(images3) == 1 and [r["question"] for r in rows3] == ["where is it ?"]


@pytest.mark.slow
def test_vqav2_val_and_test_are_different_images(tmp_path, world):
    """best.pt is picked on val: the reported test questions must come from other held-out images."""
    qp, ap, folder, _, _ = _fixture(tmp_path, world["dir"])
    args = SimpleNamespace(vqa_questions=qp, vqa_annotations=ap, vqa_images=folder, vqa_image_pattern="",
                           vqa_val_frac=0.1, max_answer_tokens=8, out_dir=str(tmp_path / "out"))
    data, _ = P4.load_vqa_data(args, world["sp"], 32, 100, run=None)  # run: only for the world
    imgs = {s: {r["image_id"] for r in data[s].rows} for s in ("train", "val", "test")}
    assert all(imgs[s] for s in imgs)  # 3 usable images: one for each split
    assert not (imgs["train"] & imgs["val"]) and not (imgs["train"] & imgs["test"]) and not (imgs["val"] & imgs["test"])


@pytest.mark.slow
def test_vqav2_pattern_and_bad_files(tmp_path, world):
    qp, ap, folder, _, _ = _fixture(tmp_path, world["dir"])
    images, rows = V.load_vqav2(qp, ap, folder, 16, str(tmp_path / "c"), pattern="COCO_train2014_{image_id:012d}.jpg")
    assert images.shape == (3, 16, 16, 3) and len(rows) == 4
    with pytest.raises(UserError, match="not a VQAv2 questions file"):
        V.load_vqav2(ap, ap, folder, 16, str(tmp_path / "c"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"annotations": [{"question_id": 1}]}))
    with pytest.raises(UserError, match="lacks image_id"):
        V.load_vqav2(qp, str(bad), folder, 16, str(tmp_path / "c"))


# ---- ranking on a constructed case

@pytest.mark.slow
def test_training_then_ranking_picks_the_right_answer(world):
    """Red images -> 'red', blue images -> 'blue': a tiny VLM trained with the phase 4 batches must then rank
    (and greedily generate) the right colour for new images of each kind."""
    sp = world["sp"]
    rng = np.random.default_rng(0)
    colors = {"red": (215, 35, 35), "blue": (40, 80, 230)}

    def draw(names):
        return np.stack([np.clip(np.array(colors[c]) + rng.integers(-20, 21, (8, 8, 3)), 0, 255)
                         for c in names]).astype(np.uint8)

    names = list(colors) * 4
    images = draw(names)
    rows = [{"image": k, "question": "what color is it ?", "answer": c, "answers": [c], "type": "color"}
            for k, c in enumerate(names)]
    data = P4.pack(images, rows, sp, 8, 60)
    torch.manual_seed(0)
    model = VLM(DecoderConfig(vocab_size=sp.get_piece_size(), n_layer=1, n_head=2, d_model=32, max_seq_len=64),
                ViTConfig(image_size=8, patch_size=4, n_layer=1, n_head=2, d_model=32, merge=2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(60):
        imgs, x, y = P4.vqa_batch(data, np.arange(len(rows)))
        _, loss = model(imgs, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.1
    want = ["red", "blue", "blue", "red"]
    test = draw(want)  # new noise
    q = ["what color is it ?"] * 4
    assert vqa_rank(model, sp, test, q, [["blue", "red"], ["red", "blue"]] * 2) == want
    assert vqa_generate(model, sp, test, q) == want


# ---- the script end to end

def _phase2_checkpoint(world, out_dir):
    """A tiny untrained VLM for the world's 32px images, saved as a phase 2 best.pt."""
    torch.manual_seed(0)
    model = VLM(DecoderConfig(vocab_size=world["sp"].get_piece_size(), n_layer=1, n_head=2, d_model=32, max_seq_len=64),
                ViTConfig(image_size=32, patch_size=8, n_layer=1, n_head=2, d_model=32, merge=2))
    args = P4.parse_args(["--device", "cpu"])
    save_checkpoint(make_checkpoint(model, "phase2", world["tok"], 0, 1.0, 1.0, args),
                    os.path.join(out_dir, "phase2", "best.pt"))


@pytest.mark.slow
def test_script_end_to_end_and_resume(world, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(W, "ensure_built", lambda d, **kw: d)  # the tiny world is not the default build
    out = str(tmp_path / "out")
    base = ["--device", "cpu", "--out_dir", out, "--world_dir", world["dir"], "--batch_size", "8", "--eval_interval", "2",
            "--eval_batches", "1", "--n_test", "40", "--quiet"]
    with pytest.raises(UserError, match=r"run `python phase3_synth.py` first"):
        P4.main(base)
    with pytest.raises(UserError, match=r"run `python phase2_caption.py` first"):
        P4.main(base + ["--init", "phase2"])
    _phase2_checkpoint(world, out)
    with pytest.raises(UserError, match=r"replays its text.*--text_frac 0"):  # no phase 1 run in this folder
        P4.main(base + ["--init", "phase2"])
    base += ["--text_frac", "0"]  # text replay is covered in test_phase3 on a real phase 1 -> 3 pipeline
    P4.main(base + ["--init", "phase2", "--max_steps", "3"])
    text = capsys.readouterr().out
    assert "| majority |" in text and "all " in text
    res = json.load(open(os.path.join(out, "phase4", "results.json")))
    by = res["by_type"]
    assert res["init"] == "phase2" and res["n_test"] == 40 and by["all"]["n"] == 40
    assert sum(s["n"] for t, s in by.items() if t != "all") == 40
    for s in by.values():
        assert all(0.0 <= s[k] <= 1.0 for k in ("majority", "greedy", "ranked"))
    # the majority baseline is recomputed here from the training answers
    train = read_jsonl(os.path.join(world["dir"], "vqa_train.jsonl"))
    test = read_jsonl(os.path.join(world["dir"], "vqa_test.jsonl"))[:40]
    ranked, _ = V.answers_by_type(train)
    for t in ("count", "existence"):
        mine = [r["answer"] == ranked[t][0] for r in test if r["type"] == t]
        if mine:
            assert by[t]["majority"] == pytest.approx(np.mean(mine))
    last = torch.load(os.path.join(out, "phase4", "last.pt"), weights_only=True)
    best = torch.load(os.path.join(out, "phase4", "best.pt"), weights_only=True)
    assert last["phase"] == best["phase"] == "phase4" and last["step"] == 3 and "optimizer" in last
    assert "optimizer" not in best and best["vit_config"]["image_size"] == 32
    # resume continues from step 3 without needing the init checkpoint
    os.remove(os.path.join(out, "phase2", "best.pt"))
    P4.main(base + ["--init", "phase2", "--max_steps", "5", "--resume", "--n_test", "0"])
    assert "resumed from" in capsys.readouterr().out
    assert torch.load(os.path.join(out, "phase4", "last.pt"), weights_only=True)["step"] == 5


@pytest.mark.slow
def test_script_on_vqav2_fixture(world, tmp_path, capsys):
    qp, ap, folder, _, _ = _fixture(tmp_path, world["dir"])
    out = str(tmp_path / "out")
    _phase2_checkpoint(world, out)
    P4.main(["--device", "cpu", "--out_dir", out, "--init", "phase2", "--vqa_questions", qp, "--vqa_annotations", ap,
             "--vqa_images", folder, "--vqa_val_frac", "0.34", "--max_steps", "2", "--batch_size", "4", "--text_frac", "0", "--quiet"])
    res = json.load(open(os.path.join(out, "phase4", "results.json")))
    assert res["by_type"]["all"]["n"] >= 1
    assert set(res["by_type"]) <= {"yes/no", "number", "other", "all"}
    with pytest.raises(UserError, match="needs all three"):
        P4.parse_args(["--vqa_questions", qp])


def test_text_replay_windows_fit_the_decoder():
    from data import text
    run = SimpleNamespace(rank=0, world_size=1, device_type="cpu", device="cpu")
    stream = np.arange(1000, dtype=np.uint16)
    g = torch.Generator().manual_seed(0)
    for max_len, want in ((256, text.REPLAY_LEN), (32, 32)):
        x, y = text.replay_batch(stream, 4, DecoderConfig(max_seq_len=max_len), g, run)
        assert x.shape == y.shape == (4, want)
        assert torch.equal(y[:, :-1], x[:, 1:])  # targets are the inputs shifted by one
