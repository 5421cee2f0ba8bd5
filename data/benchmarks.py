"""Benchmarks built from the world: visual questions with answers, BLiMP-style minimal pairs and
Winoground-style image/caption pairs.

Separate from data/world.py and data/talk.py because these are the tests the model is measured with, not the
world or its language: each item is made from scenes and sentences, and its answer is fixed when it is made.
"""
import re

import numpy as np

from data.judge import is_grammatical
from data.talk import (CONVERSE, NUM_WORDS, PL_NOUNS, PP_PHRASE, SG_NOUNS, SINGULAR, _desc, _matching, mentions,
                       mentions_heldout, noun_phrase, plural, referring, the)
from data.world import (COLORS, EVAL_BUCKETS, FOIL_COMBOS, HELDOUT_COMBOS, HELDOUT_RELATION_WORDS, LABELED_NEVER,
                        PHASE1_NEVER, POSITIONS, SHAPES, SIZES, UNSEEN_COMBOS, _finish_scene, _make_object, _rng,
                        relation_holds, render, scene_bucket)

SEEN_COMBOS = tuple((c, s) for c in COLORS for s in SHAPES if (c, s) not in PHASE1_NEVER)  # in phase 1 text

# ---------------------------------------------------------------------------------------------------------------------
# Visual question answering
# ---------------------------------------------------------------------------------------------------------------------
QA_TYPES = ("existence", "count", "color", "shape", "size", "spatial", "comparison", "yesno")


def _qa(scene, rng, qtype, never=frozenset()):
    """One (question, answer) of the given type, or None if the scene does not allow it. never: colour+shape
    pairs no question may name (the scene holds none of them)."""
    objs = scene["objects"]
    o = rng.choice(objs)
    yes = rng.random() < 0.5
    if qtype == "existence":
        if yes:
            desc = _desc(o, rng.choice([("color", "shape"), ("shape",), ("size", "color", "shape"), ("color",)]))
        else:
            desc = rng.choice([{"color": rng.choice(COLORS), "shape": rng.choice(SHAPES)},
                               {"shape": rng.choice(SHAPES)}, {"color": rng.choice(COLORS)}])
            if _matching(scene, **desc) or (desc.get("color"), desc.get("shape")) in never:
                return None
        return f"is there {noun_phrase('a', **desc)} ?", "yes" if yes else "no"
    if qtype == "count":
        descs = [{}] + [{"shape": s} for s in SHAPES] + [{"color": c} for c in COLORS] + \
                [{"color": c, "shape": s} for c in COLORS for s in SHAPES if (c, s) not in never]
        by_count = {}
        for d in descs:
            by_count.setdefault(len(_matching(scene, **d)), []).append(d)
        # pick the answer first, favouring the larger counts (they are rarer), so no count dominates
        counts = sorted(by_count)
        k = rng.choices(counts, weights=[(1, 1, 3, 6, 10)[c] for c in counts])[0]
        return f"how many {noun_phrase('', n=2, **rng.choice(by_count[k]))} are there ?", NUM_WORDS[k]
    if qtype in ("color", "shape", "size"):
        ref = referring(scene, o, avoid=(qtype,), rng=rng)
        return ref and (f"what {qtype} is {the(ref)} ?", o[qtype])
    if qtype == "yesno":
        attr = rng.choice(["color", "size"])
        ref = referring(scene, o, avoid=(attr,), rng=rng)
        if ref is None:
            return None
        value = o[attr] if yes else rng.choice([v for v in (COLORS if attr == "color" else SIZES) if v != o[attr]])
        if attr == "color" and (value, o["shape"]) in never:   # "is the circle white ?" names a white circle
            return None
        return f"is {the(ref)} {value} ?", "yes" if yes else "no"
    if qtype == "spatial" and rng.random() < 0.4:
        ref = referring(scene, o, avoid=("pos",), rng=rng)
        return ref and (f"where is {the(ref)} ?", o["position"])
    if len(objs) < 2:
        return None
    a, b = rng.sample(objs, 2)
    ra, rb = referring(scene, a, rng=rng), referring(scene, b, rng=rng)
    if ra is None or rb is None:
        return None
    if qtype == "spatial":
        # only ask when the answer is clear: one of the pair holds, and we ask it or its opposite
        pairs = [p for p in (("left of", "right of"), ("above", "below")) if relation_holds(p[0], a, b) or
                 relation_holds(p[1], a, b)]
        if not pairs:
            return None
        pair = rng.choice(pairs)
        true_rel = pair[0] if relation_holds(pair[0], a, b) else pair[1]
        asked = true_rel if yes else (pair[1] if true_rel == pair[0] else pair[0])
        return f"is {the(ra)} {asked} {the(rb)} ?", "yes" if yes else "no"
    if qtype == "comparison":
        if a["size"] == b["size"]:
            return None
        word = rng.choice(["bigger", "smaller"])
        winner = a if (a["size"] == "big") == (word == "bigger") else b
        return f"which is {word} , {the(ra)} or {the(rb)} ?", the(ra if winner is a else rb)
    raise ValueError(qtype)


