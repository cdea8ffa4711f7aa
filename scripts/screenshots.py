"""Screenshots of every widget in a real napari window, for docs/user_guide.md (docs/images/*.png).

Each one is made the way a user would: open the sample (File > Open Sample), open the widget (Plugins menu
entry, through npe2), press its button, wait for the worker, then grab the whole window.

    OMP_NUM_THREADS=1 xvfb-run -a -s "-screen 0 1600x1000x24" python scripts/screenshots.py

Needs ndev-sampledata (the scratch-assay sample) and, for translate/synthesize, a bundled class-conditional
checkpoint (``demo-nfkb``) plus ../shared/data/nfkb_translocation; what is missing is skipped with a message.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = "napari-virtualstain"
NFKB = ROOT.parent / "shared" / "data" / "nfkb_translocation"


def spin(app, until=None, seconds: float = 0.0, timeout: float = 900.0) -> None:
    deadline = time.perf_counter() + (timeout if until is not None else seconds)
    while time.perf_counter() < deadline and not (until is not None and until()):
        app.processEvents()
        time.sleep(0.01)


def new_viewer(size=(1500, 950)):
    import napari

    viewer = napari.Viewer(show=True, title="napari-virtualstain")
    viewer.window._qt_window.resize(*size)
    return viewer


def run_and_wait(app, widget) -> None:
    widget.run_button.click()
    spin(app, until=lambda: not widget.runner.running)
    if widget.runner.last_outcome != "done":
        raise RuntimeError(f"{type(widget).__name__} ended with {widget.runner.last_outcome}: {widget.status.text()}")
    spin(app, seconds=0.5)


def grab(app, viewer, path: Path) -> None:
    spin(app, seconds=0.5)
    viewer.screenshot(str(path), canvas_only=False, flash=False)
    print(f"wrote {path}")


def stain_and_uncertainty(app, out: Path) -> None:
    viewer = new_viewer()
    viewer.open_sample(PLUGIN, "scratch_assay")
    viewer.dims.set_point(0, 9)  # time point 9: held out from demo-stain's training
    viewer.layers["Nuclei labels (real)"].visible = False
    viewer.layers["Hoechst (real)"].visible = False
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Virtual stain")
    widget.controls.set_checkpoint("demo-stain")
    widget.controls.set_input_layer("Brightfield (scratch assay)")
    run_and_wait(app, widget)
    viewer.layers["cells (virtual)"].visible = False
    viewer.layers["nuclei (virtual)"].contour = 1
    grab(app, viewer, out / "stain_widget.png")

    # the real stain beside the virtual one
    viewer.layers["Hoechst (real)"].visible = True
    viewer.layers["Hoechst (real)"].colormap = "magenta"
    viewer.layers["nuclei (virtual)"].visible = False
    viewer.layers["Brightfield (scratch assay)"].visible = False
    grab(app, viewer, out / "stain_vs_real.png")
    viewer.close()

    viewer = new_viewer()
    viewer.open_sample(PLUGIN, "scratch_assay")
    viewer.dims.set_point(0, 9)
    for name in ("Nuclei labels (real)", "Hoechst (real)"):
        viewer.layers[name].visible = False
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Uncertainty")
    widget.controls.set_checkpoint("demo-stain")
    widget.controls.set_input_layer("Brightfield (scratch assay)")
    widget.mode.setCurrentText("both")
    widget.n_seeds.setValue(3)
    run_and_wait(app, widget)
    viewer.layers["Brightfield (scratch assay)"].visible = False  # the rest is the widget's default view
    grab(app, viewer, out / "uncertainty_widget.png")

    # the review: the first region centred and zoomed, one decision made
    panel = widget.review_panel
    panel.decide("hallucination")
    panel.step(0)
    spin(app, seconds=0.5)
    grab(app, viewer, out / "flag_review.png")
    viewer.close()


def train_widget(app, out: Path, steps: int = 300) -> None:
    """The Train widget fine-tuning demo-stain on the sample's own layers (one pass, a few minutes on a CPU)."""
    import tempfile

    viewer = new_viewer()
    viewer.open_sample(PLUGIN, "scratch_assay")
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Train")
    widget.input.setCurrentText("Brightfield (scratch assay)")
    widget.set_targets(["Hoechst (real)", "Nuclei labels (real)"])
    widget.start_from.setCurrentIndex(max(0, widget.start_from.findText("demo-stain-regression")))
    widget.method.setCurrentText("one pass (fastest)")
    widget.steps.setValue(steps)
    widget.output.setText(str(Path(tempfile.mkdtemp()) / "lab-model"))
    run_and_wait(app, widget)
    spin(app, seconds=1.0)  # the plots refresh on a timer
    grab(app, viewer, out / "train_widget.png")
    viewer.close()


def translate_and_synthesize(app, out: Path, checkpoint: str | None = None) -> None:
    from napari_virtualstain.core.bundle import bundled_checkpoints

    demos = [n for n, p in bundled_checkpoints().items() if '"classcond"' in (p / "config.json").read_text()]
    if not demos and checkpoint is None:
        print("skip translate/synthesize: no bundled class-conditional checkpoint (demo-nfkb) yet")
        return
    if not NFKB.is_dir():
        print(f"skip translate/synthesize: {NFKB} not found")
        return
    import tifffile

    name = checkpoint or ("demo-nfkb" if "demo-nfkb" in demos else demos[0])
    rows, cols = slice(768, 1024), slice(400, 656)  # held out from demo-nfkb's training (rows 768-1023)
    well = np.stack([tifffile.imread(NFKB / f"A12_{c}.tif")[rows, cols] for c in ("nfkb", "dna")])
    viewer = new_viewer()
    viewer.add_image(well, name="A12 unstimulated (NF-kB, DNA)", colormap="green")
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Translate condition")
    widget.controls.set_checkpoint(name)
    widget.source.setCurrentText("A12")
    widget.target.setCurrentText("A01")
    run_and_wait(app, widget)
    grab(app, viewer, out / "translate_widget.png")
    widget.side_by_side.setChecked(True)
    grab(app, viewer, out / "translate_side_by_side.png")
    viewer.close()

    viewer = new_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Synthesize")
    widget.controls.set_checkpoint(name)
    widget.class_name.setCurrentText("A01")
    widget.count.setValue(4)
    if widget.controls.bundle.config.input_channels:  # NF-kB given DNA: generate for the held-out nuclei
        viewer.add_image(well[1, :128, :128], name="DNA (A12, held out)", colormap="blue")
        widget.condition.setCurrentText("DNA (A12, held out)")
    else:
        widget.size.setValue(128)
        widget.guidance.setValue(3.0)
    run_and_wait(app, widget)
    grab(app, viewer, out / "synthesize_widget.png")
    viewer.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--out", default=str(ROOT / "docs" / "images"))
    parser.add_argument("--only", choices=["stain", "classcond", "train"], default=None)
    parser.add_argument("--classcond", default=None, help="class-conditional checkpoint (default: the bundled demo)")
    args = parser.parse_args(argv)
    from qtpy.QtWidgets import QApplication

    app = QApplication.instance() or QApplication(sys.argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.only in (None, "stain"):
        stain_and_uncertainty(app, out)
    if args.only in (None, "classcond"):
        translate_and_synthesize(app, out, args.classcond)
    if args.only in (None, "train"):
        train_widget(app, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
