"""Issue 9: the phase scripts, driven as a user drives them (subprocesses on CPU), fail with one clear line
and no traceback on bad input, never damage an earlier checkpoint, stop on a non-finite loss, save a
resumable checkpoint on SIGTERM, and reproduce bit for bit.

Every run is tiny (see conftest.py); the shared phase 1 / phase 2 runs are copied before a test breaks them.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import threading

import numpy as np
import pytest
import torch

from conftest import (P1_STEPS, P2_STEPS, TIMEOUT, TINY_P1, TINY_P2, assert_ok, assert_user_error, hashes,
                      load, run_many, run_script, script_cmd, script_env, sha, tensors)

TINY_P3 = ["--batch_size", "8", "--seq_len", "32", "--max_steps", "2", "--n_images", "16", "--gen_batch", "16",
           "--eval_iters", "1", "--max_caption_tokens", "20"]


def out_of(d, *parts):
    return os.path.join(d, "out", *parts)


def assert_all_finite(path):
    ck = load(path)
    for k, t in tensors(ck["model"]).items():
        assert torch.isfinite(t).all(), f"{path}: {k} holds NaN/inf"
    return ck


# --------------------------------------------------------------------------------------------------------------------
# Missing, wrong-phase, damaged and mismatched checkpoints

@pytest.mark.slow
def test_missing_previous_checkpoint_names_the_command_to_run(tmp_path, world, phase1_dir, copy_run):
    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    d = copy_run(phase1_dir)  # phase 1 done, nothing else
    os.remove(out_of(d, "phase1", "last.pt"))
    before = hashes(out_of(d))
    r2, r3, r1_resume, r2_resume = run_many([
        ("phase2_caption.py", ["--world_dir", world, "--out_dir", "out"], empty),
        ("phase3_synth.py", ["--world_dir", world, "--out_dir", "out", *TINY_P3], d),
        ("phase1_text.py", ["--world_dir", world, "--out_dir", "out", "--resume", *TINY_P1], d),
        ("phase2_caption.py", ["--world_dir", world, "--out_dir", "out", "--resume", *TINY_P2], d),
    ], workers=1)  # one run per out dir
    assert_user_error(r2, "phase1/best.pt", "not found", "python phase1_text.py")
    assert_user_error(r3, "phase2/best.pt", "not found", "python phase2_caption.py")
    assert_user_error(r1_resume, "phase1/last.pt", "not found", "--restart")  # best.pt is there: never "run it first"
    assert_user_error(r2_resume, "phase2/last.pt", "python phase2_caption.py")
    assert hashes(out_of(d)) == before
    assert not os.path.exists(out_of(empty, "phase2", "best.pt"))


@pytest.mark.slow
def test_wrong_phase_or_damaged_checkpoint(world, pipeline, copy_run):
    a = copy_run(pipeline)  # "phase2/best.pt" is really a phase 1 checkpoint
    shutil.copy(out_of(a, "phase1", "best.pt"), out_of(a, "phase2", "best.pt"))
    b = copy_run(pipeline)  # "phase1/best.pt" is really a phase 2 checkpoint
    shutil.copy(out_of(b, "phase2", "best.pt"), out_of(b, "phase1", "best.pt"))
    c = copy_run(pipeline)  # phase1/best.pt cut off half way, as by a crash of a non-atomic writer
    for x in (b, c):  # phase 2 runs there: no finished phase 2 run in the way
        shutil.rmtree(out_of(x, "phase2"))
    p = out_of(c, "phase1", "best.pt")
    with open(p, "rb") as f:
        data = f.read()
    with open(p, "wb") as f:
        f.write(data[:len(data) // 2])
    before = {d: hashes(out_of(d)) for d in (a, b, c)}
    r3, r2, r2_cut = run_many([
        ("phase3_synth.py", ["--world_dir", world, "--out_dir", "out", *TINY_P3], a),
        ("phase2_caption.py", ["--world_dir", world, "--out_dir", "out", *TINY_P2], b),
        ("phase2_caption.py", ["--world_dir", world, "--out_dir", "out", *TINY_P2], c),
    ])
    assert_user_error(r3, "phase2/best.pt is a phase1 checkpoint")
    assert_user_error(r2, "phase1/best.pt is a phase2 checkpoint")
    assert_user_error(r2_cut, "phase1/best.pt", "damaged")
    for d in (a, b, c):
        assert hashes(out_of(d)) == before[d]


@pytest.mark.slow
def test_vocab_mismatch_between_checkpoint_and_tokenizer(world, phase1_dir, copy_run):
    from data.text import read_lines
    from tokenizer import train_tokenizer
    d = copy_run(phase1_dir)
    # the tokenizer in the out dir was retrained with another vocabulary after phase 1 ran
    train_tokenizer(read_lines(os.path.join(world, "text_train.txt")), out_of(d, "tokenizer.model"), 300)
    before = hashes(out_of(d))
    r2, r1 = run_many([
        ("phase2_caption.py", ["--world_dir", world, "--out_dir", "out", *TINY_P2], d),
        ("phase1_text.py", ["--world_dir", world, "--out_dir", "out", "--resume", *TINY_P1], d),
    ], workers=1)  # one run per out dir
    assert_user_error(r2, "vocab", "512", "300")
    assert_user_error(r1, "vocab", "512", "300")
    assert hashes(out_of(d)) == before


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda(tmp_path, world):
    r = run_script("phase1_text.py", "--world_dir", world, "--out_dir", str(tmp_path / "out"), *TINY_P1,
                   "--device", "cuda")
    assert_user_error(r, "--device cuda", "CUDA is not available")
    assert not os.path.exists(tmp_path / "out" / "phase1")


@pytest.mark.parametrize("asked, expected", [("cuda", "cuda:0"), ("cuda:1", "cuda:1"), ("auto", "cuda:0")])
def test_device_cuda_picks_an_indexed_device(monkeypatch, asked, expected):
    # torch.cuda.set_device("cuda") raises "Expected a torch.device with a specified index": every
    # phase crashed on a GPU with plain --device cuda until a GPU run caught it. Emulate that check here.
    import argparse
    import common
    seen = []

    def set_device(dev):
        if torch.device(dev).index is None:
            raise ValueError(f"Expected a torch.device with a specified index or an integer, but got:{dev}")
        seen.append(dev)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(common, "seed_everything", lambda seed: None)  # would seed the (absent) GPU
    run = common.setup(argparse.Namespace(device=asked, seed=0))
    assert seen == [expected] and run.device == expected and run.device_type == "cuda"


# --------------------------------------------------------------------------------------------------------------------
# Data folders and files

@pytest.mark.slow
def test_empty_or_missing_data_folders(tmp_path, phase1_dir, copy_run):
    empty = tmp_path / "empty"
    empty.mkdir()
    d = copy_run(phase1_dir)
    before = hashes(out_of(d))
    o = str(tmp_path / "o")
    r = run_many([
        ("phase1_text.py", ["--data_dir", str(tmp_path / "missing"), "--out_dir", o + "1"]),
        ("phase1_text.py", ["--data_dir", str(empty), "--out_dir", o + "2"]),
        ("phase2_caption.py", ["--coco_dir", str(empty), "--out_dir", "out", *TINY_P2], d),
    ])
    assert_user_error(r[0], "missing", "does not exist")
    assert_user_error(r[1], "no *.train files")
    assert_user_error(r[2], "no captions_*.json")
    assert hashes(out_of(d)) == before


def test_unusable_data_folders_in_process(tmp_path):
    """The same loaders, for the remaining cases, without a process each."""
    from common import UserError
    from data.images import find_coco_files
    from data.text import read_babylm_folder
    short = tmp_path / "short"  # BabyLM format, but nothing long enough to be an utterance
    short.mkdir()
    (short / "childes.train").write_text("*MOT:\tah .\n*CHI:\tok .\n")
    with pytest.raises(UserError, match="no usable text"):
        read_babylm_folder(str(short))
    with pytest.raises(UserError, match="does not exist"):
        find_coco_files(str(tmp_path / "missing"))
    (tmp_path / "coco" / "annotations").mkdir(parents=True)
    (tmp_path / "coco" / "annotations" / "captions_val2017.json").write_text("{}")
    (tmp_path / "coco" / "val2017").mkdir()
    (tmp_path / "coco" / "val2017" / "notes.txt").write_text("no images here")
    with pytest.raises(UserError, match="no image folder"):
        find_coco_files(str(tmp_path / "coco"))


def test_babylm_text_splitting(tmp_path):
    """Every CHILDES speaker tag is cut (digits and one-letter tags too), a long unpunctuated transcript is
    cut into pieces instead of losing its tail, and dev utterances that repeat training text are dropped."""
    from data.text import read_babylm_folder, split_utterances
    assert split_utterances("*PAR1:\twhere is the ball ?\n*A:\tthere it is .") == ["where is the ball ?", "there it is ."]
    words = [f"w{i}" for i in range(130)]
    assert [len(u.split()) for u in split_utterances(" ".join(words))] == [64, 64]  # the last 2 words: too short
    folder = tmp_path / "babylm"
    folder.mkdir()
    (folder / "childes.train").write_text("*MOT:\tshall we read a book ?\n*CHI:\tthe big red book .\n")
    (folder / "childes_dev.train").write_text("*CHI:\tthe big red book .\n*MOT:\twhat a nice story .\n")
    train, val = read_babylm_folder(str(folder))
    assert train == ["shall we read a book ?", "the big red book ."] and val == ["what a nice story ."]


def make_coco(root, world, n, bad=()):
    """A tiny COCO-captions folder from world images saved as non-square JPEGs. bad: {index: "garbage" |
    "truncated"} files replaced by something that is not a readable image."""
    from PIL import Image
    images = np.load(os.path.join(world, "caption_train_images.npy"))
    with open(os.path.join(world, "caption_train.jsonl")) as f:
        rows = [json.loads(l) for l in f]
    os.makedirs(os.path.join(root, "train2017"))
    os.makedirs(os.path.join(root, "annotations"))
    ims, anns = [], []
    for i in range(n):
        name = f"{i + 1:012d}.jpg"
        path = os.path.join(root, "train2017", name)
        Image.fromarray(images[i]).resize((48, 40)).save(path, quality=95)
        if bad and bad.get(i) == "garbage":
            with open(path, "wb") as f:
                f.write(b"this is not a jpeg at all\n" * 20)
        elif bad and bad.get(i) == "truncated":
            with open(path, "rb") as f:
                data = f.read()
            with open(path, "wb") as f:
                f.write(data[:len(data) // 2])
        ims.append({"id": i + 1, "file_name": name, "width": 48, "height": 40})
        for c in rows[i]["captions"][:2]:
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "caption": c})
    ann_path = os.path.join(root, "annotations", "captions_train2017.json")
    with open(ann_path, "w") as f:
        json.dump({"images": ims, "annotations": anns}, f, indent=1)
    return ann_path


@pytest.mark.slow
def test_coco_folder_with_corrupt_images(tmp_path, world, phase1_dir, copy_run):
    some_bad = str(tmp_path / "coco_some_bad")
    make_coco(some_bad, world, 6, bad={1: "garbage", 4: "truncated"})
    with open(os.path.join(some_bad, "train2017", "notes.txt"), "w") as f:
        f.write("not an image, and not listed in the captions file\n")
    all_bad = str(tmp_path / "coco_all_bad")
    make_coco(all_bad, world, 3, bad={0: "garbage", 1: "truncated", 2: "garbage"})
    d, e = copy_run(phase1_dir), copy_run(phase1_dir)
    before = hashes(out_of(d, "phase1"))
    ok, bad = run_many([
        ("phase2_caption.py", ["--coco_dir", some_bad, "--out_dir", "out", *TINY_P2, "--max_steps", "3"], d),
        ("phase2_caption.py", ["--coco_dir", all_bad, "--out_dir", "out", *TINY_P2], e),
    ])
    assert_ok(ok)
    assert "warning: skipped 2 unreadable image(s)" in ok.stderr, ok.stderr
    assert "Traceback" not in ok.stderr
    assert "3 train images" in ok.stdout  # 4 readable: 1 for validation, 3 for training
    with open(out_of(d, "phase2", "results.json")) as f:
        assert "bleu4" in json.load(f)
    assert hashes(out_of(d, "phase1")) == before
    assert_user_error(bad, "none of the 3 images")


@pytest.mark.slow
def test_malformed_json_and_jsonl_name_the_line(tmp_path, world, pipeline, copy_run):
    coco = str(tmp_path / "coco")
    ann = make_coco(coco, world, 4)
    with open(ann, "w") as f:
        f.write('{\n "images": [{"id": 1, "file_name": "000000000001.jpg"}],\n "annotations": [,]\n}\n')
    synth = str(tmp_path / "bad.jsonl")
    with open(synth, "w") as f:
        f.write('{"image": 0, "caption": "a red circle .", "logprob": -0.5}\n'
                '{"image": 1, "caption": "a big blue square .", "logprob": -0.7}\n'
                '{"image": 2, "caption": "a small gre\n'
                '{"image": 3, "caption": "two objects .", "logprob": -0.9}\n')
    d, e = copy_run(pipeline), copy_run(pipeline)
    shutil.rmtree(out_of(e, "phase2"))  # phase 2 runs there: no finished phase 2 run in the way
    before = {x: hashes(out_of(x)) for x in (d, e)}
    r2, r3 = run_many([
        ("phase2_caption.py", ["--coco_dir", coco, "--out_dir", "out", *TINY_P2], e),
        ("phase3_synth.py", ["--world_dir", world, "--out_dir", "out", "--synthetic", synth, *TINY_P3], d),
    ])
    assert_user_error(r2, "captions_train2017.json", "line 3", "malformed JSON")
    assert_user_error(r3, "bad.jsonl", "line 3", "malformed JSON")
    assert {x: hashes(out_of(x)) for x in (d, e)} == before


# --------------------------------------------------------------------------------------------------------------------
# Out-of-range configuration

@pytest.mark.slow
def test_out_of_range_values(tmp_path):
    o = str(tmp_path / "out")
    r = run_many([
        ("phase1_text.py", ["--out_dir", o, "--lr", "-1"]),
        ("phase2_caption.py", ["--out_dir", o, "--batch_size", "0"]),
        ("phase3_synth.py", ["--out_dir", o, "--synthetic_frac", "1.5"]),
        ("phase1_text.py", ["--out_dir", o, "--d_model", "30", "--n_head", "4"]),
    ])
    assert_user_error(r[0], "--lr=-1.0", "out of range")
    assert_user_error(r[1], "--batch_size=0", "out of range")
    assert_user_error(r[2], "--synthetic_frac=1.5", "out of range")
    assert_user_error(r[3], "--d_model=30", "--n_head=4")
    assert not os.path.exists(o)  # rejected before anything was written


def test_out_of_range_values_in_process():
    """The same checks for values a shell makes awkward (nan, inf) and the rest of each phase's knobs."""
    import phase1_text
    import phase2_caption
    import phase3_synth
    import phase4_vqa
    from common import UserError
    cases = [(phase1_text, ["--lr", "nan"]), (phase1_text, ["--lr", "inf"]), (phase1_text, ["--vocab_size", "100"]),
             (phase1_text, ["--min_lr_frac", "1.5"]), (phase1_text, ["--grad_accum", "0"]),
             (phase2_caption, ["--text_frac", "0.95"]), (phase2_caption, ["--vit_d", "30"]),
             (phase2_caption, ["--lr_decoder", "0"]), (phase3_synth, ["--temperature", "-1"]),
             (phase3_synth, ["--init", "phase1"]), (phase3_synth, ["--max_steps", "0"]),
             # replay is every round(1/frac)-th step: above 0.5 that rounds to every step, no captions at all
             (phase2_caption, ["--text_frac", "0.7"]), (phase4_vqa, ["--text_frac", "0.7"]),
             (phase2_caption, ["--weight_decay", "-1"]), (phase2_caption, ["--grad_clip", "-5"]),
             (phase3_synth, ["--weight_decay", "-1"]), (phase3_synth, ["--grad_clip", "-5"]),
             (phase2_caption, ["--patch_size", "1"]), (phase2_caption, ["--patch_size", "3"]),
             (phase3_synth, ["--synthetic_frac", "0.01"]),  # 0.01 x 32 rows rounds to no synthetic row
             (phase3_synth, ["--synthetic_frac", "0.99"]),  # ... and 0.99 x 32 to no real row
             (phase3_synth, ["--min_logprob", "nan"]), (phase3_synth, ["--captions_per_image", "2"]),
             (phase3_synth, ["--out_name", "phase2"]), (phase3_synth, ["--out_name", "../phase3"])]
    for mod, argv in cases:
        with pytest.raises(UserError, match=re.escape(argv[0])):
            mod.parse_args(argv)
    phase1_text.parse_args(["--lr", "1e-3", "--d_model", "32", "--n_head", "2"])  # in range: accepted


