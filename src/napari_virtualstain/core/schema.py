"""What a bundle's ``config.json`` holds and what makes it valid: channel specs, the config, one validator that
names the field that is missing or wrong. No files here (``bundle.py`` loads and saves)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import BundleError
from .normalize import FixedNorm, PercentileNorm, norm_from_dict

FORMAT = "napari-virtualstain-bundle"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
MEAN_WEIGHTS_NAME = "mean_model.safetensors"  # mean-anchored bundles: the one-pass mean predictor mu(x)
RESIDUAL_SOURCES = ("mean_input", "mean_prediction")
LABEL_ROUTES = ("boundaries", "stain", "distance")
TASKS = ("stain", "classcond")  # classcond: class-conditional DDPM (translation, synthesis)
OBJECTIVES = ("residual_shift", "regression", "ddpm")
DIFFUSION_OBJECTIVES = ("residual_shift", "ddpm")
KINDS = ("stain", "boundary", "foreground", "distance")  # distance: per-instance centre map


@dataclass(frozen=True)
class ChannelSpec:
    name: str
    kind: str = "stain"  # inputs: always "input"
    normalization: PercentileNorm | FixedNorm = field(default_factory=PercentileNorm)
    labels: str | None = None  # boundary/foreground: which instance labels they were made from
    foreground: str | None = None  # boundary: the foreground channel that masks its watershed
    seeds: str | None = None  # boundary: another labels set whose instances seed the watershed (cells <- nuclei)

    def to_dict(self) -> dict:
        d = {"name": self.name, "kind": self.kind, "normalization": self.normalization.to_dict()}
        if self.labels is not None:
            d["labels"] = self.labels
        if self.foreground is not None:
            d["foreground"] = self.foreground
        if self.seeds is not None:
            d["seeds"] = self.seeds
        return d


@dataclass
class BundleConfig:
    """Everything ``config.json`` holds; see docs/checkpoints.md for the meaning of each field."""

    name: str
    task: str
    objective: str
    input_channels: list[ChannelSpec]
    output_channels: list[ChannelSpec]
    unet: dict
    scheduler: dict | None
    tile_size: int = 256
    tile_overlap: int = 32
    pixel_size_um: float | None = None
    residual_source: str = "mean_input"
    training: dict = field(default_factory=dict)
    description: str = ""
    classes: list[str] = field(default_factory=list)  # classcond: class names; embedding index len(classes) = null
    mean_unet: dict | None = None  # residual_source "mean_prediction": the mean predictor's UNet (inputs -> outputs)
    # (residual shift: the chain runs from mu; ddpm: the chain generates x0 - mu, CorrDiff-style)
    sampling: dict = field(default_factory=dict)  # defaults chosen from validation: steps, samples, labels_from
    labels_from_stain: dict = field(default_factory=dict)  # labels set -> stain channel it can be segmented from
    # classcond: the channel order of the images it reads and writes; inputs are the invariant channels (given to the
    # network as conditioning and kept as they are), outputs the variable ones it generates
    image_channels: list[str] = field(default_factory=list)
    # further weights files of the one-pass network (``unet`` of a regression bundle, ``mean_model`` of a
    # mean-anchored one), trained independently: the network answers as the mean of all (a deep ensemble)
    networks: list[str] = field(default_factory=list)

    @property
    def anchored(self) -> bool:
        """Mean-anchored: the chain runs from mu(x) (a second, one-pass network) instead of the mean input."""
        return self.residual_source == "mean_prediction"

    @property
    def takes_zero_steps(self) -> bool:
        """0 steps — the mean network alone, no refinement — is a sampling choice of this bundle."""
        return takes_zero_steps(self.objective, self.residual_source)

    @property
    def anchor_channels(self) -> int:
        """Channels of mu(x) the refinement network reads beside its input: one per output in a mean-anchored
        residual-shift bundle (its chain starts at mu), none otherwise."""
        return len(self.output_channels) if self.takes_zero_steps else 0

    @property
    def null_class(self) -> int:
        """The class index trained as 'no class' (condition dropout), used for classifier-free guidance."""
        return len(self.classes)

    def class_index(self, name: str) -> int:
        from .errors import VirtualStainError

        if not self.classes:
            raise VirtualStainError(f"checkpoint {self.name!r} has no classes (task {self.task!r}); translation and "
                                    "synthesis need a class-conditional checkpoint")
        if name not in self.classes:
            raise VirtualStainError(f"unknown class {name!r}; checkpoint {self.name!r} knows: {', '.join(self.classes)}")
        return self.classes.index(name)

    @property
    def distance_channels(self) -> dict[str, str]:
        """Labels set -> its distance channel (the centre map the 'distance' labels route seeds from)."""
        return {c.labels: c.name for c in self.output_channels if c.kind == "distance" and c.labels}

    def label_routes(self) -> list[str]:
        """The labels routes this bundle can take: boundaries always, stain / distance where it has the channels."""
        return ["boundaries"] + (["stain"] if self.labels_from_stain else []) + (
            ["distance"] if self.distance_channels else [])

    @property
    def input_names(self) -> list[str]:
        return [c.name for c in self.input_channels]

    @property
    def output_names(self) -> list[str]:
        return [c.name for c in self.output_channels]

    @property
    def image_names(self) -> list[str]:
        """classcond: every channel of the images in file order (variable outputs and invariant inputs)."""
        return list(self.image_channels) or self.output_names + self.input_names

    @property
    def invariant_names(self) -> list[str]:
        """classcond: channels held invariant (conditioning, never generated): a translation keeps them exactly."""
        return self.input_names if self.task == "classcond" else []

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "description": self.description,
            "task": self.task,
            "objective": self.objective,
            "input_channels": [
                {"name": c.name, "normalization": c.normalization.to_dict()} for c in self.input_channels
            ],
            "output_channels": [c.to_dict() for c in self.output_channels],
            "residual_source": self.residual_source,
            "pixel_size_um": self.pixel_size_um,
            "tile_size": self.tile_size,
            "tile_overlap": self.tile_overlap,
            "unet": self.unet,
            "scheduler": self.scheduler,
            "training": self.training,
            "weights": WEIGHTS_NAME,
        } | ({"classes": list(self.classes)} if self.classes else {}) | (
            {"mean_model": {"unet": self.mean_unet, "weights": MEAN_WEIGHTS_NAME}} if self.mean_unet else {}
        ) | ({"sampling": dict(self.sampling)} if self.sampling else {}) | (
            {"labels_from_stain": dict(self.labels_from_stain)} if self.labels_from_stain else {}) | (
            {"image_channels": list(self.image_channels)} if self.image_channels else {}) | (
            {"networks": list(self.networks)} if self.networks else {})

    @classmethod
    def from_dict(cls, d: dict) -> BundleConfig:
        _require(d, "format", str)
        if d["format"] != FORMAT:
            raise BundleError(f"config.json: 'format' is {d['format']!r}, expected {FORMAT!r}")
        version = _require(d, "format_version", int)
        if version > FORMAT_VERSION:
            raise BundleError(
                f"config.json: format_version {version} is newer than this napari-virtualstain understands "
                f"({FORMAT_VERSION}); upgrade the package"
            )
        task = _require(d, "task", str)
        if task not in TASKS:
            raise BundleError(f"config.json: 'task' is {task!r}; this version knows {', '.join(TASKS)}")
        objective = _require(d, "objective", str)
        if objective not in OBJECTIVES:
            raise BundleError(f"config.json: 'objective' is {objective!r}; expected one of {', '.join(OBJECTIVES)}")
        inputs = [_channel(c, i, "input_channels", is_input=True, classcond=task == "classcond")
                  for i, c in enumerate(_require(d, "input_channels", list))]
        outputs = [_channel(c, i, "output_channels") for i, c in enumerate(_require(d, "output_channels", list))]
        if (not inputs and task == "stain") or not outputs:
            raise BundleError("config.json: 'input_channels' and 'output_channels' must each name at least one channel")
        classes = d.get("classes", [])
        if task == "classcond":
            if objective != "ddpm":
                raise BundleError(f"config.json: a classcond bundle is a DDPM ('objective': 'ddpm'), not {objective!r}")
            image_channels = d.get("image_channels", [])
            every = [c.name for c in outputs] + [c.name for c in inputs]
            if image_channels and (not isinstance(image_channels, list) or sorted(map(str, image_channels)) != sorted(every)):
                raise BundleError(f"config.json: 'image_channels' must list the output and input (invariant) channels "
                                  f"{', '.join(every)} once each, in the images' order; got {image_channels!r}")
            if (not isinstance(classes, list) or len(classes) < 1
                    or not all(isinstance(c, str) and c for c in classes) or len(set(classes)) != len(classes)):
                raise BundleError("config.json: 'classes' must be a list of unique, non-empty class names")
        elif classes:
            raise BundleError(f"config.json: 'classes' is only for classcond bundles, not task {task!r}")
        names = [c.name for c in outputs]
        if len(set(names)) != len(names) or len(set(c.name for c in inputs)) != len(inputs):
            raise BundleError(f"config.json: channel names must be unique; got outputs {names}")
        for c in outputs:
            if c.kind == "boundary" and c.foreground is not None and c.foreground not in names:
                raise BundleError(
                    f"config.json: output channel {c.name!r} names foreground {c.foreground!r}, "
                    f"which is not an output channel ({', '.join(names)})"
                )
        label_sets = [c.labels or c.name for c in outputs if c.kind == "boundary"]
        for c in outputs:
            if c.seeds is not None and (c.seeds not in label_sets or c.seeds == (c.labels or c.name)):
                raise BundleError(
                    f"config.json: output channel {c.name!r} takes seeds from {c.seeds!r}, which is not another "
                    f"boundary channel's labels ({', '.join(label_sets)})"
                )
        unet = _require(d, "unet", dict)
        for key in ("in_channels", "out_channels", "block_out_channels"):
            if key not in unet:
                raise BundleError(f"config.json: 'unet' is missing the key {key!r}")
        if not isinstance(unet["block_out_channels"], list) or not unet["block_out_channels"]:
            raise BundleError("config.json: 'unet.block_out_channels' must be a list of channel widths")
        residual = d.get("residual_source", "mean_input")
        if residual not in RESIDUAL_SOURCES:
            raise BundleError(f"config.json: 'residual_source' is {residual!r}; expected one of {', '.join(RESIDUAL_SOURCES)}")
        mean_unet = _mean_model(d, residual, objective, len(inputs), len(outputs))
        expected_in = len(inputs) + (len(outputs) if objective in DIFFUSION_OBJECTIVES else 0)
        if mean_unet is not None:
            expected_in += len(outputs)  # the network also sees mu(x)
        if task == "classcond" and unet.get("num_class_embeds") != len(classes) + 1:
            raise BundleError(
                f"config.json: 'unet.num_class_embeds' is {unet.get('num_class_embeds')}, but {len(classes)} classes "
                f"need {len(classes) + 1} (one per class + the null class for guidance)"
            )
        if unet["in_channels"] != expected_in or unet["out_channels"] != len(outputs):
            raise BundleError(
                f"config.json: 'unet' has in_channels={unet['in_channels']}, out_channels={unet['out_channels']} but "
                f"{len(inputs)} input and {len(outputs)} output channels with objective {objective!r} need "
                f"in_channels={expected_in}, out_channels={len(outputs)}"
            )
        scheduler = d.get("scheduler")
        if objective in DIFFUSION_OBJECTIVES and not isinstance(scheduler, dict):
            raise BundleError(
                f"config.json: a {objective} bundle needs a 'scheduler' object "
                f"({'ResidualShiftScheduler' if objective == 'residual_shift' else 'diffusers DDPMScheduler'} config)"
            )
        tile = _require(d, "tile_size", int)
        factor = 2 ** (len(unet["block_out_channels"]) - 1)
        if tile <= 0 or tile % factor:
            raise BundleError(f"config.json: 'tile_size' {tile} must be a positive multiple of {factor}")
        pixel = d.get("pixel_size_um")
        if pixel is not None and not isinstance(pixel, (int, float)):
            raise BundleError("config.json: 'pixel_size_um' must be a number or null")
        overlap = d.get("tile_overlap", tile // 8)
        if not isinstance(overlap, int) or isinstance(overlap, bool) or not 0 <= overlap <= tile // 2:
            raise BundleError(f"config.json: 'tile_overlap' must be an integer between 0 and tile_size/2 ({tile // 2})")
        training = d.get("training", {})
        if not isinstance(training, dict):
            raise BundleError("config.json: 'training' must be an object (how the model was trained)")
        if scheduler is not None and objective in DIFFUSION_OBJECTIVES:
            _check_scheduler(objective, scheduler)
        return cls(
            name=_require(d, "name", str),
            description=d.get("description", ""),
            task=task,
            objective=objective,
            input_channels=inputs,
            output_channels=outputs,
            unet=unet,
            scheduler=scheduler,
            tile_size=tile,
            tile_overlap=overlap,
            pixel_size_um=pixel,
            residual_source=residual,
            training=training,
            classes=list(classes),
            mean_unet=mean_unet,
            sampling=_sampling(d.get("sampling", {}), mean_only=takes_zero_steps(objective, residual)),
            labels_from_stain=_labels_from_stain(d.get("labels_from_stain", {}), outputs),
            image_channels=list(d.get("image_channels", [])) if task == "classcond" else [],
            networks=_networks(d.get("networks", []), objective, residual),
        )


def _mean_model(d: dict, residual: str, objective: str, n_in: int, n_out: int) -> dict | None:
    """The mean predictor's UNet config: required exactly for mean-anchored residual-shift bundles."""
    entry = d.get("mean_model")
    if residual != "mean_prediction":
        if entry is not None:
            raise BundleError("config.json: 'mean_model' is only for residual_source 'mean_prediction'")
        return None
    if objective not in DIFFUSION_OBJECTIVES:
        raise BundleError(f"config.json: residual_source 'mean_prediction' is for diffusion objectives, not {objective!r}")
    if not isinstance(entry, dict) or not isinstance(entry.get("unet"), dict):
        raise BundleError("config.json: residual_source 'mean_prediction' needs 'mean_model': {'unet': {...}, "
                          f"'weights': '{MEAN_WEIGHTS_NAME}'}}")
    unet = entry["unet"]
    if unet.get("in_channels") != n_in or unet.get("out_channels") != n_out:
        raise BundleError(f"config.json: 'mean_model.unet' must map {n_in} input to {n_out} output channels; it has "
                          f"in_channels={unet.get('in_channels')}, out_channels={unet.get('out_channels')}")
    if entry.get("weights", MEAN_WEIGHTS_NAME) != MEAN_WEIGHTS_NAME:
        raise BundleError(f"config.json: 'mean_model.weights' must be {MEAN_WEIGHTS_NAME!r}")
    return unet


