"""
Phase 2: connect vision.

A small ViT (trained from scratch) and a projector turn each image into a few tokens that prefix the
phase 1 decoder; the whole thing learns to caption labeled images, with the loss on caption tokens
only. New modules get a high learning rate, the pretrained decoder a lower one (either can be frozen),
and a fraction of steps replay phase 1 text so language is not forgotten. The linear layers' weight
matrices learn with Muon (orthogonalised momentum updates, common.Muon), the rest with AdamW: far
more exact captions than AdamW alone in the same few CPU minutes (docs/LOG.md).

    python phase2_caption.py                       # after phase1_text.py, built-in world
    python phase2_caption.py --coco_dir ../shared/data/coco_mini   # COCO captions format
Reads out/phase1/best.pt, writes out/phase2/best.pt (lowest caption val loss) and last.pt.
"""
import argparse
import os

import numpy as np
import torch

from common import (UserError, Run, add_run_args, all_reduce_mean, check_args, checkpoint_tokenizer, cleanup, cli,
                    ensure_world, flops_per_sample, grad_sync, load_checkpoint, lr_at, make_optimizer, set_lr,
                    to_device, wrap_model, write_json_atomic)
from data.images import caption_batches, load_coco, load_world_split, pack_captions, split_indices
from data.text import replay_step, text_of_phase1
from eval import caption_images, caption_report
from model import VLM, DecoderConfig, ViTConfig, build_model

