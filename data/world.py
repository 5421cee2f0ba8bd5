"""The developmental world: seeded scenes of coloured shapes, and the one small grammar that talks about them.

Everything here is a pure function of (seed, split, index), so building twice gives byte-identical files.

    python -m data.world --out data/world --seed 0 --scale 1.0 --size 32

Contents, top to bottom: vocabulary and held-out parts, scene sampling, rendering, sentence generation,
a parser for the grammar (is_grammatical / parse_claims / check_caption, written separately from the
generator so it can judge model output), question answering data, evaluation items, and the builder.
"""
import argparse
import hashlib
import json
import math
import os
import random
import re

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FORMAT_VERSION = 1

# ---------------------------------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------------------------------
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
COLORS = ("red", "green", "blue", "yellow", "black", "white", "orange", "purple")
SIZES = ("small", "big")
POSITIONS = ("left", "right", "top", "bottom", "middle")
RELATIONS = ("left of", "right of", "above", "below", "next to", "bigger than", "smaller than")

# 12 of the 48 colour+shape pairs are never named in phase 1 text. Every shape loses exactly two colours and every
# colour loses at most two shapes, so each word on its own is still learnable from phase 1. Fixed, not seeded.
HELDOUT_COMBOS = frozenset({
    ("yellow", "circle"), ("purple", "circle"),
    ("white", "square"), ("orange", "square"),
    ("blue", "triangle"), ("black", "triangle"),
    ("green", "diamond"), ("red", "diamond"),
    ("blue", "star"), ("yellow", "star"),
    ("green", "cross"), ("purple", "cross"),
})
# The vertical relation pair is held out: phase 1 text never contains these words at all.
HELDOUT_RELATION_WORDS = ("above", "below")

NUM_WORDS = ("zero", "one", "two", "three", "four")
GENERIC_NOUNS = ("object", "thing", "shape")   # nouns that stand for any shape


def plural(noun):
    return noun + "es" if noun.endswith("ss") else noun + "s"


SG_NOUNS = SHAPES + GENERIC_NOUNS
PL_NOUNS = tuple(plural(n) for n in SG_NOUNS)
SINGULAR = dict(zip(PL_NOUNS, SG_NOUNS))
PP_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top",
             "bottom": "at the bottom", "middle": "in the middle"}

RGB = {"red": (215, 35, 35), "green": (35, 165, 55), "blue": (40, 80, 230), "yellow": (250, 215, 30),
       "black": (15, 15, 15), "white": (245, 245, 245), "orange": (250, 135, 15), "purple": (145, 45, 185)}
RADIUS = {"small": 0.125, "big": 0.21}   # fraction of image width; big is ~1.7x small

REL_MARGIN = 0.2      # "left of"/"above"...: centres must differ by more than this (image widths)
NEXT_TO_DY = 0.1      # "next to": roughly the same height ...
NEXT_TO_DX = 0.5      # ... and not far apart horizontally

# Image splits and which of 100 content-hash buckets each may use: equal scenes always land in the same bucket,
# so splits with different bucket ranges can never share a scene.
IMAGE_SPLITS = {  # name: (default count, bucket range)
    "caption_train": (20000, (0, 40)), "unlabeled": (10000, (40, 60)), "vqa_train": (10000, (60, 80)),
    "caption_val": (1000, (80, 85)), "vqa_val": (500, (85, 90)),
    "caption_test": (1000, (90, 95)), "vqa_test": (1000, (95, 100)),
}
EVAL_BUCKETS = (80, 100)   # winoground images: never a training bucket
TEXT_COUNTS = {"text_train": 150000, "text_val": 5000, "descriptions_test": 3000}
PAIRS_PER_PARADIGM = 200
WINOGROUND_ITEMS = 300


def _rng(seed, *parts):
    """A random.Random that depends only on its arguments (Python's hash() is salted per process, so not that)."""
    key = "-".join(str(p) for p in (seed,) + parts).encode()
    return random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))


# ---------------------------------------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------------------------------------
def grid_cell(x, y):
    """(row, col) of a point in the 3x3 grid; y grows downwards as in images."""
    return min(2, int(y * 3)), min(2, int(x * 3))


def position_word(x, y):
    row, col = grid_cell(x, y)
    if col != 1:
        return "left" if col == 0 else "right"
    if row != 1:
        return "top" if row == 0 else "bottom"
    return "middle"


def relation_holds(rel, a, b):
    """Is object a <rel> object b? Only clear cases count; ambiguous geometry is neither true nor stated."""
    dx, dy = b["x"] - a["x"], b["y"] - a["y"]
    if rel == "left of":
        return dx > REL_MARGIN
    if rel == "right of":
        return -dx > REL_MARGIN
    if rel == "above":
        return dy > REL_MARGIN
    if rel == "below":
        return -dy > REL_MARGIN
    if rel == "next to":
        return abs(dy) < NEXT_TO_DY and abs(dx) < NEXT_TO_DX
    if rel == "bigger than":
        return a["size"] == "big" and b["size"] == "small"
    if rel == "smaller than":
        return a["size"] == "small" and b["size"] == "big"
    raise ValueError(rel)


def _jitter(rng, cell, r):
    """A point well inside grid cell (row, col), so its position word is clear, and inside the image."""
    row, col = cell
    x = min(max((col + rng.uniform(0.15, 0.85)) / 3, r + 0.02), 1 - r - 0.02)
    y = min(max((row + rng.uniform(0.15, 0.85)) / 3, r + 0.02), 1 - r - 0.02)
    return round(x, 3), round(y, 3)   # rounded once here, so the JSON scene is exactly what was drawn


def _make_object(shape, color, size, x, y):
    return {"shape": shape, "color": color, "size": size, "x": x, "y": y, "position": position_word(x, y)}


