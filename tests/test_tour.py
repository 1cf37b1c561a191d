"""The main job end to end, in quick mode: every family trains, samples and is reported."""
import json
import math

import pytest

from minigen import samplers, tour

FLOW = "flow matching (latents, class label)"
LDM = "latent diffusion (text prompts)"
REF = ", shipped reference"  # the row beside a minute-scale result: a reference checkpoint, sampled alike
TRAINED = ["autoencoder", "VAE", "VQ-VAE", "VQ-VAE + transformer prior", "VQGAN", "VQGAN + transformer prior",
           FLOW, LDM]
FAMILIES = ["autoencoder", "VAE", "VAE" + REF, "VQ-VAE", "VQ-VAE" + REF, "VQ-VAE + transformer prior",
            "VQ-VAE + transformer prior" + REF, "VQGAN", "VQGAN" + REF, "VQGAN + transformer prior",
            "VQGAN + transformer prior" + REF, FLOW, "DDPM" + REF, LDM, LDM + REF]
SAMPLERS = ["VAE", "VQ-VAE + transformer prior", "VQGAN + transformer prior", FLOW, LDM]


def test_quick_tour_reports_every_family(tmp_path, monkeypatch):
    monkeypatch.delenv("MINIGEN_QUICK", raising=False)
    solved = []  # grids DPM-Solver++ walked: the DDPM and latent-diffusion stages sample with it
    real_dpm = samplers.dpm_solver_pp_2m
    monkeypatch.setattr(samplers, "dpm_solver_pp_2m", lambda fn, x, grid, *a, **k: (
        solved.append(len(grid)), real_dpm(fn, x, grid, *a, **k))[1])
    code = tour.run(out_dir=tmp_path, quick=True, device="cpu")
    import os
    assert "MINIGEN_QUICK" not in os.environ  # quick mode does not leak out of run()
    report = json.loads((tmp_path / "report.json").read_text())
    assert code == 0, report["failures"]
    assert report["failures"] == {}
    results = {r["family"]: r for r in report["results"]}
    assert list(results) == FAMILIES
    for r in results.values():
        png = tmp_path / r["image"]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", r["image"]
        assert r["params"] > 0
        for k, v in r["metrics"].items():
            if isinstance(v, (int, float)):
                assert math.isfinite(v), (r["family"], k, v)
    for name in FAMILIES:
        assert results[name]["train_s"] > 0 and results[name]["steps"] > 0, name
        assert results[name]["reference"] == name.endswith(REF), name
    for name in TRAINED:  # trained here: a CPU clock of its own, smaller than the shipped model's
        assert 0 < results[name]["train_cpu_s"], name
        if name + REF in results and name != "VAE":  # the tour's VAE is a digits model
            assert results[name]["train_s"] < results[name + REF]["train_s"], name
    # what each family must report
    for name in ("autoencoder", "VQ-VAE", "VQGAN", "VQ-VAE" + REF, "VQGAN" + REF):
        assert 0 < results[name]["metrics"]["PSNR (dB)"] < 100
    for name in SAMPLERS + [f + REF for f in SAMPLERS if f != FLOW] + ["DDPM" + REF]:
        m = results[name]["metrics"]
        assert m["FD"] >= 0 and m["FD real-vs-real"] >= 0, name
        assert 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1, name
        assert results[name]["sample_s_per_image"] > 0, name
    for name in ("VQ-VAE + transformer prior", "VQGAN + transformer prior", FLOW):
        assert 0 <= results[name]["metrics"]["class accuracy"] <= 1
        reference_row = name + REF if name != FLOW else "DDPM" + REF
        assert 0 <= results[reference_row]["metrics"]["class accuracy"] <= 1
    for name in (LDM, LDM + REF):
        assert 0 <= results[name]["metrics"]["caption accuracy"] <= 1
    # a reference row carries its manifest's figures (n = 500), the same the manifest holds
    from minigen import reference

    shipped = reference.manifest()["models"]
    assert results["DDPM" + REF]["metrics"]["manifest FD (n=500)"] == shipped["ddpm"]["metrics"]["fd_shapes"]
    assert results[LDM + REF]["metrics"]["manifest caption accuracy"] == shipped["ldm"]["metrics"]["caption_accuracy"]
    # 5 evaluations each (quick): the flow row's batches are walked by DPM-Solver++ too
    # (the flow model's own dpmsolver++ path), the DDPM reference, the LDM figures and gallery
    assert len(solved) >= 5 and set(solved) == {5}
    # stage timings (wall and CPU) and the environment
    assert [s["status"] for s in report["stages"]] == ["ok"] * len(tour.STAGES)
    assert all(s["wall_s"] > 0 and s["cpu_s"] > 0 for s in report["stages"])
    assert report["environment"]["torch"] and report["environment"]["quick"] is True
    md = (tmp_path / "report.md").read_text()
    for name in FAMILIES:
        assert f"| {name} |" in md and f"![{name}](" in md, name
    assert "lesson 08" in md.lower() and "minute-scale" in md


def test_failing_stage_is_reported_and_the_tour_goes_on(tmp_path, monkeypatch):
    def broken(ctx):
        raise RuntimeError("boom")

    def fine(ctx):
        return tour.StageResult("fine", "shapes", params=1, steps=1, train_s=0.1)

    monkeypatch.setattr(tour, "STAGES", [("broken", broken), ("fine", fine)])
    code = tour.run(out_dir=tmp_path, quick=True, device="cpu")
    report = json.loads((tmp_path / "report.json").read_text())
    assert code == 1
    assert report["failures"] == {"broken": "RuntimeError: boom"}
    assert [r["family"] for r in report["results"]] == ["fine"]
    md = (tmp_path / "report.md").read_text()
    assert "| broken |" in md and "failed: RuntimeError: boom" in md


def test_latent_stages_say_when_the_shipped_vqgan_is_missing(tmp_path, monkeypatch):
    from minigen import reference

    def missing(name, *a, **k):
        raise reference.ReferenceError(f"the reference checkpoint {name}.pt is missing")

    monkeypatch.setattr(reference, "load", missing)
    for stage in (tour.stage_flow, tour.stage_latent_diffusion):
        ctx = tour.Context(tmp_path, "cpu", 0)
        with pytest.raises(RuntimeError, match="reference VQGAN"):
            stage(ctx)


def test_a_missing_reference_only_drops_its_row(tmp_path, monkeypatch):
    from minigen import reference

    real = reference.load

    def no_vae(name, *a, **k):
        if name == "vae":
            raise reference.ReferenceError("vae.pt is missing")
        return real(name, *a, **k)

    monkeypatch.setattr(reference, "load", no_vae)
    monkeypatch.setattr(tour, "STAGES", [("VAE", tour.stage_vae)])
    assert tour.run(out_dir=tmp_path, quick=True, device="cpu") == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert [r["family"] for r in report["results"]] == ["VAE"]
