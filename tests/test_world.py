"""Tests for the world (data/world.py) and the modules split off from it by role: its language (data/talk.py),
the independent judge of that language (data/judge.py) and the benchmarks (data/benchmarks.py). A small world is
built once per module and checked from the outside, mostly through the names data.world still exports.

Where the tests judge truth (captions, answers) they recompute it from the scene dicts with their own code,
so a bug in the generator cannot hide behind the same bug in the checker.
"""
import ast
import collections
import importlib
import json
import os
import random
import re
import subprocess
import sys
import types

import numpy as np
import pytest

from data import benchmarks as B
from data import judge as J
from data import talk as T
from data import world as W

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCALE = 0.02
PP = {"on the left": "left", "on the right": "right", "at the top": "top", "at the bottom": "bottom",
      "in the middle": "middle"}
NUMS = ["zero", "one", "two", "three", "four"]
IMAGE_SPLITS = ["caption_train", "caption_val", "caption_test", "unlabeled", "vqa_train", "vqa_val", "vqa_test"]


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    root = tmp_path_factory.mktemp("worlds")
    out = {}
    for name, seed in (("a", 0), ("a_again", 0), ("b", 1)):
        out[name] = str(root / name)
        W.build(out[name], seed=seed, scale=SCALE, size=32, progress=False)
    return out


@pytest.fixture(scope="module")
def w(worlds):
    return worlds["a"]


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def records(w, split):
    name = f"{split}_scenes.jsonl" if split.startswith("vqa") else f"{split}.jsonl"
    return read_jsonl(os.path.join(w, name))


def lines(w, name):
    with open(os.path.join(w, name)) as f:
        return f.read().splitlines()


# --- geometry, recomputed here ---------------------------------------------------------------------------------------
def position(o):
    col, row = min(2, int(o["x"] * 3)), min(2, int(o["y"] * 3))
    if col != 1:
        return "left" if col == 0 else "right"
    if row != 1:
        return "top" if row == 0 else "bottom"
    return "middle"


def key(scene):
    return tuple(sorted((o["shape"], o["color"], o["size"], min(2, int(o["y"] * 3)), min(2, int(o["x"] * 3)))
                        for o in scene["objects"]))


REF = re.compile(r"^(?:(big|small) )?(?:(%s) )?(%s)(?: (%s))?$" % (
    "|".join(W.COLORS), "|".join(W.SHAPES + ("object", "thing", "shape")), "|".join(PP)))


def select(scene, phrase):
    """Objects a noun phrase (without determiner) describes, e.g. 'big red circle on the left'."""
    m = REF.match(phrase)
    assert m, phrase
    size, color, noun, pp = m.groups()
    return [o for o in scene["objects"] if (size is None or o["size"] == size) and
            (color is None or o["color"] == color) and (noun not in W.SHAPES or o["shape"] == noun) and
            (pp is None or position(o) == PP[pp])]


def select_singular(noun):
    return noun[:-2] if noun.endswith("sses") else noun[:-1]


def select_plural(scene, phrase):
    words = phrase.split(" ")
    return select(scene, " ".join(words[:-1] + [select_singular(words[-1])]))


def the(scene, phrase):
    found = select(scene, phrase)
    assert len(found) == 1, (phrase, scene)
    return found[0]


# --- determinism and splits ------------------------------------------------------------------------------------------
def test_same_seed_gives_identical_files_and_other_seed_differs(worlds):
    names = sorted(os.listdir(worlds["a"]))
    assert names == sorted(os.listdir(worlds["a_again"]))
    assert "meta.json" in names and "contact_sheet.png" in names
    for name in names:
        with open(os.path.join(worlds["a"], name), "rb") as f1, open(os.path.join(worlds["a_again"], name), "rb") as f2:
            assert f1.read() == f2.read(), name
    for name in ("text_train.txt", "caption_train_images.npy", "vqa_train.jsonl", "minimal_pairs.jsonl"):
        with open(os.path.join(worlds["a"], name), "rb") as f1, open(os.path.join(worlds["b"], name), "rb") as f2:
            assert f1.read() != f2.read(), name


