"""Faults: a fit killed with SIGKILL resumes to the uninterrupted result; checkpoint writes survive
kills; divergence keeps the last good checkpoint; no memory growth over repeated calls."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from captum_inn.training import CheckpointError, load_checkpoint, train_loop
from captum_inn.training.checkpoint import strip_prefix

torch.set_num_threads(1)

FIT_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    torch.set_num_threads(1)
    from captum_inn.autoencoders import ConvAutoencoder
    from captum_inn.models import SmallCNN
    from captum_inn.training import fit_invariances, save_invariance_inn

    out, steps = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    model, ae = SmallCNN(width=4).eval(), ConvAutoencoder((3, 32, 32), latent_dim=6, width=4).eval()
    images = torch.rand(96, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    inn = fit_invariances(model, "logits", ae, images, steps=steps, checkpoint_every=25, checkpoint_dir=out,
                          progress=False, n_blocks=2, hidden=16, embed_dim=8, batch_size=32)
    save_invariance_inn(out + "/final.safetensors", inn)
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
    with pytest.raises(FloatingPointError, match=r"at step 12\. Lower the learning rate"):
        train_loop(module, loss_fn, steps=40, lr=1e-2, checkpoint=str(path), checkpoint_every=5, progress=False)
    tensors, meta = load_checkpoint(path)
    assert meta["step"] == 10 and all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())
    # the NaN step ran its backward but the optimiser never applied it
    assert all(bool(torch.isfinite(p).all()) for p in module.parameters())


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
