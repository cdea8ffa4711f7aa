"""``python -m napari_virtualstain.cli`` (torchrun launches training this way)."""

import sys

from . import main

sys.exit(main())
