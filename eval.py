"""
Benchmarks for every phase's checkpoint, side by side.

The scoring functions at the top are also what the phase scripts call for their own end-of-run
reports, so every number in this project is computed one way.
"""
import math
import os
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
def sequence_logprobs(model, seqs, images=None, score_from=None, batch_size=64, device="cpu", prefix=None):
    """Sum of log p(token | everything before it) for each sequence of ids (each starts with BOS, which
    is conditioned on, not scored). score_from[i]: score only tokens at positions >= score_from[i]
    (e.g. only the answer after a question). images: optional uint8 (N, H, W, 3), one per sequence,
    fed as the VLM's prefix; or prefix: the image tokens themselves, (N, P, D), when many sequences share
    an image (encode it once). Returns (list of summed log-probs, list of scored-token counts)."""
    model.eval()
    out_lp, out_n = [], []
    for b0 in range(0, len(seqs), batch_size):
        chunk = seqs[b0:b0 + batch_size]
        ids, real = pad_batch(chunk)
        ids, real = ids.to(device), real.to(device)
        # the last token predicts nothing that is scored: leave it out, so a sequence may fill the context
        if prefix is not None:
            logits = decoder_of(model).all_logits(ids[:, :-1], prefix=prefix[b0:b0 + batch_size])
        elif images is not None:
            imgs = torch.from_numpy(np.array(images[b0:b0 + batch_size])).to(device)
            logits = model.all_logits(imgs, ids[:, :-1])
        else:
            logits = decoder_of(model).all_logits(ids[:, :-1])
        logp = F.log_softmax(logits.float(), dim=-1)  # position t predicts token t+1
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
    Returns {"per_paradigm": {uid: acc}, "macro": mean over paradigms, "n": pairs, "right": 1/0 per pair}."""
    seqs = []
    for p in pairs:
        seqs += [encode_sentence(sp, p["sentence_good"]), encode_sentence(sp, p["sentence_bad"])]
    lp, _ = sequence_logprobs(model, seqs, device=device)
    right = defaultdict(list)
    items = []
    for i, p in enumerate(pairs):
        uid = p.get("UID") or p.get("paradigm") or p.get("linguistics_term") or "all"
        right[uid].append(lp[2 * i] > lp[2 * i + 1])
        items.append(int(lp[2 * i] > lp[2 * i + 1]))
    per = {k: float(np.mean(v)) for k, v in sorted(right.items())}
    return {"per_paradigm": per, "macro": float(np.mean(list(per.values()))) if per else float("nan"), "n": len(pairs),
            "right": items}


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
    right = []
    for k in range(len(items)):
        s = lp[4 * k:4 * k + 4]  # s[2*i + c] = log p(caption c | image i)
        t_ok = s[0] > s[1] and s[3] > s[2]
        i_ok = s[0] > s[2] and s[3] > s[1]
        text += t_ok
        image += i_ok
        group += t_ok and i_ok
        right.append(int(t_ok and i_ok))
    n = max(len(items), 1)
    return {"text": text / n, "image": image / n, "group": group / n, "right": right}


@torch.no_grad()
def generate_text(model, sp, images, prompts, max_new_tokens=40, batch_size=64, device="cpu", **kw):
    """Greedy (or sampled, via kw) continuations of prompts (lists of ids) given images -> strings."""
    from common import UserError
    model.eval()
    out = []
    for b0 in range(0, len(prompts), batch_size):
        imgs = torch.from_numpy(np.array(images[b0:b0 + batch_size])).to(device)
        batch = prompts[b0:b0 + batch_size]
        # an answer can only be as long as the context has room for after the image and the prompt
        longest, P, ctx = max(len(p) for p in batch), model.projector.num_tokens(), model.decoder.cfg.max_seq_len
        room = ctx - P - longest
        if room < 1:
            raise UserError(f"a {longest}-token prompt after {P} image tokens fills the model's {ctx}-token context")
        new = model.generate(imgs, batch, min(max_new_tokens, room), eos_id=EOS, **kw)
        out += [decode(sp, ids) for ids in new]
    return out


def caption_images(model, sp, images, max_new_tokens=40, batch_size=64, device="cpu", **kw):
    return generate_text(model, sp, images, [[BOS]] * len(images), max_new_tokens, batch_size, device, **kw)


def caption_scores(captions, scenes):
    """Fractions of captions that are correct (every stated attribute/relation/count true of the scene),
    exactly correct (correct AND naming at least one of the scene's objects by colour and shape, so a
    safe platitude like "there are no orange crosses ." does not count) and complete (also states the
    number of objects and names them all). Judged by the world's own parser, independent of the
    caption generator."""
    from data.judge import caption_quality
    q = [caption_quality(s, c) for c, s in zip(captions, scenes)]
    if not q:
        return {"correct": float("nan"), "exact": float("nan"), "complete": float("nan")}
    return {"correct": float(np.mean([x["correct"] for x in q])),
            "exact": float(np.mean([x["informative"] for x in q])),
            "complete": float(np.mean([x["complete"] for x in q]))}


def caption_report(model, sp, test, n, device="cpu"):
    """Greedy captions of the first n held-out images, scored and printed (phase 2's report): for world
    scenes exact/complete and exact by number of objects (a full description must name every object
    right: harder with more objects); for real photos BLEU-4. Returns the scores as a dict."""
    n = min(n, len(test.captions))
    caps = caption_images(model, sp, test.images[:n], device=device)
    result = {"n_test": n}
    if test.scenes[0] is not None:
        sc = caption_scores(caps, test.scenes[:n])
        result.update(caption_accuracy=sc["exact"], caption_complete=sc["complete"], distinct_captions=len(set(caps)))
        print(f"held-out world images: {100 * sc['exact']:.1f}% of {n} greedy captions exactly correct "
              f"(true and naming objects by colour and shape), {100 * sc['complete']:.1f}% complete "
              f"(every object named, count stated); {len(set(caps))} distinct captions")
        groups = {}
        for c, scene in zip(caps, test.scenes[:n]):
            cs, ss = groups.setdefault(len(scene["objects"]), ([], []))
            cs.append(c)
            ss.append(scene)
        by_objects = {k: caption_scores(cs, ss)["exact"] for k, (cs, ss) in sorted(groups.items())}
        result["caption_accuracy_by_objects"] = by_objects
        print("   by number of objects: " + ", ".join(
            f"{k}: {100 * a:.0f}% of {len(groups[k][0])}" for k, a in by_objects.items()))
    else:
        result["bleu4"] = bleu4(caps, test.texts[:n])
        print(f"held-out images: BLEU-4 {100 * result['bleu4']:.2f} on {n} greedy captions")
    for c, refs in list(zip(caps, test.texts))[:5]:
        print(f"   model: {c}\n     ref: {refs[0]}")
    return result


def language_scores(model, sp, world_dir, device):
    """The world's language probes on their test split (see data/benchmarks.py): existence, relation, syntax
    (minimal pairs), their mean, and the surprisal gaps in bits. What phase 3 reports about its own checkpoint."""
    from data.world import read_meta
    out = {}
    for name, rows in probe_sets(read_probes(world_dir), "test").items():
        out[name] = minimal_pairs(model, sp, rows, device)["macro"]
    out["language_avg"] = float(np.mean([out[k] for k in PROBE_KEYS]))
    out.update(surprisal_gaps(model, sp, read_meta(world_dir), device))
    return out


def read_probes(world_dir):
    """Every probe item and syntax minimal pair of a built world, in file order."""
    from common import read_jsonl
    return read_jsonl(os.path.join(world_dir, "probes.jsonl")) + read_jsonl(os.path.join(world_dir, "minimal_pairs.jsonl"))


def probe_sets(items, split):
    """Probe and minimal-pair rows of one split -> {"existence": [...], "relation": [...], "syntax": [...]}."""
    sets = {k: [] for k in PROBE_KEYS}
    for r in items:
        if r.get("split", "test") == split:
            sets[r.get("probe", "syntax")].append(r)
    return sets


def surprisal_gaps(model, sp, meta, device):
    """How surprised the decoder is by a shape after its colour, -log2 p(shape | "there is a <size> <colour>"),
    for the S pairs (held out of phase 1, named in phase 2) and the U pairs (named nowhere, only seen in the
    unlabeled images), minus the same for the pairs phase 1 read: in bits, 0 = as expected as a seen pair."""
    groups = {"S": meta["heldout_combos"], "U": meta["unseen_combos"],
              "seen": [f"{c} {s}" for c in meta["colors"] for s in meta["shapes"]
                       if f"{c} {s}" not in set(meta["heldout_combos"] + meta["unseen_combos"] + meta["foil_combos"])]}
    seqs, starts, owner = [], [], []
    for g, pairs in groups.items():
        for pair in pairs:
            color, shape = pair.split()
            for size in meta["sizes"]:
                prompt = [BOS] + sp.encode(f"there is a {size} {color}")  # sizes start with a consonant: "a"
                seqs.append(prompt + sp.encode(shape))
                starts.append(len(prompt))
                owner.append(g)
    lp, n = sequence_logprobs(model, seqs, score_from=starts, device=device)
    bits = defaultdict(list)
    for g, l in zip(owner, lp):
        bits[g].append(-l / math.log(2))
    seen = float(np.mean(bits["seen"]))
    return {"gap_s": float(np.mean(bits["S"])) - seen, "gap_u": float(np.mean(bits["U"])) - seen}


@torch.no_grad()
def productive_vocabulary(model, sp, meta, n=1000, seed=0, device="cpu"):
    """What the decoder says on its own: n samples from BOS at temperature 1. -> the share of lines naming a U pair
    (never said in training text, only seen in the unlabeled images), the same for F pairs (seen nowhere: what
    sampling noise alone says), the share of U pairs named at least once, and the share of grammatical lines
    (the world's own judge)."""
    from data.judge import is_grammatical
    from data.talk import mentions
    dec = decoder_of(model)
    dec.eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    unseen = [tuple(p.split()) for p in meta["unseen_combos"]]
    foils = {tuple(p.split()) for p in meta["foil_combos"]}
    lines = []
    for b0 in range(0, n, 250):
        new = dec.generate([[BOS]] * min(250, n - b0), min(48, dec.cfg.max_seq_len - 1), temperature=1.0, eos_id=EOS,
                           generator=gen)
        lines += [decode(sp, ids) for ids in new]
    named = {p for p in unseen if any(mentions(x, {p}) for x in lines)}
    return {"u_said": float(np.mean([mentions(x, set(unseen)) for x in lines])),
            "f_said": float(np.mean([mentions(x, foils) for x in lines])), "u_pairs_named": len(named) / len(unseen),
            "grammatical": float(np.mean([is_grammatical(x) for x in lines])), "examples": lines[:5]}


def u_naming(captions, scenes, unseen):
    """Of the U objects in the images (colour+shape pairs no training caption ever named), the share whose caption
    names them by colour and shape ("red circle(s)"): does the captioner compose words it learned apart?"""
    from data.talk import mentions
    unseen = {tuple(p.split()) for p in unseen}
    hits = [mentions(c, {(o["color"], o["shape"])}) for c, s in zip(captions, scenes) for o in s["objects"]
            if (o["color"], o["shape"]) in unseen]
    return float(np.mean(hits)) if hits else None


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
    from data.judge import normalize_answer as world_norm
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


def vqa_rank(model, sp, images, questions, candidates, batch_size=64, device="cpu", per_token=True):
    """Pick, for each question, the candidate answer with the highest log p(answer, EOS | image, question).
    per_token: the mean over the answer's tokens (EOS included), so a long right answer ("the red circle") is not
    beaten by a short wrong one ("no") for its length alone; False sums them, the BabyLM ranking."""
    seqs, imgs, starts = [], [], []
    for k, (q, cands) in enumerate(zip(questions, candidates)):
        prompt = vqa_prompt(sp, q)
        for c in cands:
            seqs.append(prompt + vqa_answer_ids(sp, c))
            starts.append(len(prompt))  # score from the first answer token on
            imgs.append(k)
    model.eval()
    with torch.no_grad():  # each image's tokens once, shared by all its candidate answers
        tokens = torch.cat([model.encode_images(torch.from_numpy(np.array(images[b0:b0 + batch_size])).to(device))
                            for b0 in range(0, len(images), batch_size)])
    lp, n = sequence_logprobs(model, seqs, score_from=starts, batch_size=batch_size, device=device,
                              prefix=tokens[torch.tensor(imgs, device=device)])
    scores = [l / k for l, k in zip(lp, n)] if per_token else lp
    out, j = [], 0
    for cands in candidates:
        out.append(cands[int(np.argmax(scores[j:j + len(cands)]))])
        j += len(cands)
    return out


def vqa_test_table(model, sp, test, ranked, n, vqav2, max_answer_tokens, device):
    """Accuracy by type on the first n test questions: majority baseline, greedy, ranked.
    Returns {type: {n, majority, greedy, ranked}} with an 'all' entry, and the greedy answers."""
    rows = test.rows[:n]
    imgs = np.asarray(test.images[test.image[:n]])  # one image per question
    questions = [r["question"] for r in rows]
    greedy = vqa_generate(model, sp, imgs, questions, max_new_tokens=max_answer_tokens, device=device)
    from data.vqa import vqav2_candidates, world_candidates
    cands = [vqav2_candidates(r, ranked) if vqav2 else world_candidates(r, ranked) for r in rows]
    chosen = vqa_rank(model, sp, imgs, questions, cands, device=device)
    majority = {t: answers[0] for t, answers in ranked.items()}
    per = {}
    for r, g, c in zip(rows, greedy, chosen):
        for t in (r["type"], "all"):
            s = per.setdefault(t, {"n": 0, "majority": 0.0, "greedy": 0.0, "ranked": 0.0})
            s["n"] += 1
            s["majority"] += vqa_accuracy(majority.get(r["type"], ""), r["answers"])
            s["greedy"] += vqa_accuracy(g, r["answers"])
            s["ranked"] += vqa_accuracy(c, r["answers"])
    for s in per.values():
        for k in ("majority", "greedy", "ranked"):
            s[k] /= s["n"]
    order = sorted(t for t in per if t != "all") + ["all"]
    return {t: per[t] for t in order}, greedy


def print_table(per):
    print(f"{'type':<12} | {'n':>5} | {'majority':>8} | {'greedy':>7} | {'ranked':>7}")
    print("-" * 51)
    for t, s in per.items():
        print(f"{t:<12} | {s['n']:>5} | {100 * s['majority']:>7.1f}% | {100 * s['greedy']:>6.1f}% | "
              f"{100 * s['ranked']:>6.1f}%")


def vqa_report(model, sp, test, ranked, n, vqav2, max_answer_tokens, device):
    """Phase 4's report: accuracy by question type on the first n held-out questions, printed; -> (per, n)."""
    n = min(n, len(test.rows))
    per, greedy = vqa_test_table(model, sp, test, ranked, n, vqav2, max_answer_tokens, device)
    print(f"{'held-out images' if vqav2 else 'held-out world images (vqa_test)'}: accuracy by question type on {n} questions")
    print_table(per)
    for r, g in list(zip(test.rows, greedy))[:5]:
        print(f"   {r['question']}  model: {g} | ref: {r['answer']}")
    return per, n


# ---- Word n-gram baselines for minimal pairs: what counting words in the same text already gets
#
# A BLiMP-style accuracy means little alone: chance is 50%, and counting words already gets more. So
# minimal pairs are also scored by word unigram, bigram and trigram models trained on the text the
# checkpoint's phase 1 read, with the same rule as the model: log p(good sentence) > log p(bad sentence),
# each sentence scored whole, with its start and end (a tie, e.g. a unigram model on two orderings of
# the same words, counts half).

WORD = re.compile(r"[\w']+|[^\w\s]")  # words, with apostrophes ("don't"), and single punctuation marks
BOS_W, EOS_W = "<s>", "</s>"


def ngram_words(sentence):
    return WORD.findall(sentence.lower())


class NGram:
    """A word n-gram model. n = 1: word frequencies, add-k smoothed. n >= 2: interpolated modified
    Kneser-Ney (Chen & Goodman 1999): discounts D1, D2, D3+ per order from its count-of-counts, lower
    orders on continuation counts (in how many contexts a word follows), down to a uniform distribution
    over the vocabulary plus one unknown word."""

    def __init__(self, lines, n, k=0.1):
        self.n, self.k = n, k
        raw = [Counter() for _ in range(n + 1)]  # raw[m][m-word tuple]: counts at every target position
        for line in lines:
            w = [BOS_W] * (n - 1) + ngram_words(line) + [EOS_W]
            for i in range(n - 1, len(w)):
                for m in range(1, n + 1):
                    raw[m][tuple(w[i - m + 1:i + 1])] += 1
        self.V = len(raw[1]) + 1  # every word seen, and one for all unseen words
        self.total_words = sum(raw[1].values())
        self.counts = [None] * (n + 1)
        self.counts[n] = raw[n]
        for m in range(n - 1, 0, -1):  # continuation counts; a gram starting at <s> keeps its raw count
            c = Counter({g: v for g, v in raw[m].items() if g[0] == BOS_W})
            for g in raw[m + 1]:
                if g[1] != BOS_W:
                    c[g[1:]] += 1
            self.counts[m] = c
        self.discounts, self.ctx = [None], [None]
        for m in range(1, n + 1):
            cc = Counter(min(v, 5) for v in self.counts[m].values())  # n1..n4: grams seen once .. 4 times
            y = cc[1] / max(cc[1] + 2 * cc[2], 1)
            # (at least 0.1: every context leaves some mass for words it was never followed by)
            D = [0.0] + [max(0.1, min(float(j), j - (j + 1) * y * cc[j + 1] / max(cc[j], 1))) for j in (1, 2, 3)]
            ctx = {}  # context -> [total count, total discount (the mass left for the lower order)]
            for g, v in self.counts[m].items():
                t = ctx.setdefault(g[:-1], [0, 0.0])
                t[0] += v
                t[1] += D[min(v, 3)]
            self.discounts.append(D)
            self.ctx.append(ctx)

    def prob(self, word, history):
        """p(word | the last n-1 words of history)."""
        if self.n == 1:
            return (self.counts[1].get((word,), 0) + self.k) / (self.total_words + self.k * self.V)
        p = 1.0 / self.V
        for m in range(1, self.n + 1):
            h = tuple(history[len(history) - m + 1:]) if m > 1 else ()
            t = self.ctx[m].get(h)
            if t is None:  # an unseen context: the lower order's estimate stands
                continue
            c = self.counts[m].get(h + (word,), 0)
            p = (max(c - self.discounts[m][min(c, 3)], 0.0) + t[1] * p) / t[0]
        return p

    def logprob(self, sentence):
        """log p of a whole sentence: every word and the end, each given the words before it."""
        w = [BOS_W] * max(self.n - 1, 0) + ngram_words(sentence) + [EOS_W]
        return math.fsum(math.log(self.prob(w[i], w[i - self.n + 1:i])) for i in range(self.n - 1, len(w)))


def ngram_minimal_pairs(lm, pairs):
    """minimal_pairs' rule and result for an n-gram model (a tie counts half)."""
    right = defaultdict(list)
    for p in pairs:
        good, bad = lm.logprob(p["sentence_good"]), lm.logprob(p["sentence_bad"])
        uid = p.get("UID") or p.get("paradigm") or p.get("linguistics_term") or "all"
        right[uid].append(1.0 if good > bad else 0.5 if good == bad else 0.0)
    per = {k: float(np.mean(v)) for k, v in sorted(right.items())}
    return {"per_paradigm": per, "macro": float(np.mean(list(per.values()))) if per else float("nan"), "n": len(pairs)}


def phase1_text_source(out_dir):
    """The text phase 1 read in out_dir (its data.json `source`) -> (label, training lines), or None."""
    from data.text import read_babylm_folder, read_info, read_lines, resolve_source
    info = os.path.join(out_dir, "data.json")
    if not os.path.exists(info):
        return None
    recorded = read_info(info)["source"]  # data.json read as phases 2-4 read it
    if not recorded:
        return None
    source = resolve_source(recorded, out_dir)
    if source.startswith("world:"):
        return source, read_lines(os.path.join(source.removeprefix("world:"), "text_train.txt"))
    return source, read_babylm_folder(source)[0]


def minimal_pair_baselines(args, ckpts, data, log=print):
    """Rows shaped like evaluate_checkpoint's results, for the tables: word unigram, bigram and trigram models
    trained on the text phase 1 read (the first checkpoint's out dir's data.json), scored on every
    minimal-pair benchmark in data (BLiMP, the world's probes), and chance (on the vision benchmarks too).
    [] when there are no minimal pairs or no known text."""
    sets = {"blimp": data.get("blimp")} | (data["probes"]["test"] if "probes" in data else {})
    sets = {k: v for k, v in sets.items() if v}
    if not sets:
        return []
    found = None
    for _, path in ckpts:  # out/phase1/best.pt -> out/
        found = found or phase1_text_source(os.path.dirname(os.path.dirname(os.path.abspath(path))))
    found = found or phase1_text_source(args.out_dir)
    if found is None:
        log("  no n-gram baselines: no data.json (phase 1's text) next to the checkpoints or in --out_dir")
        return []
    source, lines = found
    rows = []
    for n, name in ((1, "unigram"), (2, "bigram"), (3, "trigram")):
        lm = NGram(lines, n)
        detail = {k: ngram_minimal_pairs(lm, v) for k, v in sets.items()}
        rows.append({"name": name, "source": source, "words": lm.total_words, "detail": detail,
                     "metrics": {k: detail[k]["macro"] if k in detail else None for k, _ in COLUMNS}})
    per = lambda k: {uid: 0.5 for uid in rows[0]["detail"][k]["per_paradigm"]}  # noqa: E731
    chance = {k: {"per_paradigm": per(k), "macro": 0.5} for k in sets}
    metrics = {k: 0.5 if k in sets else None for k, _ in COLUMNS}
    if data.get("wino"):
        metrics["wino_group"] = 1 / 6  # 4 scores in a random order: 4 of the 24 orders pass both tests
    if data.get("vqa"):
        from data.vqa import world_candidates
        metrics["vqa_ranked"] = float(np.mean([1 / len(world_candidates(q, data["vqa_ranked"])) for q in data["vqa"]]))
    if data.get("cap_images") is not None and len(data["cap_images"]):
        metrics["caption_exact"] = metrics["u_naming"] = 0.0
    rows.append({"name": "chance", "source": source, "detail": chance, "metrics": metrics})
    for r in rows:
        r["metrics"]["language_avg"] = mean_of([r["metrics"][k] for k in LANG_KEYS])
    rows[-1]["metrics"]["vl_avg"] = mean_of([metrics[k] for k in VL_KEYS]) if metrics["wino_group"] else None
    log(f"n-gram baselines (trained on {len(lines):,} lines, {rows[0]['words'] - len(lines):,} words of {source}): " + "; ".join(
        f"{r['name']} " + ", ".join(f"{k} {r['metrics'][k]:.3f}" for k in sets) for r in rows[:3]))
    return rows


# ---- Several seeds: means, sds, and paired bootstrap intervals over test items
#
# A difference between two rows of one run means little: a test set of a few hundred items moves a score by
# several points, and so does the training seed. So eval.py --compare reads the eval.json of each seed and, for
# each contrast (say phase3 - phase3_control), takes every test item's score difference averaged over the seeds,
# and resamples the items (within each paradigm, as the macro average weighs them) to get a 95% interval.

CONTRASTS = (("phase2", "phase1"), ("phase3", "phase2"), ("phase3", "phase3_control"), ("phase3", "phase3_continued"),
             ("phase3", "phase3_oracle"), ("phase3_oracle", "phase2"), ("phase4", "phase3"),
             ("phase4", "phase4_control"))

def paired_draws(a, b, groups=None, n_boot=2000, rng=None):
    """a, b: (seeds, items) scores of two rows on the same test items. -> (the difference of their macro means,
    n_boot bootstrap draws of it). Each item's difference is first averaged over the seeds; groups (each item's
    paradigm) make the statistic the mean over paradigms, and items are resampled within their paradigm."""
    rng = rng or np.random.default_rng(0)
    d = (np.asarray(a, dtype=float) - np.asarray(b, dtype=float)).mean(0)  # (items,)
    g = np.zeros(len(d), dtype=int) if groups is None else np.unique(groups, return_inverse=True)[1]
    parts = [d[g == j] for j in range(g.max() + 1)]
    draws = np.mean([p[rng.integers(0, len(p), (n_boot, len(p)))].mean(1) for p in parts], axis=0)
    return float(np.mean([p.mean() for p in parts])), draws


def bootstrap_diff(a, b, groups=None, n_boot=2000, seed=0):
    """-> (mean difference, 2.5% and 97.5% percentiles of its bootstrap draws): a paired 95% interval."""
    point, draws = paired_draws(a, b, groups, n_boot, np.random.default_rng(seed))
    return point, float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))


