"""Build the offline quickstart's inputs: a tiny Llama-style model with its tokenizer, and a chat dataset.

    python examples/quickstart/build.py        # then: peftplan plan examples/quickstart/spec.toml

Everything is made here (random weights, a tokenizer trained on a built-in corpus): no network.
"""

import sys
from pathlib import Path

from peftplan.runtime.testing import build_tiny_model, write_dataset

HERE = Path(__file__).resolve().parent


def main(dest: Path = HERE) -> int:
    model = build_tiny_model(dest / "model", family="llama", hidden_size=128, intermediate_size=256,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    data = write_dataset(dest / "data.jsonl", "chat", 400)
    print(f"built {model} and {data}")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE))
