"""
Benchmarks for every phase's checkpoint, side by side.

The scoring functions at the top are also what the phase scripts call for their own end-of-run
reports, so every number in this project is computed one way.
"""
import math
import re
from collections import Counter, defaultdict

import numpy as np
import torch
import torch.nn.functional as F

from model import VLM
from tokenizer import BOS, EOS, PAD, decode


def decoder_of(model):
    return model.decoder if isinstance(model, VLM) else model


def pad_batch(seqs, pad=PAD):
    """Right-pad lists of ids -> (B, T) long tensor and (B, T) bool mask of real entries."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    real = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        real[i, :len(s)] = True
    return ids, real


@torch.no_grad()
def sequence_logprobs(model, seqs, images=None, score_from=None, batch_size=64, device="cpu"):
    """Sum of log p(token | everything before it) for each sequence of ids (each starts with BOS, which
    is conditioned on, not scored). score_from[i]: score only tokens at positions >= score_from[i]
    (e.g. only the answer after a question). images: optional uint8 (N, H, W, 3), one per sequence,
    fed as the VLM's prefix. Returns (list of summed log-probs, list of scored-token counts)."""
    model.eval()
    out_lp, out_n = [], []
    for b0 in range(0, len(seqs), batch_size):
        chunk = seqs[b0:b0 + batch_size]
        ids, real = pad_batch(chunk)
        ids, real = ids.to(device), real.to(device)
        if images is not None:
            imgs = torch.from_numpy(np.array(images[b0:b0 + batch_size])).to(device)
            logits = model.all_logits(imgs, ids)
        else:
            logits = decoder_of(model).all_logits(ids)
        logp = F.log_softmax(logits[:, :-1].float(), dim=-1)  # position t predicts token t+1
        tok_lp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
        keep = real[:, 1:].clone()
        if score_from is not None:
            pos = torch.arange(1, ids.size(1), device=device)[None, :]
            start = torch.tensor(score_from[b0:b0 + batch_size], device=device)[:, None]
            keep &= pos >= start
        out_lp += (tok_lp * keep).sum(1).tolist()
        out_n += keep.sum(1).tolist()
    return out_lp, out_n


def encode_sentence(sp, text):
    return [BOS] + sp.encode(text) + [EOS]


def minimal_pairs(model, sp, pairs, device="cpu"):
    """BLiMP-style: the model is right when log p(good) > log p(bad), summing token log-probs (the
    BabyLM convention). pairs: dicts with sentence_good, sentence_bad and a paradigm id (UID).
    Returns {"per_paradigm": {uid: acc}, "macro": mean over paradigms, "n": pairs}."""
    seqs = []
    for p in pairs:
        seqs += [encode_sentence(sp, p["sentence_good"]), encode_sentence(sp, p["sentence_bad"])]
    lp, _ = sequence_logprobs(model, seqs, device=device)
    right = defaultdict(list)
    for i, p in enumerate(pairs):
        uid = p.get("UID") or p.get("paradigm") or p.get("linguistics_term") or "all"
        right[uid].append(lp[2 * i] > lp[2 * i + 1])
    per = {k: float(np.mean(v)) for k, v in sorted(right.items())}
    return {"per_paradigm": per, "macro": float(np.mean(list(per.values()))) if per else float("nan"), "n": len(pairs)}


def text_loss(model, sp, lines, device="cpu"):
    """Mean loss (nats/token) and bits per byte (tokenizer-independent) on held-out lines."""
    seqs = [encode_sentence(sp, l) for l in lines]
    lp, n = sequence_logprobs(model, seqs, device=device)
    nbytes = sum(len(l.encode("utf-8")) + 1 for l in lines)  # +1: the end of each line
    nats = -sum(lp)
    return {"loss": nats / sum(n), "bpb": nats / math.log(2) / nbytes}


def winoground(model, sp, items, images, device="cpu"):
    """Winoground-style matching. Each item: two images, two captions with the same words, caption k
    true of image k. text score: both images prefer their own caption; image score: both captions
    prefer their own image; group: both. Returns the three accuracies."""
    seqs, imgs = [], []
    for it in items:
        for i in (0, 1):
            for c in (0, 1):
                seqs.append(encode_sentence(sp, it[f"caption_{c}"]))
                imgs.append(images[it[f"image_{i}"]])
    lp, _ = sequence_logprobs(model, seqs, images=np.stack(imgs), device=device)
    text = image = group = 0
    for k in range(len(items)):
        s = lp[4 * k:4 * k + 4]  # s[2*i + c] = log p(caption c | image i)
        t_ok = s[0] > s[1] and s[3] > s[2]
        i_ok = s[0] > s[2] and s[3] > s[1]
        text += t_ok
        image += i_ok
        group += t_ok and i_ok
    n = max(len(items), 1)
    return {"text": text / n, "image": image / n, "group": group / n}


