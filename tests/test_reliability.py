"""Faults: a fit killed with SIGKILL resumes to the uninterrupted result; checkpoint writes survive
kills; divergence keeps the last good checkpoint; no memory growth over repeated calls."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

from captum_inn.training import CheckpointError, load_checkpoint, train_loop
from captum_inn.training.checkpoint import strip_prefix

torch.set_num_threads(1)

FIT_SCRIPT = textwrap.dedent(
    """
    import signal, sys, torch
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C as in a terminal, whatever the runner set
    torch.set_num_threads(1)
    from captum_inn.autoencoders import ConvAutoencoder
    from captum_inn.models import SmallCNN
    from captum_inn.training import fit_invariances, save_invariance_inn

    out, steps = sys.argv[1], int(sys.argv[2])
    layers = sys.argv[3].split(",") if len(sys.argv) > 3 else ["logits"]  # then side by side, two at a time
    torch.manual_seed(0)
    model, ae = SmallCNN(width=4).eval(), ConvAutoencoder((3, 32, 32), latent_dim=6, width=4).eval()
    images = torch.rand(96, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    inns = fit_invariances(model, layers, ae, images, steps=steps, checkpoint_every=25, checkpoint_dir=out,
                           progress=False, n_blocks=2, hidden=16, embed_dim=8, batch_size=32, workers=2)
    for layer in layers:
        inn = inns[layer] if isinstance(inns, dict) else inns
        save_invariance_inn(out + ("/final.safetensors" if len(layers) == 1 else f"/final_{layer}.safetensors"), inn)
    """
)


def _run(script: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.Popen([sys.executable, str(script), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _step(checkpoint: Path) -> int:
    return int(load_checkpoint(checkpoint)[1]["step"])


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_fit_killed_with_sigkill_resumes_to_the_uninterrupted_result(tmp_path):
    script = tmp_path / "fit.py"
    script.write_text(FIT_SCRIPT)
    steps = "600"  # the kill lands at step 100 or soon after: 500 steps of margin before the fit would end
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    checkpoint = killed / "invariance_logits.safetensors"

    proc = _run(script, str(killed), steps)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if checkpoint.exists() and _step(checkpoint) >= 100:
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"the fit ended before it could be killed:\n{proc.communicate()[0]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    at_kill = _step(checkpoint)
    assert 100 <= at_kill < int(steps)
    assert not (killed / "final.safetensors").exists()
    cache_file = killed / "features.safetensors"
    cache_written = cache_file.stat().st_mtime_ns

    resumed = _run(script, str(killed), steps)
    uninterrupted = _run(script, str(reference), steps)
    for p in (resumed, uninterrupted):
        output = p.communicate(timeout=300)[0]
        assert p.returncode == 0, output
    assert cache_file.stat().st_mtime_ns == cache_written  # the resumed fit reused the cached features
    a = strip_prefix(load_checkpoint(killed / "final.safetensors")[0], "model.")
    b = strip_prefix(load_checkpoint(reference / "final.safetensors")[0], "model.")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name].float(), b[name].float(), atol=1e-5), name
    history = load_checkpoint(checkpoint)[1]["history"]
    assert len(history) == int(steps)  # the step counter continued where the kill left it


@pytest.mark.skipif(not hasattr(signal, "SIGINT"), reason="needs POSIX signals")
def test_ctrl_c_on_fits_side_by_side_keeps_each_ones_last_step_and_says_how_to_resume(tmp_path):
    """Ctrl-C on ``fit_invariances`` training two layers in threads: the main thread's
    KeyboardInterrupt stops both at their next step; each writes that step, and the message says
    to run the call again (it was a bare KeyboardInterrupt from a thread wait, with up to
    ``checkpoint_every - 1`` steps of each fit lost). The rerun ends as an uninterrupted fit."""
    script = tmp_path / "fit.py"
    script.write_text(FIT_SCRIPT)
    steps, layers = "600", "relu3,logits"
    stopped, reference = tmp_path / "stopped", tmp_path / "reference"
    checkpoints = [stopped / f"invariance_{layer}.safetensors" for layer in layers.split(",")]

    proc = _run(script, str(stopped), steps, layers)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if all(c.exists() and _step(c) >= 50 for c in checkpoints):
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"the fit ended before it could be interrupted:\n{proc.communicate()[0]}"
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 1, output
    assert "KeyboardInterrupt: INNs for 2 layers stopped, each after a whole step, which its checkpoint holds" in output
    assert "run the same call again to resume" in output
    at_stop = [_step(c) for c in checkpoints]
    assert all(50 <= step < int(steps) for step in at_stop), at_stop

    resumed = _run(script, str(stopped), steps, layers)
    uninterrupted = _run(script, str(reference), steps, layers)
    for p in (resumed, uninterrupted):
        output = p.communicate(timeout=300)[0]
        assert p.returncode == 0, output
    for layer in layers.split(","):
        a = strip_prefix(load_checkpoint(stopped / f"final_{layer}.safetensors")[0], "model.")
        b = strip_prefix(load_checkpoint(reference / f"final_{layer}.safetensors")[0], "model.")
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), (layer, name)


WRITE_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from captum_inn.training import save_checkpoint
    path = sys.argv[1]
    for i in range(1, 100000):
        save_checkpoint(path, {"w": torch.full((1 << 18,), float(i))}, {"kind": "probe", "i": i})
    """
)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
@pytest.mark.parametrize("delay", [0.8, 1.3, 1.9])
def test_kill_during_checkpoint_writes_leaves_a_whole_checkpoint(tmp_path, delay):
    script = tmp_path / "write.py"
    script.write_text(WRITE_SCRIPT)
    path = tmp_path / "probe.safetensors"
    proc = _run(script, str(path))
    deadline = time.monotonic() + 60
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(delay)  # killed at some point of its write loop
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    tensors, meta = load_checkpoint(path, kind="probe")  # whole: the previous or the latest write
    assert meta["i"] >= 1 and torch.all(tensors["w"] == float(meta["i"]))
    # a later write removes the temporary file a killed writer may have left
    from captum_inn.training import save_checkpoint

    save_checkpoint(path, {"w": torch.zeros(2)}, {"kind": "probe", "i": 0})
    assert not list(tmp_path.glob(".probe.safetensors.*.tmp"))


