"""The exceptions taskgraph_norm defines, under one root, and its one warning.

Each class builds its own message from the facts it is given, so the message
shape is the same wherever the error is raised.  Errors about the user's
*parameters* also derive from :class:`ValueError`; errors that mirror
``torch.nn.functional.rms_norm`` derive from the builtin type torch raises, so
``except RuntimeError`` code written against torch keeps working.
"""

from __future__ import annotations

from collections.abc import Sequence


class TaskGraphError(Exception):
    """Root of every error class taskgraph_norm defines (an argument of the wrong Python
    type is a plain TypeError)."""


# --- graph validation -------------------------------------------------------


class GraphError(TaskGraphError, ValueError):
    """A graph breaks a structural rule; the message names the offending node."""

    def __init__(self, node_id: str | None, problem: str, hint: str = "") -> None:
        self.node_id = node_id
        self.problem = problem
        where = f"node {node_id!r}: " if node_id is not None else ""
        text = f"{where}{problem}"
        if hint:
            text = f"{text} ({hint})"
        super().__init__(text)


class CycleError(GraphError):
    """The graph has a cycle; ``path`` lists it, first node repeated at the end."""

    def __init__(self, path: Sequence[str]) -> None:
        self.path = tuple(path)
        super().__init__(
            self.path[0] if self.path else None,
            "the graph has a cycle: " + " -> ".join(self.path),
            "a merge DAG must be acyclic; remove one of these edges",
        )


# --- user parameters -------------------------------------------------------


class ConfigError(TaskGraphError, ValueError):
    """A taskgraph_norm parameter (topology, chunk size, executor...) is invalid."""

    def __init__(self, name: str, value: object, expected: str) -> None:
        self.name = name
        self.value = value
        super().__init__(f"{name}={value!r} is invalid: expected {expected}")


# --- input tensors (mirror torch.nn.functional.rms_norm) -------------------


class InputRankError(TaskGraphError, ValueError):
    """Input of too few dimensions; torch raises ValueError with this message."""

    def __init__(self, need: int, got: int) -> None:
        super().__init__(
            f"Input tensor must have at least {need} dimensions, but got {got}"
        )


class InputShapeError(TaskGraphError, RuntimeError):
    """Input trailing shape does not match ``normalized_shape`` (torch: RuntimeError)."""

    def __init__(self, normalized_shape: Sequence[int], got: Sequence[int]) -> None:
        shape = list(normalized_shape)
        star = "*" + ", ".join(str(s) for s in shape)
        super().__init__(
            f"Given normalized_shape={shape}, expected input with shape "
            f"[{star}], but got input of size{list(got)}"
        )


class WeightShapeError(TaskGraphError, RuntimeError):
    """Weight shape differs from ``normalized_shape`` (torch: RuntimeError)."""

    def __init__(self, weight_shape: Sequence[int], normalized_shape: Sequence[int]) -> None:
        super().__init__(
            "Expected weight to be of same shape as normalized_shape, but got "
            f"weight of shape {list(weight_shape)} and normalized_shape = "
            f"{list(normalized_shape)}"
        )


class DeviceMismatchError(TaskGraphError, RuntimeError):
    """Weight and input live on different devices (torch: RuntimeError)."""

    def __init__(self, weight_device: object, input_device: object) -> None:
        super().__init__(
            f"Tensor on device {weight_device} is not on the expected device "
            f"{input_device}!"
        )


class OverlapError(TaskGraphError, RuntimeError):
    """An output (``out=``, ``residual_out=``) that partly overlaps an input, as torch's
    own ``out=`` ops refuse it (the same message)."""

    def __init__(self) -> None:
        super().__init__(
            "unsupported operation: some elements of the input tensor and the written-to tensor refer to a "
            "single memory location. Please clone() the tensor before performing the operation."
        )


class DtypeError(TaskGraphError, NotImplementedError):
    """RMSNorm is not defined for this dtype (torch: NotImplementedError)."""

    def __init__(self, dtype_name: str) -> None:
        super().__init__(f'"rms_norm" not implemented for {dtype_name!r}')


class BiasShapeError(WeightShapeError):
    """LayerNorm's bias shape differs from ``normalized_shape`` (torch: RuntimeError)."""

    def __init__(self, bias_shape: Sequence[int], normalized_shape: Sequence[int]) -> None:
        RuntimeError.__init__(
            self,
            "Expected bias to be of same shape as normalized_shape, but got "
            f"bias of shape {list(bias_shape)} and normalized_shape = {list(normalized_shape)}",
        )