def compare_seeds(args):
    """eval.py --compare A/eval.json B/eval.json ...: print and save seeds.json and a chart with error bars."""
    from common import UserError, read_json, write_json_atomic
    runs = [read_json(p) for p in args.compare]
    rows = {}  # name -> list of (metrics, items), one per file that holds the row
    groups = {}
    for path, r in zip(args.compare, runs):
        if not isinstance(r, dict) or "results" not in r:
            raise UserError(f"{path} is not an eval.py results file")
        groups.update(r.get("item_groups", {}))
        for row in r["results"]:
            rows.setdefault(row["name"], []).append((row["metrics"], row["detail"].get("items", {})))
    keys = [k for k, _ in COLUMNS if any(m.get(k) is not None for v in rows.values() for m, _ in v)]
    summary = {}
    for name, v in rows.items():
        summary[name] = {"seeds": len(v), "mean": {}, "sd": {}}
        for k in keys:
            vals = [m[k] for m, _ in v if m.get(k) is not None]
            if vals:
                summary[name]["mean"][k] = float(np.mean(vals))
                summary[name]["sd"][k] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
    header = ["checkpoint", "seeds"] + [h for k, h in COLUMNS if k in keys]
    table = [[n, str(s["seeds"])] + [f"{s['mean'][k]:.3f} ± {s['sd'][k]:.3f}" if k in s["mean"] else "n/a"
                                     for k in keys] for n, s in summary.items()]
    print(f"\nMeans ± sd over seeds ({', '.join(args.compare)})\n")
    print(markdown_table(header, table))

    def items(name, key):  # (seeds, items); a row run once is the same in every seed
        v = [it[key] for _, it in rows[name] if key in it]
        return v if v and all(len(x) == len(v[0]) and None not in x for x in v) else None

    contrasts = {}
    for a, b in CONTRASTS:
        if a not in rows or b not in rows:
            continue
        out, draws = {}, {}
        rng = np.random.default_rng(args.seed)  # one stream: each benchmark's items resampled independently
        for key in PROBE_KEYS + VL_KEYS:
            A, B = items(a, key), items(b, key)
            if A is None or B is None:
                continue
            if len(A[0]) != len(B[0]):  # e.g. evaluated with another --n_vqa: not the same items
                print(f"warning: {key}: {a} was scored on {len(A[0])} items, {b} on {len(B[0])}; not compared "
                      "(evaluate both with the same settings)")
                continue
            n = max(len(A), len(B))  # pair seed k with seed k; a row run once repeats
            A, B = [A[i % len(A)] for i in range(n)], [B[i % len(B)] for i in range(n)]
            point, draws[key] = paired_draws(A, B, groups.get(key), rng=rng)
            out[key] = (point, float(np.percentile(draws[key], 2.5)), float(np.percentile(draws[key], 97.5)))
        for avg, parts in (("language_avg", PROBE_KEYS), ("vl_avg", VL_KEYS)):
            if all(k in out for k in parts):  # an average's draws: the mean of its parts' draws
                d = np.mean([draws[k] for k in parts], axis=0)
                out[avg] = (float(np.mean([out[k][0] for k in parts])), float(np.percentile(d, 2.5)),
                            float(np.percentile(d, 97.5)))
        contrasts[f"{a} - {b}"] = out
    ckeys = [k for k in PROBE_KEYS + VL_KEYS + ("language_avg", "vl_avg") if any(k in c for c in contrasts.values())]
    print("\nPaired differences, mean over seeds [95% bootstrap interval over test items]\n")
    print(markdown_table(["contrast"] + [dict(COLUMNS)[k] for k in ckeys],
                         [[c] + [f"{v[k][0]:+.3f} [{v[k][1]:+.3f}, {v[k][2]:+.3f}]" if k in v else "n/a" for k in ckeys]
                          for c, v in contrasts.items()]))
    out_json = args.json if args.json != os.path.join(args.out_dir, "eval.json") else \
        os.path.join(os.path.dirname(os.path.abspath(args.compare[0])), "..", "seeds.json")
    chart = os.path.splitext(out_json)[0] + ".png" if not args.chart or args.chart == os.path.join(args.out_dir, "eval.png") else args.chart
    write_json_atomic({"files": args.compare, "summary": summary, "contrasts": contrasts}, out_json)
    draw_chart([{"name": n, "metrics": s["mean"], "sd": s["sd"]} for n, s in summary.items()], chart)
    print(f"\nwrote {os.path.normpath(out_json)} and {os.path.normpath(chart)}")