def test_a_checkpoint_write_removes_only_its_own_stale_temporaries(tmp_path, monkeypatch):
    """The clean-up glob was built from the raw file name: ``a[b]`` matched ``ab``'s temporaries and
    ``*`` every checkpoint's; and a second writer of the same path removed the first one's
    temporary mid-write (its rename then failed)."""
    from captum_inn.training import save_checkpoint

    others = [tmp_path / ".ab.safetensors.0123456789abcdef.tmp", tmp_path / ".zz.safetensors.0123456789abcdef.tmp"]
    own = tmp_path / ".a[b].safetensors.0123456789abcdef.tmp"  # left by a killed writer
    for stale in (*others, own):
        stale.write_bytes(b"partial")
    for name in ("a[b].safetensors", "*.safetensors", "?.safetensors"):
        save_checkpoint(tmp_path / name, {"w": torch.ones(2)}, {"kind": "probe"})
    assert all(p.exists() for p in others) and not own.exists()
    if os.name != "posix":
        return
    real_fsync, second = os.fsync, []

    def fsync_then_second_writer(fd):  # a second writer of the same path runs while the first is mid-write
        real_fsync(fd)
        if not second:
            second.append("started")
            save_checkpoint(tmp_path / "same.safetensors", {"w": torch.zeros(2)}, {"kind": "probe"})

    monkeypatch.setattr(os, "fsync", fsync_then_second_writer)
    save_checkpoint(tmp_path / "same.safetensors", {"w": torch.ones(2)}, {"kind": "probe"})
    monkeypatch.undo()
    assert second and torch.equal(load_checkpoint(tmp_path / "same.safetensors", kind="probe")[0]["w"], torch.ones(2))
    assert not list(tmp_path.glob(".same.safetensors.*.tmp"))


