"""Deep Feature Flow (Zhu, Xiong, Dai, Yuan, Wei, CVPR 2017): run the expensive feature network on sparse key
frames only and propagate its features to the other frames with a cheap flow network and :func:`dynconv.warp`.

    f_k = N_feat(I_k)                               on a key frame
    M, S = N_flow(I_k, I_i)                         flow from frame i to key frame k, and a scale field
    f_i = warp(f_k, M) * S                          propagated features
    y_i = N_task(f_i)                               per-pixel class scores

The parts follow the paper, scaled to small frames: ``FeatureNet`` a dilated ResNet-style backbone at output
stride 8 (the paper: ResNet-101 at stride 16 plus a 3x3 convolution to 1024 channels), ``TaskNet`` a 1x1
convolution to the classes with bilinear upsampling (DeepLab's head), ``FlowNetS`` a FlowNet-Simple encoder-
decoder on the frame pair downsampled 2x, predicting the flow at the feature stride (in feature pixels) and
the scale field, whose 1x1 convolution starts at weight 0, bias 1 so that a fresh network propagates features
unchanged. ``DeepFeatureFlow.segment_video`` schedules key frames every ``interval`` frames, or adaptively.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dynconv.functional import warp


def _conv_bn(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, dilation, dilation, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class _BasicBlock(nn.Module):
    """ResNet's basic block (two 3x3 convolutions and a shortcut), optionally strided or dilated."""

    def __init__(self, cin: int, cout: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, dilation, dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, dilation, dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x), inplace=True)


