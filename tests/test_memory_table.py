"""benchmarks/memory.py: facts that hold on any machine (no activation measurement; ~20 s on 2 cores)."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import memory  # noqa: E402
from benchmarks.architectures import param_counts_on_meta  # noqa: E402


@pytest.fixture(scope="module")
def counts():
    return param_counts_on_meta()


def test_parameter_counts_are_the_published_sizes(counts):
    # three significant digits; the model cards: SD3.5 Medium "2.5 billion", FLUX.1 [dev] "12 billion", Qwen-Image "20B"
    assert f"{counts['SD3.5-Medium']:.3g}" == "2.47e+09"  # with its 226 M pos-embed buffer, as the checkpoint
    assert f"{counts['FLUX.1-dev']:.3g}" == "1.19e+10"
    assert f"{counts['Qwen-Image']:.3g}" == "2.04e+10"
    assert round(counts["SD3.5-Medium"] / 1e9, 1) == 2.5
    assert (round(counts["FLUX.1-dev"] / 1e9), round(counts["Qwen-Image"] / 1e9)) == (12, 20)


def test_flux_row_is_the_sum_of_its_parts(counts):
    r = memory.family_memory("pickscore-flux", counts, measure=False)
    assert r["resident"] == pytest.approx(sum(r[k] for k in memory.RESIDENT))
    assert r["update_peak"] == pytest.approx(r["resident"] + r["activations"])
    assert r["scoring_peak"] == pytest.approx(r["resident"] + r["decode"])
    assert r["total"] == max(r["update_peak"], r["scoring_peak"])
    assert r["setup_peak"] == r["setup_steps"][-1][1] and all(a[1] <= b[1] for a, b in zip(r["setup_steps"],
                                                                                          r["setup_steps"][1:]))
    # with LoRA, pi_base is the policy with its adapters off (models.AdaptersOff): no second transformer
    assert r["reference"] == 0 and r["decode_images"] == min(r["decode_images"], 8)
    # the frozen weights in bf16: 2 bytes a parameter (norm weights stay fp32: under 0.1 %)
    assert r["policy"] * memory.GB / (2 * counts["FLUX.1-dev"]) == pytest.approx(1, abs=1e-3)
    # LoRA: r (in + out) per targeted Linear, counted here without peft
    from diffusers import FluxTransformer2DModel

    from benchmarks.architectures import FLUX_DEV
    from drlhf import presets
    targets, rank = presets.EXPERIMENTS["pickscore-flux"]["train_ppo"]["lora_targets"].split(","), r["lora_rank"]
    with torch.device("meta"):
        net = FluxTransformer2DModel(**FLUX_DEV["transformer"])
    assert r["lora_params"] == sum(rank * (m.in_features + m.out_features) for name, m in net.named_modules()
                                   if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t)
                                                                             for t in targets))
