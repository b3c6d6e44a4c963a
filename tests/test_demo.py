"""`bash run.sh demo`'s inputs: the committed planted history is what its script builds, the
planted fact occurs once, and run.sh asks the script's question of that file."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("make_history",
                                                  ROOT / "experiments/demo/make_history.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_demo_history_is_the_scripts_and_run_sh_asks_its_question():
    mod = _script()
    text = (ROOT / "experiments/data/genesis_planted.txt").read_text()
    assert text == mod.build()
    assert text.count(mod.ANSWER) == 1 and text.count(mod.PLANTED) == 1
    genesis = (ROOT / "experiments/data/kjv_genesis.txt").read_text()
    assert mod.ANSWER not in genesis
    assert text.index(mod.PLANTED) > 5_000  # far back: not in the last 512 tokens (~2k chars)
    assert len(text) - text.index(mod.PLANTED) > 40_000
    run_sh = (ROOT / "run.sh").read_text()
    assert "experiments/data/genesis_planted.txt" in run_sh and f'"{mod.QUESTION}"' in run_sh
