"""
Plumbing shared by the four phase scripts, so each script can show only its training loop:
devices and DDP, the LR schedule, the optimizer, atomic checkpoints, resume state, Ctrl-C/SIGTERM,
throughput and MFU, and one-line errors for bad input.
"""
import errno
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from types import SimpleNamespace

import numpy as np
import torch
from tqdm import tqdm


class UserError(Exception):
    """A mistake the user can fix (bad path, bad value, missing checkpoint). Printed as one line."""


def cli(main):
    """Run main(); turn UserError into a one-line message and exit code 2, Ctrl-C into exit code 130 (no traceback)."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C outside training (world build, data loading, evaluation): no traceback
        print("interrupted", file=sys.stderr)
        sys.exit(130)


# -----------------------------------------------------------------------------
# Command line

def add_run_args(p, phase):
    """The flags every phase shares. Phase-specific knobs stay at the top of each script."""
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--out_dir", default="out", help="all phases read and write under this folder")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA)")
    p.add_argument("--resume", action="store_true", help=f"continue from {phase}/last.pt")
    p.add_argument("--restart", action="store_true",
                   help=f"start over although {phase}/ holds a run: it is first moved aside to {phase}.old-<time>")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def check_range(name, value, lo=None, hi=None, lo_open=False):
    """Out-of-range config values get a one-line error instead of a crash deep inside torch."""
    bad = (lo is not None and (value <= lo if lo_open else value < lo)) or (hi is not None and value > hi)
    if bad or (isinstance(value, float) and not math.isfinite(value)):
        lo_s = "" if lo is None else (f"> {lo}" if lo_open else f">= {lo}")
        hi_s = "" if hi is None else f"<= {hi}"
        raise UserError(f"--{name}={value} is out of range: it must be {' and '.join(s for s in (lo_s, hi_s) if s)}")


def check_args(args, limits):
    """Check every flag against a table {name: (low, high)}: None = no bound; a low bound written as
    ("above", x) excludes x itself. One line per bad value instead of a crash deep inside torch."""
    for name, (lo, hi) in limits.items():
        lo_open = isinstance(lo, tuple)
        check_range(name, getattr(args, name), lo[1] if lo_open else lo, hi, lo_open)


# -----------------------------------------------------------------------------
# Device, precision, distributed

def setup(args):
    """Pick the device, seed everything, set up DDP when launched by torchrun.
    Returns a namespace: device, device_type, ddp, rank, world_size, master, autocast."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, world, local = 0, 1, 0
    if ddp:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", 0))
    dev = args.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {args.device} was asked for but CUDA is not available here; use --device cpu")
        if ddp:
            dev = f"cuda:{local}"
        elif dev == "cuda":
            dev = "cuda:0"  # set_device needs an index
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for any fp32 matmul left outside autocast
        torch.backends.cudnn.allow_tf32 = True
    elif dev == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps was asked for but MPS is not available here; use --device cpu")
    elif dev not in ("cpu", "mps"):
        raise UserError(f"unknown --device {args.device!r}: use cpu, cuda, cuda:N or mps")
    if ddp:
        import torch.distributed as dist
        dist.init_process_group(backend="nccl" if dev.startswith("cuda") else "gloo")
    device_type = "cuda" if dev.startswith("cuda") else dev
    seed_everything(args.seed)
    # bf16 autocast on GPU only: many CPUs have no fast bf16 matmul (docs/SPEED.md)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device_type == "cuda" else nullcontext()
    return SimpleNamespace(device=dev, device_type=device_type, ddp=ddp, rank=rank, world_size=world,
                           master=rank == 0, autocast=autocast)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def wrap_model(model, run, compile=False):
    """Optionally compile, then wrap in DDP. Always keep `model` (unwrapped) for saving."""
    m = model
    if compile:
        m = torch.compile(m)
    if run.ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [torch.device(run.device).index] if run.device_type == "cuda" else None
        # no buffer changes in training (RoPE tables, ViT positions are rebuilt from the config), so
        # nothing to re-send from rank 0 before every forward
        m = DDP(m, device_ids=ids, broadcast_buffers=False)
    return m


def all_reduce_mean(x, run):
    """Average a float over ranks (for logging/eval)."""
    if not run.ddp:
        return x
    import torch.distributed as dist
    t = torch.tensor([x], dtype=torch.float64, device=run.device)
    dist.all_reduce(t)
    return t.item() / run.world_size


def show_progress(args=None):
    """Progress bars only on a terminal (in a log file they are ~80 bytes per step), and never with --quiet."""
    return sys.stderr.isatty() and not getattr(args, "quiet", False)


