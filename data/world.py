"""The developmental world: seeded scenes of coloured shapes, what they look like, and the builder that writes
all the data files.

Everything here is a pure function of (seed, split, index), so building twice gives byte-identical files.

    python -m data.world --out data/world --seed 0 --scale 1.0 --size 32

Contents, top to bottom: the world's parts and held-out parts, scene sampling and geometry, rendering, the splits,
and the builder. The rest lives in its own module, split by role:
  data/talk.py        the grammar that turns scenes into sentences (captions, phase 1 text);
  data/judge.py       the independent parser and checker of that language (it imports nothing from data/);
  data/benchmarks.py  questions with answers, minimal pairs and Winoground items.
Their public names are still importable from here (see the end of this file).
"""
import argparse
import hashlib
import importlib
import json
import math
import os
import random
import shutil
import signal
import sys

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FORMAT_VERSION = 2   # 2: the S/U/F split of colour+shape pairs, relational captions, probes

# ---------------------------------------------------------------------------------------------------------------------
# What the world is made of (these are words too: data/talk.py says them, data/judge.py keeps its own copy)
# ---------------------------------------------------------------------------------------------------------------------
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
COLORS = ("red", "green", "blue", "yellow", "black", "white", "orange", "purple")
SIZES = ("small", "big")
POSITIONS = ("left", "right", "top", "bottom", "middle")
RELATIONS = ("left of", "right of", "above", "below", "next to", "bigger than", "smaller than")

# The 48 colour+shape pairs fall into four groups (data/WORLD.md), fixed, not seeded:
#   seen (24): in phase 1 text and everywhere else;
#   S (12, HELDOUT_COMBOS): never in phase 1 text; phase 2's labeled images show them and its captions name them;
#   U (6, UNSEEN_COMBOS): in no text and no labeled image; only the unlabeled images phase 3 dreams about, and the
#     test images, show them. Only a captioner that composes "red" and "circle", learned apart, can name them, and
#     only phase 3 can then put them into the language;
#   F (6, FOIL_COMBOS): nowhere, in no image and no text: the foils of the existence probe (U vs F).
# Every shape loses two colours to S and every colour at most two shapes, so each word is learnable from phase 1.
HELDOUT_COMBOS = frozenset({
    ("yellow", "circle"), ("purple", "circle"),
    ("white", "square"), ("orange", "square"),
    ("blue", "triangle"), ("black", "triangle"),
    ("green", "diamond"), ("red", "diamond"),
    ("blue", "star"), ("yellow", "star"),
    ("green", "cross"), ("purple", "cross"),
})
# U and F come in three 2x2 blocks of two colours and two shapes: U takes one diagonal, F the other. So every
# colour and every shape word of U is in F exactly once too, and no word frequency tells a U pair from an F pair.
_BLOCKS = ((("red", "white"), ("circle", "triangle")), (("orange", "black"), ("star", "diamond")),
           (("yellow", "blue"), ("square", "cross")))
UNSEEN_COMBOS = frozenset(p for (a, b), (x, y) in _BLOCKS for p in ((a, x), (b, y)))
FOIL_COMBOS = frozenset(p for (a, b), (x, y) in _BLOCKS for p in ((a, y), (b, x)))
# The vertical relation pair is held out: phase 1 text never contains these words at all.
HELDOUT_RELATION_WORDS = ("above", "below")
# What phase 1 text never shows in its scenes nor says; what the labeled (phase 2 and 4) splits never show nor say
PHASE1_NEVER = HELDOUT_COMBOS | UNSEEN_COMBOS | FOIL_COMBOS
LABELED_NEVER = UNSEEN_COMBOS | FOIL_COMBOS

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
# The pairs each image split never shows and never says: labeled images never hold a U pair, and F is nowhere.
SPLIT_NEVER = {s: FOIL_COMBOS if s in ("unlabeled", "caption_test", "vqa_test") else LABELED_NEVER
               for s in IMAGE_SPLITS}
EVAL_BUCKETS = (80, 100)   # winoground images: never a training bucket
TEXT_COUNTS = {"text_train": 150000, "text_val": 5000, "descriptions_test": 3000}


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


