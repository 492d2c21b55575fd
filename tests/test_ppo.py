"""train_ppo.py: estimators against naive references, presets against Table 6.2, and end-to-end runs."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import train_ppo
from conftest import TINY
from drlhf import models, plan, presets, rewards
from helpers import passes_reproduce_bits

TABLE = Path(__file__).parent / "fixtures" / "table_6_2.md"


# ---------------------------------------------------------------------------------------------------------
# estimators
# ---------------------------------------------------------------------------------------------------------
def test_gae_matches_a_python_loop():
    g = torch.Generator().manual_seed(0)
    rewards_t, values = torch.randn(7, 3, generator=g), torch.randn(7, 3, generator=g)
    gamma, lam = 0.97, 0.9
    adv, ret = train_ppo.compute_advantages(rewards_t, values, gamma, lam)
    for e in range(3):
        for t in range(7):  # A_t = sum_l (gamma lam)^l delta_{t+l}, V after the last step = 0
            ref = 0.0
            for l in range(7 - t):
                k = t + l
                nv = values[k + 1, e].item() if k + 1 < 7 else 0.0
                ref += (gamma * lam) ** l * (rewards_t[k, e].item() + gamma * nv - values[k, e].item())
            assert adv[t, e].item() == pytest.approx(ref, rel=1e-5, abs=1e-5)
    torch.testing.assert_close(ret, adv + values)


def test_k3_kl_is_nonnegative_and_zero_for_identical_models():
    g = torch.Generator().manual_seed(1)
    logprobs = torch.randn(5, 4, generator=g) * 30
    ref = logprobs + torch.randn(5, 4, generator=g) * 3
    scores = torch.randn(4, generator=g)
    rewards_t, kl = train_ppo.compute_rewards(scores, logprobs, ref, kl_coef=0.1)
    assert (kl >= 0).all()
    log_ratio = (ref - logprobs).double()
    torch.testing.assert_close(kl.double(), (log_ratio.exp() - 1) - log_ratio, rtol=1e-5, atol=1e-6)
    # Eq. 5.3: -beta KL at every step, plus the terminal reward at the last step
    torch.testing.assert_close(rewards_t[:-1], -0.1 * kl[:-1])
    torch.testing.assert_close(rewards_t[-1], scores - 0.1 * kl[-1])
    _, kl0 = train_ppo.compute_rewards(scores, logprobs, logprobs.clone(), kl_coef=0.1)
    assert torch.equal(kl0, torch.zeros_like(kl0))


def test_target_reward_is_algorithm_1():
    target = rewards.load_target(16, 1)
    assert rewards.target_image_reward(target * 2 - 1, target).abs().max() < 1e-6  # the target itself: 0
    img = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x = (img + 1) / 2
    loss = (x - target) ** 2
    loss = loss + loss * target / target.mean()
    ref = -10 * loss.mean((1, 2, 3)).sqrt()
    torch.testing.assert_close(rewards.target_image_reward(img, target), ref)
    black = -torch.ones(1, 1, 16, 16)
    assert rewards.target_image_reward(black, target) < ref.max()  # all black is not a good optimum


def test_colorfulness_matches_appendix_a_reference():
    from skimage.color import rgb2lab
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 12, 12, generator=g) * 2 - 1
    images[0] = 0  # grey: no vivid pixels
    ours = rewards.colorfulness_reward(images)
    for k in range(3):  # appendix A, one image at a time with np.digitize
        lab = rgb2lab(((images[k] + 1) / 2).permute(1, 2, 0).numpy())
        a, b = lab[..., 1], lab[..., 2]
        vivid = (a ** 2 + b ** 2 > 10).mean()
        edges = np.linspace(-np.pi, np.pi, 8)
        d = np.digitize(np.arctan2(b, a), edges) - 1
        d[d == 7] = 6
        p = np.bincount(d.ravel(), minlength=7) / d.size
        ent = -(p * np.log2(p + np.finfo(float).eps)).sum()
        assert ours[k].item() == pytest.approx(vivid * ent, rel=1e-5, abs=1e-6)
    assert ours[0] == 0
    with pytest.raises(ValueError, match="RGB"):
        rewards.colorfulness_reward(torch.zeros(2, 1, 8, 8))


def test_minibatch_orders_state_and_trajectory_grouping():
    T, B = 5, 6
    args = train_ppo.Args(update_epochs=2, minibatch_grouping="state")
    orders = train_ppo.minibatch_orders(args, T, B, torch.Generator().manual_seed(0), "cpu")
    assert orders.shape == (2, T * B) and all(sorted(o.tolist()) == list(range(T * B)) for o in orders)
    assert not torch.equal(orders[0], orders[1])
    args = train_ppo.Args(update_epochs=1, minibatch_grouping="trajectory")
    order = train_ppo.minibatch_orders(args, T, B, torch.Generator().manual_seed(0), "cpu")[0]
    for start in range(0, T * B, 2 * T):  # a minibatch of 2T states holds exactly 2 whole trajectories
        envs = order[start:start + 2 * T] % B
        assert len(set(envs.tolist())) == 2 and sorted((order[start:start + 2 * T] // B).tolist()) == sorted(list(range(T)) * 2)


# ---------------------------------------------------------------------------------------------------------
# presets = Table 6.2
# ---------------------------------------------------------------------------------------------------------
def _table():
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in TABLE.read_text().splitlines()
            if line.startswith("|") and not line.startswith("|---")]
    header = rows[0][1:]
    return header, {r[0]: dict(zip(header, r[1:])) for r in rows[1:]}


def _num(s):
    return float(s.split()[0])


ROWS = {  # Table 6.2 row -> (Args field, parser of the cell)
    "resolution": ("resolution", lambda s: int(s.split("×")[0])),
    "conditioning": ("conditioning", lambda s: s),
    "CFG scale": ("guidance_scale", lambda s: 1.0 if s == "–" else float(s)),
    "latent diffusion": ("latent", lambda s: s == "✓"),
    "rollout timesteps": ("num_steps", int),
    "environments": ("num_envs", lambda s: int(s.split()[0])),
    "GAE γ": ("gamma", _num), "GAE λ": ("gae_lambda", _num), "PPO clip coeff.": ("clip_coef", _num),
    "PPO value-fn coeff.": ("vf_coef", _num), "KL penalty coeff. β": ("kl_coef", _num),
    "epochs (rollout+update rounds)": ("epochs", int), "minibatch size (states)": ("minibatch_size", int),
    "policy LR": ("policy_lr", _num), "value-fn LR": ("vf_lr", _num),
    "policy warmup (optimizer steps)": ("policy_warmup_steps", int),
    "value-fn warmup (optimizer steps)": ("vf_warmup_steps", int),
    "Adam ε": ("adam_eps", _num), "weight decay": ("weight_decay", _num),
    "grad. accumulation steps": ("grad_accum_steps", int),
    "grad. clip norm": ("max_grad_norm", lambda s: None if s == "–" else float(s)),
    "precision": ("precision", lambda s: s.split()[0].lower()),
    "allow TF32": ("tf32", lambda s: s == "✓"),
}
REWARDS = {"fixed fn: adjusted": "target", "fixed fn: colorfulness": "colorfulness", "LAION": "aesthetic",
           "custom RM": "rm", "same RM": "rm", "PickScore": "pickscore"}
BASES = {"MNIST": "toy:digit4-32", "ImageNet": "guided-diffusion:64x64",
         "Stable Diffusion v1.5": "stable-diffusion-v1-5/stable-diffusion-v1-5"}


def test_presets_hold_table_6_2():
    header, table = _table()
    assert set(header) <= set(presets.for_script("train_ppo"))  # the table the scripts read (drlhf/presets.py)
    checked = 0
    for exp in header:
        args, _ = train_ppo.parse_args(["--exp", exp])
        for row, (field, parse) in ROWS.items():
            cell = table[row][exp]
            if cell == "–" and row not in ("CFG scale", "grad. clip norm"):
                assert args.algo == "backprop", f"{exp}: {row} is '–' only for the non-RL experiment"
                continue
            assert getattr(args, field) == parse(cell), f"--exp {exp}: {field}={getattr(args, field)!r}, Table 6.2 " \
                                                        f"{row!r} says {cell!r}"
            checked += 1
        b1, b2 = (float(v) for v in table["Adam β1 / β2"][exp].split("/"))
        assert (args.adam_beta1, args.adam_beta2) == (b1, b2)
        assert table["optimizer"][exp] == "AdamW"
        early = re.search(r"\(([\d.e-]+) for the first (\d+) epochs\)", table["policy LR"][exp])
        assert (args.policy_lr_early, args.policy_lr_early_epochs) == \
            ((float(early.group(1)), int(early.group(2))) if early else (None, 0))
        assert args.reward == next(v for k, v in REWARDS.items() if table["reward"][exp].startswith(k))
        assert args.pretrained == next(v for k, v in BASES.items() if k in table["base policy"][exp])
        checked += 5
    assert checked > 150


@pytest.mark.parametrize("exp,world,expect", [
    ("pink", 10, (8, 128, 8)),        # Table 6.2: 8 environments per GPU x 16 steps, minibatches of 16
    ("pickscore", 10, (8, 400, 40)),  # 8 x 50 steps, minibatches of 10, 4 accumulated -> 10 steps per epoch
    ("macaw", 1, (32, 800, 32)),      # thesis 6.7: 32 x 25 = 800 states -> 32 minibatches of 25
    ("macaw-norl", 1, (32, 800, 8)),  # thesis 6.8: 8 minibatches of 4 images, accumulated into one update
])
def test_preset_batch_arithmetic(exp, world, expect):
    args, _ = train_ppo.parse_args(["--exp", exp])
    assert train_ppo.batch_arithmetic(args, world) == expect
    assert (expect[2] // args.grad_accum_steps) == {"pink": 4, "pickscore": 10, "macaw": 32, "macaw-norl": 1}[exp]
    with pytest.raises(train_ppo.cli.UserError, match="--num-envs"):  # printed as "error: ...", exit code 1
        train_ppo.batch_arithmetic(args, 3)


def test_compile_scope_without_compile_is_named(capsys):
    train_ppo.resolve_args(["--compile-scope", "blocks"])
    assert "--compile-scope has no effect without --compile true" in capsys.readouterr().err
    train_ppo.resolve_args(["--compile-scope", "blocks", "--compile", "true"])
    assert "warning" not in capsys.readouterr().err


def test_preset_precedence_and_unknown_preset(capsys):
    args, given = train_ppo.parse_args(["--exp", "pink", "--policy-lr", "3e-7"])
    assert args.policy_lr == 3e-7 and args.vf_lr == 1e-6 and args.num_envs == 80 and given == {"exp", "policy_lr"}
    assert train_ppo.parse_args([])[0].policy_lr == train_ppo.Args.policy_lr
    # a value equal to the default still overrides the preset (Args.epochs is 50, pink's preset 25500)
    assert train_ppo.parse_args(["--exp", "pink", "--epochs", str(train_ppo.Args.epochs)])[0].epochs == train_ppo.Args.epochs
    with pytest.raises(SystemExit):
        train_ppo.parse_args(["--exp", "nope"])
    assert "unknown --exp 'nope'" in capsys.readouterr().err


def test_every_flag_has_help(run):
    from drlhf import cli
    for action in cli.build_parser(train_ppo.Args)._actions:
        if action.dest != "help":
            assert len(action.help) > 10, action.dest
    for script in ("train_ppo.py", "train_reward.py", "sample.py", "label.py"):  # argparse formats every help text
        assert "--help" in run(script, "--help").stdout


# ---------------------------------------------------------------------------------------------------------
# end to end (subprocesses at toy size)
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    proc = run("train_ppo.py", *TINY, "--epochs", "2", "--checkpoint-every", "1", "--output-dir", out)
    return out, proc


def test_smoke_run_writes_everything(smoke):
    out, proc = smoke
    assert "fixed-seed reward" in proc.stdout
    for f in ("samples_base.png", "samples_before_after.png", "reward_histogram.png", "summary.json", "args.json",
              "checkpoints/epoch_00002/policy.safetensors", "checkpoints/epoch_00002/value.safetensors",
              "checkpoints/epoch_00002/state.pt", "samples/epoch_00002.png"):
        assert (out / f).exists(), f
    assert list((out / "tb").glob("events.out.tfevents.*"))
    from diffusers import DDPMPipeline
    pipe = DDPMPipeline.from_pretrained(out / "final_policy")
    policy = load_file(out / "checkpoints/epoch_00002/policy.safetensors")
    for k, v in pipe.unet.state_dict().items():
        assert torch.equal(v, policy[k]), k
    summary = json.loads((out / "summary.json").read_text())
    assert np.isfinite(summary["gain_in_base_std"])


@pytest.mark.parametrize("algo", ["ppo", "backprop"])
def test_resume_equals_an_uninterrupted_run(run, tmp_path, algo):
    a, b = tmp_path / "a", tmp_path / "b"
    flags = [*TINY, "--algo", algo] + (["--value-fn", "none"] if algo == "backprop" else [])
    run("train_ppo.py", *flags, "--epochs", "4", "--checkpoint-every", "2", "--output-dir", a)
    run("train_ppo.py", *flags, "--epochs", "2", "--checkpoint-every", "2", "--output-dir", b)
    run("train_ppo.py", "--resume", b, "--epochs", "4")
    for name in ("policy", "value") if algo == "ppo" else ("policy",):
        wa = load_file(a / f"checkpoints/epoch_00004/{name}.safetensors")
        wb = load_file(b / f"checkpoints/epoch_00004/{name}.safetensors")
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name
    sa = torch.load(a / "checkpoints/epoch_00004/state.pt", weights_only=True)
    sb = torch.load(b / "checkpoints/epoch_00004/state.pt", weights_only=True)
    assert sa["state"]["global_step"] == sb["state"]["global_step"] == 4 * 4  # 20 states / 5 per step x 4 epochs


def _scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(run_dir / "tb"))
    ea.Reload()
    return [e.value for e in ea.Scalars(tag)]


def test_on_policy_ratio_is_exactly_one_at_the_start_of_each_update(smoke):
    assert _scalars(smoke[0], "losses/ratio_dev_at_start") == [0.0, 0.0]


@pytest.mark.parametrize("old_logprobs", ["rollout", "recompute"])
def test_colorfulness_stand_in_with_kl_and_class_conditioning(run, tmp_path, old_logprobs):
    proc = run("train_ppo.py", "--exp", "digits-colorfulness", *TINY, "--epochs", "2", "--guidance-scale", "2",
               "--old-logprobs", old_logprobs, "--output-dir", tmp_path)
    assert "class" in proc.stdout and (tmp_path / "final_policy" / "model_index.json").exists()
    kl, dev = _scalars(tmp_path, "objective/kl"), _scalars(tmp_path, "losses/ratio_dev_at_start")
    if passes_reproduce_bits():  # pi_base, pi_old and the update see each state's bits in any batch
        assert kl[0] == 0.0 and kl[1] > 0 and dev == [0.0, 0.0]  # the policy equals pi_base before the first update
    else:  # other batches round differently here (MKL's AVX2 path): zero up to rounding (3e-8 and 8e-5 seen)
        assert abs(kl[0]) < 1e-5 < kl[1] and max(dev) < 1e-3, (kl, dev)


def test_text_conditioned_latent_model_end_to_end(run, tmp_path):
    """The Stable Diffusion code path on a tiny random pipeline: prompts, CFG, VAE decoding, bf16 autocast,
    and the final policy saved as a StableDiffusionPipeline."""
    from diffusers import StableDiffusionPipeline
    from tiny_sd import build_tiny_sd
    model = build_tiny_sd(tmp_path / "tiny-sd")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\n")
    out = tmp_path / "run"
    proc = run("train_ppo.py", "--pretrained", model, "--prompts", prompts, "--guidance-scale", "7.5", "--latent", "true",
               "--conditioning", "text", "--resolution", "32", "--reward", "tests.helpers:mean_brightness",
               "--value-fn", "encoder", "--precision", "bf16", "--old-logprobs", "recompute", *TINY, "--epochs", "2",
               "--output-dir", out)
    assert "text, latent (4, 4, 4)" in proc.stdout
    pipe = StableDiffusionPipeline.from_pretrained(out / "final_policy")
    policy = load_file(out / "checkpoints/epoch_00002/policy.safetensors")
    assert all(torch.equal(v, policy[k]) for k, v in pipe.unet.state_dict().items())
    assert _scalars(out, "losses/ratio_dev_at_start") == [0.0, 0.0]
    proc = run("train_ppo.py", "--pretrained", model, "--output-dir", tmp_path / "o2", *TINY, "--value-fn", "encoder",
               check=False)
    assert proc.returncode != 0 and "--prompts" in proc.stderr


def test_lora_policy_trains_adapters_only_resumes_and_merges(run, tmp_path):
    """--lora-rank on the tiny SD pipeline: only the adapters train (and are all a checkpoint holds), the ratio
    starts at exactly 1, resume continues from the adapters, and the final pipeline is a plain U-Net with the
    adapters merged that differs from the base model only in the adapted attention projections."""
    from diffusers import StableDiffusionPipeline
    from tiny_sd import build_tiny_sd
    model = build_tiny_sd(tmp_path / "tiny-sd")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\n")
    common = ["--pretrained", model, "--prompts", prompts, "--guidance-scale", "7.5", "--lora-rank", "4",
              "--reward", "tests.helpers:mean_brightness", "--value-fn", "encoder", *TINY, "--policy-lr", "1e-2",
              "--checkpoint-every", "1"]
    out = tmp_path / "run"
    proc = run("train_ppo.py", *common, "--epochs", "1", "--output-dir", out)
    assert "LoRA rank 4 on to_q,to_k,to_v,to_out.0" in proc.stdout
    ckpt = load_file(out / "checkpoints/epoch_00001/policy.safetensors")
    assert ckpt and all("lora_" in k for k in ckpt)
    state = torch.load(out / "checkpoints/epoch_00001/state.pt", weights_only=True)
    assert sum(v["exp_avg"].numel() for v in state["opt_pi"]["state"].values()) == sum(v.numel() for v in ckpt.values())
    run("train_ppo.py", *common, "--epochs", "2", "--resume", out, "--output-dir", out)
    full = tmp_path / "full"  # the same two epochs in one go: resuming from the adapters is exact
    run("train_ppo.py", *common, "--epochs", "2", "--output-dir", full)
    a, b = (load_file(d / "checkpoints/epoch_00002/policy.safetensors") for d in (out, full))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    dev = _scalars(full, "losses/ratio_dev_at_start")
    assert dev == [0.0, 0.0] if passes_reproduce_bits() else max(dev) < 1e-3, dev  # exactly 1 where bits repeat
    tuned = StableDiffusionPipeline.from_pretrained(out / "final_policy").unet.state_dict()
    base = StableDiffusionPipeline.from_pretrained(model).unet.state_dict()
    assert tuned.keys() == base.keys()
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert changed and all(any(t in k for t in ("to_q", "to_k", "to_v", "to_out.0")) for k in changed)
    import sample  # sample.py eval reads the adapter checkpoint and merges it the same way
    evaluated = sample.load_policy_net(str(out), models.load_base_model(str(model)), "cpu").state_dict()
    assert evaluated.keys() == tuned.keys() and all(torch.equal(evaluated[k], tuned[k]) for k in tuned)


def test_lora_reference_is_the_policy_with_its_adapters_off(tmp_path):
    """pi_base of a LoRA run holds no second network: the policy's own one with the adapters switched off gives the
    numbers of a copy taken before the adapters went in, whatever the adapters learned, and leaves the policy's
    trainable adapters, its mode and its outputs as they were."""
    import copy

    from tiny_sd import build_tiny_sd
    base = models.load_base_model(str(build_tiny_sd(tmp_path / "tiny-sd")))
    policy = models.make_denoiser(base, 7.5)
    before = copy.deepcopy(policy).eval()
    models.add_lora(base.net, 4, 4.0, base.family.lora_targets.split(","))
    with torch.no_grad():
        for name, p in base.net.named_parameters():
            if "lora_B" in name:
                p.normal_()  # "trained" adapters
    ref = models.AdaptersOff(policy)
    assert sum(p.numel() for p in ref.parameters()) == 0  # nothing of its own to hold, freeze or move
    ref.requires_grad_(False).train(False)
    trainable = {n for n, p in base.net.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    policy.train()
    g = torch.Generator().manual_seed(0)
    x, t, cond = torch.randn(2, *base.sample_shape, generator=g), torch.tensor([900, 10]), base.encode_prompts(["a", "b"])
    with torch.no_grad():
        adapted = policy(x, t, cond)
        off = ref(x, t, cond)
        assert torch.equal(off, before(x, t, cond)) and not torch.equal(off, adapted)
        assert torch.equal(policy(x, t, cond), adapted)  # the adapters are back on
    assert policy.training and all(m.training for m in base.net.modules())
    assert {n for n, p in base.net.named_parameters() if p.requires_grad} == trainable


def test_pickscore_path_with_a_tiny_clip(run, tmp_path):
    """--reward pickscore (a CLIP preference model of image-prompt pairs) on the tiny SD pipeline, with the
    built-in appendix D prompts and the U-Net-encoder value function."""
    from tiny_sd import build_tiny_clip, build_tiny_sd
    from drlhf import rewards
    model = build_tiny_sd(tmp_path / "tiny-sd")
    clip, processor = build_tiny_clip(tmp_path / "clip")
    scorer = rewards.CLIPPreferenceReward(str(clip), str(processor))
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    s1 = scorer(images, ["a lion", "a mouse"])  # the tiny tokenizer keeps 14 characters
    s2 = scorer(images, ["a mouse", "a lion"])
    assert s1.shape == (2,) and not torch.allclose(s1, s2)  # the score depends on the prompt of each image
    with pytest.raises(ValueError, match="text-conditional"):
        scorer(images, torch.tensor([1, 2]))
    out = tmp_path / "run"
    run("train_ppo.py", "--exp", "pickscore", "--pretrained", model, "--resolution", "32", "--pickscore-model", clip,
        "--pickscore-processor", processor, "--precision", "fp32", "--num-envs", "4", "--minibatch-size", "5",
        "--grad-accum-steps", "1", "--num-steps", "5", "--epochs", "1", "--eval-samples", "4",
        "--policy-warmup-steps", "1", "--output-dir", out)
    assert np.isfinite(json.loads((out / "summary.json").read_text())["final_reward_mean"])
    proc = run("train_ppo.py", "--exp", "pickscore", "--pretrained", model, "--resolution", "32", "--pickscore-model",
               tmp_path / "nothing", "--num-envs", "4", "--minibatch-size", "5", "--num-steps", "5",
               "--output-dir", tmp_path / "x", check=False)
    assert proc.returncode == 1 and "--pickscore-model" in proc.stderr and "Traceback" not in proc.stderr


def test_torchrun_two_cpu_processes(run, tmp_path):
    run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_ppo.py", *TINY,
        "--epochs", "1", "--device", "cpu", "--output-dir", tmp_path)
    assert (tmp_path / "final_policy" / "unet" / "diffusion_pytorch_model.safetensors").exists()


@pytest.mark.parametrize("algo", ["ppo", "backprop", "group"])
def test_ddp_update_equals_single_process_on_the_union(run, tmp_path, algo):
    mode = [algo] if algo != "ppo" else []
    run(Path(__file__).parent / "ddp_check.py", tmp_path / "single.safetensors", *mode)
    run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", Path(__file__).parent / "ddp_check.py",
        tmp_path / "ddp.safetensors", *mode)
    single, ddp = load_file(tmp_path / "single.safetensors"), load_file(tmp_path / "ddp.safetensors")
    init = load_file(tmp_path / "single.safetensors.init")
    moved = 0
    for k in single:  # SGD with lr 1: the weight change is the all-reduced gradient
        delta_single, delta_ddp = single[k] - init[k], ddp[k] - init[k]
        torch.testing.assert_close(delta_ddp, delta_single, rtol=1e-4, atol=1e-5)
        moved += int(delta_single.abs().max() > 1e-3)
    assert moved > 10  # the update really changed the weights


# ---------------------------------------------------------------------------------------------------------
# bad input: one actionable sentence, nothing half-written
# ---------------------------------------------------------------------------------------------------------
def test_batch_sizes_that_do_not_divide_name_the_flags(run, tmp_path):
    proc = run("train_ppo.py", *TINY, "--minibatch-size", "7", "--output-dir", tmp_path, check=False)
    assert proc.returncode != 0 and "--minibatch-size (7)" in proc.stderr and "--num-envs" in proc.stderr
    proc = run("train_ppo.py", *TINY, "--grad-accum-steps", "3", "--output-dir", tmp_path, check=False)
    assert proc.returncode != 0 and "--grad-accum-steps (3)" in proc.stderr
    proc = run("train_ppo.py", *TINY, "--grad-accum-steps", "2", "--fused-minibatches", "4", "--output-dir", tmp_path,
               check=False)
    assert proc.returncode != 0 and "--fused-minibatches (4)" in proc.stderr and "--grad-accum-steps (2)" in proc.stderr


def test_unknown_preset_and_hub_id_offline(run, tmp_path):
    proc = run("train_ppo.py", "--exp", "nope", check=False)
    assert proc.returncode != 0 and "unknown --exp 'nope'" in proc.stderr
    proc = run("train_ppo.py", "--pretrained", "someone/not-cached-model", "--output-dir", tmp_path, check=False)
    assert proc.returncode != 0 and "--pretrained someone/not-cached-model" in proc.stderr
    assert "download" in proc.stderr and "Traceback" not in proc.stderr
    proc = run("train_ppo.py", "--exp", "colorfulness", "--value-fn", "encoder", "--pretrained",
               f"guided-diffusion:{tmp_path / 'missing.pt'}", check=False)
    assert proc.returncode != 0 and "64x64_diffusion.pt" in proc.stderr and "Traceback" not in proc.stderr
    proc = run("train_ppo.py", "--exp", "colorfulness", "--classifier", "none", check=False)
    assert proc.returncode != 0 and "--value-fn classifier needs --classifier" in proc.stderr


def test_nan_reward_stops_with_epoch_and_sample_and_writes_no_checkpoint(run, tmp_path):
    proc = run("train_ppo.py", *TINY, "--reward", "tests.helpers:nan_for_second_sample", "--value-fn", "none",
               "--output-dir", tmp_path, check=False)
    assert proc.returncode != 0
    assert "epoch 0" in proc.stderr and "sample 1" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_missing_and_corrupt_checkpoints(run, smoke, tmp_path):
    proc = run("train_ppo.py", "--resume", tmp_path / "nothing", check=False)
    assert proc.returncode != 0 and "no checkpoint there" in proc.stderr
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(smoke[0] / "checkpoints" / "epoch_00001", broken)
    (broken / "state.pt").write_bytes(b"not a checkpoint")
    proc = run("train_ppo.py", "--resume", broken, check=False)
    assert proc.returncode != 0 and "corrupt" in proc.stderr and "Traceback" not in proc.stderr
    model = tmp_path / "model"
    shutil.copytree(smoke[0] / "final_policy", model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    proc = run("train_ppo.py", "--pretrained", model, "--output-dir", tmp_path / "o", check=False)
    assert proc.returncode != 0 and "corrupt" in proc.stderr and "Traceback" not in proc.stderr


def test_openai_checkpoint_as_policy(run, tmp_path):
    """Guided-diffusion .pt checkpoints (the fixture's reduced U-Net and classifier, with sidecars of their
    constructor kwargs), read with weights_only=True: a class-conditional learned-range policy with guided-diffusion
    respacing, and the classifier + a linear layer as its value function."""
    from helpers import write_openai_checkpoints
    unet, clf = write_openai_checkpoints(tmp_path)
    out = tmp_path / "run"  # Table 6.2 "Colorfulness" with the classifier value function (thesis 6.5), toy sizes
    proc = run("train_ppo.py", "--exp", "colorfulness", "--pretrained", f"guided-diffusion:{unet}",
               "--classifier", f"guided-diffusion:{clf}", "--num-envs", "4", "--num-steps", "5", "--minibatch-size", "5", "--epochs", "1",
               "--eval-samples", "4", "--policy-warmup-steps", "1", "--vf-warmup-steps", "1", "--output-dir", out)
    assert "class, pixel (3, 64, 64)), 5 steps ddpm/learned_range" in proc.stdout
    assert (out / "final_policy" / "guided_unet.safetensors").exists()
    assert _scalars(out, "losses/ratio_dev_at_start") == [0.0]


def test_pink_code_path_on_the_tiny_pipeline(run, tmp_path):
    """Table 6.2 "Pink", steps 1-4, on the tiny random SD pipeline: sample.py --exp pink (latents stored, the
    Table 6.6 instructions attached), label.py --auto, train_reward.py --exp pink (latent input, standardized),
    train_ppo.py --exp pink with that model as reward and as the value function's start, in the preset's fp16
    autocast with GradScaler and recomputed old log-probs; only the sizes are shrunk."""
    from tiny_sd import build_tiny_sd
    model = build_tiny_sd(tmp_path / "tiny-sd")
    ds, rm, out = tmp_path / "ds", tmp_path / "rm", tmp_path / "run"
    run("sample.py", "--exp", "pink", "--pretrained", model, "--num-tasks", "8", "--num-steps", "4", "--precision",
        "fp32", "--out", ds)
    assert "pink sunglasses" in (ds / "instructions.md").read_text().lower()
    run("label.py", "--auto", "builtin:colorfulness", ds)
    run("label.py", "export", ds)
    run("train_reward.py", "--exp", "pink", "--dataset", ds, "--out", rm, "--epochs", "2", "--val-fraction", "0.25")
    config = json.loads((rm / "config.json").read_text())
    assert config["args"]["precision"] == "fp16" and config["reward_std"] != 1.0
    proc = run("train_ppo.py", "--exp", "pink", "--pretrained", model, "--reward-model", rm, "--resolution", "32",
               "--num-envs", "2", "--num-steps", "4", "--minibatch-size", "4", "--epochs", "1", "--eval-samples", "2",
               "--policy-warmup-steps", "1", "--vf-warmup-steps", "1", "--output-dir", out)
    assert "text, latent (4, 4, 4)), 4 steps ddpm" in proc.stdout and "2 minibatches of 4 -> 1 optimizer steps" in proc.stdout
    saved = json.loads((out / "args.json").read_text())
    assert (saved["precision"], saved["value_fn"], saved["old_logprobs"], saved["guidance_scale"]) == \
        ("fp16", "reward", "recompute", 7.5)
    assert _scalars(out, "losses/ratio_dev_at_start") == [0.0]


@pytest.mark.slow
def test_compiled_policy_trains_and_checkpoints_plain_keys(run, smoke, tmp_path):
    """--compile: one epoch through torch.compile (inductor on the CPU, ~2 min of compilation); the checkpoint has
    the uncompiled key names (no _orig_mod. prefix, a resume pitfall seen in peers), and the PPO ratio starts within 1e-3 of 1
    (the compiled training and inference graphs round differently, so not exactly 1 as in eager mode)."""
    out = tmp_path / "compiled"
    run("train_ppo.py", *TINY, "--epochs", "1", "--compile", "true", "--checkpoint-every", "1", "--output-dir", out)
    keys = load_file(out / "checkpoints/epoch_00001/policy.safetensors").keys()
    assert keys == load_file(smoke[0] / "checkpoints/epoch_00001/policy.safetensors").keys()
    assert _scalars(out, "losses/ratio_dev_at_start")[0] < 1e-3


def test_fused_minibatches_give_the_same_update(cache_dir, monkeypatch):
    """--fused-minibatches K runs K minibatches of one optimizer step as one forward/backward pass: the gradients
    each optimizer step sees, and the epoch's statistics, equal those of the minibatches one at a time. (pi_old is
    recomputed in each run's own passes, as --old-logprobs recompute does: summed over a state's dimensions, a
    log-probability moves by ~1e-3 with the batch size a kernel sees, and the ratio would carry that.)"""
    from drlhf import distributed
    from drlhf.sampler import action_logprob, rollout
    common = ["--toy-train-steps", "8", "--num-envs", "4", "--num-steps", "5", "--minibatch-size", "5",
              "--grad-accum-steps", "2", "--cache-dir", str(cache_dir), "--device", "cpu"]
    device = distributed.resolve_device("cpu")
    args, _ = train_ppo.parse_args(common)
    base, nets, *_ = train_ppo.setup(args, 0, 1, device)
    T, B = args.num_steps, args.num_envs
    g = torch.Generator().manual_seed(0)
    buf = rollout(nets.policy_net, nets.schedule, torch.randn(B, *base.sample_shape, generator=g), None, generator=g)
    data = dict(latents=buf.latents, cond=None, values=torch.randn(T, B, generator=g),
                returns=torch.randn(T, B, generator=g), advantages=torch.randn(T, B, generator=g))
    orders = torch.randperm(T * B, generator=g)[None]
    logprob = lambda x, i, c, a: action_logprob(nets.policy_net, nets.schedule, x, i, c, a)  # noqa: E731
    steps = []  # the gradients of each optimizer step, which then does not move the weights (all runs start alike)

    def record_step(nets, args, state):
        steps.append({k: p.grad.clone() for k, p in [*base.net.named_parameters(), *nets.value_net.named_parameters()]
                      if p.grad is not None})
        nets.opt_pi.zero_grad(set_to_none=True)
        nets.opt_vf.zero_grad(set_to_none=True)
        state["global_step"] += 1
    monkeypatch.setattr(train_ppo, "optimizer_step", record_step)
    stats = {}
    for k in (1, 2):
        fused, _ = train_ppo.parse_args([*common, "--fused-minibatches", str(k)])
        fused_plan = plan.EpochPlan(fused, B, nets)  # the update's passes: 5 x k states
        data["logprobs"] = fused_plan.evaluate(logprob, buf, orders[0])
        stats[k] = train_ppo.ppo_update(nets, fused_plan, data, orders, fused, {"epoch": 0, "global_step": 0})
        assert stats[k]["ratio_dev_at_start"] == 0.0
    assert len(steps) == 4  # 20 states = 4 minibatches of 5 = 2 optimizer steps, once one at a time, once fused
    for one, two in zip(steps[:2], steps[2:]):
        assert one.keys() == two.keys() and len(one) > 10
        flat_one, flat_two = (torch.cat([d[name].flatten() for name in one]) for d in (one, two))
        scale = flat_one.norm()
        assert (flat_two - flat_one).norm() < 1e-4 * scale  # summation order (batch 5 vs 10) only: 1.3e-5 here
        # each tensor too; some gradients all but vanish (a bias feeding a group norm), so the floor is the scale's
        errors = {name: ((two[name] - one[name]).norm() / (one[name].norm() + 1e-4 * scale)).item() for name in one}
        assert max(errors.values()) < 1e-3, max(errors.items(), key=lambda kv: kv[1])
    for key in ("pg_loss", "v_loss", "approx_kl", "clipfrac", "ratio"):
        assert stats[2][key] == pytest.approx(stats[1][key], rel=1e-5, abs=1e-7), key


def test_rollout_through_the_update_graph_draws_the_same_chain(cache_dir):
    """--compile with the rollout's batch equal to the update's pass: the rollout runs the training graph
    (training mode, gradients on, outputs detached) instead of compiling its own. Eagerly that is the same chain
    up to rounding, with nothing left attached to an autograd graph; a batch of another size, an active dropout or
    a run without --compile keeps the rollout's own no-grad path."""
    from drlhf import distributed
    from drlhf.sampler import rollout
    common = ["--toy-train-steps", "8", "--num-envs", "4", "--num-steps", "5", "--cache-dir", str(cache_dir),
              "--device", "cpu"]
    args, _ = train_ppo.parse_args([*common, "--minibatch-size", "4", "--compile", "true"])
    device = distributed.resolve_device("cpu")
    base, nets, *_ = train_ppo.setup(args, 0, 1, device)  # compiled lazily: nothing compiles unless it runs
    net = nets.policy_net
    assert plan.EpochPlan(args, 4, nets).rollout_in_update_graph
    assert not plan.EpochPlan(args, 2, nets).rollout_in_update_graph  # 2 environments, passes of 4 states
    for other in (["--minibatch-size", "4"], ["--minibatch-size", "2", "--grad-accum-steps", "2",  # 2 x 2 fused
                                              "--fused-minibatches", "2", "--compile", "true"]):
        flags, _ = train_ppo.parse_args([*common, *other])
        assert plan.EpochPlan(flags, 4, nets).rollout_in_update_graph == flags.compile
    net.net = base.net  # the plain module: the two paths compared eagerly
    x_T = torch.randn(4, *base.sample_shape, generator=torch.Generator().manual_seed(0))
    chains = []
    for shared in (False, True):
        net.train(shared)
        chains.append(rollout(plan.in_update_graph(net, shared), nets.schedule, x_T, None,
                              generator=torch.Generator().manual_seed(1)))
    # the same up to rounding: in training mode diffusers' ResNet blocks make their shortcut input contiguous
    # (diffusers 0.42), so a 1x1 convolution reads another memory layout (last bits, ~1e-6 per forward here)
    torch.testing.assert_close(chains[1].latents, chains[0].latents, rtol=0, atol=1e-4)
    torch.testing.assert_close(chains[1].logprobs, chains[0].logprobs, rtol=1e-5, atol=0)
    assert not chains[1].latents.requires_grad and not chains[1].logprobs.requires_grad
    nets.policy_net = torch.nn.Sequential(net, torch.nn.Dropout(0.1))  # training mode would change what is sampled
    assert not plan.EpochPlan(args, 4, nets).rollout_in_update_graph


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_recompute_is_skipped_where_the_rollout_already_gives_pi_old(cache_dir, monkeypatch, precision):
    """--old-logprobs recompute where the rollout evaluates the policy in the update's passes (its batch is one, or
    it is split into passes or padded to one): recomputing would give the rollout's own log-probabilities bit for
    bit (the same kernels on the same shapes, whichever states a pass mixes; in fp32 on this project's 2-core
    machine, passes of 4 states moved them by up to 2.4e-4, and of 16 on one thread too), so the epoch skips the
    pass and trains exactly as it would with it. Padding that would cost more than the pass, or a compiled rollout
    with a graph of its own, keep the pass."""
    from drlhf import distributed
    from drlhf.sampler import action_logprob, rollout
    common = ["--toy-train-steps", "8", "--num-envs", "8", "--num-steps", "4", "--old-logprobs", "recompute",
              "--precision", precision, "--cache-dir", str(cache_dir), "--device", "cpu"]
    args, _ = train_ppo.parse_args([*common, "--minibatch-size", "8", "--grad-accum-steps", "2"])
    device = distributed.resolve_device("cpu")
    base, nets, *_ = train_ppo.setup(args, 0, 1, device)
    net = nets.policy_net
    dropout = torch.nn.Sequential(net, torch.nn.Dropout(0.1))

    def decided(flags, B, policy=net):  # the plan of B environments per process for a policy network
        nets.policy_net = policy
        return plan.EpochPlan(flags, B, nets)
    fused = ["--minibatch-size", "4", "--fused-minibatches", "2", "--grad-accum-steps", "2"]  # passes of 8 states
    # (flags, environments per process, rollout in passes of, pass skipped): the rollout's batch is the pass; or
    # split into passes, or padded to one where that costs no more than the pass (3 padded to 8 would cost more)
    for flags, B, chunk, expected in ((["--minibatch-size", "8"], 8, 8, True), (["--minibatch-size", "8"], 4, 8, True),
                                      (["--minibatch-size", "8"], 3, None, False),
                                      (["--minibatch-size", "4"], 8, 4, True), (fused, 8, 8, True),
                                      (["--minibatch-size", "8", "--compile", "true"], 8, 8, True),
                                      (["--minibatch-size", "8", "--compile", "true"], 4, 8, True),
                                      (["--minibatch-size", "8", "--old-logprobs", "rollout"], 4, None, False),
                                      (["--minibatch-size", "8", "--algo", "backprop"], 8, None, False)):
        flags = train_ppo.parse_args([*common, *flags])[0]
        assert decided(flags, B).rollout_chunk == chunk, (flags, B)
        assert decided(flags, B).rollout_gives_pi_old == expected, (flags, B)
        assert decided(flags, B).recompute == (flags.old_logprobs == "recompute" and not expected), (flags, B)
    compiled, _ = train_ppo.parse_args([*common, "--minibatch-size", "8", "--compile", "true"])
    assert decided(args, 8, dropout).rollout_gives_pi_old  # eagerly both run in evaluation mode
    assert decided(args, 4, dropout).rollout_gives_pi_old
    assert not decided(compiled, 8, dropout).rollout_gives_pi_old  # its rollout has a no-grad graph of its own
    assert decided(compiled, 4, dropout).rollout_chunk is None  # padding would save no pass
    assert decided(args, 8).notes() == ["[drlhf] --old-logprobs recompute: extra no-grad passes: none: "
                                                  "the rollout's batch of 8 is the update's pass, so its log-probs "
                                                  "are pi_old already"]
    assert decided(compiled, 4).notes() == [
        "[drlhf] --compile: the rollout (4 environments) runs through the update's training graph in passes of 8 "
        "states (4 of them padding): nothing of its own to compile",
        "[drlhf] --old-logprobs recompute: extra no-grad passes: none: the rollout evaluates its 4 environments in "
        "passes of 8 states (4 of them padding), so its log-probs are pi_old already"]
    assert "(--minibatch-size 2 --grad-accum-steps 8, the same update of 16 states per optimizer step, would make" \
        in decided(args, 2).notes()[0]  # the flags that give passes of 2 states: 2 x 8 = 8 x 2
    assert plan.passes_of(6, args) == "update passes of 6 states (--minibatch-size x --fused-minibatches)"
    chains = train_ppo.parse_args([*common, "--minibatch-size", "8", "--minibatch-grouping", "trajectory"])[0]
    assert plan.passes_of(2, chains).startswith("update passes of 2")  # not whole 4-step chains: no flags
    assert plan.passes_of(4, train_ppo.parse_args([*common, *fused])[0]).startswith(
        "--minibatch-size 2 --grad-accum-steps 4,")  # passes of 2 fused minibatches of 2
    # what the pass would compute, in a shuffled order of the update's passes: the rollout's values, bit for bit
    g = torch.Generator().manual_seed(0)
    with distributed.autocast(precision, device):
        buf = rollout(net.eval(), nets.schedule, torch.randn(8, *base.sample_shape, generator=g), None, generator=g)
    order = torch.randperm(32, generator=g)
    logprob = lambda x, i, c, a: action_logprob(net, nets.schedule, x, i, c, a)  # noqa: E731
    # bit for bit where this CPU's kernels give a state the same bits whatever shares its pass (AVX-512 here);
    # elsewhere (MKL's AVX2 path) up to rounding, and the skipped pass then trains up to rounding too
    exact = passes_reproduce_bits()
    recomputed = decided(args, 8).evaluate(logprob, buf, order)
    assert torch.equal(recomputed, buf.logprobs) if exact else torch.allclose(recomputed, buf.logprobs, rtol=1e-5)
    # one epoch with the pass skipped (one state evaluation: the values) and one with it forced: the same training,
    # with the rollout's batch the pass (8 in passes of 8) and padded to it (12 in passes of 16, 4 of them padding)
    padded, _ = train_ppo.parse_args([*common, "--num-envs", "12", "--minibatch-size", "16", "--grad-accum-steps", "3"])
    for run_args, B in ((args, 8), (padded, 12)):
        ends = []
        for skip in (True, False):
            base, nets, epoch_plan, _, prompts, embeds, gens, sizes = train_ppo.setup(run_args, 0, 1, device)
            assert epoch_plan.rollout_gives_pi_old and not epoch_plan.recompute  # the plan skips the pass
            epoch_plan.recompute = not skip  # forced: the pass made anyway
            calls = []
            count = lambda *a, f=epoch_plan.evaluate: calls.append(1) or f(*a)  # noqa: E731
            monkeypatch.setattr(epoch_plan, "evaluate", count)
            state = {"epoch": 0, "global_step": 0}
            train_ppo.set_lrs(nets.opt_pi, nets.opt_vf, run_args, state)
            kl_ctl = train_ppo.KLController(run_args.kl_coef)
            scores, _, stats, _ = train_ppo.train_epoch(nets, epoch_plan, kl_ctl, base, run_args, state, gens, prompts,
                                                        embeds, B, 0, device)
            monkeypatch.undo()
            ends.append((len(calls), scores, stats, {**base.net.state_dict(), **nets.value_net.state_dict()}))
        assert (ends[0][0], ends[1][0]) == (1, 2)
        assert torch.equal(ends[0][1], ends[1][1])  # the same rollout and rewards either way
        # pi_old in the update's training mode: its first forward repeats it, so the ratio starts at exactly 1
        assert ends[0][2]["ratio_dev_at_start"] == 0.0 if exact else ends[0][2]["ratio_dev_at_start"] < 1e-3, ends[0][2]
        assert ends[0][3].keys() == ends[1][3].keys()
        if exact:
            assert ends[0][2] == ends[1][2], (B, ends[0][2], ends[1][2])
            assert all(torch.equal(v, ends[1][3][k]) for k, v in ends[0][3].items()), B
        else:  # Adam moves a weight by at most its learning rate per step: 2 steps at 5e-5
            assert max((v - ends[1][3][k]).abs().max().item() for k, v in ends[0][3].items()) < 2e-4, B


