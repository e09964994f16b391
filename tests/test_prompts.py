"""Prompt sets: built-in, text / JSONL files and Pick-a-Pic captions."""

import json

import pytest

from dpo_jax import prompts
from tests.fixtures import good_rows, write_parquet


def test_builtin_and_files(tmp_path):
  assert prompts.load_prompts("builtin") == list(prompts.BUILTIN_PROMPTS)
  assert len(set(prompts.BUILTIN_PROMPTS)) == 16
  txt = tmp_path / "p.txt"
  txt.write_text("# a comment\na cat\n\n  a dog  \n")
  assert prompts.load_prompts(str(txt)) == ["a cat", "a dog"]
  jl = tmp_path / "p.jsonl"
  jl.write_text(json.dumps({"prompt": "x"}) + "\n\n" + json.dumps({"caption": "y"}) + "\n")
  assert prompts.load_prompts(str(jl)) == ["x", "y"]
  jl.write_text(json.dumps({"text": "x"}) + "\n")
  with pytest.raises(ValueError, match=r"p\.jsonl:1: .*'prompt' or 'caption'"):
    prompts.load_prompts(str(jl))
  (tmp_path / "empty.txt").write_text("# nothing\n")
  with pytest.raises(ValueError, match="No prompts in"):
    prompts.load_prompts(str(tmp_path / "empty.txt"))
  with pytest.raises(FileNotFoundError, match="missing.txt does not exist"):
    prompts.load_prompts(str(tmp_path / "missing.txt"))


def test_pickapic_captions_distinct_in_order(tmp_path):
  rows, _ = good_rows(5)
  captions = ["b", "a", "b", "  ", "c"]
  for r, c in zip(rows, captions):
    r["caption"] = c
  write_parquet(str(tmp_path / "validation_unique-00000-of-00001.parquet"), rows)
  write_parquet(str(tmp_path / "train-00000-of-00001.parquet"), good_rows(2)[0])
  assert prompts.load_prompts(f"pickapic:{tmp_path}") == ["b", "a", "c"]
  assert len(prompts.load_prompts(f"pickapic:{tmp_path}:train")) == 2
  with pytest.raises(ValueError, match="No split 'test'"):
    prompts.load_prompts(f"pickapic:{tmp_path}:test")
  (tmp_path / "validation_unique-00000-of-00001.parquet").unlink()
  with pytest.raises(ValueError, match="no evaluation split"):
    prompts.load_prompts(f"pickapic:{tmp_path}")
