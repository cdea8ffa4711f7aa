"""Training: data loading (folder and config), splits, bundle written with provenance, validation, resume."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import tifffile
import yaml
from safetensors.torch import load_file

from napari_virtualstain.cli import main
from napari_virtualstain.core.bundle import load_bundle
from napari_virtualstain.core.errors import VirtualStainError
from napari_virtualstain.train.data import load_config, load_folder, split_regions
from napari_virtualstain.train.loop import TrainOptions, TrainProgress, describe_split, train

TINY = dict(steps=6, batch_size=2, crop_size=32, val_every=3, block_out_channels=(8, 16), tile_size=32,
            tile_overlap=8, max_val_size=48)


def _synthetic_field(seed: int, shape=(64, 80)):
    """Blobs: brightfield shows them dark-rimmed, the 'stain' bright, labels one id each."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, np.uint16)
    stain = np.zeros(shape, np.float32)
    for i in range(1, 7):
        cy, cx, r = rng.integers(8, shape[0] - 8), rng.integers(8, shape[1] - 8), rng.integers(4, 7)
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
        labels[inside] = i
        stain[inside] = 1000 + 100 * i
    bf = (2000 + 300 * rng.standard_normal(shape) * 0.1 - (stain > 0) * 500).astype(np.uint16)
    return bf, stain.astype(np.uint16), labels


@pytest.fixture()
def data_folder(tmp_path):
    root = tmp_path / "data"
    for sub in ("input", "target", "labels/nuclei"):
        (root / sub).mkdir(parents=True)
    for i in range(2):
        bf, stain, labels = _synthetic_field(i)
        tifffile.imwrite(root / "input" / f"f{i}.tif", bf)
        tifffile.imwrite(root / "target" / f"f{i}.tif", stain)
        tifffile.imwrite(root / "labels" / "nuclei" / f"f{i}.tif", labels)
    return root


def test_folder_training_writes_loadable_bundle_with_provenance(data_folder, tmp_path):
    spec = load_folder(data_folder, stain_names=["Hoechst"])
    assert spec.label_names == ["nuclei"] and len(spec.images) == 2
    bundle, history = train(spec, tmp_path / "b", TrainOptions(**TINY, command="virtualstain train ..."))
    loaded = load_bundle(tmp_path / "b")
    assert loaded.id == bundle.id
    assert loaded.config.output_names == ["Hoechst", "nuclei boundary", "nuclei foreground"]
    t = loaded.config.training
    assert t["steps"] == 6 and t["seed"] == 0 and t["objective"] == "residual_shift" and t["command"]
    assert t["val_regions"] and all(":" in r for r in t["val_regions"])
    assert [h["step"] for h in history] == [3, 6]
    assert set(history[-1]["val"]) == set(loaded.config.output_names)
    assert all(np.isfinite(v["ssim"]) for v in history[-1]["val"].values())
    assert json.loads((tmp_path / "b" / "training_log.json").read_text()) == history


def test_resume_continues_the_same_run(data_folder, tmp_path):
    spec = load_folder(data_folder, stain_names=["Hoechst"])
    opts = dict(TINY, val_every=3)
    train(spec, tmp_path / "straight", TrainOptions(**opts))
    train(spec, tmp_path / "resumed", TrainOptions(**{**opts, "steps": 3}))
    train(spec, tmp_path / "resumed", TrainOptions(**opts), resume=True)
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    for k in a:
        np.testing.assert_allclose(a[k].numpy(), b[k].numpy(), rtol=1e-5, atol=1e-6)


def test_resume_reads_the_packed_state_and_the_older_one_tensor_per_name(data_folder, tmp_path, monkeypatch):
    """The state is a few flat tensors now (the save held the GIL per tensor); runs saved before still resume."""
    import napari_virtualstain.train.loop as loop

    spec = load_folder(data_folder, stain_names=["Hoechst"])
    opts = dict(TINY, val_every=3)
    train(spec, tmp_path / "straight", TrainOptions(**opts))
    train(spec, tmp_path / "packed", TrainOptions(**{**opts, "steps": 3}))
    assert len(load_file(str(tmp_path / "packed" / "training_state" / "state.safetensors"))) <= 3
    with monkeypatch.context() as m:
        m.setattr(loop, "_pack", lambda tensors: (tensors, None))  # as rounds 1-2 wrote it
        train(spec, tmp_path / "old", TrainOptions(**{**opts, "steps": 3}))
    assert len(load_file(str(tmp_path / "old" / "training_state" / "state.safetensors"))) > 100
    for name in ("packed", "old"):
        train(spec, tmp_path / name, TrainOptions(**opts), resume=True)
        a = load_file(str(tmp_path / "straight" / "model.safetensors"))
        b = load_file(str(tmp_path / name / "model.safetensors"))
        for k in a:
            np.testing.assert_allclose(a[k].numpy(), b[k].numpy(), rtol=1e-5, atol=1e-6)


