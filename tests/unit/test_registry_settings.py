from __future__ import annotations

from pathlib import Path

import pytest

from engine.core.errors import InvalidRequestError, ModelNotFoundError, WrongTaskError
from engine.core.registry import ModelEntry, Registry
from engine.core.settings import Settings, load_settings


def test_packaged_registry_resolves_ids_and_openai_aliases() -> None:
    registry = Registry.from_settings(Settings())
    assert registry.resolve("gpt-4o-mini").id == "smollm2-135m-instruct"
    assert registry.resolve("text-embedding-ada-002").id == "all-minilm-l6-v2"
    assert registry.resolve("smollm2-135m-instruct", "chat").task == "chat"
    default = registry.default_for("embedding")
    assert default is not None and default.id == "all-minilm-l6-v2"


def test_unknown_model_names_what_exists() -> None:
    registry = Registry.from_settings(Settings())
    with pytest.raises(ModelNotFoundError) as caught:
        registry.resolve("gpt-9", "chat")
    assert "gpt-9" in caught.value.message
    assert "smollm2-135m-instruct" in caught.value.message
    assert "all-minilm" not in caught.value.message  # only models of the asked task
    assert caught.value.param == "model"


def test_wrong_task_is_refused() -> None:
    registry = Registry.from_settings(Settings())
    with pytest.raises(WrongTaskError):
        registry.resolve("text-embedding-ada-002", "chat")


def test_settings_entries_override_fields_by_id_and_add_models() -> None:
    settings = Settings(models=[
        {"id": "smollm2-135m-instruct", "dtype": "float32"},
        {"id": "mine", "task": "chat", "adapter": "models.chat:TransformersChat",
         "source": "org/model", "aliases": ["my-alias"]},
    ])
    registry = Registry.from_settings(settings)
    entry = registry.resolve("smollm2-135m-instruct")
    assert entry.dtype == "float32" and entry.gguf_file  # other fields kept
    assert registry.resolve("my-alias").source == "org/model"


def test_alias_that_shadows_an_id_is_an_error() -> None:
    entries = [
        ModelEntry(id="a", task="chat", adapter="x:Y", source="s"),
        ModelEntry(id="b", task="chat", adapter="x:Y", source="s", aliases=["a"]),
    ]
    with pytest.raises(InvalidRequestError):
        Registry(entries)


def test_invalid_registry_entry_is_reported(tmp_path: Path) -> None:
    bad = tmp_path / "models.yaml"
    bad.write_text("models:\n  - id: x\n    task: dance\n    adapter: a:B\n    source: s\n")
    with pytest.raises(InvalidRequestError) as caught:
        Registry.from_settings(Settings(registry_file=bad))
    assert "task" in caught.value.message


def test_settings_precedence_cli_over_env_over_yaml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "ember.yaml"
    config.write_text("port: 7000\nhost: 0.0.0.0\nidle_ttl_s: 30\npreload: [a]\n")
    monkeypatch.setenv("EMBER_CONFIG", str(config))
    monkeypatch.setenv("EMBER_PORT", "7100")
    settings = load_settings()
    assert (settings.port, settings.host, settings.idle_ttl_s) == (7100, "0.0.0.0", 30)
    assert settings.preload == ["a"]
    assert load_settings(port=7200, host=None).port == 7200


def test_settings_env_lists_and_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBER_PRELOAD", "a, b")
    monkeypatch.setenv("EMBER_DATA_DIR", "/tmp/ember-data")
    settings = load_settings()
    assert settings.preload == ["a", "b"]
    assert settings.data_dir == Path("/tmp/ember-data")
    with pytest.raises(ValueError):
        Settings(dtype="float8")


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        load_settings(config=tmp_path / "absent.yaml")
    assert "absent.yaml" in caught.value.message


def test_json_depth_counts_nesting_outside_strings() -> None:
    from engine.core.limits import json_depth

    assert json_depth(b'{"a": 1}') == 1
    assert json_depth(b'{"a": [[1], {"b": [2]}]}') == 4
    assert json_depth(b'{"a": "[[[[{{{{", "b": "\\"]]]"}') == 1
    assert json_depth(b"3") == 0
