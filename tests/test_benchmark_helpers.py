"""The experiment helpers under benchmarks/: public jaxic functions only, the compiled model's
configuration left alone, and the jaxpr FLOP counter."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxic
from benchmarks.flops import dot_flops, matmul_flops, matmul_products
from benchmarks.pedagogical_metrics import heldout_log_q, heldout_loss, train_for
from jaxic.models import pedagogical

# Every test here needs a trained or compiled network: the slow tier.
pytestmark = pytest.mark.slow

TINY = jaxic.TransformerConfig(d_model=16, num_layers=1, num_heads=2, num_components=2)
NUM_HELDOUT = 200


@pytest.fixture(scope="module")
def trained():
    compiled = jaxic.compile(pedagogical, ["obs"], jax.random.key(0), num_steps=0, model_kwargs={"M": 2},
                             network=TINY, validation_size=NUM_HELDOUT, progress=False)
    config = compiled.train_config
    return compiled, config, train_for(compiled, steps=50)


def test_train_for_trains_in_chunks_and_leaves_the_config_alone(trained):
    compiled, config, report = trained
    assert compiled.train_config is config
    assert compiled.step == report["steps"] == 50 and report["warmup_steps"] == config.steps_per_call == 25
    assert len(compiled.history["loss"]) == 50
    assert compiled.history["validation_loss"] == []  # the curve is the helper's, not the model's history
    assert [row[1] for row in report["curve"]] == [25, 50]
    assert report["curve"][-1][2] == compiled.validation_loss()
    assert report["train_s"] > 0 and report["wall_s"] >= report["train_s"]


def test_train_for_takes_one_budget(trained):
    compiled, _, _ = trained
    with pytest.raises(ValueError, match="exactly one of seconds= and steps="):
        train_for(compiled, seconds=1.0, steps=10)
    with pytest.raises(ValueError, match=">= 0"):
        train_for(compiled, steps=-1)
    assert train_for(compiled, steps=0)["curve"] == [] and compiled.step == 50


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


def test_matmul_flops_count_scan_bodies_per_iteration():
    a = jnp.ones((8, 8))
    scanned = jax.make_jaxpr(lambda a: jax.lax.scan(lambda c, _: (c @ a, None), a, length=5)[0])(a).jaxpr
    assert matmul_products(scanned) == {((8, 8), (8, 8), (((1,), (0,)), ((), ())), "float32"): 5}
    assert matmul_flops(scanned) == 5 * 2 * 8**3
    assert dot_flops((3, 4, 5), (3, 5, 6), (((2,), (1,)), ((0,), (0,)))) == 2 * 3 * 4 * 6 * 5
    branchy = jax.make_jaxpr(lambda p, a: jax.lax.cond(p, lambda a: a @ a @ a, lambda a: a @ a, a))(True, a).jaxpr
    assert matmul_flops(branchy) == 2 * 2 * 8**3  # the dearer branch
