"""The judge: an independent parser and checker for the world's language.

It reads any token string (a model's caption or answer as much as the generator's), recognises the grammar, turns
sentences into claims and checks them against a scene's structured description. It is separate from data/talk.py
and imports nothing from data/ at all, with its own word lists and its own geometry below, so that a bug in the
generator cannot hide behind the same bug in the checker. tests/test_world.py checks that the two agree.

A scene is read as plain data: {"objects": [{"shape", "color", "size", "x", "y"}, ...]}, x and y being the centre
as fractions of the image side, y growing downwards (a stored "position" field is not trusted: it is recomputed).
"""
import re

# ---------------------------------------------------------------------------------------------------------------------
# The judge's own vocabulary and geometry, written out rather than imported from the generator
# ---------------------------------------------------------------------------------------------------------------------
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
COLORS = ("red", "green", "blue", "yellow", "black", "white", "orange", "purple")
SIZES = ("small", "big")
NOUNS = SHAPES + ("object", "thing", "shape")   # the last three stand for any shape
PLURALS = {"circles": "circle", "squares": "square", "triangles": "triangle", "diamonds": "diamond",
           "stars": "star", "crosses": "cross", "objects": "object", "things": "thing", "shapes": "shape"}
PLACES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
          "middle": "in the middle"}
RELATIONS = ("left of", "right of", "above", "below", "next to", "bigger than", "smaller than")
NUMBERS = ("zero", "one", "two", "three", "four")
DETERMINERS = {  # determiner: (number, kind, (comparison, k)); "the" takes its number from the noun
    "a": ("sg", "indef", ("ge", 1)), "an": ("sg", "indef", ("ge", 1)), "one": ("sg", "num", ("eq", 1)),
    "two": ("pl", "num", ("eq", 2)), "three": ("pl", "num", ("eq", 3)), "four": ("pl", "num", ("eq", 4)),
    "some": ("pl", "indef", ("ge", 2)), "this": ("sg", "def", ("eq", 1)), "that": ("sg", "def", ("eq", 1)),
    "these": ("pl", "def", ("ge", 2)), "those": ("pl", "def", ("ge", 2)), "the": (None, "def", None),
}

MARGIN = 0.2                        # "left of", "above", ...: centres further apart than this along the axis
NEXT_TO_DY, NEXT_TO_DX = 0.1, 0.5   # "next to": about the same height and not far apart sideways


def _place(o):
    """The place word for an object's centre: its column in a 3x3 grid, or its row in the middle column."""
    col, row = min(2, int(o["x"] * 3)), min(2, int(o["y"] * 3))
    if col == 1:
        return ("top", "middle", "bottom")[row]
    return "left" if col == 0 else "right"


def _related(rel, a, b):
    """Does a stand in relation rel to b? Only clear cases hold: two objects at nearly the same height are not
    one above the other, whichever is a pixel higher."""
    dx, dy = b["x"] - a["x"], b["y"] - a["y"]   # from a's centre to b's
    if rel in ("bigger than", "smaller than"):
        return (a["size"], b["size"]) == (("big", "small") if rel == "bigger than" else ("small", "big"))
    if rel == "next to":
        return abs(dy) < NEXT_TO_DY and abs(dx) < NEXT_TO_DX
    gap = {"left of": dx, "right of": -dx, "above": dy, "below": -dy}[rel]
    return gap > MARGIN


# ---------------------------------------------------------------------------------------------------------------------
# The grammar as a recogniser: any token string -> claims about a scene
# ---------------------------------------------------------------------------------------------------------------------
_TERMINATORS = (".", "!", "?")
_PP = [(pos, tuple(p.split())) for pos, p in PLACES.items()]
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
    noun = t[i] if number == "sg" and t[i] in NOUNS else PLURALS.get(t[i]) if number == "pl" else None
    if noun is None:
        return None
    if noun in SHAPES:
        desc["shape"] = noun
    return i + 1, desc


def _np(t, i, kinds, number=None, mods=("pp", "rel")):
    """Determiner + nominal + optional modifier (a place, or a relation to another noun phrase).
    mods: which modifiers may attach; fewer lets 'is the circle left of ... ?' leave them to the predicate.
    -> (i, node) or None. node: {"number", "kind", "quant", "desc"}."""
    if i >= len(t) or t[i] not in DETERMINERS:
        return None
    det = t[i]
    num, kind, quant = DETERMINERS[det]
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
    if "pos" in desc and _place(o) != desc["pos"]:
        return False
    if "rel" in desc:
        rel, ref = desc["rel"]
        targets = [y for y in scene["objects"] if _obj_fits(scene, y, ref["desc"])]
        if ref["kind"] != "indef" and not _count_ok(len(targets), ref["quant"]):
            return False   # "left of the blue square" needs exactly one blue square
        return any(y is not o and _related(rel, o, y) for y in targets)
    return True


def _count_ok(k, quant):
    op, want = quant
    return k == want if op == "eq" else k >= want


def _pred_ok(scene, o, pred):
    return _obj_fits(scene, o, pred["desc"]) != pred["neg"]


def claim_true(scene, c):
    """Is one parsed claim (an item of parse_claims) true of the scene?"""
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
            simple = {a: v for a, v in desc.items() if a in ("size", "color", "shape", "pos")}
            slots += [[i for i, o in enumerate(scene["objects"]) if _obj_fits(scene, o, simple)]] * k
    # objects named = the most claims matched to DIFFERENT objects: "a red circle ... and a red circle" names one
    named = _max_matching(slots)
    n = len(scene["objects"])
    counted = any(not c["np"]["desc"] and not c["preds"] and c["np"]["quant"] == ("eq", n) for c in claims or [])
    informative = correct and named >= 1
    return {"correct": correct, "informative": informative, "complete": informative and counted and named >= n}


_DIGITS = {str(i): w for i, w in enumerate(NUMBERS)}


def normalize_answer(s):
    """An answer as the world spells it, so answers compare by string: lower case, single spaces, no final
    punctuation, digits as number words ("Two." and "2" both -> "two")."""
    s = " ".join(str(s).lower().strip().split())
    s = s.rstrip(" .!?,:;")
    return " ".join(_DIGITS.get(w, w) for w in s.split())
