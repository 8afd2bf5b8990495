"""Data specifications: ``digits``, ``mnist1d``, ``.npz`` files, image folders.

A DATA spec is ``NAME[?key=value&key=value]``:

- ``digits`` — scikit-learn's bundled 8×8 handwritten digits (1,797 images, 1×8×8, /16);
- ``mnist1d`` — generated offline by the ``mnist1d`` package (40-long signals);
- ``path/to/file.npz`` — arrays ``x`` and ``y`` (uint8 images are scaled to [0, 1]
  and turned channel-first), or ``x`` alone holding token ids: sequences ``(n, T)``, or one
  token stream ``(N,)`` (a tokenised corpus) cut into sequences of ``block`` tokens;
- ``path/to/folder`` — one sub-folder of images per class.

Options: ``split=train|test|all`` (digits and mnist1d; a fixed seeded 75/25 split for
digits), ``normalize=none|imagenet|cifar|inception|clip|standard``, ``flatten=1``,
``block=T`` (a token stream's sequence length, default :data:`STREAM_BLOCK`), ``bgr=1`` (reverse
the colour channels of 3-channel images, BGR ↔ RGB — OpenCV reads BGR — before any
normalisation).

From Python, :func:`as_data` also accepts ``(x, y)`` tensors or arrays, a
``DataLoader`` and a :class:`DataBundle`.

Input dtypes: floating inputs are held as float32; integer inputs (other than the uint8
images of ``.npz`` files and image folders, which become floats in [0, 1]) are held as
int64, because they may be token ids. Whether integers are ids or numeric features depends
on the model, so it is decided where a model meets the data, in one place:
:func:`model_inputs` keeps them int64 when the model reads them through an
``nn.Embedding``/``nn.EmbeddingBag`` (:func:`index_layer`) and casts them to the floating
analysis dtype otherwise. Every analysis feeds ``bundle.x`` to a model through it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import numpy as np
import torch
from torch import nn

from nndiag.errors import DataError, InputError

BUILTIN_DATA = ("digits", "mnist1d")
_NORMS = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    # [0, 1] to [-1, 1]: Inception, Hugging Face ViT image processors, SigLIP
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    # OpenAI CLIP's image preprocessing
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
}
_OPTIONS = ("split", "normalize", "flatten", "block", "bgr")
#: Tokens per sequence when a 1-D token stream is cut (``block=`` overrides): the usual
#: evaluation context of small causal models, within GPT-2's 1,024 positions.
STREAM_BLOCK = 128
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
#: Layers whose input is integer indices (token ids), not numbers to compute with.
INDEX_LAYERS: tuple[type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag)


@dataclass(frozen=True)
class DataBundle:
    """A labelled classification data set (or token sequences) held as tensors.

    Attributes
    ----------
    x : torch.Tensor
        Inputs, first axis = examples: float32, or int64 when the source holds integers
        (token ids or integer features; :func:`model_inputs` makes them what a model takes).
    y : torch.Tensor
        Integer class labels (int64), or for token sequences (``meta["tokens"]``, an
        ``.npz`` with ``x`` alone) the token ids ``x`` themselves, the targets of the
        next-token loss (:func:`nndiag.landscape._setup.lm_loss`).
    name : str
        The spec it came from.
    num_classes : int
        Number of classes (max label + 1, or the known count).
    meta : dict
        Facts about the source (class names, normalisation, split).
    """

    x: torch.Tensor
    y: torch.Tensor
    name: str
    num_classes: int
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def subset(self, n: int | None, seed: int | None = 0) -> DataBundle:
        """A seeded random subset of ``n`` examples (all of them when ``n`` is None)."""
        if n is None or n >= len(self):
            if n is not None and n > len(self):
                raise DataError(f"{self.name}: asked for {n} samples but it has only {len(self)}")
            return self
        if n < 1:
            raise DataError(f"{self.name}: n_samples must be at least 1, got {n}")
        g = torch.Generator().manual_seed(0 if seed is None else int(seed))
        idx = torch.randperm(len(self), generator=g)[:n]
        return self.take(idx)

    def take(self, idx: torch.Tensor | np.ndarray | list[int]) -> DataBundle:
        """The examples at ``idx``."""
        idx_t = torch.as_tensor(idx, dtype=torch.long)
        return replace(self, x=self.x[idx_t], y=self.y[idx_t])

    def split(self, test_fraction: float = 0.25, seed: int = 0) -> tuple[DataBundle, DataBundle]:
        """A seeded random (train, test) split."""
        g = torch.Generator().manual_seed(int(seed))
        perm = torch.randperm(len(self), generator=g)
        n_test = int(round(len(self) * test_fraction))
        return self.take(perm[n_test:]), self.take(perm[:n_test])

    def loader(self, batch_size: int = 128, shuffle: bool = False, seed: int = 0) -> torch.utils.data.DataLoader:
        """A ``DataLoader`` over the bundle."""
        ds = torch.utils.data.TensorDataset(self.x, self.y)
        g = torch.Generator().manual_seed(int(seed)) if shuffle else None
        return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g)

    def batches(self, batch_size: int = 128) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Consecutive ``(x, y)`` batches without a DataLoader's overhead."""
        return [(self.x[i:i + batch_size], self.y[i:i + batch_size]) for i in range(0, len(self), batch_size)]


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """Split ``NAME?key=value&...`` into the name and its options."""
    name, _, query = spec.partition("?")
    opts = dict(parse_qsl(query, keep_blank_values=True)) if query else {}
    bad = [k for k in opts if k not in _OPTIONS]
    if bad:
        raise DataError(f"{spec}: unknown data option(s) {', '.join(bad)}; valid: {', '.join(_OPTIONS)}")
    return name, opts


