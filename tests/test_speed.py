"""The epoch benchmark (tiny sizes on the CPU), --compile without recompilation, and CPU threads fixed for a run
whatever the machine's load. Nothing here depends on how long anything takes."""
import ctypes
import json
import os
from pathlib import Path

import pytest
import torch

from conftest import TINY
from drlhf import distributed, speed


def test_benchmark_tiny_pink_writes_phases_flops_and_peak(run, tmp_path):
    """The Pink preset on SD v1.5's classes at toy widths: built at random weights, timed through train_ppo.py's
    own functions, with the first epoch apart, FLOPs counted, the matmul peak measured and one epoch profiled."""
    out = tmp_path / "pink.json"
    proc = run("benchmarks/epoch.py", "--exp", "pink", "--size", "tiny", "--device", "cpu", "--num-envs", "2",
               "--num-steps", "4", "--minibatch-size", "4", "--grad-accum-steps", "1", "--bench-epochs", "2",
               "--models-dir", tmp_path / "models", "--json", out, "--profile", "5")
    r = json.loads(out.read_text())
    assert len(r["epochs"]) == 2 and r["images_per_epoch"] == 2 and r["states_per_epoch"] == 8
    # Pink recomputes pi_old: its 2 environments are padded to the update's passes of 4 states instead (logged)
    assert r["rollout_notes"] == ["[drlhf] --old-logprobs recompute: extra no-grad passes: none: the rollout evaluates "
                                  "its 2 environments in passes of 4 states (2 of them padding), so its log-probs are "
                                  "pi_old already"]
    prof = r["profile"]  # one more epoch under torch.profiler: the 5 operators with the most self CPU time
    assert prof["clock"] == "cpu" and prof["wall_seconds"] > 0 and prof["busy_seconds"] > 0
    assert len(prof["top_ops"]) == 5 and all(op["calls"] > 0 for op in prof["top_ops"])
    shares = [op["share"] for op in prof["top_ops"]]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-9
    assert "profiled epoch: CPU busy / wall" in proc.stdout
    for row in r["epochs"]:
        assert row["seconds"] > 0 and row["rollout"] > 0 and row["scoring"] > 0 and row["update"] > 0
        assert abs(row["rollout"] + row["scoring"] + row["update"] - row["seconds"]) < 1e-6
    assert r["steady_seconds_per_epoch"] == r["epochs"][1]["seconds"]
    assert r["flops_per_epoch"] > 1e8 and r["matmul_peak_tflops"] > 0
    assert r["achieved_tflops"] == pytest.approx(r["flops_per_epoch"] / r["steady_seconds_per_epoch"] / 1e12)
    assert (tmp_path / "models" / "sd15-tiny" / "model_index.json").exists()
    assert (tmp_path / "models" / "rm-sd15-tiny" / "config.json").exists()  # --value-fn reward: Pink's own RM
    assert "s/epoch (steady / first)" in proc.stdout and "TFLOP per epoch" in proc.stdout


def test_benchmark_tiny_colorfulness_builds_openai_models(run, tmp_path):
    out = tmp_path / "c.json"
    run("benchmarks/epoch.py", "--exp", "colorfulness", "--size", "tiny", "--device", "cpu", "--num-envs", "2",
        "--num-steps", "2", "--minibatch-size", "4", "--bench-epochs", "1", "--no-flops", "--channels-last",
        "--models-dir", tmp_path / "models", "--json", out)
    r = json.loads(out.read_text())
    assert r["channels_last"] is True
    assert r["steady_seconds_per_epoch"] is None and r["first_epoch_seconds"] > 0 and "flops_per_epoch" not in r
    assert {p.name for p in (tmp_path / "models" / "guided-tiny").iterdir()} >= {"64x64_diffusion.pt",
                                                                                  "64x64_classifier.pt"}


def test_benchmark_rollout_in_one_batch_restores_the_recompute_pass(run, tmp_path):
    """--old-logprobs recompute with 4 environments and passes of 2 states: the rollout runs in 2 passes per step
    and makes the recompute unneeded, so an epoch counts fewer FLOPs than with the benchmark's A/B switch
    --rollout-in-one-batch, which evaluates the 4 at once and makes the recompute pass (as logged)."""
    flops, notes = [], []
    for ab in ([], ["--rollout-in-one-batch"]):
        out = tmp_path / f"ab{len(ab)}.json"
        run("benchmarks/epoch.py", *TINY, "--minibatch-size", "2", "--old-logprobs", "recompute", "--device", "cpu",
            "--bench-epochs", "1", "--json", out, *ab)
        r = json.loads(out.read_text())
        flops.append(r["flops_per_epoch"])
        notes.append(r["rollout_notes"][0])
        assert r["rollout_in_one_batch"] == bool(ab)
    assert "none: the rollout evaluates its 4 environments in passes of 2 states, so" in notes[0]
    assert "extra no-grad passes: one over the epoch's states" in notes[1]
    assert flops[1] > flops[0] > 0  # the pass over all 20 states, on top of the same rollout and update


