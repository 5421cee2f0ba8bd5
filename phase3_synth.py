"""
Phase 3: self-synthesis ("dreaming out loud").

The phase 2 model describes images nobody labeled. Its descriptions become a synthetic corpus
(out/phase3/synthetic.jsonl, readable, one caption per line with its mean token log-prob, plus a PNG
sheet of examples), and the language component (the decoder; vision stays frozen) keeps training on a
mix of those synthetic captions and the real phase 1 text.

    python phase3_synth.py                        # after phase2_caption.py
    python phase3_synth.py --synthetic_frac 0     # the control: same steps, real text only
                                                  # (writes out/phase3_control/ instead of out/phase3/)
    python phase3_synth.py --arm oracle           # the upper bound: the world's true captions of the same
                                                  # images instead of the model's own (out/phase3_oracle/)
    python phase3_synth.py --arm continued        # no new images: phase 2's own labeled captions as the
                                                  # text (out/phase3_continued/)

Every arm takes the same steps, tokens per step, optimizer and schedule, and 1 step in 4 (--replay_frac)
replays phase 2's task (labeled images, their captions, the image prefix on), so reading image tokens is
not forgotten: the arms differ only in what their synthetic rows read.
Best checkpoint by val loss on real held-out text -> out/phase3/best.pt (a full VLM, for phase 4).
"""
import argparse
import json
import math
import os
import time

import numpy as np
import torch
from tqdm import tqdm

from common import (UserError, Run, add_run_args, check_args, checkpoint_tokenizer, cleanup, cli, ensure_world,
                    flops_per_token, grad_sync, load_checkpoint, lr_at, make_optimizer, read_jsonl, set_lr, show_progress,
                    to_device, wrap_model, write_atomic, write_json_atomic)
from data.images import caption_batches, caption_replay_step, load_image_array, load_world_split, pack_captions
from data.text import text_of_phase1, tokenize_lines, val_loss
from eval import caption_images, language_scores, sequence_logprobs
from model import build_model
from tokenizer import BOS, EOS

