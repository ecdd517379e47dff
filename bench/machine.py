"""The machine a benchmark runs on, printed before its figures.

Figures from different machines are not comparable (see
`sonnet_vqvae.machine`), so every script in bench/ starts with
`print_machine()`:

    {"machine": {"cpu_model": "...", "cpu_count": 2, ...}}
"""

import json
from typing import Dict

from sonnet_vqvae.machine import describe  # pylint: disable=unused-import
from sonnet_vqvae.machine import WATCHED_FLAGS  # pylint: disable=unused-import


def print_machine() -> Dict[str, object]:
  """Prints `describe()` as one JSON line {"machine": {...}} and returns it."""
  machine = describe()
  print(json.dumps({"machine": machine}), flush=True)
  return machine
