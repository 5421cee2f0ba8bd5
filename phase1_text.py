"""
Phase 1: language from scratch.

A LLaMA-style decoder learns to predict the next token of child-directed text: by default the
built-in world's phase 1 corpus (no images, and some parts of the world deliberately never named),
or any BabyLM-format folder (--data_dir). Writes out/phase1/best.pt (lowest val loss), which
phase 2 starts from, and out/phase1/last.pt (for --resume).

    python phase1_text.py                    # built-in world, auto device
    python phase1_text.py --device cuda --compile
    python phase1_text.py --data_dir ../shared/data/babylm_text --out_dir out_babylm
    torchrun --nproc_per_node=2 phase1_text.py --device cpu   # DDP, same global batch
"""
import argparse
import glob
import hashlib
import json
import os
import sys
from types import SimpleNamespace

import numpy as np
import torch
from tqdm import tqdm

from common import (UserError, add_run_args, all_reduce_mean, check_finite, check_range, check_resume_flags,
                    check_weights_finite, cleanup, cli, fmt_speed, load_checkpoint, lr_at, make_checkpoint,
                    make_optimizer, Meter, resume_training, save_checkpoint, set_lr, setup, StopFlag, wrap_model)
from data.text import read_babylm_folder, read_lines, tokenize_lines, unigram_entropy
from model import Decoder, DecoderConfig
from tokenizer import BOS, EOS, load_tokenizer, train_tokenizer

