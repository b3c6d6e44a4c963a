"""Integrity of a training run's workdir (issue 18): ranges of flags and fields, one writer per
workdir, checkpoints verified on restore (random byte flips, truncations and deletions are all
detected), the run's config taken from the checkpoint itself, and metrics without repeats."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from mc_jax.cli.commands import main
from mc_jax.errors import ConfigError, CorruptFileError, McJaxError
from mc_jax.training import checkpoints, loop, models, step as train_step_mod
from mc_jax.training.config import load_config

CFG = load_config("tiny")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step run of the tiny config (checkpoints 2 and 4; metrics rows 1-4) to copy."""
    w = tmp_path_factory.mktemp("trained") / "run"
    loop.run(CFG, w, steps=4, progress=False, log=lambda s: None)
    return w


@pytest.fixture(scope="module")
def template():
    base_cfg, base_params, _ = models.load_frozen_base(CFG)
    m, g, l = models.build_models(CFG, base_cfg, base_params)
    return train_step_mod.init_state(m, g, l)


@pytest.fixture(scope="module")
def trained_leaves(trained, template):
    """The trained run's step-4 state (restored once; the tests below compare against it)."""
    return _leaves(_state(trained, template))


def _copy(src, tmp_path, name="w"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    (dst / ".lock").unlink(missing_ok=True)
    return dst


def _state(workdir, template, step=None):
    return checkpoints.restore_checkpoint(checkpoints.manager(workdir, CFG), template, step)[0]


def _leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves((state.gist, state.lens, state.opt))]


