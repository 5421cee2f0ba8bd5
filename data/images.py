"""
Image datasets as (uint8 array (N, H, W, 3), list of per-image records).

  * the built-in world: `{split}_images.npy` (memory-mapped, never decoded in a training step) and
    `{split}.jsonl` records {"id", "scene", "captions"};
  * real captioned photos in the COCO captions format: an images folder plus captions_*.json
    ({"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}). Photos are decoded
    and resized ONCE into a cached .npy next to the checkpoints; corrupt files are skipped and counted.
"""
import glob
import hashlib
import json
import os
import sys

from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from common import UserError, read_json, read_jsonl, to_device, token_weighted, write_atomic, write_json_atomic
from tokenizer import BOS, EOS, PAD


def load_world_split(world_dir, split):
    path = os.path.join(world_dir, f"{split}_images.npy")
    if not os.path.exists(path):
        raise UserError(f"{path} not found; build the world with `python -m data.world --out {world_dir}`")
    images = np.load(path, mmap_mode="r")
    rows = read_jsonl(os.path.join(world_dir, f"{split}.jsonl"))
    if len(rows) != len(images):
        raise UserError(f"{world_dir}/{split}: {len(images)} images but {len(rows)} records; rebuild the world")
    return images, rows


def find_coco_files(coco_dir):
    """-> (captions json path, images folder). Accepts the COCO layout: captions_*.json at the top or in
    annotations/, images in train2017/ val2017/ images/ or next to the JSON."""
    if not os.path.isdir(coco_dir):
        raise UserError(f"COCO folder {coco_dir} does not exist")
    jsons = sorted(glob.glob(os.path.join(coco_dir, "captions_*.json")) +
                   glob.glob(os.path.join(coco_dir, "annotations", "captions_*.json")))
    if not jsons:
        raise UserError(f"no captions_*.json in {coco_dir} (or its annotations/ folder)")
    # the official annotations zip holds both captions_train2017.json and captions_val2017.json: use the
    # first whose split folder (train2017/, val2017/) has images, else one shared images/ folder or the top
    def has_images(folder):
        return os.path.isdir(folder) and any(f.lower().endswith((".jpg", ".jpeg", ".png")) for f in os.listdir(folder))
    splits = [os.path.basename(a)[len("captions_"):-len(".json")] for a in jsons]  # e.g. train2017
    for ann, split in zip(jsons, splits):
        if has_images(os.path.join(coco_dir, split)):
            return ann, os.path.join(coco_dir, split)
    for cand in ("images", "."):
        if has_images(os.path.join(coco_dir, cand)):
            return jsons[0], os.path.join(coco_dir, cand)
    raise UserError(f"no image folder with .jpg/.png files found in {coco_dir} (looked for {', '.join(splits)}, images/)")


def center_square(img, size):
    """Crop the central square and resize: the ViT sees the same aspect ratio as the world."""
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return np.asarray(img.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.uint8)


