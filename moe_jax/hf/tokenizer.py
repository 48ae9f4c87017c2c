"""The Hugging Face tokenizer of an imported model (`tokenizer.json`, read with `tokenizers`)."""
from __future__ import annotations

import json
import os
import shutil

# Files that describe a hub tokenizer; copied along with a conversion in either direction.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")


def copy_tokenizer_files(source: str, target: str) -> list[str]:
  """Copies the tokenizer files present in `source` to `target`; returns their names."""
  copied = []
  for name in TOKENIZER_FILES:
    if os.path.isfile(os.path.join(source, name)):
      os.makedirs(target, exist_ok=True)
      shutil.copyfile(os.path.join(source, name), os.path.join(target, name))
      copied.append(name)
  return copied


def load_tokenizer(path: str):
  """`tokenizers.Tokenizer` from PATH (a tokenizer.json or a directory holding one)."""
  import tokenizers  # pylint: disable=g-import-not-at-top  (the `hf` extra)

  file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
  if not os.path.isfile(file):
    raise FileNotFoundError(f"{file} does not exist: a tokenizer is a tokenizer.json file.")
  return tokenizers.Tokenizer.from_file(file)


def eos_token_id(hub_config_json: str | None, default: int = -1) -> int:
  """The first `eos_token_id` of a hub config (JSON text); `default` when it has none."""
  if not hub_config_json:
    return default
  eos = json.loads(hub_config_json).get("eos_token_id")
  if isinstance(eos, list):
    eos = eos[0] if eos else None
  return default if eos is None else int(eos)