def test_meta_and_counts(w):
    with open(os.path.join(w, "meta.json")) as f:
        meta = json.load(f)
    assert meta["seed"] == 0 and meta["scale"] == SCALE and meta["size"] == 32
    assert sorted(meta["heldout_combos"]) == sorted(f"{c} {s}" for c, s in W.HELDOUT_COMBOS)
    assert meta["heldout_relations"] == ["above", "below"]
    for split in IMAGE_SPLITS:
        n = meta["counts"][split]
        assert n == max(1, round(W.IMAGE_SPLITS[split][0] * SCALE))
        assert np.load(os.path.join(w, f"{split}_images.npy"), mmap_mode="r").shape == (n, 32, 32, 3)
        assert [r["id"] for r in records(w, split)] == list(range(n))
    assert len(lines(w, "text_train.txt")) == meta["counts"]["text_train"] == 3000


def test_image_splits_never_share_a_scene(w):
    keys = {split: {key(r["scene"]) for r in records(w, split)} for split in IMAGE_SPLITS}
    for i, a in enumerate(IMAGE_SPLITS):
        for b in IMAGE_SPLITS[i + 1:]:
            assert not keys[a] & keys[b], (a, b)
    train = keys["caption_train"] | keys["unlabeled"] | keys["vqa_train"]
    for item in read_jsonl(os.path.join(w, "winoground.jsonl")):
        assert not {key(s) for s in item["scenes"]} & train


def test_images_show_their_objects(w):
    for split in ("caption_val", "vqa_val"):
        images = np.load(os.path.join(w, f"{split}_images.npy"))
        assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] == 3
        palette = {c: np.array(W.RGB[c], float) for c in W.COLORS}
        for img, r in zip(images, records(w, split)):
            scene = r["scene"]
            for o in scene["objects"]:
                assert o["position"] == position(o)
                # the pixel under the object's centre is nearest to the object's own colour (and not background)
                px = img[min(31, int(o["y"] * 32)), min(31, int(o["x"] * 32))].astype(float)
                choices = dict(palette, background=np.array(scene["background"], float))
                nearest = min(choices, key=lambda c: np.abs(choices[c] - px).sum())
                assert nearest == o["color"], (o, px)


def test_render_matches_stored_images(w):
    images = np.load(os.path.join(w, "caption_test_images.npy"))
    for img, r in zip(images, records(w, "caption_test")):
        assert np.array_equal(W.render(r["scene"], 32), img)


# --- captions --------------------------------------------------------------------------------------------------------
CANON_OBJ = re.compile(r"^an? (big|small) (%s) (%s) (%s)$" % ("|".join(W.COLORS), "|".join(W.SHAPES), "|".join(PP)))


def canonical_objects(caption):
    m = re.match(r"^(one object|two objects|three objects|four objects) : (.*) \.$", caption)
    assert m, caption
    parts = re.split(r" , | and ", m.group(2))
    assert len(parts) == NUMS.index(m.group(1).split()[0])
    out = []
    for p in parts:
        mo = CANON_OBJ.match(p)
        assert mo, caption
        out.append((mo.group(1), mo.group(2), mo.group(3), PP[mo.group(4)]))
    return sorted(out)


def test_every_caption_is_true_and_the_first_is_canonical(w):
    n = 0
    for split in IMAGE_SPLITS:
        for r in records(w, split):
            scene, caps = r["scene"], r["captions"]
            assert 3 <= len(caps) <= 5 and len(set(caps)) == len(caps)
            assert canonical_objects(caps[0]) == sorted((o["size"], o["color"], o["shape"], position(o))
                                                        for o in scene["objects"])
            for c in caps:
                assert W.is_grammatical(c), c
                assert W.check_caption(scene, c), (c, scene)
                n += 1
    assert n > 3000


SCENE = {"background": [128, 128, 128], "noise": 2, "noise_seed": 1, "objects": [
    {"shape": "circle", "color": "red", "size": "big", "x": 0.2, "y": 0.5, "position": "left"},
    {"shape": "square", "color": "blue", "size": "small", "x": 0.8, "y": 0.5, "position": "right"},
    {"shape": "star", "color": "orange", "size": "small", "x": 0.5, "y": 0.15, "position": "top"}]}


