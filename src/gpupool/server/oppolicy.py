"""The server's op policy: one `OpSpec` per resolved overload, the only place that decides what
a session may run and what the executor checks around it.

An op is allowed when (Note [Deny by default] in protocol/ops.py) its canonical name is on the
allowlist and not in `DENIED`, its schema takes only argument types the executor can check
(`_ARG_KINDS`: tensors, numbers, the typed enums, string arguments whose values the list
enumerates), and, if the kernel sweep found that it trusts its integer arguments, it has a
sanitiser (`server/sanitisers.py`). Everything else is refused with the reason, once per name.

Spec-building is pure (schema in, spec out), so the tests check the whole list directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from gpupool import wholeops  # also defines the gpupool:: ops that specs resolve
from gpupool.protocol.ops import Allowlist, check_op_name, load, syntax_error
from gpupool.server import sanitisers
from gpupool.server.estimates import ESTIMATORS, Estimator
from gpupool.torchcodec import op_name, resolve_op

#: Schema argument types an op may take, and what the executor checks of each value.
#: Note: `str` arguments must take one of the values the allowlist names for that argument;
#: a `Generator` must be absent (the session has one generator, like a CUDA device).
_ARG_KINDS: dict[str, str] = {
    "Tensor": "tensor",
    "Optional[Tensor]": "tensor",
    "List[Tensor]": "tensors",
    "List[Optional[Tensor]]": "tensors",
    "int": "value",
    "Optional[int]": "value",
    "List[int]": "value",
    "Optional[List[int]]": "value",
    "bool": "value",
    "Optional[bool]": "value",
    "List[bool]": "value",
    "float": "value",
    "Optional[float]": "value",
    "List[float]": "value",
    "Optional[List[float]]": "value",
    "number": "value",
    "Optional[number]": "value",
    "List[number]": "value",
    "ScalarType": "dtype",
    "Optional[ScalarType]": "dtype",
    "Device": "device",
    "Optional[Device]": "device",
    "Layout": "layout",
    "Optional[Layout]": "layout",
    "MemoryFormat": "memory_format",
    "Optional[MemoryFormat]": "memory_format",
    "Optional[Generator]": "generator",
    "str": "str",
    "Optional[str]": "str",
}

#: The Python type a typed-enum argument must arrive as (never a raw integer that aten would
#: take as an out-of-range enum value).
TYPED_KINDS: dict[str, type] = {
    "device": torch.device,
    "dtype": torch.dtype,
    "layout": torch.layout,
    "memory_format": torch.memory_format,
}


class OpDenied(Exception):
    """The op may not run; `kind` is the wire error kind ("denied" or "unknown_op")."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class OpSpec:
    """An allowed op and what the executor checks around it (built once per op name)."""

    name: str  # canonical
    fn: torch._ops.OpOverload
    names: tuple[str, ...]  # schema argument names, by position
    typed: tuple[tuple[int, str, str], ...]  # (position, name, kind) of device/dtype/... args
    strings: tuple[tuple[int, str, frozenset[str]], ...]  # (position, name, allowed values)
    generators: tuple[tuple[int, str], ...]  # (position, name): must be None
    writes: tuple[tuple[int, str], ...]  # (position, name) of tensor args the op writes to
    out: bool  # writes kwarg-only tensors (an `out=` variant): sized on meta before it runs
    restrides: bool  # may change a written tensor's layout or storage (resize_, set_, squeeze_)
    views: bool  # some output aliases an input
    estimate: Estimator | None
    sanitise: sanitisers.Sanitiser | None
    checked: bool = False  # some argument needs a look before the op runs (`_check_args`)
    grows: bool = False  # may grow a written tensor's storage: snapshot it to roll back
    #: What the executor calls: `fn`, or for gpupool's own ops their Python implementation
    #: itself (the dispatcher would only box the arguments to call it back).
    call: Any = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "checked", bool(self.typed or self.strings or self.generators))
        object.__setattr__(self, "grows", self.out or self.restrides)
        object.__setattr__(self, "call", wholeops.DIRECT.get(self.name, self.fn))

    def arg(self, name: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        """The value of argument `name` as the client passed it (None when absent)."""
        try:
            i = self.names.index(name)
        except ValueError:
            return None
        return args[i] if i < len(args) else kwargs.get(name)


def build_spec(name: str, fn: torch._ops.OpOverload, allowlist: Allowlist,
               unsafe: frozenset[str] = frozenset()) -> OpSpec:
    """The spec of `fn` (canonical name `name`); raises `OpDenied` saying why it may not run."""
    reason = check_op_name(name, allowlist)
    if reason is not None:
        raise OpDenied("denied", reason)
    schema = fn._schema
    typed, strings, generators, writes = [], [], [], []
    out = False
    for i, a in enumerate(schema.arguments):
        real = str(getattr(a, "real_type", a.type))
        kind = _ARG_KINDS.get(real)
        if kind is None:
            raise OpDenied("denied", f"{name} takes a {real} argument ({a.name!r}), which a gpupool server does not accept")
        if kind in TYPED_KINDS:
            typed.append((i, a.name, kind))
        elif kind == "str":
            values = allowlist.strings.get(a.name)
            if values is None:
                raise OpDenied("denied", f"{name} takes free-form text ({a.name!r}), which a gpupool server does not accept")
            strings.append((i, a.name, values))
        elif kind == "generator":
            generators.append((i, a.name))
        if a.alias_info is not None and a.alias_info.is_write:
            writes.append((i, a.name))
            out = out or a.kwarg_only
    sanitise = sanitisers.SANITISERS.get(name)
    if sanitisers.family(name) in unsafe and sanitise is None:
        raise OpDenied("denied", f"{name} trusts its index or size arguments (see the kernel sweep) and has no sanitiser")
    base = schema.name.partition("::")[2]
    estimate = None if out else ESTIMATORS.get(base)
    views = any(r.alias_info is not None for r in schema.returns)
    restrides = bool(writes) and (torch.Tag.inplace_view in fn.tags or base in _RESTRIDING)
    for r in schema.returns:
        real = str(getattr(r, "real_type", r.type))
        if real not in _RETURN_TYPES:
            raise OpDenied("denied", f"{name} returns a {real}, which a gpupool server does not send")
    return OpSpec(name, fn, tuple(a.name for a in schema.arguments), tuple(typed), tuple(strings),
                  tuple(generators), tuple(writes), out, restrides, views, estimate, sanitise)


#: Ops that change a written tensor's storage or layout without the `inplace_view` tag.
_RESTRIDING = frozenset({"resize_", "resize_as_", "set_", "_resize_output_", "as_strided_"})

#: What an op may return: tensors and plain values the wire can carry.
_RETURN_TYPES = frozenset(
    {
        "Tensor", "Optional[Tensor]", "List[Tensor]", "List[Optional[Tensor]]", "int", "float",
        "bool", "number", "List[int]", "List[float]", "List[bool]", "ScalarType",
    }
)


def _meta_like(t: torch.Tensor) -> torch.Tensor:
    """A meta tensor with `t`'s dtype, layout and storage size."""
    storage = torch.UntypedStorage(t.untyped_storage().nbytes(), device="meta")
    return torch.empty(0, dtype=t.dtype, device="meta").set_(storage, t.storage_offset(), t.size(), t.stride())


def _to_meta(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return _meta_like(x)
    if isinstance(x, list):
        return [_to_meta(v) for v in x]
    if isinstance(x, torch.device):
        return torch.device("meta")
    return x


def out_growth(spec: OpSpec, args: list[Any], kwargs: dict[str, Any]) -> int:
    """Bytes an `out=` op would grow its outputs' storages by, found by running it on meta
    tensors first; 0 when the meta kernel cannot tell (the executor then measures after)."""
    outs = [kwargs.get(name) for i, name in spec.writes if i >= len(args)]
    targets = [t for x in outs for t in (x if isinstance(x, list) else [x]) if isinstance(t, torch.Tensor)]
    if not targets:
        return 0
    margs = _to_meta(args)
    mkwargs = {k: _to_meta(v) for k, v in kwargs.items()}
    try:
        spec.fn(*margs, **mkwargs)
    except Exception:  # noqa: BLE001 - no meta kernel, or arguments the real kernel will refuse
        return 0
    mouts = [mkwargs.get(name) for i, name in spec.writes if i >= len(args)]
    metas = [t for x in mouts for t in (x if isinstance(x, list) else [x]) if isinstance(t, torch.Tensor)]
    return sum(max(0, m.untyped_storage().nbytes() - t.untyped_storage().nbytes()) for m, t in zip(metas, targets))


class OpPolicy:
    """Specs by the name a client sent, built on first use; refusals are not cached (an
    unknown name costs one failed lookup, and a client could send unboundedly many)."""

    def __init__(self, allowlist: Allowlist | None = None, unsafe: frozenset[str] | None = None) -> None:
        self.allowlist = allowlist or load()
        self.unsafe = sanitisers.unsafe_kernels() if unsafe is None else unsafe
        self.specs: dict[str, OpSpec] = {}  # by the name a client sent

    def spec(self, sent: str) -> OpSpec:
        spec = self.specs.get(sent)
        if spec is None:
            spec = self._build(sent)
            if len(self.specs) < 10_000:
                self.specs[sent] = spec
        return spec

    def _build(self, sent: str) -> OpSpec:
        # Note: the name is checked before and after resolving: `aten::x` and `aten::x.default`
        # resolve to one overload, which must be judged by its canonical name, the one listed.
        reason = syntax_error(sent)
        if reason is not None:
            raise OpDenied("denied", reason)
        try:
            fn = resolve_op(sent)
        except LookupError as e:
            raise OpDenied("unknown_op", f"{e}: the server's torch {torch.__version__} has no such op") from None
        return build_spec(op_name(fn), fn, self.allowlist, self.unsafe)
