"""The main job end to end, in quick mode: every family trains, samples and is reported."""
import json

from minigen import tour


def test_quick_tour_reports_every_family(tmp_path):
    code = tour.run(out_dir=tmp_path, quick=True, device="cpu")
    report = json.loads((tmp_path / "report.json").read_text())
    assert code == 0, report["failures"]
    families = [r["family"] for r in report["results"]]
    assert families == ["autoencoder", "VAE", "VQ-VAE", "VQ-VAE + transformer prior", "DDPM (DDIM sampler)"]
    for r in report["results"]:
        assert (tmp_path / r["image"]).stat().st_size > 0
        assert r["train_s"] > 0 and r["params"] > 0
        assert all(v == v for v in r["metrics"].values() if isinstance(v, float)), r  # no NaN
    md = (tmp_path / "report.md").read_text()
    assert "| DDPM (DDIM sampler) | shapes |" in md and "FD-shapes" in md
