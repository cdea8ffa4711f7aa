"""Checkpoint bundles: a folder with ``config.json`` + ``model.safetensors``; loaded only through safetensors.

The schema and its validation are in ``schema.py``; here the files: loading (pickle refused), saving, the id. The
bundle id is the sha256 of the weights file, so two copies of the same weights have the same id wherever they live.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import torch

from .errors import BundleError
from .schema import (  # noqa: F401 - re-exported: the names every module imports from bundle
    DIFFUSION_OBJECTIVES,
    FORMAT,
    FORMAT_VERSION,
    KINDS,
    LABEL_ROUTES,
    MEAN_WEIGHTS_NAME,
    OBJECTIVES,
    RESIDUAL_SOURCES,
    TASKS,
    WEIGHTS_NAME,
    BundleConfig,
    ChannelSpec,
)

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".bin", ".tar")
_PICKLE_EXPLANATION = (  # the advice first: a notification may show only its start
    "Pick a checkpoint folder (config.json + model.safetensors) instead; pickle files can run code when loaded, so "
    "they are never opened. To convert trusted weights: safetensors.torch.save_file(state_dict, "
    "'model.safetensors') plus a config.json (docs/checkpoints.md)"
)


def refuse_pickle(path: Path) -> None:
    """Refuse anything that looks like a pickle/torch.save file, by suffix or by content."""
    if path.is_file():
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise BundleError(f"{path.name} is a PyTorch/pickle file. {_PICKLE_EXPLANATION}")
        with open(path, "rb") as fh:
            head = fh.read(4)
        if head[:1] == b"\x80" or head[:2] == b"PK":
            raise BundleError(f"{path.name} looks like a pickle or torch.save archive. {_PICKLE_EXPLANATION}")
        raise BundleError(
            f"{path} is a file; a checkpoint is a folder holding config.json and {WEIGHTS_NAME}"
        )


def _pickle_hint(folder: Path) -> str:
    """Why the .pt/.ckpt files a user may have put in the folder are not used."""
    others = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    return f" ({', '.join(others)} found: {_PICKLE_EXPLANATION})" if others else ""


class Bundle:
    """A loaded checkpoint: validated config + UNet weights (+ scheduler); cheap to keep in a small cache."""

    def __init__(self, config: BundleConfig, state_dict: dict[str, torch.Tensor], path: Path | None, bundle_id: str,
                 mean_state_dict: dict[str, torch.Tensor] | None = None,
                 network_state_dicts: list[dict[str, torch.Tensor]] | None = None):
        self.config = config
        self.state_dict = state_dict
        self.mean_state_dict = mean_state_dict
        self.network_state_dicts = network_state_dicts or []  # config.networks' weights, in order
        self.path = path
        self.id = bundle_id

    def _one_pass(self, unet_config: dict, state: dict, weights_name: str, field_name: str):
        """The one-pass network: one UNet, or the mean of it and the bundle's further networks (config.networks)."""
        first = _loaded_unet(unet_config, state, weights_name, field_name)
        if not self.network_state_dicts:
            return first
        from .unet import NetworkMean

        return NetworkMean([first] + [_loaded_unet(unet_config, m, name, field_name)
                                      for m, name in zip(self.network_state_dicts, self.config.networks)])

    @cached_property
    def unet(self):
        if self.config.objective == "regression":
            return self._one_pass(self.config.unet, self.state_dict, WEIGHTS_NAME, "unet")
        return _loaded_unet(self.config.unet, self.state_dict, WEIGHTS_NAME, "unet")

    @cached_property
    def mean_unet(self):
        """The one-pass mean predictor mu(x) of a mean-anchored bundle (None otherwise)."""
        if not self.config.anchored:
            return None
        return self._one_pass(self.config.mean_unet, self.mean_state_dict, MEAN_WEIGHTS_NAME, "mean_model.unet")

    def make_scheduler(self, sampler: str | None = None, steps: int | None = None):
        """The bundle's sampler with timesteps set (None for regression); see ``schedulers.make_scheduler``.

        Residual shift without ``steps``: the bundle's validated default (``sampling.steps``), else its full chain.
        0 steps: a mean-anchored bundle's mean prediction mu(x) alone, no refinement (the default where refining did
        not pay on validation, ``train.defaults``); a chain of no steps has no timesteps.
        """
        from .schedulers import make_scheduler

        if steps is None and self.config.objective == "residual_shift":
            steps = self.config.sampling.get("steps")
        return make_scheduler(self.config.objective, self.config.scheduler, sampler, steps,
                              zero_steps=self.config.takes_zero_steps)

    @property
    def short_id(self) -> str:
        return self.id[:12]

    def provenance(self) -> dict:
        return {
            "bundle_name": self.config.name,
            "bundle_id": self.id,
            "bundle_path": str(self.path) if self.path else None,
            "task": self.config.task,
            "objective": self.config.objective,
            "residual_source": self.config.residual_source if self.config.objective == "residual_shift" else None,
        }

    def summary(self) -> str:
        c = self.config
        outs = ", ".join(f"{o.name} ({o.kind})" for o in c.output_channels)
        given = f"; {', '.join(c.input_names)} given (invariant)" if c.input_channels else ""
        io = (f"  channels: {', '.join(c.output_names)}{given}\n  classes: {', '.join(c.classes)}\n" if c.task == "classcond"
              else f"  inputs: {', '.join(c.input_names)}\n  outputs: {outs}\n")
        return (
            f"{c.name} [{self.short_id}] task={c.task} objective={c.objective}"
            f"{(' (mean-anchored: mu(x) + ' + ('DDPM on the residual' if c.objective == 'ddpm' else 'residual-shift refinement') + ')') if c.anchored else ''}"
            f"{f'; its one-pass network is the mean of {len(c.networks) + 1} independently trained ones' if c.networks else ''}\n"
            f"{io}"
            f"  tile {c.tile_size} overlap {c.tile_overlap}; pixel size "
            f"{f'{c.pixel_size_um} um' if c.pixel_size_um else 'not recorded (train with --pixel-size)'}\n"
            f"  trained on: {c.training.get('data', 'unknown')}"
            f"{self._defaults_line()}"
        )

    def _defaults_line(self) -> str:
        """The validated sampling defaults, if any ('' otherwise); 0 steps said in words."""
        s = {k: v for k, v in self.config.sampling.items() if k != "chosen_by"}
        if not s:
            return ""
        parts = [f"{k.replace('_', ' ')} {v}" for k, v in s.items() if k != "steps"]
        if "steps" in s:
            parts.insert(0, "steps 0 (the mean network alone: refining did not pay on validation)" if s["steps"] == 0
                         else f"steps {s['steps']}")
        return "\n  defaults (validated): " + ", ".join(parts)


