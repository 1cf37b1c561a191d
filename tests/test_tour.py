"""The main job end to end, in quick mode: every family trains, samples and is reported."""
import json
import math

from minigen import samplers, tour

FAST = "DPM-Solver++ (5 evaluations, same U-Net)"  # the DDPM row's U-Net, sampled by the fast solver
FAMILIES = ["autoencoder", "VAE", "VQ-VAE", "VQ-VAE + transformer prior", "VQGAN", "VQGAN + transformer prior",
            "DDPM", FAST, "latent diffusion (text prompts)"]


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
        if not name.startswith("DPM-Solver++"):  # it reuses the DDPM row's network: no training of its own
            assert results[name]["train_s"] > 0 and results[name]["steps"] > 0, name
    # what each family must report
    for name in ("autoencoder", "VQ-VAE", "VQGAN"):
        assert 0 < results[name]["metrics"]["PSNR (dB)"] < 100
    for name in ("VAE", "VQ-VAE + transformer prior", "VQGAN + transformer prior", FAST,
                 "latent diffusion (text prompts)"):
        m = results[name]["metrics"]
        assert m["FD"] >= 0 and m["FD real-vs-real"] >= 0, name
        assert 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1, name
        assert results[name]["sample_s_per_image"] > 0, name
    for name in ("VQ-VAE + transformer prior", "VQGAN + transformer prior", FAST):
        assert 0 <= results[name]["metrics"]["class accuracy"] <= 1
    assert 0 <= results["latent diffusion (text prompts)"]["metrics"]["caption accuracy"] <= 1
    assert results["DDPM"]["sample_s_per_image"] > 0
    # 5 evaluations each (quick): the DPM-Solver++ row's batches, the LDM figures and gallery
    assert len(solved) >= 3 and set(solved) == {5}
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


def test_latent_diffusion_needs_the_tours_vqgan(tmp_path):
    ctx = tour.Context(tmp_path, "cpu", 0)
    try:
        tour.stage_latent_diffusion(ctx)
    except RuntimeError as e:
        assert "VQGAN" in str(e)
    else:
        raise AssertionError("the latent diffusion stage ran without a VQGAN")
