"""``python -m converter`` runs the ``onnx-fuse`` command."""

import sys

from converter.cli import main

sys.exit(main())
