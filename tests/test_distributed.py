"""Distributed fitting under ``torchrun`` on the CPU (gloo): two processes reach the loss of one,
replicas stay identical, and an interrupted two-process fit resumes to the uninterrupted result."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("ddp_fit_script.py")
FITS = ("autoencoder", "invariance", "concepts")
# the progress bars of the three checkpointed fits, each resumed from its checkpoint at step 80
RESUMED_AT_80 = {("autoencoder", "80"), ("INN fc", "80"), ("concept INN", "80")}

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    """An autoencoder fitted in this process, for the INN fits of every torchrun run."""
    from captum_inn.datasets import ColorDigits
    from captum_inn.training import fit_autoencoder

    path = tmp_path_factory.mktemp("encoder") / "ae.safetensors"
    fit_autoencoder(ColorDigits("train", recolorings=1, seed=0).images[:512], latent_dim=8, width=8, steps=150,
                    lr=2e-3, checkpoint=str(path), progress=False)
    return path


def torchrun(n_processes: int, out: Path, encoder: Path, steps: int = 120) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n_processes}",
               str(SCRIPT), str(out), "--steps", str(steps), "--encoder", str(encoder)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]  # includes "replicas diverged"
    result = json.loads((out / "result.json").read_text())
    # which checkpointed fits resumed, and where, from their progress bars' "(resumed at step k)"
    result["resumed"] = set(re.findall(r"(autoencoder|INN fc|concept INN) \(resumed at step (\d+)\)", done.stderr))
    result["order_warnings"] = done.stderr.count("the minibatch order after step")
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory, encoder):
    runs = {n: torchrun(n, tmp_path_factory.mktemp(f"ddp{n}"), encoder) for n in (1, 2)}
    assert runs[1]["resumed"] == runs[2]["resumed"] == set(), "fresh fits"
    return runs


def _tail(history, n=30):
    tail = history[-n:]
    return statistics.mean(tail), statistics.stdev(tail) / math.sqrt(n)


@pytest.mark.parametrize("fit", FITS)
def test_two_processes_reach_the_loss_of_one(runs, fit):
    assert runs[2]["world_size"] == 2 and runs[1]["world_size"] == 1
    one, two = runs[1]["history"][fit], runs[2]["history"][fit]
    assert len(one) == len(two) == 120
    (mean1, se1), (mean2, se2) = _tail(one), _tail(two)
    learned = one[0] - mean1
    assert learned > 0 and two[0] - mean2 > 0, "both fits must make progress"
    # the two runs draw different minibatches: equal within the tail's noise (4 standard errors)
    # plus 5% of what the fit learned
    assert abs(mean1 - mean2) <= 4 * math.hypot(se1, se2) + 0.05 * learned, (fit, mean1, mean2, se1, se2, learned)


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, encoder):
    """A two-process fit stopped after its checkpoint at step 80; each test resumes a copy of it."""
    out = tmp_path_factory.mktemp("stopped")
    torchrun(2, out, encoder, steps=80)
    return out


def test_interrupted_two_process_fit_resumes_exactly(runs, encoder, stopped, tmp_path):
    shutil.copytree(stopped, tmp_path, dirs_exist_ok=True)  # stopped after the checkpoint at step 80 ...
    resumed = torchrun(2, tmp_path, encoder, steps=120)  # ... and resumed to 120
    # a fresh fit of 120 steps would also match the uninterrupted run: each fit must have resumed
    assert resumed["resumed"] == RESUMED_AT_80
    for fit in FITS:
        assert resumed["history"][fit] == pytest.approx(runs[2]["history"][fit], rel=1e-5, abs=1e-6)
        assert resumed["weights"][fit] == pytest.approx(runs[2]["weights"][fit], rel=1e-5, abs=1e-5)
    written = sorted(p.name for p in tmp_path.rglob("*.safetensors"))
    # named by the number of processes too: a resume with another number built its own shards, where it
    # read another shard of images under the same name and was refused
    assert "features.rank0of2.safetensors" in written and "features.rank1of2.safetensors" in written
    assert not list(tmp_path.rglob("*.tmp")), "only complete checkpoints remain"


def test_a_fit_resumes_with_another_number_of_processes(runs, encoder, stopped, tmp_path):
    """Two processes stopped at step 80, resumed by one (with a warning that the minibatch order
    differs from then on): every fit continues from its checkpoint rather than being refused."""
    shutil.copytree(stopped, tmp_path, dirs_exist_ok=True)
    resumed = torchrun(1, tmp_path, encoder, steps=120)
    assert resumed["resumed"] == RESUMED_AT_80
    assert resumed["order_warnings"] == len(FITS)
    for fit in FITS:
        history = resumed["history"][fit]
        assert len(history) == 120 and history[:80] == pytest.approx(runs[2]["history"][fit][:80], rel=1e-5, abs=1e-6)


def test_a_finished_fit_loads_with_another_number_of_processes_without_an_order_warning(encoder, stopped, tmp_path):
    """A fit that already reached its steps draws no more minibatches: loading it with another number of
    processes warned that the minibatch order "differs from an uninterrupted run"."""
    shutil.copytree(stopped, tmp_path, dirs_exist_ok=True)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*.safetensors")}
    finished = torchrun(1, tmp_path, encoder, steps=80)
    assert finished["resumed"] == RESUMED_AT_80 and finished["order_warnings"] == 0
    # nothing is rewritten: the concept INN's results were recomputed from pools that one process draws
    # otherwise than two, and its finished checkpoint was saved again
    assert [p.name for p, data in before.items() if p.read_bytes() != data] == []


def test_ranks_see_the_last_checkpoint_and_a_parameter_trained_on_one_rank_stays_in_step(tmp_path):
    """Four cases the helper script shows (tests/ddp_edge_script.py): rank 1 read the step-5 checkpoint
    right after a 10-step fit returned (rank 0 had not written the last one yet); a parameter with a
    gradient on one rank only made the ranks sum different tensors, so each rank's heads drifted apart;
    a resumed fit gave every rank rank 0's augmentation state, though rank 1 had drawn more; and a check
    or a step that failed on one rank only (its shard too small or with infinite features, a NaN pair in
    its concept pool, its smaller batch for the attacked half, a training step, rank 0's checkpoint
    folder, a checkpoint write, a checkpoint damaged for one rank) stopped that rank alone, while the other went on and waited for it (the
    run hung)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(SCRIPT.with_name("ddp_edge_script.py")), str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["step_seen"] for r in ranks] == [10, 10]
    assert ranks[0]["weights"] == ranks[1]["weights"]  # replicas identical
    assert all(ranks[0]["weights"][name] != ranks[0]["start"][name] for name in ("a", "b"))  # both heads trained
    for r in ranks:
        assert r["augmented"]["resumed"] == r["augmented"]["whole"]
    assert ranks[0]["augmented"]["whole"] != ranks[1]["augmented"]["whole"]  # the ranks' streams did differ
    failed, other = ranks[1]["errors"], ranks[0]["errors"]  # rank 1's data fails, or rank 0's checkpoint folder
    assert failed["few"] == ("ValueError: Fitting needs at least 2 training images per process, this process's cache "
                             "holds 1: pass more images or start fewer processes.")
    assert "Layer '1''s activations hold NaN or infinite values at image 1 of `data`" in failed["infinite"]
    assert "Concept 'group' produced pairs with NaN or infinite values" in failed["pool"]
    assert failed["step"] == "ValueError: rank 1's batch cannot be used"
    for case in ("few", "infinite", "pool"):
        assert other[case] == f"ValueError: Process 1 of this torchrun run stopped: {failed[case]}"
    assert other["step"].startswith("RuntimeError: Process(es) [1] of this torchrun run failed in this training step")
    for r in ranks:  # decided on the smaller shard's batch, so both refuse alike
        assert r["errors"]["adversarial"].startswith("ValueError: `adversarial_epsilon` attacks half of each batch, which "
                                                     "needs batches of at least 4 images per process for a model with "
                                                     "batch norm, got 3")
    assert other["checkpoint"].startswith("ValueError: No checkpoint can be written at `checkpoint`")
    assert failed["checkpoint"] == f"ValueError: Process 0 of this torchrun run stopped: {other['checkpoint']}"
    assert other["write"] == "OSError: No space left on device"
    assert failed["write"] == "ValueError: Process 0 of this torchrun run stopped: OSError: No space left on device"
    assert failed["damaged"].startswith("CheckpointError: Checkpoint") and "'rng.extra.0.1' is a torch.float32" in failed["damaged"]
    assert other["damaged"] == f"ValueError: Process 1 of this torchrun run stopped: {failed['damaged']}"


