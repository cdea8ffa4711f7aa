"""A bundle's one-pass network as a bioimage.io model (spec 0.5), so the same model opens in other bioimage tools.

What is exported is the deterministic one-pass network — a regression bundle's UNet, or the mean predictor mu of a
mean-anchored bundle — as TorchScript, with the bundle's normalisation written as bioimage.io pre/post-processing:
inputs ``scale_range`` (per-image percentiles, as ``PercentileNorm``) then ``scale_linear`` to [-1, 1]; outputs
``scale_linear`` per channel back to the training stains' units (``FixedNorm``). The test input is a real image the
caller provides (for the demos: a held-out crop) and the test output is this package's own float32 prediction of it,
so ``bioimageio.core`` checks that the package reproduces what napari-virtualstain predicts. The diffusion sampler
(a chain of network calls with noise and a scheduler) cannot be expressed in the spec: that part stays here.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from .bundle import Bundle
from .errors import VirtualStainError
from .model import downsample_factor
from .normalize import FixedNorm, PercentileNorm
from .settings import RunSettings

DATA_CITATION = {
    "ndev-sampledata": ("ndev-sampledata: scratch-assay time-lapse with Hoechst and nuclei/cell labels (BSD-3)",
                        "https://pypi.org/project/ndev-sampledata/"),
    "In silico labeling": ("Christiansen et al., In silico labeling: predicting fluorescent labels in unlabeled "
                           "images, Cell 2018", "https://doi.org/10.1016/j.cell.2018.03.040"),
}


class OnePass(torch.nn.Module):
    """UNet at timestep 0 returning tensors, the call other tools expect: one tensor per group of channels (stains;
    boundary/foreground probabilities, which are clipped to 0-1 as napari-virtualstain does)."""

    def __init__(self, unet, groups: list[list[int]]):
        super().__init__()
        self.unet = unet
        self.groups = groups

    def forward(self, x: torch.Tensor):
        t = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        y = self.unet(x, t).sample
        return tuple(y[:, g] for g in self.groups)


def one_pass_network(bundle: Bundle):
    """The deterministic one-pass UNet of a bundle and its config, or a clear refusal."""
    c = bundle.config
    if c.task != "stain":
        raise VirtualStainError(f"checkpoint {c.name!r} is a {c.task!r} model; only stain models have a one-pass "
                                "network to export")
    if c.objective == "regression":
        return bundle.unet, c.unet
    if c.anchored:
        return bundle.mean_unet, c.mean_unet
    raise VirtualStainError(f"checkpoint {c.name!r} is a diffusion model without a one-pass mean network; a "
                            "diffusion sampler cannot be expressed as a bioimage.io model (export a regression or a "
                            "mean-anchored checkpoint)")


def export_bioimageio(bundle: Bundle, test_image: np.ndarray, output: str | Path, *, test_name: str = "test image",
                      authors: list[str] | None = None) -> Path:
    """Write ``output`` (.zip): rdf.yaml, TorchScript weights, test input/output (.npy), cover, README."""
    from bioimageio.spec import save_bioimageio_package
    from bioimageio.spec.model import v0_5 as bio

    from .tasks.stain import predict_stain

    c = bundle.config
    unet, unet_config = one_pass_network(bundle)
    if len(c.input_channels) != 1 or not isinstance(c.input_channels[0].normalization, PercentileNorm):
        raise VirtualStainError("only single-input checkpoints with percentile normalisation can be exported")
    factor = downsample_factor(unet_config)
    image = np.asarray(test_image)
    if image.ndim != 2:
        raise VirtualStainError(f"the test image must be one 2D plane, got shape {image.shape}")
    h, w = (s // factor * factor for s in image.shape)
    size = min(h, w, 256)
    if size < 2 * factor:
        raise VirtualStainError(f"the test image is too small: at least {2 * factor}x{2 * factor} pixels")
    crop = image[:size, :size].astype(np.float32)
    # the test output is this package's own float32 prediction of the crop (one tile, no blending)
    reference = predict_stain(bundle if c.objective == "regression" else _mean_only(bundle), crop, make_labels=False,
                              settings=RunSettings(half=False, tile_size=size, tile_overlap=0, threads=1),
                              tta=1)  # the package holds one pass: test-time augmentation is this package's own
    norm = c.input_channels[0].normalization
    outs = c.output_channels
    groups = [[i for i, o in enumerate(outs) if o.kind == "stain"],
              [i for i, o in enumerate(outs) if o.kind != "stain"]]
    groups = [g for g in groups if g]

    work = Path(tempfile.mkdtemp(prefix="vs-bioimageio-"))
    net = OnePass(unet.float().to("cpu").to(memory_format=torch.contiguous_format), groups).eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # diffusers' shape asserts become constants: fine
        traced = torch.jit.trace(net, torch.zeros(1, 1, size, size), check_trace=False)
    traced.save(str(work / "weights.torchscript.pt"))
    np.save(work / "test_input.npy", crop[None, None])
    for k, g in enumerate(groups):
        np.save(work / f"test_output_{k}.npy", reference.image[g][None].astype(np.float32))
    _cover(crop, reference.image[0], work / "cover.png")
    (work / "README.md").write_text(_readme(bundle, test_name))

    in_id = bio.TensorId("brightfield")
    inputs = [bio.InputTensorDescr(
        id=in_id, description=f"{c.input_channels[0].name} (any intensity scale: normalised per image); pixel size "
                              f"{c.pixel_size_um} um at training (resample other magnifications to it)",
        axes=[bio.BatchAxis(), bio.ChannelAxis(channel_names=[bio.Identifier(c.input_channels[0].name)]),
              bio.SpaceInputAxis(id=bio.AxisId("y"), size=bio.ParameterizedSize(min=2 * factor, step=factor)),
              bio.SpaceInputAxis(id=bio.AxisId("x"), size=bio.ParameterizedSize(min=2 * factor, step=factor))],
        test_tensor=bio.FileDescr(source=work / "test_input.npy"),
        preprocessing=[
            bio.EnsureDtypeDescr(kwargs=bio.EnsureDtypeKwargs(dtype="float32")),
            bio.ScaleRangeDescr(kwargs=bio.ScaleRangeKwargs(axes=[bio.AxisId("y"), bio.AxisId("x")],
                                                            min_percentile=norm.low, max_percentile=norm.high)),
            bio.ScaleLinearDescr(kwargs=bio.ScaleLinearKwargs(gain=2.0, offset=-1.0)),
        ],
    )]
    outputs = [_output_descr(bio, in_id, [outs[i] for i in g], work / f"test_output_{k}.npy")
               for k, g in enumerate(groups)]
    # the exported network's own training record (an anchored bundle keeps mu's under mean_model)
    trained = c.training if c.objective == "regression" else c.training.get("mean_model", {}).get("training", {})
    data = str(trained.get("data", c.training.get("data", "")))
    cite = [bio.CiteEntry(text=text, url=bio.HttpUrl(url)) for key, (text, url) in DATA_CITATION.items() if key in data]
    cite.append(bio.CiteEntry(text="napari-virtualstain: virtual staining in napari (one-pass mean predictor)",
                              url=bio.HttpUrl("https://github.com/napari/napari")))
    descr = bio.ModelDescr(
        name=f"{c.name} one-pass" if c.objective != "regression" else c.name,
        description=(c.description or f"{c.name}: brightfield -> {', '.join(o.name for o in outs)}")[:1000],
        authors=[bio.Author(name=a) for a in (authors or ["napari-virtualstain contributors"])],
        cite=cite,
        license=bio.LicenseId("BSD-3-Clause"),
        documentation=bio.FileDescr(source=work / "README.md"),
        covers=[bio.FileDescr(source=work / "cover.png")],
        inputs=inputs,
        outputs=outputs,
        weights=bio.WeightsDescr(torchscript=bio.TorchscriptWeightsDescr(
            source=work / "weights.torchscript.pt", pytorch_version=bio.Version(torch.__version__.split("+")[0]))),
        tags=["virtual-staining", "label-free", "brightfield", "napari-virtualstain", "pytorch"],
        config={"napari_virtualstain": {"bundle_name": c.name, "bundle_id": bundle.id,
                                        "network": "regression" if c.objective == "regression" else "mean (mu)",
                                        "training": json.loads(json.dumps(
                                            {k: trained.get(k) for k in ("data", "steps", "command")},
                                            default=str))}},
    )
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    return Path(save_bioimageio_package(descr, output_path=output))


def _output_descr(bio, in_id, channels, test_file: Path):
    """One output tensor: stains mapped back to their units, or probabilities mapped to 0-1 and clipped."""
    stain = channels[0].kind == "stain"
    gains = [(o.normalization.vmax - o.normalization.vmin) / 2 if isinstance(o.normalization, FixedNorm) else 0.5
             for o in channels]
    offsets = [(o.normalization.vmax + o.normalization.vmin) / 2 if isinstance(o.normalization, FixedNorm) else 0.5
               for o in channels]
    post = [bio.ScaleLinearDescr(kwargs=bio.ScaleLinearAlongAxisKwargs(axis=bio.AxisId("channel"), gain=gains,
                                                                        offset=offsets))]
    if not stain:
        post.append(bio.ClipDescr(kwargs=bio.ClipKwargs(min=0.0, max=1.0)))
    return bio.OutputTensorDescr(
        id=bio.TensorId("stain" if stain else "probabilities"),
        description=("predicted stains in the training stains' units" if stain
                     else "boundary / foreground probabilities (0-1); instance labels come from these"),
        axes=[bio.BatchAxis(), bio.ChannelAxis(channel_names=[bio.Identifier(_ident(o.name)) for o in channels]),
              bio.SpaceOutputAxis(id=bio.AxisId("y"), size=bio.SizeReference(tensor_id=in_id, axis_id=bio.AxisId("y"))),
              bio.SpaceOutputAxis(id=bio.AxisId("x"), size=bio.SizeReference(tensor_id=in_id, axis_id=bio.AxisId("x")))],
        test_tensor=bio.FileDescr(source=test_file),
        postprocessing=post,
    )


def _mean_only(bundle: Bundle) -> Bundle:
    """The mean network of an anchored bundle as a regression bundle (same weights, same normalisation)."""
    from dataclasses import replace

    c = bundle.config
    config = replace(c, objective="regression", unet=c.mean_unet, mean_unet=None, scheduler=None,
                     residual_source="mean_input")
    return Bundle(config, bundle.mean_state_dict, bundle.path, bundle.id, None, bundle.network_state_dicts)


def _ident(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name).strip("_") or "channel"


def _cover(image: np.ndarray, prediction: np.ndarray, path: Path) -> None:
    """Input | prediction side by side, each at its 1-99.8 percentiles (a PNG, 2:1 as bioimage.io likes it)."""
    import imageio.v3 as iio

    def scaled(a):
        lo, hi = np.percentile(a, [1, 99.8])
        return (np.clip((a - lo) / max(hi - lo, 1e-9), 0, 1) * 255).astype(np.uint8)

    iio.imwrite(path, np.concatenate([scaled(image), scaled(prediction)], axis=1))


def _readme(bundle: Bundle, test_name: str) -> str:
    c = bundle.config
    network = ("the regression model" if c.objective == "regression"
               else "the mean predictor mu of a mean-anchored residual-shift model")
    channels = ", ".join(f"{o.name} ({o.kind})" for o in c.output_channels)
    return (
        f"# {c.name}\n\n{c.description}\n\n"
        f"Exported from napari-virtualstain: the deterministic one-pass network of the checkpoint ({network}). "
        "Input: one brightfield plane, normalised per image between its 1st and 99.8th percentiles; output "
        f"channels: {channels}.\n\nPixel size at training: {c.pixel_size_um} um. Trained on: "
        f"{c.training.get('data', 'unknown')}.\n\nTest input: {test_name}. The diffusion refinement of "
        "napari-virtualstain (a chain of network calls with noise and a scheduler) is not part of this package: the "
        "bioimage.io spec has no way to express a sampler.\n\n"
        "## Validation\n\nThe test output is napari-virtualstain's own float32 prediction of the test input (one tile), "
        "so `bioimageio.core` checks that this package reproduces it. Held-out quality (Pearson r, SSIM, F1 against "
        "real stains and labels) is measured by the project's benchmark scripts and reported in its "
        "docs/benchmarks.md.\n"
    )