@pytest.mark.parametrize("text", [
    "three objects : a big red circle on the left , a small orange star at the top and a small blue square on the right .",
    "the red circle is left of the blue square .",
    "a big red circle left of a small blue square .",
    "the star is above the square .",
    "there is no green star .",
    "there are no triangles .",
    "look , a big red circle ! it is on the left .",
    "wow , an orange star !",
    "the circle is not small .",
    "can you see the blue square ?",
    "there are three objects .",
    "the red circle is bigger than the blue square .",
    "THE red circle is big.",   # case and attached punctuation are tolerated
])
def test_check_caption_accepts_true(text):
    assert W.check_caption(SCENE, text)


@pytest.mark.parametrize("text", [
    "a big green circle on the left .",                 # wrong colour
    "three objects : a big red circle on the left , a small orange star at the top and a small blue square on the left .",
    "two objects : a big red circle on the left and a small blue square on the right .",   # wrong count
    "there are two circles .",
    "the red circle is right of the blue square .",     # wrong relation
    "the red circle is above the blue square .",        # same height: not clearly above
    "the circle is blue .",
    "there is no red circle .",
    "look , a big red circle ! it is on the right .",
    "the star is below the square .",
    "the object is red .",                               # 'the' needs exactly one object
    "red red the .",                                     # garbage
    "circle circle circle",
    "a big red circle on the left",                      # no final punctuation
    "a red big circle .",                                # ungrammatical even though true-ish
    "an red circle .",
    "it is red .",                                       # nothing to refer to
    "is there a red circle ?",                           # a question claims nothing
    "a red circle <unk> .",
    "",
])
def test_check_caption_rejects_false_or_garbage(text):
    assert not W.check_caption(SCENE, text)


def test_caption_quality_counts_distinct_objects():
    """A repeated object names one object, not two: "complete" needs every object named by a different claim."""
    full = "three objects : a big red circle on the left , a small orange star at the top and a small blue square on the right ."
    repeat = ("three objects : a big red circle on the left , a big red circle on the left and a small blue square "
              "on the right .")
    assert W.caption_quality(SCENE, full) == {"correct": True, "informative": True, "complete": True}
    assert W.caption_quality(SCENE, repeat) == {"correct": True, "informative": True, "complete": False}
    assert not W.caption_quality(SCENE, "there are three objects . the red circle is big . the red circle is on the "
                                        "left . the blue square is small .")["complete"]


def test_parse_claims():
    assert W.parse_claims("gibberish words .") == []
    assert len(W.parse_claims("two objects : a red circle and a blue square .")) == 3


# --- question answering ----------------------------------------------------------------------------------------------
COLOR_OR_SIZE = "|".join(W.COLORS + W.SIZES)


def independent_answer(scene, q, qtype):
    """Recompute the answer of a question from the scene with regexes and plain geometry."""
    m = re.match(r"^is there an? (.+) \?$", q)
    if qtype == "existence" and m:
        return "yes" if select(scene, m.group(1)) else "no"
    m = re.match(r"^how many (.+) are there \?$", q)
    if qtype == "count" and m:
        return NUMS[len(select_plural(scene, m.group(1)))]
    m = re.match(r"^what (color|shape|size) is the (.+) \?$", q)
    if qtype in ("color", "shape", "size") and m and m.group(1) == qtype:
        return the(scene, m.group(2))[qtype]
    m = re.match(r"^is the (.+) (%s) \?$" % COLOR_OR_SIZE, q)
    if qtype == "yesno" and m:
        o, v = the(scene, m.group(1)), m.group(2)
        return "yes" if v in (o["color"], o["size"]) else "no"
    m = re.match(r"^where is the (.+) \?$", q)
    if qtype == "spatial" and m:
        return position(the(scene, m.group(1)))
    m = re.match(r"^is the (.+) (left of|right of|above|below) the (.+) \?$", q)
    if qtype == "spatial" and m:
        a, rel, b = the(scene, m.group(1)), m.group(2), the(scene, m.group(3))
        dx, dy = b["x"] - a["x"], b["y"] - a["y"]
        gap = {"left of": dx, "right of": -dx, "above": dy, "below": -dy}[rel]
        assert abs(gap) > 0.2, "relation questions must be unambiguous"
        return "yes" if gap > 0 else "no"
    m = re.match(r"^which is (bigger|smaller) , the (.+) or the (.+) \?$", q)
    if qtype == "comparison" and m:
        a, b = the(scene, m.group(2)), the(scene, m.group(3))
        assert a["size"] != b["size"]
        a_wins = (a["size"] == "big") == (m.group(1) == "bigger")
        return "the " + (m.group(2) if a_wins else m.group(3))
    raise AssertionError(f"unexpected question {q!r} of type {qtype}")


