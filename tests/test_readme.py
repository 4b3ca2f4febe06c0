"""The README's Python examples run as written (in a temporary directory)."""
import pathlib
import re


def test_readme_examples_run(tmp_path, monkeypatch):
    readme = pathlib.Path(__file__).resolve().parents[1] / "README.md"
    code = "\n".join(re.findall(r"```python\n(.*?)```", readme.read_text(), re.S))
    assert "otter.insert" in code and "otter.verify" in code
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(readme), "exec"), {"__name__": "readme"})
    assert (tmp_path / "adapter" / "otter_adapter.safetensors").exists()
    assert (tmp_path / "merged" / "otter_merged.safetensors").exists()
