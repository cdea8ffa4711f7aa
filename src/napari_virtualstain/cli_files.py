"""The files side of the CLI: which inputs, which planes, one file's prediction and its outputs, resume keys.

Shared by ``virtualstain predict`` (in process) and its Dask tasks (``runner.py``), and by ``translate``; no argparse
parser here (``cli.py`` builds it), so workers import this module without the CLI.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import sys
from pathlib import Path

import numpy as np

from .core.errors import VirtualStainError
from .core.settings import RunSettings

log = logging.getLogger("napari_virtualstain")


def _parse_plane(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise VirtualStainError(f"--plane takes comma-separated integers (e.g. 1,0), got {text!r}") from None


def expand_inputs(paths: list[str]) -> list:
    """Files, folders of files, and OME-Zarr stores (one ``NgffField`` per field of a plate)."""
    from .core.io import IMAGE_SUFFIXES, list_images

    from .core.ngff import is_ngff, list_fields

    out: list = []
    for p in map(Path, paths):
        if is_ngff(p):  # an OME-Zarr image or HCS plate: its fields
            out += list_fields(p)
        elif p.is_dir():
            found = list_images(p)
            if not found:
                raise VirtualStainError(f"folder {p} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            out += found
        elif p.exists():
            out.append(p)
        else:
            raise VirtualStainError(f"input {p} does not exist")
    return out


def expand_files(paths: list[str]) -> list[Path]:
    """``expand_inputs`` for commands that read whole files (translate, phenotype): OME-Zarr stores are refused."""
    from .core.ngff import NgffField

    items = expand_inputs(paths)
    if any(isinstance(i, NgffField) for i in items):
        raise VirtualStainError("this command reads image files (TIFF, PNG); OME-Zarr stores are read by "
                                "'virtualstain predict' — export the fields you need to TIFF")
    return items


def prepare_outputs(items: list, args) -> None:
    """Before any task writes: the output plates' metadata, mirroring each input plate (existing fields stay)."""
    from .core.ngff import NgffField, create_plate, plate_layout

    stores = sorted({i.store for i in items if isinstance(i, NgffField)})
    if not stores:
        return
    if any(not isinstance(i, NgffField) for i in items):
        raise VirtualStainError("give either image files or OME-Zarr stores to one predict, not both (their outputs "
                                "are written differently)")
    if len(stores) > 1 and Path(args.output).suffix.lower() == ".zarr":
        raise VirtualStainError(f"{len(stores)} OME-Zarr inputs cannot all be written into {args.output}; give an "
                                "output folder (-o out/) and each gets its own store there")
    for store in stores:
        if plate_layout(store) is not None:
            create_plate(ngff_output(NgffField(store), args), store, [i for i in items if i.store == store])


def plane_help(axes: str | None, shape: tuple[int, ...], plane_ndim: int) -> str:
    """How --plane maps onto this file's leading axes, in the file's own order (e.g. C then T for an OME CTYX)."""
    extra = len(shape) - plane_ndim
    if extra <= 0:
        return ""
    letters = list(axes) if axes and len(axes) == len(shape) else [f"axis {i}" for i in range(len(shape))]
    lead = letters[:extra]
    sizes = ", ".join(f"{a} 0-{n - 1}" for a, n in zip(lead, shape))
    example = ",".join(str(min(1, n - 1)) for n in shape[:extra])
    named = f"the file's axes are {' '.join(letters)} (shape {tuple(shape)})" if axes else f"shape {tuple(shape)}"
    return (f"{named}: --plane takes one index per leading axis, in that order ({sizes}), e.g. --plane {example}; "
            f"give fewer indices with --all-planes to predict every plane of the rest (e.g. --plane {example.split(',')[0]}"
            " --all-planes)")


