"""The optimizers that ``benchmarks/train_lm.py`` compares, by name, and the
schedule that the loop passes to its host-scheduled variants."""

from __future__ import annotations

#: The end of a variant's name whose loop runs each step as two programs: the
#: model's gradient (compiled once) and the optimizer's update, one program per
#: entry of the host's schedule (``train_lm_programs``).
SPLIT_STEP = ", split step"
#: The end of a variant's name whose loop splits the step as ``SPLIT_STEP``
#: does and also runs each preconditioner update as a program of its own
#: before the plain update (``o4.scheduled_parts``).
SPLIT_UPDATES = ", split updates"


def split_of(name):
  """How the variant ``name`` splits its step: ``"step"``, ``"updates"`` or
  None."""
  for suffix, split in ((SPLIT_STEP, "step"), (SPLIT_UPDATES, "updates")):
    if name.endswith(suffix):
      return split
  return None


def _soap_b1_09_variants(soap, bf16_rotations):
  """SOAP with AdamW's ``b1=0.9`` and bf16 rotations: learning rates, the TF32
  refresh, blocks of order 768 and a 2 GiB working set (``soap``: the factory
  of a SOAP variant given its config and keywords)."""
  import dataclasses
  out = {
      f"soap 4-bit, bf16 rotations, b1 0.9 lr {lr}, host-scheduled refresh":
          (float(lr), soap(bf16_rotations, b1=0.9))
      for lr in ("1e-3", "2e-3", "3e-3")
  }
  tf32_refresh = dataclasses.replace(bf16_rotations, linalg_precision="high")
  out["soap 4-bit, bf16 rotations, TF32 refresh, b1 0.9 lr 1e-3, "
      "host-scheduled refresh"] = (1e-3, soap(tf32_refresh, b1=0.9))
  for label, config in (("", bf16_rotations), (", TF32 refresh", tf32_refresh)):
    order_768 = dataclasses.replace(config, max_order=768)
    out[f"soap 4-bit, bf16 rotations{label}, max order 768, b1 0.9 lr 1e-3, "
        "host-scheduled refresh"] = (1e-3, soap(order_768, b1=0.9))
    wider = dataclasses.replace(config, working_set_bytes=2 * 2**30)
    out[f"soap 4-bit, bf16 rotations{label}, 2 GiB working set, b1 0.9 lr "
        "1e-3, host-scheduled refresh"] = (1e-3, soap(wider, b1=0.9))
  # the bases rectified at the statistics step's own precision, as before
  # rectification_precision's TF32 default for 4-bit bases
  bf16_3x = dataclasses.replace(bf16_rotations, working_set_bytes=2 * 2**30,
                                rectification_precision="bf16_3x")
  out["soap 4-bit, bf16 rotations, 2 GiB working set, rectified at bf16_3x, "
      "b1 0.9 lr 1e-3, host-scheduled refresh"] = (1e-3, soap(bf16_3x, b1=0.9))
  return out


def _shampoo_variants(shampoo, base, lr):
  """Shampoo's variants: storage bits, intervals, working set, block orders,
  the loop's schedule (``shampoo``: the factory of a Shampoo variant given its
  config and keywords; ``lr``: their peak learning rate)."""
  import dataclasses
  import optax_shampoo4 as o4
  replaced = lambda **kw: shampoo(dataclasses.replace(base, **kw))
  return {
      "shampoo 4-bit": (lr, shampoo()),
      "shampoo 32-bit": (lr, replaced(bits=32)),
      "shampoo all-4-bit": (lr, shampoo(adam=o4.AdamConfig())),
      "shampoo 4-bit, 100/500":
          (lr, shampoo(statistics_every=100, inverse_root_every=500)),
      "shampoo 4-bit, 50/250":
          (lr, shampoo(statistics_every=50, inverse_root_every=250)),
      "shampoo 4-bit, 100/100":
          (lr, shampoo(statistics_every=100, inverse_root_every=100)),
      "shampoo 4-bit, 256 MiB working set":
          (lr, replaced(working_set_bytes=256 * 2**20)),
      "shampoo 4-bit, max order 768": (lr, replaced(max_order=768)),
      "shampoo 4-bit, max order 768, host-scheduled updates":
          (lr, replaced(max_order=768)),
      "shampoo 4-bit, NaN steps not skipped":
          (lr, shampoo(skip_nonfinite=False)),
      "shampoo 4-bit, host-scheduled updates": (lr, shampoo()),
      "shampoo 4-bit, fp32 linear algebra, host-scheduled updates":
          (lr, replaced(linalg_precision="highest")),
      "shampoo all-4-bit, host-scheduled updates":
          (lr, shampoo(adam=o4.AdamConfig())),
      # before rectification_precision's TF32 default for 4-bit bases
      "shampoo 4-bit, rectified at bf16_3x, host-scheduled updates":
          (lr, replaced(rectification_precision="bf16_3x")),
      "shampoo 4-bit, TF32 linear algebra, host-scheduled updates":
          (lr, replaced(linalg_precision="high")),
      # the shape rule for every leaf, as before ShampooConfig's default left
      # the leaves named "bias" unpreconditioned
      "shampoo 4-bit, biases preconditioned, host-scheduled updates":
          (lr, replaced(dimension_numbers=None)),
      **{
          f"shampoo 4-bit, {gib} GiB working set, host-scheduled updates":
              (lr, replaced(working_set_bytes=gib * 2**30)) for gib in (2, 4)
      },
  }