def _networks(names, objective: str, residual: str) -> list[str]:
    """Weights files of the one-pass network's further networks: plain .safetensors names in the bundle folder."""
    if not names:
        return []
    if objective != "regression" and residual != "mean_prediction":
        raise BundleError(f"config.json: 'networks' are further one-pass networks; a {objective} bundle without a mean "
                          "network has none")
    ok = (isinstance(names, list) and all(isinstance(n, str) and n.endswith(".safetensors") and "/" not in n
                                          and "\\" not in n and n not in (WEIGHTS_NAME, MEAN_WEIGHTS_NAME) for n in names)
          and len(set(names)) == len(names))
    if not ok:
        raise BundleError("config.json: 'networks' must be a list of distinct .safetensors file names in the bundle "
                          f"folder (other than {WEIGHTS_NAME} and {MEAN_WEIGHTS_NAME}), e.g. [\"network_2.safetensors\"]")
    return list(names)


def takes_zero_steps(objective: str, residual_source: str) -> bool:
    """A mean-anchored residual-shift bundle can skip its refinement: its chain starts from mu(x), which it can
    return alone (``BundleConfig.takes_zero_steps``; a DDPM's chain starts from noise)."""
    return objective == "residual_shift" and residual_source == "mean_prediction"


def _sampling(d, mean_only: bool = False) -> dict:
    """Defaults a bundle was validated with: steps (residual-shift chain; 0 = a mean-anchored bundle's mean network
    alone, ``mean_only``), samples (seeds averaged), labels_from, tta (test-time flips/turns averaged);
    classcond: guidance and strength of a translation."""
    if not isinstance(d, dict):
        raise BundleError("config.json: 'sampling' must be an object")
    for key in ("steps", "samples"):
        lowest = 0 if key == "steps" and mean_only else 1
        if key in d and (not isinstance(d[key], int) or isinstance(d[key], bool) or d[key] < lowest):
            raise BundleError(f"config.json: 'sampling.{key}' must be an integer >= {lowest}")
    if "guidance" in d and (not isinstance(d["guidance"], (int, float)) or isinstance(d["guidance"], bool)
                            or d["guidance"] < 0):
        raise BundleError("config.json: 'sampling.guidance' must be a number >= 0")
    if "strength" in d and (not isinstance(d["strength"], (int, float)) or not 0 < d["strength"] <= 1):
        raise BundleError("config.json: 'sampling.strength' must be a number in (0, 1]")
    if d.get("labels_from", "boundaries") not in LABEL_ROUTES:
        raise BundleError(f"config.json: 'sampling.labels_from' must be one of {', '.join(LABEL_ROUTES)}")
    for key in ("boundary_threshold", "foreground_threshold", "center_threshold"):
        if key in d and (not isinstance(d[key], (int, float)) or isinstance(d[key], bool) or not 0 < d[key] < 1):
            raise BundleError(f"config.json: 'sampling.{key}' must be a number in (0, 1)")
    if d.get("tta", 1) not in (1, 2, 4, 8) or isinstance(d.get("tta"), bool):
        raise BundleError("config.json: 'sampling.tta' must be 1, 2, 4 or 8 (flips/quarter turns averaged)")
    return dict(d)


