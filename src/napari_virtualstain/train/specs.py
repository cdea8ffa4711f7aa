"""Training data of any kind from one path: a folder, a YAML/JSON config or a CSV — the loader ``virtualstain train``
uses, public so that scripts (``scripts/gpu_train.py``) parse data the same way."""

from __future__ import annotations

from pathlib import Path

from ..core.errors import VirtualStainError
from .classcond_data import load_class_csv, load_class_folders, load_classcond_config
from .data import load_config, load_folder


def load_training_spec(data, task: str | None = None, input_names: list[str] | None = None,
                       stain_names: list[str] | None = None, channel_axis: int = 0):
    """A paired-stain spec, or a class-conditional one (--task classcond, a 'task: classcond' config, or a CSV)."""
    src = Path(data)
    names = stain_names
    if src.is_dir():
        if task == "classcond":
            return load_class_folders(src, names)
        return load_folder(src, input_names, names, channel_axis)
    if not src.is_file():
        raise VirtualStainError(f"training data {src} is neither a folder nor a YAML/JSON/CSV file")
    if src.suffix.lower() == ".csv":
        return load_class_csv(src, names)
    raw = None
    if src.suffix.lower() in (".yaml", ".yml", ".json"):
        import yaml

        try:
            raw = yaml.safe_load(src.read_text())  # JSON is YAML
        except yaml.YAMLError as exc:
            raise VirtualStainError(f"{src} is not valid YAML/JSON: {exc}") from None
    if isinstance(raw, dict) and (raw.get("task") == "classcond" or task == "classcond"):
        return load_classcond_config(src, raw)
    if task == "classcond":
        raise VirtualStainError(f"{src}: --task classcond needs class folders, a CSV (image,class) or a classcond config")
    return load_config(src)
