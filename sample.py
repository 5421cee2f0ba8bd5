"""
Try a checkpoint by hand: continue a sentence, caption your own pictures, ask about them.

    python sample.py --ckpt out/phase1/best.pt --prompt "look , a"           # any phase: text
    python sample.py --out_dir out --phase phase2 --images a.jpg photos/     # phase 2-4: captions
    python sample.py --phase phase4 --images a.jpg --question "what colour is the circle ?"
    python sample.py --phase phase2 --images photos/ --sheet sheet.png       # pictures + captions, one PNG
    python sample.py --prompt "the" --num_samples 3 --temperature 0.8 --top_k 50 --device cuda

Pictures of any size are cropped to their central square and resized to the model's image size the way
phase 2 prepares COCO photos (data.images.center_square). Captions and answers are greedy by default,
as eval.py scores them; questions use phase 4's prompt (eval.vqa_prompt). With --prompt and --images
together, the prompt is the start of each caption.
"""
import argparse
import os
from types import SimpleNamespace

import numpy as np
import torch

from common import UserError, check_range, checkpoint_tokenizer, cli, load_checkpoint, setup
from tokenizer import BOS, EOS, decode

PHASES = ("phase1", "phase2", "phase3", "phase3_control", "phase3_continued", "phase3_oracle", "phase4", "phase4_control")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Continue a text prompt, caption images or answer a question about "
                                "them with any phase's checkpoint (see the top of sample.py).")
    p.add_argument("--ckpt", default="", help="a checkpoint file (default: OUT_DIR/PHASE/best.pt)")
    p.add_argument("--out_dir", default="out")
    p.add_argument("--phase", default="", choices=("",) + PHASES,
                   help="whose best.pt under --out_dir (default: the last phase that has one)")
    p.add_argument("--prompt", default=None, help="text to continue (with --images: the start of each caption)")
    p.add_argument("--images", nargs="+", default=[], help="image files and/or folders of them")
    p.add_argument("--question", default=None, help="a question about each image (phase 4's prompt format)")
    p.add_argument("--sheet", default="", help="write a PNG of the images with what the model said")
    p.add_argument("--num_samples", type=int, default=1, help="continuations per prompt or image")
    p.add_argument("--max_new_tokens", type=int, default=40)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (what eval.py scores)")
    p.add_argument("--top_k", type=int, default=0, help="sample from the k likeliest tokens only (0 = all)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--seed", type=int, default=1337)
    args = p.parse_args(argv)
    check_range("num_samples", args.num_samples, lo=1)
    check_range("max_new_tokens", args.max_new_tokens, lo=1)
    check_range("temperature", args.temperature, lo=0.0)
    check_range("top_k", args.top_k, lo=0)
    if args.question is not None and not args.images:
        raise UserError("--question is about an image: give --images too")
    if args.prompt is None and not args.images:
        raise UserError("nothing to do: give --prompt TEXT and/or --images FILES")
    if args.question is not None and args.prompt is not None:
        raise UserError("give --prompt or --question, not both")
    if args.sheet and not args.images:
        raise UserError("--sheet draws images: give --images too")
    if args.num_samples > 1 and args.temperature == 0:
        raise UserError(f"--num_samples {args.num_samples} with --temperature 0 (greedy) repeats one answer; "
                        "set e.g. --temperature 0.8")
    return args


def find_checkpoint(args):
    if args.ckpt:
        return args.ckpt
    if args.phase:
        return os.path.join(args.out_dir, args.phase, "best.pt")
    found = [ph for ph in ("phase1", "phase2", "phase3", "phase4") if os.path.exists(os.path.join(args.out_dir, ph, "best.pt"))]
    if not found:
        raise UserError(f"no checkpoint under {args.out_dir}/ (looked for phase1-4/best.pt); "
                        f"run `python phase1_text.py --out_dir {args.out_dir}` first, or pass --ckpt PATH")
    return os.path.join(args.out_dir, found[-1], "best.pt")