def test_processes_with_different_augmentations_are_refused(monkeypatch):
    """Each process checks a resumed checkpoint's augmentation record against its own: a Jitter seeded
    per process would stop the other processes alone at a resume, leaving process 0 waiting. Every
    process refuses it up front instead (simulated: rank 0 of 2, the other with another seed)."""
    from captum_inn.training import Jitter, distributed, fit_autoencoder

    monkeypatch.setattr(distributed, "world", lambda device=None: (0, 2))
    monkeypatch.setattr(distributed, "gather_texts", lambda text: [text, text])
    distributed.check_processes_agree("augment", {"Jitter": {"seed": 0}}, "fix")  # the same: passes
    monkeypatch.setattr(distributed, "gather_texts", lambda text: [text, text.replace('"seed": 0', '"seed": 1')])
    with pytest.raises(ValueError, match=r"`augment` is \{.*\"seed\": 1.*\} in process 1 but .*\"seed\": 0.* in "
                                         r"process 0: give every process the same augmentation"):
        fit_autoencoder(torch.rand(8, 3, 8, 8), latent_dim=2, steps=1, augment=Jitter(1, seed=0), progress=False)


def test_a_check_that_fails_in_one_process_raises_in_every_process(monkeypatch):
    """raising_together (simulated: rank 0 of 2): rank 0's block passes and rank 1's failed, so rank 0
    raises too, quoting it; a block that fails raises its own error, after telling the others."""
    from captum_inn.training import distributed

    monkeypatch.setattr(distributed, "world", lambda device=None: (0, 2))
    told = []
    monkeypatch.setattr(distributed, "gather_texts", lambda text: told.append(text) or [text, "ValueError: few images"])
    with pytest.raises(ValueError, match=r"^Process 1 of this torchrun run stopped: "
                                         r"ValueError: few images$"):
        with distributed.raising_together():
            pass
    with pytest.raises(ValueError, match=r"^NaN here$"):
        with distributed.raising_together():
            raise ValueError("NaN here")
    assert told == ["", "ValueError: NaN here"]
    monkeypatch.setattr(distributed, "gather_texts", lambda text: [text, ""])
    with distributed.raising_together():  # nobody failed
        pass


