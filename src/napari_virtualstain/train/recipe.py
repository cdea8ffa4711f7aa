"""The recommended recipe in one call: the mean network, the refinement on it, then the sampling defaults.

``virtualstain train DATA -o B`` with no ``--objective`` runs this; the published forms stay one option away
(``--objective residual_shift`` CellResDM as published, ``regression`` the one-pass network alone, ``ddpm``).

1. mean network mu (``--objective regression``, with the run's loss, distance head and augmentation), written to
   ``B/training_state/mean_network`` (resume state, not a bundle to use); with ``--networks N`` N of them under N
   seeds (``mean_network``, ``mean_network_2``, ...), and mu is their mean (``train/ensemble.py``);
2. refinement (mean-anchored residual shift, kappa 1, MSE; half the steps): starts as mu exactly and is stored in
   ``B`` with mu inside — one folder, one id;
3. sampling defaults (steps, samples, labels route, TTA) chosen on the validation regions (``train/defaults.py``);
   0 steps — mu alone — where the refinement does not beat it there.

``--resume`` continues whichever stage was running; if the mean network trains on (a larger ``--steps``), the
refinement starts again, because it was fitted to the old mu.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

from ..core.errors import VirtualStainError
from .defaults import choose_sampling, write_sampling
from .ensemble import check_networks, join_networks, member_folders, saved_step, train_members
from .loop import STATE_DIR, TrainOptions, train

MEAN_DIR = f"{STATE_DIR}/mean_network"
MEAN_ENSEMBLE_DIR = f"{STATE_DIR}/mean_networks"  # --networks N > 1: the members joined, what the refinement refines
RECIPE = "recommended: mean network, refinement on it (kappa 1), sampling defaults chosen on validation"


def refinement_steps(steps: int) -> int:
    return max(1, steps // 2)


def _hooks(stage: int, on_step, on_validate) -> dict:
    return {"on_step": (lambda step, loss: on_step(stage, step, loss)) if on_step else None,
            "on_validate": (lambda record: on_validate(stage, record)) if on_validate else None}


def train_recommended(spec, out: str | Path, opts: TrainOptions, resume: bool = False, log=None,
                      on_step=None, on_validate=None):
    """Run the three stages (module doc) into ``out``; returns (bundle, refinement history).

    ``on_step(stage, step, loss)`` and ``on_validate(stage, record)``: as ``train``'s, with the stage (1 or 2)."""
    out = Path(out)
    say = log or (lambda text: print(text, file=sys.stderr, flush=True))
    mean_dir = out / MEAN_DIR
    mean_opts = replace(opts, objective="regression", residual_source="mean_input", mean_from=None,
                        stage="stage 1/3 mean network", extra={**opts.extra, "recipe_stage": "mean network"})
    mean_dirs = member_folders(mean_dir, check_networks(opts.networks), "mean_network_{i}")
    mean_step, ref_step = saved_step(mean_dir), saved_step(out)
    if resume and not mean_step:
        raise VirtualStainError(f"nothing to resume: {mean_dir} holds no saved training state; start without --resume")
    mean_moved = train_members(spec, mean_dirs, mean_opts, resume, "stage 1/3 mean network", _hooks(1, on_step,
                                                                                                  on_validate))
    if not mean_moved:
        say(f"stage 1/3 mean network: done ({mean_step} steps{f', {len(mean_dirs)} networks' if len(mean_dirs) > 1 else ''})")
    mean_src = mean_dir
    if len(mean_dirs) > 1:
        mean_src = out / MEAN_ENSEMBLE_DIR
        join_networks(mean_dir, mean_dirs[1:], mean_src)
        say(f"stage 1/3 mean network: mu is the mean of {len(mean_dirs)} networks (seeds {opts.seed}-"
            f"{opts.seed + len(mean_dirs) - 1})")
    ref_opts = replace(opts, objective="residual_shift", residual_source="mean_prediction", mean_from=str(mean_src),
                       kappa=1.0, steps=refinement_steps(opts.steps), loss="mse", distance_head=False, augment=False,
                       init=None, stage="stage 2/3 refinement",
                       extra={**opts.extra, "recipe": RECIPE})
    ref_resume = resume and ref_step > 0 and not mean_moved
    if resume and ref_step and mean_moved:
        say("stage 2/3 refinement: starts again, since the mean network it refines has trained on")
    bundle, history = train(spec, out, ref_opts, resume=ref_resume, **_hooks(2, on_step, on_validate))
    if bundle is None:  # not rank 0 under torchrun
        return None, history
    say("stage 3/3 sampling defaults: chosen on the validation regions")
    try:
        result = choose_sampling(bundle, spec, log=lambda text: say(f"  {text}"))
    except VirtualStainError as exc:  # no validation regions: keep the bundle, say why there are no defaults
        say(f"  no defaults chosen: {exc}")
        return bundle, history
    bundle = write_sampling(out, result["chosen"], "napari_virtualstain.train.recipe on the validation regions")
    (out / "defaults.json").write_text(json.dumps(result, indent=1))
    say(f"  chosen: {result['chosen']}")
    if result["chosen"].get("steps") == 0:
        say("  the refinement did not beat the mean network on the validation regions: predictions default to the "
            "mean network alone (--steps 1 or more runs the refinement; uncertainty maps use its chain)")
    return bundle, history