LIMITS = {"image_size": (8, None), "patch_size": (1, None), "vit_layers": (1, None), "vit_heads": (1, None),
          "vit_d": (4, None), "merge": (1, None), "batch_size": (1, None), "length_groups": (1, None),
          "max_steps": (1, None), "warmup": (0, None), "eval_interval": (1, None), "eval_batches": (1, None),
          "log_interval": (1, None), "n_test": (0, None), "max_caption_tokens": (4, None),
          "canonical_frac": (0, 1), "relation_frac": (0, 1), "min_lr_frac": (0, 1), "text_frac": (0, 0.5),  # 0.5: every other step
          "weight_decay": (0, None), "grad_clip": (0, None), "muon_scale": (0, None),
          "lr_new": (("above", 0), None), "lr_decoder": (("above", 0), None)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # data
    p.add_argument("--world_dir", default="data/world")
    p.add_argument("--coco_dir", default="", help="COCO captions folder (captions_*.json + images); empty = world")
    p.add_argument("--image_size", type=int, default=32, help="COCO photos are resized to this (world: as built)")
    p.add_argument("--canonical_frac", type=float, default=1.0,
                   help="world: how often the full canonical caption is the target (else another reference)")
    p.add_argument("--relation_frac", type=float, default=0.3,
                   help="world: how often an image with a clear relation is captioned by its relational caption "
                        "('a red circle above a blue square . a blue square below a red circle .'), the only "
                        "place above/below are taught")
    p.add_argument("--text_frac", type=float, default=0.1, help="fraction of steps that replay phase 1 text")
    # vision model
    p.add_argument("--patch_size", type=int, default=4)
    p.add_argument("--vit_layers", type=int, default=3)
    p.add_argument("--vit_heads", type=int, default=4)
    p.add_argument("--vit_d", type=int, default=128)
    p.add_argument("--merge", type=int, default=2, help="projector merges merge x merge patches into one token")
    # optimisation
    p.add_argument("--length_groups", type=int, default=2,
                   help="cut each batch, sorted by caption length, into this many micro-batches (less padding)")
    p.add_argument("--batch_size", type=int, default=32, help="more steps of a small batch beat fewer big ones at equal compute (docs/LOG.md)")
    p.add_argument("--max_steps", type=int, default=600, help="sized to fit the CPU time budget; more steps, better captions (docs/LOG.md)")
    p.add_argument("--lr_new", type=float, default=1e-3, help="ViT + projector")
    p.add_argument("--lr_decoder", type=float, default=1e-3, help="the pretrained phase 1 decoder")
    p.add_argument("--muon_scale", type=float, default=4.0,
                   help="Muon for the linear layers' matrices at this x their part's lr (and weight decay at that lr); "
                        "0 = AdamW for all (docs/LOG.md)")
    p.add_argument("--freeze_decoder", action="store_true")
    p.add_argument("--freeze_vit", action="store_true")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--min_lr_frac", type=float, default=0.1)
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--grad_clip", type=float, default=1.0)
    # evaluation / logging
    p.add_argument("--eval_interval", type=int, default=300)
    p.add_argument("--eval_batches", type=int, default=8)
    p.add_argument("--log_interval", type=int, default=25)
    p.add_argument("--n_test", type=int, default=300, help="held-out images captioned at the end")
    p.add_argument("--max_caption_tokens", type=int, default=64)
    add_run_args(p, "phase2")
    args = p.parse_args(argv)
    check_args(args, LIMITS)
    if args.patch_size < 2 or args.patch_size & (args.patch_size - 1):
        raise UserError(f"--patch_size={args.patch_size} must be a power of two, at least 2 (the conv stem halves it per conv)")
    if args.vit_d % args.vit_heads or args.vit_d % 4:
        raise UserError(f"--vit_d={args.vit_d} must be divisible by 4 and by --vit_heads={args.vit_heads}")
    return args


def load_caption_data(args, sp, run):
    """-> dict split -> captions packed by data.images.pack_captions (images, caption ids, relational caption ids,
    texts, scenes)."""
    if args.coco_dir:
        images, rows = load_coco(args.coco_dir, args.image_size, os.path.join(args.out_dir, "cache"))
        if len(rows) < 2:
            raise UserError(f"{args.coco_dir} has {len(rows)} usable image(s); need at least 2 (train + val)")
        tr, va = split_indices(len(rows), 0.1)
        pack = lambda idx: pack_captions(images, rows, sp, args.max_caption_tokens, idx)  # noqa: E731
        return {"train": pack(tr), "val": pack(va), "test": pack(va)}
    ensure_world(args.world_dir, run)
    return {s: pack_captions(*load_world_split(args.world_dir, f"caption_{s}"), sp, args.max_caption_tokens)
            for s in ("train", "val", "test")}


@torch.no_grad()
def evaluate(model, val, args, run):
    """Caption loss on the canonical caption of the first eval_batches*batch_size val images."""
    model.eval()
    losses = []
    n = min(len(val.captions), args.eval_batches * args.batch_size)
    for b0 in range(0, n, args.batch_size):
        idx = np.arange(b0, min(b0 + args.batch_size, n))
        imgs, x, y = to_device(run, *caption_batches(val, idx, None, canonical_frac=1.0)[0])
        with run.autocast:
            _, loss = model(imgs, x, y)
        losses.append(loss.item())
    model.train()
    return all_reduce_mean(float(np.mean(losses)), run)


def main(argv=None):
    args = parse_args(argv)
    # a resume must keep the optimizer's parameter groups and what the val loss means
    run = Run(args, "phase2", same_on_resume=("freeze_decoder", "freeze_vit", "batch_size", "eval_batches"))

    # ---- data: the phase 1 model's tokenizer, labeled images and their captions
    prev_path = os.path.join(args.out_dir, "phase1", "best.pt")
    prev = load_checkpoint(prev_path, "phase1", run_first="python phase1_text.py")
    sp = checkpoint_tokenizer(prev, prev_path)
    data = load_caption_data(args, sp, run)
    train, val = data["train"], data["val"]
    image_size = train.images.shape[1]

    # ---- model: VLM = phase 1 decoder + fresh ViT and projector (or everything back from last.pt)
    ckpt = run.last_checkpoint()
    if ckpt:
        saved = ckpt["args"].get("muon_scale", 0.0)  # another scale is only another LR, but the states differ
        if (saved > 0) != (args.muon_scale > 0):
            raise UserError(f"{run.last_path} was trained with --muon_scale {saved}; resume with Muon "
                            f"{'on' if saved > 0 else 'off'}, as it was")
        model = build_model(ckpt)
    else:
        vit_cfg = ViTConfig(image_size=image_size, patch_size=args.patch_size, n_layer=args.vit_layers,
                            n_head=args.vit_heads, d_model=args.vit_d, merge=args.merge)
        if image_size % args.patch_size or (image_size // args.patch_size) % args.merge:
            raise UserError(f"image size {image_size} must be a multiple of --patch_size*--merge = {args.patch_size * args.merge}")
        model = VLM(DecoderConfig(**prev["decoder_config"]), vit_cfg)
        model.decoder.load_state_dict(prev["model"])  # bit-identical copy of phase 1's weights
    model = model.to(run.device)
    P = model.projector.num_tokens()
    if P + args.max_caption_tokens + 1 > model.decoder.cfg.max_seq_len:
        raise UserError(f"{P} image tokens + {args.max_caption_tokens} caption tokens exceed the decoder's "
                        f"max_seq_len {model.decoder.cfg.max_seq_len}; lower --max_caption_tokens or raise --merge")
    for p in model.decoder.parameters():
        p.requires_grad_(not args.freeze_decoder)
    for p in model.vit.parameters():
        p.requires_grad_(not args.freeze_vit)
    groups = [(list(model.vit.named_parameters()) + list(model.projector.named_parameters()), args.lr_new),
              (model.decoder.named_parameters(), args.lr_decoder)]  # new parts and the pretrained decoder
    optimizer = make_optimizer(groups, args.weight_decay, (0.9, 0.95), run.device_type, args.muon_scale)
    run.start(model, optimizer, prev["tokenizer"], ckpt, parent=prev_path)
    dmodel = wrap_model(model, run, args.compile)

    # phase 1 text replay: every k-th step is a text batch instead of a caption batch
    # (pointless, and nothing to backpropagate into, when the decoder is frozen)
    text_every = round(1 / args.text_frac) if args.text_frac > 0 and not args.freeze_decoder else 0
    if text_every:
        text_train, _ = text_of_phase1(prev, args.out_dir, run)
    flops_per_image = flops_per_sample(model, float(np.mean([len(c[0]) for c in train.captions[:1000]])))
    n_vit = sum(p.numel() for p in model.vit.parameters()) + sum(p.numel() for p in model.projector.parameters())
    run.log(f"device {run.device} x{run.world_size} | {len(train.captions):,} train images of {image_size}px | "
            f"{P} image tokens | ViT+projector {n_vit / 1e6:.2f}M params (new) | decoder "
            f"{model.decoder.num_params() / 1e6:.2f}M (from {prev_path})")

    # ---- training loop: caption images, loss on caption tokens only
    while True:
        if run.eval_due(args.eval_interval, args.max_steps):
            run.evaluated(evaluate(dmodel, val, args, run), "val caption loss")
            if run.master and run.step > 0:
                for c, refs in zip(caption_images(model, sp, val.images[:3], device=run.device), val.texts[:3]):
                    run.log(f"   model: {c}\n     ref: {refs[0]}")
        if run.step >= args.max_steps:
            break
        set_lr(optimizer, lr_at(run.step, 1.0, args.max_steps, args.warmup, args.min_lr_frac))
        replay = " (text replay)" if text_every and run.step % text_every == text_every - 1 else ""
        if replay:
            loss, counts = replay_step(model.decoder, text_train, args.batch_size, run.gen, run)
        else:
            idx = torch.randint(len(train.captions), (args.batch_size,), generator=run.gen).numpy()
            mine = slice(run.rank, None, run.world_size)  # same global batch, each rank its own rows
            parts = [to_device(run, *b) for b in
                     caption_batches(train, idx, run.gen, args.canonical_frac, args.length_groups, mine,
                                     args.relation_frac)]
            part_tok = [int((y >= 0).sum()) for _, _, y in parts]
            n_mean = all_reduce_mean(float(sum(part_tok)), run)  # ranks hold captions of different lengths
            loss = 0.0
            for k, (imgs, x, y) in enumerate(parts):
                # token-weighted micro-batch means: summed here and averaged over ranks by DDP, they give
                # the mean over every caption token of the global batch
                grad_sync(dmodel, run, k == len(parts) - 1)
                with run.autocast:
                    _, part_loss = dmodel(imgs, x, y)
                    part_loss = part_loss * (part_tok[k] / n_mean)
                part_loss.backward()
                loss = loss + part_loss.detach()
            n_img = len(idx[mine])
            counts = dict(tokens=sum(part_tok), images=n_img, flops=flops_per_image * n_img)
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        run.stepped(loss, replay, **counts)
    best_path = run.finish()

    # ---- report: held-out captions from the best checkpoint
    if run.master and args.n_test > 0:
        best = build_model(load_checkpoint(best_path, "phase2")).to(run.device)
        result = {"best_val_loss": run.best_val, **caption_report(best, sp, data["test"], args.n_test, run.device)}
        write_json_atomic(result, os.path.join(run.out, "results.json"))
    run.log(f"done: best val caption loss {run.best_val:.4f} -> {best_path}")
    cleanup(run)


if __name__ == "__main__":
    cli(main)