def _labels_from_stain(d, outputs: list[ChannelSpec]) -> dict:
    if not isinstance(d, dict):
        raise BundleError("config.json: 'labels_from_stain' must map a labels set to a stain channel")
    sets = {c.labels or c.name for c in outputs if c.kind == "boundary"}
    stains = {c.name for c in outputs if c.kind == "stain"}
    for lab, stain in d.items():
        if lab not in sets or stain not in stains:
            raise BundleError(f"config.json: 'labels_from_stain' maps {lab!r} to {stain!r}; labels sets are "
                              f"{', '.join(sorted(sets)) or 'none'} and stains {', '.join(sorted(stains)) or 'none'}")
    return dict(d)


def _check_scheduler(objective: str, scheduler: dict) -> None:
    try:
        if objective == "residual_shift":
            from .schedulers import ResidualShiftScheduler

            ResidualShiftScheduler.from_config(scheduler)
        else:
            from diffusers import DDPMScheduler

            sched = DDPMScheduler.from_config(scheduler)
            if sched.config.prediction_type not in ("epsilon", "v_prediction"):
                raise ValueError(f"prediction_type {sched.config.prediction_type!r} (expected epsilon or v_prediction)")
    except (TypeError, ValueError, NotImplementedError) as exc:
        raise BundleError(f"config.json: bad 'scheduler': {exc}") from None


