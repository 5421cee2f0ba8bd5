"""Unit tests of model.py, tokenizer.py and the shared training plumbing (fast, CPU)."""
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import config_dicts, flops_per_image, flops_per_sample, lr_at, save_checkpoint, load_checkpoint  # noqa: E402
from model import (Decoder, DecoderConfig, KVCache, ViT, ViTConfig, VLM, apply_rope, build_model,  # noqa: E402
                   rope_tables)
import tokenizer as tk  # noqa: E402


def tiny_cfg(**kw):
    base = dict(vocab_size=97, n_layer=2, n_head=4, d_model=64, max_seq_len=64)
    base.update(kw)
    return DecoderConfig(**base)


def test_initial_loss_is_ln_vocab():
    torch.manual_seed(0)
    m = Decoder(tiny_cfg(vocab_size=500))
    idx = torch.randint(0, 500, (8, 32))
    targets = torch.randint(0, 500, (8, 32))  # random targets: nothing to predict yet
    _, loss = m(idx, targets)
    assert abs(loss.item() - math.log(500)) < 0.1


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    m = Decoder(tiny_cfg())
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    xy = torch.randint(0, 97, (4, 17))
    x, y = xy[:, :-1], xy[:, 1:]
    for _ in range(150):
        _, loss = m(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def test_ignore_index_masks_loss():
    torch.manual_seed(0)
    m = Decoder(tiny_cfg())
    x = torch.randint(0, 97, (2, 10))
    y = torch.randint(0, 97, (2, 10))
    y_masked = y.clone()
    y_masked[:, :5] = -1
    logits = m.all_logits(x)
    _, loss = m(x, y_masked)
    ref = torch.nn.functional.cross_entropy(logits[:, 5:].reshape(-1, 97), y[:, 5:].reshape(-1))
    assert torch.allclose(loss, ref, atol=1e-6)


def test_kv_cache_logits_equal_full_forward():
    torch.manual_seed(0)
    m = Decoder(tiny_cfg()).eval()
    idx = torch.randint(0, 97, (3, 20))
    full = m.all_logits(idx)  # (3, 20, V)
    cache = KVCache(m.cfg, 3, 20, "cpu", torch.float32)
    # prefill 8 tokens at once, then a chunk of 4, then one token at a time
    l0, _ = m(idx[:, :8], cache=cache)
    assert torch.allclose(l0[:, -1], full[:, 7], atol=1e-5)
    l1, _ = m(idx[:, 8:12], cache=cache)
    assert torch.allclose(l1[:, -1], full[:, 11], atol=1e-5)
    for t in range(12, 20):
        lt, _ = m(idx[:, t:t + 1], cache=cache)
        assert torch.allclose(lt[:, -1], full[:, t], atol=1e-5)


@pytest.mark.parametrize("with_prefix", [False, True])
def test_greedy_generation_same_with_and_without_cache(with_prefix):
    torch.manual_seed(0)
    m = Decoder(tiny_cfg()).eval()
    prompts = [[2, 5, 6, 7], [2], [2, 9, 10, 11, 12, 13, 14]]  # different lengths in one batch
    prefix = torch.randn(3, 4, 64) if with_prefix else None
    cached = m.generate(prompts, 15, prefix=prefix, use_cache=True)
    uncached = m.generate(prompts, 15, prefix=prefix, use_cache=False)
    assert cached == uncached
    # and batching with left padding changes nothing: each row alone gives the same tokens
    for b, p in enumerate(prompts):
        alone = m.generate([p], 15, prefix=None if prefix is None else prefix[b:b + 1], use_cache=False)
        assert alone[0] == cached[b]
    assert all(len(o) == 15 for o in cached)


def test_generation_stops_at_eos():
    torch.manual_seed(0)
    m = Decoder(tiny_cfg()).eval()
    free = m.generate([[2, 5]], 10)[0]
    eos = free[3]  # pretend the 4th generated token is EOS
    out = m.generate([[2, 5]], 10, eos_id=eos)[0]
    assert out == free[:free.index(eos)]


def test_rope_depends_only_on_relative_position():
    hd = 16
    cos, sin = rope_tables(hd, 64)
    q, k = torch.randn(1, 1, 1, hd), torch.randn(1, 1, 1, hd)

    def score(i, j):
        qi = apply_rope(q, cos[i][None, None, None], sin[i][None, None, None])
        kj = apply_rope(k, cos[j][None, None, None], sin[j][None, None, None])
        return (qi * kj).sum().item()

    assert abs(score(5, 2) - score(40, 37)) < 1e-4
    assert abs(score(5, 2) - score(5, 3)) > 1e-4  # but it does depend on the offset


def test_tokenizer_round_trip(tmp_path):
    lines = ["look , a big red circle !", "there are two blue squares .", "is the star above the heart ?"] * 200
    sp = tk.train_tokenizer(lines, str(tmp_path / "tok.model"), 300)
    for text in lines[:3] + ["unseen words: zebra 42 é"]:
        ids = tk.encode(sp, text)
        assert ids[0] == tk.BOS and ids[-1] == tk.EOS
        assert tk.decode(sp, ids) == text  # byte fallback: even unseen characters survive


def test_tokenizer_folds_case(tmp_path):
    # speech transcripts are lower case, benchmark sentences start with a capital: one word either way
    lines = ["only the dog would ever bark .", "even the cat sat on the mat ."] * 200
    sp = tk.train_tokenizer(lines, str(tmp_path / "tok.model"), 300)
    assert tk.encode(sp, "Only The DOG would ever bark.") == tk.encode(sp, "only the dog would ever bark.")
    assert tk.decode(sp, tk.encode(sp, lines[0])) == lines[0]  # lower-case text (all of the world's) is untouched


def test_checkpoint_round_trip_weights_only(tmp_path):
    torch.manual_seed(0)
    m = VLM(tiny_cfg(), ViTConfig(image_size=16, patch_size=4, n_layer=1, d_model=32, n_head=2))
    d, v = config_dicts(m)
    path = str(tmp_path / "ck.pt")
    save_checkpoint({"model": m.state_dict(), "decoder_config": d, "vit_config": v, "phase": "phase2",
                     "step": 3, "val_loss": 1.5, "args": {"lr": 1e-3, "name": "x"}}, path)
    ck = torch.load(path, weights_only=True)  # plain tensors and types only
    assert ck["phase"] == "phase2" and ck["step"] == 3
    m2 = build_model(load_checkpoint(path, "phase2"))
    for (k1, t1), (k2, t2) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert k1 == k2 and torch.equal(t1, t2)
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]  # atomic write leaves no temp file