def make_questions(scene, rng, never=frozenset()):
    """4-6 questions of different types (where the scene allows), none naming a pair in never."""
    want = rng.randint(4, 6)
    types = list(QA_TYPES)
    rng.shuffle(types)
    out, seen = [], set()
    for attempt in range(60):
        qtype = types[attempt % len(types)]
        r = _qa(scene, rng, qtype, never)
        if r and r[0] not in seen:
            seen.add(r[0])
            out.append({"question": r[0], "answer": r[1], "type": qtype})
            if len(out) == want:
                break
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation items: minimal pairs (BLiMP-style) and Winoground-style image/caption pairs
# ---------------------------------------------------------------------------------------------------------------------
PARADIGMS = ("det_noun_agreement", "subject_verb_agreement", "adjective_order", "word_order", "article_an")
PAIRS_PER_PARADIGM = 200   # at scale 1; as many again with held-out parts
WINOGROUND_ITEMS = 300     # at scale 1; two images and two captions each


def _combo(rng, heldout):
    return rng.choice(sorted(HELDOUT_COMBOS) if heldout else SEEN_COMBOS)


def _other(rng):
    """A second, ordinary noun phrase for frames with two of them."""
    c, s = _combo(rng, False)
    return f"the {c} {s}"


def _minimal_pair(paradigm, rng, heldout):
    """-> (good tokens, bad tokens). Bad differs by one changed token, or two tokens swapped (orders)."""
    color, shape = _combo(rng, heldout)
    size = rng.choice(SIZES)
    rel = rng.choice(HELDOUT_RELATION_WORDS if heldout else ("left of", "right of", "next to"))
    frame = rng.randrange(3)
    if paradigm == "det_noun_agreement":
        # only determiners that phase 1 text uses (a/an, one..four): a pair built on a word the
        # model never read ("these", "those") tests the tokenizer, not agreement
        frame = rng.randrange(5)
        if frame == 0:
            good = f"look , {rng.choice(NUM_WORDS[2:])} {size} {color} {plural(shape)} !"
        elif frame == 1:
            good = f"there is {noun_phrase('a', size, color, shape)} ."
        elif frame == 2:
            good = f"look , one {size} {color} {shape} !"
        elif frame == 3:
            good = f"i see {rng.choice(NUM_WORDS[2:])} {size} {color} {plural(shape)} ."
        else:
            good = f"can you see {noun_phrase('a', None, color, shape)} ?"
        t = good.split()
        k = next(i for i, w in enumerate(t) if w in SG_NOUNS + PL_NOUNS)
        bad = t[:k] + [SINGULAR[t[k]] if t[k] in SINGULAR else plural(t[k])] + t[k + 1:]
        return t, bad
    if paradigm == "subject_verb_agreement":
        if frame == 0:
            good = f"there are {rng.choice(NUM_WORDS[2:])} {color} {plural(shape)} ."
        elif frame == 1:
            good = f"the {color} {plural(shape)} are {size} ."
        else:
            good = f"the {color} {shape} is {rel} {_other(rng)} ."
        t = good.split()
        k = next(i for i, w in enumerate(t) if w in ("is", "are"))
        return t, t[:k] + ["are" if t[k] == "is" else "is"] + t[k + 1:]
    if paradigm == "adjective_order":
        if color == "orange":   # "a orange big ..." would break the article rule too
            frame = 1
        if frame == 0:
            good = f"there is a {size} {color} {shape} ."
        elif frame == 1:
            good = f"the {size} {color} {shape} is {rel} {_other(rng)} ."
        else:
            good = f"look , {rng.choice(NUM_WORDS[2:])} {size} {color} {plural(shape)} !"
        t = good.split()
        k = t.index(size)
        return t, t[:k] + [t[k + 1], t[k]] + t[k + 2:]
    if paradigm == "word_order":
        if frame == 0:
            good = f"the {color} {shape} is {size} ."
        elif frame == 1:
            good = f"the {color} {shape} is {rel} {_other(rng)} ."
        else:   # the noun before its adjective (swapping it with the "?" after it would be trivial)
            good = f"where is the {size} {color} {shape} ?"
            t = good.split()
            k = t.index(shape) - 1
            return t, t[:k] + [t[k + 1], t[k]] + t[k + 2:]
        t = good.split()
        k = t.index(shape)   # swap the noun with the word after it
        return t, t[:k] + [t[k + 1], t[k]] + t[k + 2:]
    if paradigm == "article_an":
        sz = rng.choice([None, size])
        if rng.random() < 0.5:   # a vowel-initial adjective: "an orange star" / "an orange square" (held out)
            sz = None
            color = "orange"
            shape = "square" if heldout else rng.choice([x for x in SHAPES if ("orange", x) in SEEN_COMBOS])
        np_ = noun_phrase("a", size=sz, color=color, shape=shape)
        t = [f"look , {np_} !", f"there is {np_} .", f"can you see {np_} ?", f"i see {np_} ."][rng.randrange(4)].split()
        k = t.index("a") if "a" in t else t.index("an")
        return t, t[:k] + ["an" if t[k] == "a" else "a"] + t[k + 1:]
    raise ValueError(paradigm)