def sample_scene(rng, allow_heldout=True, force_heldout=False, buckets=None):
    """1-4 objects on a grey-ish background. allow_heldout=False never uses a held-out colour+shape pair;
    force_heldout=True makes the first object one; buckets=(lo, hi) keeps only scenes whose content hash
    bucket is in [lo, hi). What the scene shows is drawn first, so unwanted buckets are rejected cheaply."""
    while True:
        content = []   # (shape, color, size, (row, col))
        for k in range(rng.randint(1, 4)):
            if k == 0 and force_heldout:
                color, shape = rng.choice(sorted(HELDOUT_COMBOS))
            else:
                shape, color = rng.choice(SHAPES), rng.choice(COLORS)
                # copy an attribute now and then, so counting questions have something to count
                if content and rng.random() < 0.35:
                    shape = rng.choice(content)[0]
                if content and rng.random() < 0.25:
                    color = rng.choice(content)[1]
            if allow_heldout or (color, shape) not in HELDOUT_COMBOS:
                content.append((shape, color, rng.choice(SIZES), (rng.randrange(3), rng.randrange(3))))
        if not content:
            continue
        if buckets and not buckets[0] <= _bucket(sorted(c[:3] + c[3] for c in content)) < buckets[1]:
            continue
        objs = []
        for shape, color, size, cell in content:
            r = RADIUS[size]
            for _ in range(20):   # rejection sampling: objects may touch but not overlap much
                x, y = _jitter(rng, cell, r)
                if all(math.hypot(x - o["x"], y - o["y"]) >= 0.9 * (r + RADIUS[o["size"]]) for o in objs):
                    objs.append(_make_object(shape, color, size, x, y))
                    break
            else:
                break
        if len(objs) == len(content):
            return _finish_scene(rng, objs)


def _finish_scene(rng, objs):
    # mid grey with a slight tint: far from both black and white and from every saturated colour
    grey = rng.randint(105, 150)
    background = [grey + rng.randint(-10, 10) for _ in range(3)]
    return {"background": background, "noise": rng.choice([2, 5]), "noise_seed": rng.getrandbits(31),
            "objects": objs}


def scene_key(scene):
    """Structured content of a scene: what it shows, ignoring exact coordinates and background."""
    return tuple(sorted((o["shape"], o["color"], o["size"]) + grid_cell(o["x"], o["y"]) for o in scene["objects"]))


def scene_hash(scene):
    return _hash(scene_key(scene))


def _hash(key):
    return hashlib.sha1(repr(tuple(key)).encode()).hexdigest()


def _bucket(key):
    return int(_hash(key), 16) % 100


def scene_bucket(scene):
    return _bucket(scene_key(scene))


# ---------------------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------------------
def _shape_points(shape, cx, cy, r):
    if shape == "square":
        h = 0.85 * r   # a bit smaller than the circle, so both look about the same size
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + 0.95 * r, cy + 0.75 * r), (cx - 0.95 * r, cy + 0.75 * r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)]
    if shape == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else 0.45 * r
            ang = -math.pi / 2 + i * math.pi / 5
            pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
        return pts
    if shape == "cross":
        t = 0.33 * r   # half the arm thickness
        return [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t), (cx + r, cy + t),
                (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r), (cx - t, cy + t), (cx - r, cy + t),
                (cx - r, cy - t), (cx - t, cy - t)]
    raise ValueError(shape)