def ensure_world(world_dir, run):
    """The built-in world in world_dir, built first if it is missing. Under torchrun rank 0 builds it while
    the other ranks wait: ranks building at once would rewrite files another rank is already reading."""
    from data.world import ensure_built
    if run.master:
        ensure_built(world_dir, progress=show_progress(getattr(run, "args", None)))
    if run.ddp:
        import torch.distributed as dist
        dist.barrier()
    return ensure_built(world_dir)  # there by now: this only reads its meta.json


def cleanup(run):
    """The run is over: the out dir is free for the next one (also in-process, e.g. under pytest)."""
    if getattr(run, "lock", None) is not None:
        run.lock.release()
    if run.ddp:
        import torch.distributed as dist
        dist.destroy_process_group()


def to_device(run, *tensors):
    """The one way a batch reaches the device: pinned, non-blocking host->GPU copies; a plain move elsewhere."""
    if run.device_type == "cuda":
        return [t.pin_memory().to(run.device, non_blocking=True) for t in tensors]
    return [t.to(run.device) for t in tensors]


def token_weighted(loss, n_tokens, run):
    """Under DDP, a rank's mean loss weighed by its share of the global batch's target tokens: ranks whose rows
    differ in length (captions, answers) then average, through DDP, to the mean over every token, as one
    process would compute it. The loss itself when there is one process."""
    return loss * (n_tokens / all_reduce_mean(float(n_tokens), run)) if run.ddp else loss


def grad_sync(dmodel, run, on):
    """DDP all-reduces gradients in backward only when `on` (the last micro-batch of a step). A flag, not
    the no_sync() context, so the training step reads the same with or without DDP."""
    if run.ddp:
        dmodel.require_backward_grad_sync = on


# -----------------------------------------------------------------------------
# Optimisation

def lr_at(step, max_lr, total_steps, warmup, min_lr_frac=0.1):
    """Linear warmup from ~0 to max_lr, then cosine decay to min_lr_frac * max_lr at total_steps."""
    if step < warmup:
        return max_lr * (step + 1) / warmup
    if step >= total_steps:
        return max_lr * min_lr_frac
    progress = (step - warmup) / max(1, total_steps - warmup)
    return max_lr * (min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def orthogonalize(G, steps=5):
    """Muon's quintic Newton-Schulz iteration: maps G = U S V^T (batched over leading dims) to roughly
    U V^T, every singular value pushed near 1, with matmuls only (Jordan et al. 2024). bf16 on GPU;
    fp32 on CPU, where bf16 matmuls are slow unless the CPU has bf16 units (docs/SPEED.md)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.bfloat16() if G.is_cuda else G.float()
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT  # iterate on the wide side: (m, m) Gram matrices with m the smaller dimension
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return (X.mT if tall else X).to(G.dtype)


class Muon(torch.optim.Optimizer):
    """Momentum, then orthogonalize the update of each weight matrix (Muon, Jordan et al. 2024), for
    the 2-D weights of linear layers. A group's 'parts' splits a fused matrix (q|k|v, gate|up)
    into the matrices it stands for. Updates are scaled to AdamW's RMS (0.2 sqrt(max dim), Liu et al.
    2025), so AdamW's learning rates carry over."""

    def __init__(self, param_groups, lr=1e-3, momentum=0.95, weight_decay=0.0):
        super().__init__(param_groups, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, parts=1))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            mu = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mu)
                g = p.grad.lerp(buf, mu)  # Nesterov momentum
                k = group["parts"]
                rows, cols = p.size(0) // k, p.size(1)
                u = orthogonalize(g.view(k, rows, cols)).view_as(p)  # (k, out/k, in) -> (out, in)
                # an orthogonal (rows, cols) matrix has RMS 1/sqrt(max(rows, cols)); AdamW's updates have
                # RMS ~0.2, so this scale lets AdamW's learning rates carry over
                adamw_rms_scale = 0.2 * max(rows, cols) ** 0.5
                p.mul_(1 - group["lr"] * group["weight_decay"])  # decoupled weight decay, as in AdamW
                p.add_(u, alpha=-group["lr"] * adamw_rms_scale)


class Optimizers:
    """Several optimizers stepped, scheduled and checkpointed as one (Muon for the linear layers'
    matrices, AdamW for the rest)."""

    def __init__(self, **optimizers):
        self.optimizers = {k: o for k, o in optimizers.items() if o is not None}

    @property
    def param_groups(self):
        return [g for o in self.optimizers.values() for g in o.param_groups]

    def step(self):
        for o in self.optimizers.values():
            o.step()

    def zero_grad(self, set_to_none=True):
        for o in self.optimizers.values():
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {k: o.state_dict() for k, o in self.optimizers.items()}

    def load_state_dict(self, state):
        if set(state) != set(self.optimizers):
            raise ValueError(f"optimizer state holds {sorted(state)}, expected {sorted(self.optimizers)}")
        for k, o in self.optimizers.items():
            o.load_state_dict(state[k])


