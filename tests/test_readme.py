"""The README and its Chinese translation: the same commands and flags, nothing stale."""

import re
import subprocess
import sys

import pytest

from conftest import FAMILIES, REPO, load_module, load_script

README = REPO / "README.md"
README_ZH = REPO / "README.zh-CN.md"


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


def test_every_flag_of_every_script_is_in_the_readme():
    documented = flags(README.read_text())
    parsers = {"split_data.py": load_module(REPO / "split_data.py", "split_data_readme")}
    for family in FAMILIES:
        for script in ("train", "predict"):
            parsers[f"{family}/{script}.py"] = load_script(family, script)
    for name, module in parsers.items():
        options = {o for action in module.get_args_parser()._actions
                   for o in action.option_strings if o.startswith("--")}  # fmt: skip
        missing = options - documented - {"--help"}
        assert not missing, f"{name}: {sorted(missing)} not in README.md"


@pytest.mark.parametrize("family", FAMILIES)
def test_the_layer_tables_are_what_model_py_prints(family):
    printed = subprocess.run([sys.executable, str(REPO / family / "model.py")],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
    block = f"```text\n$ python {family}/model.py\n{printed}```"
    assert block in README.read_text()
    assert block in README_ZH.read_text()
