"""Plot the reader run's paired telemetry: python experiments/gist_capacity/plot_training.py"""
import json
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

here = Path(__file__).parent
rows = [json.loads(l) for l in open(here / "metrics_reader_r8.jsonl")]
step = np.array([r["step"] for r in rows])
fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
for k, lab in (("subst_minus_drop", "NLL(gist) - NLL(block dropped)"),
               ("subst_kl_minus_drop", "KL(gist) - KL(dropped)")):
    v = np.array([r[k] for r in rows])
    ax[0].plot(step, np.convolve(v, np.ones(25) / 25, mode="same"), label=lab + ", 25-step mean")
ax[0].axhline(0, color="k", lw=0.5)
ax[0].set_xlabel("step"); ax[0].set_ylabel("nats/token"); ax[0].legend(fontsize=7)
ax[0].set_title("one-block substitution vs dropping it (train windows)", fontsize=9)
ax[1].plot(step, [r["gist_std"] for r in rows])
ax[1].set_xlabel("step"); ax[1].set_ylabel("gist std / embedding RMS")
ax[1].set_title("spread of LOD1 gists across blocks", fontsize=9)
fig.tight_layout()
fig.savefig(here / "reader_r8_training.png", dpi=110)
