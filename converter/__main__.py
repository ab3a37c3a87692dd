"""``python -m converter`` runs the ``onnx-fuse`` command."""

from converter.cli import run

run()