def test_vqa_answers_are_true_and_balanced(w):
    by_type = collections.defaultdict(collections.Counter)
    for split in ("vqa_train", "vqa_val", "vqa_test"):
        recs = records(w, split)
        qas = read_jsonl(os.path.join(w, f"{split}.jsonl"))
        per_image = collections.Counter(q["image"] for q in qas)
        assert set(per_image) == set(range(len(recs))) and min(per_image.values()) >= 3
        for q in qas:
            assert set(q) == {"image", "question", "answer", "type"} and q["type"] in W.QA_TYPES
            assert W.is_grammatical(q["question"]), q
            assert q["answer"] == independent_answer(recs[q["image"]]["scene"], q["question"], q["type"]), q
            by_type[q["type"]][q["answer"]] += 1
    assert set(by_type) == set(W.QA_TYPES)
    for qtype in ("existence", "yesno"):
        assert 0.3 < by_type[qtype]["yes"] / sum(by_type[qtype].values()) < 0.7
    assert {"zero", "one", "two", "three"} <= set(by_type["count"])


def test_normalize_answer():
    assert W.normalize_answer("  Two. ") == "two"
    assert W.normalize_answer("3") == "three"
    assert W.normalize_answer("The   Red circle !") == "the red circle"


# --- phase 1 text and held-out parts ---------------------------------------------------------------------------------
def test_phase1_text_never_names_heldout_parts(w):
    seen = collections.Counter()
    for name in ("text_train.txt", "text_val.txt"):
        for line in lines(w, name):
            toks = line.split()
            assert not set(toks) & {"above", "below"}, line
            for a, b in zip(toks, toks[1:]):
                shape = b[:-2] if b.endswith("sses") else b[:-1] if b.endswith("s") else b
                assert (a, shape) not in W.HELDOUT_COMBOS, line
            seen.update(toks)
    for word in W.COLORS + W.SHAPES + ("big", "small", "left", "right", "top", "bottom", "middle", "next",
                                       "bigger", "smaller", "no", "not", "it", "they", "?", "!", "an"):
        assert seen[word] > 0, word


def test_text_is_grammatical_and_varied(w):
    train = lines(w, "text_train.txt")
    assert all(W.is_grammatical(x) for x in train)
    starts = {" ".join(x.split()[:2]) for x in train}
    for s in ("there is", "there are", "look ,", "can you", "how many", "where is", "what color", "i see"):
        assert s in starts, s
    assert len(set(train)) > 0.5 * len(train)


def test_test_descriptions_cover_heldout_parts(w):
    desc = lines(w, "descriptions_test.txt")
    held = lines(w, "descriptions_test_heldout.txt")
    assert all(W.is_grammatical(x) for x in desc)
    assert held and set(held) <= set(desc)
    assert all(W.mentions(x, W.HELDOUT_COMBOS | W.UNSEEN_COMBOS, W.HELDOUT_RELATION_WORDS) for x in held)
    assert any(W.mentions(x, W.UNSEEN_COMBOS) for x in held) and any(W.mentions(x, W.HELDOUT_COMBOS) for x in held)
    assert not any(W.mentions(x, W.FOIL_COMBOS) for x in desc)
    assert any(("above" in x.split() or "below" in x.split()) for x in held)


def test_heldout_choice():
    assert len(W.HELDOUT_COMBOS) == 12
    assert {c for c, _ in W.HELDOUT_COMBOS} <= set(W.COLORS)
    for color in W.COLORS:   # every colour and shape still has non-held-out partners
        assert any((color, s) not in W.HELDOUT_COMBOS for s in W.SHAPES)
    for shape in W.SHAPES:
        assert any((c, shape) not in W.HELDOUT_COMBOS for c in W.COLORS)


