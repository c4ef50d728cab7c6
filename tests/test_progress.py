"""Progress: plain periodic lines outside a terminal, a tqdm bar in one; upscale and merge
report what they wrote."""

from __future__ import annotations

import logging

import pytest

from solar_ray.progress import Progress, format_eta


def test_plain_lines_say_done_total_rate_and_eta(monkeypatch):
    clock = iter([0.0, 10.0, 20.0, 40.0])
    monkeypatch.setattr("solar_ray.progress.time.monotonic", lambda: next(clock))
    lines: list[str] = []
    p = Progress("cpt", 100, "steps", terminal=False, interval_s=5, emit=lines.append)
    p.set(25)  # t=10: 25 steps in 10 s
    assert lines == ["cpt: 25/100 steps (25%), 2.5 steps/s, ETA 30s"]
    p.set(50)  # t=20
    assert lines[-1] == "cpt: 50/100 steps (50%), 2.5 steps/s, ETA 20s"
    p.close()  # t=40: the last line, whatever the interval
    assert lines[-1] == "cpt: 50/100 steps (50%), 1.25 steps/s, ETA 40s" and len(lines) == 3
    assert format_eta(75) == "1m15s" and format_eta(4000) == "1h06m"


def test_bytes_and_unknown_totals_and_quiet_intervals():
    lines: list[str] = []
    p = Progress("upscale", 3 << 30, "B", terminal=False, interval_s=3600, emit=lines.append)
    p.update(1 << 30)
    assert lines == []  # within the interval: nothing yet
    p.close()
    assert lines[0].startswith("upscale: 1.0 GiB/3.0 GiB (33%)")
    rows: list[str] = []
    with Progress("data", None, "rows", terminal=False, interval_s=0, emit=rows.append) as q:
        q.update(1200)
    assert rows[0].startswith("data: 1,200 rows")
    # work that fails says nothing more: the failed command's error stays its one line
    failed: list[str] = []
    with pytest.raises(RuntimeError), Progress("merge", 4, "tensors", terminal=False,
                                               interval_s=3600, emit=failed.append) as f:
        f.update(2)
        raise RuntimeError("boom")
    assert failed == []


def test_terminal_gets_a_tqdm_bar(capsys):
    with Progress("merge", 4, "tensors", terminal=True) as p:
        for _ in range(4):
            p.update()
    err = capsys.readouterr().err
    assert "merge" in err and "4/4" in err


def test_upscale_logs_the_bytes_it_wrote(tmp_path, tiny_llama_dir, caplog):
    from solar_ray.upscale import UpscaleConfig, run_upscale

    caplog.set_level(logging.INFO, logger="solar_ray.progress")
    run_upscale(UpscaleConfig(source=str(tiny_llama_dir), m=1, out=str(tmp_path / "up")))
    lines = [r.getMessage() for r in caplog.records if r.name == "solar_ray.progress"]
    assert lines and lines[-1].startswith("upscale: ") and "(100%)" in lines[-1]


@pytest.mark.parametrize("method", ["linear"])
def test_merge_logs_the_tensors_it_wrote(tmp_path, tiny_llama_dir, caplog, method):
    from solar_ray.merge import MergeConfig, run_merge

    caplog.set_level(logging.INFO, logger="solar_ray.progress")
    run_merge(MergeConfig(method=method, models=[str(tiny_llama_dir), str(tiny_llama_dir)],
                          out=str(tmp_path / "merged")))  # fmt: skip
    lines = [r.getMessage() for r in caplog.records if r.name == "solar_ray.progress"]
    assert lines and lines[-1].startswith("merge: ") and "tensors (100%)" in lines[-1]