@pytest.mark.skipif(os.name != "posix", reason="needs flock")
def test_a_clean_up_running_at_the_rename_leaves_the_temporary_being_renamed(tmp_path, monkeypatch):
    """The temporary is renamed while still open, and so still locked: renamed after closing it,
    another writer's clean-up of stale temporaries could remove it first, and the rename failed."""
    from captum_inn.training import save_checkpoint
    from captum_inn.training.checkpoint import _remove_stale_temporaries

    real_replace = os.replace

    def another_writer_cleans_up_first(source, target):
        _remove_stale_temporaries(Path(target))
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", another_writer_cleans_up_first)
    path = tmp_path / "fit.safetensors"
    save_checkpoint(path, {"w": torch.ones(2)}, {"kind": "probe"})
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path, kind="probe")[0]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["fit.safetensors"]


def test_a_checkpoint_write_leaves_files_that_only_look_like_its_temporaries(tmp_path):
    """Its temporaries end in exactly 16 hex digits: a user's ``.fit.safetensors.backup.tmp`` or the
    temporary of ``fit.safetensors.x`` is not one of them and stays."""
    from captum_inn.training import save_checkpoint

    others = [tmp_path / ".fit.safetensors.backup.tmp", tmp_path / ".fit.safetensors.x.0123456789abcdef.tmp"]
    for other in others:
        other.write_bytes(b"not this file's")
    save_checkpoint(tmp_path / "fit.safetensors", {"w": torch.ones(2)}, {"kind": "probe"})
    assert all(p.exists() for p in others)


def test_a_full_disk_names_the_checkpoint_and_keeps_the_previous_one(tmp_path, monkeypatch):
    """"[Errno 28] No space left on device" alone: neither the path nor which fit."""
    import errno

    from captum_inn.training import save_checkpoint

    path = tmp_path / "fit.safetensors"
    save_checkpoint(path, {"w": torch.ones(2)}, {"kind": "probe"})

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match=r"No space left on device, writing the checkpoint '.*fit.safetensors' \(.* bytes; "
                                      r"the previous checkpoint there, if any, is intact\)") as raised:
        save_checkpoint(path, {"w": torch.zeros(2)}, {"kind": "probe"})
    monkeypatch.undo()
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(path)
    assert torch.equal(load_checkpoint(path, kind="probe")[0]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["fit.safetensors"]


def test_divergence_keeps_the_last_good_checkpoint(tmp_path):
    module = torch.nn.Linear(3, 1)
    calls = {"n": 0}

    def loss_fn(generator):
        calls["n"] += 1
        x = torch.randn(8, 3, generator=generator)
        loss = module(x).pow(2).mean()
        return loss * float("nan") if calls["n"] > 12 else loss

    path = tmp_path / "fit.safetensors"
    with pytest.raises(FloatingPointError, match=r"in step 13\. Lower the learning rate"):
        train_loop(module, loss_fn, steps=40, lr=1e-2, checkpoint=str(path), checkpoint_every=5, progress=False)
    tensors, meta = load_checkpoint(path)
    assert meta["step"] == 10 and all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())
    # the NaN step ran its backward but the optimiser never applied it
    assert all(bool(torch.isfinite(p).all()) for p in module.parameters())


def _interruptible_fit(path, steps=30, callback=None):
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

    def loss_fn(generator):
        x = torch.randn(16, 3, generator=generator)
        return (module(x) - x.sum(1, keepdim=True).sin()).pow(2).mean()

    history = train_loop(module, loss_fn, steps=steps, lr=1e-2, schedule="cosine", checkpoint=str(path),
                         checkpoint_every=10, callback=callback, progress=False)
    return module, history