def _bundle(x: Any, y: Any, name: str, num_classes: int | None = None, **meta: Any) -> DataBundle:
    xt = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    yt = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y)
    # token sequences for the next-token loss: y is x itself (per-token tags, as for named-entity
    # recognition, are another task and are refused below)
    tokens = (yt.ndim == 2 and tuple(yt.shape) == tuple(xt.shape) and not yt.is_floating_point()
              and not xt.is_floating_point() and torch.equal(yt.long(), xt.long()))
    if xt.ndim == 0 or not (yt.ndim == 1 or tokens):
        raise DataError(f"{name}: x must have an example axis and y must be 1-D class labels, or the token ids "
                        f"x themselves for a language model (got shapes {tuple(xt.shape)} and {tuple(yt.shape)})")
    if xt.shape[0] != yt.shape[0]:
        raise DataError(f"{name}: x has {xt.shape[0]} examples but y has {yt.shape[0]}")
    if xt.shape[0] == 0:
        raise DataError(f"{name}: no examples")
    if yt.is_floating_point():
        if not torch.all(yt == yt.round()):
            raise DataError(f"{name}: y must hold integer class labels")
    yt = yt.long()
    if int(yt.min()) < 0:
        raise DataError(f"{name}: class labels must be >= 0 (found {int(yt.min())})")
    if xt.is_floating_point() or xt.is_complex() or xt.dtype == torch.bool:
        xt = xt.to(torch.float32)
        if not torch.isfinite(xt).all():
            raise DataError(f"{name}: x contains NaN or Inf")
    else:  # maybe token ids: model_inputs decides, per model, whether they stay integers
        xt = xt.to(torch.int64)
    k = int(yt.max()) + 1
    if num_classes is not None:
        if k > num_classes:
            raise DataError(f"{name}: label {k - 1} out of range for {num_classes} classes")
        k = num_classes
    if tokens:
        meta = {**meta, "tokens": True}  # y holds x's own ids: next-token targets
    return DataBundle(xt, yt, name, k, dict(meta))


def _images_to_float(x: np.ndarray) -> np.ndarray:
    """uint8 images (N,H,W), (N,H,W,C) or (N,C,H,W) → float32 channel-first in [0, 1]."""
    x = x.astype(np.float32) / 255.0
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        return np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2)))
    return x


