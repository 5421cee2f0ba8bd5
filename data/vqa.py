"""
Visual question answering data as (uint8 images (N, H, W, 3), list of question records).

Every record is {"image": row in the image array, "question": str, "answer": the training target,
"answers": the reference answers it is scored against, "type": str}.

  * the built-in world: `vqa_{split}.jsonl` ({"image", "question", "answer", "type"}) indexing
    `vqa_{split}_images.npy` (memory-mapped). One reference answer, so VQA accuracy is exact match.
  * real data in the VQAv2 format: a questions JSON {"questions": [{"image_id", "question",
    "question_id"}]}, an annotations JSON {"annotations": [{"question_id", "image_id", "answer_type",
    "multiple_choice_answer", "answers": [{"answer"}, ...x10]}]} and a folder of images. An image is
    found by scanning the folder for a file whose name's last run of digits is the image id
    (COCO_train2014_000000123456.jpg -> 123456), or by --vqa_image_pattern. Photos are decoded and
    resized ONCE into a cached .npy (the pattern of data/images.load_coco); unreadable images are
    skipped with a warning, and their questions with them. Target = multiple_choice_answer,
    references = the 10 human answers, type = answer_type (yes/no, number, other).
"""
import hashlib
import os
import re
import sys

import numpy as np
from PIL import Image

from common import UserError, read_json, read_jsonl, write_atomic, write_json_atomic
from data.images import center_square, file_stamp, read_cache_meta, same_files

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


def load_world_vqa(world_dir, split):
    """The built-in world's questions of one split (train, val or test) and their images."""
    path = os.path.join(world_dir, f"vqa_{split}_images.npy")
    if not os.path.exists(path):
        raise UserError(f"{path} not found; build the world with `python -m data.world --out {world_dir}`")
    images = np.load(path, mmap_mode="r")
    rows = read_jsonl(os.path.join(world_dir, f"vqa_{split}.jsonl"))
    out = []
    for i, r in enumerate(rows, 1):
        if not isinstance(r, dict) or not all(k in r for k in ("image", "question", "answer", "type")):
            raise UserError(f"{world_dir}/vqa_{split}.jsonl line {i} lacks image/question/answer/type; rebuild the world")
        bad = _wrong_types(r, {"image": int, "question": str, "answer": str, "type": str})
        if bad:
            raise UserError(f"{world_dir}/vqa_{split}.jsonl line {i}: {', '.join(bad)} of the wrong type; rebuild the world")
        if not 0 <= r["image"] < len(images):
            raise UserError(f"{world_dir}/vqa_{split}.jsonl line {i}: image {r['image']} but only {len(images)} images; "
                            "rebuild the world")
        out.append({"image": r["image"], "question": r["question"], "answer": r["answer"],
                    "answers": [r["answer"]], "type": r["type"]})
    return images, out


def image_id_of(filename):
    """The image id a file name stands for: its last run of digits (at most the last 12), or None.
    'COCO_val2014_000000000042.jpg' -> 42, '17.png' -> 17."""
    runs = re.findall(r"\d+", os.path.splitext(os.path.basename(filename))[0])
    return int(runs[-1][-12:]) if runs else None


def find_images(images_dir, image_ids, pattern=""):
    """{image_id: path} for the wanted ids. pattern: a format string such as
    'COCO_train2014_{image_id:012d}.jpg'; empty = scan the folder (see image_id_of)."""
    if not os.path.isdir(images_dir):
        raise UserError(f"VQA image folder {images_dir} does not exist")
    wanted = set(image_ids)
    if pattern:
        try:
            names = {i: pattern.format(image_id=i) for i in wanted}
        except (KeyError, IndexError, ValueError) as e:
            raise UserError(f"--vqa_image_pattern {pattern!r} is not a format string with {{image_id}} ({e})")
        return {i: os.path.join(images_dir, n) for i, n in names.items() if os.path.exists(os.path.join(images_dir, n))}
    found = {}
    for name in sorted(os.listdir(images_dir)):
        if not name.lower().endswith(IMAGE_EXTS):
            continue
        i = image_id_of(name)
        if i in wanted and i not in found:  # sorted order: the first of any duplicates wins
            found[i] = os.path.join(images_dir, name)
    return found


