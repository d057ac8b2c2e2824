"""A checkpoint weight stored as llama.cpp (GGML) quantization blocks, as a GGUF file holds it.

Blocks run along each row (the input dimension), so a row slice or a row permutation of the blocks is exact: the
loader can slice fused q/k/v rows and undo llama.cpp's q/k permutation without dequantizing. What a block means
(scale, minimum, packed values) is read by `dequantize` here and, for repacking without loss, by quant.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# GGML type ids (ggml.h); the names are what llama.cpp and its users call them.
GGML_TYPE_NAMES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K",
    12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S",
    20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64",
    29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}
Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K = 2, 3, 8, 12, 13, 14

# Block-quantized types ladle reads: (values per block, bytes per block).
BLOCK_LAYOUT: dict[int, tuple[int, int]] = {
    Q4_0: (32, 18), Q4_1: (32, 20), Q8_0: (32, 34), Q4_K: (256, 144), Q5_K: (256, 176), Q6_K: (256, 210),
}


def ggml_type_name(ggml_type: int) -> str:
    return GGML_TYPE_NAMES.get(ggml_type, f"type {ggml_type}")


@dataclass(frozen=True)
class GGMLBlocks:
    """A 2-D weight [rows, cols] as `data`: uint8 [rows, cols / values_per_block * bytes_per_block]."""

    ggml_type: int
    shape: tuple[int, int]
    data: torch.Tensor

    def __post_init__(self) -> None:
        per_block, block_bytes = BLOCK_LAYOUT[self.ggml_type]
        rows, cols = self.shape
        if cols % per_block or tuple(self.data.shape) != (rows, cols // per_block * block_bytes):
            shape = tuple(self.data.shape)
            raise ValueError(f"{self.type_name} blocks of shape {shape} do not hold a {self.shape} weight")

    @property
    def type_name(self) -> str:
        return ggml_type_name(self.ggml_type)

    def rows(self, index: slice | torch.Tensor) -> GGMLBlocks:
        """A row slice (or a row gather, for undoing a permutation): still blocks, no dequantization."""
        data = self.data[index]
        return GGMLBlocks(self.ggml_type, (data.shape[0], self.shape[1]), data)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [rows, cols] these blocks encode (transformers' torch implementation of ggml's math)."""
        from transformers.integrations.gguf.dequant import dequantize

        values = dequantize(self.data.contiguous().reshape(-1), self.ggml_type, torch.float32)
        return values.reshape(self.shape).to(dtype)
