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

import torch

from common import (UserError, Run, add_run_args, check_args, check_vocab, cleanup, cli, flops_per_token, grad_sync,
                    lr_at, make_optimizer, set_lr, wrap_model)
from data.text import get_batch, prepare_text, unigram_entropy, val_loss
from model import Decoder, DecoderConfig

LIMITS = {"n_layer": (1, None), "n_head": (1, None), "d_model": (8, None), "seq_len": (8, None), "vocab_size": (0, None),
          "batch_size": (1, None), "grad_accum": (1, None), "max_steps": (1, None), "lr": (("above", 0), None),
          "warmup": (0, None), "min_lr_frac": (0, 1), "weight_decay": (0, None), "grad_clip": (0, None),
          "eval_interval": (1, None), "eval_iters": (1, None), "log_interval": (1, None)}


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
    add_run_args(p, "phase1")
    args = p.parse_args(argv)
    check_args(args, LIMITS)
    if args.d_model % args.n_head or (args.d_model // args.n_head) % 2:
        raise UserError(f"--d_model={args.d_model} must be divisible by --n_head={args.n_head} into an even head size")
    if args.vocab_size and args.vocab_size < 260:
        raise UserError(f"--vocab_size={args.vocab_size} is too small: byte fallback needs at least 260")
    return args


def main(argv=None):
    args = parse_args(argv)
    # a resume must keep what the val loss means (best.pt is chosen by comparing it across the resume)
    run = Run(args, "phase1", same_on_resume=("batch_size", "seq_len", "eval_iters"))

    # ---- data: a tokenizer trained on the text, and the text as one packed stream of token ids
    sp, tok_path, train, val = prepare_text(args.out_dir, args.data_dir, args.world_dir, args.vocab_size,
                                            args.seq_len, run)
    vocab = sp.get_piece_size()
    H_unigram = unigram_entropy(train, vocab)  # the loss of a model that ignores context: the bar to beat

    # ---- model: a fresh decoder (or the one in last.pt, same shape)
    ckpt = run.last_checkpoint()
    if ckpt:
        check_vocab(ckpt, sp, run.last_path)
        cfg = DecoderConfig(**ckpt["decoder_config"])
    else:
        cfg = DecoderConfig(vocab_size=vocab, n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model,
                            max_seq_len=args.seq_len, tie_embeddings=not args.untied)
    model = Decoder(cfg).to(run.device)
    optimizer = make_optimizer([(model.named_parameters(), args.lr)], args.weight_decay, (0.9, 0.95), run.device_type)
    run.start(model, optimizer, tok_path, ckpt)
    dmodel = wrap_model(model, run, args.compile)  # torch.compile and/or DDP; `model` stays the plain one
    flops_per_step = flops_per_token(model, args.seq_len) * args.seq_len * args.batch_size * args.grad_accum / run.world_size
    run.log(f"device {run.device} x{run.world_size} | {model.num_params() / 1e6:.2f}M non-embedding params | "
            f"vocab {vocab} | {len(train):,} train tokens | unigram entropy {H_unigram:.3f} nats/token")

    # ---- training loop: next-token prediction on random windows of the stream
    while True:
        if run.eval_due(args.eval_interval, args.max_steps):  # best.pt = lowest val loss so far
            loss = val_loss(dmodel, val, args.batch_size, args.seq_len, args.eval_iters, run)
            run.evaluated(loss, note=f" (unigram entropy {H_unigram:.4f})")
        if run.step >= args.max_steps:
            break
        set_lr(optimizer, lr_at(run.step, 1.0, args.max_steps, args.warmup, args.min_lr_frac))  # warmup, cosine
        for micro in range(args.grad_accum):  # gradients summed over micro-batches: a bigger batch
            x, y = get_batch(train, args.batch_size, args.seq_len, run.gen, run)  # (B, T) each
            grad_sync(dmodel, run, micro == args.grad_accum - 1)  # DDP: all-reduce once, on the last one
            with run.autocast:
                _, loss = dmodel(x, y)  # mean cross-entropy of every next token
            (loss / args.grad_accum).backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        run.stepped(loss, tokens=x.numel() * args.grad_accum, flops=flops_per_step)

    run.finish()
    run.log(f"done: best val loss {run.best_val:.4f} nats/token vs unigram entropy {H_unigram:.4f} -> {run.best_path}")
    cleanup(run)


if __name__ == "__main__":
    cli(main)
