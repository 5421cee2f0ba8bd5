"""
Benchmark: training throughput (tokens/s, images/s, MFU), generation speed with and without the
KV cache, and peak memory, for one named model shape. When the `transformers` package happens to be
installed, a Hugging Face LlamaForCausalLM of the identical shape (holding the very same weights) is
trained and asked to generate in the same process, interleaved with ours, and the ratios are printed.

  python bench.py --device cpu --config cpu            # docs/SPEED.md's numbers (2-core CPU, fp32)
  python bench.py --device cuda --config gpu --compile # ~91M params, bf16 autocast, on a GPU
  python bench.py --config vlm                         # ViT + projector + decoder training step
  python bench.py --config tiny --steps 2 --skip_hf --json out.json   # seconds; used by the tests
"""
import argparse
import json
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import common
from common import UserError, check_range, cli, cpu_matmul_peak, make_optimizer, peak_flops, setup
from model import VLM, Decoder, DecoderConfig, ViTConfig, swiglu_hidden

# Named shapes. batch/seq_len are the training batch; gen_batches are the generation batch sizes.
CONFIGS = {
    "tiny": dict(d_model=64, n_layer=2, n_head=4, vocab_size=256, seq_len=32, batch=4, steps=3,
                 warmup=1, gen_batches=(1, 4), prompt_len=8, gen_tokens=8, gen_reps=1),
    "cpu": dict(d_model=256, n_layer=6, n_head=8, vocab_size=4096, seq_len=128, batch=32, steps=12,
                warmup=2, gen_batches=(1, 64), prompt_len=16, gen_tokens=32, gen_reps=3),
    "gpu": dict(d_model=768, n_layer=12, n_head=12, vocab_size=8192, seq_len=1024, batch=32, steps=30,
                warmup=5, gen_batches=(1, 64), prompt_len=16, gen_tokens=32, gen_reps=3),
    # the built-in world's phase 1 decoder, and its phase 2 VLM (phase 2's batch of 32 captions)
    "world": dict(d_model=192, n_layer=4, n_head=4, vocab_size=512, seq_len=128, batch=32, steps=12,
                  warmup=2, gen_batches=(1, 250), prompt_len=1, gen_tokens=32, gen_reps=3),
    "world_vlm": dict(d_model=192, n_layer=4, n_head=4, vocab_size=512, seq_len=24, batch=32, steps=12,
                      warmup=2, gen_batches=(250,), prompt_len=1, gen_tokens=32, gen_reps=3,
                      vit=dict(image_size=32, patch_size=4, n_layer=3, n_head=4, d_model=128, merge=2)),
    # VLM training step: 32x32 images, 4x4 patches merged 2x2 -> 16 image tokens, 20-token captions
    "vlm": dict(d_model=256, n_layer=6, n_head=8, vocab_size=4096, seq_len=20, batch=32, steps=12,
                warmup=2, gen_batches=(1, 64), prompt_len=1, gen_tokens=20, gen_reps=3,
                vit=dict(image_size=32, patch_size=4, n_layer=3, n_head=4, d_model=128, merge=2)),
}
LR, BETAS, WEIGHT_DECAY = 3e-4, (0.9, 0.95), 0.1  # identical for ours and HF


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--config", default="cpu", choices=sorted(CONFIGS), help="named model shape")
    p.add_argument("--compile", action="store_true", help="torch.compile both models (CUDA)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps per model")
    p.add_argument("--warmup", type=int, default=None, help="untimed training steps per model first")
    p.add_argument("--gen_tokens", type=int, default=None, help="new tokens per generation")
    p.add_argument("--gen_batch", type=int, nargs="+", default=None, help="generation batch sizes")
    p.add_argument("--batch", type=int, default=None, help="training batch size")
    p.add_argument("--seq_len", type=int, default=None, help="training sequence length (caption length for vlm)")
    p.add_argument("--skip_hf", action="store_true", help="do not compare with transformers' Llama")
    p.add_argument("--skip_gen", action="store_true", help="training only")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    cfg = dict(CONFIGS[args.config])
    for k in ("steps", "warmup", "gen_tokens", "batch", "seq_len"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    if args.gen_batch is not None:
        cfg["gen_batches"] = tuple(args.gen_batch)
    check_range("steps", cfg["steps"], lo=1)
    check_range("warmup", cfg["warmup"], lo=0)
    check_range("gen_tokens", cfg["gen_tokens"], lo=1)
    check_range("batch", cfg["batch"], lo=1)
    check_range("seq_len", cfg["seq_len"], lo=2)
    for b in cfg["gen_batches"]:
        check_range("gen_batch", b, lo=1)
    return args, cfg


# -----------------------------------------------------------------------------
# Models

def decoder_config(cfg):
    img_tokens = 0
    if "vit" in cfg:
        v = cfg["vit"]
        img_tokens = (v["image_size"] // v["patch_size"] // v["merge"]) ** 2
    need = max(cfg["seq_len"] + img_tokens, img_tokens + cfg["prompt_len"] + cfg["gen_tokens"])
    return DecoderConfig(vocab_size=cfg["vocab_size"], n_layer=cfg["n_layer"], n_head=cfg["n_head"],
                         d_model=cfg["d_model"], max_seq_len=need)


def hf_available():
    try:
        import transformers  # noqa: F401
        return True
    except Exception:  # not installed, or installed but broken: either way no comparison
        return False


def build_hf_llama(ours: Decoder):
    """A transformers LlamaForCausalLM of exactly our shape, holding a copy of our weights, so both
    models do the same arithmetic on the same numbers (checked by comparing logits)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    c = ours.cfg
    hf_cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.d_model,
                         intermediate_size=swiglu_hidden(c.d_model), num_hidden_layers=c.n_layer,
                         num_attention_heads=c.n_head, num_key_value_heads=c.n_head,
                         max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps,
                         tie_word_embeddings=c.tie_embeddings, rope_theta=c.rope_theta,
                         attention_bias=False, mlp_bias=False, hidden_act="silu",
                         attn_implementation="sdpa", bos_token_id=None, eos_token_id=None, pad_token_id=0)
    hf = LlamaForCausalLM(hf_cfg)
    D, Hf = c.d_model, swiglu_hidden(c.d_model)
    with torch.no_grad():
        hf.model.embed_tokens.weight.copy_(ours.tok_emb.weight)
        for blk, layer in zip(ours.blocks, hf.model.layers):
            q, k, v = blk.attn.qkv.weight.split(D, dim=0)
            layer.self_attn.q_proj.weight.copy_(q)
            layer.self_attn.k_proj.weight.copy_(k)
            layer.self_attn.v_proj.weight.copy_(v)
            layer.self_attn.o_proj.weight.copy_(blk.attn.proj.weight)
            gate, up = blk.mlp.gate_up.weight.split(Hf, dim=0)
            layer.mlp.gate_proj.weight.copy_(gate)
            layer.mlp.up_proj.weight.copy_(up)
            layer.mlp.down_proj.weight.copy_(blk.mlp.down.weight)
            layer.input_layernorm.weight.copy_(blk.norm1.weight)
            layer.post_attention_layernorm.weight.copy_(blk.norm2.weight)
        hf.model.norm.weight.copy_(ours.norm.weight)
        if not c.tie_embeddings:
            hf.lm_head.weight.copy_(ours.head.weight)
    return hf


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# -----------------------------------------------------------------------------
# Timing helpers

def sync(run):
    if run.device_type == "cuda":
        torch.cuda.synchronize()


def timed(fn, run):
    sync(run)
    t0 = time.perf_counter()
    out = fn()
    sync(run)
    return time.perf_counter() - t0, out


def max_rss_mib():
    """Peak resident set size of this process so far (Linux reports KiB, macOS bytes)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


class Trainer:
    """One model's forward + backward + AdamW step on a fixed random batch."""

    def __init__(self, name, model, loss_fn, run, compile):
        self.name = name
        self.model = model.train()
        self.loss_fn = torch.compile(loss_fn) if compile else loss_fn
        self.opt = make_optimizer([(model.named_parameters(), LR)], WEIGHT_DECAY, BETAS, run.device_type)
        self.run = run
        self.times = []
        self.last_loss = None

    def step(self):
        with self.run.autocast:
            loss = self.loss_fn()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss

    def timed_steps(self, n, record=True):
        for _ in range(n):
            dt, loss = timed(self.step, self.run)
            if record:
                self.times.append(dt)
        self.last_loss = float(loss.detach())


def interleave(trainers, steps):
    """Alternate single timed steps in ABBA order (A B B A A B ...) so slow drifts of a shared machine
    (other processes, thermals) hit every model alike; the models were warmed up before."""
    for i in range(steps):
        for tr in (trainers if i % 2 == 0 else trainers[::-1]):
            tr.timed_steps(1)


def warmup(trainer, n, run):
    """Untimed steps (allocator, autotuning, compilation). Returns the peak CUDA memory they took."""
    if run.device_type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.timed_steps(max(n, 1), record=False)
    return torch.cuda.max_memory_allocated() / 2**20 if run.device_type == "cuda" else None


def measure_cpu_peak():
    """common.cpu_matmul_peak measures once and caches; on a shared machine one 0.5 s sample can land
    in a busy moment, so sample again (dropping the cache) and keep the best: the peak is a maximum."""
    common._cpu_peak = None
    return cpu_matmul_peak()


# -----------------------------------------------------------------------------
# The benchmark

def bench(args, cfg, run):
    torch.manual_seed(args.seed)
    dev = run.device
    is_vlm = "vit" in cfg
    B, T, V = cfg["batch"], cfg["seq_len"], cfg["vocab_size"]
    dcfg = decoder_config(cfg)
    if is_vlm:
        vlm = VLM(dcfg, ViTConfig(**cfg["vit"])).to(dev)
        ours = vlm.decoder
    else:
        vlm = None
        ours = Decoder(dcfg).to(dev)
    top = vlm if is_vlm else ours
    peak = peak_flops(run)
    peak_label = ("GPU bf16 data-sheet peak" if run.device_type == "cuda"
                  else "measured fp32 1024^3 matmul peak of this CPU (common.cpu_matmul_peak)")
    res = {"config": args.config, "device": run.device, "device_name": device_name(run),
           "threads": torch.get_num_threads(), "torch": torch.__version__,
           "dtype": "bf16 autocast" if run.device_type == "cuda" else "fp32", "compile": args.compile,
           "batch": B, "seq_len": T, "warmup": max(cfg["warmup"], 1), "params": n_params(top), "peak_flops": peak, "peak_label": peak_label}

    # fixed random training batch (the data loader is not what is measured)
    g = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, V, (B, T + 1), generator=g)
    x, y = tokens[:, :-1].contiguous().to(dev), tokens[:, 1:].contiguous().to(dev)
    if is_vlm:
        s = cfg["vit"]["image_size"]
        images = torch.randint(0, 256, (B, s, s, 3), dtype=torch.uint8, generator=g).to(dev)
        model_c = torch.compile(vlm) if args.compile else vlm
        trainers = [Trainer("ours", vlm, lambda: model_c(images, x, y)[1], run, False)]
        flops_step = B * common.flops_per_sample(vlm, T)
        res["images"] = f"{s}x{s}, {vlm.projector.num_tokens()} image tokens + {T} caption tokens"
    else:
        model_c = torch.compile(ours) if args.compile else ours
        trainers = [Trainer("ours", ours, lambda: model_c(x, y)[1], run, False)]
        flops_step = B * T * common.flops_per_token(ours, T)

    hf = None
    want_hf = not args.skip_hf and not is_vlm
    if want_hf and not hf_available():
        res["hf"] = "skipped: transformers is not installed"
        want_hf = False
    elif args.skip_hf:
        res["hf"] = "skipped: --skip_hf"
    elif is_vlm:
        res["hf"] = "skipped: no HF equivalent of the VLM step"

    if want_hf:
        import transformers
        hf = build_hf_llama(ours).to(dev)
        res["hf_version"] = transformers.__version__
        res["hf_params"] = n_params(hf)
        res["params_equal"] = res["hf_params"] == res["params"]
        if not res["params_equal"]:
            raise UserError(f"HF Llama has {res['hf_params']:,} parameters but ours {res['params']:,}: shapes differ")
        res["logits_max_abs_diff"] = logits_diff(ours, hf, x[:2], run)
        hf_c = torch.compile(hf) if args.compile else hf

        def hf_loss():  # the very same loss as ours: mean next-token cross entropy in fp32
            logits = hf_c(input_ids=x, use_cache=False).logits
            return F.cross_entropy(logits.float().view(-1, V), y.view(-1))
        trainers.append(Trainer("hf", hf, hf_loss, run, False))

    # our peak memory first, before any HF step; HF holds a copy of our initial weights
    peaks = {"ours": warmup(trainers[0], cfg["warmup"], run)}
    if run.device_type == "cuda":
        res["peak_mem_mib"] = peaks["ours"]
        res["peak_mem_label"] = "torch.cuda.max_memory_allocated, training step"
    else:
        res["peak_mem_mib"] = max_rss_mib()
        res["peak_mem_label"] = "process max RSS (resource.getrusage) after our training warmup, before any HF step"

    for tr in trainers[1:]:
        peaks[tr.name] = warmup(tr, cfg["warmup"], run)

    interleave(trainers, cfg["steps"])
    if run.device_type == "cpu":  # best of the samples before and after training
        peak = res["peak_flops"] = max(peak, measure_cpu_peak())
    for tr in trainers:
        sec = statistics.median(tr.times)
        r = {"ms_step": 1000 * sec, "tok_s": B * T / sec, "mfu": flops_step / sec / peak if peak else None,
             "loss": tr.last_loss, "steps_timed": len(tr.times)}
        if is_vlm:
            r["img_s"] = B / sec
        if peaks.get(tr.name) is not None:
            r["peak_mem_mib"] = peaks[tr.name]
        res[f"train_{tr.name}"] = r
    if hf is not None:
        res["train_ratio"] = res["train_ours"]["tok_s"] / res["train_hf"]["tok_s"]
        # same weights, data, optimizer and step count: the losses agree (to fp rounding) or the
        # comparison is not like for like
        res["train_loss_diff"] = abs(res["train_ours"]["loss"] - res["train_hf"]["loss"])
    for tr in trainers:  # free optimizer state before generation
        tr.opt = None
    if not args.skip_gen:
        res["gen"] = bench_generation(cfg, ours, vlm, hf, run, args.seed)
    return res


def device_name(run):
    if run.device_type == "cuda":
        return torch.cuda.get_device_name(run.device)
    return f"CPU ({torch.get_num_threads()} torch threads)"


@torch.no_grad()
def logits_diff(ours, hf, idx, run):
    """Same weights, same input: the two models' logits must agree (fp32: ~1e-5; bf16: looser)."""
    ours.eval(), hf.eval()
    with run.autocast:
        a = ours.all_logits(idx).float()
        b = hf(input_ids=idx, use_cache=False).logits.float()
    ours.train(), hf.train()
    return float((a - b).abs().max())


@torch.no_grad()
def bench_generation(cfg, ours, vlm, hf, run, seed):
    """Greedy generation of exactly gen_tokens new tokens per row (no EOS) from prompt_len-token
    prompts, ours with and without the KV cache and HF generate, timed alternately; median of reps."""
    ours.eval()
    if hf is not None:
        hf.eval()
    n_new, P = cfg["gen_tokens"], cfg["prompt_len"]
    out = {"prompt_len": P, "new_tokens": n_new, "by_batch": {}}
    for Bg in cfg["gen_batches"]:
        g = torch.Generator().manual_seed(seed + Bg)
        prompts = torch.randint(0, cfg["vocab_size"], (Bg, P), generator=g)
        prompt_lists = prompts.tolist()
        images = None
        if vlm is not None:
            s = cfg["vit"]["image_size"]
            images = torch.randint(0, 256, (Bg, s, s, 3), dtype=torch.uint8, generator=g).to(run.device)

        def ours_gen(use_cache):
            with run.autocast:
                if vlm is not None:
                    return vlm.generate(images, prompt_lists, n_new, use_cache=use_cache)
                return ours.generate(prompt_lists, n_new, use_cache=use_cache)

        fns = {"cached": lambda: ours_gen(True), "uncached": lambda: ours_gen(False)}
        if hf is not None:
            ids = prompts.to(run.device)
            attn = torch.ones_like(ids)

            def hf_gen():
                with run.autocast:
                    return hf.generate(input_ids=ids, attention_mask=attn, max_new_tokens=n_new,
                                       min_new_tokens=n_new, do_sample=False, num_beams=1, use_cache=True,
                                       eos_token_id=None, pad_token_id=0)
            fns["hf"] = hf_gen
        times = {k: [] for k in fns}
        outputs = {}
        for k, fn in fns.items():  # warmup
            outputs[k] = fn()
        for rep in range(cfg["gen_reps"]):
            for k in (list(fns) if rep % 2 == 0 else list(fns)[::-1]):
                dt, outputs[k] = timed(fns[k], run)
                times[k].append(dt)
        r = {}
        for k in fns:
            sec = statistics.median(times[k])
            r[f"{k}_tok_s"] = Bg * n_new / sec
            r[f"{k}_ms"] = 1000 * sec
        # every row must really produce n_new tokens, or tokens/s would be a lie
        for k in ("cached", "uncached"):
            lens = {len(row) for row in outputs[k]}
            if lens != {n_new}:
                raise RuntimeError(f"our {k} generation made {lens} tokens per row, expected {n_new}")
        same = torch.tensor(outputs["cached"]) == torch.tensor(outputs["uncached"])
        r["cached_vs_uncached_match"] = float(same.float().mean())
        if hf is not None:
            hf_new = outputs["hf"][:, P:].cpu()
            if hf_new.shape != (Bg, n_new):
                raise RuntimeError(f"HF generated {tuple(hf_new.shape)} new tokens, expected {(Bg, n_new)}")
            r["ours_vs_hf_match"] = float((torch.tensor(outputs["cached"]) == hf_new).float().mean())
            r["ratio_cached_vs_hf"] = r["cached_tok_s"] / r["hf_tok_s"]
        out["by_batch"][str(Bg)] = r
    return out


def fmt_num(v, digits=0):
    return "-" if v is None else f"{v:,.{digits}f}"


def print_table(res):
    rows = []
    add = lambda k, v: rows.append((k, v))  # noqa: E731
    add("config", f"{res['config']}  (batch {res['batch']}, seq {res['seq_len']}, {res['dtype']}"
                  f"{', compiled' if res['compile'] else ''})")
    add("device", f"{res['device_name']}, torch {res['torch']}")
    add("params (ours)", f"{res['params']:,}")
    if "hf_params" in res:
        add("params (HF Llama)", f"{res['hf_params']:,}  equal: {res['params_equal']}  "
                                 f"(transformers {res['hf_version']})")
        add("logits max |ours - HF|", f"{res['logits_max_abs_diff']:.2e}  (same weights copied in)")
    elif "hf" in res:
        add("HF comparison", res["hf"])
    tr = res["train_ours"]
    add("train ours", f"{fmt_num(tr['tok_s'])} tok/s | {tr['ms_step']:.1f} ms/step"
                      + (f" | {tr['img_s']:,.1f} img/s" if "img_s" in tr else ""))
    if tr["mfu"] is not None:
        add("MFU ours", f"{100 * tr['mfu']:.1f}%  vs {res['peak_label']} = {res['peak_flops'] / 1e9:,.1f} GFLOP/s")
    if "train_hf" in res:
        h = res["train_hf"]
        add("train HF Llama", f"{fmt_num(h['tok_s'])} tok/s | {h['ms_step']:.1f} ms/step"
                              + (f" | MFU {100 * h['mfu']:.1f}%" if h["mfu"] is not None else ""))
        add("train ours / HF", f"{res['train_ratio']:.2f}x  (loss after {tr['steps_timed'] + res['warmup']} steps: "
                               f"ours {tr['loss']:.6f}, HF {h['loss']:.6f})")
    if "gen" in res:
        gen = res["gen"]
        for Bg, r in gen["by_batch"].items():
            s = (f"cached {fmt_num(r['cached_tok_s'])} | uncached {fmt_num(r['uncached_tok_s'])}")
            if "hf_tok_s" in r:
                s += f" | HF {fmt_num(r['hf_tok_s'])} | ours/HF {r['ratio_cached_vs_hf']:.2f}x"
            add(f"gen B={Bg} new tok/s", s)
            m = f"cached == uncached {100 * r['cached_vs_uncached_match']:.0f}%"
            if "ours_vs_hf_match" in r:
                m += f", ours == HF {100 * r['ours_vs_hf_match']:.0f}%"
            add(f"gen B={Bg} greedy tokens", m)
        add("gen setup", f"prompt {gen['prompt_len']} tokens, {gen['new_tokens']} new tokens, greedy, no EOS")
    mem = f"{res['peak_mem_mib']:,.0f} MiB  ({res['peak_mem_label']})"
    add("peak memory", mem)
    if "train_hf" in res and "peak_mem_mib" in res["train_hf"]:
        add("peak memory HF", f"{res['train_hf']['peak_mem_mib']:,.0f} MiB (training step)")
    w = max(len(k) for k, _ in rows)
    print("-" * (w + 60))
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    print("-" * (w + 60))


def main():
    args, cfg = parse_args()
    run = setup(args)
    if run.device_type == "cpu":
        cpu_matmul_peak()  # measure the CPU's peak before anything else loads the machine
    if args.compile and run.device_type != "cuda":
        print("note: --compile on CPU is allowed but rarely faster here", file=sys.stderr)
    res = bench(args, cfg, run)
    print_table(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    cli(main)