def test_resume_without_state_is_a_clear_error(data_folder, tmp_path):
    spec = load_folder(data_folder, stain_names=["Hoechst"])
    with pytest.raises(VirtualStainError, match="nothing to resume"):
        train(spec, tmp_path / "none", TrainOptions(**TINY), resume=True)


def test_regression_objective_learns_a_simple_mapping(tmp_path):
    """The one-pass baseline fits target = inverted input: training loss halves, held-out correlation rises."""
    root = tmp_path / "d"
    (root / "input").mkdir(parents=True)
    (root / "target").mkdir()
    rng = np.random.default_rng(0)
    from scipy.ndimage import gaussian_filter

    for i in range(2):
        bf = gaussian_filter(rng.random((64, 64)), 2).astype(np.float32)
        tifffile.imwrite(root / "input" / f"{i}.tif", bf)
        tifffile.imwrite(root / "target" / f"{i}.tif", (1 - bf) * 1000)
    spec = load_folder(root)
    _, history = train(spec, tmp_path / "reg", TrainOptions(**{**TINY, "steps": 60, "val_every": 10, "batch_size": 4,
                                                               "lr": 3e-3, "objective": "regression"}))
    pearson = [h["val"]["stain 0"]["pearson"] for h in history]
    loss = [h["loss"] for h in history]
    assert loss[-1] < 0.5 * loss[0], loss
    assert pearson[-1] > max(pearson[0], 0.98), pearson


def test_validation_scores_narrow_strips_whole_and_stains_as_evaluate_does():
    """The live curve's r is evaluate's: whole strips up to the pixel budget, a stain on its truth's percentiles."""
    from napari_virtualstain.core.metrics import image_metrics, normalize_pair
    from napari_virtualstain.train.stain_job import _validation_scale, validation_window

    assert validation_window(512, 77, 256) == (512, 77)  # an ISL strip: whole (39 k of a 65 k pixel budget)
    assert validation_window(210, 86, 256) == (210, 86)
    assert validation_window(1024, 1024, 256) == (256, 256)
    assert validation_window(4000, 20, 256) == (3276, 20)
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(40, 40))
    pred = 0.5 * truth + rng.normal(size=(40, 40))
    ours = image_metrics(*_validation_scale(pred, truth, "stain"))["pearson"]
    assert ours == pytest.approx(image_metrics(*normalize_pair(pred, truth)[:2])["pearson"])
    flat = _validation_scale(pred, np.zeros((40, 40)), "stain")  # a flat truth: no percentile range, fixed scale
    assert np.all(flat[1] == 0.5)


def test_config_with_index_sources_and_explicit_val(tmp_path):
    stack = np.stack([np.stack(_synthetic_field(t)) for t in range(3)], axis=1)  # (C=3, T=3, Y, X)
    tifffile.imwrite(tmp_path / "ctyx.tif", stack, photometric="minisblack")
    images = [
        {"name": f"t{t}", "split": "val" if t == 2 else "train", "input": {"path": "ctyx.tif", "index": [0, t]},
         "stains": {"Hoechst": {"path": "ctyx.tif", "index": [1, t]}},
         "labels": {"nuclei": {"path": "ctyx.tif", "index": [2, t]}}}
        for t in range(3)
    ]
    cfg = {"name": "cfg", "inputs": ["brightfield"], "stains": ["Hoechst"], "labels": ["nuclei"], "images": images}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
    spec = load_config(tmp_path / "train.yaml")
    np.testing.assert_array_equal(spec.images[1].inputs[0], stack[0, 1])
    train_r, val_r = split_regions(spec)
    assert [im.name for im, _ in train_r] == ["t0", "t1"] and [im.name for im, _ in val_r] == ["t2"]


