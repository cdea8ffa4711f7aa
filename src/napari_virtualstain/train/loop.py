"""The training loop, one for every task: AdamW, EMA weights, bf16 autocast, validation, resume state, a bundle.

What differs per task (batches, loss, validation, the bundle's config) is a ``TrainingJob`` (``train/job.py``):
``train/stain_job.py`` for paired stains, ``train/classcond.py`` for class-conditional models.
"""

from __future__ import annotations

import copy
import io
import itertools
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..core.bundle import save_bundle
from ..core.errors import VirtualStainError
from ..core.io import atomic_write
from ..core.model import build_unet, fast_bf16, pick_device
from . import distributed
from .classcond import ClassCondSpec, classcond_job
from .data import TrainingSpec, split_regions
from .job import STATE_DIR, TrainingJob, TrainOptions  # noqa: F401 - re-exported: the loop's options
from .progress import TrainProgress  # noqa: F401 - re-exported: the loop's progress lines
from .stain_job import stain_job, training_scheduler

log = logging.getLogger(__name__)


def _save_state(out: Path, step: int, unet, ema, opt, rng: np.random.Generator, gen: torch.Generator, history):
    """Resume state without pickle: tensors in safetensors, the rest in JSON; written to a temporary name and
    swapped in at once, so a run killed while saving keeps its previous state whole."""
    from safetensors.torch import save

    state_dir = out / STATE_DIR
    state_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in unet.state_dict().items()}
    tensors |= {f"ema.{k}": v.detach().cpu().contiguous() for k, v in ema.state_dict().items()}
    opt_sd = opt.state_dict()
    for idx, st in opt_sd["state"].items():
        for key, val in st.items():
            tensors[f"opt.{idx}.{key}"] = torch.as_tensor(val).detach().cpu().contiguous()
    tensors["torch_rng"] = gen.get_state()
    packed, layout = _pack(tensors)
    data = save(packed)
    del packed
    with atomic_write(state_dir / "state.safetensors") as part:
        part.write_bytes(data)
    del data
    meta = {"step": step, "param_groups": opt_sd["param_groups"], "numpy_rng": rng.bit_generator.state,
            "history": history, "layout": layout}
    with atomic_write(state_dir / "state.json") as part:
        part.write_text(json.dumps(meta, default=_jsonable))


def _pack(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list]:
    """One flat tensor per dtype instead of ~1,100 (weights, EMA, optimiser moments): safetensors serialises each
    tensor in Python, holding the GIL, which froze the Train widget's window for ~0.5 s per save on a busy CPU."""
    groups: dict[str, list[torch.Tensor]] = {}
    layout = []
    for name, t in tensors.items():
        kind = str(t.dtype).removeprefix("torch.")
        groups.setdefault(kind, []).append(t.reshape(-1))
        layout.append([name, kind, list(t.shape)])
    return {f"packed.{kind}": torch.cat(parts) for kind, parts in groups.items()}, layout


def _unpack(packed: dict[str, torch.Tensor], layout: list) -> dict[str, torch.Tensor]:
    offsets = dict.fromkeys(packed, 0)
    out = {}
    for name, kind, shape in layout:
        key, n = f"packed.{kind}", math.prod(shape)
        out[name] = packed[key][offsets[key]:offsets[key] + n].reshape(shape).clone()
        offsets[key] += n
    return out


def _jsonable(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(type(o))


def _load_state(out: Path, unet, ema, opt, rng: np.random.Generator, gen: torch.Generator):
    from safetensors.torch import load_file

    state_dir = out / STATE_DIR
    if not (state_dir / "state.json").is_file():
        raise VirtualStainError(f"nothing to resume: {state_dir} has no saved training state")
    tensors = load_file(str(state_dir / "state.safetensors"))
    meta = json.loads((state_dir / "state.json").read_text())
    if meta.get("layout"):  # packed (since round 3); older states hold one tensor per name
        tensors = _unpack(tensors, meta["layout"])
    unet.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    opt_state: dict = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, idx, key = k.split(".", 2)
            opt_state.setdefault(int(idx), {})[key] = v
    groups = meta["param_groups"]
    for g in groups:
        g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": opt_state, "param_groups": groups})
    rng.bit_generator.state = meta["numpy_rng"]
    gen.set_state(tensors["torch_rng"])
    return meta["step"], meta["history"]


BUDGET_PROBE_STEPS = 20


def budgeted_steps(opts: TrainOptions, probed: int, seconds: float, start: int) -> int:
    """The step count that fits ``opts.max_minutes`` at the probed speed (10 % kept for validation and saving);
    ``opts.steps`` is lowered to it so the learning-rate schedule ends where training ends."""
    rate = probed / max(seconds, 1e-9)
    fits = start + max(probed, int(rate * (opts.max_minutes * 60 * 0.9 - seconds)))
    opts.steps = min(opts.steps, fits)
    log.info("time budget %.1f min at %.1f steps/s: %d steps", opts.max_minutes, rate, opts.steps)
    return opts.steps


def learning_rate(opts: TrainOptions, step: int) -> float:
    """Stateless schedule (a resumed run gets the same rate at the same step): constant, or warm-up + cosine decay."""
    if opts.lr_schedule == "constant":
        return opts.lr
    if opts.lr_schedule != "cosine":
        raise VirtualStainError(f"lr schedule {opts.lr_schedule!r}: use constant or cosine")
    warm = min(100, max(1, opts.steps // 10))
    if step < warm:
        return opts.lr * (step + 1) / warm
    return opts.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, opts.steps - warm))))


