"""
The model, in one file: a LLaMA-style decoder, a small ViT, a projector, and the
vision-language model (VLM) that glues them together, plus KV-cache generation.

Read top to bottom:
  RMSNorm -> Linear and _ChunkedHeadLoss (CPU speed-ups: skip them on a first read) -> rotary
  embeddings -> Attention -> SwiGLU -> Block -> Decoder (+ generate)
  ViT -> Projector -> VLM
Shapes: B batch, T time (tokens), P image-prefix tokens, C/D model width, H heads, hd head dim.
"""
import math
from dataclasses import dataclass, asdict

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
        # x * rsqrt(mean(x^2) + eps) * weight, as one fused kernel where torch has one
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


def onednn_linear(x, weight, bias=None):
    """x @ weight.T (+ bias) for a 2-D fp32 CPU x, on oneDNN's GEMM (a torch-internal op, no autograd)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """y = x @ W.T (+ b) for 2-D fp32 CPU tensors, forward and input gradient through oneDNN's GEMM.
    The weight gradient stays on torch.mm (MKL): for that shape (W-sized output, long inner dimension)
    MKL was as fast or faster."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        # keep only what backward will use, as F.linear does: x for W's gradient, W for x's
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight if ctx.needs_input_grad[0] else None)
        ctx.has_bias = bias is not None
        return onednn_linear(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable  # the oneDNN op has no derivative: no double backward
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:  # g @ W, written as a linear layer whose weight is W.T
            gx = onednn_linear(g, weight.t().contiguous())
        if ctx.needs_input_grad[1]:
            gw = g.t() @ x
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.sum(0)
        return gx, gw, gb


def _onednn_works():
    """oneDNN ships inside the standard CPU wheels, but its linear op is torch-internal: use it only if
    it is there and gives F.linear's numbers on a tiny case; otherwise everything keeps F.linear."""
    try:
        x, w, b = torch.randn(3, 4), torch.randn(5, 4), torch.randn(5)
        y = onednn_linear(x, w, b)
        return torch.backends.mkldnn.is_available() and torch.allclose(y, F.linear(x, w, b), atol=1e-5)
    except Exception:  # no such op, or a different signature in another torch version
        return False


ONEDNN = _onednn_works()


def eager_cpu_fp32(x, weight):
    """True where this file's CPU fast paths apply: fp32 on the CPU, eager mode (GPUs, other dtypes, CPU
    autocast and torch.compile, which picks its own kernels, keep plain PyTorch)."""
    return (x.is_cpu and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


def use_onednn(x, weight):
    """Whether x @ weight.T goes to oneDNN: fp32 eager CPU, oneDNN usable and on, at least 64 rows. Under
    64 rows (e.g. decoding a few sequences) oneDNN's ~20 us fixed cost per call outweighs its faster
    kernel: up to 2x slower than MKL at 1-8 rows, about even at 32-64."""
    enough_rows = x.numel() >= 64 * x.size(-1) > 0
    return ONEDNN and torch.backends.mkldnn.enabled and enough_rows and eager_cpu_fp32(x, weight)


def cpu_linear(x, weight):
    """x @ weight.T for a 2-D x, on oneDNN where model.Linear would use it, else F.linear."""
    return onednn_linear(x, weight) if use_onednn(x, weight) else F.linear(x, weight)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same checkpoints) whose fp32 CPU matmuls run on oneDNN instead of
    MKL, torch's default. On the 2-core AMD EPYC this project is developed on, oneDNN's fp32 GEMM is
    1.0-1.5x faster at this model's shapes (`python bench.py --device cpu --gemm` measures them; on
    other CPUs measure before trusting that). GPUs, other dtypes, CPU autocast, torch.compile (which picks
    its own kernels) and `torch.backends.mkldnn.flags(enabled=False)` keep F.linear."""

    def forward(self, x):
        if not use_onednn(x, self.weight):
            return F.linear(x, self.weight, self.bias)
        x2 = x.reshape(-1, x.size(-1))  # (N, in)
        if torch.is_grad_enabled():
            y = _OneDNNLinear.apply(x2, self.weight, self.bias)  # (N, out)
        else:  # inference: the op itself, without autograd's bookkeeping
            y = onednn_linear(x2, self.weight, self.bias)
        return y.view(*x.shape[:-1], y.size(-1))


class _ChunkedHeadLoss(torch.autograd.Function):
    """F.cross_entropy(x @ W.T, targets, ignore_index=-1), the LM head and its mean loss, for fp32 CPU
    training, without ever holding all the (N, vocab) logits: a chunk of rows (~8 MB of logits) at a
    time makes its logits, its loss and at once its gradient (softmax minus one-hot), so backward only
    rescales. Rows with target -1 skip the matmuls altogether. On the 2-core AMD EPYC this project is
    developed on, a whole training step of bench.py's cpu config (4096 rows x vocab 4096, 64 MB of
    logits) got 1.05-1.09x faster in six runs (`python bench.py --device cpu --plain_loss_too` measures
    it; on other CPUs measure before trusting that). The idea of the "fused linear cross entropy" GPU
    kernels, in torch ops."""

    @staticmethod
    def forward(ctx, x, weight, targets):
        N, V = x.size(0), weight.size(0)
        rows = None
        if bool((targets == -1).any()):  # rows without a target (prompts, padding) never reach a matmul
            rows = (targets != -1).nonzero().squeeze(1)
            x, targets = x.index_select(0, rows), targets.index_select(0, rows)
        want_x, want_w = ctx.needs_input_grad[:2]
        gx = torch.empty_like(x) if want_x else None
        gw = torch.zeros_like(weight) if want_w else None
        w_t = weight.t().contiguous() if want_x else None  # (D, V): p @ W written as a linear layer
        chunk = max(64, 2 ** 21 // V)  # ~2M logits per chunk: 512 rows at vocab 4096
        buf = x.new_empty(min(chunk, x.size(0)), V)
        total = x.new_zeros(())
        for i in range(0, x.size(0), chunk):
            xc, tc = x[i:i + chunk], targets[i:i + chunk]  # (c, D), (c,)
            logits = cpu_linear(xc, weight)  # (c, V)
            logp = torch.log_softmax(logits, dim=1, out=buf[:len(xc)])
            total -= logp.gather(1, tc[:, None]).sum()
            # d(sum of the chunk's losses)/d(logits) = softmax - one-hot (into the same buffer: the
            # log-probabilities are no longer needed)
            p = torch.softmax(logits, dim=1, out=buf[:len(xc)])
            p[torch.arange(len(xc)), tc] -= 1
            if want_x:
                gx[i:i + chunk] = cpu_linear(p, w_t)  # (c, D)
            if want_w:
                gw.addmm_(p.t(), xc)  # (V, D), summed over the chunks
        if rows is not None and want_x:
            gx = x.new_zeros(N, x.size(1)).index_copy_(0, rows, gx)  # rows without a target: zero
        ctx.save_for_backward(gx, gw)
        ctx.n = x.size(0)  # rows that carry a loss: the mean's denominator
        return total / ctx.n  # no target at all: 0/0 = nan, as F.cross_entropy gives

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        gx, gw = ctx.saved_tensors
        scale = g / max(ctx.n, 1)  # no target at all: zero gradients (as F.cross_entropy's), not nan
        return (None if gx is None else gx * scale), (None if gw is None else gw * scale), None


def rope_tables(head_dim, max_len, theta=10000.0):
    """cos/sin tables for rotary embeddings: (max_len, head_dim/2) each."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.outer(torch.arange(max_len).float(), inv_freq)  # (max_len, hd/2)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate pairs (x1[i], x2[i]) of the two halves of each head by a position-dependent angle.
    x: (B, H, T, hd); cos, sin: broadcastable to (B, 1, T, hd/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def rope_qk(qk, cos, sin, n_head):
    """apply_rope on q and k at once, straight out of the qkv matmul: qk is (B, T, 2*D), the heads of q
    then the heads of k side by side. Same numbers as apply_rope, bit for bit, but every op runs over
    whole contiguous rows instead of 16-float half-heads (3x faster on CPU, forward + backward):
        (x1, x2) -> (x1*cos - x2*sin, x2*cos + x1*sin)  =  x * [cos, cos] + [x2, x1] * [-sin, sin]
    cos, sin: (T | B, T, 2*D) from Decoder.rope_at (tables built by wide_rope): [cos, cos] and
    [-sin, sin] tiled over the 2*H heads."""
    B, T, C2 = qk.shape
    # (x1, x2) -> (x2, x1) in every head: roll by 1 on a size-2 dim is that swap, and on CPU it is ~2.5x
    # faster than flip(3) (0.34 vs 0.90 ms at batch 32 x 128 tokens; flip gathers element by element)
    swapped = qk.view(B, T, 2 * n_head, 2, -1).roll(1, 3).view(B, T, C2)
    return qk * cos + swapped * sin


def wide_rope(cos, sin, n_head):
    """Half-width tables (..., hd/2) -> the (..., 2*n_head*hd) tables rope_qk multiplies by."""
    reps = [1] * (cos.dim() - 1) + [2 * n_head]
    return torch.cat((cos, cos), dim=-1).repeat(reps), torch.cat((-sin, sin), dim=-1).repeat(reps)


class Attention(nn.Module):
    def __init__(self, d_model, n_head, bias=False):
        super().__init__()
        assert d_model % n_head == 0, "d_model must be divisible by n_head"
        self.n_head = n_head
        self.qkv = Linear(d_model, 3 * d_model, bias=bias)  # one matmul for q, k and v
        self.proj = Linear(d_model, d_model, bias=bias)

    def forward(self, x, rope=None, mask=None, causal=False, cache=None):
        B, T, C = x.shape
        H = self.n_head
        qk, v = self.qkv(x).split([2 * C, C], dim=2)
        if rope is not None:
            qk = rope_qk(qk, *rope, H)  # rotary embeddings on q and k together
        q, k = qk.split(C, dim=2)
        q = q.view(B, T, H, C // H).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, H, C // H).transpose(1, 2)
        v = v.view(B, T, H, C // H).transpose(1, 2)
        if cache is not None:
            # write this step's keys/values into the preallocated cache, attend over all so far
            k, v = cache.update(k, v)
        if T == 1 and not causal and x.is_cpu:
            # one new query per row (a KV-cache decoding step): SDPA's CPU kernel is built for blocks of
            # queries and takes 1.5-2x longer here than two small batched matmuls (GPUs keep SDPA)
            att = (q @ k.transpose(-1, -2)) * (C // H) ** -0.5  # (B, H, 1, S)
            if mask is not None:  # bool, True = may attend (generate's padding mask)
                att = att.masked_fill(~mask, float("-inf"))
            y = att.softmax(dim=-1) @ v  # (B, H, 1, hd)
        else:
            # is_causal only for square self-attention (training); everything else gets an explicit mask
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.proj(y)


class SwiGLU(nn.Module):
    def __init__(self, d_model, hidden, bias=False):
        super().__init__()
        self.gate_up = Linear(d_model, 2 * hidden, bias=bias)  # gate and up in one matmul
        self.down = Linear(hidden, d_model, bias=bias)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


def swiglu_hidden(d_model, multiple=32):
    """LLaMA's FFN width: 2/3 of 4*d (so SwiGLU's 3 matrices cost what a 4*d MLP's 2 do), rounded up."""
    h = int(8 * d_model / 3)
    return multiple * ((h + multiple - 1) // multiple)


class Block(nn.Module):
    """Pre-norm transformer block, shared by the decoder (causal, RoPE) and the ViT (bidirectional)."""

    def __init__(self, d_model, n_head, eps=1e-5):
        super().__init__()
        self.norm1 = RMSNorm(d_model, eps)
        self.attn = Attention(d_model, n_head)
        self.norm2 = RMSNorm(d_model, eps)
        self.mlp = SwiGLU(d_model, swiglu_hidden(d_model))

    def forward(self, x, rope=None, mask=None, causal=False, cache=None):
        x = x + self.attn(self.norm1(x), rope, mask, causal, cache)
        return x + self.mlp(self.norm2(x))


def init_weights(module, n_layer):
    """nanoGPT/GPT-2 init: N(0, 0.02) everywhere, residual output projections scaled by 1/sqrt(2L)
    so the residual stream's variance does not grow with depth."""
    for name, p in module.named_parameters():
        if p.dim() < 2:
            continue  # norms start at 1, biases at 0 (set by their constructors)
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


class KVCache:
    """Preallocated keys/values for every layer: (L, B, H, T_max, hd). `pos` is how many are filled."""

    def __init__(self, cfg, batch_size, max_len, device, dtype):
        hd = cfg.d_model // cfg.n_head
        shape = (cfg.n_layer, batch_size, cfg.n_head, max_len, hd)
        # empty, not zeros: update() writes positions pos..pos+T-1 before attention reads 0..pos+T-1
        # (zeros would write 2 x 19 MB for nothing at bench.py's batch 64). The unwritten rest may hold
        # nan or inf: never read it, even masked (0 x nan = nan)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.pos = 0
        self.layer = 0

    def update(self, k, v):
        T = k.size(2)
        self.k[self.layer, :, :, self.pos:self.pos + T] = k
        self.v[self.layer, :, :, self.pos:self.pos + T] = v
        k_all = self.k[self.layer, :, :, :self.pos + T]
        v_all = self.v[self.layer, :, :, :self.pos + T]
        self.layer += 1
        return k_all, v_all

    def advance(self, T):
        """Called once per forward, after all layers wrote T new positions."""
        self.pos += T
        self.layer = 0


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.n_head, cfg.norm_eps) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = Linear(cfg.d_model, cfg.vocab_size, bias=False)
        init_weights(self, cfg.n_layer)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight  # one matrix for reading and writing tokens
        self.chunked_head_loss = True  # CPU training: _ChunkedHeadLoss (False: bench.py --plain_loss_too)
        cos, sin = rope_tables(cfg.d_model // cfg.n_head, cfg.max_seq_len, cfg.rope_theta)
        cos, sin = wide_rope(cos, sin, cfg.n_head)  # (max_seq_len, 2*D): the layout rope_qk multiplies by
        # non-persistent: recomputed from the config, never stored in checkpoints
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def num_params(self, non_embedding=True):
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            if not self.cfg.tie_embeddings:
                n -= 0  # an untied head is a real matmul per token: keep it
        return n

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (forward + backward), PaLM appendix B style:
        6 * (matmul params, the LM head included) + 12 * L * d * T for attention scores and values."""
        cfg = self.cfg
        n_matmul = self.num_params(non_embedding=True)
        if cfg.tie_embeddings:
            n_matmul += self.tok_emb.weight.numel()  # tied head still costs a d x V matmul
        return 6 * n_matmul + 12 * cfg.n_layer * cfg.d_model * seq_len

    def rope_at(self, positions):
        """positions: (T,) shared by the batch, or (B, T) per row -> cos, sin shaped (T | B, T, 2*D),
        in the wide layout rope_qk multiplies q and k by."""
        if positions.max() >= self.cfg.max_seq_len:
            raise ValueError(f"sequence of {int(positions.max()) + 1} positions exceeds max_seq_len={self.cfg.max_seq_len}")
        return self.rope_cos[positions], self.rope_sin[positions]

    def forward(self, idx, targets=None, prefix=None, positions=None, mask=None, cache=None):
        """idx: (B, T) token ids. prefix: optional (B, P, D) embeddings placed before the tokens
        (image tokens); they get no logits and so never carry loss. targets: (B, T) ids aligned
        with idx (the next token of each position), -1 where no loss is wanted.
        Returns (logits of the last position, None) without targets, (None, mean loss) with them: the
        loss may be computed without ever forming all the logits (all_logits gives them)."""
        x = self.tok_emb(idx)  # (B, T, D)
        if prefix is not None:
            x = torch.cat([prefix.to(x.dtype), x], dim=1)  # (B, P+T, D)
        S = x.size(1)
        start = 0 if cache is None else cache.pos  # tokens already in the cache come first
        if positions is None:
            positions = torch.arange(start, start + S, device=x.device)
        rope = self.rope_at(positions)
        causal = mask is None and start == 0  # square attention (training, or a prefill): is_causal
        if mask is None and start > 0 and S > 1:
            # a chunk after a filled cache: query i (absolute position start+i) sees keys 0..start+i
            mask = torch.arange(start + S, device=x.device)[None, :] <= torch.arange(start, start + S, device=x.device)[:, None]
        for block in self.blocks:
            x = block(x, rope, mask, causal, cache)
        if cache is not None:
            cache.advance(S)
        if prefix is not None:
            x = x[:, prefix.size(1):]  # (B, T, D): only token positions predict tokens
        x = self.norm(x)
        if targets is None:
            return self.head(x[:, -1:]).float(), None  # inference: only the last position is needed
        w = self.head.weight
        if (self.chunked_head_loss and torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)
                and eager_cpu_fp32(x, w)):  # CPU training
            return None, _ChunkedHeadLoss.apply(x.reshape(-1, x.size(-1)), w, targets.reshape(-1))
        logits = self.head(x).float()  # (B, T, V)
        return None, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)

    def all_logits(self, idx, prefix=None):
        """Logits at every token position (for scoring sentences and tests), no loss."""
        x = self.tok_emb(idx)
        if prefix is not None:
            x = torch.cat([prefix.to(x.dtype), x], dim=1)
        rope = self.rope_at(torch.arange(x.size(1), device=x.device))
        for block in self.blocks:
            x = block(x, rope, None, True, None)
        if prefix is not None:
            x = x[:, prefix.size(1):]
        return self.head(self.norm(x)).float()

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, temperature=0.0, top_k=None, eos_id=None,
                 prefix=None, use_cache=True, generator=None):
        """Batched generation. prompts: list of B lists of token ids (lengths may differ).
        prefix: optional (B, P, D) embeddings (image tokens) placed before each prompt.
        temperature 0 is greedy. Returns a list of B lists of new token ids (stopping at eos_id,
        which is not included).

        Layout of row b: [pads][prefix][prompt b][new tokens]. Prompts are left-padded so every
        row's next token lands in the same column; pads are masked out of attention and each row's
        positions (for RoPE) start at 0 at its first real entry, so padding changes nothing."""
        device = self.tok_emb.weight.device
        B = len(prompts)
        P = 0 if prefix is None else prefix.size(1)
        lens = torch.tensor([len(p) for p in prompts], device=device)
        if int(lens.min()) < 1 and prefix is None:
            raise ValueError("every prompt needs at least one token (e.g. BOS) when there is no prefix")
        L = int(lens.max())
        pad = L - lens  # (B,) left pads per row
        idx = torch.zeros(B, L, dtype=torch.long, device=device)
        for b, p in enumerate(prompts):
            if len(p):
                idx[b, L - len(p):] = torch.tensor(p, device=device)
        S0 = P + L  # columns before the first new token
        total = S0 + max_new_tokens
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 0")
        if total > self.cfg.max_seq_len:
            raise ValueError(f"prompt + prefix + max_new_tokens = {total} exceeds max_seq_len={self.cfg.max_seq_len}")
        # prefix goes after the pads: build the full prefix-region embeddings row by row
        cols = torch.arange(total, device=device)
        positions = (cols[None, :] - pad[:, None]).clamp(min=0)  # (B, total)
        real = cols[None, :] >= pad[:, None]  # (B, total) key is a real entry, not a pad
        # mask[b, 0, i, j]: query column i may see key column j
        mask = (cols[None, :, None] >= cols[None, None, :]) & real[:, None, :]  # (B, total, total)
        # a pad query sees itself only: its row stays finite (an all-masked row would give NaN)
        mask = mask | torch.eye(total, dtype=torch.bool, device=device)[None]
        mask = mask[:, None]  # (B, 1, total, total)
        # no padding at all (equal prompt lengths, e.g. captioning from BOS): plain causal attention,
        # no mask tensor, so SDPA can take its fused kernels
        no_pads = int(pad.max()) == 0

        def embed_start():
            x = self.tok_emb(idx)  # (B, L, D)
            if prefix is None:
                return x
            # move each row's pads in front of its prefix: [pads][prefix][prompt]
            full = torch.cat([prefix.to(x.dtype), x], dim=1)  # (B, P+L, D) = [prefix][pads][prompt]
            out = torch.empty_like(full)
            for b in range(B):
                n = int(pad[b])
                out[b, :n] = full[b, P:P + n]
                out[b, n:n + P] = full[b, :P]
                out[b, n + P:] = full[b, P + n:]
            return out

        done = torch.zeros(B, dtype=torch.bool, device=device)
        x0 = embed_start()  # (B, S0, D)
        if use_cache:
            dtype = x0.dtype
            cache = KVCache(self.cfg, B, total, device, dtype)
        new_tokens = torch.empty(B, 0, dtype=torch.long, device=device)
        for t in range(max_new_tokens):
            S = S0 + t
            if use_cache:
                if t == 0:
                    x, q_cols = x0, slice(0, S)  # prefill all columns at once
                else:
                    x, q_cols = self.tok_emb(new_tokens[:, -1:]), slice(S - 1, S)
            else:
                x = torch.cat([x0, self.tok_emb(new_tokens)], dim=1)  # recompute everything
                q_cols = slice(0, S)
            m = None if no_pads else mask[:, :, q_cols, :S]
            causal = no_pads and q_cols.start == 0  # square: the prefill, or an uncached step
            rope = self.rope_at(positions[:1, q_cols] if no_pads else positions[:, q_cols])
            h = x
            for block in self.blocks:
                h = block(h, rope, m, causal, cache if use_cache else None)
            if use_cache:
                cache.advance(h.size(1))
            logits = self.head(self.norm(h[:, -1])).float()  # (B, V)
            nxt = sample(logits, temperature, top_k, generator)  # (B,)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            new_tokens = torch.cat([new_tokens, nxt[:, None]], dim=1)
            if eos_id is not None:
                done |= nxt == eos_id
                if bool(done.all()):
                    break
        # tokens stay on the tensor during the loop; lists once at the end, each cut at its first EOS
        # (a finished row only ever gets EOS again, so everything from the first one on is dropped)
        rows = new_tokens.tolist()
        if eos_id is None:
            return rows
        return [r[:r.index(eos_id)] if eos_id in r else r for r in rows]


def sample(logits, temperature=0.0, top_k=None, generator=None):
    """logits (B, V) -> next ids (B,). temperature 0 = greedy (argmax)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.size(-1):  # 0 (or None) = no cut
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


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
            # "early convolutions help transformers see" (Xiao et al. 2021): log2(patch) stride-2 3x3
            # convs reach the same patch grid, but see local edges first; far more sample-efficient
            # than a linear patchify when the ViT learns from a few thousand images. A norm between
            # the convs matters as much as the convs: without it a shape classifier on this stem
            # reaches 44% after 300 steps, with GroupNorm 89% (BatchNorm does as well, but its batch
            # statistics differ between training and generation and across DDP ranks).
            n = int(math.log2(cfg.patch_size))
            assert 2 ** n == cfg.patch_size, "conv_stem needs a power-of-two patch_size"
            layers, ch = [], 3
            for i in range(n):
                out = cfg.d_model // 2 ** (n - 1 - i)  # widen towards d_model
                layers.append(nn.Conv2d(ch, out, 3, stride=2, padding=1))
                if i < n - 1:
                    layers += [nn.GroupNorm(math.gcd(32, out), out), nn.GELU()]
                ch = out
            self.patch = nn.Sequential(*layers)  # default (Kaiming) init: right for conv + GELU
        else:
            # a strided conv is exactly "cut into patches, flatten, linear layer"
            self.patch = nn.Conv2d(3, cfg.d_model, kernel_size=cfg.patch_size, stride=cfg.patch_size)
            nn.init.normal_(self.patch.weight, std=0.02)
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

    def flops_per_image(self):
        T = self.grid * self.grid
        n = sum(p.numel() for p in self.blocks.parameters())
        flops = T * (6 * n + 12 * self.cfg.n_layer * self.cfg.d_model * T)
        side = self.cfg.image_size
        for m in self.patch.modules() if isinstance(self.patch, nn.Sequential) else [self.patch]:
            if isinstance(m, nn.Conv2d):  # 6 x weights x output positions
                side //= m.stride[0]
                flops += 6 * m.weight.numel() * side * side
        return flops


class Projector(nn.Module):
    """Merge each merge x merge group of patches (concatenate their features, as in pixel-shuffle
    projectors) and map to the decoder width with a 2-layer MLP. Fewer image tokens = cheaper decoder."""

    def __init__(self, vit_cfg: ViTConfig, d_out):
        super().__init__()
        self.m = vit_cfg.merge
        self.grid = vit_cfg.image_size // vit_cfg.patch_size
        assert self.grid % self.m == 0, "patch grid must be divisible by merge"
        d_in = vit_cfg.d_model * self.m * self.m
        self.fc1 = Linear(d_in, d_out)
        self.fc2 = Linear(d_out, d_out)
        nn.init.normal_(self.fc1.weight, std=0.02)
        nn.init.normal_(self.fc2.weight, std=0.02)
        nn.init.zeros_(self.fc1.bias)
        nn.init.zeros_(self.fc2.bias)

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

    def flops_per_sample(self, text_len):
        """Training FLOPs for one image + text_len tokens (ViT + projector + decoder)."""
        P = self.projector.num_tokens()
        proj = 6 * P * sum(p.numel() for p in self.projector.parameters())
        head = 6 * self.decoder.cfg.d_model * self.decoder.cfg.vocab_size  # image positions get no logits
        return (self.vit.flops_per_image() + proj + (P + text_len) * self.decoder.flops_per_token(P + text_len)
                - P * head)


# -----------------------------------------------------------------------------
# Checkpoint helpers: a checkpoint stores plain dicts, so rebuild the model from them

def build_model(ckpt, load=True):
    """Rebuild a Decoder or VLM from a checkpoint dict (as loaded with weights_only=True); load=False
    leaves the fresh weights (e.g. to build on the meta device and only compare parameter names)."""
    dec_cfg = DecoderConfig(**ckpt["decoder_config"])
    if ckpt.get("vit_config"):
        model = VLM(dec_cfg, ViTConfig(**ckpt["vit_config"]))
    else:
        model = Decoder(dec_cfg)
    if load:
        model.load_state_dict(ckpt["model"])
    return model


def config_dicts(model):
    """(decoder_config, vit_config or None) as plain dicts for saving."""
    if isinstance(model, VLM):
        return asdict(model.decoder.cfg), asdict(model.vit.cfg)
    return asdict(model.cfg), None
