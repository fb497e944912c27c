"""What the recipe's command-line tools share."""

from __future__ import annotations

import argparse
from typing import NoReturn

EXIT_USAGE = 2


class OneLineErrorParser(argparse.ArgumentParser):
    """Bad arguments print one line naming the problem (and the valid choices), then exit 2: no usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")
