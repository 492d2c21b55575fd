"""Prompt sources: built-in thesis lists and files."""
import json

import pytest

from drlhf.prompts import BUILTIN, read_prompts


def test_builtin_lists_match_the_thesis_counts():
    assert len(BUILTIN["pink"]) == 4 and BUILTIN["pink"][1] == "A photograph of a deer wearing pink sunglasses."
    assert len(BUILTIN["pickscore-diverse"]) == 24 and len(BUILTIN["pickscore-animals"]) == 24
    assert len(read_prompts("builtin:pickscore-eval")) == 48
    assert len(BUILTIN["pink-colors"]) == 64 * 8 and "A photograph of an owl wearing blue sunglasses." in BUILTIN["pink-colors"]
    with pytest.raises(ValueError, match="built-in lists"):
        read_prompts("builtin:nope")


def test_prompt_files(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\na dog\na cat\n")
    assert read_prompts(str(tmp_path / "p.txt")) == ["a cat", "a dog"]  # blank lines and duplicates dropped
    (tmp_path / "p.jsonl").write_text(json.dumps({"caption": "x"}) + "\n" + json.dumps({"prompt": "y"}) + "\n")
    assert read_prompts(str(tmp_path / "p.jsonl")) == ["x", "y"]
    (tmp_path / "p.csv").write_text('id,caption\n1,"a, b"\n2,c\n')
    assert read_prompts(str(tmp_path / "p.csv")) == ["a, b", "c"]
    (tmp_path / "bad.csv").write_text("id,title\n1,z\n")
    with pytest.raises(ValueError, match="caption"):
        read_prompts(str(tmp_path / "bad.csv"))
    with pytest.raises(FileNotFoundError, match="--prompts"):
        read_prompts(str(tmp_path / "missing.txt"))
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        (tmp_path / "p.parquet").write_bytes(b"PAR1")
        with pytest.raises(ValueError, match="pyarrow"):
            read_prompts(str(tmp_path / "p.parquet"))
    else:
        pq.write_table(pa.table({"caption": ["u", "v", "u"]}), tmp_path / "p.parquet")
        assert read_prompts(str(tmp_path / "p.parquet")) == ["u", "v"]
