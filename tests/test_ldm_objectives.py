"""minigen.ldm with either objective (diffusion, flow matching) and either backbone (U-Net,
DiT), and the one default-steps rule every model family follows."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from minigen import cli, data, diffusion, flow, ldm, samplers, train
from minigen.dit import DiT
from minigen.text import Tokenizer
from minigen.unet import UNet, UNetConfig
from test_ldm import tiny_vqgan  # the same small frozen autoencoder as test_ldm

TINY_TEXT = dict(n_embd=16, n_layer=1, n_head=2)
TINY_NET = {"unet": dict(channels=8, channel_mult=(1, 2), layers_per_block=1, attention_resolutions=(2,),
                         transformer_heads=2, transformer_dim_head=4),
            "dit": dict(hidden_size=16, depth=2, num_heads=2, patch_size=2)}
PROMPTS = ["a small red circle on a blue background", "a large white triangle on a black background",
           "a large green square on a gray background"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIGEN_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def ds():
    return data.make_shapes(64, seed=3)


def tiny(ds, objective="flow", backbone="dit", **opts):
    cfg = ldm.LatentDiffusionConfig(text=TINY_TEXT, objective=objective, backbone=backbone,
                                    diffusion={**opts, backbone: TINY_NET[backbone]})
    return ldm.LatentDiffusion(tiny_vqgan(), cfg, Tokenizer.from_captions(ds.captions))


def wake_up(module, seed=1):
    """Random weights for the zero-initialised layers (adaLN-Zero, final layers), so that the
    untrained network's output depends on its inputs and its condition."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def batch_of(model, ds, n=8):
    z, tokens = model.encode_dataset(ds).tensors
    return z[:n], tokens[:n]


# ----------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_flow_objective_is_flow_matchings_loss_on_the_latents(ds, backbone):
    model = tiny(ds, "flow", backbone, timestep_sampling="uniform")
    assert isinstance(model.diffusion, flow.FlowMatching)
    assert isinstance(model.unet, DiT if backbone == "dit" else UNet)
    wake_up(model.unet)
    z, tokens = batch_of(model, ds)
    model.eval()  # no caption dropout: the same condition on both sides
    with torch.no_grad():
        context = model.text_encoder(tokens)
        # the same random draws (t, then noise) as flow.py's own loss
        torch.manual_seed(11)
        ours = model.training_loss((z, tokens))["loss"]
        torch.manual_seed(11)
        theirs = flow.flow_matching_loss(model.unet, z, timestep_sampling="uniform", model_kwargs=dict(context=context))
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
        # and by hand at given t and noise: || v(z_t, 1000 t) - (eps - z0) ||^2 on z_t = (1 - t) z0 + t eps
        t, noise = torch.rand(len(z)), torch.randn_like(z)
        z_t = (1 - t[:, None, None, None]) * z + t[:, None, None, None] * noise
        by_hand = F.mse_loss(model.unet(z_t, 1000 * t, context=context), noise - z)
        torch.testing.assert_close(model.diffusion.loss(z, dict(context=context), t=t, noise=noise), by_hand,
                                   rtol=1e-5, atol=1e-6)
    assert by_hand > 0.1  # a loss that can tell the two apart


