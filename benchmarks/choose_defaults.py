"""Choose a stain bundle's sampling defaults (steps, samples, labels route, test-time augmentation) on its own
validation regions: a thin wrapper over ``napari_virtualstain.train.defaults`` (the rules are in its docstring).

    python benchmarks/choose_defaults.py runs/demo-stain configs/demo-stain.yaml --write \\
        -o benchmarks/results/defaults_demo-stain.json
    python benchmarks/choose_defaults.py my-model my_data/ --input-names brightfield   # a data folder works too
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from napari_virtualstain.core.bundle import load_bundle
from napari_virtualstain.core.errors import VirtualStainError
from napari_virtualstain.train.data import load_config, load_folder
from napari_virtualstain.train.defaults import choose_sampling, write_sampling


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle")
    p.add_argument("data", help="the training config or data folder the bundle was trained from (its validation regions)")
    p.add_argument("--input-names", default=None, help="data folder: input channel names, as given to train")
    p.add_argument("--steps", default="1,2,3,4,8,15")
    p.add_argument("--samples", default="1,2,4,8")
    p.add_argument("--tta", default="1,4,8")
    p.add_argument("--tolerance", type=float, default=0.01)
    p.add_argument("--write", action="store_true", help="store the chosen defaults in the bundle's config.json")
    p.add_argument("-o", "--output", default=None)
    args = p.parse_args(argv)
    try:
        bundle = load_bundle(args.bundle)
        data = Path(args.data)
        spec = (load_folder(data, args.input_names.split(",") if args.input_names else None) if data.is_dir()
                else load_config(data))
        result = choose_sampling(bundle, spec, steps=_ints(args.steps), samples=_ints(args.samples),
                                 tta=_ints(args.tta), tolerance=args.tolerance, log=print)
    except VirtualStainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result["bundle"] = args.bundle
    print("chosen:", result["chosen"])
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1))
    if args.write:
        write_sampling(bundle.path, result["chosen"], "napari_virtualstain.train.defaults on the validation regions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
