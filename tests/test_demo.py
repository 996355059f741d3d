"""The main job end to end at a tiny scale, and the command line."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from captum_inn import __version__
from captum_inn.cli import main
from captum_inn.demo import LAYERS, QUICK_BOUNDS, DemoSettings, check_metrics, run_demo

torch.set_num_threads(1)

TINY = DemoSettings(recolorings=1, test_recolorings=1, cnn_steps=60, cnn_width=8, judge_steps=20, ae_steps=30, ae_width=8,
                    latent_dim=8, inn_steps=20, inn_blocks=2, inn_hidden=32, n_eval=60, n_probe=100, n_samples=3,
                    n_figure_rows=2, concept_sizes={"digit": 2, "foreground": 2, "background": 2}, concept_steps=10,
                    concept_blocks=2, concept_hidden=16, n_concept_eval=40, dynamics_steps=(10, 30),
                    dynamics_inn_steps=10, dynamics_inn_hidden=16)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return run_demo(out=out, settings=TINY, progress=False, concepts=True)


def test_report_folder_has_the_page_the_figures_and_the_metrics(report):
    out = report.parent
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["layers"]) == set(LAYERS)
    assert [metrics["layers"][n]["depth"] for n in LAYERS] == [0, 1, 2, 3]
    required = {"depth", "agreement", "agreement_random_condition", "variance_explained_by_v",
                "colour_r2_from_v", "colour_r2_from_z", "reencode_beats_null"}
    for layer in metrics["layers"].values():
        assert required <= set(layer)
        assert 0.0 <= layer["agreement"] <= 1.0 and 0.0 <= layer["reencode_beats_null"] <= 1.0
    assert 0.0 <= metrics["reconstruction_agreement"] <= 1.0
    page = report.read_text()
    for name in ["by_depth.png", "invariance_maps.png"] + [f"samples_{n}.png" for n in LAYERS]:
        assert (out / "figures" / name).stat().st_size > 1000
        assert f"figures/{name}" in page
    for name in LAYERS:
        assert (out / "checkpoints" / f"invariance_{name}.safetensors").exists()
    assert isinstance(metrics["failures"], list)
    concepts = metrics["concepts"]
    for key in ("swap_digit_judge_donor", "swap_digit_colours_kept", "swap_fg_digit_kept", "swap_fg_colour_moved"):
        assert 0.0 <= concepts[key] <= 1.0
    assert set(concepts["factor_sizes"]) == {"code", "fc", "logits"}
    assert sum(concepts["factor_sizes"]["fc"].values()) == 128
    assert set(concepts["encoded"]) == set(LAYERS)
    assert [p["step"] for p in concepts["dynamics"]] == ["10", "30", "60"]
    assert set(concepts["encoded_standard_error"]) == set(LAYERS)
    assert all(set(p["encoded_standard_error"]) == set(p["encoded"]) for p in concepts["dynamics"])
    for name in ("edit_digit", "edit_foreground", "concepts_encoded", "concept_dynamics", "concept_attributions"):
        assert f"figures/{name}.png" in page
    assert (out / "checkpoints" / "concepts.safetensors").exists()


def test_check_metrics_reports_each_broken_bound():
    layers = {
        "early": {"depth": 0, "variance_explained_by_v": 0.5, "reencode_beats_null": 0.1},
        "logits": {"depth": 1, "agreement": 0.2, "agreement_random_condition": 0.9, "colour_r2_from_v": 0.0,
                   "colour_r2_from_z": 0.9, "variance_explained_by_v": 0.6, "reencode_beats_null": 0.0},
    }
    failures = check_metrics({"reconstruction_agreement": 0.1, "layers": layers}, QUICK_BOUNDS)
    assert len(failures) == 7
    good = {
        "early": {"depth": 0, "variance_explained_by_v": 0.1, "reencode_beats_null": 1.0},
        "logits": {"depth": 1, "agreement": 0.99, "agreement_random_condition": 0.1, "colour_r2_from_v": 0.9,
                   "colour_r2_from_z": 0.0, "variance_explained_by_v": 0.9, "reencode_beats_null": 0.0},
    }
    assert check_metrics({"reconstruction_agreement": 0.99, "layers": good}) == []
    concepts = {
        "swap_digit_judge_donor": 0.9, "swap_digit_colours_kept": 0.9, "swap_fg_digit_kept": 0.95,
        "swap_fg_colour_moved": 0.9, "attribution_completeness_max_rel_error": 0.001,
        "factor_sizes": {"fc": {"digit": 60, "foreground": 10, "background": 10},
                         "code": {"digit": 10, "foreground": 10, "background": 10}},
        "dynamics": [{"accuracy": 0.2, "encoded": {"digit": 0.1, "background": 0.6}},
                     {"accuracy": 0.99, "encoded": {"digit": 0.5, "background": 0.1}}],
        "encoded": {"early": {"digit": 0.9, "foreground": 0.99, "background": 0.99},
                    "logits": {"digit": 0.4, "foreground": 0.2, "background": 0.1}},
    }
    assert check_metrics({"reconstruction_agreement": 0.99, "layers": good, "concepts": concepts}) == []
    concepts["dynamics"][1]["encoded"]["background"] = 0.7
    concepts["swap_digit_judge_donor"] = 0.1
    concepts["encoded"]["logits"]["foreground"] = 0.45
    failures = check_metrics({"reconstruction_agreement": 0.99, "layers": good, "concepts": concepts})
    assert len(failures) == 3 and "background share did not fall" in failures[1]
    assert failures[2] == "encoded shares at logits: digit 0.400 <= a colour's (foreground 0.450, background 0.100)"


def test_cli_selfcheck_and_version(capsys):
    state = torch.get_rng_state()
    assert main(["selfcheck"]) == 0
    assert torch.equal(torch.get_rng_state(), state)  # its layers' initialisation drew from the caller's stream
    assert "round trip" in capsys.readouterr().out
    result = subprocess.run([sys.executable, "-m", "captum_inn", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and __version__ in result.stdout
    with pytest.raises(SystemExit):
        main(["no-such-command"])
    with pytest.raises(SystemExit):  # named the parser's variable: "the following arguments are required: command"
        main([])
    assert "the following arguments are required: {demo,selfcheck}" in capsys.readouterr().err


def test_cli_refuses_bad_arguments_before_any_work(tmp_path, capsys, monkeypatch):
    """Each is a usage error naming the argument (exit status 2), and no report folder is left behind."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("")
    for args, message in ((["--device", "gpu"], "--device='gpu' is not a torch device"),
                          (["--out", "a_file"], "--out 'a_file' is a file"),
                          (["--out", "a_file/report"], "--out 'a_file/report' is inside 'a_file', which is a file"),
                          (["--images", "missing"], "--images 'missing' is not a folder"),
                          # named the report inside the mistyped path, not the path
                          (["--images", "missing", "--out", "missing/report"], "--images 'missing' is not a folder"),
                          (["--images", "a_file", "--out", "a_file/r"], "--images 'a_file' is not a folder")):
        assert main(["demo", "--quick", *args]) == 2
        assert message in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["demo", "--quick", "--device", "cuda"]) == 2
        assert "PyTorch sees no CUDA GPU here" in capsys.readouterr().err
    for bad in ("0", "-2", "two"):
        with pytest.raises(SystemExit):
            main(["demo", "--threads", bad])
        assert "argument --threads" in capsys.readouterr().err
    for bad in ("-1", "one"):  # a negative seed used to fail in ColorDigits with a traceback, after the folder was made
        with pytest.raises(SystemExit) as exit_info:
            main(["demo", "--quick", "--seed", bad])
        assert exit_info.value.code == 2 and "argument --seed" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # no empty report folders


