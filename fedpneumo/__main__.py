"""Allow ``python -m fedpneumo``."""

from fedpneumo.cli import main

main()
