"""Training controls: a time budget with a fitted schedule, early stopping, callbacks and their
writers, the validation loss of objectives that train the model, and the labels of the curve."""

import csv
import struct
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest

import jaxic
from jaxic import training
from jaxic.callbacks import CSVLogger, TensorBoardLogger, TrainingRecord
from jaxic.models import pedagogical
from jaxic.plots import plot_training
from jaxic.tracing import ParameterisedModel

matplotlib.use("Agg")

TINY = jaxic.TransformerConfig(d_model=16, num_layers=1, num_heads=2, num_components=2)
KW = dict(observed=["obs"], batch_size=8, validation_size=16, model_kwargs={"M": 3}, network=TINY, progress=False)
PEAK = 3e-3  # compile's default learning rate


@pytest.fixture(scope="module")
def untrained():
    return jaxic.compile(pedagogical, key=jax.random.key(0), num_steps=0, **KW)  # a constant rate


@pytest.fixture(scope="module")
def compiled(untrained):
    # The first train() compiles the loop (about a minute on a busy 2-core machine), once for every test here.
    return untrained.train(25, progress=False)


# ---------------------------------------------------------------------------------------------
# The schedule and its refittable horizon

def test_warmup_cosine_values():
    rates = np.asarray(training.warmup_cosine(np.arange(1200), 1000, 1e-3))
    assert rates[0] == pytest.approx(1e-5)  # warm-up over 100 steps, from 1/100 of the peak
    assert rates[99] == pytest.approx(1e-3)
    assert rates[999] == pytest.approx(5e-5, rel=1e-6)  # the end value exactly at the last step
    assert rates[998] > rates[999] and rates[1199] == pytest.approx(5e-5, rel=1e-6)
    assert np.all(np.diff(rates[99:1000]) < 0)
    flat = np.asarray(training.warmup_cosine(np.array([0, 99, 100, 5000]), 0, 1e-3))  # no horizon
    np.testing.assert_allclose(flat, [1e-5, 1e-3, 1e-3, 1e-3], rtol=1e-6)


def test_the_optimizer_applies_the_schedule_and_set_num_steps_refits_it():
    # Adam's first steps on a constant unit gradient move by the learning rate itself.
    optimizer = training.default_optimizer(10, learning_rate=1.0, clip_norm=1e9, weight_decay=0.0)
    params, grads = jnp.zeros(()), jnp.ones(())
    state = optimizer.init(params)
    assert training.schedule_hyperparams(state) == {"learning_rate": 1.0, "num_steps": 10, "warmup_steps": -1}
    update = jax.jit(optimizer.update)
    applied = []
    for count in range(6):
        if count == 3:
            state = training.set_num_steps(state, 20)
        step, state = update(grads, state, params)
        applied.append(-float(step))
    expected = [training.warmup_cosine(c, 10 if c < 3 else 20, 1.0) for c in range(6)]
    np.testing.assert_allclose(applied, np.asarray(expected), rtol=1e-4)
    assert update._cache_size() == 1  # a new horizon is a value in the state, not a recompilation
    with pytest.raises(jaxic.JaxicError, match="default_optimizer"):
        training.set_num_steps(optax.adam(1e-3).init(params), 20)
    assert training.schedule_hyperparams(optax.adam(1e-3).init(params)) is None


@pytest.mark.slow
def test_seconds_fit_the_schedule_to_end_exactly_at_the_last_step(compiled):
    start = compiled.step
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "past the schedule's horizon" warning
        compiled.train(seconds=2.0, progress=False)
    assert compiled.step == compiled.train_config.num_steps > start + 25
    rates = compiled.history["learning_rate"]
    assert len(rates) == len(compiled.history["loss"]) == compiled.step
    assert rates[-1] == pytest.approx(0.05 * PEAK, rel=1e-6) and rates[-2] > rates[-1]
    assert rates[-1] == pytest.approx(float(training.warmup_cosine(compiled.step - 1, compiled.step, PEAK)))
    assert compiled.learning_rate() == pytest.approx(0.05 * PEAK, rel=1e-6)
    assert compiled.history["validation_step"][-1] == compiled.step
    assert compiled.loop.compilations() == 1