def load_coco(coco_dir, size, cache_dir):
    """All captioned images of a COCO-format folder, resized to size x size, cached as .npy (rebuilt once a
    file that was missing when it was made appears)."""
    ann_path, img_dir = find_coco_files(coco_dir)
    ann = read_json(ann_path)
    if not isinstance(ann, dict) or "images" not in ann or "annotations" not in ann:
        raise UserError(f"{ann_path} is not a COCO captions file (needs 'images' and 'annotations')")
    caps = {}
    if not isinstance(ann["images"], list) or not isinstance(ann["annotations"], list):
        raise UserError(f"{ann_path}: \"images\" and \"annotations\" must be lists")
    for i, a in enumerate(ann["annotations"]):
        if not isinstance(a, dict) or not _is_id(a.get("image_id")) or not isinstance(a.get("caption"), str):
            raise UserError(f"{ann_path}: annotation {i} needs an \"image_id\" (a number or string) and a \"caption\" string")
        caps.setdefault(a["image_id"], []).append(" ".join(a["caption"].strip().split()))
    for i, im in enumerate(ann["images"]):
        if not isinstance(im, dict) or not _is_id(im.get("id")) or not isinstance(im.get("file_name"), str):
            raise UserError(f"{ann_path}: image entry {i} needs an \"id\" (a number or string) and a \"file_name\" string")
    entries = [im for im in ann["images"] if im["id"] in caps]
    # keyed on content: the annotation file's size and mtime (edited captions make a new cache), and each image
    # file's as recorded in the metadata (a repaired, replaced or added image makes it stale; one deleted since
    # does not: it was decoded already)
    key = hashlib.sha1(f"{os.path.abspath(ann_path)}|{size}|{len(entries)}|{file_stamp(ann_path)}".encode()).hexdigest()[:10]
    cache = os.path.join(cache_dir, f"coco_{key}.npy")
    meta = cache[:-4] + ".json"
    stamps = {im["file_name"]: file_stamp(os.path.join(img_dir, im["file_name"])) for im in entries}
    saved = read_cache_meta(meta) if os.path.exists(cache) else None
    if isinstance(saved, dict) and {"rows", "stamps"} <= set(saved) and same_files(stamps, saved["stamps"]):
        return np.load(cache, mmap_mode="r"), saved["rows"]
    images, rows, bad, missing = [], [], [], []
    for im in entries:
        path = os.path.join(img_dir, im["file_name"])
        if not os.path.exists(path):  # listed but not in the folder (e.g. a subset of the photos)
            missing.append(im["file_name"])
            continue
        try:
            with Image.open(path) as img:
                images.append(center_square(img, size))
        except Exception:  # there, but truncated or not an image at all
            bad.append(im["file_name"])
            continue
        rows.append({"id": im["id"], "file_name": im["file_name"], "captions": caps[im["id"]]})
    if missing:
        print(f"warning: {len(missing)} of the {len(entries)} images listed in {ann_path} are missing from {img_dir} "
              f"(e.g. {missing[0]}); using the {len(images)} there", file=sys.stderr)
    if bad:
        print(f"warning: skipped {len(bad)} unreadable image(s) in {img_dir} (e.g. {bad[0]})", file=sys.stderr)
    if not images:
        raise UserError(f"none of the {len(entries)} images listed in {ann_path} could be read from {img_dir} "
                        f"({len(missing)} missing, {len(bad)} unreadable)")
    os.makedirs(cache_dir, exist_ok=True)
    arr = np.stack(images)
    write_atomic(cache, lambda f: np.save(f, arr))
    write_json_atomic({"rows": rows, "missing": missing, "stamps": stamps}, meta, indent=None)
    return np.load(cache, mmap_mode="r"), rows


def _is_id(x):
    return isinstance(x, (int, str)) and not isinstance(x, bool)