def test_a_cosine_fit_resumed_with_more_steps_warns_that_its_rate_jumps(tmp_path):
    """A finished cosine fit of 30 steps (rate 1% of lr) resumed with steps=60 went on at the rate of
    step 30 of 60 (about half of lr): a warm restart taken silently for the rest of one schedule."""
    path = tmp_path / "fit.safetensors"
    _interruptible_fit(path, steps=30)
    assert load_checkpoint(path)[1]["total_steps"] == 30
    with pytest.warns(UserWarning, match=r"holds 30 steps of a cosine schedule over 30 steps; this fit's is over 60, "
                                         r"so the rate jumps from 0.0001 to 0.00505 at step 30") as info:
        _interruptible_fit(path, steps=60)
    assert info[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _interruptible_fit(path, steps=60)  # finished at 60 of 60: nothing resumes
        _interruptible_fit(tmp_path / "other.safetensors", steps=20)


@pytest.fixture
def python_sigint_handler():
    """Python's own Ctrl-C handler, which the fit replaces for its steps (a runner may have set another)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_ends_the_step_writes_its_checkpoint_and_a_rerun_resumes_to_the_same_fit(tmp_path,
                                                                                       python_sigint_handler):
    """Ctrl-C killed the fit mid-step and lost the steps since the last checkpoint (up to 499 by
    default), with a bare traceback. Now the step under way ends, the checkpoint is written, and the
    KeyboardInterrupt says how to resume; the same call resumes there and ends as an uninterrupted fit."""
    reference, reference_history = _interruptible_fit(tmp_path / "reference.safetensors")
    path = tmp_path / "fit.safetensors"

    def press_ctrl_c(step, module):
        if step == 13:
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(KeyboardInterrupt, match=r"stopped after step 13 of 30, which .*fit.safetensors' holds: run "
                                                r"the same call again to resume"):
        _interruptible_fit(path, callback=press_ctrl_c)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    assert load_checkpoint(path)[1]["step"] == 13
    resumed, history = _interruptible_fit(path)
    assert history == reference_history
    for mine, theirs in zip(resumed.parameters(), reference.parameters()):
        assert torch.equal(mine, theirs)


def test_a_second_ctrl_c_stops_at_once(tmp_path, python_sigint_handler):
    path = tmp_path / "fit.safetensors"

    def press_twice(step, module):
        if step == 13:
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(KeyboardInterrupt) as raised:
        _interruptible_fit(path, callback=press_twice)
    assert not str(raised.value)  # Python's own, from the handler: no step was finished for it
    assert load_checkpoint(path)[1]["step"] == 10
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_fit_cancelled_beside_a_failed_or_interrupted_sibling_keeps_its_last_step(tmp_path):
    """Fits side by side (fit_invariances with several layers) stop at their next step once a sibling
    failed or the caller pressed Ctrl-C: each writes that step's checkpoint before it stops."""
    from captum_inn.training.loop import FitCancelled

    path = tmp_path / "fit.safetensors"

    def cancelled(step, module):
        if step == 7:
            raise FitCancelled()

    with pytest.raises(FitCancelled):
        _interruptible_fit(path, callback=cancelled)
    assert load_checkpoint(path)[1]["step"] == 7


def test_resume_refuses_a_checkpoint_of_another_kind(tmp_path):
    path = tmp_path / "fit.safetensors"
    module = torch.nn.Linear(2, 1)

    def loss_fn(generator):
        return module(torch.randn(4, 2, generator=generator)).pow(2).mean()

    train_loop(module, loss_fn, steps=2, lr=1e-3, checkpoint=str(path), progress=False,
               meta={"kind": "autoencoder", "config": {}})
    with pytest.raises(CheckpointError, match="expected 'invariance_inn'"):
        train_loop(module, loss_fn, steps=4, lr=1e-3, checkpoint=str(path), progress=False,
                   meta={"kind": "invariance_inn", "config": {}})


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads RSS from /proc")
def test_repeated_attribute_calls_do_not_grow_memory():
    from captum_inn import LayerInvariance
    from captum_inn.autoencoders import ConvAutoencoder
    from captum_inn.inn import ConditionalINN
    from captum_inn.models import SmallCNN

    torch.manual_seed(0)
    model, ae = SmallCNN(width=8).eval(), ConvAutoencoder((3, 32, 32), latent_dim=8, width=8).eval()
    inn = ConditionalINN(8, (10,), n_blocks=2, hidden=16)
    inn(torch.randn(16, 8), torch.randn(16, 10))
    explainer = LayerInvariance(model, "logits", inn, ae)
    x = torch.rand(4, 3, 32, 32)
    for _ in range(30):  # warm-up: allocator pools and caches settle
        explainer.attribute(x, n_samples=4)
    before = _rss_bytes()
    for _ in range(200):
        explainer.attribute(x, n_samples=4)
    growth = _rss_bytes() - before
    # tolerance 8 MiB over 200 calls; keeping just one (4, 3, 32, 32) map per call would add 9.4 MiB
    assert growth < 8 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 200 calls"


def _small_fit(tmp_path, steps=4, **kwargs):
    """A linear module fitted ``steps`` steps with a checkpoint every two; returns (module, loss_fn, path)."""
    torch.manual_seed(0)
    module = torch.nn.Linear(3, 1)

    def loss_fn(generator):
        return module(torch.randn(8, 3, generator=generator)).pow(2).mean()

    path = tmp_path / "fit.safetensors"
    train_loop(module, loss_fn, steps=steps, lr=0.05, checkpoint=str(path), checkpoint_every=2, progress=False,
               **kwargs)
    return module, loss_fn, path


def _edited(path, edit):
    """The checkpoint at ``path`` rewritten after ``edit(tensors, meta)``, as a broken tool might."""
    from captum_inn.training.checkpoint import save_checkpoint

    tensors, meta = load_checkpoint(path)
    edit(tensors, meta)
    save_checkpoint(path, tensors, meta)


def _drop_state(name):
    def edit(tensors, meta):
        for key in [k for k in tensors if k.startswith(name)]:
            del tensors[key]
    return edit


@pytest.mark.parametrize("edit, message", [
    # set_state failed only after the module had taken the checkpoint's weights (and was left in train mode)
    (lambda t, m: t.update({"rng.generator": t["rng.generator"][:100].clone()}), r"'rng.generator' is a torch.uint8 tensor of shape \(100,\)"),
    (lambda t, m: t.update({"rng.global.0": t["rng.global.0"].float()}), r"'rng.global.0' is a torch.float32 tensor"),
    # the step failed later on a bare KeyError, or a removed state restarted silently
    (_drop_state("optim.0.exp_avg_sq"), r"parameter 0 has no 'exp_avg_sq'"),
    (_drop_state("optim.1."), r"the optimiser state holds parameters \[0\], the file lists \[0, 1\]"),
    (lambda t, m: t.update({"optim.0.exp_avg": t["optim.0.exp_avg"][:, :2].clone()}), r"'exp_avg' of parameter 0 is \(1, 2\)"),
    # a negative second moment: its square root is NaN, and the first step wrote NaN into the weight
    (lambda t, m: t.update({"optim.0.exp_avg_sq": -1 - t["optim.0.exp_avg_sq"]}),
     r"'exp_avg_sq' of parameter 0 holds NaN, infinite or negative values"),
    # load_state_dict cast integers into the float weights without a word
    (lambda t, m: t.update({"model.weight": (t["model.weight"] * 100).long()}), r"'weight' as torch.int64 where the module keeps torch.float32"),
    # an edited step or history: more losses than steps, or a string read as a list of characters
    (lambda t, m: m.update(step=2), r"loss history \(4 entries\) is not one finite number for each of its 2 steps"),
    (lambda t, m: m.update(history="abcd"), r"loss history \(str\)"),
])
def test_a_damaged_fit_state_is_refused_before_anything_is_loaded(tmp_path, edit, message):
    _, loss_fn, path = _small_fit(tmp_path)
    _edited(path, edit)
    torch.manual_seed(1)
    fresh = torch.nn.Linear(3, 1).eval()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(CheckpointError, match=message):
        train_loop(fresh, loss_fn, steps=8, lr=0.05, checkpoint=str(path), checkpoint_every=2, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items()) and not fresh.training


@pytest.mark.parametrize("changed, named", [({"lr": 0.5}, "lr: 0.05 in the checkpoint, 0.5 now"),
                                            ({"weight_decay": 0.3}, "weight_decay: 0.0 in the checkpoint, 0.3 now"),
                                            ({"betas": (0.5, 0.6)}, "betas"),
                                            ({"grad_clip": None}, "grad_clip: 10.0 in the checkpoint, None now")])
def test_a_resume_with_other_optimiser_settings_is_refused(tmp_path, changed, named):
    """Adam's saved rate and decay overrode the new ones (a constant schedule), or mixed with them
    (a cosine one), whatever the call asked for."""
    module, loss_fn, path = _small_fit(tmp_path)
    with pytest.raises(CheckpointError, match=r"other train_loop settings \(" + named.replace("(", r"\(")):
        train_loop(module, loss_fn, steps=8, checkpoint=str(path), progress=False, **{"lr": 0.05, **changed})
    assert len(train_loop(module, loss_fn, steps=8, lr=0.05, checkpoint=str(path), progress=False)) == 8


def test_nonfinite_gradients_of_a_finite_loss_stop_the_fit_before_the_update(tmp_path):
    """A sqrt at 0 gives a finite loss and NaN gradients: Adam wrote NaN into every weight, and the
    checkpoint of that step kept them, so no resume could get past it."""
    torch.manual_seed(0)
    module = torch.nn.Linear(3, 1)
    calls = {"n": 0}

    def loss_fn(generator):
        calls["n"] += 1
        loss = module(torch.randn(8, 3, generator=generator)).pow(2).mean()
        return loss + torch.sqrt(module.bias.sum() * 0) if calls["n"] == 4 else loss

    path = tmp_path / "fit.safetensors"
    with pytest.raises(FloatingPointError, match=r"the gradients became nan in step 4 \(the loss, [0-9.]+, is finite\)"):
        train_loop(module, loss_fn, steps=10, lr=0.05, checkpoint=str(path), checkpoint_every=4, progress=False)
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert not path.exists()  # the step-4 checkpoint was never written
    for grad_clip in (None, 1.0):  # the norm is checked with and without clipping
        calls["n"] = 0
        with pytest.raises(FloatingPointError, match="the gradients became nan"):
            train_loop(module, loss_fn, steps=10, lr=0.05, grad_clip=grad_clip, progress=False)


def test_train_loop_refuses_a_grad_clip_or_seed_it_cannot_use():
    module = torch.nn.Linear(3, 1)
    loss_fn = lambda g: module(torch.randn(8, 3, generator=g)).pow(2).mean()  # noqa: E731
    for bad in (-1.0, 0, float("nan"), float("inf")):  # -1 made every step one of gradient ascent
        with pytest.raises(ValueError, match="`grad_clip`"):
            train_loop(module, loss_fn, steps=2, lr=0.05, grad_clip=bad, progress=False)
    with pytest.raises(TypeError, match="`grad_clip`"):
        train_loop(module, loss_fn, steps=2, lr=0.05, grad_clip="a", progress=False)
    with pytest.raises(TypeError, match="`seed`"):  # 1.5 was taken as 1
        train_loop(module, loss_fn, steps=2, lr=0.05, seed=1.5, progress=False)


def test_the_update_applies_gradients_clipped_to_grad_clip():
    """grad_clip bounds the norm of the gradients Adam applies (read in the callback, after the step):
    a loop that computed the norm without clipping to it trained on the raw gradients, silently."""
    from helpers_training import split_regression

    for grad_clip in (None, 0.05):
        net, batch_fn, loss_of = split_regression()
        norms = []

        def callback(step, module, norms=norms):
            norms.append(float(torch.cat([p.grad.flatten() for p in module.parameters()]).norm()))

        train_loop(net, loss_of, batch_fn=batch_fn, steps=4, lr=1e-3, grad_clip=grad_clip, progress=False,
                   callback=callback)
        if grad_clip is None:
            assert min(norms) > 1.0  # the raw gradients are far larger than the bound below
        else:
            assert max(norms) <= grad_clip * (1 + 1e-5)


def test_a_resume_with_one_step_fewer_than_the_checkpoint_holds_is_refused(tmp_path):
    """`steps` counts every step of the fit: a checkpoint holding more is refused, down to one step
    more (a resume with steps = held - 1 returned the longer fit as if it had `steps` steps)."""
    module = torch.nn.Linear(3, 1)
    loss_fn = lambda g: module(torch.randn(8, 3, generator=g)).pow(2).mean()  # noqa: E731
    path = str(tmp_path / "fit.safetensors")
    train_loop(module, loss_fn, steps=4, lr=0.05, checkpoint=path, progress=False)
    with pytest.raises(ValueError, match="already holds 4 steps, more than `steps`=3"):
        train_loop(module, loss_fn, steps=3, lr=0.05, checkpoint=path, progress=False)
    assert len(train_loop(module, loss_fn, steps=4, lr=0.05, checkpoint=path, progress=False)) == 4  # equal: read back


def test_a_resume_by_another_number_of_processes_does_not_replay_the_first_steps_draws(tmp_path):
    """A checkpoint of a fit with other processes holds no generator state for this one: the minibatch
    generator and torch's global one (dropout) are reseeded for the steps from the resume on, with the
    step in the seed, so the resumed steps do not draw the batches and masks of the fit's first steps."""
    from captum_inn.training import save_checkpoint

    module = torch.nn.Linear(3, 1)
    draws = []

    def loss_fn(generator):
        rows = torch.randint(1000, (4,), generator=generator)
        draws.append((rows.tolist(), torch.rand(3).tolist()))  # the minibatch stream, the global (dropout) one
        return module(rows.float()[:, None].expand(4, 3) / 1000).pow(2).mean()

    path = str(tmp_path / "fit.safetensors")
    train_loop(module, loss_fn, steps=2, lr=0.01, checkpoint=path, progress=False)
    first = list(draws)
    tensors, meta = load_checkpoint(path)
    save_checkpoint(path, tensors, {**meta, "world_size": 2})  # as if written under torchrun by two processes
    draws.clear()
    with pytest.warns(UserWarning, match="written by a fit with 2 processes"):
        train_loop(module, loss_fn, steps=4, lr=0.01, checkpoint=path, progress=False)
    assert len(draws) == 2
    for (rows, masks), (first_rows, first_masks) in zip(draws, first):
        assert rows != first_rows and masks != first_masks


def test_a_checkpoint_this_user_cannot_read_is_named_so(tmp_path, monkeypatch):
    """safetensors reports a file it may not open as "No such file or directory", and the message
    called a healthy checkpoint truncated or corrupted and said to delete it."""
    import builtins

    import captum_inn.training.checkpoint as checkpoint

    _, _, path = _small_fit(tmp_path)

    def refused(file, *args, **kwargs):
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied", str(file))
        return builtins.open(file, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "open", refused, raising=False)
    with pytest.raises(CheckpointError, match=r"cannot be read \(Permission denied\); give this user read access"):
        load_checkpoint(path)


def test_a_device_that_cannot_be_used_is_not_called_a_corrupted_checkpoint(tmp_path):
    """load_checkpoint(map_location="cuda") without a GPU said the healthy file was truncated or
    corrupted and to delete it; "cpu:0" was refused the same way."""
    _, _, path = _small_fit(tmp_path)
    tensors, _ = load_checkpoint(path, map_location="cpu:0")
    assert tensors and all(t.device.type == "cpu" for t in tensors.values())
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"`map_location` is 'cuda', but PyTorch sees no CUDA GPU"):
            load_checkpoint(path, map_location="cuda")
    with pytest.raises(CheckpointError, match=r"is a folder, not a checkpoint file: pass a file in it"):
        load_checkpoint(tmp_path)
    from captum_inn.training import save_checkpoint

    with pytest.raises(IsADirectoryError, match=r"is a folder; pass a file path in it, e.g. '.*name.safetensors'"):
        save_checkpoint(tmp_path, {"w": torch.ones(2)}, {"kind": "x"})