def _steps(workdir):
    return [json.loads(x)["step"] for x in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("key,value", [("keep_checkpoints", "0"), ("batch_size", "0"),
                                       ("checkpoint_every", "0"), ("steps", "-1"),
                                       ("lr", "nan"), ("seed", "-1"), ("horizon", "0")])
def test_config_fields_out_of_range_are_refused_by_name(key, value):
    with pytest.raises(ConfigError, match=f"{key}={value}.*allowed {key} >"):
        load_config("tiny", [f"{key}={value}"])


@pytest.mark.parametrize("flags,name", [(["--steps", "-1"], "--steps"),
                                        (["--devices", "0"], "--devices"),
                                        (["--devices", "9"], "--devices"),
                                        (["--set", "keep_checkpoints=0"], "keep_checkpoints")])
def test_train_flags_out_of_range_exit_1_naming_the_flag_and_write_nothing(tmp_path, capsys,
                                                                            flags, name):
    w = tmp_path / "w"
    assert main(["train", "--config", "tiny", "--workdir", str(w), "--no-progress",
                 *flags]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mc-jax: error:") and name in err and "Traceback" not in err
    assert not w.exists()


def test_a_second_writer_is_refused_and_a_killed_runs_lock_does_not_stick(trained, tmp_path,
                                                                          template):
    """A run holding the workdir (another process) makes a second `train` fail by name, with
    config.json and metrics.jsonl untouched; once that process is killed (-9) the workdir is
    usable again."""
    w = _copy(trained, tmp_path)
    before = {f: (w / f).read_bytes() for f in ("config.json", "metrics.jsonl")}
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from mc_jax.training.loop import workdir_lock\n"
         f"with workdir_lock(Path({str(w)!r})):\n print('locked', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=f"in use by another .*pid {holder.pid}"):
            loop.run(CFG.replace(lr=0.01), w, steps=6, resume=True, progress=False)
        assert {f: (w / f).read_bytes() for f in before} == before
    finally:
        holder.kill()
        holder.wait()
    res = loop.run(CFG, w, steps=4, resume=True, progress=False, log=lambda s: None)
    assert res["steps"] == 4


def _flip(f, offset, n=1):
    b = bytearray(f.read_bytes())
    for i in range(offset, min(offset + n, len(b))):
        b[i] ^= 0xFF
    f.write_bytes(bytes(b))


def test_a_flipped_byte_is_reported_by_step_and_the_previous_step_offered(trained, tmp_path,
                                                                          template,
                                                                          trained_leaves):
    w = _copy(trained, tmp_path)
    data = max((f for f in (w / "checkpoints/4/state").rglob("*") if f.is_file()),
               key=lambda f: f.stat().st_size)
    _flip(data, data.stat().st_size // 2)
    with pytest.raises(CorruptFileError, match=r"step 4 .* damaged: file state/.*sha256.*"
                                               r"Nothing was deleted.*newest intact step is 2"):
        loop.run(CFG, w, steps=4, resume=True, progress=False)
    assert data.is_file() and (w / "checkpoints/2").is_dir()
    # doing what the message says continues from step 2, exactly as the run did
    shutil.move(w / "checkpoints/4", w / "damaged-step-4")
    loop.run(CFG, w, steps=4, resume=True, progress=False, log=lambda s: None)
    for a, b in zip(_leaves(_state(w, template)), trained_leaves):
        np.testing.assert_array_equal(a, b)


def test_non_finite_values_in_a_checkpoint_are_refused(tmp_path, template):
    """A state that a run never saves (the step refuses non-finite updates): caught on restore
    even where the files match their manifest."""
    mgr = checkpoints.manager(tmp_path, CFG)
    bad = template.replace(step=template.step + 2,
                           lens=jax.tree.map(lambda x: x * np.inf, template.lens))
    checkpoints.save_checkpoint(mgr, bad, {"kind": "synthetic", "next_index": 2}, {})
    with pytest.raises(CorruptFileError, match="step 2 .*non-finite values in"):
        checkpoints.restore_checkpoint(checkpoints.manager(tmp_path, CFG), template)


def test_random_corruptions_of_a_checkpoint_are_always_detected(trained, tmp_path, template,
                                                                slow, trained_leaves):
    """Property: a byte flip, a truncation or a deletion of any file of the latest step makes the
    resume stop with an error naming the step; the only corruption that may pass is one of the
    manifest itself that leaves the arrays as saved (then the restored state is the saved one)."""
    rng = np.random.default_rng(18)
    want = trained_leaves
    for trial in range(40 if slow else 12):
        w = _copy(trained, tmp_path, f"t{trial}")
        files = sorted(f for f in (w / "checkpoints/4").rglob("*") if f.is_file())
        f = files[rng.integers(len(files))]
        op = ("flip", "truncate", "delete")[rng.integers(3)]
        size = f.stat().st_size
        if op == "flip" and size:
            _flip(f, int(rng.integers(size)), int(rng.integers(1, 65)))
        elif op == "truncate" and size:
            f.write_bytes(f.read_bytes()[: int(rng.integers(size))])
        else:
            f.unlink()
        what = f"{op} {f.relative_to(w)}"
        try:
            loop.run(CFG, w, steps=4, resume=True, progress=False, log=lambda s: None)
        except McJaxError as e:
            assert "step 4" in str(e), (what, e)
            continue
        assert f.name == checkpoints.MANIFEST, f"{what} was not detected"
        for a, b in zip(_leaves(_state(w, template)), want):
            np.testing.assert_array_equal(a, b, err_msg=what)


def test_resume_compares_the_config_stored_in_the_checkpoint(trained, tmp_path):
    """Without config.json the checkpoint's own config still decides; a shape change is refused
    before Orbax sees it, and the message does not advise deleting anything."""
    w = _copy(trained, tmp_path)
    (w / "config.json").unlink()
    with pytest.raises(ConfigError, match="checkpoint step 4's meta; differs in: lr"):
        loop.run(CFG.replace(lr=0.1), w, steps=6, resume=True, progress=False)
    with pytest.raises(ConfigError, match="differs in: gist_width") as e:
        loop.run(CFG.replace(gist_width=32), w, steps=6, resume=True, progress=False)
    assert "delete" not in str(e.value) and (w / "checkpoints/4").is_dir()
    logs = []
    loop.run(CFG, w, steps=4, resume=True, n_devices=4, progress=False, log=logs.append)
    assert any("no longer bit-identical" in s for s in logs), logs


def test_resume_with_set_steps_equals_resume_with_steps_and_logs_each_step_once(trained,
                                                                                tmp_path,
                                                                                template,
                                                                                trained_leaves):
    """`--set steps=4` and `--steps 4` resume alike, and bit-identically to the uninterrupted run
    (the schedule keeps the run's steps=12); a run killed after logging steps 3-4 but before
    saving step 4 (and a row torn half-way) logs each step once after its resume."""
    want = trained_leaves
    for name, cfg, steps in (("flag", CFG, 4), ("set", CFG.replace(steps=4), None)):
        w = _copy(trained, tmp_path, name)
        shutil.rmtree(w / "checkpoints/4")  # the kill: rows 3-4 logged, step 4 never saved
        with open(w / "metrics.jsonl", "a") as fh:
            fh.write('{"loss": 1.')
        res = loop.run(cfg, w, steps=steps, resume=True, progress=False, log=lambda s: None)
        assert res["steps"] == 4 and _steps(w) == [1, 2, 3, 4], name
        assert json.loads((w / "config.json").read_text())["steps"] == CFG.steps
        for a, b in zip(_leaves(_state(w, template)), want):
            np.testing.assert_array_equal(a, b, err_msg=name)
    # fewer steps than the run has made: accepted, nothing to train
    assert loop.run(CFG.replace(steps=2), w, resume=True, progress=False,
                    log=lambda s: None)["steps"] == 4