def make_optimizer(groups, weight_decay, betas, device_type, muon_scale=0.0):
    """AdamW with weight decay on matrices only (linear and embedding weights; never norms or biases,
    as in nanoGPT). groups: list of (named_parameters, lr) pairs; each gets its own LR (stored as
    'base_lr' so the schedule can scale every group the same way).
    muon_scale > 0: the 2-D weights of linear layers (not the token embedding or output head) go to
    Muon instead, at muon_scale x their group's LR (weight decay too acts at that LR); AdamW keeps
    embeddings, convs, norms and biases."""
    adamw_groups, muon_groups = [], []
    for named, lr in groups:
        named = [(n, p) for n, p in named if p.requires_grad]
        to_muon = set()  # ids of the parameters Muon takes
        for n, p in named:
            if muon_scale > 0 and p.dim() == 2 and not n.endswith(("tok_emb.weight", "head.weight")):
                to_muon.add(id(p))
                parts = 3 if "qkv" in n else 2 if "gate_up" in n else 1  # fused q|k|v, gate|up: 3 or 2 matrices
                muon_groups.append({"params": [p], "parts": parts, "weight_decay": weight_decay,
                                    "lr": lr * muon_scale, "base_lr": lr * muon_scale})
        rest = [p for n, p in named if id(p) not in to_muon]
        decay = [p for p in rest if p.dim() >= 2]
        no_decay = [p for p in rest if p.dim() < 2]
        if decay:
            adamw_groups.append({"params": decay, "weight_decay": weight_decay, "lr": lr, "base_lr": lr})
        if no_decay:
            adamw_groups.append({"params": no_decay, "weight_decay": 0.0, "lr": lr, "base_lr": lr})
    if not adamw_groups and not muon_groups:
        raise UserError("nothing to train: every part of the model is frozen")
    fused = device_type == "cuda"  # one kernel for the whole update on GPU
    adamw = torch.optim.AdamW(adamw_groups, betas=betas, fused=fused) if adamw_groups else None
    if not muon_groups:
        return adamw
    return Optimizers(adamw=adamw, muon=Muon(muon_groups))


def set_lr(optimizer, scale):
    """Set every group's LR to its base LR times the schedule's factor."""
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * scale


# -----------------------------------------------------------------------------
# Checkpoints: atomic writes, plain contents (weights_only=True loads them), clear errors

def write_failed(path, e):
    """An operating-system failure while writing (disk full, read-only, no permission) as one line. Every
    write goes to a temp file first, so what was there before is intact."""
    why = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
           errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
           errno.EPERM: "permission denied"}.get(getattr(e, "errno", None))
    if why is None:  # torch.save reports a failed write as RuntimeError "[enforce fail at inline_container.cc]"
        why = (getattr(e, "strerror", None) or str(e).splitlines()[0] or type(e).__name__)[:120]
        if "inline_container" in str(e):
            why = "the write failed (disk full?)"
    return UserError(f"could not write {path}: {why}; nothing written earlier was damaged. "
                     "Free space or fix the folder's permissions, then run again (with --resume to continue)")


def write_atomic(path, write, binary=True):
    """write(f) into a temp file in the same folder, fsync, then rename: a crash or a full disk mid-write never
    leaves a half-written file where a good one was, and no temp file is left behind."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(tmp, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # failed or interrupted mid-write: the old file stays
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) or (isinstance(e, RuntimeError) and "inline_container" in str(e)):
            raise write_failed(path, e) from None
        raise


def save_checkpoint(obj, path):
    """Write to a temp file in the same folder, fsync, then rename: a crash mid-write never leaves a
    half-written checkpoint where a good one was."""
    write_atomic(path, lambda f: torch.save(obj, f))


def write_json_atomic(obj, path, indent=1):
    """data.json, results.json, eval.json and cache metadata, written like the checkpoints (never half a file)."""
    write_atomic(path, lambda f: json.dump(obj, f, indent=indent), binary=False)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    except (OverflowError, ValueError):
        return False
    return True


def remove_stale_temps(folder, prefix=""):
    """Temp files (`name.tmp<pid>`) and temp folders of processes that are gone: a kill -9 mid-write leaves them.
    prefix: only names that start with it."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        m = re.search(r"\.tmp(\d+)(\.npy)?$", name)
        if m and name.startswith(prefix) and not pid_alive(int(m.group(1))):
            p = os.path.join(folder, name)
            try:
                shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
            except OSError:
                pass