@pytest.mark.slow
def test_an_out_dir_keeps_its_tokenizer(world, phase1_dir, copy_run):
    """Another corpus or vocabulary in an out_dir that already has a tokenizer is refused before anything is
    trained or written: the checkpoints there were trained with the tokenizer that is there."""
    import phase1_text
    from types import SimpleNamespace
    from common import UserError
    from data.text import prepare_text
    d = copy_run(phase1_dir)
    other = os.path.join(d, "other_world")
    shutil.copytree(world, other)  # another world (another seed): another corpus
    with open(os.path.join(other, "meta.json")) as f:
        meta = json.load(f)
    with open(os.path.join(other, "meta.json"), "w") as f:
        json.dump(dict(meta, seed=1), f)
    before = hashes(out_of(d))
    args = phase1_text.parse_args(["--world_dir", other, "--out_dir", out_of(d), *TINY_P1])
    run = SimpleNamespace(master=True, ddp=False)  # what prepare_text reads (setup() would reseed and set devices)
    with pytest.raises(UserError, match="holds a tokenizer made from --world_dir .* not --world_dir .*other_world"):
        prepare_text(args.out_dir, args.data_dir, args.world_dir, args.vocab_size, args.seq_len, run)
    args = phase1_text.parse_args(["--world_dir", world, "--out_dir", out_of(d), "--vocab_size", "600", *TINY_P1])
    with pytest.raises(UserError, match="already holds a 512-piece tokenizer"):
        prepare_text(args.out_dir, args.data_dir, args.world_dir, args.vocab_size, args.seq_len, run)
    assert hashes(out_of(d)) == before