def test_cli_refuses_values_that_failed_after_the_report_folder_was_made(tmp_path, capsys, monkeypatch):
    """A seed of 2**64 passed, then torch.manual_seed overflowed inside the demo; --threads 2**40
    overflowed with a traceback; an empty --out (an unset shell variable) wrote the report into
    the current folder, replacing its index.html."""
    import captum_inn.demo

    monkeypatch.chdir(tmp_path)
    (tmp_path / "index.html").write_text("mine")
    monkeypatch.setattr(captum_inn.demo, "run_demo", lambda **kwargs: pytest.fail(f"the demo ran: {kwargs}"))
    for args, message in ((["--seed", str(2**53)], "argument --seed: must be <= 4503599627370496"),
                          (["--threads", str(2**40)], "argument --threads: must be <= 2147483647"),
                          (["--out", ""], "argument --out: must name a folder"),
                          (["--images", " "], "argument --images: must name a folder")):
        with pytest.raises(SystemExit) as exit_info:
            main(["demo", "--quick", *args])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.html"]


def test_cli_refuses_concepts_with_the_photo_demo(tmp_path, capsys, monkeypatch):
    """--concepts belongs to the ColorDigits demo: with --images it is a usage error, not dropped."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--quick", "--images", "photos", "--concepts"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "captum-inn demo: error: --concepts applies to the ColorDigits demo" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]  # no report folder


def test_cli_refuses_a_photo_folder_without_the_layout_before_any_work(tmp_path, capsys, monkeypatch):
    """An empty folder, or a class with one photo, failed with a traceback after the report folder was made."""
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    assert main(["demo", "--quick", "--images", "photos"]) == 2
    assert "captum-inn demo: error: --images 'photos' holds no images in ImageFolder layout" in capsys.readouterr().err
    for name, count in (("cat", 2), ("dog", 1)):
        (tmp_path / "photos" / name).mkdir()
        for i in range(count):
            Image.new("RGB", (8, 8)).save(tmp_path / "photos" / name / f"{i}.png")
    assert main(["demo", "--quick", "--images", "photos"]) == 2
    assert "class 'dog' in --images has 1 image(s); each class needs >= 2" in capsys.readouterr().err
    (tmp_path / "photos" / "dog" / "0.png").rename(tmp_path / "photos" / "dog" / "0.heic")
    assert main(["demo", "--quick", "--images", "photos"]) == 2  # was: the whole folder "holds no images"
    assert "class 'dog' in --images has 0 image(s); each class needs >= 2 (files ending in .jpg" in capsys.readouterr().err
    (tmp_path / "photos" / "dog" / "0.heic").rename(tmp_path / "photos" / "dog" / "0.png")
    (tmp_path / "photos" / "dog" / "0.png").unlink()
    (tmp_path / "photos" / "dog").rmdir()  # one class left: a classifier of one class learns nothing
    assert main(["demo", "--quick", "--images", "photos"]) == 2
    assert "--images 'photos' holds one class ('cat'); the demo trains a classifier" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]  # no report folder


@pytest.fixture
def demo_calls(tmp_path, monkeypatch):
    """Both demos replaced by a recorder of ``(args, out, kwargs)`` that writes what main reads back;
    a folder ``photos`` of two classes in the working directory (the CLI checks its layout first)."""
    from PIL import Image

    import captum_inn.demo
    import captum_inn.photo_demo

    monkeypatch.chdir(tmp_path)
    for name in ("cat", "dog"):
        (tmp_path / "photos" / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8)).save(tmp_path / "photos" / name / f"{i}.png")
    calls = []

    def fake_run(*args, out, **kwargs):
        calls.append((args, str(out), kwargs))
        (tmp_path / out).mkdir(exist_ok=True)
        (tmp_path / out / "metrics.json").write_text(json.dumps({"failures": []}))
        return tmp_path / out / "index.html"

    monkeypatch.setattr(captum_inn.demo, "run_demo", fake_run)
    monkeypatch.setattr(captum_inn.photo_demo, "run_photo_demo", fake_run)
    return calls


def test_cli_out_given_is_always_taken(demo_calls, capsys):
    """--out defaults to each demo's own folder, and an --out given is honoured, even the other
    demo's default name."""
    for args in ([], ["--images", "photos"], ["--images", "photos", "--out", "captum_inn_report"],
                 ["--out", "captum_inn_photo_report"], ["--out", "mine"]):
        assert main(["demo", "--quick", *args]) == 0
    assert [out for _, out, _ in demo_calls] == ["captum_inn_report", "captum_inn_photo_report", "captum_inn_report",
                       "captum_inn_photo_report", "mine"]
    assert "report written to" in capsys.readouterr().out


