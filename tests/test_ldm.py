"""minigen.ldm: latent diffusion with text prompts on tiny, fast models."""
import dataclasses
import warnings

import pytest
import torch

from minigen import cli, data, judge, ldm, train
from minigen.autoencoder import AutoEncoder, AutoEncoderConfig
from minigen.builtin_data import shapes_label
from minigen.text import Tokenizer
from minigen.vqgan import VQGAN, VQGANConfig

TINY_UNET = dict(channels=16, channel_mult=(1, 2), layers_per_block=1, attention_resolutions=(2,),
                 transformer_heads=2, transformer_dim_head=8)
TINY_TEXT = dict(n_embd=16, n_layer=1, n_head=2)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIGEN_CACHE", str(tmp_path / "cache"))  # never write to ~/.cache in tests


@pytest.fixture(scope="module")
def ds():
    return data.make_shapes(96, seed=5)


def tiny_vqgan(seed=0):
    torch.manual_seed(seed)
    return VQGAN(VQGANConfig(ch=8, ch_mult=(1, 2, 2), z_channels=8, code_dim=4, num_codes=32,
                             perceptual="none", perceptual_weight=0.0)).eval()


def tiny_ldm(ae=None, ds=None, **diffusion):
    ds = ds if ds is not None else data.make_shapes(96, seed=5)
    cfg = ldm.LatentDiffusionConfig(text=TINY_TEXT, diffusion={**diffusion, "unet": TINY_UNET})
    return ldm.LatentDiffusion(ae if ae is not None else tiny_vqgan(), cfg, Tokenizer.from_captions(ds.captions))


