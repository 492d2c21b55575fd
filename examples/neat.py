"""A gold preference with an optimum inside the base model's range, for over-optimization experiments offline
(docs/experiments.md, "Past the thesis"): a neat digit has about as much ink as the boldest base samples, and
both thinner digits and blobs score lower. Most base samples are thinner than that, so their rankings mostly
say "more ink", which is what a reward model learns from them; optimizing that past the optimum lowers this gold.

    python label.py label datasets/neat --auto examples.neat:neat_score        # from the repository root
    python train_ppo.py ... --eval-reward examples.neat:neat_score
"""

NEAT_INK = -0.1  # mean brightness in [-1, 1]; the toy "4"s average -0.36 +- 0.19


def neat_score(images, cond=None):
    """-|mean brightness - NEAT_INK| per image: (B, C, H, W) in [-1, 1] -> (B,)."""
    return -(images.float().mean((1, 2, 3)) - NEAT_INK).abs()
