"""``virtualstain train``: a folder or config in, a bundle out (the recommended recipe unless an objective is given)."""

from __future__ import annotations

import json
import logging
import shlex
import sys
from pathlib import Path

from ..core.errors import VirtualStainError
from .common import DefaultsFormatter, split_names

log = logging.getLogger("napari_virtualstain")


def cmd_train(args) -> int:
    from ..train.loop import TrainOptions, train
    from ..train.specs import load_training_spec

    spec = load_training_spec(args.data, args.task, split_names(args.input_names), split_names(args.stain_names),
                              args.channel_axis)
    if args.name:
        spec.name = args.name
    elif Path(args.data).is_dir():  # a data folder is usually called 'train': name the bundle after its own folder
        spec.name = Path(args.output).resolve().name or spec.name
    if args.pixel_size:
        spec.pixel_size_um = args.pixel_size
    if args.val_fraction is not None and hasattr(spec, "val_fraction"):
        spec.val_fraction = args.val_fraction
    from ..train.classcond_data import ClassCondSpec

    classcond = isinstance(spec, ClassCondSpec)
    if classcond and args.init:
        raise VirtualStainError("--init fine-tunes virtual-stain models; class-conditional training starts from scratch")
    if args.invariant is not None:
        if not classcond:
            raise VirtualStainError("--invariant is for class-conditional training (--task classcond): a stain model's "
                                    "inputs are already its conditioning")
        spec.invariant = split_names(args.invariant) or []
        spec.check_invariant()
    opts = TrainOptions(
        objective=args.objective or ("ddpm" if classcond else "residual_shift"), steps=args.steps, batch_size=args.batch_size, crop_size=args.crop_size, lr=args.lr,
        ema_decay=args.ema_decay, weight_decay=args.weight_decay, val_every=args.val_every, seed=args.seed,
        device=args.device,
        block_out_channels=tuple(int(v) for v in args.channels.split(",")), layers_per_block=args.layers_per_block,
        tile_size=args.tile_size, tile_overlap=args.tile_overlap, half_weights=args.half_weights,
        command="virtualstain " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        prediction_type=args.prediction_type, precision=args.precision, lr_schedule=args.lr_schedule,
        residual_source=args.residual_source or "mean_input", mean_from=args.mean_from, kappa=args.kappa,
        max_minutes=args.max_minutes, init=args.init, loss=args.loss, distance_head=args.distance_head, augment=args.augment,
        elastic=args.elastic, plane_jitter=args.plane_jitter,
        networks=args.networks,
        extra={"cond_dropout": args.cond_dropout} if args.cond_dropout is not None else {},
    )
    from ..train import distributed

    multi = distributed.launched_by_torchrun()
    recipe = (not classcond and args.objective is None and args.residual_source is None and not args.mean_from)
    if args.networks != 1:
        from ..train.ensemble import check_networks

        check_networks(args.networks)
        if not recipe and opts.objective != "regression":
            raise VirtualStainError("--networks trains the one-pass network under several seeds: use it with the "
                                    "recommended recipe (no --objective) or --objective regression")
        if multi:
            raise VirtualStainError("--networks under torchrun is not supported: train on one process, or train "
                                    "each network with its own --seed and join them (docs/training.md)")
    if recipe:
        from ..train.recipe import train_recommended

        bundle, history = train_recommended(spec, args.output, opts, resume=args.resume)
    elif args.networks > 1:
        from ..train.ensemble import train_ensemble

        bundle, history = train_ensemble(spec, args.output, opts, resume=args.resume)
    else:
        bundle, history = train(spec, args.output, opts, resume=args.resume)
    if bundle is not None:  # under torchrun, rank 0 reports
        print(bundle.summary())
        if history and "val" in history[-1]:
            print("validation (held-out):", json.dumps(history[-1]["val"], indent=1))
    if multi:  # the bundle is written: leave without an interpreter shutdown that can hang on gloo's threads
        distributed.exit_now(0)
    return 0


