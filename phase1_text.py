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
import math
import time

import torch
import torch.nn.functional as F

from common import (UserError, Run, add_run_args, check_args, check_vocab, cleanup, cli, flops_per_token, grad_sync,
                    lr_at, make_optimizer, set_lr, wrap_model)
from data.text import get_batch, prepare_text, unigram_entropy, utterance_starts, val_loss
from model import Decoder, DecoderConfig

LIMITS = {"n_layer": (1, None), "n_head": (1, None), "d_model": (8, None), "seq_len": (8, None), "vocab_size": (0, None),
          "batch_size": (1, None), "grad_accum": (1, None), "max_steps": (0, None), "epochs": (0, None),
          "dropout": (0, 1), "lr": (("above", 0), None),
          "warmup": (0, None), "min_lr_frac": (0, 1), "weight_decay": (0, None), "grad_clip": (0, None),
          "eval_interval": (1, None), "eval_iters": (1, None), "log_interval": (1, None)}


# What changes with --data_dir (real text, e.g. the BabyLM sample) and why; the runs behind these values are
# in docs/LOG.md. A flag given always wins.
#   epochs: the budget is passes over the text, not steps, so a corpus of another size gets the same recipe;
#   vocab_size, model shape: fewer FLOPs per token buy more passes in the same wall time;
#   seq_len: utterances are short, and BLiMP sentences too;
#   batch_size 32: at equal tokens, more steps of a smaller batch learned faster than batch 64;
#   sentence_starts: every sample starts at an utterance's BOS, as every scored sentence does;
#   min_lr_frac 0: a run that ends its cosine at 0 ends on its best weights.
TEXT_DEFAULTS = dict(vocab_size=2048, n_layer=4, n_head=4, d_model=128, seq_len=64, batch_size=32, max_steps=0,
                     epochs=3.5, sentence_starts=True, dropout=0.0, lr=3e-3, warmup=100, min_lr_frac=0.0,
                     eval_interval=250)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="with --data_dir the defaults are instead: " +
                                       ", ".join(f"--{k} {v}" for k, v in TEXT_DEFAULTS.items()))
    # data
    p.add_argument("--data_dir", default="", help="BabyLM-format folder of *.train files; empty = built-in world")
    p.add_argument("--world_dir", default="data/world", help="where the built-in world is (built if missing)")
    p.add_argument("--vocab_size", type=int, default=0, help="BPE pieces; 0 = 512 for the world (with --data_dir: see the defaults below)")
    p.add_argument("--sentence_starts", action=argparse.BooleanOptionalAction, default=False,
                   help="start every training and val window at an utterance's BOS (sentence-level samples) "
                        "instead of anywhere in the stream")
    # model
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--d_model", type=int, default=192)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--untied", action="store_true", help="separate output head instead of tied embeddings")
    p.add_argument("--dropout", type=float, default=0.0,
                   help="dropout on the embeddings and on every attention/MLP output, in training only: "
                        "regularises a model that sees the same text many times")
    # optimisation
    p.add_argument("--batch_size", type=int, default=32, help="sequences per micro-step, summed over all ranks")
    p.add_argument("--grad_accum", type=int, default=1)
    p.add_argument("--max_steps", type=int, default=400, help="optimizer steps; 0 = as many as --epochs takes")
    p.add_argument("--epochs", type=float, default=0.0,
                   help="passes over the training tokens, used when --max_steps is 0: a budget that scales "
                        "with the corpus")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=60)
    p.add_argument("--min_lr_frac", type=float, default=0.1, help="the cosine decays to this fraction of --lr")
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--grad_clip", type=float, default=1.0)
    # evaluation / logging
    p.add_argument("--eval_interval", type=int, default=100)
    p.add_argument("--eval_iters", type=int, default=10)
    p.add_argument("--log_interval", type=int, default=50)
    add_run_args(p, "phase1")
    if p.parse_known_args(argv)[0].data_dir:  # real text: its own defaults (TEXT_DEFAULTS), flags still win
        p.set_defaults(**TEXT_DEFAULTS)
    args = p.parse_args(argv)
    check_args(args, LIMITS)
    if args.d_model % args.n_head or (args.d_model // args.n_head) % 2:
        raise UserError(f"--d_model={args.d_model} must be divisible by --n_head={args.n_head} into an even head size")
    if args.vocab_size and args.vocab_size < 260:
        raise UserError(f"--vocab_size={args.vocab_size} is too small: byte fallback needs at least 260")
    if args.dropout >= 1:
        raise UserError(f"--dropout={args.dropout} must be below 1 (1 drops everything)")
    if args.max_steps == 0 and args.epochs == 0:
        raise UserError("--max_steps 0 means 'from --epochs', so give --epochs > 0 (or --max_steps > 0)")
    return args


def steps_for_epochs(epochs, n_tokens, tokens_per_step):
    """Optimizer steps that show the model `epochs` times as many tokens as the training stream holds."""
    return max(1, math.ceil(epochs * n_tokens / tokens_per_step))


def add_dropout(model, p):
    """Dropout on the token embeddings and on each block's attention and MLP outputs (the residual
    branches, as in GPT-2), through forward hooks: model.py and the checkpoints stay as they are, and
    the later phases, which build their decoder from the checkpoint, train without it."""
    def hook(module, inputs, output):
        return F.dropout(output, p, module.training)
    for m in [model.tok_emb] + [m for b in model.blocks for m in (b.attn, b.mlp)]:
        m.register_forward_hook(hook)


def main(argv=None):
    args = parse_args(argv)
    t_start = time.perf_counter()
    # a resume must keep what the val loss means (best.pt is chosen by comparing it across the resume)
    run = Run(args, "phase1", same_on_resume=("batch_size", "seq_len", "eval_iters", "sentence_starts"))

    # ---- data: a tokenizer trained on the text, and the text as one packed stream of token ids
    sp, tok_path, train, val = prepare_text(args.out_dir, args.data_dir, args.world_dir, args.vocab_size,
                                            args.seq_len, run)
    vocab = sp.get_piece_size()
    H_unigram = unigram_entropy(train, vocab)  # the loss of a model that ignores context: the bar to beat
    train_starts = utterance_starts(train, args.seq_len) if args.sentence_starts else None
    val_starts = utterance_starts(val, args.seq_len) if args.sentence_starts else None
    tokens_per_step = args.seq_len * args.batch_size * args.grad_accum
    if args.max_steps == 0:  # a budget in passes over the text
        args.max_steps = steps_for_epochs(args.epochs, len(train), tokens_per_step)

    # ---- model: a fresh decoder (or the one in last.pt, same shape)
    ckpt = run.last_checkpoint()
    if ckpt:
        check_vocab(ckpt, sp, run.last_path)
        cfg = DecoderConfig(**ckpt["decoder_config"])
    else:  # the context holds what later phases feed (phase 2: 16 image tokens + a caption; phase 3: 128-token
        # windows) even when phase 1 trains on shorter ones; RoPE has no weights, so a longer table costs nothing
        cfg = DecoderConfig(vocab_size=vocab, n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model,
                            max_seq_len=max(args.seq_len, 128), tie_embeddings=not args.untied)
    model = Decoder(cfg).to(run.device)
    if args.dropout > 0:
        add_dropout(model, args.dropout)
    optimizer = make_optimizer([(model.named_parameters(), args.lr)], args.weight_decay, (0.9, 0.95), run.device_type)
    run.start(model, optimizer, tok_path, ckpt)
    dmodel = wrap_model(model, run, args.compile)  # torch.compile and/or DDP; `model` stays the plain one
    flops_per_step = flops_per_token(model, args.seq_len) * tokens_per_step / run.world_size
    run.log(f"device {run.device} x{run.world_size} | {model.num_params() / 1e6:.2f}M non-embedding params | "
            f"vocab {vocab} | {len(train):,} train tokens | unigram entropy {H_unigram:.3f} nats/token | "
            f"{args.max_steps} steps = {args.max_steps * tokens_per_step / len(train):.2f} passes")

    # ---- training loop: next-token prediction on random windows of the stream (or windows from utterance starts)
    while True:
        if run.eval_due(args.eval_interval, args.max_steps):  # best.pt = lowest val loss so far
            loss = val_loss(dmodel, val, args.batch_size, args.seq_len, args.eval_iters, run, val_starts)
            run.evaluated(loss, note=f" (unigram entropy {H_unigram:.4f})")
        if run.step >= args.max_steps:
            break
        set_lr(optimizer, lr_at(run.step, 1.0, args.max_steps, args.warmup, args.min_lr_frac))  # warmup, cosine
        for micro in range(args.grad_accum):  # gradients summed over micro-batches: a bigger batch
            x, y = get_batch(train, args.batch_size, args.seq_len, run.gen, run, train_starts)  # (B, T) each
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
    run.log(f"done: best val loss {run.best_val:.4f} nats/token vs unigram entropy {H_unigram:.4f} -> {run.best_path} | "
            f"{time.perf_counter() - t_start:.0f} s wall, {torch.get_num_threads()} threads x{run.world_size}")
    cleanup(run)


if __name__ == "__main__":
    cli(main)
