"""textstats: a custom Python model for ladle's python backend.

For each UTF-8 text it returns the text upper-cased and its length in characters (code points).
"""

from __future__ import annotations

import numpy as np

from ladle.errors import InvalidInput


class TextStats:
    def load(self) -> None:
        pass  # nothing to load: the model is pure Python

    def predict(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [_decode(item, index) for index, item in enumerate(batch["text"].reshape(-1))]
        upper = np.array([[t.upper().encode("utf-8")] for t in texts], dtype=np.object_).reshape(-1, 1)
        length = np.array([[len(t)] for t in texts], dtype=np.int32).reshape(-1, 1)
        return {"upper": upper, "length": length}


def _decode(item: bytes, index: int) -> str:
    try:
        return item.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput(f"input 'text': item {index} is not valid UTF-8") from None
