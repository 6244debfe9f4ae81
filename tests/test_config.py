import pickle
from importlib import resources

import jsonschema
import pytest
import yaml

from ecg_pipeline import schemas
from ecg_pipeline.pipeline import detect
from ecg_pipeline.pipeline.config import (DetectorSpec, DownloadConfig, PreprocessConfig, ScoreConfig, StftConfig,
                                          StoreConfig, TrainConfig, WindowConfig, config_from_dict, json_schemas,
                                          load_config, load_score_config, load_train_config, render_schema,
                                          score_config_from_dict, train_config_from_dict)
from ecg_pipeline.pipeline.errors import ConfigError


def test_defaults_and_roundtrip(tmp_path):
    c = load_config(None)
    assert c == PreprocessConfig()
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(c.to_dict()))
    assert load_config(p) == c
    for load, cls in ((load_train_config, TrainConfig), (load_score_config, ScoreConfig)):
        p.write_text(yaml.safe_dump(cls().to_dict()))
        assert load(None) == load(p) == cls()


def test_partial_yaml_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("leads: [V1]\nwindow: {before_s: 0.3}\nstft: {nperseg: 32, nfft: 64}\nstore: {dtype: float32}\n")
    c = load_config(p)
    assert c.leads == ("V1",) and c.window.before_s == 0.3 and c.window.after_s == 0.45
    assert (c.stft.nperseg, c.stft.nfft, c.store.dtype) == (32, 64, "float32")
    assert c.fingerprint() != PreprocessConfig().fingerprint()


def test_download_settings_do_not_change_the_fingerprint():
    assert config_from_dict({"download": {"retries": 0}}).fingerprint() == PreprocessConfig().fingerprint()


def test_fingerprints_are_the_ones_stores_on_disk_carry():
    """Fingerprints only change on purpose. Store schema v3 added the RR features (`rr`) and the 40 Hz band
    (`stft.max_freq_hz`) to beat stores, so beat fingerprints before it (40033dad...) are not resumed into
    (and v2 stores are refused for writing with how to rebuild them); a config without the band keeps its
    fingerprint but for the `rr` section, and rhythm stores keep theirs (test_a_fingerprint_covers...).
    Schema v4 added the neighbour templates (`template` section) to beat stores: v3 beat fingerprints
    (2da72bc5...) are not resumed into either. Beats aligned to the detector's fiducial point (`window.align`,
    default `fiducial`) moved the default's windows: a store of annotated positions keeps its fingerprint
    (ecaa078b...) as `align: annotation`. The atrial activity beside the RR features (`rr.atrial`, off by default)
    left the fingerprints of the stores without it as they were."""
    assert PreprocessConfig().fingerprint() == "2bf08a9f0f1a894f748bbc29ba27bdb01bcb64b5c0ee8d91574e64bb1265a298"
    assert config_from_dict({"rr": {"atrial": True}}).fingerprint() == \
        "4abca565aa0f480ab376f54766e59ec7fa0a6ef69f83d9f1d5084e50d470d66a"
    assert config_from_dict({"window": {"align": "annotation"}}).fingerprint() == \
        "ecaa078bafad387448e14e718cbe14de4372866902367e426fcc27587de479ea"
    # The detector's amplitude floor (detector.min_amplitude_mv) changed what scoring finds on noise, so scores
    # stores of the detector before it (0624e8b0...) are not resumed into: --overwrite, or a new --out.
    # So did the search back (detector.searchback_*): scores stores of the detector before it (ac331c55...) neither.
    # Nor the T- and P-wave rejection (detector.twave_*, pwave_*): stores of the detector before it (df334c09...,
    # with the quality section) are not resumed into either.
    # The per-segment quality verdicts (`quality` section) change predicted classes, so they are in the fingerprint
    # (scores stores of schema v2 are refused by their schema version anyway).
    from ecg_pipeline.pipeline.config import QualityConfig

    assert ScoreConfig().fingerprint() != ScoreConfig(quality=QualityConfig(segments=False)).fingerprint()
    assert ScoreConfig().fingerprint() == "e378edef646b131a300fbe9f45622235aa8517fc3cec31d24093e6f7fe15a50b"
    c = config_from_dict({"leads": ["V1", "II"], "stft": {"nfft": 128}, "store": {"dtype": "float32"}})
    assert c.fingerprint() == "58d6bcf1c1fcd492a8883d8d92c48ac8938571345502ab28d3bfefb6f359d15a"
    full = config_from_dict({"leads": ["V1", "II"], "stft": {"nfft": 128, "max_freq_hz": None},
                             "store": {"dtype": "float32"}})
    assert full.fingerprint() == "a897537da583c75334a6a07c6e982aac6b5c4fd69e77f699d5e71a44ad6e9029"
    assert full.fingerprint("rhythm") == config_from_dict(
        {"leads": ["V1", "II"], "stft": {"nfft": 128, "max_freq_hz": None}, "rr": {"long_s": 60},
         "store": {"dtype": "float32"}}).fingerprint("rhythm")  # RR features are no part of a rhythm store
    # Whole numbers stay as written (YAML `band_hz: [4, 16]` was fingerprinted as [4, 16], not [4.0, 16.0]).
    s = score_config_from_dict({"leads": ["II"], "detector": {"band_hz": [4, 16]}})
    assert s.detector.band_hz == (4, 16) and type(s.detector.band_hz[0]) is int
    assert s.fingerprint() == "820a1feb8a42d0f63b658c58f109f859d59849007f50effa17ce21749952b3e9"