def sample_scene(rng, never=frozenset(), force=None, buckets=None):
    """1-4 objects on a grey-ish background. never: colour+shape pairs that must not appear; force: a list of
    pairs, the first object is one of them; buckets=(lo, hi) keeps only scenes whose content hash bucket is in
    [lo, hi). What the scene shows is drawn first, so unwanted buckets are rejected cheaply."""
    while True:
        content = []   # (shape, color, size, (row, col))
        for k in range(rng.randint(1, 4)):
            if k == 0 and force:
                color, shape = rng.choice(sorted(force))
            else:
                shape, color = rng.choice(SHAPES), rng.choice(COLORS)
                # copy an attribute now and then, so counting questions have something to count
                if content and rng.random() < 0.35:
                    shape = rng.choice(content)[0]
                if content and rng.random() < 0.25:
                    color = rng.choice(content)[1]
            if (color, shape) not in never:
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
# Building the files
# ---------------------------------------------------------------------------------------------------------------------
def split_scene(seed, split, index):
    """The scene for one image of one split: resampled until its content hash falls in the split's buckets."""
    rng = _rng(seed, split, index)
    return sample_scene(rng, never=SPLIT_NEVER[split], buckets=IMAGE_SPLITS[split][1]), rng


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


def _text_chunk(job):
    """Lines [lo, hi) of a text split. Phase 1 text: scenes without S, U or F pairs, talked about without naming
    them or the held-out relation words. descriptions_test: test-bucket scenes, every other one with an S or U
    pair in it, never an F pair."""
    from data.talk import mentions, text_line   # here, not at the top: data.talk imports this module
    seed, split, lo, hi = job
    lines = []
    for i in range(lo, hi):
        rng = _rng(seed, split, i)
        if split == "descriptions_test":
            scene = sample_scene(rng, never=FOIL_COMBOS, force=(HELDOUT_COMBOS | UNSEEN_COMBOS) if i % 2 else None,
                                 buckets=IMAGE_SPLITS["caption_test"][1])
            lines.append(text_line(scene, rng, never=FOIL_COMBOS, phase1=False))
            continue
        line = text_line(sample_scene(rng, never=PHASE1_NEVER), rng, never=PHASE1_NEVER, phase1=True)
        while mentions(line, PHASE1_NEVER, HELDOUT_RELATION_WORDS):   # safety net; never reached
            line = text_line(sample_scene(rng, never=PHASE1_NEVER), rng, never=PHASE1_NEVER, phase1=True)
        lines.append(line)
    return lines


def _image_chunk(job):
    """Images [lo, hi) of an image split -> (uint8 images, jsonl lines of records, jsonl lines of questions)."""
    from data.benchmarks import make_questions
    from data.talk import describe, relational_caption
    seed, split, lo, hi, size = job
    images = np.zeros((hi - lo, size, size, 3), np.uint8)
    records, qas = [], []
    for i in range(lo, hi):
        scene, rng = split_scene(seed, split, i)
        images[i - lo] = render(scene, size)
        never = SPLIT_NEVER[split]
        rec = {"id": i, "scene": scene, "captions": describe(scene, rng, never)}
        if split.startswith("caption"):  # phase 2 learns above/below from these (None: no clear relation)
            rec["relation"] = relational_caption(scene, rng)
        records.append(json.dumps(rec))
        if split.startswith("vqa"):
            qas += [json.dumps(dict(image=i, **q)) for q in make_questions(scene, rng, never)]
    return images, records, qas


def _run_jobs(fn, jobs, bar, pool):
    """Results of fn over jobs, in order; in parallel when a pool is given (results do not depend on it)."""
    results = pool.imap(fn, jobs) if pool else map(fn, jobs)
    for job, r in zip(jobs, results):
        bar.update(job[3] - job[2])
        yield r


