"""fast_cpu.py, the opt-in CPU speed path: each swapped module computes what model.py's plain one does
(to float rounding), keeps every parameter and checkpoint key, and can be switched back."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import fast_cpu  # noqa: E402
from model import Decoder, DecoderConfig, ViTConfig, VLM  # noqa: E402


def tiny_cfg(**kw):
    base = dict(vocab_size=64, n_layer=2, n_head=2, d_model=32, max_seq_len=64)
    base.update(kw)
    return DecoderConfig(**base)


def test_convert_keeps_parameters_and_numbers_and_reverts():
    """A converted VLM holds the very same parameters and state-dict keys, gives the plain model's loss
    and gradients to float rounding, generates the same greedy tokens, and revert() brings model.py back."""
    torch.manual_seed(0)
    m = VLM(tiny_cfg(), ViTConfig(image_size=16, patch_size=4, n_layer=1, n_head=2, d_model=32, merge=2))
    params, keys = list(m.parameters()), list(m.state_dict())
    imgs = torch.randint(0, 256, (40, 16, 16, 3), dtype=torch.uint8)  # 40 x 20 rows: the oneDNN path
    x = torch.randint(0, 64, (40, 20))
    y = x.roll(-1, 1)
    y[:, :4] = -1
    _, ref = m(imgs, x, y)
    ref_grads = torch.autograd.grad(ref, params)
    ref_gen = m.generate(imgs[:8], [[1]] * 8, 10)
    fast_cpu.convert(m)
    assert type(m.decoder) is fast_cpu.Decoder and type(m.decoder.blocks[0].attn) is fast_cpu.Attention
    assert type(m.vit.blocks[0].mlp.down) is fast_cpu.Linear
    assert list(m.parameters()) == params and list(m.state_dict()) == keys
    _, loss = m(imgs, x, y)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(torch.autograd.grad(loss, params), ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert m.generate(imgs[:8], [[1]] * 8, 10) == ref_gen
    fast_cpu.revert(m)
    assert type(m.decoder) is Decoder and all(type(l) is torch.nn.Linear for l in m.modules() if isinstance(l, torch.nn.Linear))


def test_single_query_attention_matches_sdpa():
    """A decoding step (one query per row, padding mask) takes fast_cpu's two matmuls: SDPA's numbers."""
    torch.manual_seed(0)
    attn = fast_cpu.convert(Decoder(tiny_cfg())).blocks[0].attn
    q, k, v = torch.randn(3, 2, 1, 16), torch.randn(3, 2, 9, 16), torch.randn(3, 2, 9, 16)
    mask = torch.rand(3, 1, 1, 9) > 0.3
    mask[..., -1] = True  # every row sees at least itself
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(attn.attend(q, k, v, mask, False), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bias", [False, True])
def test_onednn_linear_matches_f_linear_forward_and_backward(bias):
    """fast_cpu.Linear sends fp32 CPU matmuls to oneDNN through its own autograd function: output and all
    three gradients must be nn.Linear's (up to float rounding), for 3-D inputs as the model uses them."""
    if not fast_cpu.ONEDNN:
        pytest.skip("this torch build has no oneDNN: fast_cpu.Linear is plain F.linear")
    torch.manual_seed(0)
    lin = fast_cpu.convert(torch.nn.Linear(48, 80, bias=bias))
    x = torch.randn(11, 7, 48, requires_grad=True)  # 77 rows: enough for the oneDNN path (>= 64)
    g = torch.randn(11, 7, 80)
    y = lin(x)
    grads = torch.autograd.grad(y, [x] + list(lin.parameters()), g)
    x_ref = x.detach().clone().requires_grad_()
    params_ref = [p.detach().clone().requires_grad_() for p in lin.parameters()]
    y_ref = torch.nn.functional.linear(x_ref, *params_ref)
    grads_ref = torch.autograd.grad(y_ref, [x_ref] + params_ref, g)
    assert y.shape == (11, 7, 80)
    # y = view(oneDNN(x2d)): the node under the view tells which path ran
    assert "OneDNN" in type(y.grad_fn.next_functions[0][0]).__name__
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # inference takes the op directly, same numbers
        torch.testing.assert_close(lin(x), y_ref, rtol=1e-5, atol=1e-5)
    # a strided slice as the model's head sees it (x[:, -1:]), with the weights frozen: only x's gradient
    for p in lin.parameters():
        p.requires_grad_(False)
    xs = torch.randn(64, 7, 48, requires_grad=True)
    assert "OneDNN" in type(lin(xs[:, -1:]).grad_fn.next_functions[0][0]).__name__
    (gs,) = torch.autograd.grad(lin(xs[:, -1:]).sum(), xs)
    (gs_ref,) = torch.autograd.grad(torch.nn.functional.linear(xs[:, -1:], *params_ref).sum(), xs)
    torch.testing.assert_close(gs, gs_ref, rtol=1e-5, atol=1e-5)
    # the oneDNN op has no derivative of its own: a double backward must fail loudly, not return zeros
    (gx,) = torch.autograd.grad(lin(xs).square().sum(), xs, create_graph=True)
    with pytest.raises(RuntimeError):
        gx.sum().backward()
    # a few rows (batch-1 decoding) stay on F.linear: oneDNN's fixed cost per call would dominate
    assert "OneDNN" not in type(lin(torch.randn(2, 5, 48, requires_grad=True)).grad_fn.next_functions[0][0]).__name__


