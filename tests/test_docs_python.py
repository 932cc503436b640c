"""docs/python.md's code blocks run as written, in order, in one folder: the
documented API and the real one cannot drift apart."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).parent.parent / "docs" / "python.md"


def blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_python_docs_run(run_in_tmp, capsys):
    code = blocks()
    assert len(code) >= 2
    namespace: dict = {}
    for block in code:
        exec(compile(block, str(DOC), "exec"), namespace)
    assert Path("a.mp4").stat().st_size > 0 and Path("b.mp4").exists()
    r1, r2 = namespace["r1"], namespace["r2"]
    assert r1.frames == 73 and r2.loaded == [] and sorted(r1.loaded)[0] == "image_encoder"
    assert namespace["result"].outputs[0].name == "c.mp4" and Path("c.mp4").exists()
    assert "stopped; the checkpoint is in" in capsys.readouterr().out