@torch.no_grad()
def generate_text(model, sp, images, prompts, max_new_tokens=40, batch_size=64, device="cpu", **kw):
    """Greedy (or sampled, via kw) continuations of prompts (lists of ids) given images -> strings."""
    model.eval()
    out = []
    for b0 in range(0, len(prompts), batch_size):
        imgs = torch.from_numpy(np.array(images[b0:b0 + batch_size])).to(device)
        new = model.generate(imgs, prompts[b0:b0 + batch_size], max_new_tokens, eos_id=EOS, **kw)
        out += [decode(sp, ids) for ids in new]
    return out


def caption_images(model, sp, images, max_new_tokens=40, batch_size=64, device="cpu", **kw):
    return generate_text(model, sp, images, [[BOS]] * len(images), max_new_tokens, batch_size, device, **kw)


def caption_accuracy(captions, scenes):
    """Fraction of captions that are exactly correct: every stated attribute/relation/count true of the
    scene (checked by the world's own parser, independent of the caption generator)."""
    from data.world import check_caption
    ok = [check_caption(s, c) for c, s in zip(captions, scenes)]
    return float(np.mean(ok)) if ok else float("nan")


# ---- BLEU-4 (Papineni et al. 2002), corpus level, for real captions

def _ngrams(words, n):
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def tokenize_caption(s):
    return re.findall(r"[a-z0-9]+", s.lower())


def bleu4(hyps, refs_list):
    """Corpus BLEU-4: clipped n-gram precisions (n=1..4) pooled over the corpus, geometric mean,
    times the brevity penalty against the closest reference length."""
    match, total = [0] * 4, [0] * 4
    hyp_len = ref_len = 0
    for hyp, refs in zip(hyps, refs_list):
        h = tokenize_caption(hyp)
        rs = [tokenize_caption(r) for r in refs]
        hyp_len += len(h)
        ref_len += min((abs(len(r) - len(h)), len(r)) for r in rs)[1]
        for n in range(1, 5):
            hc = _ngrams(h, n)
            maxref = Counter()
            for r in rs:
                maxref |= _ngrams(r, n)
            match[n - 1] += sum(min(c, maxref[g]) for g, c in hc.items())
            total[n - 1] += max(len(h) - n + 1, 0)
    if min(match) == 0:
        return 0.0
    log_p = sum(math.log(m / t) for m, t in zip(match, total)) / 4
    bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / max(hyp_len, 1))
    return bp * math.exp(log_p)


# ---- VQA

def normalize_answer(s):
    from data.world import normalize_answer as world_norm
    return world_norm(s)


def vqa_accuracy(pred, answers):
    """The standard VQA accuracy: min(#annotators who gave this answer / 3, 1). With one reference
    answer this is exact match."""
    p = normalize_answer(pred)
    answers = [normalize_answer(a) for a in answers]
    if len(answers) == 1:
        return float(p == answers[0])
    return min(sum(a == p for a in answers) / 3.0, 1.0)


# The one prompt format of phase 4, used for training, generation and ranking alike:
#   [BOS] "question : <question> answer :" <answer tokens> [EOS]   (loss on the answer and EOS only)
def vqa_prompt(sp, question):
    return [BOS] + sp.encode(f"question : {question} answer :")


def vqa_answer_ids(sp, answer):
    return sp.encode(answer) + [EOS]


def vqa_generate(model, sp, images, questions, max_new_tokens=8, batch_size=64, device="cpu"):
    """Greedy answers (strings) to questions about images (one image per question)."""
    prompts = [vqa_prompt(sp, q) for q in questions]
    return generate_text(model, sp, images, prompts, max_new_tokens, batch_size, device)


def vqa_rank(model, sp, images, questions, candidates, batch_size=64, device="cpu"):
    """Pick, for each question, the candidate answer with the highest log p(answer, EOS | image, question)
    (summed over the answer's tokens, as the BabyLM VQA task ranks answers against distractors)."""
    seqs, imgs, starts, owner = [], [], [], []
    for k, (q, cands) in enumerate(zip(questions, candidates)):
        prompt = vqa_prompt(sp, q)
        for c in cands:
            seqs.append(prompt + vqa_answer_ids(sp, c))
            starts.append(len(prompt))  # score from the first answer token on
            imgs.append(k)
            owner.append(k)
    lp, _ = sequence_logprobs(model, seqs, images=np.asarray(images)[imgs], score_from=starts,
                              batch_size=batch_size, device=device)
    best = {}
    j = 0
    for k, cands in enumerate(candidates):
        scores = lp[j:j + len(cands)]
        best[k] = cands[int(np.argmax(scores))]
        j += len(cands)
    return [best[k] for k in range(len(candidates))]