@pytest.mark.parametrize("tie", [True, False])
def test_chunked_head_loss_matches_cross_entropy(tie):
    """CPU training computes the LM head + loss in chunks of rows with the gradient formed in forward
    (fast_cpu._ChunkedHeadLoss): loss and every gradient must be F.cross_entropy's over all the logits, with
    rows carrying no target (-1) and a last chunk shorter than the others; under no_grad the plain path
    gives the same loss; with the embedding and head frozen only the other gradients are made; with no
    target at all the loss is nan and the gradients zero, as F.cross_entropy's."""
    torch.manual_seed(0)
    m = fast_cpu.convert(Decoder(tiny_cfg(vocab_size=8192, tie_embeddings=tie)))  # vocab 8192: 256-row chunks
    x = torch.randint(0, 8192, (10, 60))  # 600 rows: chunks of 256, 256, 88
    y = torch.randint(0, 8192, (10, 60))
    y[0, :30] = -1
    y[3, 40:] = -1
    params = [p for p in m.parameters() if p.requires_grad]
    _, loss = m(x, y)
    assert "ChunkedHeadLoss" in type(loss.grad_fn).__name__
    grads = torch.autograd.grad(loss, params)
    ref = torch.nn.functional.cross_entropy(m.all_logits(x).view(-1, 8192), y.view(-1), ignore_index=-1)
    grads_ref = torch.autograd.grad(ref, params, retain_graph=True)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    with torch.no_grad():
        torch.testing.assert_close(m(x, y)[1], ref, rtol=1e-5, atol=1e-6)
    m.tok_emb.weight.requires_grad_(False)
    m.head.weight.requires_grad_(False)
    params = [p for p in m.parameters() if p.requires_grad]
    grads = torch.autograd.grad(m(x, y)[1], params)
    for a, b in zip(grads, torch.autograd.grad(ref, params)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    none = torch.full_like(y, -1)
    _, loss = m(x, none)
    ref = torch.nn.functional.cross_entropy(m.all_logits(x).view(-1, 8192), none.view(-1), ignore_index=-1)
    assert "ChunkedHeadLoss" in type(loss.grad_fn).__name__ and loss.isnan() and ref.isnan()
    for a, b in zip(torch.autograd.grad(loss, params), torch.autograd.grad(ref, params)):
        assert not a.isnan().any()
        torch.testing.assert_close(a, b)