def _digits(split: str, seed: int = 0) -> DataBundle:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]
    y = d.target.astype(np.int64)
    bundle = _bundle(x, y, "digits", 10, classes=[str(i) for i in range(10)])
    if split == "all":
        return bundle
    train, test = bundle.split(0.25, seed=0)
    return replace(train if split == "train" else test, name=f"digits?split={split}")


def _mnist1d(split: str) -> DataBundle:
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:
        raise DataError("mnist1d: the 'mnist1d' package is needed: pip install 'nndiag[mnist1d]'") from None
    args = get_dataset_args()
    args.seed = 42
    data = make_dataset(args)  # the generator: no download
    if split == "train":
        x, y = data["x"], data["y"]
    elif split == "test":
        x, y = data["x_test"], data["y_test"]
    else:
        x, y = np.concatenate([data["x"], data["x_test"]]), np.concatenate([data["y"], data["y_test"]])
    return _bundle(x.astype(np.float32), y, "mnist1d" if split == "all" else f"mnist1d?split={split}", 10)


def _npz(path: Path, block: str | None = None) -> DataBundle:
    stream: dict[str, Any] = {}
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = list(f.keys())
            tokens = "y" not in keys and "x" in keys and f["x"].ndim in (1, 2) and f["x"].dtype.kind in "iu"
            if ("x" not in keys or "y" not in keys) and not tokens:
                raise DataError(f"{path}: .npz must contain arrays 'x' and 'y', or 'x' alone holding token ids "
                                f"(batch, T) or one stream (N,) (found: {', '.join(keys) or 'none'})")
            x = f["x"]
            if block is not None and not (tokens and x.ndim == 1):
                raise DataError(f"{path}: block= cuts a token stream (an 'x' of token ids alone, 1-D); "
                                f"this file holds x of shape {x.shape}")
            if tokens and x.ndim == 1:
                x, stream = _cut_stream(x, block, path)
            y = x.astype(np.int64) if tokens else f["y"]
            classes = [str(c) for c in f["classes"]] if "classes" in keys else None
    except DataError:
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"{path}: cannot read .npz ({first})") from None
    if x.dtype == np.uint8 and not tokens:
        x = _images_to_float(x)
    meta = {"classes": classes} if classes else {}
    return _bundle(x, y, str(path), len(classes) if classes else None, **meta, **stream)


