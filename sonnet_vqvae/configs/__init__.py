"""Configs of the trainers: presets by name, resuming a stored one, key checks.

Presets are the modules of this folder: `--config=default`, `--config=vqvae2`
(train) and `--config=prior` (prior) work from any directory, as does a
config file's path.
"""

import copy
import difflib
import os
from typing import Any, List, Mapping, Optional, Sequence

from ml_collections import config_dict
from ml_collections import config_flags

_PRESET_DIR = os.path.dirname(os.path.abspath(__file__))


def presets() -> List[str]:
  """The names `--config=NAME` takes: this folder's config modules."""
  return sorted(name[:-3] for name in os.listdir(_PRESET_DIR)
                if name.endswith(".py") and not name.startswith("_"))


def config_file(value: str) -> str:
  """The file `--config=VALUE` names: a preset's name or a config file's path.

  A path that does not exist but ends in configs/<preset>.py (the
  repository's own path, given from another directory) is that preset.
  ml_collections' `file.py:argument` form is kept.

  Raises:
    ValueError: naming the value and the presets, when it is neither.
  """
  path, colon, argument = value.partition(":")
  if os.path.isfile(path):
    return value
  name = path[:-3] if path.endswith(".py") else path
  folder, base = os.path.split(name)
  if base in presets() and (
      not folder or os.path.basename(os.path.normpath(folder)) == "configs"):
    return os.path.join(_PRESET_DIR, base + ".py") + colon + argument
  raise ValueError(
      f"--config={value}: no such file, and no preset of that name "
      f"(presets: {', '.join(presets())}). Pass a preset's name, e.g. "
      "--config=vqvae2, or the path of a config file.")


def resolve_config_flag(argv: Sequence[str],
                        flag_name: str = "config") -> List[str]:
  """`argv` with `--FLAG=NAME` (or `--FLAG NAME`) made the file it names.

  Call it before the config flag is parsed (see `config_file`).

  Raises:
    ValueError: as `config_file`.
  """
  argv = list(argv)
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{flag_name}="):
      argv[i] = f"--{flag_name}=" + config_file(arg.split("=", 1)[1])
    elif arg == f"--{flag_name}" and i + 1 < len(argv):
      argv[i + 1] = config_file(argv[i + 1])
  return argv


def for_run(flag: Any, stored: Optional[Mapping[str, Any]],
            source: str) -> config_dict.ConfigDict:
  """The config a command runs with, given its config flag and a stored run.

  With `--config=FILE` given, or no stored run, the flag's config (its file
  with the `--config.key=value` overrides). Otherwise the stored run's config
  with the overrides given on top: `train --workdir W` alone resumes the run
  as it was, and `--config.num_steps=N` changes only that. Fingerprint keys
  are then checked against the stored run as for any resume.

  Args:
    flag: the config flag, `flags.FLAGS["config"]` of `config_flags`.
    stored: the stored run's config (a nested dict, as in run.json), or None.
    source: the file it was read from, for errors.

  Raises:
    ValueError: naming `source` and the key, for a stored key or value the
      config does not take.
  """
  if flag.present or stored is None:
    return flag.value
  overrides = config_flags.get_override_values(flag)
  config = copy.deepcopy(flag.value)
  for key, value in _flatten(stored).items():
    if key in overrides:
      continue
    try:
      _set(config, key, value)
    except (KeyError, AttributeError) as e:
      raise ValueError(
          f"{source}: config key {key!r} is unknown to this version's config "
          f"({e}). Pass --config=FILE to run with another config.") from None
    except TypeError as e:
      raise ValueError(
          f"{source}: config.{key} is {value!r}, which the config does not "
          f"take ({e}). Fix the file, or pass --config=FILE.") from None
  return config


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict:
  flat = {}
  for key, value in d.items():
    if isinstance(value, Mapping) and value:
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[prefix + key] = value
  return flat


def _set(config: config_dict.ConfigDict, key: str, value: Any) -> None:
  *parents, last = key.split(".")
  for parent in parents:
    config = config[parent]
  if last not in config:
    raise KeyError(last)
  config[last] = value


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
