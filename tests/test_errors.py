"""Bad input gets a JaxicError that names the culprit and says how to fix it."""

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
import pytest

import jaxic
from jaxic.models import pedagogical


def compile_(model, observed=("obs",), **kw):
    return jaxic.compile(model, observed=list(observed), key=jax.random.key(0), num_steps=0, progress=False, **kw)


def test_model_without_latents():
    def model():
        numpyro.sample("obs", dist.Normal(0.0, 1.0))

    with pytest.raises(jaxic.ModelError, match="no latent sample sites"):
        compile_(model)


def test_observed_name_that_is_not_a_site():
    with pytest.raises(jaxic.ObservationError, match=r"'ob' is not a sample site.*'obs'"):
        compile_(pedagogical, observed=["ob"], model_kwargs={"M": 1})


def test_site_already_observed_inside_the_model():
    def model(data=1.0):
        x = numpyro.sample("x", dist.Normal(0.0, 1.0))
        numpyro.sample("obs", dist.Normal(x, 1.0), obs=data)

    with pytest.raises(jaxic.ObservationError, match="already has a value inside the model"):
        compile_(model)


def test_distribution_without_a_head_names_site_and_support():
    def model():
        direction = numpyro.sample("direction", dist.ProjectedNormal(jnp.zeros(3)))
        numpyro.sample("obs", dist.Normal(direction.sum(), 1.0))

    with pytest.raises(jaxic.UnsupportedDistributionError, match=r"site 'direction'.*Sphere.*propose"):
        compile_(model)


def test_untraceable_model_explains_where_and_what_to_do():
    def model():
        x = numpyro.sample("x", dist.Normal(0.0, 1.0))
        if x > 0:
            numpyro.sample("obs", dist.Normal(x, 1.0))
        else:
            numpyro.sample("obs", dist.Normal(-x, 2.0))

    with pytest.raises(jaxic.UntraceableModelError, match=r"test_errors.py:\d+ in model: `if x > 0:`.*jnp.where"):
        compile_(model, path="masked")
    # By default jaxic says why and takes the universal (eager) path instead of failing.
    with pytest.warns(UserWarning, match=r"test_errors.py:\d+ in model: `if x > 0:`.*universal path"):
        assert compile_(model).path == "universal"


def test_model_that_raises_is_reported_with_its_location():
    def model():
        numpyro.sample("x", dist.Normal(0.0, 1.0))
        raise RuntimeError("boom")

    with pytest.raises(jaxic.ModelError, match=r"RuntimeError: boom.*test_errors.py"):
        compile_(model)


@pytest.fixture(scope="module")
def compiled():
    return compile_(pedagogical, model_kwargs={"M": 1})


def test_bad_observations(compiled):
    key = jax.random.key(0)
    with pytest.raises(jaxic.ObservationError, match=r"site 'obs' has shape \(2, 2\); expected \(\)"):
        compiled.posterior(key, {"obs": jnp.ones((2, 2))})
    with pytest.raises(jaxic.ObservationError, match="no observation given for \\['obs'\\]"):
        compiled.posterior(key, {})
    with pytest.raises(jaxic.ObservationError, match="\\['y'\\] are not observed sites"):
        compiled.posterior(key, {"obs": 1.0, "y": 2.0})


def test_every_error_is_a_jaxic_error():
    for cls in (jaxic.ModelError, jaxic.UntraceableModelError, jaxic.ObservationError,
                jaxic.UnsupportedDistributionError, jaxic.CheckpointError):
        assert issubclass(cls, jaxic.JaxicError)


def test_error_locations_carry_no_machine_folders(tmp_path, monkeypatch):
    """user_frame names a file relative to the current folder or its import root, a Jupyter cell as
    <notebook cell>, and only a file outside both by its full path."""
    from jaxic.tracing import user_frame

    def location(relative):
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("def model():\n    raise ValueError('bad draw')\n")
        namespace = {}
        exec(compile(path.read_text(), str(path), "exec"), namespace)
        with pytest.raises(ValueError) as caught:
            namespace["model"]()
        return user_frame(caught.value)

    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    line = ":2 in model: `raise ValueError('bad draw')`"
    assert location("cwd/models/m.py") == "models/m.py" + line
    assert location("lib/pkg/m.py") == "pkg/m.py" + line
    assert location("ipykernel_123/4567.py") == "<notebook cell>" + line
    assert location("elsewhere/m.py") == str(tmp_path / "elsewhere" / "m.py") + line
    # A package imported through an editable install's finder (its root on no sys.path entry).
    for package in ("editable/mypkg", "editable/mypkg/models"):
        (tmp_path / package).mkdir(parents=True, exist_ok=True)
        (tmp_path / package / "__init__.py").write_text("")
    assert location("editable/mypkg/models/m.py") == "mypkg/models/m.py" + line
