"""CLIP's byte-level BPE tokenizer, pure Python, from a folder's own files.

Reads `vocab.json` and `merges.txt` (and, for the special tokens and the
padded length, `tokenizer_config.json` / `special_tokens_map.json`), the files
of every SD `tokenizer/` folder and CLIP model folder. The ids are openai/CLIP's
`clip.tokenize(truncate=True)` (= open_clip's), which is what transformers'
slow `CLIPTokenizer` with ftfy installed gives on the cleaned caption, except
for one transformers quirk left out on purpose: it first splits the text on
its added tokens, and SDXL's second tokenizer registers its pad token "!" as
one, so transformers turns every "!" of a caption into the pad id 0 where
OpenCLIP (which trained bigG) gives "!</w>" (256) at a word's end.

  tok = CLIPTokenizer.from_pretrained("pipeline/tokenizer")
  tok(["a photo of a cat"])["input_ids"]   # int32 [1, 77]: bos, ids..., eos, pad...
"""

from __future__ import annotations

import functools
import html
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# CLIP's pre-tokenisation regex (openai/CLIP simple_tokenizer.py), case-insensitive.
_PATTERN = (
  r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
# openai/CLIP and transformers read at most this many merges (49152 - 256 bytes - 2 specials).
_MAX_MERGES = 49152 - 256 - 2
_DEFAULT_SPECIALS = {
  "bos_token": "<|startoftext|>",
  "eos_token": "<|endoftext|>",
  "pad_token": "<|endoftext|>",
  "unk_token": "<|endoftext|>",
}


def clip_text_clean(text: str) -> str:
  """CLIP's caption normalisation, as openai/CLIP's `simple_tokenizer` and open_clip do it.

  `ftfy.fix_text` (mojibake, full-width forms, curly quotes, ...), HTML
  entities unescaped twice, whitespace runs to one space, lower case. This is
  the text the CLIP text towers of SD1.5 / SDXL were trained on; transformers'
  `CLIPTokenizer` quietly does something else without ftfy (a BERT-style
  basic tokenizer: CJK split per character, quotes kept) and never unescapes
  HTML.
  """
  try:
    import ftfy
  except ImportError:
    raise ImportError(
      "Tokenizing captions as CLIP does needs ftfy: `pip install 'ftfy>=6.1'` (a dependency "
      "of dpo_jax; the official Diffusion-DPO trainer requires it too)."
    ) from None
  text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
  return re.sub(r"\s+", " ", text).strip().lower()


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
  """GPT-2 / CLIP's reversible byte -> printable unicode character table."""
  bs = list(range(ord("!"), ord("~") + 1))
  bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, (chr(c) for c in cs)))


def _token_content(value: Any) -> str | None:
  """A special token as the config files write it: a string or {"content": ...}."""
  if isinstance(value, Mapping):
    return value.get("content")
  return value


def _read_json(path: str) -> dict[str, Any]:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _read_bpe(directory: str) -> tuple[dict[str, int], list[tuple[str, ...]], dict[str, int]]:
  """(vocab, merges, added tokens) from vocab.json + merges.txt, else from tokenizer.json.

  The hub's SD folders have both; transformers 5 saves only tokenizer.json (the
  `tokenizers` library's format, whose BPE model holds the same vocab and merges).
  """
  paths = {n: os.path.join(directory, n) for n in ("vocab.json", "merges.txt")}
  if all(os.path.isfile(p) for p in paths.values()):
    vocab = _read_json(paths["vocab.json"])
    with open(paths["merges.txt"], encoding="utf-8") as f:
      # The first line is the "#version" header; as openai/CLIP and transformers.
      lines = f.read().strip().split("\n")[1 : _MAX_MERGES + 1]
    return vocab, [tuple(line.split()) for line in lines], {}
  fast = os.path.join(directory, "tokenizer.json")
  if not os.path.isfile(fast):
    missing = next(p for p in paths.values() if not os.path.isfile(p))
    raise FileNotFoundError(
      f"Missing file {missing}: a CLIP tokenizer folder needs vocab.json and merges.txt "
      f"(or a tokenizer.json with a BPE model)."
    )
  model = _read_json(fast).get("model") or {}
  if model.get("type") != "BPE" or "vocab" not in model or "merges" not in model:
    raise ValueError(f"{fast}: expected a BPE model with vocab and merges (a CLIP tokenizer).")
  merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in model["merges"]]
  added = {t["content"]: int(t["id"]) for t in _read_json(fast).get("added_tokens") or []}
  return dict(model["vocab"]), merges[:_MAX_MERGES], added


