"""
Phase 4: answer questions about images.

The whole VLM of phase 3 (or of phase 2, for ablations: --init phase2) is fine-tuned on (image,
question, answer) triples, with the loss on the answer tokens only. The prompt format is fixed and
is the same for training, greedy answering and ranking candidate answers (eval.vqa_prompt):

    [image tokens] [BOS] question : <question> answer : <answer tokens> [EOS]
    e.g.           [BOS] question : is there a red circle ? answer : yes [EOS]

Targets are -1 (no loss) on the question and on padding; the answer tokens and EOS carry the loss.
At the end the best checkpoint answers held-out questions (world: vqa_test images) and accuracy is
reported per question type, by greedy generation (exact match after normalisation, or the VQA
accuracy min(#humans who gave the answer / 3, 1) for VQAv2) and by ranking candidate answers by
log-probability, next to the majority baseline (always the most frequent training answer of the type).

    python phase4_vqa.py                          # after phase3_synth.py, built-in world
    python phase4_vqa.py --init phase2            # ablation: skip self-synthesis
    python phase4_vqa.py --vqa_questions q.json --vqa_annotations a.json --vqa_images train2014/
Reads out/phase3/best.pt, writes out/phase4/best.pt (lowest val answer loss), last.pt, results.json.
"""
import argparse
import os
import sys
from types import SimpleNamespace

import numpy as np
import torch

from common import (UserError, Run, add_run_args, all_reduce_mean, check_args, checkpoint_tokenizer, cleanup, cli,
                    ensure_world, flops_per_sample, load_checkpoint, lr_at, make_optimizer, set_lr, to_device,
                    token_weighted, wrap_model, write_json_atomic)
from data.images import caption_replay_step, load_world_split, pack_captions, split_indices
from data.text import replay_step, text_of_phase1
from data.vqa import answers_by_type, load_vqav2, load_world_vqa, split_by_image
from eval import vqa_answer_ids, vqa_generate, vqa_prompt, vqa_report
from model import VLM, build_model
from tokenizer import PAD

LIMITS = {"batch_size": (1, None), "max_steps": (1, None), "warmup": (0, None), "eval_interval": (1, None),
          "eval_batches": (1, None), "log_interval": (1, None), "n_test": (0, None), "max_answer_tokens": (1, None),
          "min_lr_frac": (0, 1), "vqa_val_frac": (("above", 0), 0.5), "text_frac": (0, 0.5), "replay_frac": (0, 0.5),  # 0.5: every other step
          "weight_decay": (0, None), "grad_clip": (0, None), "lr_vision": (("above", 0), None),
          "lr_decoder": (("above", 0), None)}
