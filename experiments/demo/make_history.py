"""Builds experiments/data/genesis_planted.txt, the history `bash run.sh demo` reads: the first
~48,000 characters of Genesis (KJV, ~12k SmolLM2 tokens: 24x the demo's 512-slot working context
and more than the base's 8,192-token context) with one invented verse planted after verse 61, a
fact the base cannot know from pretraining.

    python experiments/demo/make_history.py
"""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PLANTED = ("And the keeper of the gate of the garden was named Tobiah, and the number of the "
           "gate was 7194382.")
QUESTION = "What was the number of the gate of the garden?"
ANSWER = "7194382"


def build(chars: int = 48_000, after_line: int = 60) -> str:
    lines = (ROOT / "experiments/data/kjv_genesis.txt").read_text().split("\n")
    out, n = [], 0
    for i, line in enumerate(lines):
        out.append(line)
        n += len(line) + 1
        if i == after_line:
            out.append(PLANTED)
        if n > chars:
            break
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    path = ROOT / "experiments/data/genesis_planted.txt"
    path.write_text(build())
    print(path)
