"""The reward model of thesis 5.2: the base model's own U-Net encoder with a cross-attention pooling head (for an
SD3-class transformer: its first half of joint blocks, with the same head; each family's encoder half is its
adapter's, drlhf.families).

    input (x, t, c) in the model's own input space (latents for latent models, t = 0 for finished samples)
      -> conv_in, time (+ class) embedding, down blocks, mid block of the base U-Net   (frozen by default)
      -> mid-block feature map (B, C, h, w)
      -> CrossAttentionPool: a learned query attends to the image features and the condition tokens
         (text-encoder hidden states, or the class embedding; nothing for unconditional models)
      -> one scalar, standardized with the training-set mean and std (Eq. 5.2)

The same module with a timestep input serves as the value function V(x_t, t, c) (thesis 6.9: Pink's value
function starts as a copy of its reward model).

For OpenAI's ImageNet model the reward model is ClassifierRewardModel instead (thesis 6.7, Macaw): the
noisy-image classifier with a fully connected layer from its logits to one scalar. Classifier-free reward guidance: the condition is dropped with
probability p during training (replaced by a learned null token, and by the unconditional class / empty prompt
inside the encoder); at use, r = r_uncond + w (r_cond - r_uncond).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file

from drlhf import models
from drlhf.cli import UserError
from drlhf.families import family_of
from drlhf.files import save_safetensors, write_json
from drlhf.models import base_fingerprint

TRAINABLE = ("head", "mid", "encoder")  # new head only (thesis) / + mid block / + the whole encoder


class CrossAttentionPool(nn.Module):
    """One learned query (plus the mean image token) attends over image tokens and condition tokens -> scalar."""

    def __init__(self, feat_dim: int, cond_dim: int | None, width: int = 128, heads: int = 4):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.img_proj = nn.Linear(feat_dim, width)
        self.cond_proj = nn.Linear(cond_dim, width) if cond_dim else None
        self.null_cond = nn.Parameter(torch.zeros(1, 1, width)) if cond_dim else None
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, 1)

    def forward(self, feats, cond_tokens=None, drop=None):
        img = self.img_proj(feats.flatten(2).transpose(1, 2))            # (B, h*w, width)
        q = self.query.expand(len(img), -1, -1) + img.mean(1, keepdim=True)
        kv, mask = img, None
        if self.cond_proj is not None:
            c = self.cond_proj(cond_tokens)                                  # (B, L, width)
            null = self.null_cond.expand(len(img), -1, -1).to(c.dtype)
            kv = torch.cat([img, c, null], 1)
            drop = torch.zeros(len(img), dtype=torch.bool, device=img.device) if drop is None else drop
            # a dropped condition hides its tokens and shows the null token instead (key_padding_mask: True = ignore)
            mask = torch.cat([torch.zeros(len(img), img.shape[1], dtype=torch.bool, device=img.device),
                              drop[:, None].expand(-1, c.shape[1]), ~drop[:, None]], 1)
        pooled, _ = self.attn(q, kv, kv, key_padding_mask=mask, need_weights=False)
        return self.out(self.norm(pooled[:, 0] + q[:, 0]))[:, 0]


class RewardModel(nn.Module):
    def __init__(self, net: nn.Module, conditioning: str, null_text=None, num_classes: int = 0, width: int = 128,
                 heads: int = 4, trainable: str = "head", ensemble: int = 1):
        super().__init__()
        self.family = family_of(net)
        if not self.family.reward_model:
            raise ValueError(f"this reward model does not reuse a {self.family.name}; for OpenAI's ImageNet model use "
                             "the classifier-based one (train_reward.py --backbone classifier)")
        if trainable not in TRAINABLE:
            raise ValueError(f"--trainable must be one of {TRAINABLE}, got {trainable!r}")
        self.conditioning, self.num_classes, self.trainable = conditioning, num_classes, trainable
        self.fingerprint = base_fingerprint(net)
        self.encoder = self.family.encoder_copy(net)  # the policy's network stays untouched
        feat_dim, cond_dim = self.family.encoder_dims(net, conditioning)
        last = self.family.last_encoder_block(self.encoder)  # a U-Net's mid block, a transformer's last kept block
        self.head = CrossAttentionPool(feat_dim, cond_dim, width, heads)
        # train_reward.py --ensemble N: N - 1 more heads, each its own init, on the same encoder features
        self.extra_heads = nn.ModuleList(CrossAttentionPool(feat_dim, cond_dim, width, heads)
                                         for _ in range(ensemble - 1))
        self.register_buffer("null_text", null_text if null_text is not None else torch.zeros(0), persistent=False)
        self.register_buffer("reward_mean", torch.zeros(ensemble) if ensemble > 1 else torch.zeros(()))
        self.register_buffer("reward_std", torch.ones(ensemble) if ensemble > 1 else torch.ones(()))
        self.requires_grad_(False)
        self.head.requires_grad_(True)
        self.extra_heads.requires_grad_(True)
        if trainable in ("mid", "encoder"):  # mid: the U-Net's mid block, or the transformer's last kept block
            last.requires_grad_(True)
        if trainable == "encoder":
            self.encoder.requires_grad_(True)

    # -----------------------------------------------------------------------------------------------------
    def features(self, x, t, cond, drop):
        """Mid-block features (B, C, h, w) of the U-Net encoder (a transformer's image tokens (B, D, N)) for inputs x
        at timesteps t."""
        t = t.expand(len(x)) if t.ndim == 0 else t
        cond = None if self.conditioning == "none" else cond
        return self.family.features(self.encoder, x, t, self.conditioning, cond, drop, self.null_text)

    @property
    def ensemble(self) -> int:
        return 1 + len(self.extra_heads)

    def raw(self, x, t=None, cond=None, drop=None):
        """Unstandardized reward r_phi (B,); (B, N) for an ensemble of N heads (the encoder runs once)."""
        t = torch.zeros(len(x), dtype=torch.long, device=x.device) if t is None else t
        drop = torch.zeros(len(x), dtype=torch.bool, device=x.device) if drop is None else drop
        feats = self.features(x.contiguous(), t, cond, drop)  # contiguous: see ClassifierRewardModel.raw
        tokens = self.family.condition_tokens(self.encoder, self.conditioning, cond)  # text states, class embedding
        tokens = None if tokens is None else tokens.to(feats.dtype)
        drop = drop if self.conditioning != "none" else None
        r = self.head(feats, tokens, drop).float()
        if len(self.extra_heads):
            r = torch.stack([r] + [h(feats, tokens, drop).float() for h in self.extra_heads], -1)
        return r

    def first_head(self) -> "RewardModel":
        """The model with its first head only (a value function needs one number per state)."""
        self.extra_heads = nn.ModuleList()
        self.reward_mean, self.reward_std = self.reward_mean.flatten()[0], self.reward_std.flatten()[0]
        return self

    def forward(self, x, t=None, cond=None, guidance: float = 1.0, standardize: bool = True, drop=None):
        """r~ (Eq. 5.2) of inputs x (B, C, H, W); with guidance w != 1, r_u + w (r_c - r_u) in one batch of 2B.
        `drop` (B,) drops the condition of single inputs (training for reward guidance)."""
        if guidance != 1.0 and self.conditioning != "none":
            n = len(x)
            drop = torch.cat([torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)]).to(x.device)
            tt = None if t is None else torch.cat([t, t])
            r_c, r_u = self.raw(torch.cat([x, x]), tt, torch.cat([cond, cond]), drop).chunk(2)
            r = r_u + guidance * (r_c - r_u)
        else:
            r = self.raw(x, t, cond, drop)
        return (r - self.reward_mean) / self.reward_std if standardize else r

    # -----------------------------------------------------------------------------------------------------
    def trainable_state(self) -> dict:
        """What the folder stores: the head, the trainable encoder parts and the standardization buffers."""
        keep = {n for n, p in self.named_parameters() if p.requires_grad} | {"reward_mean", "reward_std"}
        return {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items() if k in keep}

    def save(self, out_dir: Path, config: dict):
        _save_folder(self, out_dir, dict(config, width=self.head.out.in_features, heads=self.head.attn.num_heads,
                                         ensemble=self.ensemble, family=self.family.name,
                                         encoder_blocks=self.family.encoder_parts(self.encoder)))


def _save_folder(model: nn.Module, out_dir: Path, config: dict):
    """A reward-model folder: model.safetensors (trainable parts + standardization, written then renamed) and
    config.json (the caller's config plus identity, trainable parts and standardization)."""
    out_dir = Path(out_dir)
    save_safetensors(model.trainable_state(), out_dir / "model.safetensors")
    config = dict(config, fingerprint=model.fingerprint, conditioning=model.conditioning, trainable=model.trainable,
                  reward_mean=model.reward_mean.tolist(), reward_std=model.reward_std.tolist())
    write_json(out_dir / "config.json", config)


def classifier_fingerprint(classifier: nn.Module) -> str:
    """Identity of a noisy-image classifier: the values of its input convolution and first blocks."""
    h = hashlib.sha256()
    for p in list(classifier.parameters())[:6]:
        h.update(str(tuple(p.shape)).encode() + p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class ClassifierRewardModel(nn.Module):
    """The Macaw reward model (thesis 6.7): OpenAI's noisy-image classifier with a fully connected layer from its
    logits to one scalar. The class condition is not an input (thesis: one class, macaw); a timestep input lets
    the same module serve as a value function. Same interface as RewardModel."""

    def __init__(self, classifier: nn.Module, classifier_spec: str, trainable: str = "head", ensemble: int = 1):
        super().__init__()
        if trainable not in TRAINABLE:
            raise ValueError(f"--trainable must be one of {TRAINABLE}, got {trainable!r}")
        self.classifier, self.classifier_spec, self.trainable = classifier, classifier_spec, trainable
        self.conditioning = "class"
        self.fingerprint = classifier_fingerprint(classifier)
        self.head = nn.Linear(classifier.out[-1].c_proj.out_channels, ensemble)  # --ensemble N: N linear heads
        self.register_buffer("reward_mean", torch.zeros(ensemble) if ensemble > 1 else torch.zeros(()))
        self.register_buffer("reward_std", torch.ones(ensemble) if ensemble > 1 else torch.ones(()))
        self.requires_grad_(False)
        self.head.requires_grad_(True)
        if trainable in ("mid", "encoder"):  # mid: + the middle block and the attention pool
            self.classifier.middle_block.requires_grad_(True)
            self.classifier.out.requires_grad_(True)
        if trainable == "encoder":
            self.classifier.requires_grad_(True)

    def raw(self, x, t=None, cond=None, drop=None):
        t = torch.zeros(len(x), dtype=torch.long, device=x.device) if t is None else t
        # contiguous: torch 2.13's CPU GroupNorm backward crashes (SIGSEGV) on channels-last inputs that need no
        # gradient while its weights do, which is the case with --trainable mid
        r = self.head(self.classifier(x.contiguous(), t)).float()
        return r[:, 0] if r.shape[1] == 1 else r

    @property
    def ensemble(self) -> int:
        return self.head.out_features

    def first_head(self) -> "ClassifierRewardModel":
        """The model with its first head only (a value function needs one number per state)."""
        head = nn.Linear(self.head.in_features, 1).to(self.head.weight.device)
        head.load_state_dict({k: v[:1] for k, v in self.head.state_dict().items()})
        self.head = head.requires_grad_(self.head.weight.requires_grad)
        self.reward_mean, self.reward_std = self.reward_mean.flatten()[0], self.reward_std.flatten()[0]
        return self

    def forward(self, x, t=None, cond=None, guidance: float = 1.0, standardize: bool = True, drop=None):
        r = self.raw(x, t)
        return (r - self.reward_mean) / self.reward_std if standardize else r

    trainable_state = RewardModel.trainable_state

    def save(self, out_dir: Path, config: dict):
        _save_folder(self, out_dir, dict(config, backbone="classifier", classifier=self.classifier_spec,
                                         ensemble=self.ensemble))


class RewardModelError(UserError):
    """A reward-model folder that cannot be used; the message says why and what to do."""


def load_reward_model(path, base, device="cpu", classifier=None, cache_dir=None) -> tuple[nn.Module, dict]:
    """Rebuild a reward model on `base` (a models.BaseModel) and load its trained parts from `path`.
    A classifier-backbone model rebuilds its classifier from the spec in config.json, or from `classifier`."""
    path = Path(path)
    if not (path / "config.json").exists() or not (path / "model.safetensors").exists():
        raise RewardModelError(f"--reward-model {path}: expected config.json and model.safetensors (written by "
                               "train_reward.py)")
    try:
        config = json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RewardModelError(f"--reward-model {path}: {path / 'config.json'} is not valid JSON ({e}); write the "
                               "folder again with train_reward.py") from None
    if not isinstance(config, dict):
        raise RewardModelError(f"--reward-model {path}: {path / 'config.json'} holds a {type(config).__name__}, not "
                               "the JSON object train_reward.py writes")
    if config.get("backbone") == "classifier":
        return _load_classifier_reward_model(path, config, base, device, classifier, cache_dir)
    if config.get("family", base.family.name) != base.family.name:  # (folders written before it was recorded: none)
        raise RewardModelError(f"--reward-model {path} is built on a {config['family']} ({config.get('base_model')}); "
                               f"the base model loaded now, {base.source}, is a {base.family.name}: train a reward "
                               "model on this base model or pass the --pretrained it was trained on")
    if config.get("fingerprint") != base_fingerprint(base.net):
        root = base.lineage.get("root", {})  # a policy fine-tuned by an earlier round: the base model it came from
        if not root.get("fingerprint") or root["fingerprint"] != config.get("fingerprint"):
            trained_on = (f"{config.get('base_model')} (path {config.get('base_model_path', '?')}, fingerprint "
                          f"{config.get('fingerprint')})")
            loaded = f"{base.source} (path {base.path}, fingerprint {base_fingerprint(base.net)})"
            raise RewardModelError(f"--reward-model {path} was trained on base model {trained_on}, which is not the "
                                   f"base model loaded now, {loaded}, nor the one it was fine-tuned from; train a "
                                   "reward model on this base model or pass the matching --pretrained (and "
                                   "--toy-train-steps)")
        print(f"[drlhf] --reward-model {path}: trained on {root['base_model']}, which {base.source} was fine-tuned "
              "from; its encoder is rebuilt from there", flush=True)
        kept = root.get("path") and Path(root["path"]).is_dir()  # the very folder; else the source named again
        base = models.load_base_model(root["path"] if kept else root["base_model"], device, cache_dir)
    null_text = base.encode_prompts([""]) if base.conditioning == "text" else None
    rm = RewardModel(base.net, base.conditioning, null_text, base.num_classes, config["width"], config["heads"],
                     config["trainable"], config.get("ensemble", 1))
    return _load_trained_parts(rm, path).to(device), config


def _load_classifier_reward_model(path: Path, config: dict, base, device, classifier=None, cache_dir=None):
    spec = classifier or config["classifier"]
    try:
        clf = models.load_guided_classifier(spec, cache_dir)
    except models.ModelLoadError as e:
        raise RewardModelError(f"--reward-model {path}: its classifier {spec!r} cannot be loaded ({e})") from None
    if config.get("fingerprint") != classifier_fingerprint(clf):
        raise RewardModelError(f"--reward-model {path} was trained on another classifier than {spec}; pass the "
                               "classifier it was trained on (--classifier)")
    shape = tuple(config.get("input_shape", base.sample_shape))
    if shape != tuple(base.sample_shape):
        raise RewardModelError(f"--reward-model {path} scores inputs of shape {shape}, the base model "
                               f"{base.source} makes {tuple(base.sample_shape)}")
    rm = ClassifierRewardModel(clf, spec, config["trainable"], config.get("ensemble", 1))
    return _load_trained_parts(rm, path).to(device), config


def _load_trained_parts(rm: nn.Module, path: Path) -> nn.Module:
    """Load a folder's model.safetensors (the trained parts only) into a freshly built reward model."""
    try:
        missing, unexpected = rm.load_state_dict(load_file(path / "model.safetensors"), strict=False)
    except Exception as e:  # noqa: BLE001
        raise RewardModelError(f"--reward-model {path}: model.safetensors is unreadable ({type(e).__name__})") from None
    if unexpected or any(k.startswith("head.") for k in missing):
        raise RewardModelError(f"--reward-model {path}: model.safetensors does not fit its config.json")
    return rm