# --init: folder under out_dir -> (the phase its best.pt holds, the command that makes it)
INITS = {"phase3": ("phase3", "python phase3_synth.py"), "phase2": ("phase2", "python phase2_caption.py"),
         "phase3_control": ("phase3", "python phase3_synth.py --synthetic_frac 0"),
         "phase3_oracle": ("phase3", "python phase3_synth.py --arm oracle")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # starting point and data
    p.add_argument("--init", default="phase3", choices=sorted(INITS),
                   help="which earlier phase's best.pt to start from (ablations: phase2 = no self-synthesis, "
                        "phase3_control = phase 3's real-text-only control)")
    p.add_argument("--world_dir", default="data/world")
    p.add_argument("--vqa_questions", default="", help="VQAv2 questions JSON; empty = the built-in world")
    p.add_argument("--vqa_annotations", default="", help="VQAv2 annotations JSON (with --vqa_questions)")
    p.add_argument("--vqa_images", default="", help="folder of the images the questions ask about")
    p.add_argument("--vqa_image_pattern", default="",
                   help="e.g. 'COCO_train2014_{image_id:012d}.jpg'; empty = find files by the digits in their names")
    p.add_argument("--vqa_val_frac", type=float, default=0.1, help="VQAv2: fraction of images held out, half for val and half for test")
    # optimisation
    p.add_argument("--text_frac", type=float, default=0.1,
                   help="fraction of steps that replay phase 1 text, so answering questions does not erase language")
    p.add_argument("--replay_frac", type=float, default=0.25,
                   help="fraction of steps that replay phase 2's captioning (world images, image prefix on), so "
                        "answering questions does not erase describing images; 0 = answers only")
    p.add_argument("--out_name", default="phase4", help="output folder under out_dir (e.g. phase4_control for "
                   "--init phase3_control)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--max_steps", type=int, default=460, help="sized so reproduce.sh fits 20 minutes on 2 CPU cores")
    p.add_argument("--lr_vision", type=float, default=1e-3, help="ViT + projector")
    p.add_argument("--lr_decoder", type=float, default=1e-3, help="the decoder")
    p.add_argument("--freeze_decoder", action="store_true")
    p.add_argument("--freeze_vit", action="store_true")
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--min_lr_frac", type=float, default=0.1)
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--grad_clip", type=float, default=1.0)
    # evaluation / logging
    p.add_argument("--eval_interval", type=int, default=200)
    p.add_argument("--eval_batches", type=int, default=16)
    p.add_argument("--log_interval", type=int, default=25)
    p.add_argument("--n_test", type=int, default=1000, help="held-out questions answered at the end")
    p.add_argument("--max_answer_tokens", type=int, default=12, help="longer answers are cut; also the generation limit")
    add_run_args(p, "phase4")
    args = p.parse_args(argv)
    check_args(args, LIMITS)
    if args.out_name.startswith(("phase1", "phase2", "phase3")) or os.path.basename(os.path.normpath(args.out_name)) != args.out_name:
        raise UserError(f"--out_name={args.out_name} would write over another phase's checkpoints or leave {args.out_dir}; "
                        "pick a new folder name such as phase4_control")
    vqa = [args.vqa_questions, args.vqa_annotations, args.vqa_images]
    if any(vqa) and not all(vqa):
        raise UserError("VQAv2 data needs all three of --vqa_questions, --vqa_annotations and --vqa_images")
    return args


def pack(images, rows, sp, max_answer_tokens, max_len):
    """Tokenize question records once -> SimpleNamespace(images uint8 (N,H,W,3), image [row per question],
    prompts [vqa_prompt ids], answers [answer ids + EOS], rows [records]). Answers are cut to
    max_answer_tokens; questions whose prompt + answer exceed max_len tokens are skipped."""
    prompts = [vqa_prompt(sp, r["question"]) for r in rows]
    answers = [vqa_answer_ids(sp, r["answer"]) for r in rows]
    answers = [a[:-1][:max_answer_tokens] + a[-1:] for a in answers]  # cut long answers, keep EOS
    keep = [k for k in range(len(rows)) if len(prompts[k]) + len(answers[k]) <= max_len]
    if len(keep) < len(rows):
        print(f"warning: {len(rows) - len(keep)} question(s) too long for the decoder's context; skipped",
              file=sys.stderr)
    return SimpleNamespace(images=images, image=np.array([rows[k]["image"] for k in keep], dtype=np.int64),
                           prompts=[prompts[k] for k in keep], answers=[answers[k] for k in keep],
                           rows=[rows[k] for k in keep])


def load_vqa_data(args, sp, image_size, max_len, run):
    """-> dict split -> packed questions (see pack), and the training answers of each type, most
    frequent first (the majority baseline and the ranking candidates come from them)."""
    def pack_split(images, rows):
        return pack(images, rows, sp, args.max_answer_tokens, max_len)

    if args.vqa_questions:
        images, rows = load_vqav2(args.vqa_questions, args.vqa_annotations, args.vqa_images, image_size,
                                  os.path.join(args.out_dir, "cache"), args.vqa_image_pattern)
        if len(images) < 3:
            raise UserError(f"{args.vqa_images} has {len(images)} usable image(s); need at least 3 (train, val, test)")
        # held-out images, half for val (picks best.pt) and half for test (reported): no image in two splits
        _, held = split_indices(len(images), max(args.vqa_val_frac, 2 / len(images)))
        tr_rows, held_rows = split_by_image(rows, held)
        te_rows, va_rows = split_by_image(held_rows, held[::2])
        data = {"train": pack_split(images, tr_rows), "val": pack_split(images, va_rows),
                "test": pack_split(images, te_rows)}
    else:
        ensure_world(args.world_dir, run)
        data = {s: pack_split(*load_world_vqa(args.world_dir, s)) for s in ("train", "val", "test")}
    for s, d in data.items():
        if not d.rows:
            raise UserError(f"no usable {s} questions")
    if data["train"].images.shape[1:3] != (image_size, image_size):
        raise UserError(f"the images are {data['train'].images.shape[1]}px but the model's ViT takes {image_size}px")
    ranked, _ = answers_by_type(data["train"].rows)
    return data, ranked


def vqa_batch(data, idx):
    """images (B,H,W,3) uint8 and right-padded (B,T) inputs/targets for questions idx.
    Row b is prompt + answer + EOS, shifted by one; targets are -1 on the prompt and on padding, so
    only the answer tokens and EOS carry loss."""
    seqs = [data.prompts[i] + data.answers[i] for i in idx]
    T = max(len(s) for s in seqs) - 1
    x = torch.full((len(seqs), T), PAD, dtype=torch.long)
    y = torch.full((len(seqs), T), -1, dtype=torch.long)
    for r, (i, s) in enumerate(zip(idx, seqs)):
        n_prompt = len(data.prompts[i])
        x[r, :len(s) - 1] = torch.tensor(s[:-1])
        # position t predicts token t+1: the first answer token is predicted at position n_prompt-1
        y[r, n_prompt - 1:len(s) - 1] = torch.tensor(s[n_prompt:])
    rows = data.image[np.asarray(idx)]
    order = np.argsort(rows, kind="stable")
    images = torch.from_numpy(np.asarray(data.images[rows[order]]))  # sorted reads: fast memmap
    return images[torch.from_numpy(np.argsort(order))], x, y


@torch.no_grad()
def evaluate(model, val, args, run):
    """Answer loss on the first eval_batches*batch_size val questions."""
    model.eval()
    losses = []
    n = min(len(val.rows), args.eval_batches * args.batch_size)
    for b0 in range(0, n, args.batch_size):
        imgs, x, y = to_device(run, *vqa_batch(val, np.arange(b0, min(b0 + args.batch_size, n))))
        with run.autocast:
            _, loss = model(imgs, x, y)
        losses.append(loss.item())
    model.train()
    return all_reduce_mean(float(np.mean(losses)), run)


def main(argv=None):
    args = parse_args(argv)
    # a resume must keep the optimizer's parameter groups and what the val loss means
    run = Run(args, "phase4", args.out_name, same_on_resume=("freeze_decoder", "freeze_vit", "batch_size", "eval_batches"))

    # ---- the VLM: from the chosen earlier phase, or everything back from last.pt
    ckpt = run.last_checkpoint()
    if ckpt:
        src, src_path = ckpt, run.last_path
    else:
        phase, command = INITS[args.init]
        src_path = os.path.join(args.out_dir, args.init, "best.pt")
        src = load_checkpoint(src_path, phase, run_first=command)
    if not src.get("vit_config"):
        raise UserError(f"{src_path} holds no vision model; phase 4 needs a phase 2 or phase 3 VLM")
    sp = checkpoint_tokenizer(src, src_path)
    model = build_model(src).to(run.device)
    assert isinstance(model, VLM)
    P = model.projector.num_tokens()

    # ---- data: (image, question, answer) triples, prompts and answers tokenized once
    data, ranked = load_vqa_data(args, sp, model.vit.cfg.image_size, model.decoder.cfg.max_seq_len - P, run)
    train, val = data["train"], data["val"]
    for p in model.decoder.parameters():
        p.requires_grad_(not args.freeze_decoder)
    for p in model.vit.parameters():
        p.requires_grad_(not args.freeze_vit)
    groups = [(list(model.vit.named_parameters()) + list(model.projector.named_parameters()), args.lr_vision),
              (model.decoder.named_parameters(), args.lr_decoder)]
    optimizer = make_optimizer(groups, args.weight_decay, (0.9, 0.95), run.device_type)
    run.start(model, optimizer, src["tokenizer"], ckpt, parent=src_path)
    dmodel = wrap_model(model, run, args.compile)

    # phase 1 text replay: every k-th step is a text batch instead of a question batch
    # (pointless, and nothing to backpropagate into, when the decoder is frozen)
    text_every = round(1 / args.text_frac) if args.text_frac > 0 and not args.freeze_decoder else 0
    if text_every:
        p1 = load_checkpoint(os.path.join(args.out_dir, "phase1", "best.pt"), "phase1",
                             run_first="python phase1_text.py` (phase 4 replays its text), or pass `--text_frac 0")
        text_train, _ = text_of_phase1(p1, args.out_dir, run)
    mean_len = float(np.mean([len(p) + len(a) for p, a in zip(train.prompts[:2000], train.answers[:2000])]))
    sample_flops = flops_per_sample(model, mean_len)
    types = ", ".join(f"{t} {len(a)}" for t, a in sorted(ranked.items()))
    run.log(f"device {run.device} x{run.world_size} | {len(train.rows):,} train questions on {len(set(train.image)):,} "
            f"images | {len(val.rows):,} val | {P} image tokens | from {src_path} | answers per type: {types}")
    if text_every:
        run.log(f"1 step in {text_every} replays a batch of phase 1 text ({len(text_train):,} tokens)")
    # phase 2's task: 1 step in replay_every captions labeled world images, at phase 2's share of relational captions
    args.relation_frac = src["args"].get("relation_frac", 0.0)
    replay_every = round(1 / args.replay_frac) if args.replay_frac > 0 else 0
    if replay_every and args.vqa_questions:
        run.log("caption replay off: it replays the built-in world's labeled images, and this run is on VQAv2")
        replay_every = 0
    if replay_every:
        # captions cut to what fits after the image tokens (BOS + caption = the input)
        captions = pack_captions(*load_world_split(args.world_dir, "caption_train"), sp,
                                 model.decoder.cfg.max_seq_len - P - 1)
        run.log(f"1 step in {replay_every} replays phase 2's captions ({len(captions.captions):,} labeled images)")

    # ---- training loop: answer questions, loss on the answer tokens only
    while True:
        if run.eval_due(args.eval_interval, args.max_steps):
            run.evaluated(evaluate(dmodel, val, args, run), "val answer loss")
            if run.master and run.step > 0:
                idx = np.arange(min(4, len(val.rows)))
                answers = vqa_generate(model, sp, np.asarray(val.images[val.image[idx]]),
                                       [val.rows[i]["question"] for i in idx], device=run.device)
                for i, a in zip(idx, answers):
                    run.log(f"   {val.rows[i]['question']}  model: {a} | ref: {val.rows[i]['answer']}")
        if run.step >= args.max_steps:
            break
        set_lr(optimizer, lr_at(run.step, 1.0, args.max_steps, args.warmup, args.min_lr_frac))
        replay = " (text replay)" if text_every and run.step % text_every == text_every - 1 else ""
        if not replay and replay_every and run.step % replay_every == replay_every - 1:
            replay = " (caption replay)"
        if replay == " (text replay)":
            loss, counts = replay_step(model.decoder, text_train, args.batch_size, run.gen, run)
        elif replay:
            loss, counts = caption_replay_step(lambda imgs, x, y: dmodel(imgs, x, y)[1], captions, args.batch_size,
                                               run.gen, run, args.relation_frac)
        else:
            idx = torch.randint(len(train.rows), (args.batch_size,), generator=run.gen).numpy()
            idx = idx[run.rank::run.world_size]  # same global batch, each rank its own rows
            imgs, x, y = to_device(run, *vqa_batch(train, idx))
            n_tok = int((y >= 0).sum())
            with run.autocast:
                _, loss = dmodel(imgs, x, y)
                loss = token_weighted(loss, n_tok, run)  # answers differ in length across ranks
            loss.backward()
            counts = dict(tokens=n_tok, images=len(idx), flops=sample_flops * len(idx))
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        run.stepped(loss, replay, **counts)
    best_path = run.finish()

    # ---- report: held-out questions from the best checkpoint, against the majority answer
    if run.master and args.n_test > 0:
        best = build_model(load_checkpoint(best_path, "phase4")).to(run.device)
        vqav2 = bool(args.vqa_questions)
        per, n = vqa_report(best, sp, data["test"], ranked, args.n_test, vqav2, args.max_answer_tokens, run.device)
        result = {"best_val_loss": run.best_val, "n_test": n, "init": args.init, "steps": run.step, "by_type": per}
        write_json_atomic(result, os.path.join(run.out, "results.json"))
    run.log(f"done: best val answer loss {run.best_val:.4f} -> {best_path}")
    cleanup(run)


if __name__ == "__main__":
    cli(main)