def test_a_failed_step_frees_its_tensors_before_telling_the_other_processes(monkeypatch):
    """After an out-of-memory error in one process's step, joining the gradient all-reduce needs memory
    again: the step's activations (held by the error's frames) must be gone by then, or that process
    fails a second time without joining and the others wait for it (simulated: rank 1 of 2)."""
    import weakref

    from captum_inn.training import loop

    monkeypatch.setattr(loop, "world", lambda device=None: (1, 2))
    monkeypatch.setattr(loop, "check_processes_agree", lambda *args, **kwargs: None)
    alive_when_joining = []
    monkeypatch.setattr(loop, "average_gradients",
                        lambda module, loss, failed=False: alive_when_joining.append(activations() is not None))
    weight = torch.nn.Linear(4, 1)

    def out_of_memory(generator):
        hidden = weight(torch.ones(64, 4)).expand(64, 1024).contiguous()  # stands for a step's activations
        nonlocal activations
        activations = weakref.ref(hidden)
        raise RuntimeError("CUDA out of memory (simulated)")

    activations = None
    with pytest.raises(RuntimeError, match="out of memory") as raised:
        loop.train_loop(weight, out_of_memory, steps=2, lr=0.1, progress=False)
    assert alive_when_joining == [False]
    assert "out_of_memory" in "".join(traceback.format_tb(raised.value.__traceback__))  # the lines stay


def test_processes_with_different_networks_are_refused(monkeypatch):
    """A network built in each process without a seed differs between them; its features would
    differ per shard without any error, so a distributed fit refuses it (simulated: rank 0 of 2)."""
    from captum_inn.training import distributed

    monkeypatch.setattr(distributed, "world", lambda device=None: (0, 2))
    monkeypatch.setattr(distributed, "gather_texts", lambda text: [text, text])
    distributed.check_replicas_agree({"model": torch.nn.Linear(2, 2), "autoencoder": None})  # the same: passes
    monkeypatch.setattr(distributed, "gather_texts", lambda text: [text, "0123456789abcdef"])
    with pytest.raises(ValueError, match=r"`model` has other weights in process\(es\) \[1\].*seed its construction"):
        distributed.check_replicas_agree({"model": torch.nn.Linear(2, 2)})


