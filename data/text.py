"""
Text corpora -> sentence-level samples -> token ids in a .npy file that training memory-maps, and the
text batches every phase draws from them (phase 1 learns from them, phases 2-4 replay them, phase 3
mixes them with its own captions).

Two sources:
  * the built-in world's phase 1 corpus (one utterance per line), and
  * BabyLM-format folders: one `*.train` file per domain (childes.train, bnc_spoken.train, ...),
    with held-out `*_dev.train` (or `*.dev`) files used for validation when present.
BabyLM files are messy (one long line per file, inline `*CHI:` speaker tags, `A:\t` turns), so
like the paper we cut them into utterances/sentences, drop very short ones and truncate long ones.
"""
import glob
import hashlib
import json
import os
import re
import sys

import numpy as np
import torch

from common import UserError, all_reduce_mean, flops_per_token, to_device
from tokenizer import BOS, EOS, load_tokenizer, train_tokenizer

# CHILDES '*CHI:' / '*PAR1:' / '*A:' speaker tags and '%com:' comment tiers, switchboard 'A:\t' turns
SPEAKER = re.compile(r"(?m)\*[A-Z][A-Z0-9]{0,3}:\s*|%[a-z]{2,4}:[^*]*|^[A-Z]{1,3}:\t")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_utterances(text, min_words=3, max_words=64):
    """Cut raw text into utterances: at speaker tags and newlines, then at sentence ends; a "sentence" longer
    than max_words (a transcript without punctuation) is cut into max_words pieces, none of it dropped."""
    out = []
    for chunk in SPEAKER.split(text):
        for line in chunk.split("\n"):
            for sent in SENTENCE_END.split(line):
                words = sent.split()
                for i in range(0, len(words), max_words):
                    piece = words[i:i + max_words]
                    if len(piece) >= min_words:  # "ah .", "okay ." carry almost nothing to learn from
                        out.append(" ".join(piece))
    return out


def read_babylm_folder(folder, val_frac=0.02):
    """Returns (train_lines, val_lines). Validation comes from *_dev.train / *.dev files if the folder
    has them, else from the last val_frac of every training file."""
    if not os.path.isdir(folder):
        raise UserError(f"data folder {folder} does not exist")
    files = sorted(glob.glob(os.path.join(folder, "*.train")))
    dev = [f for f in files if f.endswith("_dev.train")] + sorted(glob.glob(os.path.join(folder, "*.dev")))
    train = [f for f in files if f not in dev]
    if not train:
        raise UserError(f"no *.train files in {folder}: expected BabyLM format (one <domain>.train file per source)")
    train_lines, val_lines = [], []
    for f in train:
        lines = split_utterances(read_text(f))
        if not dev:  # hold out the tail of each domain so every domain is in validation
            cut = int(len(lines) * (1 - val_frac))
            lines, held = lines[:cut], lines[cut:]
            val_lines += held
        train_lines += lines
    for f in dev:
        val_lines += split_utterances(read_text(f))
    if dev:  # a dev file may repeat training text (the shared sample's childes_dev.train is childes.train's tail)
        seen = set(train_lines)
        kept = [l for l in val_lines if l not in seen]
        if len(kept) < len(val_lines):
            print(f"warning: dropped {len(val_lines) - len(kept):,} of {len(val_lines):,} validation utterances that "
                  "are also in the training files", file=sys.stderr)
        val_lines = kept
    if not train_lines or not val_lines:
        raise UserError(f"{folder} has no usable text (every utterance shorter than 3 words?)")
    return train_lines, val_lines