# =============================================================================
# Command line: every phase's checkpoint on every benchmark, side by side
#
#   python eval.py                                     # each phase's best.pt under out/
#   python eval.py --ckpt out/phase2/best.pt --device cuda
#   python eval.py --out_dir out_babylm --blimp ../shared/data/blimp_fast
#
# Prints a markdown table (rows = checkpoints, columns = benchmarks), writes the numbers as JSON (with every
# item's score, for eval.py --compare) and draws a bar chart of the two averages:
#   language avg        = mean(existence, relation, syntax), the world's text probes (chance 0.5 each);
#                         BLiMP macro instead, or as well, with --blimp
#   vision-language avg = mean(caption exact, Winoground group, ranked VQA)
# A text-only (phase 1) checkpoint gets n/a in every vision column. Rows of word n-gram models trained on phase
# 1's text, and of chance, follow the checkpoints.

DEFAULT_ROWS = ("phase1", "phase2", "phase3_control", "phase3_continued", "phase3", "phase3_oracle", "phase4_control",
                "phase4")
PROBE_KEYS = ("existence", "relation", "syntax")
LANG_KEYS = PROBE_KEYS + ("blimp",)
VL_KEYS = ("caption_exact", "wino_group", "vqa_ranked")
# (key, header) of the main table: gaps in bits (0 is best), everything else a share (higher is better)
COLUMNS = [("blimp", "BLiMP"), ("existence", "existence"), ("relation", "relation"), ("syntax", "syntax"),
           ("gap_s", "gap S"), ("gap_u", "gap U"), ("u_said", "U said"), ("f_said", "F said"),
           ("grammatical", "grammatical"),
           ("caption_exact", "caption exact"), ("u_naming", "U naming"), ("wino_group", "Wino group"),
           ("vqa_ranked", "VQA ranked"), ("vqa_gen", "VQA gen"), ("coco_bleu4", "COCO BLEU-4"),
           ("language_avg", "language avg"), ("vl_avg", "VL avg")]