def test_processes_with_different_batch_norm_statistics_are_refused(monkeypatch):
    """The weights agree but batch norm's running statistics do not (a forward pass in training mode
    in one process only): the features would differ per shard, so the fit is refused, naming the
    buffers (simulated: rank 0 of 2, rank 1's network built here)."""
    from captum_inn._fingerprints import weights_fingerprint
    from captum_inn.training import distributed

    torch.manual_seed(0)
    here = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).eval()
    there = copy.deepcopy(here)
    calls = []

    def gather(text):  # what rank 1 sends for the same request: weights first, then weights and buffers
        calls.append(text)
        return [text, weights_fingerprint(there, buffers=len(calls) == 2)]

    monkeypatch.setattr(distributed, "world", lambda device=None: (0, 2))
    monkeypatch.setattr(distributed, "gather_texts", gather)
    distributed.check_replicas_agree({"model": here})  # identical copies: passes
    there.train()(torch.randn(8, 3))  # rank 1 updated its running statistics
    calls.clear()
    with pytest.raises(ValueError, match=r"`model` has the same weights but other buffers .* process\(es\) \[1\]"):
        distributed.check_replicas_agree({"model": here})


def test_shard_data_refuses_fewer_items_than_processes_on_every_rank(monkeypatch):
    """With fewer images than processes a rank got an empty shard and failed alone ("a non-empty batch ...
    got shape (0, ...)" for one image given); every rank now refuses it, naming the number of processes."""
    from torch.utils.data import IterableDataset, TensorDataset

    from captum_inn.training import distributed

    monkeypatch.setattr(distributed, "world", lambda device=None: (1, 2))  # simulated: rank 1 of 2
    with pytest.raises(ValueError, match=r"`data` has 1 item\(s\), fewer than the 2 processes"):
        distributed.shard_data(torch.rand(1, 3, 4, 4))
    images = torch.rand(3, 3, 4, 4)
    assert torch.equal(distributed.shard_data(images), images[1:2])  # an uneven shard is fine
    assert len(distributed.shard_data(TensorDataset(images))) == 1

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(images)

    with pytest.raises(TypeError, match="map-style Dataset .* not a Stream"):
        distributed.shard_data(Stream())


def test_per_image_forward_args_are_sharded_with_the_images(monkeypatch):
    """Under torchrun each process caches the features of its shard of the images, so a per-image extra
    tensor must be cut the same way (it went whole with the shard's images: the wrong rows, or a shape error);
    shared values stay whole."""
    from captum_inn.training import distributed

    images, weight, shared = torch.rand(5, 3, 4, 4), torch.arange(5.0)[:, None], torch.rand(3, 1)
    assert distributed.shard_forward_args((weight, shared, 2.0), 5)[0] is weight  # one process: untouched
    monkeypatch.setattr(distributed, "world", lambda device=None: (1, 2))  # simulated: rank 1 of 2
    cut = distributed.shard_forward_args((weight, shared, 2.0), 5)
    assert torch.equal(cut[0], weight[1::2]) and cut[1] is shared and cut[2] == 2.0
    assert torch.equal(distributed.shard_data(images), images[1::2])  # the same rows as the images
    assert distributed.shard_forward_args(weight, None)[0] is weight  # data of unknown length: nothing is cut
    assert distributed.shard_forward_args(None, 5) is None


