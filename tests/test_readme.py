"""The README, its Chinese translation and the docs: the same commands and flags, every flag
documented, every link alive, nothing stale."""

import re

import pytest

from conftest import FAMILIES, REPO, load_module, load_script, model_py_output

README = REPO / "README.md"
README_ZH = REPO / "README.zh-CN.md"
DOCS = [*sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "README.md"]


def commands(text: str) -> set[str]:
    """Command lines of the code blocks and inline code, comments and spacing dropped."""
    found = set()
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith(("$ python", "python ", "pip ", "torchrun ")):
                found.add(" ".join(line.removeprefix("$ ").split()))
    for span in re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S)):
        if span.startswith("python "):
            found.add(" ".join(span.split()))
    return found


def flags(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))


def test_both_readmes_list_the_same_commands_flags_and_pictures():
    en, zh = README.read_text(), README_ZH.read_text()
    assert "(README.zh-CN.md)" in en and "(README.md)" in zh
    assert commands(en) == commands(zh)
    assert flags(en) == flags(zh)
    pictures = re.findall(r"\]\((docs/[\w.-]+\.png)\)", en)
    assert pictures and pictures == re.findall(r"\]\((docs/[\w.-]+\.png)\)", zh)
    for picture in pictures:
        assert (REPO / picture).read_bytes()[:4] == b"\x89PNG", picture
    # The check can fail: a flag or a command missing from one side is seen.
    assert flags(en + " --new-flag") != flags(zh)
    assert commands(en + "\n`python lenet/train.py --cache`") != commands(zh)


def test_every_flag_of_every_script_is_in_the_readme_or_the_docs():
    documented = flags(" ".join(path.read_text() for path in [README, *DOCS]))
    parsers = {"split_data.py": load_module(REPO / "split_data.py", "split_data_readme")}
    for family in FAMILIES:
        for script in ("train", "predict"):
            parsers[f"{family}/{script}.py"] = load_script(family, script)
    for name, module in parsers.items():
        options = {
            o
            for action in module.get_args_parser()._actions
            for o in action.option_strings
            if o.startswith("--")
        }
        missing = options - documented - {"--help"}
        assert not missing, f"{name}: {sorted(missing)} not in README.md nor docs/"


@pytest.mark.parametrize("family", FAMILIES)
def test_the_layer_tables_are_what_model_py_prints(family):
    printed = model_py_output(family).stdout
    block = f"```text\n$ python {family}/model.py\n{printed}```"
    assert block in (REPO / "docs" / "networks.md").read_text()


def test_the_readmes_are_short_and_every_link_leads_somewhere():
    for path in (README, README_ZH, *DOCS):
        text = path.read_text()
        if path in (README, README_ZH):
            assert len(text.splitlines()) <= 250, path
        for target in re.findall(r"\]\(([^)#]+?)(?:#[^)]*)?\)", text):
            if not target.startswith("http"):
                assert (path.parent / target).exists(), f"{path.name}: {target}"
    for name in ("networks", "training", "prediction", "distributed"):
        assert (
            f"(docs/{name}.md)" in README.read_text()
            and f"(docs/{name}.md)" in README_ZH.read_text()
        )


def test_the_chinese_readme_breaks_lines_only_where_a_space_is_meant():
    # A line break between two Chinese characters shows as a stray space in most browsers.
    cjk = "[\u3000-\u303f\u4e00-\u9fff\uff00-\uffef]"
    assert not re.findall(f"{cjk}\n{cjk}", README_ZH.read_text())
    assert re.findall(f"{cjk}\n{cjk}", "花\n朵")  # the check can fail
