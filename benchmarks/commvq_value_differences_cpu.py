"""Do three logit differences per choice code values as the four logits do? (CPU, no timing.)

``encode_precision="half"`` ends the value encoder in ``ValueCodec.head_differences`` (``l_c - l_0``, ``c = 1, 2, 3``,
from the last ``Linear``'s weight differences; bfloat16) instead of the four logits of ``ValueCodec.head``. In exact
arithmetic the arg-max is the same; in bfloat16 near-ties may go another way. This takes trained value codecs
(``pressroom-train commvq values``: a layer's ``layer_NNN.safetensors``) and the model's held-out values
(``pressroom-train commvq collect --split heldout``) and reports per layer, against the float32 encoder's choices:
the share of choices the bfloat16 four logits and the bfloat16 differences give alike, and the values' relative
reconstruction error (``||v - decode||^2 / ||v||^2``, the reference's ``c_t``) of each.

    pressroom-train commvq collect --model smollm2 --output W --max-tokens 16384
    pressroom-train commvq collect --model smollm2 --output W --split heldout --max-tokens 4096
    pressroom-train commvq scale --model smollm2 --output W
    pressroom-train commvq values --model smollm2 --output W --bits 2 --layer 5
    python benchmarks/commvq_value_differences_cpu.py --work W --bits 2 --output OUT.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from pressroom.evaluation.atomic import atomic_write_json
from pressroom.kernels.commvq_value_codes import value_codes
from pressroom.kernels.commvq_value_prep import value_prep
from pressroom.presses.commvq_codebooks import ValueCodec


def heldout_values(kv_dir: Path, layer: int) -> torch.Tensor:
    """The layer's held-out values ``[T, feat_dim]`` float32 from the collected shards."""
    shards = sorted(kv_dir.glob("shard_*.safetensors"))
    if not shards:
        raise FileNotFoundError(
            f"no shard_*.safetensors in {kv_dir}: run `pressroom-train commvq collect --split heldout`."
        )
    return torch.cat([load_file(p)[f"v.{layer}"].float() for p in shards])


def codes(codec: ValueCodec, v: torch.Tensor, heads: int, how: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Bits ``[T, 2 n_e]`` and ``prescale`` from ``how``: "f32" (the codec's float32 encoder), "logits4" / "diffs" (the
    cache's bfloat16 path ending in the four logits / the three differences)."""
    with torch.no_grad():
        if how == "f32":
            bits, pre = codec.encode(v)
            return bits, pre
        vals = v.view(1, v.shape[0], heads, -1).transpose(1, 2)  # [1, H, T, D] as the cache holds them
        n = codec.norm1
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, pre = value_prep(vals, codec.scale, codec.eps, n.weight, n.bias, n.eps, torch.bfloat16, use_triton=False)
            logits = codec.head_differences(y) if how == "diffs" else codec.head(y)
        _, bits = value_codes(logits, torch.uint8, use_triton=False, differences=how == "diffs")
        return bits[0], pre[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="the training output folder (kv/heldout, BITSbit/values)")
    ap.add_argument("--bits", type=int, default=2, choices=[1, 2])
    ap.add_argument("--output", type=Path, required=True)
    args = ap.parse_args()
    value_dir = args.work / f"{args.bits}bit" / "values"
    layers = sorted(int(p.stem.split("_")[1]) for p in value_dir.glob("layer_*.safetensors"))
    if not layers:
        raise SystemExit(f"no trained value codecs in {value_dir}: run `pressroom-train commvq values` first.")
    heads = json.loads((args.work / "kv" / "heldout" / "meta.json").read_text())["num_kv_heads"]
    result = dict(
        benchmark="commvq_value_differences_cpu",
        command=" ".join([Path(sys.executable).name, *sys.argv]),
        device=platform.processor() or "cpu",
        torch=torch.__version__,
        layers={},
    )
    for layer in layers:
        state = load_file(value_dir / f"layer_{layer:03d}.safetensors")
        feat = state["scale"].numel()
        codec = ValueCodec(feat, args.bits, state["enc1.weight"].shape[0])
        codec.load_state_dict(state)
        codec.eval()
        v = heldout_values(args.work / "kv" / "heldout", layer)
        row = dict(tokens=v.shape[0])
        got = {how: codes(codec, v, heads, how) for how in ("f32", "logits4", "diffs")}
        choices = {how: bits.view(bits.shape[0], -1, 2) for how, (bits, _) in got.items()}
        for how in ("logits4", "diffs"):
            row[f"{how}_choices_equal_f32"] = (choices[how] == choices["f32"]).all(-1).float().mean().item()
            bits, pre = got[how]
            err = (v - codec.decode(bits.float(), pre.float())).pow(2).sum(-1) / v.pow(2).sum(-1).clamp_min(1e-30)
            row[f"{how}_relative_error"] = err.mean().item()
        row["diffs_choices_equal_logits4"] = (choices["diffs"] == choices["logits4"]).all(-1).float().mean().item()
        bits, pre = got["f32"]
        err = (v - codec.decode(bits.float(), pre.float())).pow(2).sum(-1) / v.pow(2).sum(-1).clamp_min(1e-30)
        row["f32_relative_error"] = err.mean().item()
        result["layers"][str(layer)] = row
        print(layer, row, flush=True)
        atomic_write_json(args.output, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