def test_cli_threads_apply_to_the_demo_and_are_restored_after_it(tmp_path, monkeypatch, capsys):
    """main() called from Python with --threads left the caller's torch thread count changed, also
    when the demo failed."""
    import captum_inn.demo

    monkeypatch.chdir(tmp_path)
    seen = []

    def fake_run(*, out, **kwargs):
        seen.append(torch.get_num_threads())
        if len(seen) == 2:
            raise RuntimeError("the demo failed")
        (tmp_path / out).mkdir(exist_ok=True)
        (tmp_path / out / "metrics.json").write_text(json.dumps({"failures": []}))
        return tmp_path / out / "index.html"

    monkeypatch.setattr(captum_inn.demo, "run_demo", fake_run)
    before = torch.get_num_threads()
    threads = 3 if before != 3 else 2
    assert main(["demo", "--quick", "--threads", str(threads)]) == 0
    assert seen == [threads] and torch.get_num_threads() == before
    with pytest.raises(RuntimeError, match="the demo failed"):
        main(["demo", "--quick", "--threads", str(threads)])
    assert torch.get_num_threads() == before


def test_cli_check_sets_the_exit_status_from_the_reports_failures(tmp_path, monkeypatch, capsys):
    """`make demo ARGS=--check` (and CI) relies on it: exit 1 when a bound is not met and --check
    is given, 0 otherwise; every failure is printed either way."""
    import captum_inn.demo

    monkeypatch.chdir(tmp_path)
    failures = []

    def fake_run(*, out, **kwargs):
        (tmp_path / out).mkdir(exist_ok=True)
        (tmp_path / out / "metrics.json").write_text(json.dumps({"failures": failures}))
        return tmp_path / out / "index.html"

    monkeypatch.setattr(captum_inn.demo, "run_demo", fake_run)
    assert main(["demo", "--quick", "--check"]) == 0
    assert "every bound of the demo holds" in capsys.readouterr().out
    failures.append("logits agreement 0.5 < 0.8")
    assert main(["demo", "--quick", "--check"]) == 1
    assert "bound not met: logits agreement 0.5 < 0.8" in capsys.readouterr().out
    assert main(["demo", "--quick"]) == 0  # without --check a missed bound is reported, not an error
    assert "bound not met: logits agreement 0.5 < 0.8" in capsys.readouterr().out