def iter_planes(image: np.ndarray, plane: tuple[int, ...] | None, all_planes: bool, plane_ndim: int,
                axes: str | None = None):
    """Yield (plane index, array of ``plane_ndim`` dims): the chosen plane, or every plane with --all-planes."""
    extra = image.ndim - plane_ndim
    if plane is not None:
        if len(plane) > max(extra, 0):
            raise VirtualStainError(f"--plane {','.join(map(str, plane))} has {len(plane)} indices but the image has "
                                    f"{max(extra, 0)} leading axis/axes; {plane_help(axes, image.shape, plane_ndim)}")
        try:
            image = image[plane]
        except IndexError:
            raise VirtualStainError(f"--plane {','.join(map(str, plane))} is out of range; "
                                    f"{plane_help(axes, np.shape(image), plane_ndim)}") from None
    elif (extra > 0 and not all_planes and axes and len(axes) == image.ndim and "S" not in axes
          and not (extra == 1 and image.shape[0] == 1)):
        raise VirtualStainError(f"this checkpoint predicts from one {plane_ndim}D plane; "
                                f"{plane_help(axes, image.shape, plane_ndim)}")
    extra = image.ndim - plane_ndim
    if extra <= 0 or not all_planes:
        yield (plane or ()), image
        return
    for idx in itertools.product(*(range(n) for n in image.shape[:extra])):
        yield (*(plane or ()), *idx), image[idx]


