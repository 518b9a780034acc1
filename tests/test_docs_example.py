"""docs/extending.md's worked example (a new metric registered in a few lines) runs end to end."""

from __future__ import annotations

from pathlib import Path

from simulator.metrics import registry

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


def example() -> str:
    section = DOC.read_text().split("### Worked example", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_worked_example_registers_a_metric_and_runs_the_loop(capsys) -> None:
    before = dict(registry.METRICS)
    try:
        exec(compile(example(), str(DOC), "exec"), {"__name__": "docs_example"})
        spreads = eval(capsys.readouterr().out.strip().splitlines()[-1])
        assert len(spreads) == 21 and spreads[-1] < 0.8 * spreads[0]
    finally:  # the registry is global: leave it as the other tests expect it
        registry.METRICS.clear()
        registry.METRICS.update(before)