# --- evaluation items ------------------------------------------------------------------------------------------------
def test_minimal_pairs_differ_in_the_intended_way(w):
    pairs = read_jsonl(os.path.join(w, "minimal_pairs.jsonl"))
    uids = collections.Counter(p["UID"] for p in pairs)
    assert set(uids) == {p + s for p in W.PARADIGMS for s in ("", "_heldout")}
    for p in pairs:
        good, bad, uid = p["sentence_good"].split(), p["sentence_bad"].split(), p["UID"]
        assert W.is_grammatical(p["sentence_good"]) and not W.is_grammatical(p["sentence_bad"]), p
        assert p["heldout"] == uid.endswith("_heldout") == W.mentions_heldout(p["sentence_good"]), p
        assert len(good) == len(bad)
        diff = [i for i, (a, b) in enumerate(zip(good, bad)) if a != b]
        paradigm = uid.replace("_heldout", "")
        if paradigm in ("adjective_order", "word_order"):
            assert len(diff) == 2 and diff[1] == diff[0] + 1, p
            i, j = diff
            assert good[i] == bad[j] and good[j] == bad[i], p
            if paradigm == "adjective_order":
                assert good[i] in W.SIZES and good[j] in W.COLORS, p
        else:
            assert len(diff) == 1, p
            pair = {good[diff[0]], bad[diff[0]]}
            if paradigm == "det_noun_agreement":
                sg = min(pair, key=len)
                assert pair == {sg, W.plural(sg)} and sg in W.SHAPES, p
            elif paradigm == "subject_verb_agreement":
                assert pair == {"is", "are"}, p
            else:
                assert pair == {"a", "an"}, p


@pytest.mark.parametrize("good,bad", [
    ("these circles are big .", "these circle are big ."),
    ("there are two red stars .", "there is two red stars ."),
    ("the circles are big .", "the circles is big ."),
    ("a big red circle .", "a red big circle ."),
    ("the circle is red .", "the is circle red ."),
    ("look , an orange star !", "look , a orange star !"),
    ("there is no green star .", "there is no green stars ."),
    ("where is the red circle ?", "where are the red circle ?"),
    ("look , a star ! it is big .", "look , a star ! they is big ."),
])
def test_is_grammatical(good, bad):
    assert W.is_grammatical(good)
    assert not W.is_grammatical(bad)


def test_winoground_items(w):
    items = read_jsonl(os.path.join(w, "winoground.jsonl"))
    images = np.load(os.path.join(w, "winoground_images.npy"))
    assert len(items) >= 4 and images.shape == (2 * len(items), 32, 32, 3)
    assert {x["type"] for x in items} == {"attribute", "relation"}
    for x in items:
        assert sorted(x["caption_0"].split()) == sorted(x["caption_1"].split())
        s0, s1 = x["scenes"]
        assert np.array_equal(images[x["image_0"]], W.render(s0, 32))
        assert np.array_equal(images[x["image_1"]], W.render(s1, 32))
        assert W.check_caption(s0, x["caption_0"]) and W.check_caption(s1, x["caption_1"]), x
        assert not W.check_caption(s1, x["caption_0"]) and not W.check_caption(s0, x["caption_1"]), x


# --- API -------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_rejects_bad_values(capsys):
    for argv in (["--scale", "0"], ["--scale=-1"], ["--size", "8"]):
        with pytest.raises(SystemExit) as e:
            W.main(["--out", "/nonexistent/never"] + argv)
        assert e.value.code == 2
        assert "error" in capsys.readouterr().err


def test_ensure_built_reuses_a_matching_world(w):
    meta = os.path.join(w, "meta.json")
    before = os.stat(meta).st_mtime_ns
    assert W.ensure_built(w, seed=0, scale=SCALE, size=32) == w
    assert os.stat(meta).st_mtime_ns == before


def test_ensure_built_refuses_a_world_of_an_older_format(tmp_path):
    from common import UserError
    old = tmp_path / "old"
    old.mkdir()
    (old / "meta.json").write_text(json.dumps({"format_version": 1, "seed": 0, "scale": 1.0, "size": 32, "counts": {}}))
    with pytest.raises(UserError, match=r"older version of data/world.py \(format 1, this code reads 2\); delete"):
        W.ensure_built(str(old))
    assert os.listdir(old) == ["meta.json"]   # nothing built over it


