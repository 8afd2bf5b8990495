"""A Hugging Face ``transformers`` model as nndiag's analyses run it: inputs in, logits out.

``transformers`` models return a ``ModelOutput`` (``.logits``, hidden states, caches), while
evaluation, the zero-cost proxies, slice discovery and the input-scale check call
``model(x)`` and expect a tensor. A folder loaded with ``hf_module=True``
(:func:`nndiag.io.models.load_model`) is therefore run through :class:`HFLogits`; its
tensors (for the weight spectra) are still read from the model itself, so layer names keep
the checkpoint's spelling.
"""

from __future__ import annotations

import torch
from torch import nn


class HFLogits(nn.Module):
    """``model(x).logits`` (a model without a head: its first output, the hidden states).

    Parameters
    ----------
    model : nn.Module
        A ``transformers`` model; it is called with the inputs as its first argument
        (``input_ids`` for text models, ``pixel_values`` for vision models).

    Attributes
    ----------
    display_class : str
        The wrapped model's class name (e.g. ``GPT2LMHeadModel``), for reports.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.display_class = type(model).__name__

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from nndiag.landscape._setup import logits_of

        return logits_of(self.model(x))
