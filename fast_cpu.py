"""
An opt-in CPU speed path for a model built by model.py: `fast_cpu.convert(model)` swaps the class of
some of its modules for a subclass that adds a faster fp32 CPU computation of the same thing. No
parameter, buffer or state-dict key changes, so checkpoints are the same either way; GPUs, other
dtypes, CPU autocast and torch.compile (which picks its own kernels) keep model.py's plain code.

What it swaps, and why each helps on CPU (docs/SPEED.md has every measurement):
  nn.Linear  -> Linear: x @ W.T on oneDNN's GEMM instead of MKL, forward and input gradient. A linear
                layer does three matmuls per training step: y = x W^T (forward), dx = dy W and
                dW = dy^T x (backward); oneDNN is faster for the first two at this model's shapes, MKL
                as fast for the third, which stays on torch.mm.
  Attention  -> Attention: a single query per row (a KV-cache decoding step) as two small batched
                matmuls; SDPA's CPU kernel is built for blocks of queries.
  Decoder    -> Decoder: the LM head and cross-entropy in chunks of rows, gradient formed in the
                forward (the "fused linear cross entropy" idea), never all (N, V) logits at once.
Each was measured, on the 2-core machine this project is developed on, against the plain path;
on another CPU, measure before trusting it (`python bench.py --device cpu`).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import model as plain


def onednn_linear(x, weight, bias=None):
    """x @ weight.T (+ bias) for a 2-D fp32 CPU x, on oneDNN's GEMM (a torch-internal op, no autograd)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _onednn_works():
    """oneDNN ships inside the standard CPU wheels, but its linear op is torch-internal: use it only if
    it is there and gives F.linear's numbers on a tiny case."""
    try:
        x, w, b = torch.randn(3, 4), torch.randn(5, 4), torch.randn(5)
        return torch.backends.mkldnn.is_available() and torch.allclose(onednn_linear(x, w, b), F.linear(x, w, b), atol=1e-5)
    except Exception:  # no such op, or a different signature in another torch version
        return False


ONEDNN = _onednn_works()


def eager_cpu_fp32(x, weight):
    """Where the fast paths apply: fp32 on the CPU, eager mode."""
    return (x.is_cpu and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


def use_onednn(x, weight):
    """Under 64 rows (e.g. decoding a few sequences) oneDNN's fixed cost per call outweighs its faster
    kernel, so small matmuls stay on MKL."""
    enough_rows = x.numel() >= 64 * x.size(-1) > 0
    return ONEDNN and torch.backends.mkldnn.enabled and enough_rows and eager_cpu_fp32(x, weight)


def cpu_linear(x, weight):
    """x @ weight.T for a 2-D x, on oneDNN where Linear would use it, else F.linear."""
    return onednn_linear(x, weight) if use_onednn(x, weight) else F.linear(x, weight)


class _OneDNNLinear(torch.autograd.Function):
    """y = x @ W.T (+ b) for 2-D fp32 CPU tensors; forward and input gradient through oneDNN."""

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


class Linear(nn.Linear):
    def forward(self, x):
        if not use_onednn(x, self.weight):
            return F.linear(x, self.weight, self.bias)
        x2 = x.reshape(-1, x.size(-1))  # (N, in)
        if torch.is_grad_enabled():
            y = _OneDNNLinear.apply(x2, self.weight, self.bias)  # (N, out)
        else:  # inference: the op itself, without autograd's bookkeeping
            y = onednn_linear(x2, self.weight, self.bias)
        return y.view(*x.shape[:-1], y.size(-1))


class Attention(plain.Attention):
    def attend(self, q, k, v, mask, causal):
        if q.size(2) == 1 and not causal and q.is_cpu:  # one new query per row: a decoding step
            att = (q @ k.transpose(-1, -2)) * q.size(-1) ** -0.5  # (B, H, 1, S)
            if mask is not None:  # bool, True = may attend (generate's padding mask)
                att = att.masked_fill(~mask, float("-inf"))
            return att.softmax(dim=-1) @ v  # (B, H, 1, hd)
        return super().attend(q, k, v, mask, causal)


class _ChunkedHeadLoss(torch.autograd.Function):
    """F.cross_entropy(x @ W.T, targets, ignore_index=-1) without all the (N, V) logits: a chunk of rows
    (~2M logits) at a time makes its logits, its loss and at once its gradient (softmax minus one-hot),
    so backward only rescales. Rows with target -1 skip the matmuls altogether."""

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
        chunk = max(64, 2 ** 21 // V)
        buf = x.new_empty(min(chunk, x.size(0)), V)
        total = x.new_zeros(())
        for i in range(0, x.size(0), chunk):
            xc, tc = x[i:i + chunk], targets[i:i + chunk]  # (c, D), (c,)
            logits = cpu_linear(xc, weight)  # (c, V)
            logp = torch.log_softmax(logits, dim=1, out=buf[:len(xc)])
            total -= logp.gather(1, tc[:, None]).sum()
            # d(sum of the chunk's losses)/d(logits) = softmax - one-hot, into the same buffer
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


class Decoder(plain.Decoder):
    def head_loss(self, x, targets):
        w = self.head.weight
        if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad) and eager_cpu_fp32(x, w):  # training
            return _ChunkedHeadLoss.apply(x.reshape(-1, x.size(-1)), w, targets.reshape(-1))
        return super().head_loss(x, targets)


SWAPS = {nn.Linear: Linear, plain.Attention: Attention, plain.Decoder: Decoder}


def convert(model):
    """Swap, in place, each module whose class is in SWAPS for its fast subclass (which adds no state)."""
    for m in model.modules():
        if type(m) in SWAPS:
            m.__class__ = SWAPS[type(m)]
    return model


def revert(model):
    """convert's inverse: model.py's plain code again."""
    back = {fast: base for base, fast in SWAPS.items()}
    for m in model.modules():
        if type(m) in back:
            m.__class__ = back[type(m)]
    return model