def parse_args(argv=None):
    import argparse
    p = argparse.ArgumentParser(description="Evaluate checkpoints of every phase side by side (see the end of eval.py).")
    p.add_argument("--compare", nargs="+", default=[], metavar="EVAL_JSON",
                   help="no evaluation: the eval.json files of several seeds (rows present in one file only, such "
                        "as phases 1-2 run once, count as fixed) -> means, sds and paired bootstrap intervals")
    p.add_argument("--ckpt", action="append", default=[], help="a checkpoint to evaluate (repeatable); default: "
                   "the best.pt of " + ", ".join(DEFAULT_ROWS) + " under --out_dir, those that exist")
    p.add_argument("--out_dir", default="out")
    p.add_argument("--world_dir", default="data/world", help="the built world (built if missing, unless --no_world)")
    p.add_argument("--no_world", action="store_true", help="skip every benchmark that needs the world")
    p.add_argument("--blimp", default="", help="a BLiMP-format .jsonl file or a folder of them")
    p.add_argument("--blimp_max_per_paradigm", type=int, default=0, help="first N pairs of each paradigm (0 = all)")
    p.add_argument("--per_paradigm", action="store_true", help="also print per-paradigm tables (always for --blimp)")
    p.add_argument("--coco_dir", default="", help="COCO captions folder: adds BLEU-4 on its held-out 10%%")
    p.add_argument("--n_caption", type=int, default=1000, help="held-out world images to caption (caption_test has 1000)")
    p.add_argument("--n_samples", type=int, default=1000, help="unconditional samples for U/F said and grammatical")
    p.add_argument("--n_vqa", type=int, default=500, help="VQA test questions (ranking every allowed answer of "
                   "each is the slowest benchmark)")
    p.add_argument("--n_wino", type=int, default=0, help="Winoground items (0 = all)")
    p.add_argument("--n_text", type=int, default=1000, help="held-out description lines per file (0 = all)")
    p.add_argument("--n_coco", type=int, default=200, help="held-out COCO images to caption")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--json", default="", help="results file (default: OUT_DIR/eval.json)")
    p.add_argument("--chart", default="", help="bar chart PNG (default: OUT_DIR/eval.png)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default); 1 is "
                   "fastest on a CPU that other jobs keep busy")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--quiet", action="store_true", help="only the tables")
    args = p.parse_args(argv)
    from common import check_range
    for name in ("blimp_max_per_paradigm", "n_caption", "n_samples", "n_vqa", "n_wino", "n_text", "n_coco", "threads"):
        check_range(name, getattr(args, name), lo=0)
    check_range("batch_size", args.batch_size, lo=1)
    args.json = args.json or os.path.join(args.out_dir, "eval.json")
    args.chart = args.chart or os.path.join(args.out_dir, "eval.png")
    return args


