"""sample.py, the command to try a checkpoint by hand, on tiny untrained checkpoints made here: text
continuation (any phase), captions of image files of any size and of a folder, an answer to a question, the
PNG sheet, and one-line errors for bad input. Fast in-process tests, and one slow run of the script."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sample  # noqa: E402
import tokenizer as tk  # noqa: E402
from common import UserError, make_checkpoint, save_checkpoint  # noqa: E402
from model import Decoder, DecoderConfig, ViTConfig, VLM  # noqa: E402
from conftest import ROOT, assert_user_error, script_env  # noqa: E402

CORPUS = ["look , a red circle .", "there is a blue square .", "what colour is the circle ? red",
          "a green triangle is left of the circle ."]


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """out/ with a tokenizer, a text-only phase1/best.pt and a vision phase2/best.pt (both untrained), and
    pictures: two odd-sized PNG/JPEG files in a folder, and one file that is not an image."""
    root = tmp_path_factory.mktemp("sample")
    o = root / "out"
    sp = tk.train_tokenizer(CORPUS * 4, str(root / "out" / "tokenizer.model"), vocab_size=300)
    V = sp.get_piece_size()
    torch.manual_seed(0)
    args = sample.parse_args(["--prompt", "x"])
    dec = DecoderConfig(vocab_size=V, n_layer=1, n_head=2, d_model=32, max_seq_len=64)
    for phase, model in (("phase1", Decoder(dec)),
                         ("phase2", VLM(dec, ViTConfig(image_size=16, patch_size=4, n_layer=1, n_head=2, d_model=16)))):
        save_checkpoint(make_checkpoint(model, phase, str(o / "tokenizer.model"), 10, 1.0, 1.0, args),
                        str(o / phase / "best.pt"))
    pics = root / "pics"
    pics.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (50, 80, 3), dtype=np.uint8)).save(pics / "wide.png")
    Image.fromarray(rng.integers(0, 255, (120, 70, 3), dtype=np.uint8)).save(pics / "tall.jpg")
    (root / "notes.txt").write_text("not a picture\n")
    (root / "broken.jpg").write_bytes(b"not a jpeg either\n" * 5)
    return root


def lines_of(capsys):
    return [l for l in capsys.readouterr().out.splitlines() if l.strip()]


def test_text_prompt_on_any_phase(out, capsys):
    for phase in ("phase1", "phase2"):
        sample.main(["--out_dir", str(out / "out"), "--phase", phase, "--prompt", "look , a", "--device", "cpu",
                     "--max_new_tokens", "5"])
        said = lines_of(capsys)
        assert f"{phase} checkpoint" in said[0] and said[1].startswith("look , a"), said
    sample.main(["--ckpt", str(out / "out" / "phase1" / "best.pt"), "--prompt", "the", "--num_samples", "3",
                 "--temperature", "1.0", "--top_k", "5", "--max_new_tokens", "4", "--device", "cpu"])
    said = lines_of(capsys)
    assert said.count("---") == 2 and all(s.startswith("the") for s in said[1:] if s != "---"), said


def test_captions_a_file_and_a_folder_and_writes_a_sheet(out, capsys):
    sheet = out / "sheets" / "sheet.png"
    sample.main(["--out_dir", str(out / "out"), "--images", str(out / "pics"), str(out / "pics" / "wide.png"),
                 "--sheet", str(sheet), "--device", "cpu", "--max_new_tokens", "6"])
    said = lines_of(capsys)
    assert "phase2 checkpoint" in said[0]  # the last phase with a best.pt
    assert [l.split(":")[0] for l in said[1:4]] == [str(out / "pics" / f) for f in ("tall.jpg", "wide.png", "wide.png")]
    assert said[2].split(":", 1)[1] == said[3].split(":", 1)[1]  # the same picture, the same greedy caption
    with Image.open(sheet) as im:
        assert im.size[0] > 128 and im.size[1] > 128
    assert said[-1].startswith(f"wrote {sheet}")


def test_answers_a_question_about_an_image(out, capsys):
    sample.main(["--out_dir", str(out / "out"), "--phase", "phase2", "--images", str(out / "pics" / "tall.jpg"),
                 "--question", "what colour is the circle ?", "--device", "cpu", "--max_new_tokens", "3"])
    said = lines_of(capsys)
    assert said[1].startswith(f"{out / 'pics' / 'tall.jpg'}: what colour is the circle ? ->"), said


def test_images_are_prepared_as_in_training(out):
    from data.images import center_square
    with Image.open(out / "pics" / "wide.png") as img:
        expect = center_square(img, 16)
    assert np.array_equal(sample.load_images([str(out / "pics" / "wide.png")], 16)[0], expect)


@pytest.mark.parametrize("argv, needle", [
    (["--phase", "phase1", "--images", "PICS/wide.png"], "text-only (phase1) checkpoint"),
    (["--images", "PICS/nothere.png"], "image PICS/nothere.png not found"),
    (["--images", "ROOT/broken.jpg"], "could not read image"),
    (["--images", "ROOT/out"], "holds no image files"),
    (["--question", "what ?"], "--question is about an image"),
    (["--phase", "phase4", "--prompt", "a"], "not found"),
    ([], "nothing to do"),
    (["--prompt", "a", "--num_samples", "2"], "--temperature 0"),
])
def test_bad_input_is_one_line(out, argv, needle):
    argv = [a.replace("PICS", str(out / "pics")).replace("ROOT", str(out)) for a in argv]
    needle = needle.replace("PICS", str(out / "pics"))
    with pytest.raises(UserError) as e:
        sample.main(["--out_dir", str(out / "out"), "--device", "cpu", *argv])
    assert needle in str(e.value)


@pytest.mark.slow
def test_sample_script_runs(out):
    """As a user runs it: text, an image file with a question, and a one-line error."""
    def sample_py(*a):
        return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--device", "cpu",
                               "--out_dir", str(out / "out"), "--max_new_tokens", "4", *a],
                              cwd=str(out), env=script_env(), capture_output=True, text=True, timeout=120)
    r = sample_py("--phase", "phase1", "--prompt", "look , a")
    assert r.returncode == 0 and "look , a" in r.stdout, r.stderr
    r = sample_py("--images", str(out / "pics" / "wide.png"), "--question", "what colour is the circle ?",
                  "--sheet", str(out / "q.png"))
    assert r.returncode == 0 and "what colour is the circle ? ->" in r.stdout and os.path.exists(out / "q.png"), r.stderr
    assert_user_error(sample_py("--phase", "phase1", "--images", str(out / "pics")), "text-only")