def wake_up(module, seed=1):
    """Give zero-initialised layers (U-Net conv_out, SpatialTransformer proj_out) random
    weights, so that an untrained U-Net's output depends on its inputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


# ----------------------------------------------------------------------------- scaling


def test_scale_factor_is_one_over_std_and_decode_inverts_encode(ds):
    ae = tiny_vqgan()
    model = tiny_ldm(ae, ds)
    x, _ = ds.tensors()
    with torch.no_grad():  # independent: the VQGAN's own layers, in float64
        raw = ae.quant_conv(ae.encoder(x)).double()
    s = model.fit_scale_factor(x, batch_size=40)
    assert s == pytest.approx(1 / raw.std().item(), rel=1e-6)
    assert model.config.scale_factor == s  # in the config, hence in the checkpoint
    z = model.encode(x)
    assert z.shape == (96, 4, 8, 8)
    torch.testing.assert_close(z.double(), raw * s, atol=1e-5, rtol=1e-5)
    assert z.std().item() == pytest.approx(1.0, abs=1e-4)
    # decode divides the scale back out: the result is the VQGAN's own reconstruction
    torch.testing.assert_close(model.decode(z), ae.reconstruct(x), atol=1e-5, rtol=1e-5)


def test_generic_autoencoder_scale_and_inverse(ds):
    torch.manual_seed(0)
    ae = AutoEncoder(AutoEncoderConfig(channels=8, latent_channels=3)).eval()
    model = tiny_ldm(ae, ds)
    assert model.config.latent_shape == (3, 8, 8)
    x, _ = ds.tensors(32)
    s = model.fit_scale_factor(x)
    with torch.no_grad():
        assert s == pytest.approx(1 / ae.encode(x).double().std().item(), rel=1e-6)
        torch.testing.assert_close(model.decode(model.encode(x)), ae(x).clamp(-1, 1), atol=1e-5, rtol=1e-5)


def test_encode_before_scale_is_set_says_what_to_do(ds):
    model = tiny_ldm(ds=ds)
    with pytest.raises(ValueError, match="fit_scale_factor"):
        model.encode(ds.tensors(2)[0])
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        model.fit_scale_factor(ds.tensors(2)[0] * 3)


# ----------------------------------------------------------------------------- frozen autoencoder


def test_autoencoder_is_frozen_copied_and_not_optimised(ds):
    ae = tiny_vqgan()
    model = tiny_ldm(ae, ds)
    latents = model.encode_dataset(ds)
    wake_up(model)  # zero-initialised output layers pass no gradient back to the text encoder
    model.train()
    assert not model.autoencoder.training  # train() keeps it in eval
    assert all(not p.requires_grad for p in model.autoencoder.parameters())
    out = model.training_loss([t[:8] for t in latents.tensors])
    out["loss"].backward()
    assert all(p.grad is None for p in model.autoencoder.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.text_encoder.parameters())
    opt = model.configure_optimizers(train.TrainConfig(lr=1e-3))
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in list(model.unet.parameters()) + list(model.text_encoder.parameters())}
    assert not in_opt & {id(p) for p in model.autoencoder.parameters()}
    # the autoencoder's weights are in the state_dict (self-contained), its GAN parts are not
    keys = model.state_dict().keys()
    assert any(k.startswith("autoencoder.decoder.") for k in keys)
    assert not any("discriminator" in k or "perceptual" in k for k in keys)
    # the caller's VQGAN is untouched: still trainable, still has its discriminator
    assert all(p.requires_grad for p in ae.encoder.parameters()) and ae.discriminator is not None


def test_training_loss_decreases_on_a_tiny_problem(ds):
    model = tiny_ldm(ds=ds)
    latents = model.encode_dataset(ds)
    z, tok = latents.tensors
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 1000, (len(z),), generator=g)
    noise = torch.randn(z.shape, generator=g)

    def eval_loss():  # the same timesteps and noise before and after training
        from minigen.diffusion import training_losses

        with torch.no_grad():
            return training_losses(model.unet, z, model.diffusion.alphas_cumprod, t=t, noise=noise,
                                   prediction_type=model.diffusion.config.prediction_type,
                                   model_kwargs=dict(context=model.text_encoder(tok))).item()

    before = eval_loss()
    train.fit(model, latents, steps=40, batch_size=32, lr=2e-3, progress=False, log_every=0)
    after = eval_loss()
    # zero-initialised output: loss = E[v^2] = abar E[eps^2] + (1 - abar) E[z0^2] = 1 (unit-variance z0)
    assert before == pytest.approx(1.0, abs=0.15)
    assert after < 0.6 * before, (before, after)


# ----------------------------------------------------------------------------- guidance


def test_guidance_combines_conditional_and_empty_prompt_predictions(ds):
    model = tiny_ldm(ds=ds).eval()
    wake_up(model)
    prompts = ["a small red circle on a blue background", "a large white triangle on a black background"]
    z = torch.randn(2, 4, 8, 8)
    t = torch.tensor([900, 17])
    tokens = model.tokenizer.encode(prompts)
    assert (model.tokenizer.encode([""]) == 0).all()  # the null prompt is all padding
    with torch.no_grad():
        cond = model.unet(z, t, context=model.text_encoder(tokens))
        null = model.unet(z, t, context=model.text_encoder(torch.zeros_like(tokens)))
        assert not torch.allclose(cond, null, atol=1e-4)  # the text matters
        torch.testing.assert_close(model.guided_denoiser(prompts, 1.0)(z, t), cond)
        torch.testing.assert_close(model.guided_denoiser(prompts, 0.0)(z, t), null, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.guided_denoiser(prompts, 3.5)(z, t), null + 3.5 * (cond - null),
                                   atol=1e-5, rtol=1e-5)


def test_caption_dropout_uses_the_empty_prompt(ds):
    model = tiny_ldm(ds=ds, cond_drop_prob=1.0)
    latents = model.encode_dataset(ds)
    seen = []
    model.text_encoder.register_forward_hook(lambda m, inp, out: seen.append(inp[0].clone()))
    batch = [t[:6] for t in latents.tensors]
    model.train().training_loss(batch)
    assert (seen[-1] == 0).all()  # p = 1: every caption replaced by the empty prompt
    model.eval().training_loss(batch)
    assert torch.equal(seen[-1], batch[1])  # no dropout outside training
    model.config.diffusion["cond_drop_prob"] = 0.0
    model.train().training_loss(batch)
    assert torch.equal(seen[-1], batch[1])


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_through_fit_and_cli_gives_identical_samples(ds, tmp_path):
    model = tiny_ldm(ds=ds)
    latents = model.encode_dataset(ds)
    res = train.fit(model, latents, steps=3, batch_size=16, lr=1e-3, ema_decay=0.5, progress=False,
                    out_dir=str(tmp_path / "run"), log_every=0)
    res.ema.copy_to(model)  # load_model uses the EMA weights
    loaded, ckpt = cli.load_model(tmp_path / "run" / "checkpoint.pt")
    assert type(loaded) is ldm.LatentDiffusion and ckpt["step"] == 3
    assert loaded.config == model.config and loaded.scale_factor == model.scale_factor
    assert loaded.tokenizer.vocab == model.tokenizer.vocab
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    prompts = ["a small red circle on a blue background"] * 3
    a = model.eval().sample(prompts, steps=4, guidance_scale=2.0, generator=torch.Generator().manual_seed(7))
    b = loaded.sample(prompts, steps=4, guidance_scale=2.0, generator=torch.Generator().manual_seed(7))
    assert a.shape == (3, 3, 32, 32) and torch.equal(a, b)
    # and a fit resumed from that checkpoint rebuilds the model the same way
    again = ldm.LatentDiffusion(config=ldm.LatentDiffusionConfig(**ckpt["model_config"]))
    assert again.config == model.config


def test_a_checkpoint_from_before_pooled_context_still_loads(ds):
    model = ldm.LatentDiffusion(tiny_vqgan(), ldm.LatentDiffusionConfig(
        text=TINY_TEXT, diffusion={"unet": {**TINY_UNET, "pooled_context": False}}),
        Tokenizer.from_captions(ds.captions))
    saved = dataclasses.asdict(model.config)
    del saved["diffusion"]["unet"]["pooled_context"]  # the config as older minigen wrote it
    loaded = ldm.LatentDiffusion(config=ldm.LatentDiffusionConfig(**saved))
    assert loaded.config.diffusion["unet"]["pooled_context"] is False and loaded.unet.context_embed is None
    loaded.load_state_dict(model.state_dict())  # no context_embed weights missing
    # a new model, configured by the user, gets the module's default (pooled on)
    assert tiny_ldm(ds=ds).unet.context_embed is not None


def test_rebuild_needs_an_autoencoder_config():
    with pytest.raises(ValueError, match="autoencoder"):
        ldm.LatentDiffusion(config=ldm.LatentDiffusionConfig(vocab=["a"]))


# ----------------------------------------------------------------------------- the latent cache


def test_encode_dataset_cache_hit_is_identical_and_skips_the_encoder(ds, tmp_path, monkeypatch):
    model = tiny_ldm(ds=ds)
    first = model.encode_dataset(ds, batch_size=40, cache=tmp_path / "lat")
    files = list((tmp_path / "lat").glob("*.pt"))
    assert len(files) == 1 and not list((tmp_path / "lat").glob(".*tmp*"))  # atomic, no leftovers
    z, tok = first.tensors
    assert z.shape == (96, 4, 8, 8) and tok.shape == (96, 12)
    assert tok.tolist() == model.tokenizer.encode(ds.captions).tolist()
    assert z.std().item() == pytest.approx(1.0, abs=1e-4)

    def no_encoding(*a, **k):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(model, "_encode_batches", no_encoding)
    second = model.encode_dataset(ds, cache=tmp_path / "lat")
    assert torch.equal(second.tensors[0], z) and torch.equal(second.tensors[1], tok)
    monkeypatch.undo()
    # other autoencoder weights -> another key: encoded again, into another file
    other = tiny_ldm(tiny_vqgan(seed=1), ds)
    other.encode_dataset(ds, cache=tmp_path / "lat")
    assert len(list((tmp_path / "lat").glob("*.pt"))) == 2
    # a corrupt cache file is re-encoded with a warning, not trusted
    files[0].write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="re-encoding"):
        third = model.encode_dataset(ds, cache=files[0])
    torch.testing.assert_close(third.tensors[0], z)


def test_encode_dataset_needs_captions():
    model = tiny_ldm()
    digits = data.make_digits(4)
    with pytest.raises(ValueError, match="no captions"):
        model.encode_dataset(digits)


def test_training_loss_rejects_images(ds):
    model = tiny_ldm(ds=ds)
    with pytest.raises(ValueError, match="encode_dataset"):
        model.training_loss(ds.tensors(4))


# ----------------------------------------------------------------------------- evaluation


def test_caption_accuracy_with_the_judge():
    j = judge.load_judge("shapes")
    test = data.load_dataset("shapes", split="test", n=200)
    x, labels = test.tensors()
    assert ldm.caption_accuracy(j, x, test.captions) >= 0.99
    # shuffled captions: right only by chance (1/18), never close to 1
    shuffled = test.captions[1:] + test.captions[:1]
    wrong = torch.tensor([shapes_label(c) for c in shuffled]) != labels
    assert ldm.caption_accuracy(j, x, shuffled) <= 1 - wrong.float().mean().item() + 0.02
    assert ldm.caption_accuracy(j, x, shuffled) < 0.2
    with pytest.raises(ValueError, match="shape and a colour"):
        ldm.caption_accuracy(j, x[:1], ["a thing"])
    with pytest.raises(ValueError, match="one caption per image"):
        ldm.caption_accuracy(j, x[:2], ["a red circle"])


def test_shapes_label_reads_the_object_not_the_background():
    from minigen.data import shapes_caption

    for shape, color, size, bg in [(0, 0, 0, 2), (2, 5, 1, 0), (1, 2, 0, 3)]:
        assert shapes_label(shapes_caption(shape, color, size, bg)) == shape * 6 + color


# ----------------------------------------------------------------------------- build (the CLI's constructor)


def test_build_errors(ds, tmp_path):
    with pytest.raises(ValueError, match="minigen train vqgan"):
        ldm.build({}, (3, 32, 32), dataset=ds)
    with pytest.raises(ValueError, match="no captions"):
        ldm.build({"autoencoder": str(tmp_path / "x.pt")}, (1, 28, 28), dataset=data.make_digits(4))
    with pytest.raises(TypeError, match="unknown latent diffusion option"):
        ldm.build({"autoencoder": tiny_vqgan(), "widht": 3}, (3, 32, 32), dataset=ds)
    with pytest.raises(FileNotFoundError):
        ldm.build({"autoencoder": str(tmp_path / "missing.pt")}, (3, 32, 32), dataset=ds)


def test_build_routes_overrides_and_fits_the_scale(ds):
    model = ldm.build({"autoencoder": tiny_vqgan(), "channels": 8, "text_n_embd": 8, "text_n_head": 2,
                       "guidance_scale": 4.0, "transformer_heads": 2, "transformer_dim_head": 4},
                      (3, 32, 32), dataset=ds)
    c = model.config
    assert c.diffusion["unet"]["channels"] == 8 and c.text["n_embd"] == 8
    assert c.diffusion["unet"]["context_dim"] == 8 and c.diffusion["guidance_scale"] == 4.0
    assert c.diffusion["clip_denoised"] is False
    assert c.scale_factor is not None and len(c.prompts) == 16 and c.prompts[0] == ds.captions[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = model.sample_images(2, steps=2)
    assert x.shape == (2, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    with pytest.warns(UserWarning, match="'dog'"):
        model.sample_images(1, prompt="a red dog", steps=1)
