"""
The model, in one file, in the order a reader learns it:
  RMSNorm -> rotary embeddings (RoPE) -> Attention -> SwiGLU MLP -> Block -> init_weights
  -> Decoder (a LLaMA-style language model) -> KVCache and generate (prefill, then decode)
  -> ViT (a small vision transformer) -> Projector -> VLM (image tokens as the decoder's prefix)
Plain PyTorch: nn.Linear, one F.scaled_dot_product_attention call, F.cross_entropy (the CPU speed
machinery this file once held measured no faster here: docs/SPEED.md).
Shapes: B batch, T time (tokens), P image-prefix tokens, D model width, H heads, hd head dim, V vocab.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# Building blocks

class RMSNorm(nn.Module):
    """LLaMA's norm: rescale by the root-mean-square, no mean subtraction, no bias."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # x * rsqrt(mean(x^2) + eps) * weight, as one fused kernel
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


def rope_tables(head_dim, max_len, theta=10000.0):
    """cos/sin tables for rotary embeddings: (max_len, head_dim/2) each."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.outer(torch.arange(max_len).float(), inv_freq)  # (max_len, hd/2)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate pairs (x1[i], x2[i]) of the two halves of each head by a position-dependent angle, so
    the dot product of a query and a key depends only on how far apart they are.
    x: (B, T, H, hd); cos, sin: broadcastable to (B, T, 1, hd/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Attention(nn.Module):
    def __init__(self, d_model, n_head, layer_idx=0):
        super().__init__()
        assert d_model % n_head == 0, "d_model must be divisible by n_head"
        self.n_head = n_head
        self.layer_idx = layer_idx  # which slot of a KV cache this layer writes
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)  # one matmul for q, k and v
        self.proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x, rope=None, mask=None, causal=False, cache=None):
        B, T, D = x.shape
        H = self.n_head
        q, k, v = self.qkv(x).split(D, dim=2)
        q, k, v = (t.view(B, T, H, D // H) for t in (q, k, v))  # (B, T, H, hd)
        if rope is not None:  # the decoder's positions; the ViT has its own 2-D embedding instead
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        if cache is not None:  # decoding: this step's keys/values join the cached ones
            k, v = cache.update(self.layer_idx, k, v)  # (B, H, S, hd), S = all positions so far
        y = self.attend(q, k, v, mask, causal)  # (B, H, T, hd)
        y = y.transpose(1, 2).contiguous().view(B, T, D)  # (B, T, D): heads side by side again
        return self.proj(y)

    def attend(self, q, k, v, mask, causal):
        """softmax(q k^T / sqrt(hd) + mask) v, in one fused kernel. The same, written out:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))   # (B, H, T, S)
            att = att.masked_fill(~mask, float("-inf"))                # or the causal triangle
            y = att.softmax(dim=-1) @ v                                # (B, H, T, hd)
        mask (bool, True = may attend) for padded or partly cached rows; is_causal for square self-attention."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)


class SwiGLU(nn.Module):
    def __init__(self, d_model, hidden):
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)  # gate and up in one matmul
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


