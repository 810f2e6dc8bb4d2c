"""``python -m kdexp`` is ``kdexp``."""

from kdexp.cli import main

main()