def training_autocast(precision: str, device: torch.device) -> bool:
    """bf16 autocast for the forward/backward pass (weights, optimiser and EMA stay float32)."""
    if precision not in ("auto", "bf16", "float32"):
        raise VirtualStainError(f"precision {precision!r}: use auto, bf16 or float32")
    if precision == "float32":
        return False
    fast = fast_bf16(device)
    if precision == "bf16" and not fast and device.type != "cpu":
        raise VirtualStainError(f"bf16 is not supported on {device}; use --precision float32")
    return precision == "bf16" or fast


def _few(names: list[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def describe_split(spec, job: TrainingJob | None = None) -> str:
    """One line on which pixels train and which are held out for validation: the strip is otherwise a surprise
    that only config.json mentions."""
    if not isinstance(spec, TrainingSpec):
        if job is None:
            return ""
        return f"training on {len(job.train_regions)} image(s); validation: {'; '.join(job.val_regions) or 'none'}"
    train_r, val_r = split_regions(spec)
    if not val_r:
        return (f"validation: none - all of {len(train_r)} image(s) train (val fraction 0 and no image marked "
                "split: val); hold some out with --val-fraction or by marking images split: val")
    if all(xs == slice(None) for _, xs in val_r):
        return (f"validation: {len(val_r)} image(s) marked split: val are held out whole "
                f"({_few([im.name for im, _ in val_r])}); {len(train_r)} image(s) train "
                f"({_few([im.name for im, _ in train_r])})")
    cuts = {im.inputs.shape[-1]: xs.start for im, xs in val_r}  # width -> first held-out column
    held = ", ".join(f"x >= {c} of {w}" for w, c in sorted(cuts.items()))
    kept = ", ".join(sorted({f"x < {c}" for c in cuts.values()}))
    return (f"validation: the right-hand {100 * spec.val_fraction:g} % of each of {len(val_r)} image(s) ({held}) is "
            f"held out; training uses the rest ({kept}); change with --val-fraction or mark images split: val")


def _earlier_commands(out: Path) -> list[str]:
    """The commands of the runs a resume continues, read from the bundle they wrote (config.json)."""
    try:
        training = json.loads((out / "config.json").read_text()).get("training", {})
        commands = training.get("commands") or ([training["command"]] if training.get("command") else [])
        return [str(c) for c in commands]
    except (OSError, ValueError, AttributeError, TypeError):
        return []


def train(
    spec,
    out: str | Path,
    opts: TrainOptions,
    resume: bool = False,
    on_step: Callable[[int, float], None] | None = None,
    on_validate: Callable[[dict], None] | None = None,
):
    """Train and write a bundle to ``out`` (and resume state to ``out/training_state``); returns (bundle, history).

    Under ``torchrun`` every process runs this; rank 0 writes and returns the bundle, the others return None.

    ``spec``: a paired-stain :class:`TrainingSpec` or a class-conditional ``ClassCondSpec``. ``on_step(step, loss)``
    after every step (raise ``Cancelled`` there to stop: the last validated bundle stays as it was written),
    ``on_validate(record)`` after every validation (step, loss, seconds, val metrics).
    """
    out = Path(out)
    job = classcond_job(spec, opts) if isinstance(spec, ClassCondSpec) else stain_job(spec, opts)
    config = job.config
    ranks, device = distributed.setup(pick_device(opts.device))  # torchrun: this process's rank and device
    if ranks.main:
        print(describe_split(spec, job), file=sys.stderr, flush=True)
    torch.manual_seed(opts.seed)
    rng = np.random.default_rng(opts.seed)
    gen = torch.Generator().manual_seed(opts.seed)
    unet = build_unet(config.unet).to(device)
    if job.init is not None:
        from . import finetune

        finetune.load_init_weights(unet, job.init, config)
        job.provenance.update(finetune.provenance(job.init, opts.init, config))
    elif job.mean_unet is not None and config.objective == "residual_shift":
        # start as mu exactly: the residual head outputs 0 until it has learned something
        torch.nn.init.zeros_(unet.conv_out.weight)
        torch.nn.init.zeros_(unet.conv_out.bias)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    model = distributed.wrap(unet, ranks, device)  # DDP under torchrun: gradients averaged over the ranks
    opt = torch.optim.AdamW(unet.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    scheduler = training_scheduler(config)
    start, history = (0, [])
    if resume:
        start, history = _load_state(out, unet, ema, opt, rng, gen)
        log.info("resuming at step %d", start)
    # every run that made this bundle, first first: a resume alone would not reproduce it
    commands = [*(_earlier_commands(out) if resume else []), *([opts.command] if opts.command else [])]
    config.training = {
        "data": spec.source, "objective": config.objective, "steps": opts.steps, "seed": opts.seed,
        "package_version": __version__, "command": commands[0] if commands else opts.command, "commands": commands,
        "options": {k: v for k, v in asdict(opts).items() if k not in ("command", "extra")},
        "train_regions": job.train_regions, "val_regions": job.val_regions, **job.provenance, **opts.extra,
    }
    progress = TrainProgress(opts.steps, start, f"{opts.stage + ': ' if opts.stage else ''}train {config.task}/{config.objective}",
                             None if ranks.main else io.StringIO())
    amp = training_autocast(opts.precision, device)
    config.training["precision"] = "bf16" if amp else "float32"
    unet.train()
    t0, running = time.perf_counter(), None
    earlier = float(history[-1].get("seconds", 0.0)) if history else 0.0  # a resumed run's clock carries on
    total = opts.steps
    for step in itertools.count(start):
        if step >= total:
            break
        for group in opt.param_groups:
            group["lr"] = learning_rate(opts, step)
        # every rank draws the same global batch and trains on its slice (train/distributed.py)
        batch = tuple(t.to(device) for t in distributed.shard(job.next_batch(rng), ranks))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = job.loss(model, scheduler, batch, gen).float()
        if not torch.isfinite(loss):
            raise VirtualStainError(
                f"the training loss is {loss.item()} at step {step + 1}: the run diverged (nothing more is saved; the "
                "last validated bundle stays). Lower --lr, try --precision float32, or another --loss")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(opts.ema_decay, (1 + step) / (10 + step))  # warm-up so early EMA is not stuck at init
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
            for be, b in zip(ema.buffers(), unet.buffers()):
                be.copy_(b)
        value = distributed.mean_over_ranks(loss.item(), device)
        running = value if running is None else 0.98 * running + 0.02 * value
        if on_step is not None:
            on_step(step + 1, value)
        done = step + 1
        if opts.max_minutes and done == start + BUDGET_PROBE_STEPS:
            total = distributed.agree(budgeted_steps(opts, done - start, time.perf_counter() - t0, start), device)
            config.training["steps"] = progress.total = total
        if not ranks.main:
            continue
        if done % opts.val_every == 0 or done == total:
            record = {"step": done, "loss": running, "seconds": round(earlier + time.perf_counter() - t0, 1)}
            if job.validate is not None:
                record["val"] = job.validate(ema, device)
                log.info("step %d val %s", done, record["val"])
            history.append(record)
            _save_state(out, done, unet, ema, opt, rng, gen, history)
            config.training["history"] = history
            save_bundle(out, config, ema, half=opts.half_weights, mean_unet=job.mean_unet)
            progress.update(done, running, record["seconds"], validated=True, val=record.get("val"))
            if on_validate is not None:
                on_validate(dict(record))
        else:
            progress.update(done, running, earlier + time.perf_counter() - t0)
    progress.close()
    bundle = None
    if ranks.main:
        config.training["history"] = history
        if ranks.world > 1:
            config.training["processes"] = ranks.world
        bundle = save_bundle(out, config, ema, half=opts.half_weights, mean_unet=job.mean_unet)
        (out / "training_log.json").write_text(json.dumps(history, indent=2))
    distributed.barrier()
    distributed.teardown()
    return bundle, history