def _cut_stream(x: np.ndarray, block: str | None, path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """A 1-D token stream as ``(n, block)`` sequences (the remainder left out, and counted)."""
    try:
        t = STREAM_BLOCK if block is None else int(block)
    except ValueError:
        raise DataError(f"{path}: block={block} is not a whole number of tokens") from None
    if t < 2:
        raise DataError(f"{path}: block={t}: next-token prediction needs sequences of at least 2 tokens")
    n = x.size // t
    if n == 0:
        raise DataError(f"{path}: the stream holds {x.size} tokens, fewer than one block of {t}; "
                        f"give a smaller block=")
    return x[: n * t].reshape(n, t), {"block": t, "stream_tokens": int(x.size),
                                      "dropped_tokens": int(x.size - n * t)}


def _image_folder(path: Path) -> DataBundle:
    from PIL import Image

    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{path}: folder has no class sub-folders (expected one folder of images per class)")
    xs, ys, size, mode = [], [], None, None
    for label, cls in enumerate(classes):
        for f in sorted((path / cls).iterdir()):
            if f.suffix.lower() not in _IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(f) as im:
                    mode = mode or ("L" if im.mode in ("L", "1", "I;16") else "RGB")
                    arr = np.asarray(im.convert(mode))
            except Exception as exc:
                raise DataError(f"{f}: cannot read image ({exc})") from None
            if size is None:
                size = arr.shape
            elif arr.shape != size:
                raise DataError(f"{f}: image shape {arr.shape} differs from {size}; resize images to one size")
            xs.append(arr)
            ys.append(label)
    if not xs:
        raise DataError(f"{path}: no images found in its class folders")
    x = _images_to_float(np.stack(xs).astype(np.uint8))
    return _bundle(x, np.asarray(ys), str(path), len(classes), classes=classes)


#: The ``normalize=`` choices (besides ``none``).
NORMALIZATIONS = (*_NORMS, "standard")


def normalize_inputs(x: torch.Tensor, how: str, *, name: str = "data") -> torch.Tensor:
    """``x`` normalised as the ``normalize=`` DATA option does it.

    Parameters
    ----------
    x : torch.Tensor
        Inputs, first axis = examples (integers are cast to float32 first).
    how : {"none", "imagenet", "cifar", "inception", "clip", "standard"}
        ``imagenet``/``cifar``: per-channel mean and std of those datasets (3-channel
        images in [0, 1]); ``inception``: to [-1, 1] (mean = std = 0.5: Inception, Hugging
        Face ViT, SigLIP); ``clip``: OpenAI CLIP's per-channel mean and std; ``standard``:
        every feature to mean 0 and std 1 over ``x``.
    name : str
        The data's name, for error messages.

    Returns
    -------
    torch.Tensor

    Examples
    --------
    >>> normalize_inputs(torch.tensor([[0.0], [2.0]]), "standard").flatten().tolist()
    [-0.7071067690849304, 0.7071067690849304]
    """
    if how != "none" and not x.is_floating_point():
        x = x.float()  # normalised integers are numeric features, not ids
    if how in _NORMS:
        if x.ndim != 4 or x.shape[1] != 3:
            raise DataError(f"{name}: normalize={how} needs 3-channel images, got shape {tuple(x.shape)}")
        mean, std = (torch.tensor(v, dtype=x.dtype).view(1, 3, 1, 1) for v in _NORMS[how])
        return (x - mean) / std
    if how == "standard":
        return (x - x.mean(0, keepdim=True)) / x.std(0, keepdim=True).clamp_min(1e-8)
    if how != "none":
        raise DataError(f"{name}: unknown normalize={how}; valid: none, {', '.join(NORMALIZATIONS)}")
    return x


def reverse_channels(x: torch.Tensor, *, name: str = "data") -> torch.Tensor:
    """3-channel images ``(N, 3, H, W)`` with their colour channels in reverse order (BGR ↔ RGB)."""
    if x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
        raise DataError(f"{name}: bgr=1 needs 3-channel images, got shape {tuple(x.shape)}")
    return x.flip(1)


def with_options(b: DataBundle, opts: dict[str, str]) -> DataBundle:
    """``b`` with the DATA options ``bgr``, ``normalize`` and ``flatten`` applied (in that
    order), its name carrying them, ``meta["normalize"]`` set."""
    norm = opts.get("normalize", "none")
    x = b.x
    if opts.get("bgr", "0") not in ("0", "false", ""):
        x = reverse_channels(x, name=b.name)
    x = normalize_inputs(x, norm, name=b.name)
    if opts.get("flatten", "0") not in ("0", "false", ""):
        x = x.reshape(x.shape[0], -1)
    meta = dict(b.meta, normalize=norm)
    # the name keeps the options given, so that reports and messages say which data exactly
    base, _, query = b.name.partition("?")  # built-in sets name their split already
    given = {**dict(parse_qsl(query, keep_blank_values=True)), **opts}
    name = base + ("?" + "&".join(f"{k}={v}" for k, v in given.items()) if given else "")
    return replace(b, x=x, meta=meta, name=name)


def load_data(
    spec: str | Path,
    *,
    n_samples: int | None = None,
    seed: int | None = 0,
    split: str | None = None,
    normalize: str | None = None,
) -> DataBundle:
    """Load a DATA spec into a :class:`DataBundle`.

    Parameters
    ----------
    spec : str or Path
        ``digits``, ``mnist1d``, a ``.npz`` path or an image folder, optionally with
        ``?split=...&normalize=...&flatten=1``.
    n_samples : int, optional
        Keep a seeded random subset of this size.
    seed : int, optional
        Seed for the subset.
    split, normalize : str, optional
        Same as the spec options (the spec's own options win).

    Raises
    ------
    DataError
        The spec names nothing, the file lacks ``x``/``y``, lengths differ, etc.

    Examples
    --------
    >>> d = load_data("digits", n_samples=100)
    >>> len(d), d.input_shape
    (100, (1, 8, 8))
    """
    name, opts = parse_spec(str(spec))
    if split is not None:
        opts.setdefault("split", split)
    if normalize is not None:
        opts.setdefault("normalize", normalize)
    sp = opts.get("split", "all")
    if sp not in ("train", "test", "all"):
        raise DataError(f"{spec}: unknown split '{sp}'; valid: train, test, all")
    path = Path(name).expanduser()
    if "block" in opts and not (path.is_file() and path.suffix.lower() == ".npz"):
        raise DataError(f"{spec}: block= cuts the token stream of an .npz file")
    if name == "digits":
        bundle = _digits(sp)
    elif name == "mnist1d":
        bundle = _mnist1d(sp)
    elif path.is_file():
        if path.suffix.lower() != ".npz":
            raise DataError(f"{path}: unsupported data file type '{path.suffix}'; expected .npz with x and y")
        bundle = _npz(path, opts.get("block"))
    elif path.is_dir():
        bundle = _image_folder(path)
    else:
        raise DataError(
            f"{spec}: names no data set; expected one of {', '.join(BUILTIN_DATA)}, a .npz file or an image folder"
        )
    bundle = with_options(bundle, opts)
    return bundle.subset(n_samples, seed)


def as_data(obj: Any, *, n_samples: int | None = None, seed: int | None = 0, name: str = "data") -> DataBundle:
    """Coerce a spec, ``(x, y)`` pair, ``DataLoader`` or :class:`DataBundle` into a bundle.

    A ``DataLoader`` is read until ``n_samples`` examples are collected (all of it
    when ``n_samples`` is None).
    """
    if isinstance(obj, DataBundle):
        return obj.subset(n_samples, seed)
    if isinstance(obj, (str, Path)):
        return load_data(obj, n_samples=n_samples, seed=seed)
    if isinstance(obj, (tuple, list)) and len(obj) == 2:
        return _bundle(obj[0], obj[1], name).subset(n_samples, seed)
    if isinstance(obj, torch.utils.data.DataLoader):
        xs, ys, n = [], [], 0
        for batch in obj:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise DataError(f"{name}: DataLoader batches must be (x, y) pairs")
            xs.append(torch.as_tensor(batch[0]))
            ys.append(torch.as_tensor(batch[1]))
            n += len(ys[-1])
            if n_samples is not None and n >= n_samples:
                break
        if not xs:
            raise DataError(f"{name}: DataLoader yielded no batches")
        b = _bundle(torch.cat(xs), torch.cat(ys), name)
        return b.take(torch.arange(min(len(b), n_samples))) if n_samples else b
    raise DataError(f"cannot use {type(obj).__name__} as data; pass a spec, (x, y), a DataLoader or a DataBundle")


class _Reached(Exception):
    """Raised by :func:`_first_layer`'s hook to stop the forward pass at the first layer."""


def _first_layer(model: nn.Module, x: torch.Tensor) -> nn.Module | None:
    """The first leaf module (or index layer) a forward pass on ``x[:1]`` calls.

    The pass is stopped by a forward pre-hook before that module runs, so nothing of the
    model is computed or changed beyond the Python code of ``forward`` ahead of it; the
    hooks are removed again. None when the pass raises before any module is reached.
    """
    from nndiag._utils.device import model_device

    reached: list[nn.Module] = []

    def hook(module: nn.Module, _args: Any) -> None:
        reached.append(module)
        raise _Reached

    handles = []
    try:
        for m in model.modules():
            if isinstance(m, INDEX_LAYERS) or next(m.children(), None) is None:
                handles.append(m.register_forward_pre_hook(hook))
        with torch.no_grad():
            model(x[:1].to(model_device(model)))
    except Exception:  # _Reached, or the model cannot run on integers before any layer
        pass
    finally:
        for h in handles:
            h.remove()
    return reached[0] if reached else None


def index_layer(model: nn.Module, x: torch.Tensor) -> tuple[str, nn.Embedding | nn.EmbeddingBag] | None:
    """The embedding layer that reads ``x`` as indices, or None when ``x`` is numeric input.

    Integer ``x`` is read as indices when the first layer the model applies to it is an
    ``nn.Embedding`` or ``nn.EmbeddingBag`` (or a subclass): found with a forward pass on
    one example that stops before that layer runs (:func:`_first_layer`). When that pass
    fails before reaching any layer, the first leaf module in registration order decides.
    Models without an embedding layer, and floating or boolean ``x``, never take indices
    (no forward pass is made for them).

    Parameters
    ----------
    model : nn.Module
        The model the data is for.
    x : torch.Tensor
        Inputs, first axis = examples.

    Returns
    -------
    (str, nn.Embedding or nn.EmbeddingBag) or None
        The layer's qualified name (``""`` for the model itself) and the layer.
    """
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool or x.shape[0] == 0:
        return None
    if not any(isinstance(m, INDEX_LAYERS) for m in model.modules()):
        return None
    first = _first_layer(model, x)
    if first is None:
        first = next((m for m in model.modules() if next(m.children(), None) is None), None)
    if not isinstance(first, (nn.Embedding, nn.EmbeddingBag)):
        return None
    return next(n for n, m in model.named_modules() if m is first), first


def misfit(model: nn.Module, x: torch.Tensor, exc: BaseException) -> DataError:
    """The one-line error for a forward pass of ``model`` on ``x`` that raised ``exc``:
    the examples' shape, the model's class and the first line of PyTorch's message."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return DataError(f"data of shape {tuple(x.shape[1:])} does not fit {type(model).__name__}: {first}")


def model_inputs(
    model: nn.Module,
    x: torch.Tensor,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    name: str = "data",
) -> torch.Tensor:
    """``x`` as ``model`` takes it: the one rule for input dtypes in nndiag.

    - floating (and boolean) ``x`` is cast to ``dtype``;
    - integer ``x`` stays integer (int64) when the model reads it through an embedding
      layer (:func:`index_layer`), after a check that every id lies in the layer's range;
    - other integer ``x`` (counts, pixel values, integer features) is cast to ``dtype``.

    So a float64 analysis runs numeric inputs in float64 and leaves token ids int64.

    Parameters
    ----------
    model : nn.Module
        The model the inputs are for.
    x : torch.Tensor
        Inputs (e.g. ``DataBundle.x``), first axis = examples.
    device : torch.device or str, optional
        Move the result there (default: where ``x`` is).
    dtype : torch.dtype, optional
        Floating dtype of numeric inputs; by default the model's own (that of its first
        floating parameter: a bfloat16 or float64 model gets inputs of its dtype), float32
        for a model without floating parameters.
    name : str
        The data's name, for error messages.

    Returns
    -------
    torch.Tensor
        ``x`` itself when nothing needs to change, else a converted copy.

    Raises
    ------
    InputError
        ``dtype`` is not a floating dtype.
    DataError
        Token ids outside ``[0, num_embeddings - 1]`` of the embedding layer.

    Examples
    --------
    >>> emb = nn.Sequential(nn.Embedding(100, 4), nn.Flatten(), nn.Linear(12, 2))
    >>> model_inputs(emb, torch.tensor([[1, 2, 3]])).dtype
    torch.int64
    >>> model_inputs(nn.Linear(3, 2), torch.tensor([[1, 2, 3]]), dtype=torch.float64).dtype
    torch.float64
    >>> model_inputs(nn.Linear(3, 2).to(torch.bfloat16), torch.ones(1, 3)).dtype
    torch.bfloat16
    """
    if dtype is None:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if not dtype.is_floating_point:
        raise InputError(f"the analysis dtype must be a floating dtype, got {dtype}")
    found = index_layer(model, x)
    if found is None:
        return x.to(device=device, dtype=dtype)
    layer_name, layer = found
    n = int(layer.num_embeddings)
    lo, hi = int(x.min()), int(x.max())
    if lo < 0 or hi >= n:
        where = f"layer '{layer_name}'" if layer_name else "the model"
        raise DataError(f"{name}: token ids must lie in [0, {n - 1}] for {where} "
                        f"({type(layer).__name__} with {n} entries); found {lo}..{hi}")
    return x.to(device=device, dtype=torch.int64)