def file_hash(path):
    """A short content hash: a later phase records the one of the checkpoint it starts from."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def load_checkpoint(path, expect_phase=None, run_first=None):
    """Load a checkpoint dict on CPU. Missing file -> say which command makes it."""
    if not os.path.exists(path):
        hint = f"; run `{run_first}` first" if run_first else ""
        raise UserError(f"checkpoint {path} not found{hint}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign file
        raise UserError(f"could not read checkpoint {path} ({type(e).__name__}); it is damaged or not a checkpoint of this project")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "decoder_config" not in ckpt:
        raise UserError(f"{path} is not a checkpoint of this project")
    if expect_phase is not None:
        phases = expect_phase if isinstance(expect_phase, (list, tuple)) else [expect_phase]
        if ckpt.get("phase") not in phases:
            raise UserError(f"{path} is a {ckpt.get('phase')} checkpoint, but a {' or '.join(phases)} checkpoint is needed here")
    check_matches_code(ckpt, path)
    return ckpt


def check_matches_code(ckpt, path):
    """A checkpoint written by another version of this code (other config fields or layer names) gets one line
    instead of a traceback from load_state_dict. The model is built on the meta device: no memory, no time."""
    from model import build_model
    try:
        with torch.device("meta"):
            names = set(build_model(ckpt, load=False).state_dict())
    except (TypeError, ValueError) as e:
        raise UserError(f"{path} was written by another version of this code ({e})")
    saved = set(ckpt["model"]) if isinstance(ckpt["model"], dict) else set()
    if names != saved:
        diff = sorted(saved - names)[:2] + sorted(names - saved)[:2]
        raise UserError(f"{path} was written by another version of this code: its layers differ ({', '.join(diff)})")


def check_resume_flags(ckpt, args, path, flags):
    """Flags that shape the saved optimizer state (e.g. which parts are frozen decides its parameter groups),
    or the val loss that best.pt is chosen by, must be the same on --resume."""
    for flag in flags:
        saved, now = ckpt["args"].get(flag, False), getattr(args, flag)
        if saved != now:
            how = ('with' if saved else 'without') + f" --{flag}" if isinstance(now, bool) else f"with --{flag} {saved}"
            raise UserError(f"{path} was trained {how}; resume the same way")


def resume_training(ckpt, optimizer, gens, path):
    """Restore the optimizer's moments and the RNG from last.pt. This run's hyperparameters (--lr,
    --weight_decay, fused or not) stay: the saved parameter groups would otherwise bring the old ones back."""
    if "optimizer" not in ckpt or "rng" not in ckpt:
        raise UserError(f"{path} holds no optimizer state (a best.pt copy?); resume from the last.pt a run saved")
    keep = [{k: g[k] for k in ("lr", "base_lr", "weight_decay", "fused") if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(ckpt["optimizer"])
    for g, hyper in zip(optimizer.param_groups, keep):
        g.update(hyper)
    set_rng_state(ckpt["rng"], gens)


def check_vocab(ckpt, sp, path):
    """The model's vocabulary must be the tokenizer's."""
    v = ckpt["decoder_config"]["vocab_size"]
    if v != sp.get_piece_size():
        raise UserError(f"{path} has vocab_size {v} but tokenizer {ckpt.get('tokenizer')} has {sp.get_piece_size()} pieces; "
                        "use the tokenizer the checkpoint was trained with")


def checkpoint_tokenizer(ckpt, path):
    """The tokenizer a checkpoint was trained with: the tokenizer.model of the out dir the checkpoint sits in
    (phase 1 writes it there), else the path stored in the checkpoint (relative to where training ran, so
    tried second). Its vocabulary must be the model's."""
    from tokenizer import load_tokenizer
    near = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))), "tokenizer.model")
    tok = near if os.path.exists(near) else ckpt.get("tokenizer")
    if not tok or not os.path.exists(tok):
        raise UserError(f"no tokenizer for {path}: expected {near} (the out dir's tokenizer.model)")
    sp = load_tokenizer(tok)
    check_vocab(ckpt, sp, path)
    return sp


def config_dicts(model):
    """(decoder_config, vit_config or None) of a Decoder or VLM, as plain dicts for a checkpoint."""
    if hasattr(model, "vit"):
        return asdict(model.decoder.cfg), asdict(model.vit.cfg)
    return asdict(model.cfg), None


def make_checkpoint(model, phase, tokenizer, step, val_loss, best_val, args, optimizer=None, gens=None, **extra):
    """Everything a later phase or a resume needs, as tensors and plain types only (so
    torch.load(weights_only=True) reads it). The optimizer and RNG go only into last.pt."""
    d, v = config_dicts(model)
    obj = {"model": model.state_dict(), "decoder_config": d, "vit_config": v, "phase": phase,
           "tokenizer": tokenizer, "step": step, "val_loss": val_loss, "best_val": best_val, "args": vars(args)}
    if optimizer is not None:
        obj["optimizer"] = optimizer.state_dict()
        obj["rng"] = rng_state(gens or {})
    obj.update(extra)
    return obj