def test_lr_schedule_endpoints():
    assert lr_at(0, 1.0, 100, 10) == pytest.approx(0.1)  # first warmup step
    assert lr_at(9, 1.0, 100, 10) == pytest.approx(1.0)  # end of warmup
    assert lr_at(10, 1.0, 100, 10) == pytest.approx(1.0)  # cosine starts at the peak
    assert lr_at(100, 1.0, 100, 10, min_lr_frac=0.1) == pytest.approx(0.1)  # ends at the floor
    assert lr_at(500, 1.0, 100, 10, min_lr_frac=0.1) == pytest.approx(0.1)
    vals = [lr_at(s, 1.0, 100, 10) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))  # monotone decay


# ---- vision-language

def tiny_vlm():
    return VLM(tiny_cfg(), ViTConfig(image_size=16, patch_size=4, n_layer=1, n_head=2, d_model=32, merge=2))


def test_vlm_shapes_and_prefix_carries_no_loss():
    torch.manual_seed(0)
    m = tiny_vlm()
    images = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8)
    assert m.vit(images).shape == (2, 16, 32)  # 4x4 patches of width 32
    assert m.encode_images(images).shape == (2, 4, 64)  # merged 2x2 -> 4 decoder tokens
    idx = torch.randint(0, 97, (2, 7))
    y = torch.randint(0, 97, (2, 7))
    logits = m.all_logits(images, idx)
    assert logits.shape == (2, 7, 97)  # logits only for the text positions
    _, loss = m(images, idx, y)
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 97), y.reshape(-1))
    assert torch.allclose(loss, ref, atol=1e-6)
    # the loss depends on the image only through the text positions: masking all text targets
    # leaves nothing to learn
    _, none = m(images, idx, torch.full_like(y, -1))
    assert torch.isnan(none)


def test_tiny_vlm_overfits_image_caption_pairs():
    torch.manual_seed(0)
    m = tiny_vlm()
    images = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8)
    # the same prompt token, a different caption per image: only the image can tell them apart
    caps = torch.randint(4, 97, (4, 6))
    idx = torch.cat([torch.full((4, 1), 2), caps[:, :-1]], dim=1)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    for _ in range(200):
        _, loss = m(images, idx, caps)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    out = m.generate(images, [[2]] * 4, 6)
    assert out == caps.tolist()


def test_vlm_cached_and_uncached_captions_identical():
    torch.manual_seed(0)
    m = tiny_vlm().eval()
    images = torch.randint(0, 256, (5, 16, 16, 3), dtype=torch.uint8)
    prompts = [[2], [2, 7], [2], [2, 8, 9], [2]]
    assert m.generate(images, prompts, 12, use_cache=True) == m.generate(images, prompts, 12, use_cache=False)


def test_vit_is_bidirectional():
    torch.manual_seed(0)
    vit = ViT(ViTConfig(image_size=16, patch_size=4, n_layer=1, n_head=2, d_model=32))
    a = torch.randint(0, 256, (1, 16, 16, 3), dtype=torch.uint8)
    b = a.clone()
    b[0, 12:, 12:] = 255 - b[0, 12:, 12:]  # change only the last patch
    fa, fb = vit(a), vit(b)
    assert not torch.allclose(fa[0, 0], fb[0, 0])  # the first patch sees the last


def test_vlm_flops_count_the_output_layer_for_text_positions_only():
    """Image positions are dropped before the LM head (they predict nothing), so they must not pay for it."""
    m = VLM(DecoderConfig(vocab_size=4096, n_layer=2, n_head=2, d_model=32, max_seq_len=64),
            ViTConfig(image_size=16, patch_size=4, n_layer=1, n_head=2, d_model=32, merge=2))
    dec, P, T = m.decoder, m.projector.num_tokens(), 10
    body = sum(p.numel() for n, p in dec.blocks.named_parameters() if p.dim() == 2)  # the blocks' matmuls
    attn = 12 * dec.cfg.n_layer * dec.cfg.d_model * (P + T)
    head = 6 * dec.cfg.d_model * dec.cfg.vocab_size
    proj = 6 * P * sum(p.numel() for p in m.projector.parameters())
    want = flops_per_image(m.vit) + proj + (P + T) * (6 * body + attn) + T * head
    norms = 6 * (P + T) * sum(p.numel() for n, p in dec.named_parameters() if p.dim() == 1)  # counted as params
    assert flops_per_sample(m, T) == want + norms