def test_val_strip_never_overlaps_training(data_folder):
    spec = load_folder(data_folder, stain_names=["Hoechst"])
    train_r, val_r = split_regions(spec)
    for (im_t, xs_t), (im_v, xs_v) in zip(train_r, val_r):
        assert im_t is im_v and xs_t.stop == xs_v.start and xs_v.stop == im_v.inputs.shape[-1]


@pytest.mark.parametrize(
    "images, match",
    [
        ([{"input": {"path": "ctyx.tif"}, "stains": {"Hoechst": {"path": "ctyx.tif", "index": [1, 0]}}}], "2D"),
        ([{"input": {"path": "ctyx.tif", "index": [0, 0]}, "stains": {}}], "no source for stain"),
        ([{"input": {"path": "ctyx.tif", "index": [9, 0]}, "stains": {"Hoechst": "x"}}], "does not fit"),
        ([{"input": {"path": "missing.tif"}, "stains": {"Hoechst": "x"}}], "does not exist"),
    ],
)
def test_bad_training_config_clear_error(tmp_path, images, match):
    tifffile.imwrite(tmp_path / "ctyx.tif", np.zeros((2, 2, 16, 16), np.uint16))
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({"inputs": ["bf"], "stains": ["Hoechst"], "images": images}))
    with pytest.raises(VirtualStainError, match=match):
        load_config(tmp_path / "t.yaml")


def test_config_region_keeps_only_that_rectangle(tmp_path):
    bf, stain, labels = _synthetic_field(0)
    for name, arr in (("bf.tif", bf), ("st.tif", stain), ("lab.tif", labels)):
        tifffile.imwrite(tmp_path / name, arr)
    entry = {"input": "bf.tif", "stains": {"Hoechst": "st.tif"}, "labels": {"nuclei": "lab.tif"}, "region": [0, 32, 40, 80]}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({"inputs": ["bf"], "stains": ["Hoechst"], "labels": ["nuclei"],
                                                     "images": [entry]}))
    im = load_config(tmp_path / "t.yaml").images[0]
    np.testing.assert_array_equal(im.inputs[0], bf[:32, 40:80])
    np.testing.assert_array_equal(im.labels["nuclei"], labels[:32, 40:80])
    entry["region"] = [0, 32, 40, 200]
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({"inputs": ["bf"], "stains": ["Hoechst"], "images": [entry]}))
    with pytest.raises(VirtualStainError, match="outside"):
        load_config(tmp_path / "t.yaml")


TINY_CLI = ["--steps", "2", "--batch-size", "2", "--crop-size", "32", "--channels", "8,16", "--tile-size", "32",
            "--tile-overlap", "8", "--val-every", "2", "--device", "cpu", "--precision", "float32"]


def test_cli_folder_training_names_bundle_announces_split_and_logs_plain_lines(data_folder, tmp_path, capsys):
    """Folder mode: the bundle is named after --output (not 'data'/'train'), the single input is recorded as the
    neutral 'input', stderr says which columns train and which are held out, and a log gets no '\\r' bar."""
    out = tmp_path / "nuclei-model"
    assert main(["train", str(data_folder), "-o", str(out), "--stain-names", "Hoechst", *TINY_CLI]) == 0
    err = capsys.readouterr().err
    config = load_bundle(out).config
    assert config.name == "nuclei-model"
    assert [c.name for c in config.input_channels] == ["input"]
    line = next(ln for ln in err.splitlines() if ln.startswith("validation:"))
    assert "right-hand 15 % of each of 2 image(s) (x >= 68 of 80)" in line and "x < 68" in line, line
    assert "--val-fraction" in line and "split: val" in line
    assert "\r" not in err and "step 2/2 (100 %)" in err and "steps/s" in err
    assert main(["train", str(data_folder), "-o", str(tmp_path / "named"), "--name", "mine", "--weight-decay", "0.05",
                 *TINY_CLI]) == 0
    named = load_bundle(tmp_path / "named").config
    assert named.name == "mine" and named.training["options"]["weight_decay"] == 0.05


