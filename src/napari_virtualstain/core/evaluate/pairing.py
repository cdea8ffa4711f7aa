"""Which files and channels are compared: predictions, truths and labels paired by stem and channel name."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import VirtualStainError
from ..io import list_images, output_name, read_channel_names, read_image


def _stem(path: Path) -> str:
    return path.name.split(".")[0]  # as `virtualstain predict` names its outputs (a.ome.tif -> a)


def files_by_stem(folder: Path, what: str) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in list_images(folder):
        s = _stem(p)
        if s in out:
            raise VirtualStainError(f"{what} folder {folder} has two files for the image {s!r}: {out[s].name} and "
                                    f"{p.name}; keep one")
        out[s] = p
    return out


def label_file_name(stem: str, name: str) -> str:
    return output_name("labels", stem, name)


def _finite(a: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(a)
    if not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
        raise VirtualStainError(f"{what} has dtype {a.dtype}; expected a numeric image")
    a = a.astype(np.float64)
    bad = ~np.isfinite(a)
    if bad.any():
        raise VirtualStainError(f"{what} holds {int(bad.sum())} NaN/Inf pixel(s); it cannot be scored")
    return a


def read_prediction(path: Path) -> tuple[np.ndarray, list[str] | None]:
    arr = read_image(path)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise VirtualStainError(
            f"prediction {path} has shape {arr.shape}; evaluate compares one plane (C, Y, X) per file. Predict a "
            "stack plane by plane with --plane (not --all-planes), one file per plane"
        )
    names = read_channel_names(path) if path.suffix.lower() in (".tif", ".tiff") else []
    return _finite(arr, f"prediction {path}"), (names if len(names) == arr.shape[0] else None)


def read_truth(path: Path, truth_channels: list[str] | None) -> tuple[np.ndarray, list[str] | None]:
    arr = read_image(path)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4) and arr.shape[0] > 4:
        raise VirtualStainError(f"truth {path} looks like an RGB image {arr.shape}; save each stain as a grey "
                                "channel (2D, or CYX with --truth-channels)")
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise VirtualStainError(f"truth {path} has shape {arr.shape}; expected 2D (one channel) or (C, Y, X)")
    if truth_channels:
        if len(truth_channels) != arr.shape[0]:
            raise VirtualStainError(
                f"--truth-channels names {len(truth_channels)} channel(s) ({', '.join(truth_channels)}) but truth "
                f"{path} has {arr.shape[0]} (shape {arr.shape}); name every channel, in order"
            )
        names = list(truth_channels)
    else:
        names = read_channel_names(path) if path.suffix.lower() in (".tif", ".tiff") else []
        if len(names) != arr.shape[0]:
            names = None
            if arr.shape[0] > 1:
                raise VirtualStainError(
                    f"truth {path} has {arr.shape[0]} channels (shape {arr.shape}) and no channel names; name them "
                    "in order with --truth-channels (e.g. --truth-channels Hoechst,Actin) as the predictions name them"
                )
    return _finite(arr, f"truth {path}"), names


def read_labels(path: Path, what: str) -> np.ndarray:
    arr = read_image(path)
    if arr.ndim != 2:
        raise VirtualStainError(f"{what} {path} has shape {arr.shape}; expected one 2D label image (Y, X)")
    return arr


def pair_channels(method, pred_names, truth_names, pred_path, truth_path, notes) -> list[tuple[str, int, int]]:
    """(name, prediction index, truth index) for channels present in both; the rest is noted."""
    if truth_names is None and pred_names is None:
        return [("channel 0", 0, 0)]
    if truth_names is None:  # a 2D truth without a name: the prediction's first channel
        notes.append(f"truth images without a channel name are compared with the prediction's first channel "
                     f"{pred_names[0]!r} (name them with --truth-channels to choose)")
        return [(pred_names[0], 0, 0)]
    if pred_names is None:
        if len(truth_names) == 1:
            return [(truth_names[0], 0, 0)]
        raise VirtualStainError(f"prediction {pred_path} has one unnamed channel but the truth has "
                                f"{len(truth_names)} ({', '.join(truth_names)}); write predictions with channel names")
    pairs = [(n, pred_names.index(n), i) for i, n in enumerate(truth_names) if n in pred_names]
    if not pairs:  # forgive case only
        low = [p.lower() for p in pred_names]
        pairs = [(pred_names[low.index(n.lower())], low.index(n.lower()), i)
                 for i, n in enumerate(truth_names) if n.lower() in low]
    if not pairs:
        raise VirtualStainError(
            f"unknown channel names: truth {truth_path.name} has channel(s) {', '.join(map(repr, truth_names))} but "
            f"prediction {pred_path} has {', '.join(map(repr, pred_names))}; name the truth channels with "
            "--truth-channels as the predictions name them"
        )
    matched = {p[0].lower() for p in pairs}
    missing = [n for n in truth_names if n.lower() not in matched]
    import re

    intervals = {n for n in pred_names if re.search(r" (low|high) [0-9.]+%$", n)}  # scored as coverage
    extra = [n for n in pred_names if n.lower() not in matched and n not in intervals]
    if missing:
        notes.append(f"truth channel(s) {', '.join(map(repr, missing))} not predicted by method {method!r}: not scored")
    if extra:
        notes.append(f"method {method!r}: channel(s) {', '.join(map(repr, extra))} have no truth channel: not scored "
                     "(instance labels are scored with --labels)")
    return pairs