def test_layer_steps_factor_scales_inn_steps(report):
    from captum_inn.demo import _layer_overrides
    from captum_inn.training import load_checkpoint

    resolved = _layer_overrides(DemoSettings.quick())
    assert resolved["logits"]["steps"] == 800 and "steps_factor" not in resolved["logits"]
    checkpoints = report.parent / "checkpoints"
    steps = {n: load_checkpoint(str(checkpoints / f"invariance_{n}.safetensors"))[1]["fit_info"]["steps"] for n in ("fc", "logits")}
    assert steps == {"fc": TINY.inn_steps, "logits": round(TINY.inn_steps * 4 / 3)}


def test_a_failed_rerun_leaves_no_report_that_looks_complete(tmp_path, monkeypatch):
    """The last run's index.html and metrics.json went on standing beside a failed run's new
    checkpoints and figures, a report that looked complete; the CLI's --check read it back. Its
    figures and INNs stayed too, beside the new run's autoencoder; only the photo demo's ResNet and
    autoencoder, which a rerun reuses, are kept."""
    from types import SimpleNamespace

    import captum_inn.demo
    import captum_inn.photo_demo

    def fail(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(captum_inn.demo, "fit_classifier", fail)
    monkeypatch.setattr(captum_inn.photo_demo, "_resnet", fail)
    photos = torch.rand(4, 3, 16, 16)
    monkeypatch.setattr(captum_inn.photo_demo, "load_image_folder", lambda *a, **k: SimpleNamespace(
        classes=["cat", "dog"], train_images=photos, train_labels=torch.tensor([0, 1, 0, 1]), test_images=photos,
        test_labels=torch.tensor([0, 1, 0, 1])))
    for cls in ("cat", "dog"):  # the layout the up-front check reads from file names; no photo is opened
        (tmp_path / "photos" / cls).mkdir(parents=True)
        for i in range(2):
            (tmp_path / "photos" / cls / f"{i}.png").touch()
    for name, run, kept in (
        ("demo", lambda out: run_demo(out=out, settings=TINY, progress=False), []),
        ("photo", lambda out: captum_inn.photo_demo.run_photo_demo(tmp_path / "photos", out=out, progress=False),
         ["autoencoder.safetensors", "resnet18.safetensors"]),
    ):
        out = tmp_path / name
        (out / "figures").mkdir(parents=True)
        (out / "checkpoints").mkdir()
        (out / "index.html").write_text("<html><title>captum_inn report</title>the last run</html>")
        (out / "metrics.json").write_text(json.dumps({"failures": []}))
        (out / "figures" / "edit_digit.png").write_bytes(b"an earlier --concepts run's")
        for checkpoint in ("invariance_fc.safetensors", "autoencoder.safetensors", "resnet18.safetensors"):
            (out / "checkpoints" / checkpoint).write_bytes(b"the last run's")
        with pytest.raises(RuntimeError, match="interrupted"):
            run(out)
        assert not (out / "index.html").exists() and not (out / "metrics.json").exists()
        assert list((out / "figures").iterdir()) == []
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == kept


def test_a_report_folder_holding_files_of_its_own_is_refused_and_left_as_it_was(tmp_path, monkeypatch, capsys):
    """`--out .` in a project, or a folder with a page of the user's own, lost its index.html and
    metrics.json as the run started."""
    import captum_inn.demo

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(captum_inn.demo, "run_demo", lambda **kwargs: pytest.fail(f"the demo ran: {kwargs}"))
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "index.html").write_text("<h1>my own page</h1>")
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "notes.txt").write_text("keep")
    (tmp_path / "project" / "metrics.json").write_text('{"accuracy": 0.9}')
    for out, named in (("site", "'index.html'"), ("project", "'notes.txt', 'metrics.json'")):
        assert main(["demo", "--quick", "--out", out]) == 2
        assert (f"captum-inn demo: error: --out '{out}' holds files that are not part of a captum_inn report "
                f"({named}); pass a new or empty folder") in capsys.readouterr().err
    assert (tmp_path / "site" / "index.html").read_text() == "<h1>my own page</h1>"
    assert sorted(p.name for p in (tmp_path / "project").iterdir()) == ["metrics.json", "notes.txt"]
    with pytest.raises(ValueError, match=r"`out` '.*site' holds files that are not part of a captum_inn report"):
        run_demo(out=tmp_path / "site", settings=TINY, progress=False)