def _read_vqav2(questions_path, annotations_path):
    """Join questions and annotations by question_id -> list of dicts (image_id, question, answer,
    answers, type), in the questions file's order."""
    qs, anns = read_json(questions_path), read_json(annotations_path)
    if not isinstance(qs, dict) or not isinstance(qs.get("questions"), list):
        raise UserError(f"{questions_path} is not a VQAv2 questions file (needs a 'questions' list)")
    if not isinstance(anns, dict) or not isinstance(anns.get("annotations"), list):
        raise UserError(f"{annotations_path} is not a VQAv2 annotations file (needs an 'annotations' list)")
    by_qid = {}
    for k, a in enumerate(anns["annotations"]):
        if not isinstance(a, dict):
            raise UserError(f"{annotations_path}: annotation {k} is a {type(a).__name__}, not an object")
        missing = [f for f in ("question_id", "image_id", "multiple_choice_answer", "answers") if f not in a]
        if missing:
            raise UserError(f"{annotations_path}: annotation {k} lacks {', '.join(missing)}")
        bad = _wrong_types(a, {"question_id": _ID, "image_id": _ID, "multiple_choice_answer": (str, int, float),
                               "answers": list, "answer_type": str})
        if not bad and not all(isinstance(x, (str, int, float)) or isinstance(x, dict) and
                               isinstance(x.get("answer"), (str, int, float)) for x in a["answers"]):
            bad = ["answers (a list of {\"answer\": string} objects or strings)"]
        if bad:
            raise UserError(f"{annotations_path}: annotation {k}: {', '.join(bad)} of the wrong type")
        by_qid[a["question_id"]] = a
    items, unanswered = [], 0
    for k, q in enumerate(qs["questions"]):
        if not isinstance(q, dict):
            raise UserError(f"{questions_path}: question {k} is a {type(q).__name__}, not an object")
        missing = [f for f in ("question_id", "image_id", "question") if f not in q]
        if missing:
            raise UserError(f"{questions_path}: question {k} lacks {', '.join(missing)}")
        bad = _wrong_types(q, {"question_id": _ID, "image_id": int, "question": str})
        if bad:
            raise UserError(f"{questions_path}: question {k}: {', '.join(bad)} of the wrong type")
        a = by_qid.get(q["question_id"])
        if a is None:
            unanswered += 1
            continue
        answers = [str(x["answer"]) if isinstance(x, dict) else str(x) for x in a["answers"]]
        items.append({"image_id": q["image_id"], "question": " ".join(q["question"].strip().split()),
                      "answer": " ".join(str(a["multiple_choice_answer"]).strip().split()),
                      "answers": answers or [a["multiple_choice_answer"]], "type": a.get("answer_type", "other"),
                      "question_id": q["question_id"]})
    if unanswered:
        print(f"warning: {unanswered} question(s) in {questions_path} have no annotation; skipped", file=sys.stderr)
    if not items:
        raise UserError(f"no question of {questions_path} has an annotation in {annotations_path}")
    return items


_ID = (int, str)


def _wrong_types(row, types):
    """The fields of row whose value is not of the type wanted ({field: type or tuple}), as 'field (type)'."""
    def ok(v, t):
        return isinstance(v, t) and not isinstance(v, bool)
    return [f"{f} ({'/'.join(x.__name__ for x in (t if isinstance(t, tuple) else (t,)))} expected)"
            for f, t in types.items() if f in row and not ok(row[f], t)]


