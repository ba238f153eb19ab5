"""Config validation: one schema, clear messages, the same defaults as Snakemake's validate()."""

from __future__ import annotations

import copy

import pytest
import yaml

from qk_sniffer.config import SCHEMA_PATH, ConfigError, load_config, sanitize_split, split_name, validate_config

MINIMAL = {"dataset": {"path": "json"}, "model": {"name": "org/model"}}


def with_(**sections):
    raw = copy.deepcopy(MINIMAL)
    for k, v in sections.items():
        raw.setdefault(k, {}).update(v)
    return raw


@pytest.mark.parametrize(
    "raw,message",
    [
        (with_(capture={"min_bucket_sise": 4}), "unknown key 'capture.min_bucket_sise'. Did you mean 'min_bucket_size'?"),
        (with_(capture={"min_bucket_size": 0}), "capture.min_bucket_size: 0 is too small; it must be >= 1"),
        (with_(capture={"min_bucket_size": "big"}), "capture.min_bucket_size: 'big' has the wrong type; expected integer"),
        (with_(capture={"sampler": {"type": "loguniform"}}),
         "capture.sampler.type: 'loguniform' is not allowed; choose one of ['log_uniform', 'uniform', 'all']"),
        (with_(capture={"sampler": {"base_rate": 0}}), "capture.sampler.base_rate: 0 is too small; it must be > 0"),
        (with_(tokenizer={"max_length": 0}), "tokenizer.max_length: 0 is too small; it must be >= 1"),
        (with_(capture={"layers": "0,1"}), "capture.layers: '0,1' has the wrong type; expected array or null"),
        (with_(capture={"vector_dtype": "bfloat16"}), "capture.vector_dtype: 'bfloat16' is not allowed"),
        ({"model": {"name": "x"}}, "<top level>: 'dataset' is a required property; add it to the config."),
        (with_(outptu={}), "unknown key 'outptu'. Did you mean 'output'?"),
    ],
)
def test_bad_values_are_named(raw, message):
    with pytest.raises(ConfigError) as err:
        validate_config(raw)
    assert message in str(err.value)


def test_defaults_filled_and_input_untouched():
    raw = with_()
    cfg = validate_config(raw)
    assert raw == with_()
    assert cfg["capture"]["sampler"] == {"type": "log_uniform", "base_rate": 1.0, "seed": 0, "per_head": False}
    assert cfg["capture"]["min_bucket_size"] == 128 and cfg["tokenizer"]["max_length"] == 4096
    assert cfg["workflow"] == {"num_chunks": 1, "chunk_size": None, "gpus_per_chunk": 1}
    assert cfg["output"]["hf_branch"] == "main" and cfg["output"]["hf_repo_id"] is None


def test_defaults_match_snakemake_validate():
    from snakemake.utils import validate

    raw = with_(capture={"sampler": {"seed": 3}})
    ours = validate_config(raw)
    theirs = copy.deepcopy(raw)
    validate(theirs, str(SCHEMA_PATH), set_default=True)
    assert theirs == ours


def test_load_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(MINIMAL))
    assert load_config(good)["model"]["name"] == "org/model"


def test_split_names():
    assert sanitize_split("meta/llama3-8b") == "meta_llama3_8b"
    assert split_name(validate_config(with_(output={"split_name": "custom_1"}))) == "custom_1"
    with pytest.raises(ConfigError, match="output.split_name"):
        split_name(validate_config(with_(output={"split_name": "has-dash"})))


@pytest.mark.parametrize("path", ["config/config.yaml", "config/gemma3.yaml", "config/llama.yaml", "config/qwen3.yaml"])
def test_shipped_configs_validate(path):
    from .support.tiny_data import REPO

    cfg = load_config(REPO / path)
    assert cfg["dataset"]["path"] and cfg["model"]["name"]


def test_config_readme_documents_every_schema_key():
    """config/README.md has a section per schema section and a row for every key in it."""
    from .support.tiny_data import REPO

    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    text = (REPO / "config/README.md").read_text()

    def keys(props: dict, prefix: str = ""):  # leaf keys, nested ones dotted (sampler.type)
        for name, sub in props.items():
            if isinstance(sub, dict) and "properties" in sub:
                yield from keys(sub["properties"], prefix + name + ".")
            else:
                yield prefix + name

    missing = []
    for section, body in schema["properties"].items():
        if f"## {section}" not in text:
            missing.append(f"section {section}")
        missing += [k for k in keys(body.get("properties", {})) if f"| `{k}` |" not in text]
    assert not missing, f"config/README.md does not document: {missing}"
