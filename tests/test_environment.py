"""The environments users get agree: requirements.txt, constraints.txt and envs/remerge.yaml."""

import re

import yaml

from conftest import ROOT

PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==(\S+)$")


def pins(lines) -> dict[str, str]:
    """{normalized name: version} of every `name==version` line."""
    found = {}
    for line in lines:
        if m := PIN.match(line.split("#", 1)[0].strip()):
            found[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(2)
    return found


def test_conda_environment_pins_what_requirements_pin():
    """Rule jobs under `--sdm conda` get the same versions as the pip install (snakemake
    itself runs outside that environment)."""
    requirements = pins((ROOT / "requirements.txt").read_text().splitlines())
    env = yaml.safe_load((ROOT / "envs" / "remerge.yaml").read_text())
    [pip] = [d["pip"] for d in env["dependencies"] if isinstance(d, dict)]
    conda = pins(pip)
    requirements.pop("snakemake")
    assert len(conda) > 10 and conda == requirements
    assert "-e ../" in pip  # the remerge package itself


def test_every_direct_requirement_is_in_the_constraints_at_the_same_version():
    constraints = pins((ROOT / "constraints.txt").read_text().splitlines())
    for name in ("requirements.txt", "requirements-dev.txt"):
        direct = pins((ROOT / name).read_text().splitlines())
        assert direct
        for package, version in direct.items():
            assert constraints.get(package) == version, (name, package, version)
