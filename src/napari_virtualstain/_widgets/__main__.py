"""``python -m napari_virtualstain._widgets [WIDGET ...]``: napari with the scratch-assay sample and widgets open.

WIDGET is a menu name ("Virtual stain", "Uncertainty", "Translate condition", "Synthesize", "Train"); default:
Virtual stain.
The same as starting ``napari -w napari-virtualstain "Virtual stain"`` and choosing File > Open Sample.
"""

from __future__ import annotations

import sys

PLUGIN = "napari-virtualstain"


def open_demo(viewer, widgets=("Virtual stain",)) -> list:
    """Load the sample (if ndev-sampledata is installed) and dock ``widgets``; returns the widgets."""
    from ._notify import notify_warning

    try:
        viewer.open_sample(PLUGIN, "scratch_assay")
        viewer.dims.set_point(0, 9)  # a time point demo-stain never saw in training
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        notify_warning(str(exc))
    return [viewer.window.add_plugin_dock_widget(PLUGIN, name)[1] for name in widgets]


def main(argv: list[str] | None = None) -> int:
    import napari

    names = (sys.argv[1:] if argv is None else argv) or ["Virtual stain"]
    open_demo(napari.Viewer(title="napari-virtualstain"), names)
    napari.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