def test_sample_scene_and_describe_are_pure():
    import random
    a = W.sample_scene(random.Random(5))
    assert a == W.sample_scene(random.Random(5))
    assert 1 <= len(a["objects"]) <= 4
    assert W.describe(a, random.Random(1)) == W.describe(a, random.Random(1))
    assert W.render(a, 48).shape == (48, 48, 3)


@pytest.mark.slow
def test_python_m_data_world_builds_the_same_world(worlds, tmp_path):
    """The command line runs world.py as __main__, which then imports data.talk (which imports data.world):
    that path must work and write exactly what build() writes."""
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "data.world", "--out", str(out), "--seed", "0", "--scale", str(SCALE)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    names = sorted(os.listdir(worlds["a"]))
    assert sorted(os.listdir(out)) == names
    for name in names:
        with open(os.path.join(worlds["a"], name), "rb") as f1, open(out / name, "rb") as f2:
            assert f1.read() == f2.read(), name


# --- the split by role: talk, judge, benchmarks ----------------------------------------------------------------------
def test_moved_names_are_still_importable_from_world():
    for name, home in W._HOME.items():
        assert getattr(W, name) is getattr(importlib.import_module(home), name), name
    assert set(W._HOME) <= set(dir(W))

    def public(m):
        return {n for n, v in vars(m).items() if not n.startswith("_") and not isinstance(v, types.ModuleType)}
    # every public name talk and benchmarks define (not import), and every function of the judge's, is re-exported;
    # the judge's word lists are not: data.world's own lists are the world's
    defined = {T: public(T) - set(vars(W)), B: public(B) - set(vars(W)) - set(vars(T)) - set(vars(J)),
               J: {n for n in public(J) if callable(getattr(J, n))}}
    for m, names in defined.items():
        assert names and names <= set(W._HOME), (m.__name__, names - set(W._HOME))
    with pytest.raises(AttributeError):
        W.no_such_name


@pytest.mark.slow
def test_judge_imports_nothing_from_the_generator():
    """The judge's independence is checked, not just asserted: its file imports only the standard library, and
    importing it loads no other module of data/."""
    with open(J.__file__) as f:
        tree = ast.parse(f.read())
    imported = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import in data/judge.py"
            imported.append(node.module)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in (
                "__import__", "import_module"):
            raise AssertionError("data/judge.py imports dynamically")
    assert imported and all(m.split(".")[0] in sys.stdlib_module_names for m in imported), imported
    code = "import sys, data.judge; print(sorted(m for m in sys.modules if m.split('.')[0] == 'data'))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['data', 'data.judge']"


def test_judge_vocabulary_agrees_with_the_generator():
    """The judge keeps its own word lists and geometry settings; these must say what the generator's say."""
    assert (J.SHAPES, J.COLORS, J.SIZES, J.RELATIONS) == (W.SHAPES, W.COLORS, W.SIZES, W.RELATIONS)
    assert J.NOUNS == T.SG_NOUNS and J.PLURALS == T.SINGULAR
    assert J.PLACES == T.PP_PHRASE and tuple(J.PLACES) == W.POSITIONS
    assert J.NUMBERS == T.NUM_WORDS
    for word in J.NUMBERS[1:]:   # "one" .. "four" are determiners meaning exactly that many
        number, kind, quant = J.DETERMINERS[word]
        assert (number, kind, quant) == ("sg" if word == "one" else "pl", "num", ("eq", J.NUMBERS.index(word)))
    assert set(J.DETERMINERS) <= set(T.vocabulary())
    assert (J.MARGIN, J.NEXT_TO_DY, J.NEXT_TO_DX) == (W.REL_MARGIN, W.NEXT_TO_DY, W.NEXT_TO_DX)


