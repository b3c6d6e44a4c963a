"""Question-aware answering, one path for every policy (issue 16, item 1): the prompt each
policy feeds the base, the question raw in the MegaContext working context, chat=False as the
old plain prompt, `generate --question` for every policy, and the SmolLM2 chat template."""
import dataclasses

import jax
import numpy as np
import pytest

from mc_jax.base import base_model as bm
from mc_jax.base import chat as chat_mod
from mc_jax.base.tiny import ByteTokenizer, TinyBase
from mc_jax.core import working_context as wcm
from mc_jax.errors import InputError
from mc_jax.eval.policies import registry as pol
from mc_jax.eval.policies import window
from mc_jax.runtime import answer as answer_mod

CFG = bm.LlamaConfig.tiny(vocab_size=256, max_seq_len=1024)
W, K = 192, 32
# a fake ChatML template (not executed: `mc_jax.base.chat` recognises the ChatML form)
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
Q, PREFIX = "Which colour is the sky?", "The sky is"
# answers of the implementation before question-aware answering (greedy, 8 new tokens, the tiny
# base with PRNGKey(0)): a history of 300 ids + [10, 20, 30] (meanpool too: the question does
# not complete a block there), then 420 ids + ids 40..84 (window policies); both histories
# drawn in turn from default_rng(0)
OLD = {"full/0": "\x1e" * 8, "full/1": "T" * 8, "truncate/0": "\x1e" * 8,
       "truncate/1": "\ufffd" * 8, "sinks/0": "\x1e" * 8, "sinks/1": "\ufffd" * 8,
       "meanpool/0": "\x1e" * 8}


def _hist(n, seed):
    return np.random.default_rng(seed).integers(0, 256, n).astype(np.int32)