@pytest.mark.slow
@pytest.mark.parametrize("scope,minibatch", [("model", 5), ("model", 4), ("model", 10), ("blocks", 5)])
def test_compile_compiles_in_the_first_epoch_only(run, tmp_path, scope, minibatch):
    """--compile: static shapes, so every graph is compiled in epoch 1 (the warm-up, reported) and epochs 2-3 reuse
    them; the fixed-seed evaluation runs eagerly and adds none, the PPO ratio starts at exactly 1, and the KL
    penalty's reference-policy pass runs the update's graph (no graph of its own; the KL starts at 0). The rollout's
    4 environments run the update's graph where its passes are 4 states (--old-logprobs rollout: the rollout's own
    log-probabilities), or 5 with --old-logprobs recompute (the rollout padded to a pass, which makes the recompute
    unneeded); in passes of 10 padding would cost more than the recompute, so the rollout has a no-grad graph of its
    own and the recompute runs through the update's graph. Slow: minutes of inductor compilation on 2 cores (the
    second run loads the first one's graphs from the cache)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "compiled.json"
    flags = [*TINY, "--minibatch-size", str(minibatch), "--compile", "true", "--compile-scope", scope,
             "--old-logprobs", "rollout" if minibatch == 4 else "recompute", "--kl-coef", "0.01"]
    proc = run("benchmarks/epoch.py", *flags, "--device", "cpu", "--bench-epochs", "3",
               "--no-flops", "--json", out, "--models-dir", tmp_path / "models", timeout=900)
    r = json.loads(out.read_text())
    if scope == "model":  # the update's pass, and the rollout's no-grad batch where it does not run in passes
        assert r["graphs_compiled_first_epoch"] == (2 if minibatch == 10 else 1)
        assert ("environments) runs through the update's training graph" in proc.stdout) == (minibatch != 10)
        assert ("extra no-grad passes: none" in proc.stdout) == (minibatch == 5)
    else:  # those two for each shape of the toy's ResNet blocks (input channels and resolution vary)
        assert r["graphs_compiled_first_epoch"] > 2
    assert r["recompiles_after_first_epoch"] == 0, proc.stdout
    assert r["compile_seconds"]["bytecode_tracing"] > 0 and "| compile phases (s) | dynamo tracing" in proc.stdout
    runs = run("train_ppo.py", *flags, "--epochs", "2", "--eval-every", "1", "--output-dir", tmp_path / "run",
               timeout=900)
    assert "--compile warm-up:" in runs.stdout and "recompiled" not in runs.stdout
    ea = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"scalars": 0})
    ea.Reload()
    assert [e.value for e in ea.Scalars("losses/ratio_dev_at_start")] == [0.0, 0.0]
    # pi_base through the same graph as pi_old: the same kernels, so the first epoch's KL is exactly 0 (3.3e-8 with an
    # eager reference pass) while the second's is not
    assert "reference-policy pass runs through the update's training graph too" in proc.stdout
    kl = [e.value for e in ea.Scalars("objective/kl")]
    assert kl[0] == 0.0 and kl[1] > 0, kl


def fake_machine(monkeypatch, cores, others):
    """speed's view of /proc/stat: other processes keep `others` cores busy."""
    clock = {"t": 0.0, "busy": 0.0}
    monkeypatch.setattr(speed.time, "perf_counter", lambda: clock["t"])
    monkeypatch.setattr(speed.time, "sleep", lambda s: clock.update(t=clock["t"] + s, busy=clock["busy"] + others * s))
    monkeypatch.setattr(speed.time, "process_time", lambda: 0.0)
    monkeypatch.setattr(speed, "_cpu_seconds", lambda: (clock["busy"], 0.0, cores))
    monkeypatch.setattr(speed, "usable_cores", lambda: cores)


def test_the_thread_count_comes_from_the_cores_never_from_the_load(monkeypatch):
    """The default thread count: $OMP_NUM_THREADS where set, else the usable cores divided among torchrun's local
    processes; the machine's load changes nothing."""
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert speed.default_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert speed.default_threads() == cores
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(2 * cores))
    assert speed.default_threads() == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    fake_machine(monkeypatch, cores, others=cores)  # every core busy elsewhere
    assert speed.default_threads() == cores