def file_stamp(path):
    """(size, mtime in ns) of a file, or None when it is missing: what a cache of it is keyed on."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def same_files(now, saved):
    """Every image file there now is the one the cache was made from ({name: (size, mtime) or None})."""
    return isinstance(saved, dict) and all(st is None or list(st) == saved.get(str(name)) for name, st in now.items())


def read_cache_meta(path):
    """A cache's metadata, or None when it is missing or damaged (the cache is then rebuilt: it is derived data)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def split_indices(n, val_frac, seed=0):
    """A fixed random split of n items into (train, val) index arrays."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(n * val_frac)))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def load_image_array(path, what="images"):
    """A .npy uint8 array (N, H, W, 3), memory-mapped; anything else is a one-line error."""
    if not os.path.exists(path):
        raise UserError(f"{what} {path} not found")
    try:
        images = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as e:  # not .npy, a pickle, an object array, a folder
        raise UserError(f"{what} {path} is not a .npy array of images ({e})")
    if not isinstance(images, np.ndarray):  # e.g. an .npz archive
        raise UserError(f"{what} {path} must be one .npy array (N, H, W, 3), not an archive")
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8 or len(images) == 0:
        raise UserError(f"{what} {path} must hold a uint8 array (N, H, W, 3) with N > 0, not {images.dtype} {images.shape}")
    return images


# ---------------------------------------------------------------------------------------------------------------------
# Captions as training data: phase 2's task, and its replay in phases 3 and 4
# ---------------------------------------------------------------------------------------------------------------------
def pack_captions(images, rows, sp, max_tokens, idx=None):
    """Tokenize the captions of records once -> SimpleNamespace(images uint8 (N,H,W,3), captions [[ids,...] per
    image], relations [ids of the world's relational caption, or None, per image], texts [[str,...]], scenes
    [dict or None]). idx: which records (default all). Captions are cut to max_tokens, then BOS ... EOS."""
    idx = np.arange(len(rows)) if idx is None else idx
    rows = [rows[i] for i in idx]
    texts = [r["captions"] for r in rows]
    rels = [r.get("relation") for r in rows]  # world images only
    flat = sp.encode([c for caps in texts for c in caps] + [r for r in rels if r])  # one batched call
    ids, k = [], 0
    for caps in texts:
        ids.append([[BOS] + flat[k + j][:max_tokens] + [EOS] for j in range(len(caps))])
        k += len(caps)
    relations = []
    for r in rels:
        relations.append([BOS] + flat[k][:max_tokens] + [EOS] if r else None)
        k += bool(r)
    imgs = images if len(idx) == len(images) else images[idx]
    return SimpleNamespace(images=imgs, captions=ids, relations=relations, texts=texts,
                           scenes=[r.get("scene") for r in rows])


def caption_batches(data, idx, gen, canonical_frac, groups=1, mine=slice(None), relation_frac=0.0):
    """Captions for images idx, as `groups` micro-batches of images (b,H,W,3) uint8 and padded (b,T)
    inputs/targets. Targets are -1 on padding, so only caption tokens (and EOS) carry loss.
    Rows are sorted by caption length before the cut, so a one-object caption (12 tokens) is not
    padded to a four-object one (36): the same gradient (see phase 2's loop) for less work.
    Under DDP idx is the global batch: every rank draws the captions of all of it, so the generator
    stays in step with one process, and keeps its own rows `mine`."""
    seqs = []
    for i in idx:
        caps = data.captions[i]
        # the relational caption with probability relation_frac (if the image has one), else the canonical
        # (first) caption with probability canonical_frac, else one of the others
        if relation_frac and data.relations[i] and torch.rand((), generator=gen).item() < relation_frac:
            seqs.append(data.relations[i])
        elif len(caps) == 1 or torch.rand((), generator=gen).item() < canonical_frac:
            seqs.append(caps[0])
        else:
            seqs.append(caps[1 + int(torch.randint(len(caps) - 1, (), generator=gen))])
    idx, seqs = idx[mine], seqs[mine]
    by_len = np.argsort([len(s) for s in seqs], kind="stable")
    return [_pad_captions(data, idx[part], [seqs[r] for r in part])
            for part in np.array_split(by_len, min(groups, len(seqs)))]


def _pad_captions(data, idx, seqs):
    T = max(len(s) for s in seqs) - 1
    x = torch.full((len(seqs), T), PAD, dtype=torch.long)
    y = torch.full((len(seqs), T), -1, dtype=torch.long)
    for r, s in enumerate(seqs):
        x[r, :len(s) - 1] = torch.tensor(s[:-1])
        y[r, :len(s) - 1] = torch.tensor(s[1:])
    images = torch.from_numpy(np.asarray(data.images[np.sort(idx)]))
    order = np.argsort(np.argsort(idx))  # images were read in sorted order (fast memmap); undo it
    return images[torch.from_numpy(order)], x, y


def caption_replay_step(loss_fn, data, batch_size, gen, run, relation_frac=0.0):
    """Forward + backward of one batch of phase 2's task inside phase 3 or 4, so a later phase does not erase
    captioning: labeled images with their canonical (or relational) captions, the image prefix on, the loss on
    caption tokens only. loss_fn(images, x, y) -> mean loss over the caption tokens. Returns (loss, counts)."""
    idx = torch.randint(len(data.captions), (batch_size,), generator=gen).numpy()
    mine = slice(run.rank, None, run.world_size)  # same global batch, each rank its own rows
    imgs, x, y = to_device(run, *caption_batches(data, idx, gen, 1.0, 1, mine, relation_frac)[0])
    n_tok = int((y >= 0).sum())
    with run.autocast:
        loss = token_weighted(loss_fn(imgs, x, y), n_tok, run)
    loss.backward()
    return loss.detach(), dict(tokens=n_tok, images=len(imgs))
