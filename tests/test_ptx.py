"""PPO-ptx (thesis 8.1, Ouyang et al. 2022): the base model's denoising loss on base-distribution images, added to
the policy loss; resumable exactly; the images from the base model (cached) or from a folder."""
import json

import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import TINY
from test_hardening import fails
from test_ppo import _scalars


def test_ptx_adds_the_denoising_loss_resumes_exactly_and_reads_a_folder(run, tmp_path):
    common = ["train_ppo.py", *TINY, "--ptx-coef", "1", "--ptx-samples", "16", "--checkpoint-every", "1"]
    run(*common, "--epochs", "2", "--output-dir", tmp_path / "full")
    ptx = _scalars(tmp_path / "full", "losses/ptx_loss")
    assert len(ptx) == 2 and all(0 < v < 10 for v in ptx)  # an MSE of the noise prediction, logged per epoch
    run(*common, "--epochs", "1", "--output-dir", tmp_path / "cut")
    run("train_ppo.py", "--resume", tmp_path / "cut", "--epochs", "2")
    a, b = (load_file(d / "checkpoints/epoch_00002/policy.safetensors") for d in (tmp_path / "full", tmp_path / "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same images and minibatches after a resume
    plain = tmp_path / "plain"  # without ptx the update differs: the term is really in the gradient
    run("train_ppo.py", *TINY, "--epochs", "2", "--checkpoint-every", "1", "--output-dir", plain)
    c = load_file(plain / "checkpoints/epoch_00002/policy.safetensors")
    assert any(not torch.equal(a[k], c[k]) for k in a)
    folder = tmp_path / "images"  # a folder of images instead of the base model's samples
    folder.mkdir()
    for i in range(4):
        Image.new("L", (8, 8), 40 * i).save(folder / f"{i}.png")
    run(*common, "--epochs", "1", "--ptx-data", folder, "--output-dir", tmp_path / "folder")
    assert len(_scalars(tmp_path / "folder", "losses/ptx_loss")) == 1
    fails(run(*common, "--epochs", "1", "--ptx-data", tmp_path / "none", "--output-dir", tmp_path / "x", check=False),
          "--ptx-data")
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert summary["epochs"] == 2
