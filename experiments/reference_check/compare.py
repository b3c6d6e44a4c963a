"""Compare mc_jax against the transformers reference written by hf_reference.py.

    .venv/bin/python experiments/reference_check/compare.py OUT.npz FILE
Prints token agreement, perplexity of both, and the max/mean absolute logit difference; writes
experiments/reference_check/results_<file stem>.json.
"""
import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from mc_jax.base import base_model as bm
from mc_jax.base.loading import load_base
from mc_jax.base.perplexity import ids_perplexity

ref = np.load(sys.argv[1])
model = load_base()
text = open(sys.argv[2], encoding="utf-8").read()
ids = np.asarray(model.tokenizer.encode(text)[:1024], np.int32)
same_tokens = bool(len(ids) == len(ref["ids"]) and np.array_equal(ids, ref["ids"]))
res = ids_perplexity(model, ref["ids"].astype(np.int32))
logits = np.asarray(bm.logits_fn(model.params, model.cfg, jnp.asarray(ref["ids"][None])))[0]
diff = np.abs(logits - ref["logits"])
out = {
    "file": sys.argv[2], "tokens": int(len(ref["ids"])), "tokenization_identical": same_tokens,
    "ppl_mc_jax": res["perplexity"], "ppl_transformers": float(ref["ppl"]),
    "ppl_rel_diff": abs(res["perplexity"] - float(ref["ppl"])) / float(ref["ppl"]),
    "logit_max_abs_diff": float(diff.max()), "logit_mean_abs_diff": float(diff.mean()),
    "argmax_agreement": float(np.mean(logits.argmax(-1) == ref["logits"].argmax(-1))),
}
print(json.dumps(out, indent=2))
Path(__file__).with_name(f"results_{Path(sys.argv[2]).stem}.json").write_text(json.dumps(out, indent=2) + "\n")
