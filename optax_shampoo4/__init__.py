"""optax_shampoo4: memory-efficient second-order optimization for JAX/Optax.

4-bit Shampoo (quantized eigenvectors) [S4], Cholesky quantization with error
feedback [CQ], and 4-bit AdamW / 4-bit Factor [A4], as pure-functional Optax
transformations whose states are pytrees.

Public API:

- Optimizers: shampoo_adamw, shampoo_sgdm, soap, adamw_4bit.
- Fused apply (4-bit AdamW's kernels that also apply the update): fused_step,
  apply_gradients.
- NaN safety: skip_nonfinite.
- Preconditioner updates scheduled by the training loop (no conditional in the
  step): due_at, apply_scheduled_gradients, compile_scheduled, and, to run
  each preconditioner update as a program of its own, scheduled_parts,
  apply_scheduled_part and update_preconditioners; ``update``'s keyword
  ``preconditioner_due``.
- Transformations: scale_by_shampoo, scale_by_soap, scale_by_adam_4bit.
- Configs: ShampooConfig, AdamConfig, DimensionNumbers (NO_PRECONDITIONER,
  unpreconditioned_biases).
- Quantization: quantize, dequantize, codebook, QuantizedArray.
- Memory: state_nbytes, memory_report, format_memory_report, parameter_memory,
  format_parameter_memory.
"""

import os as _os


def _avoid_jaxlib_0_10_cpu_deadlock():
  # jaxlib 0.10.x's CPU runtime can hang forever on programs with many
  # independent linear-algebra custom calls when its concurrency-optimized
  # scheduler is on (seen with jaxlib 0.10.2; 0.9.2 is unaffected). The flag
  # only changes CPU scheduling and only takes effect if no JAX backend exists
  # yet.
  try:
    from importlib.metadata import version
    jaxlib_version = version("jaxlib")
  except Exception:  # pragma: no cover - metadata missing
    return
  flag = "--xla_cpu_enable_concurrency_optimized_scheduler"
  flags = _os.environ.get("XLA_FLAGS", "")
  if jaxlib_version.startswith("0.10.") and flag not in flags:
    _os.environ["XLA_FLAGS"] = f"{flags} {flag}=false".strip()


_avoid_jaxlib_0_10_cpu_deadlock()

# The imports come after the XLA flag above: it must be set before JAX starts.
# pylint: disable=g-import-not-at-top,wrong-import-position
from optax_shampoo4.adam import (  # noqa: E402
    ScaleByAdam4bitState, scale_by_adam_4bit)
from optax_shampoo4.alias import (  # noqa: E402
    adamw_4bit, shampoo_adamw, shampoo_sgdm, soap)
from optax_shampoo4.codes import codebook  # noqa: E402
from optax_shampoo4.config import (  # noqa: E402
    NO_PRECONDITIONER, AdamConfig, DimensionNumbers, ShampooConfig,
    unpreconditioned_biases)
from optax_shampoo4.fused import apply_gradients, fused_step  # noqa: E402
from optax_shampoo4.moments import FactoredMoment  # noqa: E402
from optax_shampoo4.memory import (  # noqa: E402
    format_memory_report, format_parameter_memory, memory_report,
    parameter_memory, state_nbytes)
from optax_shampoo4.host_schedule import (  # noqa: E402
    apply_scheduled_gradients, apply_scheduled_part, compile_scheduled, due_at,
    scheduled_parts, update_preconditioners)
from optax_shampoo4.nonfinite import skip_nonfinite  # noqa: E402
from optax_shampoo4.preconditioners import (  # noqa: E402
    CholeskyPreconditioner, EigenBasis, EigenPreconditioner,
    MatrixPreconditioner)
from optax_shampoo4.quantization import (  # noqa: E402
    QuantizedArray, dequantize, quantize)
from optax_shampoo4.shampoo import ShampooState, scale_by_shampoo  # noqa: E402
from optax_shampoo4.soap import (  # noqa: E402
    SOAP_CONFIG, SoapState, scale_by_soap, soap_moments)
from optax_shampoo4.block_moments import BlockMoment  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "shampoo_adamw",
    "shampoo_sgdm",
    "soap",
    "scale_by_soap",
    "SoapState",
    "SOAP_CONFIG",
    "soap_moments",
    "BlockMoment",
    "adamw_4bit",
    "fused_step",
    "apply_gradients",
    "skip_nonfinite",
    "due_at",
    "apply_scheduled_gradients",
    "compile_scheduled",
    "apply_scheduled_part",
    "scheduled_parts",
    "update_preconditioners",
    "scale_by_shampoo",
    "scale_by_adam_4bit",
    "ShampooConfig",
    "AdamConfig",
    "DimensionNumbers",
    "NO_PRECONDITIONER",
    "unpreconditioned_biases",
    "quantize",
    "dequantize",
    "codebook",
    "QuantizedArray",
    "state_nbytes",
    "memory_report",
    "format_memory_report",
    "parameter_memory",
    "format_parameter_memory",
    "ShampooState",
    "EigenPreconditioner",
    "MatrixPreconditioner",
    "CholeskyPreconditioner",
    "EigenBasis",
    "ScaleByAdam4bitState",
    "FactoredMoment",
]
