"""ShampooConfig, AdamConfig and the transformations' numeric arguments: bad
input raises at construction, naming the argument."""

import jax
import numpy as np
import pytest

import optax_shampoo4 as o4


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=3), "bits"),
    (dict(bits=True), "bits"),
    (dict(storage="svd"), "storage"),
    (dict(codebook="x"), "codebook"),
    (dict(block_size=-2), "block_size"),
    (dict(block_size=7), "even"),
    (dict(max_order=0), "max_order"),
    (dict(statistics_every=0), "statistics_every"),
    (dict(inverse_root_every=1.5), "inverse_root_every"),
    (dict(beta=1.0), "beta"),
    (dict(beta=-0.1), "beta"),
    (dict(epsilon=0.0), "epsilon"),
    (dict(epsilon=-1e-6), "epsilon"),
    (dict(bjorck_steps=(1,)), "bjorck_steps"),
    (dict(bjorck_steps=(1, -1)), "bjorck_steps"),
    (dict(bjorck_steps=(True, 1)), "bjorck_steps"),
    (dict(inverse_root_method="qr"), "inverse_root_method"),
    (dict(error_feedback_beta=1.5), "error_feedback_beta"),
    (dict(preconditioning_precision="fast"), "preconditioning_precision"),
    (dict(start_step=0), "start_step"),
    (dict(min_quantized_size=-1), "min_quantized_size"),
    (dict(epsilon="1e-6"), "epsilon"),
    (dict(linalg_precision="tf32"), "linalg_precision"),
    (dict(rectification_precision="tf32"), "rectification_precision"),
    (dict(shard_blocks=0), "shard_blocks"),
    (dict(replicate_roots=True), "replicate_roots"),
    (dict(replicate_roots=1), "replicate_roots"),
    (dict(dimension_numbers=5), "dimension_numbers"),
    (dict(dimension_numbers={"w": (0, 2)}), "dimension_numbers"),
    (dict(
        shard_blocks=jax.sharding.NamedSharding(
            jax.sharding.Mesh(jax.devices()[:1], (
                "b",)), jax.sharding.PartitionSpec())), "shard_blocks"),
])
def test_bad_arguments_raise_at_construction(kwargs, match):
  numeric = {
      "statistics_every", "inverse_root_every", "beta", "epsilon",
      "error_feedback_beta", "start_step"
  }
  with pytest.raises((ValueError, TypeError), match=match) as error:
    if numeric.issuperset(kwargs):
      o4.scale_by_shampoo(**kwargs)
    else:  # structure is validated by the config, when it is built
      o4.ShampooConfig(**kwargs)
  assert "unexpected keyword" not in str(
      error.value)  # the check ran, not the signature


def test_bjorck_steps_default_to_each_algorithms_own():
  """Shampoo rectifies a loaded basis 4 times for its roots, SOAP not at all
  for its rotations; a pair given is used by both, as ints."""
  assert o4.ShampooConfig().bjorck_steps_of("shampoo") == (1, 4)
  assert o4.ShampooConfig().bjorck_steps_of("soap") == (1, 0)
  given = o4.ShampooConfig(bjorck_steps=[2, np.int64(3)])
  assert given.bjorck_steps_of("soap") == given.bjorck_steps_of("shampoo")
  assert given.bjorck_steps == (2, 3) and all(
      type(s) is int for s in given.bjorck_steps)


@pytest.mark.parametrize("name, products, orthonormalization", [
    (None, "BF16_BF16_F32_X3", None),
    ("highest", "HIGHEST", None),
    ("high", "HIGH", "BF16_BF16_F32_X3"),
])
def test_linalg_precision_names_the_products_and_orthonormalization(
    monkeypatch, name, products, orthonormalization):
  """On a GPU, ``"high"`` runs the products at TF32 and the orthonormalization
  at three bf16 passes; a CPU runs every name at fp32."""
  from optax_shampoo4.stacks import linalg_numerics
  config = o4.ShampooConfig(linalg_precision=name)
  assert linalg_numerics(config) == o4.linalg.FP32
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  numerics = linalg_numerics(config)
  precision_name = lambda p: None if p is None else p.name
  assert precision_name(numerics.precision) == products
  assert precision_name(numerics.orthonormalization) == orthonormalization


@pytest.mark.parametrize("changes, rectification", [
    ({}, "HIGH"),
    (dict(bits=8), "BF16_BF16_F32_X3"),
    (dict(linalg_precision="highest"), "HIGHEST"),
    (dict(rectification_precision="bf16_3x"), "BF16_BF16_F32_X3"),
])
def test_rectification_precision_defaults_to_tf32_for_4bit_bases(
    monkeypatch, changes, rectification):
  """On a GPU the Björck steps of 4-bit bases run at TF32 while the rest of
  the update keeps ``linalg_precision``; 8-bit bases and fp32 linear algebra
  keep theirs; a CPU runs everything at fp32."""
  from optax_shampoo4.stacks import linalg_numerics
  config = o4.ShampooConfig(**changes)
  assert linalg_numerics(config) == o4.linalg.FP32
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  numerics = linalg_numerics(config)
  assert numerics.rectification.name == rectification
  assert numerics.precision.name == (
      "HIGHEST" if changes.get("linalg_precision") else "BF16_BF16_F32_X3")


def test_dimension_numbers_from_a_function_are_checked_at_init():
  """A function's result is only known at init: a leaf that is not a
  DimensionNumbers raises there, naming the argument, not deep in blocking."""
  tx = o4.scale_by_shampoo(
      o4.ShampooConfig(dimension_numbers=lambda p: {"w": (0, 2)}))
  with pytest.raises(TypeError, match="dimension_numbers"):
    tx.init({"w": jax.numpy.ones((8, 4, 16))})


def test_a_config_of_the_wrong_type_is_refused():
  with pytest.raises(TypeError, match="config"):
    o4.scale_by_shampoo({"bits": 4})
  with pytest.raises(TypeError, match="adam"):
    o4.shampoo_adamw(1e-3, adam=o4.ShampooConfig())


@pytest.mark.parametrize("kwargs,match", [
    (dict(b1=1.0), "b1"),
    (dict(b2=-0.1), "b2"),
    (dict(eps=-1.0), "eps"),
    (dict(bits=5), "bits"),
    (dict(second_moment="diag"), "second_moment"),
    (dict(block_size=0), "block_size"),
    (dict(min_quantized_size=-1), "min_quantized_size"),
    (dict(second_moment_codebook="x"), "codebook"),
    (dict(implementation="triton"), "implementation"),
])
def test_bad_arguments(kwargs, match):
  numeric = {"b1", "b2", "eps"}
  with pytest.raises((ValueError, TypeError), match=match) as error:
    if numeric.issuperset(kwargs):
      o4.scale_by_adam_4bit(**kwargs)
    else:  # structure is validated by the config, when it is built
      o4.AdamConfig(**kwargs)
  assert "unexpected keyword" not in str(
      error.value)  # the check ran, not the signature


@pytest.mark.parametrize(
    "kwargs",
    [dict(second_moment="rank1"),
     dict(implementation="xla"),
     dict(bits=8)])
def test_packed_needs_the_block_kernels(kwargs):
  arguments = {
      **dict(second_moment="block", implementation="pallas", packed=True),
      **kwargs
  }
  with pytest.raises(ValueError, match="packed"):
    o4.AdamConfig(**arguments)
  with pytest.raises(TypeError, match="packed"):
    o4.scale_by_adam_4bit(
        config=o4.AdamConfig(second_moment="block", implementation="pallas",
                             packed=1))