@pytest.mark.slow
def test_resume_mismatches(world, pipeline, copy_run):
    """Resuming past --max_steps ends at once instead of never; another --seq_len than the run had, other
    freeze flags, another batch size or another optimizer than the run had, is one clear line; phase 2 is
    never written."""
    d = copy_run(pipeline)
    p2 = hashes(out_of(d, "phase2"))
    p1 = sha(out_of(d, "phase1", "best.pt"))
    past, seq, frozen, batch, adamw = run_many([
        ("phase1_text.py", ["--world_dir", world, "--out_dir", "out", "--resume", *TINY_P1, "--max_steps", "10"], d),
        ("phase1_text.py", ["--world_dir", world, "--out_dir", "out", "--resume", *TINY_P1, "--seq_len=256"], d),
        ("phase2_caption.py", ["--world_dir", world, "--out_dir", "out", "--resume", *TINY_P2, "--freeze_decoder"], d),
        # val loss is the mean over eval_batches x batch_size images: another size would make best.pt's
        # comparison with the saved best val loss meaningless
        ("phase2_caption.py", ["--world_dir", world, "--out_dir", "out", "--resume", *TINY_P2, "--batch_size", "4"], d),
        # Muon's momentum cannot continue as AdamW moments (nor the other way round)
        ("phase2_caption.py", ["--world_dir", world, "--out_dir", "out", "--resume", *TINY_P2, "--muon_scale", "0"], d),
    ], workers=1)  # one run per out dir
    assert_ok(past)
    assert "resumed from" in past.stdout and f"step {P1_STEPS}" in past.stdout
    assert_user_error(seq, "phase1/last.pt", "with --seq_len 64", "resume the same way")
    assert_user_error(frozen, "phase2/last.pt", "without --freeze_decoder", "resume the same way")
    assert_user_error(batch, "phase2/last.pt", "with --batch_size 8", "resume the same way")
    assert_user_error(adamw, "phase2/last.pt", "with --muon_scale 4.0", "resume with Muon on")
    assert hashes(out_of(d, "phase2")) == p2
    assert sha(out_of(d, "phase1", "best.pt")) == p1


