"""Configs of the trainers, and the check that an override names a real key."""

import difflib
from typing import List, Sequence

from ml_collections import config_dict


def check_keys(config: config_dict.ConfigDict,
               reference: config_dict.ConfigDict, prefix: str = "") -> None:
  """Raises ValueError for a key of `config` that `reference` lacks.

  The error is one line naming the key and the nearest valid keys: an
  unknown key is a typo, and silently ignoring it would train with defaults.
  """
  for key in config.keys():
    if key not in reference:
      raise ValueError(_unknown_key_message(prefix + key, reference, prefix))
  for key, value in reference.items():
    if isinstance(value, config_dict.ConfigDict):
      check_keys(config[key], value, prefix=f"{prefix}{key}.")


def _unknown_key_message(key: str, reference: config_dict.ConfigDict,
                         prefix: str = "") -> str:
  valid = [prefix + k for k in reference.keys()]
  nearest = difflib.get_close_matches(key, valid, n=3, cutoff=0.75)
  hint = (f"did you mean {' or '.join(nearest)}?" if nearest else
          f"valid keys: {', '.join(sorted(valid))}.")
  return f"Unknown config key {key!r}: {hint}"


def unknown_override(argv: Sequence[str], flag_name: str,
                     reference: config_dict.ConfigDict) -> List[str]:
  """Messages for each `--FLAG.a.b=v` in argv whose key `reference` lacks."""
  messages = []
  for arg in argv:
    if not arg.startswith(f"--{flag_name}."):
      continue
    path = arg[len(flag_name) + 3:].split("=", 1)[0].split(".")
    node, prefix = reference, ""
    for part in path:
      if not isinstance(node, config_dict.ConfigDict) or part not in node:
        if isinstance(node, config_dict.ConfigDict):
          messages.append(_unknown_key_message(prefix + part, node, prefix))
        else:
          messages.append(f"Unknown config key {'.'.join(path)!r}: "
                          f"{prefix[:-1]} has no sub-keys.")
        break
      node, prefix = node[part], f"{prefix}{part}."
  return messages


def exit_on_unknown_override(argv: Sequence[str], flag_name: str,
                             reference: config_dict.ConfigDict) -> None:
  """Exits with one line per unknown `--FLAG.key=value` override in argv.

  Call it before defining the config flag: ml_collections parses overrides
  when the flag is defined and raises a bare AttributeError (a long trace)
  for a key the config lacks.
  """
  messages = unknown_override(argv, flag_name, reference)
  if messages:
    raise SystemExit("\n".join(messages))