class FeatureNet(nn.Module):
    """``N_feat``: a dilated ResNet-style segmentation backbone.

    Stem (two strided 3x3 convolutions), then stages of basic blocks; the stages past ``output_stride`` keep
    the resolution and dilate instead (DeepLab), and a final 3x3 convolution gives ``out_channels`` features.

    Args:
        in_channels: frame channels.
        width: channels of the first stage (doubled at each later stage).
        blocks: basic blocks per stage (4 stages at strides 4, 8, 16, 32 before dilation).
        output_stride: 4, 8, 16 or 32.
        out_channels: channels of the features (default ``4 * width``).

    Shape: ``[B, in_channels, H, W]`` -> ``[B, out_channels, ceil(H / output_stride), ...]``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        width: int = 32,
        blocks: tuple[int, ...] = (2, 2, 2, 2),
        output_stride: int = 8,
        out_channels: int | None = None,
    ):
        super().__init__()
        if output_stride not in (4, 8, 16, 32):
            raise ValueError(f"output_stride must be 4, 8, 16 or 32, got {output_stride}")
        self.output_stride = output_stride
        self.out_channels = out_channels or 4 * width
        self.stem = nn.Sequential(_conv_bn(in_channels, width // 2, 2), _conv_bn(width // 2, width, 2))
        layers, cin, stride, dilation = [], width, 4, 1
        for i, n in enumerate(blocks):
            cout = width * 2 ** min(i, 2)
            for j in range(n):
                s = 1
                if j == 0 and i > 0:
                    if stride < output_stride:
                        s, stride = 2, stride * 2
                    else:
                        dilation *= 2
                layers.append(_BasicBlock(cin, cout, s, dilation))
                cin = cout
        self.stages = nn.Sequential(*layers)
        self.head = _conv_bn(cin, self.out_channels, dilation=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


class TaskNet(nn.Module):
    """``N_task``: a 1x1 convolution to the classes; :meth:`forward` returns logits at the feature resolution,
    upsampled bilinearly to ``size`` when it is given (softmax/argmax are the caller's)."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.classifier = nn.Conv2d(in_channels, num_classes, 1)

    def forward(self, features: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        logits = self.classifier(features)
        return logits if size is None else F.interpolate(logits, size, mode="bilinear", align_corners=False)


# Tikhonov term of the Lucas-Kanade solve (added to the structure tensor's diagonal; [0, 1] intensities, gradients
# per pixel, summed over channels): chosen on the synthetic set, where it lowers the start's end-point error from
# 0.49 to 0.46 feature pixels (1e-3: 0.48, 1e-2: 0.67). Without it, a block of weak texture and camera noise on a
# real video is solved for a displacement of noise over noise, up to the window size: there warping with the start
# raised the photometric error of consecutive frames above that of no warp at all.
LK_RIDGE = 1e-4


def _flow_conv(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2), nn.LeakyReLU(0.1, inplace=True))


@torch.no_grad()
def lucas_kanade(
    key: torch.Tensor, current: torch.Tensor, windows: tuple[int, ...] = (8, 4, 2), ridge: float = LK_RIDGE
) -> torch.Tensor:
    """Coarse-to-fine Lucas-Kanade flow from ``current`` to ``key`` (no parameters, no gradient).

    At each window size (coarse to fine) the key frame is warped by the flow so far, both frames are box-blurred
    by ``window // 4`` pixels, and the 2x2 structure tensor of the image gradients, summed over the channels and
    averaged over ``window x window`` blocks, plus ``ridge`` on its diagonal, is solved for the remaining
    displacement (brightness constancy ``current - warped key = grad I . du``); each block's step is clipped to the
    window size. The ridge pulls the steps of weakly textured blocks towards zero instead of fitting noise.

    Args:
        key, current (Tensor[B, C, H, W]): frames.
        windows: block sizes in pixels, coarse to fine.
        ridge: Tikhonov regularisation of the 2x2 solve (0: plain Lucas-Kanade).

    Returns:
        Tensor[B, 2, H, W]: ``(dx, dy)`` in pixels, the convention of :func:`dynconv.warp`.
    """
    B, C, H, W = key.shape
    flow = None
    # central differences along W and H, one pair of 3x3 kernels per channel: one grouped convolution
    kernels = key.new_zeros(2, 3, 3)
    kernels[0, 1, 0], kernels[0, 1, 2], kernels[1, 0, 1], kernels[1, 2, 1] = -0.5, 0.5, -0.5, 0.5
    kernels = kernels.repeat(C, 1, 1)[:, None]  # [2C, 1, 3, 3]: (d/dx, d/dy) of channel 0, then of channel 1, ...
    for win in windows:
        k, c = (key if flow is None else warp(key, flow, padding_mode="border")), current
        r = win // 4
        if r >= 1:
            k = F.avg_pool2d(k, 2 * r + 1, 1, r, count_include_pad=False)
            c = F.avg_pool2d(c, 2 * r + 1, 1, r, count_include_pad=False)
        grads = F.conv2d(F.pad(0.5 * (k + c), (1, 1, 1, 1), mode="replicate"), kernels, groups=C)
        ix, iy = grads[:, 0::2], grads[:, 1::2]
        it = c - k
        terms = torch.stack([ix * ix, ix * iy, iy * iy, ix * it, iy * it], 1).sum(2)  # [B, 5, H, W]
        a, b, d, e, f = F.avg_pool2d(terms, win, ceil_mode=True).unbind(1)
        a, d = a + ridge, d + ridge
        det = a * d - b * b
        det = torch.where(det.abs() < 1e-12, torch.full_like(det, float("inf")), det)  # flat blocks: no step
        step = torch.stack([(d * e - b * f) / det, (a * f - b * e) / det], 1).clamp(-win, win)
        step = F.interpolate(step, size=(H, W), mode="bilinear", align_corners=False)
        flow = step if flow is None else flow + step
    return key.new_zeros(B, 2, H, W) if flow is None else flow


class FlowNetS(nn.Module):
    """``N_flow``: a FlowNet-Simple encoder-decoder (Dosovitskiy et al., ICCV 2015), narrow, on the key and
    current frames stacked along channels and downsampled 2x (as DFF feeds FlowNet half-resolution frames).

    The encoder halves the resolution down to 4x below the feature stride; the decoder upsamples twice with
    transposed convolutions, concatenating the encoder's features and the coarser flow (FlowNet's refinement),
    and predicts the flow at the feature stride. Flow is in pixels of the feature grid, ``(dx, dy)``, from the
    current frame to the key frame (the convention of :func:`dynconv.warp`). With ``init="lk"`` the network
    predicts a correction to a parameter-free coarse-to-fine Lucas-Kanade flow (:func:`lucas_kanade`) of the
    half-resolution pair: trained from scratch on the synthetic set, the plain network was still predicting
    almost zero flow after 360 steps, while the Lucas-Kanade start halves the end-point error before any
    training. The flow predictors start at
    small random values (near the identity warp) and the scale function at exactly 1.

    Args:
        in_channels: channels of one frame.
        feature_channels: channels of the scale field (those of the features it multiplies).
        feature_stride: the feature network's output stride (4, 8, 16 or 32).
        width: channels of the first encoder layer.

    Shape: ``key, current [B, C, H, W]`` -> ``flow [B, 2, h, w]``, ``scale [B, feature_channels, h, w]`` with
    ``h = ceil(H / feature_stride)``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        feature_channels: int = 128,
        feature_stride: int = 8,
        width: int = 16,
        init: str = "zero",
    ):
        super().__init__()
        if feature_stride not in (4, 8, 16, 32):
            raise ValueError(f"feature_stride must be 4, 8, 16 or 32, got {feature_stride}")
        if init not in ("zero", "lk"):
            raise ValueError(f"init must be 'zero' or 'lk', got {init!r}")
        self.feature_stride, self.init = feature_stride, init
        levels = {4: 1, 8: 2, 16: 3, 32: 4}[feature_stride]  # stride-2 convs to reach the feature stride at half res
        enc, cin, c = [], 2 * in_channels, width
        for i in range(levels):
            enc.append(_flow_conv(cin, c, 5 if i == 0 else 3, 2))
            cin, c = c, min(2 * c, 8 * width)
        self.encoder = nn.ModuleList(enc)
        self.down1 = nn.Sequential(_flow_conv(cin, c, 3, 2), _flow_conv(c, c))  # 2x below the feature stride
        self.down2 = nn.Sequential(_flow_conv(c, c, 3, 2), _flow_conv(c, c))  # 4x below
        self.predict2 = nn.Conv2d(c, 2, 3, 1, 1)
        self.up2 = nn.ConvTranspose2d(c, c // 2, 4, 2, 1)
        self.up2_flow = nn.ConvTranspose2d(2, 2, 4, 2, 1, bias=False)
        self.predict1 = nn.Conv2d(c + c // 2 + 2, 2, 3, 1, 1)
        self.up1 = nn.ConvTranspose2d(c + c // 2 + 2, cin // 2, 4, 2, 1)
        self.up1_flow = nn.ConvTranspose2d(2, 2, 4, 2, 1, bias=False)
        dec = cin + cin // 2 + 2
        self.refine = _flow_conv(dec, cin)
        self.predict0 = nn.Conv2d(cin, 2, 3, 1, 1)
        self.scale = nn.Conv2d(cin, feature_channels, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and m.bias is not None:
                nn.init.kaiming_normal_(m.weight, a=0.1, nonlinearity="leaky_relu")
                nn.init.zeros_(m.bias)
        # The flow predictors start small, not zero: a zero predictor passes no gradient to the layers below it,
        # and a FlowNetS trained that way on the synthetic set still predicted zero flow after 200 steps.
        for m in (self.predict0, self.predict1, self.predict2):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)
        for m in (self.up1_flow, self.up2_flow):  # bilinear upsampling of the coarser flow, times 2 (units)
            with torch.no_grad():
                m.weight.zero_()
                k = torch.tensor([0.25, 0.75, 0.75, 0.25])
                m.weight[0, 0] = m.weight[1, 1] = 2 * torch.outer(k, k)
        # the scale function starts as the identity: S = 1 everywhere, whatever the input
        nn.init.zeros_(self.scale.weight)
        nn.init.ones_(self.scale.bias)

    @staticmethod
    def _fit(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Crop or pad ``x`` to the spatial size of ``like`` (odd sizes round differently up and down)."""
        h, w = like.shape[-2:]
        if x.shape[-2:] == like.shape[-2:]:
            return x
        x = x[..., :h, :w]
        return F.pad(x, (0, w - x.shape[-1], 0, h - x.shape[-2]))

    def forward(self, key: torch.Tensor, current: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        half = F.avg_pool2d(torch.cat([key, current], 1), 2, ceil_mode=True)
        x = half - 0.5  # frames in [0, 1], centred
        for layer in self.encoder:
            x = layer(x)
        skip0 = x
        skip1 = self.down1(x)
        x = self.down2(skip1)
        coarse = self._fit(self.up2_flow(self.predict2(x)), skip1)
        x = torch.cat([skip1, self._fit(self.up2(x), skip1), coarse], 1)
        coarse = self._fit(self.up1_flow(self.predict1(x) + coarse), skip0)
        x = self.refine(torch.cat([skip0, self._fit(self.up1(x), skip0), coarse], 1))
        flow = self.predict0(x) + coarse
        if self.init == "lk":
            # windows of 4 and 2 half-resolution pixels: 0.52 feature pixels of end-point error on the synthetic set
            # against 0.49 with (8, 4, 2) and 0.92 for zero flow, at two thirds of the cost
            start = lucas_kanade(*half.chunk(2, 1), windows=(4, 2))  # half-resolution pixels
            s = self.feature_stride // 2
            flow = flow + self._fit(F.avg_pool2d(start, s, ceil_mode=True) / s, flow)
        return flow, self.scale(x)


class FlowNetC(nn.Module):
    """``N_flow`` with a correlation layer (FlowNet's *FlowNetCorr*, Dosovitskiy et al., ICCV 2015): both frames,
    downsampled 2x, go through one shared encoder to the feature stride; the correlation of the current frame's
    encoder features with the key frame's over displacements up to ``max_displacement`` image pixels gives a
    cost volume; its soft-argmax is a first flow, which a small dilated decoder refines. The scale function is
    a 1x1 convolution of the decoder's features (weight 0, bias 1: exactly 1 at the start).

    An alternative to :class:`FlowNetS` (``flow_net="c"``): the cost volume is a direct cue to the motion, at the
    price of a slower network.

    Args:
        in_channels: channels of one frame.
        feature_channels: channels of the scale field (those of the features it multiplies).
        feature_stride: the feature network's output stride (4, 8, 16 or 32).
        width: channels of the encoder.
        max_displacement: the largest displacement the correlation compares, in image pixels.

    Shape: ``key, current [B, C, H, W]`` -> ``flow [B, 2, h, w]`` (feature pixels, current -> key, (dx, dy)),
    ``scale [B, feature_channels, h, w]``, ``h = ceil(H / feature_stride)``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        feature_channels: int = 128,
        feature_stride: int = 8,
        width: int = 16,
        max_displacement: int = 16,
    ):
        super().__init__()
        if feature_stride not in (4, 8, 16, 32):
            raise ValueError(f"feature_stride must be 4, 8, 16 or 32, got {feature_stride}")
        self.feature_stride = feature_stride
        self.radius = max(1, max_displacement // feature_stride)
        enc, cin = [], in_channels
        for _ in range({4: 1, 8: 2, 16: 3, 32: 4}[feature_stride]):
            enc.append(_flow_conv(cin, width, 3, 2))
            cin = width
        enc.append(nn.Conv2d(width, width, 3, 1, 1))
        self.encoder = nn.Sequential(*enc)
        d = 2 * self.radius + 1
        r = torch.arange(-self.radius, self.radius + 1, dtype=torch.float32)
        dy, dx = torch.meshgrid(r, r, indexing="ij")  # unfold's order: kernel rows (dy), then columns (dx)
        self.register_buffer("displacements", torch.stack([dx.flatten(), dy.flatten()]), persistent=False)
        self.temperature = nn.Parameter(torch.tensor(50.0))
        self.decoder = nn.Sequential(
            _flow_conv(d * d + width + 2, 2 * width),
            nn.Sequential(nn.Conv2d(2 * width, 2 * width, 3, 1, 2, 2), nn.LeakyReLU(0.1, inplace=True)),
            nn.Sequential(nn.Conv2d(2 * width, 2 * width, 3, 1, 4, 4), nn.LeakyReLU(0.1, inplace=True)),
        )
        self.predict = nn.Conv2d(2 * width, 2, 3, 1, 1)
        self.scale = nn.Conv2d(2 * width, feature_channels, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, a=0.1, nonlinearity="leaky_relu")
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.predict.weight, std=0.01)  # the refinement starts near zero: flow = soft-argmax
        nn.init.zeros_(self.predict.bias)
        nn.init.zeros_(self.scale.weight)  # the scale function starts as the identity: S = 1 everywhere
        nn.init.ones_(self.scale.bias)
        with torch.no_grad():
            self.temperature.fill_(50.0)

    def correlation(self, key: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        """``[B, (2R+1)^2, h, w]``: cosine similarity of ``current(p)`` and ``key(p + d)`` per displacement ``d``
        (zero where ``p + d`` leaves the map)."""
        B, C, h, w = current.shape
        d = 2 * self.radius + 1
        key = F.unfold(key, d, padding=self.radius).view(B, C, d * d, h, w)
        return (key * current[:, :, None]).sum(1)

    def forward(self, key: torch.Tensor, current: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pair = F.avg_pool2d(torch.cat([key, current]), 2, ceil_mode=True) - 0.5  # frames in [0, 1], centred
        fk, fc = F.normalize(self.encoder(pair), dim=1).chunk(2)
        cost = self.correlation(fk, fc)
        first = torch.einsum("bdhw,cd->bchw", (self.temperature * cost).softmax(1), self.displacements)
        x = self.decoder(torch.cat([cost, fc, first], 1))
        return first + self.predict(x), self.scale(x)


class DeepFeatureFlow(nn.Module):
    """The DFF system: ``features`` (``N_feat``), ``task`` (``N_task``) and ``flow`` (``N_flow`` with the scale
    function); see the module docstring.

    Args:
        num_classes: segmentation classes.
        in_channels: frame channels.
        width: the feature network's first-stage width (features have ``4 * width`` channels).
        blocks: basic blocks per stage of the feature network.
        output_stride: the feature stride.
        flow_width: the flow network's first-layer width.
        flow_net: ``"s"`` (:class:`FlowNetS`, the default) or ``"c"`` (:class:`FlowNetC`).
        flow_init: FlowNetS refines a Lucas-Kanade flow (``init="lk"``) rather than starting from zero.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        width: int = 32,
        blocks: tuple[int, ...] = (2, 2, 2, 2),
        output_stride: int = 8,
        flow_width: int = 16,
        flow_net: str = "s",
        flow_init: bool = True,
    ):
        super().__init__()
        if flow_net not in ("c", "s"):
            raise ValueError(f"flow_net must be 'c' (FlowNetC) or 's' (FlowNetS), got {flow_net!r}")
        self.features = FeatureNet(in_channels, width, tuple(blocks), output_stride)
        self.task = TaskNet(self.features.out_channels, num_classes)
        if flow_net == "c":
            self.flow = FlowNetC(in_channels, self.features.out_channels, output_stride, flow_width)
        else:
            init = "lk" if flow_init else "zero"
            self.flow = FlowNetS(in_channels, self.features.out_channels, output_stride, flow_width, init)

    def segment(self, frame: torch.Tensor) -> torch.Tensor:
        """The per-frame baseline: ``[B, C, H, W]`` -> logits ``[B, classes, H, W]``."""
        return self.task(self.features(frame), frame.shape[-2:])

    def propagate(
        self, key_features: torch.Tensor, key: torch.Tensor, current: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features of ``current`` from those of ``key``: ``(warp(f_k, M) * S, M)``; ``key_features``
        ``[B, C_f, h, w]``, frames ``[B, C, H, W]``, flow ``M`` ``[B, 2, h, w]`` in feature pixels."""
        flow, scale = self.flow(key, current)
        return warp(key_features, flow, padding_mode="border") * scale, flow

    def forward(
        self, key: torch.Tensor, current: torch.Tensor, key_features: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training path: logits ``[B, classes, H, W]`` of ``current`` propagated from ``key``, and the flow."""
        if key_features is None:
            key_features = self.features(key)
        features, flow = self.propagate(key_features, key, current)
        return self.task(features, current.shape[-2:]), flow

    @torch.no_grad()
    def segment_video(
        self,
        frames: torch.Tensor,
        interval: int = 5,
        schedule: str = "fixed",
        threshold: float = 1.0,
    ) -> tuple[torch.Tensor, list[int]]:
        """Segment a video frame by frame as DFF does at inference.

        ``schedule="fixed"``: frames ``0, interval, 2 interval, ...`` are key frames (``interval=1`` is the
        per-frame baseline). ``"adaptive"``: a frame becomes the key frame when its flow to the current key
        moves the features by more than ``threshold`` feature pixels on average, or when ``interval`` frames
        have passed since the key (the flow is computed anyway, so the decision costs nothing extra).

        Args:
            frames (Tensor[T, C, H, W]): one video, or ``[B, T, C, H, W]`` for several at once.

        Returns:
            (logits ``[T, classes, H, W]`` (or ``[B, T, ...]``), the key frame indices).
        """
        if schedule not in ("fixed", "adaptive"):
            raise ValueError(f"schedule must be 'fixed' or 'adaptive', got {schedule!r}")
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        batched = frames.dim() == 5
        if not batched:
            frames = frames[None]
        size = frames.shape[-2:]
        out, keys, key, key_features = [], [], None, None
        for t in range(frames.shape[1]):
            frame = frames[:, t]
            if key is not None and t - keys[-1] < interval:
                features, flow = self.propagate(key_features, key, frame)
                if schedule == "fixed" or flow.abs().mean() * 2 <= threshold:  # mean |flow| ~ (|dx| + |dy|) / 2
                    out.append(self.task(features, size))
                    continue
            key, key_features = frame, self.features(frame)
            keys.append(t)
            out.append(self.task(key_features, size))
        logits = torch.stack(out, 1)
        return (logits if batched else logits[0]), keys
