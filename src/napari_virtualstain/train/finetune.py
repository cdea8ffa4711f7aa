"""Fine-tuning: start a network from a trained bundle's weights instead of from scratch (``train --init BUNDLE``).

A lab's microscope differs from the demo's, but edges, nuclei and their halo look alike; starting from weights that
already map brightfield to a stain needs fewer images and less CPU than learning it again (Cellpose and CAREamics
users fine-tune daily). The new network takes the source's architecture and output channels (with their stain
scales: a fine-tuned Hoechst stays in the units the source predicted), so everything after the first layer carries
over. The input planes must match (their count; a mismatch is one error that says what to do). Outputs that differ
(another stain, no labels) get a new last layer: every other weight carries over and ``conv_out`` starts afresh for
the data's own channels (recorded as ``init_from.new_head``).

Which weights: a bundle of the same objective gives its network; a mean-anchored bundle (``demo-stain``) gives its
mean network to ``--objective regression`` and its refinement to an anchored run (``--mean-from`` still names mu).
"""

from __future__ import annotations

from ..core.bundle import Bundle, BundleConfig, load_bundle, resolve_bundle_path
from ..core.errors import VirtualStainError


def load_init(source: str) -> Bundle:
    bundle = load_bundle(source)
    if bundle.config.task != "stain":
        raise VirtualStainError(f"--init {source}: a {bundle.config.task!r} checkpoint cannot start a stain model; "
                                "give a virtual-stain bundle (see 'virtualstain info')")
    return bundle


def init_unet_config(init: Bundle, objective: str, anchored: bool) -> dict:
    """The UNet config (architecture) of the network ``init`` provides for this objective."""
    c = init.config
    if c.objective == objective and c.anchored == anchored:
        return c.unet
    if objective == "regression" and c.anchored:
        return c.mean_unet
    what = f"{c.objective}{' (mean-anchored)' if c.anchored else ''}"
    raise VirtualStainError(f"--init {c.name}: a {what} bundle has no network for --objective {objective}"
                            f"{' with --mean-from' if anchored else ''}; start from a bundle trained the same way, "
                            "or from a mean-anchored bundle with --objective regression")


def same_outputs(init: Bundle, input_names: list[str], output_names: list[str]) -> bool:
    """Whether the data asks for the source's outputs (else a new last layer); its input planes must match."""
    c = init.config
    if len(input_names) != len(c.input_names):
        raise VirtualStainError(f"--init {c.name}: it takes {len(c.input_names)} input plane(s) "
                                f"({', '.join(c.input_names)}); the data has {len(input_names)} "
                                f"({', '.join(input_names)}); give the same number of planes, or train from scratch")
    return list(output_names) == list(c.output_names)


def load_init_weights(unet, init: Bundle, config: BundleConfig) -> None:
    """Copy the source network's weights into ``unet`` (same architecture, checked by ``init_unet_config``)."""
    c = init.config
    source = init.unet if (c.objective == config.objective and c.anchored == config.anchored) else init.mean_unet
    source = getattr(source, "networks", [source])[0]  # a mean of networks: fine-tune its first (the bundle's own)
    own = unet.state_dict()
    weights = {k: v for k, v in source.state_dict().items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(own) - set(weights))
    if any(not k.startswith("conv_out.") for k in skipped):
        raise VirtualStainError(f"--init {c.name}: its network does not fit this one ({', '.join(skipped[:3])} ...); "
                                "train from scratch or from a bundle with the same inputs")
    unet.load_state_dict(weights, strict=False)


def provenance(init: Bundle, source: str, config: BundleConfig) -> dict:
    try:
        where = str(resolve_bundle_path(source))
    except VirtualStainError:
        where = source
    return {"init_from": {"name": init.config.name, "id": init.id, "path": where, "source": source,
                          "new_head": config.output_names != init.config.output_names}}
