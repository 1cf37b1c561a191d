"""Latent diffusion with text prompts (Rombach et al. 2022, "High-Resolution Image Synthesis
with Latent Diffusion Models"): a miniature Stable Diffusion.

Diffusion in pixel space spends most of its capacity on imperceptible detail. Latent
diffusion splits the work in two stages:

1. an autoencoder (here a VQGAN from lesson 03, trained once and then frozen) compresses an
   image x (3x32x32) into a small latent z = E(x) (e.g. 4x8x8, 12x fewer numbers), and its
   decoder D turns latents back into sharp images;
2. a denoising U-Net learns the distribution of the latents, exactly as DDPM learns images,
   conditioned on a text prompt through cross-attention:

       z0 = scale_factor * E(x)                  scale the latents to unit variance
       z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps
       loss = || v - v_theta(z_t, t, tau(prompt)) ||^2,   v = sqrt(abar_t) eps - sqrt(1 - abar_t) z0

   (v-prediction on the cosine schedule by default, as Stable Diffusion 2 uses v; the
   epsilon objective of lesson 05 is one option away), where tau is a text encoder
   (minigen.text), trained jointly with the U-Net as in the LDM paper's text-to-image model
   (Stable Diffusion instead freezes a pretrained CLIP). The U-Net reads the text twice: by
   cross-attention at its attention levels, and as the mean of the text tokens added to its
   time embedding (Imagen's pooled embedding; SDXL does the same).

Sampling runs DDIM in latent space with classifier-free guidance and decodes once at the
end: x = D(z0 / scale_factor).

Today's variant (Stable Diffusion 3, lesson 09) is one option away on each axis:
objective="flow" trains the same latent model by flow matching (minigen.flow: the straight
path z_t = (1 - t) z0 + t eps, target eps - z0, Euler / Heun / DPM-Solver++ sampling), and
backbone="dit" swaps the U-Net for a diffusion transformer (minigen.dit) that reads the
text the same two ways: the pooled embedding in its adaLN conditioning and cross-attention
to the tokens in every block. Either objective takes either backbone.

Conventions (see conventions.md, "Latent diffusion"):

- scale_factor = 1 / std of the training latents, computed from the data (Stable
  Diffusion's 0.18215 is that number for *its* autoencoder, not ours); multiply after
  encoding, divide before decoding. It is stored in the config, hence in every checkpoint.
- No clipping of x0_hat during sampling: latents are not in [-1, 1]. Images are clamped
  to [-1, 1] only after decoding.
- Classifier-free guidance: eps = eps(null) + w (eps(prompt) - eps(null)), where the null
  condition is the *encoded empty prompt* (all padding) as in Stable Diffusion; in training
  the caption is replaced by the empty prompt with probability cond_drop_prob (0.1).
- The autoencoder is frozen: requires_grad False, always in eval mode, in no optimizer; its
  weights are part of this module's state_dict, so a checkpoint is self-contained.

    model = LatentDiffusion(vqgan, LatentDiffusionConfig(), Tokenizer.from_captions(ds.captions))
    latents = model.encode_dataset(ds, cache=True)      # fits scale_factor, encodes once
    fit(model, latents, steps=..., lr=...)
    images = model.sample(["a large red circle on a blue background"] * 8, guidance_scale=3)
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn

from minigen import checkpoint
from minigen.checkpoint import weights_hash  # public here too, as before checkpoint.py
from minigen.diffusion import BACKBONES, DiffusionConfig, GaussianDiffusion, backbone_config_class, check_backbone
from minigen.dit import DiTConfig
from minigen.evaluate import caption_accuracy  # public here too, as before evaluate.py
from minigen.flow import FlowConfig, FlowMatching
from minigen.text import TextEncoder, TextEncoderConfig, Tokenizer
from minigen.unet import UNetConfig

# Defaults from the runs of benchmarks/time_to_quality.py and ldm_text_to_image.py (shapes,
# first 20k train images, a VQGAN with a 4x8x8 latent, OMP_NUM_THREADS=1 on a 2-core CPU),
# caption accuracy (shape AND colour judged) on 300 test captions, DDIM 25 steps:
#   eps, scaled_linear, 1500 steps, no pooled text:    0.45 at w=5 (colour right, shape ~chance)
#   v, cosine, 1000 steps, no pooled text:             0.37 at w=3
#   v, cosine, pooled text in the time embedding:      0.51 after 500 steps, 0.89 after 1000,
#                                                      0.98 after 1500 (w=3; FD 1.4x real-vs-real)
# How fast depends on the autoencoder's latent space: on minigen's reference VQGAN the same
# recipe gave 0.85 after 2000 steps and 0.994 after 4000 (minigen.reference, n=500).
# The pooled text embedding (Imagen) is what made the prompt's shape word count: through
# cross-attention alone the model learned the colour and left the shape at chance.
DEFAULT_TEXT = dict(n_embd=64, n_layer=2, n_head=4, dropout=0.0)
DEFAULT_UNET = dict(channels=32, channel_mult=(1, 2), layers_per_block=1, attention_resolutions=(1, 2),
                    transformer_heads=4, transformer_dim_head=16, transformer_depth=1, dropout=0.0,
                    pooled_context=True)
DEFAULT_DIFFUSION = dict(timesteps=1000, beta_schedule="cosine", prediction_type="v",
                         cond_drop_prob=0.1, sampler="ddim", sample_steps=25, eta=0.0, spacing="trailing",
                         guidance_scale=3.0)
# objective="flow": SD3's recipe (logit-normal times), Euler with as many evaluations as the DDIM
DEFAULT_FLOW = dict(timestep_sampling="logit_normal", cond_drop_prob=0.1, sampler="euler", sample_steps=25,
                    guidance_scale=3.0)
# backbone="dit": 2x2 patches of the 4x8x8 latents = 16 tokens; the text pooled into adaLN
# (what made the U-Net learn the shape word, see above) and cross-attended in every block
DEFAULT_DIT = dict(patch_size=2, hidden_size=96, depth=4, num_heads=4, cross_attention=True, pooled_context=True,
                   dropout=0.0)
OBJECTIVES = ("diffusion", "flow")
# what `minigen train ldm` uses unless told otherwise (fit's TrainConfig fields)
TRAIN_DEFAULTS = dict(steps=4000, batch_size=64, lr=1e-3, warmup=100, schedule="cosine", ema=0.995)

_TEXT_FIELDS = {f.name for f in fields(TextEncoderConfig)} - {"vocab_size", "max_length"}
_UNET_FIELDS = {f.name for f in fields(UNetConfig)}
_DIT_FIELDS = {f.name for f in fields(DiTConfig)}
_NOT_OBJECTIVE = {"unet", "dit", "backbone", "image_shape"}  # set by LatentDiffusion, not by the user
_DIFFUSION_FIELDS = {f.name for f in fields(DiffusionConfig)} - _NOT_OBJECTIVE
_FLOW_FIELDS = {f.name for f in fields(FlowConfig)} - _NOT_OBJECTIVE
_OBJECTIVE = {  # objective -> (its config's fields, minigen.ldm's defaults for them)
    "diffusion": (_DIFFUSION_FIELDS, DEFAULT_DIFFUSION), "flow": (_FLOW_FIELDS, DEFAULT_FLOW)}
_BACKBONE = {  # backbone -> (its config class, its fields, minigen.ldm's defaults for them)
    "unet": (UNetConfig, _UNET_FIELDS, DEFAULT_UNET), "dit": (DiTConfig, _DIT_FIELDS, DEFAULT_DIT)}
_LATENTS_FORMAT = "minigen-latents-v1"


@dataclass
class LatentDiffusionConfig:
    image_shape: tuple = (3, 32, 32)
    autoencoder_class: str = "minigen.vqgan.VQGAN"  # qualified name; rebuilt from autoencoder_config
    autoencoder_config: dict | None = None
    latent_shape: tuple | None = None  # (C, h, w) of the latents, filled in from the autoencoder
    scale_factor: float | None = None  # 1/std of the training latents (fit_scale_factor / encode_dataset)
    vocab: list | None = None  # the tokenizer's vocabulary (with "<pad>", "<unk>" first)
    max_length: int = 12  # tokens per prompt
    text: dict = field(default_factory=dict)  # TextEncoderConfig fields (n_embd, n_layer, n_head, dropout)
    # The objective's config fields (DiffusionConfig's, or FlowConfig's with objective="flow"),
    # with the backbone's config under its name: "unet" (UNetConfig fields) or "dit" (DiTConfig
    # fields). The network's in_channels and context_dim (and a DiT's input_size) are filled in
    # (latent channels and size, text n_embd); clip_denoised is False.
    diffusion: dict = field(default_factory=dict)
    prompts: list | None = None  # example prompts: what sample_images(n) draws without a prompt
    objective: str = "diffusion"  # "diffusion" (DDPM/DDIM, lesson 07) | "flow" (flow matching, lesson 09)
    backbone: str = "unet"  # "unet" | "dit": the denoising network over the latents

    def __post_init__(self):
        self.image_shape = tuple(self.image_shape)
        if self.latent_shape is not None:
            self.latent_shape = tuple(self.latent_shape)
        if len(self.image_shape) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {self.image_shape}")
        if self.scale_factor is not None:
            self.scale_factor = float(self.scale_factor)
            if not self.scale_factor > 0:
                raise ValueError(f"scale_factor must be > 0, got {self.scale_factor}")
        text = dict(self.text or {})
        unknown = set(text) - _TEXT_FIELDS
        if unknown:
            raise ValueError(f"unknown text encoder option(s) {sorted(unknown)}; valid: {sorted(_TEXT_FIELDS)}")
        self.text = {**DEFAULT_TEXT, **text}
        if self.objective not in OBJECTIVES:
            raise ValueError(f"LatentDiffusionConfig.objective = {self.objective!r}: use one of {OBJECTIVES}")
        check_backbone(self.backbone)
        ofields, odefaults = _OBJECTIVE[self.objective]
        bcls, bfields, bdefaults = _BACKBONE[self.backbone]
        diff = self.diffusion
        if isinstance(diff, (DiffusionConfig, FlowConfig)):
            diff = {k: v for k, v in dataclasses.asdict(diff).items() if v is not None or k not in ("unet", "dit")}
        diff = dict(diff or {})
        diff.pop("image_shape", None)  # that is latent_shape
        if diff.pop("backbone", self.backbone) != self.backbone:
            raise ValueError(f"the diffusion config names another backbone than LatentDiffusionConfig.backbone "
                             f"({self.backbone!r}): set backbone on LatentDiffusionConfig")
        net = diff.pop(self.backbone, None) or {}
        if isinstance(net, (UNetConfig, DiTConfig)):
            net = dataclasses.asdict(net)
        for other in set(_BACKBONE) - {self.backbone}:
            if diff.pop(other, None):
                raise ValueError(f"diffusion[{other!r}] holds a {other} config but backbone is {self.backbone!r}: "
                                 f"set backbone={other!r}, or give the {self.backbone} config as "
                                 f"diffusion[{self.backbone!r}]")
        unknown = set(diff) - ofields
        if unknown:
            raise ValueError(f"unknown {self.objective} option(s) {sorted(unknown)} (objective={self.objective!r}); "
                             f"valid: {sorted(ofields)}")
        unknown = set(net) - bfields
        if unknown:
            raise ValueError(f"unknown {bcls.__name__} option(s) {sorted(unknown)} (backbone={self.backbone!r}); "
                             f"valid: {sorted(bfields)}")
        if diff.get("clip_denoised"):
            raise ValueError("clip_denoised must be False for latent diffusion: latents are not in [-1, 1] "
                             "(the decoded images are clamped instead)")
        if net.get("num_classes"):
            raise ValueError(f"latent diffusion is conditioned on text, not class labels: leave {self.backbone} "
                             f"num_classes unset")
        diff["clip_denoised"] = False
        diff = {**odefaults, **diff}
        net_defaults = {f.name: f.default for f in fields(bcls)}
        if "in_channels" in net:
            # a resolved config, read back from a checkpoint: a network field it lacks is newer
            # than the checkpoint, so it takes the config class's own (off) default, not ours
            # (a checkpoint saved before pooled_context existed has no context_embed weights)
            diff[self.backbone] = {**net_defaults, **net}
        else:
            diff[self.backbone] = {**net_defaults, **bdefaults, **net}
        self.diffusion = diff
        if self.prompts is not None:
            self.prompts = [str(p) for p in self.prompts]


# ----------------------------------------------------------------------------- helpers


def _is_vq(ae) -> bool:
    """A VQ-VAE / VQGAN: encoder -> quant_conv -> quantize -> post_quant_conv -> decoder."""
    return all(isinstance(getattr(ae, a, None), nn.Module)
               for a in ("encoder", "quant_conv", "quantize", "post_quant_conv", "decoder"))


def _frozen_copy(ae: nn.Module) -> nn.Module:
    """A frozen, eval-mode copy of `ae` without the parts only its training needs.

    A copy, so that the caller's model (which a lesson may go on training) keeps its
    discriminator and its requires_grad flags. The VQGAN's discriminator and perceptual
    network are dropped: they never run here and would only bloat every checkpoint.
    """
    ae = copy.deepcopy(ae)
    for name in ("discriminator", "perceptual"):
        if isinstance(getattr(ae, name, None), nn.Module):
            setattr(ae, name, None)
    ae.requires_grad_(False)
    return ae.eval()


def load_autoencoder(path) -> nn.Module:
    """The autoencoder in a minigen checkpoint (EMA weights when there are any), in eval mode."""
    path = checkpoint.resolve(path)
    ckpt = checkpoint.load_checkpoint(path)
    cls = checkpoint.import_class(ckpt.get("model_class") or "?")
    if cls is LatentDiffusion:
        raise ValueError(f"{path} is a latent diffusion checkpoint, not an autoencoder: give the checkpoint "
                         f"of a vqgan (or autoencoder) run")
    if not (hasattr(cls, "encode") and hasattr(cls, "decode")):
        raise ValueError(f"{path} holds a {cls.__qualname__}, which has no encode/decode: latent diffusion "
                         f"needs an autoencoder (train one with `minigen train vqgan`)")
    return checkpoint.rebuild(ckpt, path).eval()


# ----------------------------------------------------------------------------- the model


class LatentDiffusion(nn.Module):
    """A frozen autoencoder + a text encoder + a GaussianDiffusion over the latents.

    LatentDiffusion(autoencoder, config, tokenizer) wraps a trained autoencoder (copied and
    frozen); LatentDiffusion(config=cfg) rebuilds everything from the config (what the CLI
    and minigen.reference do with a checkpoint), the autoencoder from autoencoder_class and
    autoencoder_config, the tokenizer from vocab.

    Autoencoders: a VQ-VAE/VQGAN (anything with encoder, quant_conv, quantize,
    post_quant_conv, decoder) or any module with encode(x) -> (N, C, h, w) latents (or a
    tuple whose first element they are) and decode(z) -> images, e.g. minigen.autoencoder.
    """

    def __init__(self, autoencoder: nn.Module | None = None, config: LatentDiffusionConfig | None = None,
                 tokenizer: Tokenizer | None = None):
        super().__init__()
        config = copy.deepcopy(config) if config is not None else LatentDiffusionConfig()
        if isinstance(autoencoder, LatentDiffusionConfig):  # LatentDiffusion(cfg)
            autoencoder, config = None, copy.deepcopy(autoencoder)

        # --- the autoencoder
        if autoencoder is None:
            if config.autoencoder_config is None:
                raise ValueError("LatentDiffusion needs an autoencoder: pass a trained one (e.g. a VQGAN), or a "
                                 "config with autoencoder_class and autoencoder_config to rebuild it from")
            cls = checkpoint.import_class(config.autoencoder_class)
            autoencoder = cls(config=checkpoint.config_class(cls)(**config.autoencoder_config))
        else:
            cls = type(autoencoder)
            config.autoencoder_class = f"{cls.__module__}.{cls.__qualname__}"
            ae_cfg = getattr(autoencoder, "config", None)
            config.autoencoder_config = (dataclasses.asdict(ae_cfg) if dataclasses.is_dataclass(ae_cfg)
                                         and not isinstance(ae_cfg, type) else None)
            # the autoencoder knows its image size better than our default
            if hasattr(ae_cfg, "in_channels") and hasattr(ae_cfg, "image_size"):
                config.image_shape = (ae_cfg.in_channels, ae_cfg.image_size, ae_cfg.image_size)
        if not (hasattr(autoencoder, "decode") and (_is_vq(autoencoder) or hasattr(autoencoder, "encode"))):
            raise TypeError(f"{type(autoencoder).__name__} is not an autoencoder: it needs encode(x) and decode(z)")
        self.autoencoder = _frozen_copy(autoencoder)
        self._vq = _is_vq(self.autoencoder)
        latent_shape = self._probe_latent_shape(config.image_shape)
        if config.latent_shape is not None and config.latent_shape != latent_shape:
            raise ValueError(f"config.latent_shape is {config.latent_shape} but the autoencoder makes "
                             f"{latent_shape} latents")
        config.latent_shape = latent_shape

        # --- the tokenizer and the text encoder
        if tokenizer is not None:
            config.vocab, config.max_length = list(tokenizer.vocab), tokenizer.max_length
        elif config.vocab is None:
            raise ValueError("LatentDiffusion needs a tokenizer or config.vocab, e.g. "
                             "Tokenizer.from_captions(dataset.captions)")
        self.tokenizer = Tokenizer(config.vocab, config.max_length)
        self.text_encoder = TextEncoder(TextEncoderConfig(self.tokenizer.vocab_size, config.max_length, **config.text))

        # --- the objective over latents (GaussianDiffusion or FlowMatching), its network (a
        # U-Net or a DiT) reading the text by cross-attention and the pooled embedding
        bb = config.backbone
        diff = dict(config.diffusion)
        net = dict(diff.pop(bb))
        net.update(in_channels=latent_shape[0], out_channels=None, num_classes=None,
                   context_dim=config.text["n_embd"])
        if bb == "dit":
            net["input_size"] = tuple(latent_shape[1:])
        config.diffusion = {**diff, bb: net}
        objective_config, objective = ((DiffusionConfig, GaussianDiffusion) if config.objective == "diffusion"
                                       else (FlowConfig, FlowMatching))
        self.diffusion = objective(None, objective_config(image_shape=latent_shape, **diff, backbone=bb,
                                                          **{bb: backbone_config_class(bb)(**net)}))
        self.config = config

    # -- plumbing

    @property
    def unet(self) -> nn.Module:
        """The denoising network: a UNet, or a DiT with backbone="dit" (the name is lesson 07's)."""
        return self.diffusion.model

    @property
    def scale_factor(self) -> float | None:
        return self.config.scale_factor

    @scale_factor.setter
    def scale_factor(self, value: float) -> None:
        value = float(value)
        if not value > 0 or value != value or value == float("inf"):
            raise ValueError(f"scale_factor must be a positive finite number, got {value}")
        self.config.scale_factor = value

    def train(self, mode: bool = True):
        """Train/eval mode for the U-Net and text encoder; the frozen autoencoder stays in eval."""
        super().train(mode)
        self.autoencoder.eval()
        return self

    @property
    def _device(self) -> torch.device:
        return next(self.text_encoder.parameters()).device

    def _probe_latent_shape(self, image_shape) -> tuple:
        with torch.no_grad():
            try:
                z = self._encode_raw(torch.zeros(1, *image_shape))
            except (RuntimeError, ValueError) as e:
                raise ValueError(f"the autoencoder cannot encode images of shape {tuple(image_shape)}: {e}") from None
        if z.dim() != 4:
            raise ValueError(f"the autoencoder's latents have shape {tuple(z.shape[1:])}; latent diffusion needs "
                             f"spatial latents (C, h, w) for its U-Net: use a VQGAN, a VQ-VAE or the conv AutoEncoder")
        return tuple(z.shape[1:])

    def _encode_raw(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> unscaled latents.

        For a VQ autoencoder we diffuse the latents *before* quantisation, quant_conv(E(x)),
        and let the decoder quantise (decode = D(quantize(z))): the LDM paper's VQ-regularised
        variant, which "absorbs the quantisation layer into the decoder". The continuous
        latents keep everything the encoder saw, and the quantiser snaps a slightly-off sample
        back onto the codebook, a last denoising step for free. Diffusing z_q instead gives
        the U-Net a target that jumps between codebook vectors.
        """
        ae = self.autoencoder
        if self._vq:
            return ae.quant_conv(ae.encoder(x))
        z = ae.encode(x)
        return z[0] if isinstance(z, (tuple, list)) else z

    def _decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        ae = self.autoencoder
        if self._vq:
            z_q = ae.quantize(z)[0]  # eval mode: nearest codes, no codebook update
            return ae.decode(z_q)
        return ae.decode(z)

    def _need_scale(self) -> float:
        if self.scale_factor is None:
            raise ValueError("scale_factor is not set: call fit_scale_factor(images) or encode_dataset(dataset) "
                             "first (it is 1/std of the training latents)")
        return self.scale_factor

    # -- the autoencoder, scaled

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (N, C, H, W) -> latents * scale_factor (N, *latent_shape)."""
        from minigen.data import check_images

        check_images(x, channels=self.config.image_shape[0], size=self.config.image_shape[1:], name="images to encode")
        return self._encode_raw(x.to(self._device)) * self._need_scale()

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (N, *latent_shape) -> latents / scale_factor -> images, clamped to [-1, 1]."""
        if tuple(z.shape[1:]) != self.config.latent_shape:
            raise ValueError(f"latents must have shape (N, {', '.join(map(str, self.config.latent_shape))}), "
                             f"got {tuple(z.shape)}")
        return self._decode_raw(z.to(self._device) / self._need_scale()).clamp(-1, 1)

    @torch.no_grad()
    def _encode_batches(self, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        was = self.training
        self.eval()
        try:
            return torch.cat([self._encode_raw(x[i:i + batch_size].to(self._device)).float().cpu()
                              for i in range(0, len(x), batch_size)])
        finally:
            self.train(was)

    @staticmethod
    def _scale_from(raw: torch.Tensor) -> float:
        std = float(raw.double().std())
        if not std > 0:
            raise ValueError("the latents have zero variance: is the autoencoder trained?")
        return 1.0 / std

    def fit_scale_factor(self, x: torch.Tensor, batch_size: int = 256) -> float:
        """Set scale_factor = 1 / std of the unscaled latents of the images x (all elements
        pooled, as Stable Diffusion's 0.18215 was computed) and return it."""
        from minigen.data import check_images

        check_images(x, channels=self.config.image_shape[0], size=self.config.image_shape[1:], name="images")
        self.scale_factor = self._scale_from(self._encode_batches(x, batch_size))
        return self.scale_factor

    # -- data

    def _latents_key(self, ds, n: int) -> str:
        h = hashlib.sha256()
        h.update(f"{self.config.autoencoder_class};{weights_hash(self.autoencoder)};".encode())
        h.update(f"{getattr(ds, 'name', type(ds).__name__)};{n};".encode())
        images = getattr(ds, "images", None)
        if isinstance(images, torch.Tensor):  # the stored uint8 images: cheap to hash, catches edits
            h.update(images[:n].contiguous().numpy().tobytes())
        return h.hexdigest()

    def encode_dataset(self, ds, *, n: int | None = None, batch_size: int = 256, cache=None):
        """(latents (N, *latent_shape) * scale_factor, tokens (N, max_length)) of a captioned
        dataset as a TensorDataset, ready for minigen.train.fit.

        The images are encoded once, in batches, without gradients. scale_factor is fitted
        on these latents if it is not set yet. cache: None (no cache), True (the minigen
        cache folder), a folder, or a .pt file. The unscaled latents are stored there
        atomically, keyed by the autoencoder's weights hash and the dataset (name, size and
        image bytes), so a second call with the same autoencoder and data only reads them.
        """
        captions = getattr(ds, "captions", None)
        if captions is None:
            raise ValueError(f"dataset {getattr(ds, 'name', '?')!r} has no captions: latent diffusion with text "
                             f"prompts needs captioned images (use load_dataset('shapes'))")
        n = len(ds) if n is None else int(n)
        if not 1 <= n <= len(ds):
            raise ValueError(f"n must be in [1, {len(ds)}], got {n}")
        path = key = None
        if cache is not None and cache is not False:
            key = self._latents_key(ds, n)
            if cache is True:
                from minigen.data import cache_dir

                cache = cache_dir() / "latents"
            cache = Path(cache)
            path = cache if cache.suffix == ".pt" else cache / f"{getattr(ds, 'name', 'data')}-n{n}-{key[:16]}.pt"
        raw = None
        if path is not None and path.exists():
            try:
                payload = torch.load(path, map_location="cpu", weights_only=True)
                if payload.get("format") == _LATENTS_FORMAT and payload.get("key") == key:
                    raw = payload["latents"]
                else:
                    warnings.warn(f"{path} holds latents of another autoencoder or dataset: re-encoding")
            except Exception as e:  # a truncated or foreign file: recompute and overwrite it
                warnings.warn(f"could not read cached latents {path} ({e}): re-encoding")
        if raw is None:
            x, _ = ds.tensors(n)
            raw = self._encode_batches(x, batch_size)
            if path is not None:
                checkpoint.atomic_save({"format": _LATENTS_FORMAT, "key": key, "latents": raw}, path)
        if self.scale_factor is None:
            self.scale_factor = self._scale_from(raw)
        tokens = self.tokenizer.encode(list(captions[:n]))
        return torch.utils.data.TensorDataset(raw * self.scale_factor, tokens)

    def training_data(self, ds, cache=True):
        """What `minigen train ldm` fits on: encode_dataset(ds, cache=cache)."""
        return self.encode_dataset(ds, cache=cache)

    # -- training

    def encode_prompts(self, prompts) -> torch.Tensor:
        """Prompts -> the U-Net's context (N, max_length, n_embd). "" is the null condition."""
        return self.text_encoder(self.tokenizer.encode(prompts).to(self._device))

    def training_loss(self, batch, step=None):
        """The objective's loss on (latents, tokens) from encode_dataset, with caption dropout:
        the DDPM loss (objective="diffusion") or the flow-matching loss ("flow")."""
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError("LatentDiffusion.training_loss expects (latents, tokens) batches: train on "
                             "model.encode_dataset(dataset), not on the images")
        z, tokens = batch
        if tuple(z.shape[1:]) != self.config.latent_shape:
            raise ValueError(f"latents of shape {tuple(z.shape[1:])} given to a model of latent_shape "
                             f"{self.config.latent_shape}: train on model.encode_dataset(dataset)")
        p = self.config.diffusion["cond_drop_prob"]
        if self.training and p > 0:
            # caption dropout: the empty prompt (all padding) teaches the null condition
            drop = torch.rand(tokens.shape[0], device=tokens.device) < p
            tokens = tokens.masked_fill(drop[:, None], Tokenizer.pad_id)
        # GaussianDiffusion.loss and FlowMatching.loss: the same call, on clean latents
        return dict(loss=self.diffusion.loss(z, dict(context=self.text_encoder(tokens))))

    def configure_optimizers(self, config):
        """AdamW over the denoising network and the text encoder (trained jointly); never the autoencoder."""
        params = list(self.unet.parameters()) + list(self.text_encoder.parameters())
        return torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)

    # -- sampling

    def guided_denoiser(self, prompts, guidance_scale: float | None = None):
        """model_fn(z_t, t) -> the guided prediction for the prompts (eps / v, or the velocity
        with objective="flow"): out(null) + w (out(prompt) - out(null)), the null condition being
        the encoded empty prompt. w = 1 is the plain conditional model."""
        w = self.config.diffusion["guidance_scale"] if guidance_scale is None else float(guidance_scale)
        return self.diffusion.denoiser(context=self.encode_prompts(prompts), guidance_scale=w,
                                       null_context=self.encode_prompts([""]))

    @torch.no_grad()
    def sample(self, prompts, *, guidance_scale: float | None = None, steps: int | None = None,
               eta: float | None = None, generator: torch.Generator | None = None, x_T: torch.Tensor | None = None,
               return_latents: bool = False, sampler: str | None = None, progress: bool = False):
        """One image per prompt, (N, *image_shape) in [-1, 1]; with return_latents also the
        final latents (scaled).

        The defaults come from config.diffusion, by the rule of GaussianDiffusion and
        FlowMatching: `sampler` the config's (DDIM, or Euler with objective="flow"), `steps`
        the config's sample_steps for every sampler (DDIM, DPM-Solver++ and Euler steps are
        network evaluations, Heun takes 2 steps - 1) except DDPM, which walks all T;
        guidance_scale the config's. eta (DDIM's noise, default the config's) is for the
        diffusion objective only.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("sample needs at least one prompt")
        if x_T is None:
            x_T = torch.randn((len(prompts), *self.config.latent_shape), generator=generator,
                              device=self._device if generator is None else generator.device)
        if tuple(x_T.shape) != (len(prompts), *self.config.latent_shape):
            raise ValueError(f"x_T must have shape {(len(prompts), *self.config.latent_shape)}, got {tuple(x_T.shape)}")
        kwargs = dict(sampler=sampler, steps=steps, clip_denoised=False, generator=generator, progress=progress)
        if self.config.objective == "diffusion":
            kwargs["eta"] = eta
        elif eta:
            raise ValueError(f"eta={eta} is DDIM's stochasticity; a flow model samples with a deterministic ODE "
                             f"solver (euler, heun, dpmsolver++): leave eta out")
        was = self.training
        self.eval()
        try:
            z = self.diffusion.sample_from(self.guided_denoiser(prompts, guidance_scale), x_T.to(self._device),
                                           **kwargs)
            x = self.decode(z)
        finally:
            self.train(was)
        return (x, z) if return_latents else x

    @torch.no_grad()
    def sample_images(self, n: int, prompt: str | None = None, guidance: float | None = None,
                      steps: int | None = None, sampler: str | None = None) -> torch.Tensor:
        """n images for `prompt` (the CLI's --prompt), or cycling through config.prompts
        (fit's periodic grids); the empty prompt (unconditional) if there are none.
        sampler: the CLI's --sampler (None: the config's)."""
        if prompt is not None:
            prompts = [prompt] * n
        else:
            pool = self.config.prompts or [""]
            prompts = [pool[i % len(pool)] for i in range(n)]
        return self.sample(prompts, guidance_scale=guidance, steps=steps, sampler=sampler)


# ----------------------------------------------------------------------------- the CLI


def build(overrides, image_shape, num_classes=None, *, dataset=None) -> LatentDiffusion:
    """`minigen train ldm --data shapes --set autoencoder=runs/vqgan/checkpoint.pt [--set key=value ...]`.

    overrides: "autoencoder" (a checkpoint path, or an autoencoder module) is required;
    the other keys are LatentDiffusionConfig fields (max_length, scale_factor, vocab,
    prompts, objective, backbone), text encoder fields prefixed "text_" (text_n_embd,
    text_n_layer, text_n_head, text_dropout), the objective's config fields (DiffusionConfig:
    beta_schedule, guidance_scale, cond_drop_prob, sample_steps, ...; FlowConfig with
    objective="flow": timestep_sampling, sampler, ...) and the backbone's (UNetConfig: channels,
    channel_mult, ...; DiTConfig with backbone="dit": hidden_size, depth, ...). `dataset` (with
    captions) gives the vocabulary, example prompts and the scale factor (its latents are
    encoded once and cached). num_classes is ignored: the condition is the caption.
    """
    overrides = dict(overrides or {})
    ae = overrides.pop("autoencoder", None)
    if ae is None:
        raise ValueError("latent diffusion needs a trained autoencoder: first `minigen train vqgan --data shapes "
                         "--set code_dim=4 --out runs/vqgan` (4x8x8 latents), then `minigen train ldm "
                         "--data shapes --set autoencoder=runs/vqgan/checkpoint.pt`")
    if dataset is not None and getattr(dataset, "captions", None) is None:
        raise ValueError(f"dataset {getattr(dataset, 'name', '?')!r} has no captions: text-to-image latent "
                         f"diffusion needs captioned images (--data shapes)")
    objective, backbone = overrides.pop("objective", "diffusion"), overrides.pop("backbone", "unet")
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}: use one of {OBJECTIVES}")
    check_backbone(backbone)  # both before the autoencoder is read: fail in a second
    ofields, bfields = _OBJECTIVE[objective][0], _BACKBONE[backbone][1]
    top = {"max_length", "scale_factor", "vocab", "prompts"}
    cfg = {k: overrides.pop(k) for k in list(overrides) if k in top}
    text = {k[5:]: overrides.pop(k) for k in list(overrides) if k.startswith("text_") and k[5:] in _TEXT_FIELDS}
    net = {k: overrides.pop(k) for k in list(overrides) if k in bfields and k not in ofields}
    diff = {k: overrides.pop(k) for k in list(overrides) if k in ofields}
    if overrides:
        valid = sorted(top | {"autoencoder", "objective", "backbone"} | {"text_" + f for f in _TEXT_FIELDS}
                       | bfields | ofields)
        raise TypeError(f"unknown latent diffusion option(s) {sorted(overrides)} for objective={objective!r}, "
                        f"backbone={backbone!r}; valid: {valid}")
    if not isinstance(ae, nn.Module):
        ae = load_autoencoder(ae)
    tokenizer = None
    if cfg.get("vocab") is None:
        if dataset is None:
            raise ValueError("build needs the captioned dataset (dataset=...) or a vocab override")
        tokenizer = Tokenizer.from_captions(dataset.captions, cfg.pop("max_length", None))
    if dataset is not None and cfg.get("prompts") is None:
        seen = []  # the first distinct captions: the prompts of fit's sample grids
        for c in dataset.captions:
            if c not in seen:
                seen.append(c)
            if len(seen) == 16:
                break
        cfg["prompts"] = seen
    config = LatentDiffusionConfig(image_shape=tuple(image_shape), text=text, diffusion={**diff, backbone: net},
                                   objective=objective, backbone=backbone, **cfg)
    model = LatentDiffusion(ae, config, tokenizer)
    if tuple(model.config.image_shape) != tuple(image_shape):
        raise ValueError(f"the autoencoder takes {model.config.image_shape} images but the dataset has "
                         f"{tuple(image_shape)}")
    if dataset is not None and model.scale_factor is None:
        model.encode_dataset(dataset, cache=True)  # fits scale_factor; the CLI's training_data reads the cache
    return model


__all__ = ["LatentDiffusionConfig", "LatentDiffusion", "caption_accuracy", "build", "load_autoencoder",
           "weights_hash", "DEFAULT_TEXT", "DEFAULT_UNET", "DEFAULT_DIT", "DEFAULT_DIFFUSION", "DEFAULT_FLOW",
           "TRAIN_DEFAULTS", "OBJECTIVES", "BACKBONES"]
