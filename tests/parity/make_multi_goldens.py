#!/usr/bin/env python3.11
"""Regenerate the multi-stage parity goldens (`recipes/multi_*.yml`) with mergekit-multi 0.1.5.

A multi-stage recipe is one YAML document per stage (mergekit-multi's format). Each recipe runs
in an empty working directory holding only `models -> tests/parity/models` (a symlink), so that
the recipe's `./models/...` references and the intermediate folder are relative paths, which
mergekit-multi writes into the later stages' `mergekit_config.yml` and cards:

    cd <tmp> && PYTHONHASHSEED=0 ... setarch <machine> -R \
      mergekit-multi <recipe> -I ./stages [--out-path <recipe>]

(`--out-path` only when the recipe has an unnamed document, the final stage.) The working
directory, less the symlink, becomes `goldens/0.1.5/<recipe>/`:

    goldens/0.1.5/<recipe>/<recipe>/        the final (unnamed) stage's model folder
    goldens/0.1.5/<recipe>/stages/<name>/   each named stage's model folder

A run that fails leaves only `goldens/0.1.5/<recipe>/REFUSED.txt`. Same environment and side
venv as make_goldens.py (run that first for the venv and models/). Not run by CI.

    python3.11 tests/parity/make_multi_goldens.py [--only multi_two_stage]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from make_goldens import GOLDENS, MODELS, RECIPES, exception_line, no_aslr_prefix, run_env, venv_python

VERSION = "0.1.5"  # the release whose mergekit-multi the goldens come from
PREFIX = "multi_"  # recipes of this name are multi-stage (make_goldens.py leaves them out)
INTERMEDIATE = "./stages"


def multi_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES.glob(f"{PREFIX}*.yml"))


def has_final(recipe: str) -> bool:
    """Whether a document has no top-level `name:` (mergekit-multi then needs --out-path).
    Plain text (this script runs on the system python, without PyYAML): documents are split
    at `---` lines, as the recipes here write them."""
    text = (RECIPES / f"{recipe}.yml").read_text(encoding="utf-8")
    docs = re.split(r"(?m)^---\s*$", text)
    return any(not re.search(r"(?m)^name:", doc) for doc in docs if doc.strip())


def run_recipe(root: Path, recipe: str, log_dir: Path, prefix: list) -> str:
    exe = venv_python(root, VERSION).parent / "mergekit-multi"
    dest = GOLDENS / VERSION / recipe
    with tempfile.TemporaryDirectory(prefix="remerge-parity-multi-") as tmp:
        work = Path(tmp)
        (work / "models").symlink_to(MODELS)
        cmd = [str(exe), str(RECIPES / f"{recipe}.yml"), "-I", INTERMEDIATE]
        if has_final(recipe):
            cmd += ["--out-path", recipe]  # the basename is the final card's title
        res = subprocess.run(prefix + cmd, cwd=work, env=run_env(root), capture_output=True, text=True)
        (log_dir / f"{VERSION}__{recipe}.log").write_text(
            f"$ {' '.join(cmd)}\nrc={res.returncode}\n--- stdout\n{res.stdout}\n--- stderr\n{res.stderr}",
            encoding="utf-8")
        (work / "models").unlink()
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        if res.returncode != 0:
            (dest / "REFUSED.txt").write_text(exception_line(res.stderr) + "\n", encoding="utf-8")
            return "refused"
        shutil.copytree(work, dest, dirs_exist_ok=True)
        return "ok"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--venv-root", type=Path, default=Path.home() / ".cache" / "remerge-parity")
    ap.add_argument("--only", action="append", default=[], help="recipe name (repeatable)")
    args = ap.parse_args(argv)
    root = args.venv_root.expanduser().resolve()
    if not venv_python(root, VERSION).exists():
        raise SystemExit(f"no side venv for mergekit {VERSION} in {root}: run make_goldens.py first")
    recipes = args.only or multi_recipes()
    log_dir = root / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    prefix = no_aslr_prefix()
    for recipe in recipes:
        print(f"[{VERSION}] {recipe}: {run_recipe(root, recipe, log_dir, prefix)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
