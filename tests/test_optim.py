"""Muon (phase 2's optimizer for the linear layers' matrices) and how make_optimizer splits a model."""
import pytest
import torch

from common import Muon, Optimizers, make_optimizer, orthogonalize, resume_training, rng_state
from model import VLM, DecoderConfig, ViTConfig


def svdvals(x):
    return torch.linalg.svdvals(x.double())


@pytest.mark.parametrize("shape", [(48, 48), (40, 96), (96, 40)])
def test_orthogonalize_pushes_every_singular_value_near_one(shape):
    torch.manual_seed(0)
    # a badly conditioned input: singular values spread over 2 orders of magnitude
    u, _, v = torch.linalg.svd(torch.randn(*shape), full_matrices=False)
    s = torch.logspace(0, -2, min(shape))
    g = 1e-3 * u @ torch.diag(s) @ v
    o = orthogonalize(g)
    assert o.shape == g.shape and o.dtype == g.dtype
    sv = svdvals(o)
    # the quintic iteration trades exactness for speed: singular values land in about [0.7, 1.2]
    assert sv.min() > 0.5 and sv.max() < 1.5, sv
    # the same singular vectors as the input: U^T O V^T is diagonal
    d = u.double().T @ o.double() @ v.double().T
    assert (d - torch.diag(d.diagonal())).abs().max() < 1e-3


def test_orthogonalize_is_batched_and_keeps_zero_at_zero():
    torch.manual_seed(0)
    g = torch.randn(3, 16, 24)
    batched = orthogonalize(g)
    for i in range(3):
        assert torch.allclose(batched[i], orthogonalize(g[i]), atol=1e-5)
    assert torch.equal(orthogonalize(torch.zeros(8, 8)), torch.zeros(8, 8))  # no 0/0


def tiny_vlm():
    torch.manual_seed(0)
    return VLM(DecoderConfig(vocab_size=64, n_layer=2, n_head=2, d_model=32, max_seq_len=64),
               ViTConfig(image_size=16, patch_size=4, n_layer=1, n_head=2, d_model=32, merge=2))


def test_make_optimizer_gives_linear_matrices_to_muon_and_the_rest_to_adamw():
    model = tiny_vlm()
    for p in model.vit.blocks[0].norm1.parameters():
        p.requires_grad_(False)  # frozen parameters go nowhere
    groups = [(list(model.vit.named_parameters()) + list(model.projector.named_parameters()), 1e-3),
              (model.decoder.named_parameters(), 2e-4)]
    opt = make_optimizer(groups, 0.1, (0.9, 0.95), "cpu", muon_scale=4.0)
    assert isinstance(opt, Optimizers) and set(opt.optimizers) == {"adamw", "muon"}
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(g["params"][0])]: g for g in opt.optimizers["muon"].param_groups}
    adamw = [names[id(p)] for g in opt.optimizers["adamw"].param_groups for p in g["params"]]
    # every trainable parameter exactly once
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert sorted(list(muon) + adamw) == trainable and "vit.blocks.0.norm1.weight" not in trainable
    # Muon: the 2-D weights of linear layers, with the fused matrices split into what they hold
    assert set(muon) == {n for n, p in model.named_parameters() if p.dim() == 2 and "tok_emb" not in n}
    assert muon["decoder.blocks.0.attn.qkv.weight"]["parts"] == 3
    assert muon["vit.blocks.0.mlp.gate_up.weight"]["parts"] == 2
    assert muon["projector.fc1.weight"]["parts"] == muon["decoder.blocks.1.attn.proj.weight"]["parts"] == 1
    # each part keeps its own LR, times the scale
    assert muon["vit.blocks.0.attn.qkv.weight"]["lr"] == pytest.approx(4e-3)
    assert muon["decoder.blocks.0.mlp.down.weight"]["base_lr"] == pytest.approx(8e-4)
    # AdamW keeps the (tied) embedding, the conv stem, norms and biases
    assert "decoder.tok_emb.weight" in adamw and any(n.startswith("vit.patch.") for n in adamw)
    # an untied output head, like the token embedding, stays with AdamW
    untied = VLM(DecoderConfig(vocab_size=64, n_layer=1, n_head=2, d_model=32, tie_embeddings=False), ViTConfig())
    opt = make_optimizer([(untied.named_parameters(), 1e-3)], 0.1, (0.9, 0.95), "cpu", muon_scale=4.0)
    in_muon = {id(g["params"][0]) for g in opt.optimizers["muon"].param_groups}
    assert id(untied.decoder.head.weight) not in in_muon and id(untied.decoder.tok_emb.weight) not in in_muon
    assert id(untied.decoder.blocks[0].mlp.down.weight) in in_muon
    # muon_scale 0 is the plain AdamW of phases 1, 3 and 4
    assert isinstance(make_optimizer([(model.named_parameters(), 1e-3)], 0.1, (0.9, 0.95), "cpu"), torch.optim.AdamW)


def test_a_muon_step_orthogonalises_each_part_of_a_fused_matrix():
    """The update of a q|k|v weight is three orthogonalised blocks, scaled to AdamW's RMS
    (0.2 sqrt(max dim)). The gradient's blocks differ 100-fold in scale: orthogonalising the fused
    (3d, d) matrix as one would give the largest block nearly all of the update."""
    torch.manual_seed(0)
    d, lr = 32, 0.01
    w = torch.nn.Parameter(torch.randn(3 * d, d))
    w0 = w.detach().clone()
    opt = Muon([{"params": [w], "parts": 3, "lr": lr, "weight_decay": 0.0}])
    w.grad = torch.randn(3 * d, d) * torch.tensor([1.0, 10.0, 0.1]).repeat_interleave(d)[:, None]
    opt.step()
    step = (w0 - w.detach()) / (lr * 0.2 * d ** 0.5)
    for block in step.chunk(3):
        sv = svdvals(block)
        assert sv.min() > 0.5 and sv.max() < 1.5, sv


def test_muon_weight_decay_and_resume():
    """Decoupled weight decay (zero gradient: only the decay acts); --resume restores Muon's momentum
    and AdamW's moments but keeps this run's LRs."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 8)
    w0 = lin.weight.detach().clone()
    opt = make_optimizer([(lin.named_parameters(), 1e-2)], 0.5, (0.9, 0.95), "cpu", muon_scale=2.0)
    lin.weight.grad, lin.bias.grad = torch.zeros(8, 8), torch.zeros(8)
    opt.step()
    assert torch.allclose(lin.weight.detach(), w0 * (1 - 2e-2 * 0.5))

    lin(torch.randn(4, 8)).sum().backward()
    opt.step()
    ckpt = {"optimizer": opt.state_dict(), "rng": rng_state({})}
    new = make_optimizer([(lin.named_parameters(), 1e-3)], 0.5, (0.9, 0.95), "cpu", muon_scale=2.0)
    resume_training(ckpt, new, {}, "last.pt")
    assert sorted(g["lr"] for g in new.param_groups) == pytest.approx([1e-3, 2e-3])
    assert torch.equal(new.optimizers["muon"].state[lin.weight]["momentum_buffer"],
                       opt.optimizers["muon"].state[lin.weight]["momentum_buffer"])
    assert torch.equal(new.optimizers["adamw"].state[lin.bias]["exp_avg"], opt.optimizers["adamw"].state[lin.bias]["exp_avg"])
    adamw_only = make_optimizer([(lin.named_parameters(), 1e-3)], 0.5, (0.9, 0.95), "cpu")
    with pytest.raises(ValueError):
        new.load_state_dict(adamw_only.state_dict())