def test_non_finite_ppo_loss_stops_before_the_optimizer_step(cache_dir):
    """The update reads its statistics once per optimizer step; a non-finite loss in any minibatch of the step
    still stops training before that step, with the policy and value weights untouched."""
    import copy
    from drlhf import distributed
    args, _ = train_ppo.parse_args(["--toy-train-steps", "8", "--num-envs", "4", "--num-steps", "5",
                                    "--minibatch-size", "5", "--grad-accum-steps", "2", "--norm-adv", "false",
                                    "--cache-dir", str(cache_dir), "--device", "cpu"])
    device = distributed.resolve_device("cpu")
    base, nets, epoch_plan, *_ = train_ppo.setup(args, 0, 1, device)
    T, B = args.num_steps, args.num_envs
    latents = torch.randn(T + 1, B, *base.sample_shape)
    advantages = torch.ones(T, B)
    advantages.view(-1)[7] = float("nan")
    buf = dict(latents=latents, logprobs=torch.zeros(T, B), cond=None, values=torch.zeros(T, B),
               returns=torch.zeros(T, B), advantages=advantages)
    before = copy.deepcopy(base.net.state_dict()), copy.deepcopy(nets.value_net.state_dict())
    state = {"epoch": 3, "global_step": 0}
    orders = torch.arange(T * B)[None]  # in order: state 7 is in minibatch 2 (states 5-9), the first step's last
    with pytest.raises(FloatingPointError, match="epoch 3: non-finite PPO loss"):
        train_ppo.ppo_update(nets, epoch_plan, buf, orders, args, state)
    assert state["global_step"] == 0
    for saved, module in zip(before, (base.net, nets.value_net)):
        assert all(torch.equal(saved[k], v) for k, v in module.state_dict().items())
    advantages.view(-1)[7] = 1.0  # finite (and the stopped update's gradients cleared): the same update steps twice
    nets.opt_pi.zero_grad(set_to_none=True)
    nets.opt_vf.zero_grad(set_to_none=True)
    train_ppo.ppo_update(nets, epoch_plan, buf, orders, args, state)
    assert state["global_step"] == 2