LIMITS = {"n_images": (0, None), "captions_per_image": (1, None), "top_k": (0, None), "gen_batch": (1, None),
          "max_caption_tokens": (4, None), "batch_size": (1, None), "seq_len": (8, None), "max_steps": (1, None),
          "warmup": (0, None), "eval_interval": (1, None), "eval_iters": (1, None), "log_interval": (1, None),
          "synthetic_frac": (0, 1), "replay_frac": (0, 0.5), "temperature": (0, None), "lr": (("above", 0), None), "min_lr_frac": (0, 1),
          "weight_decay": (0, None), "grad_clip": (0, None)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", default="phase2", help="which phase's best.pt to start from")
    p.add_argument("--world_dir", default="data/world")
    p.add_argument("--images", default="", help="a .npy uint8 (N,H,W,3) of unlabeled images; empty = the world's")
    # synthesis
    p.add_argument("--arm", default="dream", choices=("dream", "oracle", "continued"),
                   help="dream: the model's own captions of the unlabeled images; oracle: the world's true canonical "
                        "captions of the same images, the most that dreaming could teach (and the check that the "
                        "probes can see it); continued: phase 2's labeled captions again, no new images")
    p.add_argument("--n_images", type=int, default=0, help="how many unlabeled images to caption (0 = all)")
    p.add_argument("--captions_per_image", type=int, default=1)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=0, help="0 = no top-k cut")
    p.add_argument("--gen_batch", type=int, default=250)
    p.add_argument("--max_caption_tokens", type=int, default=64)
    p.add_argument("--min_logprob", type=float, default=float("-inf"),
                   help="drop captions whose mean token log-prob is below this (confidence filter)")
    p.add_argument("--dedup", action="store_true", help="keep each distinct caption once")
    p.add_argument("--synthetic", default="", help="reuse this synthetic.jsonl instead of captioning again")
    p.add_argument("--dream", default="text", choices=("text", "image"),
                   help="text: the paper's dreaming, the captions become plain text for the decoder; image: each "
                        "caption is learned with its image as the prefix (self-training on the unlabeled images)")
    # training the language component
    p.add_argument("--synthetic_frac", type=float, default=0.5, help="share of each batch from synthetic captions")
    p.add_argument("--replay_frac", type=float, default=0.25,
                   help="share of steps that replay phase 2's captioning (world images only; 0 = the paper's "
                        "text-only phase 3, which lets the decoder forget how to read image tokens)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--max_steps", type=int, default=240, help="sized so reproduce.sh fits 20 minutes on 2 CPU cores")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--min_lr_frac", type=float, default=0.1)
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--grad_clip", type=float, default=1.0)
    p.add_argument("--eval_interval", type=int, default=100)
    p.add_argument("--eval_iters", type=int, default=10)
    p.add_argument("--log_interval", type=int, default=25)
    p.add_argument("--out_name", default="", help="output folder under out_dir (default phase3, or phase3_control)")
    add_run_args(p, "phase3")
    args = p.parse_args(argv)
    check_args(args, LIMITS)
    if args.synthetic_frac > 0 and round(args.synthetic_frac * args.batch_size) == 0:  # rows per batch are exact
        raise UserError(f"--synthetic_frac={args.synthetic_frac} of --batch_size={args.batch_size} rounds to 0 synthetic "
                        "rows per batch: that is the control run; raise either, or use --synthetic_frac 0")
    if args.synthetic_frac < 1 and round(args.synthetic_frac * args.batch_size) == args.batch_size:
        raise UserError(f"--synthetic_frac={args.synthetic_frac} of --batch_size={args.batch_size} rounds to no real text "
                        "rows per batch; lower it or raise --batch_size, or use --synthetic_frac 1")
    if args.captions_per_image > 1 and args.temperature == 0:
        raise UserError(f"--captions_per_image={args.captions_per_image} with greedy decoding repeats the same caption; "
                        "add --temperature (e.g. 0.8) or caption once")
    if math.isnan(args.min_logprob):
        raise UserError("--min_logprob must be a number (leave it out for no confidence filter)")
    if args.init not in ("phase2", "phase3", "phase4"):
        raise UserError(f"--init={args.init}: phase 3 needs a model with vision (phase2, phase3 or phase4)")
    if args.arm != "dream" and (args.synthetic_frac == 0 or args.images or args.synthetic):
        raise UserError(f"--arm {args.arm} reads the world's own captions: it needs --synthetic_frac > 0 and no "
                        "--images or --synthetic")
    args.out_name = args.out_name or ("phase3_control" if args.synthetic_frac == 0 else
                                      "phase3" if args.arm == "dream" else f"phase3_{args.arm}")
    other_phase = args.out_name in ("phase1", "phase2", "phase4", args.init)
    if other_phase or os.path.basename(os.path.normpath(args.out_name)) != args.out_name:  # e.g. ../x, a/b
        raise UserError(f"--out_name={args.out_name} would write over another phase's checkpoints or leave {args.out_dir}; "
                        "pick a new folder name such as phase3_b")
    return args


# -----------------------------------------------------------------------------
# Synthesis: caption unlabeled images with the KV cache, score each caption

def synthesize(model, sp, images, args, run):
    """-> list of {"image", "caption", "logprob"} for every image x captions_per_image."""
    n = len(images)
    rows = []
    t0 = time.perf_counter()
    kw = dict(temperature=args.temperature, top_k=args.top_k or None)
    pbar = tqdm(total=n * args.captions_per_image, desc="dreaming", disable=not show_progress(args), dynamic_ncols=True)
    for rep in range(args.captions_per_image):
        for b0 in range(0, n, args.gen_batch):
            idx = np.arange(b0, min(b0 + args.gen_batch, n))
            imgs = images[idx[0]:idx[-1] + 1]
            caps = caption_images(model, sp, imgs, args.max_caption_tokens, args.gen_batch, run.device, **kw)
            # confidence = mean log-prob per caption token (EOS included), from one scoring pass
            seqs = [[BOS] + sp.encode(c) + [EOS] for c in caps]
            lp, cnt = sequence_logprobs(model, seqs, images=imgs, batch_size=args.gen_batch, device=run.device)
            rows += [{"image": int(i), "caption": c, "logprob": round(l / max(k, 1), 4)}
                     for i, c, l, k in zip(idx, caps, lp, cnt)]
            pbar.update(len(idx))
    pbar.close()
    dt = time.perf_counter() - t0
    print(f"synthesized {len(rows):,} captions in {dt:.1f}s ({len(rows) / dt:.1f} captions/s)")
    return rows


