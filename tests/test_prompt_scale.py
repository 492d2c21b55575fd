"""Prompt tables at Flow-GRPO's scale (25,432 PickScore training prompts, ~139 GB of SD3 states encoded whole): a long
prompt file is encoded as drawn (drlhf.prompts.LazyPromptTable) with the same conditioning as encoding it whole,
a bounded cache, and bits that do not depend on what was drawn with a prompt; a short one is encoded at set-up as
before. On a tiny SD3 pipeline (random weights, three text encoders)."""
import json
import math

import pytest
import torch

from benchmarks.architectures import build_sd35
from drlhf import models
from drlhf.prompts import CACHE_BYTES, FULL_TABLE_MAX, LazyPromptTable, prompt_table, sample_conditions
from helpers import passes_reproduce_bits

N_LONG = 25_000


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    return build_sd35(tmp_path_factory.mktemp("sd3") / "tiny-sd3", "tiny", "cpu")


@pytest.fixture(scope="module")
def base(tiny_sd3):
    return models.load_base_model(str(tiny_sd3))


@pytest.fixture(scope="module")
def long_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "train.txt"
    path.write_text("".join(f"a photograph of thing number {i}, style {i % 13}\n" for i in range(N_LONG)))
    return path


@pytest.fixture
def counted(base, monkeypatch):
    """base.encode_prompts counting its calls and the rows sent (filler included)."""
    calls = {"calls": 0, "rows": 0}
    encode = base.encode_prompts

    def counting(prompts):
        calls["calls"] += 1
        calls["rows"] += len(prompts)
        return encode(prompts)
    monkeypatch.setattr(base, "encode_prompts", counting)
    return calls


def test_lazy_table_gives_the_conditioning_of_encoding_all_at_once(base, tmp_path):
    prompts = ["a red cat", "a blue dog", "a cat", "A photograph of a corgi wearing pink sunglasses.", "a lighthouse"]
    full = base.encode_prompts(prompts)                                       # (5, L, D), as prompt_table does
    lazy = LazyPromptTable(prompts, base.encode_prompts)
    assert len(lazy) == len(prompts)
    for idx in (torch.tensor([3, 0, 3, 4]), [1, 2], torch.tensor([[0, 1], [4, 4]]), slice(1, 4), torch.tensor(2), -1):
        torch.testing.assert_close(lazy[idx], full[idx], rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.stack(list(lazy)), full, rtol=0, atol=1e-5)
    assert lazy[torch.tensor([], dtype=torch.long)].shape == (0, *full.shape[1:])
    with pytest.raises(IndexError):
        lazy[[5]]
    # the same generator draws the same prompts from either table, with the same conditioning
    for group_size in (1, 2):
        c_full, p_full = sample_conditions(base, None, 8, torch.Generator().manual_seed(3), prompts, full, group_size)
        c_lazy, p_lazy = sample_conditions(base, None, 8, torch.Generator().manual_seed(3), prompts, lazy, group_size)
        assert p_lazy == p_full
        torch.testing.assert_close(c_lazy, c_full, rtol=0, atol=1e-5)
    # a short prompt file is encoded at set-up, in one pass, exactly as before
    (tmp_path / "p.txt").write_text("\n".join(prompts))
    plist, table = prompt_table(str(tmp_path / "p.txt"), base)
    assert plist == prompts and isinstance(table, torch.Tensor) and torch.equal(table, full)


def test_cache_is_bounded_and_a_prompts_bits_do_not_depend_on_its_company(base):
    prompts = [f"prompt {i}" for i in range(40)]
    row_bytes = base.encode_prompts([""])[0].nbytes
    lazy = LazyPromptTable(prompts, base.encode_prompts, cache_bytes=3 * row_bytes)
    first = lazy[[0, 1, 2]]
    assert lazy.encoded == 3 and list(lazy.cache) == [0, 1, 2]
    lazy[[1]]                                                                 # a hit: most recently used now
    assert lazy.encoded == 3
    lazy[[3]]                                                                 # evicts 0, the least recently used
    assert list(lazy.cache) == [2, 1, 3] and lazy.cached_bytes == 3 * row_bytes
    wide = lazy[list(range(10, 30))]                                          # a draw wider than the cache
    torch.testing.assert_close(wide, base.encode_prompts(prompts[10:30]), rtol=0, atol=1e-5)
    assert len(lazy.cache) == 3 and lazy.cached_bytes <= lazy.cache_bytes
    again = lazy[[5, 2, 0, 1]][1:]                                            # encoded again, in other company
    same = torch.equal if passes_reproduce_bits() else lambda a, b: torch.allclose(a, b, rtol=0, atol=1e-5)
    assert same(again, first[[2, 0, 1]])
    assert same(LazyPromptTable(prompts, base.encode_prompts)[[39, 2, 7]][1], first[2])


def test_a_25000_prompt_file_encodes_only_what_is_drawn(base, long_file, counted):
    prompts, table = prompt_table(str(long_file), base)
    assert len(prompts) == N_LONG > FULL_TABLE_MAX and isinstance(table, LazyPromptTable) and len(table) == N_LONG
    assert counted["calls"] == 0                                              # nothing encoded at set-up
    g, drawn, epochs, n, group = torch.Generator().manual_seed(0), set(), 3, 8, 2
    for _ in range(epochs):
        cond, cond_prompts = sample_conditions(base, None, n, g, prompts, table, group)
        drawn |= set(cond_prompts)
        torch.testing.assert_close(cond, base.encode_prompts(cond_prompts), rtol=0, atol=1e-5)
    counted["calls"] -= epochs  # the reference encodings just above
    counted["rows"] -= epochs * n
    row_bytes = cond[0].nbytes                                                # L x D x 4 of the tiny SD3
    full_bytes = N_LONG * row_bytes                                           # what the table would take encoded whole
    assert table.encoded == len(drawn) <= epochs * n // group
    assert counted["calls"] <= epochs * math.ceil(n // group / table.batch)  # whole fixed-size calls, filler included
    assert counted["rows"] == counted["calls"] * table.batch
    assert len(table.cache) == len(drawn) and table.cached_bytes == len(drawn) * row_bytes <= CACHE_BYTES
    assert table.cached_bytes < full_bytes / 1000


def test_train_ppo_on_a_25000_prompt_file(run, tiny_sd3, long_file, tmp_path):
    """One toy epoch of GRPO on the tiny SD3 with the long file (encoding it whole would take ~1 GB here)."""
    out = tmp_path / "ppo"
    run("train_ppo.py", "--pretrained", tiny_sd3, "--sampler", "flow", "--eta", "0.7", "--prompts", long_file,
        "--latent", "true", "--conditioning", "text", "--resolution", "32", "--reward", "tests.helpers:mean_brightness",
        "--advantage", "group", "--value-fn", "none", "--num-envs", "4", "--group-size", "2", "--num-steps", "2",
        "--minibatch-size", "4", "--eval-samples", "2", "--eval-every", "1", "--policy-warmup-steps", "0",
        "--epochs", "1", "--output-dir", out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 1 and math.isfinite(summary["final_reward_mean"])
