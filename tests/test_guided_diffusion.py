"""drlhf/guided_diffusion.py against OpenAI's guided-diffusion reference numbers (tests/fixtures/guided_diffusion,
produced by the MIT-licensed upstream code; see its README.json)."""
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from drlhf.guided_diffusion import GuidedClassifier, GuidedUNet
from drlhf.sampler import DiffusionSchedule, SamplerConfig, space_timesteps

FIXTURE = Path(__file__).parent / "fixtures" / "guided_diffusion"
README = json.loads((FIXTURE / "README.json").read_text())
KEYS = json.loads((FIXTURE / "architecture_and_keys.json").read_text())
IO = load_file(FIXTURE / "io.safetensors")


def small_models():
    k = README["models"]["unet_small"]["resulting_UNetModel_kwargs"]
    unet = GuidedUNet(64, 3, k["model_channels"], 6, k["num_res_blocks"], (32, 16, 8), tuple(k["channel_mult"]),
                      1000, k["num_head_channels"]).eval()
    unet.load_state_dict({n: v.float() for n, v in load_file(FIXTURE / "unet_small.safetensors").items()}, strict=True)
    c = README["models"]["classifier_small"]["EncoderUNetModel_kwargs"]
    clf = GuidedClassifier(64, 3, c["model_channels"], 1000, c["num_res_blocks"], (32, 16, 8), tuple(c["channel_mult"]),
                           c["num_head_channels"]).eval()
    clf.load_state_dict({n: v.float() for n, v in load_file(FIXTURE / "classifier_small.safetensors").items()},
                        strict=True)
    return unet, clf


def test_outputs_match_the_reference():
    unet, clf = small_models()
    with torch.no_grad():
        assert (unet(IO["x"], IO["timesteps"], IO["labels"]) - IO["unet_out"]).abs().max() <= 5e-5
        assert (unet(IO["x"], IO["respaced_t_model"], IO["labels"]) - IO["respaced_unet_out"]).abs().max() <= 5e-5
        assert (clf(IO["x"], IO["timesteps"]) - IO["classifier_logits"]).abs().max() <= 1e-5


def test_respaced_learned_range_step_and_classifier_guidance():
    unet, clf = small_models()
    sched = DiffusionSchedule(IO["base_betas"], space_timesteps(1000, "25", "guided"),
                              SamplerConfig(num_steps="25", spacing="guided", variance_type="learned_range"))
    idx = 24 - IO["respaced_t"]  # respaced indices 24 and 0 = our steps 0 and 24
    t = sched.timesteps[idx]
    with torch.no_grad():
        mean, std = sched.distribution(unet(IO["x"], t, IO["labels"]), IO["x"], idx)
    assert (mean - IO["respaced_mean"]).abs().max() <= 1e-5
    assert (2 * std.log() - IO["respaced_log_variance"]).abs().max() <= 2e-5
    x = IO["x"].clone().requires_grad_(True)  # grad of sum_i log p(y_i | x_i, t_i), classifier scale 1
    logp = torch.log_softmax(clf(x, t), -1)[torch.arange(2), IO["labels"]].sum()
    grad, = torch.autograd.grad(logp, x)
    assert (grad - IO["respaced_classifier_grad"]).norm() / IO["respaced_classifier_grad"].norm() <= 1e-4
    guided = mean + std ** 2 * grad
    assert (guided - IO["respaced_guided_mean"]).abs().max() <= 1e-5


def test_real_64x64_architectures_have_the_checkpoint_keys():
    """The real models (random weights, built on the meta device) against the key list of the real checkpoints."""
    with torch.device("meta"):
        unet = GuidedUNet(64, 3, 192, 6, 3, (32, 16, 8), (1, 2, 3, 4), 1000, 64)
        clf = GuidedClassifier(64, 3, 128, 1000, 4, (32, 16, 8), (1, 2, 3, 4), 64)  # classifier_depth 4
    for model, name in ((unet, "real_unet_64x64"), (clf, "real_classifier_64x64")):
        ours = {k: list(v.shape) for k, v in model.state_dict().items()}
        assert ours == {k: list(v) for k, v in KEYS[name]["state_dict_shapes"].items()}, name
        assert sum(p.numel() for p in model.parameters()) == KEYS[name]["num_parameters"], name


def test_gradient_checkpointing_changes_nothing_but_memory():
    """--gradient-checkpointing on OpenAI's U-Net (per-block recomputation): the same output and the same gradients."""
    unet, _ = small_models()
    x, t, y = torch.randn(2, 3, 64, 64), torch.tensor([10, 900]), torch.tensor([88, 3])
    grads = []
    for ckpt in (False, True):
        unet.zero_grad(set_to_none=True)
        unet.gradient_checkpointing = ckpt
        unet.train()
        out = unet(x, t, y)
        out.pow(2).mean().backward()
        grads.append((out.detach(), torch.cat([p.grad.flatten() for p in unet.parameters()])))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=0, atol=0)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-5, atol=1e-7)
