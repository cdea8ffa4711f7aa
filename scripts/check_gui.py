"""napari starts and docks every widget: run in an environment built from the README's first command alone.

    xvfb-run -a python scripts/check_gui.py        # .ci/run does this before installing the test extras
"""

from __future__ import annotations

import sys


def main() -> int:
    import napari

    from napari_virtualstain._widgets.__main__ import open_demo

    viewer = napari.Viewer(show=False)
    docked = open_demo(viewer, ("Virtual stain", "Uncertainty", "Translate condition", "Synthesize"))
    print("napari", napari.__version__, "| widgets:", ", ".join(type(w).__name__ for w in docked))
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