def sentences(line):
    """The sentences of a line of world text ('look , a red circle ! it is big .' -> two)."""
    return [x.strip() for x in re.findall(r"[^.!?]*[.!?]", line)]


def val_or_test(k):
    """Every fourth item of a benchmark is for validation (choosing settings), the rest for the test."""
    return "val" if k % 4 == 0 else "test"


def minimal_pairs(seed, scale, phase1_sentences=frozenset()):
    """Syntax minimal pairs, BLiMP's schema. A good sentence is never one phase 1 read verbatim: the pair tests
    the grammar, not recall of a line."""
    n = max(4, round(PAIRS_PER_PARADIGM * scale))
    out = []
    for heldout in (False, True):
        for paradigm in PARADIGMS:
            uid = paradigm + ("_heldout" if heldout else "")
            seen = set()
            for attempt in range(n * 20):
                if len(seen) == n:
                    break
                good, bad = _minimal_pair(paradigm, _rng(seed, "pairs", uid, attempt), heldout)
                g, b = " ".join(good), " ".join(bad)
                if g in seen or g in phase1_sentences:
                    continue
                assert is_grammatical(g) and not is_grammatical(b), (uid, g, b)
                assert mentions_heldout(g) == heldout, (uid, g)
                out.append({"sentence_good": g, "sentence_bad": b, "UID": uid, "pair_id": len(seen),
                            "heldout": heldout, "split": val_or_test(len(seen))})
                seen.add(g)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Language probes (text only, the decoder alone; chance 50% each, like a minimal pair)
#   existence: a U pair against an F pair in the same frame ("look , a red circle !" / "look , a white circle !").
#     Neither was ever said in phase 1 or 2, and every colour and shape word is as frequent on both sides, so
#     only a model that learned that U pairs exist (phase 3's dreams about unlabeled images) scores above chance.
#   relation: a relation and its converse ("a red circle above a blue square . a blue square below / above a red
#     circle ."), above/below being taught only by phase 2's relational captions.
# ---------------------------------------------------------------------------------------------------------------------
PROBES = ("existence", "relation")
PROBE_ITEMS = 600   # of each probe, at scale 1


def _foils(pair):
    """The two F pairs that share a word with a U pair: (same colour, other shape), (other colour, same shape)."""
    c, s = pair
    return [f for f in sorted(FOIL_COMBOS) if f[0] == c] + [f for f in sorted(FOIL_COMBOS) if f[1] == s]


def _existence_item(rng):
    u = rng.choice(sorted(UNSEEN_COMBOS))
    f = rng.choice(_foils(u))
    size, (c2, s2) = rng.choice(SIZES), rng.choice(SEEN_COMBOS)
    frame = rng.randrange(6)
    pos, number, rel = rng.choice(POSITIONS), rng.choice(NUM_WORDS[2:]), rng.choice(("left of", "right of", "next to"))

    def say(color, shape):
        if frame == 0:
            return f"look , {noun_phrase('a', size, color, shape)} !"
        if frame == 1:
            return f"there is {noun_phrase('a', size, color, shape, pos=pos)} ."
        if frame == 2:
            return f"can you see the {color} {shape} ?"
        if frame == 3:
            return f"i see {number} {color} {plural(shape)} ."
        if frame == 4:
            return f"the {color} {shape} is {rel} the {c2} {s2} ."
        return f"is there {noun_phrase('a', None, color, shape)} ?"
    return say(*u), say(*f), f"existence_{'colour' if u[0] == f[0] else 'shape'}_swap", u, f