def _worker_init():
    """Pool workers leave Ctrl-C to the main process (which terminates them): a worker dying of it mid-task
    leaves the pool waiting forever for its result."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt


def build(out_dir, seed=0, scale=1.0, size=32, progress=None):
    """Write the whole world into out_dir (see data/WORLD.md for the files). Built in a temp folder next to it and
    moved into place only when complete (meta.json last), so Ctrl-C or SIGTERM leaves nothing half-written where
    a later run would trust it. progress None: a bar only on a terminal."""
    if not scale > 0 or size < 16:
        raise ValueError("scale must be > 0 and size >= 16")
    if progress is None:
        progress = sys.stderr.isatty()
    tmp = f"{os.path.normpath(out_dir)}.tmp{os.getpid()}"
    old_term = signal.getsignal(signal.SIGTERM)
    in_main = True
    try:
        signal.signal(signal.SIGTERM, _sigterm_as_interrupt)  # SIGTERM cleans up like Ctrl-C
    except ValueError:  # not the main thread: signals stay as they are
        in_main = False
    try:
        _build_into(tmp, seed, scale, size, progress)
        os.makedirs(out_dir, exist_ok=True)
        if os.path.exists(os.path.join(out_dir, "meta.json")):
            os.remove(os.path.join(out_dir, "meta.json"))  # the old world is incomplete from here on
        names = sorted(os.listdir(tmp), key=lambda n: n == "meta.json")  # meta.json last: the build is done
        for name in names:
            os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
        os.rmdir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, old_term)


def _build_into(out_dir, seed, scale, size, progress):
    from tqdm import tqdm

    from data.benchmarks import PARADIGMS, PROBES, QA_TYPES, minimal_pairs, probes, sentences, winoground
    from data.talk import NUM_WORDS, mentions, vocabulary
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
        main = sys.modules["__main__"]
        # the workers need only this module: without __file__ they do not re-run the caller's script (a phase
        # script imports torch, seconds per worker, during which Ctrl-C would kill them with a traceback)
        script = main.__dict__.pop("__file__", None) if getattr(main, "__spec__", None) is None else None
        try:
            pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_worker_init)
        finally:
            if script is not None:
                main.__file__ = script
    ok = False
    try:
        for split in TEXT_COUNTS:
            lines = [x for part in _run_jobs(_text_chunk, jobs(split), bar, pool) for x in part]
            _write_lines(os.path.join(out_dir, f"{split}.txt"), lines)
            if split == "descriptions_test":
                _write_lines(os.path.join(out_dir, "descriptions_test_heldout.txt"),
                             [x for x in lines if mentions(x, HELDOUT_COMBOS | UNSEEN_COMBOS, HELDOUT_RELATION_WORDS)])
            if split == "text_train":  # no probe or minimal pair may be a sentence phase 1 read verbatim
                phase1_sentences = {x for line in lines for x in sentences(line)}
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
        ok = True
    finally:
        if pool:  # interrupted: stop the workers now rather than wait for their queued chunks
            pool.close() if ok else pool.terminate()
            pool.join()
    bar.close()

    pairs = minimal_pairs(seed, scale, phase1_sentences)
    _write_lines(os.path.join(out_dir, "minimal_pairs.jsonl"), [json.dumps(p) for p in pairs])
    probe_items = probes(seed, scale, phase1_sentences)
    _write_lines(os.path.join(out_dir, "probes.jsonl"), [json.dumps(p) for p in probe_items])
    items, wino_images = winoground(seed, scale, size)
    np.save(os.path.join(out_dir, "winoground_images.npy"), wino_images)
    _write_lines(os.path.join(out_dir, "winoground.jsonl"), [json.dumps(x) for x in items])
    contact_sheet(os.path.join(out_dir, "contact_sheet.png"), *sheet, size)

    meta = {"format_version": FORMAT_VERSION, "seed": seed, "scale": scale, "size": size, "counts": counts,
            "minimal_pairs": len(pairs), "probes": {k: sum(p["probe"] == k for p in probe_items) for k in PROBES},
            "winoground": len(items),
            "shapes": SHAPES, "colors": COLORS, "sizes": SIZES, "positions": POSITIONS, "relations": RELATIONS,
            "numbers": NUM_WORDS, "vocabulary": vocabulary(), "qa_types": QA_TYPES, "paradigms": PARADIGMS,
            "heldout_combos": [f"{c} {s}" for c, s in sorted(HELDOUT_COMBOS)],
            "unseen_combos": [f"{c} {s}" for c, s in sorted(UNSEEN_COMBOS)],
            "foil_combos": [f"{c} {s}" for c, s in sorted(FOIL_COMBOS)],
            "heldout_relations": list(HELDOUT_RELATION_WORDS)}
    # meta.json last: its presence means the build finished
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)


def read_meta(out_dir):
    """A world's meta.json, or None when there is none. A damaged one is an error, never a reason to rebuild:
    the folder may hold the user's own files."""
    from common import UserError
    path = os.path.join(out_dir, "meta.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is damaged ({type(e).__name__}); delete the folder {out_dir} to rebuild the world, "
                        "or pass another --world_dir") from None
    if not isinstance(meta, dict) or not all(isinstance(meta.get(k), t) for k, t in
                                             (("format_version", int), ("seed", int), ("size", int),
                                              ("scale", (int, float)), ("counts", dict))):
        raise UserError(f"{path} is damaged (format_version/seed/scale/size/counts missing or of the wrong type); "
                        f"delete the folder {out_dir} to rebuild the world, or pass another --world_dir")
    return meta


