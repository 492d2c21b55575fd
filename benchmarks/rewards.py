"""A reward for speed comparisons only, cheap next to the models: from the repository root,
`python benchmarks/epoch.py --exp pink --reward benchmarks.rewards:brightness ...` (see docs/performance.md)."""


def brightness(images, cond):
    """Mean pixel value of each decoded image in [-1, 1]: (B, C, H, W) -> (B,)."""
    return images.mean((1, 2, 3))