def test_cli_names_an_unreadable_photo_as_a_usage_error_and_keeps_the_earlier_report(tmp_path, monkeypatch, capsys):
    """A photo that could not be read was a traceback naming `root`, after the earlier report had
    been deleted."""
    monkeypatch.chdir(tmp_path)
    for cls in ("cat", "dog"):
        (tmp_path / "photos" / cls).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "photos" / cls / f"{i}.jpg").write_text("not an image")
    (tmp_path / "prev").mkdir()
    (tmp_path / "prev" / "index.html").write_text("<title>captum_inn photo report</title>")
    (tmp_path / "prev" / "metrics.json").write_text('{"failures": []}')
    assert main(["demo", "--quick", "--images", "photos", "--out", "prev"]) == 2
    assert re.search(r"captum-inn demo: error: --images holds a photo that cannot be read, '.*photos/\w+/\d.jpg'.*"
                     r"remove or replace it", capsys.readouterr().err)
    assert sorted(p.name for p in (tmp_path / "prev").iterdir()) == ["index.html", "metrics.json"]


def test_cli_interrupted_says_what_a_rerun_does_and_mistyped_options_are_named_with_the_subcommand(
        tmp_path, monkeypatch, capsys):
    """Ctrl-C printed a traceback ending in "run the same call again to resume", which the ColorDigits
    demo does not do; `demo --quik` was named against the top-level usage line, without a hint."""
    import captum_inn.demo

    monkeypatch.chdir(tmp_path)

    def interrupted(**kwargs):
        raise KeyboardInterrupt("autoencoder stopped after step 128 of 1200: run the same call again to resume")

    monkeypatch.setattr(captum_inn.demo, "run_demo", interrupted)
    assert main(["demo", "--quick"]) == 130
    assert ("captum-inn demo: interrupted; captum_inn_report/ holds no finished report. Run the same command again "
            "(the ColorDigits demo starts afresh).") in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--quik"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("usage: captum-inn demo ")
    assert "captum-inn demo: error: unrecognized arguments: --quik (did you mean --quick?); see captum-inn demo --help" in err


def test_report_says_over_which_images_the_judge_reads_the_attacks():
    """``judge_on_attacked_images`` is the share of the attacks that fool the CNN (analysis.adversarial_views);
    the page called it a share of all the attacked images."""
    from captum_inn.demo import _html

    layer = {"shape": [1], "agreement": 0.5, "agreement_random_condition": 0.1, "judge_agreement": 0.5,
             "variance_explained_by_v": 0.5, "colour_r2_from_v": 0.5, "colour_r2_from_z": 0.1,
             "reencode_beats_null": 0.9}
    metrics = {"layers": {name: layer for name in LAYERS}, "cnn_test_accuracy": 0.9, "n_eval_images": 10,
               "n_samples": 3, "reconstruction_agreement": 0.9, "timings_s": {},
               "adversarial": {"epsilon": 0.03, "fooled_rate": 0.4, "judge_on_attacked_images": 0.885,
                               "layers": {name: {"judged_adversarial": 0.5, "judged_original": 0.5} for name in LAYERS}}}
    figures = {"depth": "figures/by_depth.png", "maps": "figures/invariance_maps.png", "adversarial": "figures/adversarial.png",
               "mixing": "figures/mixing.png", **{f"samples_{n}": f"figures/samples_{n}.png" for n in LAYERS}}
    page = " ".join(_html(metrics, figures).split())
    assert "names the true digit of 88.5% of the attacked images that fool the CNN" in page