def _require(d: dict, key: str, typ):
    if key not in d:
        raise BundleError(f"config.json is missing the field {key!r}")
    value = d[key]
    if typ is int and isinstance(value, bool) or not isinstance(value, typ):
        raise BundleError(f"config.json: field {key!r} should be of type {typ.__name__}, got {type(value).__name__}")
    return value


def _channel(c, i: int, where: str, is_input: bool = False, classcond: bool = False) -> ChannelSpec:
    if not isinstance(c, dict) or not isinstance(c.get("name"), str):
        raise BundleError(f"config.json: {where}[{i}] must be an object with a 'name'")
    if "normalization" not in c:
        raise BundleError(f"config.json: {where}[{i}] ({c['name']!r}) is missing the field 'normalization'")
    bad_norm = f"config.json: {where}[{i}] ({c['name']!r}) has a bad 'normalization'"
    if not isinstance(c["normalization"], dict):
        raise BundleError(f"{bad_norm}: expected an object like {{\"method\": \"percentile\", \"low\": 1, \"high\": 99.8}}")
    try:
        norm = norm_from_dict(c["normalization"])
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{bad_norm}: {exc}") from None
    if isinstance(norm, FixedNorm) and not norm.vmax > norm.vmin:
        raise BundleError(f"{bad_norm}: vmax must be greater than vmin")
    if isinstance(norm, PercentileNorm) and not 0 <= norm.low < norm.high <= 100:
        raise BundleError(f"{bad_norm}: percentiles need 0 <= low < high <= 100")
    if is_input:
        if classcond and not isinstance(norm, FixedNorm):  # invariant channels: one scale for every condition
            raise BundleError(f"{bad_norm}: a classcond bundle's invariant channels use a 'fixed' normalisation")
        if not classcond and not isinstance(norm, PercentileNorm):
            raise BundleError(f"{bad_norm}: input channels are normalised per image ('percentile')")
        return ChannelSpec(c["name"], "input", norm)
    kind = c.get("kind")
    if kind not in KINDS:
        raise BundleError(f"config.json: {where}[{i}] ({c['name']!r}) has kind {kind!r}; expected one of {', '.join(KINDS)}")
    if kind == "stain" and not isinstance(norm, FixedNorm):
        raise BundleError(f"config.json: {where}[{i}] ({c['name']!r}): stain channels need a 'fixed' normalisation")
    return ChannelSpec(c["name"], kind, norm, c.get("labels"), c.get("foreground"), c.get("seeds"))
