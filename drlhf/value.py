"""Value networks V(x_t, t, c) of the small experiments (the U-Net-based one is drlhf.reward_model.RewardModel).

    CriticCNN        appendix B's network, pre-trained as a digit classifier (thesis 6.4)
    EncoderValue     a small conv encoder, the toy counterpart of the classifier value function
    ClassifierValue  OpenAI's noisy-image classifier + a linear layer to one scalar (thesis 6.5)
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from drlhf.files import atomic_write, cache_lock, default_cache_dir
from drlhf.models import load_guided_classifier
from drlhf.reward_model import RewardModel, load_reward_model
from drlhf.toys import cosine_noise_schedule, toy_digits, train_toy


def timestep_features(t: torch.Tensor, dim: int = 16, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Sinusoidal features of the training timestep, (B,) -> (B, dim) (Vaswani et al. 2017)."""
    freqs = torch.exp(-math.log(1000.0) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    angles = (t.float() / num_train_timesteps * 1000)[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], 1)


class CriticCNN(nn.Module):
    """Appendix B's value network (conv 3x3 to 6C channels, ReLU, max-pool 2, FC 24, ReLU, FC), with the
    timestep's sinusoidal features concatenated to the flattened features so it can value noisy states."""

    def __init__(self, in_channels: int = 1, resolution: int = 16, out_dim: int = 1, t_dim: int = 16):
        super().__init__()
        self.t_dim = t_dim
        self.conv = nn.Conv2d(in_channels, in_channels * 6, kernel_size=3, padding=1)
        self.fc1 = nn.Linear(in_channels * 6 * (resolution // 2) ** 2 + t_dim, 24)
        self.fc2 = nn.Linear(24, out_dim)

    def forward(self, x, t, cond=None):
        h = F.max_pool2d(F.relu(self.conv(x)), 2).flatten(1)
        h = F.relu(self.fc1(torch.cat([h, timestep_features(t, self.t_dim)], 1)))
        out = self.fc2(h)
        return out[:, 0] if out.shape[1] == 1 else out


class EncoderValue(nn.Module):
    """A small convolutional encoder with timestep (and optional class) embedding -> one scalar; the toy
    counterpart of the noisy-image-classifier value function of Experiments 2-5 (thesis 6.5)."""

    def __init__(self, in_channels: int = 3, width: int = 32, num_classes: int = 0, t_dim: int = 64):
        super().__init__()
        self.t_dim = t_dim
        self.t_mlp = nn.Sequential(nn.Linear(t_dim, width * 2), nn.SiLU(), nn.Linear(width * 2, width * 2))
        self.class_emb = nn.Embedding(num_classes + 1, width * 2) if num_classes else None
        self.conv_in = nn.Conv2d(in_channels, width, 3, padding=1)
        self.down1 = nn.Conv2d(width, width * 2, 3, stride=2, padding=1)
        self.down2 = nn.Conv2d(width * 2, width * 2, 3, stride=2, padding=1)
        self.norm1, self.norm2 = nn.GroupNorm(8, width * 2), nn.GroupNorm(8, width * 2)
        self.out = nn.Linear(width * 2, 1)

    def forward(self, x, t, cond=None):
        emb = self.t_mlp(timestep_features(t, self.t_dim))
        if self.class_emb is not None and cond is not None:
            emb = emb + self.class_emb(cond)
        h = F.silu(self.conv_in(x))
        h = F.silu(self.norm1(self.down1(h)) + emb[:, :, None, None])
        h = F.silu(self.norm2(self.down2(h)))
        return self.out(h.mean((2, 3)))[:, 0]


class ClassifierValue(nn.Module):
    """The noisy-image classifier with a new linear layer from its 1000 logits to one scalar (thesis 6.5: the
    value function of Experiments 2-4, given x_t and the timestep, no class)."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier
        self.head = nn.Linear(classifier.out[-1].c_proj.out_channels, 1)  # on the attention pool's logits

    def forward(self, x, t, cond=None):
        return self.head(self.classifier(x, t))[:, 0]


# ---- appendix B's value network pre-trained as a noisy-digit classifier (thesis 6.4), cached ----------------
def pretrain_critic_classifier(in_channels: int, resolution: int, cache_dir=None, steps: int = 400, seed: int = 0):
    """Appendix B's CNN trained as a noisy-digit classifier on all ten digits (thesis 6.4: the value function
    was initialized from an MNIST classifier). Cached as safetensors; returns the state dict."""
    path = Path(cache_dir or default_cache_dir()) / f"critic-classifier-c{in_channels}-r{resolution}-s{steps}.safetensors"
    with cache_lock(path):
        if not path.exists():
            _pretrain_critic_classifier(path, in_channels, resolution, steps, seed)
    return load_file(path)


def _pretrain_critic_classifier(path: Path, in_channels: int, resolution: int, steps: int, seed: int):
    torch.manual_seed(seed)
    x, y = toy_digits(list(range(10)), resolution, in_channels == 3, seed)
    net = CriticCNN(in_channels, resolution, out_dim=10)
    sched = cosine_noise_schedule()

    def loss_fn(g):
        i = torch.randint(len(x), (128,), generator=g)
        t = torch.randint(0, 1000, (128,), generator=g) * (torch.rand(128, generator=g) < 0.75)  # a quarter clean
        xt = sched.add_noise(x[i], torch.randn(x[i].shape, generator=g), t)
        return F.cross_entropy(net(xt, t), y[i])

    train_toy(net, loss_fn, steps, 3e-3, seed, "pre-training the value network as a digit classifier (cached)")
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp))


def make_value_fn(kind: str, init: str, base, reward_model: str | None = None, classifier: str | None = None,
                  cache_dir=None) -> nn.Module | None:
    """train_ppo.py's --value-fn and --value-init -> V(x_t, t, c) for a base model (drlhf.models.BaseModel), on
    the CPU; None for --value-fn none."""
    c, h, _ = base.sample_shape
    if kind == "none":
        return None
    if kind == "cnn":
        net = CriticCNN(c, h)
        if init == "classifier":  # appendix B: start from a digit classifier, new scalar output
            state = pretrain_critic_classifier(c, h, cache_dir)
            net.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc2.")}, strict=False)
        return net
    if "reward" in (kind, init):  # thesis 6.9: the value function starts as a copy of the reward model
        return load_reward_model(reward_model, base, cache_dir=cache_dir)[0].first_head()  # an ensemble's first head
    if kind == "classifier":  # thesis 6.5: the ImageNet classifier + a linear layer to one scalar
        return ClassifierValue(load_guided_classifier(classifier, cache_dir))
    if kind == "unet":  # the reward-model architecture on the base U-Net, with a new head
        null_text = base.encode_prompts([""]) if base.conditioning == "text" else None
        return RewardModel(base.net, base.conditioning, null_text, base.num_classes)
    if init != "random":  # kind == "encoder"
        print(f"[drlhf] note: --value-init {init} applies to --value-fn cnn only; the encoder starts from random "
              "weights", file=sys.stderr)
    return EncoderValue(c)
