"""The napari manifest is valid, reaches the installed package, and every target in it imports."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import yaml

from napari_virtualstain import _sample_data

REPO_ROOT = Path(__file__).resolve().parent.parent
MANIFEST = REPO_ROOT / "napari.yaml"
PLUGIN_NAME = "napari-virtualstain"


def _python_names(node) -> list[str]:
    """Every ``python_name`` value anywhere in the manifest."""
    if isinstance(node, dict):
        found = [v for k, v in node.items() if k == "python_name"]
        for v in node.values():
            found += _python_names(v)
        return found
    if isinstance(node, list):
        return [name for item in node for name in _python_names(item)]
    return []


def test_manifest_validates():
    import npe2

    manifest = npe2.PluginManifest.from_file(MANIFEST)
    assert manifest.name == PLUGIN_NAME
    assert manifest.contributions.sample_data, "no sample data contributed"


def test_package_manifest_is_the_top_level_one():
    """src/napari_virtualstain/napari.yaml (what gets installed) must be napari.yaml."""
    packaged = REPO_ROOT / "src" / "napari_virtualstain" / "napari.yaml"
    assert packaged.read_text() == MANIFEST.read_text()


PYTHON_NAMES = _python_names(yaml.safe_load(MANIFEST.read_text()))


def test_manifest_has_python_names():
    assert PYTHON_NAMES


@pytest.mark.parametrize("python_name", PYTHON_NAMES)
def test_manifest_target_imports(python_name: str):
    module_name, _, attr_path = python_name.partition(":")
    obj = importlib.import_module(module_name)
    for attr in attr_path.split("."):
        obj = getattr(obj, attr)
    assert callable(obj), f"{python_name} is not callable"


def test_every_command_is_backed_by_python_name():
    import npe2

    manifest = npe2.PluginManifest.from_file(MANIFEST)
    used = {c.command for c in manifest.contributions.sample_data or [] if hasattr(c, "command")}
    used |= {w.command for w in manifest.contributions.widgets or []}
    declared = {c.id: c for c in manifest.contributions.commands or []}
    for command_id in used:
        assert command_id in declared, f"{command_id} used but not declared"
        assert declared[command_id].python_name, f"{command_id} has no python_name"


def test_plugin_discovered_from_installed_package():
    import npe2

    pm = npe2.PluginManager.instance()
    pm.discover()
    assert PLUGIN_NAME in pm._manifests, f"npe2 did not discover {PLUGIN_NAME}; is the package installed?"
    installed = pm.get_manifest(PLUGIN_NAME)
    reference = npe2.PluginManifest.from_file(MANIFEST)
    assert {c.id for c in installed.contributions.commands} == {
        c.id for c in reference.contributions.commands
    }, "installed manifest differs from napari.yaml: reinstall the package"


def test_sample_data_module_has_no_heavy_imports():
    source = Path(_sample_data.__file__).read_text()
    for heavy in ("import torch", "from torch", "qtpy", "PyQt", "import napari", "from napari"):
        assert heavy not in source, f"_sample_data must not use {heavy!r}"


@pytest.mark.skipif(
    importlib.util.find_spec("ndev_sampledata") is None,
    reason="ndev-sampledata not installed (pip install napari-virtualstain[data])",
)
def test_scratch_assay_layers():
    layers = _sample_data.scratch_assay()
    assert [(kw["name"], kind) for _, kw, kind in layers] == [
        ("Brightfield (scratch assay)", "image"),
        ("Hoechst (real)", "image"),
        ("Nuclei labels (real)", "labels"),
    ]
    for data, kwargs, _ in layers:
        assert data.shape == (10, 210, 576)
        assert np.issubdtype(data.dtype, np.integer)
        assert kwargs["scale"] == pytest.approx((1.0, 0.619, 0.619))
    (bf, bf_kw, _), (hoechst, h_kw, _), (nuclei, _, _) = layers
    assert bf_kw["colormap"] == "gray"
    assert h_kw["blending"] == "additive"
    assert h_kw["colormap"] == "magenta"  # measured stains magenta, virtual ones cyan
    assert bf.std() > 0 and hoechst.std() > 0
    # labels are instance ids with background 0 and many nuclei per frame
    assert nuclei.min() == 0 and len(np.unique(nuclei[0])) > 10
    # the Hoechst channel is brighter inside nuclei than in the background
    assert hoechst[nuclei > 0].mean() > 1.5 * hoechst[nuclei == 0].mean()


def test_scratch_assay_layers_load_in_napari_model():
    """The tuples are accepted by napari's layer constructors (no viewer, no Qt)."""
    pytest.importorskip("ndev_sampledata")
    from napari.layers import Layer

    for data, kwargs, kind in _sample_data.scratch_assay():
        layer = Layer.create(data, kwargs, kind)
        assert layer.name == kwargs["name"]
        assert tuple(layer.scale) == pytest.approx(kwargs["scale"])


def test_scratch_assay_missing_package_message(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def fake_find_spec(name, *args, **kwargs):
        if name == "ndev_sampledata":
            return None
        return real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)
    with pytest.raises(ModuleNotFoundError, match="pip install ndev-sampledata"):
        _sample_data.scratch_assay()


def test_the_readme_setup_command_installs_a_qt_binding(repo_root):
    """napari needs a Qt binding: the README's first command must bring one (its extras, not the test extras)."""
    import re
    import tomllib

    readme = (repo_root / "README.md").read_text()
    section = readme.split("## Two commands", 1)[1]
    first_block = section.split("```bash", 1)[1].split("```", 1)[0]
    extras = re.search(r'pip install -e "\.\[([^\]]*)\]"', first_block).group(1).split(",")
    optional = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    requirements = [req for extra in extras for req in optional[extra.strip()]]
    assert any(re.search(r"napari\[[^\]]*(pyqt|pyside|all)|^(pyqt|pyside)", r, re.I) for r in requirements), requirements


def test_nfkb_sample_gives_both_wells_as_demo_nfkb_reads_them():
    from napari_virtualstain._sample_data import nfkb_wells

    try:
        layers = nfkb_wells()
    except FileNotFoundError as exc:
        assert "VIRTUALSTAIN_SHARED_DATA" in str(exc)  # the message says how to point it at BBBC014
        return
    assert [kw["metadata"]["class"] for _, kw, _ in layers] == ["A12", "A01"]
    for data, kw, kind in layers:
        assert kind == "image" and data.shape == (2, 256, 256) and kw["metadata"]["channels"] == ["NF-kB", "DNA"]
        assert kw["metadata"]["class"] in kw["name"].split()  # the Translate widget reads the class from the name