def rng_state(gens):
    """Everything random that affects training, as plain tensors/ints (weights_only-safe)."""
    st = {"torch": torch.get_rng_state(), "python": random.getstate()[1], "numpy": None,
          "gens": {k: g.get_state() for k, g in gens.items()}}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()  # this process's GPU only: a resume may see fewer GPUs
    return st


def set_rng_state(st, gens):
    torch.set_rng_state(st["torch"])
    random.setstate((3, tuple(st["python"]), None))
    for k, g in gens.items():
        g.set_state(st["gens"][k])
    if "cuda" in st and torch.cuda.is_available():
        cuda = st["cuda"]
        if isinstance(cuda, (list, tuple)):  # older checkpoints: one state per GPU
            cuda = cuda[torch.cuda.current_device()] if torch.cuda.current_device() < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)


class StopFlag:
    """Ctrl-C or SIGTERM sets a flag; the loop finishes its step, saves a resumable checkpoint, exits."""

    def __init__(self):
        self.stop = False
        self.signum = None
        signal.signal(signal.SIGINT, self._handler)
        signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):
        if self.stop:  # a second Ctrl-C means "now"
            raise KeyboardInterrupt
        self.stop = True
        self.signum = signum

    def release(self):
        """Training is over: Ctrl-C and SIGTERM stop the program at once again (e.g. in the final evaluation)."""
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def agreed(self, run):
        """Stop now? Under DDP every rank must stop after the same step, or the first to leave takes the others'
        next collective down with it (gloo: a crash before they save; NCCL: a hang): stop if any rank got the
        signal. That is one scalar all-reduce per step, only under DDP."""
        return all_reduce_mean(float(self.stop), run) > 0 if run.ddp else self.stop


def check_finite(loss_value, step, out_path, what="loss"):
    """Call before anything from this step is saved, so a NaN/inf never reaches a checkpoint."""
    if not math.isfinite(loss_value):
        raise UserError(f"{what} became {loss_value} at step {step}; stopped, the last good checkpoint in {out_path} is kept. "
                        "Try a lower --lr or check the data")


def check_weights_finite(model, step, out_path):
    """Before saving on an interrupt: the last update may have made the weights inf/NaN (the loss checked
    so far was computed before it)."""
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        raise UserError(f"the weights became inf/NaN at step {step}; stopped, the last good checkpoint in {out_path} "
                        "is kept. Try a lower --lr or check the data")


# -----------------------------------------------------------------------------
# The scaffolding of every phase's training loop

