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
        # Note: these trust their size/stride/index arguments and read or write outside the
        # tensor's storage (checked on torch 2.13); eager PyTorch never dispatches them, and a
        # client could use them to corrupt its worker's memory. Views are also bounds-checked
        # by the executor after every op, whatever their name.
        "aten::_reshape_alias",
        "aten::_reshape_alias_copy",
        "aten::_reshape_alias_copy.out",
        "aten::as_strided_scatter",
        "aten::as_strided_scatter.out",
        "aten::_unsafe_masked_index",
        "aten::_unsafe_masked_index_put_accumulate",
        "aten::_sparse_coo_tensor_unsafe",
        "aten::_sparse_compressed_tensor_unsafe",
        "aten::_sparse_csr_tensor_unsafe",
        "aten::_sparse_csc_tensor_unsafe",
        "aten::_sparse_bsr_tensor_unsafe",
        "aten::_sparse_bsc_tensor_unsafe",
        "aten::_sparse_coo_tensor_with_dims_and_tensors",
        "aten::_nested_view_from_buffer",
        "aten::_nested_view_from_buffer_copy",
        "aten::_nested_view_from_jagged",
        "aten::_nested_view_from_jagged_copy",
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