def _soap_variants(soap, base, bf16_rotations):
  """SOAP's variants at its default ``b1``: storage bits, rotations'
  precision and rectification, working set, and the biases preconditioned
  with AdamW's ``b1`` (``soap``: the factory of a SOAP variant given its
  config and keywords; ``bf16_rotations``: ``base`` with bf16 rotations)."""
  import dataclasses
  import optax_shampoo4 as o4
  fp32 = dataclasses.replace(base, bits=32)

  def rotations(b1=None, **changes):
    """bf16 rotations with ``changes`` to the config, at ``b1`` if given."""
    keywords = {} if b1 is None else dict(b1=b1)
    return soap(dataclasses.replace(bf16_rotations, **changes), **keywords)

  return {
      "soap 4-bit lr 1e-3, host-scheduled refresh": (1e-3, soap()),
      "soap 4-bit lr 3e-3": (3e-3, soap()),
      "soap 4-bit lr 1e-3": (1e-3, soap()),
      "soap 4-bit, bf16 rotations lr 1e-3": (1e-3, soap(bf16_rotations)),
      "soap 4-bit, bf16 rotations lr 1e-3, host-scheduled refresh":
          (1e-3, soap(bf16_rotations)),
      "soap 4-bit, bf16 rotations, rectified each step lr 1e-3, "
      "host-scheduled refresh": (1e-3, rotations(bjorck_steps=(1, 1))),
      "soap 4-bit, bf16 rotations, 4 GiB working set lr 1e-3, "
      "host-scheduled refresh": (1e-3, rotations(working_set_bytes=4 * 2**30)),
      "soap 32-bit lr 3e-3": (3e-3, soap(fp32, moments=o4.AdamConfig(bits=32))),
      "soap 32-bit lr 1e-3": (1e-3, soap(fp32, moments=o4.AdamConfig(bits=32))),
      "soap 4-bit, 8-bit moments lr 1e-3":
          (1e-3, soap(moments=o4.AdamConfig(bits=8))),
      "soap 4-bit, fp32 moments lr 1e-3":
          (1e-3, soap(moments=o4.AdamConfig(bits=32))),
      "soap 4-bit, bf16 rotations, b1 0.9, biases preconditioned lr 1e-3, "
      "host-scheduled refresh": (1e-3, rotations(dimension_numbers=None,
                                                 b1=0.9)),
  }


def optimizers(args, base=None):
  """name -> (peak lr, factory of the optimizer given a schedule), built in the
  child process; ``base``: the ShampooConfig the Shampoo and SOAP variants start
  from (its sharding, with ``--devices``)."""
  import dataclasses
  import optax
  import optax_shampoo4 as o4
  base = base or o4.ShampooConfig()
  intervals = dict(statistics_every=args.statistics_every,
                   inverse_root_every=args.inverse_root_every)
  adamw = lambda s: optax.adamw(s, b2=0.95, weight_decay=0.1)
  shampoo = lambda config=base, **kw: (lambda s: o4.shampoo_adamw(
      s, b2=0.95, weight_decay=0.1, shampoo=config, **{
          **intervals,
          **kw
      }))
  soap = lambda config=base, **kw: (lambda s: o4.soap(
      s, b2=0.95, weight_decay=0.1, config=config, precondition_every=args.
      precondition_every, **kw))
  bf16_rotations = dataclasses.replace(base, preconditioning_precision="bf16")
  return {
      "adamw lr 1e-3": (1e-3, adamw),
      "adamw lr 2e-3": (2e-3, adamw),
      **_shampoo_variants(shampoo, base, args.lr),
      **_soap_variants(soap, base, bf16_rotations),
      **_soap_b1_09_variants(soap, bf16_rotations),
  }


def lookup(name, args, base=None):
  """``(peak lr, factory)`` of the variant ``name``; a split step's are its
  whole step's. Raises KeyError for an unknown name."""
  whole = name.removesuffix(SPLIT_STEP).removesuffix(SPLIT_UPDATES)
  return optimizers(args, base)[whole]


def host_schedule(name, args):
  """For the variants whose training loop passes ``preconditioner_due``: the
  function of the 1-based step that gives it; None for the others."""
  import optax_shampoo4 as o4
  if "host-scheduled" not in name:
    return None

  def due(every, late):
    """Due at multiples of ``every``, of ``late = (step, every)`` after it."""
    return lambda step: o4.due_at(step, late[1]
                                  if late and step > late[0] else every)

  if name.startswith("soap"):
    refresh = due(args.precondition_every, args.precondition_every_after)
    return lambda step: (refresh(step), False)
  roots = due(args.inverse_root_every, args.inverse_root_every_after)
  return lambda step: (o4.due_at(step, args.statistics_every), roots(step))