def test_a_fingerprint_covers_the_keys_of_its_task_only():
    """Beat stores ignore the rhythm windows and rhythm stores the beat window: neither resumes for nothing."""
    base, rhythm = PreprocessConfig(), config_from_dict({"rhythm": {"length_s": 20}})
    beat = config_from_dict({"window": {"before_s": 0.3}})
    assert rhythm.fingerprint("beat") == base.fingerprint("beat") != beat.fingerprint("beat")
    assert beat.fingerprint("rhythm") == base.fingerprint("rhythm") != rhythm.fingerprint("rhythm")


def test_database_and_task_defaults_sit_under_the_file_and_the_options(tmp_path):
    from ecg_pipeline.pipeline.config import load_config, load_train_config

    f = tmp_path / "c.yaml"
    f.write_text("stft:\n  nperseg: 32\n")
    c = load_config(f, {"stft": {"hop": 32, "nperseg": 64}, "store": {"chunk_size": 512}})
    assert (c.stft.nperseg, c.stft.hop, c.store.chunk_size) == (32, 32, 512)  # the file wins key by key
    t = load_train_config(None, "rhythm", epochs=3)
    assert (t.model, t.epochs) == ("rhythm-cnn", 3) and load_train_config(None, "beat").model == "beat-template-cnn"
    with pytest.raises(ConfigError, match="rhythm.min_s: 40.0 must be <= rhythm.length_s"):
        config_from_dict({"rhythm": {"length_s": 30.0, "min_s": 40.0}})


def test_to_dict_is_plain_data_in_declaration_order():
    assert PreprocessConfig().to_dict() == {
        "leads": None, "lead_fallback": "fail", "unknown_symbols": "Q",
        "window": {"before_s": 0.25, "after_s": 0.45, "align": "fiducial"},
        "rhythm": {"length_s": 30.0, "hop_s": 30.0, "min_s": 5.0},
        "stft": {"nperseg": 64, "hop": 8, "nfft": None, "window": "hann", "detrend": "constant", "log_eps": 0.0001,
                 "max_freq_hz": 40.0},
        "rr": {"local_beats": 10, "long_s": 300.0, "min_rr_s": 0.15, "max_rr_s": 3.0, "default_rr_s": 0.8,
                   "atrial": False},
        "template": {"beats": 8},
        "store": {"dtype": "float16", "chunk_size": 2048, "compressor": "blosc-lz4",
                  "one_pass_max_mb": 64.0, "commit_records": None},
        "download": {"retries": 4, "backoff_s": 0.5, "timeout_s": 120.0, "require_checksums": False}}
    assert list(TrainConfig().to_dict()) == ["model", "epochs", "batch_size", "learning_rate", "lr_factor",
                                             "lr_patience", "class_weighting", "balanced_sampling", "premature_beats", "time_stretch", "patience", "refit", "refit_epochs", "members", "seed",
                                             "shuffle_chunks", "parallel_reads", "bn_recalibration_batches", "mixed_precision",
                                             "model_options"]
    assert ScoreConfig().to_dict()["detector"]["band_hz"] == [5.0, 15.0]
    assert "download" not in PreprocessConfig().content_dict()


