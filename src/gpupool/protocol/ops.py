"""The op allowlist: which aten operators a client may ask a server to run, by name.

Names are aten schema names with overload, e.g. "aten::add.Tensor". Everything in the `aten`
namespace computes on tensors of the session's own device, so it is allowed, except the few
operators that reach outside the session: files, raw pointers, process-wide state.
"""

from __future__ import annotations

ALLOWED_NAMESPACES = frozenset({"aten"})

#: Operators that touch the server outside the session's tensors.
DENIED = frozenset(
    {
        "aten::from_file",
        "aten::_print",
        "aten::set_.source_Storage",
        "aten::set_.source_Storage_storage_offset",
        "aten::_set_.source_Storage",
        "aten::set_.source_Storage_storage_offset_out",
        "aten::set.source_Storage",
        "aten::set.source_Storage_storage_offset",
        "aten::set.source_Storage_out",
        "aten::set_.source_Storage_out",
        "aten::_cufft_set_plan_cache_max_size",
        "aten::_cufft_clear_plan_cache",
        "aten::_use_cudnn_rnn_flatten_weight",
        "aten::_from_functional_tensor",
        "aten::_to_functional_tensor",
        "aten::set_num_threads",
        "aten::_set_num_threads",
        "aten::_assert_tensor_metadata",
    }
)

MAX_NAME = 200


def check_op_name(name: str) -> str | None:
    """Return None if `name` may run, else the reason it may not."""
    if len(name) > MAX_NAME or not name.isascii():
        return "malformed op name"
    ns, sep, rest = name.partition("::")
    if not sep or not rest:
        return f"malformed op name {name!r} (expected 'namespace::op.overload')"
    if ns not in ALLOWED_NAMESPACES:
        return f"namespace {ns!r} is not allowed"
    if name in DENIED:
        return f"{name} is not allowed on a gpupool server"
    return None