@pytest.mark.slow
def test_phase3_bad_inputs(tmp_path, world, pipeline, copy_run):
    d = copy_run(pipeline)
    small = str(tmp_path / "small.npy")
    np.save(small, np.zeros((4, 16, 16, 3), dtype=np.uint8))
    before = hashes(out_of(d))
    size, long, resume = run_many([
        ("phase3_synth.py", ["--world_dir", world, "--out_dir", "out", *TINY_P3, "--images", small], d),
        ("phase3_synth.py", ["--world_dir", world, "--out_dir", "out", *TINY_P3, "--max_caption_tokens", "500"], d),
        # nothing to resume: refused before the captioning (which used to write synthetic.jsonl first)
        ("phase3_synth.py", ["--world_dir", world, "--out_dir", "out", *TINY_P3, "--resume"], d),
    ], workers=1)  # one run per out dir
    assert_user_error(size, "16x16", "32x32", "resize")
    assert_user_error(long, "500 caption tokens", "max_seq_len", "--max_caption_tokens")
    assert_user_error(resume, "phase3/last.pt")
    assert hashes(out_of(d)) == before


def test_generated_text_stops_at_the_context_limit():
    """A generation limit longer than the context has room for (e.g. phase 4's --max_answer_tokens 200 on a
    128-token model) ends at the context's end instead of failing after all the training."""
    from eval import generate_text
    from model import VLM, DecoderConfig, ViTConfig
    from tokenizer import BOS
    torch.manual_seed(0)
    model = VLM(DecoderConfig(vocab_size=300, n_layer=1, n_head=2, d_model=16, max_seq_len=12),
                ViTConfig(image_size=8, patch_size=4, n_layer=1, n_head=2, d_model=16, merge=1))

    class Pieces:  # decode() needs only this from a tokenizer
        def decode(self, ids):
            return " ".join(map(str, ids))
    images = np.zeros((3, 8, 8, 3), dtype=np.uint8)
    out = generate_text(model, Pieces(), images, [[BOS], [BOS, 5], [BOS, 5, 6]], max_new_tokens=100)
    assert len(out) == 3 and all(len(o.split()) <= 12 - 4 - 3 for o in out)


