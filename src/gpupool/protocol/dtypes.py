"""Names of the tensor element types, layouts and memory formats that may cross the wire."""

DTYPE_NAMES = frozenset(
    {
        "float32", "float64", "float16", "bfloat16", "complex64", "complex128", "complex32",
        "uint8", "int8", "int16", "int32", "int64", "bool",
        "uint16", "uint32", "uint64",
        "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
    }
)
MEMORY_FORMAT_NAMES = frozenset(
    {"contiguous_format", "channels_last", "channels_last_3d", "preserve_format"}
)
LAYOUT_NAMES = frozenset({"strided"})
