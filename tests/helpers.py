"""Scoring functions used by the tests through `--reward module:function`."""


def nan_for_second_sample(images, cond=None):
    scores = images.float().mean((1, 2, 3))
    scores[1] = float("nan")
    return scores


def mean_brightness(images, cond=None):
    return images.float().mean((1, 2, 3))