def test_synthetic_rows_without_logprob():
    from common import UserError
    from phase3_synth import filter_synthetic
    rows = [{"caption": "a red square ."}, {"caption": "a red square ."}, {"caption": " "}]
    assert filter_synthetic(rows, float("-inf"), dedup=True) == rows[:1]  # no filter: logprob not needed
    with pytest.raises(UserError, match="--min_logprob needs"):
        filter_synthetic(rows, -1.0, dedup=False)


@pytest.mark.slow
def test_coco_annotation_without_caption(tmp_path, world):
    from common import UserError
    from data.images import load_coco
    ann_path = make_coco(str(tmp_path / "coco"), world, 2)
    with open(ann_path) as f:
        ann = json.load(f)
    del ann["annotations"][1]["caption"]
    with open(ann_path, "w") as f:
        json.dump(ann, f)
    with pytest.raises(UserError, match="annotation 1 needs"):
        load_coco(str(tmp_path / "coco"), 32, str(tmp_path / "cache"))


@pytest.mark.slow
def test_checkpoint_from_another_version_of_the_code(tmp_path, phase1_dir):
    from common import UserError, load_checkpoint
    ck = load(out_of(phase1_dir, "phase1", "best.pt"))
    extra_layer = dict(ck, model=dict(ck["model"], **{"_orig_mod.extra": torch.zeros(1)}))
    extra_field = dict(ck, decoder_config=dict(ck["decoder_config"], n_experts=4))
    missing = dict(ck, model={k: v for k, v in ck["model"].items() if k != "norm.weight"})
    for name, bad, needle in [("layer", extra_layer, "_orig_mod.extra"), ("field", extra_field, "n_experts"),
                              ("missing", missing, "norm.weight")]:
        path = str(tmp_path / f"{name}.pt")
        torch.save(bad, path)
        with pytest.raises(UserError, match=f"another version of this code.*{needle}"):
            load_checkpoint(path)
    load_checkpoint(out_of(phase1_dir, "phase1", "best.pt"))  # the real one passes


@pytest.mark.slow
def test_a_checkpoint_uses_its_own_out_dirs_tokenizer(tmp_path, monkeypatch, phase1_dir, copy_run):
    """The stored tokenizer path is relative to where training ran: a moved out dir must not pick up
    whatever out/tokenizer.model the current directory happens to have."""
    import tokenizer
    from common import checkpoint_tokenizer
    d = copy_run(phase1_dir)
    moved = str(tmp_path / "backup")
    shutil.move(out_of(d), moved)
    decoy = tmp_path / "elsewhere" / "out"
    decoy.mkdir(parents=True)
    shutil.copy(os.path.join(moved, "tokenizer.model"), decoy / "tokenizer.model")
    monkeypatch.chdir(decoy.parent)  # the checkpoint's stored path, out/tokenizer.model, exists here too
    loaded = []
    real = tokenizer.load_tokenizer
    monkeypatch.setattr(tokenizer, "load_tokenizer", lambda p: loaded.append(p) or real(p))
    path = os.path.join(moved, "phase1", "best.pt")
    checkpoint_tokenizer(load(path), path)
    assert loaded == [os.path.join(moved, "tokenizer.model")]


@pytest.mark.slow
def test_coco_with_both_official_caption_files_and_only_val_images(tmp_path, world):
    from data.images import find_coco_files
    root = str(tmp_path / "coco")
    ann = make_coco(root, world, 2)
    os.rename(os.path.join(root, "train2017"), os.path.join(root, "val2017"))  # only val2017 images downloaded
    shutil.copy(ann, ann.replace("train2017", "val2017"))
    assert find_coco_files(root) == (ann.replace("train2017", "val2017"), os.path.join(root, "val2017"))


@pytest.mark.slow
def test_coco_images_added_after_a_run_are_read_next_time(tmp_path, world):
    from data.images import load_coco
    from PIL import Image
    root, cache = str(tmp_path / "coco"), str(tmp_path / "cache")
    make_coco(root, world, 3)
    first = os.path.join(root, "train2017", f"{1:012d}.jpg")
    os.remove(first)  # not downloaded yet
    images, rows = load_coco(root, 32, cache)
    assert len(images) == len(rows) == 2
    assert load_coco(root, 32, cache)[0].shape == images.shape  # cached while it is still missing
    Image.fromarray(np.zeros((40, 48, 3), dtype=np.uint8)).save(os.path.join(root, "train2017", f"{1:012d}.jpg"))
    images, rows = load_coco(root, 32, cache)
    assert len(images) == len(rows) == 3
    assert load_coco(root, 32, cache)[0].shape == images.shape  # and now it is cached


