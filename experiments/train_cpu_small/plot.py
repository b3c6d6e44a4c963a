"""Training curves of a run's metrics.jsonl (moving average over 10 steps) -> curves.png, and
the start/end figures as JSON.

    .venv/bin/python experiments/train_cpu_small/plot.py [METRICS.jsonl] [OUT.png]
"""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

here = Path(__file__).parent
src = Path(sys.argv[1]) if len(sys.argv) > 1 else here / "metrics.jsonl"
out = Path(sys.argv[2]) if len(sys.argv) > 2 else here / "curves.png"
rows = [json.loads(x) for x in src.read_text().splitlines()]
keys = ["loss", "nll_recent", "nll_mix", "nll_gap", "lens_loss", "lens_corr", "lens_reg",
        "contrastive"]
step = np.array([r["step"] for r in rows])


def smooth(v, k=10):
    v = np.asarray(v, float)
    return np.convolve(v, np.ones(k) / k, mode="valid")


fig, axes = plt.subplots(2, 4, figsize=(16, 7))
for ax, k in zip(axes.flat, keys):
    v = [r.get(k, np.nan) for r in rows]
    ax.plot(step, v, alpha=0.3)
    ax.plot(step[9:], smooth(v), lw=2)
    ax.set_title(k)
    ax.set_xlabel("step")
fig.tight_layout()
fig.savefig(out, dpi=80)
summary = {k: {"first10": float(np.mean([r[k] for r in rows[:10]])),
               "last10": float(np.mean([r[k] for r in rows[-10:]]))} for k in keys}
summary["steps"] = len(rows)
summary["wall_minutes"] = float(sum(r["step_time"] for r in rows) / 60)
print(json.dumps(summary, indent=1))
(here / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
