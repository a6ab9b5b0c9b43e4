"""The code blocks of README.md and docs/*.md run, so the docs cannot drift from the code.

Every ```python block, and every `ldm ...` / `python -m latentdiffusion ...` line of a ```bash / ```sh / ```console
block, runs on a tiny model: a random-weight model of the demo's architecture saved where `make demo` puts its model
(`outputs/demo/ldm`), beside the input images the blocks name, in a fresh folder per page. The blocks of a page run
in order, in one Python namespace and folder (a later block uses what an earlier one made), so select a whole page
with `-k`. What would take long is cut by the explicit table below (sampling steps, training steps). A block marked
`<!-- docs-test: skip (reason) -->` on the line before it (full-size weights, CUDA) is reported as skipped with that
reason. Shell blocks (each command loads its models afresh) and every block after a page's first training command
are marked slow. The ```-fenced synopses without a language (`ldm sample --model MODEL ... [--steps N]`) do not run;
their subcommands and options are checked against the parser instead.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from latentdiffusion import LatentDiffusion, LatentDiffusionConfig
from latentdiffusion.cli import build_parser, main
from latentdiffusion.config import from_dict, load_yaml
from tiny import one_thread  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP = re.compile(r"<!--\s*docs-test:\s*skip\s*\((.+)\)\s*-->")
FENCE = re.compile(r"^```(\w*)\s*$")
SHELL = {"bash", "sh", "shell", "console"}

# What the test changes in a block, and why: a few steps instead of the real counts.
PYTHON_SUBSTITUTIONS = [
    (re.compile(r"\bnum_inference_steps=\d+"), "num_inference_steps=2"),
    (re.compile(r"\bupscale_steps=\d+"), "upscale_steps=2"),
]
TRAINING = ["--max-steps", "2", "--batch-size", "2", "--checkpoint-every", "2", "--set", "train.sample_every=0"]
CLI_APPENDED = {  # appended to an `ldm` command line (argparse takes the last value of an option)
    "sample": ["--steps", "2", "--upscale-steps", "2", "--no-progress"],
    "upscale": ["--steps", "2"],
    "train-vae": TRAINING,
    "train": [*TRAINING, "train.cache_latents=false"],  # caching 10,000 images' latents is not a 2-step run
    "train-controlnet": TRAINING,
    "train-upscaler": TRAINING,
}
CLI_PREFIXES = ("ldm ", "python -m latentdiffusion ")


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    skip: str | None  # the reason given in the marker, or None

    @property
    def id(self) -> str:
        return f"{self.page.name}:{self.line}"

    def commands(self) -> list[list[str]]:
        """The `ldm` command lines of a shell block as argv lists (continuations joined, comments and `$ ` dropped)."""
        lines = [line[2:] if line.startswith("$ ") else line for line in self.code.replace("\\\n", " ").splitlines()]
        found = []
        for line in lines:
            line = line.strip()
            for prefix in CLI_PREFIXES:
                if line.startswith(prefix):
                    found.append(shlex.split(line[len(prefix):], comments=True))
        return found

    @property
    def trains(self) -> bool:
        return any(argv and argv[0].startswith("train") for argv in self.commands()) if self.lang in SHELL else False


def page_blocks(page: Path) -> list[Block]:
    """The runnable blocks of a page: Python blocks, and shell blocks with at least one `ldm` command."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if fence is None:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = SKIP.search(before)
        block = Block(page, i + 1, fence.group(1), "\n".join(lines[i + 1:end]) + "\n",
                      marker.group(1) if marker else None)
        if block.lang == "python" or (block.lang in SHELL and block.commands()):
            blocks.append(block)
        i = end + 1
    return blocks


def cases() -> list:
    params = []
    for page in PAGES:
        trained = False
        for block in page_blocks(page):
            trained = trained or (block.trains and block.skip is None)
            slow = trained or block.lang in SHELL
            params.append(pytest.param(block, id=block.id, marks=[pytest.mark.slow] if slow else []))
    return params


def demo_architecture() -> LatentDiffusionConfig:
    """The model `ldm demo` trains (configs/vae-tiny.yaml's VAE, configs/ldm-tiny.yaml's UNet and text encoder)."""
    vae, ldm = load_yaml(ROOT / "configs" / "vae-tiny.yaml"), load_yaml(ROOT / "configs" / "ldm-tiny.yaml")
    return from_dict(LatentDiffusionConfig, {**ldm["model"], "vae": vae["model"]["vae"]}, "model")


@pytest.fixture(scope="session")
def base_folder(tmp_path_factory) -> Path:
    """A random-weight model of the demo's architecture where `make demo` saves its model, and the inputs the blocks
    name: in.png, mask.png (white = repaint), edges.png (a control image), low.png (an upscaler's input)."""
    folder = tmp_path_factory.mktemp("docs-base")
    torch.manual_seed(0)
    LatentDiffusion.from_config(demo_architecture()).save_pretrained(folder / "outputs" / "demo" / "ldm")
    image = Image.new("RGB", (32, 32), "white")
    ImageDraw.Draw(image).ellipse((6, 6, 26, 26), fill="red")
    image.save(folder / "in.png")
    image.save(folder / "low.png")
    mask = Image.new("L", (32, 32), 0)
    ImageDraw.Draw(mask).rectangle((8, 8, 24, 24), fill=255)
    mask.save(folder / "mask.png")
    edges = Image.new("RGB", (32, 32), "black")
    ImageDraw.Draw(edges).ellipse((6, 6, 26, 26), outline="white", width=2)
    edges.save(folder / "edges.png")
    return folder