def _loaded_unet(unet_config: dict, state: dict, weights_name: str, field_name: str):
    from .model import build_unet

    unet = build_unet(unet_config)
    try:
        unet.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise BundleError(
            f"{weights_name} does not match the network described in config.json ({field_name!r}): {first}"
        ) from None
    unet.eval().requires_grad_(False)
    return unet


def sha256_file(*paths: Path) -> str:
    """sha256 of the files' bytes in order: one id for a bundle, whether it holds one network or two."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _read_weights(weights: Path, path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not weights.is_file():
        raise BundleError(f"{path} has no {weights.name}{_pickle_hint(path)}")
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise BundleError(
            f"{weights} is not a readable safetensors file ({exc}); it may be truncated or corrupt — copy it again"
        ) from None


def load_bundle(path: str | Path) -> Bundle:
    """Load and validate a checkpoint folder (or a bundled demo by name, e.g. ``demo-stain``)."""
    path = resolve_bundle_path(path)
    refuse_pickle(path)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise BundleError(
            f"{path} has no config.json; a checkpoint folder holds config.json and {WEIGHTS_NAME}{_pickle_hint(path)}"
        )
    try:
        raw = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{cfg_path} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise BundleError(f"{cfg_path} must hold a JSON object")
    config = BundleConfig.from_dict(raw)
    weights = path / str(raw.get("weights", WEIGHTS_NAME))
    if weights.suffix.lower() != ".safetensors":
        raise BundleError(f"config.json: 'weights' is {weights.name!r}; weights load only from .safetensors. {_PICKLE_EXPLANATION}")
    state = _read_weights(weights, path)
    others = [path / name for name in config.networks]
    other_states = [_read_weights(m, path) for m in others]
    if not config.anchored:
        return Bundle(config, state, path, sha256_file(weights, *others), None, other_states)
    mean_weights = path / MEAN_WEIGHTS_NAME
    mean_state = _read_weights(mean_weights, path)
    return Bundle(config, state, path, sha256_file(weights, mean_weights, *others), mean_state, other_states)


def save_bundle(path: str | Path, config: BundleConfig, unet: torch.nn.Module, half: bool = False,
                mean_unet: torch.nn.Module | None = None, networks: list[torch.nn.Module] = ()) -> Bundle:
    """Write ``config.json`` + ``model.safetensors`` (+ ``mean_model.safetensors`` for a mean-anchored bundle, + one
    file per name in ``config.networks`` for ``networks``, further one-pass networks); fp16 when ``half``: half the
    size, same predictions ±1e-3."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if config.anchored != (mean_unet is not None):
        raise ValueError("a mean-anchored bundle needs its mean network, and only it has one")
    from .unet import NetworkMean

    one_pass = mean_unet if config.anchored else unet
    if isinstance(one_pass, NetworkMean) and not networks:  # e.g. a refinement trained on a deep ensemble's mean
        first, networks = one_pass.networks[0], list(one_pass.networks[1:])
        config = replace(config, networks=config.networks or [f"network_{i}.safetensors" for i in range(2, len(networks) + 2)])
        unet, mean_unet = (unet, first) if config.anchored else (first, mean_unet)
    if len(networks) != len(config.networks):
        raise ValueError(f"config.networks names {len(config.networks)} weights files; {len(networks)} networks given")
    dtype = torch.float16 if half else torch.float32
    for net, name in ((unet, WEIGHTS_NAME), (mean_unet, MEAN_WEIGHTS_NAME), *zip(networks, config.networks)):
        if net is None:
            continue
        state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in net.state_dict().items()}
        save_file(state, str(path / name), metadata={"format": FORMAT})
        (path / name).chmod(0o644)  # safetensors writes 0600; a lab shares its checkpoints
    (path / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    return load_bundle(path)


def bundled_checkpoints() -> dict[str, Path]:
    """Demo bundles shipped inside the package, by name."""
    root = Path(__file__).resolve().parent.parent / "checkpoints"
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir()) if (p / "config.json").is_file()}


def resolve_bundle_path(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if p.exists():
        return p
    demos = bundled_checkpoints()
    if str(path) in demos:
        return demos[str(path)]
    known = ", ".join(demos) or "none installed"
    raise BundleError(f"checkpoint {str(path)!r} not found: give a bundle folder or a bundled demo name ({known})")
