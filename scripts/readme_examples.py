"""The README's service examples, answered by the real service.

Writes the example images (real Fashion-MNIST test images, as PNG files),
starts the app in-process (FastAPI's TestClient) on the shipped bundle, sends
the requests that README.md's "The service" section (and service/README.md)
show, and prints each answer as the README shows it, under its marker:

    <!-- readme-answer: NAME -->
    ```json
    ...
    ```

tests/test_readme_answers.py re-runs the requests and checks that the READMEs
show exactly these answers (floats to 1e-6) and these requests, so they
cannot go stale.  After a change of model or service:

    .venv/bin/python scripts/readme_examples.py --update-readme

rewrites the answer blocks of README.md and service/README.md in place
(nothing else).  With
``--images DIR`` the example images are kept in DIR, to try the README's curl
commands against a running server (`bash scripts/run.sh`).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from unittest import mock
from urllib.parse import urlsplit

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BUNDLE = ROOT / "bundles" / "fmnist-default"
DIGITS = 6  # decimals shown in the README's JSON answers

# Fashion-MNIST test images (index into the test split) and the file each becomes.
IMAGES = {"shirt.png": 92, "ankle_boot.png": 0}
# A 4:3 "photo" for resize: the ankle boot's rows 3-23 (the boot fills the
# width, a black margin above and below), 4x larger: 112x84 pixels.
WIDE = "ankle_boot_wide.png"


def write_images(folder: Path) -> dict[str, Path]:
    """The example image files, written into ``folder``; {name: path}."""
    from PIL import Image

    from pathguard.detector.data import load_dataset

    folder.mkdir(parents=True, exist_ok=True)
    test = load_dataset("fashion-mnist", "test")
    pixels = {name: np.rint(test.images[i, 0].numpy() * 255).astype(np.uint8) for name, i in IMAGES.items()}
    pixels[WIDE] = np.kron(pixels["ankle_boot.png"][3:24], np.ones((4, 4), dtype=np.uint8))  # nearest neighbour
    paths = {}
    for name, array in pixels.items():
        paths[name] = folder / name
        Image.fromarray(array, "L").save(paths[name], "PNG")
    return paths


# ------------------------------------------------------------- the examples

PYTHON_SNIPPET = '''\
import httpx

with open("shirt.png", "rb") as f:
    r = httpx.post("http://127.0.0.1:8000/detect", files=[("files", ("shirt.png", f, "image/png"))])
for result in r.json()["results"]:
    print(f"{result['filename']}: {result['label']} ({result['confidence']:.3f}), "
          f"adversarial={result['adversarial']}, score {result['score']:.3f} "
          f"(threshold {result['threshold']:.3f})")
'''


def _detect_multipart(client, folder: Path):
    files = [("files", (name, (folder / name).read_bytes(), "image/png")) for name in ("shirt.png", "ankle_boot.png")]
    return _ok(client.post("/detect", files=files))


def _detect_json_resize(client, folder: Path):
    data = base64.b64encode((folder / WIDE).read_bytes()).decode()
    return _ok(client.post("/detect", json={"images": [{"data": data, "filename": WIDE}], "resize": True}))


def _docs_example(client, folder: Path):
    """The JSON body of /docs' example (schemas.EXAMPLE_DETECT_REQUEST), as it stands."""
    from pathguard.service.schemas import EXAMPLE_DETECT_REQUEST

    return _ok(client.post("/detect", json=EXAMPLE_DETECT_REQUEST))


SERVICE_JSON_SHOWN = """\
{"images": [{"data": "<base64 of shirt.png>", "filename": "shirt.png"}],
 "resize": false, "resize_mode": "pad", "include_path": false}"""


