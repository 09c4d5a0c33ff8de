"""The library's text files (results and settings JSON, YAML recipes, gallery texts) are UTF-8
whatever the locale: a non-UTF-8 one (an ASCII or Latin-1 codeset) must neither fail on nor
mangle non-ASCII text."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = "caf\u00e9 \u732b \u2014 na\u00efve"  # Latin-1, CJK and punctuation outside ASCII

# Run in a child under the C locale with UTF-8 mode off, so that Python's default text encoding is
# ASCII (the C locale exists everywhere; LC_ALL=C also turns off PEP 538's coercion to C.UTF-8).
# The text goes in escaped: the child decodes its command line as ASCII too.
CHILD = f"""
import sys
from pathlib import Path

from qformer.evaluate.outputs import check_settings
from qformer.train.config import load_train_config

folder, text = Path(sys.argv[1]), {ascii(TEXT)}
check_settings(folder / "settings.json", {{"prompt": text}})
check_settings(folder / "settings.json", {{"prompt": text}})  # read back: the same settings, accepted
print(load_train_config(folder / "recipe.yaml").output_dir == "runs/" + text)
"""


def test_library_text_files_are_utf8_under_an_ascii_locale(tmp_path: Path) -> None:
    """Settings written then read back, and a recipe with non-ASCII in a comment and a value,
    in a child whose locale encoding is ASCII."""
    recipe = ROOT / "configs" / "tiny.yaml"
    (tmp_path / "recipe.yaml").write_text(f"# {TEXT}\n{recipe.read_text(encoding='utf-8')}\noutput_dir: runs/{TEXT}\n",
                                          encoding="utf-8")
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONIOENCODING": "utf-8",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    probe = subprocess.run([sys.executable, "-c", "import codecs, locale; "
                            "print(codecs.lookup(locale.getpreferredencoding(False)).name)"],
                           env=env, capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "ascii"  # the child really runs with an ASCII default (glibc: ANSI_X3.4-1968)
    done = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], env=env, capture_output=True,
                          encoding="utf-8", timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "True"
    assert json.loads((tmp_path / "settings.json").read_bytes().decode("utf-8")) == {"prompt": TEXT}