def test_a_busy_machine_at_start_is_one_line_and_the_threads_stay(monkeypatch, capsys):
    """setup_cpu sets the threads it is given, whatever the load; where other processes keep cores busy, one line
    names the flag that sets the count."""
    before = torch.get_num_threads()
    try:
        fake_machine(monkeypatch, 2, others=1.0)
        assert speed.setup_cpu(torch.device("cpu"), 2) == 2 and torch.get_num_threads() == 2
        err = capsys.readouterr().err
        assert "other processes keep 1.0 of 2 cores busy" in err and "--threads 1" in err and len(err.splitlines()) == 1
        fake_machine(monkeypatch, 2, others=0.05)  # daemons' noise: nothing to say
        assert speed.setup_cpu(torch.device("cpu"), 2) == 2 and capsys.readouterr().err == ""
        fake_machine(monkeypatch, 2, others=1.0)  # one thread beside one busy process: nothing to say either
        assert speed.setup_cpu(torch.device("cpu"), 1) == 1 and capsys.readouterr().err == ""
    finally:
        torch.set_num_threads(before)


def test_a_run_repeats_while_another_process_loads_the_machine(run, tmp_path):
    """The same command and seed twice with the default thread count (no OMP_NUM_THREADS: the usable cores), once
    beside a process that keeps a core busy: the same summary.json (timings aside) and the same weights; the
    thread count is in args.json and a resume keeps it."""
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | {
        "DRLHF_CACHE": str(run.cache_dir), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "train_ppo.py", *TINY, "--epochs", "2", "--eval-samples", "8"]
    root = Path(__file__).resolve().parents[1]
    subprocess.run([*cmd, "--output-dir", tmp_path / "idle"], cwd=root, env=env, check=True, capture_output=True)
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        busy = subprocess.run([*cmd, "--output-dir", tmp_path / "busy"], cwd=root, env=env, check=True,
                              capture_output=True, text=True)
    finally:
        burner.kill()
    timing = ("seconds_per_epoch", "images_per_second", "peak_rss_gb", "peak_gpu_memory_gb", "lineage")
    summaries = [{k: v for k, v in json.loads((tmp_path / d / "summary.json").read_text()).items() if k not in timing}
                 for d in ("idle", "busy")]
    assert summaries[0] == summaries[1], busy.stderr[-2000:]
    from safetensors.torch import load_file
    weights = [load_file(tmp_path / d / "checkpoints" / "epoch_00002" / "policy.safetensors") for d in ("idle", "busy")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    threads = json.loads((tmp_path / "idle" / "args.json").read_text())["threads"]
    assert threads == len(os.sched_getaffinity(0))
    run("train_ppo.py", "--resume", tmp_path / "idle", "--epochs", "3")  # (the test runs' OMP_NUM_THREADS=1)
    assert json.loads((tmp_path / "idle" / "args.json").read_text())["threads"] == threads


HEAP_BLOCK = """
import ctypes, sys, torch
from drlhf import speed
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "keep":
    assert speed.keep_freed_memory()
before = libc.mallinfo2()
block = torch.empty(30 << 20, dtype=torch.uint8).fill_(1)  # one activation-sized block, written
during = libc.mallinfo2()
del block
after = libc.mallinfo2()
print(during.hblks - before.hblks, (during.arena - before.arena) >> 20, (after.arena - before.arena) >> 20)
"""


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallinfo2"), reason="glibc >= 2.33 (mallinfo2)")
def test_cpu_runs_keep_freed_memory_instead_of_faulting_it_back_in(tmp_path):
    """keep_freed_memory: a 30 MiB block comes from the heap instead of a fresh mapping, and the heap keeps it once
    freed; by default glibc maps it fresh and unmaps it on free, and the kernel zero-fills every page again on the
    next touch. (Page faults themselves are no test: glibc's adaptive thresholds and the address layout make a
    toy U-Net step's count vary from run to run, 0-4,700 by default and 0-320 kept; docs/performance.md.)"""
    import subprocess
    import sys
    script = tmp_path / "heap.py"
    script.write_text(HEAP_BLOCK)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    out = {mode: [int(v) for v in subprocess.run([sys.executable, script, mode], capture_output=True, text=True,
                                                  env=env, check=True).stdout.split()] for mode in ("default", "keep")}
    mapped, heap_grew, heap_kept = out["keep"]  # 0, 30, 30 (MiB) here
    assert mapped == 0 and heap_kept == heap_grew, out  # from the heap, and the heap kept it once freed
    assert out["default"][0] == 1, out                  # by default a mapping of its own (unmapped when freed)


def test_cpu_runs_flush_subnormal_numbers_to_zero():
    """Subnormal floats take a slow path on x86 CPUs: every CPU run flushes them to zero at set-up."""
    threads = torch.get_num_threads()
    try:
        torch.set_flush_denormal(False)  # (an earlier test in this process may have set up a CPU device)
        tiny = torch.full((8,), 1e-39)   # subnormal in fp32
        assert (tiny * 1.0 != 0).all()
        speed.setup_cpu(torch.device("cpu"), threads)
        assert (tiny * 1.0 == 0).all() and (torch.full((8,), 1e-37) * 1.0 != 0).all()  # normal numbers stay
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)


