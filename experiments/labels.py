"""Label budgets for semi-supervised learning.

``keep_labels(labels, n, seed)`` keeps ``n`` of a training set's labels, the same number
per class (Kingma et al. 2014: "the labelled examples are chosen at random with an equal
number per class"; with ``n`` not divisible by the number of classes, the first classes get
one more), chosen with a fixed seed, and marks the rest ``-1`` (unlabelled): the label
convention of models with ``uses_labels`` (``models.base``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from models.base import DGMError


def keep_labels(labels: Tensor, n: int, seed: int = 0) -> Tensor:
    """A copy of ``labels`` with all but ``n`` (balanced over classes, chosen by ``seed``)
    set to ``-1``."""
    if labels is None:
        raise DGMError("a label budget needs a dataset with labels (mnist, mnist-embedded, digits, ...)")
    classes = torch.unique(labels[labels >= 0])
    if n < len(classes) or n > int((labels >= 0).sum()):
        raise DGMError(
            f"cannot keep {n} labels: give at least one per class ({len(classes)}) and at most the "
            f"{int((labels >= 0).sum())} labelled training points"
        )
    generator = torch.Generator().manual_seed(seed)
    per_class, extra = divmod(n, len(classes))
    kept = labels.new_full(labels.shape, -1)
    for i, c in enumerate(classes.tolist()):
        rows = (labels == c).nonzero().squeeze(-1)
        take = per_class + (i < extra)
        if take > len(rows):
            raise DGMError(f"class {c} has only {len(rows)} examples; cannot keep {take} of it (lower the budget)")
        chosen = rows[torch.randperm(len(rows), generator=generator)[:take]]
        kept[chosen] = c
    return kept
