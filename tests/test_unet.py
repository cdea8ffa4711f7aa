"""The project's UNet against diffusers' UNet2DModel: same parameters, same outputs, and no diffusers import to predict."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from napari_virtualstain.core.bundle import bundled_checkpoints
from napari_virtualstain.core.errors import BundleError
from napari_virtualstain.core.model import build_unet, default_unet_config

diffusers = pytest.importorskip("diffusers")


def shipped_unet_configs() -> list[dict]:
    configs = []
    for name, path in sorted(bundled_checkpoints().items()):
        c = json.loads((path / "config.json").read_text())
        configs.append(c["unet"])
        if c.get("mean_model"):
            configs.append(c["mean_model"]["unet"])
    return configs


OTHER = dict(in_channels=3, out_channels=2, block_out_channels=[8, 16, 16], layers_per_block=2,
             down_block_types=["AttnDownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
             up_block_types=["AttnUpBlock2D", "UpBlock2D", "AttnUpBlock2D"], norm_num_groups=4,
             attention_head_dim=8, num_class_embeds=2)


@pytest.mark.parametrize("config", [*shipped_unet_configs(), OTHER, default_unet_config(2, 3, block_out_channels=(8, 16))])
def test_the_unet_matches_diffusers_unet2dmodel_bit_for_bit(config):
    """Every shipped bundle's network (and two other layouts) gives diffusers' outputs exactly, in float32 and under
    bf16 autocast, in both memory layouts: bundles trained with diffusers' class predict what they did."""
    torch.manual_seed(0)
    ref = diffusers.UNet2DModel(**config).eval()
    torch.manual_seed(0)
    ours = build_unet(config).eval()
    assert list(ours.state_dict()) == list(ref.state_dict())  # in order: an optimizer state resumes across them
    assert [p.shape for p in ours.parameters()] == [p.shape for p in ref.parameters()]
    # the same seed draws the same initial weights: a recipe (config + seed) trains the network it trained before
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), ref.state_dict().values()))
    x = torch.randn(2, config["in_channels"], 32, 32)
    t = torch.tensor([1, 9])
    labels = torch.tensor([0, 1]) if config.get("num_class_embeds") else None
    for layout in (torch.contiguous_format, torch.channels_last):
        ref.to(memory_format=layout)
        ours.to(memory_format=layout)
        for bf16 in (False, True):
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                a = ref(x.contiguous(memory_format=layout), t, class_labels=labels).sample
                b = ours(x.contiguous(memory_format=layout), t, class_labels=labels).sample
            assert torch.equal(a, b), (layout, bf16, (a - b).abs().max())


def test_the_unet_trains_as_diffusers_does():
    """One training step's gradients agree with diffusers' (the trainer builds this class now)."""
    config = default_unet_config(2, 1, block_out_channels=(8, 16))
    torch.manual_seed(0)
    ref = diffusers.UNet2DModel(**config)
    ours = build_unet(config)
    ours.load_state_dict(ref.state_dict())
    x, t = torch.randn(2, 2, 16, 16), torch.tensor([0, 0])
    ref(x, t).sample.square().mean().backward()
    ours(x, t).sample.square().mean().backward()
    for (name, p), q in zip(ref.named_parameters(), ours.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-7, rtol=1e-5), name


@pytest.mark.parametrize("change, words", [
    (dict(down_block_types=["CrossAttnDownBlock2D", "AttnDownBlock2D"]), ["CrossAttnDownBlock2D", "unsupported"]),
    (dict(time_embedding_type="fourier"), ["time_embedding_type", "unsupported"]),
    (dict(wobble=3), ["wobble"]),
])
def test_a_network_this_plugin_cannot_build_is_a_bundle_error(change, words):
    config = default_unet_config(2, 1, block_out_channels=(8, 16)) | change
    with pytest.raises(BundleError) as err:
        build_unet(config)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_predicting_with_a_stain_bundle_does_not_import_diffusers():
    """The prediction path stays light: diffusers (torch._dynamo, sympy, scipy.stats: ~160 MB, seconds) is imported
    only for DDPM bundles and training, not to predict with a regression or residual-shift bundle."""
    code = ("import sys, numpy as np\n"
            "from napari_virtualstain.core.bundle import load_bundle, resolve_bundle_path\n"
            "from napari_virtualstain.core.tasks.stain import predict_stain\n"
            "for name in ('demo-stain', 'demo-stain-regression'):\n"
            "    predict_stain(load_bundle(resolve_bundle_path(name)), np.random.rand(64, 64).astype('float32'), seed=0)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('diffusers', 'sympy')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout[-500:]
