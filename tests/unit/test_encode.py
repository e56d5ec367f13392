"""Raw rows -> model input: the encoding the trainer, evaluation and export parity rely on."""

import numpy as np
import pandas as pd

from pipelines.train.model import encode_frame


def test_categories_map_to_vocabulary_position_plus_one_unseen_and_missing_to_zero() -> None:
    df = pd.DataFrame(
        {
            "n": [1.0, None, 3.0],
            "s": pd.Series(["y", None, "zz"], dtype="str"),  # pandas 3 default strings
            "a": pd.array(["q", "p", None], dtype="string[pyarrow]"),
            "o": pd.Series(["u", None, "w"], dtype=object),
            "i": [3, 1, 9],  # integer categories are matched by their text
        }
    )
    vocab = {"s": ["x", "y"], "a": ["p", "q"], "o": ["w", "u"], "i": ["1", "3"]}
    got = encode_frame(df, ["n"], vocab, {"n": {"mean": 2.0}})
    want = np.array(
        [[1.0, 2, 2, 2, 2], [2.0, 0, 1, 0, 1], [3.0, 0, 0, 1, 0]],
        dtype="float32",
    )
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