@pytest.mark.slow
def test_seconds_hold_when_training_is_slower_than_the_timed_chunk(compiled):
    """Callbacks (or a busier machine) slow every chunk after the timing: the schedule is refitted on
    the way, so training ends at the budget with the rate at its floor."""
    start, begin, ends = compiled.step, time.monotonic(), []

    def slow(record):
        time.sleep(0.15)
        ends.append(time.monotonic())

    compiled.train(seconds=3.0, progress=False, callbacks=[slow])
    elapsed = time.monotonic() - begin
    # At most about one chunk past the budget; a chunk's length is measured, since a loaded machine stretches it.
    slowest_chunk = max(np.diff([begin, *ends]))
    assert elapsed < 3.0 + max(0.5, 1.5 * slowest_chunk), (elapsed, slowest_chunk)
    assert compiled.step == compiled.train_config.num_steps > start
    rates = compiled.history["learning_rate"]
    assert rates[-1] == pytest.approx(0.05 * PEAK, rel=1e-6)
    assert compiled.loop.compilations() == 1


@pytest.mark.parametrize("bad, message", [({"seconds": 0}, "seconds"), ({"seconds": float("nan")}, "seconds"),
                                          ({"seconds": "10"}, "seconds"), ({"patience": 0}, "patience"),
                                          ({"patience": 2, "validate": False}, "validate=True"),
                                          ({"callbacks": [print, 3]}, r"callbacks\[1\]"),
                                          ({"callbacks": "log.csv"}, "callbacks")])
def test_bad_training_controls_are_named(untrained, bad, message):
    step = untrained.step
    with pytest.raises(jaxic.JaxicError, match=message):
        untrained.train(10, progress=False, **bad)
    assert untrained.step == step


def test_compile_checks_seconds_before_tracing():
    with pytest.raises(jaxic.JaxicError, match=r"seconds must be a finite number > 0, got -1.0"):
        jaxic.compile(pedagogical, key=jax.random.key(0), seconds=-1.0, **KW)


# ---------------------------------------------------------------------------------------------
# Early stopping and callbacks

@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:training to step")
def test_patience_stops_early_and_restores_the_best_parameters(compiled):
    # The peak rate (no decay) keeps the validation loss moving, so that it stops improving soon.
    compiled.state = compiled.state._replace(opt_state=training.set_num_steps(compiled.state.opt_state, 0))
    start, seen = compiled.step, len(compiled.history["validation_loss"])
    compiled.train(1000, patience=2, progress=False)
    steps = compiled.history["validation_step"][seen:]
    losses = compiled.history["validation_loss"][seen:]
    best = int(np.argmin(losses))
    assert compiled.step < start + 1000  # stopped early
    assert len(losses) - 1 - best == 2  # exactly `patience` validations without a new best
    assert compiled.best_step == steps[best] == compiled.history["best_step"][-1] < compiled.step
    assert compiled.validation_loss() == losses[best] < losses[-1]  # the best parameters are back
    assert len(compiled.history["loss"]) == compiled.step  # the history goes on as trained


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:training to step")
def test_callbacks_get_each_chunk_and_can_stop_training(compiled, tmp_path):
    records = []

    def collect(record):
        records.append(record)
        return len(records) == 3  # True stops training after this chunk

    log = CSVLogger(tmp_path / "log.csv")
    start = compiled.step
    compiled.train(500, callbacks=[collect, log], progress=False)
    assert compiled.step == start + 75 and [r.step for r in records] == [start + 25, start + 50, start + 75]
    history = compiled.history
    for r in records:
        chunk = slice(r.step - 25, r.step)
        assert r.loss == pytest.approx(np.mean(history["loss"][chunk]), rel=1e-6)
        assert r.validation_loss == history["validation_loss"][history["validation_step"].index(r.step)]
        assert r.learning_rate == history["learning_rate"][r.step - 1]
        assert r.metrics == {"dropped": float(np.sum(history["dropped"][chunk])),
                             "log_q": pytest.approx(np.mean(history["log_q"][chunk]), rel=1e-6)}

    rows = list(csv.reader(open(tmp_path / "log.csv")))
    assert rows[0] == ["step", "loss", "validation_loss", "learning_rate", "dropped", "log_q"]
    assert [float(x) for x in rows[1]] == [records[0].step, records[0].loss, records[0].validation_loss,
                                           records[0].learning_rate, 0.0, records[0].metrics["log_q"]]
    assert len(rows) == 4
    CSVLogger(tmp_path / "log.csv")(records[0]._replace(validation_loss=None))  # a later run continues the file
    rows = list(csv.reader(open(tmp_path / "log.csv")))
    assert len(rows) == 5 and rows[4][2] == "" and rows.count(rows[0]) == 1