class Run(SimpleNamespace):
    """One phase's run: the device and DDP setup (device, device_type, ddp, rank, world_size, master,
    autocast), and everything around its training loop that is not learning: where it writes, resuming
    from last.pt, best.pt/last.pt at each evaluation, the data-order generator, Ctrl-C, the speed meter,
    the progress bar and the log lines. Every phase uses it the same way:

        run = Run(args, "phase1")              # device, DDP, out/phase1/
        ckpt = run.last_checkpoint()           # --resume: last.pt (else None)
        ... build model and optimizer ...
        run.start(model, optimizer, tokenizer_path, ckpt)
        while True:
            if run.eval_due(args.eval_interval, args.max_steps):
                run.evaluated(<val loss>)      # best.pt if it improved, last.pt always
            if run.step >= args.max_steps:
                break
            ... one training step ...
            run.stepped(loss, tokens=..., flops=...)   # log, Ctrl-C -> save and exit
        run.finish()
    """

    def __init__(self, args, phase, out_name=None, same_on_resume=(), command=None):
        super().__init__(**vars(setup(args)))
        if args.batch_size % self.world_size:
            raise UserError(f"--batch_size={args.batch_size} must be divisible by the {self.world_size} processes")
        self.args, self.phase = args, phase
        self.out = os.path.join(args.out_dir, out_name or phase)
        self.best_path, self.last_path = os.path.join(self.out, "best.pt"), os.path.join(self.out, "last.pt")
        self.same_on_resume = same_on_resume  # flags a resume must keep (e.g. those that define the val loss)
        script = {"phase1": "phase1_text", "phase2": "phase2_caption", "phase4": "phase4_vqa"}.get(phase, phase)
        self.command = command or f"python {script}.py"
        self.gen = torch.Generator().manual_seed(args.seed)  # the training data order, saved with last.pt
        self.step, self.best_val, self.val_loss = 0, float("inf"), float("nan")
        self.best_step = None  # the step best.pt holds (None: saved before a --resume, see finish)
        self.parent = None
        if self.master:  # before any data is loaded: a mistake here costs nothing
            check_writable(args.out_dir)
            self.lock = OutDirLock(args.out_dir)
            self.protect_finished_run()
            remove_stale_temps(args.out_dir)
            remove_stale_temps(self.out)
        if self.ddp:
            import torch.distributed as dist
            dist.barrier()  # the other ranks read nothing from the out dir before rank 0 checked it

    def protect_finished_run(self):
        """A run that saved a checkpoint here is never trained over by accident (best.pt would be replaced at the
        first evaluation, and later phases built on it orphaned): --resume continues it, --restart moves it aside."""
        a = self.args
        there = [f for f in (self.best_path, self.last_path) if os.path.exists(f)]
        if a.resume and getattr(a, "restart", False):
            raise UserError("--resume continues the run there and --restart starts over: pass one of them")
        if a.resume or not there:
            return
        if not getattr(a, "restart", False):
            raise UserError(f"{self.out} already holds a run ({', '.join(map(os.path.basename, there))}); continue it "
                            f"with --resume, start over with --restart (moves it to {self.out}.old-<time>), "
                            "or use another --out_dir")
        aside = f"{self.out}.old-{time.strftime('%Y%m%d-%H%M%S')}"
        try:
            os.replace(self.out, aside)
        except OSError as e:
            raise UserError(f"--restart: could not move {self.out} to {aside} ({e.strerror}); nothing was changed")
        print(f"--restart: moved the earlier run to {aside}", file=sys.stderr)

    def last_checkpoint(self):
        """With --resume: last.pt, checked against this run's flags; without: None."""
        if not self.args.resume:
            return None
        if not os.path.exists(self.last_path) and os.path.exists(self.best_path):
            raise UserError(f"{self.last_path} not found, so the run in {self.out} cannot be continued; its best.pt "
                            "is kept. Start over with --restart (moves it aside) or use another --out_dir")
        ckpt = load_checkpoint(self.last_path, self.phase, run_first=self.command)
        check_resume_flags(ckpt, self.args, self.last_path, self.same_on_resume)
        return ckpt

    def start(self, model, optimizer, tokenizer, ckpt=None, parent=None):
        """Remember what checkpoints hold; from last.pt, restore the weights, the optimizer's moments,
        the RNG, the step and the best val loss. parent: the checkpoint this phase starts from; its hash goes
        into every checkpoint, so eval.py can tell when it changed since (a resume keeps the first one)."""
        self.model, self.optimizer, self.tokenizer = model, optimizer, tokenizer
        if parent is not None and ckpt is None and self.master:
            self.parent = {"path": os.path.relpath(os.path.abspath(parent), os.path.abspath(self.args.out_dir)),
                           "hash": file_hash(parent)}
        if ckpt is not None and "parent" in ckpt:
            self.parent = ckpt["parent"]
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            resume_training(ckpt, optimizer, {"data": self.gen}, self.last_path)
            self.step, self.best_val = ckpt["step"], ckpt["best_val"]
            self.log(f"resumed from {self.last_path} at step {self.step} (best val {self.best_val:.4f})")
        self.stop = StopFlag()
        self.meter = Meter(self)
        self.pbar = tqdm(total=self.args.max_steps, initial=self.step, disable=not self.master or not show_progress(self.args),
                         desc=os.path.basename(self.out), dynamic_ncols=True)

    def log(self, line):
        if self.master:
            tqdm.write(line)

    def eval_due(self, interval, max_steps):
        return self.step % interval == 0 or self.step >= max_steps  # >=: a resumed run may be past it

    def evaluated(self, val_loss, what="val loss", note=""):
        """After an evaluation: best.pt if the val loss is the lowest so far, and last.pt."""
        check_finite(val_loss, self.step, self.out, what)  # same value on every rank: all stop together
        self.val_loss = val_loss
        self.log(f"step {self.step} | {what} {val_loss:.4f}{note}")
        if self.master:
            if val_loss < self.best_val:
                self.best_val, self.best_step = val_loss, self.step
                save_checkpoint(self.checkpoint(False), self.best_path)
            save_checkpoint(self.checkpoint(True), self.last_path)
        self.meter.reset()  # evaluation time is not training time

    def stepped(self, loss, note="", **counts):
        """After an optimizer step: count it, log it, and on Ctrl-C/SIGTERM save last.pt and exit.
        loss.item() makes the CPU wait for the GPU, so the loss is read only to log it and to check it
        is finite before a checkpoint can be written (a NaN stays in the weights, so it is caught)."""
        self.step += 1
        self.meter.add(**counts)
        self.pbar.update(1)
        a = self.args
        if self.step % a.log_interval == 0 or self.step % a.eval_interval == 0 or self.step == a.max_steps:
            loss_value = all_reduce_mean(loss.item(), self)  # mean over ranks, the same on every rank
            check_finite(loss_value, self.step, self.out)
            if self.step % a.log_interval == 0:
                lr = self.optimizer.param_groups[0]["lr"]
                self.log(f"step {self.step} | loss {loss_value:.4f}{note} | lr {lr:.2e} | {fmt_speed(self.meter.report())}")
        if self.stop.agreed(self):
            if self.master:
                check_weights_finite(self.model, self.step, self.out)
                save_checkpoint(self.checkpoint(True), self.last_path)
                tqdm.write(f"interrupted: saved {self.last_path} at step {self.step}; continue with --resume")
            cleanup(self)
            sys.exit(130 if self.stop.signum == 2 else 143)

    def checkpoint(self, with_optimizer):
        return make_checkpoint(self.model, self.phase, self.tokenizer, self.step,
                               self.val_loss, self.best_val, self.args,
                               self.optimizer if with_optimizer else None, {"data": self.gen},
                               **({"parent": self.parent} if self.parent else {}))

    def finish(self):
        """Training is over: Ctrl-C stops at once again; returns the best checkpoint's path."""
        self.pbar.close()
        self.stop.release()
        self.warn_if_never_improved()
        return self.best_path

    def warn_if_never_improved(self):
        """One line when best.pt is the starting point: validation was lowest before any training step, so
        the next phase would get an untrained (phase 1: random) model."""
        if not self.master or self.step == 0 or not os.path.exists(self.best_path):
            return
        best_step = self.best_step
        if best_step is None:  # resumed, and never improved since: best.pt says where it came from
            best_step = torch.load(self.best_path, map_location="cpu", weights_only=True, mmap=True).get("step")
        if best_step == 0:
            lr = "/".join(f"--{k}" for k in vars(self.args) if k == "lr" or k.startswith("lr_")) or "--lr"
            print(f"warning: {self.phase}'s validation never improved on its starting point (step 0: "
                  f"{self.best_val:.4f}, step {self.step}: {self.val_loss:.4f}), so {self.best_path} is the model as it "
                  f"was before training; give it more data, fewer steps (--max_steps) or a lower learning rate ({lr})",
                  file=sys.stderr)