def _relation_item(rng):
    (c1, s1), (c2, s2) = rng.sample(SEEN_COMBOS, 2)
    if c1 == c2 or s1 == s2:
        return None
    rel = rng.choice(sorted(CONVERSE))
    conv = CONVERSE[rel]
    if rng.random() < 0.5:   # phase 2's caption form, and the one of plain statements
        a, b = noun_phrase("a", color=c1, shape=s1), noun_phrase("a", color=c2, shape=s2)
        good, bad = f"{a} {rel} {b} . {b} {conv} {a} .", f"{a} {rel} {b} . {b} {rel} {a} ."
    else:
        a, b = f"the {c1} {s1}", f"the {c2} {s2}"
        good, bad = f"{a} is {rel} {b} . {b} is {conv} {a} .", f"{a} is {rel} {b} . {b} is {rel} {a} ."
    kind = "vertical" if rel in HELDOUT_RELATION_WORDS else "horizontal"
    return good, bad, f"relation_{kind}", (c1, s1), (c2, s2)


def probes(seed, scale, phase1_sentences=frozenset()):
    """The existence and relation probes, each item {probe, UID, split, sentence_good, sentence_bad, ...}."""
    n = max(24, round(PROBE_ITEMS * scale))
    out = []
    for probe, make in (("existence", _existence_item), ("relation", _relation_item)):
        seen = set()
        for attempt in range(n * 50):
            if len(seen) == n:
                break
            r = make(_rng(seed, "probes", probe, attempt))
            if r is None or r[0] in seen or r[0] in phase1_sentences:
                continue
            good, bad, uid, p, q = r
            assert is_grammatical(good) and is_grammatical(bad), (good, bad)
            out.append({"probe": probe, "UID": uid, "split": val_or_test(len(seen)), "sentence_good": good,
                        "sentence_bad": bad, "good_pair": " ".join(p), "bad_pair": " ".join(q)})
            seen.add(good)
    return out


def _wino_pair(rng):
    """Two two-object scenes and two captions with the same words, each caption true of its own image only."""
    (c1, s1), (c2, s2) = rng.sample([(c, s) for c in COLORS for s in SHAPES], 2)
    # no U or F pair, in either image: Winoground tests binding words to the image, not words never taught
    if c1 == c2 or s1 == s2 or {(c1, s1), (c2, s2), (c2, s1), (c1, s2)} & LABELED_NEVER:
        return None
    size1, size2 = rng.choice(SIZES), rng.choice(SIZES)
    rel = rng.choice(["left of", "right of", "above", "below"])
    # put a and b on opposite sides along the relation's axis, far enough apart to be unambiguous
    near, far = (rng.uniform(0.22, 0.3), rng.uniform(0.7, 0.78))
    other = rng.uniform(0.25, 0.75)
    first = {"left of": (near, other), "right of": (far, other), "above": (other, near), "below": (other, far)}[rel]
    second = {"left of": (far, other), "right of": (near, other), "above": (other, far), "below": (other, near)}[rel]
    kind = rng.choice(["attribute", "relation"])
    a0, b0 = _make_object(s1, c1, size1, *first), _make_object(s2, c2, size2, *second)
    if kind == "attribute":   # swap the colours between the two images
        a1, b1 = _make_object(s1, c2, size1, *first), _make_object(s2, c1, size2, *second)
        cap0 = f"a {c1} {s1} {rel} a {c2} {s2} ."
        cap1 = f"a {c2} {s1} {rel} a {c1} {s2} ."
    else:                     # swap where the two objects are
        a1, b1 = _make_object(s1, c1, size1, *second), _make_object(s2, c2, size2, *first)
        cap0 = f"a {c1} {s1} {rel} a {c2} {s2} ."
        cap1 = f"a {c2} {s2} {rel} a {c1} {s1} ."
    # the article must suit the next word ("an orange ...")
    cap0, cap1 = (re.sub(r"\ba (?=orange)", "an ", c) for c in (cap0, cap1))
    bg = _finish_scene(rng, [])
    scenes = [dict(bg, objects=[a0, b0]), dict(bg, objects=[a1, b1])]
    lo, hi = EVAL_BUCKETS
    if not all(lo <= scene_bucket(s) < hi for s in scenes):
        return None
    return scenes, cap0, cap1, kind


def winoground(seed, scale, size):
    items, images = [], []
    n = max(4, round(WINOGROUND_ITEMS * scale))
    for i in range(n):
        rng = _rng(seed, "winoground", i)
        r = None
        while r is None:
            r = _wino_pair(rng)
        scenes, cap0, cap1, kind = r
        items.append({"image_0": 2 * i, "image_1": 2 * i + 1, "caption_0": cap0, "caption_1": cap1, "type": kind,
                      "scenes": scenes})
        images += [render(s, size) for s in scenes]
    return items, np.stack(images)