def test_objects_are_frozen_hashable_picklable_values():
    """They travel to Dask workers and serve as keys: the behaviour of the frozen dataclasses they replaced."""
    c = config_from_dict({"leads": ["II", "V1"], "window": {"before_s": 0.3}})
    assert isinstance(c.leads, tuple) and c.window.before_s == 0.3 and isinstance(c.window, WindowConfig)
    assert isinstance(c.stft, StftConfig) and isinstance(c.store, StoreConfig) and isinstance(c.download, DownloadConfig)
    assert PreprocessConfig(leads=["II", "V1"], window=WindowConfig(before_s=0.3)) == c
    with pytest.raises(Exception):
        c.leads = None
    with pytest.raises(Exception):
        c.window.before_s = 1.0
    for obj in (c, ScoreConfig(), TrainConfig(model_options={"width": 32}), DetectorSpec()):
        assert pickle.loads(pickle.dumps(obj)) == obj and hash(pickle.loads(pickle.dumps(obj))) == hash(obj)
    assert len({PreprocessConfig(), PreprocessConfig(), c}) == 2
    assert ScoreConfig().detector == DetectorSpec() and detect.DetectorSpec is DetectorSpec
    assert TrainConfig(model_options={"width": 32}) != TrainConfig()


@pytest.mark.parametrize("text, where", [
    ("windw: {before_s: 1}", "windw: unknown key (expected one of: leads, lead_fallback"),
    ("window: {after: 1}", "window.after: unknown key (expected one of: before_s, after_s, align)"),
    ("store: {dtype: int8}", "store.dtype: 'int8' is not one of 'float16' or 'float32'"),
    ("stft: {nperseg: 2}", "stft.nperseg: 2 is less than the minimum of 4"),
    ("stft: {nperseg: 70000}", "stft.nperseg: 70000 is greater than the maximum of 65536"),
    ("window: {before_s: 0}", "window.before_s: 0 must be greater than 0"),
    ("unknown_symbols: keep", "unknown_symbols: 'keep' is not one of"),
    ("stft: {nperseg: 64, nfft: 32}", "stft.nfft: 32 must be >= stft.nperseg (64)"),
    ("stft: {nperseg: abc}", "stft.nperseg: expected an integer, got a string 'abc'"),
    ("window: {before_s: '0.3'}", "window.before_s: expected a number, got a string '0.3'"),
    ("download: {require_checksums: 1}", "download.require_checksums: expected true or false, got an integer 1"),
    ("window: 5", "window: expected a mapping, got an integer 5"),
    ("leads: V1", "leads: expected a list, got a string 'V1'"),
    ("leads: []", "leads: expected at least 1 item(s), got 0"),
    ("leads: ['']", "leads[0]: must not be empty"),
    ("- a list", "configuration must be a mapping, got a list"),
    ("a: [unclosed", "is not valid YAML: line 1, column 13"),
])
def test_bad_config_names_the_key(tmp_path, text, where):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert where in str(e.value) and "bad.yaml" in str(e.value)
    assert "\n" not in str(e.value), "one problem, one line"


def test_every_problem_is_listed_one_per_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("stft: {hop: 0, nperseg: 2}\nstore: {dtype: int8}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value).splitlines() == [
        f"{p}: invalid configuration:", "  stft.nperseg: 2 is less than the minimum of 4",
        "  stft.hop: 0 is less than the minimum of 1", "  store.dtype: 'int8' is not one of 'float16' or 'float32'"]


def test_score_and_train_validators(tmp_path):
    with pytest.raises(ConfigError, match=r"detector\.band_hz: low edge 15 must be below high edge 5"):
        score_config_from_dict({"detector": {"band_hz": [15, 5]}})
    with pytest.raises(ConfigError, match=r"detector\.fiducial_band_hz: expected at most 2 item\(s\), got 3"):
        score_config_from_dict({"detector": {"fiducial_band_hz": [1, 2, 3]}})
    with pytest.raises(ConfigError, match=r"detector\.band_hz\[0\]: 0 must be greater than 0"):
        score_config_from_dict({"detector": {"band_hz": [0, 2]}})
    with pytest.raises(ConfigError, match="window: unknown key"):
        score_config_from_dict({"window": {"before_s": 1}})
    with pytest.raises(ConfigError, match="epochs: expected an integer, got a boolean True"):
        train_config_from_dict({"epochs": True})
    p = tmp_path / "t.yaml"
    p.write_text("model: resnet\n")
    with pytest.raises(ConfigError, match=r"t\.yaml: invalid configuration: model: 'resnet' is not a registered model \(known: spectrogram-cnn, beat-rr-cnn, beat-template-cnn, rhythm-cnn\)"):
        load_train_config(p)
    p.write_text("epochs: 3\nmodel_options: {width: 8}\n")
    c = load_train_config(p, epochs=5, seed=None)
    assert (c.epochs, c.seed, c.model_options) == (5, 0, {"width": 8})
    with pytest.raises(ConfigError, match="epochs: 0 is less than the minimum of 1"):
        load_train_config(p, epochs=0)


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config("/nonexistent/x.yaml")
    p = tmp_path / "latin1.yaml"
    p.write_bytes("leads: [d\xe9riv\xe9e]\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.yaml is not UTF-8 text"):
        load_config(p)
    p.write_bytes("\ufeffleads: [II]\n".encode("utf-8"))  # a byte-order mark is fine
    assert load_config(p).leads == ("II",)


