"""The generator's language: the one small grammar that turns a scene into true sentences about it.

Separate from data/world.py (what a scene is and how it looks) because it is the part the model learns to speak,
and separate from data/judge.py, which parses that language with its own code: the judge must not share a helper
with this file, or a bug here could hide behind the same bug there. Uses the world's vocabulary and geometry.
"""
from data.world import COLORS, HELDOUT_COMBOS, HELDOUT_RELATION_WORDS, RELATIONS, SHAPES, SIZES, relation_holds

# ---------------------------------------------------------------------------------------------------------------------
# Words (the world's SHAPES, COLORS, SIZES and RELATIONS are words already)
# ---------------------------------------------------------------------------------------------------------------------
NUM_WORDS = ("zero", "one", "two", "three", "four")
GENERIC_NOUNS = ("object", "thing", "shape")   # nouns that stand for any shape


def plural(noun):
    return noun + "es" if noun.endswith("ss") else noun + "s"


SG_NOUNS = SHAPES + GENERIC_NOUNS
PL_NOUNS = tuple(plural(n) for n in SG_NOUNS)
SINGULAR = dict(zip(PL_NOUNS, SG_NOUNS))
PP_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top",   # the world's POSITIONS, said
             "bottom": "at the bottom", "middle": "in the middle"}


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


class _Gen:
    """Sentence makers for one scene. Each returns a true sentence or None when it does not apply.
    never: colour+shape pairs never to name, not even in a negation or a question (the scene itself holds none
    of them); phase1=True also keeps to phase 1's relation words (no above/below)."""

    def __init__(self, scene, rng, phase1=False, never=frozenset()):
        self.s, self.rng, self.never = scene, rng, never
        self.objs = scene["objects"]
        self.rels = [r for r in RELATIONS if not (phase1 and r in HELDOUT_RELATION_WORDS)]

    def ok(self, desc):
        """May this description be said? "the circle is not white" counts as naming a white circle."""
        return (desc.get("color"), desc.get("shape")) not in self.never

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


def describe(scene, rng, never=frozenset()):
    """3-5 true captions; the first is the canonical full description. never: pairs no caption may name."""
    g = _Gen(scene, rng, never=never)
    caps = [g.canonical()]
    want = rng.randint(3, 5)
    for _ in range(40):
        if len(caps) == want:
            break
        c = getattr(g, rng.choice(_CAPTION_MAKERS))()
        if c and c not in caps:
            caps.append(c)
    return caps


def mentions(text, pairs, words=()):
    """Does the text name one of these colour+shape pairs ("red circle", "red circles"), or one of the words?"""
    toks = text.split()
    if any(t in words for t in toks):
        return True
    return any((a, SINGULAR.get(b, b)) in pairs for a, b in zip(toks, toks[1:]))


def mentions_heldout(text):
    """Does the text name an S pair (held out of phase 1, named in phase 2) or a held-out relation word?"""
    return mentions(text, HELDOUT_COMBOS, HELDOUT_RELATION_WORDS)


def text_line(scene, rng, phase1=True, never=frozenset()):
    """One line of child-directed talk about a scene: one to three sentences."""
    g = _Gen(scene, rng, phase1=phase1, never=never)
    n = rng.choice([1, 1, 2, 2, 3])
    out = []
    while len(out) < n:
        s = getattr(g, rng.choice(_TEXT_MAKERS))()
        if s:
            out.append(s)
    return " ".join(out)


# left of / right of, above / below: each relation and its converse
CONVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def relational_caption(scene, rng):
    """'a red circle above a blue square . a blue square below a red circle .': one clear relation between two
    objects and its converse, in the words Winoground items use (colour and shape). Phase 2 learns above/below
    from these, the only place they are taught. None when no two objects stand clearly apart."""
    options = [(a, rel, b) for a in scene["objects"] for b in scene["objects"] if a is not b
               for rel in CONVERSE if relation_holds(rel, a, b) and (a["color"], a["shape"]) != (b["color"], b["shape"])]
    if not options:
        return None
    a, rel, b = rng.choice(options)
    na, nb = noun_phrase("a", color=a["color"], shape=a["shape"]), noun_phrase("a", color=b["color"], shape=b["shape"])
    return f"{na} {rel} {nb} . {nb} {CONVERSE[rel]} {na} ."


def vocabulary():
    """Every word (and punctuation token) the grammar uses, sorted; listed in meta.json."""
    words = set(SHAPES + COLORS + SIZES + PL_NOUNS + GENERIC_NOUNS + NUM_WORDS)
    for phrase in list(PP_PHRASE.values()) + list(RELATIONS):
        words.update(phrase.split())
    words.update("a an the this that these those some no not is are there it they i see can you do look at wow oh "
                 "where what color size shape how many which bigger smaller or and , . ! ? :".split())
    return sorted(words)