def swiglu_hidden(d_model, multiple=32):
    """LLaMA's FFN width: 2/3 of 4*d (so SwiGLU's 3 matrices cost what a 4*d MLP's 2 do), rounded up."""
    h = int(8 * d_model / 3)
    return multiple * ((h + multiple - 1) // multiple)


class Block(nn.Module):
    """Pre-norm transformer block, shared by the decoder (causal, RoPE) and the ViT (bidirectional)."""

    def __init__(self, d_model, n_head, eps=1e-5, layer_idx=0):
        super().__init__()
        self.norm1 = RMSNorm(d_model, eps)
        self.attn = Attention(d_model, n_head, layer_idx)
        self.norm2 = RMSNorm(d_model, eps)
        self.mlp = SwiGLU(d_model, swiglu_hidden(d_model))

    def forward(self, x, rope=None, mask=None, causal=False, cache=None):
        x = x + self.attn(self.norm1(x), rope, mask, causal, cache)
        return x + self.mlp(self.norm2(x))


def init_weights(module, n_layer):
    """Every weight this file initialises, in one place (nanoGPT/GPT-2 style):
        parameter                              init
        token embedding, every linear weight   N(0, 0.02)
        attn.proj, mlp.down (residual outputs) N(0, 0.02 / sqrt(2 * n_layer)): the residual stream's
                                               variance does not grow with depth
        linear biases (the projector's)        0
        norm weights                           1 (set by RMSNorm itself)
        ViT conv stem                          PyTorch's default (Kaiming), right for conv + GELU
    Called by each part on the layers it has just built, in the order it builds them."""
    for name, p in module.named_parameters():
        if p.dim() < 2:
            if name.endswith("bias"):
                nn.init.zeros_(p)
            continue
        std = 0.02
        if name.endswith("attn.proj.weight") or name.endswith("mlp.down.weight"):
            std = 0.02 / math.sqrt(2 * n_layer)
        nn.init.normal_(p, mean=0.0, std=std)


# -----------------------------------------------------------------------------
# Decoder

@dataclass
class DecoderConfig:
    vocab_size: int = 512
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 192
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    norm_eps: float = 1e-5


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.n_head, cfg.norm_eps, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        init_weights(self, cfg.n_layer)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight  # one matrix for reading and writing tokens
        cos, sin = rope_tables(cfg.d_model // cfg.n_head, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # non-persistent: rebuilt from the config,
        self.register_buffer("rope_sin", sin, persistent=False)  # never stored in checkpoints

    def num_params(self, non_embedding=True):
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_emb.weight.numel() if non_embedding else n

    def trunk(self, x, positions, mask=None, cache=None):
        """The blocks, run over embeddings x (B, S, D) at the given positions ((S,) shared by the batch,
        or (B, S) per row). With a cache, x holds the S positions after the cache.pos already in it."""
        if positions.max() >= self.cfg.max_seq_len:
            raise ValueError(f"sequence of {int(positions.max()) + 1} positions exceeds max_seq_len={self.cfg.max_seq_len}")
        rope = self.rope_cos[positions].unsqueeze(-2), self.rope_sin[positions].unsqueeze(-2)  # (S|B,S, 1, hd/2)
        start = 0 if cache is None else cache.pos
        causal = mask is None and start == 0  # square self-attention: training, or a prefill
        if mask is None and start > 0 and x.size(1) > 1:
            # a chunk after a filled cache: query i (absolute position start+i) sees keys 0..start+i
            cols = torch.arange(start + x.size(1), device=x.device)
            mask = cols[None, :] <= cols[start:, None]  # (S, start+S)
        for block in self.blocks:
            x = block(x, rope, mask, causal, cache)
        if cache is not None:
            cache.pos += x.size(1)  # every layer has written these positions
        return x

    def hidden(self, idx, prefix=None, positions=None, cache=None):
        """The trunk, from token ids (B, T) to final hidden states (B, T, D): embed, put the prefix
        (B, P, D) embeddings (image tokens) in front, run the blocks, drop the prefix, normalise."""
        x = self.tok_emb(idx)  # (B, T, D)
        if prefix is not None:
            x = torch.cat([prefix.to(x.dtype), x], dim=1)  # (B, P+T, D)
        if positions is None:
            start = 0 if cache is None else cache.pos
            positions = torch.arange(start, start + x.size(1), device=x.device)
        x = self.trunk(x, positions, cache=cache)
        if prefix is not None:
            x = x[:, prefix.size(1):]  # (B, T, D): image positions predict nothing, so never carry loss
        return self.norm(x)

    def forward(self, idx, targets=None, prefix=None, positions=None, cache=None):
        """targets: (B, T), the next token of each position, -1 where no loss is wanted (prompts, padding).
        Returns (logits of the last position, None) without targets, (None, mean loss) with them."""
        x = self.hidden(idx, prefix, positions, cache)
        if targets is None:
            return self.head(x[:, -1:]).float(), None  # inference: only the last position is needed
        return None, self.head_loss(x, targets)

    def head_loss(self, x, targets):
        """The LM head and the mean cross-entropy over the positions that have a target."""
        logits = self.head(x).float()  # (B, T, V)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)

    def all_logits(self, idx, prefix=None):
        """Logits at every token position (B, T, V), for scoring sentences; no loss."""
        return self.head(self.hidden(idx, prefix)).float()

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, temperature=0.0, top_k=None, eos_id=None,
                 prefix=None, use_cache=True, generator=None):
        """Batched generation. prompts: list of B lists of token ids (lengths may differ).
        prefix: optional (B, P, D) embeddings (image tokens) placed before each prompt.
        temperature 0 is greedy. Returns a list of B lists of new token ids (stopping at eos_id,
        which is not included). use_cache=False recomputes every position at every step: slower,
        and the reference the cached path must agree with.

        Layout of row b: [pads][prefix][prompt b][new tokens]. Prompts are left-padded so every row's
        next token lands in the same column; pads are masked out of attention and each row's positions
        (for RoPE) start at 0 at its first real entry, so padding changes nothing."""
        device = self.tok_emb.weight.device
        B, P = len(prompts), (0 if prefix is None else prefix.size(1))
        lens = torch.tensor([len(p) for p in prompts], device=device)
        if (int(lens.min()) < 1 and prefix is None) or max_new_tokens < 0:
            raise ValueError("every prompt needs a token (e.g. BOS) when there is no prefix, and max_new_tokens >= 0")
        L = int(lens.max())
        S0, total = P + L, P + L + max_new_tokens  # columns before the first new token; all columns
        if total > self.cfg.max_seq_len:
            raise ValueError(f"prompt + prefix + max_new_tokens = {total} exceeds max_seq_len={self.cfg.max_seq_len}")
        pad = L - lens  # (B,) left pads per row
        idx = torch.zeros(B, L, dtype=torch.long, device=device)
        for b, p in enumerate(prompts):
            if len(p):
                idx[b, L - len(p):] = torch.tensor(p, device=device)
        x = self.tok_emb(idx)  # (B, L, D) = [pads][prompt]
        if prefix is not None:  # -> [pads][prefix][prompt]: each row's pads move in front of its prefix
            full = torch.cat([prefix.to(x.dtype), x], dim=1)  # (B, P+L, D) = [prefix][pads][prompt]
            x = torch.empty_like(full)
            for b in range(B):
                n = int(pad[b])
                x[b, :n], x[b, n:n + P], x[b, n + P:] = full[b, P:P + n], full[b, :P], full[b, P + n:]

        cols = torch.arange(total, device=device)
        positions = (cols[None, :] - pad[:, None]).clamp(min=0)  # (B, total): 0 at each row's first real entry
        real = cols[None, :] >= pad[:, None]  # (B, total): the column holds a real entry, not a pad
        # mask[b, 0, i, j]: query column i may see key column j (causal, never a pad); a pad query sees
        # itself only, so its row stays finite (an all-masked row would give NaN)
        mask = (cols[None, :, None] >= cols[None, None, :]) & real[:, None, :] | torch.eye(total, dtype=torch.bool, device=device)
        mask = mask[:, None]  # (B, 1, total, total)
        no_pads = int(pad.max()) == 0  # equal prompt lengths: plain causal attention, SDPA's fused kernels

        def run(x, q_cols, cache):
            """Hidden states of the last query column, given the embeddings of columns q_cols."""
            m = None if no_pads else mask[:, :, q_cols, :q_cols.stop]
            pos = positions[0, q_cols] if no_pads else positions[:, q_cols]
            return self.trunk(x, pos, m, cache)[:, -1]  # (B, D)

        cache = KVCache(self.cfg, B, total, device, x.dtype) if use_cache else None
        # prefill: every column of pads, prefix and prompt at once, filling the cache
        h = run(x, slice(0, S0), cache)
        new_tokens = torch.empty(B, 0, dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        for t in range(max_new_tokens):
            logits = self.head(self.norm(h)).float()  # (B, V)
            nxt = sample(logits, temperature, top_k, generator)  # (B,)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)  # a finished row only repeats EOS
                done |= nxt == eos_id
            new_tokens = torch.cat([new_tokens, nxt[:, None]], dim=1)
            if t == max_new_tokens - 1 or (eos_id is not None and bool(done.all())):
                break
            # decode: one new column; with the cache only its query runs, without it everything again
            S = S0 + t + 1
            if use_cache:
                h = run(self.tok_emb(nxt[:, None]), slice(S - 1, S), cache)
            else:
                h = run(torch.cat([x, self.tok_emb(new_tokens)], dim=1), slice(0, S), None)
        rows = new_tokens.tolist()  # each cut at its first EOS
        return rows if eos_id is None else [r[:r.index(eos_id)] if eos_id in r else r for r in rows]


class KVCache:
    """Preallocated keys/values for every layer: (L, B, H, T_max, hd). Layer i writes slot i; `pos` is
    how many positions are filled, moved on by the decoder once all layers have written."""

    def __init__(self, cfg, batch_size, max_len, device, dtype):
        shape = (cfg.n_layer, batch_size, cfg.n_head, max_len, cfg.d_model // cfg.n_head)
        # empty, not zeros: positions are written before they are read, and the rest is never read
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.pos = 0

    def update(self, layer, k, v):
        """Store layer's keys/values (B, H, T, hd) at pos..pos+T-1; return all of that layer's so far."""
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


def sample(logits, temperature=0.0, top_k=None, generator=None):
    """logits (B, V) -> next ids (B,). temperature 0 = greedy (argmax)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.size(-1):  # 0 (or None) = no cut
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)


# -----------------------------------------------------------------------------
# Vision: a small ViT trained from scratch, and a projector into the decoder's width

@dataclass
class ViTConfig:
    image_size: int = 32
    patch_size: int = 4
    n_layer: int = 3
    n_head: int = 4
    d_model: int = 128
    merge: int = 2  # projector merges merge x merge neighbouring patches into one decoder token
    conv_stem: bool = True  # patchify with stride-2 3x3 convs instead of one linear patch projection
    norm_eps: float = 1e-5


def sincos_2d(d_model, grid):
    """Fixed 2-D sin/cos position embedding (grid*grid, d_model): half the channels encode the row,
    half the column, so nearby patches get similar codes from the first step."""
    assert d_model % 4 == 0, "ViT d_model must be divisible by 4"
    quarter = d_model // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter).float() / quarter))
    coords = torch.arange(grid).float()
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    parts = []
    for c in (ys.flatten(), xs.flatten()):
        ang = torch.outer(c, omega)  # (grid*grid, d/4)
        parts += [ang.sin(), ang.cos()]
    return torch.cat(parts, dim=1)  # (grid*grid, d)


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        assert cfg.image_size % cfg.patch_size == 0, "image_size must be a multiple of patch_size"
        self.cfg = cfg
        self.grid = cfg.image_size // cfg.patch_size
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.n_head, cfg.norm_eps) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        init_weights(self, cfg.n_layer)
        if cfg.conv_stem:
            # "early convolutions help transformers see" (Xiao et al. 2021): log2(patch) stride-2 3x3 convs
            # see local edges first, far more sample-efficient than a linear patchify on a few thousand
            # images; a GroupNorm between them matters as much (BatchNorm would differ across DDP ranks)
            n = int(math.log2(cfg.patch_size))
            assert 2 ** n == cfg.patch_size, "conv_stem needs a power-of-two patch_size"
            layers, ch = [], 3
            for i in range(n):
                out = cfg.d_model // 2 ** (n - 1 - i)  # widen towards d_model
                layers.append(nn.Conv2d(ch, out, 3, stride=2, padding=1))
                if i < n - 1:
                    layers += [nn.GroupNorm(math.gcd(32, out), out), nn.GELU()]
                ch = out
            self.patch = nn.Sequential(*layers)
        else:
            # a strided conv is exactly "cut into patches, flatten, linear layer"
            self.patch = nn.Conv2d(3, cfg.d_model, kernel_size=cfg.patch_size, stride=cfg.patch_size)
            nn.init.normal_(self.patch.weight, std=0.02)  # a linear layer's init (see init_weights)
        self.register_buffer("pos", sincos_2d(cfg.d_model, self.grid), persistent=False)

    def forward(self, images):
        """images: (B, H, W, 3) uint8 -> patch features (B, grid*grid, d_model)."""
        x = images.permute(0, 3, 1, 2).float()  # (B, 3, H, W)
        x = (x / 255.0 - 0.5) / 0.25  # roughly zero-mean, unit-variance pixels
        x = self.patch(x)  # (B, D, grid, grid)
        x = x.flatten(2).transpose(1, 2)  # (B, grid*grid, D)
        x = x + self.pos.to(x.dtype)
        for block in self.blocks:
            x = block(x)  # bidirectional: every patch sees every patch
        return self.norm(x)


class Projector(nn.Module):
    """Merge each merge x merge group of patches (concatenate their features, as in pixel-shuffle
    projectors) and map to the decoder width with a 2-layer MLP. Fewer image tokens = cheaper decoder."""

    def __init__(self, vit_cfg: ViTConfig, d_out):
        super().__init__()
        self.m = vit_cfg.merge
        self.grid = vit_cfg.image_size // vit_cfg.patch_size
        assert self.grid % self.m == 0, "patch grid must be divisible by merge"
        self.fc1 = nn.Linear(vit_cfg.d_model * self.m * self.m, d_out)
        self.fc2 = nn.Linear(d_out, d_out)
        init_weights(self, 1)

    def forward(self, x):
        B, N, D = x.shape
        g, m = self.grid, self.m
        x = x.view(B, g // m, m, g // m, m, D)  # (B, rows, m, cols, m, D)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, (g // m) ** 2, m * m * D)  # (B, P, m*m*D)
        return self.fc2(F.gelu(self.fc1(x)))  # (B, P, d_out)

    def num_tokens(self):
        return (self.grid // self.m) ** 2


class VLM(nn.Module):
    """Image -> ViT -> projector -> prefix of the decoder. Loss only on the text tokens."""

    def __init__(self, dec_cfg: DecoderConfig, vit_cfg: ViTConfig):
        super().__init__()
        self.decoder = Decoder(dec_cfg)
        self.vit = ViT(vit_cfg)
        self.projector = Projector(vit_cfg, dec_cfg.d_model)

    def encode_images(self, images):
        """(B, H, W, 3) uint8 -> (B, P, D) decoder-width image tokens."""
        return self.projector(self.vit(images))

    def forward(self, images, idx, targets=None):
        return self.decoder(idx, targets, prefix=self.encode_images(images))

    def all_logits(self, images, idx):
        return self.decoder.all_logits(idx, prefix=self.encode_images(images))

    @torch.no_grad()
    def generate(self, images, prompts, max_new_tokens, **kw):
        """Caption or answer for a batch of images: the image prefix is prefilled once into the cache."""
        return self.decoder.generate(prompts, max_new_tokens, prefix=self.encode_images(images), **kw)


# -----------------------------------------------------------------------------
# Checkpoints store plain dicts: rebuild the model from them

def build_model(ckpt, load=True):
    """Rebuild a Decoder or VLM from a checkpoint dict (as loaded with weights_only=True); load=False
    leaves the fresh weights (e.g. to build on the meta device and only compare parameter names)."""
    dec_cfg = DecoderConfig(**ckpt["decoder_config"])
    model = VLM(dec_cfg, ViTConfig(**ckpt["vit_config"])) if ckpt.get("vit_config") else Decoder(dec_cfg)
    if load:
        model.load_state_dict(ckpt["model"])
    return model