@pytest.mark.slow
def test_eval_skips_world_vision_benchmarks_for_another_image_size(world):
    """A VLM trained on COCO at 64px cannot be shown the world's 32px images: those benchmarks are n/a."""
    from types import SimpleNamespace
    import eval as E
    from model import VLM, DecoderConfig, ViTConfig
    model = VLM(DecoderConfig(vocab_size=300, n_layer=1, n_head=2, d_model=16, max_seq_len=64),
                ViTConfig(image_size=64, patch_size=8, n_layer=1, n_head=2, d_model=16, merge=2)).eval()
    data = {"cap_images": np.zeros((2, 32, 32, 3), dtype=np.uint8), "cap_scenes": [{}, {}],
            "wino": [{}], "wino_images": np.zeros((2, 32, 32, 3), dtype=np.uint8),
            "vqa": [{"question": "what ?", "answer": "red"}], "vqa_images": np.zeros((1, 32, 32, 3), dtype=np.uint8)}
    lines = []
    m, _ = E.evaluate_checkpoint(model, None, data, SimpleNamespace(batch_size=8, coco_dir=""), "cpu", {}, log=lines.append)
    assert m["caption_exact"] is None and m["wino_group"] is None and m["vqa_ranked"] is None and m["vqa_gen"] is None
    assert any("skipped" in l and "64px" in l and "32px" in l for l in lines)


# --------------------------------------------------------------------------------------------------------------------
# Non-finite loss

@pytest.mark.slow
def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(world, phase1_dir, copy_run):
    d1, d2 = copy_run(phase1_dir), copy_run(phase1_dir)
    p1_before = hashes(out_of(d2, "phase1"))
    # a huge learning rate, no warmup: the first update blows the weights up, the next loss is NaN/inf
    r1, r2 = run_many([
        ("phase1_text.py", ["--world_dir", world, "--out_dir", "out", *TINY_P1, "--lr", "1e30", "--warmup", "0",
                            "--eval_interval", "1", "--restart"], d1),
        ("phase2_caption.py", ["--world_dir", world, "--out_dir", "out", *TINY_P2, "--lr_new", "1e30",
                               "--lr_decoder", "1e30", "--warmup", "0", "--eval_interval", "1"], d2),
    ])
    for r, d, phase in ((r1, d1, "phase1"), (r2, d2, "phase2")):
        assert_user_error(r, "became", "last good checkpoint", os.path.join("out", phase))
        failed_at = int(re.search(r"became (?:nan|inf|-inf) at step (\d+)", r.stderr).group(1))
        best = assert_all_finite(out_of(d, phase, "best.pt"))
        last = assert_all_finite(out_of(d, phase, "last.pt"))
        assert last["step"] <= failed_at and best["step"] <= last["step"]
    assert hashes(out_of(d2, "phase1")) == p1_before  # phase 2 never touches phase 1's checkpoints


# --------------------------------------------------------------------------------------------------------------------
# Atomic checkpoints (in-process: a failure between writing and renaming)