def test_config_keeps_its_name_and_announces_whole_val_images(tmp_path, capsys):
    stack = np.stack([np.stack(_synthetic_field(t)) for t in range(3)], axis=1)  # (C=3, T=3, Y, X)
    tifffile.imwrite(tmp_path / "ctyx.tif", stack, photometric="minisblack")
    images = [{"name": f"t{t}", "split": "val" if t == 2 else "train", "input": {"path": "ctyx.tif", "index": [0, t]},
               "stains": {"Hoechst": {"path": "ctyx.tif", "index": [1, t]}}} for t in range(3)]
    cfg = {"name": "from-config", "inputs": ["brightfield"], "stains": ["Hoechst"], "images": images}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "train.yaml"), "-o", str(tmp_path / "out"), *TINY_CLI]) == 0
    assert load_bundle(tmp_path / "out").config.name == "from-config"
    err = capsys.readouterr().err
    assert "validation: 1 image(s) marked split: val are held out whole (t2); 2 image(s) train (t0, t1)" in err


def test_split_announcement_without_validation(data_folder):
    spec = load_folder(data_folder, stain_names=["Hoechst"])
    spec.val_fraction = 0
    assert describe_split(spec).startswith("validation: none - all of 2 image(s) train")


def test_folder_input_name_is_neutral_unless_named(data_folder):
    """A folder does not say what its input is: a fluorescence input must not be recorded as 'brightfield'."""
    assert load_folder(data_folder).input_names == ["input"]
    assert load_folder(data_folder, input_names=["phase"]).input_names == ["phase"]


def test_resume_carries_on_the_clock_and_keeps_every_command(data_folder, tmp_path):
    spec = load_folder(data_folder, stain_names=["Hoechst"])
    out = tmp_path / "b"
    train(spec, out, TrainOptions(**{**TINY, "steps": 3, "command": "virtualstain train data -o b"}))
    state = out / "training_state" / "state.json"
    meta = json.loads(state.read_text())
    meta["history"][-1]["seconds"] = 1000.0  # as if the first run had taken 1000 s
    state.write_text(json.dumps(meta))
    _, history = train(spec, out, TrainOptions(**{**TINY, "command": "virtualstain train data -o b --resume"}),
                       resume=True)
    assert [h["step"] for h in history] == [3, 6]
    assert history[0]["seconds"] == 1000.0 and history[1]["seconds"] >= 1000.0
    t = load_bundle(out).config.training
    assert t["command"] == "virtualstain train data -o b"
    assert t["commands"] == ["virtualstain train data -o b", "virtualstain train data -o b --resume"]
    train(spec, out, TrainOptions(**{**TINY, "steps": 9, "command": "third"}), resume=True)
    t = load_bundle(out).config.training
    assert t["commands"][-1] == "third" and len(t["commands"]) == 3 and t["command"] == "virtualstain train data -o b"
    assert json.loads((out / "training_log.json").read_text())[-1]["seconds"] >= 1000.0


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_a_terminal_plain_lines_in_a_log():
    log = io.StringIO()
    p = TrainProgress(100, 0, "train", stream=log)
    for step in range(1, 101):
        p.update(step, 0.5, step / 10, validated=step == 33, val={"Hoechst": {"pearson": 0.5}} if step == 33 else None)
    p.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert len(lines) == 21  # every 5 steps (5 %) and the validation at step 33
    assert lines[-1].startswith("train: step 100/100 (100 %) loss 0.5000 10.0 s") and "steps/s" in lines[-1]
    assert any(ln.startswith("train: step 33/100") and "val Hoechst r 0.500" in ln for ln in lines)
    term = _Terminal()
    p = TrainProgress(10, 0, "train", stream=term)
    for step in range(1, 11):
        p.update(step, 0.5, step / 10)
    p.close()
    assert "\r" in term.getvalue() and "step 1/10" not in term.getvalue()  # tqdm's bar, not the plain lines