def check_writable(out_dir):
    """Before any data is loaded: a read-only or full out dir says so in one line, not after minutes of work."""
    probe = os.path.join(out_dir, f".write_test.tmp{os.getpid()}")
    try:
        os.makedirs(out_dir, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise write_failed(probe if os.path.isdir(out_dir) else out_dir, e) from None


class OutDirLock:
    """One run per out dir: a second run would train with the first one's half-written tokenizer, and the last
    to finish would silently win. The lock file holds the owner's pid and the out dir's absolute path; a lock
    whose process is gone (a kill -9), or that was copied along with the folder, is stale and taken over."""

    def __init__(self, out_dir):
        import atexit
        self.path = os.path.join(out_dir, ".lock")
        self.here, self.where = os.path.abspath(out_dir), None
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                owner = self.owner()
                if owner is not None and pid_alive(owner) and owner != os.getpid() and self.where == self.here:
                    raise UserError(f"{out_dir} is in use by another run (process {owner}, see {self.path}); wait "
                                    "for it to finish, stop it, or use another --out_dir")
                try:  # stale: its process is gone
                    os.remove(self.path)
                except FileNotFoundError:
                    pass
                continue
            except OSError as e:
                raise write_failed(self.path, e) from None
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()}\n{self.here}\n{' '.join(sys.argv)}\n")
            atexit.register(self.release)
            return
        raise UserError(f"could not take the lock {self.path}; delete it if no run is using {out_dir}")

    def owner(self):
        try:
            with open(self.path) as f:
                lines = f.read().splitlines()
            self.where = lines[1] if len(lines) > 1 else None
            return int(lines[0])
        except (OSError, ValueError, IndexError):
            return None  # empty or unreadable (a kill between create and write): stale

    def release(self):
        if self.owner() == os.getpid():
            try:
                os.remove(self.path)
            except OSError:
                pass


# -----------------------------------------------------------------------------
# Throughput and MFU