def read_text(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def read_lines(path):
    if not os.path.exists(path):
        raise UserError(f"text file {path} not found")
    with open(path, encoding="utf-8") as f:
        return [l.strip() for l in f if l.strip()]


def tokenize_lines(lines, sp, path, bos, eos):
    """Encode every line as [BOS] ids [EOS] and concatenate into one stream stored at path (.npy,
    uint16 when the vocabulary fits). Training samples windows from the stream (packing), so no
    compute is spent on padding; BOS marks where each utterance starts."""
    dtype = np.uint16 if sp.get_piece_size() < 2 ** 16 else np.uint32
    chunks = []
    for i in range(0, len(lines), 10000):
        for ids in sp.encode(lines[i:i + 10000]):
            chunks.append(np.array([bos] + ids + [eos], dtype=dtype))
    stream = np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtype)
    from common import write_atomic
    write_atomic(path, lambda f: np.save(f, stream))  # a full disk is one line, never half a stream
    return stream


def unigram_entropy(stream, vocab_size):
    """Entropy (nats/token) of the corpus' token frequencies: the loss of a model that ignores context."""
    counts = np.bincount(np.asarray(stream, dtype=np.int64), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


# -----------------------------------------------------------------------------
# Phase 1's corpus, prepared once per out dir: tokenizer + token streams

def prepare_text(out_dir, data_dir, world_dir, vocab_size, seq_len, run):
    """Text lines -> tokenizer (trained once, saved in out_dir) -> train/val token streams (.npy,
    memory-mapped). data_dir: a BabyLM-format folder, or "" for the built-in world's phase 1 text.
    Only rank 0 writes; the other ranks wait and read. Returns (tokenizer, its path, train, val)."""
    from common import show_progress, write_json_atomic
    os.makedirs(out_dir, exist_ok=True)
    tok_path = os.path.join(out_dir, "tokenizer.model")
    source = os.path.abspath(data_dir) if data_dir else "world:" + os.path.abspath(world_dir)
    vocab = vocab_size or (4096 if data_dir else 512)
    info_path = os.path.join(out_dir, "data.json")
    info = read_info(info_path) if os.path.exists(tok_path) and os.path.exists(info_path) else None
    if info and "tokens" in info:  # paths relative to out_dir: a moved or copied project still finds them
        train_path, val_path = (os.path.join(out_dir, info["tokens"][s]) for s in ("train", "val"))
    else:  # named after the source first recorded (older data.json: its absolute path)
        key = hashlib.sha1(f"{info['source'] if info else source}|{vocab}".encode()).hexdigest()[:10]
        train_path, val_path = (os.path.join(out_dir, "tokens", f"phase1_{key}_{s}.npy") for s in ("train", "val"))
    if run.master and not data_dir:
        from data.world import ensure_built
        ensure_built(world_dir, progress=show_progress(getattr(run, "args", None)))
    fingerprint = source_fingerprint(data_dir, world_dir) if run.master else None  # hashes the corpus once
    if run.master and info:
        # one tokenizer per out_dir: later phases and checkpoints there depend on it, so never replace it
        recorded = resolve_source(info["source"], out_dir)
        moved = recorded != source and info.get("fingerprint") == fingerprint  # same text, another place
        if recorded != source and not moved:
            def name(s):
                return f"--world_dir {s.removeprefix('world:')}" if s.startswith("world:") else f"--data_dir {s}"
            raise UserError(f"{out_dir} holds a tokenizer made from {name(recorded)}, not {name(source)}; pass "
                            f"{name(recorded)} as before, or use another --out_dir for this corpus")
        if info.get("requested_vocab", vocab) != vocab:
            raise UserError(f"{out_dir} already holds a {info['requested_vocab']}-piece tokenizer; "
                            f"use another --out_dir for --vocab_size={vocab}")
        if "fingerprint" in info and info["fingerprint"] != fingerprint:
            raise UserError(f"the text in {source.removeprefix('world:')} changed since {out_dir} was prepared "
                            "from it; use another --out_dir (its tokenizer and checkpoints belong to the old text)")
    if run.master and not (os.path.exists(train_path) and os.path.exists(val_path) and os.path.exists(tok_path)):
        if data_dir:
            train_lines, val_lines = read_babylm_folder(data_dir)
            tok_lines = train_lines
        else:
            train_lines = read_lines(os.path.join(world_dir, "text_train.txt"))
            val_lines = read_lines(os.path.join(world_dir, "text_val.txt"))
            # the tokenizer also sees the caption/QA text later phases use, so every word of the
            # world is a piece from the start (the model itself only sees phase 1 text here)
            tok_lines = train_lines + world_extra_text(world_dir)
        requested = vocab
        if info:  # same corpus (checked above): reuse its tokenizer
            sp = load_tokenizer(tok_path)
            requested = info.get("requested_vocab", vocab)
        else:
            print(f"training a {vocab}-piece BPE tokenizer on {len(tok_lines):,} lines -> {tok_path}")
            sp = train_tokenizer(tok_lines, tok_path, vocab)
        tokenize_lines(train_lines, sp, train_path, BOS, EOS)
        tokenize_lines(val_lines, sp, val_path, BOS, EOS)
        recorded = info["source"] if info else relative_source(source, out_dir)
        write_json_atomic({"source": recorded, "vocab_size": sp.get_piece_size(), "requested_vocab": requested,
                           "fingerprint": fingerprint, "world_dir": world_dir, "data_dir": data_dir,
                           "tokens": {"train": os.path.relpath(train_path, out_dir),
                                      "val": os.path.relpath(val_path, out_dir)}}, info_path)
    if run.ddp:
        import torch.distributed as dist
        dist.barrier()
    sp = load_tokenizer(tok_path)
    train = np.load(train_path, mmap_mode="r")
    val = np.load(val_path, mmap_mode="r")
    if len(train) <= seq_len + 1 or len(val) <= seq_len + 1:
        raise UserError(f"corpus too small for --seq_len={seq_len}: {len(train)} train / {len(val)} val tokens")
    return sp, tok_path, train, val


def relative_source(source, out_dir):
    """data.json records a folder inside out_dir relative to it (so the project can move), others absolute."""
    prefix = "world:" if source.startswith("world:") else ""
    path, top = source.removeprefix(prefix), os.path.abspath(out_dir)
    return prefix + os.path.relpath(path, top) if path.startswith(top + os.sep) else source


def resolve_source(recorded, out_dir):
    """The absolute source of a data.json entry (relative ones are relative to out_dir)."""
    prefix = "world:" if recorded.startswith("world:") else ""
    path = recorded.removeprefix(prefix)
    return prefix + (path if os.path.isabs(path) else os.path.abspath(os.path.join(out_dir, path)))


def source_fingerprint(data_dir, world_dir):
    """A hash of what phase 1 reads, so tokens and a tokenizer made from older text are never reused: the
    BabyLM files' bytes, or the world's meta.json (its seed, scale and format decide every file)."""
    if data_dir:
        files = sorted(glob.glob(os.path.join(data_dir, "*.train")) + glob.glob(os.path.join(data_dir, "*.dev")))
    else:
        from data.world import ensure_built
        ensure_built(world_dir)  # built by prepare_text already: this reads its meta.json
        files = [os.path.join(world_dir, "meta.json")]
    h = hashlib.sha1()
    for path in files:
        h.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def read_info(path):
    """out_dir/data.json: what phase 1's tokenizer and token streams were made from."""
    from common import read_json
    info = read_json(path)
    if not isinstance(info, dict) or not isinstance(info.get("source"), str) or not (
            "tokens" not in info or isinstance(info["tokens"], dict) and
            all(isinstance(info["tokens"].get(k), str) for k in ("train", "val"))):
        raise UserError(f"{path}: \"source\" must be a string and \"tokens\" a {{\"train\", \"val\"}} object of paths; "
                        "it is damaged: restore it, or use another --out_dir")
    return info


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


def text_of_phase1(p1_ckpt, out_dir, run):
    """Phase 1's (train, val) token streams for a later phase: the corpus phase 1 recorded in out_dir's
    data.json, tokenized with out_dir's tokenizer, which every checkpoint there shares.
    Not the folders phase 1's args name: those may be relative to another directory, or renamed since
    (they are the fallback when the recorded world is gone: a moved project). Never a new world built."""
    a = p1_ckpt["args"]
    data_dir, world_dir = a.get("data_dir", ""), a.get("world_dir", "data/world")
    info_path = os.path.join(out_dir, "data.json")
    source = resolve_source(read_info(info_path)["source"], out_dir) if os.path.exists(info_path) else ""
    if source.startswith("world:"):
        recorded = source.removeprefix("world:")
        found = [w for w in (recorded, world_dir) if os.path.exists(os.path.join(w, "meta.json"))]
        if not found:
            raise UserError(f"{info_path} says phase 1 read the world in {recorded}, which is gone; put it back, or "
                            f"rebuild it there with `python -m data.world --out {recorded}` and phase 1's settings")
        world_dir, data_dir = found[0], ""
    elif source:
        data_dir = source
    _, _, train, val = prepare_text(out_dir, data_dir, world_dir, a.get("vocab_size", 0), a["seq_len"], run)
    return train, val


# -----------------------------------------------------------------------------
# Batches of text

def utterance_starts(stream, seq_len):
    """Offsets of every BOS in the stream that has a whole window (seq_len + 1 tokens) after it: the
    starts of sentence-level samples. A minimal pair is scored from BOS at position 0, so a model
    trained on windows that start there learns the case it is tested on."""
    s = np.asarray(stream)
    return np.flatnonzero(s[:len(s) - seq_len - 1] == BOS)


def get_batch(stream, batch_size, seq_len, gen, run, starts=None):
    """Random windows of seq_len+1 tokens from the packed stream -> inputs x and targets y (B, T), y
    being x shifted by one. starts: None = a window may start anywhere; else an array of allowed
    offsets (utterance_starts: sentence-level samples, which run on into the next utterances, so
    nothing is padded). Every rank draws the same global batch (same generator) and keeps its own
    rows, so N ranks = one process with the same batch."""
    if starts is None:
        starts = torch.randint(len(stream) - seq_len - 1, (batch_size,), generator=gen)
    else:
        starts = torch.from_numpy(starts[torch.randint(len(starts), (batch_size,), generator=gen).numpy()])
    starts = starts[run.rank::run.world_size].numpy()
    xy = torch.from_numpy(np.stack([stream[s:s + seq_len + 1] for s in starts]).astype(np.int64))  # (b, T+1)
    return to_device(run, xy[:, :-1], xy[:, 1:])


@torch.no_grad()
def val_loss(model, stream, batch_size, seq_len, iters, run, starts=None):
    """Mean loss over the same `iters` batches every time (own generator: the training RNG is untouched)."""
    model.eval()
    gen = torch.Generator().manual_seed(1234)
    losses = []
    for _ in range(iters):
        x, y = get_batch(stream, batch_size, seq_len, gen, run, starts)
        with run.autocast:
            _, loss = model(x, y)
        losses.append(loss.item())
    model.train()
    return all_reduce_mean(float(np.mean(losses)), run)


REPLAY_LEN = 64  # phases 2 and 4 replay phase 1 text in windows about as long as their own sequences


def replay_batch(stream, batch_size, decoder_cfg, gen, run):
    """A phase 1 text batch for a later phase's replay step, never longer than the decoder's context."""
    return get_batch(stream, batch_size, min(REPLAY_LEN, decoder_cfg.max_seq_len), gen, run)


def replay_step(decoder, stream, batch_size, gen, run):
    """Forward + backward of one phase 1 text batch through a VLM's decoder, so a later phase does not
    erase language. Returns (loss, meter counts).
    The decoder is called outside DDP's forward (the VLM's wants images), so DDP averages nothing: the
    gradients are averaged over ranks here, as DDP would have done."""
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
    return loss.detach(), dict(tokens=x.numel(), flops=flops_per_token(decoder, x.size(1)) * x.numel())
