"""The experiment helpers under benchmarks/: public jaxic functions only, the compiled model's
configuration left alone, the jaxpr FLOP counter, and the one JSON writer that keeps machine paths out of
the published results."""

import json
import re
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxic
from benchmarks.flops import dot_flops, matmul_flops, matmul_products
from benchmarks.pedagogical_metrics import heldout_log_q, heldout_loss, train_for
from benchmarks.results_io import (NOTES_MARKER, REPO_ROOT, portable, replace_section, repo_relative,
                                   write_results_json)
from jaxic.models import pedagogical

# The tests of the trained-network helpers and the FLOP counter are the slow tier (marked one by one);
# the results_io tests at the end are fast.

TINY = jaxic.TransformerConfig(d_model=16, num_layers=1, num_heads=2, num_components=2)
NUM_HELDOUT = 200


@pytest.fixture(scope="module")
def trained():
    compiled = jaxic.compile(pedagogical, ["obs"], jax.random.key(0), num_steps=0, model_kwargs={"M": 2},
                             network=TINY, validation_size=NUM_HELDOUT, progress=False)
    config = compiled.train_config
    return compiled, config, train_for(compiled, steps=50)


@pytest.mark.slow
def test_train_for_trains_in_chunks_and_leaves_the_config_alone(trained):
    compiled, config, report = trained
    assert compiled.train_config is config
    assert compiled.step == report["steps"] == 50 and report["warmup_steps"] == config.steps_per_call == 25
    assert len(compiled.history["loss"]) == 50
    assert compiled.history["validation_loss"] == []  # the curve is the helper's, not the model's history
    assert [row[1] for row in report["curve"]] == [25, 50]
    assert report["curve"][-1][2] == compiled.validation_loss()
    assert report["train_s"] > 0 and report["wall_s"] >= report["train_s"]


@pytest.mark.slow
def test_train_for_takes_one_budget(trained):
    compiled, _, _ = trained
    with pytest.raises(ValueError, match="exactly one of seconds= and steps="):
        train_for(compiled, seconds=1.0, steps=10)
    with pytest.raises(ValueError, match=">= 0"):
        train_for(compiled, steps=-1)
    assert train_for(compiled, steps=0)["curve"] == [] and compiled.step == 50


@pytest.mark.slow
def test_heldout_losses_match_the_validation_loss_and_add_up_over_sites(trained):
    compiled, _, _ = trained
    log_q = heldout_log_q(compiled, batch_size=64)  # 200 traces: the last batch wraps round
    assert log_q.shape == (NUM_HELDOUT, 4)
    total = heldout_loss(compiled, batch_size=64)
    np.testing.assert_allclose(total, compiled.validation_loss(), rtol=1e-6)
    np.testing.assert_allclose(-log_q.sum(-1).mean(), total, rtol=1e-5)
    xy = heldout_loss(compiled, sites=["x", "y"])
    nuisance = heldout_loss(compiled, sites=["nuisance_0", "nuisance_1"])
    np.testing.assert_allclose(xy + nuisance, total, rtol=1e-5)
    assert xy != total and nuisance != total


@pytest.mark.slow
def test_matmul_flops_count_scan_bodies_per_iteration():
    a = jnp.ones((8, 8))
    scanned = jax.make_jaxpr(lambda a: jax.lax.scan(lambda c, _: (c @ a, None), a, length=5)[0])(a).jaxpr
    assert matmul_products(scanned) == {((8, 8), (8, 8), (((1,), (0,)), ((), ())), "float32"): 5}
    assert matmul_flops(scanned) == 5 * 2 * 8**3
    assert dot_flops((3, 4, 5), (3, 5, 6), (((2,), (1,)), ((0,), (0,)))) == 2 * 3 * 4 * 6 * 5
    branchy = jax.make_jaxpr(lambda p, a: jax.lax.cond(p, lambda a: a @ a @ a, lambda a: a @ a, a))(True, a).jaxpr
    assert matmul_flops(branchy) == 2 * 2 * 8**3  # the dearer branch


# --- results_io: the benchmarks' JSON results carry no machine paths ----------------------------------

BENCHMARKS = REPO_ROOT / "benchmarks"
MACHINE_PATH = re.compile(r"/work/|/home/|/tmp/|/Users/|/root/|[A-Za-z]:\\\\")


