import pytest
import yaml

from ecg_pipeline.pipeline.config import PreprocessConfig, config_from_dict, load_config
from ecg_pipeline.pipeline.errors import ConfigError


def test_defaults_and_roundtrip(tmp_path):
    c = load_config(None)
    assert c == PreprocessConfig()
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(c.to_dict()))
    assert load_config(p) == c


def test_partial_yaml_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("leads: [V1]\nwindow: {before_s: 0.3}\nstft: {nperseg: 32, nfft: 64}\nstore: {dtype: float32}\n")
    c = load_config(p)
    assert c.leads == ("V1",) and c.window.before_s == 0.3 and c.window.after_s == 0.45
    assert (c.stft.nperseg, c.stft.nfft, c.store.dtype) == (32, 64, "float32")
    assert c.fingerprint() != PreprocessConfig().fingerprint()


def test_download_settings_do_not_change_the_fingerprint():
    assert config_from_dict({"download": {"retries": 0}}).fingerprint() == PreprocessConfig().fingerprint()


@pytest.mark.parametrize("text, where", [
    ("windw: {before_s: 1}", "Additional properties are not allowed ('windw'"),
    ("store: {dtype: int8}", "store.dtype: 'int8' is not one of"),
    ("stft: {nperseg: 2}", "stft.nperseg: 2 is less than the minimum"),
    ("unknown_symbols: keep", "unknown_symbols: 'keep' is not one of"),
    ("stft: {nperseg: 64, nfft: 32}", "stft.nfft (32) must be >= stft.nperseg (64)"),
    ("- a list", "configuration must be a mapping"),
    ("a: [unclosed", "is not valid YAML"),
])
def test_bad_config_names_the_key(tmp_path, text, where):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert where in str(e.value) and "bad.yaml" in str(e.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config("/nonexistent/x.yaml")