def _tiny_text_unet():
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                                cross_attention_dim=32, attention_head_dim=8)


def test_frozen_layers_in_the_compute_dtype_give_the_same_outputs_under_autocast():
    """The frozen Linear/Conv weights of a LoRA policy and of a frozen copy are stored in bf16 (what autocast
    casts them to at every forward): the same outputs to the bit, trainable adapters and norms left in fp32.
    (The CPU runs bf16 autocast; the device argument only opts in, as a GPU run does.)"""
    import copy
    from drlhf import models
    unet = _tiny_text_unet()
    models.add_lora(unet, 4, 4, ["to_q", "to_k", "to_v", "to_out.0"])
    for name, p in unet.named_parameters():  # B starts at zero: move it, so that the adapters contribute; norms
        if "lora_B" in name:                   # start at exactly 1 and 0: move them off values bf16 holds exactly
            p.data.normal_(0, 0.05)
        elif "norm" in name:
            p.data.add_(torch.randn_like(p) * 0.1)
    frozen = copy.deepcopy(unet).requires_grad_(False)
    x, t, text = torch.randn(3, 4, 8, 8), torch.tensor([10, 500, 900]), torch.randn(3, 5, 32)

    def outputs():
        with distributed.autocast("bf16", torch.device("cpu")):
            return [m(x, t, encoder_hidden_states=text).sample for m in (unet, frozen)]
    before = outputs()
    assert speed.hold_frozen_in_compute_dtype(unet, "fp32", torch.device("cuda")) == 0  # fp32: nothing to do
    assert speed.hold_frozen_in_compute_dtype(unet, "bf16", torch.device("cpu")) == 0   # CPU: left alone
    n_policy = speed.hold_frozen_in_compute_dtype(unet, "bf16", torch.device("cuda"))
    n_frozen = speed.hold_frozen_in_compute_dtype(frozen, "bf16", torch.device("cuda"))
    assert 0 < n_policy < n_frozen  # the policy's adapters (and norms, embeddings) stay fp32
    assert all(p.dtype == torch.float32 for n, p in unet.named_parameters() if p.requires_grad or "norm" in n)
    assert unet.conv_in.weight.dtype == torch.bfloat16
    after = outputs()
    for a, b in zip(before, after):
        assert torch.equal(a, b)


def test_lora_merge_of_a_policy_held_in_half_precision_keeps_the_adapters():
    """merge_lora merges in fp32: the adapters' small update is not rounded away into a bf16 base weight."""
    from drlhf import models
    unet = _tiny_text_unet()
    models.add_lora(unet, 4, 4, ["to_q"])
    layer = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    layer.lora_B["default"].weight.data.normal_(0, 1e-4)
    delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight  # scale alpha / r = 1
    speed.hold_frozen_in_compute_dtype(unet, "bf16", torch.device("cuda"))
    merged = models.merge_lora(unet)
    w = merged.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight
    assert w.dtype == torch.float32
    torch.testing.assert_close(w - layer.base_layer.weight.float(), delta, atol=1e-7, rtol=1e-4)