class ParameterDtypeError(TaskGraphError, RuntimeError):
    """LayerNorm's weight or bias has a dtype ``F.layer_norm`` refuses for the input's
    (torch: RuntimeError): both must be the input's dtype, or fp32 for fp16/bf16 input."""

    def __init__(self, x_dtype: object, param_dtypes: Sequence[object]) -> None:
        super().__init__(
            f"layer_norm: weight and bias must share one dtype, the input's ({x_dtype}) or float32 for a "
            f"float16/bfloat16 input, but got {', '.join(map(str, param_dtypes))}"
        )


# --- execution ------------------------------------------------------------


class ExecutionError(TaskGraphError, RuntimeError):
    """A graph could not be executed as asked (e.g. an executor is unavailable)."""


class ScheduleError(ExecutionError):
    """A schedule policy cannot go on: a replayed trace diverged from the graph or run."""

    def __init__(self, problem: str, hint: str = "") -> None:
        super().__init__(f"{problem} ({hint})" if hint else problem)


class PoolClosedError(ExecutionError):
    """A worker pool was used after it was closed."""

    def __init__(self, name: str) -> None:
        super().__init__(f"worker pool {name!r} is closed; create a new one or use the default pool")


# --- optional dependencies -------------------------------------------------


class MissingDependencyError(TaskGraphError, ImportError):
    """An optional dependency (matplotlib, graphviz...) is needed and not installed.

    The message names what needs it and the command that installs it, so the
    caller never has to guess which extra to ask for.
    """

    def __init__(self, package: str, purpose: str, install: str) -> None:
        self.package = package
        self.purpose = purpose
        self.install = install
        super().__init__(
            f"{purpose} needs {package!r}, which is not installed; install it with: {install}",
            name=package,
        )


class ShardMismatchError(TaskGraphError, ValueError):
    """The ranks of a distributed call do not fit together (shard sizes, row counts,
    dtypes, options), or there is no process group; every rank raises it together."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)


class UnsupportedNormError(TaskGraphError, ValueError):
    """A model holds norm modules that no casting mode reproduces exactly (or that
    cannot be swapped safely); ``modules`` lists ``(name, class, reason)`` and
    nothing was replaced."""

    def __init__(self, modules: Sequence[tuple[str, str, str]], hint: str = "") -> None:
        self.modules = tuple(modules)
        shown = [f"  {name} ({cls}): {reason}" for name, cls, reason in self.modules[:10]]
        if len(self.modules) > 10:
            shown.append(f"  ... and {len(self.modules) - 10} more")
        text = "cannot replace these norm modules, so nothing was replaced:\n" + "\n".join(shown)
        super().__init__(f"{text}\n{hint}" if hint else text)


# --- warnings ----------------------------------------------------------------


class NativeKernelsWarning(UserWarning):
    """The compiled executor's native C kernels are missing or failed to load, so it
    runs its torch ops (the same bits, slower); the message says why and what it
    costs.  Once per process; ``TGN_NATIVE=0`` chooses the torch ops without it."""


# --- exact weight gradients ------------------------------------------------


class ExactSumError(TaskGraphError, ValueError):
    """The exact accumulator cannot take this input (dtype, shape, device), or two
    states do not fit together; the message says which and what it accepts."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)


class ExactSumOverflowError(ExactSumError, OverflowError):
    """An exact sum passed the accumulator's range (docs/training.md, "Bounds"):
    raised instead of ever returning a wrong value."""

    def __init__(self, columns: int, limit: str) -> None:
        self.columns = columns
        super().__init__(
            f"the exact accumulator overflowed in {columns} column(s): {limit}; "
            "clear the gradient (zero_grad) more often or reduce fewer ranks at once"
        )


class GateShapeError(TaskGraphError, RuntimeError):
    """The gate of a gated RMSNorm is not a tensor of ``x``'s shape (RuntimeError, as
    torch's elementwise product of mismatched shapes)."""

    def __init__(self, gate_shape: Sequence[int], x_shape: Sequence[int]) -> None:
        super().__init__(f"gate must have x's shape {list(x_shape)}, got {list(gate_shape)}")
