"""The documentation stays true to the code: docs/config.md is what scripts/config_reference.py generates from the
config dataclasses, every config key has a description, README.md stays a front door (≤ 16 KB), and every relative
link in README.md and docs/*.md reaches an existing file and heading."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "config_reference.py"
REGENERATE = "python scripts/config_reference.py"
README_LIMIT = 16384


def _load_script():
    spec = importlib.util.spec_from_file_location("config_reference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ref = _load_script()
CONFIG_SOURCE = ref.CONFIG_PY.read_text()


def _with_train_field(line: str) -> str:
    """dist_tune/config/schema.py with `line` (and whatever follows it) added as the last field of TrainConfig."""
    anchor = "\n\n\n@dataclass\nclass WandbConfig:"
    assert anchor in CONFIG_SOURCE
    return CONFIG_SOURCE.replace(anchor, f"\n    {line}{anchor}", 1)


def test_config_reference_is_generated_from_the_dataclasses():
    written = (ROOT / "docs" / "config.md").read_text()
    assert written == ref.render(), f"docs/config.md is stale: regenerate it with `{REGENERATE}`"


def test_a_new_field_changes_the_reference():
    """What makes the test above fail when a field is added and the reference is not regenerated."""
    source = _with_train_field('warmdown_steps: int = 0\n    """Steps of linear decay at the end of the run."""')
    rendered = ref.render(source)
    assert rendered != (ROOT / "docs" / "config.md").read_text()
    assert "| `train.warmdown_steps` | `int` | `0` | Steps of linear decay at the end of the run. |" in rendered


def test_every_config_field_has_a_description():
    assert ref.missing_descriptions(CONFIG_SOURCE) == []


def test_an_undocumented_field_stops_the_generator():
    source = _with_train_field("warmdown_steps: int = 0")
    assert ref.missing_descriptions(source) == ["train.warmdown_steps"]
    with pytest.raises(ref.MissingDescription, match=r"train\.warmdown_steps .*has no description"):
        ref.render(source)


def test_config_reference_has_a_table_per_section_with_choices_and_defaults():
    module = ref.load_module(CONFIG_SOURCE)
    assert [name for name, _ in ref.sections(module.Config)] == [
        "model", "data", "data.sources[]", "peft", "engine", "optim", "train", "log", "log.wandb", "checkpoint",
        "eval"]
    text = ref.render()
    assert "| `engine.kind` | `str` | `single` |" in text
    assert "One of: `single`, `ddp`, `fsdp`, `deepspeed`." in text
    assert "| `optim.max_grad_norm` | `float \\| None` | `1.0` |" in text
    assert "| `data.sources[].weight` | `float` | `1.0` |" in text


def test_check_mode_reports_a_stale_reference(tmp_path, monkeypatch, capsys):
    stale = tmp_path / "config.md"
    stale.write_text("# Config reference\n")
    monkeypatch.setattr(ref, "OUTPUT", stale)
    monkeypatch.setattr(ref, "ROOT", tmp_path)
    assert ref.main(["--check"]) == 1
    assert capsys.readouterr().err.strip() == f"config.md is stale; regenerate it with `{REGENERATE}`"
    assert stale.read_text() == "# Config reference\n"  # --check writes nothing


def test_readme_is_a_front_door():
    size = (ROOT / "README.md").stat().st_size
    assert size <= README_LIMIT, f"README.md is {size} bytes, over {README_LIMIT}: move detail into docs/"


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _prose(text: str) -> str:
    """Markdown without fenced code blocks and inline code, where `](` is not a link."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of a markdown file."""
    anchors: set[str] = set()
    for heading in re.findall(r"^#{1,6}\s+(.*?)\s*$", re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M),
                              re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").lower()).replace(" ", "-")
        candidate, n = slug, 0
        while candidate in anchors:
            n += 1
            candidate = f"{slug}-{n}"
        anchors.add(candidate)
    return anchors


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_reach_existing_files_and_headings(doc):
    broken = []
    for target in LINK.findall(_prose(doc.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no heading with that anchor)")
    assert not broken, f"{doc.relative_to(ROOT)}: broken links: {', '.join(broken)}"
