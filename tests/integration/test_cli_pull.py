"""`ember pull`: packaged weights need no download; a Hub preset is fetched (here offline, so
it fails with a clear message and a non-zero exit, never a traceback)."""

from __future__ import annotations

import os
import subprocess
import sys


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "ember.cli", *args], capture_output=True,
                          text=True, env=env, timeout=120, check=False)


def test_pull_of_packaged_weights_says_nothing_to_pull() -> None:
    result = run_cli("pull", "whisper-1")
    assert result.returncode == 0
    assert "whisper-base: weights come from package:" in result.stdout
    assert "nothing to pull" in result.stdout


def test_pull_of_a_hub_preset_offline_fails_clearly() -> None:
    result = run_cli("pull", "sd-turbo")
    assert result.returncode == 2
    assert "could not download stabilityai/sd-turbo" in result.stderr
    assert "Traceback" not in result.stderr


def test_pull_of_an_unknown_model_names_what_exists() -> None:
    result = run_cli("pull", "no-such-model")
    assert result.returncode == 2 and "sd-turbo" in result.stderr