PHASE = "phase1"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # data
    p.add_argument("--data_dir", default="", help="BabyLM-format folder of *.train files; empty = built-in world")
    p.add_argument("--world_dir", default="data/world", help="where the built-in world is (built if missing)")
    p.add_argument("--vocab_size", type=int, default=0, help="0 = 512 for the world, 4096 for BabyLM text")
    # model
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--d_model", type=int, default=192)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--untied", action="store_true", help="separate output head instead of tied embeddings")
    # optimisation
    p.add_argument("--batch_size", type=int, default=32, help="sequences per micro-step, summed over all ranks")
    p.add_argument("--grad_accum", type=int, default=1)
    p.add_argument("--max_steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=60)
    p.add_argument("--min_lr_frac", type=float, default=0.1)
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--grad_clip", type=float, default=1.0)
    # evaluation / logging
    p.add_argument("--eval_interval", type=int, default=100)
    p.add_argument("--eval_iters", type=int, default=10)
    p.add_argument("--log_interval", type=int, default=50)
    add_run_args(p, PHASE)
    args = p.parse_args(argv)
    for name, lo in [("n_layer", 1), ("n_head", 1), ("d_model", 8), ("seq_len", 8), ("batch_size", 1),
                     ("grad_accum", 1), ("max_steps", 1), ("warmup", 0), ("eval_interval", 1),
                     ("eval_iters", 1), ("log_interval", 1), ("vocab_size", 0)]:
        check_range(name, getattr(args, name), lo=lo)
    check_range("lr", args.lr, lo=0, lo_open=True)
    check_range("min_lr_frac", args.min_lr_frac, lo=0, hi=1)
    check_range("weight_decay", args.weight_decay, lo=0)
    check_range("grad_clip", args.grad_clip, lo=0)
    if args.d_model % args.n_head or (args.d_model // args.n_head) % 2:
        raise UserError(f"--d_model={args.d_model} must be divisible by --n_head={args.n_head} into an even head size")
    if args.vocab_size and args.vocab_size < 260:
        raise UserError(f"--vocab_size={args.vocab_size} is too small: byte fallback needs at least 260")
    return args


def prepare_data(args, run):
    """Text lines -> tokenizer (trained once, saved in out_dir) -> token streams (.npy, memory-mapped).
    Only rank 0 writes; the other ranks wait and read."""
    os.makedirs(args.out_dir, exist_ok=True)
    tok_path = os.path.join(args.out_dir, "tokenizer.model")
    source = os.path.abspath(args.data_dir) if args.data_dir else "world:" + os.path.abspath(args.world_dir)
    vocab = args.vocab_size or (4096 if args.data_dir else 512)
    key = hashlib.sha1(f"{source}|{vocab}".encode()).hexdigest()[:10]
    tok_dir = os.path.join(args.out_dir, "tokens")
    train_path, val_path = (os.path.join(tok_dir, f"phase1_{key}_{s}.npy") for s in ("train", "val"))
    info_path = os.path.join(args.out_dir, "data.json")
    fingerprint = source_fingerprint(args) if run.master else None  # hashes the corpus: once per call
    if run.master and os.path.exists(tok_path) and os.path.exists(info_path):
        # one tokenizer per out_dir: later phases and checkpoints there depend on it, so never replace it
        info = read_info(info_path)
        if info.get("source") != source:
            raise UserError(f"{args.out_dir} already holds a tokenizer for {info.get('source')}; "
                            "use another --out_dir for a different corpus")
        if info.get("requested_vocab", vocab) != vocab:
            raise UserError(f"{args.out_dir} already holds a {info['requested_vocab']}-piece tokenizer; "
                            f"use another --out_dir for --vocab_size={vocab}")
        if "fingerprint" in info and info["fingerprint"] != fingerprint:
            raise UserError(f"the text in {source.removeprefix('world:')} changed since {args.out_dir} was prepared "
                            "from it; use another --out_dir (its tokenizer and checkpoints belong to the old text)")
    if run.master and not (os.path.exists(train_path) and os.path.exists(val_path) and os.path.exists(tok_path)):
        if args.data_dir:
            train_lines, val_lines = read_babylm_folder(args.data_dir)
            tok_lines = train_lines
        else:
            from data.world import ensure_built
            ensure_built(args.world_dir)
            train_lines = read_lines(os.path.join(args.world_dir, "text_train.txt"))
            val_lines = read_lines(os.path.join(args.world_dir, "text_val.txt"))
            # the tokenizer also sees the caption/QA text later phases use, so every word of the
            # world is a piece from the start (the model itself only sees phase 1 text here)
            tok_lines = train_lines + world_extra_text(args.world_dir)
        requested = vocab
        if os.path.exists(tok_path) and os.path.exists(info_path):  # same corpus (checked above): reuse it
            sp = load_tokenizer(tok_path)
            requested = read_info(info_path).get("requested_vocab", vocab)
        else:
            print(f"training a {vocab}-piece BPE tokenizer on {len(tok_lines):,} lines -> {tok_path}")
            sp = train_tokenizer(tok_lines, tok_path, vocab)
        tokenize_lines(train_lines, sp, train_path, BOS, EOS)
        tokenize_lines(val_lines, sp, val_path, BOS, EOS)
        with open(info_path, "w") as f:
            json.dump({"source": source, "vocab_size": sp.get_piece_size(), "requested_vocab": requested,
                       "fingerprint": fingerprint, "world_dir": args.world_dir,
                       "data_dir": args.data_dir}, f, indent=1)
    if run.ddp:
        import torch.distributed as dist
        dist.barrier()
    sp = load_tokenizer(tok_path)
    train = np.load(train_path, mmap_mode="r")
    val = np.load(val_path, mmap_mode="r")
    if len(train) <= args.seq_len + 1 or len(val) <= args.seq_len + 1:
        raise UserError(f"corpus too small for --seq_len={args.seq_len}: {len(train)} train / {len(val)} val tokens")
    return sp, tok_path, train, val


def source_fingerprint(args):
    """A hash of what phase 1 reads, so tokens and a tokenizer made from older text are never reused: the
    BabyLM files' bytes, or the world's meta.json (its seed, scale and format decide every file)."""
    if args.data_dir:
        files = sorted(glob.glob(os.path.join(args.data_dir, "*.train")) + glob.glob(os.path.join(args.data_dir, "*.dev")))
    else:
        from data.world import ensure_built
        ensure_built(args.world_dir)
        files = [os.path.join(args.world_dir, "meta.json")]
    h = hashlib.sha1()
    for path in files:
        h.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def text_of_phase1(p1_ckpt, out_dir, run):
    """Phase 1's (train, val) token streams for a later phase: the corpus phase 1 recorded (by absolute path,
    from out_dir's data.json), tokenized in this --out_dir, whose tokenizer every checkpoint there shares.
    Not the folders phase 1's args name: those may be relative to another directory, or renamed since."""
    p1_args = SimpleNamespace(**p1_ckpt["args"])
    p1_args.out_dir = out_dir
    info_path = os.path.join(out_dir, "data.json")
    source = read_info(info_path).get("source", "") if os.path.exists(info_path) else ""
    if source.startswith("world:"):
        p1_args.world_dir, p1_args.data_dir = source.removeprefix("world:"), ""
    elif source:
        p1_args.data_dir = source
    _, _, train, val = prepare_data(p1_args, run)
    return train, val


def read_info(path):
    with open(path) as f:
        return json.load(f)


def world_extra_text(world_dir):
    lines = []
    with open(os.path.join(world_dir, "caption_train.jsonl")) as f:
        for row in f:
            lines += json.loads(row)["captions"]
    with open(os.path.join(world_dir, "vqa_train.jsonl")) as f:
        for row in f:
            qa = json.loads(row)
            lines.append(f"{qa['question']} {qa['answer']}")
    return lines


def get_batch(stream, batch_size, seq_len, gen, run):
    """Random windows of seq_len+1 tokens from the packed stream. Every rank draws the same global
    batch (same generator) and keeps its own rows, so N ranks = one process with the same batch."""
    starts = torch.randint(len(stream) - seq_len - 1, (batch_size,), generator=gen)
    starts = starts[run.rank::run.world_size].numpy()
    rows = np.stack([stream[s:s + seq_len + 1] for s in starts]).astype(np.int64)  # (b, T+1)
    xy = torch.from_numpy(rows)
    x, y = xy[:, :-1], xy[:, 1:]  # targets are the inputs shifted by one
    if run.device_type == "cuda":
        return x.pin_memory().to(run.device, non_blocking=True), y.pin_memory().to(run.device, non_blocking=True)
    return x.to(run.device), y.to(run.device)


REPLAY_LEN = 64  # phases 2 and 4 replay phase 1 text in windows about as long as their own sequences


def replay_batch(stream, batch_size, decoder_cfg, gen, run):
    """A phase 1 text batch for a later phase's replay step: REPLAY_LEN-token windows (half the cost of
    full rows), never longer than the decoder's context."""
    return get_batch(stream, batch_size, min(REPLAY_LEN, decoder_cfg.max_seq_len), gen, run)


def replay_step(decoder, stream, batch_size, gen, run):
    """Forward + backward of one phase 1 text batch through a VLM's decoder (phases 2 and 4). Returns
    (loss, meter counts). The decoder is called outside DDP's forward (the VLM's wants images), so DDP
    averages nothing: the gradients are averaged over ranks here, as DDP would have done."""
    x, y = replay_batch(stream, batch_size, decoder.cfg, gen, run)
    with run.autocast:
        _, loss = decoder(x, y)
    loss.backward()
    if run.ddp:
        import torch.distributed as dist
        for p in decoder.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad.div_(run.world_size)
    return loss.detach(), dict(tokens=x.numel(), flops=decoder.flops_per_token(x.size(1)) * x.numel())


@torch.no_grad()
def evaluate(model, stream, args, run):
    """Mean loss over the same eval_iters batches every time (own generator: training RNG untouched)."""
    model.eval()
    gen = torch.Generator().manual_seed(1234)
    losses = []
    for _ in range(args.eval_iters):
        x, y = get_batch(stream, args.batch_size, args.seq_len, gen, run)
        with run.autocast:
            _, loss = model(x, y)
        losses.append(loss.item())
    model.train()
    return all_reduce_mean(float(np.mean(losses)), run)


def main(argv=None):
    args = parse_args(argv)
    run = setup(args)
    if args.batch_size % run.world_size:
        raise UserError(f"--batch_size={args.batch_size} must be divisible by the {run.world_size} processes")
    out = os.path.join(args.out_dir, PHASE)
    best_path, last_path = os.path.join(out, "best.pt"), os.path.join(out, "last.pt")

    # ---- data and tokenizer
    sp, tok_path, train, val = prepare_data(args, run)
    vocab = sp.get_piece_size()
    H_unigram = unigram_entropy(train, vocab)

    # ---- model (fresh, or everything back from last.pt)
    gen = torch.Generator().manual_seed(args.seed)  # the training data order
    step, best_val = 0, float("inf")
    if args.resume:
        ckpt = load_checkpoint(last_path, PHASE, run_first="python phase1_text.py")
        cfg = DecoderConfig(**ckpt["decoder_config"])
        if cfg.vocab_size != vocab:
            raise UserError(f"{last_path} has vocab {cfg.vocab_size} but {tok_path} has {vocab}; resume with the same --out_dir and data")
        if args.seq_len > cfg.max_seq_len:
            raise UserError(f"--seq_len={args.seq_len} exceeds the resumed model's max_seq_len={cfg.max_seq_len}; "
                            f"resume with --seq_len {cfg.max_seq_len} or less")
    else:
        cfg = DecoderConfig(vocab_size=vocab, n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model,
                            max_seq_len=args.seq_len, tie_embeddings=not args.untied)
    model = Decoder(cfg).to(run.device)
    optimizer = make_optimizer([(model.named_parameters(), args.lr)], args.weight_decay, (0.9, 0.95), run.device_type)
    if args.resume:
        check_resume_flags(ckpt, args, last_path, ("batch_size", "seq_len", "eval_iters"))  # what val loss means
        model.load_state_dict(ckpt["model"])
        resume_training(ckpt, optimizer, {"data": gen}, last_path)
        step, best_val = ckpt["step"], ckpt["best_val"]
        if run.master:
            print(f"resumed from {last_path} at step {step} (best val {best_val:.4f})")
    dmodel = wrap_model(model, run, args.compile)
    flops_per_step = model.flops_per_token(args.seq_len) * args.seq_len * args.batch_size * args.grad_accum / run.world_size
    if run.master:
        print(f"device {run.device} x{run.world_size} | {model.num_params() / 1e6:.2f}M non-embedding params | "
              f"vocab {vocab} | {len(train):,} train tokens | unigram entropy {H_unigram:.3f} nats/token")

    def checkpoint(val_loss, with_optimizer):
        return make_checkpoint(model, PHASE, tok_path, step, val_loss, best_val, args,
                               optimizer if with_optimizer else None, {"data": gen})

    # ---- training loop
    stop = StopFlag()
    meter = Meter(run)
    pbar = tqdm(total=args.max_steps, initial=step, disable=not run.master or args.quiet, desc=PHASE, dynamic_ncols=True)
    val_loss = float("nan")
    while True:
        last_step = step >= args.max_steps  # >=: a resumed run may already be past it
        if step % args.eval_interval == 0 or last_step:
            val_loss = evaluate(dmodel, val, args, run)
            check_finite(val_loss, step, out, "val loss")  # same value on every rank: all stop together
            if run.master:
                tqdm.write(f"step {step} | val loss {val_loss:.4f} (unigram entropy {H_unigram:.4f})")
                if val_loss < best_val:
                    best_val = val_loss
                    save_checkpoint(checkpoint(val_loss, False), best_path)
                save_checkpoint(checkpoint(val_loss, True), last_path)
            meter.reset()  # don't count eval time as training time
        if last_step:
            break

        set_lr(optimizer, lr_at(step, 1.0, args.max_steps, args.warmup, args.min_lr_frac))
        for micro in range(args.grad_accum):
            x, y = get_batch(train, args.batch_size, args.seq_len, gen, run)
            if run.ddp:  # only sync gradients on the last micro-step
                dmodel.require_backward_grad_sync = micro == args.grad_accum - 1
            with run.autocast:
                _, loss = dmodel(x, y)
            (loss / args.grad_accum).backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        meter.add(tokens=x.numel() * args.grad_accum, flops=flops_per_step)
        pbar.update(1)
        # loss.item() makes the CPU wait until the GPU has finished the step, so it is read only where it
        # is used: to log it, and to check it is finite before a checkpoint can be written. A NaN stays in
        # the weights, so the next read catches it (the error names that step, up to log_interval late).
        if step % args.log_interval == 0 or step % args.eval_interval == 0 or step == args.max_steps:
            loss_value = all_reduce_mean(loss.item(), run)  # last micro-batch's loss, mean over ranks
            check_finite(loss_value, step, out)
        if run.master and step % args.log_interval == 0:
            lr = optimizer.param_groups[0]["lr"]
            tqdm.write(f"step {step} | loss {loss_value:.4f} | lr {lr:.2e} | {fmt_speed(meter.report())}")
        if stop.agreed(run):
            if run.master:
                check_weights_finite(model, step, out)
                save_checkpoint(checkpoint(val_loss, True), last_path)
                tqdm.write(f"interrupted: saved {last_path} at step {step}; continue with --resume")
            cleanup(run)
            sys.exit(130 if stop.signum == 2 else 143)
    pbar.close()
    stop.release()
    if run.master:
        print(f"done: best val loss {best_val:.4f} nats/token vs unigram entropy {H_unigram:.4f} -> {best_path}")
    cleanup(run)


if __name__ == "__main__":
    cli(main)
