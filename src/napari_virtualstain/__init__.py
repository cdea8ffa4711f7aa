"""napari-virtualstain: diffusion-based virtual staining of microscopy images.

A napari plugin and the ``virtualstain`` command-line tool. The numerical core
lives in :mod:`napari_virtualstain.core` and needs neither Qt nor napari; this
top-level module stays free of heavy imports so that napari's plugin discovery
and ``virtualstain --help`` stay fast.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("napari-virtualstain")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