def image_files(paths):
    """Files as given, folders expanded to their image files (sorted); a missing path is an error."""
    files = []
    for p in paths:
        if os.path.isdir(p):
            inside = sorted(os.path.join(p, f) for f in os.listdir(p) if f.lower().endswith(IMAGE_EXTS))
            if not inside:
                raise UserError(f"folder {p} holds no image files ({', '.join(IMAGE_EXTS)})")
            files += inside
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise UserError(f"image {p} not found")
    return files


def load_images(files, size):
    """-> uint8 (N, size, size, 3), each picture prepared as phase 2 prepares COCO photos."""
    from PIL import Image
    from data.images import center_square
    out = []
    for f in files:
        try:
            with Image.open(f) as img:
                out.append(center_square(img, size))
        except Exception as e:
            raise UserError(f"could not read image {f} ({type(e).__name__}): not an image, or a damaged one")
    return np.stack(out)


def continue_text(model, sp, prompt, args, device):
    """Text continuations of prompt by the decoder (any phase's): the prompt followed by what it added."""
    from eval import decoder_of
    dec = decoder_of(model)
    ids = [BOS] + sp.encode(prompt)
    room = dec.cfg.max_seq_len - len(ids)
    if room < 1:
        raise UserError(f"the prompt is {len(ids)} tokens: it fills the model's {dec.cfg.max_seq_len}-token context")
    new = dec.generate([ids] * args.num_samples, min(args.max_new_tokens, room), temperature=args.temperature,
                       top_k=args.top_k or None, eos_id=EOS)
    return [decode(sp, ids + n) for n in new]


def describe_images(model, sp, images, args, device):
    """For each image, num_samples captions (or answers to --question): a list of lists of strings."""
    from eval import generate_text, vqa_prompt
    if args.question is not None:
        prompt = vqa_prompt(sp, args.question)
    else:
        prompt = [BOS] + (sp.encode(args.prompt) if args.prompt else [])
    reps = np.repeat(images, args.num_samples, axis=0)
    said = generate_text(model, sp, reps, [prompt] * len(reps), args.max_new_tokens, device=device,
                         temperature=args.temperature, top_k=args.top_k or None)
    if args.prompt:  # the caption as a whole, its given start included
        said = [f"{args.prompt} {s}".strip() for s in said]
    k = args.num_samples
    return [said[i * k:(i + 1) * k] for i in range(len(images))]


def write_sheet(path, files, said, args, size):
    from PIL import Image
    from data.images import center_square
    from data.world import contact_sheet
    cell = max(128, size * 4)
    shown = []
    for f in files:  # the same central square the model saw, at a size people can look at
        with Image.open(f) as img:
            shown.append(center_square(img, cell))
    head = f"Q: {args.question} A: " if args.question is not None else ""
    texts = [head + " / ".join(s) for s in said]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    contact_sheet(path, shown, texts, size)


@torch.no_grad()
def main(argv=None):
    from model import VLM, build_model
    args = parse_args(argv)
    path = find_checkpoint(args)
    files = image_files(args.images)  # before loading anything: a typo fails at once
    run = setup(SimpleNamespace(device=args.device, seed=args.seed))
    ckpt = load_checkpoint(path)
    sp = checkpoint_tokenizer(ckpt, path)
    model = build_model(ckpt).to(run.device).eval()
    what = "vision + language" if isinstance(model, VLM) else "text only"
    print(f"{path}: {ckpt.get('phase')} checkpoint, step {ckpt.get('step')}, {what}, on {run.device}")
    if files and not isinstance(model, VLM):
        raise UserError(f"{path} is a text-only ({ckpt.get('phase')}) checkpoint: it cannot look at images; "
                        "use a phase 2, 3 or 4 checkpoint (or only --prompt)")
    if not files:
        for i, s in enumerate(continue_text(model, sp, args.prompt, args, run.device)):
            print(("" if i == 0 else "---\n") + s)
        return
    size = model.vit.cfg.image_size
    said = describe_images(model, sp, load_images(files, size), args, run.device)
    for f, s in zip(files, said):
        q = f" {args.question} ->" if args.question is not None else ""
        for one in s:
            print(f"{f}:{q} {one}")
    if args.sheet:
        write_sheet(args.sheet, files, said, args, size)
        print(f"wrote {args.sheet} ({len(files)} images)")


if __name__ == "__main__":
    cli(main)