def test_committed_schemas_are_the_generated_ones():
    """schemas/*-config.schema.json come from the models: run `python -m ecg_pipeline.pipeline.config --write-schemas`."""
    generated = json_schemas()
    assert set(generated) == {"preprocess-config.schema.json", "train-config.schema.json", "score-config.schema.json"}
    for name, schema in generated.items():
        committed = resources.files("ecg_pipeline.schemas").joinpath(name).read_text(encoding="utf-8")
        assert committed == render_schema(schema), f"{name} is out of date: python -m ecg_pipeline.pipeline.config --write-schemas"
        assert schemas.load(name) == schema


@pytest.mark.parametrize("name, cls, from_dict, bad", [
    ("preprocess-config.schema.json", PreprocessConfig, config_from_dict,
     [{"windw": {}}, {"stft": {"nperseg": 2}}, {"leads": []}, {"window": {"before_s": 0}}, {"store": {"dtype": "x"}}]),
    ("train-config.schema.json", TrainConfig, train_config_from_dict, [{"epochs": 0}, {"model": "x"}, {"model_options": []}]),
    ("score-config.schema.json", ScoreConfig, score_config_from_dict,
     [{"window": {}}, {"piece_s": 1}, {"detector": {"band_hz": [1, 2, 3]}}, {"detector": {"threshold": 2}}]),
])
def test_schema_files_and_models_agree(name, cls, from_dict, bad):
    """What an editor checks against the file is what the job checks: defaults pass both, bad values fail both."""
    validator = jsonschema.Draft202012Validator(json_schemas()[name])
    jsonschema.Draft202012Validator.check_schema(validator.schema)
    assert not list(validator.iter_errors(cls().to_dict()))
    for data in bad:
        assert list(validator.iter_errors(data)), data
        with pytest.raises(ConfigError):
            from_dict(data)


def test_the_refit_is_ten_epochs_unless_told_to_follow_the_best_epoch():
    from ecg_pipeline.pipeline.training import refit_length

    assert TrainConfig().refit_epochs == 10
    assert TrainConfig().members == 2 and TrainConfig(members=1).members == 1
    assert train_config_from_dict({"refit": False}).members == 1  # without a refit, one model unless told
    assert load_train_config(None, "rhythm").members == 1 and load_train_config(None, "beat").members == 2
    with pytest.raises(ConfigError, match="members need refit"):
        train_config_from_dict({"members": 2, "refit": False})
    assert refit_length(TrainConfig(), 3) == 10
    assert refit_length(TrainConfig(refit_epochs=0), 3) == 3
    assert refit_length(TrainConfig(), 22) == 22  # never shorter than the best epoch
    with pytest.raises(ValueError):
        TrainConfig(refit_epochs=-1)


def test_the_example_configurations_load_as_the_readme_says():
    """configs/: the files the commands of docs/usage.md pass with --config are valid and hold what their text says."""
    from pathlib import Path

    folder = Path(__file__).resolve().parent.parent / "configs"
    context = load_config(folder / "mitdb-context.yaml")
    assert (context.window.before_s, context.window.after_s, context.window.align) == (0.9, 0.9, "annotation")
    assert (context.stft.nperseg, context.stft.hop, context.stft.max_freq_hz) == (64, 16, None)
    train = load_train_config(folder / "train-spectrogram-cnn.yaml", "beat")
    assert (train.model, train.class_weighting, train.refit, train.members) == ("spectrogram-cnn", "sqrt", False, 1)
    usage = (folder.parent / "docs" / "usage.md").read_text()
    assert all(f"configs/{p.name}" in usage for p in folder.glob("*.yaml"))