def test_a_rerun_replaces_the_measured_part_of_its_section_and_keeps_the_notes():
    text = ("# jaxic benchmarks\n\n## A\n\n| old table |\n\n" + NOTES_MARKER + "\n- why the old table looks so\n\n"
            "## B\n\nother section\n")
    new = replace_section(text, "## A", ["| new table |"])
    assert "| old table |" not in new and "| new table |" in new
    assert new.index("| new table |") < new.index(NOTES_MARKER) < new.index("- why the old table looks so") < new.index("## B")
    assert new.endswith("## B\n\nother section\n")
    assert replace_section(new, "## A", ["| newer |"]).count(NOTES_MARKER) == 1
    # Without the marker the whole section is the script's.
    assert replace_section("## A\n\nold\n", "## A", ["new"]) == "## A\n\nnew\n"


def test_repo_relative_inside_the_root_and_relative_to_the_current_folder(tmp_path, monkeypatch):
    root = tmp_path / "repo"
    (root / "benchmarks").mkdir(parents=True)
    assert repo_relative(root / "benchmarks" / "results" / "a.json", root) == "benchmarks/results/a.json"
    assert repo_relative(str(root), root) == "."
    monkeypatch.chdir(root / "benchmarks")
    assert repo_relative(Path("figures") / "f.png", root) == "benchmarks/figures/f.png"
    assert repo_relative(REPO_ROOT / "benchmarks" / "RESULTS.md") == "benchmarks/RESULTS.md"


def test_repo_relative_outside_the_root_keeps_the_name_and_warns(tmp_path):
    with pytest.warns(UserWarning, match=r"/elsewhere/out/peer\.json lies outside the repository .*'peer\.json'"):
        assert repo_relative("/elsewhere/out/peer.json", tmp_path) == "peer.json"
    with pytest.warns(UserWarning, match=r"outside the repository .*'r\.json'"):
        assert repo_relative("C:\\Users\\me\\r.json", tmp_path) == "r.json"


def test_portable_rewrites_paths_whole_and_inside_texts_and_nothing_else(tmp_path):
    payload = {"config": {"json": tmp_path / "results" / "x.json", "output": str(tmp_path / "RESULTS.md"),
                          "seeds": (0, 1), "lr": 1e-3, "section": None},
               "commands": [f"python benchmarks/x.py --json {tmp_path}/results/x.json --figure f.png"],
               "text": "3.2 ms/step, ESS/N 0.41 of 1/2, see https://example.org/a/b and benchmarks/figures/f.png"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing here lies outside the root
        out = portable(payload, tmp_path)
    assert out == {"config": {"json": "results/x.json", "output": "RESULTS.md", "seeds": [0, 1], "lr": 1e-3,
                              "section": None},
                   "commands": ["python benchmarks/x.py --json results/x.json --figure f.png"],
                   "text": payload["text"]}
    assert portable({"M": 3, "ok": True}, tmp_path) == {"M": 3, "ok": True}


def test_write_results_json_stores_relative_paths_and_plain_numbers(tmp_path):
    target = tmp_path / "benchmarks" / "results" / "run.json"
    payload = {"figure": tmp_path / "benchmarks" / "figures" / "run.png", "loss": np.float32(0.5),
               "ess": jnp.asarray([1.0, 2.0]), "steps": np.int64(7)}
    assert write_results_json(target, payload, tmp_path) == target
    text = target.read_text()
    assert str(tmp_path) not in text and text.endswith("\n")
    assert json.loads(text) == {"figure": "benchmarks/figures/run.png", "loss": 0.5, "ess": [1.0, 2.0], "steps": 7}
    assert sorted(p.name for p in target.parent.iterdir()) == ["run.json"]  # no temporary file left


def test_every_benchmark_json_writer_goes_through_write_results_json():
    direct = re.compile(r"json\.dumps?\(")
    writers = {p.name: [n for n, line in enumerate(p.read_text().splitlines(), 1) if direct.search(line)]
               for p in BENCHMARKS.glob("*.py") if p.name != "results_io.py"}
    assert {name: lines for name, lines in writers.items() if lines} == {}
    for script in ("attention_vs_lstm.py", "proposal_comparison.py", "pyro_csis.py"):
        assert "write_results_json(" in (BENCHMARKS / script).read_text(), script


@pytest.mark.parametrize("path", sorted((BENCHMARKS / "results").glob("*.json")), ids=lambda p: p.name)
def test_stored_results_hold_no_machine_paths(path):
    text = path.read_text()
    assert not MACHINE_PATH.search(text), f"{path.name}: {MACHINE_PATH.search(text).group(0)!r}"
    data = json.loads(text)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert portable(data) == data
