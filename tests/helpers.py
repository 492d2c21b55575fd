"""Scoring functions used by the tests through `--reward module:function`, and the fixture's OpenAI-format
checkpoints."""
import json
from pathlib import Path

FIXTURE = Path(__file__).parent / "fixtures" / "guided_diffusion"


def nan_for_second_sample(images, cond=None):
    scores = images.float().mean((1, 2, 3))
    scores[1] = float("nan")
    return scores


def mean_brightness(images, cond=None):
    return images.float().mean((1, 2, 3))


def write_openai_checkpoints(folder: Path):
    """The fixture's reduced U-Net and classifier as OpenAI-style .pt state dicts, each with a sidecar .json of the
    constructor kwargs that differ from the real 64x64 models. Returns (unet.pt, classifier.pt)."""
    import torch
    from safetensors.torch import load_file
    readme = json.loads((FIXTURE / "README.json").read_text())
    out = []
    for name, model, kwargs_key in (("unet", "unet_small", "resulting_UNetModel_kwargs"),
                                    ("classifier", "classifier_small", "EncoderUNetModel_kwargs")):
        k = readme["models"][model][kwargs_key]
        torch.save({n: v.float() for n, v in load_file(FIXTURE / f"{model}.safetensors").items()}, folder / f"{name}.pt")
        (folder / f"{name}.json").write_text(json.dumps({key: k[key] for key in
                                                         ("model_channels", "num_res_blocks", "num_head_channels")}))
        out.append(folder / f"{name}.pt")
    return out


# reward functions that break the contract (one number per sample), for the failure tests
def one_scalar(images, cond=None):
    return images.float().mean()


def two_columns(images, cond=None):
    return images.float().mean((2, 3)).repeat(1, 2)[:, :2]


def one_short(images, cond=None):
    return images.float().mean((1, 2, 3))[:-1]


def strings(images, cond=None):
    return ["good"] * len(images)


def raises(images, cond=None):
    raise ZeroDivisionError("the scorer divided by zero")


def noisy_ink(images, prompts=None):
    """Mean brightness plus noise that depends only on the image (a labeler the reward model can overfit)."""
    import torch
    ink = images.float().mean((1, 2, 3))
    seeds = (images.float().abs().sum((1, 2, 3)) * 1e4).long() % 100_003
    return ink + torch.stack([torch.randn((), generator=torch.Generator().manual_seed(int(s))) for s in seeds]) * ink.std()