def test_metrics_json_writes_nan_as_null_and_the_bounds_read_it_back():
    """json.dumps wrote NaN (the FGSM shares when no image was fooled) as ``NaN``, which is not JSON:
    browsers and most tools refused the whole metrics.json."""
    from captum_inn.demo import report_json
    from captum_inn.photo_demo import check_photo_metrics

    layers = {
        "early": {"depth": 0, "variance_explained_by_v": 0.1, "reencode_beats_null": 1.0},
        "logits": {"depth": 1, "agreement": 0.99, "agreement_random_condition": 0.1, "colour_r2_from_v": 0.9,
                   "colour_r2_from_z": 0.0, "variance_explained_by_v": float("inf"), "reencode_beats_null": 0.0},
    }
    adversarial = {"layers": {n: {"judged_adversarial": float("nan"), "judged_original": float("nan")} for n in layers}}
    text = report_json({"reconstruction_agreement": 0.99, "layers": layers, "adversarial": adversarial})
    metrics = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in metrics.json"))
    assert metrics["adversarial"]["layers"]["logits"]["judged_adversarial"] is None
    failures = check_metrics(metrics)  # null meets no bound, as NaN did before writing
    assert len(failures) == 3 and all("nan" in f for f in failures)
    photo = {"fc": {"agreement": None, "agreement_random_condition": 0.1},
             "layer4": {"reencode_beats_null": 0.9, "reencode_similarity": None}}
    assert check_photo_metrics({"layers": photo}) == ["fc agreement nan < 0.5"]


def test_mixing_figure_pairs_images_when_there_are_fewer_than_two_rows_of_them(tmp_path, monkeypatch):
    """With ``n_eval`` below ``2 * n_figure_rows`` the mixing figure's b rows were short, and
    mix_images refused them after the whole run."""
    from types import SimpleNamespace

    import matplotlib.pyplot as plt

    import captum_inn.demo
    from captum_inn.demo import _draw_analyses

    pairs = []
    monkeypatch.setattr(captum_inn.demo, "mix_images", lambda explainers, a, b: pairs.append((a, b)) or {})
    monkeypatch.setattr(captum_inn.demo, "plot_mixing", lambda a, b, mixed: plt.subplots())
    (tmp_path / "figures").mkdir()
    attack = SimpleNamespace(plot=lambda rows: plt.subplots())
    images = torch.arange(5.0).view(5, 1, 1, 1)
    for n, rows, expected in ((5, 2, [2, 3]), (5, 4, [4, 0, 1, 2]), (3, 3, [1, 2, 0])):
        _draw_analyses(tmp_path, attack, {}, images[:n], rows)
        a, b = pairs.pop()
        assert a.flatten().tolist() == list(range(rows)) and b.flatten().tolist() == expected


def test_runs_inside_a_callers_inference_mode(tmp_path):
    """A notebook cell under torch.inference_mode() built the demo's CNN with inference tensors as
    weights, which cannot train: fit_classifier stopped at the first model."""
    state = torch.get_rng_state()
    with torch.inference_mode():
        index = run_demo(out=tmp_path, settings=TINY, progress=False)
        assert torch.is_inference_mode_enabled()
    assert json.loads((index.parent / "metrics.json").read_text())["cnn_test_accuracy"] > 0
    assert torch.equal(torch.get_rng_state(), state)  # the models were seeded by reseeding the caller's stream


def test_run_demo_refuses_a_seed_the_fits_cannot_take_before_any_work(tmp_path):
    """The fits take seeds below 2**53 (they derive more from them); a larger one passed to run_demo
    was refused by the autoencoder fit, after the CNN and the judge had trained."""
    from captum_inn.demo import run_demo
    from captum_inn.photo_demo import run_photo_demo

    for run in (lambda: run_demo(out=tmp_path / "report", quick=True, seed=2**60),
                lambda: run_photo_demo(tmp_path, out=tmp_path / "report", quick=True, seed=-1)):
        with pytest.raises(ValueError, match=r"`seed` must lie in 0 … 2\*\*52"):
            run()
    assert not (tmp_path / "report").exists()