def test_judge_geometry_agrees_with_the_world():
    """The judge's own reading of places and relations gives the generator's answers: on sampled scenes, and on
    arbitrary points, cell borders and exact margins included (where a different formula would disagree)."""
    rng = random.Random(0)
    scenes = [W.sample_scene(random.Random(i)) for i in range(300)]

    def coordinate():   # cell borders, and short decimals whose differences hit the margins exactly
        if rng.random() < 0.3:
            return rng.choice([k / 30 for k in range(31)] + [1 / 3, 2 / 3])
        return round(rng.random(), rng.choice([1, 2, 3]))
    points = [{"x": coordinate(), "y": coordinate(), "size": rng.choice(W.SIZES)} for _ in range(2000)]
    pairs = [(a, b) for s in scenes for a in s["objects"] for b in s["objects"] if a is not b]
    pairs += [tuple(rng.sample(points, 2)) for _ in range(20000)]
    for o in [o for s in scenes for o in s["objects"]] + points:
        assert J._place(o) == W.position_word(o["x"], o["y"]), o
    held = collections.Counter()
    for a, b in pairs:
        for rel in W.RELATIONS:
            assert J._related(rel, a, b) == W.relation_holds(rel, a, b), (rel, a, b)
            held[rel] += W.relation_holds(rel, a, b)
    assert min(held.values()) > 100   # every relation was seen to hold, not just to fail


# --- the S / U / F split of colour+shape pairs (issue: an experiment that can see what dreaming adds) ---------------
S, U, F = W.HELDOUT_COMBOS, W.UNSEEN_COMBOS, W.FOIL_COMBOS
PAIR = re.compile(r"\b(%s) (%s)(?:s|es)?\b" % ("|".join(W.COLORS), "|".join(W.SHAPES)))


def said(text):
    """Every colour+shape pair a text names, read with this test's own pattern ('red circles' -> red circle)."""
    return {(c, s) for c, s in PAIR.findall(text)}


def shown(scene):
    return {(o["color"], o["shape"]) for o in scene["objects"]}


def test_the_pair_groups_are_disjoint_and_word_matched():
    assert len(S) == 12 and len(U) == len(F) == 6 and not (S & U or S & F or U & F)
    seen = {(c, s) for c in W.COLORS for s in W.SHAPES} - S - U - F
    # F uses exactly U's words, each as often: no word frequency tells a U pair from an F pair
    assert collections.Counter(c for c, _ in U) == collections.Counter(c for c, _ in F)
    assert collections.Counter(s for _, s in U) == collections.Counter(s for _, s in F)
    for color in W.COLORS:   # each word is still learnable from phase 1 text
        assert any((color, s) in seen for s in W.SHAPES)
    for shape in W.SHAPES:
        assert sum((c, shape) in seen for c in W.COLORS) >= 2


def test_u_and_f_pairs_are_where_they_should_be(w):
    """Checked against the scene dicts: U pairs never in phase 1 text nor in a labeled image or its captions or
    questions; F pairs in no image and no text at all; U pairs do occur in unlabeled and test images."""
    for name in ("text_train.txt", "text_val.txt"):
        for line in lines(w, name):
            assert not said(line) & (S | U | F), line
    for split in IMAGE_SPLITS:
        recs = records(w, split)
        labeled = split in ("caption_train", "caption_val", "vqa_train", "vqa_val")
        never = U | F if labeled else F
        for r in recs:
            assert not shown(r["scene"]) & never, (split, r["scene"])
            for text in r["captions"] + [r.get("relation") or ""]:
                assert not said(text) & never, (split, text)
        if split.startswith("vqa"):
            for q in read_jsonl(os.path.join(w, f"{split}.jsonl")):
                assert not said(q["question"] + " " + q["answer"]) & never, (split, q)
        if split in ("unlabeled", "caption_test", "vqa_test"):
            assert any(shown(r["scene"]) & U for r in recs), split
    assert sum(bool(shown(r["scene"]) & U) for r in records(w, "unlabeled")) > 0.15 * len(records(w, "unlabeled"))
    for line in lines(w, "descriptions_test.txt"):
        assert not said(line) & F, line
    for item in read_jsonl(os.path.join(w, "winoground.jsonl")):
        for sc in item["scenes"]:
            assert not shown(sc) & (U | F), item
        assert not said(item["caption_0"] + " " + item["caption_1"]) & (U | F), item


REL_CAPTION = re.compile(r"^an? (\w+) (\w+) (left of|right of|above|below) an? (\w+) (\w+) \. "
                         r"an? (\w+) (\w+) (left of|right of|above|below) an? (\w+) (\w+) \.$")
GAP = 0.2   # how far apart two centres must be along an axis for a relation to be clear (the world's REL_MARGIN)