@pytest.fixture(scope="session")
def workspaces(base_folder, tmp_path_factory) -> dict[Path, tuple[Path, dict]]:
    """Per page: a folder with the base's files (the model linked, the images copied, configs/ linked) and the
    namespace its Python blocks share, made on first use."""
    made: dict[Path, tuple[Path, dict]] = {}

    def workspace(page: Path) -> tuple[Path, dict]:
        if page not in made:
            folder = tmp_path_factory.mktemp(page.stem)
            for name in ("in.png", "low.png", "mask.png", "edges.png"):
                shutil.copy(base_folder / name, folder / name)
            (folder / "outputs").symlink_to(base_folder / "outputs", target_is_directory=True)
            (folder / "configs").symlink_to(ROOT / "configs", target_is_directory=True)
            made[page] = (folder, {"__name__": f"docs_{page.stem}"})
        return made[page]

    return workspace


def run_python(block: Block, namespace: dict) -> None:
    code = block.code
    for pattern, replacement in PYTHON_SUBSTITUTIONS:
        code = pattern.sub(replacement, code)
    exec(compile(code, str(block.id), "exec"), namespace)


def run_cli(argv: list[str], capsys) -> None:
    argv = [*argv, *CLI_APPENDED.get(argv[0], [])]
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse
        code = exit.code
    err = capsys.readouterr().err
    assert code == 0, f"ldm {shlex.join(argv)} exited {code}: {err.strip()[-2000:]}"


@pytest.mark.parametrize("block", cases())
def test_docs_block_runs(block: Block, workspaces, capsys):
    if block.skip is not None:
        pytest.skip(f"{block.id}: {block.skip}")
    folder, namespace = workspaces(block.page)
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        if block.lang == "python":
            run_python(block, namespace)
        else:
            for argv in block.commands():
                run_cli(argv, capsys)
    finally:
        os.chdir(cwd)


def test_skip_markers_give_a_reason_and_precede_a_block():
    """A marker that names no reason, or sits before no code block, would skip silently or not at all."""
    for page in PAGES:
        lines = page.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if "docs-test" in line:
                assert SKIP.search(line) and SKIP.search(line).group(1).strip(), f"{page.name}:{i + 1}: {line}"
                following = next(x for x in lines[i + 1:] if x.strip())
                assert FENCE.match(following), f"{page.name}:{i + 1}: the marker precedes no code block"


def test_the_readme_links_every_page():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"docs/{page.name}" in readme, page.name
    assert len(readme.splitlines()) <= 300


def synopsis_lines() -> list[tuple[str, str]]:
    """(page:line, command line) of every `ldm` line in a ``` block without a language (the synopses)."""
    found = []
    for page in PAGES:
        lines = page.read_text(encoding="utf-8").splitlines()
        inside = None
        for i, line in enumerate(lines):
            fence = FENCE.match(line)
            if line.startswith("```"):
                inside = None if inside is not None else (fence.group(1) if fence else "?")
                continue
            if inside == "" and line.strip().startswith("ldm "):
                found.append((f"{page.name}:{i + 1}", line.strip()))
    return found


def test_synopses_name_real_subcommands_and_options():
    """The synopses cannot run (MODEL, [--steps N], ...), but each subcommand and --option they name must exist."""
    subcommands = next(a for a in build_parser()._actions if a.choices and "sample" in a.choices).choices
    checked = 0
    for where, line in synopsis_lines():
        words = line.split("#")[0].split()
        command = words[1] if len(words) > 1 and not words[1].startswith("-") else None
        if command is None or command.endswith(":"):  # a message the command prints, not a command
            continue
        options = [w.strip("[]").split("=")[0] for w in words[2:] if w.strip("[").startswith("--")]
        assert command in subcommands, f"{where}: no subcommand {command!r}: {line}"
        known = subcommands[command]._option_string_actions
        for option in options:
            assert option in known or option == "--debug", f"{where}: ldm {command} has no {option}: {line}"
        checked += 1
    assert checked >= 10


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_the_pages_resolve():
    """Every relative link of README.md and docs/*.md names a file that exists, and its #anchor a heading there."""
    link = re.compile(r"\]\(([^)\s]+)\)")
    for page in [*PAGES, ROOT / "CHANGELOG.md"]:
        for target in link.findall(page.read_text(encoding="utf-8")):
            if "://" in target:
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            assert file.exists(), f"{page.name}: {target} names no file"
            if anchor:
                headings = [slug(h) for h in re.findall(r"^#+ (.+)$", file.read_text(encoding="utf-8"), re.M)]
                assert anchor in headings, f"{page.name}: {target}: no such heading in {file.name}"
