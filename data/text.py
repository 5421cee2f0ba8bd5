"""
Text corpora -> sentence-level samples -> token ids in a .npy file that training memory-maps.

Two sources:
  * the built-in world's phase 1 corpus (one utterance per line), and
  * BabyLM-format folders: one `*.train` file per domain (childes.train, bnc_spoken.train, ...),
    with held-out `*_dev.train` (or `*.dev`) files used for validation when present.
BabyLM files are messy (one long line per file, inline `*CHI:` speaker tags, `A:\t` turns), so
like the paper we cut them into utterances/sentences, drop very short ones and truncate long ones.
"""
import glob
import os
import re
import sys

import numpy as np

from common import UserError

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
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp.npy"
    np.save(tmp, stream)
    os.replace(tmp, path)
    return stream


def unigram_entropy(stream, vocab_size):
    """Entropy (nats/token) of the corpus' token frequencies: the loss of a model that ignores context."""
    counts = np.bincount(np.asarray(stream, dtype=np.int64), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