def test_loading_networks_leaves_the_callers_random_stream(tmp_path):
    """The loaders built each network with fresh random weights (then replaced by the file's), drawn
    from the caller's global generator."""
    from captum_inn.autoencoders import ConvAutoencoder
    from captum_inn.inn import ConditionalINN, FactorINN
    from captum_inn.training import (
        load_autoencoder,
        load_concept_inn,
        load_invariance_inn,
        save_autoencoder,
        save_concept_inn,
        save_invariance_inn,
    )

    inn = ConditionalINN(4, (3,), n_blocks=1, hidden=8)
    inn.fit_info = {"layer": "fc", "layer_shape": [3], "latent_dim": 4, "model_class": "M"}
    e = FactorINN(4, {"a": 2}, n_blocks=1, hidden=8)
    inn(torch.randn(4, 4), torch.randn(4, 3)), e(torch.randn(4, 4))  # fitted enough to be saved
    files = [save_autoencoder(tmp_path / "ae.safetensors", ConvAutoencoder((3, 8, 8), latent_dim=4, width=4)),
             save_invariance_inn(tmp_path / "inn.safetensors", inn),
             save_concept_inn(tmp_path / "e.safetensors", e)]
    for load, file in zip((load_autoencoder, load_invariance_inn, load_concept_inn), files):
        torch.manual_seed(0)
        expected = torch.rand(2)
        torch.manual_seed(0)
        load(file)
        assert torch.equal(torch.rand(2), expected), load.__name__