def test_diffusion_objective_is_unchanged_and_takes_the_dit(ds):
    """objective="diffusion" (the default) is lesson 07's DDPM loss, on either backbone."""
    for backbone in ("unet", "dit"):
        model = tiny(ds, "diffusion", backbone).eval()
        assert isinstance(model.diffusion, diffusion.GaussianDiffusion) and model.config.objective == "diffusion"
        wake_up(model.unet)
        z, tokens = batch_of(model, ds)
        with torch.no_grad():
            torch.manual_seed(5)
            ours = model.training_loss((z, tokens))["loss"]
            torch.manual_seed(5)
            theirs = diffusion.training_losses(model.unet, z, model.diffusion.alphas_cumprod, prediction_type="v",
                                               model_kwargs=dict(context=model.text_encoder(tokens)))
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_flow_training_lowers_the_loss_and_trains_the_text_encoder(ds, backbone):
    model = tiny(ds, "flow", backbone)
    latents = model.encode_dataset(ds)
    z, tokens = latents.tensors
    g = torch.Generator().manual_seed(0)
    t, noise = torch.rand(len(z), generator=g), torch.randn(z.shape, generator=g)

    def eval_loss():
        with torch.no_grad():
            return float(model.diffusion.loss(z, dict(context=model.text_encoder(tokens)), t=t, noise=noise))

    text_before = [p.clone() for p in model.text_encoder.parameters()]
    ae_before = [p.clone() for p in model.autoencoder.parameters()]
    before = eval_loss()
    train.fit(model, latents, steps=30, batch_size=32, lr=3e-3, progress=False, log_every=0)
    after = eval_loss()
    # zero output at init: loss = E[(eps - z0)^2] = 1 + 1 for unit-variance latents
    assert before == pytest.approx(2.0, abs=0.3)
    assert after < 0.75 * before, (before, after)
    assert any(not torch.equal(a, b) for a, b in zip(text_before, model.text_encoder.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(ae_before, model.autoencoder.parameters()))


# ----------------------------------------------------------------------------- guidance, sampling


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_flow_guidance_uses_the_empty_prompt(ds, backbone):
    model = tiny(ds, "flow", backbone).eval()
    wake_up(model)
    z, t = torch.randn(3, 4, 8, 8), torch.tensor([900.0, 500.0, 17.0])
    with torch.no_grad():
        cond = model.unet(z, t, context=model.encode_prompts(PROMPTS))
        null = model.unet(z, t, context=model.encode_prompts([""] * 3))
        assert not torch.allclose(cond, null, atol=1e-4)  # the text reaches the network
        torch.testing.assert_close(model.guided_denoiser(PROMPTS, 1.0)(z, t), cond)
        torch.testing.assert_close(model.guided_denoiser(PROMPTS, 0.0)(z, t), null, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.guided_denoiser(PROMPTS, 2.5)(z, t), null + 2.5 * (cond - null),
                                   atol=1e-5, rtol=1e-5)


def count_calls(net):
    calls = []
    net.register_forward_hook(lambda *a: calls.append(1))
    return calls


@pytest.mark.parametrize("sampler", [None, *flow.FLOW_SAMPLERS])
def test_flow_samples_with_each_sampler(ds, sampler):
    model = tiny(ds, "flow", "dit", sample_steps=3)
    model.scale_factor = 1.0  # what encode_dataset would fit
    wake_up(model.unet)
    calls = count_calls(model.unet)
    g = torch.Generator().manual_seed(2)
    x, z = model.sample(PROMPTS[:2], sampler=sampler, guidance_scale=2.0, generator=g, return_latents=True)
    assert x.shape == (2, 3, 32, 32) and z.shape == (2, 4, 8, 8)
    assert float(x.abs().max()) <= 1 and torch.isfinite(z).all()
    assert len(calls) == samplers.nfe(sampler or "euler", 3)  # one batched call per evaluation, guided
    again = model.sample(PROMPTS[:2], sampler=sampler, guidance_scale=2.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(x, again)  # deterministic ODE solvers from the same noise


def test_flow_sample_errors(ds):
    model = tiny(ds, "flow", "dit")
    with pytest.raises(ValueError, match="eta"):
        model.sample(PROMPTS[:1], eta=0.5, steps=1)
    with pytest.raises(ValueError, match="euler"):
        model.sample(PROMPTS[:1], sampler="ddim", steps=1)
    with pytest.raises(ValueError, match="x_T"):
        model.sample(PROMPTS[:1], x_T=torch.zeros(2, 4, 8, 8))


# ----------------------------------------------------------------------------- default steps


def families(ds, k):
    """Every sampling model, each with sample_steps=k (DDPM: T = 8 steps)."""
    unet = UNetConfig(in_channels=3, channels=8, channel_mult=(1,), attention_resolutions=())
    return {
        "ddpm": diffusion.GaussianDiffusion(None, diffusion.DiffusionConfig(
            image_shape=(3, 8, 8), timesteps=8, sample_steps=k, unet=unet)),
        "flow": flow.FlowMatching(None, flow.FlowConfig(image_shape=(3, 8, 8), sample_steps=k, unet=unet)),
        "ldm": tiny(ds, "diffusion", "unet", timesteps=8, sample_steps=k),
        "ldm_flow": tiny(ds, "flow", "dit", sample_steps=k),
    }


@pytest.mark.parametrize("k", [2, 4])
def test_without_steps_every_sampler_takes_the_models_sample_steps(ds, k):
    """The rule, the same in every family: steps=None means config sample_steps for every
    sampler (Heun: sample_steps points, 2 k - 1 evaluations), except DDPM's walk over all T."""
    for name, model in families(ds, k).items():
        if isinstance(model, ldm.LatentDiffusion):
            model.scale_factor = 1.0
        net = model.unet if isinstance(model, ldm.LatentDiffusion) else model.model
        calls = count_calls(net)
        objective = getattr(model, "diffusion", model)
        choices = flow.FLOW_SAMPLERS if isinstance(objective, flow.FlowMatching) else diffusion.SAMPLERS
        for sampler in choices:
            calls.clear()
            model.sample_images(2, sampler=sampler)
            want = 8 if sampler == "ddpm" else samplers.nfe(sampler, k)
            assert len(calls) == want, (name, sampler, len(calls), want)
        calls.clear()
        model.sample_images(2, sampler="heun", steps=3)  # an explicit count wins
        assert len(calls) == samplers.nfe("heun", 3), name


# ----------------------------------------------------------------------------- checkpoints, CLI


@pytest.mark.parametrize("objective,backbone", [("flow", "dit"), ("flow", "unet"), ("diffusion", "dit")])
def test_checkpoint_round_trip_gives_identical_samples(ds, tmp_path, objective, backbone):
    model = tiny(ds, objective, backbone, sample_steps=3)
    latents = model.encode_dataset(ds)
    res = train.fit(model, latents, steps=2, batch_size=16, lr=1e-3, ema_decay=0.5, progress=False,
                    out_dir=str(tmp_path / "run"), log_every=0)
    res.ema.copy_to(model)
    loaded, ckpt = cli.load_model(tmp_path / "run" / "checkpoint.pt")
    assert type(loaded) is ldm.LatentDiffusion and loaded.config == model.config
    assert loaded.config.objective == objective and loaded.config.backbone == backbone
    assert type(loaded.diffusion) is type(model.diffusion) and type(loaded.unet) is type(model.unet)
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    a = model.eval().sample(PROMPTS, guidance_scale=2.0, generator=torch.Generator().manual_seed(7))
    b = loaded.sample(PROMPTS, guidance_scale=2.0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    again = ldm.LatentDiffusion(config=ldm.LatentDiffusionConfig(**ckpt["model_config"]))
    assert again.config == model.config


def test_a_config_from_before_the_objective_field_is_a_unet_diffusion_model(ds):
    model = tiny(ds, "diffusion", "unet")
    saved = dataclasses.asdict(model.config)
    del saved["objective"], saved["backbone"]  # as minigen wrote latent diffusion configs before
    loaded = ldm.LatentDiffusion(config=ldm.LatentDiffusionConfig(**saved))
    assert loaded.config == model.config and isinstance(loaded.diffusion, diffusion.GaussianDiffusion)
    loaded.load_state_dict(model.state_dict())


def test_dit_gets_the_latent_size_and_the_text_width(ds):
    model = tiny(ds, "flow", "dit")
    c = model.unet.config
    assert c.in_channels == 4 and c.input_size == (8, 8) and c.context_dim == TINY_TEXT["n_embd"]
    assert c.num_classes is None and c.cross_attention and c.pooled_context  # both text paths
    assert model.unet.context_embed is not None and all(b.cross is not None for b in model.unet.blocks)


def test_bad_objective_and_backbone_name_the_valid_ones(ds):
    for kwargs, words in ((dict(objective="rectified"), ("'rectified'", "diffusion", "flow")),
                          (dict(backbone="vit"), ("'vit'", "unet", "dit"))):
        with pytest.raises(ValueError) as e:
            ldm.LatentDiffusionConfig(**kwargs)
        assert all(w in str(e.value) for w in words), str(e.value)
        with pytest.raises(ValueError) as e:  # refused before the (missing) autoencoder is read
            ldm.build({"autoencoder": "/nonexistent/ae.pt", **kwargs}, (3, 32, 32), dataset=ds)
        assert all(w in str(e.value) for w in words), str(e.value)
    # an option of the other objective or backbone is unknown here, and says what is valid
    with pytest.raises(TypeError, match=r"\['beta_schedule'\] for objective='flow'.*timestep_sampling"):
        ldm.build({"autoencoder": tiny_vqgan(), "objective": "flow", "beta_schedule": "cosine"}, (3, 32, 32),
                  dataset=ds)
    with pytest.raises(TypeError, match=r"\['channel_mult'\].*backbone='dit'.*hidden_size"):
        ldm.build({"autoencoder": tiny_vqgan(), "backbone": "dit", "channel_mult": (1, 2)}, (3, 32, 32), dataset=ds)
    with pytest.raises(ValueError, match="unknown flow option.*'eta'"):
        ldm.LatentDiffusionConfig(objective="flow", diffusion={"eta": 0.0})
    with pytest.raises(ValueError, match="unknown DiTConfig option.*'channels'"):
        ldm.LatentDiffusionConfig(backbone="dit", diffusion={"dit": {"channels": 8}})
    with pytest.raises(ValueError, match=r"diffusion\['dit'\].*backbone is 'unet'"):
        ldm.LatentDiffusionConfig(diffusion={"dit": {"hidden_size": 16}})
    with pytest.raises(ValueError, match="text, not class labels"):
        ldm.LatentDiffusionConfig(backbone="dit", diffusion={"dit": {"num_classes": 3}})
    with pytest.raises(ValueError, match="clip_denoised"):
        ldm.LatentDiffusionConfig(objective="flow", diffusion={"clip_denoised": True})


def test_cli_trains_a_latent_flow_dit_and_samples_it(tmp_path, capsys):
    vq, ld = tmp_path / "vqgan", tmp_path / "ldm"
    assert cli.main(["train", "vqgan", "--data", "shapes", "--n-train", "32", "--steps", "1", "--batch-size", "8",
                     "--out", str(vq), "--device", "cpu", "--set", "ch=8", "--set", "z_channels=8",
                     "--set", "code_dim=4", "--set", "num_codes=16", "--set", "perceptual=none"]) == 0
    assert cli.main(["train", "ldm", "--data", "shapes", "--n-train", "32", "--steps", "2", "--batch-size", "8",
                     "--out", str(ld), "--device", "cpu", "--set", f"autoencoder={vq / 'checkpoint.pt'}",
                     "--set", "objective=flow", "--set", "backbone=dit", "--set", "hidden_size=16",
                     "--set", "depth=1", "--set", "num_heads=2", "--set", "text_n_embd=8", "--set", "text_n_head=2",
                     "--set", "sample_steps=2"]) == 0
    model, ckpt = cli.load_model(ld / "checkpoint.pt")
    assert ckpt["step"] == 2 and model.config.objective == "flow" and isinstance(model.unet, DiT)
    assert model.config.diffusion["dit"]["hidden_size"] == 16 and model.config.diffusion["sample_steps"] == 2
    for sampler in flow.FLOW_SAMPLERS:
        png = tmp_path / f"{sampler}.png"
        assert cli.main(["sample", str(ld), "--prompt", PROMPTS[0], "--sampler", sampler, "--steps", "2",
                         "--n", "2", "--out", str(png)]) == 0
        assert png.stat().st_size > 0
    capsys.readouterr()
    assert cli.main(["sample", str(ld), "--sampler", "ddim", "--n", "1", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "'ddim'" in err and "euler" in err


def test_cli_refuses_a_bad_backbone_for_ldm_before_reading_the_autoencoder(tmp_path, capsys):
    assert cli.main(["train", "ldm", "--set", "backbone=vit", "--set", f"autoencoder={tmp_path / 'none.pt'}",
                     "--out", str(tmp_path / "ldm")]) == 2
    err = capsys.readouterr().err
    assert "'vit'" in err and "unet" in err and "dit" in err