def _parse_window(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise VirtualStainError(f"--window takes two fractions LOW,HIGH of the schedule (e.g. 0.3,0.8), got {text!r}") from None
    return low, high


SETTINGS = ("seed", "samples", "steps", "sampler", "tile_size", "tile_overlap", "block_size", "labels_from",
            "boundary_threshold", "foreground_threshold", "center_threshold", "no_labels", "uncertainty", "seeds", "window", "flag_map",
            "flag_threshold", "flag_otsu", "flag_min_area", "flag_merge", "flag_max_regions", "flag_group", "flag_max_area", "plane", "all_planes",
            "channel_axis", "pixel_size", "rescale", "precision", "tta", "objects", "interval", "members", "fill_nan")


def settings_key(bundle, args) -> str:
    """What makes an output what it is: the checkpoint's id and every option that changes pixels (not speed)."""
    import hashlib

    settings = {"bundle_id": bundle.id, **{k: getattr(args, k, None) for k in SETTINGS}}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def output_stem(path: Path) -> str:
    return path.name.split(".")[0]


def already_written(out: Path, path, key: str, args) -> bool:
    """True when this file's (or OME-Zarr field's) outputs exist, complete, from the same checkpoint and settings
    (files are renamed into place only when complete, so an existing one is whole; a field's provenance is written
    last)."""
    from .core.io import read_provenance
    from .core.ngff import NgffField, field_done

    if isinstance(path, NgffField):
        return field_done(ngff_output(path, args), key)

    from .core.io import output_name

    stain = out / output_name("stain", output_stem(path))
    if not stain.is_file():
        return False
    try:
        prov = read_provenance(stain)
    except Exception:  # noqa: BLE001 - an unreadable file is recomputed, not trusted
        return False
    if prov.get("settings_key") != key:
        return False
    return all((out / name).is_file() for name in prov.get("outputs", []))


def predict_planes(image, axes: str | None, name: str, input_file: str, bundle, args, input_um: float | None):
    """The selected plane(s) of one image -> [(plane index, StainResult)] with labels, and the uncertainty maps;
    shared by TIFF files and OME-Zarr fields."""
    from .core.inputs import labels_warning, pixel_size_warning
    from .core.tasks.stain import predict_stain
    from .core.uncertainty import predict_uncertainty

    plane = _parse_plane(args.plane)
    n_in = len(bundle.config.input_channels)
    plane_ndim = 2 if n_in == 1 and args.channel_axis is None else 3
    from .core.tasks.stain import label_thresholds

    thresholds = label_thresholds(bundle.config, boundary_threshold=args.boundary_threshold,
                                  foreground_threshold=args.foreground_threshold,
                                  center_threshold=getattr(args, "center_threshold", None))
    seeds = [args.seed + k for k in range(args.seeds)]
    warning = None if args.rescale else pixel_size_warning(bundle.config.pixel_size_um, input_um, bundle.config.name)
    if warning:
        print(f"warning: {name}: {warning}", file=sys.stderr)
    if getattr(args, "objects", False) and getattr(args, "interval", None) and not args.no_labels:
        from .core.confidence import object_interval_note

        if note := object_interval_note(bundle):
            print(f"warning: {note}", file=sys.stderr)
    results, maps = [], []
    for idx, arr in iter_planes(image, plane, args.all_planes, plane_ndim, axes):
        arr = np.asarray(arr)  # a lazy (Dask) field computes this plane only
        if getattr(args, "fill_nan", False) and np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            from .core.normalize import fill_non_finite

            print(f"note: {name}: {int((~np.isfinite(arr)).sum())} NaN/Inf pixel(s) filled from their nearest "
                  "finite pixel (--fill-nan)", file=sys.stderr)
            arr = fill_non_finite(arr)
        what = name + (f" plane {idx}" if idx else "")
        log.info("predicting %s %s", what, arr.shape)
        if not results and (note := labels_warning(arr, what)):
            print(f"warning: {note}", file=sys.stderr)
        common = dict(
            channel_axis=args.channel_axis, sampler=args.sampler, steps=args.steps, settings=run_settings(args, what),
            make_labels=not args.no_labels, input_name=what, labels_from=args.labels_from, thresholds=thresholds,
        )
        if args.uncertainty:
            unc = predict_uncertainty(bundle, arr, mode=args.uncertainty, seeds=seeds,
                                      window=_parse_window(args.window), **common)
            res = unc.stain
            maps.append(unc.maps)
        elif getattr(args, "objects", False) or getattr(args, "interval", None):
            res = _predict_with_trust(bundle, arr, args, common, thresholds, input_um)
            results.append((idx, res))
            res.provenance.update({"plane": list(idx), "input_file": input_file, **thresholds})
            continue
        else:
            res = predict_stain(bundle, arr, seed=args.seed, samples=args.samples, pixel_size_um=input_um,
                                rescale=args.rescale, tta=args.tta, **common)
        res.provenance.update({"plane": list(idx), "input_file": input_file})
        results.append((idx, res))
    return results, maps


def _predict_with_trust(bundle, arr, args, common: dict, thresholds: dict, input_um):
    """The ensemble route of predict (--objects, --interval): the prediction, its labels, per-nucleus tables
    (``res.provenance['objects']``, written by ``predict_file``) and calibrated low/high channels."""
    from .core.confidence import add_interval_channels, object_tables, predict_ensemble

    if args.samples not in (None, 1) or args.rescale:
        raise VirtualStainError("--objects / --interval build their own ensemble: leave out --samples and --rescale")
    opts = {k: v for k, v in common.items() if k not in ("make_labels", "labels_from", "thresholds")}
    ens = predict_ensemble(bundle, arr, args.members, seed=args.seed, labels_from=args.labels_from,
                           thresholds=thresholds, make_labels=not args.no_labels, tta=args.tta,
                           pixel_size_um=input_um, **opts)
    res = ens.prediction
    if args.objects and res.labels:
        res.provenance["objects"] = object_tables(bundle, ens, args.interval or None)
    if args.interval:
        add_interval_channels(bundle, ens, args.interval)
    return res


def predict_file(path: Path, bundle, args, key: str) -> list[Path]:
    """One input file (every selected plane) -> its output files; the unit of work in-process and on Dask workers."""
    from .core.io import output_name, read_image_file, write_channels, write_labels

    out = Path(args.output)
    f = read_image_file(path)  # the image, its axes and its pixel size from one open of the file
    input_um = args.pixel_size or f.pixel_size_um
    results, maps = predict_planes(f.data, f.axes, path.name, str(path), bundle, args, input_um)
    stem = output_stem(path)
    first = results[0][1]
    label_files = [output_name("labels", stem, name) for name in first.labels]
    tables = first.provenance.pop("objects", None)
    for _, r in results[1:]:
        r.provenance.pop("objects", None)
    table_files = [output_name("objects", stem, name) for name in tables or {}]
    if tables and len(results) > 1:
        raise VirtualStainError("--objects takes one plane per file (give --plane, not --all-planes)")
    prov = first.provenance | {"planes": [list(i) for i, _ in results], "settings_key": key,
                               "outputs": label_files + table_files}

    def stacked(arrays):
        return np.stack(arrays) if len(arrays) > 1 else arrays[0]

    written = []
    for name, file in zip(first.labels, label_files):  # labels first: the stain file marks the field as done
        written.append(write_labels(out / file, stacked([r.labels[name] for _, r in results]), prov | {"labels": name}))
    if tables:
        from .core.confidence import write_table

        for (name, rows), file in zip(tables.items(), table_files):
            written.append(write_table(out / file, rows, prov | {"labels": name, "members": args.members}))
    if args.uncertainty:
        written += _write_uncertainty(out, stem, bundle.config, first.channel_names, maps, prov, args)
    written.insert(0, write_channels(out / output_name("stain", stem), stacked([r.image for _, r in results]),
                                     first.channel_names, prov, input_um or bundle.config.pixel_size_um))
    return written


def ngff_output(field, args) -> Path:
    """Where a field's prediction goes: the output plate's field of the same path (``-o out.zarr`` is the plate
    itself; another ``-o`` holds one store per input, named after it)."""
    from .core.ngff import plate_layout

    base = Path(args.output)
    if base.suffix.lower() != ".zarr":
        is_plate = bool(field.path) or plate_layout(field.store) is not None
        base = base / (field.store.name if is_plate else f"{output_stem(field.store)}_virtualstain.ome.zarr")
    return base / field.path if field.path else base


def predict_ngff_field(field, bundle, args, key: str) -> list[Path]:
    """One OME-Zarr field (lazily read: only its plane is computed) -> the same field of the output store."""
    if args.uncertainty or args.all_planes:
        raise VirtualStainError("OME-Zarr inputs are predicted one plane per field, without --uncertainty or "
                                "--all-planes; export the fields to TIFF for those")
    import dask

    with dask.config.set(scheduler="synchronous"):  # on a Dask worker, compute here: not as tasks sent back to
        return _predict_ngff_field(field, bundle, args, key)  # the cluster, whose results the worker would hold


def _predict_ngff_field(field, bundle, args, key: str) -> list[Path]:
    from .core.ngff import read_field, select_inputs, write_field

    fd = read_field(field)
    data, axes, _ = select_inputs(fd, bundle.config.input_names)
    n_in = len(bundle.config.input_channels)
    plane_ndim = 2 if n_in == 1 and args.channel_axis is None else 3
    while data.ndim > plane_ndim and data.shape[0] == 1 and args.plane is None:  # singleton T / Z
        data, axes = data[0], axes[1:]
    input_um = args.pixel_size or fd.pixel_size_um
    if getattr(args, "objects", False):
        raise VirtualStainError("--objects writes CSV tables beside TIFF outputs; OME-Zarr fields are predicted "
                                "without it (export the fields you need to TIFF)")
    results, _ = predict_planes(data, axes, field.name, str(field.location), bundle, args, input_um)
    res = results[0][1]
    target = ngff_output(field, args)
    prov = res.provenance | {"settings_key": key, "input_field": field.path, "input_store": str(field.store)}
    write_field(target, res.image, res.channel_names, res.labels, prov, input_um or bundle.config.pixel_size_um)
    return [target]


def predict_item(item, bundle, args, key: str) -> list[Path]:
    """A TIFF file or an OME-Zarr field: the unit of work in process and on Dask workers."""
    from .core.ngff import NgffField

    if isinstance(item, NgffField):
        return predict_ngff_field(item, bundle, args, key)
    return predict_file(item, bundle, args, key)


def _write_uncertainty(out: Path, stem: str, config, channel_names, maps: list[dict], prov: dict, args) -> list[Path]:
    """Maps as one ImageJ file (channels '<name> <map>'); flags of each stain channel as labels + one CSV."""
    from .core.io import output_name, write_channels, write_labels
    from .core.uncertainty import flag_regions, write_flag_table

    map_names = list(maps[0])
    arrays = [np.concatenate([m[k] for k in map_names]) for m in maps]  # per plane: (maps * C, Y, X)
    names = [f"{c} {k}" for k in map_names for c in channel_names]
    stack = np.stack(arrays) if len(arrays) > 1 else arrays[0]
    written = [write_channels(out / output_name("uncertainty", stem), stack, names, prov, config.pixel_size_um)]
    flag_map = args.flag_map or ("std_seeds" if "std_seeds" in maps[0] else "std_steps")
    if flag_map not in maps[0]:
        raise VirtualStainError(f"--flag-map {flag_map} was not computed with --uncertainty {args.uncertainty}")
    kinds = [s.kind for s in config.output_channels]
    flagged = [c for c, k in zip(channel_names, kinds) if k == "stain"] or list(channel_names)
    rows_path = out / output_name("flags_table", stem)
    rows = []
    budget = getattr(args, "flag_max_area", 0.5)  # a fraction in (0, 1], checked by the parser
    for ch in flagged:
        c = channel_names.index(ch)
        labs = []
        for p, m in enumerate(maps):
            fr = flag_regions(m[flag_map][c], args.flag_threshold, otsu=args.flag_otsu, min_area=args.flag_min_area,
                              merge_radius=args.flag_merge, max_regions=args.flag_max_regions or None,
                              group=getattr(args, "flag_group", True),
                              max_box_fraction=budget if budget < 1.0 else None)
            labs.append(fr.labels)
            plane = prov["planes"][p] if len(maps) > 1 else None
            rows += [{"channel": ch, "plane": plane, "map": flag_map, "threshold": fr.threshold, **r} for r in fr.table]
        settings = fr.settings | {"map": flag_map, "channel": ch}
        lab = np.stack(labs) if len(labs) > 1 else labs[0]
        written.append(write_labels(out / output_name("flags", stem, ch), lab, prov | {"flags": settings}))
    write_flag_table(rows_path, rows, extra_columns=["channel", "plane", "map", "threshold"])
    written.append(rows_path)
    return written


def progress_printer(what: str, min_interval: float = 1.0):
    """One line per finished step (at most one a second), and 100 % exactly once per phase (the network, then the
    labels of a big field, block by block)."""
    import time

    from .core.settings import time_left

    state = {"step": None, "printed": 0.0, "done": set(), "phase": None, "t0": time.monotonic()}

    def report(p):
        if p.phase in state["done"]:
            return
        now = time.monotonic()
        if p.phase != state["phase"]:  # the remaining time is estimated per phase
            state.update(phase=p.phase, t0=now, step=None)
        key = (p.block, p.step)
        if p.done:
            state["done"].add(p.phase)
            blocks = f"{p.num_blocks} blocks" if p.num_blocks > 1 else ""
            text = (f"labels, {blocks}" if p.phase == "labels"
                    else f"{blocks}, " * bool(blocks) + f"{p.num_steps}/{p.num_steps} steps")
            print(f"  {what}: 100% ({text})", file=sys.stderr, flush=True)
        elif key != state["step"] and (state["step"] is None or now - state["printed"] >= min_interval):
            eta = time_left(now - state["t0"], p.fraction)
            text = p.describe().rsplit(" · tile", 1)[0]
            print(f"  {what}: {int(100 * p.fraction):3d}% ({text}{', ' + eta if eta else ''})", file=sys.stderr,
                  flush=True)
            state["printed"] = now
        state["step"] = key

    return report


PRECISIONS = {"auto": None, "bf16": True, "float32": False}


def run_settings(args, what: str | None = None) -> RunSettings:
    """The core's run settings from a command's options (the fields a command has no option for keep the core's
    defaults), with a progress printer for ``what`` unless ``--quiet``."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(RunSettings)
             if f.name not in ("half", "progress", "should_cancel") and hasattr(args, f.name)}
    return RunSettings(
        **given, half=PRECISIONS[getattr(args, "precision", "auto")],
        progress=progress_printer(what) if what is not None and not getattr(args, "quiet", False) else None)