# Dense bf16 peak FLOP/s (no sparsity) by GPU name substring, from the vendors' data sheets.
GPU_PEAK_BF16 = [
    ("H200", 989e12), ("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("GH200", 989e12),
    ("B200", 2250e12), ("A100", 312e12), ("A10G", 70e12), ("A10", 125e12), ("L40S", 362e12), ("L40", 181e12),
    ("L4", 121e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("V100", 125e12), ("T4", 65e12),
]
_cpu_peak = None


def cpu_matmul_peak():
    """Measured fp32 matmul FLOP/s of this CPU with torch's current threads (cached). CPU 'MFU' is
    against this, since CPUs have no data-sheet number that torch can reach."""
    global _cpu_peak
    if _cpu_peak is None:
        n = 1024
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b  # warm up
        best = float("inf")
        for _ in range(10):  # best of 10: a busy machine only ever makes a trial slower
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        _cpu_peak = 2 * n ** 3 / best
    return _cpu_peak


def peak_flops(run):
    """Peak FLOP/s of one device of this run, or None if unknown (MFU then not printed)."""
    if run.device_type == "cuda":
        name = torch.cuda.get_device_name(run.device)
        for key, val in GPU_PEAK_BF16:
            if key in name:
                return val
        return None
    if run.device_type == "cpu":
        return cpu_matmul_peak()
    return None


def flops_per_token(decoder, seq_len):
    """Training FLOPs per token of a Decoder (forward + backward), PaLM appendix B style:
    6 * (matmul params, the LM head included) + 12 * L * d * T for attention scores and values."""
    cfg = decoder.cfg
    n_matmul = decoder.num_params(non_embedding=True)
    if cfg.tie_embeddings:
        n_matmul += decoder.tok_emb.weight.numel()  # tied head still costs a d x V matmul
    return 6 * n_matmul + 12 * cfg.n_layer * cfg.d_model * seq_len


def flops_per_image(vit):
    """Training FLOPs of a ViT for one image: its blocks as above, plus the conv stem."""
    T = vit.grid * vit.grid
    n = sum(p.numel() for p in vit.blocks.parameters())
    flops = T * (6 * n + 12 * vit.cfg.n_layer * vit.cfg.d_model * T)
    side = vit.cfg.image_size
    for m in vit.patch.modules():
        if isinstance(m, torch.nn.Conv2d):  # 6 x weights x output positions
            side //= m.stride[0]
            flops += 6 * m.weight.numel() * side * side
    return flops


def flops_per_sample(vlm, text_len):
    """Training FLOPs of a VLM for one image + text_len tokens (ViT + projector + decoder)."""
    P = vlm.projector.num_tokens()
    proj = 6 * P * sum(p.numel() for p in vlm.projector.parameters())
    head = 6 * vlm.decoder.cfg.d_model * vlm.decoder.cfg.vocab_size  # image positions get no logits
    return flops_per_image(vlm.vit) + proj + (P + text_len) * flops_per_token(vlm.decoder, P + text_len) - P * head


class Meter:
    """Times training intervals and turns counts into tokens/s, images/s and MFU."""

    def __init__(self, run):
        self.peak = peak_flops(run)
        self.world = run.world_size
        self.cuda = run.device_type == "cuda"
        self.reset()

    def reset(self):
        if self.cuda:
            torch.cuda.synchronize()
        self.t0 = time.perf_counter()
        self.steps = self.tokens = self.images = self.flops = 0

    def add(self, tokens=0, images=0, flops=0):
        """Counts for one optimizer step on this rank."""
        self.steps += 1
        self.tokens += tokens
        self.images += images
        self.flops += flops

    def report(self):
        if self.cuda:
            torch.cuda.synchronize()
        dt = max(time.perf_counter() - self.t0, 1e-9)
        r = {"ms_step": 1000 * dt / max(self.steps, 1),
             "tok_s": self.tokens * self.world / dt,
             "img_s": self.images * self.world / dt,
             "mfu": (self.flops / dt / self.peak) if self.peak else None}
        self.reset()
        return r


def fmt_speed(r):
    s = f"{r['ms_step']:.0f} ms/step | {r['tok_s']:,.0f} tok/s"
    if r["img_s"]:
        s += f" | {r['img_s']:,.1f} img/s"
    if r["mfu"] is not None:
        s += f" | MFU {100 * r['mfu']:.1f}%"
    return s


# -----------------------------------------------------------------------------
# Small JSON/JSONL readers that say which line is wrong

def _open_text(path):
    if not os.path.isfile(path):
        raise UserError(f"file {path} not found" if not os.path.exists(path) else f"{path} is not a file")
    return open(path, encoding="utf-8")


def read_jsonl(path):
    rows = []
    with _open_text(path) as f:
        try:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UserError(f"{path} line {i}: malformed JSON ({e.msg}); fix or delete that line")
        except UnicodeDecodeError:
            raise UserError(f"{path} is not UTF-8 text; expected JSON lines")
    return rows


def read_json(path):
    with _open_text(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {e.lineno}: malformed JSON ({e.msg})")
        except UnicodeDecodeError:
            raise UserError(f"{path} is not UTF-8 text; expected JSON")