def find_checkpoints(args):
    """-> [(row label, path)]: the --ckpt paths as given, else each phase's best.pt that exists."""
    from common import UserError
    if args.ckpt:
        rows, seen = [], set()
        for path in args.ckpt:
            stem = os.path.splitext(os.path.basename(path))[0]
            label = os.path.basename(os.path.dirname(os.path.abspath(path))) if stem in ("best", "last") else stem
            label += "/last" if stem == "last" else ""
            base, k = label, 2
            while label in seen:
                label, k = f"{base}#{k}", k + 1
            seen.add(label)
            rows.append((label, path))
        return rows
    rows = [(ph, os.path.join(args.out_dir, ph, "best.pt")) for ph in DEFAULT_ROWS]
    rows = [(ph, path) for ph, path in rows if os.path.exists(path)]
    if not rows:
        raise UserError(f"no checkpoints found under {args.out_dir}/ (looked for {{{','.join(DEFAULT_ROWS)}}}/best.pt); "
                        f"run `python phase1_text.py --out_dir {args.out_dir}` first, or pass --ckpt PATH")
    return rows


def load_blimp(path, max_per_paradigm=0):
    """Minimal pairs from a BLiMP-format .jsonl file or a folder of them (the paradigm is the row's UID,
    else the file name)."""
    import glob
    from common import UserError, read_jsonl
    files = sorted(glob.glob(os.path.join(path, "*.jsonl"))) if os.path.isdir(path) else [path]
    if not files or not os.path.exists(files[0]):
        raise UserError(f"--blimp {path}: no such .jsonl file, or a folder without .jsonl files")
    pairs = []
    for f in files:
        rows = read_jsonl(f)
        for i, r in enumerate(rows):
            if not isinstance(r, dict) or "sentence_good" not in r or "sentence_bad" not in r:
                raise UserError(f"{f} line {i + 1}: a BLiMP row needs sentence_good and sentence_bad")
            for field in ("sentence_good", "sentence_bad", "UID"):
                if (field in r or field != "UID") and not isinstance(r[field], str) and not (field == "UID" and r[field] is None):
                    raise UserError(f"{f} line {i + 1}: {field} must be a string, not {type(r[field]).__name__}")
        uid = os.path.splitext(os.path.basename(f))[0]
        rows = [{"sentence_good": r["sentence_good"], "sentence_bad": r["sentence_bad"], "UID": r.get("UID") or uid}
                for r in rows]
        if max_per_paradigm:
            kept, count = [], Counter()
            for r in rows:
                count[r["UID"]] += 1
                if count[r["UID"]] <= max_per_paradigm:
                    kept.append(r)
            rows = kept
        pairs += rows
    if not pairs:
        raise UserError(f"--blimp {path}: no minimal pairs in {len(files)} file(s)")
    return pairs


