"""The one-time GGUF conversion (minutes) shows which stage it is in, with the elapsed time."""

import io
import types

from rich.console import Console

from zotune import models


def test_the_conversion_advances_the_bar_as_each_stage_begins(tmp_path, monkeypatch):
    events, screen = [], io.StringIO()
    terminal = Console(file=screen, force_terminal=True, width=160)
    real_progress = models.stage_progress

    def recorded_progress(title, stages):
        with real_progress(title, stages, console=terminal) as next_stage:
            def advance():
                events.append("next")
                next_stage()

            yield advance

    monkeypatch.setattr(models, "stage_progress", models.contextlib.contextmanager(recorded_progress))

    class Fake:
        def __init__(self, what):
            self.what, self.config = what, types.SimpleNamespace(quantization_config={})

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            events.append("copy")

        def save_pretrained(self, out):
            events.append(f"save {self.what}")

    def loads(what):
        def load(*args, **kwargs):
            events.append(what)
            return Fake(what)
        return load

    monkeypatch.setattr(models, "AutoTokenizer", types.SimpleNamespace(from_pretrained=loads("tokenizer")))
    monkeypatch.setattr(models, "AutoModelForCausalLM",
                        types.SimpleNamespace(from_pretrained=loads("weights"),
                                              from_config=lambda *a, **k: Fake("model")))
    models._convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert events == ["tokenizer", "next", "weights", "next", "copy", "next", "save model", "save tokenizer"]
    shown = screen.getvalue()
    for stage in models.GGUF_STAGES:
        assert f"converting m.gguf: {stage}" in shown
    assert "4/4" in shown and "0:00:00" in shown  # the count of stages and the elapsed time


def test_quiet_when_not_a_terminal():
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=False)
    with models.stage_progress("converting m.gguf", models.GGUF_STAGES, console) as nxt:
        for _ in models.GGUF_STAGES[1:]:
            nxt()
    assert screen.getvalue().strip() == ""
