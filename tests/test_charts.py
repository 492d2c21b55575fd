"""The charts are matplotlib figures with labelled axes, tick values and legends (a number can be read off them),
written under the names the run folders have always used."""
import re
from pathlib import Path

import numpy as np
from PIL import Image

from drlhf import pictures


def figures_of(monkeypatch, tmp_path):
    """Each chart function's figure (kept open for inspection) and the PNG it writes."""
    seen, save = [], pictures._save_figure
    monkeypatch.setattr(pictures, "_save_figure", lambda fig, path: (seen.append((fig, Path(path))), save(fig, path)))
    rng = np.random.default_rng(0)
    pictures.histogram_png(rng.normal(size=64), rng.normal(2.0, 0.5, size=64), tmp_path / "reward_histogram.png")
    history = [dict(epoch=e, train_loss=1 / e, val_loss=1 / e + 0.02 * max(e - 5, 0), val_accuracy=0.5 + 0.04 * e)
               for e in range(1, 11)]
    pictures.learning_curves_png(history, 5, tmp_path / "learning_curves.png")
    curve = [dict(epoch=e, kl=0.5 * e, proxy_gain=0.3 * e, gold_gain=0.3 * e - 0.03 * e * e) for e in range(0, 12, 2)]
    pictures.overoptimization_png(curve, tmp_path / "overoptimization.png")
    return seen


def test_every_chart_has_labelled_ticked_axes_and_a_legend(monkeypatch, tmp_path):
    import matplotlib.pyplot as plt
    seen = figures_of(monkeypatch, tmp_path)
    assert [p.name for _, p in seen] == ["reward_histogram.png", "learning_curves.png", "overoptimization.png"]
    for fig, path in seen:
        fig.canvas.draw()  # tick labels are filled in at draw time
        for ax in fig.axes:
            assert ax.get_xlabel() or ax.get_ylabel(), path
            ticks = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
            assert len(ticks) >= 3 and all(re.fullmatch(r"[−\-]?\d+(\.\d+)?", t) for t in ticks), (path, ticks)
        assert any(ax.get_legend() is not None for ax in fig.axes), path
        with Image.open(path) as image:
            assert image.width >= 600 and image.height >= 300 and len(set(image.convert("L").getdata())) > 10
        plt.close(fig)
    learning = seen[1][0]
    assert "kept: epoch 5" in [t.get_text() for ax in learning.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    over = seen[2][0]
    assert any("gold peak +0.72 (epoch 4)" == t.get_text() for ax in over.axes for t in ax.get_legend().get_texts())
