"""CommVQ codebooks (Li et al., ICML 2025, arXiv 2506.18879): key codebooks (theta), value codecs, file formats.

Two on-disk formats:

- **native** (what :class:`CommVQCodebooks` writes and the press loads): a directory with ``commvq.json`` (model,
  bits, residuals, head_dim, num_layers, num_kv_heads, value codec sizes), ``keys.safetensors`` (``key_theta``
  fp16 ``[L, H_kv, R, 128, head_dim/2]``, ``key_mse`` fp32 ``[L, H_kv, R]`` and, for codebooks trained under a
  weighted key distance, ``key_pair_weights`` fp32 ``[L, H_kv, head_dim/2]``) and, when values are trained,
  ``values.safetensors`` (one :class:`ValueCodec` state per layer, keys ``"{layer}.{name}"``).
- **reference** (UMass-Embodied-AGI/CommVQ ``training/quantize_key_cache.py``): one file per layer and KV head,
  ``{layer:03d}_{group}.pt`` holding ``{"steps": [{"mse_loss": 0-d tensor, "theta": [128, head_dim/2],
  "clustering_centers": [4096, head_dim]}, ... R], "final_error": float}`` (we add ``"pair_weights": [head_dim/2]``
  for a weighted key distance; the reference's code ignores it and would search such codebooks with the Euclidean
  distance they were not trained for, and their ``mse_loss`` is then in the weighted distance). Keys only. Files are
  read with
  ``torch.load(..., weights_only=True)``: loading a codebook never runs code from it.

How the codebooks are applied (the contract the training follows):

- **keys** of layer ``l``, before RoPE, ``k [T, H_kv, head_dim]`` in the model's ``rotate_half`` layout:
  ``x = to_interleaved(k)``; ``norm = ||x||`` over all heads of the token (``[T]``, kept); ``r = x / norm``; for
  each head ``h``, ``codes, _ = residual_encode(r[:, h], key_theta[l, h])`` (``[T, R]`` 12-bit codes; with
  ``key_pair_weights``, the search runs on ``rs, ts = search_operands(r, key_theta[l], key_pair_weights[l])``, i.e.
  ``residual_encode(rs[:, h], ts[h])``, the weighted distance) and
  ``k_hat = from_interleaved(residual_decode(codes, key_theta[l, h]) * norm)``;
- **values** of layer ``l``, ``v [T, H_kv * head_dim]`` (the ``v_proj`` output, heads concatenated):
  ``bits, prescale = values[l].encode(v)`` and ``v_hat = values[l].decode(bits, prescale)``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pressroom.kernels.commvq_codebook import THETA_ROWS, centers_from_theta, check_pair_weights
from pressroom.kernels.commvq_refine import refine_value_bits
from pressroom.kernels.commvq_value_codes import choices_to_bits
from pressroom.kernels.commvq_value_prep import normalized_features

NATIVE_CONFIG = "commvq.json"
NATIVE_KEYS = "keys.safetensors"
NATIVE_VALUES = "values.safetensors"
FORMAT_NAME = "pressroom-commvq"
FORMAT_VERSION = 1
_REFERENCE_FILE = re.compile(r"^(\d{3,})_(\d+)\.pt$")


def residuals_for_bits(bits: float, head_dim: int) -> int:
    """Residual steps ``R`` for ``bits`` per key element: ``round(bits * head_dim / 12)`` (12 bits per code).

    head_dim 128: R=21 (2 bits, 1.97 actual), R=11 (1 bit, 1.03); head_dim 64: R=11 (2 bits, 2.06), R=5 (1 bit, 0.94).
    """
    if bits <= 0 or head_dim <= 0 or head_dim % 2:
        raise ValueError(f"need bits > 0 and an even head_dim > 0, got bits={bits}, head_dim={head_dim}.")
    return max(1, int(math.floor(bits * head_dim / 12 + 0.5)))


def model_kv_shape(model_config: Any) -> tuple[int, int, int]:
    """``(num_layers, num_kv_heads, head_dim)`` of a transformers config."""
    layers = int(model_config.num_hidden_layers)
    heads = int(getattr(model_config, "num_key_value_heads", None) or model_config.num_attention_heads)
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    return layers, heads, int(head_dim)


class ValueCodec(nn.Module):
    """CommVQ value codec of one layer: encoder to 2-bit choices and a learned binary additive codebook.

    ``v`` (all KV heads of a token together, ``feat_dim = H_kv * head_dim``) is divided by a fixed per-channel
    ``scale`` (mean ``|v|`` per channel of collected values), then by its norm (``prescale``, kept exactly); the
    encoder ``LayerNorm -> Linear -> GELU -> Linear`` gives ``n_e = feat_dim * bits / 2`` four-way choices, each
    mapped to 2 bits (choice 0 -> 10, 1 -> 01, 2 -> 11, 3 -> 00, the reference's ``x[..., :2] += x[..., 2:3]``), so
    a token costs ``feat_dim * bits`` bits. Decoding: ``bits @ embedding`` (``embedding [n_e*2, feat_dim]``),
    divided by its own norm (``postscale``), times ``prescale``, times ``scale``.

    Parameters
    ----------
    feat_dim : int
        ``num_kv_heads * head_dim``.
    bits : int
        Bits per value element (1 or 2).
    intermediate_dim : int or None
        Encoder width; default ``min(4096, 4 * n_e)`` as in the reference.
    """

    eps = 1e-6

    def __init__(self, feat_dim: int, bits: int, intermediate_dim: int | None = None) -> None:
        super().__init__()
        if feat_dim <= 0 or bits not in (1, 2) or (feat_dim * bits) % 2:
            raise ValueError(f"ValueCodec needs bits in (1, 2) and feat_dim*bits even, got {feat_dim=}, {bits=}.")
        self.feat_dim = int(feat_dim)
        self.bits = int(bits)
        self.n_e = self.feat_dim * self.bits // 2
        self.intermediate_dim = int(intermediate_dim or min(4096, 4 * self.n_e))
        self.embedding = nn.Parameter(torch.randn(2 * self.n_e, self.feat_dim))
        self.norm1 = nn.LayerNorm(self.feat_dim)
        self.enc1 = nn.Linear(self.feat_dim, self.intermediate_dim)
        self.act1 = nn.GELU()
        self.out = nn.Linear(self.intermediate_dim, 4 * self.n_e)
        self.register_buffer("scale", torch.ones(self.feat_dim))

    @property
    def code_bits(self) -> int:
        """Bits per token: ``2 * n_e = feat_dim * bits``."""
        return 2 * self.n_e

    def _check(self, v: torch.Tensor) -> None:
        if v.shape[-1] != self.feat_dim:
            raise ValueError(f"values must end in feat_dim={self.feat_dim} (all KV heads together), got {v.shape}.")

    def logits(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder logits ``[..., n_e, 4]`` and ``prescale [..., 1]`` (norm of the scaled value)."""
        self._check(v)
        n = self.norm1
        y, prescale = normalized_features(v.to(self.embedding.dtype), self.scale, self.eps, n.weight, n.bias, n.eps)
        return self.head(y), prescale

    def head(self, y: torch.Tensor) -> torch.Tensor:
        """Encoder logits ``[..., n_e, 4]`` from the layer norm's output ``y [..., feat_dim]`` (what
        :func:`pressroom.kernels.commvq_value_prep.value_prep` computes in one pass): ``Linear -> GELU -> Linear``."""
        return self.out(self.act1(self.enc1(y))).unflatten(-1, (self.n_e, 4))

    def head_differences(self, y: torch.Tensor) -> torch.Tensor:
        """What the choices need of :meth:`head`'s logits: ``l_c - l_0`` for ``c = 1, 2, 3`` as three planes,
        ``[..., 3, n_e]`` (plane ``c - 1``; what ``value_codes(..., differences=True)`` reads).

        The arg-max of ``(l_0, .., l_3)`` is that of ``(0, l_1 - l_0, l_2 - l_0, l_3 - l_0)``
        (:func:`pressroom.kernels.commvq_value_codes.value_codes` with ``differences=True``), and the differences
        come straight from the last ``Linear``'s weight and bias differences (taken in float32): a quarter fewer
        multiply-adds in that matmul (the encoder's larger one) and a quarter fewer logits written and read. Both
        matmuls run in ``y``'s dtype with weights cast to it once and kept (bfloat16 in the cache's
        ``encode_precision="half"``: the casts autocast would redo at every call); the choices equal
        :meth:`head`'s up to rounding (near-ties may go another way)."""
        self._check(y)
        w1, b1, wd, bd = self._cast_weights("head_differences", y)
        return nn.functional.linear(self.act1(nn.functional.linear(y, w1, b1)), wd, bd).unflatten(-1, (3, self.n_e))

    def _cast_weights(self, kind: str, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``kind``'s weights in ``like``'s dtype and device, cast once and kept until a parameter changes (its
        storage or version): ``"head_differences"``: ``enc1``'s weight and bias and the last ``Linear``'s weight and
        bias differences ``[3 n_e, intermediate_dim]``, ``[3 n_e]`` (plane-major: row ``(c - 1) n_e + e``);
        ``"embedding"``: ``(embedding,)``."""
        if kind == "embedding":
            params = (self.embedding,)
        else:
            params = (self.enc1.weight, self.enc1.bias, self.out.weight, self.out.bias)
        key = (like.dtype, like.device, tuple((p.data_ptr(), p._version) for p in params))
        cache = self.__dict__.setdefault("_casts", {})
        if kind not in cache or cache[kind][0] != key:
            with torch.no_grad():
                weights = params
                if kind == "head_differences":
                    w = self.out.weight.float().view(self.n_e, 4, -1)
                    b = self.out.bias.float().view(self.n_e, 4)
                    wd = (w[:, 1:] - w[:, :1]).transpose(0, 1).reshape(3 * self.n_e, -1)
                    bd = (b[:, 1:] - b[:, :1]).transpose(0, 1).reshape(3 * self.n_e)
                    weights = (self.enc1.weight, self.enc1.bias, wd, bd)
                cache[kind] = (key, tuple(t.detach().to(like.device, like.dtype) for t in weights))
        return cache[kind][1]

    @staticmethod
    def choices_to_bits(onehot: torch.Tensor) -> torch.Tensor:
        """Four-way one-hot ``[..., n_e, 4]`` -> bits ``[..., 2 n_e]`` (differentiable; reference mapping)."""
        return (onehot[..., :2] + onehot[..., 2:3]).flatten(-2)

    def encode(self, v: torch.Tensor, sample: bool = False, tau: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Bits (uint8 0/1 ``[..., 2 n_e]``) and ``prescale [..., 1]`` (float32).

        ``sample=False`` takes the arg-max choice (deterministic); ``True`` draws hard Gumbel-softmax samples as the
        reference does at inference.
        """
        with torch.no_grad():
            logits, prescale = self.logits(v)
            if sample:
                onehot = nn.functional.gumbel_softmax(logits.float(), tau=tau, hard=True)
                return self.choices_to_bits(onehot).to(torch.uint8), prescale.float()
            return self.argmax_to_bits(logits.argmax(-1)), prescale.float()

    @staticmethod
    def argmax_to_bits(choice: torch.Tensor) -> torch.Tensor:
        """Choices ``[..., n_e]`` (0..3) -> bits uint8 ``[..., 2 n_e]``, as :meth:`choices_to_bits` of their one-hot
        (0 -> 10, 1 -> 01, 2 -> 11, 3 -> 00) without the ``[..., n_e, 4]`` float tensor."""
        return choices_to_bits(choice)

    def postscale(self, bits: torch.Tensor) -> torch.Tensor:
        """Norm of ``bits @ embedding`` ``[..., 1]`` (the decoded direction is divided by it), taken in float32.

        ``bits`` (0/1) in any dtype; under autocast, floating-point bits already in the autocast dtype go to the
        matmul as they are (the cache's ``encode_precision="half"`` asks :func:`value_codes` for bfloat16 bits), so
        neither a cast of the bits nor a float32 copy of the product is made (the embedding's cast is kept between
        calls): the norm reads the (bfloat16) product and sums in float32, outside autocast (which would cast its
        input to float32 first)."""
        device = bits.device.type
        has_autocast = torch.amp.is_autocast_available(device)  # not on every device type (e.g. "meta")
        as_is = has_autocast and torch.is_autocast_enabled(device) and bits.dtype == torch.get_autocast_dtype(device)
        # as_is: the embedding cast to the bits' dtype once and kept (autocast would cast it at every call)
        embedding = self._cast_weights("embedding", bits)[0] if as_is else self.embedding
        prod = (bits if as_is else bits.to(self.embedding.dtype)) @ embedding
        with torch.autocast(device, enabled=False) if has_autocast else contextlib.nullcontext():
            return torch.linalg.vector_norm(prod, dim=-1, keepdim=True, dtype=torch.float32)

    def decode(self, bits: torch.Tensor, prescale: torch.Tensor) -> torch.Tensor:
        """Values ``[..., feat_dim]`` from bits ``[..., 2 n_e]`` and ``prescale [..., 1]``."""
        if bits.shape[-1] != self.code_bits:
            raise ValueError(f"bits must end in {self.code_bits}, got {tuple(bits.shape)}.")
        x = bits.to(self.embedding.dtype) @ self.embedding
        x = x / (x.norm(dim=-1, keepdim=True) + self.eps)
        return x * (prescale.to(x.dtype) + self.eps) * (self.scale + self.eps)

    def channel_embedding(self) -> torch.Tensor:
        """``E * (scale + eps)`` ``[2 n_e, feat_dim]`` float32: what ``bits`` decode to in the value's own units
        before the per-token coefficient (a decoded value is ``c_t * (bits @ channel_embedding())``)."""
        return self.embedding.detach().float() * (self.scale.float() + self.eps)

    def least_squares_coef(self, v: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        """The per-token coefficient ``c [..., 1]`` minimising ``||v - c (bits @ channel_embedding())||``."""
        y = bits.float() @ self.channel_embedding()
        return (v.float() * y).sum(-1, keepdim=True) / (y * y).sum(-1, keepdim=True).clamp_min(1e-30)

    def refine(
        self, v: torch.Tensor, bits: torch.Tensor, steps: int, use_triton: bool | None = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy bit flips that lower each token's reconstruction error, from the encoder's ``bits``.

        Our addition to CommVQ (the paper and the reference decode the encoder's choices as they are): with
        ``E' = channel_embedding()`` and the least-squares coefficient, a token's error is ``|v|^2 - <v, y>^2 /
        |y|^2`` for ``y = bits @ E'``; each step flips, per token, the one bit that lowers it most (none when no
        flip helps). See :mod:`pressroom.kernels.commvq_refine` (a Triton kernel on CUDA).

        Parameters
        ----------
        v : torch.Tensor
            Values ``[..., feat_dim]``.
        bits : torch.Tensor
            Starting bits ``[..., 2 n_e]`` (0/1, any dtype), e.g. from :meth:`encode`.
        steps : int
            At most this many flips per token (``0``: the bits as given).
        use_triton : bool or None
            ``False`` (default): the PyTorch reference; ``True``: the Triton kernel; ``None``: the kernel on CUDA,
            the reference elsewhere (what the cache does).

        Returns
        -------
        tuple of torch.Tensor
            Bits (uint8, same shape) and the least-squares coefficient ``[..., 1]`` (float32).
        """
        self._check(v)
        if bits.shape[-1] != self.code_bits or bits.shape[:-1] != v.shape[:-1]:
            raise ValueError(f"bits must be {tuple(v.shape[:-1]) + (self.code_bits,)}, got {tuple(bits.shape)}.")
        lead = v.shape[:-1]
        out, coef = refine_value_bits(
            v.reshape(-1, self.feat_dim),
            bits.reshape(-1, self.code_bits),
            self.channel_embedding().to(v.device),
            steps,
            use_triton,
        )
        return out.reshape(*lead, self.code_bits), coef.reshape(*lead, 1)

    def forward(self, v: torch.Tensor, tau: float = 1.0, hard: bool = True) -> torch.Tensor:
        """Training reconstruction: Gumbel-softmax choices (straight-through when ``hard``), decoded."""
        logits, prescale = self.logits(v)
        onehot = nn.functional.gumbel_softmax(logits, tau=tau, hard=hard)
        return self.decode(self.choices_to_bits(onehot), prescale)

    def sizes(self) -> dict[str, int]:
        """Constructor arguments, as stored in ``commvq.json``."""
        return {"feat_dim": self.feat_dim, "bits": self.bits, "intermediate_dim": self.intermediate_dim}


@dataclass
class CommVQCodebooks:
    """Key codebooks (and optionally value codecs) of CommVQ for one model at one bit width.

    Parameters
    ----------
    model_name : str
        The model the codebooks were trained for (informational; :meth:`validate` checks the shapes).
    bits : int
        Nominal bits per element (1 or 2); key bits are ``12 * residuals / head_dim``.
    residuals : int
        ``R``, residual steps per key vector.
    head_dim : int
        Head dimension (``2P``).
    num_layers, num_kv_heads : int
        Model shape.
    key_theta : torch.Tensor
        ``[L, H_kv, R, 128, P]`` float32.
    values : list of ValueCodec or None
        One value codec per layer, or ``None`` (keys only, e.g. the reference format).
    key_mse : torch.Tensor or None
        ``[L, H_kv, R]`` training MSE after each residual step (the reference's ``mse_loss``), if known.
    key_pair_weights : torch.Tensor or None
        ``[L, H_kv, head_dim/2]`` positive weights of the key encoder's distance per RoPE pair (our addition: the
        queries' mean energy per pair to a power, :func:`pressroom.training.commvq_em.query_pair_weights`; the
        codebooks are trained under the same distance). ``None``: the paper's Euclidean distance. Decoding does not
        use them.
    """

    model_name: str
    bits: int
    residuals: int
    head_dim: int
    num_layers: int
    num_kv_heads: int
    key_theta: torch.Tensor
    values: list[ValueCodec] | None = None
    key_mse: torch.Tensor | None = None
    key_pair_weights: torch.Tensor | None = None
    _centers: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        expected = (self.num_layers, self.num_kv_heads, self.residuals, THETA_ROWS, self.head_dim // 2)
        if self.head_dim % 2 or tuple(self.key_theta.shape) != expected:
            raise ValueError(f"key_theta must be {list(expected)}, got {list(self.key_theta.shape)}.")
        self.key_theta = self.key_theta.float()
        if self.key_mse is not None and tuple(self.key_mse.shape) != expected[:3]:
            raise ValueError(f"key_mse must be {list(expected[:3])}, got {list(self.key_mse.shape)}.")
        if self.key_pair_weights is not None:
            shape = (*expected[:2], expected[-1])
            self.key_pair_weights = check_pair_weights(self.key_pair_weights, shape, "key_pair_weights")
        if self.values is not None:
            feat = self.num_kv_heads * self.head_dim
            if len(self.values) != self.num_layers or any(v.feat_dim != feat for v in self.values):
                raise ValueError(f"values must be {self.num_layers} ValueCodec of feat_dim {feat}.")

    def __repr__(self) -> str:
        """The shapes, not the tensors: a press's repr (kvpress's ``press_init_command`` in an evaluation's
        ``config.yaml``) stays one short line."""
        values = "None" if self.values is None else f"<{len(self.values)} ValueCodec>"
        weighted = self.key_pair_weights is not None
        return (
            f"CommVQCodebooks(model_name={self.model_name!r}, bits={self.bits}, residuals={self.residuals}, "
            f"head_dim={self.head_dim}, num_layers={self.num_layers}, num_kv_heads={self.num_kv_heads}, "
            f"values={values}, key_pair_weights={'<weights>' if weighted else None})"
        )

    @property
    def R(self) -> int:  # noqa: N802 - the paper's name
        """Alias of :attr:`residuals`."""
        return self.residuals

    @property
    def key_bits(self) -> float:
        """Actual key bits per element, ``12 R / head_dim``."""
        return 12 * self.residuals / self.head_dim

    def key_centers(self, layer: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Centers ``[H_kv, R, 4096, head_dim]`` (float32, interleaved layout) of ``layer``; cached per device."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} is outside 0..{self.num_layers - 1}.")
        dev = torch.device(device) if device is not None else self.key_theta.device
        key = (layer, str(dev))
        if key not in self._centers:
            self._centers[key] = centers_from_theta(self.key_theta[layer].to(dev)).contiguous()
        return self._centers[key]

    def layer_pair_weights(self, layer: int) -> torch.Tensor | None:
        """The key distance's weights ``[H_kv, head_dim/2]`` of ``layer``, or ``None`` (Euclidean)."""
        return None if self.key_pair_weights is None else self.key_pair_weights[layer]

    # ------------------------------------------------------------------ validation
    def validate(self, model_config: Any) -> None:
        """Raise ``ValueError`` naming the mismatch if these codebooks do not fit ``model_config``."""
        layers, heads, head_dim = model_kv_shape(model_config)
        problems = []
        if layers != self.num_layers:
            problems.append(f"{self.num_layers} layers but the model has {layers}")
        if heads != self.num_kv_heads:
            problems.append(f"{self.num_kv_heads} KV heads but the model has {heads}")
        if head_dim != self.head_dim:
            problems.append(f"head_dim {self.head_dim} but the model has {head_dim}")
        if problems:
            raise ValueError(
                f"CommVQ codebooks for {self.model_name!r} do not fit this model: " + "; ".join(problems) + ". "
                "Train codebooks for this model (`pressroom-train commvq all --model <model> --bits <bits>`) "
                "or load the ones made for it."
            )

    # ------------------------------------------------------------------ native format
    def save_native(self, path: str | os.PathLike, values_dtype: torch.dtype = torch.float32) -> Path:
        """Write the native format (theta in fp16; value codecs in ``values_dtype``) into ``path``; returns it."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {"key_theta": self.key_theta.detach().to("cpu", torch.float16).contiguous()}
        if self.key_mse is not None:
            tensors["key_mse"] = self.key_mse.detach().to("cpu", torch.float32).contiguous()
        if self.key_pair_weights is not None:
            tensors["key_pair_weights"] = self.key_pair_weights.detach().to("cpu", torch.float32).contiguous()
        _atomic_save_file(tensors, out / NATIVE_KEYS)
        config: dict[str, Any] = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "model": self.model_name,
            "bits": self.bits,
            "residuals": self.residuals,
            "head_dim": self.head_dim,
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "values": None,
        }
        if self.values is not None:
            state = {}
            for i, codec in enumerate(self.values):
                for name, t in codec.state_dict().items():
                    state[f"{i}.{name}"] = t.detach().to("cpu", values_dtype).contiguous()
            _atomic_save_file(state, out / NATIVE_VALUES)
            config["values"] = self.values[0].sizes()
        elif (out / NATIVE_VALUES).exists():
            (out / NATIVE_VALUES).unlink()
        _atomic_write_text(out / NATIVE_CONFIG, json.dumps(config, indent=2) + "\n")
        return out

    @classmethod
    def _load_native(cls, path: Path) -> CommVQCodebooks:
        config = json.loads((path / NATIVE_CONFIG).read_text())
        if config.get("format") != FORMAT_NAME:
            raise ValueError(
                f"{path / NATIVE_CONFIG} is not a pressroom CommVQ codebook (format {config.get('format')!r})."
            )
        if not (path / NATIVE_KEYS).exists():
            raise FileNotFoundError(f"{path / NATIVE_KEYS} is missing: the codebook directory is incomplete.")
        keys = load_file(str(path / NATIVE_KEYS))
        values = None
        if config.get("values"):
            if not (path / NATIVE_VALUES).exists():
                raise FileNotFoundError(f"{path / NATIVE_VALUES} is missing but {NATIVE_CONFIG} lists value codecs.")
            state = load_file(str(path / NATIVE_VALUES))
            values = []
            for i in range(int(config["num_layers"])):
                codec = ValueCodec(**config["values"])
                codec.load_state_dict(
                    {k.split(".", 1)[1]: v.float() for k, v in state.items() if k.split(".", 1)[0] == str(i)}
                )
                values.append(codec)
        return cls(
            model_name=str(config["model"]),
            bits=int(config["bits"]),
            residuals=int(config["residuals"]),
            head_dim=int(config["head_dim"]),
            num_layers=int(config["num_layers"]),
            num_kv_heads=int(config["num_kv_heads"]),
            key_theta=keys["key_theta"].float(),
            values=values,
            key_mse=keys.get("key_mse"),
            key_pair_weights=keys.get("key_pair_weights"),
        )

    # ------------------------------------------------------------------ reference format
    def save_reference(self, path: str | os.PathLike) -> Path:
        """Write the reference's ``{layer:03d}_{group}.pt`` files (keys only) into directory ``path``."""
        out = Path(path)
        for layer in range(self.num_layers):
            mse = self.key_mse[layer] if self.key_mse is not None else None
            weights = self.key_pair_weights[layer] if self.key_pair_weights is not None else None
            save_reference_layer(out, layer, self.key_theta[layer], mse, weights)
        return out

    @classmethod
    def _load_reference(cls, path: Path, files: dict[tuple[int, int], Path], bits: int | None) -> CommVQCodebooks:
        layers = sorted({k[0] for k in files})
        groups = sorted({k[1] for k in files})
        if layers != list(range(len(layers))) or groups != list(range(len(groups))):
            raise ValueError(f"{path}: reference files must cover layers 0..L-1 and groups 0..H-1 without gaps.")
        missing = [f"{i:03d}_{g}.pt" for i in layers for g in groups if (i, g) not in files]
        if missing:
            raise FileNotFoundError(f"{path}: missing reference codebook files {missing[:5]}.")
        thetas, mses, weights = [], [], []
        for i in layers:
            row_t, row_m = [], []
            for g in groups:
                data = torch.load(files[(i, g)], map_location="cpu", weights_only=True)
                if not isinstance(data, dict) or "steps" not in data:
                    raise ValueError(f"{files[(i, g)]} is not a CommVQ reference codebook (no 'steps').")
                steps = data["steps"]
                row_t.append(torch.stack([torch.as_tensor(s["theta"]).float() for s in steps]))
                row_m.append(torch.tensor([float(torch.as_tensor(s.get("mse_loss", math.nan))) for s in steps]))
                if "pair_weights" in data:  # our addition (module docstring); the reference ignores it
                    w = torch.as_tensor(data["pair_weights"]).float()
                    if tuple(w.shape) != (row_t[-1].shape[-1],):
                        raise ValueError(
                            f"{files[(i, g)]}: pair_weights has shape {tuple(w.shape)}, not [{row_t[-1].shape[-1]}] "
                            "(one weight per RoPE pair of its theta)."
                        )
                    weights.append(w)
            shapes = {tuple(t.shape) for t in row_t}
            if len(shapes) != 1:
                raise ValueError(f"{path}: layer {i} has codebooks of different shapes {sorted(shapes)}.")
            thetas.append(torch.stack(row_t))
            mses.append(torch.stack(row_m))
        if len({tuple(t.shape) for t in thetas}) != 1:
            raise ValueError(f"{path}: layers have codebooks of different shapes.")
        key_theta = torch.stack(thetas)
        if weights and len(weights) != len(files):
            raise ValueError(
                f"{path}: {len(weights)} of {len(files)} files carry pair_weights; the layers were trained under "
                "different key distances. Retrain the others (`pressroom-train commvq keys --force`)."
            )
        residuals, head_dim = key_theta.shape[2], 2 * key_theta.shape[4]
        nominal = max(1, round(12 * residuals / head_dim))
        return cls(
            model_name=path.name,
            bits=int(bits) if bits is not None else nominal,
            residuals=residuals,
            head_dim=head_dim,
            num_layers=len(layers),
            num_kv_heads=len(groups),
            key_theta=key_theta,
            values=None,
            key_mse=torch.stack(mses),
            key_pair_weights=torch.stack(weights).view(*key_theta.shape[:2], -1) if weights else None,
        )

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | os.PathLike, bits: int | None = None) -> CommVQCodebooks:
        """Load the native format or a directory of reference ``.pt`` files (read with ``weights_only=True``).

        ``path`` may also be a parent directory holding ``{bits}bit/`` (what ``pressroom-train commvq`` writes:
        ``{bits}bit/em/`` is tried first, then ``{bits}bit/e2e/``), in which case ``bits`` picks the sub-directory.
        A ``bits`` that contradicts the files raises ``ValueError``.
        """
        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"CommVQ codebook directory {root} does not exist.")
        if (root / NATIVE_CONFIG).exists():
            books = cls._load_native(root)
        else:
            files = {}
            for f in root.iterdir():
                m = _REFERENCE_FILE.match(f.name)
                if m:
                    files[(int(m.group(1)), int(m.group(2)))] = f
            if files:
                books = cls._load_reference(root, files, bits)
            elif bits is not None and (root / f"{bits}bit").is_dir():
                sub = root / f"{bits}bit"
                for candidate in (sub, sub / "em", sub / "e2e"):  # what `pressroom-train commvq` writes
                    if (candidate / NATIVE_CONFIG).exists() or any(candidate.glob("*_*.pt")):
                        return cls.load(candidate, bits=bits)
                raise FileNotFoundError(f"{sub} holds no CommVQ codebook (run `pressroom-train commvq convert`).")
            else:
                raise FileNotFoundError(
                    f"{root} holds no CommVQ codebook: expected {NATIVE_CONFIG} (native), {{layer:03d}}_{{group}}.pt "
                    "files (reference) or a {bits}bit/ sub-directory."
                )
        if bits is not None and int(bits) != books.bits:
            raise ValueError(f"{root} holds {books.bits}-bit codebooks (R={books.residuals}), not {bits}-bit.")
        return books


def save_reference_layer(
    path: str | os.PathLike,
    layer: int,
    thetas: torch.Tensor,
    mse: torch.Tensor | None = None,
    pair_weights: torch.Tensor | None = None,
    extra: dict[str, Any] | None = None,
) -> list[Path]:
    """Write one layer's codebooks in the reference format: ``{layer:03d}_{group}.pt`` per KV head.

    ``thetas [H_kv, R, 128, P]``; ``mse [H_kv, R]`` is the error after each residual step (``mse_loss``; NaN when
    unknown), its last entry the ``final_error``. ``pair_weights [H_kv, P]`` (the key distance's weights, see
    :class:`CommVQCodebooks`) is stored as an extra ``"pair_weights"`` entry per file, ``extra`` as further entries
    (e.g. the training settings); the reference reads neither. Each file is written atomically.
    """
    out = Path(path)
    reserved = {"steps", "final_error", "pair_weights"} & set(extra or {})
    if reserved:
        raise ValueError(f"extra entries may not replace the format's own {sorted(reserved)}.")
    out.mkdir(parents=True, exist_ok=True)
    if thetas.dim() != 4 or thetas.shape[2] != THETA_ROWS:
        raise ValueError(f"thetas must be [H_kv, R, 128, P], got {tuple(thetas.shape)}.")
    heads, residuals = thetas.shape[:2]
    if mse is None:
        mse = torch.full((heads, residuals), math.nan)
    thetas = thetas.detach().to("cpu", torch.float32)
    centers = centers_from_theta(thetas)
    files = []
    for group in range(heads):
        steps = [
            {
                "mse_loss": mse[group, i].detach().to("cpu", torch.float32).clone().reshape(()),
                "theta": thetas[group, i].clone(),
                "clustering_centers": centers[group, i].clone(),
            }
            for i in range(residuals)
        ]
        target = out / f"{layer:03d}_{group}.pt"
        tmp = target.with_name(target.name + ".tmp")
        data: dict[str, Any] = {"steps": steps, "final_error": float(mse[group, -1]), **(extra or {})}
        if pair_weights is not None:
            data["pair_weights"] = pair_weights[group].detach().to("cpu", torch.float32).clone()
        torch.save(data, tmp)
        os.replace(tmp, target)
        files.append(target)
    return files


def _atomic_save_file(tensors: dict[str, torch.Tensor], target: Path) -> None:
    tmp = target.with_name(target.name + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, target)


def _atomic_write_text(target: Path, text: str) -> None:
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, target)