def _python_snippet(client, folder: Path) -> str:
    """The snippet's printed output, with its httpx.post sent to the app."""
    def post(url, **kwargs):
        return client.post(urlsplit(url).path, **kwargs)

    out = io.StringIO()
    with mock.patch("httpx.post", post), contextlib.chdir(folder), contextlib.redirect_stdout(out):
        exec(compile(PYTHON_SNIPPET, "README python example", "exec"), {"__name__": "__readme__"})
    return out.getvalue()


def _ok(response):
    if response.status_code != 200:
        raise RuntimeError(f"{response.request.method} {response.request.url}: {response.status_code} {response.text}")
    return response.json()


@dataclass(frozen=True)
class Example:
    name: str          # the marker: <!-- readme-answer: NAME -->
    shown: str         # what the README shows for the request (a command or code), verbatim
    kind: str          # "json" (compared field by field, floats to 1e-6) or "text" (exactly)
    ask: Callable      # (client, image folder) -> the answer
    readme: str = "README.md"  # the file that shows it, relative to the repository root


EXAMPLES = (
    Example("detect", "curl -s -F files=@shirt.png -F files=@ankle_boot.png http://127.0.0.1:8000/detect",
            "json", _detect_multipart),
    Example("detect-resize",
            "curl -s -H 'Content-Type: application/json' \\\n"
            f"     -d \"{{\\\"images\\\": [{{\\\"data\\\": \\\"$(base64 -w0 {WIDE})\\\", "
            f"\\\"filename\\\": \\\"{WIDE}\\\"}}], \\\"resize\\\": true}}\" \\\n"
            "     http://127.0.0.1:8000/detect",
            "json", _detect_json_resize),
    Example("python", PYTHON_SNIPPET, "text", _python_snippet),
    Example("service-json", SERVICE_JSON_SHOWN, "json", _docs_example, readme="service/README.md"),
)
READMES = tuple(dict.fromkeys(ex.readme for ex in EXAMPLES))


def run_examples(folder: Path, bundle: Path = BUNDLE) -> dict[str, object]:
    """{name: answer} of every example, from the real app on ``bundle``."""
    import torch
    from fastapi.testclient import TestClient

    from pathguard.service.app import create_app
    from pathguard.service.settings import Settings

    torch.set_num_threads(1)
    write_images(folder)
    with TestClient(create_app(Settings(bundle=bundle, torch_threads=1))) as client:
        return {ex.name: ex.ask(client, folder) for ex in EXAMPLES}


# ------------------------------------------------------------- formatting

def _rounded(value):
    if isinstance(value, float):
        return round(value, DIGITS)
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


def _pack(items: list[str], indent: str, width: int = 100) -> list[str]:
    """``items`` joined by ", " into lines of at most ``width`` characters."""
    lines, line = [], ""
    for item in items:
        if line and len(indent) + len(line) + 2 + len(item) > width:
            lines.append(line + ",")
            line = item
        else:
            line = f"{line}, {item}" if line else item
    return [indent + text for text in lines + [line]]


def _entries(mapping: dict, indent: str, width: int = 100) -> list[str]:
    """``"key": value`` items for _pack; a list too long for one line is
    split into its elements (_pack's ", " is also JSON's list separator)."""
    items = []
    for key, value in mapping.items():
        item = f"{json.dumps(key)}: {json.dumps(value)}"
        if isinstance(value, list) and len(value) > 1 and len(indent) + len(item) + 1 > width:
            parts = [json.dumps(v) for v in value]
            parts[0], parts[-1] = f"{json.dumps(key)}: [{parts[0]}", parts[-1] + "]"
            items += parts
        else:
            items.append(item)
    return items


