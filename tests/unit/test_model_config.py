"""The model_config_list file renders with TF Serving's protos and reads back."""

from pathlib import Path

from pipelines.serving import model_config


def test_render_parse_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "models.config"
    entry = model_config.ModelEntry(
        "fraud_detector", "/models/fraud_detector", [41, 42], {"stable": 41, "canary": 42}
    )
    model_config.write(path, [entry])
    text = path.read_text()
    assert "model_config_list" in text and 'model_platform: "tensorflow"' in text
    assert "specific" in text and 'key: "canary"' in text
    assert model_config.read(path) == [entry]
    model_config.upsert(path, model_config.ModelEntry("other", "/m/o", [1]))
    assert [e.name for e in model_config.read(path)] == ["fraud_detector", "other"]
    assert model_config.entry(path, "fraud_detector") == entry
    assert list(tmp_path.iterdir()) == [path]  # no temp files left behind