def test_report_pages_are_written_in_utf8_whatever_the_locale(tmp_path):
    """The pages declare UTF-8 and hold R² and −; written in the locale's encoding they showed
    garbage (cp1252) or failed at the very end of a run (ASCII: UnicodeEncodeError)."""
    import os
    import subprocess
    import sys

    page = tmp_path / "index.html"
    # the text as escapes: a C locale's argv cannot carry it
    code = (f"from pathlib import Path; from captum_inn.demo import write_report_file; "
            f"write_report_file(Path({str(page)!r}), 'R\\u00b2 1 \\u2212 v')")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    subprocess.run([sys.executable, "-X", "utf8=0", "-c", code], check=True, env=env)
    assert page.read_bytes().decode("utf-8") == "R² 1 \u2212 v"


def test_a_report_inside_the_photo_folder_is_refused(tmp_path):
    """Its figures/ and checkpoints/ were read as classes without photos: the run failed blaming the
    photos, and so did every later run on that folder until the empty folders were deleted."""
    from captum_inn.demo import check_report_arguments

    for name in ("a", "b"):
        (tmp_path / "photos" / name).mkdir(parents=True)
        for i in range(2):
            (tmp_path / "photos" / name / f"{i}.png").write_bytes(b"")
    for out in (tmp_path / "photos" / "report", tmp_path / "photos"):
        with pytest.raises(ValueError, match=r"`out` .* lies inside `images`"):
            check_report_arguments(out, "cpu", tmp_path / "photos")
    (tmp_path / "photos" / "report" / "figures").mkdir(parents=True)  # left by an earlier run: still named
    with pytest.raises(ValueError, match=r"`out` .* lies inside `images`"):
        check_report_arguments(tmp_path / "photos" / "report", "cpu", tmp_path / "photos")
    (tmp_path / "photos" / "report" / "figures").rmdir()
    (tmp_path / "photos" / "report").rmdir()
    assert check_report_arguments(tmp_path / "report", "cpu", tmp_path / "photos") == tmp_path / "report"
    assert sorted(p.name for p in (tmp_path / "photos").iterdir()) == ["a", "b"]
    assert [p.name for p in tmp_path.iterdir()] == ["photos"]  # the trial of writing left nothing


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where no folder can be created")
def test_a_report_folder_that_cannot_be_created_is_a_usage_error(capsys):
    """The checks passed and mkdir then failed with a traceback (root may create folders whatever the
    permission bits say, so the check tries to create one)."""
    from captum_inn.cli import main

    assert main(["demo", "--quick", "--out", "/proc/captum_inn_report"]) == 2
    assert ("--out '/proc/captum_inn_report' cannot be written: creating a folder in '/proc' failed"
            in capsys.readouterr().err)


def test_run_demo_refuses_evaluation_sets_of_one_before_any_work(tmp_path):
    from captum_inn.demo import DemoSettings, run_demo

    for name in ("n_eval", "n_concept_eval"):
        with pytest.raises(ValueError, match=rf"`settings.{name}` must be >= 2"):
            run_demo(out=tmp_path / "report", settings=dataclasses.replace(DemoSettings.quick(), **{name: 1}))
    # these failed only after minutes of training
    for change, message in (({"n_figure_rows": 0}, "`settings.n_figure_rows` must be >= 1"),
                            ({"fgsm_epsilon": 0.0}, "`settings.fgsm_epsilon` must be > 0")):
        with pytest.raises(ValueError, match=message):
            run_demo(out=tmp_path / "report", settings=dataclasses.replace(DemoSettings.quick(), **change))
    assert not (tmp_path / "report").exists()


def test_cli_passes_its_options_to_the_demo_with_the_documented_defaults(demo_calls):
    """The demo runs with what the command line says: full settings without --quick, seed 0 by default and
    any seed in 0 … 2**52, --threads from 1, the device and --concepts as given; the photo demo too."""
    assert main(["demo"]) == 0
    assert demo_calls.pop() == ((), "captum_inn_report", dict(quick=False, seed=0, device="cpu", concepts=False))
    assert main(["demo", "--quick", "--seed", str(2**52), "--device", "cpu:0", "--concepts"]) == 0
    assert demo_calls.pop() == ((), "captum_inn_report", dict(quick=True, seed=2**52, device="cpu:0", concepts=True))
    assert main(["demo", "--seed", "0", "--threads", "1"]) == 0
    assert demo_calls.pop()[2]["seed"] == 0
    assert main(["demo", "--seed", "7", "--images", "photos", "--device", "cpu:0"]) == 0
    assert demo_calls.pop() == (("photos",), "captum_inn_photo_report", dict(quick=False, seed=7, device="cpu:0"))