def filter_synthetic(rows, min_logprob, dedup):
    """Confidence filter, then (optionally) keep each distinct caption once. Empty captions never count.
    Rows without a logprob (a corpus from elsewhere) pass the filter only when it is off."""
    kept, seen = [], set()
    for r in rows:
        if "logprob" not in r and min_logprob > float("-inf"):
            raise UserError("--min_logprob needs a \"logprob\" on every synthetic caption; drop the flag for this corpus")
        if not r["caption"].strip() or r.get("logprob", 0.0) < min_logprob:
            continue
        if dedup:
            if r["caption"] in seen:
                continue
            seen.add(r["caption"])
        kept.append(r)
    return kept


def write_synthetic(rows, path):
    write_atomic(path, lambda f: f.writelines(json.dumps(r) + "\n" for r in rows), binary=False)


def read_synthetic(path):
    rows = read_jsonl(path)
    for i, r in enumerate(rows, 1):
        if not isinstance(r, dict) or not isinstance(r.get("caption"), str):
            raise UserError(f"{path} row {i}: expected an object with a \"caption\" string")
        if not isinstance(r.get("logprob", 0.0), (int, float)):
            raise UserError(f"{path} row {i}: \"logprob\" must be a number (or left out)")
    return rows


# -----------------------------------------------------------------------------
# Training data: windows from the real stream and the synthetic stream, mixed per batch

def mixed_batch(real, synth, batch_size, seq_len, frac, gen, run):
    """round(frac * batch_size) rows from the synthetic stream, the rest from real text, in a random
    order. The count is exact, so the mix ratio holds in every batch, not just on average."""
    n_syn = int(round(frac * batch_size))
    picks = torch.randperm(batch_size, generator=gen) < n_syn  # (B,) which rows are synthetic
    rows = []
    for is_syn in picks.tolist():
        stream = synth if is_syn else real
        s = int(torch.randint(len(stream) - seq_len - 1, (), generator=gen))
        rows.append(np.asarray(stream[s:s + seq_len + 1], dtype=np.int64))
    rows = rows[run.rank::run.world_size]  # same global batch on every rank, each its own rows
    xy = torch.from_numpy(np.stack(rows))  # (b, T+1)
    x, y = to_device(run, xy[:, :-1], xy[:, 1:])
    return x, y, int(picks.sum())


def image_dream_step(ddecoder, caption_loss, real, pairs, args, run):
    """--dream image: the synthetic share of the batch is (image, own caption) rows with the image prefix, the
    rest real text windows as in a text step; one gradient, each part weighed by its share of the rows."""
    n_syn = int(round(args.synthetic_frac * args.batch_size))
    x, y, _ = mixed_batch(real, real, args.batch_size - n_syn, args.seq_len, 0.0, run.gen, run)
    idx = torch.randint(len(pairs.captions), (n_syn,), generator=run.gen).numpy()
    imgs, xi, yi = to_device(run, *caption_batches(pairs, idx, run.gen, 1.0, 1, slice(run.rank, None, run.world_size))[0])
    w = n_syn / args.batch_size
    grad_sync(ddecoder, run, False)  # two backward passes, one gradient: DDP syncs on the second
    with run.autocast:
        text_loss = ddecoder(x, y)[1] * (1 - w)
    text_loss.backward()
    grad_sync(ddecoder, run, True)
    with run.autocast:
        image_loss = caption_loss(imgs, xi, yi) * w
    image_loss.backward()
    return (text_loss + image_loss).detach(), dict(tokens=x.numel() + int((yi >= 0).sum()), images=len(imgs))