def test_a_checkpoint_of_other_settings_is_refused_before_the_data_is_read(tmp_path):
    """fit_concepts encoded every pool, and fit_autoencoder read every image, before refusing a
    checkpoint of other settings or more steps (fit_invariances checked before its pass already)."""
    from helpers_training import Unread

    from captum_inn.autoencoders import ConvAutoencoder
    from captum_inn.concepts import ConceptPairs
    from captum_inn.training import fit_autoencoder, fit_concepts

    images, labels = torch.rand(16, 3, 8, 8), torch.arange(16) % 2

    def unread_pairs(n, generator):
        raise AssertionError("the pools were drawn before the checkpoint was checked")

    ae_path, e_path = str(tmp_path / "ae.safetensors"), str(tmp_path / "e.safetensors")
    fit_autoencoder(images, latent_dim=4, width=4, steps=4, checkpoint=ae_path, progress=False)
    with pytest.raises(CheckpointError, match=r"another configuration \(.*lr"):
        fit_autoencoder(Unread(), latent_dim=4, width=4, steps=4, lr=1e-2, checkpoint=ae_path, progress=False)
    with pytest.raises(ValueError, match="already holds 4 steps, more than `steps`=2"):
        fit_autoencoder(Unread(), latent_dim=4, width=4, steps=2, checkpoint=ae_path, progress=False)
    ae = ConvAutoencoder((3, 8, 8), latent_dim=4, width=4).eval()
    settings = dict(factor_sizes={"x": 2}, pool_size=8, n_blocks=1, hidden=8, checkpoint=e_path, progress=False)
    fit_concepts(ae, [ConceptPairs.from_labels("x", images, labels)], steps=4, **settings)
    with pytest.raises(CheckpointError, match=r"another configuration \(.*lr"):
        fit_concepts(ae, [ConceptPairs("x", unread_pairs)], steps=4, lr=1e-2, **settings)
    with pytest.raises(ValueError, match="already holds 4 steps, more than `steps`=2"):
        fit_concepts(ae, [ConceptPairs("x", unread_pairs)], steps=2, **settings)
