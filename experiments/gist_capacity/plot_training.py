"""Plot a reader run's paired telemetry.

    python experiments/gist_capacity/plot_training.py                      # the first reader run
    python experiments/gist_capacity/plot_training.py metrics_reader_near.jsonl reader_near_training.png
    python experiments/gist_capacity/plot_training.py metrics_recon_stage2.jsonl recon_stage2_training.png

Paths are relative to this folder. Curves are 25-step running means of per-step figures."""
import json
import sys
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

here = Path(__file__).parent
src = here / (sys.argv[1] if len(sys.argv) > 1 else "metrics_reader_r8.jsonl")
out = here / (sys.argv[2] if len(sys.argv) > 2 else "reader_r8_training.png")
rows = [json.loads(l) for l in open(src)]
step = np.array([r["step"] for r in rows])
n = min(25, len(rows))
fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
for k, lab in (("subst_minus_drop", "NLL(gist) - NLL(block dropped)"),
               ("subst_kl_minus_drop", "KL(gist) - KL(dropped)"),
               ("subst_minus_wrong", "NLL(gist) - NLL(another block's gist)"),
               ("recon_minus_wrong", "read-back NLL(gist) - NLL(another block's gist)")):
    if k not in rows[0]:
        continue
    v = np.array([r[k] for r in rows])
    # centred running mean; near the ends over the steps there are (not padded with zeros)
    mean = np.convolve(v, np.ones(n), mode="same") / np.convolve(np.ones_like(v), np.ones(n),
                                                                 mode="same")
    ax[0].plot(step, mean, label=f"{lab}, {n}-step mean")
ax[0].axhline(0, color="k", lw=0.5)
ax[0].set_xlabel("step"); ax[0].set_ylabel("nats/token"); ax[0].legend(fontsize=7)
ax[0].set_title("one-block substitution, paired (train windows)", fontsize=9)
ax[1].plot(step, [r["gist_std"] for r in rows])
ax[1].set_xlabel("step"); ax[1].set_ylabel("gist std / embedding RMS")
ax[1].set_title("spread of LOD1 gists across blocks", fontsize=9)
fig.suptitle(src.name, fontsize=9)
fig.tight_layout()
fig.savefig(out, dpi=110)
print(out)