def score_pairs(model, sp, pairs, device):
    """eval.minimal_pairs on pairs sorted by token length, so each batch holds sentences of about one
    length (little padding). Pairs longer than the model's context are left out and counted."""
    max_len = decoder_of(model).cfg.max_seq_len
    lens = [max(len(encode_sentence(sp, p["sentence_good"])), len(encode_sentence(sp, p["sentence_bad"]))) for p in pairs]
    order = [i for i in np.argsort(lens, kind="stable") if lens[i] <= max_len]
    res = minimal_pairs(model, sp, [pairs[i] for i in order], device=device)
    right = [None] * len(pairs)  # each pair's score back in the file's order (None: too long to score)
    for j, i in enumerate(order):
        right[i] = res["right"][j]
    res["right"], res["skipped_too_long"] = right, len(pairs) - len(order)
    return res


def load_eval_data(args):
    """Everything the benchmarks read, loaded once for all checkpoints."""
    from common import read_jsonl
    from data.images import load_world_split
    d = {}
    if args.blimp:
        d["blimp"] = load_blimp(args.blimp, args.blimp_max_per_paradigm)
    if args.no_world:
        return d
    w = args.world_dir
    from data.world import ensure_built, read_meta
    if not os.path.exists(os.path.join(w, "meta.json")):
        print(f"{w} has no built world: building it (python -m data.world --out {w})")
    from common import show_progress
    ensure_built(w, progress=show_progress(args))  # builds a missing world; refuses one of another format
    d["meta"] = read_meta(w)
    items = read_probes(w)
    d["probes"] = {split: probe_sets(items, split) for split in ("test", "val")}
    for key, name in (("desc", "descriptions_test.txt"), ("desc_heldout", "descriptions_test_heldout.txt")):
        with open(os.path.join(w, name), encoding="utf-8") as f:
            lines = [l.strip() for l in f if l.strip()]
        d[key] = lines[:args.n_text] if args.n_text else lines
    wino = read_jsonl(os.path.join(w, "winoground.jsonl"))
    d["wino"] = wino[:args.n_wino] if args.n_wino else wino
    d["wino_images"] = np.load(os.path.join(w, "winoground_images.npy"), mmap_mode="r")
    images, rows = load_world_split(w, "caption_test")
    n = min(args.n_caption, len(rows))
    d["cap_images"], d["cap_scenes"] = np.asarray(images[:n]), [r["scene"] for r in rows[:n]]
    qs = read_jsonl(os.path.join(w, "vqa_test.jsonl"))[:args.n_vqa]
    vqa_images = np.load(os.path.join(w, "vqa_test_images.npy"), mmap_mode="r")
    from data.vqa import answers_by_type
    d["vqa"], d["vqa_ranked"] = qs, answers_by_type(read_jsonl(os.path.join(w, "vqa_train.jsonl")))[0]
    d["vqa_images"] = np.asarray(vqa_images[[q["image"] for q in qs]]) if qs else vqa_images[:0]
    return d


def coco_test(args, image_size, cache):
    """Held-out COCO images (the 10% phase 2 keeps for validation) at the model's image size."""
    if image_size not in cache:
        from data.images import load_coco, split_indices
        images, rows = load_coco(args.coco_dir, image_size, os.path.join(args.out_dir, "cache"))
        _, va = split_indices(len(rows), 0.1)
        va = va[:args.n_coco]
        cache[image_size] = (np.asarray(images[va]), [rows[i]["captions"] for i in va])
    return cache[image_size]


