"""--prompts FILE: TOML or JSON schedules become the timed-prompt string the job records."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from framepack import Pipeline, UserError
from framepack.cli import main
from framepack.pipeline.prompts import parse_timed_prompt, schedule
from framepack.pipeline.prompts_file import load_prompts_file, prompts_from_entries

TOML = """
[[prompts]]
start = 0
end = 2.4
prompt = "a man waves"

[[prompts]]
start = 2.4
prompt = "he   jumps"
"""


def test_toml_and_json_give_the_same_schedule(tmp_path):
    toml = tmp_path / "p.toml"
    toml.write_text(TOML)
    entries = [{"start": 0, "end": 2.4, "prompt": "a man waves"}, {"start": 2.4, "prompt": "he   jumps"}]
    as_list, as_object = tmp_path / "l.json", tmp_path / "o.json"
    as_list.write_text(json.dumps(entries))
    as_object.write_text(json.dumps({"prompts": entries}))
    expected = "[0.0s-2.4s: a man waves] [2.4s: he jumps]"
    assert load_prompts_file(toml) == load_prompts_file(as_list) == load_prompts_file(as_object) == expected
    assert prompts_from_entries(entries) == expected
    assert schedule(parse_timed_prompt(expected), 4, 9) == [{"a man waves": 1.0}] * 2 + [{"he jumps": 1.0}] * 2


@pytest.mark.parametrize("content, name, words", [
    ("[1, 2", "p.json", "not valid JSON"),
    ("prompts = [", "p.toml", "not valid TOML"),
    ("[]", "p.json", "non-empty list"),
    ('{"other": 1}', "p.json", "non-empty list"),
    ('[{"start": 0}]', "p.json", "entry 1: has no 'prompt'"),
    ('[{"prompt": "a"}]', "p.json", "entry 1: has no 'start'"),
    ('[{"start": 0, "prompt": "a", "stop": 2}]', "p.json", "entry 1: unknown key(s) stop"),
    ('[{"start": -1, "prompt": "a"}]', "p.json", "entry 1: start -1"),
    ('[{"start": NaN, "prompt": "a"}]', "p.json", "entry 1: start nan"),
    ('[{"start": 0, "prompt": "   "}]', "p.json", "entry 1: the prompt is empty"),
    ('[{"start": 0, "prompt": "a [b]"}]', "p.json", "entry 1: the prompt may not contain"),
    ('[{"start": 2, "end": 1, "prompt": "a"}]', "p.json", "entry 1: ends at 1 s"),
    ('[{"start": 2, "prompt": "a"}, {"start": 1, "prompt": "b"}]', "p.json", "entry 2: starts at 1 s"),
    ('["a"]', "p.json", "entry 1: must be a table"),
])
def test_bad_files_name_the_entry(content, name, words, tmp_path):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(UserError, match="--prompts .*" + words.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        load_prompts_file(path)


def test_a_missing_file(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_prompts_file(tmp_path / "nope.toml")


def args(tiny_model, test_image, out, *extra):
    return ["generate", "--image", str(test_image), "--model", str(tiny_model), "--profile", "cpu", "--size", "64x64",
            "--steps", "1", "--seconds", "2.4", "--seed", "5", "--quiet", "--output", str(out),
            "--set", 'writers=["mp4"]', "--latents-out", str(out.with_suffix(".safetensors")), *extra]


def test_the_cli_job_equals_the_bracket_prompt(tiny_model, test_image, tmp_path, capsys):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"start": 0, "prompt": "a fox"}, {"start": 1.2, "prompt": "a hare"}]))
    out = tmp_path / "file.mp4"
    assert main(args(tiny_model, test_image, out, "--prompts", str(path), "--json")) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["settings"]["prompt"] == "[0.0s: a fox] [1.2s: a hare]"
    with Pipeline(model=tiny_model, profile="cpu") as pipe:
        same = pipe.generate(test_image, "[0s: a fox] [1.2s: a hare]", output=tmp_path / "b.mp4", seconds=2.4,
                             size="64x64", steps=1, seed=5)
    assert torch.equal(load_file(str(out.with_suffix(".safetensors")))["latents"], same.latents)


@pytest.mark.parametrize("content, extra, words", [
    ('[{"start": 0, "prompt": "a"}, {"start": 5, "prompt": "b"}]', [], "past the end"),
    ("{", [], "not valid JSON"),
    ('[{"start": 0, "prompt": "a"}]', ["--prompt", "b"], "either --prompt or --prompts"),
])
def test_cli_bad_files_are_one_line_and_write_nothing(content, extra, words, tiny_model, test_image, tmp_path,
                                                      capsys):
    path = tmp_path / "p.json"
    path.write_text(content)
    out = tmp_path / "out" / "v.mp4"
    out.parent.mkdir()
    assert main(args(tiny_model, test_image, out, "--prompts", str(path), *extra)) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("framepack: error:")]
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in err, err
    assert list(out.parent.iterdir()) == []
