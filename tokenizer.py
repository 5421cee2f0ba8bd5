"""
The tokenizer: a sentencepiece BPE model with byte fallback, trained by this project on the text the
model will see. Ids: 0 = pad, 1 = unk, 2 = bos, 3 = eos. It is stored next to the checkpoints
(out_dir/tokenizer.model) and every checkpoint names its path.
"""
import io
import os
import re

import sentencepiece as spm

from common import UserError, write_atomic

PAD, UNK, BOS, EOS = 0, 1, 2, 3


def train_tokenizer(lines, model_path, vocab_size, max_lines=100_000):
    """Train BPE on an iterable of text lines and write model_path (.model). Byte fallback means no
    input is ever out of vocabulary; split_digits keeps numbers compositional. The normalizer folds case
    (NFKC + case folding) in training and in every later encode: child-directed speech is mostly lower
    case and benchmark sentences start with a capital, so "Only" and "only" must be one word."""
    lines = [l for l in lines if l.strip()]
    if not lines:
        raise UserError("no text to train the tokenizer on: the corpus is empty")
    if len(lines) > max_lines:  # an even subsample is plenty for a small vocabulary
        step = len(lines) / max_lines
        lines = [lines[int(i * step)] for i in range(max_lines)]
    os.makedirs(os.path.dirname(model_path) or ".", exist_ok=True)
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=buf, model_type="bpe", vocab_size=vocab_size,
            pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOS, byte_fallback=True, split_digits=True,
            character_coverage=1.0, hard_vocab_limit=False, num_threads=os.cpu_count() or 1,
            max_sentence_length=1 << 14, minloglevel=2, normalization_rule_name="nmt_nfkc_cf",
        )
    except RuntimeError as e:  # e.g. "Vocabulary size is smaller than required_chars. 260 vs 283."
        need = re.search(r"required_chars\. \d+ vs (\d+)", str(e))
        if need:
            raise UserError(f"--vocab_size={vocab_size} is too small for this corpus: its 4 special pieces, 256 bytes "
                            f"and distinct characters need at least {need.group(1)}")
        raise
    write_atomic(model_path, lambda f: f.write(buf.getvalue()))  # disk full or read-only: one line
    return load_tokenizer(model_path)


def load_tokenizer(model_path):
    if not os.path.exists(model_path):
        raise UserError(f"tokenizer {model_path} not found; run `python phase1_text.py` first (it trains one)")
    sp = spm.SentencePieceProcessor()
    try:
        sp.load(model_path)
    except Exception:
        raise UserError(f"{model_path} is not a sentencepiece model")
    return sp


def encode(sp, text, bos=True, eos=True):
    ids = sp.encode(text)
    return ([BOS] if bos else []) + ids + ([EOS] if eos else [])


def decode(sp, ids):
    return sp.decode([i for i in ids if i > EOS])