def test_check_metrics_bounds_are_inclusive_and_read_from_their_own_keys():
    """A ``_min`` bound is met by its value and a ``_max`` bound too; each bound is compared with the
    metric it names (the adversarial one of the early layer, the completeness error's ``_max``)."""
    from captum_inn.demo import BOUNDS

    layers = {
        "early": {"depth": 0, "variance_explained_by_v": 0.25, "reencode_beats_null": 0.90},
        "logits": {"depth": 1, "agreement": 0.85, "agreement_random_condition": 0.30, "colour_r2_from_v": 0.6,
                   "colour_r2_from_z": 0.2, "variance_explained_by_v": 0.75, "reencode_beats_null": 0.0},
    }
    adversarial = {"layers": {"early": {"judged_adversarial": 0.0, "judged_original": 0.80},
                              "logits": {"judged_adversarial": 0.60, "judged_original": 0.0}}}
    at_bounds = {"reconstruction_agreement": 0.95, "layers": layers, "adversarial": adversarial}
    assert check_metrics(at_bounds, BOUNDS) == []
    adversarial["layers"]["early"]["judged_original"] = 0.5  # the early view, not the logits', is judged original
    assert check_metrics(at_bounds, BOUNDS) == ["FGSM: early view judged as the original class 0.500 < 0.8"]
    concepts = {"swap_digit_judge_donor": 0.9, "swap_digit_colours_kept": 0.9, "swap_fg_digit_kept": 0.95,
                "swap_fg_colour_moved": 0.9, "attribution_completeness_max_rel_error": 0.5}
    failures = check_metrics({"reconstruction_agreement": 0.99, "layers": layers, "concepts": concepts},
                              {"attribution_completeness_max_rel_error_max": 0.05})
    assert failures == ["concept attribution completeness error 0.500 > 0.05"]
    # the quick bounds are looser than the full demo's, but the random-condition agreement at the logits
    assert QUICK_BOUNDS["logits_agreement_random_condition_max"] == 0.20 < BOUNDS["logits_agreement_random_condition_max"]


def test_check_metrics_dynamics_and_factor_sizes_compare_the_documented_points():
    """The digit share must rise and the background's fall from the first checkpoint with test
    accuracy <= the bound (the last checkpoint is not an early one) to the last; the fc digit factor
    must be larger than both colours'."""
    from captum_inn.demo import _dynamics_failures

    def point(acc, digit, background):
        return {"accuracy": acc, "encoded": {"digit": digit, "background": background}}

    # the first early point (accuracy exactly at the bound) is compared, not the later early one
    dynamics = [point(0.3, 0.1, 0.6), point(0.2, 0.6, 0.05), point(0.99, 0.5, 0.1)]
    assert _dynamics_failures(dynamics, 0.3) == []
    assert _dynamics_failures([point(0.2, 0.5, 0.1), point(0.25, 0.5, 0.1)], 0.3) == [
        "training dynamics: digit share did not rise (0.500 -> 0.500)",
        "training dynamics: background share did not fall (0.100 -> 0.100)"]
    # a last checkpoint alone below the bound is no early checkpoint
    assert _dynamics_failures([point(0.9, 0.1, 0.6), point(0.2, 0.5, 0.1)], 0.3) == [
        "training dynamics: no checkpoint with test accuracy <= 0.3"]
    concepts = {"swap_digit_judge_donor": 0.9, "swap_digit_colours_kept": 0.9, "swap_fg_digit_kept": 0.95,
                "swap_fg_colour_moved": 0.9, "attribution_completeness_max_rel_error": 0.001,
                "factor_sizes": {"fc": {"digit": 20, "foreground": 10, "background": 10},
                                 "code": {"digit": 6, "foreground": 3, "background": 3}}}
    assert check_metrics({"reconstruction_agreement": 0.99, "layers": {}, "concepts": concepts},
                         {"factor_sizes_order": True}) == ["estimated factor sizes at fc: digit 20 <= colours 20"]


def test_report_arguments_take_hidden_entries_and_the_largest_seed_and_refuse_a_folder_named_index_html(tmp_path):
    """A report folder may hold hidden entries (.git, .DS_Store); seeds run to 2**52 inclusive; an
    ``index.html`` that is a folder is not a report's page."""
    from captum_inn.demo import check_report_arguments

    (tmp_path / "report").mkdir()
    (tmp_path / "report" / ".DS_Store").write_text("")
    assert check_report_arguments(tmp_path / "report", "cpu", seed=2**52) == tmp_path / "report"
    (tmp_path / "report" / "index.html").mkdir()
    with pytest.raises(ValueError, match=r"holds files that are not part of a captum_inn report \('index.html'\)"):
        check_report_arguments(tmp_path / "report", "cpu")