def test_only_rank_zero_shows_a_fits_warnings(monkeypatch):
    """Every process of a torchrun run checks the same settings, so each warning came once per process;
    rank 0 now speaks for all. Simulated from torchrun's environment, with no process group started (each
    "process" then fits alone)."""
    import warnings

    from captum_inn.concepts import ConceptPairs
    from captum_inn.training import distributed, fit_concepts

    x, labels = torch.rand(40, 6), torch.arange(40) % 4
    twice = [ConceptPairs.from_labels("c", x, labels), ConceptPairs.from_labels("again", x, labels)]
    monkeypatch.setattr(distributed, "_maybe_init", lambda device=None: None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    shown = {}
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit_concepts((torch.nn.Sequential(torch.nn.Flatten()), "0"), twice, steps=1, n_blocks=1, hidden=8, pool_size=16, progress=False)
            with distributed.warnings_from_rank_zero():
                warnings.warn("`lr` is large", stacklevel=1)
        shown[rank] = [str(w.message) for w in caught]
    assert any("draw the same pairs" in m for m in shown["0"]) and "`lr` is large" in shown["0"]
    assert shown["1"] == []


def test_collectives_on_module_tensors_go_where_the_backend_can_send_them(monkeypatch):
    """sync_module, average_gradients and average_buffers called the collectives on the module's own
    tensors: a CPU fit in a group that NCCL started (after a CUDA fit) failed at its first step. They now
    go through _comm (here a stand-in that moves to a copy), and the results come back in place."""
    from captum_inn.training import distributed

    copies = []

    def moved(tensor):
        copies.append(tensor.clone())  # another tensor, as a copy on the GPU would be
        return copies[-1]

    def all_reduce(tensor):  # two ranks holding the same values
        assert tensor is copies[-1], "a collective on a tensor that did not go through _comm"
        tensor.mul_(2)

    def broadcast(tensor, src):
        assert tensor is copies[-1], "a collective on a tensor that did not go through _comm"
        tensor.fill_(7.0)  # rank 0's values

    monkeypatch.setattr(distributed, "world", lambda device=None: (0, 2))
    monkeypatch.setattr(distributed, "_comm", moved)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    monkeypatch.setattr(torch.distributed, "broadcast", broadcast)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    distributed.sync_module(net)
    assert all(bool((t == 7.0).all()) for t in [*net.parameters(), *net.buffers()])
    net[1].running_mean.copy_(torch.arange(4.0))
    distributed.average_buffers(net)  # the sum over two equal ranks, halved: unchanged
    assert torch.equal(net[1].running_mean, torch.arange(4.0))
    loss = net(torch.randn(5, 3)).pow(2).mean()
    loss.backward()
    grads = [p.grad.clone() for p in net.parameters()]
    assert float(distributed.average_gradients(net, loss)) == pytest.approx(loss.item())
    assert all(torch.allclose(p.grad, g) for p, g in zip(net.parameters(), grads))


def test_averaging_buffers_leaves_buffers_equal_on_every_rank_exactly_as_they_are(monkeypatch):
    """(x + x + x) / 3 is not x in float32 for about one value in seven: three processes changed an
    embedder's input statistics at every checkpoint although every rank held the same."""
    from captum_inn.training import distributed

    monkeypatch.setattr(distributed, "world", lambda device=None: (0, 3))
    monkeypatch.setattr(distributed, "_comm", lambda tensor: tensor)  # gloo: the tensors themselves
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda tensor: tensor.mul_(3))  # three equal ranks
    monkeypatch.setattr(torch.distributed, "broadcast", lambda tensor, src: None)  # rank 0's values: these
    net = torch.nn.BatchNorm1d(1000)
    values = torch.rand(1000, generator=torch.Generator().manual_seed(0)) * 10
    net.running_mean.copy_(values)
    assert not torch.equal(values * 3 / 3, values)  # the premise: the plain mean changes some
    distributed.average_buffers(net)
    assert torch.equal(net.running_mean, values)


def test_processes_with_different_fit_settings_are_refused_naming_the_setting(monkeypatch):
    """Another lr in one process gave replicas that drifted apart with no error; other steps crashed in
    the collectives ("Connection reset by peer"); a checkpoint given to process 0 only aborted at the first
    checkpoint. train_loop now refuses them in every process (simulated: rank 0 of 2)."""
    from captum_inn.training import distributed, loop

    monkeypatch.setattr(loop, "world", lambda device=None: (0, 2))
    monkeypatch.setattr(distributed, "world", lambda device=None: (0, 2))
    lin = torch.nn.Linear(3, 1)

    def fit(**settings):
        return loop.train_loop(lin, lambda g: lin(torch.randn(4, 3, generator=g)).pow(2).mean(), progress=False,
                               **{"steps": 3, "lr": 0.05, **settings})

    for other, match in ((lambda t: t.replace('"lr": 0.05', '"lr": 0.005'), r"lr is 0.005 in process 1 but 0.05 in process 0"),
                         (lambda t: t.replace('"steps": 3', '"steps": 4'), r"steps is 4 in process 1 but 3 in process 0"),
                         (lambda t: t.replace('"checkpoint": false', '"checkpoint": true'),
                          r"checkpoint is true in process 1 but false in process 0\. Give every process the same settings")):
        monkeypatch.setattr(distributed, "gather_texts", lambda text, other=other: [text, other(text)])
        with pytest.raises(ValueError, match=r"`train_loop settings` differ between processes: " + match):
            fit()