def test_save_checkpoint_is_atomic(tmp_path, monkeypatch):
    import common
    p = str(tmp_path / "ck.pt")
    common.save_checkpoint({"w": torch.arange(4.0)}, p)
    good = sha(p)
    with pytest.raises(Exception):  # cannot be pickled: fails mid-write
        common.save_checkpoint({"w": torch.zeros(4), "f": lambda: 0}, p)
    assert sha(p) == good and os.listdir(tmp_path) == ["ck.pt"]

    def killed(*a):
        raise KeyboardInterrupt  # e.g. a second Ctrl-C right before the rename
    monkeypatch.setattr(common.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        common.save_checkpoint({"w": torch.zeros(4)}, p)
    assert sha(p) == good and os.listdir(tmp_path) == ["ck.pt"]
    monkeypatch.undo()
    assert torch.equal(torch.load(p, weights_only=True)["w"], torch.arange(4.0))


# --------------------------------------------------------------------------------------------------------------------
# SIGTERM mid-run, then --resume == the uninterrupted run; same seed == same weights

def run_and_terminate(script, args, cwd, at_step):
    """Start a run, send SIGTERM once it has logged training step `at_step`; -> (exit code, output, signalled)."""
    p = subprocess.Popen(script_cmd(script, *args), cwd=cwd, env=script_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(TIMEOUT, p.kill)  # never hang the test run
    watchdog.start()
    lines, sent = [], False
    try:
        for line in p.stdout:
            lines.append(line)
            m = re.match(r"step (\d+) \| loss", line)
            if m and not sent and int(m.group(1)) >= at_step:
                p.send_signal(signal.SIGTERM)
                sent = True
        rc = p.wait()
    finally:
        watchdog.cancel()
        p.kill() if p.poll() is None else None
    return rc, "".join(lines), sent


def assert_same_checkpoint(a_path, b_path, keys=("model", "optimizer")):
    a, b = load(a_path), load(b_path)
    assert a["step"] == b["step"] and a["best_val"] == b["best_val"], (a["step"], b["step"])
    for key in keys:
        ta, tb = tensors(a[key]), tensors(b[key])
        assert ta.keys() == tb.keys() and ta, key
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{a_path} vs {b_path}: {key}.{k} differs"


def check_interrupt_and_resume(script, phase, args, cwd, reference_dir, at_step, total):
    rc, out, sent = run_and_terminate(script, args, cwd, at_step)
    assert sent, f"the run ended before step {at_step} was logged\n{out[-3000:]}"
    assert rc == 143, f"exit {rc}\n{out[-3000:]}"  # 128 + SIGTERM
    assert "Traceback" not in out and "continue with --resume" in out, out[-3000:]
    last = load(out_of(cwd, phase, "last.pt"))
    assert at_step <= last["step"] < total and "optimizer" in last and "rng" in last
    r = run_script(script, *args, "--resume", cwd=cwd)
    assert_ok(r)
    assert f"resumed from out/{phase}/last.pt at step {last['step']}" in r.stdout, r.stdout[-3000:]
    assert_same_checkpoint(out_of(cwd, phase, "last.pt"), out_of(reference_dir, phase, "last.pt"))
    assert_same_checkpoint(out_of(cwd, phase, "best.pt"), out_of(reference_dir, phase, "best.pt"), keys=("model",))


@pytest.mark.slow
def test_sigterm_then_resume_phase1_matches_uninterrupted_run(tmp_path, world, phase1_dir):
    d = str(tmp_path / "run")
    os.makedirs(d)
    check_interrupt_and_resume("phase1_text.py", "phase1", ["--world_dir", world, "--out_dir", "out", *TINY_P1],
                               d, reference_dir=phase1_dir, at_step=15, total=P1_STEPS)


@pytest.mark.slow
def test_sigterm_then_resume_phase2_matches_uninterrupted_run(world, phase1_dir, pipeline, copy_run):
    d = copy_run(phase1_dir)
    check_interrupt_and_resume("phase2_caption.py", "phase2", ["--world_dir", world, "--out_dir", "out", *TINY_P2],
                               d, reference_dir=pipeline, at_step=5, total=P2_STEPS)


@pytest.mark.slow
def test_sigterm_then_resume_phase3_matches_uninterrupted_run(world, pipeline, copy_run):
    """Phase 3's resume also reads back its synthetic corpus instead of captioning again."""
    args = ["--world_dir", world, "--out_dir", "out", *TINY_P3, "--max_steps", "12", "--log_interval", "1",
            "--eval_interval", "5"]
    ref = copy_run(pipeline)
    assert_ok(run_script("phase3_synth.py", *args, cwd=ref))
    d = copy_run(pipeline)
    check_interrupt_and_resume("phase3_synth.py", "phase3", args, d, reference_dir=ref, at_step=4, total=12)
    with open(out_of(d, "phase3", "synthetic.jsonl")) as a, open(out_of(ref, "phase3", "synthetic.jsonl")) as b:
        assert a.read() == b.read()


@pytest.mark.slow
def test_same_seed_same_result_phase1(tmp_path, world, phase1_dir):
    d = str(tmp_path / "again")
    os.makedirs(d)
    assert_ok(run_script("phase1_text.py", "--world_dir", world, "--out_dir", "out", *TINY_P1, cwd=d))
    assert sha(out_of(d, "tokenizer.model")) == sha(out_of(phase1_dir, "tokenizer.model"))
    assert_same_checkpoint(out_of(d, "phase1", "best.pt"), out_of(phase1_dir, "phase1", "best.pt"), keys=("model",))
    assert_same_checkpoint(out_of(d, "phase1", "last.pt"), out_of(phase1_dir, "phase1", "last.pt"))


# --------------------------------------------------------------------------------------------------------------------
# Fifth review: stale corpora, renamed run folders, resume hyperparameters, bad phase 3 inputs

def test_a_changed_corpus_is_refused(tmp_path):
    """Tokens and a tokenizer made from a corpus are never reused after that corpus changed (e.g. the world
    rebuilt at another --scale in place): the out_dir's checkpoints belong to the old text."""
    import phase1_text
    from types import SimpleNamespace
    from common import UserError
    from data.text import prepare_text
    data, out = tmp_path / "babylm", str(tmp_path / "out")
    data.mkdir()
    (data / "a.train").write_text("the cat sat on the mat .\nwhere is the ball ?\n" * 300)
    args = phase1_text.parse_args(["--data_dir", str(data), "--out_dir", out, "--vocab_size", "300", "--seq_len", "16"])
    run = SimpleNamespace(master=True, ddp=False)
    prepare_text(args.out_dir, args.data_dir, args.world_dir, args.vocab_size, args.seq_len, run)
    before = hashes(out)
    prepare_text(args.out_dir, args.data_dir, args.world_dir, args.vocab_size, args.seq_len, run)  # unchanged: the cached tokens are used
    (data / "a.train").write_text("the dog ran to the park .\n" * 300)
    with pytest.raises(UserError, match="changed since .* use another --out_dir"):
        prepare_text(args.out_dir, args.data_dir, args.world_dir, args.vocab_size, args.seq_len, run)
    assert hashes(out) == before


@pytest.mark.slow
def test_later_phases_find_phase1_text_in_a_moved_out_dir(tmp_path, monkeypatch, phase1_dir):
    """Phases 2-4 replay phase 1's text from the --out_dir they are given, not from the (relative, maybe
    renamed) out_dir phase 1 ran with: nothing is re-tokenized or written anywhere else."""
    from types import SimpleNamespace
    from data.text import prepare_text, text_of_phase1
    moved = str(tmp_path / "moved_out")
    shutil.copytree(out_of(phase1_dir), moved)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # phase 1 recorded --out_dir out, relative to its own folder
    before = hashes(moved)
    p1 = load(os.path.join(moved, "phase1", "best.pt"))
    train, val = text_of_phase1(p1, moved, SimpleNamespace(master=True, ddp=False))
    _, _, train0, val0 = prepare_text(out_of(phase1_dir), "", p1["args"]["world_dir"], 0, 128,
                                      SimpleNamespace(master=True, ddp=False))
    assert np.array_equal(train, train0) and np.array_equal(val, val0)
    assert os.listdir(elsewhere) == [] and hashes(moved) == before


def test_resume_keeps_this_runs_hyperparameters():
    """--resume restores AdamW's moments and the RNG, but --lr and --weight_decay given now win over the
    saved parameter groups; a checkpoint without optimizer state is one clear line."""
    from common import UserError, make_optimizer, resume_training, rng_state
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    old = make_optimizer([(model.named_parameters(), 3e-3)], 0.1, (0.9, 0.95), "cpu")
    model(torch.randn(5, 4)).sum().backward()
    old.step()
    ckpt = {"optimizer": old.state_dict(), "rng": rng_state({})}
    new = make_optimizer([(model.named_parameters(), 1e-4)], 0.0, (0.9, 0.95), "cpu")
    resume_training(ckpt, new, {}, "last.pt")
    assert {(g["lr"], g["base_lr"], g["weight_decay"]) for g in new.param_groups} == {(1e-4, 1e-4, 0.0)}
    assert torch.equal(new.state[model.weight]["exp_avg"], old.state[model.weight]["exp_avg"])
    with pytest.raises(UserError, match="no optimizer state"):
        resume_training({"model": {}}, new, {}, "best.pt")


def test_scoring_a_sequence_that_fills_the_context():
    """Phase 3 scores each caption as [BOS] caption [EOS]; a caption of the longest length its check allows
    fills the context exactly and must still be scored (the last token's logits are never needed)."""
    import torch.nn.functional as F
    from eval import sequence_logprobs
    from model import VLM, DecoderConfig, ViTConfig
    torch.manual_seed(0)
    model = VLM(DecoderConfig(vocab_size=300, n_layer=1, n_head=2, d_model=16, max_seq_len=12),
                ViTConfig(image_size=8, patch_size=4, n_layer=1, n_head=2, d_model=16, merge=1)).eval()
    images = np.random.default_rng(0).integers(0, 256, (1, 8, 8, 3), dtype=np.uint8)
    seq = [2] + [5, 6, 7, 8, 9, 10, 11] + [3]  # 4 image tokens + 9 = 13 positions, one more than the context
    lp, n = sequence_logprobs(model, [seq], images=images)
    with torch.no_grad():
        logp = F.log_softmax(model.all_logits(torch.from_numpy(images), torch.tensor([seq[:-1]])), -1)[0]
    assert n == [8] and lp[0] == pytest.approx(sum(logp[t, seq[t + 1]].item() for t in range(8)), abs=1e-5)


def test_unreadable_inputs_are_one_clear_line(tmp_path):
    """A tokenizer vocabulary too small for the corpus' characters, and phase 3 --images / jsonl files that are
    not what they should be, fail with a line that names the file or the number needed."""
    from types import SimpleNamespace
    import phase3_synth
    from common import UserError, read_json, read_jsonl
    from tokenizer import train_tokenizer
    lines = ["".join(chr(c) for c in range(0x3b1, 0x3b1 + 24)) + " abcdefghijklmnopqrstuvwxyz ."] * 50
    with pytest.raises(UserError, match="--vocab_size=260 is too small .* at least"):
        train_tokenizer(lines, str(tmp_path / "tok.model"), 260)
    npz, txt, empty = tmp_path / "a.npz", tmp_path / "a.txt", tmp_path / "empty.npy"
    np.savez(npz, x=np.zeros((2, 32, 32, 3), np.uint8))
    txt.write_text("not an array")
    np.save(empty, np.zeros((0, 32, 32, 3), np.uint8))
    for path, msg in [(npz, "archive"), (txt, "not a .npy array"), (tmp_path, "not a .npy array"), (empty, "N > 0")]:
        with pytest.raises(UserError, match=msg):
            phase3_synth.load_unlabeled(SimpleNamespace(images=str(path)), run=None)
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"caption": "caf\u00e9"}\n'.encode("latin-1"))
    for reader in (read_jsonl, read_json):
        with pytest.raises(UserError, match="not UTF-8"):
            reader(str(latin1))
        with pytest.raises(UserError, match="is not a file"):
            reader(str(tmp_path))


def test_interrupt_save_refuses_nonfinite_weights_and_ctrl_c_works_after_training():
    """The interrupt path saves last.pt after an update whose result no loss has checked yet: NaN weights
    are refused there. Once the loop is over, Ctrl-C is an ordinary KeyboardInterrupt again."""
    import signal as sig
    from common import StopFlag, UserError, check_weights_finite
    model = torch.nn.Linear(2, 2)
    check_weights_finite(model, 3, "out/phase1")
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(UserError, match="inf/NaN at step 3"):
        check_weights_finite(model, 3, "out/phase1")
    old = sig.getsignal(sig.SIGINT), sig.getsignal(sig.SIGTERM)
    try:
        stop = StopFlag()
        assert sig.getsignal(sig.SIGINT) == stop._handler
        stop.release()
        assert sig.getsignal(sig.SIGINT) is sig.default_int_handler and sig.getsignal(sig.SIGTERM) == sig.SIG_DFL
    finally:
        sig.signal(sig.SIGINT, old[0])
        sig.signal(sig.SIGTERM, old[1])
