"""`python -m onnxc` is the `onnxc` command."""

from onnxc.cli import main

main(prog_name="onnxc")
