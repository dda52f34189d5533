#!/usr/bin/env python3
"""Generate each skill's Kubernetes custom resource (skill.yaml) from its SKILL.md.

Usage:
    scripts/skill-yaml.py [--check] [SKILL_DIR ...]

Without SKILL_DIR arguments, every folder under skills/ that holds a SKILL.md is processed.
The SKILL.md front matter must hold exactly `name` (the folder name), `description`,
`version` (a string), `keywords` (8 to 15 lowercase strings) and optionally `license`; the
file must end with exactly one newline. The generated skill.yaml carries the description,
keywords and version, and the whole SKILL.md, byte for byte, as `spec.source.inline`.
`spec.modelRef.name`, `spec.priority` and `spec.assembly` are kept from an existing
skill.yaml, or default to smollm2-135m, 100 and exact.

The script is idempotent: running it twice writes the same bytes. With --check it writes
nothing and exits with status 1 when a skill.yaml is missing or out of date.
Requires PyYAML (listed in requirements-test.txt).
"""

import argparse
import json
import re
import sys
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
SKILLS_DIR = REPO_ROOT / "skills"
REQUIRED_KEYS = {"name", "description", "version", "keywords"}
OPTIONAL_KEYS = {"license"}
DEFAULT_MODEL = "smollm2-135m"
DEFAULT_PRIORITY = 100
DEFAULT_ASSEMBLY = "exact"
INLINE_INDENT = " " * 6
# Kubernetes object names: a DNS-1123 subdomain, kept to one label for simplicity.
OBJECT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class SkillError(Exception):
    """A SKILL.md or skill.yaml that cannot be turned into a valid Skill resource."""


def split_front_matter(text, path):
    """Return the parsed YAML front matter of a SKILL.md text."""
    lines = text.split("\n")
    if lines[0] != "---":
        raise SkillError(f"{path}: must start with a '---' line")
    try:
        end = lines.index("---", 1)
    except ValueError as err:
        raise SkillError(f"{path}: front matter has no closing '---' line") from err
    meta = yaml.safe_load("\n".join(lines[1:end]))
    if not isinstance(meta, dict):
        raise SkillError(f"{path}: front matter is not a mapping")
    return meta


def validate_front_matter(meta, folder, path):
    """Check the front matter keys and values against the skills/README.md rules."""
    keys = set(meta)
    missing = REQUIRED_KEYS - keys
    unknown = keys - REQUIRED_KEYS - OPTIONAL_KEYS
    if missing or unknown:
        raise SkillError(f"{path}: missing keys {sorted(missing)}, unknown keys {sorted(unknown)}")
    if meta["name"] != folder or not OBJECT_NAME.match(folder):
        raise SkillError(f"{path}: name {meta['name']!r} must equal the folder name {folder!r}")
    if not isinstance(meta["description"], str) or not meta["description"].strip():
        raise SkillError(f"{path}: description must be a non-empty string")
    if not isinstance(meta["version"], str):
        raise SkillError(f"{path}: version must be a quoted string such as \"1.0.0\"")
    keywords = meta["keywords"]
    if not isinstance(keywords, list) or not 8 <= len(keywords) <= 15:
        raise SkillError(f"{path}: keywords must be a list of 8 to 15 entries")
    for keyword in keywords:
        if not isinstance(keyword, str) or not keyword or keyword != keyword.lower():
            raise SkillError(f"{path}: keyword {keyword!r} must be a non-empty lowercase string")


def existing_settings(yaml_path):
    """modelRef name, priority and assembly from an existing skill.yaml, else the defaults."""
    if not yaml_path.exists():
        return DEFAULT_MODEL, DEFAULT_PRIORITY, DEFAULT_ASSEMBLY
    spec = (yaml.safe_load(yaml_path.read_text(encoding="utf-8")) or {}).get("spec") or {}
    model = (spec.get("modelRef") or {}).get("name", DEFAULT_MODEL)
    priority = spec.get("priority", DEFAULT_PRIORITY)
    assembly = spec.get("assembly", DEFAULT_ASSEMBLY)
    if not isinstance(priority, int) or not 0 <= priority <= 1000:
        raise SkillError(f"{yaml_path}: spec.priority must be an integer from 0 to 1000")
    if assembly not in ("exact", "modular"):
        raise SkillError(f"{yaml_path}: spec.assembly must be exact or modular")
    return model, priority, assembly


def quoted(value):
    """A YAML double-quoted scalar (JSON strings are valid YAML)."""
    return json.dumps(value, ensure_ascii=True)


def render_skill_yaml(text, meta, model, priority, assembly):
    """The skill.yaml text for one SKILL.md."""
    inline = "".join(
        f"{INLINE_INDENT}{line}" if line.strip("\n") else line
        for line in text.splitlines(keepends=True)
    )
    keywords = ", ".join(quoted(keyword) for keyword in meta["keywords"])
    return (
        "apiVersion: skillkv.io/v1alpha1\n"
        "kind: Skill\n"
        "metadata:\n"
        f"  name: {meta['name']}\n"
        "spec:\n"
        "  modelRef:\n"
        f"    name: {model}\n"
        f"  description: {quoted(meta['description'])}\n"
        f"  keywords: [{keywords}]\n"
        f"  version: {quoted(meta['version'])}\n"
        f"  priority: {priority}\n"
        f"  assembly: {assembly}\n"
        "  source:\n"
        "    inline: |\n"
        f"{inline}"
    )


def build(skill_dir):
    """Return (path, text) of the skill.yaml for skill_dir, verified by parsing it back."""
    skill_md = skill_dir / "SKILL.md"
    text = skill_md.read_text(encoding="utf-8")
    if not text.endswith("\n") or text.endswith("\n\n"):
        raise SkillError(f"{skill_md}: must end with exactly one newline")
    if "\t" in text or "\r" in text:
        raise SkillError(f"{skill_md}: must not contain tabs or carriage returns")
    meta = split_front_matter(text, skill_md)
    validate_front_matter(meta, skill_dir.name, skill_md)
    yaml_path = skill_dir / "skill.yaml"
    rendered = render_skill_yaml(text, meta, *existing_settings(yaml_path))
    spec = yaml.safe_load(rendered)["spec"]
    if spec["source"]["inline"] != text:
        raise SkillError(f"{yaml_path}: inline text does not round-trip to {skill_md}")
    if spec["keywords"] != meta["keywords"] or spec["description"] != meta["description"]:
        raise SkillError(f"{yaml_path}: keywords or description do not round-trip")
    return yaml_path, rendered


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; fail if stale")
    parser.add_argument("skill_dirs", nargs="*", type=Path)
    args = parser.parse_args()
    dirs = args.skill_dirs or sorted(p.parent for p in SKILLS_DIR.glob("*/SKILL.md"))
    stale = []
    try:
        for skill_dir in dirs:
            yaml_path, rendered = build(skill_dir)
            current = yaml_path.read_text(encoding="utf-8") if yaml_path.exists() else None
            if current == rendered:
                continue
            if args.check:
                stale.append(str(yaml_path))
            else:
                yaml_path.write_text(rendered, encoding="utf-8")
                print(f"wrote {yaml_path}")
    except (SkillError, OSError, yaml.YAMLError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if stale:
        print("out of date (run scripts/skill-yaml.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
