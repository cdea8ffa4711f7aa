"""What every part of an evaluation shares: file naming, metric columns, the report dataclasses."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ... import __version__
from ..io import output_name


PRED_SUFFIX = output_name("stain", "")  # "_virtualstain.tif", as predict names its outputs


DEFAULT_IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(9))  # 0.5, 0.55, ..., 0.9


HEADLINE_IOU = 0.5


IMAGE_METRICS = ("pearson", "pearson_raw", "mse", "psnr", "ssim")


INSTANCE_COLUMNS = ("n_true", "n_pred", "tp", "fp", "fn", "precision", "recall", "f1", "mean_matched_iou",
                    "panoptic_quality")


#: trust (core/confidence.py outputs, when predict wrote them): interval coverage of the real stain, the per-object
#: confidence's AUROC for "matches a true object at IoU >= 0.5", and reliability (fraction matched per confidence bin)
TRUST_COLUMNS = ("interval_level", "coverage", "interval_width", "confidence_auroc", "confidence_bin",
                 "matched_fraction")


COLUMNS = ("method", "image", "target", "metric_type", "iou_threshold", "n_images", *IMAGE_METRICS,
           *INSTANCE_COLUMNS, "norm_low", "norm_high", *TRUST_COLUMNS)
CONFIDENCE_BINS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0001)


ERROR_RANGE = 0.25  # error panels: pred - truth on the [0, 1] scale, white at 0, saturated at +-0.25


NORMALISATION_TEXT = (
    "Each stain channel: prediction and truth are both scaled by the truth's percentiles {lo:g} and {hi:g} to "
    "[0, 1] (low percentile -> 0, high -> 1) and clipped; Pearson r, MSE, PSNR (data range 1) and SSIM "
    "(scikit-image, 7x7 window) are computed on that scale. norm_low/norm_high are the percentiles in the truth's "
    "units. pearson_raw is Pearson r of the raw values (no scaling, no clipping): clipping can hide a failure on a "
    "low-signal image (noise and outliers squeezed into [0, 1]), so a large gap between the two is worth a look."
)


MATCHING_TEXT = (
    "Instances: true and predicted objects are matched one-to-one among pairs with IoU >= threshold, maximising "
    "the number of matches, then the summed IoU (Hungarian algorithm; unique above 0.5). tp = matches, "
    "fp = n_pred - tp, fn = n_true - tp, precision = tp/(tp+fp), recall = tp/(tp+fn), f1 = 2tp/(2tp+fp+fn), "
    "mean_matched_iou = mean IoU of matches, panoptic_quality = sum(IoU of matches)/(tp + fp/2 + fn/2); "
    "0 where a denominator is 0."
)


SUMMARY_TEXT = (
    "summary.csv: image metrics are the mean over images; instance metrics pool tp/fp/fn and matched IoU over "
    "all images of a method, then take the ratios."
)


@dataclass
class ChannelPanel:
    method: str
    prediction: np.ndarray  # RGB uint8 thumbnail
    error: np.ndarray | None
    caption: str


@dataclass
class FigureRow:
    """One row of an image's figure: a stain channel or a label set, truth first, then each method."""

    target: str
    kind: str  # "image" | "instances"
    truth: np.ndarray
    truth_title: str
    panels: list[ChannelPanel] = field(default_factory=list)


@dataclass
class ImagePreview:
    stem: str
    input: np.ndarray | None = None
    rows: list[FigureRow] = field(default_factory=list)


@dataclass
class EvaluationReport:
    """Every number of an evaluation: ``rows`` per (method, image, target[, IoU threshold]), ``summary`` per
    (method, target[, IoU threshold]); ``settings`` (folders, normalisation, thresholds), ``files`` (each compared
    file with the provenance it carries), ``notes`` (what was skipped and why) and small ``previews`` for figures."""

    methods: list[str]
    rows: list[dict]
    summary: list[dict]
    settings: dict
    files: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    previews: list[ImagePreview] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        return {"package_version": __version__, "methods": self.methods, "settings": self.settings,
                "summary": self.summary, "rows": self.rows, "files": self.files, "notes": self.notes}

    def summary_value(self, method: str, target: str, metric: str, iou_threshold: float | None = None):
        kind = "image" if iou_threshold is None else "instances"  # trust rows have their own metric types
        for r in self.summary:
            if (r["method"] == method and r["target"] == target and r.get("iou_threshold") == iou_threshold
                    and r["metric_type"] == kind):
                return r.get(metric)
        raise KeyError((method, target, metric, iou_threshold))