@pytest.fixture(scope="module")
def params():
    return bm.init_params(CFG, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def plain(params):
    return TinyBase(CFG, params, ByteTokenizer())


@pytest.fixture(scope="module")
def chat_model(params):
    tok = ByteTokenizer()
    tok.chat_template = CHATML
    return TinyBase(CFG, params, tok)


def test_chat_prompt_wraps_history_and_question():
    tok = ByteTokenizer()
    tok.chat_template = CHATML
    pr = chat_mod.build_prompt(tok, Q, answer_prefix=PREFIX)
    text = tok.decode(pr.around(tok.encode("HISTORY")))
    assert text == ("<|im_start|>user\nHISTORY\n\n" + Q + "<|im_end|>\n<|im_start|>assistant\n"
                    + PREFIX)
    assert tok.decode(pr.tail[pr.q_start:pr.q_end]) == Q and pr.chat
    # chat=False, or no template: [question || prefix] verbatim, nothing before the history
    for p in (chat_mod.build_prompt(tok, [1, 2], chat=False, answer_prefix=[3]),
              chat_mod.build_prompt(ByteTokenizer(), [1, 2], answer_prefix=[3])):
        assert p.head.size == 0 and p.tail.tolist() == [1, 2, 3] and not p.chat
    # a system default in the template is rendered as the template would
    tok.chat_template = CHATML.replace("{% for", "<|im_start|>system\nBe brief.<|im_end|>\n{% for")
    assert tok.decode(chat_mod.build_prompt(tok, Q).head).startswith(
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    tok.chat_template = "{{ messages }}"  # not ChatML, and no jinja2 to render it
    with pytest.raises(InputError, match="no-chat"):
        chat_mod.build_prompt(tok, Q)
    with pytest.raises(InputError, match="empty"):
        chat_mod.build_prompt(ByteTokenizer(), "")


@pytest.mark.parametrize("name", ["full", "truncate", "sinks"])
def test_window_policies_feed_head_window_question_prefix(chat_model, monkeypatch, name):
    seen = []
    real = window.greedy_answer
    monkeypatch.setattr(window, "greedy_answer",
                        lambda model, ids, *a, **k: (seen.append(np.asarray(ids)),
                                                     real(model, ids, *a, **k))[1])
    hist = _hist(400, 2)
    p = pol.make_policy(name, chat_model, W)
    out = p.answer(hist, Q, 4, answer_prefix=PREFIX)
    assert isinstance(out, str)
    tok = chat_model.tokenizer
    pr = chat_mod.build_prompt(tok, Q, answer_prefix=PREFIX)
    want = pr.around(p.keep(hist) if name != "full" else hist)
    np.testing.assert_array_equal(seen[-1], want)
    text = tok.decode(seen[-1])
    assert text.startswith("<|im_start|>user\n")
    assert text.endswith("\n\n" + Q + "<|im_end|>\n<|im_start|>assistant\n" + PREFIX)


def test_megacontext_answer_ingests_the_question_raw(chat_model, monkeypatch):
    seen = {}
    real = answer_mod.answer_after_wc

    def spy(s, tail, q, n, head_ids=()):
        seen.update(ids=list(s.ids), tail=list(tail), head=list(head_ids),
                    entries=wcm.to_host_entries(s.state.wc), state_blocks=int(s.state.blocks))
        return real(s, tail, q, n, head_ids=head_ids)

    monkeypatch.setattr(answer_mod, "answer_after_wc", spy)
    p = pol.make_policy("meanpool", chat_model, W)
    hist = _hist(1000, 3)  # 31 whole blocks + 8: the question's first block enters the tree
    assert isinstance(p.answer(hist, Q, 4, answer_prefix=PREFIX), str)
    pr = chat_mod.build_prompt(chat_model.tokenizer, Q, answer_prefix=PREFIX)
    # the base reads [head || WC of (history || first question block) || rest of the tail]
    assert seen["head"] == pr.head.tolist()
    assert seen["ids"] + seen["tail"] == hist.tolist() + pr.tail.tolist()
    n_tree = len(seen["ids"])
    assert n_tree == 1024 and n_tree > len(hist)  # focus ran with question tokens in the WC
    raw = set()
    for level, node, cost, _ in seen["entries"]:
        if level == 0:
            raw.update(range(node * K, node * K + cost))
    assert {1 for lv, *_ in seen["entries"] if lv > 0}  # the old history is gisted
    assert set(range(len(hist), n_tree)) <= raw  # the question's tokens in the tree are LOD0
    # the session's state is the history's again (the question is not history)
    s = next(iter(p._sessions.values()))
    assert len(s.ids) == len(hist) // K * K


def test_api_answer_restores_history(chat_model):
    import mc_jax

    mc = mc_jax.MegaContext.load(chat_model, budget=W, capacity_tokens=4096)
    mc.ingest(bytes(_hist(700, 4) % 128).decode("ascii"))
    before = (len(mc.session.ids), list(mc.pending), int(mc.session.state.blocks))
    a = mc.answer(Q, max_new_tokens=4, answer_prefix=PREFIX)
    assert isinstance(a, str)
    assert (len(mc.session.ids), list(mc.pending), int(mc.session.state.blocks)) == before
    assert mc.answer(Q, max_new_tokens=4, answer_prefix=PREFIX) == a  # pure
    assert isinstance(mc.answer(Q, max_new_tokens=4, chat=False), str)


def test_plain_prompt_reproduces_the_old_answers(plain):
    # the histories of the recorded answers came from one generator: rebuild them that way
    rng = np.random.default_rng(0)
    cases = [(rng.integers(0, 256, 300).astype(np.int32), [10, 20, 30]),
             (rng.integers(0, 256, 420).astype(np.int32), list(range(40, 85)))]
    for name in ("full", "truncate", "sinks", "meanpool"):
        p = pol.make_policy(name, plain, W)
        for i, (h, q) in enumerate(cases):
            key = f"{name}/{i}"
            if key in OLD:
                assert p.answer(h, q, 8, chat=False) == OLD[key], key
                assert p.answer(h, q, 8) == OLD[key], key  # no template: chat falls back


def test_generate_question_accepts_every_policy(plain, tmp_path, monkeypatch, capsys):
    from mc_jax.base import loading
    from mc_jax.cli import commands as cli
    from mc_jax.nets import io as nets_io

    tok = ByteTokenizer()
    tok.chat_template = CHATML
    model = dataclasses.replace(plain, tokenizer=tok)
    monkeypatch.setattr(loading, "load_base", lambda *a, **k: model)
    monkeypatch.setattr(nets_io, "default_checkpoint", lambda: tmp_path / "no-networks")
    doc = tmp_path / "doc.txt"
    doc.write_text("".join(f"Line {i}: the quick brown fox.\n" for i in range(30)))
    for name in ("full", "truncate", "sinks", "recency", "lens", "meanpool"):
        for extra in ([], ["--no-chat", "--answer-prefix", "Line"]):
            assert cli.main(["generate", "--input", str(doc), "--question", "Which line?",
                             "--budget", str(W), "--policy", name, "--max-new-tokens", "3"]
                            + extra) == 0, name
            out, err = capsys.readouterr()
            assert ("chat template" in err) == (not extra) and f"policy {name}" in err
            assert len(out.rstrip("\n")) <= 3
    assert cli.main(["generate", "--input", str(doc), "--question", "Which line?",
                     "--policy", "oracle"]) != 0
    assert "cannot answer" in capsys.readouterr().err
    assert cli.main(["generate", "--input", str(doc), "--policy", "full"]) != 0
    assert "--question only" in capsys.readouterr().err


@pytest.mark.smollm2
def test_smollm2_tokenizer_has_a_chatml_template():
    from mc_jax.base import loading

    tok = loading.load_tokenizer()
    assert tok.chat_template and chat_mod.chat_style(tok) == "chatml"
    start, end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    assert start is not None and end is not None
    pr = chat_mod.build_prompt(tok, "What is the pass key?", answer_prefix="The pass key is")
    ids = pr.around(tok.encode("Some history.")).tolist()
    assert ids.count(start) == 3 and ids.count(end) == 2  # system, user, assistant turns
    assert tok.decode(ids).startswith("<|im_start|>system\nYou are a helpful AI assistant")
    assert tok.decode(ids).endswith("<|im_start|>assistant\nThe pass key is")
    assert tok.encode("<|im_start|>") == [start]