def mean_of(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def evaluate_checkpoint(model, sp, data, args, device, coco_cache, log=print, phase=None):
    """-> metrics dict (None = n/a) and a per-benchmark detail dict for the JSON (with every item's score, 1 or
    0, under detail["items"], so that runs can be compared item by item)."""
    import time
    m = {key: None for key, _ in COLUMNS}
    detail = {"seconds": {}, "items": {}}
    last = [time.perf_counter()]

    def clock(name):  # seconds spent on each benchmark, for the JSON
        now = time.perf_counter()
        detail["seconds"][name] = round(now - last[0], 2)
        last[0] = now

    if "blimp" in data:
        r = score_pairs(model, sp, data["blimp"], device)
        m["blimp"], detail["blimp"] = r["macro"], r
        clock("blimp")
        log(f"  BLiMP macro {r['macro']:.3f} over {len(r['per_paradigm'])} paradigms, {r['n']} pairs")
    if "probes" in data:
        for split in ("test", "val"):  # val: for choosing settings; the table reports test
            for key, rows in data["probes"][split].items():
                r = score_pairs(model, sp, rows, device)
                if split == "test":
                    m[key], detail[key], detail["items"][key] = r["macro"], r, r["right"]
                else:
                    m[f"{key}_val"] = r["macro"]
        m.update(surprisal_gaps(model, sp, data["meta"], device))
        clock("probes")
        pv = productive_vocabulary(model, sp, data["meta"], args.n_samples, args.seed, device)
        m["u_said"], m["f_said"], m["grammatical"], detail["samples"] = pv["u_said"], pv["f_said"], pv["grammatical"], pv
        clock("samples")
        for key, lines in (("bpb", data["desc"]), ("bpb_heldout", data["desc_heldout"])):
            max_len = decoder_of(model).cfg.max_seq_len
            lines = [l for l in lines if len(encode_sentence(sp, l)) <= max_len]
            lines.sort(key=len)  # batches of similar length: little padding (the sums do not depend on order)
            if lines:
                r = text_loss(model, sp, lines, device=device)
                m[key], detail[key] = r["bpb"], dict(r, n_lines=len(lines))
        clock("bpb")
        log(f"  existence {fmt_metric(m['existence'])}, relation {fmt_metric(m['relation'])}, syntax "
            f"{fmt_metric(m['syntax'])}; surprisal gap S {m['gap_s']:+.2f} / U {m['gap_u']:+.2f} bits; "
            f"samples naming a U pair {fmt_metric(m['u_said'])} (an F pair {fmt_metric(m['f_said'])}), "
            f"{fmt_metric(m['grammatical'])} grammatical")
    world_size = data["cap_images"].shape[1] if len(data.get("cap_images", ())) else None
    if isinstance(model, VLM) and world_size and world_size != model.vit.cfg.image_size:
        # e.g. a phase 2 trained on COCO at --image_size 64: the world's benchmarks do not apply
        log(f"  world vision benchmarks skipped: the model's ViT takes {model.vit.cfg.image_size}px images, "
            f"the world's are {world_size}px")
        data = {k: v for k, v in data.items() if k not in ("wino", "cap_images", "vqa")}
    if isinstance(model, VLM):
        P = model.projector.num_tokens()
        max_new = max(1, min(40, model.decoder.cfg.max_seq_len - P - 1))
        if "wino" in data and data["wino"]:
            r = winoground(model, sp, data["wino"], data["wino_images"], device=device)
            m["wino_text"], m["wino_image"], m["wino_group"] = r["text"], r["image"], r["group"]
            detail["winoground"] = {k: v for k, v in r.items() if k != "right"} | {"n": len(data["wino"])}
            detail["items"]["wino_group"] = r["right"]
            clock("winoground")
        if "cap_images" in data and len(data["cap_images"]):
            caps = caption_images(model, sp, data["cap_images"], max_new, args.batch_size, device)
            from data.judge import caption_quality
            q = [caption_quality(sc, c) for c, sc in zip(caps, data["cap_scenes"])]
            detail["items"]["caption_exact"] = [int(x["complete"]) for x in q]
            m["caption_exact"] = float(np.mean(detail["items"]["caption_exact"]))
            m["u_naming"] = u_naming(caps, data["cap_scenes"], data["meta"]["unseen_combos"])
            # a constant, vague but true caption ("there are no orange crosses .") can still be "correct", so
            # also record how many different captions the model wrote
            detail["captions"] = {"exact": m["caption_exact"], "correct": float(np.mean([x["correct"] for x in q])),
                                  "n": len(caps), "distinct": len(set(caps)), "examples": caps[:5]}
            clock("captions")
        if "vqa" in data and data["vqa"]:
            qs, imgs = data["vqa"], data["vqa_images"]
            questions = [q["question"] for q in qs]
            # ranked: every vision checkpoint can be scored this way, trained on questions or not
            from data.vqa import world_candidates
            cands = [world_candidates(q, data["vqa_ranked"]) for q in qs]
            chosen = vqa_rank(model, sp, imgs, questions, cands, batch_size=args.batch_size, device=device)
            right = [vqa_accuracy(c, [q["answer"]]) for c, q in zip(chosen, qs)]
            m["vqa_ranked"] = float(np.mean(right))
            detail["items"]["vqa_ranked"] = right
            # generated: only a model that learned phase 4's answer format can score, so only phase 4 is asked
            gen_right = [None] * len(qs)
            if phase == "phase4":
                preds = vqa_generate(model, sp, imgs, questions, batch_size=args.batch_size, device=device)
                gen_right = [vqa_accuracy(p, [q["answer"]]) for p, q in zip(preds, qs)]
                m["vqa_gen"] = float(np.mean(gen_right))
            by_type = defaultdict(lambda: ([], []))
            for q, r, g in zip(qs, right, gen_right):
                by_type[q.get("type", "all")][0].append(r)
                by_type[q.get("type", "all")][1].append(g)
            detail["vqa"] = {"ranked": m["vqa_ranked"], "generated": m["vqa_gen"], "n": len(qs),
                             "chance": float(np.mean([1 / len(c) for c in cands])),
                             "by_type": {t: float(np.mean(v[0])) for t, v in sorted(by_type.items())}}
            if m["vqa_gen"] is not None:
                detail["vqa"]["by_type_generated"] = {t: float(np.mean(v[1])) for t, v in sorted(by_type.items())}
            clock("vqa")
        if args.coco_dir:
            images, refs = coco_test(args, model.vit.cfg.image_size, coco_cache)
            caps = caption_images(model, sp, images, max_new, args.batch_size, device)
            m["coco_bleu4"] = bleu4(caps, refs)
            detail["coco"] = {"bleu4": m["coco_bleu4"], "n": len(caps), "examples": caps[:5]}
            clock("coco")
        distinct = f" ({detail['captions']['distinct']} distinct)" if "captions" in detail else ""
        log(f"  Winoground group {fmt_metric(m['wino_group'])}, caption exact {fmt_metric(m['caption_exact'])}{distinct}, "
            f"U naming {fmt_metric(m['u_naming'])}, VQA ranked {fmt_metric(m['vqa_ranked'])} / generated "
            f"{fmt_metric(m['vqa_gen'])}" + (f", COCO BLEU-4 {fmt_metric(m['coco_bleu4'])}" if args.coco_dir else ""))
    m["language_avg"] = mean_of([m[k] for k in LANG_KEYS])
    m["vl_avg"] = mean_of([m[k] for k in VL_KEYS])
    return m, detail


def fmt_metric(v):
    if v is None:
        return "n/a"
    return f"{v:.3f}"


def markdown_table(header, rows):
    """header: list of str; rows: lists of str -> a GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def results_table(results, columns):
    return markdown_table(["checkpoint"] + [h for _, h in columns],
                          [[r["name"]] + [fmt_metric(r["metrics"][k]) for k, _ in columns] for r in results])


def per_key_table(results, get, first="paradigm", total=None):
    """Rows = the union of keys of get(result) (paradigms, question types), columns = checkpoints."""
    keys = sorted({k for r in results for k in (get(r) or {})})
    rows = [[k] + [fmt_metric((get(r) or {}).get(k)) for r in results] for k in keys]
    if total:
        rows.append([f"**{total[0]}**"] + [fmt_metric(total[1](r)) for r in results])
    return markdown_table([first] + [r["name"] for r in results], rows)


def _font(size):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)  # a scalable font where Pillow has FreeType (>= 10.1)
    except TypeError:
        return ImageFont.load_default()


def draw_chart(results, path, width=900, height=480):
    """Grouped bar chart: language avg and vision-language avg per checkpoint, y axis 0..1, n/a marked; a row
    with "sd" (eval.py --compare) gets a +-1 sd whisker on each bar."""
    from PIL import Image, ImageDraw
    series = [("language avg", "language_avg", (52, 101, 164)), ("vision-language avg", "vl_avg", (230, 126, 34))]
    img = Image.new("RGB", (width, height), "white")
    dr = ImageDraw.Draw(img)
    font, small = _font(15), _font(12)

    def text_size(s, f):
        box = dr.textbbox((0, 0), s, font=f)
        return box[2] - box[0], box[3] - box[1]

    left, right, top, bottom = 56, 20, 64, 56
    x0, x1, y0, y1 = left, width - right, top, height - bottom  # plot area; y1 is value 0
    yv = lambda v: y1 - v * (y1 - y0)  # noqa: E731
    title = "Dreaming Out Loud: averages per phase"
    dr.text(((width - text_size(title, font)[0]) // 2, 10), title, fill="black", font=font)
    for i in range(6):  # y grid and tick labels at 0, 0.2, ..., 1
        v = i / 5
        y = round(yv(v))
        dr.line([(x0, y), (x1, y)], fill=(225, 225, 225) if i else (0, 0, 0), width=1)
        lab = f"{v:.1f}"
        tw, th = text_size(lab, small)
        dr.text((x0 - tw - 6, y - th // 2 - 2), lab, fill="black", font=small)
    dr.line([(x0, y0), (x0, y1)], fill="black", width=1)
    n = max(len(results), 1)
    group_w = (x1 - x0) / n
    bar_w = max(2, min(60, group_w * 0.7 / len(series)))
    for g, r in enumerate(results):
        cx = x0 + group_w * (g + 0.5)
        for s, (_, key, color) in enumerate(series):
            bx = cx + (s - len(series) / 2) * bar_w
            v = r["metrics"].get(key)
            if v is None:
                lab = "n/a"
            else:
                v = min(max(v, 0.0), 1.0)
                if v > 0:  # at least one pixel tall (a tiny value would round to an empty, invalid box)
                    top_px = min(round(yv(v)), round(y1) - 1)
                    dr.rectangle([round(bx), top_px, round(bx + bar_w) - 1, round(y1) - 1], fill=color)
                sd = (r.get("sd") or {}).get(key)
                if sd:
                    mid = round(bx + bar_w / 2)
                    lo, hi = round(yv(max(v - sd, 0.0))), round(yv(min(v + sd, 1.0)))
                    dr.line([(mid, lo), (mid, hi)], fill="black", width=1)
                    dr.line([(mid - 4, hi), (mid + 4, hi)], fill="black", width=1)
                    dr.line([(mid - 4, lo), (mid + 4, lo)], fill="black", width=1)
                lab = f"{v:.2f}"
            tw, th = text_size(lab, small)
            ly = (yv(v) if v is not None else y1) - th - 6
            dr.text((round(bx + (bar_w - tw) / 2), round(ly)), lab, fill=(60, 60, 60), font=small)
        lines = [r["name"]] if text_size(r["name"], font)[0] < group_w - 4 else r["name"].split("_", 1)  # wrap
        for k, line in enumerate(lines):
            tw, th = text_size(line, font)
            dr.text((round(cx - tw / 2), y1 + 10 + k * (th + 4)), line, fill="black", font=font)
    lx = x1 - 10  # legend, top right, right-aligned
    for label, _, color in reversed(series):
        tw, th = text_size(label, small)
        lx -= tw + 24
        dr.rectangle([lx, 42, lx + 14, 54], fill=color)
        dr.text((lx + 19, 40), label, fill="black", font=small)
        lx -= 12
    from common import write_atomic
    write_atomic(path, lambda f: img.save(f, format="PNG"))
    return path


def stale_parent(ckpt, path):
    """Why a checkpoint's inputs changed since it was trained (the checkpoint it started from, recorded by hash,
    is gone or another now, e.g. after phase 1 was run again with --restart), or None."""
    from common import file_hash
    parent = ckpt.get("parent")
    if not isinstance(parent, dict) or not isinstance(parent.get("path"), str):
        return None
    p = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))), parent["path"])
    if not os.path.exists(p):
        return f"built from {parent['path']}, which is gone"
    if file_hash(p) != parent.get("hash"):
        return f"built from {parent['path']}, which changed since"
    return None


def main(argv=None):
    import time
    from types import SimpleNamespace
    from common import checkpoint_tokenizer, load_checkpoint, setup
    from model import build_model
    args = parse_args(argv)
    if args.compare:
        return compare_seeds(args)
    log = (lambda *a: None) if args.quiet else print
    ckpts = find_checkpoints(args)
    from common import check_writable
    check_writable(os.path.dirname(os.path.abspath(args.json)))  # before minutes of evaluation, not after
    run = setup(SimpleNamespace(device=args.device, seed=args.seed))
    if args.threads:
        torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    data = load_eval_data(args)
    if args.no_world:
        log("--no_world: world benchmarks (minimal pairs, bpb, Winoground, captions, VQA) skipped")
    results, coco_cache = [], {}
    for name, path in ckpts:
        t0 = time.perf_counter()
        ckpt = load_checkpoint(path)
        sp = checkpoint_tokenizer(ckpt, path)
        model = build_model(ckpt).to(run.device).eval()
        del ckpt["model"]
        log(f"{name}: {path} ({ckpt.get('phase')}, step {ckpt.get('step')}, "
            f"{'vision + language' if isinstance(model, VLM) else 'text only'})")
        metrics, detail = evaluate_checkpoint(model, sp, data, args, run.device, coco_cache, log, ckpt.get("phase"))
        dt = time.perf_counter() - t0
        log(f"  {dt:.1f} s ({', '.join(f'{k} {v:.1f}' for k, v in detail['seconds'].items())})")
        stale = stale_parent(ckpt, path)
        results.append({"name": name, "ckpt": path, "phase": ckpt.get("phase"), "step": ckpt.get("step"),
                        "vision": isinstance(model, VLM), "metrics": metrics, "detail": detail, "seconds": round(dt, 2),
                        **({"stale": stale} if stale else {})})
        del model
    baselines = minimal_pair_baselines(args, ckpts, data, log)
    # columns: a benchmark that was not run for any checkpoint is left out; a text-only row says n/a
    ran = {"blimp": "blimp" in data, "coco_bleu4": bool(args.coco_dir)}
    world = not args.no_world
    columns = [c for c in COLUMNS if ran.get(c[0], world or c[0] in ("language_avg", "vl_avg"))]
    if args.per_paradigm or args.blimp:
        if "blimp" in data:
            print(f"\nBLiMP accuracy per paradigm ({args.blimp}, {len(data['blimp'])} pairs; log p summed over tokens)\n")
            print(per_key_table(results + baselines, lambda r: r["detail"].get("blimp", {}).get("per_paradigm"),
                                total=("macro", lambda r: r["metrics"]["blimp"])))
        if args.per_paradigm and world:
            print("\nWorld minimal pairs per paradigm\n")
            print(per_key_table(results + baselines, lambda r: {uid: a for k in PROBE_KEYS for uid, a in
                                                                 r["detail"].get(k, {}).get("per_paradigm", {}).items()}))
    if any(r["metrics"]["vqa_ranked"] is not None for r in results):
        print(f"\nVQA accuracy by question type ({len(data['vqa'])} test questions; answers ranked by their mean "
              "log-prob per token)\n")
        print(per_key_table(results, lambda r: r["detail"].get("vqa", {}).get("by_type"), first="question type",
                            total=("overall", lambda r: r["metrics"]["vqa_ranked"])))
    note = ("; gap S/U = surprisal of a held-out pair's shape after its colour minus a seen pair's, in bits (0 is "
            "best); test splits") if world else ""
    print(f"\nResults (accuracies in 0..1{note})\n")
    print(results_table([dict(r, name=r["name"] + " (!)") if r.get("stale") else r for r in results] + baselines, columns))
    if baselines:
        print(f"\n(baselines: word n-gram models trained on the text phase 1 read, {baselines[0]['source']}; "
              "chance is 0.5 on every minimal-pair benchmark and probe, 1/6 on Winoground group, 1/(allowed "
              "answers) on ranked VQA)")
    for r in results:
        if r.get("stale"):
            print(f"(!) {r['name']}: {r['stale']}; its row may not match a rerun")
    total = time.perf_counter() - t_all
    from common import write_json_atomic
    groups = {k: [r["UID"] for r in rows] for k, rows in data["probes"]["test"].items()} if "probes" in data else {}
    write_json_atomic({"results": results, "baselines": baselines, "columns": [k for k, _ in columns],
                       "item_groups": groups,
                       "settings": vars(args), "device": run.device, "seconds": round(total, 2)}, args.json)
    draw_chart(results, args.chart)
    print(f"\nwrote {args.json} and {args.chart} ({total:.0f} s)")


if __name__ == "__main__":
    from common import cli
    cli(main)
