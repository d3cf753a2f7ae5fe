"""docs/ci.md: the commands of the GitHub Actions and GitLab CI jobs run as written."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from tests.conftest import REPO

DOC = open(os.path.join(REPO, "docs", "ci.md"), encoding="utf-8").read()
BLOCKS = dict(zip(("github", "gitlab"), re.findall(r"```yaml\n(.*?)```", DOC, re.S)))


def _commands(block: str) -> list[str]:
    lines = [re.sub(r"^\s*(- )?", "", ln) for ln in block.splitlines()]
    return [ln for ln in lines if ln.startswith(("pwgroup ", "cat "))]


def _model(block: str) -> str:
    return re.search(r'PWGROUP_MODEL: "([^"]+)"', block).group(1)


@pytest.mark.parametrize("job", ["github", pytest.param("gitlab", marks=pytest.mark.slow)])
def test_ci_job_commands_run_as_documented(job, tmp_path):
    block = BLOCKS[job]
    assert 'pip install "pwgroup[cpu,keras,html]"' in block
    commands = _commands(block)
    assert len(commands) == 2 and "--fail-under 80" in commands[0]
    summary = tmp_path / "summary.md"
    env = dict(os.environ, PWGROUP_MODEL=_model(block), GITHUB_STEP_SUMMARY=str(summary))
    for command in commands:
        proc = subprocess.run(
            ["bash", "-c", command],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "pwgroup.json").read_text())
    assert data["totals"]["trainable_params_after"] == 639_702
    assert "data:image/png;base64," in (tmp_path / "pwgroup.html").read_text()
    if job == "github":
        assert "Trainable parameters reduced by 84.09%" in summary.read_text()
    failing = commands[0].replace("--fail-under 80", "--fail-under 90")
    proc = subprocess.run(
        ["bash", "-c", failing], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().endswith("below --fail-under 90%")