def test_compile_cache_goes_to_the_drlhf_cache_unless_the_user_chose_one(monkeypatch, tmp_path):
    """Inductor writes its own default into $TORCHINDUCTOR_CACHE_DIR the first time it looks; that value is not
    the user's choice, so compile_module still points it at <cache>/torchinductor. A user's own value stays."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    cache_dir()  # what an import that touches inductor does: the variable now holds torch's default
    speed.compile_module(torch.nn.Linear(2, 2), str(tmp_path))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "torchinductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    speed.compile_module(torch.nn.Linear(2, 2), str(tmp_path))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")


def test_the_reference_pass_runs_the_update_graph_where_its_weights_look_like_the_policys(cache_dir):
    """--compile with a KL penalty: pi_base, a copy of the policy, is evaluated through the policy's compiled
    training graph (dynamo guards on the parameters' dtype, shape and requires_grad, not on their module), so its
    weights stay fp32 and require grad, yet no optimizer holds them; the fixed-seed evaluation keeps the plain
    copy. A LoRA policy (adapters pi_base lacks) or a mode-dependent one leaves the pass eager, and says so.
    Nothing compiles here (compilation is lazy); the slow compile test checks the graph counts and the KL."""
    import train_ppo
    from drlhf import plan
    common = [*TINY, "--kl-coef", "0.01", "--cache-dir", str(cache_dir), "--device", "cpu"]
    args, _ = train_ppo.parse_args([*common, "--compile", "true"])
    base, nets, epoch_plan, *_ = train_ppo.setup(args, 0, 1, distributed.resolve_device("cpu"))
    assert isinstance(epoch_plan.reference.net, torch._dynamo.eval_frame.OptimizedModule)
    assert epoch_plan.reference.net._orig_mod is nets.ref_net.net and nets.ref_net.net is not base.net
    assert all(p.requires_grad for p in nets.ref_net.parameters()) and nets.ref_net.training
    trained = {id(p) for group in nets.opt_pi.param_groups for p in group["params"]}
    assert trained and not trained & {id(p) for p in nets.ref_net.parameters()}
    for flags, shared in (([], True), (["--lora-rank", "2"], False), (["--kl-coef", "0"], False),
                          (["--compile", "false"], False), (["--kl-coef", "0", "--eval-reward", "target"], False)):
        flags = train_ppo.parse_args([*common, "--compile", "true", *flags])[0]
        assert plan.reference_in_update_graph(flags, nets.policy_net) == shared, flags
    dropout = torch.nn.Sequential(nets.policy_net, torch.nn.Dropout(0.1))
    assert not plan.reference_in_update_graph(args, dropout)
    assert "[drlhf] --compile: the KL's reference-policy pass runs through the update's training graph too: nothing " \
        "of its own to compile (pi_base's weights kept in fp32 for it)" in epoch_plan.notes()
    lora = train_ppo.parse_args([*common, "--compile", "true", "--lora-rank", "2"])[0]
    assert "[drlhf] --compile: the KL's reference-policy pass runs eagerly: the LoRA policy's graph has adapters " \
        "pi_base lacks" in plan.EpochPlan(lora, 4, nets).notes()
    eager, _ = train_ppo.parse_args(common)
    _, nets, epoch_plan, *_ = train_ppo.setup(eager, 0, 1, distributed.resolve_device("cpu"))  # eagerly: the copy
    assert epoch_plan.reference is nets.ref_net and not any(p.requires_grad for p in nets.ref_net.parameters())
    assert not nets.ref_net.training


def test_compile_scope_blocks_compiles_a_view_that_shares_the_weights(tmp_path):
    """--compile-scope blocks: every repeated block of the view is compiled and nothing else; the view shares
    every parameter and buffer with the module (training it trains the module), while the module and its copies
    (the diversity encoder, the merged LoRA policy) stay plain. Compilation is lazy, so nothing compiles here."""
    import copy
    from drlhf import toys
    unet = toys.toy_unet(1, 16, class_cond=True)
    view = speed.compile_module(unet, str(tmp_path), scope="blocks")
    compiled = [type(m).__name__ for m in view.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert compiled and set(compiled) == {"ResnetBlock2D"} and len(compiled) == sum(
        type(m).__name__ == "ResnetBlock2D" for m in unet.modules())  # the toy has no transformer blocks
    assert all(getattr(m, "_compiled_call_impl", None) is None for m in unet.modules())
    assert all(getattr(m, "_compiled_call_impl", None) is None for m in copy.deepcopy(unet).modules())
    assert [id(p) for p in view.parameters()] == [id(p) for p in unet.parameters()]
    assert [id(b) for b in view.buffers()] == [id(b) for b in unet.buffers()]
    assert view.state_dict().keys() == unet.state_dict().keys()
    plain = torch.nn.Sequential(torch.nn.Linear(2, 2))  # no repeated block: the whole module is compiled
    assert isinstance(speed.compile_module(plain, str(tmp_path), scope="blocks"), torch._dynamo.eval_frame.OptimizedModule)