class CLIPTokenizer:
  """CLIP BPE tokenizer.

  Attributes (the names transformers' `CLIPTokenizer` uses):
    encoder: {token: id} (`vocab.json`); byte_encoder: byte -> unicode table;
    bpe_ranks: {(a, b): rank}; pat: the compiled pre-tokenisation regex;
    model_max_length: padded length (77 in SD), or None when the folder gives none;
    bos/eos/pad/unk_token(_id).
  """

  def __init__(
    self,
    vocab: Mapping[str, int],
    merges: Sequence[tuple[str, str]],
    *,
    bos_token: str = "<|startoftext|>",
    eos_token: str = "<|endoftext|>",
    pad_token: str = "<|endoftext|>",
    unk_token: str = "<|endoftext|>",
    model_max_length: int | None = 77,
    added_tokens: Mapping[str, int] | None = None,
    source: str = "tokenizer",
  ):
    import regex

    self.encoder = dict(vocab)
    # Tokens outside vocab.json (transformers' added tokens) only give special ids.
    self.added_tokens = {k: v for k, v in (added_tokens or {}).items() if k not in self.encoder}
    self.byte_encoder = bytes_to_unicode()
    self.bpe_ranks = {tuple(m): i for i, m in enumerate(merges)}
    self.pat = regex.compile(_PATTERN, regex.IGNORECASE)
    self.model_max_length = model_max_length
    self.source = source
    self._cache = {"<|startoftext|>": "<|startoftext|>", "<|endoftext|>": "<|endoftext|>"}
    self.bos_token, self.eos_token = bos_token, eos_token
    self.pad_token, self.unk_token = pad_token, unk_token
    self.bos_token_id = self._special_id("bos_token", bos_token)
    self.eos_token_id = self._special_id("eos_token", eos_token)
    self.pad_token_id = self._special_id("pad_token", pad_token)
    self.unk_token_id = self._special_id("unk_token", unk_token)

  def _special_id(self, name: str, token: str) -> int:
    if token in self.encoder:
      return self.encoder[token]
    if token in self.added_tokens:
      return self.added_tokens[token]
    raise ValueError(
      f"{self.source}: {name} {token!r} is neither in vocab.json nor an added token of "
      "tokenizer_config.json; fix the special tokens there."
    )

  @classmethod
  def from_pretrained(cls, directory: str) -> CLIPTokenizer:
    """Reads a tokenizer folder: vocab.json, merges.txt, and when present
    tokenizer_config.json, special_tokens_map.json and added_tokens.json."""
    vocab, merges, added = _read_bpe(directory)
    config, specials = {}, dict(_DEFAULT_SPECIALS)
    config_path = os.path.join(directory, "tokenizer_config.json")
    if os.path.isfile(config_path):
      config = _read_json(config_path)
      for idx, entry in (config.get("added_tokens_decoder") or {}).items():
        added[_token_content(entry)] = int(idx)
    added_path = os.path.join(directory, "added_tokens.json")
    if os.path.isfile(added_path):
      added.update({k: int(v) for k, v in _read_json(added_path).items()})
    map_path = os.path.join(directory, "special_tokens_map.json")
    # As transformers: special_tokens_map.json overrides tokenizer_config.json.
    for source in (config, _read_json(map_path) if os.path.isfile(map_path) else {}):
      for key in _DEFAULT_SPECIALS:
        if _token_content(source.get(key)) is not None:
          specials[key] = _token_content(source[key])
    max_length = config.get("model_max_length")
    # transformers writes 1e30 ("unset") for a tokenizer without a length.
    max_length = int(max_length) if max_length is not None and max_length < 1e9 else None
    return cls(
      vocab,
      merges,
      model_max_length=max_length,
      added_tokens=added,
      source=directory,
      **specials,
    )

  def __len__(self) -> int:
    """Vocabulary size including added tokens (as `len()` of transformers' tokenizer)."""
    return len(self.encoder) + len(self.added_tokens)

  def bpe(self, token: str) -> str:
    """One byte-encoded word -> its BPE pieces joined by spaces (last piece ends in "</w>")."""
    if token in self._cache:
      return self._cache[token]
    word = tuple(token[:-1]) + (token[-1] + "</w>",)
    while len(word) > 1:
      pairs = set(zip(word, word[1:]))
      best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
      if best not in self.bpe_ranks:
        break
      merged, i = [], 0
      while i < len(word):
        if i < len(word) - 1 and (word[i], word[i + 1]) == best:
          merged.append(word[i] + word[i + 1])
          i += 2
        else:
          merged.append(word[i])
          i += 1
      word = tuple(merged)
    out = " ".join(word)
    self._cache[token] = out
    return out

  def text_ids(self, text: str) -> list[int]:
    """Already cleaned text -> BPE ids, without start / end tokens."""
    ids = []
    for word in self.pat.findall(text):
      encoded = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
      ids += [self.encoder.get(piece, self.unk_token_id) for piece in self.bpe(encoded).split(" ")]
    return ids

  def __call__(
    self, prompts: Sequence[str], max_length: int | None = None
  ) -> dict[str, np.ndarray]:
    """Captions -> {"input_ids", "attention_mask"}: int32 [B, L], L = max_length or the default.

    Each caption is cleaned (`clip_text_clean`), BPE-encoded, cut to L - 2
    tokens (long captions lose their tail) and framed by the start and end
    tokens, then padded to L with the pad token; the mask is 1 on the framed
    caption and 0 on padding.
    """
    length = max_length or self.model_max_length
    if not length:
      raise ValueError(
        f"{self.source}: tokenizer_config.json gives no model_max_length; pass max_length."
      )
    if isinstance(prompts, str):
      raise TypeError("Pass a list of captions, not one string.")
    ids = np.full((len(prompts), length), self.pad_token_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for i, prompt in enumerate(prompts):
      body = self.text_ids(clip_text_clean(prompt))[: length - 2]
      ids[i, : len(body) + 2] = [self.bos_token_id, *body, self.eos_token_id]
      mask[i, : len(body) + 2] = 1
    return {"input_ids": ids, "attention_mask": mask}
