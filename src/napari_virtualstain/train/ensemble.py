"""A deep ensemble of one-pass networks (Lakshminarayanan et al. 2017): the same recipe trained under N seeds, and
the bundle that answers as their mean.

On the scratch assay the mean of two networks beat either alone on validation and held out (round 4:
``demo-stain-regression``, docs/benchmarks.md), at N times the training time and N passes per prediction. Member
``i`` trains with seed ``seed + i`` (crops, augmentation draws, initial weights) in its own resumable folder;
``join_networks`` writes one bundle whose ``config.networks`` names the further members' weights
(``core.unet.NetworkMean`` averages them), and records each member's commands and validation history.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

from ..core.bundle import Bundle, load_bundle, save_bundle
from ..core.errors import VirtualStainError
from .job import STATE_DIR, TrainOptions

MAX_NETWORKS = 8


def check_networks(n: int) -> int:
    if not 1 <= int(n) <= MAX_NETWORKS:
        raise VirtualStainError(f"--networks takes 1 to {MAX_NETWORKS} independently trained networks, not {n}")
    return int(n)


def member_seed(opts: TrainOptions, i: int) -> int:
    """Member i's seed (member 0 keeps the run's own)."""
    return opts.seed + i


def saved_step(folder: Path) -> int:
    import json

    state = Path(folder) / STATE_DIR / "state.json"
    return int(json.loads(state.read_text())["step"]) if state.is_file() else 0


def _offset(hooks: dict, offset: int) -> dict:
    on_step, on_validate = hooks.get("on_step"), hooks.get("on_validate")
    if not offset:
        return {"on_step": on_step, "on_validate": on_validate}
    return {"on_step": (lambda step, loss: on_step(step + offset, loss)) if on_step else None,
            "on_validate": (lambda record: on_validate({**record, "step": record["step"] + offset}))
            if on_validate else None}


def train_members(spec, folders: list[Path], opts: TrainOptions, resume: bool, stage: str, hooks: dict) -> bool:
    """Train member i into ``folders[i]`` (``opts`` with seed ``member_seed``); a finished member is skipped on
    ``resume``. ``hooks`` (``on_step``, ``on_validate``) see the steps counted on across members (member 2's first
    step is ``opts.steps + 1``), so one progress bar covers them all. Returns whether any member trained (what was
    refined on it must then start again)."""
    from .loop import train

    moved = False
    n = len(folders)
    for i, folder in enumerate(folders):
        done = saved_step(folder)
        if resume and done >= opts.steps:
            continue
        label = f"{stage} {i + 1}/{n}" if n > 1 else stage
        member = replace(opts, seed=member_seed(opts, i), stage=label,
                         extra={**opts.extra, **({"ensemble_member": f"{i + 1}/{n}"} if n > 1 else {})})
        train(spec, folder, member, resume=resume and done > 0, **_offset(hooks, i * opts.steps))
        moved = True
    return moved


def join_networks(first: Bundle | str | Path, others: list, out: str | Path, *, config=None,
                  half: bool = False) -> Bundle:
    """Write ``out``: ``first``'s bundle (its refinement too, if anchored) whose one-pass network is the mean of its
    own and ``others``' one-pass networks; ``config`` (default ``first``'s) gets ``networks`` and, in
    ``training.networks``, each further member's path, id, commands and validation history."""
    from ..core.export import one_pass_network
    from ..core.unet import NetworkMean

    src = first if isinstance(first, Bundle) else load_bundle(first)
    members = [o if isinstance(o, Bundle) else load_bundle(o) for o in others]
    nets = []  # every one-pass network, flat: a member that is itself an ensemble gives all of its own
    for b in (src, *members):
        net = one_pass_network(b)[0]
        nets += list(net.networks) if isinstance(net, NetworkMean) else [net]
    config = copy.deepcopy(config or src.config)
    config.training = {**config.training,
                       "networks": [*(config.training.get("networks") or []),
                                    *({"snapshot": str(b.path), "id": b.id, "commands": b.config.training.get("commands"),
                                       "history": b.config.training.get("history")} for b in members)]}
    config.networks = [f"network_{i}.safetensors" for i in range(2, len(nets) + 1)]
    unet, mean_unet = (src.unet, nets[0]) if config.anchored else (nets[0], None)
    return save_bundle(out, config, unet, half=half, mean_unet=mean_unet, networks=nets[1:])


def member_folders(first: Path, n: int, pattern: str) -> list[Path]:
    """``first`` and, for members 2..n, ``pattern.format(i=i)`` beside it (each a bundle folder with its state)."""
    return [Path(first)] + [Path(first).parent / pattern.format(i=i) for i in range(2, n + 1)]


def train_ensemble(spec, out: str | Path, opts: TrainOptions, resume: bool = False, hooks: dict | None = None):
    """``--objective regression --networks N``: N members in ``out/training_state/member_i``, joined into ``out``
    (the bundle to use). Returns (bundle, the first member's history)."""
    out = Path(out)
    n = check_networks(opts.networks)
    folders = member_folders(out / STATE_DIR / "member_1", n, "member_{i}")
    if resume and not saved_step(folders[0]):
        raise VirtualStainError(f"nothing to resume: {folders[0]} holds no saved training state; start without "
                                "--resume")
    train_members(spec, folders, opts, resume, "network", hooks or {})
    first = load_bundle(folders[0])
    bundle = join_networks(first, folders[1:], out, half=opts.half_weights)
    return bundle, first.config.training.get("history", [])