def render(scene, size=32):
    """Scene dict -> (size, size, 3) uint8. Drawn at 4x and box-downsampled (each pixel = mean of 4x4), which antialiases the edges."""
    big = size * 4
    img = Image.new("RGB", (big, big), tuple(scene["background"]))
    draw = ImageDraw.Draw(img)
    for o in scene["objects"]:
        cx, cy, r, fill = o["x"] * big, o["y"] * big, RADIUS[o["size"]] * big, RGB[o["color"]]
        if o["shape"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(_shape_points(o["shape"], cx, cy, r), fill=fill)
    arr = np.asarray(img.resize((size, size), Image.BOX), dtype=np.int16)
    # light sensor-like noise; seeded from the scene so rendering stays a pure function
    noise = np.random.default_rng(scene["noise_seed"]).integers(-scene["noise"], scene["noise"] + 1, arr.shape)
    return np.clip(arr + noise, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------------------
# Sentence generation (true statements about a scene)
# ---------------------------------------------------------------------------------------------------------------------
def noun_phrase(det, size=None, color=None, shape=None, n=1, pos=None, noun="object"):
    """'a big red circle on the left', 'two yellow squares', 'the object'. det may be '' for a bare phrase."""
    head = shape or noun
    words = [w for w in (size, color) if w] + [head if n == 1 else plural(head)]
    if det == "a" and words[0][0] in "aeiou":
        det = "an"
    out = ([det] if det else []) + words
    if pos:
        out.append(PP_PHRASE[pos])
    return " ".join(out)


def _matching(scene, size=None, color=None, shape=None, pos=None):
    return [o for o in scene["objects"] if (size is None or o["size"] == size) and
            (color is None or o["color"] == color) and (shape is None or o["shape"] == shape) and
            (pos is None or o["position"] == pos)]


def _desc(o, keys):
    return {k: (o["position"] if k == "pos" else o[k]) for k in keys}


# attribute subsets to try when naming one object with "the ...", shortest first
_REF_KEYS = (("shape",), ("color", "shape"), ("size", "shape"), ("size", "color", "shape"), ("color",), ("size",),
             ("size", "color"), ("pos",), ("shape", "pos"), ("color", "shape", "pos"), ("size", "color", "shape", "pos"))


def referring(scene, o, avoid=(), rng=None):
    """Attributes that pick out o uniquely ('the red circle'); None if o has an identical twin.
    avoid: attributes that must not be used (e.g. the one a question asks about)."""
    options = [_desc(o, keys) for keys in _REF_KEYS if not set(keys) & set(avoid)]
    options = [d for d in options if len(_matching(scene, **d)) == 1]
    if not options:
        return None
    # mostly the shortest name, sometimes a longer one for variety
    return options[0] if rng is None or rng.random() < 0.6 else rng.choice(options)


def the(desc):
    return noun_phrase("the", **desc)


def _full(o):
    return {"size": o["size"], "color": o["color"], "shape": o["shape"]}


def _heldout_free(desc):
    return (desc.get("color"), desc.get("shape")) not in HELDOUT_COMBOS


class _Gen:
    """Sentence makers for one scene. Each returns a true sentence or None when it does not apply.
    phase1=True keeps to the phase 1 language: no held-out colour+shape pairs, no held-out relation words."""

    def __init__(self, scene, rng, phase1=False):
        self.s, self.rng, self.phase1 = scene, rng, phase1
        self.objs = scene["objects"]
        self.rels = [r for r in RELATIONS if not (phase1 and r in HELDOUT_RELATION_WORDS)]

    def ok(self, desc):
        return not self.phase1 or _heldout_free(desc)

    def canonical(self):
        objs = sorted(self.objs, key=lambda o: (o["x"], o["y"]))
        parts = [noun_phrase("a", pos=o["position"], **_full(o)) for o in objs]
        if len(parts) == 1:
            return f"one object : {parts[0]} ."
        return f"{NUM_WORDS[len(parts)]} objects : {' , '.join(parts[:-1])} and {parts[-1]} ."

    def _some_desc(self, o):
        keys = self.rng.choice([("size", "color", "shape"), ("color", "shape"), ("shape",), ("size", "shape"),
                                ("color",)])
        return _desc(o, keys)

    def _counted(self, det_one, desc):
        """'a red circle' if there is one, 'two red circles' if two, with the exact count."""
        k = len(_matching(self.s, **desc))
        return noun_phrase(det_one if k == 1 else NUM_WORDS[k], n=k, **desc), k

    def look(self):
        desc = self._some_desc(self.rng.choice(self.objs))
        if self.rng.random() < 0.25:
            if len(_matching(self.s, **desc)) != 1:
                return None
            return f"look at {the(desc)} !"
        start = self.rng.choice(["look", "wow", "oh"])
        return f"{start} , {self._counted('a', desc)[0]} !"

    def see(self):
        o = self.rng.choice(self.objs)
        verb = self.rng.choice(["can you see", "do you see"])
        ref = referring(self.s, o, rng=self.rng)
        if ref and self.rng.random() < 0.6:
            return f"{verb} {the(ref)} ?"
        return f"{verb} {noun_phrase('a', **self._some_desc(o))} ?"

    def there(self):
        o = self.rng.choice(self.objs)
        desc = self._some_desc(o)
        np_, k = self._counted("a", desc)
        if k == 1 and self.rng.random() < 0.5:
            np_ = noun_phrase("a", pos=o["position"], **desc)
        return f"there {'is' if k == 1 else 'are'} {np_} ."

    def count_all(self):
        n = len(self.objs)
        noun = self.rng.choice(["objects", "things", "shapes"]) if n > 1 else self.rng.choice(GENERIC_NOUNS)
        if self.rng.random() < 0.5:
            return f"i see {NUM_WORDS[n]} {noun} ."
        return f"there {'is' if n == 1 else 'are'} {NUM_WORDS[n]} {noun} ."

    def negation(self):
        kind = self.rng.random()
        if kind < 0.5:
            desc = {"color": self.rng.choice(COLORS), "shape": self.rng.choice(SHAPES)}
        elif kind < 0.75:
            desc = {"shape": self.rng.choice(SHAPES)}
        else:
            desc = {"color": self.rng.choice(COLORS)}
        if _matching(self.s, **desc) or not self.ok(desc):
            return None
        if self.rng.random() < 0.5:
            return f"there is no {noun_phrase('', **desc)} ."
        return f"there are no {noun_phrase('', n=2, **desc)} ."

    def prop(self):
        o = self.rng.choice(self.objs)
        attr = self.rng.choice(["color", "size"])
        ref = referring(self.s, o, avoid=(attr,), rng=self.rng)
        if ref is None:
            return None
        values = COLORS if attr == "color" else SIZES
        if self.rng.random() < 0.3:   # a true negative statement
            wrong = self.rng.choice([v for v in values if v != o[attr]])
            if attr == "color" and not self.ok({"color": wrong, "shape": o["shape"]}):
                return None
            return f"{the(ref)} is not {wrong} ."
        return f"{the(ref)} is {o[attr]} ."

    def plural_prop(self):
        shape = self.rng.choice(self.objs)["shape"]
        group = _matching(self.s, shape=shape)
        attr = self.rng.choice(["color", "size"])
        values = {o[attr] for o in group}
        if len(group) < 2 or len(values) != 1:
            return None
        return f"the {plural(shape)} are {values.pop()} ."

    def where(self):
        o = self.rng.choice(self.objs)
        ref = referring(self.s, o, avoid=("pos",), rng=self.rng)
        if ref is None:
            return None
        return f"{the(ref)} is {PP_PHRASE[o['position']]} ."

    def relation(self):
        if len(self.objs) < 2:
            return None
        a, b = self.rng.sample(self.objs, 2)
        rels = [r for r in self.rels if relation_holds(r, a, b)]
        if not rels:
            return None
        rel = self.rng.choice(rels)
        form = self.rng.random()
        if form >= 0.5 and _full(a) == _full(b):   # "a red star left of a red star" is true but confusing
            return None
        if form < 0.5:
            ra, rb = referring(self.s, a, rng=self.rng), referring(self.s, b, rng=self.rng)
            if ra is None or rb is None:
                return None
            return f"{the(ra)} is {rel} {the(rb)} ."
        # indefinites are existential, so the full description of each object is always true
        phrase = f"{noun_phrase('a', **_full(a))} {rel} {noun_phrase('a', **_full(b))}"
        return f"there is {phrase} ." if form < 0.75 else f"{phrase} ."

    def pronoun_pair(self):
        """Two sentences, the second about the first one's object: 'look , a red circle ! it is big .'"""
        o = self.rng.choice(self.objs)
        desc = _desc(o, self.rng.choice([("color", "shape"), ("shape",), ("size", "shape")]))
        group = _matching(self.s, **desc)
        extra = self.rng.choice([k for k in ("size", "color", "pos") if k not in desc])
        values = {(g["position"] if extra == "pos" else g[extra]) for g in group}
        if len(values) != 1:   # "they are big" must hold for every one of them
            return None
        value = values.pop()
        pred = PP_PHRASE[value] if extra == "pos" else value
        np_, k = self._counted("a", desc)
        first = (f"{self.rng.choice(['look', 'wow'])} , {np_} !" if self.rng.random() < 0.5
                 else f"there {'is' if k == 1 else 'are'} {np_} .")
        return f"{first} {'it is' if k == 1 else 'they are'} {pred} ."

    def question(self):
        """Questions for the phase 1 text (no answers given: they are just language)."""
        o = self.rng.choice(self.objs)
        kind = self.rng.randrange(6)
        if kind == 0:
            desc = self._some_desc(o) if self.rng.random() < 0.5 else {"color": self.rng.choice(COLORS),
                                                                        "shape": self.rng.choice(SHAPES)}
            if not self.ok(desc):
                return None
            return f"is there {noun_phrase('a', **desc)} ?"
        if kind == 1:
            desc = self._some_desc(o)
            desc.pop("size", None)
            return f"how many {noun_phrase('', n=2, **desc)} are there ?"
        if kind == 2:
            ref = referring(self.s, o, avoid=("pos",), rng=self.rng)
            return ref and f"where is {the(ref)} ?"
        if kind == 3:
            attr = self.rng.choice(["color", "shape", "size"])
            ref = referring(self.s, o, avoid=(attr,), rng=self.rng)
            return ref and f"what {attr} is {the(ref)} ?"
        if kind == 4:
            ref = referring(self.s, o, avoid=("size",), rng=self.rng)
            return ref and f"is {the(ref)} {self.rng.choice(SIZES)} ?"
        if len(self.objs) < 2:
            return None
        a, b = self.rng.sample(self.objs, 2)
        ra, rb = referring(self.s, a), referring(self.s, b)
        return ra and rb and f"which is {self.rng.choice(['bigger', 'smaller'])} , {the(ra)} or {the(rb)} ?"


_CAPTION_MAKERS = ("look", "see", "there", "count_all", "negation", "prop", "plural_prop", "where", "relation",
                   "relation", "pronoun_pair")
_TEXT_MAKERS = _CAPTION_MAKERS + ("canonical", "question", "question")


def describe(scene, rng):
    """3-5 true captions; the first is the canonical full description."""
    g = _Gen(scene, rng)
    caps = [g.canonical()]
    want = rng.randint(3, 5)
    for _ in range(40):
        if len(caps) == want:
            break
        c = getattr(g, rng.choice(_CAPTION_MAKERS))()
        if c and c not in caps:
            caps.append(c)
    return caps


def mentions_heldout(text):
    """Does the text name a held-out colour+shape pair or a held-out relation word?"""
    toks = text.split()
    if any(t in HELDOUT_RELATION_WORDS for t in toks):
        return True
    for a, b in zip(toks, toks[1:]):
        if (a, SINGULAR.get(b, b)) in HELDOUT_COMBOS:
            return True
    return False


def text_line(scene, rng, phase1=True):
    """One line of child-directed talk about a scene: one to three sentences."""
    g = _Gen(scene, rng, phase1=phase1)
    n = rng.choice([1, 1, 2, 2, 3])
    out = []
    while len(out) < n:
        s = getattr(g, rng.choice(_TEXT_MAKERS))()
        if s:
            out.append(s)
    return " ".join(out)


# ---------------------------------------------------------------------------------------------------------------------
# The grammar as a recogniser. Written independently of the generator above: it parses any token string into
# claims about a scene, so it can judge model output too.
# ---------------------------------------------------------------------------------------------------------------------
_TERMINATORS = (".", "!", "?")
_DETS = {  # determiner: (number, kind, (comparison, k)); "the" takes its number from the noun
    "a": ("sg", "indef", ("ge", 1)), "an": ("sg", "indef", ("ge", 1)), "one": ("sg", "num", ("eq", 1)),
    "two": ("pl", "num", ("eq", 2)), "three": ("pl", "num", ("eq", 3)), "four": ("pl", "num", ("eq", 4)),
    "some": ("pl", "indef", ("ge", 2)), "this": ("sg", "def", ("eq", 1)), "that": ("sg", "def", ("eq", 1)),
    "these": ("pl", "def", ("ge", 2)), "those": ("pl", "def", ("ge", 2)), "the": (None, "def", None),
}
_PP = [(pos, tuple(p.split())) for pos, p in PP_PHRASE.items()]
_RELS = [(rel, tuple(rel.split())) for rel in RELATIONS]


def _match(t, i, words):
    return i + len(words) if tuple(t[i:i + len(words)]) == words else None


def _nom(t, i, number):
    """[size] [color] noun, in that order. -> (i, desc) or None."""
    desc = {}
    if i < len(t) and t[i] in SIZES:
        desc["size"], i = t[i], i + 1
    if i < len(t) and t[i] in COLORS:
        desc["color"], i = t[i], i + 1
    if i >= len(t):
        return None
    noun = t[i] if number == "sg" and t[i] in SG_NOUNS else SINGULAR.get(t[i]) if number == "pl" else None
    if noun is None:
        return None
    if noun in SHAPES:
        desc["shape"] = noun
    return i + 1, desc


def _np(t, i, kinds, number=None, mods=("pp", "rel")):
    """Determiner + nominal + optional modifier (a place, or a relation to another noun phrase).
    mods: which modifiers may attach; fewer lets 'is the circle left of ... ?' leave them to the predicate.
    -> (i, node) or None. node: {"number", "kind", "quant", "desc"}."""
    if i >= len(t) or t[i] not in _DETS:
        return None
    det = t[i]
    num, kind, quant = _DETS[det]
    if kind not in kinds:
        return None
    if det in ("a", "an") and (i + 1 >= len(t) or (t[i + 1][0] in "aeiou") != (det == "an")):
        return None   # "an" exactly before a vowel
    for n in ([num] if num else ["sg", "pl"]):
        r = _nom(t, i + 1, n)
        if r is not None:
            num = n
            break
    else:
        return None
    if number and num != number:
        return None
    j, desc = r
    if quant is None:
        quant = ("eq", 1) if num == "sg" else ("ge", 2)
    for pos, words in _PP:
        k = _match(t, j, words)
        if k is not None and "pp" in mods:
            desc["pos"], j = pos, k
            break
    else:
        if "rel" in mods:
            for rel, words in _RELS:
                k = _match(t, j, words)
                if k is not None:
                    r = _np(t, k, ("indef", "num", "def"), "sg", mods=("pp",))
                    if r is not None:
                        j, desc["rel"] = r[0], (rel, r[1])
                    break
    return j, {"number": num, "kind": kind, "quant": quant, "desc": desc}


def _np_list(t, i, kinds):
    """'A', 'A and B', 'A , B and C' -> (i, [nodes])."""
    r = _np(t, i, kinds)
    if r is None:
        return None
    i, nodes, seps = r[0], [r[1]], []
    while i < len(t) and t[i] in (",", "and"):
        r = _np(t, i + 1, kinds)
        if r is None:
            return None
        seps.append(t[i])
        i, nodes = r[0], nodes + [r[1]]
    if seps and (seps[-1] != "and" or any(s != "," for s in seps[:-1])):
        return None
    return i, nodes


def _pred(t, i):
    """What follows is/are: [not] size, [not] colour, a place, or a relation. -> (i, pred) or None."""
    neg = i < len(t) and t[i] == "not"
    j = i + 1 if neg else i
    if j < len(t) and t[j] in SIZES:
        return j + 1, {"desc": {"size": t[j]}, "neg": neg}
    if j < len(t) and t[j] in COLORS:
        return j + 1, {"desc": {"color": t[j]}, "neg": neg}
    if neg:
        return None
    for pos, words in _PP:
        k = _match(t, i, words)
        if k is not None:
            return k, {"desc": {"pos": pos}, "neg": False}
    for rel, words in _RELS:
        k = _match(t, i, words)
        if k is not None:
            r = _np(t, k, ("indef", "num", "def"), "sg", mods=("pp",))
            return r and (r[0], {"desc": {"rel": (rel, r[1])}, "neg": False})
    return None


_ANY = ("indef", "num", "def")
_INDEF = ("indef", "num")
_VERB = {"is": "sg", "are": "pl"}


def _sentence(t):
    """Parse one sentence (tokens incl. its final punctuation).
    -> (claims, main, pronoun) or None. claims: list of {"np", "preds"}; main: the claim a following
    'it'/'they' refers to; pronoun: (number, pred) when this sentence is 'it is ...' / 'they are ...'."""
    end, b = t[-1], t[:-1]
    n = len(b)

    def full(r):
        return r is not None and r[0] == n

    def claim(node, preds=()):
        return {"np": node, "preds": list(preds)}

    if end == ".":
        if b[:1] == ["there"] and n > 2 and b[1] in _VERB:
            if b[2] == "no":   # there is no green star / there are no stars
                r = _nom(b, 3, _VERB[b[1]])
                if r and r[0] == n:
                    return [claim({"number": _VERB[b[1]], "kind": "num", "quant": ("eq", 0), "desc": r[1]})], None, None
                return None
            r = _np_list(b, 2, _INDEF)
            if full(r) and r[1][0]["number"] == _VERB[b[1]]:
                cs = [claim(x) for x in r[1]]
                return cs, (cs[0] if len(cs) == 1 else None), None
            return None
        if b[:1] in (["it"], ["they"]) and n > 2 and _VERB.get(b[1]) == ("sg" if b[0] == "it" else "pl"):
            r = _pred(b, 2)
            if full(r):
                return [], None, (_VERB[b[1]], r[1])
            return None
        if b[:2] == ["i", "see"]:
            r = _np_list(b, 2, _ANY)
            if full(r):
                cs = [claim(x) for x in r[1]]
                return cs, (cs[0] if len(cs) == 1 else None), None
            return None
        for mods in (("pp", "rel"), ("pp",)):   # the circle is red .
            r = _np(b, 0, ("def",), mods=mods)
            if r is not None and r[0] < n and b[r[0]] in _VERB:
                p = _pred(b, r[0] + 1)
                if _VERB[b[r[0]]] == r[1]["number"] and full(p):
                    c = claim(r[1], [p[1]])
                    return [c], c, None
        if b[:1] and b[0] in ("the", "this", "that", "these", "those"):
            return None
        r = _np(b, 0, _INDEF)
        if r is not None and r[0] < n and b[r[0]] == ":":   # two objects : a ... and a ... .
            rest = _np_list(b, r[0] + 1, _INDEF)
            if full(rest) and r[1]["kind"] == "num":
                return [claim(r[1])] + [claim(x) for x in rest[1]], None, None
            return None
        r = _np_list(b, 0, _INDEF)   # bare noun phrases: a red circle left of a blue square .
        if full(r):
            cs = [claim(x) for x in r[1]]
            return cs, (cs[0] if len(cs) == 1 else None), None
        return None
    if end == "!":
        if b[:2] == ["look", "at"]:
            r = _np(b, 2, ("def",))
            if full(r):
                c = claim(r[1])
                return [c], c, None
            return None
        if b[:1] in (["look"], ["wow"], ["oh"]) and b[1:2] == [","]:
            r = _np_list(b, 2, _ANY)
            if full(r):
                cs = [claim(x) for x in r[1]]
                return cs, (cs[0] if len(cs) == 1 else None), None
        return None
    if end == "?":
        # questions claim only what they presuppose: "where is the red circle ?" says there is one red circle
        if b[:3] in (["can", "you", "see"], ["do", "you", "see"]):
            r = _np(b, 3, _ANY)
            return ([claim(r[1])], None, None) if full(r) else None
        if b[:2] in (["is", "there"], ["are", "there"]):
            r = _np(b, 2, _INDEF, _VERB[b[0]])
            return ([], None, None) if full(r) else None
        if b[:2] == ["how", "many"]:
            r = _nom(b, 2, "pl")
            return ([], None, None) if r and b[r[0]:] == ["are", "there"] else None
        if b[:1] == ["where"] and n > 1 and b[1] in _VERB:
            r = _np(b, 2, ("def",), _VERB[b[1]])
            return ([claim(r[1])], None, None) if full(r) else None
        if b[:1] == ["what"] and n > 2 and b[1] in ("color", "shape", "size") and b[2] in _VERB:
            r = _np(b, 3, ("def",), _VERB[b[2]])
            return ([claim(r[1])], None, None) if full(r) else None
        if b[:2] in (["which", "is"],) and n > 3 and b[2] in ("bigger", "smaller") and b[3] == ",":
            r1 = _np(b, 4, ("def",), "sg")
            if r1 and r1[0] < n and b[r1[0]] == "or":
                r2 = _np(b, r1[0] + 1, ("def",), "sg")
                if full(r2):
                    return [claim(r1[1]), claim(r2[1])], None, None
            return None
        if b[:1] and b[0] in _VERB:   # is the red circle big ? / is the red circle left of the star ?
            for mods in (("pp", "rel"), ("pp",), ()):
                r = _np(b, 1, ("def",), _VERB[b[0]], mods=mods)
                if r is not None and full(_pred(b, r[0])):
                    return [claim(r[1])], None, None
        return None
    return None


def _tokenize(text):
    """Lower-case words and punctuation; None if the text has anything else in it."""
    text = text.lower()
    if re.search(r"[^a-z.,!?:\s]", text):
        return None
    return re.findall(r"[a-z]+|[.,!?:]", text)


def _parse(text):
    """-> list of claims, or None if the text is not a sequence of grammatical sentences
    (or an 'it'/'they' has nothing to refer to)."""
    toks = _tokenize(text)
    if not toks or toks[-1] not in _TERMINATORS:
        return None
    claims, prev, start = [], None, 0
    for i, tok in enumerate(toks):
        if tok not in _TERMINATORS:
            continue
        r = _sentence(toks[start:i + 1])
        start = i + 1
        if r is None:
            return None
        cs, main, pron = r
        if pron is not None:
            number, pred = pron
            if prev is None or prev["np"]["number"] != number or prev["np"]["quant"] == ("eq", 0):
                return None
            prev["preds"].append(pred)   # "it is big" adds to what the previous sentence said
            main = prev
        claims.extend(cs)
        prev = main
    return claims


def is_grammatical(sentence):
    """True if the text is one or more sentences of the world's grammar."""
    return _parse(sentence) is not None


def parse_claims(text):
    """Claims made by a caption; [] if it is unparseable (or makes no claims, like 'is there a star ?')."""
    return _parse(text) or []


def _obj_fits(scene, o, desc):
    if any(k in desc and o[k] != desc[k] for k in ("size", "color", "shape")):
        return False
    if "pos" in desc and position_word(o["x"], o["y"]) != desc["pos"]:
        return False
    if "rel" in desc:
        rel, ref = desc["rel"]
        targets = [y for y in scene["objects"] if _obj_fits(scene, y, ref["desc"])]
        if ref["kind"] != "indef" and not _count_ok(len(targets), ref["quant"]):
            return False   # "left of the blue square" needs exactly one blue square
        return any(y is not o and relation_holds(rel, o, y) for y in targets)
    return True


def _count_ok(k, quant):
    op, want = quant
    return k == want if op == "eq" else k >= want


def _pred_ok(scene, o, pred):
    return _obj_fits(scene, o, pred["desc"]) != pred["neg"]


def claim_true(scene, c):
    found = [o for o in scene["objects"] if _obj_fits(scene, o, c["np"]["desc"])]
    if c["np"]["kind"] == "indef":   # "a red circle ... it is big": some red circle is big
        found = [o for o in found if all(_pred_ok(scene, o, p) for p in c["preds"])]
        return _count_ok(len(found), c["np"]["quant"])
    # "the circles are big", "two red stars . they are small": count the described ones, then check all of them
    return _count_ok(len(found), c["np"]["quant"]) and all(_pred_ok(scene, o, p) for o in found for p in c["preds"])


def check_caption(scene, text):
    """True only if the text parses, makes at least one claim, and every claim is true of the scene."""
    claims = _parse(text)
    return bool(claims) and all(claim_true(scene, c) for c in claims)


def _max_matching(slots):
    """Largest matching of slots (each a list of object indices it may take) to distinct objects
    (augmenting paths; a scene has at most a handful of objects)."""
    owner = {}  # object index -> slot

    def take(s, seen):
        for o in slots[s]:
            if o not in seen:
                seen.add(o)
                if o not in owner or take(owner[o], seen):
                    owner[o] = s
                    return True
        return False
    return sum(take(s, set()) for s in range(len(slots)))


def caption_quality(scene, text):
    """How good a (model's) caption is, beyond being true:
    correct: it parses and every claim is true (check_caption);
    informative: correct, and it names at least one object of the scene by colour AND shape in a
        positive claim ("there are no orange crosses ." is true of most scenes but says nothing);
    complete: informative, and it states how many objects there are and names that many (the
        canonical full description does)."""
    claims = _parse(text)
    correct = bool(claims) and all(claim_true(scene, c) for c in claims)
    slots = []  # one per object a positive claim names by colour and shape: the objects it may be
    for c in claims or []:
        desc = dict(c["np"]["desc"])
        for p in c["preds"]:
            if not p["neg"]:
                desc.update({k: v for k, v in p["desc"].items() if k in ("size", "color", "shape", "pos")})
        op, k = c["np"]["quant"]
        if "color" in desc and "shape" in desc and k >= 1:
            matches = _matching(scene, **{a: v for a, v in desc.items() if a in ("size", "color", "shape", "pos")})
            slots += [[i for i, o in enumerate(scene["objects"]) if any(o is m for m in matches)]] * k
    # objects named = the most claims matched to DIFFERENT objects: "a red circle ... and a red circle" names one
    named = _max_matching(slots)
    n = len(scene["objects"])
    counted = any(not c["np"]["desc"] and not c["preds"] and c["np"]["quant"] == ("eq", n) for c in claims or [])
    informative = correct and named >= 1
    return {"correct": correct, "informative": informative, "complete": informative and counted and named >= n}


_DIGITS = {str(i): w for i, w in enumerate(NUM_WORDS)}


def normalize_answer(s):
    s = " ".join(str(s).lower().strip().split())
    s = s.rstrip(" .!?,:;")
    return " ".join(_DIGITS.get(w, w) for w in s.split())


# ---------------------------------------------------------------------------------------------------------------------
# Visual question answering
# ---------------------------------------------------------------------------------------------------------------------
QA_TYPES = ("existence", "count", "color", "shape", "size", "spatial", "comparison", "yesno")


def _qa(scene, rng, qtype):
    """One (question, answer) of the given type, or None if the scene does not allow it."""
    objs = scene["objects"]
    o = rng.choice(objs)
    yes = rng.random() < 0.5
    if qtype == "existence":
        if yes:
            desc = _desc(o, rng.choice([("color", "shape"), ("shape",), ("size", "color", "shape"), ("color",)]))
        else:
            desc = rng.choice([{"color": rng.choice(COLORS), "shape": rng.choice(SHAPES)},
                               {"shape": rng.choice(SHAPES)}, {"color": rng.choice(COLORS)}])
            if _matching(scene, **desc):
                return None
        return f"is there {noun_phrase('a', **desc)} ?", "yes" if yes else "no"
    if qtype == "count":
        descs = [{}] + [{"shape": s} for s in SHAPES] + [{"color": c} for c in COLORS] + \
                [{"color": c, "shape": s} for c in COLORS for s in SHAPES]
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


def make_questions(scene, rng):
    """4-6 questions of different types (where the scene allows)."""
    want = rng.randint(4, 6)
    types = list(QA_TYPES)
    rng.shuffle(types)
    out, seen = [], set()
    for attempt in range(60):
        qtype = types[attempt % len(types)]
        r = _qa(scene, rng, qtype)
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


def _combo(rng, heldout):
    pool = sorted(HELDOUT_COMBOS) if heldout else [(c, s) for c in COLORS for s in SHAPES
                                                    if (c, s) not in HELDOUT_COMBOS]
    return rng.choice(pool)


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
        k = next(i for i, w in enumerate(t) if w in _VERB)
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
        else:
            good = f"where is the {size} {color} {shape} ?"
        t = good.split()
        k = t.index(shape)   # swap the noun with the word after it
        return t, t[:k] + [t[k + 1], t[k]] + t[k + 2:]
    if paradigm == "article_an":
        sz = rng.choice([None, size])
        if rng.random() < 0.5:   # a vowel-initial adjective: "an orange star" / "an orange square" (held out)
            sz = None
            color = "orange"
            shape = "square" if heldout else rng.choice([x for x in SHAPES if ("orange", x) not in HELDOUT_COMBOS])
        np_ = noun_phrase("a", size=sz, color=color, shape=shape)
        t = [f"look , {np_} !", f"there is {np_} .", f"can you see {np_} ?", f"i see {np_} ."][rng.randrange(4)].split()
        k = t.index("a") if "a" in t else t.index("an")
        return t, t[:k] + ["an" if t[k] == "a" else "a"] + t[k + 1:]
    raise ValueError(paradigm)


def minimal_pairs(seed, scale):
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
                if g in seen:
                    continue
                assert is_grammatical(g) and not is_grammatical(b), (uid, g, b)
                assert mentions_heldout(g) == heldout, (uid, g)
                out.append({"sentence_good": g, "sentence_bad": b, "UID": uid, "pair_id": len(seen),
                            "heldout": heldout})
                seen.add(g)
    return out


def _wino_pair(rng):
    """Two two-object scenes and two captions with the same words, each caption true of its own image only."""
    (c1, s1), (c2, s2) = rng.sample([(c, s) for c in COLORS for s in SHAPES], 2)
    if c1 == c2 or s1 == s2:
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


# ---------------------------------------------------------------------------------------------------------------------
# Building the files
# ---------------------------------------------------------------------------------------------------------------------
def split_scene(seed, split, index):
    """The scene for one image of one split: resampled until its content hash falls in the split's buckets."""
    rng = _rng(seed, split, index)
    return sample_scene(rng, buckets=IMAGE_SPLITS[split][1]), rng


def _count(default, scale):
    return max(1, round(default * scale))


def _write_lines(path, lines):
    with open(path, "w") as f:
        f.write("".join(line + "\n" for line in lines))


def contact_sheet(path, images, captions, size):
    """A PNG grid of images (upscaled, nearest) with a caption under each, for people to look at."""
    cell, text_h, cols = max(128, size * 4), 70, 4
    rows = (len(images) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * (cell + 8), rows * (cell + text_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for k, (img, cap) in enumerate(zip(images, captions)):
        x, y = (k % cols) * (cell + 8), (k // cols) * (cell + text_h)
        sheet.paste(Image.fromarray(img).resize((cell, cell), Image.NEAREST), (x, y))
        words, lines, line = cap.split(), [], ""
        for w in words:   # wrap to the cell width
            if line and draw.textlength(line + " " + w, font=font) > cell:
                lines.append(line)
                line = w
            else:
                line = (line + " " + w).strip()
        lines.append(line)
        draw.multiline_text((x + 2, y + cell + 2), "\n".join(lines[:5]), fill=(0, 0, 0), font=font, spacing=1)
    sheet.save(path)


def vocabulary():
    words = set(SHAPES + COLORS + SIZES + PL_NOUNS + GENERIC_NOUNS + NUM_WORDS)
    for phrase in list(PP_PHRASE.values()) + list(RELATIONS):
        words.update(phrase.split())
    words.update("a an the this that these those some no not is are there it they i see can you do look at wow oh "
                 "where what color size shape how many which bigger smaller or and , . ! ? :".split())
    return sorted(words)


def _text_chunk(job):
    """Lines [lo, hi) of a text split. Phase 1 text: scenes without held-out pairs, talked about without
    held-out words. descriptions_test: test-bucket scenes, every other one with a held-out pair in it."""
    seed, split, lo, hi = job
    lines = []
    for i in range(lo, hi):
        rng = _rng(seed, split, i)
        if split == "descriptions_test":
            scene = sample_scene(rng, force_heldout=i % 2 == 1, buckets=IMAGE_SPLITS["caption_test"][1])
            lines.append(text_line(scene, rng, phase1=False))
            continue
        line = text_line(sample_scene(rng, allow_heldout=False), rng, phase1=True)
        while mentions_heldout(line):   # safety net; the phase 1 generator should never get here
            line = text_line(sample_scene(rng, allow_heldout=False), rng, phase1=True)
        lines.append(line)
    return lines


def _image_chunk(job):
    """Images [lo, hi) of an image split -> (uint8 images, jsonl lines of records, jsonl lines of questions)."""
    seed, split, lo, hi, size = job
    images = np.zeros((hi - lo, size, size, 3), np.uint8)
    records, qas = [], []
    for i in range(lo, hi):
        scene, rng = split_scene(seed, split, i)
        images[i - lo] = render(scene, size)
        records.append(json.dumps({"id": i, "scene": scene, "captions": describe(scene, rng)}))
        if split.startswith("vqa"):
            qas += [json.dumps(dict(image=i, **q)) for q in make_questions(scene, rng)]
    return images, records, qas


def _run_jobs(fn, jobs, bar, pool):
    """Results of fn over jobs, in order; in parallel when a pool is given (results do not depend on it)."""
    results = pool.imap(fn, jobs) if pool else map(fn, jobs)
    for job, r in zip(jobs, results):
        bar.update(job[3] - job[2])
        yield r


def build(out_dir, seed=0, scale=1.0, size=32, progress=True):
    """Write the whole world into out_dir (see data/WORLD.md for the files)."""
    from tqdm import tqdm
    if not scale > 0 or size < 16:
        raise ValueError("scale must be > 0 and size >= 16")
    os.makedirs(out_dir, exist_ok=True)
    counts = {name: _count(n, scale) for name, n in TEXT_COUNTS.items()}
    counts.update({name: _count(n, scale) for name, (n, _) in IMAGE_SPLITS.items()})
    bar = tqdm(total=sum(counts.values()), desc="building world", unit="item", disable=not progress)
    chunk = 500

    def jobs(split, *extra):
        return [(seed, split, lo, min(lo + chunk, counts[split])) + extra for lo in range(0, counts[split], chunk)]

    # worker processes only pay off for big builds; "spawn" is safe even if the caller has torch loaded
    workers = min(os.cpu_count() or 1, 8)
    pool = None
    if workers > 1 and sum(counts.values()) > 20000:
        import multiprocessing
        pool = multiprocessing.get_context("spawn").Pool(workers)
    try:
        for split in TEXT_COUNTS:
            lines = [x for part in _run_jobs(_text_chunk, jobs(split), bar, pool) for x in part]
            _write_lines(os.path.join(out_dir, f"{split}.txt"), lines)
            if split == "descriptions_test":
                _write_lines(os.path.join(out_dir, "descriptions_test_heldout.txt"),
                             [x for x in lines if mentions_heldout(x)])
        # For the vqa splits, vqa_*.jsonl holds the questions (one per line), so their per-image records go to
        # vqa_*_scenes.jsonl instead.
        sheet = None
        for split in IMAGE_SPLITS:
            parts = list(_run_jobs(_image_chunk, jobs(split, size), bar, pool))
            images = np.concatenate([p[0] for p in parts])
            records = [x for p in parts for x in p[1]]
            np.save(os.path.join(out_dir, f"{split}_images.npy"), images)
            name = f"{split}_scenes.jsonl" if split.startswith("vqa") else f"{split}.jsonl"
            _write_lines(os.path.join(out_dir, name), records)
            if split.startswith("vqa"):
                _write_lines(os.path.join(out_dir, f"{split}.jsonl"), [x for p in parts for x in p[2]])
            if split == "caption_val":
                sheet = (images[:16], [json.loads(r)["captions"][0] for r in records[:16]])
    finally:
        if pool:
            pool.close()
            pool.join()
    bar.close()

    pairs = minimal_pairs(seed, scale)
    _write_lines(os.path.join(out_dir, "minimal_pairs.jsonl"), [json.dumps(p) for p in pairs])
    items, wino_images = winoground(seed, scale, size)
    np.save(os.path.join(out_dir, "winoground_images.npy"), wino_images)
    _write_lines(os.path.join(out_dir, "winoground.jsonl"), [json.dumps(x) for x in items])
    contact_sheet(os.path.join(out_dir, "contact_sheet.png"), *sheet, size)

    meta = {"format_version": FORMAT_VERSION, "seed": seed, "scale": scale, "size": size, "counts": counts,
            "minimal_pairs": len(pairs), "winoground": len(items),
            "shapes": SHAPES, "colors": COLORS, "sizes": SIZES, "positions": POSITIONS, "relations": RELATIONS,
            "numbers": NUM_WORDS, "vocabulary": vocabulary(), "qa_types": QA_TYPES, "paradigms": PARADIGMS,
            "heldout_combos": [f"{c} {s}" for c, s in sorted(HELDOUT_COMBOS)],
            "heldout_relations": list(HELDOUT_RELATION_WORDS)}
    # meta.json last: its presence means the build finished
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)


def ensure_built(out_dir="data/world", seed=None, scale=None, size=None):
    """Build the world unless out_dir already holds one with these settings. Returns out_dir.
    A setting left as None accepts whatever the finished world in out_dir has (so a world built with
    `python -m data.world --scale 0.05` is used as it is); a missing world is built with the defaults
    (seed 0, scale 1, size 32)."""
    want = {"format_version": FORMAT_VERSION, "seed": seed, "scale": scale, "size": size}
    try:
        with open(os.path.join(out_dir, "meta.json")) as f:
            meta = json.load(f)
        if all(v is None or meta.get(k) == v for k, v in want.items()):
            return out_dir
    except (OSError, ValueError):
        pass
    build(out_dir, seed=0 if seed is None else seed, scale=1.0 if scale is None else scale,
          size=32 if size is None else size)
    return out_dir


def main(argv=None):
    p = argparse.ArgumentParser(description="Build the Dreaming Out Loud world (text, images, captions, QA, eval).")
    p.add_argument("--out", default="data/world", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0, help="multiplies every count")
    p.add_argument("--size", type=int, default=32, help="image side in pixels")
    args = p.parse_args(argv)
    if not args.scale > 0:
        p.error("--scale must be > 0")
    if args.size < 16:
        p.error("--size must be at least 16")
    build(args.out, seed=args.seed, scale=args.scale, size=args.size)
    print(f"world written to {args.out}")


if __name__ == "__main__":
    main()
