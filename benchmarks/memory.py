"""GPU memory of one LoRA PPO run on one GPU, per family (SD3.5-Medium, FLUX.1-dev, Qwen-Image), computed without a
GPU: the networks are built on the meta device at their published sizes and laid out as drlhf/nets.py lays them out;
one transformer block's activations are measured on the CPU at 1 and 2 heads' width and extrapolated to the model's.

    python benchmarks/memory.py                       # docs/performance.md's table (about a minute on 2 CPU cores)
    python benchmarks/memory.py --exp pickscore-flux --json runs/bench/memory-flux.json
    python benchmarks/memory.py --no-measure          # without the activation measurement (seconds)

The layout, as train_ppo.py's set-up makes it with the preset's flags on a GPU in fp16/bf16:

    policy       the transformer with LoRA adapters (models.add_lora): its frozen Linear/Conv weights held in the
                 autocast dtype (speed.hold_frozen_in_compute_dtype), norms, embeddings and buffers in fp32 (the
                 family's load() reads the transformer as fp32 master weights); the adapters fp32
    reference    pi_base of the per-step KL: with LoRA the policy's own transformer with its adapters off
                 (models.AdaptersOff, no bytes of its own); without LoRA a copy of the policy
    critic       --value-fn unet: RewardModel = a copy of the transformer's first half (Family.encoder_copy) + a
                 cross-attention head; only the head trains (RewardModel's default trainable="head"); the copy is
                 held in the autocast dtype
    text, VAE    frozen, fp16 on a GPU whatever the precision (nets.load_models: frozen_dtype)
    reward       PickScore v1 (CLIP ViT-H/14) as its checkpoint stores it: fp32
    optimizer    AdamW over each trainable parameter: fp32 weight + fp32 gradient + 2 fp32 moments = 16 B
    buffers      the rollout's latents (T + 1, B, 16, h, w) and conditioning (B, L + 1, D), fp32
    activations  (update) gradient checkpointing per block: every block's token-state input kept (image + text
                 tokens x width, autocast dtype) + the tensors one block saves while it is recomputed for its
                 backward pass, at the update's pass (--minibatch-size states; twice that under classifier-free
                 guidance, which runs conditional and unconditional as one batch)
    decode       (scoring) the VAE decodes the rollout's B images models.DECODE_CHUNK at a time (BaseModel.decode),
                 fp16, no gradients

peak = everything resident + max(activations, decode); set-up peak = what set-up holds before the frozen weights
are converted (the transformer and the critic's copy in fp32). GB are 2^30 bytes, as the epoch
benchmark's peak_gpu_*_gb. No GPU is used: every number is computed.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import inspect
import io
import json
import sys
import weakref
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_ppo  # noqa: E402
from benchmarks import architectures as arch  # noqa: E402
from drlhf import models, presets, speed  # noqa: E402
from drlhf.distributed import AUTOCAST_DTYPES  # noqa: E402
from drlhf.families import family_of, flux, qwen_image, sd3  # noqa: E402
from drlhf.reward_model import CrossAttentionPool, RewardModel  # noqa: E402

GB = 2 ** 30
USABLE_GB = 78.0  # of an 80 GB H100: what is left after the CUDA context (the project's H100s showed about 78 GiB)
FAMILIES = ("pickscore-sd3", "pickscore-flux", "pickscore-qwen-image")  # the table's rows: one preset per family


# ======== the families: full-size configs, their text encoders, how their blocks are probed ==================
def family_spec(pretrained: str) -> dict:
    """What the table needs of a family: its name, transformer class and full config, the keys of
    architectures.param_counts_on_meta for its transformer, text encoders and VAE, the text tokens it runs, its VAE
    (built on call), a narrow probe config (`heads` attention heads, two blocks of each kind, so that the second
    one's input carries gradients as in the full model) and which probe block stands for block i of n."""
    from diffusers import (AutoencoderKL, AutoencoderKLQwenImage, FluxTransformer2DModel, QwenImageTransformer2DModel,
                           SD3Transformer2DModel)
    if pretrained == presets.SD35M:
        c = arch.SD35M["transformer"]
        return dict(name="SD3.5-Medium", cls=SD3Transformer2DModel, config=c, text="SD3.5-Medium text encoders "
                    "(CLIP-L, CLIP-G, T5-XXL)", vae="SD3.5-Medium VAE", text_tokens=77 + sd3.T5_TOKENS,
                    vae_model=lambda: AutoencoderKL(**arch.SD35M["vae"]),
                    probe=lambda heads: dict(c, num_layers=5, num_attention_heads=heads, dual_attention_layers=(0, 1),
                                             caption_projection_dim=heads * c["attention_head_dim"]),
                    # block i of the full model -> the probe's block of the same kind (dual attention, plain, last)
                    kind=lambda i, n: 1 if i in c["dual_attention_layers"] else 4 if i == n - 1 else 3)
    if pretrained == presets.FLUX1_DEV:
        c = arch.FLUX_DEV["transformer"]
        return dict(name="FLUX.1-dev", cls=FluxTransformer2DModel, config=c, text="FLUX.1 text encoders (CLIP-L, "
                    "T5-XXL)", vae="FLUX.1 VAE", text_tokens=flux.T5_TOKENS,
                    vae_model=lambda: AutoencoderKL(**arch.FLUX_DEV["vae"]),
                    probe=lambda heads: dict(c, num_layers=2, num_single_layers=2, num_attention_heads=heads),
                    kind=lambda i, n: 1 if i < c["num_layers"] else 3)  # double-stream, then single-stream
    if pretrained == presets.QWEN_IMAGE:
        c = arch.QWEN_IMAGE["transformer"]
        return dict(name="Qwen-Image", cls=QwenImageTransformer2DModel, config=c,
                    text="Qwen-Image text encoder (Qwen2.5-VL-7B)", vae="Qwen-Image VAE",
                    text_tokens=qwen_image.TEXT_TOKENS,
                    vae_model=lambda: AutoencoderKLQwenImage(**arch.QWEN_IMAGE["vae"]),
                    probe=lambda heads: dict(c, num_layers=2, num_attention_heads=heads),
                    kind=lambda i, n: 1)
    raise ValueError(f"--pretrained {pretrained}: benchmarks/memory.py knows SD3.5-Medium, FLUX.1-dev and Qwen-Image")


def nbytes(*modules: nn.Module, trainable: bool | None = None) -> int:
    """Bytes of the modules' parameters (all; or only those that train / do not) and buffers (with the frozen
    ones), each tensor once, in the dtype it is held in."""
    seen, total = set(), 0
    for module in modules:
        tensors = [p for p in module.parameters() if trainable is None or p.requires_grad == trainable]
        tensors += list(module.buffers()) if not trainable else []
        for t in tensors:
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


def quiet(fn, *a, **k):
    """fn(*a, **k) without its prints (add_lora's line)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*a, **k)


# ======== the activations: one block's saved tensors, measured on the CPU at 1 and 2 heads =================
FP32_ON_CUDA = {torch.nn.functional.layer_norm, torch.nn.functional.rms_norm, torch.nn.functional.group_norm,
                torch.nn.functional.softmax, torch.softmax, torch.Tensor.softmax}


class CudaAutocastPolicy(torch.overrides.TorchFunctionMode):
    """CUDA autocast runs norms and softmax in fp32 (their outputs are fp32 tensors); CPU autocast leaves them in the
    input's dtype. This casts their inputs to fp32 on the CPU, as autocast does on a GPU; matmuls, linear layers and
    attention are cast to the half dtype by CPU autocast as on a GPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FP32_ON_CUDA and torch.is_autocast_enabled("cpu"):
            up = (lambda a: a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a)
            args, kwargs = [up(a) for a in args], {k: up(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def probe_blocks(spec: dict, args, heads: int) -> list[dict]:
    """Per block of a narrow copy of the transformer (`heads` heads, the real head width, text width and token
    counts; LoRA as the preset adds it; frozen weights in the half dtype), one image at the preset's resolution
    through the family's call under CPU autocast (CudaAutocastPolicy): the bytes of the block's token-state inputs
    (what gradient checkpointing keeps) and of the tensors autograd saves inside it (what recomputing it for its
    backward pass holds), parameters and the block's inputs excluded."""
    torch.manual_seed(0)
    net = spec["cls"](**spec["probe"](heads))
    family = family_of(net)
    quiet(models.add_lora, net, args.lora_rank, args.lora_alpha or args.lora_rank,
          (args.lora_targets or family.lora_targets).split(","))
    # bf16 for fp16 too (the same bytes; CPU kernels are bf16's); the device only gates the call
    speed.hold_frozen_in_compute_dtype(net, "bf16", torch.device("cuda"))
    owned = {t.untyped_storage().data_ptr() for t in list(net.parameters()) + list(net.buffers())}
    blocks = [m for m in net.modules() if type(m).__name__ in family.repeated_blocks]
    rows, current = [dict(inputs=0, saved=0, storages=set(), excluded=set()) for _ in blocks], [None]

    def pre(i):
        def hook(module, a, k):
            current[0] = i
            for t in _tensors((a, k)):
                rows[i]["excluded"].add(t.untyped_storage().data_ptr())
                if t.ndim == 3 and t.shape[1] > 1:  # token states (B, N, width): what checkpointing keeps
                    rows[i]["inputs"] += t.numel() * t.element_size()
        return hook

    def post(module, a, k, out):
        current[0] = None

    for i, block in enumerate(blocks):
        block.register_forward_pre_hook(pre(i), with_kwargs=True)
        block.register_forward_hook(post, with_kwargs=True)

    def pack(t):
        i = current[0]
        if i is not None:
            s = t.untyped_storage()
            if s.data_ptr() not in owned | rows[i]["excluded"] | rows[i]["storages"]:
                rows[i]["storages"].add(s.data_ptr())
                rows[i]["saved"] += s.nbytes()
        return t

    side = args.resolution // 8
    x = torch.randn(1, 16, side, side)  # the 16 latent channels of all three VAEs
    d = spec["config"]["joint_attention_dim"]
    cond = torch.randn(1, spec["text_tokens"] + 1, d)
    if spec["name"] == "Qwen-Image":
        cond[:, -1] = 0
        cond[:, -1, 0] = 24  # 24 real text tokens, the rest masked (the count does not change the bytes)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), CudaAutocastPolicy(), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        family.call(net, x, torch.full((1,), 500.0), cond, "text", guidance=args.guidance_scale)
    return [dict(inputs=r["inputs"], saved=r["saved"]) for r in rows]


def activation_bytes(spec: dict, args) -> dict:
    """Per image, extrapolated from 1 and 2 heads to the model's (the bytes are affine in the number of heads: exact
    at 1 to 4 for all three families): the token-state inputs of all blocks and the saved tensors of the largest."""
    one, two = probe_blocks(spec, args, 1), probe_blocks(spec, args, 2)
    heads = spec["config"]["num_attention_heads"]
    at = (lambda k, key: one[k][key] + (heads - 1) * (two[k][key] - one[k][key]))
    n = spec["config"]["num_layers"] + spec["config"].get("num_single_layers", 0)
    kinds = [spec["kind"](i, n) for i in range(n)]
    return dict(inputs=sum(at(k, "inputs") for k in kinds), one_block=max(at(k, "saved") for k in set(kinds)))


# ======== the scoring phase: the VAE decodes the rollout's images DECODE_CHUNK at a time (fp16, no gradients) =====
class LiveBytes(TorchDispatchMode):
    """The peak bytes of the tensors that ops create while it is on, each storage counted from its creation until
    it is freed (a view or an in-place result shares its input's storage); `known` storages are not counted. On the
    meta device nothing is allocated: the peak is what a GPU's allocator would have to hold, before its rounding
    and the kernels' workspaces."""

    def __init__(self, known=()):
        super().__init__()
        self.live = self.peak = 0
        self.seen = {id(t.untyped_storage()) for t in known}

    def _free(self, key, n):
        self.live -= n
        self.seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and id(t.untyped_storage()) not in self.seen:
                s = t.untyped_storage()
                self.seen.add(id(s))
                self.live += s.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(s, self._free, id(s), s.nbytes())
        return out


def decode_bytes(spec: dict, family, args) -> int:
    """Peak bytes of decoding ONE image at the preset's resolution (BaseModel.decode: the family's decode, VAE in
    fp16), on the meta device. Every tensor of a decoder is per image, so B images take B times as much."""
    with torch.device("meta"):
        vae = spec["vae_model"]().half().requires_grad_(False)
        z = torch.empty(1, 16, args.resolution // 8, args.resolution // 8, dtype=torch.float16)
    with torch.no_grad(), LiveBytes(list(vae.parameters()) + list(vae.buffers()) + [z]) as live:
        family.decode(vae, z)
    return live.peak


# ======== the table ===========================================================================================
# what stays on the GPU for the whole run (the optimizer's states from its first step on)
RESIDENT = ("policy", "reference", "critic_frozen", "critic_trainable", "text_encoders_vae", "reward_model",
            "lora_adamw", "buffers")


def family_memory(exp: str, counts: dict | None = None, measure: bool = True) -> dict:
    """The GPU memory (GB) of one process of `train_ppo.py --exp exp` on one GPU, part by part, and its set-up's
    steps. measure=False: no activation measurement (activations 0, `activations_measured` False)."""
    args, _ = train_ppo.parse_args(["--exp", exp])
    spec = family_spec(args.pretrained)
    counts = counts or arch.param_counts_on_meta()
    if not (AUTOCAST_DTYPES.get(args.precision) and args.lora_rank and args.gradient_checkpointing
            and args.value_fn == "unet"):
        raise ValueError(f"--exp {exp}: the table is for LoRA runs in fp16/bf16 with gradient checkpointing and "
                         "--value-fn unet")
    sig = inspect.signature(RewardModel.__init__).parameters  # the critic make_value_fn builds: RewardModel's defaults
    if sig["trainable"].default != "head":
        raise ValueError("RewardModel trains more than its head by default: count that part's optimizer here")
    gpu = torch.device("cuda")  # hold_frozen_in_compute_dtype acts only for a GPU; on meta nothing is allocated

    with torch.device("meta"):  # the networks at full size, in the order and layout of nets.load_models/build_nets
        net = spec["cls"](**spec["config"])  # fp32: the family's load() holds the transformer as fp32 master weights
        family = family_of(net)
        critic = nn.ModuleDict(dict(encoder=family.encoder_copy(net).requires_grad_(False),  # make_value_fn
                                    head=CrossAttentionPool(*family.encoder_dims(net, "text"), sig["width"].default,
                                                            sig["heads"].default)))
        from transformers import CLIPConfig, CLIPModel
        pickscore = CLIPModel(CLIPConfig(**arch.PICKSCORE))  # fp32, as PickScore v1's checkpoint stores it
        reference = args.kl_coef > 0 or args.eval_reward  # pi_base: with LoRA the policy, adapters off (AdaptersOff)
        ref = copy.deepcopy(net).requires_grad_(False) if reference and not args.lora_rank else None
        text_vae = 2 * (counts[spec["text"]] + counts[spec["vae"]])  # frozen_dtype fp16
        setup, held = [], 0
        for step, size in (("load: transformer fp32, text encoders + VAE fp16", nbytes(net) + text_vae),
                           ("+ critic: copy of the first half, fp32 (make_value_fn)", nbytes(critic)),
                           ("+ PickScore, fp32 (rewards.from_flags)", nbytes(pickscore)),
                           *([("+ reference: copy of the transformer, fp32 (build_nets)", nbytes(ref))] if ref else [])):
            held += size
            setup.append((step, held / GB))
        quiet(models.add_lora, net, args.lora_rank, args.lora_alpha or args.lora_rank,
              (args.lora_targets or family.lora_targets).split(","))
        for frozen in (ref, net, critic):
            if frozen is not None:
                speed.hold_frozen_in_compute_dtype(frozen, args.precision, gpu)

    lora = sum(p.numel() for p in net.parameters() if p.requires_grad)
    head = sum(p.numel() for p in critic.parameters() if p.requires_grad)
    B, T, side = args.num_envs, args.num_steps, args.resolution // 8
    cfg_batch = 2 if args.guidance_scale != 1.0 and not family.guidance_input(net) else 1  # CFG: one batch of 2n
    pass_images = args.minibatch_size * cfg_batch
    act = activation_bytes(spec, args) if measure else dict(inputs=0, one_block=0)
    row = dict(
        family=spec["name"], exp=exp, precision=args.precision, resolution=args.resolution,
        transformer_params=counts[spec["name"]], lora_rank=args.lora_rank, lora_params=lora, critic_head_params=head,
        policy=nbytes(net, trainable=False) / GB, reference=(nbytes(ref) if ref else 0) / GB,
        critic_frozen=nbytes(critic, trainable=False) / GB, critic_trainable=16 * head / GB,
        text_encoders_vae=text_vae / GB, reward_model=nbytes(pickscore) / GB, lora_adamw=16 * lora / GB,
        buffers=4 * B * ((T + 1) * 16 * side * side + (spec["text_tokens"] + 1) * spec["config"]["joint_attention_dim"])
        / GB,  # latents (T + 1, B, 16, h, w) and conditioning (B, L + 1, D), fp32
        pass_images=pass_images, activations_measured=measure,
        activations_inputs=pass_images * act["inputs"] / GB, activations_one_block=pass_images * act["one_block"] / GB,
        decode_images=min(B, models.DECODE_CHUNK),
        decode=min(B, models.DECODE_CHUNK) * decode_bytes(spec, family, args) / GB,
        setup_steps=setup, setup_peak=max(v for _, v in setup))
    row["activations"] = row["activations_inputs"] + row["activations_one_block"]
    row["resident"] = sum(row[k] for k in RESIDENT)
    row["update_peak"] = row["resident"] + row["activations"]
    row["scoring_peak"] = row["resident"] + row["decode"]
    row["total"] = max(row["update_peak"], row["scoring_peak"])
    row["fits"] = row["total"] <= USABLE_GB
    row["setup_fails_at"] = next((step for step, v in setup if v > USABLE_GB), None)
    return row


def memory_table(exps=FAMILIES, measure: bool = True) -> list[dict]:
    """family_memory of each preset (the parameter counts built once)."""
    counts = arch.param_counts_on_meta()
    return [family_memory(exp, counts, measure) for exp in exps]


def markdown(rows: list[dict]) -> str:
    """The rows as docs/performance.md's table (GB), then each set-up's steps."""
    f = (lambda v: f"{v:.1f}")
    lines = ["| family (`--exp`) | policy | reference copy | critic frozen + trained | text encoders + VAE | PickScore "
             "| LoRA + AdamW | rollout buffers | activations, update (images per pass) | VAE decode, scoring (images) "
             "| peak | fits 80 GB? | set-up peak |", "|---|" + "---:|" * 12]
    for r in rows:
        act = f(r["activations"]) if r["activations_measured"] else "not measured"
        lines.append(f"| {r['family']} (`{r['exp']}`) | {f(r['policy'])} | {f(r['reference'])} | "
                     f"{f(r['critic_frozen'])} + {r['critic_trainable']:.2f} | {f(r['text_encoders_vae'])} | "
                     f"{f(r['reward_model'])} | {f(r['lora_adamw'])} | {f(r['buffers'])} | "
                     f"{act} ({r['pass_images']}) | {f(r['decode'])} ({r['decode_images']}) | "
                     f"**{f(r['total'])}** | {'yes' if r['fits'] else 'no'} | {f(r['setup_peak'])} |")
    lines.append("")
    for r in rows:
        steps = "; ".join(f"{step} {v:.1f}" for step, v in r["setup_steps"])
        fails = f": past {USABLE_GB:.0f} GB at \"{r['setup_fails_at']}\"" if r["setup_fails_at"] else ""
        lines.append(f"set-up of {r['exp']} (GB held): {steps}{fails}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exp", nargs="+", default=list(FAMILIES), help="the presets (default: one per family: "
                   + ", ".join(FAMILIES) + ")")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--no-measure", action="store_true", help="skip the CPU measurement of one block's activations "
                   "(the slow part: about 20 s a family on 2 cores)")
    a = p.parse_args(argv)
    rows = memory_table(a.exp, not a.no_measure)
    print(markdown(rows))
    print(f"GB = 2^30 bytes; computed, no GPU; fits = peak <= {USABLE_GB:.0f} GB, what an 80 GB card leaves usable")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
