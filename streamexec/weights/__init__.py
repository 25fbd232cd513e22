"""Weights: safetensors headers, mmap views, page control, key layouts, checkpoint discovery."""

from .dtypes import DTYPES, DType
from .refs import MappedTensor, StoredTensor, TensorRef
from .safetensors_file import SafetensorsFile, TensorInfo
from .store import Tensor, WeightStore

__all__ = [
    "DTYPES", "DType", "MappedTensor", "StoredTensor", "TensorRef", "SafetensorsFile",
    "TensorInfo", "Tensor", "WeightStore",
]
