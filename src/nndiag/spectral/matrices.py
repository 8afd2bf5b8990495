"""Which weight tensors the weight-spectrum analysis uses, and their matrices.

This module is the single source of truth for layer selection: ``nndiag layers``
(:func:`nndiag.io.layers.classify_tensor`) and :func:`nndiag.spectral.analyze` both
call :func:`plan_layers`.

Matrices
--------
* Linear, Embedding, Hugging Face ``Conv1D``: one matrix, ``N = max(shape)``,
  ``M = min(shape)``, ``rf = 1``.
* Convolutions (1-, 2- or 3-D kernels), two modes:

  - ``conv_mode="ww"`` (WeightWatcher's layout): one ``out × in`` matrix per kernel
    position; their eigenvalues are pooled, so a 64×32×3×3 kernel gives 9 matrices
    and ``num_evals = 32·9 = 288``; ``rf`` = number of kernel positions.
  - ``conv_mode="unfold"``: one ``out × (in·k…)`` matrix.
* Fused attention projections: ``nn.MultiheadAttention.in_proj_weight`` (``3d × d``),
  timm-style ``qkv.weight``, ``Wqkv``, ``W_pack``, ``qkv_proj`` and Qwen-1's ``c_attn``
  (:data:`_QKV_ROW_BLOCKS`) are split into Q, K, V along dim 0; GPT-2
  ``c_attn.weight`` (``d × 3d``, HF ``Conv1D``) along dim 1. Each part is its own layer
  named ``<module>.q`` / ``.k`` / ``.v``. Fused weights whose rows are grouped per head
  (GPT-NeoX, BLOOM, Persimmon, Falcon ``query_key_value``, GPT-BigCode ``c_attn``), per
  partition (CodeGen ``qkv_proj``) or with fewer K/V heads (Phi-3 ``qkv_proj``, MPT ``Wqkv``) are split
  when the model's Hugging Face config names its type and head count (:class:`GroupedQKV`,
  :func:`grouped_qkv`; the config's layout wins over the name rules above); without it a
  ``query_key_value`` is analysed whole.
* LoRA / PEFT adapters: a ``lora_B`` weight (``out × r``) is multiplied with its
  ``lora_A`` partner (``r × in``) and analysed as ``B·A`` (named ``<module>.lora_BA``).
* A tensor of 3 or more dimensions is a convolution kernel only when a convolution module
  owns it (or, for tensors alone, unless it is a leading-singleton embedding/token
  parameter). Otherwise its size-1 dimensions are dropped: a ViT's ``(1, 197, 768)``
  position table is a 197×768 matrix, a ``(1, 1, 768)`` class token a skipped vector, and
  what stays 3-D is skipped as of unknown layout. (Read as a Conv1d kernel, the position
  table gave 768 "kernel positions" of one eigenvalue each.)
* Mixture-of-Experts weights stacked along dim 0 (a 3-D tensor under an ``expert`` name,
  e.g. Hugging Face's ``experts.gate_up_proj`` (E, 2I, H) and ``experts.down_proj``):
  one matrix per expert, named ``<tensor>.<e>``. A fused gate/up projection is analysed
  as one matrix per expert, as a fused weight of unknown layout: implementations stack the
  halves or interleave their columns.

* Recurrent layers (``nn.LSTM``/``nn.GRU`` and their cells): ``weight_ih``/``weight_hh``
  stack one matrix per gate along dim 0 — LSTM ``i, f, g, o``, GRU ``r, z, n`` (PyTorch's
  order) — each analysed as its own layer ``<tensor>.<gate>``. The stack's spectrum is
  that of ``Σ_g W_gᵀW_g``, mixing four (three) different maps. Without module types (a
  state dict) the gate count is read from ``weight_hh`` (rows = gates × columns); a plain
  ``nn.RNN`` has one matrix.

Every tensor that is not analysed gets a reason (see :data:`REASONS`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from nndiag.io.tensors import TensorInfo

#: Default limits (WeightWatcher 0.7.7's defaults).
MIN_EVALS = 8
MAX_EVALS = 15000
MAX_N = 50000
CONV_MODES = ("ww", "unfold")

_NORM_HINTS = ("norm", "bn", "ln_", ".ln", "layernorm", "batchnorm", "groupnorm")
_NORM_TYPES = ("BatchNorm", "LayerNorm", "GroupNorm", "InstanceNorm", "RMSNorm", "LocalResponseNorm")
_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
#: ``weight_ih``/``weight_hh`` of PyTorch's recurrent layers (``_l<k>[_reverse]`` in nn.LSTM/GRU/RNN).
_RECURRENT_LEAF = re.compile(r"weight_(ih|hh)(_l\d+(_reverse)?)?$")
#: Gates stacked along dim 0, in PyTorch's order, by the owning module's type.
_GATES = {"LSTM": "ifgo", "GRU": "rzn"}
_FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")
_QUANT_DTYPES = ("qint8", "quint8", "qint32", "quint4x2", "quint2x4")


#: ``original``, ``original0``... : the stored pieces of a ``torch.nn.utils.parametrize`` tensor.
_ORIGINAL = re.compile(r"^original\d*$")
#: The pieces of the deprecated ``torch.nn.utils.weight_norm`` (``weight = g · v / ‖v‖``).
_WEIGHT_NORM_PIECES = ("weight_g", "weight_v")


def tensor_kind(info: TensorInfo) -> str:
    """A short kind for a tensor.

    One of ``linear``, ``conv1d``/``conv2d``/``conv3d``, ``embedding``,
    ``attention-qkv``, ``experts``, ``recurrent``, ``lora-a``, ``lora-b``, ``norm``, ``bias``, ``vector``,
    ``buffer``, ``parametrization`` (the stored pieces of a parametrised tensor) or ``tensorKd``.
    """
    leaf = info.name.rsplit(".", 1)[-1]
    mt = info.module_type or ""
    lname = info.name.lower()
    if leaf in _BUFFER_SUFFIXES:
        return "buffer"
    if (mt == "ParametrizationList" or (".parametrizations." in lname and _ORIGINAL.search(leaf))
            or leaf in _WEIGHT_NORM_PIECES):
        return "parametrization"
    if any(mt.startswith(t) for t in _NORM_TYPES):
        return "norm"
    if len(info.shape) <= 1:
        if not mt and any(h in lname for h in _NORM_HINTS):
            return "norm"
        return "bias" if leaf.endswith("bias") else "vector"
    if ".lora_a." in lname or lname.endswith(".lora_a.weight"):
        return "lora-a"
    if ".lora_b." in lname or lname.endswith(".lora_b.weight"):
        return "lora-b"
    if mt == "Embedding" or (not mt and len(info.shape) == 2 and _embedding_name(lname)):
        return "embedding"
    if len(info.shape) == 2 and _RECURRENT_LEAF.search(leaf) and (not mt or mt.startswith(("LSTM", "GRU", "RNN"))):
        return "recurrent"
    if leaf == "in_proj_weight" and len(info.shape) == 2:
        return "attention-qkv"
    if _fused_qkv_dim(info) is not None:
        return "attention-qkv"
    if mt == "Conv1D":  # Hugging Face GPT-2 style (in, out) matrix
        return "linear"
    if len(info.shape) == 2:
        return "linear"
    if len(info.shape) >= 3 and not _conv_kernel(info, mt, lname):
        if len(info.shape) == 3 and "expert" in lname and info.shape[0] > 1:
            return "experts"
        core = squeezed_shape(info.shape)
        if len(core) <= 1:
            return "vector"
        if len(core) == 2:  # e.g. a ViT's (1, 197, 768) position table
            return "embedding" if _embedding_name(lname) else "linear"
        return f"tensor{len(info.shape)}d"
    if len(info.shape) in (3, 4, 5):
        return f"conv{len(info.shape) - 2}d"
    return f"tensor{len(info.shape)}d"


#: Modules whose 2-D weight is a lookup table though their name says nothing of embeddings:
#: GPT-2's token and position tables, T5/BART's shared token table.
_EMBEDDING_MODULES = ("wte", "wpe", "shared")


def _embedding_name(lname: str) -> bool:
    """Whether a tensor with no known module type is named as an embedding table (its owning
    module's name: ``embed_tokens``, ``word_embeddings``, ``pos_embed``, ``tok_emb``, GPT-2's
    ``wte``...; a ``time_embedding.linear_1`` or a ``time_emb_proj`` is a linear layer)."""
    parts = lname.split(".")
    owner = parts[-2] if len(parts) > 1 and parts[-1] in ("weight", "embedding", "embeddings") else parts[-1]
    return "embed" in owner or owner.endswith("emb") or owner in _EMBEDDING_MODULES


def _conv_kernel(info: TensorInfo, mt: str, lname: str) -> bool:
    """Whether a tensor of 3 or more dimensions is a convolution kernel: one owned by a
    convolution module, or, with no module type known, any but a leading-singleton
    embedding/token parameter (a ViT's ``pos_embed`` (1, 197, 768), ``cls_token`` (1, 1, 768))."""
    if mt:
        return "Conv" in mt  # Conv1d/2d/3d, ConvTranspose*, LazyConv*, timm's Conv2dSame ...
    if "expert" in lname:  # Mixture-of-Experts weights stacked along dim 0
        return False
    return not (info.shape[0] == 1 and any(h in lname for h in ("emb", "token", "pos")))


def squeezed_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """``shape`` without its size-1 dimensions."""
    return tuple(int(s) for s in shape if int(s) != 1)


#: Fused Q/K/V weights stored as ``[Q; K; V]`` row blocks of an ``nn.Linear(d, 3d)`` weight
#: (``3d × d``): PyTorch's ``MultiheadAttention``, timm's ``qkv``, MPT's and Phi-2's ``Wqkv``,
#: Baichuan's ``W_pack``, Phi-3's ``qkv_proj`` (without grouped K/V heads), Qwen-1's ``c_attn``.
#: Not GPT-NeoX's or BLOOM's ``query_key_value``: their rows interleave Q, K, V per head, and the
#: head count is not in the weights (:func:`grouped_qkv` reads it from the model's config, as
#: CodeGen's partitioned ``qkv_proj`` layout).
_QKV_ROW_BLOCKS = ("in_proj_weight", ".qkv.weight", ".Wqkv.weight", ".W_pack.weight", ".qkv_proj.weight",
                   "c_attn.weight")


@dataclass(frozen=True)
class GroupedQKV:
    """A fused Q/K/V weight whose output rows come in ``groups`` equal blocks, each block holding
    consecutive rows of every part: ``blocks`` lists the parts in the order they sit inside a
    block with their rows per block (``(("q", d), ("k", d), ("v", d))``: per attention head, Q
    then K then V, ``d`` the head size). Q is then the ``q`` rows of every block, in order.

    Attributes
    ----------
    suffix : str
        The tensor names it applies to end with this.
    groups : int
        Number of row blocks (the head count, the K/V head count, or CodeGen's 4 partitions).
    blocks : tuple of (str, int)
        ``(part letter, rows per block)`` in the order they sit inside a block.
    """

    suffix: str
    groups: int
    blocks: tuple[tuple[str, int], ...]

    @property
    def rows(self) -> int:
        """Rows of the whole fused weight."""
        return self.groups * sum(r for _, r in self.blocks)

    def span(self, letter: str) -> tuple[int, int]:
        """Where part ``letter``'s rows sit inside a block: ``(start, stop)``."""
        start = 0
        for name, r in self.blocks:
            if name == letter:
                return start, start + r
            start += r
        raise KeyError(letter)


#: Model types whose fused Q/K/V layout follows from the head counts (see :func:`grouped_qkv`).
_HEAD_LAYOUTS = ("gpt_neox", "bloom", "persimmon", "falcon", "phi3", "gpt_bigcode")
#: Falcon's first model types (remote code): ``RefinedWebModel`` (Falcon-7B: multi-query unless
#: ``multi_query`` is false) and ``RefinedWeb`` (Falcon-40B: ``n_head_kv`` K/V heads, grouped as in
#: the later ``new_decoder_architecture``).
_REFINED_WEB = ("RefinedWebModel", "RefinedWeb")


def _first_int(config: dict, *keys: str) -> int | None:
    """The first positive integer among ``config[key]`` for ``keys``, else None."""
    return next((int(config[k]) for k in keys if isinstance(config.get(k), int) and config[k] > 0), None)


def grouped_qkv(config: dict | None) -> GroupedQKV | None:
    """The grouped fused Q/K/V layout a Hugging Face ``config.json`` (as a dict) implies, else None.

    GPT-NeoX, BLOOM and Persimmon (and Falcon and GPT-BigCode without multi-query attention)
    view the projection's output as (heads, 3, head size); CodeGen as 4 partitions of (query,
    value, key) (``mp_num = 4``); Falcon's new decoder architecture as (K/V heads, query heads
    per K/V head + 2, head size); multi-query Falcon and GPT-BigCode (StarCoder) as all the query
    heads, then one key and one value head; Phi-3 and MPT (``Wqkv`` with grouped or multi-query
    K/V heads) as all the query heads, then the K heads, then the V heads (fewer K/V rows);
    Falcon's first model types ``RefinedWebModel`` (7B, multi-query) and ``RefinedWeb`` (40B,
    grouped K/V heads) as the later Falcon. These are read from the models'
    ``_split_heads``/``view``/``split`` code (``transformers``; MPT's grouped K/V heads in
    llm-foundry, RefinedWeb in its own modelling file): facts about a file format, not code.

    Examples
    --------
    >>> grouped_qkv({"model_type": "gpt_neox", "hidden_size": 64, "num_attention_heads": 8}).blocks
    (('q', 8), ('k', 8), ('v', 8))
    >>> lay = grouped_qkv({"model_type": "falcon", "hidden_size": 64, "num_attention_heads": 8,
    ...                    "new_decoder_architecture": True, "num_kv_heads": 2})
    >>> lay.groups, lay.blocks, lay.rows
    (2, (('q', 32), ('k', 8), ('v', 8)), 96)
    >>> grouped_qkv({"model_type": "llama"}) is None
    True
    """
    if not isinstance(config, dict):
        return None
    kind = config.get("model_type")
    if kind == "mpt":
        return _mpt_qkv(config)
    if kind in _REFINED_WEB:  # Falcon's first releases, as their remote code read them
        config, kind = {**config, "new_decoder_architecture": kind == "RefinedWeb"}, "falcon"
    hidden = _first_int(config, "hidden_size", "n_embed", "n_embd")
    heads = _first_int(config, "num_attention_heads", "n_head")
    if kind == "codegen":
        if hidden is None or hidden % 4:
            return None
        part = hidden // 4
        return GroupedQKV("qkv_proj.weight", 4, (("q", part), ("v", part), ("k", part)))
    if kind not in _HEAD_LAYOUTS or hidden is None or heads is None:
        return None
    if hidden % heads:
        return None
    d = _first_int(config, "head_dim") or hidden // heads
    if kind == "phi3":  # [all query heads; K heads; V heads]
        kv = _first_int(config, "num_key_value_heads") or heads
        return GroupedQKV("qkv_proj.weight", 1, (("q", heads * d), ("k", kv * d), ("v", kv * d)))
    if kind == "gpt_bigcode":  # multi-query: [queries; one K head; one V head], else per head
        if config.get("multi_query", True):
            return GroupedQKV("c_attn.weight", 1, (("q", hidden), ("k", d), ("v", d)))
        return GroupedQKV("c_attn.weight", heads, (("q", d), ("k", d), ("v", d)))
    if kind == "falcon" and config.get("new_decoder_architecture"):
        kv = _first_int(config, "num_kv_heads", "n_head_kv") or heads
        if heads % kv:
            return None
        return GroupedQKV("query_key_value.weight", kv, (("q", heads // kv * d), ("k", d), ("v", d)))
    if kind == "falcon" and config.get("multi_query", True):
        return GroupedQKV("query_key_value.weight", 1, (("q", heads * d), ("k", d), ("v", d)))
    return GroupedQKV("query_key_value.weight", heads, (("q", d), ("k", d), ("v", d)))


def _mpt_qkv(config: dict) -> GroupedQKV | None:
    """MPT's ``Wqkv`` with fewer K/V heads than query heads (``attn_config.attn_type``
    ``grouped_query_attention`` with ``kv_n_heads``, or ``multiquery_attention``): all the query
    rows, then the K heads, then the V heads (split ``[d_model, kv·d, kv·d]``). Plain multi-head
    ``Wqkv`` is ``[Q; K; V]`` of equal blocks, which the name rule splits by itself."""
    hidden, heads = _first_int(config, "d_model"), _first_int(config, "n_heads")
    attn = config.get("attn_config") if isinstance(config.get("attn_config"), dict) else {}
    if hidden is None or heads is None or hidden % heads:
        return None
    kind = attn.get("attn_type", "multihead_attention")
    if kind == "multiquery_attention":
        kv = 1
    elif kind == "grouped_query_attention":
        kv = _first_int(attn, "kv_n_heads") or heads
    else:
        return None
    if kv >= heads or heads % kv:
        return None
    d = hidden // heads
    return GroupedQKV("Wqkv.weight", 1, (("q", hidden), ("k", kv * d), ("v", kv * d)))


def _grouped(info: TensorInfo, layout: GroupedQKV | None) -> bool:
    """Whether ``info`` is a fused Q/K/V weight of the grouped ``layout`` (its name and row count)."""
    return (layout is not None and len(info.shape) == 2 and info.name.endswith(layout.suffix)
            and int(info.shape[0]) == layout.rows)


def _fused_qkv_dim(info: TensorInfo) -> int | None:
    """The dim along which a fused Q/K/V weight of known layout splits, else None."""
    if len(info.shape) != 2:
        return None
    a, b = info.shape
    if a == 3 * b and info.name.endswith(_QKV_ROW_BLOCKS):
        return 0
    if info.name.endswith("c_attn.weight") and b == 3 * a:
        return 1  # GPT-2's Conv1D stores the transpose: d × 3d, Q/K/V as column blocks
    return None


@dataclass(frozen=True)
class LayerSpec:
    """One matrix (or pooled set of matrices) the analysis will compute on.

    Attributes
    ----------
    name : str
        Display name: the module path (tensor name without ``.weight``), plus
        ``.q``/``.k``/``.v`` for split attention or ``.lora_BA`` for adapters.
    tensor : str
        The source tensor name.
    kind : str
        See :func:`tensor_kind`.
    shape : tuple of int
        Shape of the source tensor.
    dtype : str
        dtype of the source tensor.
    N, M, rf, num_evals : int
        Larger and smaller matrix side, receptive field (kernel positions), and the
        number of eigenvalues the layer yields.
    part : int or None
        Index of the Q/K/V part for split attention weights, of the expert for
        stacked Mixture-of-Experts weights, or of the gate of a recurrent weight.
    split_dim : int or None
        Dimension along which the fused attention weight splits.
    groups, rows : int and (int, int), or None
        For a grouped fused Q/K/V weight (:class:`GroupedQKV`): the number of row blocks and
        where this part's rows sit inside each block.
    partner : str or None
        The ``lora_A`` tensor name for a LoRA ``B·A`` product.
    index : int
        Position of the layer in model order.
    """

    name: str
    tensor: str
    kind: str
    shape: tuple[int, ...]
    dtype: str
    N: int
    M: int
    rf: int
    num_evals: int
    part: int | None = None
    split_dim: int | None = None
    partner: str | None = None
    index: int = 0
    n_parts: int = 3
    groups: int | None = None
    rows: tuple[int, int] | None = None


def recurrent_gates(info: TensorInfo, by_name: dict[str, TensorInfo]) -> str:
    """Gate letters stacked in a recurrent weight (``""``: one matrix, e.g. ``nn.RNN``).

    From the owning module's type when known; else from the layer's ``weight_hh``, whose
    rows are gates × hidden size and whose columns are the hidden size.
    """
    mt = info.module_type or ""
    for prefix, gates in _GATES.items():
        if mt.startswith(prefix):
            return gates
    if mt:
        return ""  # nn.RNN / nn.RNNCell
    hh = by_name.get(re.sub(r"weight_ih", "weight_hh", info.name))
    if hh is None or len(hh.shape) != 2 or info.shape[0] != hh.shape[0]:
        return ""
    rows, cols = int(hh.shape[0]), int(hh.shape[1])
    return {4 * cols: "ifgo", 3 * cols: "rzn"}.get(rows, "")


def _display(tensor_name: str) -> str:
    for suffix in (".weight", "_weight"):
        if tensor_name.endswith(suffix):
            return tensor_name[: -len(suffix)]
    return tensor_name


def _dims(kind: str, shape: tuple[int, ...], conv_mode: str) -> tuple[int, int, int, int]:
    """``(N, M, rf, num_evals)`` of a tensor's matrix (or pooled slices)."""
    if kind.startswith("conv"):
        out, inp = int(shape[0]), int(shape[1])
        rf = 1
        for s in shape[2:]:
            rf *= int(s)
        if conv_mode == "ww":
            n, m = max(out, inp), min(out, inp)
            return n, m, rf, m * rf
        n, m = max(out, inp * rf), min(out, inp * rf)
        return n, m, rf, m
    a, b = squeezed_shape(shape) if len(shape) > 2 else (int(shape[0]), int(shape[1]))
    return max(a, b), min(a, b), 1, min(a, b)


def plan_layers(
    infos: list[TensorInfo],
    *,
    conv_mode: str = "ww",
    min_evals: int = MIN_EVALS,
    max_evals: int | None = MAX_EVALS,
    max_N: int | None = MAX_N,
    qkv_layout: GroupedQKV | None = None,
) -> tuple[list[LayerSpec], dict[str, str]]:
    """Decide which tensors are analysed and why the others are not.

    Parameters
    ----------
    infos : list of TensorInfo
        Tensor metadata in model order (no values are loaded).
    conv_mode : {"ww", "unfold"}
        Convolution layout (see the module docstring).
    min_evals, max_evals, max_N : int
        Layers with fewer than ``min_evals`` or more than ``max_evals`` eigenvalues,
        or with a side longer than ``max_N``, are skipped (``None`` = no limit).
    qkv_layout : GroupedQKV, optional
        The model's grouped fused Q/K/V layout (:func:`grouped_qkv` of its Hugging Face
        config): such weights are split into Q, K and V, each gathered from every group
        (without it they are analysed whole, or for CodeGen's ``qkv_proj`` as row blocks).

    Returns
    -------
    specs : list of LayerSpec
        The layers to analyse, in model order.
    reasons : dict of str to str
        ``tensor name -> reason`` for every tensor not analysed (empty reason never).

    Examples
    --------
    >>> from nndiag.io.tensors import TensorInfo
    >>> specs, why = plan_layers([TensorInfo("fc.weight", (10, 64), "float32", "Linear"),
    ...                          TensorInfo("fc.bias", (10,), "float32", "Linear")])
    >>> [s.name for s in specs], why
    (['fc'], {'fc.bias': '1-D tensor'})
    """
    from nndiag.errors import InputError

    if conv_mode not in CONV_MODES:
        raise InputError(f"unknown conv_mode '{conv_mode}'; choose one of {', '.join(CONV_MODES)}")
    by_name = {i.name: i for i in infos}
    specs: list[LayerSpec] = []
    reasons: dict[str, str] = {}
    for info in infos:
        kind = tensor_kind(info)
        reason = _basic_reason(info, kind)
        if reason:
            reasons[info.name] = reason
            continue
        if kind == "lora-a":
            partner = info.name.replace("lora_A", "lora_B").replace("lora_a", "lora_b")
            if partner in by_name:
                reasons[info.name] = f"LoRA A factor (analysed as the product with {partner})"
            else:
                reasons[info.name] = "LoRA A factor without its B partner"
            continue
        candidates: list[LayerSpec] = []
        if _grouped(info, qkv_layout):
            assert qkv_layout is not None
            cols = int(info.shape[1])
            base = _display(info.name)
            for letter in "qkv":
                start, stop = qkv_layout.span(letter)
                a = qkv_layout.groups * (stop - start)
                candidates.append(LayerSpec(f"{base}.{letter}", info.name, "attention-qkv", info.shape, info.dtype,
                                            max(a, cols), min(a, cols), 1, min(a, cols), split_dim=0,
                                            groups=qkv_layout.groups, rows=(start, stop)))
        elif kind == "lora-b":
            a_name = info.name.replace("lora_B", "lora_A").replace("lora_b", "lora_a")
            a_info = by_name.get(a_name)
            if a_info is None or len(a_info.shape) != 2 or a_info.shape[0] != info.shape[1]:
                reasons[info.name] = "LoRA B factor without a matching lora_A partner"
                continue
            out, inp = int(info.shape[0]), int(a_info.shape[1])
            base = _display(info.name).replace(".lora_B", "").replace(".lora_b", "")
            base = base.replace(".default", "")
            candidates.append(LayerSpec(f"{base}.lora_BA", info.name, kind, info.shape, info.dtype,
                                        max(out, inp), min(out, inp), 1, min(out, inp),
                                        partner=a_name))
        elif kind == "attention-qkv":
            dim = _fused_qkv_dim(info)
            if dim is None:
                reasons[info.name] = f"fused attention weight of unknown layout {tuple(info.shape)}"
                continue
            part_shape = list(info.shape)
            part_shape[dim] //= 3
            a, b = part_shape
            base = _display(info.name)
            for p, letter in enumerate("qkv"):
                candidates.append(LayerSpec(f"{base}.{letter}", info.name, kind, info.shape, info.dtype,
                                            max(a, b), min(a, b), 1, min(a, b), part=p, split_dim=dim))
        elif kind == "recurrent" and (gates := recurrent_gates(info, by_name)):
            a, b = int(info.shape[0]) // len(gates), int(info.shape[1])
            for p, letter in enumerate(gates):
                candidates.append(LayerSpec(f"{info.name}.{letter}", info.name, kind, info.shape, info.dtype,
                                            max(a, b), min(a, b), 1, min(a, b), part=p, split_dim=0,
                                            n_parts=len(gates)))
        elif kind == "experts":
            a, b = int(info.shape[1]), int(info.shape[2])
            base = _display(info.name)
            for e in range(int(info.shape[0])):
                candidates.append(LayerSpec(f"{base}.{e}", info.name, kind, info.shape, info.dtype,
                                            max(a, b), min(a, b), 1, min(a, b), part=e, split_dim=0))
        else:
            n, m, rf, ne = _dims(kind, info.shape, conv_mode)
            candidates.append(LayerSpec(_display(info.name), info.name, kind, info.shape, info.dtype,
                                        n, m, rf, ne))
        size_reason = _size_reason(candidates[0], min_evals, max_evals, max_N)
        if size_reason:
            reasons[info.name] = size_reason
            continue
        specs.extend(candidates)
    specs = [LayerSpec(**{**s.__dict__, "index": i}) for i, s in enumerate(specs)]
    return specs, reasons


def _basic_reason(info: TensorInfo, kind: str) -> str:
    if kind == "buffer":
        return "buffer (not a weight)"
    if kind == "parametrization":
        if info.module_type:
            return "parametrisation piece (the effective tensor is analysed under the module's own name)"
        return "parametrisation piece (weight_norm/spectral_norm in a checkpoint: load the model to analyse the weight)"
    if kind == "norm":
        return "normalisation layer parameter"
    if kind in ("bias", "vector"):
        if len(info.shape) == 1:
            return "1-D tensor"
        return "1-D tensor after dropping size-1 dimensions" if squeezed_shape(info.shape) else "scalar"
    if kind.startswith("tensor"):
        owner = f" of a {info.module_type} module, not a convolution kernel" if info.module_type else ""
        return f"unsupported {len(info.shape)}-D tensor{owner}"
    if info.dtype in _QUANT_DTYPES:
        return ""  # dequantised on load
    if info.dtype not in _FLOAT_DTYPES:
        if info.dtype.startswith("float8"):
            return f"8-bit float dtype {info.dtype} without a scale (dequantise it first)"
        return f"non-float dtype {info.dtype} (quantised weights without a scale; dequantise first)"
    if any(int(s) == 0 for s in info.shape):
        return f"empty tensor {tuple(info.shape)}"
    return ""


def _size_reason(spec: LayerSpec, min_evals: int, max_evals: int | None, max_N: int | None) -> str:
    if spec.M <= 1 and spec.num_evals < max(min_evals, 2):
        return f"1×N matrix ({spec.num_evals} eigenvalue{'' if spec.num_evals == 1 else 's'})"
    if spec.num_evals < min_evals:
        return f"too few eigenvalues ({spec.num_evals} < {min_evals})"
    if max_evals and spec.num_evals > max_evals:
        return f"over the size limit ({spec.num_evals} eigenvalues > max_evals {max_evals})"
    if max_N and spec.N > max_N:
        return f"over the size limit (N = {spec.N} > max_N {max_N})"
    return ""


def to_float(t: torch.Tensor) -> torch.Tensor:
    """A float32/float64 view of a weight (dequantising torch-quantised tensors)."""
    if t.is_quantized:
        t = t.dequantize()
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    return t.detach()


def layer_matrices(spec: LayerSpec, w: torch.Tensor, conv_mode: str = "ww",
                   partner: torch.Tensor | None = None) -> torch.Tensor:
    """The matrices of one layer as a ``(B, n, m)`` stack with ``n >= m``.

    Parameters
    ----------
    spec : LayerSpec
        From :func:`plan_layers`.
    w : Tensor
        The source tensor's values.
    conv_mode : {"ww", "unfold"}
        Convolution layout.
    partner : Tensor, optional
        The ``lora_A`` factor for a LoRA spec.

    Returns
    -------
    Tensor
        ``B = rf`` kernel-position slices in ``ww`` conv mode, else ``B = 1``.
    """
    w = to_float(w)
    if spec.kind == "lora-b":
        assert partner is not None
        mats = (w @ to_float(partner).to(w.dtype))[None]
    elif spec.groups is not None and spec.rows is not None:
        start, stop = spec.rows
        mats = w.reshape(spec.groups, -1, w.shape[1])[:, start:stop].reshape(-1, w.shape[1])[None]
    elif spec.kind in ("attention-qkv", "recurrent") and spec.part is not None:
        assert spec.split_dim is not None
        mats = w.chunk(spec.n_parts, dim=spec.split_dim)[spec.part][None]
    elif spec.kind == "experts":
        assert spec.part is not None
        mats = w[spec.part][None]
    elif spec.kind.startswith("conv"):
        out, inp = w.shape[0], w.shape[1]
        if conv_mode == "ww":
            mats = w.reshape(out, inp, -1).permute(2, 0, 1)  # (rf, out, in)
        else:
            mats = w.reshape(out, -1)[None]
    else:
        mats = (w.reshape(squeezed_shape(w.shape)) if w.ndim > 2 else w)[None]
    if mats.shape[1] < mats.shape[2]:
        mats = mats.mT
    return mats