def load_vqav2(questions_path, annotations_path, images_dir, size, cache_dir, pattern=""):
    """VQAv2-format questions + annotations + image folder -> (uint8 (N, size, size, 3), records).
    Images are decoded once and cached as cache_dir/vqa_<key>.npy (+ .json: the ids kept, and the ids that had
    no file, so the cache is rebuilt once any of those appear)."""
    items = _read_vqav2(questions_path, annotations_path)
    ids = sorted({it["image_id"] for it in items})
    # keyed on content: both JSON files' size and mtime (an edited answer makes a new cache), and each image
    # file's as recorded in the metadata (a repaired, replaced or new image makes it stale; one deleted since
    # does not: it was decoded already)
    stamp = [file_stamp(questions_path), file_stamp(annotations_path)]
    key = hashlib.sha1(f"{os.path.abspath(questions_path)}|{os.path.abspath(annotations_path)}|"
                       f"{os.path.abspath(images_dir)}|{pattern}|{size}|{len(ids)}|{stamp}".encode()).hexdigest()[:10]
    cache = os.path.join(cache_dir, f"vqa_{key}.npy")
    meta = cache[:-4] + ".json"
    images = None
    paths = find_images(images_dir, ids, pattern) if os.path.isdir(images_dir) else {}
    stamps = {i: file_stamp(p) for i, p in paths.items()}
    saved = read_cache_meta(meta) if os.path.exists(cache) else None
    if isinstance(saved, dict) and {"kept", "stamps"} <= set(saved) and same_files(stamps, saved["stamps"]):
        kept = saved["kept"]
        images = np.load(cache, mmap_mode="r")
    if images is None:
        paths = find_images(images_dir, ids, pattern)
        arrs, kept, bad, missing = [], [], [], []
        for i in ids:
            path = paths.get(i)
            if path is None:
                bad.append(f"image_id {i} (no file)")
                missing.append(i)
                continue
            try:
                with Image.open(path) as img:
                    arrs.append(center_square(img, size))
            except Exception:  # truncated or not an image at all
                bad.append(os.path.basename(path))
                continue
            kept.append(i)
        if bad:
            print(f"warning: skipped {len(bad)} missing or unreadable image(s) in {images_dir} (e.g. {bad[0]}) "
                  "and their questions", file=sys.stderr)
        if not arrs:
            raise UserError(f"none of the {len(ids)} images that {questions_path} asks about could be read from {images_dir}")
        os.makedirs(cache_dir, exist_ok=True)
        arr = np.stack(arrs)
        write_atomic(cache, lambda f: np.save(f, arr))
        write_json_atomic({"kept": kept, "missing": missing, "stamps": {str(i): st for i, st in stamps.items()}},
                          meta, indent=None)
        images = np.load(cache, mmap_mode="r")
    row_of = {i: r for r, i in enumerate(kept)}
    rows = [dict(it, image=row_of[it["image_id"]]) for it in items if it["image_id"] in row_of]
    return images, rows


def split_by_image(rows, image_rows_val):
    """Split question records into (train, val) by their image: no image is in both."""
    val = set(int(i) for i in image_rows_val)
    return [r for r in rows if r["image"] not in val], [r for r in rows if r["image"] in val]


# ---- answer candidates for ranking, and the majority baseline

COMPARISON = re.compile(r"^which is \w+ , (.+) or (.+) \?$")


def comparison_options(question):
    """'which is bigger , the red circle or the square ?' -> ['the red circle', 'the square'], else None."""
    m = COMPARISON.match(" ".join(question.split()))
    return [m.group(1), m.group(2)] if m else None


def answers_by_type(rows):
    """{type: [answers of that type in rows, most frequent first (ties: alphabetical)]} and their counts."""
    counts = {}
    for r in rows:
        c = counts.setdefault(r["type"], {})
        c[r["answer"]] = c.get(r["answer"], 0) + 1
    ranked = {t: sorted(c, key=lambda a: (-c[a], a)) for t, c in counts.items()}
    return ranked, counts


def world_candidates(row, ranked):
    """Candidates for the world: the two phrases of a comparison question, else every training answer
    of the question's type."""
    opts = comparison_options(row["question"]) if row["type"] == "comparison" else None
    if opts:
        return opts
    cands = list(ranked.get(row["type"], []))
    return cands if row["answer"] in cands else cands + [row["answer"]]  # an answer never seen in training


def vqav2_candidates(row, ranked, k=7):
    """Candidates for VQAv2: the correct answer plus the k most frequent training answers of the same
    answer_type as distractors."""
    distractors = [a for a in ranked.get(row["type"], []) if a != row["answer"]][:k]
    return sorted([row["answer"]] + distractors)  # sorted: the right one is not always first (ties)