def test_csv_logger_never_touches_a_file_it_did_not_write(tmp_path):
    foreign = tmp_path / "results.csv"
    foreign.write_text("a,b\n1,2\n")
    with pytest.raises(jaxic.JaxicError, match="results.csv.*not a jaxic training log"):
        CSVLogger(foreign)
    assert foreign.read_text() == "a,b\n1,2\n"
    with pytest.raises(jaxic.JaxicError, match="is a folder"):
        CSVLogger(tmp_path)
    log = CSVLogger(tmp_path / "own.csv")
    log(TrainingRecord(25, 1.0, None, None, {"dropped": 0.0}))
    with pytest.raises(jaxic.JaxicError, match=r"own.csv.*\['dropped'\].*\['elbo'\]"):
        log(TrainingRecord(50, 1.0, None, None, {"elbo": -3.0}))


def scalars_in_event_files(logdir) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value)]}`` from TensorBoard event files: TensorBoard's own reader when installed,
    else the TFRecord framing (length, CRC, payload, CRC) decoded with tensorboardX's ``Event`` protobuf."""
    try:
        from tensorboard.backend.event_processing import event_accumulator
    except ImportError:
        from tensorboardX.proto import event_pb2
        read = {}
        for path in sorted(Path(logdir).glob("events.out.tfevents.*")):
            data, offset = path.read_bytes(), 0
            while offset < len(data):
                (length,) = struct.unpack("<Q", data[offset:offset + 8])
                event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
                offset += 12 + length + 4
                for value in event.summary.value:
                    read.setdefault(value.tag, []).append((event.step, value.simple_value))
        return read
    events = event_accumulator.EventAccumulator(str(logdir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_logger_writes_scalars_an_event_reader_reads_back(tmp_path):
    pytest.importorskip("tensorboardX", reason="TensorBoardLogger needs tensorboardX (jaxic[tensorboard])")
    records = [TrainingRecord(25, 2.5, None, 1e-3, {"elbo": -4.0}), TrainingRecord(50, 2.0, 1.75, 5e-4, {"elbo": -3.5})]
    with TensorBoardLogger(tmp_path / "tb") as tb:
        for record in records:
            tb(record)
    read = scalars_in_event_files(tmp_path / "tb")
    expected = {"train/loss": [(25, 2.5), (50, 2.0)], "train/learning_rate": [(25, 1e-3), (50, 5e-4)],
                "validation/loss": [(50, 1.75)], "metrics/elbo": [(25, -4.0), (50, -3.5)]}
    for tag, values in expected.items():  # event files hold float32
        assert [s for s, _ in read[tag]] == [s for s, _ in values]
        np.testing.assert_allclose([v for _, v in read[tag]], [v for _, v in values], rtol=1e-6)
    assert sorted(read) == ["metrics/elbo", "train/learning_rate", "train/loss", "validation/loss"]
    (tmp_path / "file").write_text("mine")
    with pytest.raises(jaxic.JaxicError, match="is a file"):
        TensorBoardLogger(tmp_path / "file")
    assert (tmp_path / "file").read_text() == "mine"


# ---------------------------------------------------------------------------------------------
# Objectives that train the model: validated on the model as it is now

def lg(num_data=64):
    theta = numpyro.param("theta", 0.0)
    with numpyro.plate("data", num_data):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        numpyro.sample("x", dist.Normal(z + theta, 0.5))


@pytest.fixture(scope="module")
def elbo_run(tmp_path_factory):
    # A budget far beyond 25 steps: compile(seconds=) takes the fewer, and fits the schedule to them.
    data = {"x": np.asarray(jax.random.normal(jax.random.key(3), (64,))) + 1.0}
    run = tmp_path_factory.mktemp("elbo") / "run"
    compiled = jaxic.compile(lg, observed=["x"], key=jax.random.key(0), num_steps=25, seconds=3600, batch_size=8,
                             validation_size=16, objective="elbo", data=data, local_plate="data", progress=False,
                             checkpoint_dir=run)
    return compiled, run


@pytest.fixture(scope="module")
def elbo_compiled(elbo_run):
    return elbo_run[0]


@pytest.mark.slow
def test_compile_with_seconds_and_a_step_cap_fits_the_schedule_to_the_cap(elbo_run):
    compiled, run = elbo_run
    assert compiled.step == compiled.train_config.num_steps == 25
    assert compiled.train_config.validation_every == 25  # about 20 validations, at least one per chunk
    assert compiled.history["learning_rate"][-1] == pytest.approx(0.05 * PEAK, rel=1e-6)
    assert sorted(p.name for p in run.iterdir()) == ["25", "jaxic.json"]  # at each validation and at the end


def by_hand_negative_elbo(compiled):
    key = jax.random.split(jax.random.key(0), 4)[2]  # the compile key's validation key

    @jax.jit
    def negative_elbo(model_params):
        model = ParameterisedModel(lg, model_params, compiled.param_constraints)
        return jaxic.objectives.elbo().loss(compiled.network, model, key, 16, compiled.data, plate=compiled.plate)[0]

    return lambda model_params: float(negative_elbo(model_params))


@pytest.mark.slow
def test_elbo_validation_is_the_negative_elbo_of_the_current_model(elbo_compiled):
    compiled = elbo_compiled
    assert compiled.history["validation_step"][-1] == 25
    assert compiled.history["validation_loss"][-1] == compiled.validation_loss()
    by_hand = by_hand_negative_elbo(compiled)
    assert compiled.validation_loss() == pytest.approx(by_hand(compiled.state.model_params), rel=1e-5)
    before, trained = compiled.validation_loss(), compiled.state
    moved = {"theta": compiled.state.model_params["theta"] + 3.0}
    try:
        compiled.state = trained._replace(model_params=moved)
        assert compiled.validation_loss() == pytest.approx(by_hand(moved), rel=1e-5)
        assert abs(compiled.validation_loss() - before) > 1.0  # a model far from the data scores worse
    finally:
        compiled.state = trained


@pytest.mark.slow
def test_plot_training_labels_what_each_curve_measures(elbo_compiled, compiled):
    import matplotlib.pyplot as plt

    fig = plot_training(elbo_compiled)
    ax = fig.axes[0]
    assert ax.get_ylabel() == "negative ELBO"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "training: negative ELBO", "smoothed (1 steps)", "validation: negative ELBO (current model)"]
    plt.close(fig)
    fig = plot_training(compiled)
    ax = fig.axes[0]
    assert ax.get_ylabel() == "−log q(x | y)"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[0] == "training: −log q(x | y)" and labels[-1] == "validation: held-out −log q(x | y)"
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# compile_best: candidates scored on the same held-out traces; weight decay


def conjugate(obs=None):
    z = numpyro.sample("z", dist.Normal(0.0, 1.0))
    numpyro.sample("obs", dist.Normal(z, 0.5), obs=obs)


CONJUGATE = dict(batch_size=32, validation_size=512, network=TINY, progress=False)


@pytest.fixture(scope="module")
def selection():
    # A near-frozen candidate, the defaults, and the defaults again: the same key gives the same training and held-out
    # traces, so the two identical candidates must score exactly alike and the earlier one wins the tie.
    return jaxic.compile_best(conjugate, ["obs"], jax.random.key(3), 300,
                              candidates=[{"learning_rate": 1e-7}, {}, {}], **CONJUGATE)


@pytest.mark.slow
def test_compile_best_keeps_the_candidate_with_the_lowest_held_out_loss(selection):
    frozen, trained, again = selection.candidates
    assert selection.chosen == 1
    assert trained.validation_loss == again.validation_loss
    assert selection.compiled.validation_loss() == trained.validation_loss
    # The exact posterior z | obs is N(0.8 obs, 0.2): its expected -log density, the floor of any held-out
    # -log q over 512 traces (standard error about 0.03), is its entropy 0.614.
    entropy = 0.5 * np.log(2 * np.pi * np.e * 0.2)
    assert entropy - 0.1 < trained.validation_loss < frozen.validation_loss - 0.3
    assert [c.steps for c in selection.candidates] == [300, 300, 300]
    lines = selection.summary().splitlines()
    assert [line[0] for line in lines] == [" ", "*", " "] and "learning_rate=1e-07" in lines[0]


@pytest.mark.slow
def test_weight_decay_shrinks_the_network_and_is_kept_in_checkpoints(selection, tmp_path):
    # num_steps=0 compiles with a constant rate, so training on after the reload passes no planned horizon.
    decayed = jaxic.compile(conjugate, ["obs"], jax.random.key(3), 0, weight_decay=1.0, **CONJUGATE).train(
        300, progress=False)
    plain = jaxic.compile(conjugate, ["obs"], jax.random.key(3), 0, weight_decay=0.0, **CONJUGATE).train(
        300, progress=False)
    norm = lambda c: float(np.sqrt(sum(jnp.sum(leaf**2) for leaf in jax.tree.leaves(c.proposal.params))))
    assert norm(decayed) < 0.95 * norm(plain)
    assert selection.compiled.train_config.weight_decay == training.DEFAULT_WEIGHT_DECAY
    decayed.save(tmp_path / "decayed")
    loaded = jaxic.load(tmp_path / "decayed", conjugate)
    assert loaded.train_config.weight_decay == 1.0
    decayed.train(50, progress=False)
    loaded.train(50, progress=False)
    np.testing.assert_allclose(norm(loaded), norm(decayed), rtol=1e-5)
