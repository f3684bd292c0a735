"""``python -m moekit ...`` (and ``torchrun ... -m moekit train ...``) = the ``moekit`` command."""

import sys

from moekit.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
