"""The READMEs' service examples show what the service really answers.

scripts/readme_examples.py holds the examples of README.md's "The service"
section and of service/README.md: the request as the README shows it, and
how to send it.  This test sends each one to the real app (in-process, on
the shipped bundle, with the script's real Fashion-MNIST image files) and
compares the answer with the block under ``<!-- readme-answer: NAME -->`` in
that README: every field, floats to 1e-6 (the READMEs round them to 6
decimals).  When the model or the
service changes, ``.venv/bin/python scripts/readme_examples.py
--update-readme`` rewrites the blocks.

It also checks that the README shows each request verbatim, that the Python
example printed is the one run here, and that the container instructions
set CONTAINERS_CONF before any podman command (podman here fails with
'error setting rlimits' without docker/containers.conf).
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
FLOAT_TOL = 1e-6


def _load_script():
    name = "readme_examples"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "readme_examples.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the class is made
        spec.loader.exec_module(module)
    return sys.modules[name]


rx = _load_script()


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> dict:
    return rx.run_examples(tmp_path_factory.mktemp("readme-images"))


@pytest.fixture(scope="module")
def shown() -> dict:
    """{readme: its answer blocks}"""
    return {readme: rx.readme_answers((ROOT / readme).read_text()) for readme in rx.READMES}


def assert_same(shown, live, where: str = "answer") -> None:
    """Equal JSON values; floats (and ints standing for floats) to FLOAT_TOL."""
    if isinstance(live, bool) or live is None or isinstance(live, str):
        assert shown == live and type(shown) is type(live), f"{where}: README shows {shown!r}, service says {live!r}"
    elif isinstance(live, (int, float)):
        assert isinstance(shown, (int, float)) and not isinstance(shown, bool), f"{where}: {shown!r} vs {live!r}"
        if isinstance(live, int):
            assert shown == live and isinstance(shown, int), f"{where}: README shows {shown!r}, service says {live!r}"
        else:
            assert math.isclose(shown, live, rel_tol=0, abs_tol=FLOAT_TOL), \
                f"{where}: README shows {shown!r}, service says {live!r}"
    elif isinstance(live, list):
        assert isinstance(shown, list) and len(shown) == len(live), f"{where}: {shown!r} vs {live!r}"
        for i, (s, v) in enumerate(zip(shown, live)):
            assert_same(s, v, f"{where}[{i}]")
    elif isinstance(live, dict):
        assert isinstance(shown, dict), f"{where}: README shows {shown!r}, service says {live!r}"
        assert list(shown) == list(live), f"{where}: README shows fields {list(shown)}, service {list(live)}"
        for key in live:
            assert_same(shown[key], live[key], f"{where}.{key}")
    else:  # pragma: no cover
        raise TypeError(type(live))


@pytest.mark.parametrize("example", rx.EXAMPLES, ids=lambda ex: ex.name)
def test_readme_shows_the_live_answer(example, live, shown):
    assert example.name in shown[example.readme], \
        f"{example.readme} has no block '<!-- readme-answer: {example.name} -->'"
    info, body, _ = shown[example.readme][example.name]
    assert info == example.kind
    if example.kind == "json":
        assert_same(json.loads(body), live[example.name], example.name)
    else:
        assert body == live[example.name].rstrip("\n")


@pytest.mark.parametrize("example", rx.EXAMPLES, ids=lambda ex: ex.name)
def test_readme_shows_the_request_that_was_sent(example):
    assert example.shown.rstrip("\n") in (ROOT / example.readme).read_text(), \
        f"{example.readme} does not show the request of example {example.name!r} verbatim:\n{example.shown}"


def test_readme_answers_are_the_expected_examples(live):
    """The examples say what the README says of them: the named class, not flagged."""
    detect = live["detect"]["results"]
    assert [(r["filename"], r["label"], r["adversarial"], r["resized"]) for r in detect] == [
        ("shirt.png", "Shirt", False, False), ("ankle_boot.png", "Ankle boot", False, False)]
    (wide,) = live["detect-resize"]["results"]
    assert (wide["label"], wide["adversarial"], wide["resized"]) == ("Ankle boot", False, True)
    assert live["python"].startswith("shirt.png: Shirt (")
    (docs_example,) = live["service-json"]["results"]  # /docs' example is shirt.png, alone in its batch
    shirt = live["detect"]["results"][0]
    assert {k: v for k, v in docs_example.items() if not isinstance(v, (float, list))} == \
        {k: v for k, v in shirt.items() if not isinstance(v, (float, list))}
    assert docs_example["score"] == pytest.approx(shirt["score"], abs=1e-4)


def test_formatted_answers_parse_back(live):
    for ex in rx.EXAMPLES:
        block = rx.format_answer(ex, live[ex.name])
        info, body, _ = rx.readme_answers(block)[ex.name]
        if ex.kind == "json":
            assert_same(json.loads(body), live[ex.name], ex.name)
            assert all(len(line) <= 100 for line in body.splitlines())


def test_update_readme_rewrites_only_the_answer_blocks(live, tmp_path):
    text = README.read_text()
    lines = text.splitlines()
    first, _ = rx.readme_answers(text)["detect"][2]
    lines[first + 3] = lines[first + 3].replace('"index": 0', '"index": 7')  # a stale answer
    copy = tmp_path / "README.md"
    copy.write_text("\n".join(lines) + "\n")
    assert rx.update_readme(live, "README.md", copy) == ["detect"]
    assert rx.update_readme(live, "README.md", copy) == []
    assert copy.read_text() == text  # this README is up to date (the test above), and nothing else moved


def _section(text: str, heading: str) -> str:
    start = text.index(f"\n{heading}\n")
    level = heading.split()[0]
    following = re.search(rf"\n#{{1,{len(level)}}} ", text[start + len(heading) + 2:])
    return text[start: start + len(heading) + 2 + (following.start() if following else len(text))]


def test_container_instructions_set_containers_conf_before_podman():
    section = _section(README.read_text(), "### Container")
    commands = "\n".join(re.findall(r"```bash\n(.*?)```", section, re.S)).splitlines()
    podman = [i for i, line in enumerate(commands) if re.match(r"\s*(podman|bash docker/build\.sh)\b", line)]
    conf = [i for i, line in enumerate(commands) if "CONTAINERS_CONF=" in line and "docker/containers.conf" in line]
    assert podman and any(line.startswith("podman run") for line in commands)
    assert conf and conf[0] < podman[0], "CONTAINERS_CONF must be set before the first podman command"
    assert re.search(r"export CONTAINERS_CONF=\$PWD/docker/containers\.conf", "\n".join(commands))
    assert (ROOT / "docker" / "containers.conf").is_file()
    # what tests/test_container.py does: every podman call with that CONTAINERS_CONF (the image and
    # its environment come from the citest_image fixture of tests/conftest.py)
    container_test = (ROOT / "tests" / "test_container.py").read_text()
    assert "citest_image" in container_test and "env=podman_env" in container_test
    fixtures = (ROOT / "tests" / "conftest.py").read_text()
    assert 'CONTAINERS_CONF=str(REPO_ROOT / "docker" / "containers.conf")' in fixtures
