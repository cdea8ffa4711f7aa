"""Compare predictions of one or more methods with the real stains and true instance labels; write a report.

Files are matched by stem, the way ``virtualstain predict`` names its outputs:

* truth stains ``TRUTH/<stem>.tif`` (2D = one channel, or CYX) <-> ``PRED/<stem>_virtualstain.tif`` (CYX, channel
  names in the ImageJ metadata); channels are matched by name (``truth_channels`` names the truth's channels in
  order, or the truth's own ImageJ channel names are used);
* true labels ``LABELS/<stem>.tif`` for a label name (e.g. ``nuclei``) <-> ``PRED/<stem>_nuclei_labels.tif``;
* an optional input image ``INPUT/<stem>.tif`` is shown in the figures.

Every stain channel is scored on one stated scale: prediction and truth are both mapped by the truth's 1st/99.8th
percentiles to [0, 1] and clipped (``normalize_pair``); ``pearson_raw`` is Pearson r of the raw values beside it, since
clipping can hide a failure on a low-signal image. Instances are matched one-to-one by IoU (see
``core/metrics.py`` for the exact definitions). :func:`evaluate` returns an :class:`EvaluationReport`;
:func:`write_report` writes ``metrics.csv``, ``summary.csv``, ``report.json``, ``report.md`` and PNG figures.
No Qt, no napari, no matplotlib: figures are drawn with numpy and Pillow.
"""

from .common import (
    COLUMNS,
    DEFAULT_IOU_THRESHOLDS,
    HEADLINE_IOU,
    IMAGE_METRICS,
    PRED_SUFFIX,
    ChannelPanel,
    EvaluationReport,
    FigureRow,
    ImagePreview,
)
from .reports import write_report
from .scores import evaluate

__all__ = ["COLUMNS", "DEFAULT_IOU_THRESHOLDS", "HEADLINE_IOU", "IMAGE_METRICS", "PRED_SUFFIX", "ChannelPanel",
           "EvaluationReport", "FigureRow", "ImagePreview", "evaluate", "write_report"]