def ensure_built(out_dir="data/world", seed=None, scale=None, size=None, progress=None):
    """Build the world unless out_dir already holds one with these settings. Returns out_dir.
    A setting left as None accepts whatever the finished world in out_dir has (so a world built with
    `python -m data.world --scale 0.05` is used as it is); a missing world is built with the defaults
    (seed 0, scale 1, size 32). A folder with other files but no meta.json (a partial world, or something
    else), a damaged meta.json or a world with other settings is an error: never built over."""
    from common import UserError, remove_stale_temps
    folder, name = os.path.split(os.path.abspath(out_dir))
    remove_stale_temps(folder, prefix=name + ".tmp")  # the temp folders of builds that were killed
    meta = read_meta(out_dir)
    want = {"seed": seed, "scale": scale, "size": size}
    if meta is not None:
        if meta.get("format_version") != FORMAT_VERSION:
            raise UserError(f"{out_dir} was built by an older version of data/world.py (format {meta.get('format_version')}, "
                            f"this code reads {FORMAT_VERSION}); delete the folder to rebuild it, or pass another --world_dir")
        diff = [f"{k} {meta.get(k)}" for k, v in want.items() if v is not None and meta.get(k) != v]
        if diff:
            raise UserError(f"{out_dir} holds a world with {', '.join(diff)}, not the one asked for; pass another "
                            "--world_dir, or delete the folder to rebuild it")
        return out_dir
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise UserError(f"{out_dir} has files but no meta.json: a partial world or another folder; delete it to "
                        "build the world there, or pass another --world_dir")
    build(out_dir, seed=0 if seed is None else seed, scale=1.0 if scale is None else scale,
          size=32 if size is None else size, progress=progress)
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
    try:
        build(args.out, seed=args.seed, scale=args.scale, size=args.size)
    except KeyboardInterrupt:
        sys.exit(f"interrupted: nothing was written to {args.out}")
    print(f"world written to {args.out}")


# ---------------------------------------------------------------------------------------------------------------------
# Names that moved to the modules split off from this one, still importable from here: `from data.world import
# describe` and `world.check_caption(...)` keep working. Looked up on first use rather than imported at the top,
# because data.talk and data.benchmarks import this module (and `python -m data.world` runs this file as __main__).
# ---------------------------------------------------------------------------------------------------------------------
_MOVED = {
    "data.talk": ("NUM_WORDS", "GENERIC_NOUNS", "plural", "SG_NOUNS", "PL_NOUNS", "SINGULAR", "PP_PHRASE",
                  "noun_phrase", "referring", "the", "describe", "mentions", "mentions_heldout", "text_line",
                  "CONVERSE", "relational_caption", "vocabulary"),
    "data.judge": ("is_grammatical", "parse_claims", "claim_true", "check_caption", "caption_quality",
                   "normalize_answer"),
    "data.benchmarks": ("QA_TYPES", "make_questions", "PARADIGMS", "PAIRS_PER_PARADIGM", "WINOGROUND_ITEMS",
                        "minimal_pairs", "winoground", "SEEN_COMBOS", "PROBES", "PROBE_ITEMS", "probes", "sentences",
                        "val_or_test"),
}
_HOME = {name: module for module, names in _MOVED.items() for name in names}


def __getattr__(name):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_HOME[name]), name)


def __dir__():
    return sorted(set(globals()) | set(_HOME))


if __name__ == "__main__":
    main()
