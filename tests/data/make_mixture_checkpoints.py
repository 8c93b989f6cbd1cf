"""Write ``mixture_checkpoints.pt``: state dicts, reprs, an input and the output of the four mixture layers.

This was run once against the code before ``dynconv/nn/mixture.py`` was split into a package (commit 7530842),
so the file pins the old state-dict keys, reprs and outputs; ``tests/test_mixture.py`` loads it into
the current classes. Running it again against later code would only re-pin that code, not the old one.

    PYTHONPATH=. python tests/data/make_mixture_checkpoints.py
"""

from pathlib import Path

import torch

import dynconv

# (class name, constructor arguments): groups, bias off, K = 1 and K > 1, temperature, padding="same",
# and for ODConv each set of heads it can omit (spatial for 1x1, output channel for depthwise, kernel for K = 1).
CONFIGS = [
    ("CondConv2d", dict(in_channels=6, out_channels=4, kernel_size=3, padding=1, groups=2, num_experts=3)),
    ("CondConv2d", dict(in_channels=4, out_channels=4, kernel_size=1, bias=False)),
    (
        "DynamicConv2d",
        dict(in_channels=4, out_channels=4, kernel_size=3, padding="same", dilation=2, num_experts=3, temperature=0.7),
    ),
    ("DynamicConv2d", dict(in_channels=4, out_channels=4, kernel_size=3, stride=2, padding=1, groups=2, bias=False)),
    ("DynamicConv2d", dict(in_channels=4, out_channels=2, kernel_size=(3, 1), num_experts=1, reduction=2)),
    ("DyNetConv2d", dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, num_experts=2)),
    ("DyNetConv2d", dict(in_channels=4, out_channels=4, kernel_size=3, groups=2, bias=False, per_channel=False)),
    ("ODConv2d", dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, num_experts=2, temperature=0.5)),
    ("ODConv2d", dict(in_channels=4, out_channels=4, kernel_size=3, padding="same", groups=4, num_experts=1)),
    ("ODConv2d", dict(in_channels=6, out_channels=4, kernel_size=1, groups=2, num_experts=2, bias=False)),
    ("ODConv2d", dict(in_channels=4, out_channels=4, kernel_size=1, num_experts=1, min_channels=4)),
]


def _share_one_storage(entries: list[dict]) -> None:
    """Make every float32 tensor a view of one buffer: torch.save writes a storage once, and one record per
    tensor would make the file ten times larger than its numbers."""
    tensors = [(d, k) for d in entries for k in ("x", "y")] + [(d["state"], k) for d in entries for k in d["state"]]
    tensors = [(owner, key) for owner, key in tensors if owner[key].dtype == torch.float32]
    buffer = torch.cat([owner[key].flatten() for owner, key in tensors])
    offset = 0
    for owner, key in tensors:
        n = owner[key].numel()
        owner[key] = buffer[offset : offset + n].view_as(owner[key])
        offset += n


def main() -> None:
    torch.manual_seed(0)
    entries = []
    for name, kwargs in CONFIGS:
        layer = getattr(dynconv, name)(**kwargs)
        with torch.no_grad():  # every parameter and statistic away from its initial value: attention that matters
            for p in layer.parameters():
                p.copy_(torch.randn_like(p) * 0.5)
            for buf_name, buf in layer.named_buffers():
                if buf_name.endswith("running_mean"):
                    buf.copy_(torch.randn_like(buf) * 0.1)
                elif buf_name.endswith("running_var"):
                    buf.copy_(torch.rand_like(buf) + 0.5)
        layer.eval()
        x = torch.randn(2, kwargs["in_channels"], 5, 4)
        with torch.no_grad():
            y = layer(x)
        state = {k: v.clone() for k, v in layer.state_dict().items()}
        entries.append(
            {"class": name, "kwargs": kwargs, "extra_repr": layer.extra_repr(), "state": state, "x": x, "y": y}
        )
    _share_one_storage(entries)
    path = Path(__file__).with_name("mixture_checkpoints.pt")
    torch.save(entries, path)
    print(f"wrote {path} ({path.stat().st_size} bytes, {len(entries)} layers)")


if __name__ == "__main__":
    main()