def format_json(answer: dict) -> str:
    """A /detect answer as the README shows it: floats rounded to DIGITS
    decimals, one result per block of lines."""
    answer = _rounded(answer)
    out = ['{"results": [']
    for i, result in enumerate(answer["results"]):
        flat = {k: v for k, v in result.items() if not isinstance(v, dict)}
        lines = _pack(_entries(flat, "   "), "   ")
        lines[0] = "  {" + lines[0][3:]
        for key, nested in ((k, v) for k, v in result.items() if isinstance(v, dict)):  # e.g. evidence
            lines[-1] += ","
            inner = _pack(_entries(nested, "    "), "    ")
            lines += [f"   {json.dumps(key)}: {{"] + inner
            lines[-1] += "}"
        lines[-1] += "}" + ("," if i < len(answer["results"]) - 1 else "")
        out += lines
    rest = [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in answer.items() if k != "results"]
    out[-1] += "],"
    out += [f" {item}," for item in rest]
    out[-1] = out[-1].rstrip(",") + "}"
    return "\n".join(out)


def format_answer(example: Example, answer) -> str:
    """The README's block for ``answer``: marker, fence, body, fence."""
    body = format_json(answer) if example.kind == "json" else answer.rstrip("\n")
    return f"<!-- readme-answer: {example.name} -->\n```{example.kind}\n{body}\n```"


# ------------------------------------------------------------- the README

MARKER = re.compile(r"^<!--\s*readme-answer:\s*(?P<name>[\w-]+)\s*-->\s*$")


def readme_answers(text: str) -> dict[str, tuple[str, str, tuple[int, int]]]:
    """{name: (fence info, block body, (first line, last line) of marker..fence)}
    of every answer block of a README (0-based line numbers, inclusive)."""
    lines = text.splitlines()
    found = {}
    for i, line in enumerate(lines):
        match = MARKER.match(line.strip())
        if not match:
            continue
        start = i + 1
        if start >= len(lines) or not lines[start].startswith("```"):
            raise ValueError(f"README line {i + 1}: the answer marker must be followed by a ``` block")
        end = next((j for j in range(start + 1, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            raise ValueError(f"README line {start + 1}: the answer block is not closed")
        name = match.group("name")
        if name in found:
            raise ValueError(f"README line {i + 1}: a second answer block {name!r}")
        found[name] = (lines[start][3:].strip(), "\n".join(lines[start + 1:end]), (i, end))
    return found


def update_readme(answers: dict[str, object], readme: str = "README.md", path: Path | None = None) -> list[str]:
    """Rewrite the answer blocks of ``readme`` (at ``path``, by default the
    repository's); the names of those that changed."""
    path = path or ROOT / readme
    examples = [ex for ex in EXAMPLES if ex.readme == readme]
    text = path.read_text()
    blocks = readme_answers(text)
    missing = [ex.name for ex in examples if ex.name not in blocks]
    if missing:
        raise SystemExit(f"{path}: no answer block for {', '.join(missing)} "
                         f"(add '<!-- readme-answer: NAME -->' and a ``` block under it)")
    lines = text.splitlines()
    changed = []
    for ex in sorted(examples, key=lambda e: blocks[e.name][2][0], reverse=True):
        first, last = blocks[ex.name][2]
        new = format_answer(ex, answers[ex.name]).splitlines()
        if lines[first:last + 1] != new:
            changed.append(ex.name)
            lines[first:last + 1] = new
    path.write_text("\n".join(lines) + ("\n" if text.endswith("\n") else ""))
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, help="write the example images here (default: a temporary folder)")
    parser.add_argument("--bundle", type=Path, default=BUNDLE)
    parser.add_argument("--update-readme", action="store_true",
                        help=f"rewrite the answer blocks of {' and '.join(READMES)}")
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        folder = args.images or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        answers = run_examples(folder.resolve(), args.bundle)
    for ex in EXAMPLES:
        print(f"[{ex.readme}]\n{ex.shown.rstrip()}")
        print(format_answer(ex, answers[ex.name]), end="\n\n")
    if args.update_readme:
        for readme in READMES:
            changed = update_readme(answers, readme)
            print(f"{readme}: {'updated ' + ', '.join(changed) if changed else 'already up to date'}", file=sys.stderr)
    if args.images:
        print(f"example images in {args.images}: {', '.join(sorted([*IMAGES, WIDE]))}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