def clearly(rel, a, b):
    """Is object a <rel> object b, recomputed here from the coordinates (y grows downwards)?"""
    dx, dy = b["x"] - a["x"], b["y"] - a["y"]
    return {"left of": dx > GAP, "right of": -dx > GAP, "above": dy > GAP, "below": -dy > GAP}[rel]


def test_relational_captions_are_true_and_state_the_converse(w):
    converse = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
    n = vertical = 0
    for r in records(w, "caption_train"):
        cap = r.get("relation")
        if cap is None:
            continue
        m = REL_CAPTION.match(cap)
        assert m, cap
        c1, s1, rel, c2, s2, d2, t2, rel2, d1, t1 = m.groups()
        assert (d2, t2, d1, t1, rel2) == (c2, s2, c1, s1, converse[rel]), cap
        objs = r["scene"]["objects"]
        assert any(clearly(rel, a, b) for a in objs for b in objs if (a["color"], a["shape"]) == (c1, s1)
                   and (b["color"], b["shape"]) == (c2, s2) and a is not b), (cap, r["scene"])
        assert W.is_grammatical(cap), cap
        n += 1
        vertical += rel in ("above", "below")
    assert n > 100 and 0.25 < vertical / n < 0.75


def test_probes_are_well_formed_balanced_and_never_phase1_lines(w):
    probes = read_jsonl(os.path.join(w, "probes.jsonl"))
    pairs = read_jsonl(os.path.join(w, "minimal_pairs.jsonl"))
    phase1 = {s for line in lines(w, "text_train.txt") for s in re.findall(r"[^.!?]*[.!?]", line)}
    phase1 = {s.strip() for s in phase1}
    for p in probes + pairs:
        assert p["split"] in ("val", "test") and W.is_grammatical(p["sentence_good"]), p
        assert p["sentence_good"] not in phase1, p
    for p in pairs:   # no foil made by swapping the noun with the final "?"
        assert not p["sentence_bad"].endswith("? " + p["sentence_good"].split()[-2]), p
    ex = [p for p in probes if p["probe"] == "existence"]
    for p in ex:
        good, bad = said(p["sentence_good"]), said(p["sentence_bad"])
        assert len(good & U) == 1 and len(bad & F) == 1 and not good & F and not bad & U, p
        g, b = p["sentence_good"].split(), p["sentence_bad"].split()
        assert len(g) == len(b) and sum(x != y for x, y in zip(g, b)) <= 2, p   # the pair word (and a/an)
    # every U pair and every word appears on the good side about as often as on the bad side
    good_words = collections.Counter(x for p in ex for x in p["sentence_good"].split())
    bad_words = collections.Counter(x for p in ex for x in p["sentence_bad"].split())
    for word in W.COLORS + W.SHAPES:
        assert abs(good_words[word] - bad_words[word]) <= 0.5 * max(good_words[word], 8), word
    rel = [p for p in probes if p["probe"] == "relation"]
    assert rel and {p["UID"] for p in rel} == {"relation_vertical", "relation_horizontal"}
    for p in rel:
        g, b = p["sentence_good"].split(), p["sentence_bad"].split()
        assert len(g) == len(b) and sum(x != y for x, y in zip(g, b)) in (1, 2), p
    for group in (ex, rel, pairs):
        assert 0.15 < sum(p["split"] == "val" for p in group) / len(group) < 0.35


def test_existence_probe_is_at_chance_for_phase1_text_and_solved_by_text_that_names_u(w):
    """A word trigram model of phase 1's text cannot tell U from F; one that also heard a sentence about each U
    pair can: the probe measures exactly what dreaming could add."""
    from eval import NGram, ngram_minimal_pairs
    ex = [p for p in read_jsonl(os.path.join(w, "probes.jsonl")) if p["probe"] == "existence"]
    text = lines(w, "text_train.txt")
    assert abs(ngram_minimal_pairs(NGram(text, 3), ex)["macro"] - 0.5) < 0.1
    rng = random.Random(0)   # phase 1's kind of talk, about scenes that hold U pairs
    heard = text + [W.text_line(W.sample_scene(rng, never=S | F, force=U), rng, never=S | F) for _ in range(len(text) // 3)]
    assert ngram_minimal_pairs(NGram(heard, 3), ex)["macro"] > 0.9