def add_parsers(sub) -> None:
    tr = sub.add_parser(
        "train", help="train a bundle on your own images", formatter_class=DefaultsFormatter,
        description="Train a bundle on your own images (docs/training.md). Validation: images marked 'split: val' "
                    "in a config are held out whole; otherwise the right-hand --val-fraction (0.15) of every image "
                    "is held out and never trained on. Training starts by printing which regions train and which "
                    "are held out. Progress goes to stderr: a bar on a terminal, a plain line every 5 percent in a log.",
    )
    tr.add_argument("data", help="folder (input/, target/, labels/NAME/) or YAML/JSON training config")
    tr.add_argument("--output", "-o", required=True, help="bundle folder to write (and resume from)")
    tr.add_argument("--objective", choices=["residual_shift", "ddpm", "regression"], default=None,
                    help="none given (stain): the recommended recipe in one bundle - mean network, refinement on it, "
                         "sampling defaults chosen on validation (docs/training.md); residual_shift: the 15-step "
                         "CellResDM model as published; ddpm: a DDPM (stain: epsilon or --prediction-type v, DDIM/DDPM "
                         "sampling, uncertainty maps; classcond: the only one, v-prediction with zero terminal SNR); "
                         "regression: the one-pass network alone")
    tr.add_argument("--task", choices=["stain", "classcond"], default=None,
                    help="stain (default): paired input -> stain model; classcond: class-conditional DDPM for translate/"
                         "synthesize (implied by a CSV or a config with task: classcond)")
    tr.add_argument("--cond-dropout", type=float, default=None,
                    help="classcond: fraction of labels replaced by the null class (default 0.1), for guidance")
    tr.add_argument("--invariant", default=None, metavar="NAMES",
                    help="classcond: comma-separated channels a condition does not change (e.g. DNA): given to the "
                         "network as conditioning, never generated, kept exactly by translate (default: the config's "
                         "invariant:, else none = whole-image translation as PhenDiff)")
    tr.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], default="epsilon",
                    help="ddpm stain models: the UNet predicts the noise (epsilon, as DM4ISL) or v; v learns to use "
                         "the brightfield much sooner (docs/benchmarks.md)")
    tr.add_argument("--residual-source", choices=["mean_input", "mean_prediction"], default=None,
                    help="residual_shift: where the chain starts. mean_input: the mean input plane (CellResDM as "
                         "published); mean_prediction: mu(x) of the regression bundle given with --mean-from (predict, "
                         "then refine: the chain only adds what mu cannot know)")
    tr.add_argument("--mean-from", default=None, metavar="BUNDLE",
                    help="--residual-source mean_prediction: a regression bundle trained on the same data; its network "
                         "is frozen and stored inside the new bundle")
    tr.add_argument("--kappa", type=float, default=2.0, help="residual_shift: noise scale kappa of eq. (1)")
    tr.add_argument("--max-minutes", type=float, default=None,
                    help="time budget: after 20 steps, train only as many steps as fit (the lr schedule follows)")
    tr.add_argument("--init", default=None, metavar="BUNDLE",
                    help="fine-tune: start from this bundle's weights (a folder or a bundled name, e.g. demo-stain); "
                         "its architecture is kept (--channels is ignored) and so are its outputs when the data has "
                         "the same (else a new last layer); the input planes must match; recorded in the new bundle's "
                         "training.init_from")
    tr.add_argument("--loss", choices=["mse", "l1_msssim", "spotlight"], default="mse",
                    help="loss on the predicted stain/labels maps: mse; l1_msssim (0.5 L1 + 0.5 (1 - MS-SSIM), "
                         "Cytoland); spotlight (foreground-weighted MSE + soft Dice on the foreground, Spotlight)")
    tr.add_argument("--distance-head", action="store_true",
                    help="also learn a per-nucleus centre map ('<set> distance': distance to the boundary, 1 at the "
                         "centre) from the labels; predict --labels-from distance seeds nuclei at its peaks")
    tr.add_argument("--augment", action="store_true",
                    help="rotation (any angle), zoom 0.8-1.25, gamma/contrast/gain, noise and blur of the input, on "
                         "top of the flips and quarter turns (for few training images; with --distance-head it "
                         "paid from ~5,000 steps of 8 crops on, and lost below: docs/training.md)")
    tr.add_argument("--elastic", type=float, default=0.0, metavar="PX",
                    help="with --augment: also deform half of the crops elastically (a smooth random displacement "
                         "of PX px standard deviation; Ronneberger et al. 2015); 0 = off")
    tr.add_argument("--plane-jitter", action="store_true",
                    help="with --augment: also a gain (0.9-1.1) and offset (+-0.05) per input plane, for z-stacks "
                         "whose planes are normalised each on its own")
    tr.add_argument("--networks", type=int, default=1,
                    help="a deep ensemble: train the one-pass (mean) network N times under seeds SEED..SEED+N-1 and "
                         "predict with their mean (N times the training time and passes; on the scratch assay 2 "
                         "networks raised held-out nuclei F1 0.65 -> 0.69: docs/training.md); recipe and regression")
    tr.add_argument("--steps", type=int, default=2000, help="optimiser steps in all (a resumed run counts on)")
    tr.add_argument("--batch-size", type=int, default=8, help="random crops per step")
    tr.add_argument("--crop-size", type=int, default=128,
                    help="side of the square training crops in pixels (a multiple of the UNet's downsampling)")
    tr.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate (the peak with --lr-schedule cosine)")
    tr.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant",
                    help="cosine: 100-step warm-up, then cosine decay to 0 at --steps")
    tr.add_argument("--weight-decay", type=float, default=1e-4,
                    help="AdamW's decoupled weight decay (regularises a network that starts to memorise few images)")
    tr.add_argument("--ema-decay", type=float, default=0.999,
                    help="decay of the exponential moving average of the weights; the EMA weights are saved")
    tr.add_argument("--val-every", type=int, default=500,
                    help="every N steps: validate on the held-out regions, save the bundle and the resume state")
    tr.add_argument("--val-fraction", type=float, default=None,
                    help="hold out this right-hand fraction of every image when no image is marked split: val "
                         "(default: the config's val_fraction, else 0.15; 0 holds nothing out)")
    tr.add_argument("--seed", type=int, default=0, help="seed of the weights, crops and noise (same seed, same run)")
    tr.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cuda, mps or cpu")
    tr.add_argument("--channels", default="16,32,64,128", help="UNet widths per level")
    tr.add_argument("--layers-per-block", type=int, default=1, help="UNet ResNet blocks per level")
    tr.add_argument("--tile-size", type=int, default=128,
                    help="tile side the bundle predicts with (stored in it; 128/16 measured fastest on a CPU, "
                         "docs/benchmarks.md; larger tiles pay on a GPU)")
    tr.add_argument("--tile-overlap", type=int, default=16, help="overlap of neighbouring tiles (stored in the bundle)")
    tr.add_argument("--half-weights", action="store_true", help="store fp16 weights (half the size)")
    tr.add_argument("--precision", choices=["auto", "bf16", "float32"], default="auto",
                    help="auto: bf16 autocast where the CPU/GPU runs it fast (AVX-512 bf16, AMX, bf16 GPUs), "
                         "else float32; weights, optimiser and EMA stay float32")
    tr.add_argument("--resume", action="store_true",
                    help="continue from OUTPUT/training_state (raise --steps to train longer); the log's seconds "
                         "and the bundle's training.commands carry on")
    tr.add_argument("--name", default=None,
                    help="bundle name (default: a data folder gives the --output folder's name; a config its name:)")
    tr.add_argument("--pixel-size", type=float, default=None,
                    help="pixel size in um, stored in the bundle (default: the config's pixel_size_um, else none)")
    tr.add_argument("--input-names", default=None,
                    help="folder mode: comma-separated input channel names; name them (e.g. brightfield, phase), "
                         "else they are recorded as 'input' (or 'input 0', 'input 1', ...)")
    tr.add_argument("--stain-names", default=None,
                    help="folder mode: comma-separated target channel names (classcond: the image channel names); "
                         "default 'stain 0', 'stain 1', ...")
    tr.add_argument("--channel-axis", type=int, default=0, help="folder mode: channel axis of multi-channel files")
    tr.set_defaults(func=cmd_train)