@pytest.mark.parametrize("case, words", [
    ("shape", "registered pixel for pixel"), ("nan target", "NaN/Inf"), ("float labels", "integer ids"),
    ("tiny", "validation strip"), ("rgb input", "RGB"), ("mixed pixel sizes", "different pixel sizes"),
])
def test_training_inputs_as_they_come_get_one_clear_error_and_nothing_written(tmp_path, capsys, case, words):
    """Issue 21: data that a lab really has (mismatched sizes, NaN, float labels, tiny images, colour cameras)."""
    rng = np.random.default_rng(0)
    inp, tgt, lab = rng.random((64, 80)).astype(np.float32), rng.random((64, 80)).astype(np.float32), None
    if case == "shape":
        tgt = tgt[:60]
    elif case == "nan target":
        tgt[5, 5] = np.nan
    elif case == "float labels":
        lab = rng.random((64, 80)).astype(np.float32)
    elif case == "tiny":
        inp, tgt = inp[:20, :24], tgt[:20, :24]
    elif case == "rgb input":
        inp = (rng.random((64, 80, 3)) * 255).astype(np.uint8)
    root = tmp_path / "data"
    for sub in ("input", "target"):
        (root / sub).mkdir(parents=True)
    pixel = {"a": 0.65, "b": 0.325} if case == "mixed pixel sizes" else {"a": None}  # a 20x beside a 40x field
    for stem, um in pixel.items():
        extra = dict(resolution=(1 / um, 1 / um), imagej=True, metadata={"unit": "um"}) if um else {}
        tifffile.imwrite(root / "input" / f"{stem}.tif", inp, **extra)
        tifffile.imwrite(root / "target" / f"{stem}.tif", tgt)
    if lab is not None:
        (root / "labels" / "nuclei").mkdir(parents=True)
        tifffile.imwrite(root / "labels" / "nuclei" / "a.tif", lab)
    out = tmp_path / "out"
    assert main(["train", str(root), "-o", str(out), "--objective", "regression", *TINY_CLI]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and words in err and "Traceback" not in err
    assert not (out / "config.json").exists()


def test_training_in_a_child_process_relays_steps_results_errors_and_cancel(data_folder, tmp_path):
    """The Train widget's path: the same train() in a spawned process; steps come back, the bundle predicts, a user
    error arrives as the same VirtualStainError (not a traceback), and Cancel stops it."""
    from napari_virtualstain.core.errors import Cancelled
    from napari_virtualstain.train.process import train_in_process

    spec = load_folder(data_folder, input_names=["brightfield"], stain_names=["Hoechst"])
    steps = []
    path = train_in_process(spec, tmp_path / "b", TrainOptions(**TINY, objective="regression"), method="single",
                            on_step=lambda stage, step, loss: steps.append((stage, step)))
    assert steps[-1] == (1, TINY["steps"]) and load_bundle(path).config.objective == "regression"
    with pytest.raises(VirtualStainError, match="nothing to resume"):
        train_in_process(spec, tmp_path / "empty", TrainOptions(**TINY), method="recommended", resume=True)
    with pytest.raises(Cancelled):
        train_in_process(spec, tmp_path / "c", TrainOptions(**{**TINY, "steps": 500}, objective="regression"),
                         method="single", should_cancel=lambda: True)


def test_shipped_isl_configs_validate_on_pixels_they_never_train_on_and_never_list_the_held_out_quadrant(
        shared_data):
    """Every ISL recipe in configs/ loads from the real data; its validation pixels never overlap its training pixels
    and neither touches the held-out quadrant [512:, 512:]; demo-isl-tiles.yaml's tiles hold every stain."""
    from pathlib import Path

    import yaml

    from napari_virtualstain.train.data import load_config

    for path in sorted((Path(__file__).resolve().parents[1] / "configs").glob("*isl*.yaml")):
        spec = load_config(path)
        train, val = split_regions(spec)
        assert train and val, path.name
        boxes = {e["name"]: e["region"] for e in yaml.safe_load(path.read_text())["images"]}
        used = {part: np.zeros((1024, 1024), bool) for part in ("train", "val")}
        for part, regions in (("train", train), ("val", val)):
            for im, xs in regions:
                y0, y1, x0, x1 = boxes[im.name]
                a, b, _ = xs.indices(x1 - x0)
                used[part][y0:y1, x0 + a:x0 + b] = True
        assert not (used["train"] & used["val"]).any(), f"{path.name}: validation overlaps training"
        assert not (used["train"] | used["val"])[512:, 512:].any(), f"{path.name}: lists held-out pixels"
        if path.name == "demo-isl-tiles.yaml":  # the tiles were chosen to hold every stain
            for im, xs in val:
                for i, s in enumerate(spec.stain_names):
                    assert np.asarray(im.stains[i][:, xs], np.float64).std() > 1000, (im.name, s)