def main(argv=None):
    args = parse_args(argv)
    # a resume must keep what the val loss means (best.pt is chosen by comparing it across the resume)
    run = Run(args, "phase3", args.out_name, ("batch_size", "seq_len", "eval_iters"),
              command=f"python phase3_synth.py --synthetic_frac {args.synthetic_frac} --arm {args.arm}")
    os.makedirs(run.out, exist_ok=True)

    # ---- the phase 2 model, its tokenizer, and phase 1's real text
    init_path = os.path.join(args.out_dir, args.init, "best.pt")
    prev = load_checkpoint(init_path, ["phase2", "phase3", "phase4"],
                           run_first=f"python {'phase2_caption' if args.init == 'phase2' else args.init}.py")
    if not prev.get("vit_config"):
        raise UserError(f"{init_path} has no vision tower; phase 3 starts from a phase 2 checkpoint")
    sp = checkpoint_tokenizer(prev, init_path)
    p1 = load_checkpoint(os.path.join(args.out_dir, "phase1", "best.pt"), "phase1", run_first="python phase1_text.py")
    real_train, real_val = text_of_phase1(p1, args.out_dir, run)
    model = build_model(prev).to(run.device)
    P = model.projector.num_tokens()
    if P + 1 + args.max_caption_tokens > model.decoder.cfg.max_seq_len:
        raise UserError(f"{P} image tokens + {args.max_caption_tokens} caption tokens exceed the decoder's "
                        f"max_seq_len {model.decoder.cfg.max_seq_len}; lower --max_caption_tokens")
    if args.seq_len > model.decoder.cfg.max_seq_len:
        raise UserError(f"--seq_len={args.seq_len} exceeds the model's max_seq_len {model.decoder.cfg.max_seq_len}")
    ckpt = run.last_checkpoint()  # before the captioning, which takes minutes

    # ---- 1. dream: caption the unlabeled images (skipped by the control, which never uses them)
    syn_path = os.path.join(run.out, "synthetic.jsonl")
    synth = None
    if args.synthetic_frac > 0:
        if args.synthetic:
            rows = read_synthetic(args.synthetic)
        elif args.arm != "dream":  # the world's own canonical captions: of the same images, or of phase 2's
            ensure_world(args.world_dir, run)
            n = len(load_unlabeled(args, run)) if args.arm == "continued" else None  # as many as the dream's
            truth = load_world_split(args.world_dir, "unlabeled" if args.arm == "oracle" else "caption_train")[1]
            rows = [{"image": i, "caption": r["captions"][0]} for i, r in enumerate(truth[:args.n_images or n])]
            if run.master:  # the same readable corpus file as a dream's, for a side-by-side look
                write_synthetic(rows, syn_path)
        elif ckpt and os.path.exists(syn_path):
            rows = read_synthetic(syn_path)
        else:
            images = load_unlabeled(args, run)
            size = model.vit.cfg.image_size
            if images.shape[1:3] != (size, size):
                raise UserError(f"--images holds {images.shape[1]}x{images.shape[2]} images; this model's ViT takes "
                                f"{size}x{size}: resize them first")
            if args.n_images:
                images = images[:args.n_images]
            if run.master:  # rank 0 dreams and writes the corpus; the other ranks wait and read it
                rows = synthesize(model, sp, images, args, run)
                write_synthetic(rows, syn_path)
                sheet_of_examples(images, rows, os.path.join(run.out, "synthetic_sheet.png"))
            if run.ddp:
                import torch.distributed as dist
                dist.barrier()
            if not run.master:
                rows = read_synthetic(syn_path)
        kept = filter_synthetic(rows, args.min_logprob, args.dedup)
        run.log(f"synthetic corpus: {len(rows):,} captions, {len(kept):,} kept after filtering -> {syn_path}")
        if not kept:
            raise UserError("no synthetic captions left after filtering; lower --min_logprob or drop --dedup")
        # one file per rank: ranks writing the same file at once would race on its temp name
        tok_name = "synthetic_tokens.npy" if run.master else f"synthetic_tokens_rank{run.rank}.npy"
        synth = tokenize_lines([r["caption"] for r in kept], sp, os.path.join(run.out, tok_name), BOS, EOS)
        if len(synth) <= args.seq_len + 1:
            raise UserError(f"synthetic corpus has {len(synth)} tokens, fewer than --seq_len={args.seq_len}; caption more images")
        if args.dream == "image":  # (image, its caption) pairs, packed like phase 2's labeled captions
            images = (load_world_split(args.world_dir, "caption_train")[0] if args.arm == "continued"
                      else load_unlabeled(args, run))
            synth_pairs = pack_captions(np.asarray(images[[r["image"] for r in kept]]),
                                        [{"captions": [r["caption"]]} for r in kept], sp, args.max_caption_tokens)

    # ---- 2. train the language component on the mix; vision is frozen
    for p in list(model.vit.parameters()) + list(model.projector.parameters()):
        p.requires_grad_(False)
    decoder = model.decoder
    optimizer = make_optimizer([(decoder.named_parameters(), args.lr)], args.weight_decay, (0.9, 0.95), run.device_type)
    run.start(model, optimizer, prev["tokenizer"], ckpt, parent=init_path)
    ddecoder = wrap_model(decoder, run, args.compile)
    flops_per_step = flops_per_token(decoder, args.seq_len) * args.seq_len * args.batch_size / run.world_size

    # phase 2's task, replayed 1 step in replay_every, at phase 2's share of relational captions
    args.relation_frac = prev["args"].get("relation_frac", 0.0)  # saved in this checkpoint too, for phase 4
    replay_every = round(1 / args.replay_frac) if args.replay_frac > 0 else 0
    if replay_every and (args.images or prev["args"].get("coco_dir")):
        run.log("caption replay off: it replays the built-in world's labeled images, and this run is on other images")
        replay_every = 0
    def caption_loss(imgs, x, y):  # vision is frozen: its image tokens need no gradient
        with torch.no_grad():
            prefix = model.encode_images(imgs)
        return ddecoder(x, y, prefix=prefix)[1]
    if replay_every:
        captions = pack_captions(*load_world_split(args.world_dir, "caption_train"), sp, args.max_caption_tokens)
        run.log(f"1 step in {replay_every} replays phase 2's captions ({len(captions.captions):,} labeled images)")
    model.train()
    while True:
        if run.eval_due(args.eval_interval, args.max_steps):  # best.pt: lowest loss on real held-out text
            loss = val_loss(ddecoder, real_val, args.batch_size, args.seq_len, args.eval_iters, run)
            run.evaluated(loss, "val loss on real text")
        if run.step >= args.max_steps:
            break
        set_lr(optimizer, lr_at(run.step, 1.0, args.max_steps, args.warmup, args.min_lr_frac))
        replay = " (caption replay)" if replay_every and run.step % replay_every == replay_every - 1 else ""
        if replay:
            loss, counts = caption_replay_step(caption_loss, captions, args.batch_size, run.gen, run, args.relation_frac)
        elif args.dream == "image" and synth is not None:
            loss, counts = image_dream_step(ddecoder, caption_loss, real_train, synth_pairs, args, run)
        else:
            x, y, _ = mixed_batch(real_train, synth, args.batch_size, args.seq_len, args.synthetic_frac, run.gen, run)
            with run.autocast:
                _, loss = ddecoder(x, y)  # next-token loss on real and synthetic text alike
            loss.backward()
            counts = dict(tokens=x.numel(), flops=flops_per_step)
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(decoder.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        run.stepped(loss, replay, **counts)
    best_path = run.finish()

    # ---- 3. report: did it help? language scores of the best checkpoint (compare phase 2, the control)
    if run.master and not args.images:
        best = build_model(load_checkpoint(best_path, "phase3")).to(run.device)
        result = language_scores(best, sp, args.world_dir, run.device)
        result["best_val_loss"] = run.best_val
        print(f"{args.out_name}: language probes (test, chance 50%): existence {100 * result['existence']:.1f}% | "
              f"relation {100 * result['relation']:.1f}% | syntax {100 * result['syntax']:.1f}%; surprisal gap "
              f"S {result['gap_s']:+.2f} bits, U {result['gap_u']:+.2f} bits (0 = as expected as a seen pair)")
        write_json_atomic(result, os.path.join(run.out, "results.json"))
    cleanup(run)


def load_unlabeled(args, run):
    """The images to dream about: --images (a .npy array), or the world's unlabeled split."""
    if args.images:
        return load_image_array(args.images, "--images")
    ensure_world(args.world_dir, run)
    return load_world_split(args.world_dir, "unlabeled")[0]


def sheet_of_examples(images, rows, path, k=16):
    from data.world import contact_sheet
    k = min(k, len(rows))
    contact_sheet(path, [np.asarray(images[r["image"]]) for r in rows[:k]],
                  [f"{r['caption']} ({r['logprob']:.2f})" for r in rows[:k]], images.shape[1])


if __name__ == "__main__":
    cli(main)
